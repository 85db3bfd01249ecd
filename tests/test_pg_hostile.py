"""Hostile input at the listener: raw sockets sending what no driver would.

Every bad connection must end promptly, with a FATAL ErrorResponse (SQLSTATE 08P01 for protocol
violations) or a plain close, never a hang; every read has a deadline. Throughout, a well-behaved
session opened before the hostile traffic must keep working, and a new session must work after
it (``bystander``), and the gateway must not log a traceback.
"""

from __future__ import annotations

import os
import random
import resource
import selectors
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    GatewayFactory,
    GatewayProcess,
    allow_plaintext,
    gateway_config,
    psql,
)
from ostiary.devcluster import PgCluster, TlsMaterial
from ostiary.proxy.server import Throttle
from pgraw import (
    SSL_REQUEST,
    SYNC,
    Outcome,
    RawConn,
    cancel_request,
    data_rows,
    errors_in,
    password_message,
    query_message,
    startup_message,
    typed,
)

DEFAULT_STARTUP_TIMEOUT = 10.0  # limits.startup_timeout when not overridden
FAST_STARTUP_TIMEOUT = 1.0
PROMPT = 2.0  # "immediately": well under the default startup timeout, generous for a loaded CI box


# -- fixtures and helpers --------------------------------------------------------------------------


def plaintext_allowed_config(pg: PgCluster, tls: TlsMaterial, tmp: Path, **overrides: Any) -> dict[str, Any]:
    """conftest.gateway_config with ``tls.mode: allow`` (plaintext clients accepted), keeping the
    certificate settings it already has."""
    return allow_plaintext(gateway_config(pg, tls, 0, tmp, **overrides))


@pytest.fixture
def gw(gateway_factory: GatewayFactory) -> GatewayProcess:
    """TLS required, default startup timeout (10 s): refusals that must be immediate are told
    apart from ones that wait for the timeout."""
    return gateway_factory()


@pytest.fixture
def gw_fast(gateway_factory: GatewayFactory) -> GatewayProcess:
    """TLS required, startup timeout 1 s."""
    return gateway_factory(limits={"startup_timeout": FAST_STARTUP_TIMEOUT})


@pytest.fixture
def gw_plain(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> GatewayProcess:
    """Plaintext clients allowed, so the protocol can be spoken over a raw socket."""
    return gateway_factory(plaintext_allowed_config(pg, gateway_tls, tmp_path))


@contextmanager
def bystander(gw: GatewayProcess) -> Iterator[psycopg.Connection[Any]]:
    """A well-behaved session open across the hostile traffic; checked afterwards together with a
    new psql session and the gateway's health."""
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        yield conn
        assert gw.proc.poll() is None, f"the gateway exited with {gw.proc.returncode}:\n{gw.log()[-4000:]}"
        assert conn.execute("select 'still here', current_user").fetchone() == ("still here", "app")
    r = psql(gw, "-At", "-c", "select 40 + 2", timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42"
    assert gw.proc.poll() is None
    assert "Traceback" not in gw.log(), gw.log()[-4000:]


def assert_fatal(
    out: Outcome, code: str, *, contains: str | None = None, within: float | None = None
) -> dict[str, str]:
    """Exactly one FATAL ErrorResponse with `code`, then the connection closed."""
    assert out.closed, f"connection not closed: {out.describe()}"
    assert [t for t, _ in out.messages] == [b"E"], out.describe()
    err = out.errors[0]
    assert err.get("S") == "FATAL" and err.get("V", "FATAL") == "FATAL", err
    assert err.get("C") == code, err
    if contains is not None:
        assert contains in err.get("M", ""), err
    if within is not None:
        assert out.elapsed < within, f"took {out.elapsed:.2f}s: {out.describe()}"
    return err


def raw(gw: GatewayProcess, timeout: float = 10.0) -> RawConn:
    return RawConn(gw.port, timeout=timeout)


def tls_raw(gw: GatewayProcess) -> RawConn:
    c = raw(gw)
    c.start_tls(gw.tls.ca_cert)
    return c


def half_close(c: RawConn) -> None:
    with suppress(OSError):
        c.sock.shutdown(socket.SHUT_WR)


def gateway_fds(gw: GatewayProcess) -> int:
    return len(os.listdir(f"/proc/{gw.proc.pid}/fd"))


GOOD_STARTUP = startup_message({"user": CLIENT_USER, "database": "app"})


# -- first packet: random bytes, truncation, huge lengths ------------------------------------------


def expected_immediate_error(data: bytes) -> frozenset[str] | None:
    """The SQLSTATEs the startup decoder may refuse `data` with without waiting for more bytes
    ("protocol 2" for a protocol 2 error string), or None when it must wait."""
    if len(data) < 4:
        return None
    (length,) = struct.unpack("!i", data[:4])
    if length < 8 or length > 10_000:
        return frozenset({"08P01"})
    if len(data) < length:
        return None
    # A complete packet: its protocol code decides (PostgreSQL's codes and wording).
    (major,) = struct.unpack("!H", data[4:6])
    if major < 3:
        return frozenset({"protocol 2"})
    if major == 3:  # a 3.x StartupMessage of random parameters: malformed, or without a user
        return frozenset({"08P01", "28000"})
    if major == 1234:  # SSLRequest, GSSENCRequest, CancelRequest codes at a wrong length
        return frozenset({"08P01"})
    return frozenset({"0A000"})


def assert_refused(out: Outcome, codes: frozenset[str], within: float | None = None) -> None:
    if "protocol 2" in codes:
        assert out.closed and not out.messages, out.describe()
        assert out.raw.startswith(b"EFATAL:  unsupported frontend protocol "), out.describe()
        assert out.raw.endswith(b"\n\0"), out.describe()
        assert within is None or out.elapsed < within, out.describe()
    else:
        assert out.errors and out.errors[0].get("C") in codes, out.describe()
        assert_fatal(out, out.errors[0]["C"], within=within)


def test_random_bytes_as_first_packet(gw: GatewayProcess, subtests: pytest.Subtests) -> None:
    lengths = [1, 3, 4, 7, 8, 9, 16, 100, 1000, 4096, 10_000, 16_000, 70_000]
    with bystander(gw):
        for seed in range(1, 9):
            rng = random.Random(seed)
            cases = [rng.randbytes(n) for n in lengths]
            # Random bytes rarely look like a plausible length; force some cases through the
            # "waiting for the rest of the packet" and "complete packet, bad protocol code" paths.
            cases.append(struct.pack("!i", 200) + rng.randbytes(50))
            cases.append(struct.pack("!i", 64) + rng.randbytes(60))
            cases.append(b"\x16\x03\x01" + rng.randbytes(60))  # a TLS record header, then garbage
            for data in cases:
                with subtests.test(seed=seed, length=len(data), head=data[:8].hex()):
                    check_random_first_packet(gw, data)


TLS_ALERT = b"\x15"


def check_random_first_packet(gw: GatewayProcess, data: bytes) -> None:
    with raw(gw) as c:
        try:
            c.send(data)
        except (BrokenPipeError, ConnectionResetError):
            return  # refused while we were still sending: that is a close
        if data[:1] == b"\x16":
            # A TLS handshake record first is a client starting TLS at once (sslnegotiation=direct):
            # garbage after it gets a TLS alert and the close, or just the close when the record
            # is still incomplete at EOF.
            half_close(c)
            out = c.outcome(PROMPT + 3)
            assert out.closed and out.elapsed < PROMPT, out.describe()
            assert not out.messages and out.raw[:1] in (b"", TLS_ALERT), out.describe()
            return
        immediate = expected_immediate_error(data)
        if immediate and len(data) <= 16_000:
            # The gateway reads everything we sent, so its FATAL is not lost to a reset.
            out = c.outcome(PROMPT + 3)
            assert_refused(out, immediate, within=PROMPT)
        else:
            half_close(c)  # we are done sending: the gateway must not wait for more
            out = c.outcome(PROMPT + 3)
            assert out.closed and out.elapsed < PROMPT, out.describe()
            if not immediate:
                assert out.messages == [], f"an incomplete packet then EOF is a plain close: {out.describe()}"
            elif out.messages or out.raw:
                assert_refused(out, immediate)


def test_truncated_startup_then_close(gw: GatewayProcess, subtests: pytest.Subtests) -> None:
    with bystander(gw):
        for cut in [1, 4, 8, 12, len(GOOD_STARTUP) - 1]:
            with subtests.test(cut=cut), raw(gw) as c:
                c.send(GOOD_STARTUP[:cut])
                half_close(c)
                out = c.outcome(PROMPT + 3)
                assert out.closed and out.elapsed < PROMPT, out.describe()
                assert out.messages == [], out.describe()


SILENCES = [
    "nothing",
    "length only",
    "half a startup",
    "startup minus one byte",
    "ssl request only",
    "startup then no password",
    "random",
]


def silence_case(gw: GatewayProcess, what: str) -> tuple[Outcome, float]:
    with raw(gw) as c:
        start = time.monotonic()
        if what == "length only":
            c.send(GOOD_STARTUP[:4])
        elif what == "half a startup":
            c.send(GOOD_STARTUP[: len(GOOD_STARTUP) // 2])
        elif what == "startup minus one byte":
            c.send(GOOD_STARTUP[:-1])
        elif what == "ssl request only":
            c.send(SSL_REQUEST)
            assert c.sock.recv(1) == b"S"
        elif what == "startup then no password":
            c.start_tls(gw.tls.ca_cert)
            c.send(GOOD_STARTUP)
            m = c.recv_message()
            assert m is not None and m[0] == b"R", m
        elif what == "random":
            c.send(struct.pack("!i", 5000) + random.Random(9).randbytes(300))
        out = c.outcome(FAST_STARTUP_TIMEOUT + 5)
        return out, time.monotonic() - start


def test_silence_is_ended_by_the_startup_timeout(gw_fast: GatewayProcess, subtests: pytest.Subtests) -> None:
    """Truncated or missing input, then silence: the gateway ends the connection after
    limits.startup_timeout with an error that says so (or a close, when TLS never started)."""
    with bystander(gw_fast), ThreadPoolExecutor(len(SILENCES)) as pool:
        futures = {what: pool.submit(silence_case, gw_fast, what) for what in SILENCES}
        for what, fut in futures.items():
            with subtests.test(what=what):
                out, elapsed = fut.result()
                assert out.closed, f"not closed after {elapsed:.1f}s: {out.describe()}"
                assert FAST_STARTUP_TIMEOUT * 0.8 <= elapsed < FAST_STARTUP_TIMEOUT + 3, (
                    f"closed after {elapsed:.2f}s"
                )
                if what == "ssl request only":
                    assert out.messages == [], out.describe()  # no TLS session to say anything in
                else:
                    err = assert_fatal(out, "08P01")
                    assert "did not complete within 1 s" in err["M"], err


def test_bad_startup_length_is_refused_immediately(gw: GatewayProcess, subtests: pytest.Subtests) -> None:
    """A 2 GiB (or negative, or too small) length prefix is refused as soon as the four bytes are
    in, well under the (10 s) startup timeout, without buffering what follows."""
    with bystander(gw):
        rss0 = gw.rss_kib()
        for prefix in [0x7FFFFFFF, 0x40000000, 10_001, -1, -0x80000000, 0, 7]:
            for rest in (b"", struct.pack("!i", 196608)):
                with subtests.test(prefix=prefix, rest=rest.hex()), raw(gw) as c:
                    c.send(struct.pack("!i", prefix) + rest)
                    out = c.outcome(DEFAULT_STARTUP_TIMEOUT + 2)
                    err = assert_fatal(out, "08P01", within=PROMPT)
                    assert "length" in err["M"] or "exceeds" in err["M"], err
        # The refusal does not depend on sending the announced bytes: stream 32 MiB after a 2 GiB
        # prefix; the gateway must hang up long before, and hold none of it.
        with subtests.test("2 GiB prefix then a stream of bytes"):
            with raw(gw) as c:
                prefix = 0x7FFFFFFF
                c.send(struct.pack("!i", prefix))
                chunk = b"\0" * 65536
                sent = 0
                deadline = time.monotonic() + PROMPT + 3
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    while time.monotonic() < deadline and sent < 32 << 20:
                        c.sock.settimeout(max(0.01, deadline - time.monotonic()))
                        try:
                            c.sock.sendall(chunk)
                        except TimeoutError:
                            continue
                        sent += len(chunk)
                assert sent < 32 << 20
            assert gw.rss_kib() - rss0 < 16 * 1024


def test_ssl_request_then_garbage_instead_of_client_hello(gw: GatewayProcess) -> None:
    garbage = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        random.Random(11).randbytes(4096),
        b"\x16\x03\x01\x00\x05hello",  # a handshake record that is not a ClientHello
        GOOD_STARTUP,  # plaintext startup after the server said 'S'
    ]
    with bystander(gw):
        for data in garbage:
            with raw(gw) as c:
                c.send(SSL_REQUEST)
                assert c.sock.recv(1) == b"S"
                c.send(data)
                start = time.monotonic()
                got = b""
                c.sock.settimeout(PROMPT + 3)
                try:
                    while chunk := c.sock.recv(65536):
                        got += chunk
                except (ConnectionResetError, TimeoutError):
                    pass
                elapsed = time.monotonic() - start
                assert elapsed < PROMPT, f"{data[:16]!r}: no close after {elapsed:.2f}s"
                # Nothing, or a TLS alert record (content type 21): never plaintext.
                assert got == b"" or got[0] == 0x15, f"{data[:16]!r}: {got[:40]!r}"
        # Bytes pipelined after SSLRequest before its answer (CVE-2021-23214): refused in plaintext.
        with raw(gw) as c:
            c.send(SSL_REQUEST + b"\x16\x03\x01\x02\x00")
            out = c.outcome(PROMPT + 3)
            # The 'S' is not sent: the refusal comes first.
            assert_fatal(out, "08P01", contains="after an encryption request", within=PROMPT)


def test_cancel_request_with_unknown_key_is_closed_quietly(gw: GatewayProcess) -> None:
    """Closed without a word, as PostgreSQL does; a flood of them (someone guessing keys) is one
    log line naming the peer, not a line per request."""
    before = gw.log().count("cancel request with an unknown key")
    with bystander(gw):
        for i in range(60):
            pid, key = [(1, 2), (0x7FFFFFFF, -1), (-5, 0)][i % 3]
            with raw(gw) as c:
                c.send(cancel_request(pid, key))
                out = c.outcome(PROMPT + 3)
                assert out.closed and out.elapsed < PROMPT and out.messages == [], out.describe()
    lines = [ln for ln in gw.log().splitlines() if "cancel request with an unknown key" in ln]
    assert len(lines) - before <= 1, lines  # at most one a minute (none if one was logged < 60 s ago)
    assert not lines or "from 127.0.0.1" in lines[-1], lines


def test_thousand_half_open_connections(gateway_factory: GatewayFactory) -> None:
    """1,000 connections that never finish their startup, all held at once, do not disturb a
    working session; the startup timeout then closes every one of them and frees their sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))  # the gateway inherits it
    timeout = 4.0
    gw = gateway_factory(limits={"startup_timeout": timeout})
    fds0 = gateway_fds(gw)
    n = 1000
    conns: list[socket.socket] = []
    kinds: list[str] = []
    with bystander(gw) as conn:
        try:
            for i in range(n):
                s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
                kind = ("silent", "partial", "ssl")[i % 3]
                if kind == "partial":
                    s.sendall(GOOD_STARTUP[:10])
                elif kind == "ssl":
                    s.sendall(SSL_REQUEST)
                conns.append(s)
                kinds.append(kind)
            opened = time.monotonic()
            # While they are all held: the gateway has accepted them, and sessions work.
            deadline = time.monotonic() + 3
            while gateway_fds(gw) < fds0 + n and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gateway_fds(gw) >= fds0 + n, (
                f"the gateway holds {gateway_fds(gw) - fds0} of {n} connections"
            )
            for i in range(3):
                t = time.monotonic()
                r = psql(
                    gw, "-At", "-c", f"select {i} + 1, count(*) from generate_series(1, 1000)", timeout=20
                )
                assert r.returncode == 0, r.stderr
                assert r.stdout.strip() == f"{i + 1}|1000"
                assert conn.execute("select 2").fetchone() == (2,)
                assert time.monotonic() - t < 3
            assert time.monotonic() - opened < timeout, "too slow to test while the connections are held"
            # Then the startup timeout closes each one.
            sel = selectors.DefaultSelector()
            got: dict[int, bytes] = {}
            for idx, s in enumerate(conns):
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, idx)
                got[idx] = b""
            open_ = set(range(n))
            deadline = opened + timeout + 8
            while open_ and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.5):
                    idx = key.data
                    try:
                        chunk = conns[idx].recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except ConnectionResetError:
                        chunk = b""
                    if chunk:
                        got[idx] += chunk
                    else:
                        sel.unregister(conns[idx])
                        open_.discard(idx)
            sel.close()
            assert not open_, (
                f"{len(open_)} connections still open {time.monotonic() - opened:.1f}s after opening"
            )
            for idx, kind in enumerate(kinds):
                data = got[idx]
                if kind == "ssl":
                    assert data == b"S", (idx, data[:40])
                else:
                    out = Outcome(messages=[(data[:1], data[5:])], closed=True)
                    err = assert_fatal(out, "08P01")
                    assert "did not complete within" in err["M"]
        finally:
            for s in conns:
                s.close()
        deadline = time.monotonic() + 5
        while gateway_fds(gw) > fds0 + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gateway_fds(gw) <= fds0 + 5, f"{gateway_fds(gw) - fds0} descriptors leaked"


# -- after authentication (plaintext client leg) ---------------------------------------------------


def plain_session(gw: GatewayProcess) -> RawConn:
    c = raw(gw)
    msgs = c.login(CLIENT_USER, CLIENT_PASSWORD)
    assert msgs[-1] == (b"Z", b"I")
    rows = data_rows(c.query("select 1 + 1"))
    assert rows == [["2"]]
    return c


def test_negative_or_tiny_length_after_auth(gw_plain: GatewayProcess, subtests: pytest.Subtests) -> None:
    with bystander(gw_plain):
        for length in [-1, -0x80000000, 0, 3]:
            with subtests.test(length=length), plain_session(gw_plain) as c:
                c.send(b"Q" + struct.pack("!i", length))
                out = c.outcome(PROMPT + 3)
                assert_fatal(out, "08P01", contains="invalid", within=PROMPT)


def test_2gib_message_after_auth(gw_plain: GatewayProcess, subtests: pytest.Subtests) -> None:
    with bystander(gw_plain):
        rss0 = gw_plain.rss_kib()
        for tag in [b"Q", b"d", b"P", b"X"]:
            with subtests.test(tag=tag), plain_session(gw_plain) as c:
                c.send(tag + struct.pack("!i", 0x7FFFFFFF) + b"select 1")
                out = c.outcome(PROMPT + 3)
                assert_fatal(out, "08P01", contains="exceeds the limit", within=PROMPT)
        assert gw_plain.rss_kib() - rss0 < 16 * 1024


def test_messages_before_a_bad_length_are_answered_first(gw_plain: GatewayProcess, pg: PgCluster) -> None:
    """PostgreSQL runs and answers the messages it read before one with an impossible length,
    then closes. The gateway used to answer only with its FATAL: an INSERT sent just before ran
    and committed, and the client never learned it."""
    from conftest import APP_PASSWORD

    pg.execute("create table if not exists badlen_t(v text)", dbname="app", user="app", password=APP_PASSWORD)
    with bystander(gw_plain), plain_session(gw_plain) as c:
        c.send(
            typed(b"Q", b"insert into badlen_t values ('before the bad length') returning v\0")
            + b"Q"
            + struct.pack("!i", 0x7FFFFFFF)
            + b"select 1"
        )
        out = c.outcome(PROMPT + 3)
        assert out.closed, out.describe()
        assert [t for t, _ in out.messages] == [b"T", b"D", b"C", b"Z", b"E"], out.describe()
        err = out.errors[-1]
        assert (err.get("S"), err.get("C")) == ("FATAL", "08P01") and "exceeds the limit" in err["M"], err
    left = pg.execute("select count(*) from badlen_t", dbname="app", user="app", password=APP_PASSWORD)
    assert left.strip() == "1"
    pg.execute("drop table badlen_t", dbname="app", user="app", password=APP_PASSWORD)


def test_query_without_nul_terminator_then_sync(gw_plain: GatewayProcess) -> None:
    """Whatever the server makes of it, the session ends with an error or carries on sanely."""
    with bystander(gw_plain), plain_session(gw_plain) as c:
        c.send(typed(b"Q", b"select 1") + SYNC)
        out = c.outcome(1.0)
        errs = out.errors
        assert errs, f"no error for a malformed Query: {out.describe()}"
        assert errs[0].get("C") == "08P01", errs
        if out.closed:
            assert errs[-1].get("S") == "FATAL", errs
        else:
            # PostgreSQL reports ERROR 08P01 and stays in sync: one ReadyForQuery for the Query,
            # one for the Sync. Then the session works.
            assert [t for t, _ in out.messages] == [b"E", b"Z", b"Z"], out.describe()
            assert data_rows(c.query("select 'sane'")) == [["sane"]]


def test_unknown_message_type_after_auth(gw_plain: GatewayProcess) -> None:
    with bystander(gw_plain), plain_session(gw_plain) as c:
        c.send(typed(b"z", b"whatever"))
        out = c.outcome(PROMPT + 3)
        assert_fatal(out, "08P01", within=PROMPT)


# -- refusals at login -----------------------------------------------------------------------------


def login_outcome(
    gw: GatewayProcess, params: dict[str, str], password: str | None = CLIENT_PASSWORD
) -> Outcome:
    with tls_raw(gw) as c:
        c.send(startup_message(params))
        m = c.recv_message()
        if m is not None and m[0] == b"R" and password is not None:
            assert struct.unpack("!i", m[1][:4])[0] == 3, m
            c.send(password_message(password))
            return c.outcome(PROMPT + 3)
        out = c.outcome(PROMPT + 3)
        if m is not None:
            out.messages.insert(0, m)
        return out


def test_wrong_password(gw: GatewayProcess) -> None:
    with bystander(gw):
        out = login_outcome(gw, {"user": CLIENT_USER, "database": "app"}, password="hunter2-wrong")
        err = assert_fatal(out, "28P01", within=PROMPT)
        assert err["M"] == 'password authentication failed for user "ci"'
        assert "hunter2-wrong" not in str(out.errors) + gw.log()


def test_unknown_user_looks_like_a_wrong_password(gw: GatewayProcess) -> None:
    with bystander(gw):
        out = login_outcome(gw, {"user": "mallory", "database": "app"}, password=CLIENT_PASSWORD)
        err = assert_fatal(out, "28P01", within=PROMPT)
        assert err["M"] == 'password authentication failed for user "mallory"'
        assert CLIENT_PASSWORD not in str(out.errors)


def test_unknown_dbname_lists_the_names(gw: GatewayProcess) -> None:
    with bystander(gw):
        out = login_outcome(gw, {"user": CLIENT_USER, "database": "nosuchdb"})
        err = assert_fatal(out, "3D000", contains='"nosuchdb"', within=PROMPT)
        assert "app" in err.get("H", ""), err
        # psql shows it too.
        r = psql(gw, "-c", "select 1", dbname="nosuchdb")
        assert r.returncode != 0
        assert 'no connection named "nosuchdb"' in r.stderr


def test_refused_startup_parameters(gw: GatewayProcess, subtests: pytest.Subtests) -> None:
    refused = [
        ({"replication": "true"}, "'replication' is not allowed"),
        ({"replication": "database"}, "'replication' is not allowed"),
        ({"Replication": "yes"}, "'replication' is not allowed"),
        ({"options": "-B 100000"}, "'-B' is not passed through the gateway"),
        ({"options": "-c"}, "'-c' is not passed through the gateway"),
        ({"OPTIONS": "--statement_timeout"}, "'statement_timeout' is not a setting"),
        ({"options": "-c user=postgres"}, "'user=postgres' is not a setting"),
        ({"options": "-c replication=database"}, "'replication=database' is not a setting"),
    ]
    with bystander(gw):
        for params, words in refused:
            with subtests.test(params=params):
                out = login_outcome(gw, {"user": CLIENT_USER, "database": "app", **params})
                assert_fatal(out, "08P01", contains=words, within=PROMPT)


def test_startup_parameters_through_libpq(gw: GatewayProcess) -> None:
    """PGOPTIONS settings apply (each judged like a parameter of its own); replication=off is an
    ordinary session, as with PostgreSQL; a replication connection is refused."""
    with bystander(gw):
        # (As a keyword psycopg quotes it for the connection string, backslash included.)
        options = r"-c statement_timeout=4321 -c application_name=a\ b"
        with psycopg.connect(gw.dsn(replication="off"), options=options) as c:
            got = c.execute(
                "select current_setting('statement_timeout'), current_setting('application_name')"
            )
            assert got.fetchone() == ("4321ms", "a b")
        with pytest.raises(psycopg.OperationalError, match="is not allowed through the gateway"):
            psycopg.connect(gw.dsn(replication="database")).close()


def test_not_a_password_message_during_authentication(gw: GatewayProcess) -> None:
    with bystander(gw):
        for bad in (
            query_message("select 1"),
            typed(b"p", b"x" * 20_000),
            typed(b"p", b"no-nul"),
            b"p\xff\xff\xff\xff",
        ):
            with tls_raw(gw) as c:
                c.send(GOOD_STARTUP)
                m = c.recv_message()
                assert m is not None and m[0] == b"R"
                c.send(bad)
                out = c.outcome(PROMPT + 3)
                assert_fatal(out, "08P01", within=PROMPT)


def test_plaintext_startup_refused_when_tls_required(gw: GatewayProcess) -> None:
    with bystander(gw), raw(gw) as c:
        c.send(GOOD_STARTUP)
        out = c.outcome(PROMPT + 3)
        assert_fatal(out, "28000", contains="requires TLS", within=PROMPT)
        assert errors_in(out.messages)


def test_throttle_counts_what_it_does_not_log() -> None:
    now = [100.0]
    t = Throttle(60.0, clock=lambda: now[0])
    assert t.hit() == 1  # the first is logged
    assert [t.hit() for _ in range(5)] == [None] * 5
    now[0] += 59.9
    assert t.hit() is None
    now[0] += 0.2
    assert t.hit() == 7  # the six held back and this one
    assert t.hit() is None
    now[0] += 3600
    assert t.hit() == 2


def test_too_many_clients_is_said_inside_tls(gateway_factory: GatewayFactory) -> None:
    """Over `limits.max_connections`, a TLS client (every token client) got the 53300 error in
    clear as the answer to its SSLRequest, which libpq cannot read ("server sent an error response
    during SSL exchange"). It is now sent after the TLS handshake and startup packet, as
    PostgreSQL does, and the log says so."""
    gw = gateway_factory(limits={"max_connections": 1})
    deadline = time.monotonic() + 10
    while True:  # the factory's readiness probe may hold the one slot for a moment
        try:
            first = psycopg.connect(gw.dsn())
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with first:
        assert first.execute("select 1").fetchone() == (1,)
        for mode in ("verify-full", "require", "prefer"):
            with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already") as e:
                psycopg.connect(gw.dsn(sslmode=mode), connect_timeout=10).close()
            assert "during SSL exchange" not in str(e.value)
            assert e.value.sqlstate in (None, "53300")
        assert first.execute("select 2").fetchone() == (2,)
    assert "53300 sorry, too many clients already" in gw.log()
