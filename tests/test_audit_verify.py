"""``audit verify`` against trails that were added to or removed wholesale: a writer no trusted key
ever signed, a writer whose checkpoints were all deleted, a head file whose writer is gone from the
store, and an empty store file (which verify must read without writing to it)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ostiary.audit import keys as keysmod
from ostiary.audit.keys import SignedCheckpoint
from ostiary.audit.records import Chain, Sealed
from ostiary.audit.store import SqliteStore
from ostiary.audit.verify import verify


def _checkpoint(key: Ed25519PrivateKey, writer: str, rows: list[Sealed]) -> SignedCheckpoint:
    return keysmod.sign(
        key,
        keysmod.Checkpoint(
            writer=writer,
            seq=rows[-1].seq,
            hash=rows[-1].hash,
            ts=1,
            key_id=keysmod.key_id(key.public_key()),
        ),
    )


def _signed_trail(tmp: Path) -> tuple[Path, Ed25519PrivateKey, SignedCheckpoint]:
    """A store with writer ``w1``: 6 records, a checkpoint of seq 4 and 2 records after it."""
    db = tmp / "audit.db"
    store = SqliteStore(db)
    key = keysmod.load_or_create_signing_key(tmp / "signing.key")
    chain = Chain("w1")
    rows = [chain.seal("admin", i, data={"n": i}) for i in range(6)]
    store.append(rows)
    cp = _checkpoint(key, "w1", rows[:4])
    store.add_checkpoint(cp)
    store.close()
    return db, key, cp


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ostiary.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_records_after_the_newest_checkpoint_are_reported_not_failed(tmp_path: Path) -> None:
    # A running gateway signs only every checkpoint_interval: its newest records are unsigned.
    db, key, _ = _signed_trail(tmp_path)
    rep = verify(SqliteStore(db, create=False), [key.public_key()])
    assert rep.ok, rep.first_problem()
    w = rep.writers[0]
    assert (w.records, w.last_seq, w.signed_through) == (6, 6, 4)


def test_with_keys_a_writer_no_trusted_key_signed_fails(tmp_path: Path) -> None:
    db, key, _ = _signed_trail(tmp_path)
    store = SqliteStore(db)
    forged = Chain("0123456789abcdef")
    store.append([forged.seal("statement", 10, identity="alice", data={"text": "select * from payroll"})])
    rep = verify(store, [key.public_key()])
    assert not rep.ok
    problem = rep.first_problem() or ""
    assert "writer 0123456789abcdef" in problem and "no checkpoint signed by a verifying key" in problem
    assert [w.writer for w in rep.writers if not w.problems] == ["w1"]
    # Without keys nothing proves authorship anyway: the report says so and notes the writer.
    loose = verify(store)
    assert any("0123456789abcdef: no signed checkpoint" in n for n in loose.notes), loose.notes


def test_with_keys_a_writer_whose_checkpoints_were_all_deleted_fails(tmp_path: Path) -> None:
    db, key, cp = _signed_trail(tmp_path)
    with sqlite3.connect(db) as c:
        c.execute("delete from audit_checkpoints")
    rep = verify(SqliteStore(db, create=False), [key.public_key()])
    assert not rep.ok and "writer w1" in (rep.first_problem() or ""), rep.first_problem()
    # The head file is a signed checkpoint too: with it the records are vouched for again.
    assert verify(SqliteStore(db, create=False), [key.public_key()], [cp]).ok


def test_a_head_file_whose_writer_left_no_record_fails(tmp_path: Path) -> None:
    db, key, cp = _signed_trail(tmp_path)
    with sqlite3.connect(db) as c:
        for table in ("audit_records", "audit_checkpoints", "audit_keys"):
            c.execute(f"delete from {table}")
    for keys in ([key.public_key()], None):
        rep = verify(SqliteStore(db, create=False), keys, [cp])
        assert not rep.ok
        problem = rep.first_problem() or ""
        assert "head-w1.json" in problem and "seq 4" in problem and "trail was removed" in problem, problem


def test_an_empty_store_file_is_read_not_written(tmp_path: Path) -> None:
    db, key, cp = _signed_trail(tmp_path)
    empty = tmp_path / "empty.db"
    empty.touch()
    store = SqliteStore(empty, create=False)
    rep = verify(store)
    assert rep.ok and rep.writers == []
    store.close()
    assert empty.stat().st_size == 0
    with sqlite3.connect(empty) as c:
        assert c.execute("select name from sqlite_master").fetchall() == []

    r = cli("audit", "verify", "--store", str(empty))
    assert r.returncode == 0 and "holds no audit trail" in r.stdout, r.stdout + r.stderr
    pub = tmp_path / "gateway.pub"
    pub.write_text(keysmod.public_pem(key.public_key()))
    r = cli("audit", "verify", "--store", str(empty), "--key", str(pub))
    assert r.returncode == 1 and "holds no audit trail" in r.stdout and "FAILED" in r.stdout, r.stdout
    head = tmp_path / "head-w1.json"
    head.write_bytes(msgspec.json.encode(cp))
    r = cli("audit", "verify", "--store", str(empty), "--head", str(head))
    assert r.returncode == 1 and "trail was removed" in r.stdout, r.stdout
    assert empty.stat().st_size == 0
    # The real trail still verifies from the command line, key and head file given.
    r = cli("audit", "verify", "--store", str(db), "--key", str(pub), "--head", str(head))
    assert r.returncode == 0 and "signed through seq 4" in r.stdout, r.stdout + r.stderr
