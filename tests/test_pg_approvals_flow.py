"""Approvals from both sides, through a real gateway: a CI job (token login) whose statement is held
inline and released by an approver with the CLI; a pipeline that asks ahead of time
(`ostiary approvals request` / `wait`) and then runs its statement; a denial seen by `wait`; the web
page; webhooks of a real gateway."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest

from conftest import APP_PASSWORD, GatewayFactory, GatewayProcess, gateway_config, unheld
from ostiary.devcluster import PgCluster, TlsMaterial, free_port
from ostiary.identity.dev import mint


@pytest.fixture(scope="module")
def table(pg: PgCluster) -> None:
    pg.execute(
        "create table if not exists flow_jobs(id int primary key, state text);"
        "truncate flow_jobs; insert into flow_jobs values (1, 'new'), (2, 'new'), (3, 'new');",
        dbname="app",
        user="app",
        password=APP_PASSWORD,
    )


class Hooks(http.server.BaseHTTPRequestHandler):
    got: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        type(self).got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def flow_config(
    pg: PgCluster, tls: TlsMaterial, tmp: Path, admin_port: int, hook_port: int
) -> dict[str, Any]:
    cfg = gateway_config(pg, tls, 0, tmp, grants=[])
    person = lambda n: {"name": n, "issuer": "dev", "match": {"sub": n}}  # noqa: E731
    cfg["dev"] = {"issuer": True}
    cfg["clients"] = []
    cfg["identities"] = [
        {"name": "ci-job", "issuer": "dev", "match": {"repository": "acme/shop"}},
        person("alice"),
        person("bob"),
    ]
    cfg["groups"] = [{"name": "dbas", "members": ["alice", "bob"]}]
    cfg["approvals"] = [{"name": "job-updates", "match": {"kinds": ["update"]}, "approvers": ["dbas"]}]
    cfg["grants"] = [
        {
            "name": "ci-app",
            "identities": ["ci-job"],
            "connection": "app",
            "access": "read-write",
            "approvals": ["job-updates"],
        }
    ]
    cfg["admin"] = {
        "listen": {"host": "127.0.0.1", "port": admin_port},
        "webhooks": [{"name": "chat", "url": f"http://127.0.0.1:{hook_port}/hook", "format": "json"}],
    }
    cfg["audit"] = {"flush_interval": 0.05}
    return cfg


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ostiary.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_both_sides_of_an_approval(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, table: None
) -> None:
    hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    admin_port = free_port()
    cfg = flow_config(pg, gateway_tls, tmp_path, admin_port, hooks.server_address[1])
    gw: GatewayProcess = gateway_factory(config=cfg)
    url = f"http://127.0.0.1:{admin_port}"
    data_dir = cfg["data_dir"]
    ci_token = mint(data_dir, "repo:acme/shop:ref:refs/heads/main", {"repository": "acme/shop"}, lifetime=600)
    alice = mint(data_dir, "alice", {})
    api = ["--gateway", url]

    # 1. Inline: the CI job's UPDATE waits; alice approves with the CLI; the job goes on.
    conn = psycopg.connect(gw.dsn(user="ci", password=ci_token), autocommit=True)
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    done: dict[str, Any] = {}

    def job() -> None:
        try:
            conn.execute("update flow_jobs set state = 'deployed' where id = 1")
            done["ok"] = True
        except Exception as e:
            done["error"] = e

    t = threading.Thread(target=job, daemon=True)
    t.start()
    deadline = time.monotonic() + 15
    listed: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not listed:
        r = cli("approvals", "list", "--state", "pending", "--json", *api, "--token", alice)
        assert r.returncode == 0, r.stderr
        listed = json.loads(r.stdout)
        time.sleep(0.1)
    assert listed, "the held statement's request never showed up"
    rid = listed[0]["id"]
    assert listed[0]["statement"] == "update flow_jobs set state = 'deployed' where id = 1"
    # The job cannot approve its own request (it is no approver); alice can.
    own = cli("approvals", "approve", rid, "--reason", "mine", *api, "--token", ci_token)
    assert own.returncode != 0 and "is not an approver of rule job-updates" in own.stderr
    ok = cli("approvals", "approve", rid, "--reason", "deploy window", *api, "--token", alice)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    t.join(15)
    assert done == {"ok": True}, done
    assert notices and rid in notices[0] and f"{url}/approvals/{rid}" in notices[0]

    # The web page of a request.
    req = urllib.request.Request(f"{url}/approvals/{rid}", headers={"Accept": "text/html"})
    with urllib.request.urlopen(req, timeout=10) as page:
        assert page.status == 200 and rid in page.read().decode()

    # 2. Ahead of time: the pipeline asks, waits, and its statement then runs without a hold.
    stmt = "update flow_jobs set state = 'migrated' where id = 2"
    r = cli(
        "approvals",
        "request",
        "--connection",
        "app",
        "--statement",
        stmt,
        "--reason",
        "release 42",
        *api,
        "--token",
        ci_token,
    )
    assert r.returncode == 0, r.stderr
    ahead = r.stdout.strip().splitlines()[-1]
    assert ahead.startswith("apr-")
    assert cli("approvals", "wait", ahead, "--timeout", "0.5", *api, "--token", ci_token).returncode == 4
    body = json.dumps({"reason": "looks good"}).encode()
    post = urllib.request.Request(
        f"{url}/approvals/{ahead}/approve",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {mint(data_dir, 'bob', {})}"},
    )
    with urllib.request.urlopen(post, timeout=10) as resp:
        assert json.loads(resp.read())["state"] == "approved"
    assert cli("approvals", "wait", ahead, *api, "--token", ci_token).returncode == 0
    unheld(lambda: conn.execute(stmt))  # approved ahead: no hold
    shown = cli("approvals", "show", ahead, "--json", *api, "--token", alice)
    assert json.loads(shown.stdout)["state"] == "used"

    # 2b. Ahead of time for a prepared statement: the values are part of what is approved.
    prepared = "update flow_jobs set state = $1 where id = $2"
    r = cli(
        "approvals",
        "request",
        "--connection",
        "app",
        "--statement",
        prepared,
        "--param",
        "shipped",
        "--param",
        "3",
        "--reason",
        "release 43",
        *api,
        "--token",
        ci_token,
    )
    assert r.returncode == 0, r.stderr
    ahead2 = r.stdout.strip().splitlines()[-1]
    assert cli("approvals", "approve", ahead2, "--reason", "ok", *api, "--token", alice).returncode == 0
    # psycopg's Parse/Bind/Execute match the approved text and values: no hold.
    unheld(lambda: conn.execute("update flow_jobs set state = %s where id = %s", ("shipped", 3)))
    assert (
        json.loads(cli("approvals", "show", ahead2, "--json", *api, "--token", alice).stdout)["state"]
        == "used"
    )

    # 3. Denied: `wait` says so with exit code 2, and the held statement fails with 42501.
    r = cli(
        "approvals",
        "request",
        "--connection",
        "app",
        "--statement",
        "update flow_jobs set state = 'x' where id = 3",
        "--reason",
        "try",
        *api,
        "--token",
        ci_token,
    )
    denied = r.stdout.strip().splitlines()[-1]
    assert cli("approvals", "deny", denied, "--reason", "not today", *api, "--token", alice).returncode == 0
    assert cli("approvals", "wait", denied, *api, "--token", ci_token).returncode == 2
    conn.close()

    # Webhooks heard of every request and outcome.
    time.sleep(0.5)
    events = {(h["event"], h["request"]["id"]) for h in Hooks.got}
    assert {("requested", rid), ("approved", rid), ("requested", ahead), ("denied", denied)} <= events
    hooks.shutdown()
    assert gw.stop() == 0
    recs = cli(
        "audit", "search", "--config", str(gw.config_path), "--kind", "approval", "--json", "--limit", "500"
    )
    actions = {
        (json.loads(x)["data"]["action"], json.loads(x)["data"]["request"]) for x in recs.stdout.splitlines()
    }
    assert {
        ("requested", rid),
        ("approved", rid),
        ("used", rid),
        ("notified", rid),
        ("denied", denied),
    } <= actions
    assert ("vote_refused", rid) in actions
