"""The data path's relay through its Python API (``_core.Relay``): what the engine does per chunk of
server bytes, without sockets. MB/s and messages/s of DataRow streams, plain and masked (every
built-in detector, result rows of bench/micro/test_masking.py: 5 % hold a sensitive value), and of a
stream of small queries in the client direction. Fed 64 KiB at a time, as the engine reads.

Run with ``make bench`` (pytest-benchmark), or ``python bench/micro/test_wire.py`` for a table.
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ostiary import _core

sys.path.insert(0, str(Path(__file__).parent))
import test_masking as corpus

CHUNK = 64 * 1024
ROWS = 60_000
# Column types of the generator's rows: id, ref, customer, city, product, qty, price, created, note.
TYPES = (20, 2950, 25, 25, 25, 23, 1700, 1184, 25)


def _msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!I", len(body) + 4) + body


def row_description(n: int) -> bytes:
    body = struct.pack("!h", n)
    for i in range(n):
        oid = TYPES[i] if i < len(TYPES) else 25
        body += f"c{i}".encode() + b"\0" + struct.pack("!IhIhih", 0, 0, oid, -1, -1, 0)
    return _msg(b"T", body)


def data_rows(n: int) -> bytes:
    out = []
    for row in corpus.rows(n):
        body = struct.pack("!h", len(row))
        for v in row:
            b = v.encode()
            body += struct.pack("!i", len(b)) + b
        out.append(_msg(b"D", body))
    return b"".join(out)


def result_stream(n: int = ROWS) -> tuple[bytes, int]:
    """A simple-query result: RowDescription, n DataRows, CommandComplete, ReadyForQuery."""
    first = next(corpus.rows(1))
    rows = data_rows(n)
    stream = row_description(len(first)) + rows + _msg(b"C", f"SELECT {n}\0".encode()) + _msg(b"Z", b"I")
    return stream, n + 3


def query_stream(n: int = 100_000) -> tuple[bytes, int]:
    q = _msg(b"Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;\0")
    return q * n, n


_MASKSET: Any = None


def relay(masked: bool) -> Any:
    """A fresh relay; masked ones share one compiled rule set, as the sessions of a policy do (its
    compilation and the regex engine's warm-up are not part of a session's cost)."""
    global _MASKSET
    if not masked:
        return _core.Relay()
    if _MASKSET is None:
        rules = [{"name": "pii", "detectors": list(corpus.ALL_DETECTORS), "strategy": "redact"}]
        _MASKSET = _core.MaskSet(rules)
    return _core.Relay(mask=(_MASKSET, {}, [], [], 0))


def run_backend(masked: bool, stream: bytes) -> int:
    r = relay(masked)
    r.feed_frontend(_msg(b"Q", b"select\0"))
    out = 0
    for i in range(0, len(stream), CHUNK):
        out += r.scan_backend(stream[i : i + CHUNK])
    return out


def run_frontend(stream: bytes) -> int:
    r = _core.Relay()
    out = 0
    for i in range(0, len(stream), CHUNK):
        out += len(r.feed_frontend(stream[i : i + CHUNK]))
    return out


@pytest.fixture(scope="module")
def results() -> tuple[bytes, int]:
    return result_stream()


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked-all-detectors"])
def test_relay_data_rows(
    benchmark: Any,
    results: tuple[bytes, int],
    masked: bool,
    summary_line: Callable[[str], None],
    mean_seconds: Callable[[Any], float | None],
) -> None:
    stream, messages = results
    out = benchmark(run_backend, masked, stream)
    assert out > 0 if masked else out == len(stream)
    if (secs := mean_seconds(benchmark)) is not None:
        benchmark.extra_info["MB/s"] = round(len(stream) / secs / 1e6, 1)
        benchmark.extra_info["messages/s"] = round(messages / secs)
        summary_line(f"{len(stream) / secs / 1e6:,.0f} MB/s, {messages / secs:,.0f} messages/s")


def test_relay_queries(
    benchmark: Any, summary_line: Callable[[str], None], mean_seconds: Callable[[Any], float | None]
) -> None:
    stream, messages = query_stream()
    out = benchmark(run_frontend, stream)
    assert out == len(stream)
    if (secs := mean_seconds(benchmark)) is not None:
        benchmark.extra_info["MB/s"] = round(len(stream) / secs / 1e6, 1)
        benchmark.extra_info["messages/s"] = round(messages / secs)
        summary_line(f"{len(stream) / secs / 1e6:,.0f} MB/s, {messages / secs:,.0f} messages/s")


def _table() -> None:
    stream, messages = result_stream()
    mb = len(stream) / 1e6
    print(f"DataRow stream: {mb:.1f} MB, {messages:,} messages, fed {CHUNK // 1024} KiB at a time")
    for masked in (False, True):
        best = min(_timed(lambda m=masked: run_backend(m, stream)) for _ in range(5))
        name = "masked (all detectors)" if masked else "plain"
        print(f"  {name:<24} {len(stream) / best / 1e6:8,.0f} MB/s {messages / best:12,.0f} messages/s")
    q, n = query_stream()
    best = min(_timed(lambda: run_frontend(q)) for _ in range(5))
    print(f"  {'queries (client side)':<24} {len(q) / best / 1e6:8,.0f} MB/s {n / best:12,.0f} messages/s")


def _timed(f: Callable[[], object]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


if __name__ == "__main__":
    _table()
