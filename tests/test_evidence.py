"""The SOC 2 evidence pack end to end: a scripted period of real psql and psycopg sessions through the
gateway (allowed, blocked by a guardrail, approved, denied, masked, refused logins, a login outside a
grant's time window, a policy reload) produces a pack whose figures equal the script exactly; the pack
verifies offline; editing one record, forging one, or editing the report makes `evidence verify`
fail naming it; report.html renders in headless Chromium (the screenshot stays in the test's tmp dir).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import APP_PASSWORD, GatewayFactory, GatewayProcess, gateway_config
from ostiary.approvals.store import ApprovalStore, Request
from ostiary.audit import keys as keysmod
from ostiary.audit.records import Chain, Sealed
from ostiary.audit.store import SearchFilter, SqliteStore
from ostiary.devcluster import PgCluster, TlsMaterial
from ostiary.evidence import report as model
from ostiary.evidence.html import excerpt
from ostiary.evidence.pack import PackOptions, packed, write_pack
from ostiary.evidence.verify import verify_pack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ostiary.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def people(pg: PgCluster) -> None:
    pg.execute(
        "create table if not exists ev_people(id int primary key, email text);"
        "truncate ev_people;"
        "insert into ev_people values (1, 'ann@example.com'), (2, 'bob@example.com');"
        "create schema if not exists secret; create table if not exists secret.ev_keys(k text);",
        dbname="app",
        user="app",
        password=APP_PASSWORD,
    )


def evidence_config(pg: PgCluster, tls: TlsMaterial, tmp: Path) -> dict[str, Any]:
    cfg = gateway_config(pg, tls, 0, tmp, grants=[])
    cfg["clients"] = [{"user": u, "password": f"{u}-pw"} for u in ("ci", "alice", "bob", "nightly")]
    cfg["groups"] = [
        {"name": "dbas", "members": ["alice", "bob"]},
        {"name": "readers", "members": ["alice", "bob"]},
    ]
    cfg["masking"] = [{"name": "pii", "detectors": ["email"]}]
    cfg["connections"][0]["masking"] = ["pii"]
    cfg["guardrails"] = [
        {"name": "no-secrets", "match": {"relations": ["secret.*"]}, "message": "off limits"}
    ]
    cfg["approvals"] = [
        {
            "name": "prod-writes",
            "match": {"kinds": ["update", "delete"]},
            "approvers": ["dbas"],
            "timeout": 30,
        }
    ]
    # A window twelve hours away from now: the nightly job's login now is outside it.
    away = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=12)).strftime("%H:00")
    end = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=13)).strftime("%H:00")
    cfg["grants"] = [
        {
            "name": "ci-writes",
            "identities": ["ci"],
            "connection": "app",
            "access": "read-write",
            "guardrails": ["no-secrets"],
            "approvals": ["prod-writes"],
        },
        {"name": "readers", "identities": ["readers"], "connection": "app"},
        {
            "name": "nightly-batch",
            "identities": ["nightly"],
            "connection": "app",
            "windows": [{"start": away, "end": end if end != "00:00" else "24:00"}],
        },
    ]
    cfg["audit"] = {"checkpoint_interval": 0.5, "flush_interval": 0.05}
    return cfg


def run_psql(gw: GatewayProcess, user: str, script: str, password: str | None = None) -> str:
    r = subprocess.run(
        ["psql", "-X", "-q", "-f", "-"],
        input=script,
        env=gw.env(user=user, password=password or f"{user}-pw"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r.stdout + r.stderr


def pending(store: ApprovalStore, timeout: float = 15) -> Request:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reqs = store.requests("pending")
        if reqs:
            return reqs[0]
        time.sleep(0.05)
    raise AssertionError("no pending approval request")


def held(
    gw: GatewayProcess, statement: str
) -> tuple[psycopg.Connection[Any], threading.Thread, dict[str, Any]]:
    conn = psycopg.connect(gw.dsn(user="ci", password="ci-pw"), autocommit=True)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            conn.execute(statement)
            out["ok"] = True
        except psycopg.Error as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return conn, t, out


def wait_for(pred: Any, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


def by(items: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [i for i in items if all(i.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, items)
    return found[0]


def rewrite_manifest(pack: Path) -> None:
    """What a careful forger does after editing a file: fix the manifest's hashes."""
    m = json.loads((pack / "manifest.json").read_text())
    for name in m["files"]:
        m["files"][name] = hashlib.sha256((pack / name).read_bytes()).hexdigest()
    (pack / "manifest.json").write_text(json.dumps(m))


def test_evidence_pack_from_real_sessions_matches_the_script_and_detects_tampering(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, people: None
) -> None:
    cfg = evidence_config(pg, gateway_tls, tmp_path)
    gw = gateway_factory(config=cfg)
    data_dir = Path(cfg["data_dir"])
    approvals = ApprovalStore.sqlite(data_dir / "audit.db")

    # Before the period: alice has used the connection already (so she is not "first-time").
    assert "ann@example.com" not in run_psql(gw, "alice", "select email from ev_people where id = 1;\n")
    time.sleep(1.2)
    t0 = time.time()

    # The period's script.
    for _ in range(2):
        assert "password authentication failed" in run_psql(gw, "ci", "select 1;\n", password="wrong")
    assert "no grant" in run_psql(gw, "nightly", "select 1;\n")  # outside its window
    shown = run_psql(
        gw,
        "ci",
        "select id, email from ev_people order by id;\n"
        "select count(*) from ev_people;\n"
        "select * from secret.ev_keys;\n"
        "select k from secret.ev_keys limit 1;\n",
    )
    assert "(2 rows)" in shown and "ann@example.com" not in shown and shown.count("off limits") == 2
    assert "ann@example.com" not in run_psql(gw, "alice", "select email from ev_people where id = 1;\n")

    conn1, t1, out1 = held(gw, "update ev_people set email = 'carl@example.com' where id = 2")
    approved = pending(approvals)
    approvals.vote(approved.id, "alice", True, "ticket OPS-7", 60)
    t1.join(15)
    assert out1 == {"ok": True}
    conn2, t2, out2 = held(gw, "delete from ev_people where id = 1")
    denied = pending(approvals)
    approvals.vote(denied.id, "bob", False, "not during the freeze", 60)
    t2.join(15)
    assert isinstance(out2.get("error"), psycopg.errors.InsufficientPrivilege)
    conn1.close()
    conn2.close()

    # A policy reload that adds a grant, then its first use.
    cfg["groups"][1]["members"] = ["alice"]
    cfg["grants"].append({"name": "bob-read", "identities": ["bob"], "connection": "app"})
    gw.config_path.write_text(yaml.safe_dump({**cfg, "listen": {**cfg["listen"], "port": gw.port}}))
    os.kill(gw.proc.pid, signal.SIGHUP)
    store = SqliteStore(data_dir / "audit.db")
    wait_for(
        lambda: [
            r
            for r in store.search(SearchFilter(kind="policy"))
            if json.loads(r.body)["data"]["how"] == "reload"
        ]
    )
    assert "(1 row)" in run_psql(gw, "bob", "select 1;\n")
    time.sleep(0.3)
    assert gw.stop() == 0
    t_end = time.time() + 1

    pack = tmp_path / "pack"
    r = cli(
        "evidence",
        "--config",
        str(gw.config_path),
        "--from",
        iso(t0),
        "--to",
        iso(t_end),
        "--out",
        str(pack),
        "--sample",
        "2",
        "--seed",
        "7",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("report.html", "report.json", "records.jsonl", "checkpoints.json", "manifest.json"):
        assert (pack / name).is_file(), name
    assert list((pack / "public-keys").glob("*.pem"))
    rep = json.loads((pack / "report.json").read_text())
    print("\n" + excerpt(rep))

    # CC7: statements per identity and connection, blocked by rule.
    vols = rep["cc7"]["statement_volumes"]
    ci = by(vols, identity="ci", connection="app")
    assert (ci["statements"]["value"], ci["allowed"]["value"], ci["blocked"]["value"]) == (6, 3, 3)
    assert by(vols, identity="alice")["statements"]["value"] == 1
    assert by(vols, identity="bob")["statements"]["value"] == 1
    assert {b["rule"]: b["figure"]["value"] for b in rep["cc7"]["blocked_by_rule"]} == {
        "no-secrets": 2,
        "prod-writes": 1,
    }
    # Figures name their records, by store id and <writer>:<seq>.
    assert len(ci["blocked"]["ids"]) == 3 and all(":" in x for x in ci["blocked"]["refs"])
    lines = {json.loads(x)["id"]: json.loads(x) for x in (pack / "records.jsonl").read_text().splitlines()}
    for rid in ci["blocked"]["ids"]:
        body = json.loads(lines[rid]["body"])
        assert body["kind"] == "statement" and body["verdict"] == "deny" and body["identity"] == "ci"
    anomalies = rep["cc7"]["anomalies"]
    assert sorted(a["identity"] for a in anomalies["first_time_access"]) == ["bob", "ci"]
    assert [a["identity"] for a in anomalies["outside_time_window"]] == ["nightly"]
    assert anomalies["blocked_spikes"]["hours"] == []

    # CC6: refused logins by reason, who accessed, grants and holders.
    au = rep["cc6"]["authentications"]
    assert au["refused"]["value"] == 3
    reasons = {(x["code"], x["figure"]["value"]) for x in au["refused_by_reason"]}
    assert ("28P01", 2) in reasons and sum(n for _, n in reasons) == 3
    assert au["allowed"]["value"] == 5  # ci: psql and two held sessions; alice; bob
    access = by(rep["cc6"]["access_by_connection"], connection="app")["identities"]
    assert {i["identity"]: i["sessions"]["value"] for i in access} == {"ci": 3, "alice": 1, "bob": 1}
    grants = {g["name"]: g for g in rep["cc6"]["grants_in_force"]}
    assert set(grants) == {"ci-writes", "readers", "nightly-batch", "bob-read"}
    assert grants["readers"]["definitions"][0]["holders"] == [
        {"name": "alice", "via": "readers"},
        {"name": "bob", "via": "readers"},
    ]
    lp = rep["cc6"]["least_privilege"]
    assert lp["read_write_grants"]["value"] == ["ci-writes"]
    assert [g["name"] for g in lp["guardrails_in_force"]] == ["no-secrets"]

    # CC8: approvals with outcomes, approvers and reasons; the reload's diff.
    apr = {a["request"]: a for a in rep["cc8"]["approvals"]}
    assert set(apr) == {approved.id, denied.id}
    assert apr[approved.id]["outcome"] == "used" and apr[approved.id]["approvers"] == ["alice"]
    assert apr[approved.id]["executed"]["value"] == 1 and apr[approved.id]["requester"] == "ci"
    assert apr[approved.id]["votes_from_table"][0]["reason"] == "ticket OPS-7"
    assert apr[denied.id]["outcome"] == "denied" and apr[denied.id]["approvers"] == ["bob"]
    assert apr[denied.id]["decision_reason"] == "denied by bob: not during the freeze"
    reload = [c for c in rep["cc8"]["policy_changes"] if c["how"] == "reload"]
    assert len(reload) == 1 and reload[0]["diff"]["grants_added"] == ["bob-read"]
    assert "grants added: bob-read" in reload[0]["diff"]["summary"]
    assert reload[0]["diff"]["groups_changed"] == ["readers"]
    assert [d["holders"] for d in grants["readers"]["definitions"]][1] == [
        {"name": "alice", "via": "readers"}
    ]
    assert reload[0]["previous_version"] == rep["policy_versions_in_force"][0]["version"]

    # C1: masking in force and values masked by rule (2 by ci, 1 by alice in the period).
    assert [m["rule"] for m in rep["c1"]["masked_by_rule"]] == ["pii"]
    assert rep["c1"]["masked_by_rule"][0]["figure"]["value"] == 3
    assert [r["name"] for r in by(rep["c1"]["masking_in_force"], connection="app")["rules"]] == ["pii"]
    assert rep["scope"]["connections"][0]["name"] == "app" and "outside its view" in rep["scope"]["statement"]
    assert rep["integrity"]["store_verification"]["ok"] and rep["integrity"]["keys"]

    # Samples: two statements and two sessions, the sessions replayed from their recordings.
    index = json.loads((pack / "samples" / "index.json").read_text())
    assert len(index["statements"]) == 2 and len(index["sessions"]) == 2
    assert any("replay" in s and (pack / s["replay"]).read_text() for s in index["sessions"])

    # Offline verification, with the key exported from the gateway.
    key = tmp_path / "gateway.pem"
    k = cli("audit", "export-key", "--config", str(gw.config_path))
    assert k.returncode == 0, k.stderr
    key.write_text(k.stdout)
    ok = cli("evidence", "verify", str(pack), "--key", str(key))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "every figure matches the records" in ok.stdout

    # Tampering 1: one record's body edited in records.jsonl.
    edited = tmp_path / "edited"
    shutil.copytree(pack, edited)
    rows = (edited / "records.jsonl").read_text().splitlines()
    n = next(i for i, x in enumerate(rows) if "secret.ev_keys" in x)
    victim = json.loads(rows[n])
    rows[n] = rows[n].replace("secret.ev_keys", "public.ev_keys", 1)
    (edited / "records.jsonl").write_text("\n".join(rows) + "\n")
    bad = cli("evidence", "verify", str(edited))
    assert bad.returncode == 1
    assert f"record {victim['writer']}:{victim['seq']}, store id {victim['id']}" in bad.stdout
    assert (
        "does not match its hash" in bad.stdout and "records.jsonl: does not match its SHA-256" in bad.stdout
    )

    # Tampering 2: the same edit with the hash and the manifest recomputed: the chain breaks there.
    forged = tmp_path / "forged"
    shutil.copytree(pack, forged)
    rows = (forged / "records.jsonl").read_text().splitlines()
    item = json.loads(rows[n])
    item["body"] = item["body"].replace("secret.ev_keys", "public.ev_keys", 1)
    item["hash"] = hashlib.sha256(item["body"].encode()).hexdigest()
    rows[n] = json.dumps(item, sort_keys=True, ensure_ascii=False)
    (forged / "records.jsonl").write_text("\n".join(rows) + "\n")
    rewrite_manifest(forged)
    bad = cli("evidence", "verify", str(forged))
    assert bad.returncode == 1 and "does not link to the record before it" in bad.stdout, bad.stdout

    # Tampering 3: a figure of the report edited (manifest recomputed).
    fudged = tmp_path / "fudged"
    shutil.copytree(pack, fudged)
    rj = json.loads((fudged / "report.json").read_text())
    by(rj["cc7"]["statement_volumes"], identity="ci")["blocked"]["value"] = 2
    (fudged / "report.json").write_text(json.dumps(rj))
    rewrite_manifest(fudged)
    bad = cli("evidence", "verify", str(fudged))
    assert bad.returncode == 1
    assert "report.cc7.statement_volumes[" in bad.stdout and "blocked.value: the report says 2" in bad.stdout

    # The HTML renders in headless Chromium: the DOM loads and a screenshot is taken.
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    html_url = (pack / "report.html").as_uri()
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ]
    dom = subprocess.run([*base, "--dump-dom", html_url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "CC8.1 Change management" in dom.stdout and "bob-read" in dom.stdout
    shot = tmp_path / "report.png"
    s = subprocess.run(
        [
            *base,
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            "--enable-logging=stderr",
            "--v=0",
            html_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert s.returncode == 0, s.stderr[-2000:]
    print(f"screenshot: {shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def _rec(seq: int, ts: int, kind: str, **fields: Any) -> Any:
    from ostiary.evidence.report import PackedRecord

    data = fields.pop("data", {})
    return PackedRecord(seq, "w", seq, f"h{seq}", {"ts": ts, "kind": kind, "data": data, **fields})


def test_spikes_of_blocked_statements_and_policy_diffs_are_pure_functions_of_the_records() -> None:
    from ostiary.evidence.report import Inputs, build

    hour = 3_600_000_000
    t0 = 1_700_000_000 // 3600 * hour
    snap_old = {"grants": [{"name": "a", "identities": ["x"], "connection": "db"}], "clients": ["x"]}
    snap_new = {
        "grants": [{"name": "a", "identities": ["x"], "connection": "db", "access": "read-write"}],
        "clients": ["x", "y"],
    }
    records = [
        _rec(
            1, t0, "policy", verdict="applied", data={"version": "v2", "how": "reload", "snapshot": snap_new}
        )
    ]
    seq = 2
    # Hours 0..3: 1 blocked statement each; hour 4: 12 (a spike); hour 5: 3 (not one).
    for h, n in enumerate([1, 1, 1, 1, 12, 3]):
        for i in range(n):
            records.append(
                _rec(
                    seq,
                    t0 + h * hour + i,
                    "statement",
                    verdict="deny",
                    rule="g",
                    identity="x",
                    connection="db",
                )
            )
            seq += 1
    before = _rec(
        0, t0 - 1, "policy", verdict="applied", data={"version": "v1", "how": "start", "snapshot": snap_old}
    )
    rep = build(Inputs(t0, t0 + 6 * hour, records, [("policy_before", before)]))
    spikes = rep["cc7"]["anomalies"]["blocked_spikes"]["hours"]
    assert [s["blocked"]["value"] for s in spikes] == [12] and len(spikes[0]["blocked"]["refs"]) == 12
    diff = rep["cc8"]["policy_changes"][0]["diff"]
    assert diff["grants_changed"] == [{"grant": "a", "fields": ["access"]}]
    assert diff["identities_added"] == ["y"] and diff["grants_added"] == []
    assert rep["cc6"]["least_privilege"]["read_write_grants"]["value"] == ["a"]


# Packs that leave out records of their period: cut from the start (report.json rebuilt from the
# rest: only the checkpoints are signed) or moved from the end into link.jsonl. The pack's anchor
# record and the link records' time stamps show both; honest packs, including ones whose chain
# starts at seq 1 or right after a retention purge, still verify. (A synthetic trail: no gateway.)

S = 1_000_000
T0 = 1_800_000_000 * S  # the period: [T0 + 100 s, T0 + 200 s)
LO, HI = T0 + 100 * S, T0 + 200 * S


def _trail(tmp: Path, key: Ed25519PrivateKey, purge_through: int = 0) -> SqliteStore:
    """Sessions every 20 s from T0 to T0 + 280 s (three records each), a checkpoint after each
    session; with ``purge_through``, the records up to it were purged under a signed checkpoint."""
    store = SqliteStore(tmp / "audit.db")
    chain = Chain("w1")
    kid = keysmod.key_id(key.public_key())
    rows: list[Sealed] = []
    for i in range(15):
        t, sess = T0 + i * 20 * S, f"s{i}"
        who = {"session": sess, "identity": f"u{i % 3}", "connection": "app", "verdict": "allow"}
        rows += [
            chain.seal("session_start", t, **who, data={"peer": "10.0.0.1"}),
            chain.seal("statement", t + 1, **who, data={"text": f"select {i}", "outcome": "ok"}),
            chain.seal("session_end", t + 2, **who, data={"reason": "client closed", "statements": 1}),
        ]
        last = rows[-1]
        cp = keysmod.Checkpoint(writer="w1", seq=last.seq, hash=last.hash, ts=t + 3, key_id=kid)
        store.add_checkpoint(keysmod.sign(key, cp))
    store.append(rows)
    if purge_through:
        last = rows[-1]
        cp = keysmod.Checkpoint(
            writer="w1",
            seq=last.seq,
            hash=last.hash,
            ts=T0 + 300 * S,
            key_id=kid,
            purged_through=purge_through,
            purged_hash=rows[purge_through - 1].hash,
        )
        store.add_checkpoint(keysmod.sign(key, cp))
        store.purge("w1", purge_through)
    return store


def _pack(tmp: Path, store: SqliteStore, key: Ed25519PrivateKey, lo: int = LO, hi: int = HI) -> Path:
    out = tmp / "pack"
    write_pack(store, PackOptions(lo, hi, out, trusted=[key.public_key()]))
    return out


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(x, sort_keys=True, ensure_ascii=False) + "\n" for x in lines))


def _forge(src: Path, dst: Path, records: list[dict[str, Any]], **files: list[dict[str, Any]]) -> Path:
    """What a forger with the pack does: change files, rebuild report.json from the records left
    (it is not signed), and re-hash the manifest."""
    shutil.copytree(src, dst)
    _write(dst / "records.jsonl", records)
    for name, lines in files.items():
        _write(dst / f"{name}.jsonl", lines)
    rep = json.loads((dst / "report.json").read_text())
    ctx = _lines(dst / "context.jsonl")
    new = model.build(
        model.Inputs(
            rep["period"]["from_us"],
            rep["period"]["to_us"],
            [packed(x) for x in records],
            [(x.get("role", ""), packed(x)) for x in ctx],
            json.loads((dst / "approvals.json").read_text()),
        )
    )
    new["generated"], new["integrity"] = rep["generated"], rep["integrity"]
    (dst / "report.json").write_text(json.dumps(new, indent=2, sort_keys=True, ensure_ascii=False))
    m = json.loads((dst / "manifest.json").read_text())
    m["files"] = {
        str(p.relative_to(dst)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dst.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    (dst / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    return dst


def test_an_honest_pack_carries_the_records_around_its_period_and_verifies(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pack = _pack(tmp_path, _trail(tmp_path, key), key)
    records = _lines(pack / "records.jsonl")
    assert [r["seq"] for r in records] == list(range(16, 31))
    anchor = _lines(pack / "anchor.jsonl")
    assert [a["seq"] for a in anchor] == [15] and json.loads(anchor[0]["body"])["ts"] < LO
    link = _lines(pack / "link.jsonl")
    assert [r["seq"] for r in link] == [31, 32, 33]
    check = verify_pack(pack, [key.public_key()])
    assert check.ok, check.problems


def test_records_cut_from_the_start_of_the_period_fail(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pack = _pack(tmp_path, _trail(tmp_path, key), key)
    records = _lines(pack / "records.jsonl")
    cut, kept = records[:3], records[3:]  # the period's first session
    assert verify_pack(_forge(pack, tmp_path / "untouched", records), [key.public_key()]).ok

    # The anchor left as it was: it is not the record the new first one links to.
    p = verify_pack(_forge(pack, tmp_path / "cut", kept), [key.public_key()])
    assert not p.ok and "nothing shows that its records of the period start at seq 19" in p.problems[0], (
        p.problems
    )
    # The last record cut made the anchor: it is stamped inside the period.
    p = verify_pack(_forge(pack, tmp_path / "cut2", kept, anchor=cut[-1:]), [key.public_key()])
    assert not p.ok and "not before the period" in p.problems[0] and "w1:18" in p.problems[0], p.problems
    # No anchor at all (as a pack made before anchors existed would be).
    bare = _forge(pack, tmp_path / "cut3", kept)
    (bare / "anchor.jsonl").unlink()
    m = json.loads((bare / "manifest.json").read_text())
    del m["files"]["anchor.jsonl"]
    (bare / "manifest.json").write_text(json.dumps(m))
    p = verify_pack(bare, [key.public_key()])
    assert not p.ok and "make it again" in p.problems[0], p.problems


def test_records_moved_from_the_end_of_the_period_into_link_fail(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pack = _pack(tmp_path, _trail(tmp_path, key), key)
    records = _lines(pack / "records.jsonl")
    link = _lines(pack / "link.jsonl")
    moved = _forge(pack, tmp_path / "moved", records[:-3], link=records[-3:] + link)
    p = verify_pack(moved, [key.public_key()])
    assert not p.ok and "link.jsonl line 1 (record w1:28" in p.problems[0], p.problems
    assert "before the end of the period" in p.problems[0]


def test_a_pack_from_the_start_of_the_chain_or_after_a_purge_verifies(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "a").mkdir()
    pack = _pack(tmp_path / "a", _trail(tmp_path / "a", key), key, lo=T0)
    assert _lines(pack / "anchor.jsonl") == []
    check = verify_pack(pack, [key.public_key()])
    assert check.ok, check.problems
    # Retention purged seq 1..15: the signed purge checkpoint names the record before the period.
    (tmp_path / "b").mkdir()
    pack = _pack(tmp_path / "b", _trail(tmp_path / "b", key, purge_through=15), key)
    assert _lines(pack / "anchor.jsonl") == []
    check = verify_pack(pack, [key.public_key()])
    assert check.ok, check.problems
    assert any("purged" in n for n in check.notes), check.notes
