"""``ostiary demo``: the gateway on embedded defaults, in front of a throwaway PostgreSQL cluster.

Everything lives under the data directory and is removed on exit (Ctrl-C). Set ``OSTIARY_DEMO_UPSTREAM``
to a libpq-style ``host:port:database:user:password`` to front an existing server instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
from pathlib import Path

import trio

from ostiary import config as cfgmod
from ostiary.devcluster import ClusterError, PgCluster, make_tls_material


def _port_or_free(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def run_demo(data_dir: str, port: int) -> int:
    from ostiary.proxy.server import Gateway

    base = Path(data_dir).resolve()
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    cluster: PgCluster | None = None
    app_password = secrets.token_urlsafe(18)
    upstream_env = os.environ.get("OSTIARY_DEMO_UPSTREAM")
    if upstream_env:
        host, up_port, database, user, password = upstream_env.split(":", 4)
        upstream = {
            "host": host,
            "port": int(up_port),
            "database": database,
            "user": user,
            "password": password,
        }
    else:
        print("ostiary demo: creating a throwaway PostgreSQL cluster (initdb) ...", file=sys.stderr)
        try:
            cluster = PgCluster(base / "postgres", tls=True).start()
            cluster.create_role("app", app_password)
            cluster.create_database("app", owner="app")
            cluster.execute(
                "create table if not exists greetings(id int primary key, text text)",
                dbname="app",
                user="app",
                password=app_password,
            )
        except ClusterError as e:
            print(f"ostiary demo: cannot start PostgreSQL: {e}", file=sys.stderr)
            return 1
        upstream = {
            "host": "127.0.0.1",
            "port": cluster.port,
            "database": "app",
            "user": "app",
            "password": app_password,
            "tls": {"mode": "verify-full", "ca": str(cluster.tls.ca_cert) if cluster.tls else None},
        }
    tls = make_tls_material(base / "gateway-tls")
    client_password = secrets.token_urlsafe(12)
    port = _port_or_free(port)
    cfg = cfgmod.parse(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            "data_dir": str(base / "state"),
            "tls": {"cert": str(tls.server_cert), "key": str(tls.server_key)},
            "clients": [{"user": "demo", "password": client_password}],
            "connections": [{"name": "app", "upstream": upstream}],
            "shutdown": {"grace": 2},
        },
        "<demo>",
    )
    print(
        "\nOstiary demo gateway is up. Connect through it with:\n\n"
        f'  psql "host=127.0.0.1 port={port} dbname=app user=demo password={client_password} '
        f'sslmode=verify-full sslrootcert={tls.ca_cert}"\n\n'
        "Ctrl-C stops the gateway and removes the demo cluster.\n",
        flush=True,
    )
    try:
        trio.run(Gateway(cfg).run)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0
