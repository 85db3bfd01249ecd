"""Audit records and their hash chain.

A record is a flat header (what searches and indexes use) plus ``data`` (what the kind adds). Its
*body* is the canonical JSON of all of it, including ``prev``, the hex SHA-256 of the record before
it in the same writer's chain (64 zeros for the first), and its hash is the SHA-256 of the body.
The store keeps the body bytes exactly as hashed, next to copies of the header fields for indexes;
``ostiary audit verify`` recomputes each hash, follows ``prev`` and checks the copies against the
body, so editing, inserting, deleting or reordering a record breaks the chain at that record.

Kinds: ``writer_start``, ``writer_stop`` (a clean shutdown's last record), ``auth``,
``session_start``, ``session_end``, ``statement``, ``result`` (the outcome of a statement recorded
ahead of execution in sync mode), ``policy``, ``approval``, ``admin``, ``purge``.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgspec

GENESIS = "0" * 64


def now_us() -> int:
    """Microseconds since the epoch: the time unit of records, checkpoints and approvals."""
    return time.time_ns() // 1000


KINDS = (
    "writer_start",
    "auth",
    "session_start",
    "session_end",
    "statement",
    "result",
    "policy",
    "approval",
    "admin",
    "purge",
    "writer_stop",
)


class Record(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One audit record. ``ts`` is microseconds since the epoch; ``session`` names a session as
    ``<run>-<n>`` (``run``: 8 hex digits chosen when the gateway starts)."""

    writer: str
    seq: int
    ts: int
    kind: str
    session: str = ""
    identity: str = ""
    connection: str = ""
    verdict: str = ""
    rule: str = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    prev: str = GENESIS


_encoder = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder(Record)

HEADER_FIELDS = ("writer", "seq", "ts", "kind", "session", "identity", "connection", "verdict", "rule")


def encode(record: Record) -> bytes:
    """The canonical body: JSON with sorted keys, no whitespace."""
    return _encoder.encode(record)


def decode(body: bytes) -> Record:
    return _decoder.decode(body)


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class Sealed(msgspec.Struct, frozen=True):
    """A record as stored: the header copies, the body and its hash. ``id`` is the store's
    insertion order (0 until stored), the cursor of exporters."""

    writer: str
    seq: int
    ts: int
    kind: str
    session: str
    identity: str
    connection: str
    verdict: str
    rule: str
    body: bytes
    hash: str
    id: int = 0

    def record(self) -> Record:
        return decode(self.body)

    def row(self) -> tuple[Any, ...]:
        """The columns a store inserts, in the order of its INSERT."""
        return (
            self.writer,
            self.seq,
            self.ts,
            self.kind,
            self.session,
            self.identity,
            self.connection,
            self.verdict,
            self.rule,
            self.body,
            self.hash,
        )

    def as_dict(self) -> dict[str, Any]:
        """The record as a plain mapping (for JSON output and exporters), with ``id`` and ``hash``."""
        out: dict[str, Any] = msgspec.to_builtins(self.record())
        out["id"] = self.id
        out["hash"] = self.hash
        return out


class Chain:
    """The writer's side of a chain: assigns sequence numbers and links each record to the last."""

    def __init__(self, writer: str, seq: int = 0, head: str = GENESIS) -> None:
        self.writer = writer
        self.seq = seq
        self.head = head

    def seal(
        self,
        kind: str,
        ts: int,
        *,
        session: str = "",
        identity: str = "",
        connection: str = "",
        verdict: str = "",
        rule: str = "",
        data: dict[str, Any] | None = None,
    ) -> Sealed:
        self.seq += 1
        rec = Record(
            writer=self.writer,
            seq=self.seq,
            ts=ts,
            kind=kind,
            session=session,
            identity=identity,
            connection=connection,
            verdict=verdict,
            rule=rule,
            data=data or {},
            prev=self.head,
        )
        body = encode(rec)
        h = digest(body)
        self.head = h
        return Sealed(self.writer, self.seq, ts, kind, session, identity, connection, verdict, rule, body, h)
