"""Micro benchmarks of the Rust core through its Python API (``ostiary._core``).

Run with ``make bench`` (``pytest bench/micro -q --benchmark-only``). A plain ``pytest`` from the
repository root does not collect this directory (``testpaths = ["tests"]`` in pyproject.toml).

What is measured, and what is not:

* ``ClientHandshake``: decoding a StartupMessage plus a PasswordMessage, the per-connection work the
  control plane asks of the core before authentication.
* The welcome a client receives (AuthenticationOk, ParameterStatus x N, BackendKeyData,
  ReadyForQuery), built from the same encoders ``ostiary.proxy.postgres`` uses.
* ``error_response`` encoding (every refusal and every denied statement).
* TLS: a full TLS 1.3 handshake between ``TlsSession.server`` and ``TlsSession.client`` pumped in
  memory, and bulk encryption/decryption in MB/s (``extra_info["MB/s"]``). The numbers include the
  PyO3 call and the ``bytes`` copies of this API, so they are a lower bound for what the engine
  does with the same ``TlsLayer`` internally.
* Not measured here: ``UpstreamHandshake`` with SCRAM (it needs a server to answer; the end-to-end
  benchmark covers it through connection churn), and the relay/engine data path, which is not
  exposed to Python (``bench/e2e.py`` measures it with pgbench).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from ostiary import _core
from ostiary.devcluster import TlsMaterial, make_tls_material

CHUNK = 16 * 1024  # one TLS record of plaintext
BULK = 1 << 20  # bytes moved per benchmark round in the bulk TLS benchmarks
SERVER_PARAMS = [
    ("application_name", "pgbench"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("default_transaction_read_only", "off"),
    ("in_hot_standby", "off"),
    ("integer_datetimes", "on"),
    ("IntervalStyle", "postgres"),
    ("is_superuser", "off"),
    ("server_encoding", "UTF8"),
    ("server_version", "15.20"),
    ("session_authorization", "bench"),
    ("standard_conforming_strings", "on"),
    ("TimeZone", "Etc/UTC"),
]


def _message(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def _startup_message(params: dict[str, str]) -> bytes:
    body = struct.pack("!i", 3 << 16)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


STARTUP = _startup_message(
    {"user": "ci", "database": "app", "application_name": "pgbench", "client_encoding": "UTF8"}
)
PASSWORD = _message(b"p", b"ci-gateway-secret-0123456789\0")


def _record_throughput(benchmark: BenchmarkFixture, nbytes: int, summary_line: Callable[[str], None]) -> None:
    """Stores MB/s in ``extra_info`` (kept by ``--benchmark-json``) and prints it in the summary."""
    stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
    if stats is not None and stats.stats.mean > 0:
        mbps = round(nbytes / stats.stats.mean / 1e6, 1)
        benchmark.extra_info["bytes_per_round"] = nbytes
        benchmark.extra_info["MB/s"] = mbps
        summary_line(f"{mbps:,.1f} MB/s ({nbytes >> 10} KiB per round)")


# -- startup ---------------------------------------------------------------------------------------


def _decode_startup() -> tuple[object, object]:
    h = _core.ClientHandshake()
    h.receive_data(STARTUP)
    startup = h.next_event()
    h.expect_password()
    h.receive_data(PASSWORD)
    return startup, h.next_event()


def test_client_handshake_startup_and_password(benchmark: BenchmarkFixture) -> None:
    startup, password = benchmark(_decode_startup)
    assert startup == (
        "startup",
        [("user", "ci"), ("database", "app"), ("application_name", "pgbench"), ("client_encoding", "UTF8")],
        b"",
    )
    assert password == ("password", b"ci-gateway-secret-0123456789")


def _welcome() -> bytes:
    parts = [_core.auth_ok()]
    parts += [_core.parameter_status(k, v) for k, v in SERVER_PARAMS]
    parts.append(_core.backend_key_data(12345, -98765))
    parts.append(_core.ready_for_query("I"))
    return b"".join(parts)


def test_welcome_encode(benchmark: BenchmarkFixture) -> None:
    out = benchmark(_welcome)
    assert out.startswith(b"R\x00\x00\x00\x08\x00\x00\x00\x00")
    assert out.endswith(b"Z\x00\x00\x00\x05I")


def test_error_response_encode(benchmark: BenchmarkFixture) -> None:
    out = benchmark(
        _core.error_response,
        "ERROR",
        "42501",
        'permission denied for table "accounts"',
        detail="the gateway's policy denies UPDATE on accounts for workload ci",
        hint="ask for the accounts-writer role",
    )
    assert out[:1] == b"E"
    assert struct.unpack("!i", out[1:5])[0] == len(out) - 1


# -- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("micro-tls"))


@pytest.fixture(scope="module")
def tls_configs(tls_material: TlsMaterial) -> tuple[_core.TlsServerConfig, _core.TlsClientConfig]:
    server = _core.TlsServerConfig(str(tls_material.server_cert), str(tls_material.server_key))
    client = _core.TlsClientConfig(str(tls_material.ca_cert))
    return server, client


def _pump(a: _core.TlsSession, b: _core.TlsSession) -> None:
    """Moves raw bytes both ways until neither side has anything to send."""
    while True:
        moved = False
        data = a.take_raw()
        if data:
            b.receive_raw(data)
            moved = True
        data = b.take_raw()
        if data:
            a.receive_raw(data)
            moved = True
        if not moved:
            return


def _handshake(
    server_cfg: _core.TlsServerConfig, client_cfg: _core.TlsClientConfig
) -> tuple[_core.TlsSession, _core.TlsSession]:
    server = _core.TlsSession.server(server_cfg)
    client = _core.TlsSession.client(client_cfg, "localhost")
    _pump(client, server)
    return server, client


def test_tls_handshake(
    benchmark: BenchmarkFixture, tls_configs: tuple[_core.TlsServerConfig, _core.TlsClientConfig]
) -> None:
    server, client = benchmark(_handshake, *tls_configs)
    assert not server.handshaking and not client.handshaking
    version, suite = server.describe()
    benchmark.extra_info["protocol"] = version
    benchmark.extra_info["cipher_suite"] = suite


@pytest.fixture
def tls_pair(
    tls_configs: tuple[_core.TlsServerConfig, _core.TlsClientConfig],
) -> Iterator[tuple[_core.TlsSession, _core.TlsSession]]:
    server, client = _handshake(*tls_configs)
    # Drain what TLS 1.3 sends after the handshake (session tickets) so the benchmarks start clean.
    client.read_plain()
    server.read_plain()
    yield server, client


def test_tls_encrypt_bulk(
    benchmark: BenchmarkFixture,
    tls_pair: tuple[_core.TlsSession, _core.TlsSession],
    summary_line: Callable[[str], None],
) -> None:
    """Client -> wire: write_plain + take_raw in 16 KiB records; the ciphertext is dropped."""
    _, client = tls_pair
    chunk = b"x" * CHUNK

    def encrypt() -> int:
        n = 0
        for _ in range(BULK // CHUNK):
            client.write_plain(chunk)
            n += len(client.take_raw())
        return n

    wire = benchmark(encrypt)
    assert wire > BULK
    benchmark.extra_info["wire_overhead_pct"] = round(100 * (wire - BULK) / BULK, 2)
    _record_throughput(benchmark, BULK, summary_line)


def test_tls_decrypt_bulk(
    benchmark: BenchmarkFixture,
    tls_pair: tuple[_core.TlsSession, _core.TlsSession],
    summary_line: Callable[[str], None],
) -> None:
    """Wire -> plaintext: receive_raw + read_plain of 1 MiB; the ciphertext is made outside the timing
    (records carry sequence numbers, so each round needs fresh ones)."""
    server, client = tls_pair
    chunk = b"y" * CHUNK

    def make_records() -> tuple[tuple[list[bytes]], dict[str, object]]:
        records = []
        for _ in range(BULK // CHUNK):
            client.write_plain(chunk)
            records.append(client.take_raw())
        return (records,), {}

    def decrypt(records: list[bytes]) -> int:
        n = 0
        for raw in records:
            server.receive_raw(raw)
            plain, _ = server.read_plain()
            n += len(plain)
        return n

    got = benchmark.pedantic(  # type: ignore[no-untyped-call]
        decrypt, setup=make_records, rounds=200, iterations=1, warmup_rounds=5
    )
    assert got == BULK
    _record_throughput(benchmark, BULK, summary_line)


def test_tls_round_trip_bulk(
    benchmark: BenchmarkFixture,
    tls_pair: tuple[_core.TlsSession, _core.TlsSession],
    summary_line: Callable[[str], None],
) -> None:
    """Encrypt on one side and decrypt on the other, record by record: what one TLS leg costs."""
    server, client = tls_pair
    chunk = b"z" * CHUNK

    def round_trip() -> int:
        n = 0
        for _ in range(BULK // CHUNK):
            client.write_plain(chunk)
            server.receive_raw(client.take_raw())
            plain, _ = server.read_plain()
            n += len(plain)
        return n

    assert benchmark(round_trip) == BULK
    _record_throughput(benchmark, BULK, summary_line)
