#!/usr/bin/env python3
"""The perf gate: the gateway's speed relative to pgbouncer, measured by bench/e2e.py in one run and
compared with bench/baseline.json. Ratios only, never absolute times: the machines are shared and
their speed drifts, but pgbouncer and the gateway drift together when they are interleaved.

What it measures (the quick variant, a few minutes; ``--full`` for release checks):

* pgbench -S with 8 clients, simple and extended protocol, through pgbouncer and the gateway,
  interleaved (connection churn is too sensitive to the machine's load to gate; see UNGATED);
* per case, two ratios against pgbouncer: throughput (``tps``: the gateway's TPS / pgbouncer's, the
  median of the per-round ratios) and CPU (``cpu``: the gateway process's CPU per transaction /
  pgbouncer's, over all rounds). CPU is the steadier figure and the one a slower data path moves
  first; throughput catches what CPU cannot (a stall, a lock, a sleep).

A case regresses when its ``tps`` ratio falls below the baseline's by more than the tolerance, or
its ``cpu`` ratio rises above it by more than the tolerance. The tolerances live in the baseline,
set from the measured spread of repeated runs on unchanged code (``--repeat N``, see
bench/README.md "Perf gate"). Exit status: 0 pass, 1 regression, 2 the benchmark itself failed.

``--repeat N --write-baseline`` runs the gate N times, prints the spread of every ratio and writes
the medians and tolerances. ``OSTIARY_FAULT_SPIN_US=N`` (read by the gateway) burns N µs of CPU per
chunk in the data path: the deliberate slowdown that shows the gate fails when it should.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "bench" / "baseline.json"

QUICK = [
    "--workloads", "select-only",
    "--modes", "simple,extended",
    "--clients", "8",
    "--rounds", "3",
    "--duration", "6",
    "--scale", "1",
    "--no-stream",
    "--no-idle",
    "--targets", "direct,pgbouncer,ostiary",
]  # fmt: skip
FULL = [
    "--workloads", "select-only,tpcb",
    "--modes", "simple,extended",
    "--clients", "1,8,32",
    "--rounds", "4",
    "--duration", "10",
    "--scale", "10",
    "--no-stream",
    "--no-idle",
    "--targets", "direct,pgbouncer,ostiary",
]  # fmt: skip
# Floor of a tolerance: even a quiet spread does not make the gate tighter than this.
MIN_TOLERANCE = 0.12
# A regression of 25 % must always fail: tolerances are capped below it.
MAX_TOLERANCE = 0.18
# Metrics too noisy to gate: connection churn's throughput swings by ±30 % between runs on these
# machines (pgbench's own SCRAM work per connection competes for the two cores), and its CPU per
# session, steady within 6 % on a quiet machine, rose 16 % under a load average of 4 on unchanged
# code (the Python startup path suffers more from contention than pgbouncer does). Churn is reported
# by bench/e2e.py, not gated.
UNGATED = {("churn", "tps"), ("churn", "cpu")}


def say(msg: str) -> None:
    print(f"[perf-gate] {msg}", file=sys.stderr, flush=True)


def measure(variant: str) -> dict[str, dict[str, float]]:
    """One e2e run; the ratios per case ("workload/mode/clients")."""
    args = FULL if variant == "full" else QUICK
    with tempfile.TemporaryDirectory(prefix="ostiary-perf-gate-") as out:
        cmd = [sys.executable, str(REPO / "bench" / "e2e.py"), *args, "--out", out]
        say(" ".join(cmd[1:]))
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"bench/e2e.py failed with status {proc.returncode}")
        files = sorted(Path(out).glob("*.json"))
        if not files:
            raise RuntimeError("bench/e2e.py wrote no results")
        report = json.loads(files[-1].read_text())
    return ratios(report)


def ratios(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for r in report["pgbench"]:
        rows.setdefault((r["workload"], r["mode"], r["clients"]), {})[r["target"]] = r
    out: dict[str, dict[str, float]] = {}
    for (workload, mode, clients), by_target in sorted(rows.items()):
        gw, pb = by_target.get("ostiary"), by_target.get("pgbouncer")
        if gw is None or pb is None:
            continue
        if gw["failed"] or pb["failed"]:
            raise RuntimeError(f"{workload}/{mode}/{clients}: failed transactions, the run is not usable")
        per_round = [g / p for g, p in zip(gw["tps_per_round"], pb["tps_per_round"], strict=True) if p > 0]
        case = {"tps": statistics.median(per_round)}
        if gw["proxy_cpu_us_per_txn"] and pb["proxy_cpu_us_per_txn"]:
            case["cpu"] = gw["proxy_cpu_us_per_txn"] / pb["proxy_cpu_us_per_txn"]
        out[f"{workload}/{mode}/{clients}"] = case
    return out


def compare(measured: dict[str, dict[str, float]], baseline: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Lines of the report, and the regressions among them."""
    lines, bad = [], []
    lines.append(f"{'case':<28} {'metric':<6} {'baseline':>9} {'now':>9} {'change':>8}  limit")
    for case, base in sorted(baseline["cases"].items()):
        now = measured.get(case)
        if now is None:
            bad.append(f"{case}: not measured")
            continue
        for metric, b in sorted(base.items()):
            tol = baseline["tolerance"][case][metric]
            if metric not in now:
                bad.append(f"{case} {metric}: not measured")
                continue
            v = now[metric]
            change = v / b - 1
            # Higher is better for throughput, lower for CPU.
            worse = change < -tol if metric == "tps" else change > tol
            bound = b * (1 - tol) if metric == "tps" else b * (1 + tol)
            limit = f"{'≥' if metric == 'tps' else '≤'} {bound:.3f}"
            line = f"{case:<28} {metric:<6} {b:>9.3f} {v:>9.3f} {change:>+8.1%}  {limit}"
            lines.append(line + ("  REGRESSION" if worse else ""))
            if worse:
                bad.append(line)
    return lines, bad


def write_baseline(runs: list[dict[str, dict[str, float]]], variant: str, path: Path) -> dict[str, Any]:
    """Medians of the runs, and per case and metric a tolerance of 1.5 × the largest deviation from
    the median seen in the runs, between MIN_TOLERANCE and MAX_TOLERANCE."""
    cases: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, float]] = {}
    tolerance: dict[str, dict[str, float]] = {}
    for case in runs[0]:
        for metric in runs[0][case]:
            if (case.split("/")[0], metric) in UNGATED:
                continue
            values = [r[case][metric] for r in runs if metric in r.get(case, {})]
            med = statistics.median(values)
            dev = max(abs(v / med - 1) for v in values)
            cases.setdefault(case, {})[metric] = round(med, 4)
            spread.setdefault(case, {})[metric] = round(dev, 3)
            tolerance.setdefault(case, {})[metric] = round(
                min(MAX_TOLERANCE, max(MIN_TOLERANCE, 1.5 * dev)), 3
            )
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    data = {
        "variant": variant,
        "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git,
        "runs": len(runs),
        "spread": spread,
        "tolerance": tolerance,
        "cases": cases,
        "per_run": runs,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="the release-check variant (about 30 minutes)")
    p.add_argument(
        "--baseline", type=Path, default=None, help="default bench/baseline.json (or baseline-full.json)"
    )
    p.add_argument("--repeat", type=int, default=1, help="run the measurement N times")
    p.add_argument("--write-baseline", action="store_true", help="write the medians and tolerances")
    p.add_argument(
        "--from-runs",
        type=Path,
        nargs="*",
        help="with --write-baseline: take the runs from these files (per_run of a baseline, or logs' "
        "JSON) instead of measuring",
    )
    args = p.parse_args(argv)
    variant = "full" if args.full else "quick"
    path = args.baseline or (REPO / "bench" / ("baseline-full.json" if args.full else "baseline.json"))
    if os.environ.get("OSTIARY_FAULT_SPIN_US"):
        say(f"fault injection on: OSTIARY_FAULT_SPIN_US={os.environ['OSTIARY_FAULT_SPIN_US']}")
    if not args.write_baseline and not path.exists():
        # Before the measurement (half an hour for --full), not after it.
        extra = " --full" if args.full else ""
        say(f"no baseline at {path}: write one first with")
        say(f"  bench/perf_gate.py{extra} --repeat 5 --write-baseline")
        return 2
    runs: list[dict[str, dict[str, float]]] = []
    for f in args.from_runs or []:
        data = json.loads(f.read_text())
        runs += data["per_run"] if isinstance(data, dict) else data
    try:
        for i in range(0 if args.from_runs else args.repeat):
            if args.repeat > 1:
                say(f"run {i + 1} of {args.repeat}")
            runs.append(measure(variant))
            for case, m in runs[-1].items():
                say(f"  {case:<28} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
    except (RuntimeError, KeyError) as e:
        say(f"the benchmark failed: {e}")
        return 2
    if args.write_baseline:
        data = write_baseline(runs, variant, path)
        say(f"wrote {path}: spread {data['spread']}, tolerance {data['tolerance']}")
        return 0
    if not path.exists():
        say(f"no baseline at {path}: write one with --repeat 5 --write-baseline")
        return 2
    baseline = json.loads(path.read_text())
    failed = False
    for i, measured in enumerate(runs):
        lines, bad = compare(measured, baseline)
        print(f"perf gate ({variant}, run {i + 1}) against {path.name} (commit {baseline['commit']}):")
        print("\n".join("  " + ln for ln in lines))
        failed = failed or bool(bad)
    print("perf gate: " + ("FAILED: a ratio regressed beyond its tolerance" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
