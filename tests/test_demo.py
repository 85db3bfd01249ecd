"""``ostiary demo`` as a new user runs it: the printed psql command works, and the read-only grant's
token (minted with the printed command) sees customers' cards and emails masked."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ostiary.devcluster import free_port


def demo_argv(data_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "ostiary.cli", "demo", "--data-dir", str(data_dir), "--port", str(port)]


@contextlib.contextmanager
def running_demo(data_dir: Path, out: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``ostiary demo`` on ``data_dir``, once it has printed its instructions (kept in ``out``);
    stopped with Ctrl-C after."""
    port = free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            demo_argv(data_dir, port),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        yield proc, out.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, str]]:
    with running_demo(tmp_path / "d", tmp_path / "demo.out") as (_, text):
        yield text, str(Path(sys.executable).parent)


def psql_as_printed(text: str, sql: str) -> subprocess.CompletedProcess[str]:
    """Runs ``sql`` with the psql command the demo printed."""
    line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith("PGPASSWORD="))
    password, _, rest = line.partition(" psql ")
    env = dict(os.environ, PGPASSWORD=password.removeprefix("PGPASSWORD="))
    return subprocess.run(
        ["psql", "-X", "-At", shlex.split(rest)[0], "-c", sql],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_demo_commands_work_and_reports_are_masked(demo: tuple[str, str]) -> None:
    text, _ = demo
    line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith("PGPASSWORD="))
    password, _, rest = line.partition(" psql ")
    dsn = shlex.split(rest)[0]
    env = dict(os.environ, PGPASSWORD=password.removeprefix("PGPASSWORD="))
    out = subprocess.run(
        ["psql", "-X", "-At", dsn, "-c", "select card from customers order by id"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4111", "1111", "1111", "1111", "5500-0000-0000-0004"]  # writer: unmasked

    # `ostiary` or the virtualenv's path to it, as the shell can run it
    mint = next(ln.strip() for ln in text.splitlines() if "ostiary token mint" in ln)
    args = shlex.split(mint)
    token = subprocess.run(
        [sys.executable, "-m", "ostiary.cli", *args[1:]],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    env["PGPASSWORD"] = token
    out = subprocess.run(
        ["psql", "-X", "-At", dsn, "-c", "select name, email, card from customers order by id"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["Alice|****|****", "Bob|****|****"]
    assert not re.search(r"example\.(com|org)|4111|5500", out.stdout)

    # The printed audit commands find those statements (the trail is flushed within 0.2 s).
    search = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith("ostiary audit search"))
    args = shlex.split(search)[1:]
    deadline = time.monotonic() + 10
    while True:
        found = subprocess.run(
            [sys.executable, "-m", "ostiary.cli", *args, "--text", "from customers", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert found.returncode == 0, found.stderr
        rows = [json.loads(x) for x in found.stdout.splitlines()]
        if len(rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {r["rule"] for r in rows} == {"demo-writes", "acme-reads"}, rows
    assert all(r["kind"] == "statement" and r["data"]["outcome"] == "ok" for r in rows)


def test_a_second_demo_on_the_same_directory_leaves_the_first_alone(tmp_path: Path) -> None:
    """It used to remove the directory and start over, deleting the running demo's cluster and
    audit trail under it. A lock file left by a demo that died (its pid, no lock) blocks nothing."""
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "demo.lock").write_text("999999999\n")
    with running_demo(data_dir, tmp_path / "first.out") as (first, text):
        started = time.monotonic()
        second = subprocess.run(
            demo_argv(data_dir, free_port()),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert time.monotonic() - started < 10
        assert second.returncode == 2, second.stderr
        assert second.stderr.splitlines() == [
            f"ostiary demo: another demo is running in {data_dir} (pid {first.pid}); "
            "stop it with Ctrl-C or use --data-dir to choose another directory"
        ]
        assert second.stdout == ""
        # The first demo still serves, its cluster and trail in place.
        r = psql_as_printed(text, "select 40 + 2")
        assert (r.returncode, r.stdout.strip()) == (0, "42"), r.stderr
        assert (data_dir / "postgres").is_dir()
        assert (data_dir / "state").is_dir()
        assert first.poll() is None
    assert first.returncode == 0, (tmp_path / "first.out").read_text()
    assert "Traceback" not in (tmp_path / "first.out").read_text()
    assert not data_dir.exists()  # the lock file went with the rest
