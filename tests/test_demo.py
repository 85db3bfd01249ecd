"""``ostiary demo`` as a new user runs it: the printed psql command works, and the read-only grant's
token (minted with the printed command) sees customers' cards and emails masked."""

from __future__ import annotations

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


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    out = tmp_path / "demo.out"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ostiary.cli",
                "demo",
                "--data-dir",
                str(tmp_path / "d"),
                "--port",
                str(port),
            ],
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
        yield out.read_text(), str(Path(sys.executable).parent)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


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
