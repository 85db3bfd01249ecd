"""Where audit records live: SQLite in the data directory (default) or PostgreSQL for fleets.

Both stores hold the same tables: ``audit_records`` (one row per record: the store's insertion
``id``, the header copies that searches use, the hashed ``body`` and its ``hash``),
``audit_checkpoints`` (signed checkpoints) and ``audit_keys`` (each writer's public keys, for
convenience: an auditor verifies with keys exported out of band, ``ostiary audit export-key``).
Calls are blocking; the gateway runs them in a worker thread. A store is used by one thread at a
time (a lock serialises calls). ``interrupt`` is the exception: any thread may call it, at any time,
to make a call that hangs (a frozen or unreachable server) fail now instead of whenever TCP gives
up; the call raises ``StoreError`` and whether its write was committed is unknown.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ostiary.audit.keys import Checkpoint, SignedCheckpoint
from ostiary.audit.records import Sealed
from ostiary.errors import OstiaryError

COLUMNS = "id, writer, seq, ts, kind, session, identity, connection, verdict, rule, body, hash"


class StoreError(OstiaryError):
    """The audit store cannot be read or written (it is down, full, or not an audit store)."""


@dataclass
class SearchFilter:
    identity: str | None = None
    connection: str | None = None
    session: str | None = None
    kind: str | None = None
    verdict: str | None = None
    rule: str | None = None
    text: str | None = None  # substring of the body (statement text, messages ...)
    since: int | None = None  # µs since the epoch
    until: int | None = None
    limit: int = 100


class AuditStore(Protocol):
    description: str

    def close(self) -> None: ...
    def interrupt(self) -> None: ...
    def register_key(self, writer: str, name: str, key_id: str, public_pem: str) -> None: ...
    def keys(self) -> dict[str, dict[str, str]]: ...
    def head(self, writer: str) -> tuple[int, str] | None: ...
    def append(self, rows: Sequence[Sealed]) -> None: ...
    def add_checkpoint(self, cp: SignedCheckpoint) -> None: ...
    def checkpoints(self, writer: str | None = None) -> list[SignedCheckpoint]: ...
    def writers(self) -> list[str]: ...
    def chain(self, writer: str) -> Iterator[Sealed]: ...
    def read_after(self, after_id: int, limit: int) -> list[Sealed]: ...
    def search(self, f: SearchFilter) -> list[Sealed]: ...
    def record_at(self, writer: str, seq: int) -> Sealed | None: ...
    def last_seq_before(self, writer: str, ts: int) -> int: ...
    def purge(self, writer: str, through_seq: int, limit: int | None = None) -> int: ...


def _sealed(row: Sequence[Any]) -> Sealed:
    """A stored row as a record. Values of the wrong type (a row edited by hand: SQLite keeps what
    it is given, ``replace()`` turns a BLOB into TEXT) become values of the right type that do not
    hash as the original did, so verification names the record as edited instead of crashing."""
    rid, writer, seq, ts, kind, session, identity, connection, verdict, rule, body, h = row
    writer, kind, session, identity, connection, verdict, rule, h = (
        _text(v) for v in (writer, kind, session, identity, connection, verdict, rule, h)
    )
    return Sealed(
        writer,
        _int(seq),
        _int(ts),
        kind,
        session,
        identity,
        connection,
        verdict,
        rule,
        _blob(body),
        h,
        id=rid,
    )


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "replace")
    return "" if v is None else str(v)


def _int(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


def _blob(v: Any) -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape")
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    return b"" if v is None else str(v).encode()


def _signed(row: Sequence[Any]) -> SignedCheckpoint:
    writer, seq, h, ts, key_id, purged_through, purged_hash, signature = row
    return SignedCheckpoint(
        checkpoint=Checkpoint(
            writer=writer,
            seq=seq,
            hash=h,
            ts=ts,
            key_id=key_id,
            purged_through=purged_through,
            purged_hash=purged_hash,
        ),
        signature=signature,
    )


def _where(f: SearchFilter, ph: str, like: str) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for col in ("identity", "connection", "session", "kind", "verdict", "rule"):
        v = getattr(f, col)
        if v is not None:
            clauses.append(f"{col} = {ph}")
            args.append(v)
    if f.since is not None:
        clauses.append(f"ts >= {ph}")
        args.append(f.since)
    if f.until is not None:
        clauses.append(f"ts < {ph}")
        args.append(f.until)
    if f.text is not None:
        clauses.append(like.format(ph=ph))
        args.append(f.text)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    id INTEGER PRIMARY KEY,
    writer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    kind TEXT NOT NULL,
    session TEXT NOT NULL,
    identity TEXT NOT NULL,
    connection TEXT NOT NULL,
    verdict TEXT NOT NULL,
    rule TEXT NOT NULL,
    body BLOB NOT NULL,
    hash TEXT NOT NULL,
    UNIQUE (writer, seq)
);
CREATE INDEX IF NOT EXISTS audit_records_ts ON audit_records (ts);
CREATE INDEX IF NOT EXISTS audit_records_identity ON audit_records (identity, ts);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    id INTEGER PRIMARY KEY,
    writer TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    ts INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    purged_through INTEGER NOT NULL,
    purged_hash TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_keys (
    writer TEXT NOT NULL,
    key_id TEXT NOT NULL,
    name TEXT NOT NULL,
    public_pem TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (writer, key_id)
);
"""

CP_COLUMNS = "writer, seq, hash, ts, key_id, purged_through, purged_hash, signature"


class _SqlStore:
    """What both stores share: the queries, written with ``?`` placeholders (``_q`` adapts them),
    run through the subclass's ``_run``."""

    PH = "?"
    TEXT_MATCH = "instr(CAST(body AS TEXT), {ph}) > 0"
    description = ""

    def _q(self, sql: str) -> str:
        return sql if self.PH == "?" else sql.replace("?", self.PH)

    def _run(self, sql: str, args: Sequence[Any] = (), fetch: bool = True) -> list[Any]:
        raise NotImplementedError

    def keys(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for writer, kid, pem in self._run("SELECT writer, key_id, public_pem FROM audit_keys"):
            out.setdefault(writer, {})[kid] = pem
        return out

    def head(self, writer: str) -> tuple[int, str] | None:
        rows = self._run(
            self._q("SELECT seq, hash FROM audit_records WHERE writer = ? ORDER BY seq DESC LIMIT 1"),
            (writer,),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def add_checkpoint(self, cp: SignedCheckpoint) -> None:
        c = cp.checkpoint
        self._run(
            self._q(f"INSERT INTO audit_checkpoints ({CP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
            (c.writer, c.seq, c.hash, c.ts, c.key_id, c.purged_through, c.purged_hash, cp.signature),
            fetch=False,
        )

    def checkpoints(self, writer: str | None = None) -> list[SignedCheckpoint]:
        if writer is None:
            rows = self._run(f"SELECT {CP_COLUMNS} FROM audit_checkpoints ORDER BY id")
        else:
            rows = self._run(
                self._q(f"SELECT {CP_COLUMNS} FROM audit_checkpoints WHERE writer = ? ORDER BY id"), (writer,)
            )
        return [_signed(r) for r in rows]

    def writers(self) -> list[str]:
        rows = self._run(
            "SELECT writer FROM audit_records UNION SELECT writer FROM audit_checkpoints "
            "UNION SELECT writer FROM audit_keys"
        )
        return sorted(r[0] for r in rows)

    def chain(self, writer: str) -> Iterator[Sealed]:
        after = -1
        while True:
            rows = self._run(
                self._q(
                    f"SELECT {COLUMNS} FROM audit_records WHERE writer = ? AND seq > ? "
                    "ORDER BY seq LIMIT 5000"
                ),
                (writer, after),
            )
            if not rows:
                return
            for r in rows:
                yield _sealed(r)
            after = rows[-1][2]

    def read_after(self, after_id: int, limit: int) -> list[Sealed]:
        rows = self._run(
            self._q(f"SELECT {COLUMNS} FROM audit_records WHERE id > ? ORDER BY id LIMIT ?"),
            (after_id, limit),
        )
        return [_sealed(r) for r in rows]

    def search(self, f: SearchFilter) -> list[Sealed]:
        where, args = _where(f, self.PH, self.TEXT_MATCH)
        rows = self._run(
            f"SELECT {COLUMNS} FROM audit_records{where} ORDER BY ts DESC, id DESC LIMIT {self.PH}",
            [*args, f.limit],
        )
        return [_sealed(r) for r in rows]

    def record_at(self, writer: str, seq: int) -> Sealed | None:
        rows = self._run(
            self._q(f"SELECT {COLUMNS} FROM audit_records WHERE writer = ? AND seq = ?"), (writer, seq)
        )
        return _sealed(rows[0]) if rows else None

    def last_seq_before(self, writer: str, ts: int) -> int:
        rows = self._run(
            self._q("SELECT max(seq) FROM audit_records WHERE writer = ? AND ts < ?"), (writer, ts)
        )
        return int(rows[0][0] or 0)


def create_private(path: Path) -> None:
    """Creates ``path`` readable by its owner only, unless it exists (SQLite gives its -wal and -shm
    files the database file's mode). Statement texts are in it: ALTER ROLE ... PASSWORD '...'."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class SqliteStore(_SqlStore):
    """The default store: one SQLite file, WAL, ``synchronous=FULL`` (a committed batch survives a
    power cut)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        """``create=False`` opens an existing file to read it (verify, search, evidence) and writes
        nothing to it: not its journal mode, not the schema. Tables it lacks (an empty file) are
        made as empty TEMP tables, which live in this connection only, so it reads as a store
        without records instead of failing on every query."""
        self.path = Path(path)
        self.description = f"sqlite:{self.path}"
        self._lock = threading.Lock()
        if not create and not self.path.is_file():
            raise StoreError(f"there is no audit store at {self.path}")
        try:
            if create:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                create_private(self.path)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout=5000")
            if create:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(SQLITE_SCHEMA)
            else:
                import re

                have = {
                    r[0] for r in self._db.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'")
                }
                for stmt in SQLITE_SCHEMA.split(";"):
                    m = re.match(r"\s*CREATE TABLE IF NOT EXISTS (\w+)", stmt)
                    if m and m.group(1) not in have:
                        self._db.execute(stmt.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))
            st = os.stat(self.path)
            self._file_id = (st.st_dev, st.st_ino)
            self._wal_id: tuple[int, int] | None = None
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open the audit store {self.path}: {e}") from None

    def _same_file(self) -> None:
        """Raises ``StoreError`` when the file at the store's path is not the one open (deleted or
        replaced while the gateway runs: records would go on into a file nobody can read)."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise StoreError(f"the audit store {self.path} was removed while in use: {e}") from None
        if (st.st_dev, st.st_ino) != self._file_id:
            raise StoreError(f"the audit store {self.path} was replaced by another file while in use")
        # Its write-ahead log holds what is not checkpointed into the file yet (all of it, early on).
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            ws = os.stat(wal)
        except OSError:
            if self._wal_id is not None:
                raise StoreError(
                    f"the audit store's write-ahead log {wal} was removed while in use"
                ) from None
            return
        if self._wal_id is not None and (ws.st_dev, ws.st_ino) != self._wal_id:
            raise StoreError(f"the audit store's write-ahead log {wal} was replaced while in use")

    def _run(self, sql: str, args: Sequence[Any] = (), fetch: bool = True) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"audit store {self.path}: {e}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def interrupt(self) -> None:
        # Thread-safe by SQLite's design: the running statement fails with SQLITE_INTERRUPT.
        with contextlib.suppress(sqlite3.Error):
            self._db.interrupt()

    def register_key(self, writer: str, name: str, key_id: str, public_pem: str) -> None:
        self._run(
            "INSERT OR IGNORE INTO audit_keys VALUES (?, ?, ?, ?, ?)",
            (writer, key_id, name, public_pem, int(time.time())),
        )

    def _note_wal(self) -> None:
        """Remembers which write-ahead log the database writes to (it exists after a write)."""
        if self._wal_id is None:
            with contextlib.suppress(OSError):
                ws = os.stat(self.path.with_name(self.path.name + "-wal"))
                self._wal_id = (ws.st_dev, ws.st_ino)

    def append(self, rows: Sequence[Sealed]) -> None:
        if not rows:
            return
        self._same_file()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT INTO audit_records (writer, seq, ts, kind, session, identity, connection, "
                        "verdict, rule, body, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [r.row() for r in rows],
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise StoreError(f"audit store {self.path}: {e}") from None
        self._note_wal()

    def purge(self, writer: str, through_seq: int, limit: int | None = None) -> int:
        with self._lock:
            try:
                cur = self._db.execute(*_purge_sql(writer, through_seq, limit, "?"))
                return cur.rowcount
            except sqlite3.Error as e:
                raise StoreError(f"audit store {self.path}: {e}") from None


PG_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS audit_records (
        id BIGSERIAL PRIMARY KEY,
        writer TEXT NOT NULL,
        seq BIGINT NOT NULL,
        ts BIGINT NOT NULL,
        kind TEXT NOT NULL,
        session TEXT NOT NULL,
        identity TEXT NOT NULL,
        connection TEXT NOT NULL,
        verdict TEXT NOT NULL,
        rule TEXT NOT NULL,
        body BYTEA NOT NULL,
        hash TEXT NOT NULL,
        UNIQUE (writer, seq))""",
    "CREATE INDEX IF NOT EXISTS audit_records_ts ON audit_records (ts)",
    "CREATE INDEX IF NOT EXISTS audit_records_identity ON audit_records (identity, ts)",
    """CREATE TABLE IF NOT EXISTS audit_checkpoints (
        id BIGSERIAL PRIMARY KEY,
        writer TEXT NOT NULL,
        seq BIGINT NOT NULL,
        hash TEXT NOT NULL,
        ts BIGINT NOT NULL,
        key_id TEXT NOT NULL,
        purged_through BIGINT NOT NULL,
        purged_hash TEXT NOT NULL,
        signature TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit_keys (
        writer TEXT NOT NULL,
        key_id TEXT NOT NULL,
        name TEXT NOT NULL,
        public_pem TEXT NOT NULL,
        created BIGINT NOT NULL,
        PRIMARY KEY (writer, key_id))""",
]


class PostgresStore(_SqlStore):
    """A PostgreSQL database shared by a fleet: each gateway writes its own chain; ``id`` orders
    every record of the fleet for exporters. Needs psycopg (``pip install 'psycopg[binary]'``).
    A lost connection is reopened on the next call."""

    PH = "%s"
    TEXT_MATCH = "position(convert_to({ph}, 'UTF8') in body) > 0"

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise StoreError("audit store: postgres needs psycopg: pip install 'psycopg[binary]'") from None
        self._psycopg = psycopg
        self._dsn = dsn
        self.description = "postgres:" + _redact_dsn(dsn)
        self._lock = threading.Lock()
        self._conn: Any = None
        # A duplicate of the connection's socket, for ``interrupt``: shutting it down wakes a call
        # blocked on the connection without taking ``_lock``, which that call holds. Guarded by
        # ``_sock_lock``, never held across I/O, so a descriptor is never shut down after its close.
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        with self._lock:
            conn = self._connect()
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(7304126551)")
                    for stmt in PG_SCHEMA:
                        conn.execute(stmt)
            except psycopg.Error as e:
                self._drop()
                raise StoreError(f"audit store {self.description}: {e}") from None

    def _connect(self) -> Any:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = self._psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
            except self._psycopg.Error as e:
                raise StoreError(f"cannot reach the audit store {self.description}: {e}") from None
            with self._sock_lock:
                self._sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        return self._conn

    def interrupt(self) -> None:
        with self._sock_lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def _drop(self) -> None:
        with self._sock_lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _run(self, sql: str, args: Sequence[Any] = (), fetch: bool = True) -> list[Any]:
        with self._lock:
            conn = self._connect()
            try:
                cur = conn.execute(sql, args)
                return cur.fetchall() if fetch else []
            except self._psycopg.Error as e:
                self._drop()
                raise StoreError(f"audit store {self.description}: {e}") from None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def register_key(self, writer: str, name: str, key_id: str, public_pem: str) -> None:
        self._run(
            "INSERT INTO audit_keys VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (writer, key_id, name, public_pem, int(time.time())),
            fetch=False,
        )

    def append(self, rows: Sequence[Sealed]) -> None:
        if not rows:
            return
        with self._lock:
            conn = self._connect()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    # One writer at a time across the fleet: ids are then handed out in commit
                    # order, so an exporter that sees id N+1 committed never misses N (an id is
                    # taken at insert, not at commit, and without this a later id could commit first).
                    cur.execute("SELECT pg_advisory_xact_lock(7304126552)")
                    cur.executemany(
                        "INSERT INTO audit_records (writer, seq, ts, kind, session, identity, connection, "
                        "verdict, rule, body, hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        [r.row() for r in rows],
                    )
            except self._psycopg.Error as e:
                self._drop()
                raise StoreError(f"audit store {self.description}: {e}") from None

    def purge(self, writer: str, through_seq: int, limit: int | None = None) -> int:
        with self._lock:
            conn = self._connect()
            try:
                cur = conn.execute(*_purge_sql(writer, through_seq, limit, "%s"))
                return int(cur.rowcount)
            except self._psycopg.Error as e:
                self._drop()
                raise StoreError(f"audit store {self.description}: {e}") from None


def _purge_sql(writer: str, through_seq: int, limit: int | None, ph: str) -> tuple[str, tuple[Any, ...]]:
    """Removes a writer's records up to ``through_seq``; with ``limit``, at most that many, oldest
    first (a purge in short steps; one cut short leaves records the signed purge covers, which
    ``audit verify`` accepts)."""
    if limit is None:
        return f"DELETE FROM audit_records WHERE writer = {ph} AND seq <= {ph}", (writer, through_seq)
    return (
        f"DELETE FROM audit_records WHERE id IN (SELECT id FROM audit_records WHERE writer = {ph} "
        f"AND seq <= {ph} ORDER BY seq LIMIT {ph})",
        (writer, through_seq, limit),
    )


def _redact_dsn(dsn: str) -> str:
    import re

    return re.sub(r"(password=)\S+", r"\1***", re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", dsn))
