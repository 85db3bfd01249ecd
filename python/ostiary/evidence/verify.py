"""``ostiary evidence verify DIR``: checks a pack offline, with nothing but its files (and keys).

In order: every file the manifest lists hashes to its SHA-256 and no file is unlisted; every record
(period, link and context) re-hashes to its stated hash and its body's writer and seq are the row's;
per writer, the period's records and then the link records are contiguous and each one's ``prev`` is
the hash of the one before, starting from the ``prev`` the report states; the checkpoints' signatures
verify with the pack's keys (or the auditor's ``--key``, which is what proves authorship), and a
signed checkpoint at or after each writer's last period record names exactly the hash the chain
reaches there; finally the report's figures are rebuilt from the records and compared with
``report.json``. Every problem names the file and the record or figure.

Only the checkpoints are signed: anyone can rebuild report.json, so its chain start proves nothing
by itself. That no record of the period was left out is shown at both ends: the run starts at seq 1
(from the genesis hash), or right after the record in ``anchor.jsonl``, which the first record links
to and which is stamped before the period (or after a record that a signed checkpoint shows was
stored before the period, or that a signed purge checkpoint names); every record of ``link.jsonl``
is stamped at or after the period's end. Packs made before ``anchor.jsonl`` existed fail unless the
run starts at seq 1 or such a checkpoint is in the pack: make them again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ostiary.audit import keys as keysmod
from ostiary.audit.keys import SignedCheckpoint
from ostiary.audit.records import GENESIS, digest
from ostiary.evidence import report as model
from ostiary.evidence.pack import body_of, packed

# Parts of report.json that are not rebuilt from the records: when and from which store the pack was
# made, and the generator's own verification of the store (this command checks the chain itself).
NOT_RECOMPUTED = ("generated", "integrity")


@dataclass
class PackCheck:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: int = 0
    writers: list[str] = field(default_factory=list)
    signed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _lines(path: Path, check: PackCheck) -> list[dict[str, Any]]:
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        check.problems.append(f"{path.name}: cannot be read ({e})")
        return []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            check.problems.append(f"{path.name} line {n}: not JSON ({e})")
            continue
        if not isinstance(item, dict) or not {"id", "writer", "seq", "hash"} <= set(item):
            check.problems.append(f"{path.name} line {n}: not a packed record")
            continue
        item["_where"] = (
            f"{path.name} line {n} (record {item['writer']}:{item['seq']}, store id {item['id']})"
        )
        out.append(item)
    return out


def _rehash(items: list[dict[str, Any]], check: PackCheck) -> list[dict[str, Any]]:
    good = []
    for it in items:
        try:
            body = body_of(it)
        except (ValueError, TypeError) as e:
            check.problems.append(f"{it['_where']}: its body cannot be read ({e})")
            continue
        if digest(body) != it["hash"]:
            check.problems.append(f"{it['_where']}: its body does not match its hash (the record was edited)")
            continue
        try:
            rec = json.loads(body)
        except ValueError:
            check.problems.append(f"{it['_where']}: its body is not JSON")
            continue
        if rec.get("writer") != it["writer"] or rec.get("seq") != it["seq"]:
            check.problems.append(f"{it['_where']}: its body names another writer or seq")
            continue
        it["_rec"] = rec
        good.append(it)
    return good


def verify_pack(directory: Path, trusted: list[Ed25519PublicKey] | None = None) -> PackCheck:
    check = PackCheck()
    d = Path(directory)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        check.problems.append(f"manifest.json: cannot be read ({e})")
        return check
    listed: dict[str, str] = manifest.get("files", {})
    present = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} - {"manifest.json"}
    for name in sorted(present - set(listed)):
        check.problems.append(f"{name}: in the pack but not in the manifest (added after the pack was made)")
    for name, want in sorted(listed.items()):
        p = d / name
        if not p.is_file():
            check.problems.append(f"{name}: listed in the manifest but missing")
        elif hashlib.sha256(p.read_bytes()).hexdigest() != want:
            check.problems.append(
                f"{name}: does not match its SHA-256 in the manifest (the file was changed)"
            )

    records = _rehash(_lines(d / "records.jsonl", check), check)
    link = _rehash(_lines(d / "link.jsonl", check), check)
    context = _rehash(_lines(d / "context.jsonl", check), check)
    anchors = _rehash(_lines(d / "anchor.jsonl", check), check) if "anchor.jsonl" in listed else []
    check.records = len(records)
    try:
        report = json.loads((d / "report.json").read_text())
    except (OSError, ValueError) as e:
        check.problems.append(f"report.json: cannot be read ({e})")
        return check
    period = report.get("period", {}) if isinstance(report.get("period"), dict) else {}
    try:
        lo = _us(manifest.get("period", {}).get("from_us", period.get("from_us")))
        hi = _us(manifest.get("period", {}).get("to_us", period.get("to_us")))
    except ValueError as e:
        check.problems.append(f"manifest.json: {e}")
        return check

    # Chains: contiguous, linked, and vouched for by a signature.
    keys: dict[str, Ed25519PublicKey] = {}
    if trusted:
        keys = {keysmod.key_id(k): k for k in trusted}
    else:
        for p in sorted((d / "public-keys").glob("*.pem")):
            try:
                k = keysmod.load_public_pem(p.read_bytes())
            except ValueError as e:
                check.problems.append(f"public-keys/{p.name}: not an Ed25519 public key ({e})")
                continue
            keys[keysmod.key_id(k)] = k
        check.notes.append(
            "checkpoints were verified with the keys inside the pack: this shows the pack is consistent, "
            "not who wrote it; pass the gateway's key (ostiary audit export-key) with --key for that"
        )
    try:
        cps = msgspec.json.decode((d / "checkpoints.json").read_bytes(), type=list[SignedCheckpoint])
    except (OSError, msgspec.DecodeError) as e:
        check.problems.append(f"checkpoints.json: cannot be read ({e})")
        cps = []
    good: list[SignedCheckpoint] = []
    for c in cps:
        key = keys.get(c.checkpoint.key_id)
        where = f"checkpoints.json: checkpoint of writer {c.checkpoint.writer} seq {c.checkpoint.seq}"
        if key is None:
            check.problems.append(
                f"{where}: signed with key {c.checkpoint.key_id}, not among the verifying keys"
            )
        elif not keysmod.check_signature(key, c):
            check.problems.append(f"{where}: bad signature (the checkpoint was altered)")
        else:
            good.append(c)
    stated = {c["writer"]: c for c in report.get("chains", []) if isinstance(c, dict) and "writer" in c}
    writers = sorted({r["writer"] for r in records})
    check.writers = writers
    for w in writers:
        mine = sorted((r for r in records if r["writer"] == w), key=lambda r: r["seq"])
        tail = sorted((r for r in link if r["writer"] == w), key=lambda r: r["seq"])
        st = stated.get(w)
        if st is None:
            check.problems.append(f"report.json: states no chain start for writer {w}")
            continue
        prev, seq = str(st.get("prev", "")), int(st.get("first_seq", 0))
        broken = False
        for r in mine + tail:
            if r["seq"] != seq:
                check.problems.append(
                    f"{r['_where']}: expected seq {seq} of writer {w} (records are missing)"
                )
                broken = True
                break
            if r["_rec"].get("prev") != prev:
                check.problems.append(
                    f"{r['_where']}: does not link to the record before it (a record was replaced, "
                    "inserted or reordered)"
                )
                broken = True
                break
            prev, seq = r["hash"], seq + 1
        if broken:
            continue
        _check_ends(w, mine, tail, anchors, good, lo, hi, check)
        hashes = {r["seq"]: r["hash"] for r in mine + tail}
        last = mine[-1]["seq"]
        vouch = [c for c in good if c.checkpoint.writer == w and c.checkpoint.seq >= last]
        at = [c for c in vouch if c.checkpoint.seq in hashes]
        if not vouch:
            check.problems.append(
                f"writer {w}: no signed checkpoint at or after its last record (seq {last}): the end of "
                "the period is not vouched for"
            )
        elif not at:
            check.problems.append(
                f"writer {w}: the signed checkpoint of seq {vouch[0].checkpoint.seq} lies beyond the "
                "records in the pack (link.jsonl was cut)"
            )
        elif any(hashes[c.checkpoint.seq] != c.checkpoint.hash for c in at):
            c = next(c for c in at if hashes[c.checkpoint.seq] != c.checkpoint.hash)
            check.problems.append(
                f"writer {w} record seq {c.checkpoint.seq}: differs from the signed checkpoint for it "
                "(the chain was rewritten)"
            )
        else:
            check.signed.append(f"{w}: seq {mine[0]['seq']}..{last} signed at seq {at[0].checkpoint.seq}")
        before = [c for c in good if c.checkpoint.writer == w and c.checkpoint.seq == mine[0]["seq"] - 1]
        if before and before[0].checkpoint.hash != st.get("prev"):
            check.problems.append(
                f"writer {w}: the first record's prev differs from the signed checkpoint of the record "
                "before it"
            )

    # The figures, rebuilt.
    if check.problems:
        check.notes.append("the figures were not recomputed: the records themselves did not verify")
        return check
    try:
        inputs = model.Inputs(
            lo,
            hi,
            [packed(r) for r in records],
            [(str(r.get("role", "")), packed(r)) for r in context],
            json.loads((d / "approvals.json").read_text()),
        )
    except (OSError, ValueError, TypeError) as e:
        check.problems.append(f"the pack's inputs cannot be read: {e}")
        return check
    for role, earlier in inputs.context:
        if earlier.ts >= inputs.period_from:
            check.problems.append(
                f"context.jsonl: record {earlier.ref} ({role}) is not from before the period"
            )
    expected = model.build(inputs)
    actual = {k: v for k, v in report.items() if k not in NOT_RECOMPUTED}
    diffs = model.compare(expected, actual)
    for line in diffs[:20]:
        check.problems.append(f"report.json: {line}")
    if len(diffs) > 20:
        check.problems.append(f"report.json: ... and {len(diffs) - 20} more differences")
    return check


def _check_ends(
    w: str,
    mine: list[dict[str, Any]],
    tail: list[dict[str, Any]],
    anchors: list[dict[str, Any]],
    good: list[SignedCheckpoint],
    lo: int,
    hi: int,
    check: PackCheck,
) -> None:
    """That the writer's run holds every record it has of the period: nothing before its first
    record is of the period, and nothing after its last (the link records) is."""
    first = mine[0]
    seq, prev = first["seq"], first["_rec"].get("prev")
    if seq == 1:
        if prev != GENESIS:
            check.problems.append(f"{first['_where']}: the chain's first record does not start from genesis")
    else:
        anchor = next((a for a in anchors if a["writer"] == w and a["seq"] == seq - 1), None)
        mine_cps = [c.checkpoint for c in good if c.checkpoint.writer == w]
        stored_before = [c for c in mine_cps if c.seq == seq - 1 and c.hash == prev and c.ts < lo]
        purged = [c for c in mine_cps if c.purged_through == seq - 1 and c.purged_hash == prev]
        if anchor is not None:
            if anchor["hash"] != prev:
                check.problems.append(
                    f"{anchor['_where']}: is not the record the period's first record (seq {seq}) links to"
                )
            elif not _ts(anchor) < lo:
                check.problems.append(
                    f"{anchor['_where']}: the record before the first one of the pack is stamped "
                    f"{_when(anchor)}, not before the period: records of the period are missing at its start"
                )
        elif purged:
            check.notes.append(
                f"writer {w}: its records before seq {seq} were purged (retention, signed at seq "
                f"{purged[0].seq}): the period may have begun before the oldest record kept"
            )
        elif not stored_before:
            check.problems.append(
                f"writer {w}: nothing shows that its records of the period start at seq {seq}: the pack "
                f"has no record before it (anchor.jsonl), so records at the start of the period may have "
                "been removed (a pack made before anchor.jsonl existed: make it again)"
            )
    if not tail:
        check.notes.append(
            f"writer {w}: the pack holds no record after the period (none was signed when it was made): "
            f"that its records of the period end at seq {mine[-1]['seq']} rests on the checkpoint there alone"
        )
    for r in tail:
        if not _ts(r) >= hi:
            check.problems.append(
                f"{r['_where']}: stamped {_when(r)}, before the end of the period, but packed as "
                "a record after it (a record of the period was moved out of records.jsonl)"
            )
            break


def _ts(item: dict[str, Any]) -> float:
    """A packed record's time stamp (NaN when it has none: it compares as neither before nor after)."""
    ts = item["_rec"].get("ts")
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else float("nan")


def _when(item: dict[str, Any]) -> str:
    ts = _ts(item)
    return model.iso(int(ts)) if ts == ts else "without a time"


def _us(v: Any) -> int:
    if not isinstance(v, int):
        raise ValueError("the period's bounds (from_us, to_us) are missing")
    return v
