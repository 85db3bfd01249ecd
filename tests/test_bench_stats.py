"""The paired statistics of bench/e2e.py's report (what the speed target of issue 2 is read from)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import e2e


def run(target: str, rnd: int, tps: float, cpu_s: float | None, txns: int = 1000) -> dict[str, Any]:
    return {
        "target": target,
        "case": "select-only/simple/c8",
        "round": rnd,
        "tps": tps,
        "transactions": txns,
        "proxy_cpu_s": cpu_s,
    }


def test_mean_ci95_uses_students_t() -> None:
    mean, half = e2e.mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0
    # sd 1, n 3, t(0.975, 2) = 4.303
    assert math.isclose(half, 4.303 / math.sqrt(3), rel_tol=1e-9)
    mean, half = e2e.mean_ci95([5.0])
    assert mean == 5.0 and math.isnan(half)
    # beyond 31 values the normal quantile
    vals = [float(i % 2) for i in range(40)]
    _, half = e2e.mean_ci95(vals)
    sd = math.sqrt(sum((v - 0.5) ** 2 for v in vals) / 39)
    assert math.isclose(half, 1.96 * sd / math.sqrt(40), rel_tol=1e-9)


def test_paired_ratios_are_taken_per_round() -> None:
    runs = [
        run("direct", 1, 20000, None),
        run("pgbouncer", 1, 10000, 0.020),
        run("ostiary", 1, 11000, 0.018),
        run("pgbouncer", 2, 20000, 0.040),
        run("ostiary", 2, 19000, 0.044),
        # a round without pgbouncer is left out, not paired with another round's
        run("ostiary", 3, 50000, 0.001),
        # another case and another target are not mixed in
        {**run("ostiary", 1, 1, 1.0), "case": "select-only/extended/c8"},
        run("ostiary+mask", 1, 1, 1.0),
    ]
    p = e2e.paired_ratios(runs, "ostiary", "select-only/simple/c8")
    assert p is not None
    assert p["rounds"] == 2
    # per round: 1.10 and 0.95 (a ratio of means would give 30000/30000 = 1.0)
    assert math.isclose(p["tps_ratio_mean"], (1.10 + 0.95) / 2)
    assert math.isclose(p["cpu_ratio_mean"], (0.9 + 1.1) / 2)
    assert p["rounds_tps_ahead"] == 1 and p["rounds_cpu_below"] == 1
    assert p["tps_ratio_ci95"] > 0


def test_paired_ratios_need_two_rounds_with_cpu() -> None:
    one = [run("pgbouncer", 1, 100, 0.1), run("ostiary", 1, 100, 0.1)]
    assert e2e.paired_ratios(one, "ostiary", "select-only/simple/c8") is None
    no_cpu = [*one, run("pgbouncer", 2, 100, None), run("ostiary", 2, 100, 0.1)]
    assert e2e.paired_ratios(no_cpu, "ostiary", "select-only/simple/c8") is None


def test_the_report_shows_the_paired_table() -> None:
    runs = [
        run("pgbouncer", 1, 10000, 0.020),
        run("ostiary", 1, 11000, 0.018),
        run("pgbouncer", 2, 10000, 0.020),
        run("ostiary", 2, 9000, 0.022),
    ]
    lines = e2e._paired_section({"runs": runs})
    assert "| ostiary | select-only/simple/c8 | 2 | 1.000 ± " in "\n".join(lines)
    assert e2e._paired_section({"runs": runs[:2]}) == []
