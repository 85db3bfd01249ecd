"""When the gateway cannot open the upstream session: the client gets a FATAL that says so, and the
gateway keeps serving everyone else.

Most cases use the real cluster (wrong credentials, unknown database, nothing listening). One needs
an upstream that asks for an authentication method the gateway does not speak (GSSAPI), which the
test cluster's pg_hba.conf cannot be made to do; a few lines of socket code play that server, up to
its first message. The clients are real (psql, psycopg).
"""

from __future__ import annotations

import copy
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import GatewayFactory, GatewayProcess, gateway_config, psql
from ostiary.devcluster import PgCluster, TlsMaterial, free_port

AUTH_GSS = 7


@pytest.fixture
def gss_only_server() -> Iterator[int]:
    """A TCP server that answers every StartupMessage with AuthenticationGSS, then waits."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        clients: list[socket.socket] = []
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            clients.append(conn)
            conn.settimeout(5)
            try:
                (length,) = struct.unpack("!i", conn.recv(4))
                conn.recv(length - 4)
                conn.sendall(b"R" + struct.pack("!ii", 8, AUTH_GSS))
            except OSError:
                pass
        for c in clients:
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield port
    stop.set()
    t.join(5)
    srv.close()


def with_extra_connection(
    pg: PgCluster, tls: TlsMaterial, tmp: Path, name: str, upstream: dict[str, Any]
) -> list[dict[str, Any]]:
    """The default connection plus ``name``: a copy of it with ``upstream`` keys replaced (None drops one)."""
    conns: list[dict[str, Any]] = copy.deepcopy(gateway_config(pg, tls, 0, tmp)["connections"])
    extra = copy.deepcopy(conns[0])
    extra["name"] = name
    extra["upstream"].update(upstream)
    extra["upstream"] = {k: v for k, v in extra["upstream"].items() if v is not None}
    return [*conns, extra]


def assert_still_serving(gw: GatewayProcess) -> None:
    try:
        with psycopg.connect(gw.dsn()) as c:
            assert c.execute("select current_user").fetchone() == ("app",)
    except psycopg.OperationalError as e:
        pytest.fail(f"the gateway stopped serving ({e}); its log ends with:\n{gw.log()[-3000:]}")
    assert gw.proc.poll() is None


@pytest.mark.parametrize(
    ("case", "upstream", "expected"),
    [
        (
            "wrong password",
            {"password_env": None, "password": "not-the-password"},
            "refused the gateway's credentials",
        ),
        ("unknown database", {"database": "no_such_db"}, 'database "no_such_db" does not exist'),
        ("nothing listening", {"port": "FREE", "tls": {"mode": "disable"}}, "cannot reach 127.0.0.1:"),
    ],
)
def test_upstream_refusals_from_a_real_server(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    case: str,
    upstream: dict[str, Any],
    expected: str,
) -> None:
    upstream = dict(upstream)
    if upstream.get("port") == "FREE":
        upstream["port"] = free_port()
    conns = with_extra_connection(pg, gateway_tls, tmp_path, "broken", upstream)
    gw = gateway_factory(connections=conns)
    r = psql(gw, "-c", "select 1", dbname="broken")
    assert r.returncode == 2, r.stdout
    assert expected in r.stderr, r.stderr
    assert "not-the-password" not in r.stderr + gw.log()
    assert_still_serving(gw)


def test_upstream_asking_for_unsupported_auth_method(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    gss_only_server: int,
) -> None:
    conns = with_extra_connection(
        pg, gateway_tls, tmp_path, "gss", {"port": gss_only_server, "tls": {"mode": "disable"}}
    )
    gw = gateway_factory(connections=conns)
    r = psql(gw, "-c", "select 1", dbname="gss")
    assert r.returncode == 2
    # First that the gateway survived (its log shows why if not), then what the client was told.
    assert_still_serving(gw)
    assert "the gateway cannot open the upstream session" in r.stderr, r.stderr
    assert "authentication method 7" in r.stderr
