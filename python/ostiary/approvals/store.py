"""Approval requests and votes, kept in the audit trail's store (SQLite in the data directory, or
the fleet's PostgreSQL database, so an approval given through one gateway releases a statement held
on another).

States: ``pending`` → ``approved`` (``required`` approvals), ``denied`` (any approver said no) or
``expired`` (nobody decided before ``expires``); an approved request of scope ``statement`` becomes
``used`` when the statement it approves runs (once). Decisions are made in one transaction that
locks the request, so two approvers racing on two gateways count correctly.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ostiary.audit.records import now_us
from ostiary.audit.store import StoreError, create_private

FINAL = ("approved", "denied", "expired", "used", "cancelled")
NOTIFY_CHANNEL = "ostiary_approvals"


class Request(msgspec.Struct, kw_only=True):
    id: str
    created: int  # µs since the epoch
    expires: int
    state: str
    rule: str
    connection: str
    grant: str
    requester: str
    requester_issuer: str = ""
    session: str = ""
    statement: str = ""
    params: list[str | None] = msgspec.field(default_factory=list)
    scope: str = "statement"
    required: int = 1
    reason: str = ""
    origin: str = "inline"  # "inline" (a held statement) or "ahead" (ostiary approvals request)
    gateway: str = ""
    decided: int = 0
    valid_until: int = 0  # scope grant: approved until then
    decision_reason: str = ""
    votes: list[Vote] = msgspec.field(default_factory=list)

    @property
    def approvals(self) -> int:
        return sum(1 for v in self.votes if v.decision == "approve")


class Vote(msgspec.Struct, kw_only=True):
    approver: str
    decision: str  # "approve" or "deny"
    reason: str
    ts: int


class ApprovalError(Exception):
    """A vote or request that is not allowed; the message says why (shown to the approver)."""


COLUMNS = (
    "id, created, expires, state, rule, connection, grant_name, requester, requester_issuer, session, "
    "statement, params, scope, required, reason, origin, gateway, decided, valid_until, decision_reason"
)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS approval_requests (
        id TEXT PRIMARY KEY, created BIGINT NOT NULL, expires BIGINT NOT NULL, state TEXT NOT NULL,
        rule TEXT NOT NULL, connection TEXT NOT NULL, grant_name TEXT NOT NULL, requester TEXT NOT NULL,
        requester_issuer TEXT NOT NULL, session TEXT NOT NULL, statement TEXT NOT NULL,
        params TEXT NOT NULL, scope TEXT NOT NULL, required INTEGER NOT NULL, reason TEXT NOT NULL,
        origin TEXT NOT NULL, gateway TEXT NOT NULL, decided BIGINT NOT NULL, valid_until BIGINT NOT NULL,
        decision_reason TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS approval_requests_state ON approval_requests (state, expires)",
    """CREATE TABLE IF NOT EXISTS approval_votes (
        request_id TEXT NOT NULL, approver TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL,
        ts BIGINT NOT NULL, PRIMARY KEY (request_id, approver))""",
]


def new_id() -> str:
    return "apr-" + secrets.token_hex(5)


def _row(r: Sequence[Any]) -> Request:
    return Request(
        id=r[0],
        created=r[1],
        expires=r[2],
        state=r[3],
        rule=r[4],
        connection=r[5],
        grant=r[6],
        requester=r[7],
        requester_issuer=r[8],
        session=r[9],
        statement=r[10],
        params=msgspec.json.decode(r[11]),
        scope=r[12],
        required=r[13],
        reason=r[14],
        origin=r[15],
        gateway=r[16],
        decided=r[17],
        valid_until=r[18],
        decision_reason=r[19],
    )


class ApprovalStore:
    """Blocking calls (run them in a worker thread), one at a time (a lock)."""

    def __init__(self, connect: Callable[[], Any], paramstyle: str, description: str) -> None:
        self._connect_fn = connect
        self._ph = "?" if paramstyle == "qmark" else "%s"
        self._pg = paramstyle != "qmark"
        self.description = description
        self._lock = threading.Lock()
        self._conn: Any = None
        # What ``interrupt`` uses to wake a call blocked on the connection without taking
        # ``_lock`` (which that call holds): SQLite's connection, or a duplicate of PostgreSQL's
        # socket. Guarded by ``_interrupt_lock``, never held across I/O.
        self._interrupt_target: Any = None
        self._interrupt_lock = threading.Lock()
        self.dsn = ""  # PostgreSQL: where decisions are announced (LISTEN/NOTIFY)
        with self._lock:
            self._with(lambda c: [c.execute(s) for s in SCHEMA])

    @classmethod
    def sqlite(cls, path: str | Path) -> ApprovalStore:
        def connect() -> Any:
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_private(Path(path))
            c = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA busy_timeout=5000")
            return c

        return cls(connect, "qmark", f"sqlite:{path}")

    @classmethod
    def postgres(cls, dsn: str) -> ApprovalStore:
        try:
            import psycopg
        except ImportError:
            raise StoreError(
                "approvals in a postgres store need psycopg: pip install 'psycopg[binary]'"
            ) from None

        def connect() -> Any:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=5)

        store = cls(connect, "format", "postgres")
        store.dsn = dsn
        return store

    def _with(self, fn: Callable[[Any], Any]) -> Any:
        """Runs ``fn(conn)`` inside one transaction (lock held by the caller)."""
        try:
            if self._conn is None:
                self._conn = self._connect_fn()
                with self._interrupt_lock:
                    self._interrupt_target = (
                        socket.socket(fileno=os.dup(self._conn.fileno())) if self._pg else self._conn
                    )
            c = self._conn
            c.execute("BEGIN" if self._pg else "BEGIN IMMEDIATE")
            try:
                out = fn(c)
                c.execute("COMMIT")
                return out
            except BaseException:
                c.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as e:
            self._drop()
            raise StoreError(f"approval store {self.description}: {e}") from None
        except Exception as e:
            if type(e).__module__.startswith("psycopg"):
                self._drop()
                raise StoreError(f"approval store {self.description}: {e}") from None
            raise

    def interrupt(self) -> None:
        """Makes a call blocked on the store fail now (thread-safe): SQLite's running statement
        fails with SQLITE_INTERRUPT; PostgreSQL's socket is shut down, so the connection breaks
        and the next call opens a new one."""
        with self._interrupt_lock:
            target = self._interrupt_target
            with contextlib.suppress(Exception):
                if isinstance(target, socket.socket):
                    target.shutdown(socket.SHUT_RDWR)
                elif target is not None:
                    target.interrupt()

    def _drop(self) -> None:
        with self._interrupt_lock:
            if isinstance(self._interrupt_target, socket.socket):
                self._interrupt_target.close()
            self._interrupt_target = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _q(self, sql: str) -> str:
        return sql.replace("?", self._ph)

    def _load(self, c: Any, rid: str, lock: bool = False) -> Request | None:
        sql = f"SELECT {COLUMNS} FROM approval_requests WHERE id = ?" + (
            " FOR UPDATE" if lock and self._pg else ""
        )
        row = c.execute(self._q(sql), (rid,)).fetchone()
        if row is None:
            return None
        req = _row(row)
        votes = c.execute(
            self._q(
                "SELECT approver, decision, reason, ts FROM approval_votes WHERE request_id = ? ORDER BY ts"
            ),
            (rid,),
        ).fetchall()
        req.votes = [Vote(approver=a, decision=d, reason=r, ts=t) for a, d, r, t in votes]
        return req

    def create(self, req: Request) -> Request:
        def fn(c: Any) -> Request:
            c.execute(
                self._q(f"INSERT INTO approval_requests ({COLUMNS}) VALUES ({', '.join('?' * 20)})"),
                (
                    req.id,
                    req.created,
                    req.expires,
                    req.state,
                    req.rule,
                    req.connection,
                    req.grant,
                    req.requester,
                    req.requester_issuer,
                    req.session,
                    req.statement,
                    msgspec.json.encode(req.params).decode(),
                    req.scope,
                    req.required,
                    req.reason,
                    req.origin,
                    req.gateway,
                    req.decided,
                    req.valid_until,
                    req.decision_reason,
                ),
            )
            return req

        with self._lock:
            return self._with(fn)  # type: ignore[no-any-return]

    def get(self, rid: str) -> Request | None:
        with self._lock:
            return self._with(lambda c: self._load(c, rid))  # type: ignore[no-any-return]

    def requests(self, state: str | None = None, limit: int = 100) -> list[Request]:
        def fn(c: Any) -> list[Request]:
            if state is None:
                rows = c.execute(
                    self._q(f"SELECT {COLUMNS} FROM approval_requests ORDER BY created DESC LIMIT ?"),
                    (limit,),
                ).fetchall()
            else:
                rows = c.execute(
                    self._q(
                        f"SELECT {COLUMNS} FROM approval_requests WHERE state = ? "
                        "ORDER BY created DESC LIMIT ?"
                    ),
                    (state, limit),
                ).fetchall()
            out = [_row(r) for r in rows]
            for req in out:
                votes = c.execute(
                    self._q("SELECT approver, decision, reason, ts FROM approval_votes WHERE request_id = ?"),
                    (req.id,),
                ).fetchall()
                req.votes = [Vote(approver=a, decision=d, reason=r, ts=t) for a, d, r, t in votes]
            return out

        with self._lock:
            return self._with(fn)  # type: ignore[no-any-return]

    def vote(
        self,
        rid: str,
        approver: str,
        approve: bool,
        reason: str,
        grant_minutes: float,
        now: int | None = None,
    ) -> Request:
        """Records one approver's decision; returns the request as it then is. Raises
        ``ApprovalError`` when the vote is not allowed (not pending, expired, own request, voted)."""
        t = now if now is not None else now_us()

        def fn(c: Any) -> Request:
            req = self._load(c, rid, lock=True)
            if req is None:
                raise ApprovalError(f"no approval request {rid}")
            if req.state != "pending":
                raise ApprovalError(f"request {rid} is {req.state} already")
            if t >= req.expires:
                self._set_state(c, req, "expired", t, "nobody decided in time")
                raise ApprovalError(f"request {rid} expired")
            if approver == req.requester:
                raise ApprovalError("the requester cannot approve or deny their own request")
            if any(v.approver == approver for v in req.votes):
                raise ApprovalError(f"{approver} has already decided on {rid}")
            c.execute(
                self._q("INSERT INTO approval_votes VALUES (?, ?, ?, ?, ?)"),
                (rid, approver, "approve" if approve else "deny", reason, t),
            )
            req.votes.append(
                Vote(approver=approver, decision="approve" if approve else "deny", reason=reason, ts=t)
            )
            if not approve:
                self._set_state(
                    c, req, "denied", t, f"denied by {approver}" + (f": {reason}" if reason else "")
                )
            elif req.approvals >= req.required:
                who = ", ".join(v.approver for v in req.votes if v.decision == "approve")
                if req.scope == "grant":
                    req.valid_until = t + int(grant_minutes * 60_000_000)
                self._set_state(
                    c, req, "approved", t, f"approved by {who}" + (f": {reason}" if reason else "")
                )
            return req

        with self._lock:
            return self._with(fn)  # type: ignore[no-any-return]

    def _set_state(self, c: Any, req: Request, state: str, t: int, why: str) -> None:
        req.state, req.decided, req.decision_reason = state, t, why
        if self._pg:
            # Gateways of the fleet LISTEN on this channel: a held statement is released at once.
            c.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, req.id))
        c.execute(
            self._q(
                "UPDATE approval_requests SET state = ?, decided = ?, decision_reason = ?, valid_until = ? "
                "WHERE id = ?"
            ),
            (state, t, why, req.valid_until, req.id),
        )

    def finish(self, rid: str, state: str, why: str, only_from: str = "pending") -> Request | None:
        """Moves a request from ``only_from`` to ``state`` (expired, used, cancelled); returns it if
        it moved."""
        t = now_us()

        def fn(c: Any) -> Request | None:
            req = self._load(c, rid, lock=True)
            if req is None or req.state != only_from:
                return None
            self._set_state(c, req, state, t, why)
            return req

        with self._lock:
            return self._with(fn)  # type: ignore[no-any-return]

    def expire_due(self) -> list[Request]:
        t = now_us()

        def fn(c: Any) -> list[Request]:
            rows = c.execute(
                self._q(f"SELECT {COLUMNS} FROM approval_requests WHERE state = 'pending' AND expires <= ?"),
                (t,),
            ).fetchall()
            out = []
            for r in rows:
                req = _row(r)
                self._set_state(c, req, "expired", t, "nobody decided in time")
                out.append(req)
            return out

        with self._lock:
            return self._with(fn)  # type: ignore[no-any-return]

    def find_usable(
        self,
        connection: str,
        grant: str,
        requester: str,
        rule: str,
        statement: str,
        params: list[str | None] | None = None,
    ) -> Request | None:
        """An approval that lets this statement run now: a grant-scoped one still valid, or an
        unused statement-scoped one for exactly this text and these parameters (asked ahead of
        time, or approved after the session that asked ended)."""
        t = now_us()

        def fn(c: Any) -> Request | None:
            row = c.execute(
                self._q(
                    f"SELECT {COLUMNS} FROM approval_requests WHERE state = 'approved' AND connection = ? "
                    "AND grant_name = ? AND requester = ? AND rule = ? "
                    "AND ((scope = 'grant' AND valid_until > ?) "
                    "OR (scope = 'statement' AND statement = ? AND params = ?)) "
                    "ORDER BY decided LIMIT 1"
                ),
                (
                    connection,
                    grant,
                    requester,
                    rule,
                    t,
                    statement,
                    msgspec.json.encode(params or []).decode(),
                ),
            ).fetchone()
            if row is None:
                return None
            req = _row(row)
            if req.scope == "statement":
                self._set_state(c, req, "used", t, req.decision_reason)
            return req

        with self._lock:
            return self._with(fn)  # type: ignore[no-any-return]

    def close(self) -> None:
        with self._lock:
            self._drop()
