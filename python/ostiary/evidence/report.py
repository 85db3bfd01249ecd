"""The evidence model: pure functions from packed audit records to the figures of the report.

Rules of this module: no I/O, no clock, no store. ``build`` takes the records of the period (as
packed in ``records.jsonl``), the context records (the policy in force when the period began, and
for each identity and connection seen in the period an earlier session of it, if any) and the rows
of the approval tables, and returns a plain JSON-able mapping. ``ostiary evidence`` writes it as
``report.json``; ``ostiary evidence verify`` calls ``build`` again on the pack's files and compares,
so every figure must come from those inputs and nothing else (the generation time and the store's
own verification are added by ``pack.py`` outside ``build``'s result and are not recomputed).

Every figure is ``{"value": ..., "ids": [store ids], "refs": ["<writer>:<seq>", ...]}``: the records
it was counted from. Lists are sorted so that two builds over the same inputs are equal.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

FORMAT = "ostiary-evidence/1"

SCOPE_STATEMENT = (
    "This report is evidence for what the gateway saw: the sessions, statements and logins that went "
    "through it to the connections listed here, as recorded in its hash-chained audit trail. Access to "
    "these databases that does not go through the gateway (direct connections, other network paths, "
    "administrator consoles, replication, backups) is outside its view and is not covered."
)

# A refused login whose reason or rule chain says this was outside a grant's time windows.
_WINDOW = re.compile(r"time window", re.IGNORECASE)
_APPROVAL_REFUSAL = re.compile(r"approval (apr-[0-9a-f]+) (denied|expired|cancelled): ?(.*)", re.DOTALL)
SPIKE_FACTOR = 3
SPIKE_MIN = 10
_HOUR_US = 3_600_000_000


@dataclass(frozen=True)
class PackedRecord:
    """One record of the pack: the store's ``id``, its chain position and the decoded body."""

    id: int
    writer: str
    seq: int
    hash: str
    rec: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.writer}:{self.seq}"

    @property
    def ts(self) -> int:
        return int(self.rec["ts"])

    @property
    def kind(self) -> str:
        return str(self.rec["kind"])

    @property
    def data(self) -> dict[str, Any]:
        d = self.rec.get("data")
        return d if isinstance(d, dict) else {}

    def get(self, name: str) -> str:
        return str(self.rec.get(name, ""))


@dataclass
class Inputs:
    """What ``build`` reads. ``context`` holds earlier records the period refers to (role
    ``policy_before`` or ``seen_before``); ``approvals`` the approval tables' rows of the requests
    the period's records name (they are not hash-chained: the report says which facts come from them)."""

    period_from: int
    period_to: int
    records: list[PackedRecord]
    context: list[tuple[str, PackedRecord]] = field(default_factory=list)
    approvals: list[dict[str, Any]] = field(default_factory=list)


def figure(value: Any, rows: Iterable[PackedRecord]) -> dict[str, Any]:
    """A figure and the records behind it (each once, in store order)."""
    uniq = {r.ref: r for r in rows}
    ordered = sorted(uniq.values(), key=lambda r: (r.id, r.writer, r.seq))
    return {"value": value, "ids": [r.id for r in ordered], "refs": [r.ref for r in ordered]}


def iso(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- policy snapshots ---------------------------------------------------------------------------------


@dataclass
class PolicyVersion:
    record: PackedRecord
    snapshot: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.record.data.get("version", ""))


def _applied(rows: Iterable[PackedRecord]) -> list[PolicyVersion]:
    out = []
    for r in rows:
        snap = r.data.get("snapshot")
        if r.kind == "policy" and r.get("verdict") == "applied" and isinstance(snap, dict):
            out.append(PolicyVersion(r, snap))
    return out


def _by_name(items: Any) -> dict[str, dict[str, Any]]:
    return {str(i["name"]): i for i in items or [] if isinstance(i, dict) and "name" in i}


def resolve_holders(names: Sequence[str], snapshot: dict[str, Any]) -> list[dict[str, str]]:
    """Who a grant's ``identities`` entries name: groups expanded to their members (nested groups
    too, each once), identity matchers and static clients as themselves."""
    groups = {g: list(v.get("members", [])) for g, v in _by_name(snapshot.get("groups")).items()}
    out: dict[str, str] = {}

    def walk(name: str, via: str, seen: frozenset[str]) -> None:
        if name in groups and name not in seen:
            for m in groups[name]:
                walk(str(m), via or name, seen | {name})
        elif name not in out:
            out[name] = via or "direct"

    for n in names:
        walk(str(n), "", frozenset())
    return [{"name": k, "via": v} for k, v in sorted(out.items())]


def _identity_names(snapshot: dict[str, Any]) -> set[str]:
    names = {str(i.get("name")) for i in snapshot.get("identities") or [] if isinstance(i, dict)}
    names |= {str(c) for c in snapshot.get("clients") or []}
    return names


def _grant_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def policy_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """What changed from one snapshot to the next: grants added, removed, changed (with the fields),
    identities (matchers and static clients) and groups added and removed, connections, rules."""
    old = old or {}
    og, ng = _by_name(old.get("grants")), _by_name(new.get("grants"))
    oi, ni = _identity_names(old), _identity_names(new)
    out: dict[str, Any] = {
        "grants_added": sorted(set(ng) - set(og)),
        "grants_removed": sorted(set(og) - set(ng)),
        "grants_changed": [
            {"grant": g, "fields": _grant_changes(og[g], ng[g])}
            for g in sorted(set(og) & set(ng))
            if og[g] != ng[g]
        ],
        "identities_added": sorted(ni - oi),
        "identities_removed": sorted(oi - ni),
    }
    for section in ("groups", "connections", "guardrails", "masking", "approvals"):
        o, n = _by_name(old.get(section)), _by_name(new.get(section))
        out[f"{section}_added"] = sorted(set(n) - set(o))
        out[f"{section}_removed"] = sorted(set(o) - set(n))
        out[f"{section}_changed"] = sorted(k for k in set(o) & set(n) if o[k] != n[k])
    parts = []
    for key, label in (
        ("grants_added", "grants added"),
        ("grants_removed", "grants removed"),
        ("identities_added", "identities added"),
        ("identities_removed", "identities removed"),
        ("groups_changed", "groups changed"),
        ("connections_added", "connections added"),
        ("connections_removed", "connections removed"),
        ("connections_changed", "connections changed"),
        ("guardrails_changed", "guardrails changed"),
        ("masking_changed", "masking rules changed"),
        ("approvals_changed", "approval rules changed"),
    ):
        if out[key]:
            parts.append(f"{label}: {', '.join(out[key])}")
    if out["grants_changed"]:
        parts.append(
            "grants changed: "
            + ", ".join(f"{c['grant']} ({', '.join(c['fields'])})" for c in out["grants_changed"])
        )
    out["summary"] = "; ".join(parts) if parts else "no change to what the policy grants"
    return out


# -- the sections ------------------------------------------------------------------------------------


def _scope(versions: list[PolicyVersion]) -> dict[str, Any]:
    conns: dict[str, dict[str, Any]] = {}
    rows: dict[str, list[PackedRecord]] = defaultdict(list)
    for v in versions:
        for c in v.snapshot.get("connections") or []:
            name = str(c.get("name"))
            conns[name] = {
                "name": name,
                "host": c.get("host", ""),
                "port": c.get("port", 0),
                "database": c.get("database", ""),
                "roles": c.get("roles", []),
            }
            rows[name].append(v.record)
    return {
        "statement": SCOPE_STATEMENT,
        "connections": [{**conns[n], "figure": figure(n, rows[n])} for n in sorted(conns)],
    }


def _cc6(inp: Inputs, versions: list[PolicyVersion]) -> dict[str, Any]:
    access: dict[tuple[str, str], list[PackedRecord]] = defaultdict(list)
    for r in inp.records:
        if r.kind == "session_start":
            access[(r.get("connection"), r.get("identity"))].append(r)
    by_conn: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (conn, ident), rows in sorted(access.items()):
        used = sorted({r.get("rule") for r in rows})
        by_conn[conn].append({"identity": ident, "grants": used, "sessions": figure(len(rows), rows)})

    grants: dict[str, dict[str, Any]] = {}
    for v in versions:
        for g in v.snapshot.get("grants") or []:
            name = str(g.get("name"))
            entry = grants.setdefault(name, {"name": name, "versions": [], "definitions": [], "_rows": []})
            entry["versions"].append(v.version)
            entry["_rows"].append(v.record)
            definition = {
                "connection": g.get("connection", ""),
                "access": g.get("access", "read-only"),
                "identities": list(g.get("identities", [])),
                "holders": resolve_holders(list(g.get("identities", [])), v.snapshot),
                "statements": g.get("statements"),
                "relations": g.get("relations"),
                "guardrails": list(g.get("guardrails", [])),
                "masking": list(g.get("masking", [])),
                "masking_exempt": bool(g.get("masking_exempt", False)),
                "approvals": list(g.get("approvals", [])),
                "windows": list(g.get("windows", [])),
                "networks": list(g.get("networks", [])),
                "max_session": g.get("max_session"),
            }
            if definition not in entry["definitions"]:
                entry["definitions"].append(definition)
    grant_list = []
    for name in sorted(grants):
        e = grants[name]
        rows = e.pop("_rows")
        e["in_force"] = figure(len(e["versions"]), rows)
        grant_list.append(e)

    auth_ok = [r for r in inp.records if r.kind == "auth" and r.get("verdict") == "allow"]
    auth_no = [r for r in inp.records if r.kind == "auth" and r.get("verdict") != "allow"]
    by_reason: dict[tuple[str, str], list[PackedRecord]] = defaultdict(list)
    for r in auth_no:
        by_reason[(str(r.data.get("code", "")), str(r.data.get("reason", "")))].append(r)

    read_only = [g["name"] for g in grant_list if all(d["access"] == "read-only" for d in g["definitions"])]
    read_write = [g["name"] for g in grant_list if g["name"] not in read_only]
    defined: set[str] = set()
    rails: dict[str, dict[str, Any]] = {}
    for v in versions:
        defined |= set(_by_name(v.snapshot.get("guardrails")))
        for c in v.snapshot.get("connections") or []:
            for gr in c.get("guardrails", []):
                rails.setdefault(gr, {"grants": set(), "connections": set(), "rows": []})
                rails[gr]["connections"].add(str(c.get("name")))
                rails[gr]["rows"].append(v.record)
        for g in v.snapshot.get("grants") or []:
            for gr in g.get("guardrails", []):
                rails.setdefault(gr, {"grants": set(), "connections": set(), "rows": []})
                rails[gr]["grants"].add(str(g.get("name")))
                rails[gr]["rows"].append(v.record)
    guardrails = [
        {
            "name": n,
            "builtin": n not in defined,
            "grants": sorted(rails[n]["grants"]),
            "connections": sorted(rails[n]["connections"]),
            "figure": figure(1, rails[n]["rows"]),
        }
        for n in sorted(rails)
    ]
    policy_rows = [v.record for v in versions]
    return {
        "access_by_connection": [{"connection": c, "identities": by_conn[c]} for c in sorted(by_conn)],
        "grants_in_force": grant_list,
        "authentications": {
            "allowed": figure(len(auth_ok), auth_ok),
            "refused": figure(len(auth_no), auth_no),
            "refused_by_reason": [
                {"code": code, "reason": reason, "figure": figure(len(rows), rows)}
                for (code, reason), rows in sorted(by_reason.items())
            ],
        },
        "least_privilege": {
            "read_only_grants": figure(read_only, policy_rows),
            "read_write_grants": figure(read_write, policy_rows),
            "grants_with_approvals": figure(
                [g["name"] for g in grant_list if any(d["approvals"] for d in g["definitions"])], policy_rows
            ),
            "grants_with_time_windows": figure(
                [g["name"] for g in grant_list if any(d["windows"] for d in g["definitions"])], policy_rows
            ),
            "guardrails_in_force": guardrails,
        },
    }


def _cc7(inp: Inputs) -> dict[str, Any]:
    stmts = [r for r in inp.records if r.kind == "statement"]
    vol: dict[tuple[str, str], list[PackedRecord]] = defaultdict(list)
    for r in stmts:
        vol[(r.get("identity"), r.get("connection"))].append(r)
    volumes = []
    for (ident, conn), rows in sorted(vol.items()):
        blocked = [r for r in rows if r.get("verdict") == "deny"]
        allowed = [r for r in rows if r.get("verdict") != "deny"]
        volumes.append(
            {
                "identity": ident,
                "connection": conn,
                "statements": figure(len(rows), rows),
                "allowed": figure(len(allowed), allowed),
                "blocked": figure(len(blocked), blocked),
            }
        )
    denied = [r for r in stmts if r.get("verdict") == "deny"]
    by_rule: dict[str, list[PackedRecord]] = defaultdict(list)
    for r in denied:
        by_rule[r.get("rule")].append(r)

    seen_before = {
        (r.get("identity"), r.get("connection")) for role, r in inp.context if role == "seen_before"
    }
    firsts: dict[tuple[str, str], PackedRecord] = {}
    for r in sorted(inp.records, key=lambda r: (r.ts, r.id)):
        key = (r.get("identity"), r.get("connection"))
        if r.kind == "session_start" and key not in seen_before and key not in firsts:
            firsts[key] = r
    first_time = [
        {"identity": i, "connection": c, "at": iso(r.ts), "figure": figure(1, [r])}
        for (i, c), r in sorted(firsts.items())
    ]
    outside = [
        r
        for r in inp.records
        if r.kind == "auth"
        and r.get("verdict") != "allow"
        and _WINDOW.search(str(r.data.get("reason", "")) + " " + json.dumps(r.data.get("chain", [])))
    ]
    hours: dict[int, list[PackedRecord]] = defaultdict(list)
    for r in denied:
        hours[r.ts // _HOUR_US].append(r)
    first_h, last_h = inp.period_from // _HOUR_US, max(inp.period_from, inp.period_to - 1) // _HOUR_US
    counts = [len(hours.get(h, [])) for h in range(first_h, last_h + 1)]
    median = statistics.median(counts) if counts else 0
    spikes = [
        {"hour": iso(h * _HOUR_US), "blocked": figure(len(rows), rows)}
        for h, rows in sorted(hours.items())
        if len(rows) >= SPIKE_MIN and len(rows) > SPIKE_FACTOR * median
    ]
    return {
        "statement_volumes": volumes,
        "statements": figure(len(stmts), stmts),
        "blocked": figure(len(denied), denied),
        "blocked_by_rule": [{"rule": k, "figure": figure(len(v), v)} for k, v in sorted(by_rule.items())],
        "anomalies": {
            "first_time_access": first_time,
            "outside_time_window": [
                {
                    "identity": r.get("identity") or str(r.data.get("user", "")),
                    "connection": r.get("connection"),
                    "at": iso(r.ts),
                    "reason": str(r.data.get("reason", "")),
                    "figure": figure(1, [r]),
                }
                for r in sorted(outside, key=lambda r: (r.ts, r.id))
            ],
            "blocked_spikes": {
                "rule": f"an hour with at least {SPIKE_MIN} blocked statements and more than "
                f"{SPIKE_FACTOR}x the period's hourly median ({median:g})",
                "hours": spikes,
            },
        },
    }


def _approvals(inp: Inputs) -> list[dict[str, Any]]:
    table = {str(a["id"]): a for a in inp.approvals}
    rows: dict[str, list[PackedRecord]] = defaultdict(list)
    refusals: dict[str, tuple[str, str, PackedRecord]] = {}
    for r in inp.records:
        if r.kind == "approval" and r.data.get("request"):
            rows[str(r.data["request"])].append(r)
        elif r.kind == "statement":
            rid = r.data.get("approval")
            if rid:
                rows[str(rid)].append(r)
            denied = r.data.get("denied")
            if isinstance(denied, dict):
                m = _APPROVAL_REFUSAL.search(str(denied.get("message", "")))
                if m:
                    rows[m.group(1)].append(r)
                    refusals[m.group(1)] = (m.group(2), m.group(3), r)
    out = []
    for rid in sorted(rows, key=lambda k: (min(x.ts for x in rows[k]), k)):
        recs = sorted(rows[rid], key=lambda x: (x.ts, x.id))
        approval_recs = [x for x in recs if x.kind == "approval"]
        requested = next((x for x in approval_recs if x.data.get("action") == "requested"), None)
        base = requested or (approval_recs[0] if approval_recs else None)
        d = base.data if base is not None else {}
        outcome, decision_reason, decided_rec = "pending", str(d.get("decision_reason", "")), None
        for x in approval_recs:
            state = str(x.data.get("state", ""))
            if state and state != "pending":
                outcome, decided_rec = state, x
                decision_reason = str(x.data.get("decision_reason", "")) or decision_reason
        if rid in refusals:
            outcome, decision_reason, decided_rec = refusals[rid][0], refusals[rid][1], refusals[rid][2]
        approvers = sorted(
            {str(x.data.get("approver")) for x in approval_recs if x.data.get("approver")}
            | {str(v.get("approver")) for v in table.get(rid, {}).get("votes", [])}
        )
        executed = [x for x in recs if x.kind == "statement" and x.data.get("approval") == rid]
        t = table.get(rid)
        entry: dict[str, Any] = {
            "request": rid,
            "requester": str(d.get("requester", "")) or (base.get("identity") if base else ""),
            "connection": base.get("connection") if base else "",
            "grant": str(d.get("grant", "")),
            "rule": base.get("rule") if base else "",
            "scope": str(d.get("scope", "")),
            "statement": str(d.get("statement", "")),
            "reason": str(d.get("reason", "")),
            "requested_at": iso(requested.ts) if requested else "",
            "decided_at": iso(decided_rec.ts) if decided_rec else "",
            "wait_s": round((decided_rec.ts - requested.ts) / 1e6, 3) if decided_rec and requested else None,
            "outcome": outcome,
            "decision_reason": decision_reason,
            "approvers": approvers,
            "executed": figure(len(executed), executed),
            "figure": figure(outcome, recs),
        }
        if t is not None:
            entry["votes_from_table"] = [
                {
                    "approver": v.get("approver"),
                    "decision": v.get("decision"),
                    "reason": v.get("reason"),
                    "at": iso(int(v.get("ts", 0))),
                }
                for v in t.get("votes", [])
            ]
            entry["table_state"] = t.get("state")
        out.append(entry)
    return out


def _cc8(inp: Inputs, before: PolicyVersion | None) -> dict[str, Any]:
    changes = []
    prev = before
    for r in sorted((r for r in inp.records if r.kind == "policy"), key=lambda r: (r.id, r.seq)):
        snap = r.data.get("snapshot")
        entry: dict[str, Any] = {
            "version": str(r.data.get("version", "")),
            "at": iso(r.ts),
            "verdict": r.get("verdict"),
            "how": str(r.data.get("how", "")),
            "source": str(r.data.get("source", "")),
            "detail": str(r.data.get("detail", "")),
            "previous_version": prev.version if prev else "",
            "figure": figure(r.get("verdict"), [r, *([prev.record] if prev else [])]),
        }
        if r.get("verdict") == "applied" and isinstance(snap, dict):
            entry["diff"] = policy_diff(prev.snapshot if prev else None, snap)
            prev = PolicyVersion(r, snap)
        changes.append(entry)
    return {"approvals": _approvals(inp), "policy_changes": changes}


def _c1(inp: Inputs, versions: list[PolicyVersion]) -> dict[str, Any]:
    in_force: dict[str, dict[str, Any]] = {}
    for v in versions:
        rules = _by_name(v.snapshot.get("masking"))
        grants = [g for g in v.snapshot.get("grants") or [] if isinstance(g, dict)]
        for c in v.snapshot.get("connections") or []:
            name = str(c.get("name"))
            e = in_force.setdefault(name, {"rules": {}, "exempt_grants": set(), "rows": []})
            e["rows"].append(v.record)
            for m in c.get("masking", []):
                e["rules"].setdefault(m, {"name": m, "from": set(), "definition": rules.get(m)})
                e["rules"][m]["from"].add("connection")
            for g in grants:
                if g.get("connection") != name:
                    continue
                for m in g.get("masking", []):
                    e["rules"].setdefault(m, {"name": m, "from": set(), "definition": rules.get(m)})
                    e["rules"][m]["from"].add(f"grant {g.get('name')}")
                if g.get("masking_exempt"):
                    e["exempt_grants"].add(str(g.get("name")))
    per_conn = []
    for name in sorted(in_force):
        e = in_force[name]
        per_conn.append(
            {
                "connection": name,
                "rules": [
                    {"name": m["name"], "applied_by": sorted(m["from"]), "definition": m["definition"]}
                    for _, m in sorted(e["rules"].items())
                ],
                "exempt_grants": sorted(e["exempt_grants"]),
                "figure": figure(len(e["rules"]), e["rows"]),
            }
        )
    masked: dict[tuple[str, str], list[tuple[int, PackedRecord]]] = defaultdict(list)
    for r in inp.records:
        if r.kind == "session_end":
            for rule, n in (r.data.get("masked") or {}).items():
                if n:
                    masked[(r.get("connection"), str(rule))].append((int(n), r))
    by_rule: dict[str, list[tuple[int, PackedRecord]]] = defaultdict(list)
    for (_, rule), items in masked.items():
        by_rule[rule].extend(items)
    return {
        "masking_in_force": per_conn,
        "masked_by_rule": [
            {"rule": rule, "figure": figure(sum(n for n, _ in items), (r for _, r in items))}
            for rule, items in sorted(by_rule.items())
        ],
        "masked_by_connection_and_rule": [
            {"connection": c, "rule": rule, "figure": figure(sum(n for n, _ in items), (r for _, r in items))}
            for (c, rule), items in sorted(masked.items())
        ],
    }


def chains(records: Iterable[PackedRecord]) -> list[dict[str, Any]]:
    """Per writer: the sequence range the pack holds, the ``prev`` its first record links to and the
    hash of its last."""
    by_writer: dict[str, list[PackedRecord]] = defaultdict(list)
    for r in records:
        by_writer[r.writer].append(r)
    out = []
    for w in sorted(by_writer):
        rows = sorted(by_writer[w], key=lambda r: r.seq)
        out.append(
            {
                "writer": w,
                "first_seq": rows[0].seq,
                "last_seq": rows[-1].seq,
                "records": len(rows),
                "prev": str(rows[0].rec.get("prev", "")),
                "last_hash": rows[-1].hash,
            }
        )
    return out


def build(inp: Inputs) -> dict[str, Any]:
    """The report's recomputable part (see the module's rules)."""
    before = _applied(r for role, r in inp.context if role == "policy_before")
    policy_before = before[-1] if before else None
    versions = ([policy_before] if policy_before else []) + _applied(
        sorted(inp.records, key=lambda r: (r.id, r.seq))
    )
    kinds: dict[str, list[PackedRecord]] = defaultdict(list)
    for r in inp.records:
        kinds[r.kind].append(r)
    sessions = kinds.get("session_start", [])
    c1 = _c1(inp, versions)
    cc6 = _cc6(inp, versions)
    cc7 = _cc7(inp)
    cc8 = _cc8(inp, policy_before)
    masked_total = sum(f["figure"]["value"] for f in c1["masked_by_rule"])
    return {
        "format": FORMAT,
        "period": {
            "from": iso(inp.period_from),
            "to": iso(inp.period_to),
            "from_us": inp.period_from,
            "to_us": inp.period_to,
        },
        "scope": _scope(versions),
        "policy_versions_in_force": [
            {
                "version": v.version,
                "since": iso(v.record.ts),
                "how": str(v.record.data.get("how", "")),
                "figure": figure(v.version, [v.record]),
            }
            for v in versions
        ],
        "summary": {
            "records": {"value": len(inp.records), "by_kind": {k: len(v) for k, v in sorted(kinds.items())}},
            "sessions": figure(len(sessions), sessions),
            "identities": figure(sorted({r.get("identity") for r in sessions}), sessions),
            "statements": cc7["statements"],
            "blocked": cc7["blocked"],
            "logins_refused": cc6["authentications"]["refused"],
            "approvals": figure(
                len(cc8["approvals"]), (r for a in cc8["approvals"] for r in _rows_of(inp, a["figure"]))
            ),
            "policy_changes": figure(
                len(cc8["policy_changes"]), (r for r in inp.records if r.kind == "policy")
            ),
            "values_masked": figure(
                masked_total, (r for f in c1["masked_by_rule"] for r in _rows_of(inp, f["figure"]))
            ),
        },
        "chains": chains(inp.records),
        "cc6": cc6,
        "cc7": cc7,
        "cc8": cc8,
        "c1": c1,
    }


def _rows_of(inp: Inputs, fig: dict[str, Any]) -> list[PackedRecord]:
    wanted = set(fig["refs"])
    return [r for r in inp.records if r.ref in wanted]


def compare(expected: Any, actual: Any, path: str = "report") -> list[str]:
    """Where two reports differ, as paths with both values (the first few)."""
    out: list[str] = []
    if isinstance(expected, dict) and isinstance(actual, dict):
        for k in sorted(set(expected) | set(actual), key=str):
            if k not in actual:
                out.append(f"{path}.{k}: missing from the report (the records give {_short(expected[k])})")
            elif k not in expected:
                out.append(f"{path}.{k}: in the report ({_short(actual[k])}) but not given by the records")
            else:
                out += compare(expected[k], actual[k], f"{path}.{k}")
    elif isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            out += compare(e, a, f"{path}[{i}]")
    elif expected != actual:
        out.append(f"{path}: the report says {_short(actual)}, the records give {_short(expected)}")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."
