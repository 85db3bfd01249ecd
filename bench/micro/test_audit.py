"""Micro benchmarks of the audit trail's control-plane costs, per record.

* ``seal``: ``AuditLog.engine_batch`` on a batch of 5,000 statement entries shaped as the engine
  hands them over (pgbench -S statements): building each record, its canonical JSON and its SHA-256
  link. ``extra_info["us_per_record"]``.
* ``store``: ``SqliteStore.append`` of 5,000 sealed records in one transaction (WAL, synchronous
  FULL, the trail's indexes), on the machine's disk (a temporary directory).
* ``verify``: ``ostiary audit verify``'s work per record (hash, decode, link, column checks).

Together seal + store are the Python side of an asynchronous audit record; the data path's side
(following the statement, the batch) is in the end-to-end figures (bench/README.md).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import msgspec
from pytest_benchmark.fixture import BenchmarkFixture

from ostiary.audit import keys
from ostiary.audit.log import AuditLog
from ostiary.audit.store import SqliteStore
from ostiary.audit.verify import verify
from ostiary.config import Config

N = 5000


def entries(n: int, start: int = 0) -> list[tuple[Any, ...]]:
    t = 1_700_000_000_000_000
    return [
        (
            1,
            i,
            "complete",
            "query",
            ("", f"SELECT abalance FROM pgbench_accounts WHERE aid = {i};", False, []),
            None,
            (t + i, t + i + 40),
            (1, 90, "SELECT 1", 1),
            "ok",
            None,
        )
        for i in range(start, start + n)
    ]


def new_log() -> AuditLog:
    d = tempfile.mkdtemp(prefix="ostiary-bench-audit-")
    return AuditLog(msgspec.convert({"data_dir": d}, Config))


def test_seal(benchmark: BenchmarkFixture, mean_seconds: Callable[[Any], float | None]) -> None:
    log = new_log()
    batch = entries(N)

    def run() -> None:
        log.engine_batch(0, 0, batch)
        log.pending.clear()

    benchmark.pedantic(run, rounds=10, iterations=1)
    if (secs := mean_seconds(benchmark)) is not None:
        benchmark.extra_info["us_per_record"] = round(secs / N * 1e6, 2)


def test_store(benchmark: BenchmarkFixture, mean_seconds: Callable[[Any], float | None]) -> None:
    log = new_log()
    store: SqliteStore = log.store  # type: ignore[assignment]

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        log.engine_batch(0, 0, entries(N))
        rows = list(log.pending)
        log.pending.clear()
        return (rows,), {}

    benchmark.pedantic(store.append, setup=setup, rounds=10, iterations=1)
    if (secs := mean_seconds(benchmark)) is not None:
        benchmark.extra_info["us_per_record"] = round(secs / N * 1e6, 2)


def test_verify(benchmark: BenchmarkFixture, mean_seconds: Callable[[Any], float | None]) -> None:
    log = new_log()
    for k in range(4):
        log.engine_batch(0, 0, entries(N, k * N))
        log.store.append(log.pending)
        log.pending.clear()
    store = log.store
    # A signed checkpoint at the end, as a running gateway writes every interval (verify with a
    # key fails a writer that none covers).
    *_, last = store.chain(log.writer)
    cp = keys.Checkpoint(writer=log.writer, seq=last.seq, hash=last.hash, ts=last.ts, key_id=log.key_id)
    store.add_checkpoint(keys.sign(log.key, cp))

    def run() -> None:
        rep = verify(store, [log.public])
        assert rep.ok, rep.first_problem()

    benchmark.pedantic(run, rounds=3, iterations=1)
    if (secs := mean_seconds(benchmark)) is not None:
        benchmark.extra_info["us_per_record"] = round(secs / (4 * N + 1) * 1e6, 2)
