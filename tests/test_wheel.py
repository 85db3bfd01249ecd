"""The shipped artefact: the wheel `make wheel` builds holds everything the gateway needs.

The rest of the suite runs from the source tree (`maturin develop`); this builds the wheel the way
`make wheel` does, installs it alone into an empty directory and runs the gateway from there, so a
module, stub or entry point missing from the wheel fails here and not on a user's machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import GatewayFactory, psql

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    maturin = Path(sys.executable).parent / "maturin"
    assert maturin.exists(), "maturin is part of the dev extra (make build installs it)"
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [str(maturin), "build", "--release", "--strip", "-q", "-o", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = out.glob("ostiary-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ostiary/_core.abi3.so" in names and "ostiary/_core.pyi" in names and "ostiary/py.typed" in names
    # Stripped: the release profile keeps debug info for profiling, the shipped wheel does not.
    assert wheel.stat().st_size < 15 * 1024 * 1024, wheel.stat().st_size
    site = out / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return site


def _env(site: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(site))


def test_wheel_installs_alone_and_imports_from_its_own_files(wheel_site: Path) -> None:
    code = "import ostiary, ostiary._core, ostiary.cli; print(ostiary.__file__, ostiary._core.__file__)"
    r = subprocess.run(
        [sys.executable, "-c", code], env=_env(wheel_site), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    files = r.stdout.split()
    assert all(Path(f).is_relative_to(wheel_site) for f in files), files
    # Every module of the source tree is in the wheel.
    source = {p.relative_to(ROOT / "python") for p in (ROOT / "python/ostiary").rglob("*.py")}
    shipped = {p.relative_to(wheel_site) for p in (wheel_site / "ostiary").rglob("*.py")}
    assert source <= shipped, sorted(map(str, source - shipped))


def test_wheel_entry_point_and_schema(wheel_site: Path) -> None:
    ostiary = wheel_site / "bin" / "ostiary"
    assert ostiary.exists()
    r = subprocess.run(
        [sys.executable, str(ostiary), "--version"],
        env=_env(wheel_site),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.startswith("ostiary "), r.stdout + r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "ostiary.cli", "config", "schema"],
        env=_env(wheel_site),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((ROOT / "deploy/ostiary.schema.json").read_text())


def test_gateway_from_the_wheel_carries_psql(
    wheel_site: Path, gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(wheel_site))
    gw = gateway_factory()
    pid = gw.proc.pid
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert str(wheel_site / "ostiary" / "_core.abi3.so") in maps, "the gateway did not load the wheel's core"
    r = psql(gw, "-At", "-c", "select 40 + 2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42"
