"""pgbench through the gateway: initialisation (COPY and DDL) and concurrent runs in every protocol mode.

The run tests use tables initialised directly against PostgreSQL (so a gateway problem during
``pgbench -i`` is reported by its own test and does not hide the others); the initialisation test
goes through the gateway into a database of its own.
"""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import APP_PASSWORD, GatewayFactory, GatewayProcess, gateway_config
from ostiary.devcluster import PgCluster, TlsMaterial

PGBENCH = "/usr/bin/pgbench"
INIT_DB = "pgbench_init"


def pgbench(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PGBENCH, *args], env=env, capture_output=True, text=True, timeout=timeout)


def processed(out: str) -> tuple[int, int | None]:
    """``number of transactions actually processed: N/M`` (``N`` alone with -T)."""
    m = re.search(r"number of transactions actually processed: (\d+)(?:/(\d+))?", out)
    assert m, out
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None


def failed(out: str) -> int:
    m = re.search(r"number of failed transactions: (\d+)", out)
    assert m, out
    return int(m.group(1))


def balances(pg: PgCluster) -> list[str]:
    return (
        pg.execute(
            "select (select count(*) from pgbench_history),"
            " (select sum(delta) from pgbench_history),"
            " (select sum(abalance) from pgbench_accounts),"
            " (select sum(tbalance) from pgbench_tellers),"
            " (select sum(bbalance) from pgbench_branches);",
            dbname="app",
        )
        .strip()
        .split("|")
    )


@pytest.fixture(scope="module")
def bench_tables(pg: PgCluster) -> Iterator[None]:
    """pgbench tables at scale 1 in database app, made directly (not through the gateway)."""
    env = pg.psql_env("app", user="app", password=APP_PASSWORD)
    r = pgbench(env, "-i", "-s", "1", "-q")
    assert r.returncode == 0, r.stderr
    yield
    pg.execute(
        "drop table if exists pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history;",
        dbname="app",
    )


def test_initialise_through_gateway(
    pg: PgCluster, gateway_tls: TlsMaterial, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    pg.create_database(INIT_DB, owner="app")
    conns: list[dict[str, Any]] = copy.deepcopy(gateway_config(pg, gateway_tls, 0, tmp_path)["connections"])
    conns[0]["name"] = INIT_DB
    conns[0]["upstream"]["database"] = INIT_DB
    gw = gateway_factory(connections=conns)
    env = gw.env(dbname=INIT_DB)
    # The default steps: drop, create tables, client-side data generation with COPY (100,000 rows
    # of pgbench_accounts), vacuum, primary keys.
    r = pgbench(env, "-i", "-s", "1")
    assert r.returncode == 0, r.stderr + gw.log()[-3000:]
    assert "done in" in r.stderr
    counts = pg.execute(
        "select (select count(*) from pgbench_accounts), (select count(*) from pgbench_branches),"
        " (select count(*) from pgbench_tellers), (select count(*) from pgbench_history),"
        " (select count(*) from pg_indexes where tablename like 'pgbench_%' and indexname like '%pkey');",
        dbname=INIT_DB,
    )
    assert counts.strip() == "100000|1|10|0|3"
    # And a short run on what it made.
    r = pgbench(env, "-c", "2", "-t", "50")
    assert r.returncode == 0, r.stderr
    assert processed(r.stdout) == (100, 100)
    assert failed(r.stdout) == 0


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_select_only(bench_tables: None, gateway: GatewayProcess, mode: str) -> None:
    r = pgbench(gateway.env(), "-S", "-M", mode, "-c", "4", "-j", "2", "-t", "500")
    assert r.returncode == 0, r.stderr
    assert f"query mode: {mode}" in r.stdout
    assert processed(r.stdout) == (2000, 2000)
    assert failed(r.stdout) == 0


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_tpcb_default_script(bench_tables: None, pg: PgCluster, gateway: GatewayProcess, mode: str) -> None:
    _, _, accounts0, tellers0, branches0 = balances(pg)
    r = pgbench(gateway.env(), "-M", mode, "-c", "4", "-j", "2", "-t", "200")
    assert r.returncode == 0, r.stderr
    assert "transaction type: <builtin: TPC-B (sort of)>" in r.stdout
    assert processed(r.stdout) == (800, 800)
    assert failed(r.stdout) == 0
    # pgbench truncates pgbench_history before a run, so it holds exactly this run's transactions;
    # every balance moved by the total of their deltas (no update lost or doubled on the way).
    hist, delta, accounts, tellers, branches = balances(pg)
    assert hist == "800"
    moved = int(delta)
    assert int(accounts) - int(accounts0) == moved
    assert int(tellers) - int(tellers0) == moved
    assert int(branches) - int(branches0) == moved


def test_select_only_timed(bench_tables: None, gateway: GatewayProcess) -> None:
    r = pgbench(gateway.env(), "-S", "-M", "prepared", "-c", "4", "-j", "2", "-T", "3")
    assert r.returncode == 0, r.stderr
    n, _ = processed(r.stdout)
    assert n > 100, r.stdout  # thousands when idle; loose for loaded CI machines
    assert failed(r.stdout) == 0
    assert "duration: 3 s" in r.stdout


def test_a_pipeline_larger_than_the_socket_buffers(
    bench_tables: None, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """pgbench's \\startpipeline with 5,000 queries answered by ten 500-byte rows each (~30 MB of
    answers to 300 KB of queries): libpq writes the pipeline while reading what comes back, the
    server blocks on its answers until they are read. The gateway must go on reading the server's
    answers while the queries it still has to write wait for room (it once waited for that room
    without reading, and the session hung for good, its backend stuck in ClientWrite)."""
    query = "select repeat('x', 500) from generate_series(1, 10);\n"
    script = tmp_path / "pipeline.sql"
    script.write_text("\\startpipeline\n" + query * 5000 + "\\endpipeline\n")
    r = pgbench(gateway.env(), "-n", "-M", "extended", "-t", "2", "-f", str(script), timeout=120)
    assert r.returncode == 0, r.stderr
    assert processed(r.stdout) == (2, 2)
    assert failed(r.stdout) == 0
