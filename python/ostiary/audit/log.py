"""The gateway's audit writer: seals records into its chain, writes them in batches off the data
path, signs checkpoints, and fails closed.

Theory of operation. Records are sealed (numbered and hashed into the chain) the moment the control
plane learns of them, in one Trio thread, so the chain's order is the order of events. The data path
hands statement entries over in batches (per worker, at most every ``audit_flush`` milliseconds or
512 entries). Sealed records wait in ``pending`` until the flusher writes them, in one transaction,
in a worker thread: every ``flush_interval`` seconds, or at once when a sync-mode session waits for
them. In sync mode the data path holds what a client sent until its statements' records are
durable (``engine.audit_durable``); nothing reaches the server unrecorded.

When the store cannot be written, records stay in memory in order (never dropped: the chain needs
them), and ``on_failure`` decides: ``refuse`` refuses every statement and login until a retry
succeeds, and ends sync sessions whose records wait; ``spool`` appends each batch to a local spool
file (fsync'd, so sync sessions go on) and replays it into the store, in order, when it returns. If
``max_pending`` records wait, statements and logins are refused and sessions ended whatever the
store's state, and further records are counted, not kept; a ``records_lost`` record gives the count
once the store is back. Sync sessions wait at most ``sync_timeout`` for their records, however long
a write takes (a task of its own expires them).

A store that does not answer is down. Every store call runs through ``_call``: in a worker thread,
one at a time, for at most ``store_timeout`` seconds. A call still running then is abandoned (a
thread cannot be killed): the store is asked to ``interrupt`` it, which makes a PostgreSQL call
blocked on a frozen or unreachable server fail at once, and until its thread has returned no other
call starts, so abandoned threads never pile up. An abandoned (or failed) write may still have been
committed, or may commit later when a frozen server resumes; the chain is not hurt by it: a record
is sealed once, so any copy that lands holds the same seq and hash, and ``UNIQUE (writer, seq)``
rejects a second one. So after any failed write the next attempt first reads the store's head for
this writer and drops from ``pending`` what is already there (``_reconcile``); the spool's replay
filters by the head the same way.

Checkpoints cover only records confirmed in the store; each is signed, stored, and also written to
``<data_dir>/audit/head-<writer>.json`` (the newest), which ``audit verify`` compares with the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import trio

from ostiary import __version__
from ostiary.audit import keys as keysmod
from ostiary.audit.records import Chain, Sealed, now_us
from ostiary.audit.store import AuditStore, PostgresStore, SqliteStore, StoreError

if TYPE_CHECKING:
    from ostiary import _core
    from ostiary.config import Config
    from ostiary.hooks import SessionInfo

log = logging.getLogger("ostiary.audit")

UNAVAILABLE_CODE = "58030"
UNAVAILABLE = (
    "the gateway's audit trail cannot record statements right now, so they are refused; "
    "try again when it is back"
)
# Records written to the store per call: a store that is back after a long outage gets the backlog
# in calls that each fit in ``store_timeout``.
WRITE_CHUNK = 5000
# Records removed per store call by a retention purge.
PURGE_STEP = 10_000
# Seconds between attempts to write to a store that failed.
RETRY_INTERVAL = 1.0

T = TypeVar("T")


def store_dsn(config: Config) -> str:
    """The PostgreSQL store's connection string (``dsn``, ``dsn_env`` or ``dsn_file``)."""
    a = config.audit
    if a.dsn is not None:
        return a.dsn
    if a.dsn_env is not None:
        dsn = os.environ.get(a.dsn_env, "")
        if not dsn:
            raise StoreError(f"audit.dsn_env: environment variable {a.dsn_env} is not set")
        return dsn
    try:
        return Path(a.dsn_file or "").read_text().strip()
    except OSError as e:
        raise StoreError(f"audit.dsn_file: cannot read it: {e}") from None


def sqlite_path(config: Config) -> Path:
    return Path(config.audit.path or Path(config.data_dir) / "audit.db")


def open_store(config: Config) -> AuditStore:
    if config.audit.store == "postgres":
        return PostgresStore(store_dsn(config))
    return SqliteStore(sqlite_path(config))


def audit_dir(config: Config) -> Path:
    return Path(config.data_dir) / "audit"


def signing_key_path(config: Config) -> Path:
    a = config.audit
    return Path(a.signing_key_file) if a.signing_key_file else audit_dir(config) / "signing.key"


def claim_writer(directory: Path) -> tuple[str, Any]:
    """A writer id of this data directory, locked for this process. Each gateway process writes
    its own chain: the first runs as the writer of ``writer.id``, a second one sharing the data
    directory as the writer of ``writer-2.id``, and so on; each id is kept, so a restarted gateway
    continues its chain."""
    directory.mkdir(parents=True, exist_ok=True)
    for slot in range(1, 257):
        path = directory / ("writer.id" if slot == 1 else f"writer-{slot}.id")
        f = open(path, "a+")  # noqa: SIM115 - kept open for the lock's lifetime
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        f.seek(0)
        writer = f.read().strip()
        if not writer:
            writer = secrets.token_hex(8)
            f.seek(0)
            f.truncate()
            f.write(writer + "\n")
            f.flush()
            os.fsync(f.fileno())
        return writer, f
    raise StoreError(f"more than 256 gateway processes share the data directory {directory.parent}")


def head_path(config: Config, writer: str) -> Path:
    return audit_dir(config) / f"head-{writer}.json"


class Spool:
    """Sealed batches appended to a local file while the store is down (one JSON line per record)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, rows: Iterable[Sealed]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(msgspec.json.encode(r) + b"\n" for r in rows)
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[Sealed]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(msgspec.json.decode(line, type=Sealed))
            except msgspec.DecodeError:
                # A torn last line (crash while appending): its batch was never acknowledged.
                break
        return out

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def exists(self) -> bool:
        return self.path.exists()


class StoreCall:
    """One blocking store call, run by a worker thread; ``finished`` is set when it returns, which
    the Trio side checks for a call it stopped waiting for."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.started = time.monotonic()
        self.finished = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> Any:
        try:
            return self.fn(*self.args)
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.finished.set()


class AuditLog:
    def __init__(self, config: Config, store: AuditStore | None = None) -> None:
        a = config.audit
        self.config = config
        self.cfg = a
        self.store = store if store is not None else open_store(config)
        self.writer, self._lock_file = claim_writer(audit_dir(config))
        self.name = a.writer_name or socket.gethostname()
        self.key = keysmod.load_or_create_signing_key(signing_key_path(config))
        self.public = self.key.public_key()
        self.key_id = keysmod.key_id(self.public)
        self.store.register_key(self.writer, self.name, self.key_id, keysmod.public_pem(self.public))
        head = self.store.head(self.writer)
        self.spool = Spool(audit_dir(config) / "spool" / f"{self.writer}.jsonl")
        spooled = self.spool.read()
        if spooled and (head is None or spooled[-1].seq > head[0]):
            # The last run spooled records the store never got: they continue the chain.
            self._replay_spool_now(spooled)
            head = self.store.head(self.writer)
        self.chain = Chain(self.writer, *head) if head else Chain(self.writer)
        self.stored = head or (0, "")
        self.run_id = secrets.token_hex(4)
        self.pending: list[Sealed] = []
        self.waiters: list[tuple[int, int, int, float]] = []  # (seq, session, ticket, since)
        self.healthy = True
        self.spooling = False
        self.dropped = 0
        # Statements and logins are refused (store down without a spool, or ``max_pending`` reached).
        self.refusing = False
        # A write failed: its records may be in the store all the same; reconcile before writing.
        self._unsure = False
        # The store call abandoned at ``store_timeout`` whose thread has not returned yet.
        self._abandoned: StoreCall | None = None
        self._store_lock = trio.Lock()
        self._unspooling = False
        self._retry_at = 0.0
        self.engine: _core.Engine | None = None
        self.sessions: dict[int, SessionInfo] = {}
        # Approvals that let a held statement run, by session: its next statement record with that
        # text carries the request id.
        self._approvals: dict[int, list[tuple[str, str]]] = {}
        self._wake = trio.Event()
        self._flush_lock = trio.Lock()
        self._checkpointed = self.stored[0]
        self._last_purge_check = 0.0
        self._closed = False
        self.head_file = head_path(config, self.writer)
        self._check_head_file(head)
        start: dict[str, Any] = {
            "name": self.name,
            "pid": os.getpid(),
            "version": __version__,
            "key_id": self.key_id,
            "store": self.store.description,
            "mode": a.mode,
            "run": self.run_id,
        }
        if head is not None:
            # A clean shutdown ends the chain with writer_stop; anything else means the last run
            # was killed or crashed: the sessions it had open have no session_end, and (async mode)
            # the statements of its last moments may be missing. Said here, for auditors and SIEMs.
            last = self.store.record_at(self.writer, head[0])
            start["previous_stop"] = "clean" if last is not None and last.kind == "writer_stop" else "unclean"
            if start["previous_stop"] == "unclean":
                log.warning(
                    "audit: the previous run of writer %s ended without a clean stop (killed or "
                    "crashed): its open sessions have no session_end record%s",
                    self.writer,
                    ", and its last statements may be missing (async mode)" if a.mode == "async" else "",
                )
        self.append("writer_start", data=start)

    # -- sealing ----------------------------------------------------------------------------------

    def session_ref(self, session: int) -> str:
        return f"{self.run_id}-{session}"

    def note_approval(self, session: int, text: str, request: str) -> None:
        self._approvals.setdefault(session, []).append((text, request))

    def _approval_of(self, session: int, text: str) -> str:
        refs = self._approvals.get(session)
        if not refs:
            return ""
        for i, (full, rid) in enumerate(refs):
            if full.startswith(text) or text.startswith(full):
                del refs[i]
                if not refs:
                    del self._approvals[session]
                return rid
        return ""

    @property
    def accepting(self) -> bool:
        """False while statements and logins must be refused (store down, ``on_failure: refuse``,
        or ``max_pending`` records waiting)."""
        return not self.refusing

    def _refuse(self, why: str) -> None:
        if self.refusing:
            return
        log.error("audit: %s; refusing statements and logins until it is back", why)
        self.refusing = True
        self._report_backlog()
        if self.engine is not None:
            self.engine.refuse_statements(UNAVAILABLE_CODE, UNAVAILABLE)

    def _accept(self) -> None:
        if not self.refusing or len(self.pending) >= self.cfg.max_pending:
            return
        self.refusing = False
        self._report_backlog()
        if self.engine is not None:
            self.engine.refuse_statements(None)

    def append(
        self,
        kind: str,
        *,
        ts: int | None = None,
        session: str = "",
        identity: str = "",
        connection: str = "",
        verdict: str = "",
        rule: str = "",
        data: dict[str, Any] | None = None,
    ) -> Sealed | None:
        if len(self.pending) >= self.cfg.max_pending:
            self._overflow()
            return None
        rec = self.chain.seal(
            kind,
            ts if ts is not None else now_us(),
            session=session,
            identity=identity,
            connection=connection,
            verdict=verdict,
            rule=rule,
            data=data,
        )
        self.pending.append(rec)
        if len(self.pending) >= 1000:
            self._wake.set()
        return rec

    def engine_batch(self, ack_session: int, ticket: int, entries: list[tuple[Any, ...]]) -> None:
        """Seals the statement entries of an ``("audit", ...)`` engine event. With ``ack_session``,
        that session waits until these records are durable."""
        try:
            self._seal_entries(entries)
        finally:
            # (Every event's entries are reported once, whatever happened, or the data path
            # would count them as waiting for good.)
            self._report_backlog(taken=len(entries))
        if ack_session:
            self.waiters.append((self.chain.seq, ack_session, ticket, time.monotonic()))
            self._wake.set()

    def _seal_entries(self, entries: list[tuple[Any, ...]]) -> None:
        mode = self.cfg.statements
        from ostiary.hooks import statement_fingerprint

        sessions = self.sessions
        for session, seq, phase, kind, stmt, denied, times, counts, outcome, error in entries:
            info = sessions.get(session)
            name, text, truncated, params = stmt
            started, ended = times
            data: dict[str, Any] = {"seq": seq, "type": kind, "name": name}
            if phase != "result":
                if mode == "text":
                    data["text"] = text
                    data["truncated"] = truncated
                    if params:
                        data["params"] = params
                else:
                    data["fingerprint"] = statement_fingerprint(text) if text else ""
                    if mode == "fingerprint" and text:
                        data["shape"] = _shape(text)
            if denied is not None:
                data["denied"] = {"code": denied[0], "message": denied[1]}
            if phase != "result" and session in self._approvals:
                rid = self._approval_of(session, text)
                if rid:
                    data["approval"] = rid
            if phase != "start":
                rows, nbytes, tag, commands = counts
                data.update(
                    outcome=outcome,
                    duration_us=max(0, ended - started),
                    rows=rows,
                    bytes=nbytes,
                    tag=tag,
                )
                if commands > 1:
                    data["commands"] = commands
                if error is not None:
                    # The server's message quotes values ('invalid input syntax ...: "s3cret"'):
                    # withheld where statement texts are.
                    data["error"] = (
                        {"code": error[0], "message": error[1]} if mode == "text" else {"code": error[0]}
                    )
            self.append(
                "result" if phase == "result" else "statement",
                ts=ended if phase == "result" else started,
                session=self.session_ref(session),
                identity=info.identity.name if info is not None else "",
                connection=info.connection if info is not None else "",
                verdict="deny" if denied is not None else "allow",
                rule=denied[2] if denied is not None else (info.grant if info is not None else ""),
                data=data,
            )

    def _report_backlog(self, taken: int = 0) -> None:
        """Tells the data path how many records wait: at half of ``max_pending`` its sessions
        wait before handing over more (``Engine.set_audit_backlog``), so that a client pipelining
        faster than the store writes is slowed down instead of filling ``max_pending`` and getting
        everyone refused. Off while the store is down (refusing or spooling decide then)."""
        if self.engine is not None:
            healthy = not self.refusing and not self.spooling
            self.engine.set_audit_backlog(
                len(self.pending), self.cfg.max_pending // 2 if healthy else 0, taken
            )

    # -- writing ----------------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher, the sync waiters' expiry, the spool's replay and the checkpoint timer;
        cancelled at shutdown (call ``close`` after)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_loop)
            task_status.started()
            next_checkpoint = trio.current_time() + self.cfg.checkpoint_interval
            while True:
                if self.healthy or self.spooling:
                    with trio.move_on_after(self.cfg.flush_interval):
                        await self._wake.wait()
                else:
                    await trio.sleep(RETRY_INTERVAL)
                self._wake = trio.Event()
                await self.flush()
                if self.spooling and not self._unspooling and trio.current_time() >= self._retry_at:
                    self._unspooling = True
                    nursery.start_soon(self._unspool)
                if trio.current_time() >= next_checkpoint:
                    next_checkpoint = trio.current_time() + self.cfg.checkpoint_interval
                    await self.checkpoint()
                    try:
                        await self.retention()
                    except StoreError as e:
                        log.warning("audit retention: purge not done: %s", e)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs one blocking store call in a worker thread, one at a time, for at most
        ``store_timeout`` seconds; raises ``StoreError`` when it fails or takes longer (see the
        module's header). Every store call of a running gateway goes through here."""
        async with self._store_lock:
            old = self._abandoned
            if old is not None:
                if not old.finished.is_set():
                    raise StoreError(
                        f"audit store {self.store.description}: a call abandoned "
                        f"{time.monotonic() - old.started:.0f} s ago has not returned yet"
                    )
                self._abandoned = None
                log.warning(
                    "audit store: the call abandoned %.1f s ago has returned (%s)",
                    time.monotonic() - old.started,
                    "failed" if old.error is not None else "succeeded",
                )
            call = StoreCall(fn, args)
            try:
                with trio.move_on_after(self.cfg.store_timeout):
                    result: T = await trio.to_thread.run_sync(call.run, abandon_on_cancel=True)
                    return result
            finally:
                if not call.finished.is_set():
                    self._abandoned = call
                    self.store.interrupt()
            raise StoreError(
                f"audit store {self.store.description}: no answer within {self.cfg.store_timeout:g} s "
                "(audit.store_timeout)"
            )

    async def flush(self) -> None:
        """Writes what is pending to the store, in calls of at most ``WRITE_CHUNK`` records (or to
        the spool while it is in use); on failure applies ``on_failure``."""
        async with self._flush_lock:
            if self.spooling:
                if not await self._spool():
                    self._refuse_and_end_waiters("the audit store and the spool cannot be written")
                return
            wrote = False
            while self.pending or self._unsure:
                try:
                    if self._unsure:
                        await self._reconcile()
                    else:
                        batch = self.pending[:WRITE_CHUNK]
                        try:
                            await self._call(self.store.append, batch)
                        except StoreError:
                            self._unsure = True
                            raise
                        # Only appends happen meanwhile, at the end: the front is still ``batch``.
                        del self.pending[: len(batch)]
                        self._report_backlog()
                        self._stored(batch[-1])
                        log.debug("audit: %d record(s) written, through seq %d", len(batch), batch[-1].seq)
                except StoreError as e:
                    await self._failed(e)
                    return
                wrote = True
            if wrote:
                self._recovered()

    async def _reconcile(self) -> None:
        """After a failed write: drops from ``pending`` the records the store holds all the same
        (the write was committed although it failed or timed out, or committed late)."""
        head = await self._call(self.store.head, self.writer)
        self._unsure = False
        if head is None:
            return
        n = 0
        while n < len(self.pending) and self.pending[n].seq <= head[0]:
            n += 1
        if not n:
            return
        last = self.pending[n - 1]
        if last.seq == head[0] and last.hash != head[1]:
            log.error(
                "audit store holds another record at seq %d of this writer's chain than the one sealed "
                "here (hash %s, not %s)",
                head[0],
                head[1],
                last.hash,
            )
        log.warning("audit: %d record(s) of a failed or abandoned write are in the store all the same", n)
        del self.pending[:n]
        self._stored(last)

    def _stored(self, last: Sealed) -> None:
        self.stored = (last.seq, last.hash)
        self._durable(last.seq)

    def _durable(self, seq: int) -> None:
        if self.engine is None:
            self.waiters = [w for w in self.waiters if w[0] > seq]
            return
        keep = []
        for w in self.waiters:
            if w[0] <= seq:
                self.engine.audit_durable(w[1], w[2])
            else:
                keep.append(w)
        self.waiters = keep

    async def _expire_loop(self) -> None:
        """Ends sync sessions whose records were not durable within ``sync_timeout``, whatever the
        flusher is waiting for."""
        tick = min(0.25, self.cfg.sync_timeout / 4)
        while True:
            await trio.sleep(tick)
            self._expire_waiters()

    def _expire_waiters(self) -> None:
        if not self.waiters or self.engine is None:
            return
        limit = time.monotonic() - self.cfg.sync_timeout
        if self.waiters[0][3] >= limit:
            return  # the oldest is in time, so are the rest
        keep = []
        for w in self.waiters:
            if w[3] < limit:
                self.engine.audit_failed(
                    w[1],
                    UNAVAILABLE_CODE,
                    "terminating connection: the audit trail did not record "
                    f"this session's statements within {self.cfg.sync_timeout:g} s; they were not run",
                )
            else:
                keep.append(w)
        self.waiters = keep

    async def _failed(self, err: StoreError) -> None:
        if self.healthy:
            log.error("audit store unavailable: %s", err)
        else:
            log.debug("audit store still unavailable: %s", err)
        self.healthy = False
        if self.cfg.on_failure == "spool" and await self._spool():
            return
        self._refuse_and_end_waiters("the audit store cannot be written")

    def _refuse_and_end_waiters(self, why: str) -> None:
        self._refuse(why)
        # Sync sessions whose records wait: their statements are not run.
        if self.engine is not None:
            for w in self.waiters:
                self.engine.audit_failed(
                    w[1],
                    UNAVAILABLE_CODE,
                    "terminating connection: the audit trail cannot record this "
                    "session's statements, so they were not run",
                )
        self.waiters = []

    async def _spool(self) -> bool:
        """Moves the pending records to the spool (``on_failure: spool``); False if it cannot be
        written, and the records stay pending."""
        batch = self.pending[:]
        if batch:
            try:
                await trio.to_thread.run_sync(self.spool.append, batch)
            except OSError as e:
                log.error("audit store down and the spool %s cannot be written: %s", self.spool.path, e)
                return False
            del self.pending[: len(batch)]
            self._durable(batch[-1].seq)
        if not self.spooling:
            log.error("audit store unavailable; spooling records to %s", self.spool.path)
            self.spooling = True
            self._report_backlog()
        self._accept()
        return True

    def _overflow(self) -> None:
        """A record arrived with ``max_pending`` records waiting: it is counted, not kept, and the
        gateway fails closed (once per overflow): statements and logins are refused and sessions
        ended, since what they do can no longer be recorded."""
        self.dropped += 1
        if self.dropped > 1 and self.refusing:
            return
        self._refuse_and_end_waiters(f"{self.cfg.max_pending} records wait for the store (audit.max_pending)")
        if self.engine is not None:
            self.engine.terminate(None, UNAVAILABLE_CODE, "terminating connection: " + UNAVAILABLE)

    def _recovered(self) -> None:
        """A write went through: back to accepting (unless ``max_pending`` records still wait), and
        the records dropped meanwhile, if any, are counted in the trail."""
        if not self.healthy:
            log.warning("audit store is back: %s", self.store.description)
            self.healthy = True
        self._accept()
        self._note_lost()

    def _note_lost(self) -> None:
        if self.dropped:
            n, self.dropped = self.dropped, 0
            self.append(
                "admin",
                data={
                    "action": "records_lost",
                    "count": n,
                    "reason": "more than max_pending records waited for the audit store",
                },
            )

    async def _unspool(self) -> None:
        """Replays the spool into the store, then goes back to writing to the store. The bulk is
        replayed while the flusher goes on spooling; what it spooled meanwhile is replayed under
        the flush lock, then the spool is cleared."""
        try:
            rows = await trio.to_thread.run_sync(self.spool.read)
            await self._replay_async(rows)
            async with self._flush_lock:
                rest = await trio.to_thread.run_sync(self.spool.read)
                await self._replay_async(rest[len(rows) :])
                await trio.to_thread.run_sync(self.spool.clear)
                if rest:
                    self.stored = (rest[-1].seq, rest[-1].hash)
                self.spooling = False
                self._report_backlog()
                self._unsure = False
                self.healthy = True
                log.warning(
                    "audit store is back: replayed %d spooled record(s) into %s",
                    len(rest),
                    self.store.description,
                )
                self._accept()
                self._note_lost()
        except StoreError as e:
            log.debug("audit store still unavailable: %s", e)
            self._retry_at = trio.current_time() + RETRY_INTERVAL
        finally:
            self._unspooling = False

    async def _replay_async(self, rows: list[Sealed]) -> None:
        if not rows:
            return
        head = await self._call(self.store.head, self.writer)
        done = head[0] if head else 0
        todo = [r for r in rows if r.seq > done]
        for i in range(0, len(todo), WRITE_CHUNK):
            await self._call(self.store.append, todo[i : i + WRITE_CHUNK])

    def _replay(self, rows: list[Sealed]) -> None:
        head = self.store.head(self.writer)
        done = head[0] if head else 0
        todo = [r for r in rows if r.seq > done]
        for i in range(0, len(todo), WRITE_CHUNK):
            self.store.append(todo[i : i + WRITE_CHUNK])

    def _replay_spool_now(self, rows: list[Sealed]) -> None:
        self._replay(rows)
        self.spool.clear()
        log.warning("replayed %d record(s) spooled by the previous run", len(rows))

    # -- checkpoints and retention ------------------------------------------------------------------

    def _check_head_file(self, head: tuple[int, str] | None) -> None:
        try:
            signed = msgspec.json.decode(self.head_file.read_bytes(), type=keysmod.SignedCheckpoint)
        except (FileNotFoundError, msgspec.DecodeError):
            return
        if head is None or signed.checkpoint.seq > head[0]:
            # The chain goes on from the signed head, not from what the store still holds: the
            # removed records stay a gap that verification names (a chain restarted at seq 1 would
            # verify once the next checkpoint signed it, and reuse the removed records' ids).
            cp = signed.checkpoint
            self.chain = Chain(self.writer, cp.seq, cp.hash)
            self.stored = (cp.seq, cp.hash)
            self._checkpointed = cp.seq
            log.error(
                "the audit store holds this writer's chain up to seq %s but its last signed checkpoint "
                "covers seq %d: records were removed from the store",
                head[0] if head else 0,
                signed.checkpoint.seq,
            )
            self.append(
                "admin",
                data={
                    "action": "store_behind_checkpoint",
                    "store_seq": head[0] if head else 0,
                    "checkpoint_seq": signed.checkpoint.seq,
                },
            )

    async def checkpoint(self, purged: tuple[int, str] | None = None) -> keysmod.SignedCheckpoint | None:
        seq, h = self.stored
        if seq == 0 or (seq == self._checkpointed and purged is None):
            return None
        cp = keysmod.Checkpoint(
            writer=self.writer,
            seq=seq,
            hash=h,
            ts=now_us(),
            key_id=self.key_id,
            purged_through=purged[0] if purged else 0,
            purged_hash=purged[1] if purged else "",
        )
        signed = keysmod.sign(self.key, cp)
        try:
            await self._call(self.store.add_checkpoint, signed)
        except StoreError as e:
            log.warning("audit checkpoint not written: %s", e)
            return None
        previous, self._checkpointed = self._checkpointed, seq
        tmp = self.head_file.with_suffix(".tmp")
        data = msgspec.json.encode(signed)

        def write() -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.head_file)

        try:
            await trio.to_thread.run_sync(write)
        except OSError as e:
            # Out of descriptors or disk: the checkpoint is in the store, the head file (which
            # proves the chain's end) is the last one written. Not a reason to end the gateway:
            # the next checkpoint writes it again.
            log.error("audit head file %s not written: %s", self.head_file, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._checkpointed = previous  # tried again at the next interval
            return None
        return signed

    async def retention(self, force: bool = False) -> int:
        days = self.cfg.retention_days
        if days is None:
            return 0
        if not force and time.monotonic() - self._last_purge_check < 3600:
            return 0
        self._last_purge_check = time.monotonic()
        cutoff = now_us() - int(days * 86400 * 1_000_000)
        return await self.purge_before(cutoff)

    async def purge_before(self, cutoff_us: int) -> int:
        """Removes this writer's records older than ``cutoff_us``, after signing a checkpoint that
        names the last removed record, so the rest of the chain still verifies."""
        await self.flush()
        through = await self._call(self.store.last_seq_before, self.writer, cutoff_us)
        # Keep at least the newest stored record: the chain needs an anchor.
        through = min(through, self.stored[0] - 1)
        if through <= 0:
            return 0
        rec = await self._call(self.store.record_at, self.writer, through)
        if rec is None:
            return 0  # purged already
        signed = await self.checkpoint(purged=(through, rec.hash))
        if signed is None:
            return 0
        # In steps, each well within ``store_timeout``, so that records go on being written between.
        n = 0
        while True:
            done = await self._call(self.store.purge, self.writer, through, PURGE_STEP)
            n += done
            if done < PURGE_STEP:
                break
        self.append("purge", data={"through_seq": through, "before_us": cutoff_us, "records": n})
        log.info("audit retention: purged %d record(s) up to seq %d", n, through)
        return n

    async def close(self) -> None:
        """Final flush and checkpoint (shutdown)."""
        if self._closed:
            return
        self._closed = True
        self.append("writer_stop", data={"run": self.run_id, "dropped": self.dropped})
        with trio.move_on_after(10):
            await self.flush()
            await self.checkpoint()
        if self.pending:
            log.error("audit: %d record(s) could not be written before shutdown", len(self.pending))
        if self._abandoned is not None and not self._abandoned.finished.is_set():
            # Its thread holds the store; closing would wait for it. The process is ending anyway.
            self.store.interrupt()
        else:
            with contextlib.suppress(Exception):
                self.store.close()
        self._lock_file.close()


def _shape(text: str) -> str:
    from ostiary import _core

    try:
        return _core.statement_shape(text)
    except Exception:
        return ""


def token_id(secret: bytes) -> str:
    """What the trail keeps of a token: the first 32 hex digits of its SHA-256 (never the token)."""
    import hashlib

    return hashlib.sha256(secret).hexdigest()[:32]


class AuditEvents:
    """What the control plane records besides statements: logins, sessions, policy versions and
    administrative actions. Methods of ``AuditLog`` by composition, kept apart for reading."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def authentication(self, attempt: Any) -> None:
        ident = attempt.identity
        data: dict[str, Any] = {
            "peer": attempt.peer,
            "user": attempt.user,
            "method": attempt.method,
            "policy_version": attempt.policy_version,
        }
        if ident is not None:
            data["issuer"] = ident.issuer
            data["subject"] = ident.name
            jti = ident.attributes.get("jti")
            if jti:
                data["jti"] = jti
        if attempt.credential_id:
            data["token_sha256"] = attempt.credential_id
        if attempt.outcome != "allowed":
            data["code"] = attempt.code
            data["reason"] = attempt.reason
            if attempt.chain:
                data["chain"] = list(attempt.chain)
        self.audit.append(
            "auth",
            ts=int(attempt.time * 1_000_000),
            identity=ident.name if ident is not None else "",
            connection=attempt.connection,
            verdict="allow" if attempt.outcome == "allowed" else "deny",
            rule=attempt.grant,
            data=data,
        )

    def session_started(self, info: SessionInfo, recording: str = "") -> None:
        data: dict[str, Any] = {
            "recording": recording,
            "peer": info.peer,
            "issuer": info.identity.issuer,
            "access": info.access,
            "upstream_user": info.upstream_user,
            "upstream_pid": info.upstream_process_id,
            "policy_version": info.policy_version,
            "tls": list(info.client_tls) if info.client_tls else None,
            # What the client set for its session; values only where statements are kept as text.
            "settings": (
                dict(info.settings)
                if self.audit.cfg.statements == "text"
                else sorted(k for k, _ in info.settings)
            ),
        }
        self.audit.append(
            "session_start",
            ts=int(info.started * 1_000_000),
            session=self.audit.session_ref(info.id),
            identity=info.identity.name,
            connection=info.connection,
            verdict="allow",
            rule=info.grant,
            data=data,
        )

    def session_ended(self, info: SessionInfo, reason: str, detail: str, extra: dict[str, Any]) -> None:
        s = info.stats
        data: dict[str, Any] = {
            "reason": reason,
            "duration_s": round(time.time() - info.started, 6),
            "bytes_from_client": s.get("frontend_bytes", 0),
            "bytes_to_client": s.get("backend_bytes", 0),
            "statements": s.get("statements", 0),
            "rows": s.get("rows", 0),
            "denied": s.get("denied", 0),
            "masked": {k: v for k, v in s.get("masked", {}).items() if v},
            **extra,
        }
        if detail:
            data["detail"] = detail
        self.audit.append(
            "session_end",
            session=self.audit.session_ref(info.id),
            identity=info.identity.name,
            connection=info.connection,
            rule=info.grant,
            data=data,
        )

    def policy(
        self, version: str, source: str, applied: bool, detail: str, how: str, config: Config | None = None
    ) -> None:
        data: dict[str, Any] = {"version": version, "source": source, "how": how}
        if detail:
            data["detail"] = detail
        if config is not None:
            data["snapshot"] = policy_snapshot(config)
        self.audit.append("policy", verdict="applied" if applied else "rejected", data=data)

    def admin(self, action: str, **data: Any) -> None:
        self.audit.append("admin", data={"action": action, **data})


def policy_snapshot(config: Config) -> dict[str, Any]:
    """What a policy version grants, for the trail (access reviews are built from it): issuers,
    identities, groups, connections (where they lead, never their credentials), grants, guardrails,
    masking and approval rules."""
    import msgspec as _msgspec

    def plain(items: Any) -> list[Any]:
        return list(_msgspec.to_builtins(items))

    return {
        "issuers": [
            {"name": i.name, "issuer": i.issuer or "", "preset": i.preset or ""} for i in config.issuers
        ],
        "identities": plain(config.identities),
        "groups": plain(config.groups),
        "clients": [c.user for c in config.clients],
        "connections": [
            {
                "name": c.name,
                "host": c.upstream.host,
                "port": c.upstream.port,
                "database": c.upstream.database,
                "tls": c.upstream.tls.mode,
                "roles": sorted({c.upstream.user, *(cred.user for cred in c.credentials.values())}),
                "guardrails": list(c.guardrails),
                "masking": list(c.masking),
            }
            for c in config.connections
        ],
        "grants": plain(config.grants),
        "guardrails": plain(config.guardrails),
        "masking": plain(config.masking),
        "approvals": plain(config.approvals),
    }
