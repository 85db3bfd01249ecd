#!/usr/bin/env python3
"""End-to-end benchmark: PostgreSQL direct vs pgbouncer vs the Ostiary gateway, in one run.

What one run does (see bench/README.md for how to read the output):

1. Creates a throwaway PostgreSQL cluster (``ostiary.devcluster.PgCluster``, no TLS, password auth),
   a role and database ``bench``, and ``pgbench -i -s SCALE``.
2. Starts pgbouncer (session pooling, auth_file, as the ``postgres`` user when run as root) and the
   gateway (``python -m ostiary.cli serve`` with a generated YAML; plaintext allowed for the bench
   clients with ``tls.mode: allow``; plain TCP upstream).
3. Runs pgbench against the targets interleaved (direct, pgbouncer, then the gateway variants:
   ``ostiary`` with features off, ``ostiary+guard`` with a workload-identity token per connection and
   guardrail packs judging every statement shape, ``ostiary+mask`` masking every result with every
   built-in detector, ``ostiary+audit`` with the audit trail as shipped (SQLite, async, recordings)
   and ``ostiary+audit-sync`` in sync mode; then direct again, ... for every case in every round)
   so that drift on a shared machine hits them all alike. For each run it records TPS, latency
   percentiles from pgbench's per-transaction logs (``-l``), and the CPU time the proxy process
   used (utime+stime of /proc/PID/stat, which sums all of a process's threads).
4. Streams 1,000,000 rows with ``COPY ... TO STDOUT`` through each target while sampling the proxy's
   RSS, and opens N idle authenticated connections to each proxy to measure memory per connection.
5. Writes bench/results/<timestamp>.json and bench/results/latest.md and prints the tables.

With ``--masking-large`` it does none of 1-4 but loads a table of ``--masking-rows`` (1,000,000) rows
of mixed result text (~5 % sensitive values, from bench/micro/test_masking.py) and times
``psql -A -t -c 'select * from masking_orders' > /dev/null`` through direct, pgbouncer, the gateway
and a second gateway masking with every built-in detector, interleaved for ``--rounds`` (default 3),
with the proxies' CPU and peak RSS (VmHWM).

Progress goes to stderr, the markdown report to stdout. Every process started here is stopped on
exit, including on Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

try:
    import asyncpg
    import psycopg

    from ostiary import __version__ as ostiary_version
    from ostiary.devcluster import ClusterError, PgCluster, find_pg_bin, free_port, make_tls_material
    from ostiary.policy.model import DETECTORS
except ImportError as e:  # pragma: no cover - a usage error, not a code path
    sys.exit(f"bench/e2e.py needs the dev virtualenv (make build; .venv/bin/python bench/e2e.py): {e}")

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
TARGETS = (
    "direct",
    "pgbouncer",
    "ostiary",
    "ostiary+guard",
    "ostiary+mask",
    "ostiary+audit",
    "ostiary+audit-sync",
)
# The gateway variants: features off; workload identity (a dev-issuer token per connection) and
# guardrails (every statement shape judged by PostgreSQL's parser); masking with every detector.
GUARD_PACKS = ["no-destructive-ddl", "no-unbounded-writes", "no-privilege-changes", "no-role-changes"]
TOKEN_REPOSITORY = "acme/bench"
PROXIES = ("pgbouncer", "ostiary")
WORKLOADS = ("select-only", "tpcb", "large-result", "churn")
MODES = ("simple", "extended")
DB = "bench"
DB_USER = "bench"
CLIENT_USER = "bench_client"  # the gateway's own client identity (clients: in its YAML)
UPSTREAM_PASSWORD_ENV = "OSTIARY_BENCH_UPSTREAM_PASSWORD"
LARGE_SQL = "select g, repeat('x', 200) from generate_series(1, 1000) g;"
STREAM_ROWS = 1_000_000
STREAM_SQL = f"copy (select g, repeat('x', 100) from generate_series(1, {STREAM_ROWS}) g) to stdout"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICE_USER = "postgres"  # pgbouncer refuses root, like PostgreSQL

_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """Something the benchmark needs failed; the message says what."""


# -- /proc -----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process: /proc/PID/stat already sums every thread, live and exited."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def raise_nofile(need: int) -> tuple[int, int]:
    """Raises RLIMIT_NOFILE (inherited by every child) to at least ``need`` when allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except OSError:
        nr_open = hard
    want = min(max(need, soft), nr_open)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # not root: as far as allowed
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- services --------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g} s:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} died (exit {self.proc.returncode}):\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            say(f"stopping {self.name} (pid {self.pid})")
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_pgbouncer(work: Path, cluster: PgCluster, auth: str, max_client_conn: int) -> Service:
    """pgbouncer in session mode. Its auth_file holds the role's secret as PostgreSQL stores it
    (``SCRAM-SHA-256$...`` or ``md5...`` from pg_authid), as deployments generate it: pgbouncer then
    checks clients against the stored secret and logs in to the server with the keys the client's
    SCRAM exchange proves, without computing PBKDF2 for every login as a plaintext entry would."""
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    d = work / "pgbouncer"
    d.mkdir()
    secret = cluster.execute(f"select rolpassword from pg_authid where rolname = '{DB_USER}'").strip()
    if not secret:
        raise BenchError(f"no stored password for role {DB_USER}")
    userlist = d / "userlist.txt"
    userlist.write_text(f'"{DB_USER}" "{secret}"\n')
    port = free_port()
    ini = d / "pgbouncer.ini"
    ini.write_text(
        "\n".join(
            [
                "[databases]",
                f"{DB} = host=127.0.0.1 port={cluster.port} dbname={DB}",
                "",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                f"auth_type = {auth}",
                f"auth_file = {userlist}",
                "pool_mode = session",
                f"max_client_conn = {max_client_conn}",
                "default_pool_size = 100",
                "ignore_startup_parameters = extra_float_digits",
                "",
            ]
        )
    )
    run_as: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        run_as = pwd.getpwnam(SERVICE_USER)
        for p in (d, userlist, ini):
            os.chown(p, run_as.pw_uid, run_as.pw_gid)
    os.chmod(d, 0o700)
    os.chmod(userlist, 0o600)
    log = work / "pgbouncer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=d,
            env=clean_env(HOME=str(d)),
            start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            user=None if run_as is None else run_as.pw_uid,
            group=None if run_as is None else run_as.pw_gid,
            extra_groups=None if run_as is None else [],
        )
    svc = Service("pgbouncer", proc, port, log)
    wait_for_port(port, proc, "pgbouncer", log)
    return svc


def start_gateway(
    work: Path,
    cluster: PgCluster,
    password: str,
    client_password: str,
    workers: int,
    max_conn: int,
    log_level: str,
    guardrails: list[str],
    masking_detectors: Sequence[str] = (),
    name: str = "ostiary",
    identity: bool = False,
    audit: dict[str, Any] | None = None,
) -> Service:
    """The gateway; with ``masking_detectors``, one masking rule (``pii``, redact) with those
    detectors is attached to the connection, so it masks every session's results. With
    ``identity``, the grant names a workload identity of the development issuer (clients present a
    token from ``gateway_token``) instead of the static client. ``audit`` is the audit section (off
    unless given: the other variants measure their feature alone)."""
    suffix = "" if name == "ostiary" else "-" + re.sub(r"[^a-z0-9]+", "-", name)
    tls = make_tls_material(work / f"gateway-tls{suffix}")
    port = free_port()
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port, "backlog": 4096},
        "data_dir": str(work / f"gateway-state{suffix}"),
        "workers": workers,
        "tls": {"cert": str(tls.server_cert), "key": str(tls.server_key), "mode": "allow"},
        "limits": {"max_connections": max_conn},
        "clients": [{"user": CLIENT_USER, "password": client_password}],
        "connections": [
            {
                "name": DB,
                "upstream": {
                    "host": "127.0.0.1",
                    "port": cluster.port,
                    "database": DB,
                    "user": DB_USER,
                    "password_env": UPSTREAM_PASSWORD_ENV,
                    "tls": {"mode": "disable"},
                },
                "allow_plaintext": True,
            }
        ],
        "grants": [
            {
                "name": "bench",
                "identities": [CLIENT_USER],
                "connection": DB,
                "access": "read-write",
                "guardrails": guardrails,
            }
        ],
        "shutdown": {"grace": 2},
        "audit": audit if audit is not None else {"enabled": False},
    }
    if masking_detectors:
        cfg["masking"] = [{"name": "pii", "detectors": list(masking_detectors), "strategy": "redact"}]
        cfg["connections"][0]["masking"] = ["pii"]
    if identity:
        cfg["dev"] = {"issuer": True}
        cfg["identities"] = [{"name": "bench-ci", "issuer": "dev", "match": {"repository": TOKEN_REPOSITORY}}]
        cfg["grants"][0]["identities"] = ["bench-ci"]
    path = work / f"ostiary{suffix}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = work / f"ostiary{suffix}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ostiary.cli", "serve", "--config", str(path), "--log-level", log_level],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
            env=clean_env(**{UPSTREAM_PASSWORD_ENV: password}),
            start_new_session=True,
        )
    svc = Service(name, proc, port, log)
    wait_for_port(port, proc, f"the gateway ({name})", log)
    return svc


def gateway_token(work: Path, name: str) -> str:
    """A development-issuer token (GitHub-shaped, valid two hours) for a gateway started with
    ``identity``; every connection presents it and the gateway validates it each time."""
    from ostiary.identity.dev import mint

    suffix = "" if name == "ostiary" else "-" + re.sub(r"[^a-z0-9]+", "-", name)
    claims: dict[str, object] = {"repository": TOKEN_REPOSITORY, "ref": "refs/heads/main"}
    return mint(
        work / f"gateway-state{suffix}", f"repo:{TOKEN_REPOSITORY}:ref:refs/heads/main", claims, lifetime=7200
    )


@dataclass
class Target:
    name: str
    port: int
    user: str
    password: str
    service: Service | None  # None for direct: no proxy process to account

    def env(self) -> dict[str, str]:
        return clean_env(
            PGHOST="127.0.0.1",
            PGPORT=str(self.port),
            PGDATABASE=DB,
            PGUSER=self.user,
            PGPASSWORD=self.password,
            PGSSLMODE="disable",
            PGCONNECT_TIMEOUT="10",
            PGAPPNAME="ostiary-bench",
        )

    def conninfo(self) -> str:
        return (
            f"host=127.0.0.1 port={self.port} dbname={DB} user={self.user} password={self.password} "
            "sslmode=disable connect_timeout=10"
        )

    @property
    def pid(self) -> int | None:
        return None if self.service is None else self.service.pid


# -- pgbench -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    workload: str
    mode: str
    clients: int

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.mode}/c{self.clients}"


@dataclass
class Run:
    target: str
    case: str
    round: int
    tps: float
    transactions: int
    failed: int
    latency_avg_ms: float | None
    p50_ms: float
    p99_ms: float
    samples: int
    connect_avg_ms: float | None
    proxy_cpu_s: float | None
    wall_s: float
    loadavg_1m: float

    @property
    def proxy_cpu_us_per_txn(self) -> float | None:
        if self.proxy_cpu_s is None or self.transactions == 0:
            return None
        return self.proxy_cpu_s * 1e6 / self.transactions


def _num(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else None


def read_latencies(log_dir: Path, prefix: str) -> array.array[int]:
    """Latencies (µs) from pgbench -l logs: ``client txn_no latency_us script_no epoch epoch_us``."""
    out: array.array[int] = array.array("Q")
    for path in sorted(log_dir.glob(f"{prefix}.*")):
        with open(path) as f:
            for line in f:
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[2].isdigit():  # "failed"/"skipped" are not latencies
                    out.append(int(parts[2]))
        path.unlink()
    return out


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of sorted values, in the values' unit."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


class PgBench:
    def __init__(self, work: Path, duration: int, rate: int | None = None) -> None:
        self.duration = duration
        self.rate = rate
        self.log_dir = work / "pgbench-logs"
        self.log_dir.mkdir()
        self.large_script = work / "large-result.sql"
        self.large_script.write_text(LARGE_SQL + "\n")
        self.count = 0

    def workload_args(self, workload: str) -> list[str]:
        if workload == "select-only":
            return ["-n", "-S"]
        if workload == "tpcb":
            return []  # pgbench vacuums the tables and truncates history first, through the target
        if workload == "large-result":
            return ["-n", "-f", str(self.large_script)]
        if workload == "churn":
            return ["-n", "-S", "-C"]
        raise ValueError(workload)

    def run(self, target: Target, case: Case, rnd: int) -> tuple[Run, array.array[int]]:
        self.count += 1
        prefix = f"run{self.count}"
        cmd = [
            "pgbench",
            "-c",
            str(case.clients),
            "-j",
            str(min(2, case.clients)),
            "-T",
            str(self.duration),
            "-M",
            case.mode,
            "-l",
            f"--log-prefix={self.log_dir / prefix}",
            *self.workload_args(case.workload),
        ]
        if self.rate and case.workload in ("select-only", "tpcb"):
            cmd += ["-R", str(self.rate)]
        if target.service is not None:
            target.service.check_alive()
        load = os.getloadavg()[0]
        pid = target.pid
        cpu0 = cpu_seconds(pid) if pid is not None else None
        t0 = time.monotonic()
        proc = subprocess.run(
            cmd,
            env=target.env(),
            capture_output=True,
            text=True,
            timeout=self.duration * 4 + 120,
            check=False,
        )
        wall = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0 if pid is not None and cpu0 is not None else None
        lat = read_latencies(self.log_dir, prefix)
        out = proc.stdout
        tps = _num(r"^tps = ([\d.]+)", out)
        txns = _num(r"^number of transactions actually processed: (\d+)", out)
        if proc.returncode != 0 or tps is None or txns is None:
            svc_log = f"\n--- {target.name} log ---\n{tail(target.service.log)}" if target.service else ""
            raise BenchError(
                f"pgbench failed against {target.name} ({case.key}, exit {proc.returncode}):\n"
                f"{' '.join(cmd)}\n{out}\n{proc.stderr}{svc_log}"
            )
        lat_sorted = sorted(lat)
        run = Run(
            target=target.name,
            case=case.key,
            round=rnd,
            tps=tps,
            transactions=int(txns),
            failed=int(_num(r"^number of failed transactions: (\d+)", out) or 0),
            latency_avg_ms=_num(r"^latency average = ([\d.]+) ms", out),
            p50_ms=percentile(lat_sorted, 0.50) / 1000,
            p99_ms=percentile(lat_sorted, 0.99) / 1000,
            samples=len(lat),
            connect_avg_ms=_num(r"^average connection time = ([\d.]+) ms", out),
            proxy_cpu_s=cpu,
            wall_s=round(wall, 2),
            loadavg_1m=load,
        )
        return run, lat


@dataclass
class Aggregate:
    target: str
    case: Case
    runs: list[Run] = field(default_factory=list)
    latencies: array.array[int] = field(default_factory=lambda: array.array("Q"))

    @property
    def tps(self) -> float:
        return sum(r.tps for r in self.runs) / len(self.runs)

    @property
    def transactions(self) -> int:
        return sum(r.transactions for r in self.runs)

    def pct_ms(self, q: float) -> float:
        return percentile(sorted(self.latencies), q) / 1000

    @property
    def proxy_cpu_s(self) -> float | None:
        cpus = [r.proxy_cpu_s for r in self.runs]
        return None if any(c is None for c in cpus) else sum(c for c in cpus if c is not None)

    @property
    def proxy_cpu_us_per_txn(self) -> float | None:
        cpu = self.proxy_cpu_s
        return None if cpu is None or self.transactions == 0 else cpu * 1e6 / self.transactions

    @property
    def connect_avg_ms(self) -> float | None:
        vals = [r.connect_avg_ms for r in self.runs if r.connect_avg_ms is not None]
        return sum(vals) / len(vals) if vals else None

    def summary(self, bytes_per_txn: int | None) -> dict[str, Any]:
        p50, p99 = self.pct_ms(0.50), self.pct_ms(0.99)
        d: dict[str, Any] = {
            "target": self.target,
            "workload": self.case.workload,
            "mode": self.case.mode,
            "clients": self.case.clients,
            "tps": round(self.tps, 1),
            "tps_per_round": [round(r.tps, 1) for r in self.runs],
            "transactions": self.transactions,
            "failed": sum(r.failed for r in self.runs),
            "latency_avg_ms": _mean([r.latency_avg_ms for r in self.runs], 3),
            "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
            "proxy_cpu_s": None if self.proxy_cpu_s is None else round(self.proxy_cpu_s, 2),
            "proxy_cpu_us_per_txn": _round(self.proxy_cpu_us_per_txn, 1),
        }
        if self.case.workload == "churn":
            d["sessions_per_s"] = d["tps"]
            d["connect_avg_ms"] = _round(self.connect_avg_ms, 3)
        if bytes_per_txn is not None:
            mb = self.transactions * bytes_per_txn / 1e6
            d["bytes_per_txn"] = bytes_per_txn
            d["mb_per_s"] = round(self.tps * bytes_per_txn / 1e6, 1)
            d["proxy_cpu_ms_per_mb"] = (
                None if self.proxy_cpu_s is None or mb == 0 else round(self.proxy_cpu_s * 1e3 / mb, 3)
            )
        return d


def _mean(values: Sequence[float | None], nd: int) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), nd) if known else None


def _json_safe(v: Any) -> Any:
    """NaN is not JSON: unknown values become null."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    return v


def _round(v: float | None, nd: int) -> float | None:
    return None if v is None else round(v, nd)


def build_cases(args: argparse.Namespace) -> list[Case]:
    if args.quick:
        quick = [
            Case("select-only", "simple", 8),
            Case("select-only", "extended", 8),
            Case("large-result", "simple", 8),
            Case("churn", "simple", 8),
        ]
        return [
            c for c in quick if c.workload in args.workloads and (c.mode in args.modes or c.mode == "simple")
        ]
    cases: list[Case] = []
    for workload in args.workloads:
        if workload in ("select-only", "tpcb"):
            cases += [Case(workload, m, c) for m in args.modes for c in args.clients]
        elif workload == "large-result" or workload == "churn":
            cases.append(Case(workload, "simple", 8))
    return cases


def large_result_bytes(target: Target) -> int:
    """Bytes one large-result transaction puts on the wire (simple protocol, text format),
    computed from the rows fetched once with psycopg."""
    with psycopg.connect(target.conninfo()) as conn:
        cur = conn.execute(LARGE_SQL.rstrip(";"))
        rows = cur.fetchall()
        names = [d.name for d in cur.description or []]
    # RowDescription: 'T' int32 int16, per field name\0 + 18 bytes.
    total = 1 + 4 + 2 + sum(len(n.encode()) + 1 + 18 for n in names)
    for row in rows:
        # DataRow: 'D' int32 int16, per field int32 length + text.
        total += 1 + 4 + 2 + sum(4 + len(str(v).encode()) for v in row)
    tag = f"SELECT {len(rows)}".encode()
    total += 1 + 4 + len(tag) + 1  # CommandComplete
    total += 1 + 4 + 1  # ReadyForQuery
    return total


# -- streaming and idle connections -----------------------------------------------------------------


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, BenchError):
                self.peak = max(self.peak, rss_kib(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, BenchError):
            self.peak = max(self.peak, rss_kib(self.pid))


def stream_million_rows(target: Target) -> dict[str, Any]:
    """``COPY (1,000,000 rows) TO STDOUT`` through psql; counts the bytes; samples the proxy's RSS."""
    pid = target.pid
    cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", STREAM_SQL]
    before = rss_kib(pid) if pid is not None else None
    cpu0 = cpu_seconds(pid) if pid is not None else None
    sampler = RssSampler(pid) if pid is not None else None
    nbytes = 0
    with contextlib.ExitStack() as stack:
        if sampler is not None:
            stack.enter_context(sampler)
        t0 = time.monotonic()
        with subprocess.Popen(cmd, env=target.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            while chunk := proc.stdout.read(1 << 20):
                nbytes += len(chunk)
            err = proc.stderr.read().decode(errors="replace")
            rc = proc.wait()
        seconds = time.monotonic() - t0
    if rc != 0:
        raise BenchError(f"COPY stream through {target.name} failed (exit {rc}): {err}")
    d: dict[str, Any] = {
        "target": target.name,
        "rows": STREAM_ROWS,
        "bytes": nbytes,
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / seconds / 1e6, 1),
    }
    if pid is not None and sampler is not None and before is not None and cpu0 is not None:
        d.update(
            rss_before_mb=round(before / 1024, 1),
            rss_peak_mb=round(sampler.peak / 1024, 1),
            rss_growth_mb=round((sampler.peak - before) / 1024, 1),
            proxy_cpu_s=round(cpu_seconds(pid) - cpu0, 2),
        )
    return d


async def _idle_probe(target: Target, n: int, concurrency: int, cycles: int) -> list[dict[str, Any]]:
    """Opens ``n`` idle sessions, measures the proxy's RSS, closes them; ``cycles`` times. Later
    cycles show whether memory freed by closed sessions is reused (growth means a leak or
    fragmentation)."""
    pid = target.pid
    assert pid is not None
    sem = asyncio.Semaphore(concurrency)
    failures: list[str] = []

    async def one() -> Any:
        async with sem:
            try:
                return await asyncpg.connect(
                    host="127.0.0.1",
                    port=target.port,
                    user=target.user,
                    password=target.password,
                    database=DB,
                    ssl=False,
                    timeout=60,
                )
            except Exception as e:
                failures.append(f"{type(e).__name__}: {e}")
                return None

    # Warm up lazy allocations (first sessions, thread-local buffers) before the baseline.
    warm = [c for c in await asyncio.gather(*(one() for _ in range(min(20, n)))) if c is not None]
    await asyncio.gather(*(c.close(timeout=10) for c in warm))
    await asyncio.sleep(1.0)
    results: list[dict[str, Any]] = []
    for cycle in range(1, cycles + 1):
        failures.clear()
        before = rss_kib(pid)
        t0 = time.monotonic()
        conns = [c for c in await asyncio.gather(*(one() for _ in range(n))) if c is not None]
        open_s = time.monotonic() - t0
        await asyncio.sleep(2.0)  # let the proxy finish what it does after the welcome
        during = rss_kib(pid)
        t1 = time.monotonic()
        await asyncio.gather(*(c.close(timeout=30) for c in conns), return_exceptions=True)
        close_s = time.monotonic() - t1
        await asyncio.sleep(2.0)  # and let PostgreSQL reap the backends the gateway closed
        after = rss_kib(pid)
        opened = len(conns)
        if opened == 0:
            raise BenchError(f"no idle connection could be opened to {target.name}: {failures[:3]}")
        results.append(
            {
                "target": target.name,
                "cycle": cycle,
                "requested": n,
                "opened": opened,
                "failures": len(failures),
                "failure_examples": sorted(set(failures))[:3],
                "open_s": round(open_s, 2),
                "connects_per_s": round(opened / open_s, 1),
                "close_s": round(close_s, 2),
                "rss_before_mb": round(before / 1024, 1),
                "rss_with_idle_mb": round(during / 1024, 1),
                "rss_after_close_mb": round(after / 1024, 1),
                "kib_per_connection": round((during - before) / opened, 1),
            }
        )
    return results


def idle_connections(target: Target, n: int, concurrency: int, cycles: int = 1) -> list[dict[str, Any]]:
    return asyncio.run(_idle_probe(target, n, concurrency, cycles))


# -- large results with masking --------------------------------------------------------------------

MASK_TABLE = "masking_orders"
MASK_SQL = f"select * from {MASK_TABLE}"
PSQL_TIMEOUT = 180  # seconds; a healthy run of 1,000,000 rows takes a few


def _masking_corpus() -> Any:
    """bench/micro/test_masking.py, which generates the rows (the same text as the micro benchmark)."""
    import importlib.util

    path = REPO / "bench" / "micro" / "test_masking.py"
    spec = importlib.util.spec_from_file_location("ostiary_bench_masking", path)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_masking_table(target: Target, n: int, corpus: Any) -> dict[str, Any]:
    """``n`` rows of nine columns of mixed result text (~5 % with an email, card, SSN, phone or
    IPv4 in ``note``), loaded with COPY through ``target`` (direct)."""
    t0 = time.monotonic()
    with psycopg.connect(target.conninfo(), autocommit=True) as conn:
        conn.execute(f"drop table if exists {MASK_TABLE}")
        conn.execute(
            f"create table {MASK_TABLE} (id bigint primary key, ref uuid, customer text, city text, "
            "product text, qty int, price numeric(10, 2), created_at timestamptz, note text)"
        )
        with conn.cursor() as cur, cur.copy(f"copy {MASK_TABLE} from stdin") as copy:
            batch: list[str] = []
            for row in corpus.rows(n):
                batch.append("\t".join(row))
                if len(batch) == 10_000:
                    copy.write(("\n".join(batch) + "\n").encode())
                    batch.clear()
            if batch:
                copy.write(("\n".join(batch) + "\n").encode())
        conn.execute(f"vacuum analyze {MASK_TABLE}")
        size = conn.execute(f"select pg_table_size('{MASK_TABLE}')").fetchone()
    return {
        "rows": n,
        "table_mb": round((size[0] if size else 0) / 1e6, 1),
        "load_s": round(time.monotonic() - t0, 1),
    }


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise BenchError(f"no VmHWM for pid {pid}")


def reset_hwm(pid: int) -> bool:
    """Resets VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def psql_select(target: Target, capture: bool) -> tuple[float, bytes | None]:
    """``psql -X -A -t -q -c 'select * from masking_orders'`` through ``target``; stdout to /dev/null
    (timed runs) or captured (the untimed check run). Returns (wall seconds, output or None)."""
    cmd = ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", MASK_SQL]
    if target.service is not None:
        target.service.check_alive()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            env=target.env(),
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=PSQL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        log = f"\n--- {target.name} log ---\n{tail(target.service.log)}" if target.service else ""
        raise BenchError(f"{MASK_SQL!r} through {target.name}: no answer within {PSQL_TIMEOUT} s{log}") from e
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        log = f"\n--- {target.name} log ---\n{tail(target.service.log)}" if target.service else ""
        raise BenchError(
            f"{MASK_SQL!r} through {target.name} failed (exit {proc.returncode}): "
            f"{proc.stderr.decode(errors='replace')}{log}"
        )
    return seconds, proc.stdout if capture else None


def masking_large(targets: dict[str, Target], rounds: int, expected: int) -> dict[str, Any]:
    """One untimed check run per target (output size, masked values), then ``rounds`` interleaved
    timed runs (direct, pgbouncer, ostiary, ostiary+masking, direct, ...), output to /dev/null."""
    checks: dict[str, dict[str, Any]] = {}
    for name, t in targets.items():
        say(f"check run through {name}")
        seconds, out = psql_select(t, capture=True)
        assert out is not None
        checks[name] = {
            "output_bytes": len(out),
            "lines": out.count(b"\n"),
            "masked_values": out.count(b"****"),
            "check_s": round(seconds, 2),
        }
        del out
        say(f"  {checks[name]}")
    plain = checks.get("ostiary") or checks["direct"]
    if "ostiary+masking" in checks:
        m = checks["ostiary+masking"]["masked_values"]
        if m < expected * 0.9:
            raise BenchError(f"the masking gateway masked {m} values, expected about {expected}")
    if plain["masked_values"]:
        say(f"WARNING: {plain['masked_values']} '****' in the unmasked output")
    runs: list[dict[str, Any]] = []
    for rnd in range(1, rounds + 1):
        for name, t in targets.items():
            pid = t.pid
            hwm_reset = reset_hwm(pid) if pid is not None else False
            cpu0 = cpu_seconds(pid) if pid is not None else None
            sampler = RssSampler(pid, 0.02) if pid is not None else None
            load = os.getloadavg()[0]
            with sampler if sampler is not None else contextlib.nullcontext():
                seconds, _ = psql_select(t, capture=False)
            nbytes = checks[name]["output_bytes"]
            r: dict[str, Any] = {
                "target": name,
                "round": rnd,
                "seconds": round(seconds, 3),
                "bytes": nbytes,
                "mb_per_s": round(nbytes / seconds / 1e6, 1),
                "loadavg_1m": load,
            }
            if pid is not None and cpu0 is not None and sampler is not None:
                r["proxy_cpu_s"] = round(cpu_seconds(pid) - cpu0, 2)
                r["rss_peak_sampled_mb"] = round(sampler.peak / 1024, 1)
                r["vm_hwm_mb"] = round(vm_hwm_kib(pid) / 1024, 1)
                r["vm_hwm_reset"] = hwm_reset
            say(
                f"round {rnd} {name:<16} {seconds:6.2f} s {r['mb_per_s']:7.1f} MB/s"
                + (
                    f"  cpu {r['proxy_cpu_s']:.2f} s  VmHWM {r['vm_hwm_mb']:.0f} MB"
                    if "vm_hwm_mb" in r
                    else ""
                )
                + f"  (load {load:.2f})"
            )
            runs.append(r)
    summary = []
    for name in targets:
        rs = [r for r in runs if r["target"] == name]
        secs = sorted(r["seconds"] for r in rs)
        median = (
            secs[len(secs) // 2] if len(secs) % 2 else (secs[len(secs) // 2 - 1] + secs[len(secs) // 2]) / 2
        )
        nbytes = checks[name]["output_bytes"]
        d: dict[str, Any] = {
            "target": name,
            "bytes": nbytes,
            "masked_values": checks[name]["masked_values"],
            "median_s": round(median, 3),
            "mb_per_s": round(nbytes / median / 1e6, 1),
            "mb_per_s_per_round": [r["mb_per_s"] for r in rs],
        }
        if rs and "proxy_cpu_s" in rs[0]:
            cpu = sum(r["proxy_cpu_s"] for r in rs) / len(rs)
            d["proxy_cpu_s"] = round(cpu, 2)
            d["proxy_cpu_ms_per_mb"] = round(cpu * 1e3 / (nbytes / 1e6), 2)
            d["vm_hwm_mb"] = max(r["vm_hwm_mb"] for r in rs)
            d["rss_peak_sampled_mb"] = max(r["rss_peak_sampled_mb"] for r in rs)
        summary.append(d)
    return {"checks": checks, "runs": runs, "summary": summary}


def start_cluster(
    work: Path, auth: str, max_connections: int, db_password: str, stack: contextlib.ExitStack
) -> tuple[PgCluster, Target]:
    """The throwaway PostgreSQL of a run (stopped with ``stack``), its role and database ``bench``."""
    say(f"PostgreSQL: initdb in {work / 'pg'} (max_connections {max_connections})")
    cluster = PgCluster(
        work / "pg",
        tls=False,
        auth=auth,
        extra_conf={
            "max_connections": str(max_connections),
            "shared_buffers": "256MB",
            "log_connections": "off",
        },
    )
    stack.callback(cluster.stop)
    cluster.start()
    cluster.create_role(DB_USER, db_password)
    cluster.create_database(DB, owner=DB_USER)
    return cluster, Target("direct", cluster.port, DB_USER, db_password, None)


def run_masking_large(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    """The ``--masking-large`` workload alone: a table of ``--masking-rows`` rows of mixed text,
    ``select *`` through psql via direct, pgbouncer, the gateway and the gateway with masking."""
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ostiary-bench-masking-"))
    if args.keep:
        stack.callback(say, f"work directory kept: {work}")
    else:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
    corpus = _masking_corpus()
    detectors = list(corpus.ALL_DETECTORS)
    db_password = secrets.token_urlsafe(18)
    client_password = secrets.token_urlsafe(18)
    max_connections = 100
    cluster, direct = start_cluster(work, args.auth, max_connections, db_password, stack)
    say(f"loading {args.masking_rows:,} rows into {MASK_TABLE}")
    table = load_masking_table(direct, args.masking_rows, corpus)
    say(f"  {table}")
    targets: dict[str, Target] = {"direct": direct}
    bouncer = start_pgbouncer(work, cluster, args.auth, 1000)
    stack.callback(bouncer.stop)
    targets["pgbouncer"] = Target("pgbouncer", bouncer.port, DB_USER, db_password, bouncer)
    for name, dets in (("ostiary", []), ("ostiary+masking", detectors)):
        gw = start_gateway(
            work,
            cluster,
            db_password,
            client_password,
            args.workers,
            1000,
            args.gateway_log_level,
            args.guardrails,
            masking_detectors=dets,
            name=name,
        )
        stack.callback(gw.stop)
        targets[name] = Target(name, gw.port, CLIENT_USER, client_password, gw)
        say(f"{name} listening on {gw.port} (pid {gw.pid}, workers {args.workers})")
    machine = machine_info(cluster)
    say(f"machine: {machine}")
    expected = sum(1 for row in corpus.rows(args.masking_rows) if corpus.has_sensitive(row))
    result = masking_large(targets, args.rounds, expected)
    for t in targets.values():
        if t.service is not None:
            t.service.check_alive()
    finished = dt.datetime.now(dt.UTC)
    return {
        "started_at": started.strftime("%Y-%m-%d %H:%M:%S"),
        "finished_at": finished.strftime("%Y-%m-%d %H:%M:%S"),
        "elapsed_s": round((finished - started).total_seconds(), 1),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "machine": machine,
        "settings": {
            "rounds": args.rounds,
            "duration": 0,
            "workers": args.workers,
            "guardrails": args.guardrails,
            "scale": 0,
            "auth": args.auth,
            "targets": list(targets),
            "max_connections": max_connections,
            "gateway_log_level": args.gateway_log_level,
            "masking_detectors": detectors,
            "masking_rows": args.masking_rows,
            "postgres_bin": os.path.realpath(find_pg_bin("postgres")),
        },
        "pgbench": [],
        "stream": [],
        "idle": [],
        "masking_large": {"table": table, "expected_sensitive_rows": expected, **result},
    }


# -- machine info and report -------------------------------------------------------------------------


def _cmd_out(cmd: Sequence[str], cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cwd, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return (p.stdout or p.stderr).strip()


def machine_info(cluster: PgCluster) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_mb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_mb = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]) // 1024
    commit = _cmd_out(["git", "rev-parse", "--short", "HEAD"], REPO)
    dirty = bool(_cmd_out(["git", "status", "--porcelain", "--untracked-files=no"], REPO))
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_mb": mem_mb,
        "kernel": platform.release(),
        "os": _cmd_out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "postgresql": cluster.execute("show server_version").strip(),
        "pgbouncer": _cmd_out([shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "--version"]).splitlines()[
            0
        ],
        "pgbench": _cmd_out(["pgbench", "--version"]),
        "python": platform.python_version(),
        "ostiary": ostiary_version,
        "git_commit": commit + ("-dirty" if dirty else ""),
    }


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        "# Ostiary end-to-end benchmark",
        "",
        f"- date: {report['finished_at']} (UTC), run took {report['elapsed_s'] / 60:.1f} min",
        f"- machine: {m['nproc']} × {m['cpu_model']}, {m['mem_total_mb']} MB, "
        f"Linux {m['kernel']} ({m['os']}); load average (1 min) {report['loadavg_start'][0]:.2f} "
        f"at start, {report['loadavg_end'][0]:.2f} at end",
        f"- PostgreSQL {m['postgresql']}, {m['pgbouncer']}, {m['pgbench']}, Python {m['python']}, "
        f"ostiary {m['ostiary']} (git {m['git_commit']})",
        f"- gateway grant guardrails: {', '.join(s.get('guardrails') or []) or 'none'}",
        f"- {s['rounds']} round(s) × {s['duration']} s per run, targets interleaved; "
        f"pgbench -s {s['scale']}, -j ≤ 2, "
        f"auth {s['auth']}, no TLS on any leg; gateway workers={s['workers']}; pgbouncer session pooling, "
        f"default_pool_size 100; PostgreSQL max_connections {s['max_connections']}",
        *(
            [
                f"- fixed load: pgbench -R {s['rate']} on select-only and TPC-B (every target serves the "
                "same rate unless it cannot, so CPU per transaction compares at equal load)"
            ]
            if s.get("rate")
            else []
        ),
        "- authentication: pgbench → PostgreSQL and → pgbouncer use "
        f"{s['auth']} (pgbouncer's auth_file holds the stored secret); pgbench → gateway uses a "
        "cleartext password (the gateway's only client method today), the gateway → PostgreSQL "
        f"{s['auth']}",
    ]
    if report.get("masking_large"):  # no pgbench in this mode: what applies instead
        lines[-2:] = [
            f"- {s['rounds']} interleaved round(s); auth {s['auth']}, no TLS on any leg; gateway "
            f"workers={s['workers']}; pgbouncer session pooling; clients are psql (libpq); psql → gateway "
            "uses a cleartext password, the gateway → PostgreSQL "
            f"{s['auth']}",
        ]
    if report["pgbench"]:
        lines += _pgbench_section(report)
        lines += _paired_section(report)
    lines += _extra_sections(report)
    if report.get("masking_large"):
        lines += _masking_section(report)
    return "\n".join(lines) + "\n"


def _pgbench_section(report: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## pgbench",
        "",
        "TPS is the mean over rounds; p50/p99 come from pgbench's per-transaction logs pooled over rounds; "
        "ratios are TPS ratios; proxy CPU is utime+stime of the proxy process (all threads) per transaction. "
        "For `churn` (pgbench -C) a transaction is a new authenticated session plus one SELECT "
        "(latencies exclude the connect time).",
        "",
        "| target | workload | clients | mode | TPS | p50 ms | p99 ms | ratio vs direct | ratio vs pgbouncer "
        "| proxy CPU µs/txn |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key: dict[tuple[str, str, int, str], dict[str, Any]] = {
        (r["workload"], r["mode"], r["clients"], r["target"]): r for r in report["pgbench"]
    }
    for r in report["pgbench"]:
        base = by_key.get((r["workload"], r["mode"], r["clients"], "direct"))
        bouncer = by_key.get((r["workload"], r["mode"], r["clients"], "pgbouncer"))
        lines.append(
            f"| {r['target']} | {r['workload']} | {r['clients']} | {r['mode']} | {fmt(r['tps'])} "
            f"| {fmt(r['p50_ms'], '.3f')} | {fmt(r['p99_ms'], '.3f')} "
            f"| {ratio(r['tps'], base['tps'] if base else None)} "
            f"| {ratio(r['tps'], bouncer['tps'] if bouncer else None)} "
            f"| {fmt(r['proxy_cpu_us_per_txn'], ',.1f')} |"
        )
    return lines


# Two-sided 95 % quantiles of Student's t by degrees of freedom (1..30); 1.96 beyond.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student's t; NaN below 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * sd / math.sqrt(n)


def paired_ratios(runs: Sequence[dict[str, Any]], target: str, case: str) -> dict[str, Any] | None:
    """Per-round ratios of `target` to pgbouncer in one case: each round ran both back to back, so a
    ratio per round cancels the drift between rounds that a ratio of means keeps. None when fewer
    than two rounds have both (or CPU was not measured)."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r["case"] == case and r["target"] in (target, "pgbouncer"):
            by_round.setdefault(r["round"], {})[r["target"]] = r
    tps: list[float] = []
    cpu: list[float] = []
    for pair in by_round.values():
        g, b = pair.get(target), pair.get("pgbouncer")
        if not g or not b or not b["tps"] or not g["transactions"] or not b["transactions"]:
            continue
        if g["proxy_cpu_s"] is None or not b["proxy_cpu_s"]:
            continue
        tps.append(g["tps"] / b["tps"])
        cpu.append((g["proxy_cpu_s"] / g["transactions"]) / (b["proxy_cpu_s"] / b["transactions"]))
    if len(tps) < 2:
        return None
    tps_mean, tps_ci = mean_ci95(tps)
    cpu_mean, cpu_ci = mean_ci95(cpu)
    return {
        "rounds": len(tps),
        "tps_ratio_mean": tps_mean,
        "tps_ratio_ci95": tps_ci,
        "cpu_ratio_mean": cpu_mean,
        "cpu_ratio_ci95": cpu_ci,
        "rounds_tps_ahead": sum(1 for v in tps if v >= 1.0),
        "rounds_cpu_below": sum(1 for v in cpu if v <= 1.0),
    }


def _paired_section(report: dict[str, Any]) -> list[str]:
    runs = report.get("runs") or []
    rows: list[str] = []
    seen: list[tuple[str, str]] = []
    for r in runs:
        key = (r["case"], r["target"])
        if r["target"] not in ("direct", "pgbouncer") and key not in seen:
            seen.append(key)
    for case, target in seen:
        p = paired_ratios(runs, target, case)
        if p is None:
            continue
        rows.append(
            f"| {target} | {case} | {p['rounds']} "
            f"| {p['tps_ratio_mean']:.3f} ± {p['tps_ratio_ci95']:.3f} | {p['rounds_tps_ahead']} "
            f"| {p['cpu_ratio_mean']:.3f} ± {p['cpu_ratio_ci95']:.3f} | {p['rounds_cpu_below']} |"
        )
    if not rows:
        return []
    return [
        "",
        "## Paired with pgbouncer, round by round",
        "",
        "Each round runs pgbouncer and the gateway back to back; the ratio is taken per round, then "
        "averaged (± the 95 % confidence interval of that mean, Student's t). An interval that "
        "contains 1.0 means this run cannot tell the two apart. CPU ratio is proxy CPU per "
        "transaction, gateway / pgbouncer (below 1.0: the gateway used less).",
        "",
        "| target | case | rounds | TPS ratio | rounds ≥ 1.0 | CPU ratio | rounds ≤ 1.0 |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


def _masking_section(report: dict[str, Any]) -> list[str]:
    ml = report["masking_large"]
    s = report["settings"]
    rows = ml["table"]["rows"]
    summary = ml["summary"]
    by_t = {r["target"]: r for r in summary}
    lines = [
        "",
        f"## Large result with masking: `psql -X -A -t -c '{MASK_SQL}' > /dev/null`, {rows:,} rows",
        "",
        f"Table of {rows:,} rows × 9 columns of mixed text ({ml['table']['table_mb']:,} MB on disk, "
        f"{ml['expected_sensitive_rows']:,} rows with an email, card, SSN, phone or IPv4); "
        f"{s['rounds']} interleaved rounds, median wall time; MB/s = psql output bytes / wall time "
        "(psql holds the whole result before printing it). Masking: one rule, strategy redact, "
        f"detectors {', '.join(s.get('masking_detectors') or [])}, on the connection. RSS: the proxy's "
        "VmHWM (reset before each run through /proc/PID/clear_refs) and RSS sampled every 20 ms, "
        "max over rounds.",
        "",
        "| target | MB out | masked values | median s | MB/s | ratio vs pgbouncer | ratio vs direct "
        "| proxy CPU s | proxy CPU ms/MB | VmHWM MB | sampled RSS peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['target']} | {r['bytes'] / 1e6:,.1f} | {r['masked_values']:,} | {r['median_s']:.2f} "
            f"| {r['mb_per_s']:,.1f} "
            f"| {ratio(r['mb_per_s'], by_t['pgbouncer']['mb_per_s'] if 'pgbouncer' in by_t else None)} "
            f"| {ratio(r['mb_per_s'], by_t['direct']['mb_per_s'] if 'direct' in by_t else None)} "
            f"| {fmt(r.get('proxy_cpu_s'), '.2f')} | {fmt(r.get('proxy_cpu_ms_per_mb'), '.2f')} "
            f"| {fmt(r.get('vm_hwm_mb'), '.1f')} | {fmt(r.get('rss_peak_sampled_mb'), '.1f')} |"
        )
    lines += ["", "MB/s per round: " + "; ".join(f"{r['target']} {r['mb_per_s_per_round']}" for r in summary)]
    return lines


def _extra_sections(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    by_key: dict[tuple[str, str, int, str], dict[str, Any]] = {
        (r["workload"], r["mode"], r["clients"], r["target"]): r for r in report["pgbench"]
    }
    large = [r for r in report["pgbench"] if r["workload"] == "large-result"]
    if large:
        lines += [
            "",
            f"## Large result ({large[0]['bytes_per_txn']:,} wire bytes per transaction: 1,000 rows × 200 B)",
            "",
            "| target | clients | mode | MB/s | ratio vs direct | ratio vs pgbouncer | proxy CPU ms/MB |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for r in large:
            base = by_key.get((r["workload"], r["mode"], r["clients"], "direct"))
            bouncer = by_key.get((r["workload"], r["mode"], r["clients"], "pgbouncer"))
            lines.append(
                f"| {r['target']} | {r['clients']} | {r['mode']} | {fmt(r['mb_per_s'], ',.1f')} "
                f"| {ratio(r['mb_per_s'], base['mb_per_s'] if base else None)} "
                f"| {ratio(r['mb_per_s'], bouncer['mb_per_s'] if bouncer else None)} "
                f"| {fmt(r['proxy_cpu_ms_per_mb'], '.3f')} |"
            )
    churn = [r for r in report["pgbench"] if r["workload"] == "churn"]
    if churn:
        lines += [
            "",
            "## Connection churn (pgbench -C -S -c 8): new authenticated sessions per second",
            "",
            "pgbouncer reuses its server connections across client sessions (session pooling); the gateway "
            "opens a new upstream session (fork + SCRAM/MD5 at PostgreSQL) for every client session, "
            "like direct.",
            "",
            "| target | sessions/s | avg connect ms | ratio vs direct | ratio vs pgbouncer "
            "| proxy CPU µs/session |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        by_t = {r["target"]: r for r in churn}
        for r in churn:
            lines.append(
                f"| {r['target']} | {fmt(r['tps'])} | {fmt(r.get('connect_avg_ms'), '.3f')} "
                f"| {ratio(r['tps'], by_t['direct']['tps'] if 'direct' in by_t else None)} "
                f"| {ratio(r['tps'], by_t['pgbouncer']['tps'] if 'pgbouncer' in by_t else None)} "
                f"| {fmt(r['proxy_cpu_us_per_txn'], ',.1f')} |"
            )
    if report.get("stream"):
        lines += [
            "",
            f"## Streaming {STREAM_ROWS:,} rows (psql COPY TO STDOUT, ~109 MB)",
            "",
            "The proxy's RSS is sampled every 10 ms during the stream.",
            "",
            "| target | MB | seconds | MB/s | proxy RSS before MB | peak MB | growth MB | proxy CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["stream"]:
            lines.append(
                f"| {r['target']} | {r['bytes'] / 1e6:,.1f} | {r['seconds']:.2f} | {r['mb_per_s']:,.1f} "
                f"| {fmt(r.get('rss_before_mb'), '.1f')} | {fmt(r.get('rss_peak_mb'), '.1f')} "
                f"| {fmt(r.get('rss_growth_mb'), '.1f')} | {fmt(r.get('proxy_cpu_s'), '.2f')} |"
            )
    if report.get("idle"):
        lines += [
            "",
            "## Idle authenticated connections (asyncpg, plaintext), proxy RSS",
            "",
            "Each gateway session also holds an upstream PostgreSQL connection (its memory is PostgreSQL's, "
            "not counted here); pgbouncer holds no server connection for a client that has not sent a query.",
            "",
            "| target | cycle | connections | opened in s | connects/s | RSS before MB | RSS with idle MB "
            "| KiB/connection "
            "| RSS after close MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["idle"]:
            failed = f" ({r['failures']} failed)" if r["failures"] else ""
            lines.append(
                f"| {r['target']} | {r.get('cycle', 1)} | {r['opened']:,}{failed} "
                f"| {r['open_s']:.2f} | {fmt(r['connects_per_s'])} | {r['rss_before_mb']:.1f} "
                f"| {r['rss_with_idle_mb']:.1f} | {r['kib_per_connection']:.1f} "
                f"| {r['rss_after_close_mb']:.1f} |"
            )
    return lines


# -- main ------------------------------------------------------------------------------------------


def _csv(kind: type, allowed: Sequence[str] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        if allowed is not None:
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return items

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="pgbench through PostgreSQL direct, pgbouncer and the Ostiary gateway "
        "(see bench/README.md).",
    )
    p.add_argument(
        "--quick", action="store_true", help="3 s runs, 1 round, 8 clients: a check that all works"
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    p.add_argument("--duration", type=int, default=None, help="seconds per pgbench run (default 10; quick 3)")
    p.add_argument("--workers", type=int, default=1, help="gateway data-path workers (default 1)")
    p.add_argument(
        "--rate",
        type=int,
        default=None,
        help="pgbench -R: a fixed transaction rate for select-only and TPC-B instead of as fast as "
        "possible (CPU per transaction at equal load)",
    )
    p.add_argument(
        "--idle", type=int, default=None, help="idle connections per proxy (default 1000; quick 200)"
    )
    p.add_argument(
        "--idle-concurrency", type=int, default=64, help="connections opened at once in the idle test"
    )
    p.add_argument(
        "--idle-cycles",
        type=int,
        default=1,
        help="open/measure/close the idle connections N times (default 1)",
    )
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument("--auth", choices=("scram-sha-256", "md5"), default="scram-sha-256")
    p.add_argument(
        "--targets", type=_csv(str, TARGETS), default=list(TARGETS), help="direct,pgbouncer,ostiary"
    )
    p.add_argument("--workloads", type=_csv(str, WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--modes", type=_csv(str, MODES), default=list(MODES))
    p.add_argument("--clients", type=_csv(int), default=[1, 8, 32])
    p.add_argument("--no-stream", action="store_true", help="skip the 1,000,000-row stream")
    p.add_argument("--no-idle", action="store_true", help="skip the idle-connection memory test")
    p.add_argument("--gateway-log-level", default="info", help="ostiary serve --log-level (default info)")
    p.add_argument(
        "--guardrails",
        type=_csv(str),
        default=[],
        help="guardrail packs on the gateway's grant, e.g. no-destructive-ddl,no-unbounded-writes "
        "(every statement shape is then judged)",
    )
    p.add_argument(
        "--masking-large",
        action="store_true",
        help="only the masking workload: psql 'select *' of a table of --masking-rows rows of mixed text "
        "(~5 %% sensitive) through direct, pgbouncer, the gateway and the gateway with every built-in "
        "detector; --rounds interleaved rounds (default 3)",
    )
    p.add_argument(
        "--masking-rows", type=int, default=1_000_000, help="rows of the masking table (default 1,000,000)"
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where results go (default bench/results)")
    p.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, configs) for inspection"
    )
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3 if args.masking_large else 2)
    args.duration = args.duration or (3 if args.quick else 10)
    args.idle = args.idle if args.idle is not None else (200 if args.quick else 1000)
    if args.masking_rows < 1:
        p.error("--masking-rows must be positive")
    if args.rate is not None and args.rate < 1:
        p.error("--rate must be positive")
    if args.rounds < 1 or args.duration < 1 or args.idle < 0 or args.workers < 1 or args.idle_cycles < 1:
        p.error("--rounds, --duration, --workers and --idle-cycles must be positive, --idle not negative")
    if args.no_idle:
        args.idle = 0
    return args


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def run(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    limits = raise_nofile(2 * args.idle + 4096)
    say(f"RLIMIT_NOFILE is {limits[0]}")
    # A gateway session holds two descriptors (client and upstream), all in one process.
    idle_fit = max(0, (limits[0] - 512) // 2)
    if args.idle > idle_fit:
        say(
            f"WARNING: RLIMIT_NOFILE {limits[0]} allows about {idle_fit} gateway sessions: "
            f"--idle {args.idle} reduced to that"
        )
        args.idle_requested, args.idle = args.idle, idle_fit
    work = Path(tempfile.mkdtemp(prefix="ostiary-bench-"))
    if args.keep:
        stack.callback(say, f"work directory kept: {work}")
    else:
        stack.callback(shutil.rmtree, work, ignore_errors=True)

    db_password = secrets.token_urlsafe(18)
    client_password = secrets.token_urlsafe(18)
    max_connections = max(300, args.idle + 150)
    cluster, direct = start_cluster(work, args.auth, max_connections, db_password, stack)
    say(f"pgbench -i -s {args.scale}")
    init = subprocess.run(
        ["pgbench", "-i", "-q", "-s", str(args.scale)],
        env=direct.env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if init.returncode != 0:
        raise BenchError(f"pgbench -i failed:\n{init.stdout}\n{init.stderr}")

    targets: dict[str, Target] = {"direct": direct}
    if "pgbouncer" in args.targets:
        bouncer = start_pgbouncer(work, cluster, args.auth, max(20000, args.idle + 100))
        stack.callback(bouncer.stop)
        targets["pgbouncer"] = Target("pgbouncer", bouncer.port, DB_USER, db_password, bouncer)
        say(f"pgbouncer listening on {bouncer.port} (pid {bouncer.pid})")
    variants = {
        "ostiary": {"guardrails": args.guardrails},
        "ostiary+guard": {"guardrails": GUARD_PACKS, "identity": True},
        "ostiary+mask": {"guardrails": args.guardrails, "masking_detectors": list(DETECTORS)},
        # The audit trail as shipped (SQLite, recordings on), asynchronous and synchronous.
        "ostiary+audit": {"guardrails": args.guardrails, "audit": {}},
        "ostiary+audit-sync": {"guardrails": args.guardrails, "audit": {"mode": "sync"}},
    }
    for name, opts in variants.items():
        if name not in args.targets:
            continue
        gw = start_gateway(
            work,
            cluster,
            db_password,
            client_password,
            args.workers,
            max(10_000, args.idle + 100),
            args.gateway_log_level,
            opts["guardrails"],
            masking_detectors=opts.get("masking_detectors", ()),
            name=name,
            identity=bool(opts.get("identity")),
            audit=opts.get("audit"),  # type: ignore[arg-type]
        )
        stack.callback(gw.stop)
        if opts.get("identity"):
            targets[name] = Target(name, gw.port, "ci", gateway_token(work, name), gw)
        else:
            targets[name] = Target(name, gw.port, CLIENT_USER, client_password, gw)
        say(f"gateway {name} listening on {gw.port} (pid {gw.pid}, workers {args.workers})")
    targets = {name: t for name, t in targets.items() if name in args.targets}
    for t in targets.values():  # fail early, with the service's log, if a target does not answer
        smoke = subprocess.run(
            ["psql", "-X", "-Atq", "-c", "select count(*) from pgbench_branches"],
            env=t.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if smoke.returncode != 0 or smoke.stdout.strip() != str(args.scale):
            extra = f"\n--- log ---\n{tail(t.service.log)}" if t.service else ""
            raise BenchError(f"smoke query through {t.name} failed: {smoke.stdout}{smoke.stderr}{extra}")
    machine = machine_info(cluster)
    say(f"machine: {machine}")

    cases = build_cases(args)
    bench = PgBench(work, args.duration, args.rate)
    bytes_per_txn = large_result_bytes(direct) if any(c.workload == "large-result" for c in cases) else None
    total = args.rounds * len(cases) * len(targets)
    say(
        f"{total} pgbench runs of {args.duration} s ({len(cases)} cases × {len(targets)} targets × "
        f"{args.rounds} rounds): about {total * (args.duration + 1.5) / 60:.1f} min"
    )
    aggs: dict[tuple[str, Case], Aggregate] = {}
    runs: list[Run] = []
    n = 0
    for rnd in range(1, args.rounds + 1):
        for case in cases:
            for name, target in targets.items():
                n += 1
                r, lat = bench.run(target, case, rnd)
                runs.append(r)
                agg = aggs.setdefault((name, case), Aggregate(name, case))
                agg.runs.append(r)
                agg.latencies.extend(lat)
                cpu = r.proxy_cpu_us_per_txn
                say(
                    f"{n}/{total} round {rnd} {case.key:<28} {name:<9} {r.tps:>10,.0f} tps  "
                    f"p50 {r.p50_ms:7.3f} ms  p99 {r.p99_ms:7.3f} ms"
                    + (f"  proxy {cpu:,.1f} µs/txn" if cpu is not None else "")
                    + f"  (load {r.loadavg_1m:.2f})"
                )
    pgbench_rows = [
        aggs[(name, case)].summary(bytes_per_txn if case.workload == "large-result" else None)
        for case in cases
        for name in targets
    ]

    stream: list[dict[str, Any]] = []
    if not args.no_stream:
        for t in targets.values():
            say(f"streaming {STREAM_ROWS:,} rows through {t.name}")
            res = stream_million_rows(t)
            say(f"  {res}")
            stream.append(res)

    idle: list[dict[str, Any]] = []
    if args.idle > 0:
        for name in PROXIES:
            if name not in targets:
                continue
            say(f"opening {args.idle:,} idle connections to {name}")
            for res in idle_connections(targets[name], args.idle, args.idle_concurrency, args.idle_cycles):
                say(f"  {res}")
                idle.append(res)

    for t in targets.values():
        if t.service is not None:
            t.service.check_alive()
    finished = dt.datetime.now(dt.UTC)
    return {
        "started_at": started.strftime("%Y-%m-%d %H:%M:%S"),
        "finished_at": finished.strftime("%Y-%m-%d %H:%M:%S"),
        "elapsed_s": round((finished - started).total_seconds(), 1),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "rounds": args.rounds,
            "duration": args.duration,
            "rate": args.rate,
            "workers": args.workers,
            "guardrails": args.guardrails,
            "scale": args.scale,
            "auth": args.auth,
            "targets": list(targets),
            "cases": [c.key for c in cases],
            "idle": args.idle,
            "idle_requested": getattr(args, "idle_requested", args.idle),
            "idle_cycles": args.idle_cycles,
            "max_connections": max_connections,
            "rlimit_nofile": limits[0],
            "gateway_log_level": args.gateway_log_level,
            "postgres_bin": os.path.realpath(find_pg_bin("postgres")),
        },
        "pgbench": pgbench_rows,
        "runs": [asdict(r) for r in runs],
        "paired": [
            {"target": t, "case": c.key, **p}
            for c in cases
            for t in targets
            if t not in ("direct", "pgbouncer")
            and (p := paired_ratios([asdict(r) for r in runs], t, c.key)) is not None
        ],
        "stream": stream,
        "idle": idle,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGINT too: a shell starting us in the background sets it to SIG_IGN. SIGHUP only when not
    # ignored, so that `nohup` keeps working.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, _on_signal)
    try:
        with contextlib.ExitStack() as stack:
            report = run_masking_large(args, stack) if args.masking_large else run(args, stack)
            say("stopping services")
    except KeyboardInterrupt as e:
        say(f"interrupted ({e or 'Ctrl-C'}); everything started was stopped")
        return 130
    except (BenchError, ClusterError) as e:
        say(f"FAILED: {e}")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = report["finished_at"].replace(" ", "T").replace(":", "-") + "Z"
    json_path = args.out / f"{stamp}.json"
    json_path.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    md = render_markdown(report)
    (args.out / "latest.md").write_text(md)
    print(md)
    say(f"wrote {json_path} and {args.out / 'latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
