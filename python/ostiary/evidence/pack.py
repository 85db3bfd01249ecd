"""Writing an evidence pack: the records of a period, what proves them, and the report built from them.

Theory of operation. For each writer (gateway process) the pack holds a contiguous run of its chain:
from its first record stamped inside the period to its last one (``records.jsonl``, bodies exactly
as stored). A record's ``prev`` names the one before it, so the run verifies on its own from the
``prev`` of its first record; to tie its end to a signature, ``link.jsonl`` holds the records after
the period up to the first signed checkpoint after the run's last record (or at it, when none is
after; they are not counted in the report). Nothing but the checkpoints is signed, so the pack also
shows where the run starts: ``anchor.jsonl`` holds the record just before its first, stamped before
the period (none when the run starts at seq 1; when retention purged that record,
``checkpoints.json`` has the signed purge checkpoint naming it instead). Without it, records removed
from the start of the period would leave a run that verifies just as well; records moved from its
end into ``link.jsonl`` show by their time stamps. ``context.jsonl`` holds earlier records the
report refers to: the policy version in force when the period began, and for each identity and
connection of the period its last session before it (which makes it "not first-time").
``checkpoints.json`` has the signed checkpoints from the one before the run to the one that vouches
for its end, ``public-keys/`` the keys to check them, ``approvals.json`` the approval tables' rows of
the requests the period names (not hash-chained; the report marks what comes from them).
``manifest.json`` is written last and holds the SHA-256 of every other file.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ostiary import __version__
from ostiary.audit import keys as keysmod
from ostiary.audit.keys import SignedCheckpoint
from ostiary.audit.records import Sealed
from ostiary.audit.store import AuditStore
from ostiary.evidence import report as model


class PackError(Exception):
    """The pack cannot be written (nothing in the period, the output directory is not empty ...)."""


@dataclass
class PackOptions:
    period_from: int
    period_to: int
    out: Path
    sample: int = 0
    seed: int | None = None
    trusted: list[Ed25519PublicKey] | None = None
    data_dir: Path | None = None
    approvals: Any = None  # an ApprovalStore, when the store has approval tables


def line_of(r: Sealed, role: str = "") -> dict[str, Any]:
    """A record as packed: the body as its JSON text when it is UTF-8 (it always is when the gateway
    wrote it), else base64 in ``body_b64``; either way it re-hashes to ``hash``."""
    out: dict[str, Any] = {"id": r.id, "writer": r.writer, "seq": r.seq, "hash": r.hash}
    if role:
        out["role"] = role
    try:
        out["body"] = r.body.decode("utf-8")
    except UnicodeDecodeError:
        out["body_b64"] = base64.b64encode(r.body).decode()
    return out


def body_of(line: dict[str, Any]) -> bytes:
    if "body_b64" in line:
        return base64.b64decode(line["body_b64"])
    return str(line["body"]).encode("utf-8")


def packed(line: dict[str, Any]) -> model.PackedRecord:
    """A packed line as the report model reads it (the body decoded; raises ValueError when it is not
    a record)."""
    try:
        rec = json.loads(body_of(line))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(
            f"record {line.get('writer')}:{line.get('seq')}: its body is not JSON ({e})"
        ) from None
    if not isinstance(rec, dict) or "kind" not in rec or "ts" not in rec:
        raise ValueError(f"record {line.get('writer')}:{line.get('seq')}: its body is not a record")
    return model.PackedRecord(int(line["id"]), str(line["writer"]), int(line["seq"]), str(line["hash"]), rec)


def fingerprint(public: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key (``key_id`` is its first 16 hex digits)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x, sort_keys=True, ensure_ascii=False).encode() + b"\n" for x in lines)


def _approval_ids(records: list[model.PackedRecord]) -> list[str]:
    ids: set[str] = set()
    for r in records:
        if r.kind == "approval" and r.data.get("request"):
            ids.add(str(r.data["request"]))
        if r.kind == "statement":
            if r.data.get("approval"):
                ids.add(str(r.data["approval"]))
            denied = r.data.get("denied")
            if isinstance(denied, dict):
                m = model._APPROVAL_REFUSAL.search(str(denied.get("message", "")))
                if m:
                    ids.add(m.group(1))
    return sorted(ids)


def write_pack(store: AuditStore, opts: PackOptions) -> dict[str, Any]:
    """Writes the pack into ``opts.out`` (created; must be empty) and returns the report."""
    from ostiary.audit.verify import verify as verify_store

    out = opts.out
    if out.exists() and any(out.iterdir()):
        raise PackError(f"{out} is not empty")
    lo, hi = opts.period_from, opts.period_to
    store_keys = store.keys()
    by_kid: dict[str, Ed25519PublicKey] = {}
    if opts.trusted:
        by_kid = {keysmod.key_id(k): k for k in opts.trusted}
    else:
        for wk in store_keys.values():
            for kid, pem in wk.items():
                by_kid[kid] = keysmod.load_public_pem(pem)

    period: list[Sealed] = []
    link: list[Sealed] = []
    anchors: list[Sealed] = []
    context: list[tuple[str, Sealed]] = []
    checkpoints: list[SignedCheckpoint] = []
    policy_before: Sealed | None = None
    seen_before: dict[tuple[str, str], Sealed] = {}
    for writer in store.writers():
        first = last = 0
        for r in store.chain(writer):
            if lo <= r.ts < hi:
                first = first or r.seq
                last = r.seq
        if not first:
            # Nothing of this writer in the period; its earlier records may still be context.
            last = first = 1 << 62
        cps = [
            c
            for c in store.checkpoints(writer)
            if c.checkpoint.key_id in by_kid and keysmod.check_signature(by_kid[c.checkpoint.key_id], c)
        ]
        # A checkpoint after the last record, when there is one, brings the record after it into
        # link.jsonl: stamped after the period, it shows where the period's records end.
        after = [c for c in cps if c.checkpoint.seq > last]
        at_last = [c for c in cps if c.checkpoint.seq == last]
        vouching = min(after or at_last, default=None, key=lambda c: c.checkpoint.seq)
        end = vouching.checkpoint.seq if vouching else last
        for r in store.chain(writer):
            if r.seq == first - 1:
                anchors.append(r)
            if r.seq < first:
                later = policy_before is None or (r.ts, r.id) > (policy_before.ts, policy_before.id)
                if r.ts < lo and r.kind == "policy" and r.verdict == "applied" and later:
                    policy_before = r
                if r.kind == "session_start" and r.ts < lo:
                    seen_before[(r.identity, r.connection)] = r
            elif r.seq <= last:
                period.append(r)
            elif r.seq <= end:
                link.append(r)
            else:
                break
        if first != 1 << 62:
            before = max(
                (c for c in cps if c.checkpoint.seq < first), default=None, key=lambda c: c.checkpoint.seq
            )
            checkpoints += [c for c in cps if (before and c is before) or first <= c.checkpoint.seq <= end]
            if first > 1 and not any(a.writer == writer for a in anchors):
                # The record before the run was purged: the signed purge checkpoint names it.
                purges = [c for c in cps if c.checkpoint.purged_through == first - 1]
                checkpoints += [c for c in purges[-1:] if c not in checkpoints]
    if not period:
        raise PackError(f"the store holds no records between {model.iso(lo)} and {model.iso(hi)}")
    period.sort(key=lambda r: r.id)
    pairs = {(r.identity, r.connection) for r in period if r.kind == "session_start"}
    if policy_before is not None:
        context.append(("policy_before", policy_before))
    context += [("seen_before", r) for k, r in sorted(seen_before.items()) if k in pairs]

    records = [packed(line_of(r)) for r in period]
    ctx = [(role, packed(line_of(r))) for role, r in context]
    approvals: list[dict[str, Any]] = []
    if opts.approvals is not None:
        for rid in _approval_ids(records):
            req = opts.approvals.get(rid)
            if req is not None:
                approvals.append(msgspec.to_builtins(req))
    inputs = model.Inputs(lo, hi, records, ctx, approvals)
    rep = model.build(inputs)

    writers = sorted({r.writer for r in period})
    sv = verify_store(store, opts.trusted)
    keys_used = sorted({c.checkpoint.key_id for c in checkpoints})
    rep["generated"] = {
        "at": model.iso(int(dt.datetime.now(dt.UTC).timestamp() * 1e6)),
        "tool_version": __version__,
        "store": store.description,
    }
    rep["integrity"] = {
        "store_verification": {
            "ok": all(not w.problems for w in sv.writers if w.writer in writers),
            "trusted_keys": bool(opts.trusted),
            "writers": [
                {
                    "writer": w.writer,
                    "records": w.records,
                    "first_seq": w.first_seq,
                    "last_seq": w.last_seq,
                    "signed_through": w.signed_through,
                    "checkpoints": w.checkpoints,
                    "problems": w.problems,
                }
                for w in sv.writers
                if w.writer in writers
            ],
            "notes": sv.notes,
        },
        "keys": [{"key_id": kid, "sha256": fingerprint(by_kid[kid])} for kid in keys_used if kid in by_kid],
    }

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        "records.jsonl": _jsonl([line_of(r) for r in period]),
        "link.jsonl": _jsonl([line_of(r) for r in sorted(link, key=lambda r: r.id)]),
        "anchor.jsonl": _jsonl([line_of(r) for r in anchors if r.writer in writers]),
        "context.jsonl": _jsonl([line_of(r, role) for role, r in context]),
        "checkpoints.json": json.dumps([msgspec.to_builtins(c) for c in checkpoints], indent=2).encode(),
        "approvals.json": json.dumps(approvals, indent=2, sort_keys=True).encode(),
        "report.json": json.dumps(rep, indent=2, sort_keys=True, ensure_ascii=False).encode(),
    }
    for kid in keys_used:
        if kid in by_kid:
            files[f"public-keys/{kid}.pem"] = keysmod.public_pem(by_kid[kid]).encode()
    if opts.sample:
        files.update(_samples(records, period, opts))
    from ostiary.evidence.html import render

    files["report.html"] = render(rep).encode()
    for name, data in files.items():
        p = out / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    manifest = {
        "format": model.FORMAT,
        "period": rep["period"],
        "store": store.description,
        "tool_version": __version__,
        "generated": rep["generated"]["at"],
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return rep


def _samples(records: list[model.PackedRecord], period: list[Sealed], opts: PackOptions) -> dict[str, bytes]:
    """``--sample N``: N statements and N sessions at random, each with every record of its session
    and, when the data directory holds its recording, the session replayed as text."""
    from ostiary.errors import RecordingError
    from ostiary.recording.render import replay
    from ostiary.recording.store import find_recording

    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    by_session: dict[str, list[Sealed]] = {}
    for r in period:
        if r.session:
            by_session.setdefault(r.session, []).append(r)
    stmts = [r for r in records if r.kind == "statement"]
    sessions = sorted({r.get("session") for r in records if r.kind == "session_start"})
    picked_stmts = rng.sample(stmts, min(opts.sample, len(stmts)))
    picked_sessions = rng.sample(sessions, min(opts.sample, len(sessions)))
    files: dict[str, bytes] = {}
    index: dict[str, Any] = {"seed": seed, "statements": [], "sessions": []}
    for s in picked_stmts:
        name = f"samples/statement-{s.writer}-{s.seq}.json"
        session = [line_of(r) for r in by_session.get(s.get("session"), [])]
        files[name] = json.dumps(
            {"statement": s.ref, "id": s.id, "session_records": session}, indent=2, ensure_ascii=False
        ).encode()
        index["statements"].append({"ref": s.ref, "id": s.id, "file": name})
    for ref in picked_sessions:
        name = f"samples/session-{ref}.jsonl"
        files[name] = _jsonl([line_of(r) for r in by_session.get(ref, [])])
        entry: dict[str, Any] = {"session": ref, "file": name}
        if opts.data_dir is not None:
            try:
                path = find_recording(opts.data_dir, ref)
                buf = io.StringIO()
                replay(path, out=buf)
                files[f"samples/session-{ref}.txt"] = buf.getvalue().encode()
                entry["replay"] = f"samples/session-{ref}.txt"
            except (RecordingError, ValueError, OSError) as e:
                entry["replay_missing"] = str(e)
        index["sessions"].append(entry)
    files["samples/index.json"] = json.dumps(index, indent=2).encode()
    return files
