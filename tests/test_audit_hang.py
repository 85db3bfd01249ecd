"""An audit store that hangs instead of refusing (a frozen server, a network blackhole) fails the
trail closed like one that is down: the writer's store calls are bounded by ``store_timeout``, sync
waiters expire at ``sync_timeout`` whatever the flusher waits for, ``max_pending`` refuses instead of
dropping silently, and a write abandoned at the timeout that commits late neither duplicates
records nor breaks the chain. Trio-level, with a SQLite store whose calls can be held; the same
against a frozen PostgreSQL is in ``test_pg_audit.py``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio

from ostiary.audit.log import AuditLog
from ostiary.audit.records import Sealed, decode
from ostiary.audit.store import SqliteStore
from ostiary.audit.verify import verify
from ostiary.config import Config


def config(tmp: Path, **audit: Any) -> Config:
    base = {"flush_interval": 0.02, "checkpoint_interval": 0.2, "store_timeout": 0.3}
    return msgspec.convert({"data_dir": str(tmp / "state"), "audit": {**base, **audit}}, Config)


class FrozenStore(SqliteStore):
    """A SQLite store whose calls block while ``frozen`` (as on a SIGSTOPped server: nothing
    answers, nothing fails) and which ignores ``interrupt``; a held ``append`` commits once thawed,
    late, as a frozen server's transaction may."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.thawed = threading.Event()
        self.thawed.set()
        self.held = 0  # calls that found it frozen
        self.interrupts = 0

    def freeze(self) -> None:
        self.thawed.clear()

    def thaw(self) -> None:
        self.thawed.set()

    def interrupt(self) -> None:
        self.interrupts += 1

    def _hold(self) -> None:
        if not self.thawed.is_set():
            self.held += 1
            self.thawed.wait()

    def _run(self, sql: str, args: Sequence[Any] = (), fetch: bool = True) -> list[Any]:
        self._hold()
        return super()._run(sql, args, fetch)

    def append(self, rows: Sequence[Sealed]) -> None:
        self._hold()
        super().append(rows)


class FakeEngine:
    """What the writer tells the data path, noted."""

    def __init__(self) -> None:
        self.refusing: str | None = None
        self.terminated: list[str] = []
        self.failed: list[int] = []
        self.durable: list[int] = []

    def refuse_statements(self, code: str | None = None, message: str = "") -> int:
        self.refusing = code
        return 0

    def set_audit_backlog(self, pending: int, high: int, taken: int = 0) -> None:
        self.backlog = (pending, high)

    def terminate(self, session: int | None, code: str, message: str) -> int:
        self.terminated.append(code)
        return 0

    def audit_failed(self, session: int, code: str, message: str) -> bool:
        self.failed.append(session)
        return True

    def audit_durable(self, session: int, ticket: int) -> bool:
        self.durable.append(session)
        return True


def stored(tmp: Path) -> list[Sealed]:
    store = SqliteStore(tmp / "state" / "audit.db")
    try:
        return [r for w in store.writers() for r in store.chain(w)]
    finally:
        store.close()


@contextlib.asynccontextmanager
async def running(cfg: Config, store: FrozenStore, engine: FakeEngine) -> AsyncIterator[AuditLog]:
    """An AuditLog writing to `store`, telling `engine`, its writer running for the block; closed
    after it."""
    log = AuditLog(cfg, store=store)
    log.engine = engine  # type: ignore[assignment]
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        yield log
        nursery.cancel_scope.cancel()
    await log.close()


async def wait_until(pred: Any, timeout: float) -> float:
    start = trio.current_time()
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)
    return trio.current_time() - start


def test_a_hung_store_refuses_within_store_timeout_and_a_late_commit_is_not_written_twice(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path)
    store = FrozenStore(tmp_path / "state" / "audit.db")
    engine = FakeEngine()

    async def main() -> AuditLog:
        async with running(cfg, store, engine) as log:
            for i in range(5):
                log.append("admin", data={"action": f"before-{i}"})
            await wait_until(lambda: not log.pending, 5)
            store.freeze()
            for i in range(5):
                log.append("admin", data={"action": f"during-{i}"})
            took = await wait_until(lambda: not log.accepting, 5)
            assert took < 0.3 + 0.5, took  # store_timeout plus a flush interval, not "never"
            assert engine.refusing == "58030" and not log.healthy
            assert store.interrupts >= 1  # the hung call was asked to stop
            await trio.sleep(1.5)  # retries meanwhile: none may start beside the held append
            assert store.held == 1 and log.pending
            # Thawed: the abandoned append commits late, then the writer reconciles, finds those
            # records in the store, and writes only the rest.
            store.thaw()
            await wait_until(lambda: log.accepting and not log.pending, 5)
            assert engine.refusing is None and log.healthy
            log.append("admin", data={"action": "after"})
            await wait_until(lambda: not log.pending, 5)
        return log

    log = trio.run(main)
    recs = stored(tmp_path)
    seqs = [r.seq for r in recs]
    assert seqs == list(range(1, len(recs) + 1)) and seqs[-1] == log.chain.seq
    actions = [decode(r.body).data.get("action") for r in recs if r.kind == "admin"]
    assert actions == [*(f"before-{i}" for i in range(5)), *(f"during-{i}" for i in range(5)), "after"]
    assert verify(SqliteStore(tmp_path / "state" / "audit.db"), [log.public]).ok


def test_sync_waiters_expire_at_sync_timeout_while_a_write_hangs(tmp_path: Path) -> None:
    # store_timeout above sync_timeout: only the waiters' own expiry can end them in time.
    cfg = config(tmp_path, mode="sync", store_timeout=30, sync_timeout=0.5)
    store = FrozenStore(tmp_path / "state" / "audit.db")
    engine = FakeEngine()

    async def main() -> None:
        async with running(cfg, store, engine) as log:
            await wait_until(lambda: not log.pending, 5)
            store.freeze()
            rec = log.append("admin", data={"action": "held"})
            assert rec is not None
            log.waiters.append((rec.seq, 7, 1, time.monotonic()))
            took = await wait_until(lambda: engine.failed == [7], 5)
            assert 0.4 < took < 1.5, took
            assert not log.waiters
            store.thaw()

    trio.run(main)


def test_max_pending_refuses_and_ends_sessions_and_the_loss_is_recorded(tmp_path: Path) -> None:
    # A store that answers, but too slowly to keep up (under store_timeout): pending grows to
    # max_pending, which must fail closed, not drop records silently.
    cfg = config(tmp_path, max_pending=1000, store_timeout=60)
    store = FrozenStore(tmp_path / "state" / "audit.db")
    engine = FakeEngine()

    async def main() -> AuditLog:
        async with running(cfg, store, engine) as log:
            await wait_until(lambda: not log.pending, 5)
            store.freeze()
            for i in range(1010):
                log.append("admin", data={"action": "flood", "i": i})
            assert log.dropped == 10 and not log.accepting
            assert engine.refusing == "58030" and engine.terminated == ["58030"]
            store.thaw()
            await wait_until(lambda: log.accepting and not log.pending and not log.dropped, 10)
            assert engine.refusing is None
        return log

    log = trio.run(main)
    recs = stored(tmp_path)
    lost = [
        decode(r.body).data
        for r in recs
        if r.kind == "admin" and decode(r.body).data["action"] == "records_lost"
    ]
    assert len(lost) == 1 and lost[0]["count"] == 10, lost
    assert verify(SqliteStore(tmp_path / "state" / "audit.db"), [log.public]).ok


def test_a_hung_store_switches_to_the_spool_and_replays_it_once_thawed(tmp_path: Path) -> None:
    cfg = config(tmp_path, on_failure="spool", mode="sync", sync_timeout=5)
    store = FrozenStore(tmp_path / "state" / "audit.db")
    engine = FakeEngine()

    async def main() -> AuditLog:
        async with running(cfg, store, engine) as log:
            await wait_until(lambda: not log.pending, 5)
            store.freeze()
            for i in range(3):
                rec = log.append("admin", data={"action": f"spooled-{i}"})
                assert rec is not None
                log.waiters.append((rec.seq, 10 + i, 1, time.monotonic()))
                log._wake.set()
                # Durable in the spool after at most store_timeout; sessions go on.
                await wait_until(lambda i=i: engine.durable.count(10 + i) == 1, 2)
            assert log.spooling and log.accepting and engine.refusing is None and not engine.failed
            assert log.spool.exists()
            store.thaw()
            await wait_until(lambda: not log.spooling and log.healthy and not log.spool.exists(), 10)
            log.append("admin", data={"action": "after"})
            await wait_until(lambda: not log.pending, 5)
        return log

    log = trio.run(main)
    recs = stored(tmp_path)
    seqs = [r.seq for r in recs]
    assert seqs == list(range(1, len(recs) + 1))
    actions = [decode(r.body).data.get("action") for r in recs if r.kind == "admin"]
    assert actions == ["spooled-0", "spooled-1", "spooled-2", "after"]
    assert verify(SqliteStore(tmp_path / "state" / "audit.db"), [log.public]).ok
