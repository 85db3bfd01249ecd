"""Session lifecycle end to end: graceful shutdown, upstream failures, terminated backends, memory
bounds under large and slowly read results, and many concurrent sessions.

Every gateway here is a real ``ostiary serve`` process in front of the shared PostgreSQL cluster;
the cluster itself is never stopped (other tests share it), so "the upstream dies" is played by a
closed port, a wrong password, a fake server and ``pg_terminate_backend``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import (
    APP_PASSWORD,
    CLIENT_PASSWORD,
    CLIENT_USER,
    GatewayFactory,
    GatewayProcess,
    allow_plaintext,
    app_upstream,
    gateway_config,
    psql,
)
from ostiary.devcluster import PgCluster, TlsMaterial, free_port
from pgraw import (
    Outcome,
    RawConn,
    data_rows,
    last_bytes_then_fin,
    password_message,
    query_message,
    recv_raw_message,
    startup_message,
    typed,
)

SHUTDOWN_MESSAGE = "terminating connection because the gateway is shutting down"
KIB_PER_MB = 1024


# -- helpers ---------------------------------------------------------------------------------------


def upstream(pg: PgCluster, **changes: Any) -> list[dict[str, Any]]:
    """The ``connections`` section of conftest.gateway_config with `changes` to the upstream."""
    return [{"name": "app", "upstream": app_upstream(pg, **changes)}]


def shaped_config(
    pg: PgCluster, tls: TlsMaterial, tmp: Path, *, client_tls: bool, upstream_tls: bool, **overrides: Any
) -> dict[str, Any]:
    """gateway_config with TLS on or off on either leg (plaintext clients are then allowed)."""
    cfg = gateway_config(pg, tls, 0, tmp, **overrides)
    if not client_tls:
        allow_plaintext(cfg)
    if not upstream_tls:
        cfg["connections"][0]["upstream"]["tls"] = {"mode": "disable"}
    return cfg


LEG_SHAPES = [
    pytest.param(True, True, id="tls-client-tls-upstream"),
    pytest.param(True, False, id="tls-client-plain-upstream"),
    pytest.param(False, True, id="plain-client-tls-upstream"),
    pytest.param(False, False, id="plain-client-plain-upstream"),
]


def tls_login(gw: GatewayProcess, dbname: str = "app") -> RawConn:
    """A raw TLS connection through StartupMessage and the password (what follows is unread)."""
    c = RawConn(gw.port)
    c.start_tls(gw.tls.ca_cert)
    c.send(startup_message({"user": CLIENT_USER, "database": dbname}))
    m = c.recv_message()
    assert m is not None and m[0] == b"R", m
    c.send(password_message(CLIENT_PASSWORD))
    return c


def login_outcome(gw: GatewayProcess, timeout: float) -> Outcome:
    c = tls_login(gw)
    with c:
        return c.outcome(timeout)


def fatal_of(out: Outcome) -> dict[str, str]:
    """The FATAL that ended a connection (the last message), checking it did end."""
    assert out.closed, f"not closed: {out.describe()}"
    assert out.messages and out.messages[-1][0] == b"E", out.describe()
    err = out.errors[-1]
    assert err.get("S") == "FATAL", err
    return err


def superuser(pg: PgCluster) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.dsn(dbname="app"), autocommit=True)


def upstream_backends(pg: PgCluster, application_name: str) -> list[tuple[Any, ...]]:
    """The PostgreSQL backends whose application_name is LIKE `application_name` (the gateway
    passes the client's on): pid, name, state, wait event, time in that state, query."""
    with superuser(pg) as su:
        return su.execute(
            "select pid, application_name, state, wait_event, now() - state_change, left(query, 60) "
            "from pg_stat_activity where application_name like %s",
            (application_name,),
        ).fetchall()


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def assert_healthy(gw: GatewayProcess) -> None:
    assert gw.proc.poll() is None, f"the gateway exited with {gw.proc.returncode}:\n{gw.log()[-4000:]}"
    r = psql(gw, "-At", "-c", "select 'alive'", timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "alive"
    assert "Traceback" not in gw.log(), gw.log()[-4000:]


class RssSampler:
    """Samples the gateway's RSS every 50 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.baseline = gw.rss_kib()
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.gw.rss_kib())
                self.samples += 1
            except (OSError, RuntimeError):
                return
            self._stop.wait(0.05)

    @property
    def growth_kib(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def fake_upstream(behave: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on a free port that runs `behave` on each accepted connection."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                s, _ = lst.accept()
            except OSError:
                return
            held.append(s)
            threading.Thread(target=behave, args=(s,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield lst.getsockname()[1]
    finally:
        lst.close()
        for s in held:
            s.close()


# -- graceful shutdown -----------------------------------------------------------------------------


def wait_active(pg: PgCluster, pid: tuple[Any, ...] | None) -> None:
    """Waits until the backend `pid` (as fetched: a one-tuple) runs a statement."""
    query = "select state from pg_stat_activity where pid = %s"
    with superuser(pg) as su:
        wait_for(
            lambda: su.execute(query, pid).fetchone() == ("active",),
            5,
            "the statement to start upstream",
        )


def test_sigterm_drains_running_statement_then_ends_idle_sessions(
    gateway_factory: GatewayFactory, pg: PgCluster
) -> None:
    grace = 5.0
    gw = gateway_factory(shutdown={"grace": grace})
    idle_raw = tls_login(gw)
    assert idle_raw.until_ready()[-1] == (b"Z", b"I")
    idle_pg = psycopg.connect(gw.dsn(), autocommit=True)
    busy = psycopg.connect(gw.dsn())
    assert idle_pg.execute("select 1").fetchone() == (1,)
    busy_pid = busy.execute("select pg_backend_pid()").fetchone()
    busy.commit()
    result: dict[str, Any] = {}

    def run_busy() -> None:
        try:
            with busy.transaction():
                result["row"] = busy.execute("select 'finished' from pg_sleep(1)").fetchone()
            result["committed_at"] = time.monotonic()
        except Exception as e:  # reported by the assertions below
            result["error"] = e

    th = threading.Thread(target=run_busy)
    th.start()
    wait_active(pg, busy_pid)
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)

    # New connections are refused while draining.
    time.sleep(0.3)
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(gw.dsn(connect_timeout=3)).close()
    msg = str(refused.value)
    assert "Connection refused" in msg or "57P03" in msg or "shutting down" in msg, msg

    # The running statement completes, and its transaction commits.
    th.join(10)
    assert "error" not in result, result
    assert result["row"] == ("finished",)

    # The idle sessions are left alone during the grace period ...
    early = idle_raw.outcome(max(0.0, t0 + grace - 1.0 - time.monotonic()))
    assert not early.closed and early.messages == [], f"ended before the grace period: {early.describe()}"
    # ... then ended with 57P01.
    late = idle_raw.outcome(t0 + grace + 4 - time.monotonic())
    err = fatal_of(late)
    ended_at = time.monotonic() - t0
    assert err["C"] == "57P01" and err["M"] == SHUTDOWN_MESSAGE, err
    assert grace - 0.5 <= ended_at <= grace + 3, f"ended {ended_at:.2f}s after SIGTERM"
    idle_raw.close()
    with pytest.raises(psycopg.OperationalError) as ended:
        idle_pg.execute("select 1")
    assert SHUTDOWN_MESSAGE in str(ended.value) or "closed" in str(ended.value), str(ended.value)
    with pytest.raises(psycopg.OperationalError):
        busy.execute("select 1")

    # The process exits cleanly.
    code = gw.proc.wait(max(0.1, t0 + grace + 5 - time.monotonic()))
    assert code == 0, gw.log()[-3000:]
    assert "Traceback" not in gw.log()
    idle_pg.close()
    busy.close()


def test_sigterm_with_close_idle_ends_idle_now_and_busy_after_commit(
    gateway_factory: GatewayFactory, pg: PgCluster
) -> None:
    grace = 10.0
    gw = gateway_factory(shutdown={"grace": grace, "close_idle": True})
    with superuser(pg) as su:
        su.execute("create table if not exists drain_check (x int)")
        su.execute("grant all on drain_check to app")
        su.execute("truncate drain_check")
    idle_raw = tls_login(gw)
    assert idle_raw.until_ready()[-1] == (b"Z", b"I")
    idle_pg = psycopg.connect(gw.dsn(), autocommit=True)
    tx = psycopg.connect(gw.dsn())
    tx.execute("insert into drain_check values (1)")  # opens a transaction block

    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    out = idle_raw.outcome(3.0)
    err = fatal_of(out)
    assert err["C"] == "57P01" and err["M"] == SHUTDOWN_MESSAGE, err
    # "Promptly": well before the 10 s grace (about 1 s, with room for a loaded machine).
    assert time.monotonic() - t0 < 2.5, f"idle session ended {time.monotonic() - t0:.2f}s after SIGTERM"
    idle_raw.close()
    with pytest.raises(psycopg.OperationalError):
        idle_pg.execute("select 1")

    # The session inside a transaction may finish it.
    time.sleep(0.5)
    tx.execute("insert into drain_check values (2)")
    assert tx.execute("select count(*) from drain_check").fetchone() == (2,)
    tx.commit()
    committed = time.monotonic()
    # ... and is ended right after.
    with pytest.raises(psycopg.OperationalError) as ended:
        tx.execute("select 1")
    assert SHUTDOWN_MESSAGE in str(ended.value) or "closed" in str(ended.value), str(ended.value)
    with superuser(pg) as su:
        assert su.execute("select array_agg(x order by x) from drain_check").fetchone() == ([1, 2],)
    # With no session left the gateway exits without waiting for the rest of the grace period.
    code = gw.proc.wait(5)
    assert code == 0, gw.log()[-3000:]
    assert time.monotonic() - committed < 4
    idle_pg.close()
    tx.close()


@pytest.mark.parametrize("signals", [("SIGTERM", "SIGTERM"), ("SIGINT", "SIGINT"), ("SIGTERM", "SIGINT")])
def test_a_second_signal_ends_the_sessions_now(
    gateway_factory: GatewayFactory, pg: PgCluster, signals: tuple[str, str]
) -> None:
    """A second SIGTERM or SIGINT during the drain cuts the grace short: the sessions still open
    get 57P01 at once, the statements their backends run are cancelled, and the gateway exits
    cleanly (it once died of the second signal: clients saw a dropped connection, no session_end
    was recorded, and the backends went on running)."""
    gw = gateway_factory(shutdown={"grace": 30})
    busy = psycopg.connect(gw.dsn(), autocommit=True)
    busy_pid = busy.execute("select pg_backend_pid()").fetchone()
    result: dict[str, Any] = {}

    def run_busy() -> None:
        try:
            busy.execute("select pg_sleep(25)")
        except Exception as e:  # reported by the assertions below
            result["error"] = e

    th = threading.Thread(target=run_busy)
    th.start()
    wait_active(pg, busy_pid)
    first, second = (getattr(signal, name) for name in signals)
    gw.proc.send_signal(first)
    time.sleep(1.0)
    assert gw.proc.poll() is None, "the first signal must not end the gateway before the grace"
    t0 = time.monotonic()
    gw.proc.send_signal(second)
    th.join(10)
    assert time.monotonic() - t0 < 5
    assert isinstance(result.get("error"), psycopg.errors.AdminShutdown), result
    assert gw.proc.wait(10) == 0, gw.log()[-3000:]
    assert "Traceback" not in gw.log() and "ending the remaining sessions now" in gw.log()
    with superuser(pg) as su:
        wait_for(
            lambda: (
                su.execute("select count(*) from pg_stat_activity where pid = %s", busy_pid).fetchone()
                == (0,)
            ),
            5,
            "the backend's pg_sleep to be cancelled",
        )
    busy.close()


def tcp_sockets_of(pid: int) -> list[tuple[int, int, int]]:
    """(local port, remote port, timer) of the process's established IPv4 TCP sockets, from
    /proc/net/tcp: timer 2 is the keepalive timer, 0 none."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
            if m:
                inodes.add(m.group(1))
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "01" and f[9] in inodes:  # ESTABLISHED, ours
            local, remote = (int(a.split(":")[1], 16) for a in (f[1], f[2]))
            out.append((local, remote, int(f[5].split(":")[0], 16)))
    return out


def test_both_legs_have_tcp_keepalive(gateway: GatewayProcess, pg: PgCluster) -> None:
    """A peer that vanishes without a FIN or reset (a host powered off, a NAT that forgot the flow)
    must not hold a session and its backend forever: both legs of an established session have TCP
    keepalive on (probes after a minute of silence, not Linux's default two hours)."""

    def timers() -> tuple[list[int], list[int]]:
        legs = tcp_sockets_of(gateway.proc.pid)
        return [t[2] for t in legs if t[0] == gateway.port], [t[2] for t in legs if t[1] == pg.port]

    with psycopg.connect(gateway.dsn(), autocommit=True) as c:
        assert c.execute("select 1").fetchone() == (1,)
        # (Right after a write a leg's timer is the retransmission timer until the ACK comes.)
        wait_for(lambda: timers() == ([2], [2]), 5, "a keepalive timer on both legs")


# -- the upstream fails ----------------------------------------------------------------------------


def test_upstream_port_closed_gives_08006(gateway_factory: GatewayFactory, pg: PgCluster) -> None:
    dead = free_port()
    gw = gateway_factory(connections=upstream(pg, port=dead))
    t = time.monotonic()
    out = login_outcome(gw, 5)
    err = fatal_of(out)
    assert time.monotonic() - t < 2
    assert err["C"] == "08006", err
    assert "the gateway cannot open the upstream session" in err["M"], err
    assert f"127.0.0.1:{dead}" in err["M"], err
    with pytest.raises(psycopg.OperationalError, match="the gateway cannot open the upstream session"):
        psycopg.connect(gw.dsn()).close()
    assert gw.proc.poll() is None
    assert "Traceback" not in gw.log()


def test_upstream_wrong_password_gives_08006_without_the_password(
    gateway_factory: GatewayFactory, pg: PgCluster
) -> None:
    secret = "wrong-upstream-Pa55word-literal"
    gw = gateway_factory(connections=upstream(pg, password_env=None, password=secret))
    out = login_outcome(gw, 5)
    err = fatal_of(out)
    assert err["C"] == "08006", err
    assert "the gateway cannot open the upstream session" in err["M"], err
    assert "credentials" in err["M"], err
    assert secret not in str(out.errors)
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(gw.dsn()).close()
    assert secret not in str(e.value) and APP_PASSWORD not in str(e.value)
    assert secret not in gw.log() and APP_PASSWORD not in gw.log()
    assert gw.proc.poll() is None


def _silent(s: socket.socket) -> None:
    time.sleep(30)  # TCP connects, then nothing: a hung server, a black-holing proxy


def _hang_up(s: socket.socket) -> None:
    s.close()  # a crashing server, a proxy with no backend


def _refuse_tls(s: socket.socket) -> None:
    if s.recv(8):
        s.sendall(b"N")
        time.sleep(5)


def _speak_http(s: socket.socket) -> None:
    if s.recv(4096):
        s.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        time.sleep(5)


def _ask_for_gss(s: socket.socket) -> None:
    if s.recv(4096):  # the StartupMessage
        s.sendall(b"R" + struct.pack("!ii", 8, 7))  # AuthenticationGSS
        time.sleep(5)


UPSTREAM_FAILURES = {
    # name: (fake server behaviour or None for the real cluster, upstream changes)
    "never-answers": (_silent, {"connect_timeout": 1.0}),
    "hangs-up": (_hang_up, {}),
    "refuses-tls": (_refuse_tls, {}),
    "not-postgresql": (_speak_http, {"tls": {"mode": "disable"}}),
    "asks-for-gssapi": (_ask_for_gss, {"tls": {"mode": "disable"}}),
    "certificate-name-mismatch": (
        None,
        {"tls": {"mode": "verify-full", "ca": "<pg-ca>", "server_name": "not-the-db.example"}},
    ),
}


@pytest.mark.parametrize("case", list(UPSTREAM_FAILURES))
def test_upstream_failure_is_reported_as_08006_and_the_gateway_survives(
    gateway_factory: GatewayFactory, pg: PgCluster, subtests: pytest.Subtests, case: str
) -> None:
    """Whatever goes wrong while the gateway opens the upstream session, the client gets FATAL
    08006 "the gateway cannot open the upstream session" promptly (not a bare close, not a
    protocol violation blamed on the client), and the gateway keeps serving other sessions."""
    assert pg.tls is not None
    behave, changes = UPSTREAM_FAILURES[case]
    changes = dict(changes)
    if "tls" in changes and changes["tls"].get("ca") == "<pg-ca>":
        changes["tls"] = {**changes["tls"], "ca": str(pg.tls.ca_cert)}
    with fake_upstream(behave or _hang_up) as fake_port:
        if behave is not None:
            changes["port"] = fake_port
        conns = upstream(pg, **changes)
        conns.append({"name": "real", "upstream": upstream(pg)[0]["upstream"]})
        gw = gateway_factory(connections=conns)
        t = time.monotonic()
        out = login_outcome(gw, 6)
        elapsed = time.monotonic() - t
        with subtests.test("the client is told"):
            assert out.closed, out.describe()
            assert elapsed < float(changes.get("connect_timeout", 0)) + 2, f"took {elapsed:.2f}s"
            assert out.messages, f"the connection was closed without an error ({elapsed:.2f}s)"
            err = fatal_of(out)
            assert err["C"] == "08006", err
            assert "the gateway cannot open the upstream session" in err["M"], err
        with subtests.test("the gateway survives"):
            time.sleep(0.2)
            assert gw.proc.poll() is None, (
                f"the gateway exited with {gw.proc.returncode}:\n{gw.log()[-3000:]}"
            )
            r = psql(gw, "-At", "-c", "select 'alive'", dbname="real")
            assert r.returncode == 0, r.stderr
            assert "Traceback" not in gw.log(), gw.log()[-3000:]


def test_pg_terminate_backend_reaches_the_client(gateway: GatewayProcess, pg: PgCluster) -> None:
    raw = tls_login(gateway)
    raw.until_ready()
    raw_pid = int(data_rows(raw.query("select pg_backend_pid()"))[0][0] or 0)
    client = psycopg.connect(gateway.dsn(), autocommit=True)
    client_pid = client.execute("select pg_backend_pid()").fetchone()
    assert client_pid is not None
    with superuser(pg) as su:
        assert su.execute(
            "select pg_terminate_backend(%s), pg_terminate_backend(%s)", (raw_pid, client_pid[0])
        ).fetchone() == (True, True)
    out = raw.outcome(3)
    err = fatal_of(out)
    assert err["C"] == "57P01", err
    assert err["M"] == "terminating connection due to administrator command", err
    raw.close()
    with pytest.raises(psycopg.OperationalError) as e:
        client.execute("select 1")
    assert "terminating connection due to administrator command" in str(e.value) or "closed" in str(
        e.value
    ), str(e.value)
    client.close()
    # The gateway keeps serving new sessions.
    with psycopg.connect(gateway.dsn(), autocommit=True) as again:
        assert again.execute("select 'again'").fetchone() == ("again",)
    assert_healthy(gateway)


def _dies_after_first_query(s: socket.socket) -> None:
    """A PostgreSQL that logs the gateway in (cleartext password), then answers the first query
    with FATAL 57P01 and hangs up, both in one TCP segment (TCP_CORK holds the error until the FIN
    joins it), as a backend's last words and its exit often arrive together."""
    try:
        recv_raw_message(s, typed_=False)  # StartupMessage
        s.sendall(typed(b"R", struct.pack("!i", 3)))  # AuthenticationCleartextPassword
        recv_raw_message(s)  # PasswordMessage
        s.sendall(
            typed(b"R", struct.pack("!i", 0))  # AuthenticationOk
            + typed(b"K", struct.pack("!ii", 4242, 777))  # BackendKeyData
            + typed(b"Z", b"I")  # ReadyForQuery
        )
        recv_raw_message(s)  # the first Query
        fatal = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0"
        last_bytes_then_fin(s, typed(b"E", fatal))
        time.sleep(10)
    except (OSError, EOFError):
        pass


def test_server_last_words_and_hang_up_in_one_segment_end_the_session(
    gateway_factory: GatewayFactory, pg: PgCluster
) -> None:
    """The server's FATAL and its FIN arrive in one segment, so epoll reports one edge for both:
    the client gets the FATAL and then the end of the connection, at once."""
    with fake_upstream(_dies_after_first_query) as port:
        gw = gateway_factory(connections=upstream(pg, port=port, tls={"mode": "disable"}))
        c = tls_login(gw)
        with c:
            assert c.until_ready()[-1] == (b"Z", b"I")
            c.send(query_message("select 1"))
            out = c.outcome(5)
        err = fatal_of(out)
        assert err["C"] == "57P01", err
        assert out.elapsed < 3, f"the session ended only after {out.elapsed:.1f}s"
        wait_for(lambda: "ended: upstream_closed" in gw.log(), 5, "the session's end in the log")
    assert gw.proc.poll() is None and "Traceback" not in gw.log(), gw.log()[-3000:]


@pytest.mark.parametrize("client_tls", [False, True], ids=["plaintext", "tls"])
def test_client_last_bytes_and_hang_up_in_one_segment_end_the_session(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, client_tls: bool
) -> None:
    """A client sends half a message and hangs up, in one segment (one epoll edge for both): the
    gateway ends the session and its upstream backend goes away; it does not wait for more."""
    gw = gateway_factory(shaped_config(pg, gateway_tls, tmp_path, client_tls=False, upstream_tls=False))
    app = f"last-bytes-{client_tls}"
    c = RawConn(gw.port)
    if client_tls:
        c.start_tls(gw.tls.ca_cert)
    assert c.login(CLIENT_USER, CLIENT_PASSWORD, application_name=app)[-1] == (b"Z", b"I")

    assert len(upstream_backends(pg, app)) == 1
    last_bytes_then_fin(c.sock, query_message("select 'this message is cut short'")[:7])
    with c:
        out = c.outcome(5)
    assert out.closed and out.elapsed < 3, out.describe()
    wait_for(lambda: not upstream_backends(pg, app), 5, "the upstream backend to end")
    assert_healthy(gw)


# -- a client that half-closes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_tls", "one_segment", "upstream_tls"),
    [
        pytest.param(False, False, False, id="plaintext"),
        pytest.param(False, True, False, id="plaintext-one-segment"),
        pytest.param(True, False, False, id="tls"),
        pytest.param(True, True, False, id="tls-one-segment"),
        pytest.param(True, False, True, id="tls-both-legs"),
    ],
)
def test_a_half_closed_client_gets_the_answers_it_is_owed(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    client_tls: bool,
    one_segment: bool,
    upstream_tls: bool,
) -> None:
    """A client sends two queries and then EOF (shutdown(SHUT_WR), as `printf ... | nc` does):
    PostgreSQL answers both before it ends the connection, and so does the gateway. With
    `one_segment` the queries and the FIN arrive together (one read returns both)."""
    gw = gateway_factory(
        shaped_config(pg, gateway_tls, tmp_path, client_tls=client_tls, upstream_tls=upstream_tls)
    )
    app = f"half-closed-{client_tls}-{one_segment}-{upstream_tls}"
    c = RawConn(gw.port)
    if client_tls:
        c.start_tls(gw.tls.ca_cert)
    assert c.login(CLIENT_USER, CLIENT_PASSWORD, application_name=app)[-1] == (b"Z", b"I")
    queries = query_message("select 'first' from pg_sleep(0.3)") + query_message("select 'second'")
    if one_segment:
        last_bytes_then_fin(c.sock, queries)
    else:
        c.send(queries)
        socket.socket.shutdown(c.sock, socket.SHUT_WR)  # a FIN; on TLS without close_notify
    with c:
        out = c.outcome(10)
    assert out.closed and not out.reset, out.describe()
    assert [t for t, _ in out.messages] == [b"T", b"D", b"C", b"Z"] * 2, out.describe()
    assert data_rows(out.messages) == [["first"], ["second"]]
    wait_for(lambda: not upstream_backends(pg, app), 5, "the upstream backend to end")
    wait_for(lambda: "ended: client_closed" in gw.log(), 5, "the session's end in the log")
    assert_healthy(gw)


def test_a_half_closed_client_in_copy_from_stdin_ends_the_session(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    """EOF in the middle of COPY FROM STDIN: the server is owed CopyDone and will not answer
    without it. The gateway passes the EOF on; PostgreSQL then fails the COPY and ends the
    connection, and so does the gateway, rather than waiting for an answer that cannot come."""
    gw = gateway_factory(shaped_config(pg, gateway_tls, tmp_path, client_tls=False, upstream_tls=False))
    app = "half-closed-copy"
    c = RawConn(gw.port)
    assert c.login(CLIENT_USER, CLIENT_PASSWORD, application_name=app)[-1] == (b"Z", b"I")
    c.query("create temp table half_copy (a int)")
    c.send(query_message("copy half_copy from stdin"))
    m = c.recv_message()
    assert m is not None and m[0] == b"G", m
    c.send(typed(b"d", b"1\n2\n"))
    socket.socket.shutdown(c.sock, socket.SHUT_WR)
    with c:
        out = c.outcome(5)
    assert out.closed and out.elapsed < 3, out.describe()
    # PostgreSQL's own words, as a direct client would get them: the COPY fails, the session ends.
    assert [(e["S"], e["C"]) for e in out.errors] == [("ERROR", "08006"), ("FATAL", "08P01")], out.describe()
    assert "unexpected EOF" in out.errors[0]["M"], out.describe()
    wait_for(lambda: not upstream_backends(pg, app), 5, "the upstream backend to end")
    assert_healthy(gw)


def test_a_client_gone_before_its_large_answer_ends_the_session_quietly(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    """A client that sends a query and exits looks like a half-close (a FIN) until the answer is
    written to it and its host answers with a reset: the session then ends as the client's doing,
    not as a gateway I/O error, and the server's backend goes away."""
    gw = gateway_factory(shaped_config(pg, gateway_tls, tmp_path, client_tls=False, upstream_tls=False))
    app = "gone-before-answer"
    c = RawConn(gw.port)
    assert c.login(CLIENT_USER, CLIENT_PASSWORD, application_name=app)[-1] == (b"Z", b"I")
    c.send(query_message("select repeat('x', 1000) from pg_sleep(0.3), generate_series(1, 20000)"))
    c.close()
    wait_for(lambda: not upstream_backends(pg, app), 10, "the upstream backend to end")
    wait_for(lambda: "ended: client_closed" in gw.log(), 5, "the session's end in the log")
    # The write that found the client gone is named in the detail; no I/O error is logged.
    assert re.search(
        r"ended: client_closed \(client closed the connection without Terminate; "
        r"(Broken pipe|Connection reset)",
        gw.log(),
    ), gw.log()[-3000:]
    assert "io_error" not in gw.log(), gw.log()[-3000:]
    assert_healthy(gw)


# -- bounded memory --------------------------------------------------------------------------------

BIG_QUERY = "select g, repeat('x', 100) from generate_series(1, 1000000) g"
BIG_ROWS = 1_000_000
RSS_BOUND_KIB = 64 * KIB_PER_MB


@pytest.mark.parametrize(("client_tls", "upstream_tls"), LEG_SHAPES)
def test_large_result_streams_in_bounded_memory(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    client_tls: bool,
    upstream_tls: bool,
) -> None:
    """A 1,000,000-row (~110 MB) result through the gateway: every row arrives and the gateway's
    RSS grows by less than 64 MB (psql buffers the result; the gateway must not)."""
    gw = gateway_factory(
        shaped_config(pg, gateway_tls, tmp_path, client_tls=client_tls, upstream_tls=upstream_tls)
    )
    env_kw = {} if client_tls else {"sslmode": "disable"}
    warm = psql(gw, "-At", "-c", "select ssl from pg_stat_ssl where pid = pg_backend_pid()", **env_kw)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.strip() == ("t" if upstream_tls else "f")
    with RssSampler(gw) as rss:
        proc = subprocess.Popen(
            ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", BIG_QUERY],
            env=gw.env(**env_kw),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        lines = 0
        nbytes = 0
        while chunk := proc.stdout.read(1 << 20):
            lines += chunk.count(b"\n")
            nbytes += len(chunk)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        code = proc.wait(60)
    assert code == 0, f"psql failed: {stderr}\n{gw.log()[-1500:]}"
    assert lines == BIG_ROWS and nbytes > 100 * 1024 * 1024
    assert rss.samples > 5
    assert rss.growth_kib < RSS_BOUND_KIB, f"RSS grew by {rss.growth_kib / 1024:.1f} MB"
    assert gw.proc.poll() is None


@pytest.mark.parametrize(("client_tls", "upstream_tls"), [LEG_SHAPES[0], LEG_SHAPES[3]])
def test_large_upload_streams_in_bounded_memory(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    client_tls: bool,
    upstream_tls: bool,
) -> None:
    """The other direction: ~60 MB of COPY FROM STDIN through the gateway."""
    gw = gateway_factory(
        shaped_config(pg, gateway_tls, tmp_path, client_tls=client_tls, upstream_tls=upstream_tls)
    )
    env_kw = {} if client_tls else {"sslmode": "disable"}
    n = 500_000
    line = b"%d\t" + b"y" * 110 + b"\n"
    data = b"".join(line % i for i in range(n))
    with RssSampler(gw) as rss:
        r = subprocess.run(
            [
                "psql",
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "create temp table up (i int, t text)",
                "-c",
                "copy up from stdin",
                "-At",
                "-c",
                "select count(*), sum(length(t)) from up",
            ],
            env=gw.env(**env_kw),
            input=data,
            capture_output=True,
            timeout=60,
        )
    assert r.returncode == 0, f"{r.stderr.decode()}\n{gw.log()[-1500:]}"
    assert r.stdout.decode().strip().splitlines()[-1] == f"{n}|{n * 110}"
    assert rss.growth_kib < RSS_BOUND_KIB, f"RSS grew by {rss.growth_kib / 1024:.1f} MB"


@pytest.mark.parametrize("upstream_tls", [True, False], ids=["tls-upstream", "plain-upstream"])
def test_slow_reader_gets_backpressure(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    upstream_tls: bool,
) -> None:
    """A client that reads a huge result slowly: the gateway stops reading from the server (the
    backend waits in ClientWrite), its RSS stays flat, and closing the client ends the backend."""
    gw = gateway_factory(
        shaped_config(pg, gateway_tls, tmp_path, client_tls=False, upstream_tls=upstream_tls)
    )
    c = RawConn(gw.port)
    c.login(CLIENT_USER, CLIENT_PASSWORD)
    pid = int(data_rows(c.query("select pg_backend_pid()"))[0][0] or 0)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    waits: set[str] = set()
    received = 0
    with RssSampler(gw) as rss, superuser(pg) as su:
        c.send(query_message(BIG_QUERY))
        end = time.monotonic() + 3
        c.sock.settimeout(2)
        first = b""
        while time.monotonic() < end:
            chunk = c.sock.recv(64 * 1024)
            first = first or chunk
            assert chunk, f"the gateway closed the session mid-result:\n{gw.log()[-1500:]}"
            received += len(chunk)
            row = su.execute(
                "select state, coalesce(wait_event, '') from pg_stat_activity where pid = %s", (pid,)
            ).fetchone()
            if row is not None and row[0] == "active":
                waits.add(row[1])
            time.sleep(0.01)
    # 64 KiB every 10 ms is at most ~20 MB of the ~110 MB: the server is still sending.
    assert 1 << 20 < received < 40 << 20, received
    assert first[:1] == b"T", f"expected RowDescription, got {first[:60]!r}"
    assert "ClientWrite" in waits, f"the backend never waited for the gateway to read: {waits}"
    assert rss.growth_kib < 16 * KIB_PER_MB, f"RSS grew by {rss.growth_kib / 1024:.1f} MB with a slow reader"
    c.close()
    with superuser(pg) as su:
        wait_for(
            lambda: (
                su.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone() == (0,)
            ),
            10,
            "the upstream backend to end after the client left",
            interval=0.1,
        )
    assert_healthy(gw)


# -- many sessions ---------------------------------------------------------------------------------


def test_a_streaming_session_does_not_starve_its_worker(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    """One worker thread, two sessions: while one streams a 1,000,000-row result to a client that
    reads as fast as it can, the other's short queries are answered; the worker interleaves them.
    (The read budget that makes a session yield even when its client keeps up is tested in
    rust/proxy/src/rt.rs; here psql's reading is what makes the stream wait.)"""
    gw = gateway_factory(
        shaped_config(pg, gateway_tls, tmp_path, client_tls=False, upstream_tls=False, workers=1)
    )
    env = gw.env(sslmode="disable")
    with psycopg.connect(gw.dsn(sslmode="disable"), autocommit=True) as short:
        assert short.execute("select 1").fetchone() == (1,)
        stream = subprocess.Popen(
            ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", "-c", BIG_QUERY],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            with superuser(pg) as su:
                wait_for(
                    lambda: (
                        su.execute(
                            "select count(*) from pg_stat_activity where query = %s and state = 'active'",
                            (BIG_QUERY,),
                        ).fetchone()
                        == (1,)
                    ),
                    20,
                    "the large result to start",
                    interval=0.005,
                )
            answered = 0
            while stream.poll() is None and answered < 20:
                assert short.execute("select %s::int + 1", (answered,)).fetchone() == (answered + 1,)
                answered += 1
            streaming_still = stream.poll() is None
        finally:
            code = stream.wait(120)
    assert code == 0, f"{stream.stderr.read().decode() if stream.stderr else ''}\n{gw.log()[-1500:]}"
    assert answered == 20 and streaming_still, (
        f"only {answered} short queries were answered while the large result streamed"
    )
    assert_healthy(gw)


def test_hundred_concurrent_sessions(gateway: GatewayProcess) -> None:
    n = 100
    barrier = threading.Barrier(n, timeout=60)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with psycopg.connect(gateway.dsn(application_name=f"many-{i}"), autocommit=True) as conn:
                barrier.wait()  # every session is open at once
                pid = conn.execute("select pg_backend_pid()").fetchone()
                doubled = conn.execute("select %s::int * 2", (i,)).fetchone()
                with conn.transaction():
                    conn.execute("select pg_sleep(0.05)")
                    count = conn.execute("select count(*) from generate_series(1, %s)", (i + 1,)).fetchone()
                app = conn.execute("select current_setting('application_name')").fetchone()
                barrier.wait()  # still all open
                results[i] = (pid, doubled, count, app)
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    assert len(results) == n
    for i, (_pid, doubled, count, app) in results.items():
        assert doubled == (i * 2,) and count == (i + 1,) and app == (f"many-{i}",)
    assert len({r[0] for r in results.values()}) == n, "sessions open at once must have their own backends"
    assert_healthy(gateway)


def test_readyz_and_metrics(gateway_factory: GatewayFactory) -> None:
    """A load balancer probes /readyz: 503 with the reason once SIGTERM has stopped new sessions,
    while /healthz (liveness) still answers 200 and the open session finishes; /metrics counts
    sessions and logins for Prometheus."""
    import json
    import urllib.error
    import urllib.request

    admin_port = free_port()
    gw = gateway_factory(admin={"listen": {"host": "127.0.0.1", "port": admin_port}}, shutdown={"grace": 20})

    def get(path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metrics() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    assert get("/readyz") == (200, {"status": "ready"})
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gw.dsn(password="wrong")).close()
    with psycopg.connect(gw.dsn()) as c:
        m = metrics()
        assert m["ostiary_ready"] == 1 and m["ostiary_sessions_open"] == 1, m
        assert m['ostiary_logins_total{outcome="allowed"}'] == 1, m
        assert m['ostiary_logins_total{outcome="refused"}'] == 1, m
        assert m["ostiary_audit_accepting"] == 1 and m["ostiary_sessions_started_total"] == 1, m
        gw.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (got := get("/readyz"))[0] == 200:
            assert time.monotonic() < deadline, gw.log()[-2000:]
            time.sleep(0.05)
        assert got == (503, {"status": "not ready", "reason": "the gateway is shutting down"})
        assert get("/healthz") == (200, {"status": "ok"})
        assert metrics()["ostiary_ready"] == 0
        assert c.execute("select 1").fetchone() == (1,)
    assert gw.proc.wait(20) == 0
