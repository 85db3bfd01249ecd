"""The audit trail below the gateway: chains, stores, verification, checkpoints, retention, the
spool and the configuration checks. (End to end with real sessions: test_pg_audit.py.)"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from ostiary.audit import keys as keysmod
from ostiary.audit.log import AuditLog, Spool, claim_writer
from ostiary.audit.records import GENESIS, Chain, decode, now_us
from ostiary.audit.store import SearchFilter, SqliteStore
from ostiary.audit.verify import verify
from ostiary.config import Audit, Config, audit_problems


def config(tmp: Path, **audit: Any) -> Config:
    return msgspec.convert({"data_dir": str(tmp / "state"), "audit": audit}, Config)


def test_chain_links_and_verifies(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.db")
    chain = Chain("w1")
    rows = [chain.seal("admin", i, data={"n": i}) for i in range(10)]
    assert decode(rows[0].body).prev == GENESIS
    assert decode(rows[5].body).prev == rows[4].hash
    store.append(rows)
    key = keysmod.load_or_create_signing_key(tmp_path / "k")
    cp = keysmod.sign(
        key,
        keysmod.Checkpoint(
            writer="w1", seq=10, hash=rows[-1].hash, ts=1, key_id=keysmod.key_id(key.public_key())
        ),
    )
    store.add_checkpoint(cp)
    rep = verify(store, [key.public_key()])
    assert rep.ok and rep.writers[0].records == 10 and rep.writers[0].signed_through == 10
    # Without the auditor's key, the store's own keys (none registered here) cannot vouch for it.
    assert not verify(store).ok


def test_store_search_and_read_after(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.db")
    chain = Chain("w1")
    store.append(
        [
            chain.seal("auth", 100, identity="ci", verdict="deny", data={"reason": "expired token"}),
            chain.seal("statement", 200, identity="ci", connection="app", data={"text": "select 42"}),
            chain.seal("statement", 300, identity="bot", connection="app", data={"text": "select 43"}),
        ]
    )
    assert [r.seq for r in store.search(SearchFilter(identity="ci"))] == [2, 1]
    assert [r.seq for r in store.search(SearchFilter(text="select 4"))] == [3, 2]
    assert [r.seq for r in store.search(SearchFilter(since=150, until=300))] == [2]
    assert [r.seq for r in store.search(SearchFilter(verdict="deny", kind="auth"))] == [1]
    assert [r.seq for r in store.search(SearchFilter(limit=1))] == [3]
    first = store.read_after(0, 2)
    assert [r.seq for r in first] == [1, 2]
    assert [r.seq for r in store.read_after(first[-1].id, 10)] == [3]
    assert first[0].as_dict()["data"] == {"reason": "expired token"}


def test_purge_removes_only_records_older_than_the_cutoff_by_sequence(tmp_path: Path) -> None:
    cfg = config(tmp_path)

    async def main() -> tuple[int, AuditLog]:
        log = AuditLog(cfg)  # seq 1: writer_start, now
        await log.flush()
        cutoff = now_us()
        for i in range(4):
            log.append("admin", data={"new": i})
        await log.flush()
        n = await log.purge_before(cutoff)
        await log.close()
        return n, log

    n, log = trio.run(main)
    assert n == 1
    store = SqliteStore(Path(cfg.data_dir) / "audit.db")
    rep = verify(store, [log.public])
    assert rep.ok, rep.first_problem()
    w = rep.writers[0]
    assert w.purged_through == 1 and w.first_seq == 2
    kinds = [r.kind for r in store.chain(log.writer)]
    assert kinds[-2:] == ["purge", "writer_stop"]
    # A purge not vouched for by a signed checkpoint shows as deleted records.
    with sqlite3.connect(Path(cfg.data_dir) / "audit.db") as c:
        c.execute("update audit_checkpoints set purged_through = 0, purged_hash = ''")
    bad = verify(SqliteStore(Path(cfg.data_dir) / "audit.db"), [log.public])
    assert not bad.ok and "bad signature" in (bad.first_problem() or "")


def test_rows_edited_to_the_wrong_type_are_named_not_a_crash(tmp_path: Path) -> None:
    # sqlite3's replace() turns a BLOB body into TEXT; a number column can be given text. Verify
    # and search read such rows and name them as edited.
    cfg = config(tmp_path)

    async def main() -> AuditLog:
        log = AuditLog(cfg)
        for i in range(3):
            log.append("admin", data={"n": i, "text": "select * from t"})
        await log.flush()
        await log.close()
        return log

    log = trio.run(main)
    db = Path(cfg.data_dir) / "audit.db"
    with sqlite3.connect(db) as c:
        c.execute("update audit_records set body = replace(body, 'select *', 'select 1') where seq = 2")
        c.execute("update audit_records set ts = 'soon' where seq = 3")
        assert c.execute("select typeof(body) from audit_records where seq = 2").fetchone() == ("text",)
    rep = verify(SqliteStore(db), [log.public])
    assert not rep.ok
    assert "seq 2" in (rep.first_problem() or "") and "edited" in (rep.first_problem() or ""), (
        rep.first_problem()
    )
    assert len(SqliteStore(db).search(SearchFilter())) >= 3


def test_writer_continues_its_chain_across_restarts_and_locks_its_slot(tmp_path: Path) -> None:
    cfg = config(tmp_path)

    async def run_once(close: bool = True) -> AuditLog:
        log = AuditLog(cfg)
        log.append("admin", data={"x": 1})
        await log.flush()
        if close:
            await log.close()
        return log

    a = trio.run(run_once)
    b = trio.run(run_once)
    # (writer_start, admin, writer_stop per run)
    assert a.writer == b.writer and b.chain.seq == 6
    # Two live gateways on one data directory write two chains.
    audit_dir = Path(cfg.data_dir) / "audit"
    w1, f1 = claim_writer(audit_dir)
    w2, f2 = claim_writer(audit_dir)
    assert w1 != w2 and w1 == a.writer
    f1.close()
    f2.close()
    assert verify(SqliteStore(Path(cfg.data_dir) / "audit.db"), [a.public]).ok


def test_spool_survives_a_torn_last_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.jsonl")
    chain = Chain("w")
    rows = [chain.seal("admin", i) for i in range(3)]
    spool.append(rows)
    with open(spool.path, "ab") as f:
        f.write(msgspec.json.encode(chain.seal("admin", 9))[:20])
    assert [r.seq for r in spool.read()] == [1, 2, 3]
    spool.clear()
    assert spool.read() == [] and not spool.exists()


def test_spooled_records_of_a_previous_run_are_replayed_at_start(tmp_path: Path) -> None:
    cfg = config(tmp_path)

    async def first() -> AuditLog:
        log = AuditLog(cfg)
        await log.flush()
        # The store went away: the next batch went to the spool (as _failed does with on_failure spool).
        batch = [log.append("admin", data={"i": i}) for i in range(3)]
        log.pending.clear()
        log.spool.append([b for b in batch if b is not None])
        log._lock_file.close()
        return log

    a = trio.run(first)

    async def second() -> AuditLog:
        log = AuditLog(cfg)
        await log.flush()
        await log.close()
        return log

    b = trio.run(second)
    # writer_start and three spooled records, then the second run's writer_start and writer_stop.
    assert not a.spool.exists() and b.chain.seq == 6
    assert verify(SqliteStore(Path(cfg.data_dir) / "audit.db"), [b.public]).ok


@pytest.mark.parametrize(
    ("audit", "problem"),
    [
        ({"store": "postgres"}, "store: postgres needs exactly one of dsn"),
        ({"dsn": "host=x"}, "dsn, dsn_env and dsn_file are for store: postgres"),
        ({"flush_interval": 0}, "audit.flush_interval"),
        ({"max_text": 10}, "audit.max_text"),
        ({"retention_days": -1}, "audit.retention_days"),
        ({"max_pending": 5}, "audit.max_pending"),
    ],
)
def test_audit_config_problems(audit: dict[str, Any], problem: str) -> None:
    problems = audit_problems(msgspec.convert(audit, Audit))
    assert any(problem in f"{path}: {msg}" for path, msg in problems), problems
    assert audit_problems(Audit()) == []


def test_cli_refuses_stores_that_do_not_exist_or_are_not_stores(tmp_path: Path) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ostiary.cli", *args], capture_output=True, text=True, timeout=60
        )

    missing = tmp_path / "nowhere" / "audit.db"
    r = cli("audit", "verify", "--store", str(missing))
    assert r.returncode == 2 and "there is no audit store" in r.stderr and not missing.parent.exists()
    junk = tmp_path / "junk.db"
    junk.write_text("not a database")
    r = cli("audit", "search", "--store", str(junk))
    assert r.returncode == 2 and "not a database" in r.stderr
    r = cli("audit", "export-key", "--data-dir", str(tmp_path / "none"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_search_table_shows_control_characters_instead_of_sending_them(tmp_path: Path) -> None:
    import subprocess
    import sys

    db = tmp_path / "a.db"
    store = SqliteStore(db)
    chain = Chain("w1")
    text = "select 'drop everything' /*\r=> select 1; */ \x1b]0;TITLE\x07\x1b[2J\x9b31m"
    store.append(
        [
            chain.seal("statement", 100, identity="ev\x1b[2Jil", connection="app", data={"text": text}),
            chain.seal("auth", 200, identity="x", verdict="deny", data={"reason": "no\n=> drop table t;"}),
        ]
    )
    store.close()
    r = subprocess.run(
        [sys.executable, "-m", "ostiary.cli", "audit", "search", "--store", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert not any(c in r.stdout for c in "\x1b\r\x07\x9b"), repr(r.stdout)
    assert "ev\\x1B[2Jil" in r.stdout and "/*\\r=> select 1; */ \\x1B]0;TITLE\\x07" in r.stdout
    assert "no\\n=> drop table t;" in r.stdout and len(r.stdout.splitlines()) == 4
    # --json is the records as stored.
    r = subprocess.run(
        [sys.executable, "-m", "ostiary.cli", "audit", "search", "--store", str(db), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "\\u001b]0;TITLE\\u0007" in r.stdout or "\\u001B]0;TITLE\\u0007" in r.stdout, r.stdout


def test_a_store_emptied_between_runs_stays_a_gap_the_verifier_names(tmp_path: Path) -> None:
    """Found by a hunt: with audit.db deleted while the gateway was stopped, the next run began a
    new chain at seq 1, its next checkpoint re-signed the head file, and `audit verify` passed.
    The chain now goes on from the signed head: the removed records are a gap, named."""
    cfg = config(tmp_path)

    async def run_once() -> AuditLog:
        log = AuditLog(cfg)
        for i in range(3):
            log.append("admin", data={"n": i})
        await log.flush()
        await log.checkpoint()
        await log.close()
        return log

    a = trio.run(run_once)
    last = a.chain.seq
    for name in ("audit.db", "audit.db-wal", "audit.db-shm"):
        (Path(cfg.data_dir) / name).unlink(missing_ok=True)
    b = trio.run(run_once)
    assert b.writer == a.writer
    store = SqliteStore(Path(cfg.data_dir) / "audit.db")
    seqs = [r.seq for r in store.chain(b.writer)]
    assert seqs[0] == last + 1, seqs  # no id of a removed record is used again
    kinds = [r.kind for r in store.chain(b.writer)]
    assert "admin" in kinds
    rep = verify(store, [a.public])
    assert not rep.ok, "a chain missing its first records must not verify"
    assert f"record(s) 1..{last} before it are missing" in (rep.first_problem() or ""), rep.first_problem()
