"""What `ostiary serve` says when something is wrong, as an operator runs it.

At start: settings the file check cannot judge (a port in use, a host that is not this machine's, a
TLS key that is not the certificate's, an unusable data_dir) end the process with exit code 2 and one
line naming the setting, never a traceback. On reload: a file the gateway cannot read is rejected like
broken YAML and the running gateway keeps serving. At login: a static client whose password cannot
be read looks to the client exactly like a wrong password; the reason goes to the gateway's log.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import CLIENT_USER, GatewayFactory, GatewayProcess, gateway_config, psql
from ostiary.devcluster import PgCluster, TlsMaterial, free_port, make_tls_material
from pgraw import RawConn, password_message, startup_message


def offline_config(tls: TlsMaterial, tmp: Path, port: int) -> dict[str, Any]:
    """A valid configuration whose upstream is never reached: enough to start the gateway."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "data_dir": str(tmp / "state"),
        "workers": 1,
        "tls": {"cert": str(tls.server_cert), "key": str(tls.server_key)},
        "clients": [{"user": CLIENT_USER, "password": "x"}],
        "connections": [
            {
                "name": "app",
                "upstream": {"host": "127.0.0.1", "database": "app", "user": "u", "password": "p"},
            }
        ],
        "grants": [{"name": "ci-app", "identities": [CLIENT_USER], "connection": "app"}],
    }


def serve(cfg: dict[str, Any], tmp: Path) -> subprocess.CompletedProcess[str]:
    """Runs `ostiary serve` on ``cfg``; it is expected to exit by itself."""
    path = tmp / "ostiary.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "ostiary.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], tmp: Path, setting: str, words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    [error] = [line for line in r.stderr.splitlines() if line.startswith("ostiary serve:")]
    assert error.startswith(f"ostiary serve: {tmp / 'ostiary.yaml'}: {setting}: "), error
    assert words in error, error


def test_listen_port_in_use(gateway_tls: TlsMaterial, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = serve(offline_config(gateway_tls, tmp_path, port), tmp_path)
    assert_one_line_error(r, tmp_path, "listen.port", f"127.0.0.1:{port} is already in use")


def test_admin_port_in_use(gateway_tls: TlsMaterial, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = offline_config(gateway_tls, tmp_path, free_port())
        cfg["admin"] = {"listen": {"port": taken.getsockname()[1]}}
        r = serve(cfg, tmp_path)
    assert_one_line_error(r, tmp_path, "admin.listen.port", "is already in use")


def test_listen_host_not_of_this_machine(gateway_tls: TlsMaterial, tmp_path: Path) -> None:
    cfg = offline_config(gateway_tls, tmp_path, free_port())
    cfg["listen"]["host"] = "192.0.2.1"  # TEST-NET-1: never a local address
    r = serve(cfg, tmp_path)
    assert_one_line_error(r, tmp_path, "listen.host", "192.0.2.1 is not an address of this machine")


def test_tls_key_of_another_certificate(gateway_tls: TlsMaterial, tmp_path: Path) -> None:
    other = make_tls_material(tmp_path / "other")
    cfg = offline_config(gateway_tls, tmp_path, free_port())
    cfg["tls"]["key"] = str(other.server_key)
    r = serve(cfg, tmp_path)
    assert_one_line_error(
        r, tmp_path, "tls.key", f"{other.server_key} is not the private key of the certificate"
    )


def test_tls_key_that_is_not_a_key(gateway_tls: TlsMaterial, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("this is not a key\n")
    cfg = offline_config(gateway_tls, tmp_path, free_port())
    cfg["tls"]["key"] = str(garbage)
    r = serve(cfg, tmp_path)
    assert_one_line_error(r, tmp_path, "tls.key", f"{garbage} holds no PEM private key")


def test_admin_tls_key_of_another_certificate(gateway_tls: TlsMaterial, tmp_path: Path) -> None:
    other = make_tls_material(tmp_path / "other")
    cfg = offline_config(gateway_tls, tmp_path, free_port())
    cfg["admin"] = {
        "listen": {"port": free_port()},
        "tls": {"cert": str(gateway_tls.server_cert), "key": str(other.server_key)},
    }
    r = serve(cfg, tmp_path)
    assert_one_line_error(r, tmp_path, "admin.tls.key", "is not the private key of the certificate")


@pytest.mark.parametrize(
    ("where", "words"), [("file", "is a file, not a directory"), ("file/sub", "is a file")]
)
def test_data_dir_that_cannot_be_a_directory(
    where: str, words: str, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("not a directory")
    cfg = offline_config(gateway_tls, tmp_path, free_port())
    cfg["data_dir"] = str(tmp_path / where)
    r = serve(cfg, tmp_path)
    assert_one_line_error(r, tmp_path, "data_dir", words)


# -- reload ------------------------------------------------------------------------------------------


def wait_for_log(gw: GatewayProcess, text: str, count: int = 1, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert gw.proc.poll() is None, f"the gateway exited with {gw.proc.returncode}:\n{gw.log()[-4000:]}"
        if gw.log().count(text) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not {count} time(s) in the gateway log:\n{gw.log()[-3000:]}")


def test_reload_of_a_file_that_is_not_utf8_is_rejected(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory()
    good = gw.config_path.read_bytes()
    # Seen by the file watcher (no signal) ...
    gw.config_path.write_bytes(good + b"# site: Z\xfcrich\n")
    wait_for_log(gw, "policy reload rejected")
    # ... and on SIGHUP.
    gw.proc.send_signal(signal.SIGHUP)
    wait_for_log(gw, "policy reload rejected", count=2)
    assert "not UTF-8: byte 0xfc" in gw.log()
    assert "Traceback" not in gw.log(), gw.log()[-4000:]
    r = psql(gw, "-At", "-c", "select 40 + 2", timeout=20)
    assert (r.returncode, r.stdout.strip()) == (0, "42"), r.stderr
    assert gw.proc.poll() is None
    # Each rejection is in the audit trail, as for broken YAML.
    store = Path(yaml.safe_load(good)["data_dir"]) / "audit.db"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ostiary.cli",
            "audit",
            "search",
            "--store",
            str(store),
            "--kind",
            "policy",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    rejected = [rec for rec in records if rec["verdict"] == "rejected"]
    assert len(rejected) == 2, records
    assert all("not UTF-8" in rec["data"]["detail"] for rec in rejected), rejected


# -- an unreadable static password ----------------------------------------------------------------------


def login_error(gw: GatewayProcess, user: str, password: str) -> dict[str, str]:
    """The one FATAL error a password login as ``user`` gets."""
    with RawConn(gw.port) as c:
        c.start_tls(gw.tls.ca_cert)
        c.send(startup_message({"user": user, "database": "app"}))
        m = c.recv_message()
        assert m is not None and m[0] == b"R", m
        c.send(password_message(password))
        out = c.outcome(10)
    assert out.closed and [t for t, _ in out.messages] == [b"E"], out.describe()
    return out.errors[0]


def test_an_unreadable_client_password_looks_like_a_wrong_one(
    pg: PgCluster, gateway_tls: TlsMaterial, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dir" / "ci.pw"
    cfg = gateway_config(pg, gateway_tls, free_port(), tmp_path)
    cfg["clients"] = [
        {"user": CLIENT_USER, "password_file": str(missing)},
        {"user": "other", "password": "o"},
    ]
    gw = gateway_factory(cfg)
    # Warned at start, before any client tries.
    assert f"clients[0]: password_file: {missing} does not exist" in gw.log()
    unreadable = login_error(gw, CLIENT_USER, "a guess")
    unknown = login_error(gw, "nobody", "a guess")
    assert unreadable == {**unknown, "M": f'password authentication failed for user "{CLIENT_USER}"'}
    assert unreadable["C"] == "28P01"
    assert str(missing) not in str(unreadable)
    # The reason is the operator's: in the gateway's log.
    assert f"the password of static client '{CLIENT_USER}' cannot be read" in gw.log()
    assert str(missing) in gw.log()
    assert gw.proc.poll() is None


# -- a --port out of range ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "demo"])
@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_port_out_of_range_is_a_usage_error(command: str, port: str, tmp_path: Path) -> None:
    """Refused by the argument parser, before anything starts: the socket layer would take 99999
    modulo 65536 and 65536 as any free port, and the demo failed only after initdb."""
    data_dir = tmp_path / "demo"
    extra = ["--data-dir", str(data_dir)] if command == "demo" else []
    r = subprocess.run(
        [sys.executable, "-m", "ostiary.cli", command, *extra, "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"usage: ostiary {command} "), r.stderr
    lowest = 0 if command == "serve" else 1  # listen.port 0 (any free port) is valid in the file
    assert f"error: argument --port: {port} is not a TCP port ({lowest}-65535)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not data_dir.exists()
