"""``ostiary audit verify``: checks every writer's chain and signed checkpoints.

Per writer: the signatures of its checkpoints (with keys given by the auditor, else the keys the
store lists, which proves consistency but not authorship); then its records in sequence order,
from 1 (or from just after the newest signed purge): each body must hash to its stored hash, its
header copies must equal the body's, its ``prev`` must be the hash of the record before, sequence
numbers must be contiguous and store ids must rise with them. Every signed checkpoint (and the
head file the gateway keeps, when given) must match the record it names; a checkpoint beyond the
chain's end means its tail was cut off. The first problem of each writer names the record.

With the auditor's keys, a writer with records but no checkpoint signed by one of them fails: a
well-chained run of records proves nothing by itself (anyone with write access can compute hashes),
so such a writer was either never a gateway of theirs or had every checkpoint deleted. Records
after the newest signed checkpoint of a writer that has one are reported (``signed_through`` below
``last_seq``), not failed: a running gateway signs only every ``checkpoint_interval``. A head file
whose writer has no record left in the store means that writer's trail was removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ostiary.audit import keys as keysmod
from ostiary.audit.keys import SignedCheckpoint
from ostiary.audit.records import GENESIS, HEADER_FIELDS, decode, digest
from ostiary.audit.store import AuditStore


@dataclass
class WriterReport:
    writer: str
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    checkpoints: int = 0
    signed_through: int = 0
    purged_through: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    writers: list[WriterReport]
    trusted_keys: bool
    notes: list[str] = field(default_factory=list)
    # Problems of the trail as a whole rather than of one writer's chain (an empty store that the
    # auditor's keys say should hold records).
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(not w.problems for w in self.writers)

    def first_problem(self) -> str | None:
        if self.problems:
            return self.problems[0]
        for w in self.writers:
            if w.problems:
                return w.problems[0]
        return None

    def to_json(self) -> str:
        return json.dumps(
            {
                "ok": self.ok,
                "trusted_keys": self.trusted_keys,
                "notes": self.notes,
                "problems": self.problems,
                "writers": [w.__dict__ for w in self.writers],
            },
            indent=2,
        )


def load_head_files(paths: list[Path]) -> list[SignedCheckpoint]:
    out = []
    for p in paths:
        out.append(msgspec.json.decode(p.read_bytes(), type=SignedCheckpoint))
    return out


def verify(
    store: AuditStore,
    trusted: list[Ed25519PublicKey] | None = None,
    heads: list[SignedCheckpoint] | None = None,
) -> Report:
    by_id: dict[str, Ed25519PublicKey] = {}
    notes: list[str] = []
    if trusted:
        by_id = {keysmod.key_id(k): k for k in trusted}
    else:
        for writer_keys in store.keys().values():
            for kid, pem in writer_keys.items():
                by_id[kid] = keysmod.load_public_pem(pem)
        notes.append(
            "verified with the public keys listed in the store itself: this shows the trail is consistent, "
            "not who wrote it; pass the keys exported with `ostiary audit export-key` (--key) for that"
        )
    reports = []
    all_cps = store.checkpoints()
    writers = store.writers()
    for writer in writers:
        cps = [c for c in all_cps if c.checkpoint.writer == writer]
        cps += [h for h in heads or [] if h.checkpoint.writer == writer]
        rep = _verify_writer(store, writer, cps, by_id)
        if rep.records and not rep.signed_through and not rep.problems:
            if trusted:
                rep.problems.append(
                    f"writer {writer}: {rep.records} record(s) but no checkpoint signed by a verifying key "
                    "covers any of them: nothing shows a gateway of yours wrote them (records added by "
                    "hand, or every checkpoint of this writer was deleted)"
                )
            else:
                notes.append(f"writer {writer}: no signed checkpoint covers its records")
        reports.append(rep)
    # A head file is a checkpoint the gateway also keeps outside the store: one whose writer left no
    # trace in the store means the whole trail of that writer was removed.
    for writer in sorted({h.checkpoint.writer for h in heads or []} - set(writers)):
        seq = max(h.checkpoint.seq for h in heads or [] if h.checkpoint.writer == writer)
        reports.append(
            WriterReport(
                writer,
                problems=[
                    f"writer {writer}: its head file (audit/head-{writer}.json) says its chain reached "
                    f"seq {seq}, but the store holds no record of this writer: its trail was removed"
                ],
            )
        )
    problems = []
    if trusted and not reports:
        problems.append(
            "the store holds no audit trail (no record, checkpoint or key of any writer), but a "
            "verifying key was given: a gateway that ran with this store would have left records"
        )
    return Report(reports, bool(trusted), notes, problems)


def _verify_writer(
    store: AuditStore, writer: str, cps: list[SignedCheckpoint], keys: dict[str, Ed25519PublicKey]
) -> WriterReport:
    rep = WriterReport(writer)
    good: list[SignedCheckpoint] = []
    for signed in cps:
        c = signed.checkpoint
        key = keys.get(c.key_id)
        if key is None:
            rep.problems.append(
                f"writer {writer}: checkpoint of seq {c.seq} is signed with key {c.key_id}, "
                "which is not among the verifying keys"
            )
            continue
        if not keysmod.check_signature(key, signed):
            rep.problems.append(
                f"writer {writer}: checkpoint of seq {c.seq} has a bad signature (the checkpoint was altered)"
            )
            continue
        good.append(signed)
    rep.checkpoints = len(good)
    purge = max(
        (c.checkpoint for c in good if c.checkpoint.purged_through),
        default=None,
        key=lambda c: c.purged_through,
    )
    expect_seq, prev = 1, GENESIS
    if purge is not None:
        rep.purged_through = purge.purged_through
        expect_seq, prev = purge.purged_through + 1, purge.purged_hash
    wanted = {c.checkpoint.seq: c.checkpoint for c in good if c.checkpoint.seq >= expect_seq}
    seen: dict[int, str] = {}
    last_id = 0
    for r in store.chain(writer):
        if r.seq < expect_seq and purge is not None and r.seq <= purge.purged_through:
            # Records a signed purge covers but that are still there: harmless (purge interrupted).
            continue
        where = f"writer {writer} record seq {r.seq} (store id {r.id})"
        if not rep.records:
            rep.first_seq = r.seq
        if r.seq != expect_seq:
            if r.seq > expect_seq:
                missing = f"{expect_seq}" if r.seq == expect_seq + 1 else f"{expect_seq}..{r.seq - 1}"
                rep.problems.append(f"{where}: record(s) {missing} before it are missing (deleted)")
            else:
                rep.problems.append(f"{where}: out of sequence (expected {expect_seq})")
            break
        h = digest(r.body)
        if h != r.hash:
            rep.problems.append(f"{where}: its content does not match its hash (the record was edited)")
            break
        try:
            rec = decode(r.body)
        except msgspec.DecodeError as e:
            rep.problems.append(f"{where}: its body is not a record ({e})")
            break
        differs = [f for f in HEADER_FIELDS if getattr(rec, f) != getattr(r, f)]
        if differs:
            rep.problems.append(
                f"{where}: column(s) {', '.join(differs)} differ from the hashed record (the row was edited)"
            )
            break
        if rec.prev != prev:
            rep.problems.append(
                f"{where}: does not link to the record before it (a record was inserted, reordered or "
                "replaced here)"
            )
            break
        if r.id <= last_id:
            rep.problems.append(f"{where}: stored before the record preceding it (records were reordered)")
            break
        last_id = r.id
        if r.seq in wanted:
            seen[r.seq] = h
        prev = h
        expect_seq += 1
        rep.records += 1
        rep.last_seq = r.seq
    if rep.problems:
        return rep
    end = rep.last_seq or expect_seq - 1
    for seq, c in sorted(wanted.items()):
        if seq > end:
            rep.problems.append(
                f"writer {writer}: the chain ends at seq {end} but a signed checkpoint covers seq {seq}: "
                f"record(s) {end + 1}..{seq} were removed (the trail was truncated)"
            )
            break
        if seen.get(seq) != c.hash:
            rep.problems.append(
                f"writer {writer} record seq {seq}: differs from the signed checkpoint for it "
                "(the chain was rewritten)"
            )
            break
        rep.signed_through = max(rep.signed_through, seq)
    return rep
