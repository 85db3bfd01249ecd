"""Prints the throughput the TLS benchmarks record (pytest-benchmark's table shows only times)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

_LINES = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_LINES] = []


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
