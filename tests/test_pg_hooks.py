"""Statement hooks end to end: a gateway run in-process with a custom StatementHook and observer,
real PostgreSQL, real psycopg clients. Deny keeps the protocol consistent (transaction blocks abort,
the extended protocol skips to Sync), hold makes the client wait, reports carry tags and row counts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from conftest import APP_PASSWORD, CLIENT_PASSWORD, CLIENT_USER, gateway_config
from ostiary import config as cfgmod
from ostiary.devcluster import PgCluster, TlsMaterial, free_port
from ostiary.hooks import AuthAttempt, Consult, Decision, SessionInfo, StatementInfo
from ostiary.proxy.server import Gateway


class ScriptedHook:
    """Denies statements containing 'forbidden'; holds those containing 'hold me' until released."""

    def __init__(self) -> None:
        self.seen: list[StatementInfo] = []
        self.release: trio.Event | None = None
        self.held = threading.Event()

    def consult(self, session: SessionInfo) -> Consult:
        return "always"

    async def decide(self, session: SessionInfo, statement: StatementInfo) -> Decision:
        self.seen.append(statement)
        if "forbidden" in statement.text:
            return Decision.denied("blocked by rule test-rule: forbidden word")
        if "hold me" in statement.text:
            self.release = trio.Event()
            self.held.set()
            await self.release.wait()
            return Decision(True)
        if "explode" in statement.text:
            raise RuntimeError("hook bug")
        return Decision.allowed(remember=True)


class Recorder:
    report = True

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.ended: list[tuple[int, str]] = []

    def authentication(self, attempt: AuthAttempt) -> None:
        pass

    def policy_changed(self, version: str, source: str, applied: bool, detail: str) -> None:
        pass

    def statement_decided(self, session: SessionInfo, statement: StatementInfo, decision: Decision) -> None:
        pass

    def session_started(self, session: SessionInfo) -> None:
        pass

    def statement_event(self, session: SessionInfo, event: tuple[Any, ...]) -> None:
        self.events.append(event)

    def session_ended(self, session: SessionInfo, reason: str, detail: str) -> None:
        self.ended.append((session.id, reason))


class InProcess:
    def __init__(
        self, gw: Gateway, token: trio.lowlevel.TrioToken, thread: threading.Thread, tls: TlsMaterial
    ) -> None:
        self.gw, self.token, self.thread, self.tls = gw, token, thread, tls

    def dsn(self, **kw: Any) -> str:
        params = {
            "host": "127.0.0.1",
            "port": self.gw.listen_port,
            "dbname": "app",
            "user": CLIENT_USER,
            "password": CLIENT_PASSWORD,
            "sslmode": "verify-full",
            "sslrootcert": str(self.tls.ca_cert),
        }
        params.update(kw)
        return " ".join(f"{k}='{v}'" for k, v in params.items())

    def call(self, fn: Any) -> Any:
        return trio.from_thread.run_sync(fn, trio_token=self.token)


@pytest.fixture
def hooked(
    pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[InProcess, ScriptedHook, Recorder]]:
    monkeypatch.setenv("OSTIARY_TEST_APP_PASSWORD", APP_PASSWORD)
    cfg = cfgmod.parse(gateway_config(pg, gateway_tls, free_port(), tmp_path), "test", tmp_path)
    hook, rec = ScriptedHook(), Recorder()
    gw = Gateway(cfg, statement_hook=hook, observer=rec)
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as n:
            await n.start(lambda task_status: gw.run(task_status, handle_signals=False))
            started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(20), "gateway did not start"
    ip = InProcess(gw, box["token"], thread, gateway_tls)
    yield ip, hook, rec
    ip.call(gw.stop)
    thread.join(30)
    assert not thread.is_alive()


def test_allowed_statements_run_and_are_remembered(hooked: tuple[InProcess, ScriptedHook, Recorder]) -> None:
    ip, hook, rec = hooked
    with psycopg.connect(ip.dsn(), autocommit=True) as conn:
        for _ in range(5):
            assert conn.execute("select 7 * 6").fetchone() == (42,)
    asked = [s.text for s in hook.seen if s.text == "select 7 * 6"]
    assert len(asked) == 1, "a remembered verdict must not be asked again"
    tags = [e for e in rec.events if e[0] == "complete"]
    assert any(e[2] == "SELECT 1" and e[3] == 1 for e in tags)


def test_deny_simple_query_keeps_session_usable(hooked: tuple[InProcess, ScriptedHook, Recorder]) -> None:
    ip, _, rec = hooked
    with psycopg.connect(ip.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("select 'forbidden'")
        assert "blocked by rule test-rule" in str(e.value)
        assert conn.execute("select 1").fetchone() == (1,)
    assert any(e[0] == "error" and e[2] == "42501" and e[4] is True for e in rec.events)


def test_deny_inside_transaction_aborts_it_like_postgres(
    hooked: tuple[InProcess, ScriptedHook, Recorder],
) -> None:
    ip, _, _ = hooked
    with psycopg.connect(ip.dsn()) as conn:
        conn.execute("create temp table t(x int)")
        conn.execute("insert into t values (1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select 'forbidden' from t")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select 2").fetchone() == (2,)


def test_deny_in_extended_protocol_pipeline(hooked: tuple[InProcess, ScriptedHook, Recorder]) -> None:
    ip, _, _ = hooked
    with psycopg.connect(ip.dsn(), autocommit=True) as conn:
        # Parameters force the extended protocol: Parse is judged.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select %s::text || 'forbidden'", ["x"])
        assert conn.execute("select %s::int + 1", [41]).fetchone() == (42,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline():
            conn.execute("select %s::int", [1])
            conn.execute("select %s::text || 'forbidden'", ["y"])
            conn.execute("select %s::int", [3])
        assert conn.execute("select %s::int * 2", [21]).fetchone() == (42,)


def test_hold_waits_for_release(hooked: tuple[InProcess, ScriptedHook, Recorder]) -> None:
    ip, hook, _ = hooked
    result: list[Any] = []

    def client() -> None:
        with psycopg.connect(ip.dsn(), autocommit=True) as conn:
            result.append(conn.execute("select 'hold me'").fetchone())

    t = threading.Thread(target=client)
    t.start()
    assert hook.held.wait(10)
    time.sleep(0.5)
    assert result == [], "the held statement must not run before release"
    # Other sessions are not affected while one is held.
    with psycopg.connect(ip.dsn(), autocommit=True) as other:
        assert other.execute("select 5").fetchone() == (5,)
    assert hook.release is not None
    ip.call(hook.release.set)
    t.join(10)
    assert result == [("hold me",)]


def test_hook_failure_fails_closed(hooked: tuple[InProcess, ScriptedHook, Recorder]) -> None:
    ip, _, _ = hooked
    with psycopg.connect(ip.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("select 'explode'")
        assert "could not decide" in str(e.value)
        assert conn.execute("select 1").fetchone() == (1,)


def test_session_end_is_reported(hooked: tuple[InProcess, ScriptedHook, Recorder]) -> None:
    ip, _, rec = hooked
    with psycopg.connect(ip.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
    deadline = time.monotonic() + 5
    while not rec.ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rec.ended and rec.ended[-1][1] == "client_closed"
