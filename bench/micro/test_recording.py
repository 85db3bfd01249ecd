"""The session recorder through its Python API (``_core.Recorder``): what the data path would spend
per chunk of server bytes to record a result, fed 64 KiB at a time as the engine reads. The DataRow
stream of bench/micro/test_wire.py, recorded three ways: every row kept (``take()`` whenever 512 KiB
are buffered, half of ``max_buffer``), rows over the cap skipped (``max_rows`` 1000, the rest only
counted), and every row kept with fields cut to 8 bytes.

Run with ``make bench`` (pytest-benchmark), or ``python bench/micro/test_recording.py`` for a table.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ostiary import _core

sys.path.insert(0, str(Path(__file__).parent))
from test_wire import CHUNK, result_stream

MODES = {
    "all-rows": (10**12, 4096, 1 << 20),
    "capped-1000": (1000, 4096, 1 << 20),
    "fields-cut-8": (10**12, 8, 1 << 20),
}


def run(mode: str, stream: bytes) -> int:
    r = _core.Recorder(*MODES[mode])
    taken = 0
    for i in range(0, len(stream), CHUNK):
        r.backend(stream[i : i + CHUNK], i)
        # Take well before max_buffer: rows that do not fit are omitted, not waited for.
        if r.buffered >= 1 << 19:
            taken += len(r.take())
    return taken + len(r.take())


@pytest.fixture(scope="module")
def results() -> tuple[bytes, int]:
    return result_stream()


@pytest.mark.parametrize("mode", list(MODES))
def test_recorder(
    benchmark: Any,
    results: tuple[bytes, int],
    mode: str,
    summary_line: Callable[[str], None],
    mean_seconds: Callable[[Any], float | None],
) -> None:
    stream, messages = results
    out = benchmark(run, mode, stream)
    assert out > 0
    if (secs := mean_seconds(benchmark)) is not None:
        benchmark.extra_info["MB/s"] = round(len(stream) / secs / 1e6, 1)
        benchmark.extra_info["messages/s"] = round(messages / secs)
        summary_line(f"{len(stream) / secs / 1e6:,.0f} MB/s, {messages / secs:,.0f} messages/s")


def _table() -> None:
    stream, messages = result_stream()
    mb = len(stream) / 1e6
    print(f"DataRow stream: {mb:.1f} MB, {messages:,} messages, fed {CHUNK // 1024} KiB at a time")
    for mode in MODES:
        best = float("inf")
        frames = 0
        for _ in range(5):
            t = time.perf_counter()
            frames = run(mode, stream)
            best = min(best, time.perf_counter() - t)
        print(
            f"  {mode:<14} {len(stream) / best / 1e6:8,.0f} MB/s {messages / best:12,.0f} messages/s"
            f"   frames {frames / 1e6:.1f} MB"
        )


if __name__ == "__main__":
    _table()
