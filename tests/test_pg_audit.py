"""The audit trail end to end: real psql and psycopg sessions through the gateway write every record
type; `ostiary audit verify` accepts the trail and catches each kind of tampering; a crash under
pgbench load leaves a chain that verifies (and, in sync mode, a record for every statement whose
result reached its client); the store going away refuses statements or spools, and nothing is lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import APP_PASSWORD, GatewayFactory, GatewayProcess, gateway_config, psql
from ostiary.approvals.store import ApprovalStore
from ostiary.devcluster import PgCluster, TlsMaterial

OPS = "ops"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ostiary.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def audit_config(pg: PgCluster, tls: TlsMaterial, tmp: Path, **audit: Any) -> dict[str, Any]:
    cfg = gateway_config(pg, tls, 0, tmp, grants=[])
    cfg["clients"] = [{"user": OPS, "password": "ops-pw"}]
    cfg["masking"] = [{"name": "pii", "detectors": ["email"]}]
    cfg["connections"][0]["masking"] = ["pii"]
    cfg["guardrails"] = [
        {"name": "no-secrets", "match": {"relations": ["secret.*"]}, "message": "off limits"}
    ]
    cfg["grants"] = [
        {
            "name": "ops-writes",
            "identities": [OPS],
            "connection": "app",
            "access": "read-write",
            "guardrails": ["no-destructive-ddl", "no-secrets"],
        }
    ]
    cfg["audit"] = {"checkpoint_interval": 0.5, "flush_interval": 0.05, **audit}
    return cfg


def records(cfg_path: Path, *args: str) -> list[dict[str, Any]]:
    r = cli("audit", "search", "--config", str(cfg_path), "--json", "--limit", "100000", *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()][::-1]


def wait_for(pred: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def ops_env(gw: GatewayProcess) -> dict[str, Any]:
    return {"user": OPS, "password": "ops-pw"}


@pytest.fixture(scope="module")
def tables(pg: PgCluster) -> None:
    pg.execute(
        "create table if not exists audit_people(id int primary key, email text);"
        "truncate audit_people;"
        "insert into audit_people values (1, 'ann@example.com'), (2, 'bob@example.com');"
        "create schema if not exists secret; create table if not exists secret.keys(k text);",
        dbname="app",
        user="app",
        password=APP_PASSWORD,
    )


def test_every_record_type_is_written_by_real_sessions_and_verifies(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, tables: None
) -> None:
    cfg = audit_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    bad = psql(gw, "-c", "select 1", user=OPS, password="wrong-password")
    assert bad.returncode != 0
    # A dotted static password is not a token: its hash is not kept (guessable offline).
    dotted = psql(gw, "-c", "select 1", user=OPS, password="prod.db.password-for-svc-2024-rotate-me")
    assert dotted.returncode != 0
    script = (
        "select id, email from audit_people order by id;\n"
        "select 1 as a \\; select 2 as b;\n"
        "select * from secret.keys;\n"
        "select 1/0;\n"
        "drop table audit_people;\n"
        "select count(*) from audit_people;\n"
    )
    shown = subprocess.run(
        ["psql", "-X", "-q", "-f", "-"],
        input=script,
        env=gw.env(user=OPS, password="ops-pw"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "(2 rows)" in shown.stdout and "ann@example.com" not in shown.stdout  # masked
    with psycopg.connect(gw.dsn(user=OPS, password="ops-pw")) as conn:
        conn.execute("select %s::int + %s::int as sum", (40, 2), prepare=True)
        conn.execute("select %s::text", ("secret-param",), prepare=True)
    assert gw.stop() == 0
    path = gw.config_path
    recs = records(path)
    kinds = {r["kind"] for r in recs}
    assert {"writer_start", "policy", "auth", "session_start", "statement", "session_end", "admin"} <= kinds

    auths = [r for r in recs if r["kind"] == "auth"]
    refused = [r for r in auths if r["verdict"] == "deny"]
    assert refused and refused[0]["data"]["code"] == "28P01" and refused[0]["connection"] == "app"
    assert all("wrong-password" not in json.dumps(r) and "ops-pw" not in json.dumps(r) for r in recs)
    assert len(refused) == 2 and not any("token_sha256" in r["data"] for r in auths), auths
    allowed = [r for r in auths if r["verdict"] == "allow"]
    assert allowed and allowed[0]["identity"] == OPS and allowed[0]["rule"] == "ops-writes"

    starts = [r for r in recs if r["kind"] == "session_start"]
    assert len(starts) == 2 and starts[0]["data"]["peer"].startswith("127.0.0.1")
    assert starts[0]["data"]["tls"] and starts[0]["data"]["recording"].endswith(".rec")
    assert starts[0]["data"]["settings"]["application_name"] == "psql", starts[0]["data"]
    stmts = [r for r in recs if r["kind"] == "statement" and r["session"] == starts[0]["session"]]
    by_text = {r["data"]["text"].strip(): r for r in stmts}
    sel = by_text["select id, email from audit_people order by id;"]
    assert sel["verdict"] == "allow" and sel["rule"] == "ops-writes" and sel["identity"] == OPS
    assert sel["data"]["rows"] == 2 and sel["data"]["tag"] == "SELECT 2" and sel["data"]["outcome"] == "ok"
    assert sel["data"]["duration_us"] >= 0 and sel["data"]["bytes"] > 0
    multi = next(r for t, r in by_text.items() if t.startswith("select 1 as a"))
    assert multi["data"]["commands"] == 2 and multi["data"]["rows"] == 2
    denied = by_text["select * from secret.keys;"]
    assert denied["verdict"] == "deny" and denied["rule"] == "no-secrets"
    assert denied["data"]["denied"]["code"] == "42501" and denied["data"]["error"]["code"] == "42501"
    drop = by_text["drop table audit_people;"]
    assert drop["verdict"] == "deny" and drop["rule"] == "no-destructive-ddl"
    err = by_text["select 1/0;"]
    assert err["data"]["outcome"] == "error" and err["data"]["error"]["code"] == "22012"
    # psycopg's prepared statements: one record per execution with its parameters.
    execs = [r for r in recs if r["kind"] == "statement" and r["data"]["type"] == "execute"]
    # psycopg sends these ints in binary (int2, typed in its Parse): recorded as the numbers.
    assert any(r["data"].get("params") == ["40", "2"] and r["data"]["rows"] == 1 for r in execs)
    assert any(r["data"].get("params") == ["secret-param"] for r in execs)
    ends = [r for r in recs if r["kind"] == "session_end"]
    assert len(ends) == 2 and ends[0]["data"]["masked"] == {"pii": 2}
    assert ends[0]["data"]["bytes_to_client"] > 0 and ends[0]["data"]["statements"] >= 6
    assert any(r["kind"] == "admin" and r["data"]["action"] == "shutdown" for r in recs)
    pol = [r for r in recs if r["kind"] == "policy"]
    assert pol and len(pol[0]["data"]["version"]) == 64
    snap = pol[0]["data"]["snapshot"]
    assert [g["name"] for g in snap["grants"]] == ["ops-writes"] and snap["grants"][0]["identities"] == [OPS]
    assert snap["connections"][0]["roles"] == ["app"] and APP_PASSWORD not in json.dumps(snap)

    ok = cli("audit", "verify", "--config", str(path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout and "signed through seq" in ok.stdout

    # Search filters.
    assert {r["kind"] for r in records(path, "--kind", "auth")} == {"auth"}
    assert all(r["verdict"] == "deny" for r in records(path, "--verdict", "deny"))
    assert [r["rule"] for r in records(path, "--rule", "no-secrets")] == ["no-secrets"]
    assert len(records(path, "--text", "audit_people", "--kind", "statement")) >= 3
    table = cli("audit", "search", "--config", str(path), "--identity", OPS, "--since", "1h")
    assert table.returncode == 0 and "ops-writes" in table.stdout and "records" in table.stdout
    assert records(path, "--until", "1d") == []

    # The recording replays as psql showed it (the second session was psycopg's).
    ref = starts[0]["session"]
    replay = cli("sessions", "replay", ref, "--config", str(path))
    assert replay.returncode == 0, replay.stderr
    for line in shown.stdout.splitlines():
        assert line in replay.stdout


def test_tampering_is_caught_and_named(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    cfg = audit_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    for i in range(5):
        r = psql(gw, "-c", f"select {i}", user=OPS, password="ops-pw")
        assert r.returncode == 0, r.stderr
    assert gw.stop() == 0
    data_dir = Path(cfg["data_dir"])
    db = data_dir / "audit.db"
    key = tmp_path / "audit.pub"
    exported = cli("audit", "export-key", "--config", str(gw.config_path))
    assert exported.returncode == 0 and "BEGIN PUBLIC KEY" in exported.stdout
    key.write_text(exported.stdout)
    heads = [str(p) for p in (data_dir / "audit").glob("head-*.json")]
    assert heads

    def verify(store: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        args = ["audit", "verify", "--store", str(store), "--key", str(key)]
        for h in heads:
            args += ["--head", h]
        return cli(*args, *extra)

    ok = verify(db)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    def tampered(name: str, sql: str, *args: Any) -> subprocess.CompletedProcess[str]:
        copy = tmp_path / f"{name}.db"
        shutil.copy(db, copy)
        with sqlite3.connect(copy) as c:
            for one in sql.split(";"):
                c.execute(one, args[: one.count("?")])
                args = args[one.count("?") :]
        return verify(copy)

    with sqlite3.connect(db) as c:
        rows = c.execute("select id, seq, body from audit_records order by seq").fetchall()
        last_seq = rows[-1][1]
    mid = rows[len(rows) // 2]
    body = bytes(mid[2]).replace(b'"ts":', b'"ts":1', 1)
    cases = {
        "edit-body": ("update audit_records set body = ? where seq = ?", body, mid[1]),
        "edit-column": ("update audit_records set identity = 'someone-else' where seq = ?", mid[1]),
        "delete": ("delete from audit_records where seq = ?", mid[1]),
        "reorder": (
            "update audit_records set seq = -1 where seq = ?;"
            "update audit_records set seq = ? where seq = ?;"
            "update audit_records set seq = ? where seq = -1",
            mid[1],
            mid[1],
            mid[1] + 1,
            mid[1] + 1,
        ),
        "truncate": ("delete from audit_records where seq > ?", last_seq - 3),
    }
    for name, (sql, *args) in cases.items():
        r = tampered(name, sql, *args)
        assert r.returncode == 1, (name, r.stdout)
        if name == "truncate":
            assert "truncated" in r.stdout, r.stdout
        else:
            named = (f"record seq {mid[1]} ", f"record seq {mid[1] + 1} ")
            assert any(n in r.stdout for n in named), (name, r.stdout)

    # Insert: a well-formed record of its own, slipped between two others.
    copy = tmp_path / "insert.db"
    shutil.copy(db, copy)
    from ostiary.audit.records import Chain

    with sqlite3.connect(copy) as c:
        writer, seq, prev = c.execute(
            "select writer, seq, hash from audit_records where seq = ?", (mid[1],)
        ).fetchone()
        c.execute("update audit_records set seq = -(seq + 1) where writer = ? and seq > ?", (writer, seq))
        c.execute("update audit_records set seq = -seq where writer = ? and seq < 0", (writer,))
        fake = Chain(writer, seq, prev).seal("admin", 1, data={"action": "nothing to see"})
        c.execute(
            "insert into audit_records (writer, seq, ts, kind, session, identity, connection, verdict, "
            "rule, body, hash) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            fake.row(),
        )
    r = verify(copy)
    assert r.returncode == 1 and f"record seq {seq + 2}" in r.stdout, r.stdout

    # A checkpoint altered, and a key that is not the writer's.
    r = tampered("checkpoint", "update audit_checkpoints set seq = seq - 1")
    assert r.returncode == 1 and "bad signature" in r.stdout, r.stdout
    other = tmp_path / "other.pub"
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ostiary.audit.keys import public_pem

    other.write_text(public_pem(Ed25519PrivateKey.generate().public_key()))
    r = cli("audit", "verify", "--store", str(db), "--key", str(other))
    assert r.returncode == 1 and "not among the verifying keys" in r.stdout
    # Truncating records and checkpoints together still shows against the head file.
    copy = tmp_path / "both.db"
    shutil.copy(db, copy)
    with sqlite3.connect(copy) as c:
        c.execute("delete from audit_records where seq > ?", (last_seq - 3,))
        c.execute("delete from audit_checkpoints")
    r = verify(copy)
    assert r.returncode == 1 and "truncated" in r.stdout, r.stdout


def run_marker_client(gw: GatewayProcess, stop: threading.Event, acked: list[tuple[str, float]]) -> None:
    """Runs numbered marker statements until the gateway dies; keeps those whose result arrived."""
    n = 0
    try:
        with psycopg.connect(gw.dsn(user=OPS, password="ops-pw"), autocommit=True) as conn:
            while not stop.is_set():
                marker = f"marker-{n}"
                conn.execute(f"select '{marker}'").fetchone()
                acked.append((marker, time.time()))
                n += 1
    except psycopg.Error:
        return


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_crash_under_pgbench_load_leaves_a_verifiable_chain(
    mode: str, gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    cfg = audit_config(pg, gateway_tls, tmp_path, mode=mode)
    cfg["grants"][0]["guardrails"] = []
    cfg["connections"][0].pop("masking")
    gw = gateway_factory(config=cfg)
    env = gw.env(user=OPS, password="ops-pw")
    init = subprocess.run(
        ["pgbench", "-i", "-q", "-s", "1", "--no-vacuum"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    bench = subprocess.Popen(
        ["pgbench", "-S", "-c", "4", "-T", "30", "-n"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop = threading.Event()
    acked: list[tuple[str, float]] = []
    killed_at: list[float] = []
    t = threading.Thread(target=run_marker_client, args=(gw, stop, acked))
    t.start()
    wait_for(lambda: len(acked) > 200, timeout=30)
    time.sleep(1.5)
    killed_at.append(time.time())
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait()
    stop.set()
    t.join(10)
    bench.kill()
    bench.wait()
    # Restart on the same data directory: the chain continues and verifies.
    gw2 = gateway_factory(config=json.loads(json.dumps(cfg)))
    r = psql(gw2, "-c", "select 'after restart'", user=OPS, password="ops-pw")
    assert r.returncode == 0, r.stderr
    assert gw2.stop() == 0
    ok = cli("audit", "verify", "--config", str(gw2.config_path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    recs = records(gw2.config_path, "--kind", "statement", "--text", "marker-")
    recorded = {r["data"]["text"].split("'")[1] for r in recs}
    starts = records(gw2.config_path, "--kind", "writer_start")
    assert len({r["writer"] for r in starts}) == 1 and len(starts) == 2
    # The restart says the run before it was killed; the clean stop of the restart is recorded.
    starts.sort(key=lambda r: r["seq"])
    assert "previous_stop" not in starts[0]["data"] and starts[1]["data"]["previous_stop"] == "unclean"
    assert "ended without a clean stop" in gw2.log()
    stops = records(gw2.config_path, "--kind", "writer_stop")
    assert [r["data"]["run"] for r in stops] == [starts[1]["data"]["run"]]
    if mode == "sync":
        # Every statement whose result reached the client has its record.
        missing = [m for m, _ in acked if m not in recorded]
        assert not missing, missing[:5]
    else:
        # At most the records of the last flush_interval (0.05 s here), the workers' batching
        # (20 ms) and the batch being written are lost; 1 s leaves room for a loaded machine.
        old = [m for m, t in acked if t < killed_at[0] - 1.0]
        assert len(old) > 100
        lost = [m for m in old if m not in recorded]
        assert not lost, lost[:5]


def test_sync_mode_runs_nothing_unrecorded_and_async_is_the_default(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    cfg = audit_config(pg, gateway_tls, tmp_path, mode="sync")
    gw = gateway_factory(config=cfg)
    with psycopg.connect(gw.dsn(user=OPS, password="ops-pw")) as conn:
        for i in range(20):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        conn.execute("select 1; select 2")
    assert gw.stop() == 0
    recs = records(gw.config_path)
    stmts = [r for r in recs if r["kind"] == "statement"]
    results = [r for r in recs if r["kind"] == "result"]
    assert len(stmts) >= 21 and len(results) == len(stmts)
    # Each statement's record precedes its result's in the chain.
    by_seq = {(r["session"], r["data"]["seq"]): r["seq"] for r in stmts}
    assert all(by_seq[(r["session"], r["data"]["seq"])] < r["seq"] for r in results)
    assert cli("audit", "verify", "--config", str(gw.config_path)).returncode == 0


@pytest.fixture()
def store_cluster(tmp_path: Path) -> Any:
    cluster = PgCluster(tmp_path / "store-pg", tls=False)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def store_dsn(c: PgCluster) -> str:
    return c.dsn(dbname="postgres")


@pytest.mark.slow
def test_postgres_store_fleet_chains_verify_together_and_refuse_while_down(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    store_cluster: PgCluster,
) -> None:
    dsn = store_dsn(store_cluster)
    gws = []
    for i in range(2):
        cfg = audit_config(pg, gateway_tls, tmp_path / f"gw{i}", store="postgres", dsn=dsn)
        gws.append(gateway_factory(config=cfg))
    for gw in gws:
        assert psql(gw, "-c", "select 'fleet'", user=OPS, password="ops-pw").returncode == 0
    # The store goes away: statements are refused with a clear error, then it returns.
    with psycopg.connect(gws[0].dsn(user=OPS, password="ops-pw"), autocommit=True) as conn:
        conn.execute("select 'before outage'")
        store_cluster.stop()
        time.sleep(0.5)

        def refused() -> bool:
            try:
                conn.execute("select 'during outage'")
            except psycopg.Error as e:
                return "audit trail" in str(e)
            time.sleep(0.1)
            return False

        wait_for(refused, timeout=15)
        store_cluster.start()

        def works() -> bool:
            try:
                conn.execute("select 'after outage'")
                return True
            except psycopg.Error:
                time.sleep(0.2)
                return False

        wait_for(works, timeout=20)
    login = psql(gws[0], "-c", "select 1", user=OPS, password="ops-pw")
    assert login.returncode == 0, login.stderr
    for gw in gws:
        assert gw.stop() == 0
    r = cli("audit", "verify", "--dsn", dsn)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("OK") == 2
    found = cli("audit", "search", "--dsn", dsn, "--json", "--text", "outage", "--kind", "statement")
    texts = [json.loads(x)["data"]["text"] for x in found.stdout.splitlines()]
    assert "select 'before outage'" in texts and "select 'after outage'" in texts
    assert any(json.loads(x)["verdict"] == "deny" for x in found.stdout.splitlines())


@pytest.mark.slow
def test_spool_keeps_statements_running_and_replays_with_the_chain_intact(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    store_cluster: PgCluster,
) -> None:
    dsn = store_dsn(store_cluster)
    cfg = audit_config(pg, gateway_tls, tmp_path, store="postgres", dsn=dsn, on_failure="spool", mode="sync")
    gw = gateway_factory(config=cfg)
    with psycopg.connect(gw.dsn(user=OPS, password="ops-pw"), autocommit=True) as conn:
        conn.execute("select 'spool-0'")
        store_cluster.stop()
        for i in range(1, 30):
            assert conn.execute(f"select 'spool-{i}'").fetchone() == (f"spool-{i}",)
        spool = list((Path(cfg["data_dir"]) / "audit" / "spool").glob("*.jsonl"))
        assert spool and spool[0].stat().st_size > 0
        store_cluster.start()
        wait_for(lambda: not spool[0].exists(), timeout=20)
        conn.execute("select 'spool-after'")
    assert gw.stop() == 0
    r = cli("audit", "verify", "--dsn", dsn)
    assert r.returncode == 0, r.stdout + r.stderr
    found = cli("audit", "search", "--dsn", dsn, "--json", "--text", "spool-", "--kind", "statement")
    texts = {json.loads(x)["data"]["text"] for x in found.stdout.splitlines()}
    assert {f"select 'spool-{i}'" for i in range(30)} <= texts and "select 'spool-after'" in texts


def freeze(cluster: PgCluster, sig: int) -> list[int]:
    """Sends ``sig`` to the cluster's postmaster and every child of it (backends included)."""
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True)
    pids = [postmaster, *(int(p) for p in children.stdout.split())]
    for pid in pids:
        os.kill(pid, sig)
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("mode,on_failure", [("async", "refuse"), ("sync", "refuse"), ("sync", "spool")])
def test_a_frozen_postgres_store_fails_closed_and_recovers_when_it_thaws(
    mode: str,
    on_failure: str,
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    store_cluster: PgCluster,
) -> None:
    # A SIGSTOPped server answers nothing and refuses nothing (a network blackhole): writes must
    # fail at store_timeout, as a refused connection does, not hang with statements still running.
    dsn = store_dsn(store_cluster)
    cfg = audit_config(
        pg,
        gateway_tls,
        tmp_path,
        store="postgres",
        dsn=dsn,
        mode=mode,
        on_failure=on_failure,
        store_timeout=1,
        sync_timeout=3,
    )
    gw = gateway_factory(config=cfg)
    ran: list[str] = []
    with psycopg.connect(gw.dsn(user=OPS, password="ops-pw"), autocommit=True) as conn:
        conn.execute("select 'frozen-before'")
        ran.append("frozen-before")
        pids = freeze(store_cluster, signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            refused_after = None
            for i in range(100_000):
                text = f"frozen-during-{i}"
                try:
                    conn.execute(f"select '{text}'")
                except psycopg.Error as e:
                    assert "audit trail" in str(e), e
                    refused_after = time.monotonic() - frozen_at
                    break
                ran.append(text)
                if on_failure == "spool" and i == 20:
                    break
            if on_failure == "refuse":
                # store_timeout (1 s), a flush and a retry at most; a sync statement does not wait
                # out sync_timeout (3 s), let alone the freeze.
                assert refused_after is not None and refused_after < 2.5, refused_after
                login = psql(gw, "-c", "select 'frozen-login'", user=OPS, password="ops-pw")
                assert login.returncode != 0 and "audit trail is unavailable" in login.stderr, login.stderr
            else:
                assert refused_after is None and len(ran) == 22
                spool = list((Path(cfg["data_dir"]) / "audit" / "spool").glob("*.jsonl"))
                assert spool and spool[0].stat().st_size > 0
            time.sleep(1.5)  # frozen a while longer: retries must not pile up or recover early
        finally:
            freeze(store_cluster, signal.SIGCONT)
        assert pids

    # Thawed: the gateway recovers as after a restart of the store.
    def works() -> bool:
        try:
            with psycopg.connect(gw.dsn(user=OPS, password="ops-pw"), autocommit=True) as c:
                c.execute("select 'frozen-after'")
            return True
        except psycopg.Error:
            time.sleep(0.2)
            return False

    wait_for(works, timeout=20)
    ran.append("frozen-after")
    if on_failure == "spool":
        spooled = Path(cfg["data_dir"]) / "audit" / "spool"
        wait_for(lambda: not list(spooled.glob("*.jsonl")), timeout=20)
    assert gw.stop() == 0
    r = cli("audit", "verify", "--dsn", dsn)
    assert r.returncode == 0, r.stdout + r.stderr
    found = cli(
        "audit",
        "search",
        "--dsn",
        dsn,
        "--json",
        "--limit",
        "1000000",
        "--text",
        "frozen-",
        "--kind",
        "statement",
    )
    texts = [json.loads(x)["data"]["text"] for x in found.stdout.splitlines()]
    recorded = {t.split("'")[1] for t in texts}
    # Every statement that ran has its record, once; nothing was dropped.
    missing = [t for t in ran if t not in recorded]
    assert not missing, missing[:5]
    allowed = [json.loads(x) for x in found.stdout.splitlines() if json.loads(x)["verdict"] == "allow"]
    assert len(allowed) == len({r["data"]["text"] for r in allowed})
    lost = cli("audit", "search", "--dsn", dsn, "--json", "--kind", "admin", "--text", "records_lost")
    assert lost.stdout.strip() == ""


@pytest.mark.slow
def test_a_frozen_approval_store_refuses_the_held_statement_at_store_timeout(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    store_cluster: PgCluster,
) -> None:
    """The approval store is the audit store's database. Frozen (a stopped server, a network black
    hole), a statement that needs an approval used to wait for it for good; now it is refused at
    store_timeout, and approvals work again once the store answers. The audit trail spools
    meanwhile, so what is measured is the approvals' own bound."""
    dsn = store_dsn(store_cluster)
    cfg = audit_config(
        pg, gateway_tls, tmp_path, store="postgres", dsn=dsn, on_failure="spool", store_timeout=1
    )
    cfg["clients"].append({"user": "alice", "password": "alice-pw"})
    cfg["approvals"] = [
        {"name": "writes", "match": {"kinds": ["update"]}, "approvers": ["alice"], "timeout": 30}
    ]
    cfg["grants"][0]["approvals"] = ["writes"]
    gw = gateway_factory(config=cfg)
    pg.execute(
        "create table if not exists frozen_apr(id int); truncate frozen_apr; "
        "insert into frozen_apr values (1)",
        dbname="app",
        user="app",
        password=APP_PASSWORD,
    )
    with psycopg.connect(gw.dsn(user=OPS, password="ops-pw"), autocommit=True) as conn:
        conn.execute("select 'before the freeze'")
        freeze(store_cluster, signal.SIGSTOP)
        try:
            for i in (2, 3):
                # In a thread, so that a statement that hangs fails the test instead of hanging it.
                started = time.monotonic()
                out: list[Any] = []
                sql = f"update frozen_apr set id = {i}"
                t = threading.Thread(target=lambda o, q: o.append(_run_catching(conn, q)), args=(out, sql))
                t.start()
                t.join(8)
                assert not t.is_alive(), "the statement waited on the frozen approval store"
                # store_timeout (1 s), not the freeze (nor TCP's retransmission timeout); the
                # second while the first store call is still stuck (no new thread piles up).
                assert time.monotonic() - started < 4
                assert "approval store is unavailable" in str(out[0]), out
                # The session stays usable.
                assert conn.execute("select 'during the freeze'").fetchone() == ("during the freeze",)
        finally:
            freeze(store_cluster, signal.SIGCONT)

        # Thawed: such a statement is held for approval again (a request in the store) once the
        # store answers; until then it is refused at once.
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        deadline = time.monotonic() + 20
        while True:
            box: list[Any] = []
            t = threading.Thread(
                target=lambda out=box: out.append(_run_catching(conn, "update frozen_apr set id = 4"))
            )
            t.start()
            while not notices and t.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if notices or time.monotonic() > deadline:
                break
            t.join()
            assert "approval store is unavailable" in str(box[0]), box
        found = re.search(r"held as request (apr-[0-9a-f]+)", notices[0] if notices else "")
        assert found, notices
        store = ApprovalStore.postgres(dsn)
        try:
            assert store.finish(found.group(1), "denied", "test") is not None
        finally:
            store.close()
        t.join(20)
        assert not t.is_alive() and isinstance(box[0], psycopg.Error), box
    assert gw.stop() == 0
    assert (
        pg.execute("select id from frozen_apr", dbname="app", user="app", password=APP_PASSWORD).strip()
        == "1"
    )


def _run_catching(conn: psycopg.Connection[Any], sql: str) -> Any:
    try:
        return conn.execute(sql).rowcount
    except psycopg.Error as e:
        return e


def test_one_client_pipelining_faster_than_the_store_is_slowed_not_everyone_refused(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    """Async mode: one client pipelining statements faster than the store writes filled
    `max_pending` within seconds, and then every session was ended and every login refused. At
    half of it the data path's sessions now wait before handing over more entries, so the flood
    is slowed, everyone else goes on, nothing is lost."""
    from pgraw import SYNC, RawConn, bind, execute, parse

    cfg = audit_config(pg, gateway_tls, tmp_path, max_pending=5000, flush_interval=0.2)
    gw = gateway_factory(config=cfg)
    n = 60_000
    unit = parse("", "select 'flood'") + bind("", "") + execute() + SYNC
    flood = RawConn(gw.port)
    flood.start_tls(gw.tls.ca_cert)
    flood.login(OPS, "ops-pw")
    answers: dict[str, Any] = {"ready": 0, "errors": []}

    def read() -> None:
        while answers["ready"] < n:
            m = flood.recv_message(60)
            if m is None:
                answers["errors"].append("closed")
                return
            if m[0] == b"Z":
                answers["ready"] += 1
            elif m[0] == b"E":
                answers["errors"].append(m[1][:120])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    bystander_errors: list[str] = []
    with psycopg.connect(gw.dsn(user=OPS, password="ops-pw"), autocommit=True) as by:
        sender = threading.Thread(target=flood.send, args=(unit * n,), daemon=True)
        sender.start()
        while reader.is_alive():
            try:
                by.execute("select 'bystander'")
                psycopg.connect(gw.dsn(user=OPS, password="ops-pw")).close()
            except psycopg.Error as e:
                bystander_errors.append(str(e))
            reader.join(0.2)
        sender.join(10)
    flood.close()
    assert answers["ready"] == n and not answers["errors"], answers["errors"][:3]
    assert not bystander_errors, bystander_errors[:3]
    assert "records_lost" not in gw.log() and "max_pending" not in gw.log()
    assert gw.stop() == 0
    found = cli(
        "audit",
        "search",
        "--config",
        str(gw.config_path),
        "--json",
        "--limit",
        "1000000",
        "--kind",
        "statement",
        "--text",
        "'flood'",
    )
    assert len(found.stdout.splitlines()) == n


@pytest.mark.parametrize("mode", ["fingerprint", "none"])
def test_values_stay_out_of_the_trail_where_statement_texts_do(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, mode: str
) -> None:
    """statements: fingerprint or none keeps statement texts and parameters out of the trail; the
    server's error messages quote values ('invalid input syntax for type integer: "..."'), so
    only their SQLSTATE is kept."""
    gw = gateway_factory(audit_config(pg, gateway_tls, tmp_path, statements=mode))
    with psycopg.connect(gw.dsn(user=OPS, password="ops-pw"), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            c.execute("select 'PW-LEAK-IN-TEXT'::int")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            c.execute("select %s::int", ["PW-LEAK-IN-PARAM"])
        assert c.execute("select %s::text", ["PW-LEAK-OK"]).fetchone() == ("PW-LEAK-OK",)
    gw.stop()
    rows = records(gw.config_path)
    errors = [r["data"]["error"] for r in rows if r["kind"] == "statement" and "error" in r["data"]]
    assert errors and all(e == {"code": "22P02"} for e in errors), errors
    assert "PW-LEAK" not in json.dumps(rows)


def test_a_clean_stop_is_recorded_and_the_next_start_says_so(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    cfg = audit_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    assert gw.stop() == 0
    gw2 = gateway_factory(config=json.loads(json.dumps(cfg)))
    assert gw2.stop() == 0
    rows = sorted(records(gw2.config_path), key=lambda r: r["seq"])
    assert [r["kind"] for r in rows if r["kind"].startswith("writer_")] == [
        "writer_start",
        "writer_stop",
        "writer_start",
        "writer_stop",
    ]
    assert rows[-1]["kind"] == "writer_stop"
    second = [r for r in rows if r["kind"] == "writer_start"][1]
    assert second["data"]["previous_stop"] == "clean"
    assert "ended without a clean stop" not in gw2.log()
    ok = cli("audit", "verify", "--config", str(gw2.config_path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
