"""Rendering a recording as its client saw it, the way psql shows a session.

Rules of this module: ``Renderer`` turns events into text and owns no clock; ``replay`` reads a file
and sleeps between events when asked to replay in real time. What psql writes to stdout (result
tables, command tags, COPY TO STDOUT data, notifications) goes to ``out``; what it writes to stderr
(errors, notices) goes to ``err`` (``out`` by default). Each statement is announced by a prompt line
``=> <statement text>`` (``-> `` for its further lines; the parameters of an extended-protocol
statement follow as ``-- $1 = '...'``), which psql itself would not print from a script.

Tables follow psql's default aligned format: column names centred, ``-+-`` separators, numeric
types (by type oid, as psql's ``column_type_alignment``) right-aligned, other values left-aligned
and not padded in the last column, NULL as the empty string, ``(N rows)`` and a blank line. A value
the recorder cut ends in ``…``; rows the recorder did not keep are counted in a line
``(rows omitted from the recording: N)`` above the footer, and the footer counts them. Not
reproduced: ``\\pset`` and ``\\x`` modes, and error positions in lines longer than psql's
60-character window.

What a session sent or received is shown, never obeyed: the client and the server choose that text,
and a terminal acts on control characters (ESC starts sequences that retitle the window or clear the
screen, CR returns to the start of the line and hides what was printed before it). So, as psql does
in a table, a value's control characters are shown as ``\\r``, ``\\x1B`` (ASCII) or ``\\u009B``
(C1, bidirectional overrides), tabs become spaces, and each further line of a multi-line value
is its own line marked by a ``+`` after the line before it: no line of a value can pass for a
prompt or a command tag. Statement text keeps its lines (each after ``-> ``) with the same escapes;
parameters, notifications and error fields show theirs the same way, a newline in a one-line field
as ``\\n``, further lines of an error field indented under its first. COPY data is shown line by
line as it came, control characters escaped: a line of it is a row the client received.
"""

from __future__ import annotations

import os
import sys
import time
import unicodedata
from collections.abc import Callable
from typing import TextIO

import msgspec

from ostiary.recording import format as f
from ostiary.recording.store import Recording, open_recording

# psql right-aligns these types: int2, int4, int8, float4, float8, numeric, oid, xid, xid8, cid, money.
NUMERIC_OIDS = frozenset({21, 23, 20, 700, 701, 1700, 26, 28, 5069, 29, 790})
_ERROR_WINDOW = 60


# Shown as an escape, never written as itself: besides the control characters (Unicode category
# Cc: C0, DEL, C1), the bidirectional formatting characters, which reorder how text is displayed.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(c: str) -> str:
    if c == "\r":
        return "\\r"
    if c == "\n":
        return "\\n"
    n = ord(c)
    return f"\\x{n:02X}" if n < 0x80 else f"\\u{n:04X}"


def visible(text: str) -> str:
    """``text`` with every character a terminal would act on written out as psql writes it in a
    table (``\\r``, ``\\x1B``, ``\\u009B``; a newline as ``\\n``). Tabs are kept: they move the
    cursor but hide nothing. Callers that show lines split the text at newlines first."""
    if text.isprintable():
        return text
    return "".join(
        _escape(c) if c != "\t" and (c in _BIDI or unicodedata.category(c) == "Cc") else c for c in text
    )


def _value_lines(value: str) -> list[str]:
    """A table cell's display lines, as psql makes them: split at newlines, control characters
    escaped, tabs expanded to the next multiple of 8 columns of the line."""
    out = []
    for line in value.split("\n"):
        line = visible(line)
        if "\t" in line:
            parts: list[str] = []
            w = 0
            for c in line:
                if c == "\t":
                    parts.append(" " * (8 - w % 8))
                    w += 8 - w % 8
                else:
                    parts.append(c)
                    w += _width(c)
            line = "".join(parts)
        out.append(line)
    return out


def _field(label: str, text: str) -> list[str]:
    """An error or notice field: its first line after ``label``, further lines indented under it."""
    lines = visible_lines(text)
    indent = " " * len(label)
    return [label + lines[0], *(indent + line for line in lines[1:])]


def visible_lines(text: str) -> list[str]:
    """``text`` split at newlines, each line as ``visible`` shows it."""
    return [visible(line) for line in text.split("\n")]


def _width(s: str) -> int:
    w = 0
    for c in s:
        if unicodedata.combining(c):
            continue
        w += 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
    return w


def _pad_right(s: str, w: int) -> str:
    return s + " " * (w - _width(s))


def _pad_left(s: str, w: int) -> str:
    return " " * (w - _width(s)) + s


def aligned_table(
    columns: list[f.Column], rows: list[list[str]], omitted: int = 0, right: list[bool] | None = None
) -> list[str]:
    """The lines psql prints for a result (``rows`` already as display text), footer included.
    Values are shown as psql shows them: control characters escaped, and a multi-line value (or
    column name) over several lines, each but the last marked with ``+`` where the space after it
    would be."""
    total = len(rows) + omitted
    footer = "(1 row)" if total == 1 else f"({total} rows)"
    note = [f"(rows omitted from the recording: {omitted})"] if omitted else []
    if not columns:
        return ["--", *note, footer, ""]
    if right is None:
        right = [c.type_oid in NUMERIC_OIDS for c in columns]
    names = [_value_lines(c.name) for c in columns]
    cells = [[_value_lines(v) for v in r] for r in rows]
    widths = [
        max(_width(line) for cell in [names[i], *(r[i] for r in cells)] for line in cell)
        for i in range(len(columns))
    ]
    last = len(columns) - 1
    lines = []
    for k in range(max(len(n) for n in names)):
        header = []
        for n, w in zip(names, widths, strict=True):
            text = n[k] if k < len(n) else ""
            space = w - _width(text)
            header.append(
                " " * (space // 2) + text + " " * ((space + 1) // 2) + ("+" if k + 1 < len(n) else " ")
            )
        lines.append(" " + "| ".join(header))
    lines.append("-" + "-+-".join("-" * w for w in widths) + "-")
    for r in cells:
        for k in range(max(len(v) for v in r)):
            parts = []
            for i, (v, w) in enumerate(zip(r, widths, strict=True)):
                more = k + 1 < len(v)
                if k >= len(v):
                    text = " " * w if i < last else ""
                elif right[i]:
                    text = _pad_left(v[k], w)
                elif i < last or more:
                    text = _pad_right(v[k], w)
                else:
                    text = v[k]
                parts.append(text + ("+" if more else " " if i < last else ""))
            lines.append(" " + "| ".join(parts))
    return [*lines, *note, footer, ""]


def _error_lines(ev: f.Error | f.Notice, query: str | None, show_context: bool) -> list[str]:
    lines = _field(f"{visible(ev.severity)}:  ", ev.message)
    if ev.position is not None and query:
        lines += _position_lines(query, ev.position)
    if ev.detail is not None:
        lines += _field("DETAIL:  ", ev.detail)
    if ev.hint is not None:
        lines += _field("HINT:  ", ev.hint)
    if show_context and ev.context is not None:
        lines += _field("CONTEXT:  ", ev.context)
    return lines


def _position_lines(query: str, position: int) -> list[str]:
    """psql's ``LINE n: ...`` and caret for a short line (positions count characters from 1)."""
    if position < 1 or position > len(query) + 1:
        return []
    before = query[: position - 1]
    number = before.count("\n") + 1
    start = before.rfind("\n") + 1
    end = query.find("\n", start)
    line = query[start : end if end >= 0 else len(query)].rstrip("\r")
    if _width(line) > _ERROR_WINDOW or "\t" in line:
        return []
    prefix = f"LINE {number}: "
    return [
        prefix + visible(line),
        " " * (_width(prefix) + _width(visible(query[start : position - 1]))) + "^",
    ]


class Renderer:
    """Turns events into psql's output. ``write(stream, text)`` receives whole lines (with their
    newline) and ``stream`` is ``"out"`` or ``"err"``."""

    def __init__(self, write: Callable[[str, str], None], *, prompts: bool = True) -> None:
        self._write = write
        self._prompts = prompts
        self._statements: dict[str, str] = {}
        self._portals: dict[str, tuple[str, list[str | None]]] = {}
        self._announced: set[str] = set()
        self._query: str | None = None
        self._columns: list[f.Column] | None = None
        self._rows: list[list[str]] = []
        self._omitted = 0
        self._copy_out = False

    def _out(self, lines: list[str]) -> None:
        if lines:
            self._write("out", "".join(line + "\n" for line in lines))

    def _err(self, lines: list[str]) -> None:
        if lines:
            self._write("err", "".join(line + "\n" for line in lines))

    def _prompt(self, text: str, params: list[str | None] | None = None) -> None:
        self._query = text
        if not self._prompts:
            return
        lines = visible_lines(text)
        out = ["=> " + lines[0], *("-> " + line for line in lines[1:])]
        if params:
            shown = ", ".join(
                f"${i} = NULL" if p is None else f"${i} = '{visible(p)}'" for i, p in enumerate(params, 1)
            )
            out.append(f"-- {shown}")
        self._out(out)

    def _flush_table(self) -> None:
        if self._columns is not None:
            self._out(aligned_table(self._columns, self._rows, self._omitted))
        self._columns = None
        self._rows = []
        self._omitted = 0

    def event(self, ev: f.AnyEvent) -> None:
        if isinstance(ev, f.Query):
            self._prompt(ev.text)
        elif isinstance(ev, f.Parse):
            self._statements[ev.name] = ev.text
        elif isinstance(ev, f.Bind):
            text = self._statements.get(ev.statement, f"-- prepared statement {ev.statement!r}")
            self._portals[ev.portal] = (text, ev.params)
            self._announced.discard(ev.portal)
        elif isinstance(ev, f.Execute):
            if ev.portal not in self._announced:
                self._announced.add(ev.portal)
                text, params = self._portals.get(ev.portal, (f"-- portal {ev.portal!r}", []))
                self._prompt(text, params)
        elif isinstance(ev, f.FunctionCall):
            args = ", ".join("NULL" if a is None else f"'{visible(a)}'" for a in ev.args)
            self._prompt(f"-- function call {ev.oid}({args})")
        elif isinstance(ev, f.Columns):
            self._flush_table()
            self._columns = ev.columns
        elif isinstance(ev, f.Row):
            cut = set(ev.truncated)
            self._rows.append(
                [("" if v is None else v) + ("…" if i in cut else "") for i, v in enumerate(ev.values)]
            )
        elif isinstance(ev, f.RowsOmitted):
            if self._columns is not None:
                self._omitted += ev.count
            else:
                self._out([f"(rows omitted from the recording: {ev.count})"])
        elif isinstance(ev, f.CommandComplete):
            if self._columns is not None:
                self._flush_table()
            else:
                self._out([visible(ev.tag)])
            self._copy_out = False
        elif isinstance(ev, f.PortalSuspended):
            self._flush_table()
        elif isinstance(ev, f.Error):
            # psql shows no part of a result that ended in an error.
            self._columns = None
            self._rows = []
            self._omitted = 0
            self._copy_out = False
            self._err(_error_lines(ev, self._query, show_context=True))
        elif isinstance(ev, f.Notice):
            self._err(_error_lines(ev, self._query, show_context=False))
        elif isinstance(ev, f.CopyResponse):
            self._copy_out = ev.direction == "out"
        elif isinstance(ev, f.CopyData):
            if ev.sender == "server" and self._copy_out:
                self._write("out", "\n".join(visible_lines(ev.data)))
        elif isinstance(ev, f.Notification):
            payload = f' with payload "{visible(ev.payload)}"' if ev.payload else ""
            channel = visible(ev.channel)
            self._out(
                [
                    f'Asynchronous notification "{channel}"{payload} received from server process '
                    f"with PID {ev.pid}."
                ]
            )
        elif isinstance(ev, f.FramesLost):
            self._err([f"(frames lost from the recording: {ev.count})"])
        elif isinstance(ev, f.Undecodable):
            self._err([f"(undecodable message from the {ev.sender}: {visible(ev.reason)})"])
        elif isinstance(ev, f.Stopped):
            self._err([f"(recording stopped: {visible(ev.reason)})"])

    def finish(self) -> None:
        """Shows a result the recording ends in the middle of."""
        self._flush_table()


def _event_json(ev: f.AnyEvent) -> str:
    return msgspec.json.encode(ev).decode()


def replay(
    path: str | os.PathLike[str],
    realtime: bool = False,
    speed: float = 1.0,
    out: TextIO = sys.stdout,
    *,
    err: TextIO | None = None,
    json: bool = False,
    prompts: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> Recording:
    """Renders the recording at ``path`` to ``out`` (errors and notices to ``err``, default
    ``out``); with ``realtime``, sleeps between events as recorded, divided by ``speed``. ``json``
    prints one JSON object per event instead (the first one, ``"event": "recording"``, is the
    header). Returns the recording (``.cut`` tells whether the file ended inside a block or without
    its trailer)."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    rec = open_recording(path)
    streams = {"out": out, "err": err or out}

    def write(stream: str, text: str) -> None:
        s = streams[stream]
        s.write(text)
        if realtime:
            s.flush()

    renderer = Renderer(write, prompts=prompts)
    if json:
        head = {"event": "recording", **msgspec.to_builtins(rec.header)}
        out.write(msgspec.json.encode(head).decode() + "\n")
    previous: int | None = None
    for ev in rec.events():
        if realtime and previous is not None and ev.at_us > previous:
            sleep((ev.at_us - previous) / 1e6 / speed)
        previous = ev.at_us
        if json:
            write("out", _event_json(ev) + "\n")
        else:
            renderer.event(ev)
    if not json:
        renderer.finish()
        if rec.cut:
            write("err", "(the recording ends here: its file was cut short, or is still being written)\n")
    elif rec.cut:
        write("out", msgspec.json.encode({"event": "cut"}).decode() + "\n")
    return rec
