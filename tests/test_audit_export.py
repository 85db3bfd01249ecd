"""SIEM export of the audit trail against real receivers on 127.0.0.1: a JSON-lines file, a Splunk
HEC and an Elastic _bulk endpoint (stdlib HTTP servers in threads) and syslog over TCP and TLS (RFC
5424, octet-counted). Receivers go down and come back while records keep arriving in the store;
every record must arrive (duplicates allowed, dropped by the stable id ``<writer>:<seq>``)."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from ostiary import cli, config
from ostiary.audit.export import Exporter, build_exporters, cursor_path
from ostiary.audit.ocsf import event_id, to_ocsf
from ostiary.audit.records import KINDS, Chain, Sealed
from ostiary.audit.store import SqliteStore
from ostiary.errors import ConfigError

TOKEN = "hec-token-1234"


def base(**extra: Any) -> dict[str, Any]:
    """A valid file (one connection, one grant) plus ``extra`` top-level keys."""
    return {
        "clients": [{"user": "ci", "password": "x"}],
        "connections": [
            {"name": "app", "upstream": {"host": "db", "database": "app", "user": "u", "password_env": "P"}}
        ],
        "grants": [{"name": "ci-app", "identities": ["ci"], "connection": "app"}],
        **extra,
    }


# -- the store ----------------------------------------------------------------------------------------


def sample(chain: Chain, i: int) -> Sealed:
    """A record of every kind in turn, some denied."""
    kind = KINDS[i % len(KINDS)]
    deny = i % 7 == 3
    data: dict[str, Any] = {"n": i}
    if kind in ("auth", "session_start"):
        data["peer"] = "10.1.2.3:54321"
        data["user"] = "ci"
        data["method"] = "token"
    if kind == "statement":
        data.update(seq=i, type="Query", text=f"SELECT {i}")
        if deny:
            data["denied"] = {"code": "42501", "message": "writes are not granted"}
    if kind == "admin":
        data["action"] = "reload"
    return chain.seal(
        kind,
        1_700_000_000_000_000 + i * 1000,
        session="abcd0123-1" if kind in ("session_start", "statement", "result", "session_end") else "",
        identity="repo:acme/shop",
        connection="app",
        verdict="deny" if deny else "allow",
        rule="shop-reads-app",
        data=data,
    )


class Trail:
    def __init__(self, path: Path) -> None:
        self.store = SqliteStore(path / "audit.db")
        self.chain = Chain("0123456789abcdef")
        self.ids: list[str] = []

    def add(self, n: int) -> None:
        rows = [sample(self.chain, self.chain.seq + 1) for _ in range(n)]
        self.store.append(rows)
        self.ids += [event_id(r) for r in rows]


@pytest.fixture
def trail(tmp_path: Path) -> Trail:
    return Trail(tmp_path)


def exporter(tmp_path: Path, store: SqliteStore, **kw: Any) -> Exporter:
    kw.setdefault("interval", 0.02)
    kw.setdefault("timeout", 2.0)
    cfg = config.parse(base(data_dir=str(tmp_path / "data"), audit={"exporters": [kw]}), "t", tmp_path)
    (exp,) = build_exporters(cfg, store)
    exp.max_backoff = 0.2
    return exp


async def run_until(exps: list[Exporter], done: Callable[[], bool], timeout: float = 20.0) -> None:
    """Runs the exporters as the gateway does until ``done()``; fails after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            for e in exps:
                await nursery.start(e.run)
            while not done():
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- (a) JSON lines -----------------------------------------------------------------------------------


def test_jsonl_file_every_record_once_and_restart_continues(tmp_path: Path, trail: Trail) -> None:
    out = tmp_path / "out" / "audit.jsonl"
    trail.add(1234)
    exp = exporter(tmp_path, trail.store, name="file", kind="jsonl", path=str(out), batch=100)
    assert trio.run(exp.drain) == 1234
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [e["metadata"]["uid"] for e in lines] == trail.ids
    saved = json.loads(cursor_path(tmp_path / "data", "file").read_text())
    assert saved == {"after": 1234, "store": trail.store.description}

    # A new process (a new exporter) continues after the cursor: no duplicates.
    trail.add(66)
    again = exporter(tmp_path, trail.store, name="file", kind="jsonl", path=str(out), format="raw")
    assert trio.run(again.drain) == 66
    lines = out.read_text().splitlines()
    assert len(lines) == 1300
    raw = [json.loads(x) for x in lines[1234:]]
    assert [f"{r['writer']}:{r['seq']}" for r in raw] == trail.ids[1234:]
    assert raw[0]["id"] == 1235 and "hash" in raw[0] and "data" in raw[0]


def test_jsonl_kinds_filter_and_torn_line(tmp_path: Path, trail: Trail) -> None:
    out = tmp_path / "audit.jsonl"
    out.write_bytes(b'{"torn": ')  # a line a crash left unfinished
    trail.add(50)
    exp = exporter(tmp_path, trail.store, name="auth-only", kind="jsonl", path=str(out), kinds=["auth"])
    assert trio.run(exp.drain) == 50
    lines = out.read_text().splitlines()
    assert lines[0] == '{"torn": '
    events = [json.loads(x) for x in lines[1:]]
    assert events and {e["class_uid"] for e in events} == {3002}
    assert len(events) == sum(1 for i in range(1, 51) if KINDS[i % len(KINDS)] == "auth")


def test_cli_export_once(tmp_path: Path, trail: Trail, capsys: pytest.CaptureFixture[str]) -> None:
    trail.add(20)
    trail.store.close()
    cfg = tmp_path / "ostiary.yaml"
    data = base(
        data_dir=str(tmp_path / "data"),
        audit={
            "path": str(tmp_path / "audit.db"),
            "exporters": [{"name": "out", "kind": "jsonl", "path": "out.jsonl"}],
        },
    )
    cfg.write_text(json.dumps(data))  # JSON is YAML
    assert cli.main(["audit", "export", "--config", str(cfg), "--once"]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 20
    assert "out: 20 record(s) delivered" in capsys.readouterr().err
    assert cli.main(["audit", "export", "--config", str(cfg), "--once", "--name", "nope"]) == 2


# -- HTTP receivers -----------------------------------------------------------------------------------


class Receiver:
    """A stdlib HTTP server in a thread, started and stopped on a fixed port. ``answer`` handles a
    POST: (path, headers, body) -> (status, body)."""

    def __init__(self, answer: Callable[[str, Any, bytes], tuple[int, bytes]]) -> None:
        self.port = free_port()
        self.answer = answer
        self.requests = 0
        self._server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests += 1
                status, data = outer.answer(self.path, self.headers, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def split_json(body: bytes) -> list[dict[str, Any]]:
    """HEC's batch format: JSON objects one after the other."""
    dec = json.JSONDecoder()
    text, pos, out = body.decode(), 0, []
    while pos < len(text):
        obj, pos = dec.raw_decode(text, pos)
        out.append(obj)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


# -- (b) Splunk HEC -----------------------------------------------------------------------------------


def test_splunk_hec_down_then_503_then_up_loses_nothing(tmp_path: Path, trail: Trail) -> None:
    received: list[dict[str, Any]] = []
    unavailable = {"left": 4}
    bad_auth: list[str] = []

    def answer(path: str, headers: Any, body: bytes) -> tuple[int, bytes]:
        if headers["Authorization"] != f"Splunk {TOKEN}" or path != "/services/collector/event":
            bad_auth.append(str(headers["Authorization"]))
            return 401, b'{"text":"Invalid token","code":4}'
        if unavailable["left"] > 0:
            unavailable["left"] -= 1
            return 503, b'{"text":"Server is busy","code":9}'
        received.extend(split_json(body))
        return 200, b'{"text":"Success","code":0}'

    hec = Receiver(answer)
    (tmp_path / "hec.token").write_text(TOKEN + "\n")
    trail.add(900)
    exp = exporter(
        tmp_path,
        trail.store,
        name="splunk",
        kind="splunk_hec",
        url=f"http://127.0.0.1:{hec.port}/services/collector/event",
        token_file="hec.token",
        index="security",
        batch=200,
    )

    def ids() -> set[str]:
        return {e["fields"]["id"] for e in received}

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            await trio.sleep(0.5)  # port closed: connection refused, retried
            assert not received and exp._down is not None
            await trio.to_thread.run_sync(hec.up)  # then 503 four times, then 200
            with trio.fail_after(20):
                while len(ids()) < 900:
                    await trio.sleep(0.02)
                trail.add(150)  # records keep coming while it runs
                while len(ids()) < 1050:
                    await trio.sleep(0.02)
                # The cursor moves once the receiver's answer is in (at-least-once): wait for it.
                while exp.after < 1050:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)
    finally:
        hec.down()
    assert not bad_auth
    assert unavailable["left"] == 0
    assert ids() == set(trail.ids)
    assert exp.after == 1050 and exp._down is None
    ev = received[0]
    assert ev["index"] == "security" and ev["sourcetype"] == "ocsf" and ev["source"] == "ostiary"
    assert ev["event"]["metadata"]["uid"] == ev["fields"]["id"]
    assert float(ev["time"]) == ev["event"]["time"] / 1000


def test_splunk_hec_token_missing_is_retried_not_skipped(
    tmp_path: Path, trail: Trail, monkeypatch: pytest.MonkeyPatch
) -> None:
    got: list[dict[str, Any]] = []

    def answer(path: str, headers: Any, body: bytes) -> tuple[int, bytes]:
        got.extend(split_json(body))
        return 200, b'{"text":"Success","code":0}'

    hec = Receiver(answer)
    hec.up()
    trail.add(10)
    exp = exporter(
        tmp_path, trail.store, name="s", kind="splunk_hec", url=f"http://127.0.0.1:{hec.port}/", token_env="T"
    )

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            await trio.sleep(0.3)
            assert not got and exp.after == 0
            monkeypatch.setenv("T", TOKEN)
            with trio.fail_after(10):
                while len(got) < 10:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)
    finally:
        hec.down()


# -- (c) Elastic _bulk --------------------------------------------------------------------------------


def test_elastic_bulk_resends_items_that_failed(tmp_path: Path, trail: Trail) -> None:
    docs: dict[str, dict[str, Any]] = {}
    attempts: dict[str, int] = {}
    conflicts = {"n": 0}
    auth: list[str] = []

    def answer(path: str, headers: Any, body: bytes) -> tuple[int, bytes]:
        assert path == "/_bulk" and headers["Content-Type"] == "application/x-ndjson"
        auth.append(headers["Authorization"])
        lines = body.decode().splitlines()
        items = []
        for action, doc in zip(lines[::2], lines[1::2], strict=True):
            meta = json.loads(action)["create"]
            _id = meta["_id"]
            attempts[_id] = attempts.get(_id, 0) + 1
            if _id in docs:
                conflicts["n"] += 1
                items.append({"create": {"_id": _id, "status": 409, "error": {"type": "conflict"}}})
            elif attempts[_id] == 1 and int(_id.split(":")[1]) % 5 == 0:
                err = {"type": "es_rejected_execution_exception", "reason": "queue full"}
                items.append({"create": {"_id": _id, "status": 429, "error": err}})
            else:
                docs[_id] = {"index": meta["_index"], **json.loads(doc)}
                items.append({"create": {"_id": _id, "status": 201}})
        errors = any(i["create"]["status"] >= 300 for i in items)
        return 200, json.dumps({"took": 1, "errors": errors, "items": items}).encode()

    es = Receiver(answer)
    es.up()
    trail.add(500)
    # A record already indexed (a batch acknowledged whose cursor was not written): a 409, delivered.
    first = trail.store.read_after(0, 1)[0]
    docs[event_id(first)] = {}
    exp = exporter(
        tmp_path,
        trail.store,
        name="es",
        kind="elastic",
        url=f"http://127.0.0.1:{es.port}",
        index="audit-ostiary",
        username="elastic",
        password_env="ES_PASSWORD",
        batch=120,
    )
    import os

    os.environ["ES_PASSWORD"] = "s3cret"
    try:
        trio.run(run_until, [exp], lambda: exp.after == 500)
    finally:
        es.down()
        del os.environ["ES_PASSWORD"]
    assert set(docs) == set(trail.ids)
    assert conflicts["n"] == 1
    failed_once = {i for i in trail.ids if int(i.split(":")[1]) % 5 == 0}
    assert {i for i, n in attempts.items() if n == 2} == failed_once - {event_id(first)}
    assert max(attempts.values()) == 2  # only the refused items were sent again
    assert set(auth) == {"Basic ZWxhc3RpYzpzM2NyZXQ="}
    d = docs[trail.ids[5]]
    assert d["index"] == "audit-ostiary" and d["@timestamp"].endswith("Z") and d["class_uid"]


# -- syslog -------------------------------------------------------------------------------------------


class SyslogReceiver:
    """RFC 5424 over TCP (or TLS), octet-counted frames (RFC 6587), in a thread. ``down`` closes the
    listener and every connection at once, dropping whatever was not read yet, like a crash."""

    ID = re.compile(rb'\[ostiary@32473 id="([^"]+)"')
    HEADER = re.compile(rb"<1(?:10|08)>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \S+ ostiary - \w+ \[")

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.context = context
        self.ids: list[str] = []
        self.bad: list[bytes] = []
        self.connections = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def up(self) -> None:
        self._stop.clear()
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen()
        self._thread = threading.Thread(target=self._serve, args=(lsock,), daemon=True)
        self._thread.start()

    def down(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _serve(self, lsock: socket.socket) -> None:
        conns: dict[socket.socket, bytearray] = {}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([lsock, *conns], [], [], 0.02)
                for s in readable:
                    if s is lsock:
                        c, _ = lsock.accept()
                        if self.context is not None:
                            try:
                                c = self.context.wrap_socket(c, server_side=True)
                            except (OSError, ssl.SSLError):
                                c.close()
                                continue
                        self.connections += 1
                        conns[c] = bytearray()
                        continue
                    try:
                        data = s.recv(65536)
                    except (OSError, ssl.SSLError):
                        data = b""
                    if not data:
                        conns.pop(s).clear()
                        s.close()
                        continue
                    self._frames(conns[s], data)
        finally:
            for c in conns:
                c.close()
            lsock.close()

    def _frames(self, buf: bytearray, data: bytes) -> None:
        buf += data
        while True:
            space = buf.find(b" ")
            if space < 0 or len(buf) < space + 1 + int(buf[:space]):
                return
            n = int(buf[:space])
            msg = bytes(buf[space + 1 : space + 1 + n])
            del buf[: space + 1 + n]
            m = self.ID.search(msg)
            head, _, payload = msg.partition(b"\xef\xbb\xbf")
            if (
                m is None
                or not re.match(
                    rb"<1(?:10|08)>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \S+ ostiary - \w+ \[", head
                )
                or json.loads(payload)["metadata"]["uid"] != m.group(1).decode()
            ):
                self.bad.append(msg)
            else:
                self.ids.append(m.group(1).decode())


async def feed(trail: Trail, total: int, step: int) -> None:
    """Appends records while the exporter runs."""
    while len(trail.ids) < total:
        await trio.to_thread.run_sync(trail.add, step)
        await trio.sleep(0.01)


def syslog_scenario(trail: Trail, exp: Exporter, rx: SyslogReceiver, total: int) -> None:
    async def scenario() -> None:
        rx.up()
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            nursery.start_soon(feed, trail, total, 40)
            with trio.fail_after(float(os.environ.get("T", 30))):
                while len(rx.ids) < total // 4:
                    await trio.sleep(0.005)
                await trio.to_thread.run_sync(rx.down)  # mid-stream
                await trio.sleep(0.4)  # records keep arriving in the store meanwhile
                await trio.to_thread.run_sync(rx.up)
                while set(rx.ids) != set(trail.ids) or len(trail.ids) < total:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)
    finally:
        rx.down()


def test_syslog_tcp_receiver_restarted_mid_stream_loses_nothing(tmp_path: Path, trail: Trail) -> None:
    rx = SyslogReceiver()
    trail.add(200)
    exp = exporter(
        tmp_path, trail.store, name="syslog", kind="syslog", host="127.0.0.1", port=rx.port, batch=50
    )
    syslog_scenario(trail, exp, rx, 2000)
    assert not rx.bad
    assert set(rx.ids) == set(trail.ids) and len(trail.ids) == 2000
    assert rx.connections >= 2


def test_syslog_tls_with_a_private_ca(tmp_path: Path, trail: Trail) -> None:
    ca = trustme.CA()
    ca_path = tmp_path / "syslog-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("siem.example.test").configure_cert(server)
    rx = SyslogReceiver(server)
    trail.add(100)
    exp = exporter(
        tmp_path,
        trail.store,
        name="syslog-tls",
        kind="syslog",
        host="127.0.0.1",
        port=rx.port,
        transport="tls",
        ca=str(ca_path),
        server_name="siem.example.test",
        batch=50,
        format="raw",
    )
    # raw events carry no metadata.uid: check the frames by their structured data only.
    rx._frames = lambda buf, data: _raw_frames(rx, buf, data)  # type: ignore[method-assign]
    syslog_scenario(trail, exp, rx, 800)
    assert not rx.bad and set(rx.ids) == set(trail.ids)


def _raw_frames(rx: SyslogReceiver, buf: bytearray, data: bytes) -> None:
    buf += data
    while (space := buf.find(b" ")) >= 0 and len(buf) >= space + 1 + int(buf[:space]):
        n = int(buf[:space])
        msg = bytes(buf[space + 1 : space + 1 + n])
        del buf[: space + 1 + n]
        m = rx.ID.search(msg)
        record = json.loads(msg.partition(b"\xef\xbb\xbf")[2])
        if m is None or f"{record['writer']}:{record['seq']}" != m.group(1).decode():
            rx.bad.append(msg)
        else:
            rx.ids.append(m.group(1).decode())


def test_syslog_tls_refuses_an_unknown_server(tmp_path: Path, trail: Trail) -> None:
    ca, other = trustme.CA(), trustme.CA()
    ca_path = tmp_path / "ca.pem"
    other.cert_pem.write_to_path(str(ca_path))  # not the CA that signed the server
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    rx = SyslogReceiver(server)
    rx.up()
    trail.add(5)
    exp = exporter(
        tmp_path,
        trail.store,
        name="t",
        kind="syslog",
        host="127.0.0.1",
        port=rx.port,
        transport="tls",
        ca=str(ca_path),
    )

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(exp.run)
            await trio.sleep(0.4)
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)
    finally:
        rx.down()
    assert not rx.ids and exp.after == 0 and "CERTIFICATE_VERIFY_FAILED" in (exp._down or "")


# -- (f) configuration --------------------------------------------------------------------------------


def test_exporter_config_problems(tmp_path: Path) -> None:
    bad = [
        {"name": "a", "kind": "jsonl"},
        {"name": "a", "kind": "jsonl", "path": "x", "url": "http://h"},
        {"name": "../x", "kind": "splunk_hec", "url": "ftp://h"},
        {"name": "es", "kind": "elastic", "url": "http://h", "token_env": "K", "username": "u"},
        {"name": "es2", "kind": "elastic", "url": "http://h", "username": "u"},
        {"name": "sys", "kind": "syslog", "port": 70000, "ca": "ca.pem"},
        {"name": "j", "kind": "jsonl", "path": "-", "transport": "tls", "batch": 0, "interval": 0},
        {"name": "k", "kind": "jsonl", "path": "-", "kinds": ["auth", "login"]},
    ]
    with pytest.raises(ConfigError) as e:
        config.parse(base(audit={"exporters": bad}), "t.yaml", tmp_path)
    text = str(e.value)
    for where, what in [
        ("audit.exporters[0].path", "kind jsonl needs a file path"),
        ("audit.exporters[1].name", "another exporter is named a"),
        ("audit.exporters[1].url", "not used by kind jsonl"),
        ("audit.exporters[2].name", "it names the cursor file"),
        ("audit.exporters[2].url", "needs an http:// or https:// url"),
        ("audit.exporters[2]", "exactly one of token_env, token_file"),
        ("audit.exporters[3]", "not both"),
        ("audit.exporters[4]", "username needs one of password_env, password_file"),
        ("audit.exporters[5].host", "kind syslog needs a host"),
        ("audit.exporters[5].port", "70000 is not a TCP port"),
        ("audit.exporters[5].ca", "ca and server_name are for transport: tls"),
        ("audit.exporters[6].transport", "transport is for kind syslog"),
        ("audit.exporters[6].batch", "between 1 and 10000"),
        ("audit.exporters[6].interval", "must be positive"),
        ("audit.exporters[7].kinds", "unknown kind(s) login"),
    ]:
        assert where in text and what in text, (where, what, text)
    with pytest.raises(ConfigError, match="Invalid enum value"):
        config.parse(base(audit={"exporters": [{"name": "x", "kind": "kafka"}]}), "t.yaml", tmp_path)


def test_exporter_paths_are_resolved(tmp_path: Path) -> None:
    hec = {"name": "s", "kind": "splunk_hec", "url": "https://h:8088/x", "token_file": "t", "ca": "c"}
    exporters = [
        {"name": "f", "kind": "jsonl", "path": "logs/a.jsonl"},
        {"name": "o", "kind": "jsonl", "path": "-"},
        hec,
    ]
    cfg = config.parse(base(audit={"exporters": exporters}), "t.yaml", tmp_path)
    f, o, s = cfg.audit.exporters
    assert f.path == str(tmp_path / "logs" / "a.jsonl") and o.path == "-"
    assert s.token_file == str(tmp_path / "t") and s.ca == str(tmp_path / "c")


# -- (g) OCSF -----------------------------------------------------------------------------------------

CLASSES = {
    "auth": 3002,
    "session_start": 6005,
    "session_end": 6005,
    "statement": 6005,
    "result": 6005,
    "policy": 6003,
    "approval": 6003,
    "admin": 6003,
    "purge": 6003,
    "writer_start": 6002,
    "writer_stop": 6002,
}


def test_ocsf_mapping_of_every_kind() -> None:
    chain = Chain("feedfacecafebeef")
    seen = set()
    for i in range(1, 3 * len(KINDS) + 1):
        r = sample(chain, i)
        ev = to_ocsf(r)
        seen.add(r.kind)
        assert ev["class_uid"] == CLASSES[r.kind]
        assert ev["category_uid"] == ev["class_uid"] // 1000
        assert ev["type_uid"] == ev["class_uid"] * 100 + ev["activity_id"]
        assert ev["time"] == r.ts // 1000
        assert ev["severity_id"] in (1, 3, 4)
        assert ev["metadata"]["uid"] == f"feedfacecafebeef:{i}"
        assert ev["metadata"]["product"]["name"] == "Ostiary"
        assert ev["metadata"]["product"]["vendor_name"] == "Ostiary"
        assert ev["metadata"]["version"] == "1.1.0"
        assert ev["actor"]["user"]["name"] == "repo:acme/shop"
        assert ev["unmapped"] == r.as_dict()
        if r.verdict == "deny":
            assert (ev["status_id"], ev["status"]) == (2, "Failure") and ev["severity_id"] == 3
        else:
            assert (ev["status_id"], ev["status"]) == (1, "Success")
        if r.kind in ("auth", "session_start"):
            assert ev["src_endpoint"] == {"ip": "10.1.2.3", "port": 54321}
        if r.kind == "auth":
            assert ev["activity_id"] == 1 and ev["user"]["name"] == "ci"
        if ev["class_uid"] == 6005:
            assert ev["database"]["name"] == "app" and ev["type_id"] == 1
            assert ev["metadata"]["correlation_uid"] == "abcd0123-1"
        if r.kind == "statement":
            assert ev["activity_id"] == 4 and ev["query_info"]["query_string"] == f"SELECT {i}"
            if r.verdict == "deny":
                assert ev["status_detail"] == "writes are not granted"
        if ev["class_uid"] == 6003:
            assert ev["api"]["operation"]
        json.dumps(ev)
    assert seen == set(KINDS)
    lost = chain.seal("admin", 1, data={"action": "records_lost", "count": 3})
    assert to_ocsf(lost)["severity_id"] == 4


def test_elastic_timestamp_and_syslog_frame_are_well_formed(tmp_path: Path, trail: Trail) -> None:
    trail.add(1)
    r = trail.store.read_after(0, 1)[0]
    es = exporter(tmp_path, trail.store, name="e", kind="elastic", url="http://127.0.0.1:9")
    assert es.document(r)["@timestamp"] == "2023-11-14T22:13:20.001000Z"  # type: ignore[attr-defined]
    sl = exporter(tmp_path, trail.store, name="s", kind="syslog", host="127.0.0.1")
    frame: bytes = sl.frame(r)  # type: ignore[attr-defined]
    count, _, msg = frame.partition(b" ")
    assert int(count) == len(msg)
    assert msg.startswith(b"<110>1 2023-11-14T22:13:20.001000Z ")
    assert b' ostiary - auth [ostiary@32473 id="0123456789abcdef:1" kind="auth"' in msg
