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
reproduced: psql's wrapping of multi-line values (``+`` markers), ``\\pset`` and ``\\x`` modes,
and error positions in lines longer than psql's 60-character window.
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
    """The lines psql prints for a result (``rows`` already as display text), footer included."""
    total = len(rows) + omitted
    footer = "(1 row)" if total == 1 else f"({total} rows)"
    note = [f"(rows omitted from the recording: {omitted})"] if omitted else []
    if not columns:
        return ["--", *note, footer, ""]
    if right is None:
        right = [c.type_oid in NUMERIC_OIDS for c in columns]
    names = [c.name for c in columns]
    widths = [max([_width(n)] + [_width(r[i]) for r in rows]) for i, n in enumerate(names)]
    header = []
    for n, w in zip(names, widths, strict=True):
        space = w - _width(n)
        header.append(" " * (space // 2) + n + " " * ((space + 1) // 2))
    lines = [" " + " | ".join(header) + " ", "-" + "-+-".join("-" * w for w in widths) + "-"]
    last = len(columns) - 1
    for r in rows:
        cells = []
        for i, (v, w) in enumerate(zip(r, widths, strict=True)):
            if right[i]:
                cells.append(_pad_left(v, w))
            elif i == last:
                cells.append(v)
            else:
                cells.append(_pad_right(v, w))
        lines.append(" " + " | ".join(cells))
    return [*lines, *note, footer, ""]


def _error_lines(ev: f.Error | f.Notice, query: str | None, show_context: bool) -> list[str]:
    lines = [f"{ev.severity}:  {ev.message}"]
    if ev.position is not None and query:
        lines += _position_lines(query, ev.position)
    if ev.detail is not None:
        lines.append(f"DETAIL:  {ev.detail}")
    if ev.hint is not None:
        lines.append(f"HINT:  {ev.hint}")
    if show_context and ev.context is not None:
        lines.append(f"CONTEXT:  {ev.context}")
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
    return [prefix + line, " " * (_width(prefix) + _width(query[start : position - 1])) + "^"]


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
        lines = text.split("\n") or [""]
        out = ["=> " + lines[0], *("-> " + line for line in lines[1:])]
        if params:
            shown = ", ".join(
                f"${i} = NULL" if p is None else f"${i} = '{p}'" for i, p in enumerate(params, 1)
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
            args = ", ".join("NULL" if a is None else f"'{a}'" for a in ev.args)
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
                self._out([ev.tag])
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
                self._write("out", ev.data)
        elif isinstance(ev, f.Notification):
            payload = f' with payload "{ev.payload}"' if ev.payload else ""
            self._out(
                [
                    f'Asynchronous notification "{ev.channel}"{payload} received from server process '
                    f"with PID {ev.pid}."
                ]
            )
        elif isinstance(ev, f.FramesLost):
            self._err([f"(frames lost from the recording: {ev.count})"])
        elif isinstance(ev, f.Undecodable):
            self._err([f"(undecodable message from the {ev.sender}: {ev.reason})"])
        elif isinstance(ev, f.Stopped):
            self._err([f"(recording stopped: {ev.reason})"])

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
