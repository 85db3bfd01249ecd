"""``ostiary audit ...``: verify, search, export-key, purge."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Any

from ostiary.audit.store import AuditStore, PostgresStore, SearchFilter, SqliteStore, StoreError


def add_audit_parser(sub: Any) -> Any:
    audit = sub.add_parser("audit", help="verify, search and manage the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="the gateway's configuration file (its audit store and data_dir)")
        p.add_argument("--store", help="an SQLite audit store file (instead of --config)")
        p.add_argument("--dsn", help="a PostgreSQL audit store (instead of --config)")

    verify = audit_sub.add_parser(
        "verify", help="check every chain and signed checkpoint; name the first bad record"
    )
    store_args(verify)
    verify.add_argument(
        "--key",
        action="append",
        default=[],
        help="a verifying key (PEM, from `ostiary audit export-key`); repeat for several writers",
    )
    verify.add_argument(
        "--head",
        action="append",
        default=[],
        help="a head file (<data_dir>/audit/head-<writer>.json); with --config they are found",
    )
    verify.add_argument("--json", action="store_true", help="the report as JSON")
    verify.set_defaults(func=_verify)

    search = audit_sub.add_parser("search", help="find records (newest first)")
    store_args(search)
    for name in ("identity", "connection", "session", "kind", "verdict", "rule"):
        search.add_argument(f"--{name}", help=f"records whose {name} is exactly this")
    search.add_argument("--text", help="records that contain this text (statement, reason, ...)")
    search.add_argument("--since", help="ISO time or a duration back from now (30m, 2h, 7d)")
    search.add_argument("--until", help="ISO time or a duration back from now")
    search.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    search.add_argument("--json", action="store_true", help="one JSON object per line")
    search.set_defaults(func=_search)

    key = audit_sub.add_parser(
        "export-key", help="print the public key that verifies this gateway's checkpoints"
    )
    key.add_argument("--config", help="the gateway's configuration file")
    key.add_argument("--data-dir", help="the gateway's data_dir (instead of --config)")
    key.set_defaults(func=_export_key)

    purge = audit_sub.add_parser(
        "purge",
        help="remove this gateway's records older than N days (signed; the rest still verifies); "
        "the running gateway does this itself with audit.retention_days",
    )
    purge.add_argument("--config", required=True)
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    purge.set_defaults(func=_purge)
    return audit_sub


def _load(path: str) -> Any:
    from ostiary.config import load
    from ostiary.errors import ConfigError

    try:
        return load(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None


def _open(args: argparse.Namespace) -> tuple[AuditStore, Any]:
    try:
        if args.store:
            return SqliteStore(args.store, create=False), None
        if args.dsn:
            return PostgresStore(args.dsn), None
        if args.config:
            from ostiary.audit.log import open_store, sqlite_path

            cfg = _load(args.config)
            if cfg.audit.store == "sqlite":
                if not sqlite_path(cfg).is_file():
                    raise StoreError(f"there is no audit store at {sqlite_path(cfg)} (has the gateway run?)")
                # Read as found: checking or searching a store must not add tables to it.
                return SqliteStore(sqlite_path(cfg), create=False), cfg
            return open_store(cfg), cfg
    except StoreError as e:
        print(f"ostiary audit: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print("ostiary audit: give --config, --store or --dsn", file=sys.stderr)
    raise SystemExit(2)


def _verify(args: argparse.Namespace) -> int:
    from ostiary.audit.keys import load_public_pem
    from ostiary.audit.verify import load_head_files, verify

    store, cfg = _open(args)
    keys = []
    for k in args.key:
        try:
            keys.append(load_public_pem(Path(k).read_bytes()))
        except (OSError, ValueError) as e:
            print(f"ostiary audit verify: --key {k}: {e}", file=sys.stderr)
            return 2
    head_paths = [Path(h) for h in args.head]
    if cfg is not None:
        head_paths += sorted((Path(cfg.data_dir) / "audit").glob("head-*.json"))
    try:
        heads = load_head_files(head_paths)
        report = verify(store, keys or None, heads)
    except (StoreError, OSError, ValueError) as e:
        print(f"ostiary audit verify: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(report.to_json())
    else:
        for w in report.writers:
            state = "OK" if not w.problems else "FAILED"
            purged = f", purged through {w.purged_through}" if w.purged_through else ""
            print(
                f"writer {w.writer}: {state}: {w.records} record(s), seq {w.first_seq}..{w.last_seq}"
                f"{purged}, {w.checkpoints} signed checkpoint(s), signed through seq {w.signed_through}"
            )
            for p in w.problems:
                print(f"  {p}")
        if not report.writers:
            print(f"the store holds no audit trail ({store.description})")
        for p in report.problems:
            print(f"FAILED: {p}")
        for n in report.notes:
            print(f"note: {n}")
    return 0 if report.ok else 1


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def _when(value: str | None) -> int | None:
    if value is None:
        return None
    m = _DURATION.match(value)
    now = dt.datetime.now(dt.UTC)
    if m:
        n, unit = float(m.group(1)), m.group(2)
        t = now - dt.timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])
    else:
        try:
            t = dt.datetime.fromisoformat(value)
        except ValueError:
            print(
                f"ostiary audit search: {value!r} is neither an ISO time nor a duration like 2h",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1_000_000)


def summary(rec: dict[str, Any]) -> str:
    d = rec.get("data", {})
    kind = rec["kind"]
    if kind in ("statement", "result"):
        text = d.get("text") or d.get("shape") or d.get("fingerprint", "")
        parts = [text.replace("\n", " ")[:80]] if kind == "statement" else [f"#{d.get('seq')}"]
        if "outcome" in d:
            parts.append(
                f"{d['outcome']} {d.get('tag', '')} rows={d.get('rows', 0)} {d.get('duration_us', 0)}us"
            )
        if "error" in d:
            parts.append(f"{d['error']['code']} {d['error']['message'][:60]}")
        return " | ".join(p.strip() for p in parts if p)
    if kind == "auth":
        return d.get("reason", "") or f"{d.get('method', '')} from {d.get('peer', '')}"
    if kind == "session_start":
        return f"from {d.get('peer', '')} as {d.get('upstream_user', '')}"
    if kind == "session_end":
        masked = ", ".join(f"{k}={v}" for k, v in d.get("masked", {}).items())
        return f"{d.get('reason', '')}: {d.get('statements', 0)} statements, {d.get('rows', 0)} rows" + (
            f", masked {masked}" if masked else ""
        )
    if kind == "approval":
        who = d.get("approver") or rec.get("identity", "")
        return (
            f"{d.get('action', '')} {d.get('request', '')} ({d.get('state', '')}) by {who}: "
            + str(d.get("statement", "")).replace("\n", " ")[:70]
        )
    if kind == "policy":
        return f"{d.get('how', '')} {d.get('version', '')[:12]} {d.get('detail', '')[:60]}".strip()
    return json.dumps(d, sort_keys=True)[:100]


def _search(args: argparse.Namespace) -> int:
    store, _ = _open(args)
    f = SearchFilter(
        identity=args.identity,
        connection=args.connection,
        session=args.session,
        kind=args.kind,
        verdict=args.verdict,
        rule=args.rule,
        text=args.text,
        since=_when(args.since),
        until=_when(args.until),
        limit=max(1, min(args.limit, 100_000)),
    )
    try:
        rows = store.search(f)
    except StoreError as e:
        print(f"ostiary audit search: {e}", file=sys.stderr)
        return 2
    if args.json:
        for r in rows:
            print(json.dumps(r.as_dict(), sort_keys=True))
        return 0
    from ostiary.recording.render import visible

    table: list[tuple[str, ...]] = [
        ("time", "kind", "identity", "connection", "verdict", "rule", "session", "what")
    ]
    for r in rows:
        rec = r.as_dict()
        when = dt.datetime.fromtimestamp(r.ts / 1e6, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        cells = (r.kind, r.identity, r.connection, r.verdict, r.rule, r.session, summary(rec))
        # Statement text, identities, error messages: clients chose them, so a control character in
        # them is shown (\x1B, \r ...), not sent to the terminal to act on.
        table.append((when, *(visible(c) for c in cells)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    more = ", limit reached" if len(rows) == f.limit else ""
    print(f"({len(rows)} record{'s' if len(rows) != 1 else ''}{more})")
    return 0


def _export_key(args: argparse.Namespace) -> int:
    from ostiary.audit.keys import public_pem
    from ostiary.audit.log import signing_key_path

    if args.config:
        cfg = _load(args.config)
    else:
        import msgspec

        from ostiary.config import Config

        cfg = msgspec.convert({"data_dir": args.data_dir or ".ostiary"}, Config)
    path = signing_key_path(cfg)
    if not path.exists():
        print(f"ostiary audit export-key: {path} does not exist (has the gateway run?)", file=sys.stderr)
        return 2
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        print(f"ostiary audit export-key: {path} is not an Ed25519 key", file=sys.stderr)
        return 2
    sys.stdout.write(public_pem(key.public_key()))
    return 0


def _purge(args: argparse.Namespace) -> int:
    import trio

    from ostiary.audit.log import AuditLog
    from ostiary.audit.records import now_us

    cfg = _load(args.config)
    cutoff = now_us() - int(args.older_than * 86400 * 1_000_000)

    async def run() -> int:
        try:
            log = AuditLog(cfg)
        except StoreError as e:
            print(f"ostiary audit purge: {e}", file=sys.stderr)
            return 2
        try:
            log.append("admin", data={"action": "purge_requested", "older_than_days": args.older_than})
            n = await log.purge_before(cutoff)
        finally:
            await log.close()
        print(f"purged {n} record(s) of writer {log.writer}")
        return 0

    return trio.run(run)
