"""Out of file descriptors: the gateway refuses what it cannot hold, says why, and lives on.

A gateway whose open-file limit is lowered under it (``prlimit`` of its pid) meets the limit while
sessions open and the audit trail writes its signed head file; every session that was open goes
on, a new one works once descriptors are free again, and the process never exits.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
import time

import psycopg
import pytest

from conftest import GatewayFactory, GatewayProcess


def open_fds(gw: GatewayProcess) -> int:
    import os

    return len(os.listdir(f"/proc/{gw.proc.pid}/fd"))


def test_running_out_of_descriptors_refuses_sessions_and_keeps_the_gateway(
    gateway_factory: GatewayFactory,
) -> None:
    gw = gateway_factory(audit={"checkpoint_interval": 0.2})
    limit = open_fds(gw) + 24
    resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
    busy = psycopg.connect(gw.dsn(), autocommit=True)
    sessions: list[psycopg.Connection[tuple[object, ...]]] = []
    refusal = ""
    try:
        for _ in range(40):
            try:
                sessions.append(psycopg.connect(gw.dsn(connect_timeout=2), autocommit=True))
            except psycopg.OperationalError as e:
                refusal = str(e)
                break
            busy.execute("select 1")  # records to write: the head file is written meanwhile
        assert refusal, "the limit was never reached"
        # Statements go on writing records while nothing is left; checkpoints fail meanwhile.
        for _ in range(15):
            busy.execute("select 1")
            time.sleep(0.05)
        assert gw.proc.poll() is None, gw.log()[-3000:]
        for s in sessions:
            assert s.execute("select 2").fetchone() == (2,)
    finally:
        for s in sessions:
            s.close()
    assert gw.proc.poll() is None, gw.log()[-3000:]
    log = gw.log()
    # Either the upstream connection or the accept met the limit; neither blamed the upstream.
    assert "out of file descriptors" in refusal or "timeout" in refusal or "closed" in refusal, refusal
    assert "cannot reach" not in refusal, refusal
    assert "Traceback" not in log, log[-3000:]
    deadline = time.monotonic() + 10
    while True:
        try:
            with psycopg.connect(gw.dsn(connect_timeout=3)) as c:
                assert c.execute("select 3").fetchone() == (3,)
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.2)
    busy.close()
    assert gw.proc.poll() is None


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ((256, 1024), "open-file limit raised from 256 to 1024"),
        (
            (512, 512),
            "the open-file limit (512) holds about 149 sessions, fewer than limits.max_connections (10000)",
        ),
    ],
)
def test_the_open_file_limit_is_raised_or_warned_of(limits: tuple[int, int], expected: str) -> None:
    """(In a child process: a lowered hard limit cannot be raised again.)"""
    code = (
        "import logging, resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, {limits!r})\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from ostiary.proxy.server import raise_descriptor_limit\n"
        "print(raise_descriptor_limit(10000))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert expected in r.stderr, r.stderr
    assert int(r.stdout) == limits[1]


def test_the_audit_trail_and_the_data_dir_are_the_owner_s_only(gateway_factory: GatewayFactory) -> None:
    """Statement texts (ALTER ROLE ... PASSWORD '...') are in the audit database and its WAL."""
    gw = gateway_factory()
    with psycopg.connect(gw.dsn()) as c:
        c.execute("select 1")
    state = gw.config_path.parent / "state"
    deadline = time.monotonic() + 10
    while not (state / "audit.db-wal").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for name in ("audit.db", "audit.db-wal", "audit.db-shm"):
        assert (state / name).stat().st_mode & 0o777 == 0o600, name
    assert state.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    "removed", [("audit.db", "audit.db-wal", "audit.db-shm"), ("audit.db-wal",)], ids=["database", "its WAL"]
)
def test_an_audit_database_removed_under_the_gateway_fails_closed(
    gateway_factory: GatewayFactory, removed: tuple[str, ...]
) -> None:
    """Records written on into a deleted file would be lost at the next restart (the WAL holds all
    of them until SQLite checkpoints it): the store counts as failed, so (on_failure: refuse) new
    sessions are refused until it is back."""
    gw = gateway_factory()
    with psycopg.connect(gw.dsn()) as c:
        c.execute("select 1")
        state = gw.config_path.parent / "state"
        deadline = time.monotonic() + 10
        while "record(s) written" not in gw.log() or not (state / "audit.db-wal").exists():
            assert time.monotonic() < deadline, gw.log()[-3000:]
            time.sleep(0.05)
        for name in removed:
            (state / name).unlink(missing_ok=True)
        with contextlib.suppress(psycopg.Error):
            c.execute("select 2")
    deadline = time.monotonic() + 15
    while "was removed while in use" not in gw.log():
        assert time.monotonic() < deadline, gw.log()[-3000:]
        time.sleep(0.1)
    with pytest.raises(psycopg.OperationalError, match="audit trail is unavailable"):
        psycopg.connect(gw.dsn(connect_timeout=5)).close()
    assert gw.proc.poll() is None
