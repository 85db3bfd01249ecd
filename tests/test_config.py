"""The configuration file: broken files give every problem with its path; the schema is published."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ostiary import config
from ostiary.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def good(tmp_path: Path) -> dict[str, Any]:
    return {
        "clients": [{"user": "ci", "password": "x"}],
        "connections": [
            {"name": "app", "upstream": {"host": "db", "database": "app", "user": "u", "password_env": "P"}}
        ],
        "grants": [{"name": "ci-app", "identities": ["ci"], "connection": "app"}],
    }


def problems(data: Any, tmp_path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        config.parse(data, "test.yaml", tmp_path)
    return e.value.problems


def test_minimal_file_parses_with_defaults(tmp_path: Path) -> None:
    cfg = config.parse(good(tmp_path), "test.yaml", tmp_path)
    assert cfg.listen.port == 6432
    assert cfg.connection("app") is not None
    assert cfg.connection("nope") is None
    assert cfg.effective_workers() >= 1


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = good(tmp_path)
    data["listen"] = {"port": 70000}
    data["connections"].append(dict(data["connections"][0]))
    data["connections"][0]["upstream"] = {
        "host": "db",
        "database": "app",
        "user": "u",
        "password": "a",
        "password_env": "B",
        "tls": {"mode": "verify-full"},
    }
    data["grants"][0]["connection"] = "missing"
    found = dict(problems(data, tmp_path))
    assert "70000 is not a TCP port" in found["listen.port"]
    assert "defined twice" in found["connections[1].name"]
    assert "exactly one of" in found["connections[0].upstream"]
    assert "verify-full needs a CA" in found["connections[0].upstream.tls.ca"]
    assert "unknown connection 'missing'" in found["grants[0].connection"]


def test_type_problems_do_not_hide_the_others(tmp_path: Path) -> None:
    # An enum typo used to be the only problem shown; the others came one fix at a time.
    data = good(tmp_path)
    data["grants"][0]["access"] = "rw"
    data["grants"][0]["connection"] = "order"
    data["listen"] = {"port": 70000}
    found = dict(problems(data, tmp_path))
    assert "Invalid enum value 'rw'" in found["grants[0].access"]
    assert "unknown connection 'order'" in found["grants[0].connection"]
    assert "70000 is not a TCP port" in found["listen.port"]


def test_wrong_type_names_the_path(tmp_path: Path) -> None:
    data = good(tmp_path)
    data["listen"] = {"port": "six"}
    [(path, msg)] = problems(data, tmp_path)
    assert path == "listen.port"
    assert "int" in msg


def test_unknown_field_is_refused(tmp_path: Path) -> None:
    data = good(tmp_path)
    data["listne"] = {}
    [(_, msg)] = problems(data, tmp_path)
    assert "listne" in msg


def test_missing_tls_files_are_named(tmp_path: Path) -> None:
    data = good(tmp_path)
    data["tls"] = {"cert": "nope.pem", "key": "nope.key"}
    found = dict(problems(data, tmp_path))
    assert "nope.pem does not exist" in found["tls.cert"]


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("listen:\n  port: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert "line" in e.value.problems[0][0]


def test_not_a_mapping(tmp_path: Path) -> None:
    [(_, msg)] = problems(["a", "b"], tmp_path)
    assert "mapping" in msg


def test_example_file_is_valid_apart_from_its_paths(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "deploy" / "ostiary.example.yaml").read_text())
    for name in ("cert", "key"):
        (tmp_path / name).write_text("x")
        data["tls"][name] = str(tmp_path / name)
        data["admin"]["tls"][name] = str(tmp_path / name)
    (tmp_path / "ca").write_text("x")
    data["connections"][0]["upstream"]["tls"]["ca"] = str(tmp_path / "ca")
    cfg = config.parse(data, "example", tmp_path)
    assert cfg.connections[0].upstream.tls.mode == "verify-full"


def test_published_schema_is_current() -> None:
    published = (ROOT / "deploy" / "ostiary.schema.json").read_text().strip()
    assert published == config.json_schema(), (
        "regenerate with: ostiary config schema > deploy/ostiary.schema.json"
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ostiary.cli", *args], capture_output=True, text=True, timeout=30
    )


def test_serve_without_config_says_what_to_write() -> None:
    r = run_cli("serve")
    assert r.returncode == 2
    assert "needs a configuration file" in r.stderr
    assert "connections:" in r.stderr


def test_config_check_exit_codes(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"connections": []}))
    r = run_cli("config", "check", str(p))
    assert r.returncode == 2
    assert "no connections" in r.stderr and "no grants" in r.stderr
    p.write_text(yaml.safe_dump(good(tmp_path)))
    r = run_cli("config", "check", str(p))
    assert r.returncode == 0, r.stderr


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("ostiary ")


# -- files that are not UTF-8 ----------------------------------------------------------------------


def latin1_file(tmp_path: Path) -> Path:
    """A valid file with a Latin-1 comment appended (what an editor set to Latin-1 writes)."""
    p = tmp_path / "latin1.yaml"
    p.write_bytes(yaml.safe_dump(good(tmp_path)).encode() + b"# site: Z\xfcrich\n")
    return p


def test_a_file_that_is_not_utf8_is_a_problem_with_its_line(tmp_path: Path) -> None:
    p = latin1_file(tmp_path)
    line = p.read_bytes().count(b"\n")  # the last line
    with pytest.raises(ConfigError) as e:
        config.load(p)
    [(where, msg)] = e.value.problems
    assert e.value.source == str(p)
    assert where == f"line {line}, column 10"
    assert "not UTF-8" in msg and "0xfc" in msg


@pytest.mark.parametrize("command", [("policy", "check"), ("serve", "--config")])
def test_cli_reports_a_file_that_is_not_utf8(command: tuple[str, str], tmp_path: Path) -> None:
    p = latin1_file(tmp_path)
    r = run_cli(*command, str(p))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    line = p.read_bytes().count(b"\n")
    assert f"{p}: 1 problem(s)" in r.stderr
    assert f"line {line}, column 10: not UTF-8: byte 0xfc" in r.stderr, r.stderr


# -- numbers that make no sense ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("shutdown", "grace", -5),
        ("shutdown", "grace", float("nan")),
        ("limits", "max_connections", -1),
        ("limits", "max_connections", 0),
        ("limits", "max_startup", -1),
        ("limits", "max_startup", 0),
        ("limits", "max_message", 0),
        ("limits", "max_statement", -1),
        ("limits", "startup_timeout", 0),
        ("limits", "startup_timeout", float("nan")),
        ("listen", "backlog", 0),
    ],
)
def test_numbers_that_make_no_sense_are_refused(section: str, key: str, value: float, tmp_path: Path) -> None:
    data = good(tmp_path)
    data[section] = {key: value}
    assert f"{section}.{key}" in dict(problems(data, tmp_path))


def test_zero_grace_is_allowed(tmp_path: Path) -> None:
    data = good(tmp_path)
    data["shutdown"] = {"grace": 0}
    assert config.parse(data, "test.yaml", tmp_path).shutdown.grace == 0


@pytest.mark.parametrize("command", [("policy", "check"), ("serve", "--config")])
def test_cli_refuses_a_negative_grace(command: tuple[str, str], tmp_path: Path) -> None:
    data = good(tmp_path)
    data["shutdown"] = {"grace": -5}
    data["limits"] = {"max_connections": 0}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    r = run_cli(*command, str(p))
    assert r.returncode == 2, r.stderr
    assert "shutdown.grace" in r.stderr and "limits.max_connections" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# -- secrets that cannot be read now -----------------------------------------------------------------


def test_policy_check_warns_of_passwords_it_cannot_read(tmp_path: Path) -> None:
    data = good(tmp_path)
    data["clients"] = [
        {"user": "ci", "password_file": "missing.pw"},
        {"user": "ok", "password_file": "ok.pw"},
    ]
    (tmp_path / "ok.pw").write_text("secret\n")
    data["connections"][0]["upstream"]["password_env"] = "OSTIARY_TEST_SURELY_UNSET"
    data["connections"][0]["credentials"] = {"dir": {"user": "r", "password_file": str(tmp_path)}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    r = run_cli("policy", "check", str(p))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stdout.splitlines() if "warning:" in line and "password_" in line]
    assert len(warnings) == 3, r.stdout
    assert f"clients[0]: password_file: {tmp_path / 'missing.pw'} does not exist" in warnings[0]
    assert (
        "connections[0].upstream: password_env: environment variable OSTIARY_TEST_SURELY_UNSET" in warnings[1]
    )
    assert f"connections[0].credentials.dir: password_file: {tmp_path} is not a file" in warnings[2]


def test_keys_given_twice_are_problems(tmp_path: Path) -> None:
    """YAML loaders keep the last of two equal keys: `access: read-only` then `access: read-write`
    granted writes without a word."""
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(good(tmp_path)) + "listen: {port: 1}\n")
    text = p.read_text().replace(
        "connection: app\n", "connection: app\n  access: read-only\n  access: read-write\n"
    )
    p.write_text(text)
    r = run_cli("policy", "check", str(p))
    assert r.returncode == 2
    assert "grants[0].access is given twice" in r.stderr and "listen is given twice" not in r.stderr, r.stderr
    p.write_text(yaml.safe_dump(good(tmp_path)) + "listen: {port: 1}\nlisten: {port: 2}\n")
    r = run_cli("policy", "check", str(p))
    assert r.returncode == 2 and "listen is given twice (also on line" in r.stderr, r.stderr


def test_policy_check_warns_of_what_serve_would_refuse_or_expose(tmp_path: Path) -> None:
    data = good(tmp_path)
    data["admin"] = {"listen": {"host": "0.0.0.0", "port": 6480}}
    data["audit"] = {"store": "postgres", "dsn_env": "OSTIARY_TEST_SURELY_UNSET_DSN"}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    r = run_cli("policy", "check", str(p))
    assert r.returncode == 0, r.stderr
    assert "tls: no TLS configured: every client of app is refused" in r.stdout, r.stdout
    assert "admin.tls: the admin API listens on 0.0.0.0 without TLS" in r.stdout
    assert "audit.dsn_env: environment variable OSTIARY_TEST_SURELY_UNSET_DSN is not set" in r.stdout
    # host db, tls disable, any method: an impostor could take the password.
    assert (
        "connections[0].upstream: tls.mode is disable: the sessions (and the login) cross the network"
        in r.stdout
    )
    # serve says the same in one line, without a traceback.
    r = run_cli("serve", "--config", str(p))
    assert r.returncode == 1, r.stderr
    assert "OSTIARY_TEST_SURELY_UNSET_DSN is not set" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("upstream", "warned"),
    [
        ({"tls": {"mode": "require"}}, True),
        ({"tls": {"mode": "require"}, "require_auth": ["scram-sha-256", "password"]}, True),
        ({"tls": {"mode": "require"}, "require_auth": ["scram-sha-256"]}, True),  # relayed
        ({"tls": {"mode": "disable"}, "require_auth": ["scram-sha-256"]}, True),  # in clear
        ({"tls": {"mode": "verify-full", "ca": "good.py"}}, False),
        ({"host": "127.0.0.1"}, False),
        ({"host": "/var/run/postgresql"}, False),
    ],
)
def test_weak_upstream_authentication_is_warned_of(
    tmp_path: Path, upstream: dict[str, Any], warned: bool
) -> None:
    from ostiary.policy.check import policy_warnings

    data = good(tmp_path)
    (tmp_path / "good.py").write_text("a CA bundle")
    data["connections"][0]["upstream"].update(upstream)
    cfg = config.parse(data, "test.yaml", tmp_path)
    found = [w for w, _ in policy_warnings(cfg) if w == "connections[0].upstream"]
    assert bool(found) == warned


def test_require_auth_names_known_methods(tmp_path: Path) -> None:
    data = good(tmp_path)
    data["connections"][0]["upstream"]["require_auth"] = ["scram-sha-256", "gss"]
    (where, _), *_ = problems(data, tmp_path)
    assert where == "connections[0].upstream.require_auth[1]", where
