"""The approvals API end to end over real sockets: a real SQLite approval store, the real
``Approvals`` service, a policy parsed by ``config.parse``, the development issuer's tokens checked
by the real ``TokenValidator``, the admin HTTP server in its own trio run (a thread), clients with
urllib, raw sockets and ``ostiary approvals`` subprocesses, webhooks received by ``http.server``.
Nothing of ours is mocked; no database is needed (the connection is never reached)."""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from ostiary import config as configmod
from ostiary.admin.api import AdminApi, admin_server
from ostiary.admin.http import HttpLimits
from ostiary.approvals.service import Approvals
from ostiary.approvals.store import ApprovalStore
from ostiary.approvals.webhooks import webhook_notifier
from ostiary.identity.dev import mint, resolved_issuers
from ostiary.identity.jwks import JwksCache
from ostiary.identity.tokens import TokenValidator
from ostiary.policy.evaluate import CompiledPolicy


def policy_data(data_dir: Path, hooks: list[dict[str, Any]]) -> dict[str, Any]:
    def person(name: str) -> dict[str, Any]:
        return {"name": name, "issuer": "dev", "match": {"sub": name}}

    return {
        "data_dir": str(data_dir),
        "dev": {"issuer": True},
        "admin": {"listen": {"port": 0}, "webhooks": hooks},
        "identities": [person("ci"), person("alice"), person("bob"), person("carol")],
        "groups": [{"name": "dbas", "members": ["alice", "bob"]}],
        "connections": [
            {
                "name": "app",
                "allow_plaintext": True,
                "upstream": {"host": "127.0.0.1", "port": 1, "database": "app", "user": "a", "password": "x"},
            }
        ],
        "approvals": [
            {"name": "deletes", "match": {"kinds": ["delete"]}, "approvers": ["dbas"], "required": 2},
            {"name": "updates", "match": {"kinds": ["update"]}, "approvers": ["dbas"], "timeout": 60},
            {"name": "truncates", "match": {"kinds": ["truncate"]}, "approvers": ["dbas"], "timeout": 1},
        ],
        "grants": [
            {
                "name": "ci-app",
                "identities": ["ci"],
                "connection": "app",
                "access": "read-write",
                "approvals": ["deletes", "updates", "truncates"],
            },
            {
                "name": "dba-app",
                "identities": ["dbas"],
                "connection": "app",
                "access": "read-write",
                "approvals": ["updates"],
            },
        ],
    }


class Receiver(http.server.BaseHTTPRequestHandler):
    got: list[tuple[str, dict[str, Any]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).got.append((self.path, json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Gateway:
    url: str
    data_dir: Path
    port: int
    webhooks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def token(self, subject: str) -> str:
        return mint(self.data_dir, subject, {})

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, text = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        if text.startswith(b"{"):
            return status, json.loads(text)
        return status, text.decode()

    def ask(self, statement: str, subject: str = "ci", reason: str = "migration 42") -> dict[str, Any]:
        status, body = self.call(
            "POST",
            "/approvals",
            self.token(subject),
            {"connection": "app", "statement": statement, "reason": reason},
        )
        assert status == 201, body
        assert isinstance(body, dict)
        return body

    def vote(self, rid: str, who: str, action: str, reason: str) -> tuple[int, Any]:
        return self.call("POST", f"/approvals/{rid}/{action}", self.token(who), {"reason": reason})

    def cli(self, *args: str, subject: str = "alice") -> subprocess.CompletedProcess[str]:
        token_file = self.data_dir / f"{subject}.token"
        token_file.write_text(self.token(subject))
        env = {**os.environ, "OSTIARY_GATEWAY": self.url}
        env.pop("OSTIARY_TOKEN", None)
        return subprocess.run(
            [sys.executable, "-m", "ostiary.cli", "approvals", *args, "--token-file", str(token_file)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    Receiver.got = []
    hooks_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hooks_server.serve_forever, daemon=True).start()
    hook_base = f"http://127.0.0.1:{hooks_server.server_address[1]}"
    hooks = [
        {"name": "generic", "url": f"{hook_base}/json", "format": "json"},
        {"name": "chat", "url": f"{hook_base}/slack", "format": "slack"},
    ]
    data_dir = tmp_path / "data"
    cfg = configmod.parse(policy_data(data_dir, hooks), base=tmp_path)
    assert cfg.admin is not None
    policy = CompiledPolicy(cfg)
    store = ApprovalStore.sqlite(tmp_path / "approvals.db")
    started: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        issuers = resolved_issuers(cfg)
        caches = {i.name: JwksCache(i) for i in issuers}
        validator = TokenValidator(issuers, caches)
        async with trio.open_nursery() as nursery:
            for c in caches.values():
                await nursery.start(c.run)
            approvals = Approvals(store, "gw-test", lambda: policy)
            api = AdminApi(approvals, lambda: policy, validator.validate, "")
            server = admin_server(api, "127.0.0.1", 0, limits=HttpLimits(read_timeout=1.0))
            port = await nursery.start(server.run)
            base = f"http://127.0.0.1:{port}"
            api.base_url = approvals.approve_url = base
            assert cfg.admin is not None
            approvals.notifiers = [webhook_notifier(h, base) for h in cfg.admin.webhooks]
            await nursery.start(approvals.run)
            started.update(port=port, token=trio.lowlevel.current_trio_token(), cancel=nursery.cancel_scope)
            ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(20)
    gw = Gateway(f"http://127.0.0.1:{started['port']}", data_dir, started["port"], Receiver.got)
    try:
        yield gw
    finally:
        trio.from_thread.run_sync(started["cancel"].cancel, trio_token=started["token"])
        thread.join(10)
        hooks_server.shutdown()
        store.close()


def test_health(gateway: Gateway) -> None:
    assert gateway.call("GET", "/healthz") == (200, {"status": "ok"})


def test_approve_over_http(gateway: Gateway) -> None:
    req = gateway.ask("update orders set paid = true where id = 7")
    assert req["state"] == "pending" and req["rule"] == "updates" and req["origin"] == "ahead"
    assert req["requester"] == "ci" and req["grant"] == "ci-app"
    status, listed = gateway.call("GET", "/approvals?state=pending", gateway.token("alice"))
    assert status == 200 and [r["id"] for r in listed["requests"]] == [req["id"]]
    status, done = gateway.call(
        "POST", f"/approvals/{req['id']}/approve", gateway.token("alice"), {"reason": "ticket 12"}
    )
    assert status == 200 and done["state"] == "approved", done
    assert done["votes"][0]["approver"] == "alice" and done["votes"][0]["reason"] == "ticket 12"
    status, again = gateway.call(
        "POST", f"/approvals/{req['id']}/deny", gateway.token("bob"), {"reason": "too late"}
    )
    assert status == 409 and "approved already" in again["error"]
    # carol is neither requester nor approver: she does not see it
    status, listed = gateway.call("GET", "/approvals?state=all", gateway.token("carol"))
    assert status == 200 and listed["requests"] == []
    assert gateway.call("GET", f"/approvals/{req['id']}", gateway.token("carol"))[0] == 403


def test_approve_and_deny_with_the_cli(gateway: Gateway) -> None:
    req = gateway.ask("update orders set paid = false where id = 8")
    out = gateway.cli("list")
    assert out.returncode == 0 and req["id"] in out.stdout and "update orders" in out.stdout, out
    out = gateway.cli("show", req["id"])
    assert out.returncode == 0 and "rule:       updates" in out.stdout, out
    out = gateway.cli("approve", req["id"], "--reason", "looks right")
    assert out.returncode == 0 and f"{req['id']}: approved" in out.stdout, out

    other = gateway.ask("update orders set paid = false where id = 9")
    out = gateway.cli("deny", other["id"], "--reason", "wrong order", subject="bob")
    assert out.returncode == 0 and f"{other['id']}: denied" in out.stdout, out
    status, body = gateway.call("GET", f"/approvals/{other['id']}", gateway.token("ci"))
    assert status == 200 and body["state"] == "denied" and "wrong order" in body["decision_reason"]

    out = gateway.cli("approve", other["id"], "--reason", "x", subject="carol")
    assert out.returncode == 1 and "carol is not an approver" in out.stderr and "HTTP 403" in out.stderr


def test_the_requester_cannot_approve_their_own_request(gateway: Gateway) -> None:
    req = gateway.ask("update orders set paid = true where id = 1", subject="alice")
    assert req["grant"] == "dba-app"
    status, body = gateway.vote(req["id"], "alice", "approve", "mine")
    assert status == 403 and "requester cannot approve" in body["error"]
    status, body = gateway.vote(req["id"], "bob", "approve", "ok")
    assert status == 200 and body["state"] == "approved"


def test_non_approver_is_refused(gateway: Gateway) -> None:
    req = gateway.ask("update orders set paid = true where id = 2")
    for who in ("carol", "ci"):
        status, body = gateway.vote(req["id"], who, "approve", "x")
        assert status == 403, body
    status, body = gateway.call("GET", f"/approvals/{req['id']}", gateway.token("ci"))
    assert body["state"] == "pending" and body["votes"] == []


def test_two_approvals_required(gateway: Gateway) -> None:
    req = gateway.ask("delete from orders where id = 3")
    assert req["rule"] == "deletes" and req["required"] == 2
    alice, bob = gateway.token("alice"), gateway.token("bob")
    status, body = gateway.call("POST", f"/approvals/{req['id']}/approve", alice, {"reason": "one"})
    assert status == 200 and body["state"] == "pending" and body["approvals"] == 1
    status, body = gateway.call("POST", f"/approvals/{req['id']}/approve", alice, {"reason": "again"})
    assert status == 409 and "already decided" in body["error"]
    status, body = gateway.call("POST", f"/approvals/{req['id']}/approve", bob, {"reason": "two"})
    assert status == 200 and body["state"] == "approved" and body["approvals"] == 2


def test_expiry(gateway: Gateway) -> None:
    req = gateway.ask("truncate orders")
    assert req["rule"] == "truncates"
    out = gateway.cli("wait", req["id"], "--interval", "0.2", "--timeout", "20", subject="ci")
    assert out.returncode == 3 and "expired" in out.stdout, out
    status, body = gateway.vote(req["id"], "bob", "approve", "late")
    assert status == 409 and "expired" in body["error"]


def test_request_ahead_and_wait_exit_codes(gateway: Gateway) -> None:
    out = gateway.cli(
        "request", "--connection", "app", "--statement", "update t set a = 1 where b = 2", "--reason", "r",
        subject="ci",
    )  # fmt: skip
    assert out.returncode == 0, out
    rid = out.stdout.strip()
    assert rid.startswith("apr-")

    out = gateway.cli("wait", rid, "--timeout", "0.5", "--interval", "0.1", subject="ci")
    assert out.returncode == 4 and "pending" in out.stdout, out

    waiter = subprocess.Popen(
        [sys.executable, "-m", "ostiary.cli", "approvals", "wait", rid, "--interval", "0.1",
         "--gateway", gateway.url, "--token", gateway.token("ci")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(0.5)
    gateway.call("POST", f"/approvals/{rid}/approve", gateway.token("bob"), {"reason": "go"})
    assert waiter.wait(20) == 0
    assert waiter.stdout is not None and f"{rid}: approved" in waiter.stdout.read()

    denied = gateway.ask("update t set a = 2 where b = 3")
    gateway.vote(denied["id"], "alice", "deny", "no")
    assert gateway.cli("wait", denied["id"], subject="ci").returncode == 2

    assert gateway.cli("wait", "apr-0000000000", subject="ci").returncode == 1


def test_request_ahead_refusals(gateway: Gateway) -> None:
    ci = gateway.token("ci")
    status, body = gateway.call(
        "POST", "/approvals", ci, {"connection": "app", "statement": "select 1", "reason": "r"}
    )
    assert status == 400 and "no approval rule of grant ci-app matches" in body["error"]
    update = {"connection": "app", "statement": "update t set a=1", "reason": "r"}
    status, body = gateway.call("POST", "/approvals", gateway.token("carol"), update)
    assert status == 403 and 'no grant lets "carol" use connection "app"' in body["error"]
    status, body = gateway.call("POST", "/approvals", ci, {**update, "reason": ""})
    assert status == 400 and "reason" in body["error"]
    status, body = gateway.call(
        "POST", "/approvals", ci, {"connection": "app", "statement": "updte t", "reason": "r"}
    )
    assert status == 403 and "cannot analyse" in body["error"]


def test_bad_tokens_are_401_and_never_echoed(gateway: Gateway, tmp_path: Path) -> None:
    other_issuer = mint(tmp_path / "elsewhere", "alice", {})  # same issuer URL, another key
    forged = other_issuer.rsplit(".", 1)[0] + ".c2lnbmF0dXJl"
    for token in ("not-a-jwt-SECRET123", other_issuer, forged):
        for method, path, body in (
            ("GET", "/approvals", None),
            ("POST", "/approvals", {"connection": "app", "statement": "update t set a=1", "reason": "r"}),
            ("POST", "/approvals/apr-0123456789/approve", {"reason": "r"}),
        ):
            status, answer = gateway.call(method, path, token, body)
            assert status == 401, answer
            assert token not in json.dumps(answer) and token.split(".")[-1] not in json.dumps(answer)
    status, answer = gateway.call("GET", "/approvals")
    assert status == 401 and "token is required" in answer["error"]


def raw_exchange(port: int, data: bytes, pause: float = 0.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if data:
            s.sendall(data)
        if pause:
            time.sleep(pause)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/2.0\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\n folded: x\r\n\r\n", b"400"),
        (b"GET /heal\xffthz HTTP/1.1\r\n\r\n", b"400"),
        (b"POST /approvals HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
        (b"POST /approvals HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
        (b"POST /approvals HTTP/1.1\r\nContent-Length: 100000\r\n\r\n", b"413"),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 20000, b"431"),
        (b"DELETE /approvals HTTP/1.1\r\n\r\n", b"405"),
    ],
)
def test_malformed_http_is_refused_and_the_server_goes_on(
    gateway: Gateway, data: bytes, status: bytes
) -> None:
    answer = raw_exchange(gateway.port, data)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert b"Connection: close" in answer
    assert gateway.call("GET", "/healthz")[0] == 200


def test_deeply_nested_json_is_a_bad_request(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    """JSON nested past the parser's recursion limit is answered 400, without a traceback in the log;
    a vote's body is parsed only once its token was accepted."""
    deep = b"[" * 50000
    rid = gateway.ask("update orders set paid = true where id = 3")["id"]
    with caplog.at_level("INFO", logger="ostiary.admin"):
        for path in ("/approvals", f"/approvals/{rid}/approve"):
            headers = {"Content-Type": "application/json"}
            status, answer = gateway.call("POST", path, gateway.token("alice"), headers=headers, raw=deep)
            assert (status, answer) == (400, {"error": "the body is nested too deeply"}), path
            status, answer = gateway.call("POST", path, "not-a-token", headers=headers, raw=deep)
            assert status == 401, (path, answer)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    assert gateway.call("GET", f"/approvals/{rid}", gateway.token("alice"))[1]["state"] == "pending"


def test_slow_client_times_out(gateway: Gateway) -> None:
    answer = raw_exchange(gateway.port, b"POST /approvals HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert gateway.call("GET", "/healthz")[0] == 200


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_html_page_escapes_everything(gateway: Gateway) -> None:
    evil = "update t set note = '<script>alert(1)</script>\" onmouseover=\"x' where id = 1"
    req = gateway.ask(evil, reason="<b>urgent</b>")
    html = {"Accept": "text/html"}
    status, page = gateway.call("GET", f"/approvals/{req['id']}", headers=html)
    assert status == 200 and "<form" in page and "alert" not in page  # no token: no details
    status, page = gateway.call("GET", f"/approvals/{req['id']}", gateway.token("alice"), headers=html)
    assert status == 200 and "<script>" not in page and "<b>urgent" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot; onmouseover=&quot;x" in page
    assert "&lt;b&gt;urgent&lt;/b&gt;" in page

    # The page's form: token, reason, approve (form-encoded)
    form = urllib.parse.urlencode({"token": gateway.token("bob"), "reason": "checked <ok>"}).encode()
    status, page = gateway.call("POST", f"/approvals/{req['id']}/approve", raw=form, headers=FORM)
    assert status == 200 and "approval is recorded" in page and "checked &lt;ok&gt;" in page
    assert gateway.token("bob").split(".")[2] not in page
    form = urllib.parse.urlencode({"token": "garbage-token-XYZ", "reason": "r"}).encode()
    status, page = gateway.call("POST", f"/approvals/{req['id']}/deny", raw=form, headers=FORM)
    assert status == 401 and "garbage-token-XYZ" not in page


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_webhooks_json_and_slack(gateway: Gateway) -> None:
    statement = "update orders set note = '```<b>' where id = 5"
    req = gateway.ask(statement)
    wait_for(lambda: {p for p, _ in gateway.webhooks} >= {"/json", "/slack"})
    generic = next(b for p, b in gateway.webhooks if p == "/json")
    assert generic["event"] == "requested"
    assert generic["request"]["id"] == req["id"] and generic["request"]["statement"] == statement
    assert generic["approve_url"] == f"{gateway.url}/approvals/{req['id']}/approve"
    assert generic["deny_url"] == f"{gateway.url}/approvals/{req['id']}/deny"

    slack = next(b for p, b in gateway.webhooks if p == "/slack")
    assert req["id"] in slack["text"] or "ci on app" in slack["text"]
    flat = json.dumps(slack["blocks"])
    assert "ci" in flat and "app" in flat and "updates" in flat
    texts = [b["text"]["text"] for b in slack["blocks"] if "text" in b]
    code = next(t for t in texts if t.startswith("```"))
    assert "&lt;b&gt;" in code and code.count("```") == 2  # escaped, the fence inside broken
    button = next(b for b in slack["blocks"] if b["type"] == "actions")["elements"][0]
    assert button["url"] == f"{gateway.url}/approvals/{req['id']}"

    gateway.vote(req["id"], "alice", "approve", "fine")
    wait_for(lambda: any(b.get("event") == "approved" for _, b in gateway.webhooks))


def test_admin_config_validation(tmp_path: Path) -> None:
    data = policy_data(
        tmp_path, [{"name": "a", "url": "ftp://x"}, {"name": "a", "url_env": "X", "url": "http://y"}]
    )
    data["admin"]["public_url"] = "gw.example.com"
    data["admin"]["tls"] = {"cert": "missing.pem", "key": "missing.key"}
    with pytest.raises(configmod.ConfigError) as e:
        configmod.parse(data, base=tmp_path)
    text = str(e.value)
    assert "admin.public_url" in text and "admin.tls.cert" in text
    assert "admin.webhooks[0].url: must be an http:// or https:// URL" in text
    assert "admin.webhooks[1].name: another webhook is named a" in text
    assert "give exactly one of url, url_env, url_file" in text
    ok = policy_data(tmp_path, [{"name": "h", "url_file": "hook.url", "ca": "ca.pem"}])
    (tmp_path / "hook.url").write_text("https://hooks.example.com/x\n")
    (tmp_path / "ca.pem").write_text("")
    cfg = configmod.parse(ok, base=tmp_path)
    assert cfg.admin is not None and cfg.admin.webhooks[0].ca == str(tmp_path / "ca.pem")
    assert cfg.admin.base_url() == "http://127.0.0.1:0"
    assert "admin" in configmod.PROCESS_SECTIONS


def test_tls(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    async def echo(request: Any) -> Any:
        from ostiary.admin.http import Response

        return Response.json(200, {"path": request.path, "auth": "authorization" in request.headers})

    async def main() -> None:
        from ostiary.admin.http import HttpServer, server_ssl_context

        pem = str(tmp_path / "server.pem")
        server = HttpServer(echo, "127.0.0.1", 0, ssl_context=server_ssl_context(pem, pem))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            url = f"https://127.0.0.1:{port}"
            try:
                plain = await trio.to_thread.run_sync(raw_exchange, port, b"GET /healthz HTTP/1.1\r\n\r\n")
            except ConnectionResetError:
                plain = b""
            assert not plain.startswith(b"HTTP/1.1")  # no answer in clear text
            out = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "ostiary.cli", "approvals", "show", "apr-1", "--json",
                     "--gateway", url, "--ca", str(tmp_path / "ca.pem"), "--token", "t"],
                    capture_output=True, text=True, timeout=30,
                )
            )  # fmt: skip
            assert out.returncode == 0, out
            assert json.loads(out.stdout) == {"path": "/approvals/apr-1", "auth": True}
            out = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "ostiary.cli", "approvals", "show", "apr-1",
                     "--gateway", url, "--token", "t"],
                    capture_output=True, text=True, timeout=30,
                )
            )  # fmt: skip
            assert out.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in out.stderr, out
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_webhook_failures_raise_without_the_url(tmp_path: Path) -> None:
    from ostiary.approvals.store import Request as ApprovalRequest
    from ostiary.approvals.webhooks import WebhookError
    from ostiary.config import Webhook

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    req = ApprovalRequest(
        id="apr-1", created=0, expires=1, state="pending", rule="r", connection="c", grant="g", requester="ci"
    )
    cases = [
        (f"http://127.0.0.1:{port}/secret-path", "HTTP 500"),
        (f"http://127.0.0.1:{closed}/secret-path", "refused"),
    ]
    try:
        for url, why in cases:
            notifier = webhook_notifier(Webhook(name="ops", url=url, timeout=2), "http://gw")
            with pytest.raises(WebhookError) as e:
                trio.run(notifier, "requested", req)
            assert "webhook ops" in str(e.value) and why in str(e.value) and "secret-path" not in str(e.value)
    finally:
        server.shutdown()


def test_one_address_cannot_take_every_connection(gateway: Gateway) -> None:
    # Idle connections from one address (here 127.0.0.2) take at most max_per_peer of the server's
    # slots: more from it are closed unanswered while an approver elsewhere (127.0.0.1) is served.
    limit = HttpLimits().max_per_peer
    idle = []
    try:
        for _ in range(limit):
            s = socket.create_connection(("127.0.0.1", gateway.port), source_address=("127.0.0.2", 0))
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # a head never finished
            idle.append(s)
        extra = socket.create_connection(("127.0.0.1", gateway.port), source_address=("127.0.0.2", 0))
        extra.settimeout(5)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            got = extra.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b"", got
        extra.close()
        assert gateway.call("GET", "/healthz") == (200, {"status": "ok"})
    finally:
        for s in idle:
            s.close()
