"""``ostiary demo``: the gateway on embedded defaults, in front of a throwaway PostgreSQL cluster.

Clients authenticate with tokens of the development issuer (trusted here only because the demo turns
dev mode on): the demo mints one shaped like a GitHub Actions token of ``acme/demo`` on main, which its
policy lets read and write database ``app``; tokens of ``acme/reports`` may only read.
Everything lives under the data directory and is removed on exit (Ctrl-C). A running demo holds a
lock there, so a second demo on the same directory refuses to start instead of deleting the first
one's cluster and audit trail under it. Set ``OSTIARY_DEMO_UPSTREAM`` to a libpq-style
``host:port:database:user:password`` to front an existing server instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path

import trio

from ostiary import config as cfgmod
from ostiary.devcluster import ClusterError, PgCluster, make_tls_material
from ostiary.identity.dev import mint


def _port_or_free(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


# In the data directory, locked (flock) by the demo using it for as long as it runs; it holds that
# demo's pid, for the message of a second one. A lock rather than a pid file alone: the kernel drops it
# when its process dies however it dies, so a crashed demo never blocks the next.
LOCK_NAME = "demo.lock"


def _lock_demo_dir(base: Path) -> tuple[int | None, str]:
    """Takes the lock of ``base`` (created if missing) for this process: (its descriptor, "") or,
    when another demo holds it, (None, that demo's pid as it wrote it; "" if not yet written).

    The lock file is removed when a demo ends, so the file locked may have been unlinked between
    opening and locking it; then the lock guards nothing and is taken again on the file now there."""
    lock = base / LOCK_NAME
    while True:
        base.mkdir(parents=True, exist_ok=True)
        try:
            # os.open's descriptors are not inherited: PostgreSQL, started by this process and
            # possibly outliving it, must not keep the lock.
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # base removed by the demo ending just now
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            return None, pid
        try:
            on_disk = os.stat(lock)
        except FileNotFoundError:
            on_disk = None
        held = os.fstat(fd)
        if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd, ""
        os.close(fd)


def _clear_demo_dir(base: Path, *, ignore_errors: bool = False) -> None:
    """Removes everything in ``base`` but the lock file, which guards the directory meanwhile."""
    for entry in base.iterdir():
        if entry.name == LOCK_NAME:
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=ignore_errors)
            else:
                entry.unlink()
        except OSError:
            if not ignore_errors:
                raise


def _remove_demo_dir(base: Path) -> None:
    """Removes ``base`` at the end of a demo, the lock file last; the caller releases the lock only
    after, so a demo starting meanwhile finds the directory either locked or free of anything of
    this one's (rmdir fails, harmlessly, if that demo has already put its lock file in it)."""
    _clear_demo_dir(base, ignore_errors=True)
    with contextlib.suppress(OSError):
        (base / LOCK_NAME).unlink()
    with contextlib.suppress(OSError):
        base.rmdir()


def run_demo(data_dir: str, port: int) -> int:
    base = Path(data_dir).resolve()
    lock_fd, other = _lock_demo_dir(base)
    if lock_fd is None:
        print(
            f"ostiary demo: another demo is running in {data_dir}"
            + (f" (pid {other})" if other else "")
            + "; stop it with Ctrl-C or use --data-dir to choose another directory",
            file=sys.stderr,
        )
        return 2
    try:
        return _run_demo(base, port)
    finally:
        os.close(lock_fd)  # releases the lock


def _run_demo(base: Path, port: int) -> int:
    from ostiary.proxy.server import Gateway

    # What a previous demo left (one that crashed, or an old directory given to --data-dir).
    _clear_demo_dir(base)
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
                "create table if not exists greetings(id int primary key, text text);"
                "create table if not exists customers(id int primary key, name text, email text, card text);"
                "insert into customers values (1, 'Alice', 'alice@example.com', '4111 1111 1111 1111'),"
                " (2, 'Bob', 'bob@example.org', '5500-0000-0000-0004') on conflict do nothing",
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
    port = _port_or_free(port)
    state = base / "state"
    cfg = cfgmod.parse(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            "data_dir": str(state),
            "tls": {"cert": str(tls.server_cert), "key": str(tls.server_key)},
            "dev": {"issuer": True},
            "identities": [
                {
                    "name": "demo-main",
                    "issuer": "dev",
                    "match": {"repository": "acme/demo", "ref": "refs/heads/main"},
                },
                {
                    "name": "acme-reporting",
                    "issuer": "dev",
                    "match": {"repository": ["acme/reports", "acme/bi-*"]},
                },
            ],
            "connections": [{"name": "app", "upstream": upstream}],
            "masking": [
                {
                    "name": "pii",
                    "detectors": ["card", "email", "ssn", "phone", "iban", "jwt", "aws_access_key"],
                }
            ],
            "grants": [
                {
                    "name": "demo-writes",
                    "identities": ["demo-main"],
                    "connection": "app",
                    "access": "read-write",
                },
                {
                    "name": "acme-reads",
                    "identities": ["acme-reporting"],
                    "connection": "app",
                    "access": "read-only",
                    "masking": ["pii"],
                },
            ],
            "shutdown": {"grace": 2},
            # A demo on a workstation: within a login shell's open-file limit.
            "limits": {"max_connections": 200},
        },
        "<demo>",
    )
    claims: dict[str, object] = {
        "repository": "acme/demo",
        "repository_owner": "acme",
        "ref": "refs/heads/main",
        "workflow_ref": "acme/demo/.github/workflows/deploy.yml@refs/heads/main",
    }
    token = mint(str(state), "repo:acme/demo:ref:refs/heads/main", claims, lifetime=3600)
    # The CLI as this shell can run it: `ostiary` when it is on PATH, else the virtualenv's path
    # (make demo does not activate the virtualenv).
    cli = "ostiary"
    here = Path(sys.executable).parent / "ostiary"
    if shutil.which("ostiary") is None and here.exists():
        try:
            cli = str(here.relative_to(Path.cwd()))
        except ValueError:
            cli = str(here)
    mint_cmd = (
        f"{cli} token mint --dev --data-dir {state} --subject repo:acme/reports:ref:refs/heads/main "
        "--claim repository=acme/reports --claim ref=refs/heads/main"
    )
    print(
        "\nOstiary demo gateway is up. Connect through it with a token (valid for an hour) of the\n"
        "development issuer, shaped like GitHub Actions' for acme/demo on main (grant demo-writes):\n\n"
        f'  PGPASSWORD={token} psql "host=127.0.0.1 port={port} dbname=app user=ci '
        f'sslmode=verify-full sslrootcert={tls.ca_cert}"\n\n'
        "acme/reports gets read-only access with cards and emails masked (grant acme-reads;\n"
        "try select * from customers); mint a token for it with:\n\n"
        f"  {mint_cmd}\n\n"
        "Every login, session and statement goes into the tamper-evident audit trail, and each\n"
        "session is recorded as its client saw it:\n\n"
        f"  {cli} audit search --store {state}/audit.db\n"
        f"  {cli} audit verify --store {state}/audit.db\n"
        f"  {cli} sessions list --data-dir {state}\n\n"
        "Ctrl-C stops the gateway and removes the demo cluster and everything under\n"
        f"{base} (the audit trail and recordings included).\n",
        flush=True,
    )
    try:
        trio.run(Gateway(cfg).run)
    finally:
        if cluster is not None:
            cluster.stop()
        _remove_demo_dir(base)
    return 0
