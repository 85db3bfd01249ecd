"""Query cancellation through the gateway.

The gateway hands clients its own BackendKeyData (its pid and a random key) and maps a
CancelRequest carrying them to the upstream backend's real pid and key. Clients send cancels on a
new connection: libpq's PQcancel (psycopg ``cancel()``, psql's SIGINT handler) in plaintext, libpq
17+'s PQcancelCreate (psycopg ``cancel_safe()``) after an SSLRequest, with the session's sslmode.
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Any

import psycopg
import pytest

from conftest import GatewayProcess

CANCEL_REQUEST_CODE = 80877102


def run_in_thread(conn: psycopg.Connection, query: str) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        t0 = time.monotonic()
        try:
            result["rows"] = conn.execute(query).fetchall()
        except Exception as e:
            result["error"] = e
        result["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, result


def wait_until_running(gw: GatewayProcess, marker: str, timeout: float = 5) -> None:
    """Waits until a statement containing ``marker`` is active upstream (seen from another session)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(gw.dsn(), autocommit=True) as watcher:
        while time.monotonic() < deadline:
            active = watcher.execute(
                "select count(*) from pg_stat_activity where state = 'active' and query like %s"
                " and pid <> pg_backend_pid()",
                (f"%{marker}%",),
            ).fetchone()
            if active == (1,):
                return
            time.sleep(0.05)
    raise AssertionError(f"statement {marker!r} never became active")


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_psycopg_cancel_from_another_thread(gateway: GatewayProcess, method: str) -> None:
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        upstream_pid = conn.execute("select pg_backend_pid()").fetchone()
        th, result = run_in_thread(conn, "select pg_sleep(30) /* cancel-me */")
        wait_until_running(gateway, "cancel-me")
        time.sleep(0.2)
        getattr(conn, method)()
        th.join(10)
        assert not th.is_alive(), "the query was not cancelled"
        err = result.get("error")
        assert isinstance(err, psycopg.errors.QueryCanceled), result
        assert err.sqlstate == "57014"
        assert "canceling statement due to user request" in str(err)
        assert result["elapsed"] < 5
        # The session is intact: same upstream backend, usable, not in a failed transaction.
        assert conn.execute("select pg_backend_pid()").fetchone() == upstream_pid
        assert conn.execute("select 'still here'").fetchone() == ("still here",)
    assert "cancel forwarded to upstream pid" in gateway.log()


def test_cancel_inside_transaction_aborts_it_only(gateway: GatewayProcess) -> None:
    with psycopg.connect(gateway.dsn()) as conn:
        conn.execute("select 1")
        th, result = run_in_thread(conn, "select pg_sleep(30) /* cancel-in-tx */")
        wait_until_running(gateway, "cancel-in-tx")
        conn.cancel()
        th.join(10)
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("select 2").fetchone() == (2,)


def test_psql_sigint_cancels_running_query(gateway: GatewayProcess) -> None:
    proc = subprocess.Popen(
        ["psql", "-X", "-At", "-c", "select pg_sleep(30) /* psql-sigint */"],
        env=gateway.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_running(gateway, "psql-sigint")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "canceling statement due to user request" in err, err
    assert proc.returncode == 1
    assert out == ""
    assert elapsed < 5


def send_cancel_request(port: int, pid: int, key: int) -> bytes:
    """A raw CancelRequest over plain TCP, as libpq's PQcancel sends it; returns what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, key))
        # The server closes the connection without answering, as PostgreSQL does.
        return s.recv(100)


def test_cancel_request_with_wrong_key_cancels_nothing(gateway: GatewayProcess) -> None:
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        gateway_pid = conn.pgconn.backend_pid
        upstream_pid = conn.execute("select pg_backend_pid()").fetchone()
        assert upstream_pid is not None
        # The client sees the real backend pid (so notifications and pg_backend_pid() agree with
        # libpq), but a secret key of the gateway's own.
        assert gateway_pid == upstream_pid[0]
        th, result = run_in_thread(conn, "select pg_sleep(1.5) /* wrong-key */, 'completed'")
        wait_until_running(gateway, "wrong-key")
        for key in (0, 1, -1, 0x7FFFFFFF, -(2**31), 12345):
            assert send_cancel_request(gateway.port, gateway_pid, key) == b""
        th.join(10)
        assert not th.is_alive()
        assert "error" not in result, result
        assert result["rows"] == [("", "completed")]
        assert result["elapsed"] >= 1.4
    log = gateway.log()
    # Logged once (a flood of guesses is one line a minute, with the count).
    assert log.count("cancel request with an unknown key from") == 1, log
    assert "cancel forwarded" not in log


def test_cancel_request_for_idle_session_is_harmless(gateway: GatewayProcess) -> None:
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        conn.cancel()
        time.sleep(0.3)
        # A cancel that arrives while nothing runs is ignored by the server: the next query runs.
        assert conn.execute("select 'fine'").fetchone() == ("fine",)
