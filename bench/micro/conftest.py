"""Prints the throughput the benchmarks record (pytest-benchmark's table shows only times), and
lets them run as plain tests: `make test` runs bench/micro with `--benchmark-disable` (each body
once, its assertions checked, nothing timed), where `benchmark.stats` is None."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

_LINES = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_LINES] = []


@pytest.fixture
def mean_seconds() -> Callable[[Any], float | None]:
    """The mean round time of a finished benchmark, or None when timing is off (--benchmark-disable)."""

    def mean(benchmark: Any) -> float | None:
        stats = getattr(benchmark, "stats", None)
        return stats.stats.mean if stats is not None and stats.stats.mean > 0 else None

    return mean


@pytest.fixture
def summary_line(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Adds a line under "throughput" in the terminal summary, prefixed with the test's name."""
    lines = request.config.stash[_LINES]

    def add(text: str) -> None:
        lines.append(f"{request.node.name}: {text}")

    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(_LINES, [])
    if lines:
        terminalreporter.section("throughput (mean round time)")
        for line in lines:
            terminalreporter.write_line(line)
