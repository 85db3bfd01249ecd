"""The web page of one approval request: self-contained HTML, no script, every value escaped.

Rules of this file: every value that reaches the page goes through ``_e`` (``html.escape`` with
quotes), statements included; the page loads nothing (inline style only) and the headers forbid
scripts, framing (clickjacking of the buttons) and referrers. The page never shows a token: the
form posts the one the approver pastes, with their reason, to ``view``, ``approve`` or ``deny``.
Without a token the page shows only the request's id.
"""

from __future__ import annotations

import datetime as dt
import html

from ostiary.approvals.store import Request

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

STYLE = """
body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse}td,th{padding:.2rem .8rem .2rem 0;text-align:left;vertical-align:top}
pre{background:#f4f4f4;padding:.8rem;overflow:auto;white-space:pre-wrap}
.error{color:#a00}.notice{color:#060}input[type=password],textarea{width:100%}
button{margin:.5rem .5rem 0 0;padding:.4rem 1rem}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(us: int) -> str:
    if not us:
        return ""
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(rid: str, req: Request | None, *, base_path: str = "", error: str = "", notice: str = "") -> str:
    """The page for request ``rid``; its details when ``req`` is given (the caller may see them)."""
    action = f"{base_path}/approvals/{rid}"
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Ostiary approval {_e(rid)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Approval request <code>{_e(rid)}</code></h1>",
    ]
    if error:
        out.append(f'<p class="error">{_e(error)}</p>')
    if notice:
        out.append(f'<p class="notice">{_e(notice)}</p>')
    if req is not None:
        rows = [
            ("State", req.state + (f" ({req.decision_reason})" if req.decision_reason else "")),
            ("Requester", req.requester + (f" ({req.requester_issuer})" if req.requester_issuer else "")),
            ("Connection", req.connection),
            ("Grant", req.grant),
            ("Rule", req.rule),
            ("Approvals", f"{req.approvals} of {req.required} required"),
            ("Scope", req.scope),
            ("Reason", req.reason),
            ("Asked", f"{_when(req.created)} ({req.origin})"),
            ("Expires", _when(req.expires)),
        ]
        if req.valid_until:
            rows.append(("Valid until", _when(req.valid_until)))
        out.append("<table>")
        out += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows]
        out.append("</table>")
        out.append(f"<h2>Statement</h2><pre>{_e(req.statement)}</pre>")
        if req.params:
            params = ", ".join("NULL" if p is None else repr(p) for p in req.params)
            out.append(f"<p>Parameters: <code>{_e(params)}</code></p>")
        if req.votes:
            out.append("<h2>Decisions</h2><ul>")
            out += [
                f"<li>{_e(v.approver)}: {_e(v.decision)} at {_e(_when(v.ts))}: {_e(v.reason)}</li>"
                for v in req.votes
            ]
            out.append("</ul>")
    pending = req is None or req.state == "pending"
    out.append(f'<form method="post" action="{_e(action)}/view">')
    out.append(
        "<p><label>Your token (your own OIDC login; it is not stored)<br>"
        '<input type="password" name="token" autocomplete="off" required></label></p>'
    )
    if pending:
        out.append(
            '<p><label>Reason (kept in the audit trail)<br><textarea name="reason" rows="3">'
            "</textarea></label></p>"
        )
    out.append("<button type=submit>Show</button>")
    if pending:
        out.append(f'<button type=submit formaction="{_e(action)}/approve">Approve</button>')
        out.append(f'<button type=submit formaction="{_e(action)}/deny">Deny</button>')
    out.append("</form></body></html>\n")
    return "\n".join(out)
