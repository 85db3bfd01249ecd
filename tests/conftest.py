"""Shared fixtures: a real PostgreSQL cluster and real gateway processes.

``pg`` is one throwaway cluster for the whole run (initdb into a temp dir, free port, scram-sha-256,
TLS on), with a role ``app`` owning database ``app``. ``gateway`` starts ``ostiary serve`` as a
subprocess (as a user would run it) in front of that cluster and stops it afterwards; pass options
through ``gateway_factory`` for other shapes (TLS off upstream, a dead upstream, short timeouts).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from ostiary.devcluster import PgCluster, TlsMaterial, free_port, make_tls_material

APP_PASSWORD = "app-upstream-secret"
CLIENT_USER = "ci"
CLIENT_PASSWORD = "ci-gateway-secret"


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    cluster = PgCluster(tmp_path_factory.mktemp("pg"), tls=True, extra_conf={"max_connections": "300"})
    cluster.start()
    cluster.create_role("app", APP_PASSWORD)
    cluster.create_database("app", owner="app")
    try:
        yield cluster
    finally:
        cluster.stop()


READER_PASSWORD = "app-reader-secret"


@pytest.fixture(scope="session")
def reader_role(pg: PgCluster) -> str:
    """A second upstream role, ``app_reader``, that may only read table ``shop_orders`` of ``app``
    (per-grant credentials)."""
    pg.create_role("app_reader", READER_PASSWORD)
    pg.execute(
        "create table if not exists shop_orders(id int primary key, item text);"
        "insert into shop_orders values (1, 'book') on conflict do nothing;"
        "alter table shop_orders owner to app;"
        "grant select on shop_orders to app_reader;",
        dbname="app",
    )
    return "app_reader"


@pytest.fixture(scope="session")
def gateway_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("gwtls"))


@dataclass
class GatewayProcess:
    port: int
    config_path: Path
    proc: subprocess.Popen[bytes]
    tls: TlsMaterial
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def dsn(
        self, dbname: str = "app", user: str = CLIENT_USER, password: str = CLIENT_PASSWORD, **kw: Any
    ) -> str:
        params: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "dbname": dbname,
            "user": user,
            "password": password,
            "sslmode": "verify-full",
            "sslrootcert": str(self.tls.ca_cert),
            "connect_timeout": 10,
        }
        params.update(kw)
        return " ".join(f"{k}='{v}'" for k, v in params.items() if v is not None)

    def env(self, **kw: Any) -> dict[str, str]:
        """Environment for libpq tools (psql, pgbench) pointed at the gateway."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PGHOST="127.0.0.1",
            PGPORT=str(self.port),
            PGDATABASE=kw.get("dbname", "app"),
            PGUSER=kw.get("user", CLIENT_USER),
            PGPASSWORD=kw.get("password", CLIENT_PASSWORD),
            PGSSLMODE=kw.get("sslmode", "verify-full"),
            PGSSLROOTCERT=str(self.tls.ca_cert),
            PGCONNECT_TIMEOUT="10",
        )
        return env

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"gateway did not listen on {port}:\n{log_path.read_text()}")


def app_upstream(pg: PgCluster, **changes: Any) -> dict[str, Any]:
    """The upstream of connection ``app``: the test cluster over verify-full TLS; ``changes``
    override keys (a value of None removes the key)."""
    assert pg.tls is not None
    up: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": pg.port,
        "database": "app",
        "user": "app",
        "password_env": "OSTIARY_TEST_APP_PASSWORD",
        "tls": {"mode": "verify-full", "ca": str(pg.tls.ca_cert), "server_name": "localhost"},
    }
    up.update(changes)
    return {k: v for k, v in up.items() if v is not None}


def gateway_config(
    pg: PgCluster, gw_tls: TlsMaterial, port: int, tmp: Path, **overrides: Any
) -> dict[str, Any]:
    assert pg.tls is not None
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "data_dir": str(tmp / "state"),
        "workers": 2,
        "tls": {
            "cert": str(gw_tls.server_cert),
            "key": str(gw_tls.server_key),
            "client_ca": str(gw_tls.ca_cert),
        },
        "clients": [{"user": CLIENT_USER, "password": CLIENT_PASSWORD}],
        "connections": [{"name": "app", "upstream": app_upstream(pg)}],
        "shutdown": {"grace": 5},
    }
    for key, value in overrides.items():
        cfg[key] = value
    if "grants" not in overrides:
        # The static client may read and write every connection (tests of the data path).
        cfg["grants"] = [
            {
                "name": f"ci-{c['name']}",
                "identities": [CLIENT_USER],
                "connection": c["name"],
                "access": "read-write",
            }
            for c in cfg["connections"]
        ]
    return cfg


def allow_plaintext(cfg: dict[str, Any]) -> dict[str, Any]:
    """Lets plaintext clients in: ``tls.mode: allow`` and ``allow_plaintext`` on every connection."""
    cfg["tls"]["mode"] = "allow"
    for c in cfg["connections"]:
        c["allow_plaintext"] = True
    return cfg


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateway_factory(pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path) -> Iterator[GatewayFactory]:
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any] | None = None, **overrides: Any) -> GatewayProcess:
        port = free_port()
        cfg = config if config is not None else gateway_config(pg, gateway_tls, port, tmp_path, **overrides)
        cfg.setdefault("listen", {})["port"] = port
        n = len(started)
        path = tmp_path / f"ostiary-{n}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log_path = tmp_path / f"ostiary-{n}.log"
        env = dict(os.environ, OSTIARY_TEST_APP_PASSWORD=APP_PASSWORD)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ostiary.cli", "serve", "--config", str(path), "--log-level", "debug"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        gw = GatewayProcess(port=port, config_path=path, proc=proc, tls=gateway_tls, log_path=log_path)
        started.append(gw)
        wait_for_port(port, proc, log_path)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> GatewayProcess:
    return gateway_factory()


def psql(
    gw: GatewayProcess, *args: str, input: str | None = None, timeout: float = 60, **env_kw: Any
) -> subprocess.CompletedProcess[str]:
    """Runs psql through the gateway; returns the completed process (check returncode yourself)."""
    return subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", *args],
        env=gw.env(**env_kw),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def unheld(fn: Any) -> None:
    """Runs ``fn`` (a statement that must not be held) with a guard: held, it would wait for an
    approver that never comes; the test then fails instead of hanging."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fn()
        except Exception as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the statement was held"
    assert "error" not in box, box
