"""The gateway's configuration file: YAML parsed into msgspec structs.

Rules of this module: it only reads and validates; it opens no socket and starts nothing. Every
problem is collected with its path inside the file (``connections[0].upstream.port``) and reported
together in one ``ConfigError``, so a person fixes a file in one pass. Secrets are never stored in the
structs by value unless written inline (``password:``, meant for demos); ``password_env`` and
``password_file`` are resolved only when a connection is made, so rotating a secret needs no reload.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from ostiary.errors import ConfigError

EXAMPLE = """\
# Minimal ostiary.yaml: clients connect with dbname=app and the user/password below.
listen:
  host: 127.0.0.1
  port: 6432
tls:
  cert: /etc/ostiary/server.pem
  key: /etc/ostiary/server.key
clients:
  - user: ci
    password_env: OSTIARY_CI_PASSWORD
connections:
  - name: app
    upstream:
      host: db.internal
      port: 5432
      database: app
      user: app_rw
      password_env: APP_DB_PASSWORD
      tls:
        mode: verify-full
        ca: /etc/ostiary/db-ca.pem
"""


class Secret(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where a secret comes from: exactly one of the three."""

    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None

    def secret_problems(self, path: str) -> list[tuple[str, str]]:
        given = [n for n in ("password", "password_env", "password_file") if getattr(self, n) is not None]
        if len(given) != 1:
            return [(path, "give exactly one of password, password_env, password_file")]
        return []

    def resolve(self) -> str:
        """Reads the secret now. Raises ``OSError``/``KeyError`` with a clear message when missing."""
        if self.password is not None:
            return self.password
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise KeyError(f"environment variable {self.password_env} is not set")
            return value
        assert self.password_file is not None
        return Path(self.password_file).read_text().rstrip("\r\n")


class Listen(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 6432
    backlog: int = 1024


class ClientTls(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """TLS on the client leg. ``mode: require`` refuses clients that do not ask for TLS (the default,
    because clients send secrets as passwords); ``allow`` also accepts plaintext."""

    cert: str
    key: str
    client_ca: str | None = None
    mode: Literal["require", "allow"] = "require"


class UpstreamTls(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """TLS towards the server, with libpq's sslmode names."""

    mode: Literal["disable", "require", "verify-full"] = "disable"
    ca: str | None = None
    server_name: str | None = None
    cert: str | None = None
    key: str | None = None


class Upstream(Secret, forbid_unknown_fields=True, kw_only=True):
    host: str
    port: int = 5432
    database: str
    user: str
    tls: UpstreamTls = msgspec.field(default_factory=UpstreamTls)
    connect_timeout: float = 10.0


class Connection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A database the gateway fronts; clients select it by name (their ``dbname``)."""

    name: str
    upstream: Upstream
    protocol: Literal["postgresql"] = "postgresql"


class Client(Secret, forbid_unknown_fields=True, kw_only=True):
    """Interim client authentication (user + password) until workload identity lands.
    ``connections`` limits which connections the client may use (all when omitted)."""

    user: str
    connections: list[str] | None = None


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_message: int = (1 << 30) - 1
    max_statement: int = 16 * 1024 * 1024
    max_startup: int = 10_000
    startup_timeout: float = 10.0
    max_connections: int = 10_000


class Shutdown(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """On SIGTERM: stop accepting, wait up to ``grace`` seconds for sessions to end, then end the
    rest with 57P01. With ``close_idle``, sessions are also ended as soon as they are idle."""

    grace: float = 30.0
    close_idle: bool = False


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    listen: Listen = msgspec.field(default_factory=Listen)
    data_dir: str = ".ostiary"
    workers: int = 0
    tls: ClientTls | None = None
    limits: Limits = msgspec.field(default_factory=Limits)
    shutdown: Shutdown = msgspec.field(default_factory=Shutdown)
    clients: list[Client] = msgspec.field(default_factory=list)
    connections: list[Connection] = msgspec.field(default_factory=list)

    def connection(self, name: str) -> Connection | None:
        for c in self.connections:
            if c.name == name:
                return c
        return None

    def effective_workers(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)


def _check(cfg: Config, base: Path) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if not 0 <= cfg.listen.port <= 65535:
        problems.append(("listen.port", f"{cfg.listen.port} is not a TCP port (0-65535)"))
    if cfg.workers < 0:
        problems.append(("workers", "must be 0 (one per core) or a positive number"))
    if cfg.tls is not None:
        for field in ("cert", "key", "client_ca"):
            value = getattr(cfg.tls, field)
            if value is not None and not (base / value).is_file():
                problems.append((f"tls.{field}", f"file {value} does not exist"))
    if not cfg.connections:
        problems.append(("connections", "no connections: add at least one (see the example)"))
    seen: set[str] = set()
    for i, conn in enumerate(cfg.connections):
        p = f"connections[{i}]"
        if conn.name in seen:
            problems.append((f"{p}.name", f"connection {conn.name!r} is defined twice"))
        seen.add(conn.name)
        up = conn.upstream
        problems += up.secret_problems(f"{p}.upstream")
        if not 0 < up.port <= 65535:
            problems.append((f"{p}.upstream.port", f"{up.port} is not a TCP port"))
        if up.tls.mode == "verify-full" and up.tls.ca is None:
            problems.append((f"{p}.upstream.tls.ca", "verify-full needs a CA bundle"))
        if up.tls.ca is not None and not (base / up.tls.ca).is_file():
            problems.append((f"{p}.upstream.tls.ca", f"file {up.tls.ca} does not exist"))
    if not cfg.clients:
        problems.append(("clients", "no clients: add at least one user with a password source"))
    for i, client in enumerate(cfg.clients):
        p = f"clients[{i}]"
        problems += client.secret_problems(p)
        for name in client.connections or []:
            if name not in seen:
                problems.append((f"{p}.connections", f"unknown connection {name!r}"))
    lim = cfg.limits
    if lim.max_statement > lim.max_message:
        problems.append(("limits.max_statement", "cannot exceed limits.max_message"))
    if lim.startup_timeout <= 0:
        problems.append(("limits.startup_timeout", "must be positive"))
    return problems


def _resolve_paths(cfg: Config, base: Path) -> None:
    def fix(p: str | None) -> str | None:
        return None if p is None else str((base / p).resolve())

    cfg.data_dir = str(fix(cfg.data_dir))
    if cfg.tls is not None:
        cfg.tls.cert = str(fix(cfg.tls.cert))
        cfg.tls.key = str(fix(cfg.tls.key))
        cfg.tls.client_ca = fix(cfg.tls.client_ca)
    for conn in cfg.connections:
        t = conn.upstream.tls
        t.ca, t.cert, t.key = fix(t.ca), fix(t.cert), fix(t.key)
        conn.upstream.password_file = fix(conn.upstream.password_file)
    for client in cfg.clients:
        client.password_file = fix(client.password_file)


def parse(data: Any, source: str = "<config>", base: Path | None = None) -> Config:
    """Validates an already-loaded mapping. Relative paths are taken from ``base``."""
    base = base or Path.cwd()
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the file must be a YAML mapping; an example:\n" + EXAMPLE)])
    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as e:
        # msgspec reports one problem with its path, like "Expected `int`, got `str` - at `$.listen.port`".
        msg = str(e)
        path = ""
        if " - at `$" in msg:
            msg, _, rest = msg.partition(" - at `$")
            path = rest.rstrip("`").lstrip(".")
        raise ConfigError(source, [(path, msg)]) from None
    problems = _check(cfg, base)
    if problems:
        raise ConfigError(source, problems)
    _resolve_paths(cfg, base)
    return cfg


def json_schema() -> str:
    """The JSON Schema of the configuration file (published as deploy/ostiary.schema.json)."""
    import json

    schema = msgspec.json.schema(Config)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Ostiary gateway configuration"
    return json.dumps(schema, indent=2, sort_keys=True)


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(str(p), [("", f"cannot read the file: {e.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(str(p), [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    return parse(data, str(p), p.parent)
