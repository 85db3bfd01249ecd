"""Approvals end to end: a real client's statement is held inline (its session simply waits, with a
NoticeResponse saying which request to approve), and released or refused when approvers decide —
here through the shared store, as another gateway of the fleet would (the HTTP API and the CLI are
tested in test_approvals_api.py)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import APP_PASSWORD, GatewayFactory, GatewayProcess, gateway_config, unheld
from ostiary.approvals.store import ApprovalError, ApprovalStore, Request
from ostiary.devcluster import PgCluster, TlsMaterial

SETUP = """
create table if not exists apr_accounts(id int primary key, v text);
truncate apr_accounts;
insert into apr_accounts values (1, 'a'), (2, 'b'), (3, 'c');
"""


@pytest.fixture(scope="module")
def accounts(pg: PgCluster) -> None:
    pg.execute(SETUP, dbname="app", user="app", password=APP_PASSWORD)


def approvals_config(pg: PgCluster, tls: TlsMaterial, tmp: Path, **rule: Any) -> dict[str, Any]:
    cfg = gateway_config(pg, tls, 0, tmp, grants=[])
    cfg["clients"] = [{"user": u, "password": f"{u}-pw"} for u in ("ci", "alice", "bob")]
    cfg["groups"] = [{"name": "dbas", "members": ["alice", "bob"]}]
    cfg["approvals"] = [
        {
            "name": "prod-writes",
            "match": {"kinds": ["update", "delete"]},
            "approvers": ["dbas"],
            "timeout": 30,
            **rule,
        }
    ]
    cfg["grants"] = [
        {
            "name": "ci-writes",
            "identities": ["ci"],
            "connection": "app",
            "access": "read-write",
            "approvals": ["prod-writes"],
        },
    ]
    cfg["audit"] = {"flush_interval": 0.05}
    return cfg


def store_of(cfg: dict[str, Any]) -> ApprovalStore:
    return ApprovalStore.sqlite(Path(cfg["data_dir"]) / "audit.db")


def pending(store: ApprovalStore, timeout: float = 15) -> Request:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reqs = store.requests("pending")
        if reqs:
            return reqs[0]
        time.sleep(0.05)
    raise AssertionError("no pending approval request")


class Held:
    """Runs statements on a connection in a thread; keeps the outcome and the notices."""

    def __init__(self, gw: GatewayProcess, *statements: str, autocommit: bool = True) -> None:
        self.conn = psycopg.connect(gw.dsn(user="ci", password="ci-pw"), autocommit=autocommit)
        self.notices: list[str] = []
        self.conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))
        self.error: Exception | None = None
        self.rows: list[Any] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=statements, daemon=True)
        self.thread.start()

    def _run(self, *statements: str) -> None:
        try:
            for s in statements:
                cur = self.conn.execute(s)
                if cur.description:
                    self.rows.append(cur.fetchall())
        except Exception as e:
            self.error = e
        finally:
            self.done.set()

    def wait(self, timeout: float = 15) -> None:
        assert self.done.wait(timeout), "the held statement never finished"


def value(pg: PgCluster, id_: int) -> str:
    with psycopg.connect(pg.dsn(dbname="app", user="app", password=APP_PASSWORD)) as c:
        row = c.execute("select v from apr_accounts where id = %s", (id_,)).fetchone()
    assert row is not None
    return str(row[0])


def test_held_statement_runs_once_approved_and_is_refused_when_denied(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, accounts: None
) -> None:
    cfg = approvals_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    store = store_of(cfg)
    held = Held(
        gw, "update apr_accounts set v = 'approved' where id = 1", "select v from apr_accounts where id = 1"
    )
    req = pending(store)
    assert not held.done.is_set() and value(pg, 1) != "approved"
    assert req.requester == "ci" and req.rule == "prod-writes" and req.grant == "ci-writes"
    assert req.statement == "update apr_accounts set v = 'approved' where id = 1"
    deadline = time.monotonic() + 5
    while not held.notices and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.notices and req.id in held.notices[0] and "approval required" in held.notices[0]
    # Reads need no approval, and other sessions are not held.
    with psycopg.connect(gw.dsn(user="ci", password="ci-pw")) as other:
        assert other.execute("select count(*) from apr_accounts").fetchone() == (3,)
    with pytest.raises(ApprovalError, match="own request"):
        store.vote(req.id, "ci", True, "self-service", 60)
    store.vote(req.id, "alice", True, "ticket OPS-1", 60)
    held.wait()
    assert held.error is None and held.rows == [[("approved",)]]
    assert store.get(req.id).state == "used"  # type: ignore[union-attr]

    # Denied: 42501 with the reason, and the session stays usable.
    deny = Held(gw, "delete from apr_accounts where id = 2")
    req2 = pending(store)
    store.vote(req2.id, "bob", False, "not during the freeze", 60)
    deny.wait()
    assert isinstance(deny.error, psycopg.errors.InsufficientPrivilege)
    assert "denied by bob: not during the freeze" in str(deny.error) and req2.id in str(deny.error)
    assert deny.conn.execute("select count(*) from apr_accounts").fetchone() == (3,)
    deny.conn.close()
    held.conn.close()
    assert gw.stop() == 0

    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ostiary.cli",
            "audit",
            "search",
            "--config",
            str(gw.config_path),
            "--json",
            "--limit",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    recs = [json.loads(x) for x in out.stdout.splitlines()]
    actions = [(r["data"]["action"], r["data"]["request"]) for r in recs if r["kind"] == "approval"]
    assert ("requested", req.id) in actions and ("used", req.id) in actions
    assert ("requested", req2.id) in actions
    stmt = [
        r for r in recs if r["kind"] == "statement" and r["data"].get("text", "").startswith("update apr")
    ]
    assert stmt and stmt[0]["data"]["approval"] == req.id and stmt[0]["data"]["rows"] == 0
    verify = subprocess.run(
        [sys.executable, "-m", "ostiary.cli", "audit", "verify", "--config", str(gw.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout


def test_cancel_ends_the_wait_and_the_statement_never_runs(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, accounts: None
) -> None:
    """psql's Ctrl-C (a CancelRequest) of a held statement was sent to the idle backend and changed
    nothing: the statement ran once approved. Now the wait ends with 57014, as PostgreSQL cancels a
    running statement; the session stays usable and a later approval does not run it."""
    cfg = approvals_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    store = store_of(cfg)
    before = value(pg, 1)
    held = Held(gw, "update apr_accounts set v = 'cancelled' where id = 1")
    req = pending(store)
    held.conn.cancel_safe()
    held.wait()
    assert isinstance(held.error, psycopg.errors.QueryCanceled), held.error
    assert held.conn.execute("select 1").fetchone() == (1,)
    store.vote(req.id, "alice", True, "too late", 60)
    time.sleep(0.5)
    assert value(pg, 1) == before != "cancelled"
    held.conn.close()


def test_a_client_that_leaves_while_held_takes_its_statement_with_it(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, accounts: None
) -> None:
    """A psql killed while its DELETE waited for approval left the session open, and the DELETE ran
    once approved, for nobody. The client's hang-up now ends the session and the statement never
    runs; the request stays pending (the same statement run again would pass once)."""
    cfg = approvals_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    store = store_of(cfg)
    before = value(pg, 2)
    held = Held(gw, "update apr_accounts set v = 'for nobody' where id = 2")
    req = pending(store)
    deadline = time.monotonic() + 5
    while not held.notices and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.notices
    # As a killed process: the socket closes with no Terminate.
    socket.socket(fileno=os.dup(held.conn.fileno())).shutdown(socket.SHUT_RDWR)
    held.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "waited for approval" not in gw.log():
        time.sleep(0.1)
    assert "the client left while its statement waited for approval" in gw.log()
    store.vote(req.id, "alice", True, "for nobody", 60)
    time.sleep(0.5)
    assert value(pg, 2) == before != "for nobody"
    assert store.get(req.id).state == "approved"  # type: ignore[union-attr]


def test_held_statements_must_be_valid_utf8(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, accounts: None
) -> None:
    """In LATIN1, 'é' and 'è' are bytes the data path cannot decode as UTF-8: both read as U+FFFD,
    so an approval of one would bind the other's text too. A statement an approval rule holds must
    be valid UTF-8; others are untouched."""
    cfg = approvals_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    store = store_of(cfg)
    with psycopg.connect(gw.dsn(user="ci", password="ci-pw"), autocommit=True, client_encoding="latin1") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must be valid UTF-8"):
            c.execute("update apr_accounts set v = 'café' where id = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must be valid UTF-8"):
            c.execute("update apr_accounts set v = %s where id = 1", ("café",), prepare=True)
        assert c.execute("select 'café'").fetchone() == ("café",)
    assert not store.requests("pending")


def test_binary_parameters_the_gateway_cannot_show_are_refused_when_held(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, accounts: None
) -> None:
    """Found by a hunt: a binary parameter of undeclared type was shown as hex, like a text
    parameter holding that hex, so an approval of the text `\\x6f72696734` ran the binary 'orig4'
    (a row the approved value could never match). Such parameters are refused when held; binary
    text parameters of a declared type read as their text."""
    import struct

    from pgraw import SYNC, RawConn, cstr, errors_in, execute, parse, typed

    cfg = approvals_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    store = store_of(cfg)

    def binary_bind(value: bytes) -> bytes:
        body = cstr("") + cstr("") + struct.pack("!hh", 1, 1) + struct.pack("!h", 1)
        return typed(b"B", body + struct.pack("!i", len(value)) + value + struct.pack("!h", 0))

    c = RawConn(gw.port)
    c.start_tls(gw.tls.ca_cert)
    with c:
        c.login("ci", "ci-pw")
        c.send(
            parse("", "update apr_accounts set v = 'x' where v = $1")
            + binary_bind(b"orig4")
            + execute()
            + SYNC
        )
        errors = errors_in(c.until_ready())
        assert [e["C"] for e in errors] == ["42501"] and "binary parameter" in errors[0]["M"], errors
    assert not store.requests("pending")


def test_expiry_and_two_approvals(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, accounts: None
) -> None:
    cfg = approvals_config(pg, gateway_tls, tmp_path, timeout=1.5, required=2)
    gw = gateway_factory(config=cfg)
    store = store_of(cfg)
    held = Held(gw, "update apr_accounts set v = 'late' where id = 3")
    req = pending(store)
    store.vote(req.id, "alice", True, "", 60)
    held.wait(10)
    assert isinstance(held.error, psycopg.errors.InsufficientPrivilege)
    assert "expired" in str(held.error)
    assert store.get(req.id).state == "expired"  # type: ignore[union-attr]
    assert value(pg, 3) != "late"
    held.conn.close()

    cfg2 = approvals_config(pg, gateway_tls, tmp_path / "two", required=2)
    gw2 = gateway_factory(config=cfg2)
    store2 = store_of(cfg2)
    held2 = Held(gw2, "update apr_accounts set v = 'two' where id = 3")
    req2 = pending(store2)
    store2.vote(req2.id, "alice", True, "", 60)
    time.sleep(1.5)
    assert not held2.done.is_set()  # one of two approvals: still held
    with pytest.raises(ApprovalError, match="already decided"):
        store2.vote(req2.id, "alice", True, "", 60)
    store2.vote(req2.id, "bob", True, "", 60)
    held2.wait()
    assert held2.error is None and value(pg, 3) == "two"
    held2.conn.close()


def test_grant_scope_lets_later_statements_through_and_transactions_and_extended_protocol_hold(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, accounts: None
) -> None:
    cfg = approvals_config(pg, gateway_tls, tmp_path, scope="grant", grant_minutes=1)
    gw = gateway_factory(config=cfg)
    store = store_of(cfg)
    # Inside a transaction block, in the extended protocol (psycopg binds the parameter).
    conn = psycopg.connect(gw.dsn(user="ci", password="ci-pw"))
    result: dict[str, Any] = {}

    def txn() -> None:
        try:
            with conn.transaction():
                conn.execute("update apr_accounts set v = %s where id = %s", ("tx", 2))
            result["ok"] = True
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=txn, daemon=True)
    t.start()
    req = pending(store)
    assert req.scope == "grant" and "$1" in req.statement and req.params[0] == "tx"
    store.vote(req.id, "bob", True, "hotfix window", 60)
    t.join(15)
    assert result == {"ok": True} and value(pg, 2) == "tx"
    # The grant-scoped approval covers the next writes of this requester without a new request.
    unheld(lambda: (conn.execute("delete from apr_accounts where id = 99"), conn.commit()))
    assert [r.id for r in store.requests()] == [req.id]  # no new request: not held
    conn.close()


def test_a_client_that_leaves_while_held_leaves_the_request_pending(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, accounts: None
) -> None:
    cfg = approvals_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    store = store_of(cfg)
    held = Held(gw, "update apr_accounts set v = 'gone' where id = 1")
    req = pending(store)
    held.conn.pgconn.finish()  # the client goes away mid-hold
    held.wait()
    time.sleep(0.5)
    assert store.get(req.id).state == "pending"  # type: ignore[union-attr]
    # Approved later, the same statement run again by the requester passes once, without a new hold.
    store.vote(req.id, "alice", True, "", 60)
    with psycopg.connect(gw.dsn(user="ci", password="ci-pw"), autocommit=True) as c:
        c.execute("update apr_accounts set v = 'gone' where id = 1")
    assert value(pg, 1) == "gone" and store.get(req.id).state == "used"  # type: ignore[union-attr]
    assert gw.stop() == 0


@pytest.fixture()
def store_cluster(tmp_path: Path) -> Any:
    cluster = PgCluster(tmp_path / "store-pg", tls=False)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_two_gateways_sharing_a_store_and_a_restart_while_pending(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    accounts: None,
    store_cluster: PgCluster,
) -> None:
    dsn = store_cluster.dsn(dbname="postgres")
    cfgs = []
    for i in range(2):
        cfg = approvals_config(pg, gateway_tls, tmp_path / f"gw{i}")
        cfg["audit"] = {"store": "postgres", "dsn": dsn, "flush_interval": 0.05}
        cfgs.append(cfg)
    a, b = (gateway_factory(config=c) for c in cfgs)
    store = ApprovalStore.postgres(dsn)
    # Held on gateway a; decided by the other gateway's store connection: a wakes on NOTIFY.
    held = Held(a, "update apr_accounts set v = 'fleet' where id = 2")
    req = pending(store)
    assert req.gateway and req.state == "pending"
    other = ApprovalStore.postgres(dsn)
    other.vote(req.id, "alice", True, "fleet approval", 60)
    held.wait()
    assert held.error is None and value(pg, 2) == "fleet"
    assert "decided through another gateway (NOTIFY)" in a.log()
    held.conn.close()

    # Restart while pending: the client is told, the request survives, approved later it runs once.
    held = Held(b, "update apr_accounts set v = 'after restart' where id = 2")
    req = pending(store)
    assert b.stop() == 0
    held.wait()
    assert isinstance(held.error, psycopg.errors.AdminShutdown)
    assert any(req.id in n and "stays pending" in n for n in held.notices), held.notices
    assert store.get(req.id).state == "pending"  # type: ignore[union-attr]
    b2 = gateway_factory(config=cfgs[1])
    store.vote(req.id, "bob", True, "", 60)
    with psycopg.connect(b2.dsn(user="ci", password="ci-pw"), autocommit=True) as c:
        c.execute("update apr_accounts set v = 'after restart' where id = 2")
    assert value(pg, 2) == "after restart" and store.get(req.id).state == "used"  # type: ignore[union-attr]
    for gw in (a, b2):
        assert gw.stop() == 0
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "ostiary.cli", "audit", "verify", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout


def test_extended_protocol_approvals_bind_the_parameters(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, accounts: None
) -> None:
    cfg = approvals_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    store = store_of(cfg)
    conn = psycopg.connect(gw.dsn(user="ci", password="ci-pw"), autocommit=True)
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    sql = "update apr_accounts set v = %s where id = 3"

    def run(value: str, out: dict[str, Any]) -> threading.Thread:
        def go() -> None:
            try:
                conn.execute(sql, (value,))
                out["ok"] = True
            except Exception as e:
                out["error"] = e

        t = threading.Thread(target=go, daemon=True)
        t.start()
        return t

    first: dict[str, Any] = {}
    t = run("bound-1", first)
    req = pending(store)
    assert req.statement == "update apr_accounts set v = $1 where id = 3" and req.params == ["bound-1"]
    store.vote(req.id, "alice", True, "", 60)
    t.join(15)
    assert first == {"ok": True} and value(pg, 3) == "bound-1"
    assert any("with parameters ('bound-1')" in n for n in notices), notices
    # The same prepared statement with another value is another request.
    second: dict[str, Any] = {}
    t = run("bound-2", second)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not [r for r in store.requests("pending") if r.id != req.id]:
        time.sleep(0.05)
    req2 = store.requests("pending")[0]
    assert req2.id != req.id and req2.params == ["bound-2"]
    store.vote(req2.id, "bob", False, "wrong value", 60)
    t.join(15)
    assert isinstance(second.get("error"), psycopg.errors.InsufficientPrivilege)
    assert value(pg, 3) == "bound-1"
    assert conn.execute("select 1").fetchone() == (1,)
    conn.close()


def test_unqualified_names_are_held_by_rules_on_their_schema_and_sql_prepare_is_refused(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, accounts: None
) -> None:
    """A rule on `public.*` let `update apr_accounts ...` (unqualified) run unheld: names are
    matched as written, and the default search_path finds it in public. Refusing and holding
    rules now also see an unqualified name in the schemas it can resolve to. And an SQL PREPARE
    approved once let every EXECUTE run with any values: refused, where a protocol-level prepare
    holds each execution."""
    cfg = approvals_config(
        pg, gateway_tls, tmp_path, match={"kinds": ["update", "delete"], "relations": ["public.*"]}
    )
    gw = gateway_factory(config=cfg)
    store = store_of(cfg)
    before = value(pg, 3)
    held = Held(gw, "update apr_accounts set v = 'held' where id = 3")
    req = pending(store)
    assert req.statement == "update apr_accounts set v = 'held' where id = 3"
    store.vote(req.id, "alice", False, "no", 60)
    held.wait()
    assert isinstance(held.error, psycopg.errors.InsufficientPrivilege)
    assert value(pg, 3) == before != "held"
    with psycopg.connect(gw.dsn(user="ci", password="ci-pw"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="cannot be prepared with SQL PREPARE"):
            c.execute("prepare p(int) as delete from apr_accounts where id = $1")
        c.execute("prepare r as select v from apr_accounts where id = 1")  # nothing to hold
        # SQL EXECUTE could as well run a statement prepared through the protocol, whose
        # executions are held there: refused in sessions with approval rules.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="SQL EXECUTE is refused"):
            c.execute("execute r")
        assert not store.requests("pending")
    with psycopg.connect(gw.dsn(user="ci", password="ci-pw"), autocommit=True) as c:
        # A statement prepared through the protocol (its executions held) and run by SQL EXECUTE:
        # refused, as the hunt ran it with a raw Parse.
        prepared = c.pgconn.prepare(b"s1", b"update apr_accounts set v = $1 where id = $2")
        assert prepared.status == psycopg.pq.ExecStatus.COMMAND_OK, prepared.error_message
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="SQL EXECUTE is refused"):
            c.execute("execute s1('bypass', 1)")
        assert value(pg, 1) != "bypass"
    held.conn.close()
