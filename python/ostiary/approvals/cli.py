"""``ostiary approvals ...``: the admin API's client, for approvers and pipelines (urllib only).

Every command takes ``--gateway URL`` (default ``$OSTIARY_GATEWAY``, else http://127.0.0.1:6480),
the caller's own token (``--token-file F``, ``$OSTIARY_TOKEN`` or ``--token T``, which other users
of the machine can see in the process list) and ``--ca FILE`` for an https gateway.

``wait`` exits 0 when the request is approved (or already used), 2 denied, 3 expired, 4 still
pending when ``--timeout`` passed, 1 on any other error (as every command does; argparse's own
usage errors also exit 2). It polls every ``POLL`` seconds and rides out a gateway that is briefly
unreachable (up to ``UNREACHABLE`` seconds in a row).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

DEFAULT_GATEWAY = "http://127.0.0.1:6480"
POLL = 2.0
UNREACHABLE = 60.0
EXIT = {"approved": 0, "used": 0, "denied": 2, "expired": 3}
EXIT_PENDING = 4


class ApiError(Exception):
    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def add_approvals_parser(sub: Any) -> Any:
    approvals = sub.add_parser("approvals", help="list, show, approve, deny, request and wait for approvals")
    approvals_sub = approvals.add_subparsers(dest="approvals_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--gateway",
            default=os.environ.get("OSTIARY_GATEWAY", DEFAULT_GATEWAY),
            help="the admin API's URL (default $OSTIARY_GATEWAY, else %(default)s)",
        )
        p.add_argument("--token", help="your token (visible in the process list: prefer --token-file)")
        p.add_argument("--token-file", help="a file holding your token (default: $OSTIARY_TOKEN)")
        p.add_argument("--ca", help="CA bundle (PEM) that verifies an https gateway")

    lst = approvals_sub.add_parser("list", help="requests you may see (requester or approver), newest first")
    lst.add_argument(
        "--state", default="pending", help="pending (default), approved, denied, expired, used or all"
    )
    lst.add_argument("--json", action="store_true", help="the requests as a JSON array")
    lst.set_defaults(func=_list)

    show = approvals_sub.add_parser("show", help="one request with its decisions")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)

    for name, verb in (("approve", "approve"), ("deny", "deny")):
        p = approvals_sub.add_parser(name, help=f"{verb} a request (with your own token)")
        p.add_argument("id", metavar="ID")
        p.add_argument("--reason", required=True, help="why (kept in the audit trail)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_decide, action=name)

    req = approvals_sub.add_parser(
        "request", help="ask ahead of time for a statement you will run; prints the request id"
    )
    req.add_argument("--connection", required=True, help="the connection (dbname) the statement runs on")
    req.add_argument("--statement", required=True, help="the SQL, exactly as it will be sent")
    req.add_argument("--reason", required=True, help="why (shown to approvers, kept in the audit trail)")
    req.add_argument("--grant", help="the grant, when several apply (as user=GRANT would choose)")
    req.add_argument(
        "--param",
        action="append",
        default=[],
        help="a parameter value of a prepared statement ($1, $2, ... in order), as text; repeat",
    )
    req.add_argument("--json", action="store_true", help="the whole request as JSON")
    req.set_defaults(func=_request)

    wait = approvals_sub.add_parser(
        "wait", help="wait for a decision: exit 0 approved, 2 denied, 3 expired, 4 still pending at --timeout"
    )
    wait.add_argument("id", metavar="ID")
    wait.add_argument("--timeout", type=float, help="give up after this many seconds (exit 4)")
    wait.add_argument("--interval", type=float, default=POLL, help="seconds between polls (default 2)")
    wait.add_argument("--json", action="store_true", help="print the final request as JSON")
    wait.set_defaults(func=_wait)

    for p in approvals_sub.choices.values():
        common(p)
        p.set_defaults(func=_guarded(p.get_default("func")))
    return approvals_sub


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``fn`` with API errors printed as one line and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ApiError as e:
            print(f"ostiary approvals {args.approvals_command}: {e}", file=sys.stderr)
            return 1

    return run


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise ApiError(f"cannot read {args.token_file}: {e.strerror}") from None
    else:
        token = (args.token or os.environ.get("OSTIARY_TOKEN", "")).strip()
    if not token:
        raise ApiError("give your token: --token-file FILE, $OSTIARY_TOKEN or --token")
    return token


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    url = args.gateway.rstrip("/") + path
    headers = {"Authorization": f"Bearer {_token(args)}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    handlers: list[urllib.request.BaseHandler] = []
    if url.startswith("https://"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=args.ca)))
    opener = urllib.request.build_opener(*handlers)
    try:
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        with opener.open(request, timeout=30) as r:
            return json.loads(r.read(16 * 1024 * 1024))
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read(64 * 1024))["error"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise ApiError(f"{message} (HTTP {e.code})", e.code) from None
    except (urllib.error.URLError, OSError) as e:
        raise ApiError(f"cannot reach {args.gateway}: {getattr(e, 'reason', e)}") from None
    except ValueError as e:
        raise ApiError(f"{args.gateway} did not answer JSON: {e}") from None


def _when(us: int) -> str:
    if not us:
        return "-"
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _describe(r: dict[str, Any]) -> str:
    lines = [
        f"{r['id']}: {r['state']}" + (f" ({r['decision_reason']})" if r.get("decision_reason") else ""),
        f"  requester:  {r['requester']}",
        f"  connection: {r['connection']} (grant {r['grant']})",
        f"  rule:       {r['rule']}, {r['approvals']} of {r['required']} approval(s), scope {r['scope']}",
        f"  reason:     {r['reason'] or '-'}",
        f"  asked:      {_when(r['created'])} UTC ({r['origin']}); expires {_when(r['expires'])} UTC",
    ]
    if r.get("valid_until"):
        lines.append(f"  valid until {_when(r['valid_until'])} UTC")
    lines.append(f"  page:       {r['url']}")
    lines.append("  statement:")
    lines += [f"    {line}" for line in r["statement"].splitlines() or [""]]
    for v in r.get("votes", []):
        lines.append(f"  {v['decision']} by {v['approver']} at {_when(v['ts'])} UTC: {v['reason']}")
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"state": args.state})
    reqs = _call(args, "GET", f"/approvals?{query}")["requests"]
    if args.json:
        print(json.dumps(reqs, indent=1))
        return 0
    if not reqs:
        print(f"no {args.state} requests you may see" if args.state != "all" else "no requests you may see")
        return 0
    columns = ("ID", "STATE", "ASKED (UTC)", "REQUESTER", "CONNECTION", "RULE", "STATEMENT")
    widths = (15, 9, 19, 20, 14, 16, 60)
    print(" ".join(f"{c:<{w}}" for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in reqs:
        values = (r["id"], r["state"], _when(r["created"]), r["requester"], r["connection"], r["rule"])
        cells = [_one_line(v, w) for v, w in zip((*values, r["statement"]), widths, strict=True)]
        print(" ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)).rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    r = _call(args, "GET", f"/approvals/{urllib.parse.quote(args.id, safe='')}")
    print(json.dumps(r, indent=1) if args.json else _describe(r))
    return 0


def _decide(args: argparse.Namespace) -> int:
    path = f"/approvals/{urllib.parse.quote(args.id, safe='')}/{args.action}"
    r = _call(args, "POST", path, {"reason": args.reason})
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{r['id']}: {r['state']} ({r['approvals']} of {r['required']} approval(s))")
    return 0


def _request(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"connection": args.connection, "statement": args.statement, "reason": args.reason}
    if args.grant:
        body["grant"] = args.grant
    if args.param:
        body["params"] = args.param
    r = _call(args, "POST", "/approvals", body)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(r["id"])
        print(
            f"requested: rule {r['rule']}, {r['required']} approval(s) needed; "
            f"expires {_when(r['expires'])} UTC; approve at {r['url']}",
            file=sys.stderr,
        )
    return 0


def _wait(args: argparse.Namespace) -> int:
    start = time.monotonic()
    path = f"/approvals/{urllib.parse.quote(args.id, safe='')}"
    unreachable_since: float | None = None
    while True:
        try:
            r = _call(args, "GET", path)
            unreachable_since = None
        except ApiError as e:
            if e.status and e.status < 500:
                raise
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since > UNREACHABLE:
                raise
            print(f"ostiary approvals wait: {e}; retrying", file=sys.stderr)
            r = None
        if r is not None and r["state"] != "pending":
            final = f"{r['id']}: {r['state']} ({r['decision_reason']})"
            print(json.dumps(r, indent=1) if args.json else final)
            code = EXIT.get(r["state"])
            if code is None:
                print(f"ostiary approvals wait: the request ended {r['state']}", file=sys.stderr)
                return 1
            return code
        left = None if args.timeout is None else args.timeout - (time.monotonic() - start)
        if left is not None and left <= 0:
            if r is not None:
                print(json.dumps(r, indent=1) if args.json else f"{r['id']}: pending")
            return EXIT_PENDING
        time.sleep(max(0.05, args.interval if left is None else min(args.interval, left)))
