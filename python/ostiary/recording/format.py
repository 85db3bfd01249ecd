"""Decoding of the recorder's frame stream (``ostiary_wire::pg::recording``, format version 1).

Rules of this module: pure functions over bytes, no I/O. A frame is ``kind:u8 delta:uvarint tag:u8
length:u32be body[length-4]``; kind ``F`` is a message the client sent, ``B`` one the gateway sent to
the client, ``R`` a frame of the recorder (``V`` header, ``X`` truncation marker, ``O`` rows omitted,
``L`` frames lost, ``S`` stopped). The Rust module's header is the reference for the format.

Events carry ``at_us``, the recorder clock of the frame (the sum of the deltas). Values are shown as
text: text-format values decoded as UTF-8, binary-format values (and text that is not UTF-8) as
``\\x`` and hex, as psql shows bytea. The format of a DataRow's columns is the one of the last
RowDescription. Messages the recorder cut (``X`` with field -1) are decoded as far as they go.

Errors: a frame that does not decode raises ``RecordingError`` naming its offset; a well-framed
client or server message whose body does not decode (a peer sent it malformed, and the recorder keeps
messages as sent) is an ``Undecodable`` event. A stream cut in
the middle of its last frame (a crash while writing) is not an error when ``final`` is false: the
decoder keeps the incomplete tail and ``Decoder.close()`` reports it as cut.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import msgspec

from ostiary.errors import RecordingError

FORMAT_VERSION = 1


class Event(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="event"):
    """One thing that happened in a session. ``truncated`` lists the fields (DataRow columns, Bind
    parameters) the recorder cut to its ``max_field``; ``-1`` means the message itself was cut."""

    at_us: int
    truncated: list[int] = []


# -- recorder frames ------------------------------------------------------------------------------


class Header(Event, tag="header"):
    version: int
    max_rows: int
    max_field: int


class RowsOmitted(Event, tag="rows_omitted"):
    """Rows (DataRow or CopyData messages) of the statement that the recording does not hold."""

    count: int


class FramesLost(Event, tag="frames_lost"):
    count: int


class Stopped(Event, tag="stopped"):
    """The recorder met malformed input and recorded nothing after this."""

    reason: str


# -- client messages ------------------------------------------------------------------------------


class Query(Event, tag="query"):
    """A simple-protocol Query: the statement text as sent (possibly several statements)."""

    text: str


class Parse(Event, tag="parse"):
    name: str
    text: str
    param_types: list[int] = []


class Bind(Event, tag="bind"):
    portal: str
    statement: str
    params: list[str | None] = []
    result_formats: list[int] = []


class Execute(Event, tag="execute"):
    portal: str
    max_rows: int = 0


class Describe(Event, tag="describe"):
    target: str
    name: str


class Close(Event, tag="close"):
    target: str
    name: str


class Sync(Event, tag="sync"):
    pass


class Terminate(Event, tag="terminate"):
    pass


class FunctionCall(Event, tag="function_call"):
    oid: int
    args: list[str | None] = []


class CopyFail(Event, tag="copy_fail"):
    message: str


# -- both directions ------------------------------------------------------------------------------


class CopyData(Event, tag="copy_data"):
    sender: str
    data: str


class CopyDone(Event, tag="copy_done"):
    sender: str


# -- server messages ------------------------------------------------------------------------------


class Column(msgspec.Struct, omit_defaults=True):
    name: str
    type_oid: int
    format: int = 0
    table_oid: int = 0
    attnum: int = 0
    type_size: int = 0
    type_modifier: int = -1


class Columns(Event, tag="columns"):
    """RowDescription: the columns of the result that follows."""

    columns: list[Column]


class Row(Event, tag="row"):
    values: list[str | None]


class CommandComplete(Event, tag="command_complete"):
    tag: str


class EmptyQuery(Event, tag="empty_query"):
    pass


class Error(Event, tag="error"):
    severity: str
    code: str
    message: str
    detail: str | None = None
    hint: str | None = None
    context: str | None = None
    position: int | None = None
    fields: dict[str, str] = {}


class Notice(Event, tag="notice"):
    severity: str
    code: str
    message: str
    detail: str | None = None
    hint: str | None = None
    context: str | None = None
    position: int | None = None
    fields: dict[str, str] = {}


class Ready(Event, tag="ready"):
    status: str


class CopyResponse(Event, tag="copy_response"):
    direction: str
    format: int
    column_formats: list[int] = []


class ParameterStatus(Event, tag="parameter_status"):
    name: str
    value: str


class Notification(Event, tag="notification"):
    pid: int
    channel: str
    payload: str


class PortalSuspended(Event, tag="portal_suspended"):
    pass


class FunctionResult(Event, tag="function_result"):
    value: str | None


class Undecodable(Event, tag="undecodable"):
    """A message recorded as it was sent, which does not decode (the peer sent it malformed)."""

    sender: str
    reason: str


AnyEvent = (
    Header
    | RowsOmitted
    | FramesLost
    | Stopped
    | Query
    | Parse
    | Bind
    | Execute
    | Describe
    | Close
    | Sync
    | Terminate
    | FunctionCall
    | CopyFail
    | CopyData
    | CopyDone
    | Columns
    | Row
    | CommandComplete
    | EmptyQuery
    | Error
    | Notice
    | Ready
    | CopyResponse
    | ParameterStatus
    | Notification
    | PortalSuspended
    | FunctionResult
    | Undecodable
)

# Error and notice field codes, as the protocol documentation names them.
FIELD_NAMES = {
    "S": "severity_localized",
    "V": "severity",
    "C": "code",
    "M": "message",
    "D": "detail",
    "H": "hint",
    "P": "position",
    "p": "internal_position",
    "q": "internal_query",
    "W": "context",
    "s": "schema",
    "t": "table",
    "c": "column",
    "d": "data_type",
    "n": "constraint",
    "F": "file",
    "L": "line",
    "R": "routine",
}


def show_value(raw: bytes, binary: bool) -> str:
    """A value as text: UTF-8 for text format, ``\\x``-hex for binary (and for invalid UTF-8)."""
    if not binary:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return "\\x" + raw.hex()


class _Body:
    """A bounds-checked reader over one message body. ``lenient`` (a body the recorder cut) makes
    a string without terminator end at the end of the body and missing fields read as empty."""

    __slots__ = ("body", "lenient", "pos", "what")

    def __init__(self, body: bytes, what: str, lenient: bool) -> None:
        self.body = body
        self.pos = 0
        self.what = what
        self.lenient = lenient

    def done(self) -> bool:
        return self.pos >= len(self.body)

    def need(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.body):
            raise ValueError(f"{self.what}: needed {n} bytes at offset {self.pos} of {len(self.body)}")
        chunk = self.body[self.pos : end]
        self.pos = end
        return chunk

    def i16(self) -> int:
        return int(struct.unpack("!h", self.need(2))[0])

    def i32(self) -> int:
        return int(struct.unpack("!i", self.need(4))[0])

    def u32(self) -> int:
        return int(struct.unpack("!I", self.need(4))[0])

    def cstr(self) -> str:
        end = self.body.find(b"\0", self.pos)
        if end < 0:
            if not self.lenient:
                raise ValueError(f"{self.what}: string without NUL terminator")
            end = len(self.body)
        s = self.body[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return s

    def rest(self) -> bytes:
        chunk = self.body[self.pos :]
        self.pos = len(self.body)
        return chunk

    def values(self, count: int, formats: list[int]) -> list[str | None]:
        out: list[str | None] = []
        for i in range(count):
            n = self.i32()
            if n < -1:
                raise ValueError(f"{self.what}: value length {n}")
            if n == -1:
                out.append(None)
                continue
            fmt = formats[i] if i < len(formats) else (formats[0] if len(formats) == 1 else 0)
            out.append(show_value(self.need(n), fmt == 1))
        return out


class _BadMessage(ValueError):
    def __init__(self, sender: str, reason: object) -> None:
        super().__init__(str(reason))
        self.sender = sender


class Decoder:
    """Decodes a frame stream fed in pieces (the blocks of a recording file).

    ``feed(data)`` returns the events of the whole frames so far; an incomplete frame at the end
    waits for the next piece. ``close()`` returns True when the stream ended cleanly, False when
    it was cut inside a frame. ``offset`` counts bytes of the frame stream and names the place of
    an error.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.at_us = 0
        self._tail = b""
        self._truncated: list[int] = []
        self._formats: list[int] = []
        self._seen_header = False

    def feed(self, data: bytes) -> list[AnyEvent]:
        buf = self._tail + data if self._tail else data
        events: list[AnyEvent] = []
        pos = 0
        while pos < len(buf):
            at = self.offset + pos
            try:
                frame = _split(buf, pos)
                if frame is None:
                    break
                kind, delta, tag, body, end = frame
                try:
                    event = self._event(kind, self.at_us + delta, tag, body)
                except _BadMessage as e:
                    # A malformed message was recorded as sent: an event, not a broken file.
                    event = Undecodable(at_us=self.at_us + delta, sender=e.sender, reason=str(e))
            except (ValueError, struct.error) as e:
                raise RecordingError(f"malformed frame at offset {at}: {e}") from None
            self.at_us += delta
            if event is not None:
                events.append(event)
            pos = end
        self.offset += pos
        self._tail = buf[pos:]
        return events

    def close(self) -> bool:
        """True when no incomplete frame is left over."""
        return not self._tail

    def _event(self, kind: int, at: int, tag: int, body: bytes) -> AnyEvent | None:
        if not self._seen_header:
            if (kind, tag) != (ord("R"), ord("V")):
                raise ValueError("the stream does not start with a header frame")
            self._seen_header = True
        truncated, self._truncated = self._truncated, []
        lenient = -1 in truncated
        if kind == ord("R"):
            if truncated:
                raise ValueError("a truncation marker before a recorder frame")
            return self._recorder(at, tag, body)
        if kind not in (ord("F"), ord("B")):
            raise ValueError(f"unknown frame kind {kind:#04x}")
        frontend = kind == ord("F")
        name = _name(tag, frontend)
        try:
            if frontend:
                return self._frontend(at, tag, _Body(body, name, lenient), truncated)
            return self._backend(at, tag, _Body(body, name, lenient), truncated)
        except (ValueError, struct.error) as e:
            raise _BadMessage(
                "client" if frontend else "server", f"{name}: {e}" if name not in str(e) else e
            ) from None

    def _recorder(self, at: int, tag: int, body: bytes) -> AnyEvent | None:
        r = _Body(body, "recorder frame", False)
        if tag == ord("V"):
            version = struct.unpack("!H", r.need(2))[0]
            if version != FORMAT_VERSION:
                raise ValueError(f"format version {version} (this ostiary reads {FORMAT_VERSION})")
            max_rows, max_field = struct.unpack("!QI", r.need(12))
            return Header(at_us=at, version=version, max_rows=max_rows, max_field=max_field)
        if tag == ord("X"):
            (count,) = struct.unpack("!H", r.need(2))
            self._truncated = [struct.unpack("!hi", r.need(6))[0] for _ in range(count)]
            return None
        if tag == ord("O"):
            return RowsOmitted(at_us=at, count=struct.unpack("!Q", r.need(8))[0])
        if tag == ord("L"):
            return FramesLost(at_us=at, count=struct.unpack("!Q", r.need(8))[0])
        if tag == ord("S"):
            return Stopped(at_us=at, reason=body.decode("utf-8", errors="replace"))
        raise ValueError(f"unknown recorder frame {chr(tag)!r}")

    def _frontend(self, at: int, tag: int, r: _Body, truncated: list[int]) -> AnyEvent | None:
        t = chr(tag)
        ev: AnyEvent
        if t == "Q":
            ev = Query(at_us=at, text=r.cstr())
        elif t == "P":
            name, text = r.cstr(), r.cstr()
            types = [] if r.done() else [r.u32() for _ in range(max(r.i16(), 0))]
            ev = Parse(at_us=at, name=name, text=text, param_types=types)
        elif t == "B":
            portal, statement = r.cstr(), r.cstr()
            formats = [r.i16() for _ in range(max(r.i16(), 0))]
            params = r.values(max(r.i16(), 0), formats)
            results = [] if r.done() else [r.i16() for _ in range(max(r.i16(), 0))]
            ev = Bind(at_us=at, portal=portal, statement=statement, params=params, result_formats=results)
        elif t == "E":
            portal = r.cstr()
            ev = Execute(at_us=at, portal=portal, max_rows=0 if r.done() else r.i32())
        elif t in "DC":
            target = {"S": "statement", "P": "portal"}.get(chr(r.need(1)[0]), "?")
            name = r.cstr()
            ev = (Describe if t == "D" else Close)(at_us=at, target=target, name=name)
        elif t == "S":
            ev = Sync(at_us=at)
        elif t == "X":
            ev = Terminate(at_us=at)
        elif t == "F":
            oid = r.u32()
            formats = [r.i16() for _ in range(max(r.i16(), 0))]
            ev = FunctionCall(at_us=at, oid=oid, args=r.values(max(r.i16(), 0), formats))
            r.i16()  # the result's format code, which ends every FunctionCall
        elif t == "d":
            ev = CopyData(at_us=at, sender="client", data=show_value(r.rest(), False))
        elif t == "c":
            ev = CopyDone(at_us=at, sender="client")
        elif t == "f":
            ev = CopyFail(at_us=at, message=r.cstr())
        else:
            raise ValueError(f"unexpected client message {t!r}")
        if not truncated and not r.done():
            raise ValueError(f"{r.what}: {len(r.body) - r.pos} bytes after its fields")
        ev.truncated = truncated
        return ev

    def _backend(self, at: int, tag: int, r: _Body, truncated: list[int]) -> AnyEvent | None:
        t = chr(tag)
        ev: AnyEvent
        if t == "T":
            columns = []
            for _ in range(r.i16()):
                name = r.cstr()
                table, attnum, oid, size, mod, fmt = struct.unpack("!IhIhih", r.need(18))
                columns.append(Column(name, oid, fmt, table, attnum, size, mod))
            self._formats = [c.format for c in columns]
            ev = Columns(at_us=at, columns=columns)
        elif t == "D":
            count = r.i16()
            if count < 0:
                raise ValueError("DataRow: negative field count")
            ev = Row(at_us=at, values=r.values(count, self._formats or [0]))
        elif t == "C":
            ev = CommandComplete(at_us=at, tag=r.cstr())
        elif t == "I":
            ev = EmptyQuery(at_us=at)
        elif t in "EN":
            fields: dict[str, str] = {}
            while not r.done():
                code = chr(r.need(1)[0])
                if code == "\0":
                    break
                fields[FIELD_NAMES.get(code, code)] = r.cstr()
            position = fields.get("position", "")
            ev = (Error if t == "E" else Notice)(
                at_us=at,
                severity=fields.get("severity_localized", fields.get("severity", "")),
                code=fields.get("code", ""),
                message=fields.get("message", ""),
                detail=fields.get("detail"),
                hint=fields.get("hint"),
                context=fields.get("context"),
                position=int(position) if position.isdigit() else None,
                fields=fields,
            )
        elif t == "Z":
            ev = Ready(at_us=at, status=r.need(1).decode("ascii", errors="replace"))
        elif t in "GHW":
            fmt = r.need(1)[0]
            column_formats = [r.i16() for _ in range(max(r.i16(), 0))]
            direction = {"G": "in", "H": "out", "W": "both"}[t]
            ev = CopyResponse(at_us=at, direction=direction, format=fmt, column_formats=column_formats)
        elif t == "d":
            ev = CopyData(at_us=at, sender="server", data=show_value(r.rest(), False))
        elif t == "c":
            ev = CopyDone(at_us=at, sender="server")
        elif t == "S":
            ev = ParameterStatus(at_us=at, name=r.cstr(), value=r.cstr())
        elif t == "A":
            ev = Notification(at_us=at, pid=r.i32(), channel=r.cstr(), payload=r.cstr())
        elif t == "s":
            ev = PortalSuspended(at_us=at)
        elif t == "V":
            ev = FunctionResult(at_us=at, value=r.values(1, [1])[0])
        else:
            raise ValueError(f"unexpected server message {t!r}")
        if not truncated and not r.done():
            raise ValueError(f"{r.what}: {len(r.body) - r.pos} bytes after its fields")
        ev.truncated = truncated
        return ev


_FRONTEND_NAMES = {
    "Q": "Query",
    "P": "Parse",
    "B": "Bind",
    "E": "Execute",
    "D": "Describe",
    "C": "Close",
    "S": "Sync",
    "X": "Terminate",
    "F": "FunctionCall",
    "d": "CopyData",
    "c": "CopyDone",
    "f": "CopyFail",
}
_BACKEND_NAMES = {
    "T": "RowDescription",
    "D": "DataRow",
    "C": "CommandComplete",
    "I": "EmptyQueryResponse",
    "E": "ErrorResponse",
    "N": "NoticeResponse",
    "Z": "ReadyForQuery",
    "G": "CopyInResponse",
    "H": "CopyOutResponse",
    "W": "CopyBothResponse",
    "d": "CopyData",
    "c": "CopyDone",
    "S": "ParameterStatus",
    "A": "NotificationResponse",
    "s": "PortalSuspended",
    "V": "FunctionCallResponse",
}


def _name(tag: int, frontend: bool) -> str:
    t = chr(tag)
    return (_FRONTEND_NAMES if frontend else _BACKEND_NAMES).get(t, repr(t))


def _split(buf: bytes, pos: int) -> tuple[int, int, int, bytes, int] | None:
    """One frame at ``pos``: (kind, delta, tag, body, end), or None when it is incomplete."""
    n = len(buf)
    if pos >= n:
        return None
    kind = buf[pos]
    i = pos + 1
    delta = 0
    shift = 0
    while True:
        if i >= n:
            return None
        b = buf[i]
        i += 1
        delta |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
        if shift > 63:
            raise ValueError("timestamp varint too long")
    if i + 5 > n:
        return None
    tag = buf[i]
    (length,) = struct.unpack_from("!I", buf, i + 1)
    if length < 4:
        raise ValueError(f"length {length}")
    end = i + 1 + length
    if end > n:
        return None
    return kind, delta, tag, buf[i + 5 : end], end


def decode(data: bytes) -> Iterator[AnyEvent]:
    """All events of a complete frame stream; an incomplete last frame raises ``RecordingError``."""
    d = Decoder()
    yield from d.feed(data)
    if not d.close():
        raise RecordingError(f"frame stream cut at offset {d.offset}")


__all__ = [
    "FORMAT_VERSION",
    "AnyEvent",
    "Bind",
    "Close",
    "Column",
    "Columns",
    "CommandComplete",
    "CopyData",
    "CopyDone",
    "CopyFail",
    "CopyResponse",
    "Decoder",
    "Describe",
    "EmptyQuery",
    "Error",
    "Event",
    "Execute",
    "FramesLost",
    "FunctionCall",
    "FunctionResult",
    "Header",
    "Notice",
    "Notification",
    "ParameterStatus",
    "Parse",
    "PortalSuspended",
    "Query",
    "Ready",
    "Row",
    "RowsOmitted",
    "Stopped",
    "Sync",
    "Terminate",
    "Undecodable",
    "decode",
]
