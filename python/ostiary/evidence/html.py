"""The evidence report as one self-contained HTML page: inline CSS, no script, no external resource,
printable (``@media print``). Rendered from ``report.json``'s model only; every figure shows the
records it comes from (``<writer>:<seq>``, the first few, with the full list in report.json)."""

from __future__ import annotations

import html
from typing import Any

REFS_SHOWN = 8

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;margin:0;background:#f4f5f7}
main{max-width:1100px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid #274690;
padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;width:100%;margin:6px 0 12px}th,td{border:1px solid #d5d9e0;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#eef1f6;font-weight:600}td.n{text-align:right;
font-variant-numeric:tabular-nums}
.refs{font:11px/1.3 ui-monospace,monospace;color:#5a6270;word-break:break-all}
.scope{background:#fff8e1;border-left:4px solid #e0a800;padding:8px 12px}
.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}.muted{color:#5a6270}
code{font:12px ui-monospace,monospace;background:#f1f3f6;padding:1px 3px}
@media print{body{background:#fff;font-size:11px}main{max-width:none;padding:0}
h2{break-after:avoid}tr{break-inside:avoid}.refs{font-size:9px}}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def refs(fig: dict[str, Any]) -> str:
    r = fig.get("refs", [])
    shown = ", ".join(r[:REFS_SHOWN])
    more = f" … +{len(r) - REFS_SHOWN} more" if len(r) > REFS_SHOWN else ""
    return f'<div class="refs">records: {_e(shown) or "none"}{_e(more)}</div>' if r else ""


def val(fig: dict[str, Any]) -> str:
    v = fig.get("value")
    if isinstance(v, list):
        v = ", ".join(str(x) for x in v) or "none"
    return _e(v)


def _table(head: list[str], rows: list[list[str]], empty: str = "none in the period") -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def summary_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    """The top table as (label, value) text: the README excerpt is this."""
    s = rep["summary"]
    integ = rep.get("integrity", {}).get("store_verification", {})
    keys = ", ".join(k["key_id"] for k in rep.get("integrity", {}).get("keys", []))
    return [
        ("Period (UTC)", f"{rep['period']['from']} to {rep['period']['to']}"),
        ("Connections in scope", ", ".join(c["name"] for c in rep["scope"]["connections"]) or "none"),
        ("Audit records", str(s["records"]["value"])),
        ("Sessions", str(s["sessions"]["value"])),
        ("Identities", ", ".join(s["identities"]["value"]) or "none"),
        ("Statements", str(s["statements"]["value"])),
        ("Statements blocked", str(s["blocked"]["value"])),
        ("Logins refused", str(s["logins_refused"]["value"])),
        ("Approval requests", str(s["approvals"]["value"])),
        ("Policy records", str(s["policy_changes"]["value"])),
        ("Values masked", str(s["values_masked"]["value"])),
        (
            "Audit chain",
            ("verifies" if integ.get("ok") else "DOES NOT VERIFY") + (f" (key {keys})" if keys else ""),
        ),
    ]


def render(rep: dict[str, Any]) -> str:
    p: list[str] = []
    a = p.append
    period = rep["period"]
    a(f"<h1>Access evidence: {_e(period['from'])} to {_e(period['to'])}</h1>")
    gen = rep.get("generated", {})
    a(
        f'<p class="muted">Generated {_e(gen.get("at", ""))} by ostiary {_e(gen.get("tool_version", ""))} '
        f"from {_e(gen.get('store', ''))}. Check this pack offline with "
        "<code>ostiary evidence verify DIR --key gateway.pem</code>.</p>"
    )
    s = rep["summary"]
    summary = summary_rows(rep)
    figs = [
        None,
        None,
        s["records"],
        s["sessions"],
        s["identities"],
        s["statements"],
        s["blocked"],
        s["logins_refused"],
        s["approvals"],
        s["policy_changes"],
        s["values_masked"],
        None,
    ]
    a('<table class="summary"><tbody>')
    for (label, value), fig in zip(summary, figs, strict=True):
        cls = ""
        if label == "Audit chain":
            cls = ' class="ok"' if value.startswith("verifies") else ' class="bad"'
        a(f"<tr><th>{_e(label)}</th><td{cls}>{_e(value)}{refs(fig) if fig else ''}</td></tr>")
    a("</tbody></table>")

    a("<h2>Scope</h2>")
    a(f'<p class="scope">{_e(rep["scope"]["statement"])}</p>')
    a(
        _table(
            ["Connection", "Upstream", "Database", "Upstream roles"],
            [
                [
                    _e(c["name"]) + refs(c["figure"]),
                    _e(f"{c['host']}:{c['port']}"),
                    _e(c["database"]),
                    _e(", ".join(c.get("roles", []))),
                ]
                for c in rep["scope"]["connections"]
            ],
        )
    )
    a("<h3>Policy versions in force</h3>")
    a(
        _table(
            ["Version (SHA-256)", "Since", "How"],
            [
                [f"<code>{_e(v['version'][:16])}</code>{refs(v['figure'])}", _e(v["since"]), _e(v["how"])]
                for v in rep["policy_versions_in_force"]
            ],
        )
    )

    cc6 = rep["cc6"]
    a("<h2>CC6.1 / CC6.2 Logical access</h2>")
    a("<h3>Identities that accessed each connection</h3>")
    rows = [
        [_e(c["connection"]), _e(i["identity"]), _e(", ".join(i["grants"])), *_tds(i["sessions"])]
        for c in cc6["access_by_connection"]
        for i in c["identities"]
    ]
    a(_table(["Connection", "Identity", "Grant", "Sessions"], rows))
    a("<h3>Grants in force and who holds them (access review)</h3>")
    rows = []
    for g in cc6["grants_in_force"]:
        for d in g["definitions"]:
            holders = ", ".join(
                h["name"] + ("" if h["via"] == "direct" else f" (via {h['via']})") for h in d["holders"]
            )
            extra = []
            if d["guardrails"]:
                extra.append("guardrails: " + ", ".join(d["guardrails"]))
            if d["approvals"]:
                extra.append("approvals: " + ", ".join(d["approvals"]))
            if d["masking_exempt"]:
                extra.append("exempt from masking")
            if d["windows"]:
                extra.append(f"{len(d['windows'])} time window(s)")
            if d["networks"]:
                extra.append("networks: " + ", ".join(d["networks"]))
            rows.append(
                [
                    _e(g["name"]) + refs(g["in_force"]),
                    _e(d["connection"]),
                    _e(d["access"]),
                    _e(holders),
                    _e("; ".join(extra)),
                ]
            )
    a(_table(["Grant", "Connection", "Access", "Holders", "Controls"], rows))
    au = cc6["authentications"]
    a("<h3>Authentications</h3>")
    a(_table(["Allowed", "Refused"], [[*_tds(au["allowed"]), *_tds(au["refused"])]]))
    a(
        _table(
            ["Code", "Reason for refusal", "Count"],
            [[_e(r["code"]), _e(r["reason"]), *_tds(r["figure"])] for r in au["refused_by_reason"]],
            "no refused logins",
        )
    )
    lp = cc6["least_privilege"]
    a("<h3>Least privilege</h3>")
    a(
        _table(
            ["Fact", "Grants"],
            [
                ["Read-only grants", val(lp["read_only_grants"])],
                ["Read-write grants", val(lp["read_write_grants"])],
                ["Grants whose statements need approval", val(lp["grants_with_approvals"])],
                ["Grants limited to time windows", val(lp["grants_with_time_windows"])],
            ],
        )
    )
    a(
        _table(
            ["Guardrail pack", "Built in", "On grants", "On connections"],
            [
                [
                    _e(g["name"]) + refs(g["figure"]),
                    "yes" if g["builtin"] else "no",
                    _e(", ".join(g["grants"])),
                    _e(", ".join(g["connections"])),
                ]
                for g in lp["guardrails_in_force"]
            ],
            "no guardrails in force",
        )
    )

    cc7 = rep["cc7"]
    a("<h2>CC7.1 / CC7.2 Monitoring and audit logging</h2>")
    a("<h3>Statement volumes</h3>")
    a(
        _table(
            ["Identity", "Connection", "Statements", "Allowed", "Blocked"],
            [
                [
                    _e(v["identity"]),
                    _e(v["connection"]),
                    *_tds(v["statements"]),
                    *_tds(v["allowed"]),
                    *_tds(v["blocked"]),
                ]
                for v in cc7["statement_volumes"]
            ],
        )
    )
    a("<h3>Blocked attempts by rule</h3>")
    a(
        _table(
            ["Rule", "Blocked"],
            [[_e(b["rule"]), *_tds(b["figure"])] for b in cc7["blocked_by_rule"]],
            "no statement was blocked",
        )
    )
    an = cc7["anomalies"]
    a("<h3>Anomalies worth a look</h3>")
    a(
        _table(
            [
                "First-time access (identity never seen on the connection before the period)",
                "Connection",
                "At",
            ],
            [
                [_e(x["identity"]) + refs(x["figure"]), _e(x["connection"]), _e(x["at"])]
                for x in an["first_time_access"]
            ],
            "no first-time access",
        )
    )
    a(
        _table(
            ["Attempt outside a grant's time window", "Connection", "At", "Reason"],
            [
                [_e(x["identity"]) + refs(x["figure"]), _e(x["connection"]), _e(x["at"]), _e(x["reason"])]
                for x in an["outside_time_window"]
            ],
            "no attempt outside a time window",
        )
    )
    sp = an["blocked_spikes"]
    a(f'<p class="muted">Spikes of blocked statements: {_e(sp["rule"])}.</p>')
    a(_table(["Hour", "Blocked"], [[_e(h["hour"]), *_tds(h["blocked"])] for h in sp["hours"]], "no spike"))
    a("<h3>Integrity of the audit trail</h3>")
    integ = rep.get("integrity", {})
    sv = integ.get("store_verification", {})
    a(
        _table(
            ["Writer", "Records in the store", "Signed through seq", "In this pack", "Result"],
            [
                [
                    _e(w["writer"]),
                    _e(f"seq {w['first_seq']}..{w['last_seq']} ({w['records']})"),
                    _e(w["signed_through"]),
                    _e(
                        next(
                            (
                                f"seq {c['first_seq']}..{c['last_seq']}"
                                for c in rep["chains"]
                                if c["writer"] == w["writer"]
                            ),
                            "",
                        )
                    ),
                    '<span class="ok">verifies</span>'
                    if not w["problems"]
                    else '<span class="bad">' + _e("; ".join(w["problems"])) + "</span>",
                ]
                for w in sv.get("writers", [])
            ],
        )
    )
    a(
        _table(
            ["Verifying key id", "SHA-256 fingerprint of the Ed25519 public key"],
            [
                [f"<code>{_e(k['key_id'])}</code>", f"<code>{_e(k['sha256'])}</code>"]
                for k in integ.get("keys", [])
            ],
        )
    )
    for n in sv.get("notes", []):
        a(f'<p class="muted">Note: {_e(n)}</p>')

    cc8 = rep["cc8"]
    a("<h2>CC8.1 Change management</h2>")
    a("<h3>Approval requests</h3>")
    rows = []
    for r in cc8["approvals"]:
        votes = "; ".join(
            f"{v['approver']} {v['decision']}" + (f": {v['reason']}" if v.get("reason") else "")
            for v in r.get("votes_from_table", [])
        )
        rows.append(
            [
                f"<code>{_e(r['request'])}</code>{refs(r['figure'])}",
                _e(r["requester"]),
                f"<code>{_e(r['statement'][:200])}</code>",
                _e(r["requested_at"])
                + (f"<br>waited {_e(r['wait_s'])} s" if r["wait_s"] is not None else ""),
                f"<b>{_e(r['outcome'])}</b><br>{_e(r['decision_reason'])}",
                _e(", ".join(r["approvers"])) + (f'<div class="muted">{_e(votes)}</div>' if votes else ""),
            ]
        )
    a(_table(["Request", "Requester", "Statement", "Requested", "Outcome", "Approvers (votes)"], rows))
    a(
        '<p class="muted">Votes and their reasons come from the approval tables of the store (not '
        "hash-chained); requests, uses, expiries and refusals come from the audit trail.</p>"
    )
    a("<h3>Policy changes</h3>")
    a(
        _table(
            ["At", "Version", "How", "Result", "What changed"],
            [
                [
                    _e(c["at"]),
                    f"<code>{_e(c['version'][:16])}</code>{refs(c['figure'])}",
                    _e(c["how"]),
                    _e(c["verdict"]) + (f"<br>{_e(c['detail'])}" if c["detail"] else ""),
                    _e(c.get("diff", {}).get("summary", "")),
                ]
                for c in cc8["policy_changes"]
            ],
        )
    )

    c1 = rep["c1"]
    a("<h2>Confidentiality (C1.1) Masking</h2>")
    a(
        _table(
            ["Connection", "Masking rules in force", "Exempt grants"],
            [
                [
                    _e(m["connection"]) + refs(m["figure"]),
                    _e(
                        "; ".join(f"{r['name']} (by {', '.join(r['applied_by'])})" for r in m["rules"])
                        or "none"
                    ),
                    _e(", ".join(m["exempt_grants"]) or "none"),
                ]
                for m in c1["masking_in_force"]
            ],
        )
    )
    a(
        _table(
            ["Rule", "Values masked"],
            [[_e(m["rule"]), *_tds(m["figure"])] for m in c1["masked_by_rule"]],
            "no value was masked",
        )
    )
    body = "\n".join(p)
    title = _e(f"Ostiary access evidence {period['from']} to {period['to']}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'<meta name="viewport" content="width=device-width"><style>{CSS}</style></head>'
        f"<body><main>\n{body}\n</main></body></html>\n"
    )


def _tds(fig: dict[str, Any]) -> list[str]:
    """A figure as a table cell's content (the value, then its records)."""
    return [f"{val(fig)}{refs(fig)}"]


def excerpt(rep: dict[str, Any]) -> str:
    """The summary as plain text (for a README or a ticket)."""
    rows = summary_rows(rep)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows) + "\n"
