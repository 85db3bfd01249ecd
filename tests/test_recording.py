"""Session recordings end to end: psql through a recording relay, the file, and its replay.

The relay here is test-only (the gateway's data path will feed the same ``_core.Recorder``): a
thread per direction forwards bytes between psql and the test cluster without TLS, and from the
first ReadyForQuery on feeds each chunk to the recorder, taking its frames after every chunk (so a
recording has many blocks). The key property: the replay prints exactly what psql printed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from conftest import APP_PASSWORD
from ostiary import _core
from ostiary.devcluster import PgCluster, find_pg_bin
from ostiary.errors import RecordingError
from ostiary.recording import format as fmt
from ostiary.recording import store
from ostiary.recording.render import replay
from ostiary.recording.store import (
    RecordingHeader,
    RecordingWriter,
    list_recordings,
    open_recording,
    recording_path,
)


def _after_first_ready(buf: bytes) -> int | None:
    """The offset just after the first ReadyForQuery in server bytes of the startup phase."""
    pos = 0
    while pos + 5 <= len(buf):
        tag = buf[pos]
        (length,) = struct.unpack_from("!i", buf, pos + 1)
        end = pos + 1 + length
        if end > len(buf):
            return None
        if tag == ord("Z"):
            return end
        pos = end
    return None


class RecordingRelay:
    """Accepts one client, connects it to ``upstream`` and records the session after startup."""

    def __init__(self, upstream_port: int, recorder: _core.Recorder) -> None:
        self.recorder = recorder
        self.blocks: list[bytes] = []
        self._upstream_port = upstream_port
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        client, _ = self._listener.accept()
        self._listener.close()
        upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
        pumps = [
            threading.Thread(target=self._pump, args=(client, upstream, True)),
            threading.Thread(target=self._pump, args=(upstream, client, False)),
        ]
        for t in pumps:
            t.start()
        for t in pumps:
            t.join()
        client.close()
        upstream.close()

    def _feed(self, from_client: bool, data: bytes) -> None:
        with self._lock:
            now_us = time.monotonic_ns() // 1000
            if from_client:
                self.recorder.frontend(data, now_us)
            else:
                self.recorder.backend(data, now_us)
            block = self.recorder.take()
            if block:
                self.blocks.append(block)

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        startup = b""
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            if self._started.is_set():
                self._feed(from_client, data)
            elif not from_client:
                # The client sends nothing after its password until it has this ReadyForQuery, so
                # setting the flag before forwarding it splits the client's bytes correctly too.
                startup += data
                end = _after_first_ready(startup)
                if end is not None:
                    self._started.set()
                    if end < len(startup):
                        self._feed(False, startup[end:])
            dst.sendall(data)

    def join(self) -> None:
        self._thread.join(30)
        assert not self._thread.is_alive()


STATEMENTS = [
    "create table rec_t(id int primary key, name text, score numeric, note text)",
    "insert into rec_t values (1,'one',1.5,null),(2,'two',-20.25,'x'),(10,'ten',3,'a longer note')",
    "select * from rec_t order by id",
    "select 1 as a, 'b' as \"B\"; select count(*) from rec_t",
    "select 1/0",
    "do $$ begin raise notice 'hello %', 42; end $$",
    "insert into rec_t values (1,'dup',0,null)",
    "selec 1",
    "select * from rec_t where false",
    "insert into rec_t values (11, 'eleven', 0, 'n')",
    "select 'ünïcödé' as wide, 42::int8 as big, 2.5::float8 as f, true as t",
    "drop table rec_t",
]


def record_psql(
    pg: PgCluster, statements: list[str], path: Path, recorder: _core.Recorder
) -> subprocess.CompletedProcess[str]:
    relay = RecordingRelay(pg.port, recorder)
    env = pg.psql_env(dbname="app", user="app", password=APP_PASSWORD, sslmode="disable")
    env.update(PGPORT=str(relay.port), PGGSSENCMODE="disable")
    args = [find_pg_bin("psql"), "-X"]
    for s in statements:
        args += ["-c", s]
    started = dt.datetime.now(dt.UTC)
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    relay.join()
    header = RecordingHeader(
        session_ref=path.stem,
        started=started,
        identity="ci",
        connection="app",
        grant="test-grant",
        peer="127.0.0.1",
    )
    with RecordingWriter(path, header) as writer:
        for block in relay.blocks:
            writer.append(block)
        writer.close("client closed")
    return result


@pytest.fixture(scope="module")
def session(pg: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One recorded psql session: (recording file, psql's stdout, psql's stderr)."""
    data_dir = tmp_path_factory.mktemp("data")
    path = recording_path(data_dir, "3f2a9c1d-17", dt.datetime.now(dt.UTC))
    r = record_psql(pg, STATEMENTS, path, _core.Recorder(1000, 4096, 1 << 20))
    assert r.returncode == 0, r.stderr
    return path, r.stdout, r.stderr


def test_replay_equals_what_the_client_received(session: tuple[Path, str, str]) -> None:
    path, stdout, stderr = session
    out, err = io.StringIO(), io.StringIO()
    rec = replay(path, out=out, err=err, prompts=False)
    assert not rec.cut
    # Nothing is normalised: psql's stdout and stderr are compared byte for byte with the replay's
    # two streams (the relay used no TLS and psql ran with -X, so no psqlrc changes the format).
    assert out.getvalue() == stdout
    assert err.getvalue() == stderr
    assert "(3 rows)" in stdout and "DETAIL:  Key (id)=(1) already exists." in stderr


def test_replay_announces_each_statement(session: tuple[Path, str, str]) -> None:
    path, _, _ = session
    out = io.StringIO()
    replay(path, out=out)
    text = out.getvalue()
    for s in STATEMENTS:
        assert f"=> {s}\n" in text
    assert text.index("=> select 1/0\n") < text.index("ERROR:  division by zero") < text.index("=> do $$")


def test_events_and_header(session: tuple[Path, str, str]) -> None:
    path, _, _ = session
    rec = open_recording(path)
    assert (rec.header.session_ref, rec.header.identity, rec.header.grant) == (
        "3f2a9c1d-17",
        "ci",
        "test-grant",
    )
    events = list(rec.events())
    assert rec.trailer is not None and rec.trailer.ended_reason == "client closed"
    assert rec.trailer.statements == len(STATEMENTS)
    assert isinstance(events[0], fmt.Header) and events[0].max_rows == 1000
    queries = [e.text for e in events if isinstance(e, fmt.Query)]
    assert queries == STATEMENTS
    rows = [e.values for e in events if isinstance(e, fmt.Row)]
    assert ["1", "one", "1.5", None] in rows
    errors = [(e.code, e.message) for e in events if isinstance(e, fmt.Error)]
    assert ("22012", "division by zero") in errors
    assert any(isinstance(e, fmt.Notice) and e.message == "hello 42" for e in events)
    assert isinstance(events[-1], fmt.Terminate)
    times = [e.at_us for e in events]
    assert times == sorted(times)


def test_json_replay_is_one_object_per_event(session: tuple[Path, str, str]) -> None:
    path, _, _ = session
    out = io.StringIO()
    replay(path, out=out, json=True)
    objects = [json.loads(line) for line in out.getvalue().splitlines()]
    assert objects[0]["event"] == "recording" and objects[0]["session_ref"] == "3f2a9c1d-17"
    assert objects[1]["event"] == "header"
    assert {"event": "command_complete", "tag": "INSERT 0 1"} in [
        {k: v for k, v in o.items() if k != "at_us"} for o in objects
    ]


def test_realtime_replay_sleeps_as_recorded(session: tuple[Path, str, str]) -> None:
    path, _, _ = session
    events = list(open_recording(path).events())
    slept: list[float] = []
    replay(path, realtime=True, speed=4.0, out=io.StringIO(), sleep=slept.append)
    span = (events[-1].at_us - events[0].at_us) / 1e6
    assert sum(slept) == pytest.approx(span / 4.0)


def test_row_cap(pg: PgCluster, tmp_path: Path) -> None:
    path = tmp_path / "cap-1.rec"
    r = record_psql(
        pg,
        ["select g as n, 'row ' || g as label from generate_series(1, 1000) g"],
        path,
        _core.Recorder(10, 4096, 1 << 20),
    )
    assert r.returncode == 0, r.stderr
    out = io.StringIO()
    replay(path, out=out, prompts=False)
    lines = out.getvalue().splitlines()

    # The first ten rows as psql printed them, then the omission and footer. Only the column widths
    # differ (psql sized them by all 1000 rows, the replay by the ten it has): compare cells.
    def cells(lines: list[str]) -> list[list[str]]:
        return [[c.strip() for c in line.split("|")] for line in lines]

    assert cells([lines[0], *lines[2:12]]) == cells([r.stdout.splitlines()[0], *r.stdout.splitlines()[2:12]])
    assert lines[12:] == ["(rows omitted from the recording: 990)", "(1000 rows)", ""]
    events = list(open_recording(path).events())
    assert sum(isinstance(e, fmt.Row) for e in events) == 10
    assert [e.count for e in events if isinstance(e, fmt.RowsOmitted)] == [990]


def test_long_values_are_cut_and_marked(pg: PgCluster, tmp_path: Path) -> None:
    path = tmp_path / "cut-1.rec"
    r = record_psql(
        pg, ["select repeat('x', 100) as long, 'short' as s"], path, _core.Recorder(10, 8, 1 << 20)
    )
    assert r.returncode == 0, r.stderr
    out = io.StringIO()
    replay(path, out=out, prompts=False)
    assert " xxxxxxxx… | short\n" in out.getvalue()
    rows = [e for e in open_recording(path).events() if isinstance(e, fmt.Row)]
    assert rows[0].values == ["x" * 8, "short"] and rows[0].truncated == [0]


def test_a_file_cut_short_replays_up_to_the_cut(session: tuple[Path, str, str], tmp_path: Path) -> None:
    path, _, _ = session
    full = list(open_recording(path).events())
    data = path.read_bytes()
    # Also exactly between two blocks: every block complete, but no trailer.
    with open(path, "rb") as f:
        store._read_header(f, path)
        offsets = [offset for offset, _, _ in store._blocks(f, path, payloads=False)]
    assert len(offsets) > 2
    between = offsets[len(offsets) // 2]
    for cut_at in (len(data) - 3, len(data) * 2 // 3, len(data) // 3, between):
        cut = tmp_path / f"cut-{cut_at}.rec"
        cut.write_bytes(data[:cut_at])
        rec = open_recording(cut)
        events = list(rec.events())
        assert events == full[: len(events)]
        assert len(events) > 1
        out = io.StringIO()
        replay(cut, out=out)
        if cut_at == len(data) - 3:
            assert rec.trailer is None and len(events) == len(full)
        else:
            assert rec.cut and "cut short" in out.getvalue()


def test_garbage_raises_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.rec"
    bad.write_bytes(b"\x00garbage that is not a recording")
    with pytest.raises(RecordingError, match="not an ostiary recording"):
        open_recording(bad)
    header = RecordingHeader(session_ref="bad-2", started=dt.datetime.now(dt.UTC))
    path = tmp_path / "bad-2.rec"
    w = RecordingWriter(path, header)
    w.append(_core_frames())
    good = path.read_bytes()
    w.close("done")
    path.write_bytes(path.read_bytes() + b"more")
    with pytest.raises(RecordingError, match=r"bytes after the trailer at offset \d+"):
        list(open_recording(path).events())
    # A block that does not decompress.
    path.write_bytes(good + b"D" + struct.pack("!I", 7) + b"garbage")
    with pytest.raises(RecordingError, match=r"block at offset \d+ does not decompress"):
        list(open_recording(path).events())
    # A block whose frames do not decode: the offset in the frame stream is named.
    frames = _core_frames()
    path.write_bytes(good + b"D" + struct.pack("!I", len(z := zlib.compress(b"B\x05x\x00\x00\x00\x02"))) + z)
    with pytest.raises(RecordingError, match=r"offset \d+: length 2"):
        list(open_recording(path).events())
    with pytest.raises(RecordingError, match="offset 0"):
        list(fmt.decode(b"R\x00Q\x00\x00\x00\x04"))
    with pytest.raises(RecordingError, match="cut at offset"):
        list(fmt.decode(frames[:-1]))


def _core_frames() -> bytes:
    r = _core.Recorder(10, 100, 1 << 20)
    r.frontend(b"Q\x00\x00\x00\x0dselect 1\x00", 1)
    return r.take()


def test_a_malformed_message_is_an_event_not_a_broken_file() -> None:
    r = _core.Recorder()
    r.frontend(b"Q\x00\x00\x00\x08abcd", 1)  # no NUL terminator: PostgreSQL refuses it too
    r.frontend(b"Q\x00\x00\x00\x0dselect 1\x00", 2)
    events = list(fmt.decode(r.take()))
    assert isinstance(events[1], fmt.Undecodable) and events[1].sender == "client"
    assert "Query" in events[1].reason
    assert isinstance(events[2], fmt.Query) and events[2].text == "select 1"


def test_a_function_call_decodes_with_its_arguments() -> None:
    """A fast-path FunctionCall (libpq's lo_* calls, or set_config by oid) replays as itself; its
    last field, the result's format code, was once taken for trailing garbage."""
    body = struct.pack("!IhhH", 2078, 1, 0, 3)
    for arg in (b"work_mem", b"64MB", b"false"):
        body += struct.pack("!i", len(arg)) + arg
    body += struct.pack("!h", 0)
    r = _core.Recorder()
    r.frontend(b"F" + struct.pack("!i", len(body) + 4) + body, 1)
    events = list(fmt.decode(r.take()))
    call = events[1]
    assert isinstance(call, fmt.FunctionCall), call
    assert call.oid == 2078 and call.args == ["work_mem", "64MB", "false"]


def test_recorder_reports_malformed_input() -> None:
    r = _core.Recorder()
    with pytest.raises(_core.ProtocolError):
        r.backend(b"D\x00\x00\x00\x02", 1)
    r.backend(b"Z\x00\x00\x00\x05I", 2)
    events = list(fmt.decode(r.take()))
    assert isinstance(events[-1], fmt.Stopped) and "length" in events[-1].reason


def test_list_and_replay_from_the_command_line(session: tuple[Path, str, str]) -> None:
    path, stdout, _ = session
    data_dir = path.parent.parent.parent
    base = [sys.executable, "-m", "ostiary.cli", "sessions"]
    r = subprocess.run([*base, "list", "--data-dir", str(data_dir), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    listed = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["session_ref"] for x in listed] == ["3f2a9c1d-17"]
    assert listed[0]["statements"] == len(STATEMENTS) and listed[0]["identity"] == "ci"
    r = subprocess.run([*base, "list", "--data-dir", str(data_dir)], capture_output=True, text=True)
    assert r.returncode == 0 and "3f2a9c1d-17" in r.stdout and "session_ref" in r.stdout
    r = subprocess.run(
        [*base, "replay", "3f2a9c1d-17", "--data-dir", str(data_dir), "--json"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["text"] for e in events if e["event"] == "query"] == STATEMENTS
    r = subprocess.run(
        [*base, "replay", "3f2a9c1d-17", "--data-dir", str(data_dir)], capture_output=True, text=True
    )
    assert r.returncode == 0 and stdout.splitlines()[2] in r.stdout
    r = subprocess.run(
        [*base, "replay", "nope-1", "--data-dir", str(data_dir)], capture_output=True, text=True
    )
    assert r.returncode == 1 and "no recording 'nope-1'" in r.stderr
    assert list_recordings(data_dir, identity="someone-else") == []


# Values a client or server can choose: control characters a terminal would act on (a CSI that
# clears the screen, an OSC that retitles the window, a CR hiding what came before, a C1 CSI), tabs,
# and multi-line values whose lines imitate a result footer, a prompt and a command tag.
HOSTILE = [
    "select 'x' || chr(10) || '(1 row)' || chr(10) || chr(10) || '=> drop table t;' || chr(10)"
    " || 'DROP TABLE' as v",
    "select chr(27) || '[2J' || chr(27) || ']0;evil' || chr(7) as clear_screen, 'drop everything'"
    " || chr(13) || 'select 1' as cr, chr(155) || '31m' || chr(127) as c1",
    "select 'a' || chr(10) || 'bbb' as x, 12 as n, E'tab\\there' || chr(10) || 'y' as t, null as z",
    'select 1 as "two\nlines", \'q\' as "e\x1bsc"',
    "select n, case when n = 2 then 'p' || chr(10) || 'q' end as w from generate_series(1, 3) n",
]


def test_hostile_values_replay_as_psql_shows_them(pg: PgCluster, tmp_path: Path) -> None:
    path = tmp_path / "hostile.rec"
    r = record_psql(pg, HOSTILE, path, _core.Recorder(1000, 4096, 1 << 20))
    assert r.returncode == 0, r.stderr
    out = io.StringIO()
    replay(path, out=out, prompts=False)
    # psql escapes control characters and marks continuation lines with "+": byte for byte the same.
    assert out.getvalue() == r.stdout
    assert "\\x1B[2J" in r.stdout and "drop everything\\rselect 1" in r.stdout
    with_prompts = io.StringIO()
    replay(path, out=with_prompts)
    text = with_prompts.getvalue()
    lines = text.splitlines()
    assert "=> drop table t;" not in lines and "DROP TABLE" not in lines
    assert not any(c in text for c in "\x1b\r\x07\x7f\x9b")
    assert '-> lines", \'q\' as "e\\x1Bsc"' in lines


def test_text_a_session_chose_is_shown_not_obeyed() -> None:
    # Parameters, notifications, COPY data, error fields and command tags come from the client or
    # the server too: their control characters are escaped, and their lines cannot pass for a
    # prompt (one-line fields show a newline as \n; further lines of an error field are indented).
    from ostiary.recording.render import Renderer

    written: list[str] = []
    r = Renderer(lambda _stream, text: written.append(text))
    events: list[fmt.AnyEvent] = [
        fmt.Parse(at_us=0, name="s", text="select $1 /*\r=> select 1; */"),
        fmt.Bind(at_us=0, portal="", statement="s", params=["a'\n=> drop table t;\nDROP TABLE", None]),
        fmt.Execute(at_us=0, portal=""),
        fmt.CommandComplete(at_us=0, tag="SELECT 0\x1b[2J"),
        fmt.Notice(at_us=0, severity="NOTICE", code="00000", message="x\n=> drop table t;\x07"),
        fmt.Error(at_us=0, severity="ERROR", code="P0001", message="m", detail="d\nDROP TABLE\x1b]0;t\x07"),
        fmt.Notification(at_us=0, pid=7, channel="c\x1b[2J", payload="p\n=> drop table t;"),
        fmt.Query(at_us=0, text="copy t to stdout"),
        fmt.CopyResponse(at_us=0, direction="out", format=0),
        fmt.CopyData(at_us=0, sender="server", data="1\t\x1b]0;evil\x07\r\n"),
        fmt.CommandComplete(at_us=0, tag="COPY 1"),
    ]
    for ev in events:
        r.event(ev)
    text = "".join(written)
    assert not any(c in text for c in "\x1b\r\x07")
    lines = text.splitlines()
    assert "=> select $1 /*\\r=> select 1; */" in lines
    assert "-- $1 = 'a'\\n=> drop table t;\\nDROP TABLE', $2 = NULL" in lines
    assert "SELECT 0\\x1B[2J" in lines
    assert lines[lines.index("NOTICE:  x") + 1] == "         => drop table t;\\x07"
    assert lines[lines.index("DETAIL:  d") + 1] == "         DROP TABLE\\x1B]0;t\\x07"
    assert 'Asynchronous notification "c\\x1B[2J" with payload "p\\n=> drop table t;"' in text
    assert "1\t\\x1B]0;evil\\x07\\r" in lines
    assert not any(line.startswith(("=> drop", "DROP TABLE")) for line in lines)
