"""``ostiary evidence``: write an evidence pack for a period; ``ostiary evidence verify DIR``: check one.

Exit codes: 0 written / verified, 1 the pack does not verify (or nothing to report), 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from ostiary.audit.store import StoreError


def add_evidence_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "evidence",
        help="write a SOC 2 evidence pack for a period from the audit trail (or `evidence verify DIR`)",
    )
    ev.add_argument("--config", help="the gateway's configuration file (its audit store and data_dir)")
    ev.add_argument("--store", help="an SQLite audit store file (instead of --config)")
    ev.add_argument("--dsn", help="a PostgreSQL audit store (instead of --config)")
    ev.add_argument("--from", dest="period_from", metavar="DATE", help="ISO date or time (UTC unless given)")
    ev.add_argument("--to", dest="period_to", metavar="DATE", help="ISO date (inclusive) or time (exclusive)")
    ev.add_argument("--out", metavar="DIR", help="the pack's directory (created; must be empty)")
    ev.add_argument("--sample", type=int, default=0, metavar="N", help="N random statements and sessions")
    ev.add_argument("--seed", type=int, help="with --sample: the random seed (default: random, recorded)")
    ev.add_argument(
        "--key", action="append", default=[], help="a verifying key (PEM, `ostiary audit export-key`)"
    )
    ev.set_defaults(func=_generate)
    ev_sub = ev.add_subparsers(dest="evidence_command")
    ver = ev_sub.add_parser("verify", help="check a pack offline: hashes, chain, signatures, figures")
    ver.add_argument("dir", metavar="DIR")
    ver.add_argument("--key", action="append", default=[], help="the gateway's verifying key (PEM)")
    ver.set_defaults(func=_verify)


def parse_when(value: str, end: bool = False) -> int:
    """µs since the epoch. A bare date is midnight UTC; as the end of a period (``end``), the
    midnight after it, so ``--to 2025-03-31`` includes the 31st."""
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            t = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
            if end:
                t += dt.timedelta(days=1)
        else:
            t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if t.tzinfo is None:
                t = t.replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO date or time") from None
    return int(t.timestamp() * 1_000_000)


def _keys(paths: list[str]) -> list[Any]:
    from ostiary.audit.keys import load_public_pem

    return [load_public_pem(Path(k).read_bytes()) for k in paths]


def _generate(args: argparse.Namespace) -> int:
    from ostiary.approvals.store import ApprovalStore
    from ostiary.audit.cli import _open
    from ostiary.evidence.pack import PackError, PackOptions, write_pack

    if not (args.period_from and args.period_to and args.out):
        print(
            "ostiary evidence: give --from, --to and --out (or `ostiary evidence verify DIR`)",
            file=sys.stderr,
        )
        return 2
    try:
        lo, hi = parse_when(args.period_from), parse_when(args.period_to, end=True)
        trusted = _keys(args.key) or None
    except (ValueError, OSError) as e:
        print(f"ostiary evidence: {e}", file=sys.stderr)
        return 2
    if hi <= lo:
        print("ostiary evidence: --to must be after --from", file=sys.stderr)
        return 2
    store, cfg = _open(args)
    data_dir = Path(cfg.data_dir) if cfg is not None else (Path(args.store).parent if args.store else None)
    approvals: Any = None
    try:
        if args.dsn:
            approvals = ApprovalStore.postgres(args.dsn)
        elif cfg is not None:
            from ostiary.audit.log import sqlite_path, store_dsn

            pg = cfg.audit.store == "postgres"
            approvals = (
                ApprovalStore.postgres(store_dsn(cfg)) if pg else ApprovalStore.sqlite(sqlite_path(cfg))
            )
        elif args.store:
            approvals = ApprovalStore.sqlite(args.store)
    except StoreError as e:
        print(f"ostiary evidence: approval tables not read: {e}", file=sys.stderr)
    opts = PackOptions(lo, hi, Path(args.out), args.sample, args.seed, trusted, data_dir, approvals)
    try:
        rep = write_pack(store, opts)
    except (PackError, StoreError, OSError) as e:
        print(f"ostiary evidence: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
        if approvals is not None:
            approvals.close()
    s = rep["summary"]
    ok = rep["integrity"]["store_verification"]["ok"]
    print(
        f"wrote {args.out}: {s['records']['value']} records, {s['sessions']['value']} sessions, "
        f"{s['statements']['value']} statements ({s['blocked']['value']} blocked), "
        f"{s['logins_refused']['value']} refused logins, {s['approvals']['value']} approvals, "
        f"{s['policy_changes']['value']} policy records; "
        f"audit chain {'verifies' if ok else 'DOES NOT VERIFY'}"
    )
    return 0 if ok else 1


def _verify(args: argparse.Namespace) -> int:
    from ostiary.evidence.verify import verify_pack

    try:
        trusted = _keys(args.key) or None
    except (ValueError, OSError) as e:
        print(f"ostiary evidence verify: {e}", file=sys.stderr)
        return 2
    check = verify_pack(Path(args.dir), trusted)
    for line in check.signed:
        print(f"chain {line}")
    for p in check.problems:
        print(f"FAILED: {p}")
    for n in check.notes:
        print(f"note: {n}")
    if check.ok:
        print(
            f"OK: {check.records} records, {len(check.writers)} writer(s); every figure matches the records"
        )
        return 0
    return 1
