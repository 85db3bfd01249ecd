"""The configuration and policy file: YAML (one file or a directory of them) parsed into msgspec structs.

Rules of this module: it only reads and validates; it opens no socket and starts nothing. Every
problem is collected with its path inside the file (``grants[2].connection``) and, where known, the
file and line, and reported together in one ``ConfigError``, so a person fixes a file in one pass.
Secrets are never stored in the structs by value unless written inline (``password:``, meant for
demos); ``password_env`` and ``password_file`` are resolved only when a connection is made, so
rotating a secret needs no reload. The policy sections are checked by ``ostiary.policy.check``.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import urllib.parse
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import msgspec
import yaml

from ostiary.errors import ConfigError
from ostiary.policy.model import (
    ApprovalRule,
    Connection,
    Credential,
    Grant,
    Group,
    Guardrail,
    IdentityMatcher,
    Issuer,
    MaskingRule,
)

EXAMPLE = """\
# Minimal ostiary.yaml: a GitHub Actions workflow of acme/shop on main reads database app.
listen:
  host: 127.0.0.1
  port: 6432
tls:
  cert: /etc/ostiary/server.pem
  key: /etc/ostiary/server.key
issuers:
  - name: github
    preset: github-actions
    audiences: [ostiary]
identities:
  - name: shop-main
    issuer: github
    match: {repository: acme/shop, ref: refs/heads/main}
connections:
  - name: app
    upstream:
      host: db.internal
      port: 5432
      database: app
      user: app_ro
      password_env: APP_DB_PASSWORD
      tls:
        mode: verify-full
        ca: /etc/ostiary/db-ca.pem
grants:
  - name: shop-reads-app
    identities: [shop-main]
    connection: app
    access: read-only
"""


class Listen(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 6432
    backlog: int = 1024


class ClientTls(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """TLS on the client leg. ``mode: require`` refuses clients that do not ask for TLS (the default,
    because clients send tokens as passwords); ``allow`` also accepts plaintext, for connections that
    set ``allow_plaintext``. With ``client_ca``, client certificates signed by it are requested and
    verified (the ``certificate`` issuer of identities)."""

    cert: str
    key: str
    client_ca: str | None = None
    mode: Literal["require", "allow"] = "require"


class Client(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A static client: a user name and a password (issuer ``password`` in identities; grants can
    also name the user directly). Static secrets are what Ostiary exists to replace: keep these for
    clients that cannot present a token, and prefer ``password_env``/``password_file``."""

    user: str
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None


class Dev(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Development switches; never on in production. ``issuer: true`` trusts tokens minted by
    ``ostiary token mint --dev`` (issuer name ``dev``, key in ``data_dir``)."""

    issuer: bool = False
    audiences: list[str] = msgspec.field(default_factory=lambda: ["ostiary"])


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


class ObjectStore(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An S3-compatible object store for session recordings (AWS S3, MinIO, GCS's XML API with HMAC
    keys, ...). ``url`` is the endpoint (``https://s3.us-east-1.amazonaws.com``,
    ``http://127.0.0.1:9000``, ``https://storage.googleapis.com``); recordings go to
    ``<prefix><YYYY-MM-DD>/<session_ref>.rec`` in ``bucket``, signed with AWS Signature Version 4
    for ``region``. The access key and secret key are read from ``access_key_env``/``access_key_file``
    and ``secret_key_env``/``secret_key_file`` at each request (rotation needs no restart). ``ca``
    verifies an https endpoint (default: the system's CAs). ``path_style`` addresses the bucket in the
    path (``<url>/<bucket>/<key>``: MinIO and most S3-compatible stores); false puts it in the host
    name (``<bucket>.<host>``). A recording is uploaded once its session has ended, retried until the
    store takes it; then the local file is deleted, or kept with a ``.uploaded`` marker when
    ``keep_local``. ``timeout`` bounds each request, in seconds."""

    url: str
    bucket: str
    prefix: str = "recordings/"
    region: str = "us-east-1"
    access_key_env: str | None = None
    access_key_file: str | None = None
    secret_key_env: str | None = None
    secret_key_file: str | None = None
    ca: str | None = None
    path_style: bool = True
    keep_local: bool = False
    timeout: float = 30.0


class AuditRecordings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Session recordings: each session's statements and what its client received (after masking),
    at most ``max_rows`` rows per statement and ``max_field`` bytes per value, in
    ``<data_dir>/recordings``, and with ``object_store`` uploaded there when each session ends."""

    enabled: bool = True
    max_rows: int = 100
    max_field: int = 1024
    object_store: ObjectStore | None = None


class AuditExporter(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Sends the audit trail to a SIEM, at least once, in store order, from a cursor kept in
    ``<data_dir>/audit/export-<name>.cursor``. ``kind: jsonl`` appends JSON lines to ``path`` ("-" for
    stdout); ``splunk_hec`` posts to the HEC endpoint ``url`` (…/services/collector/event) with the
    token of ``token_env``/``token_file``; ``elastic`` posts to ``url``/_bulk into ``index`` (default
    ``ostiary-audit``) with an API key (``token_env``/``token_file``) or ``username`` and
    ``password_env``/``password_file``; ``syslog`` sends RFC 5424 messages, octet-counted, over
    ``transport`` tcp or tls to ``host``:``port`` (default 514, 6514 with TLS). ``ca`` verifies an
    HTTPS or TLS server (default: the system's CAs); with syslog, ``server_name`` overrides the name
    checked.
    ``format: ocsf`` sends OCSF events, ``raw`` the records as stored. At most ``batch`` records per
    delivery; the store is polled every ``interval`` seconds; ``kinds`` keeps only those kinds. Each
    event carries the stable id ``<writer>:<seq>`` to drop duplicates by."""

    name: str
    kind: Literal["jsonl", "splunk_hec", "elastic", "syslog"]
    path: str | None = None
    url: str | None = None
    token_env: str | None = None
    token_file: str | None = None
    username: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    index: str | None = None
    host: str | None = None
    port: int | None = None
    transport: Literal["tcp", "tls"] = "tcp"
    ca: str | None = None
    server_name: str | None = None
    format: Literal["ocsf", "raw"] = "ocsf"
    batch: int = 500
    interval: float = 1.0
    timeout: float = 10.0
    kinds: list[str] | None = None


class Audit(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The tamper-evident audit trail. Every record carries the SHA-256 of the one before it (one
    chain per gateway, the *writer*), and the writer signs a checkpoint of its chain with Ed25519
    every ``checkpoint_interval`` seconds (key: ``signing_key_file``, else
    ``<data_dir>/audit/signing.key``).

    ``mode: async`` writes records in batches off the data path; a crash loses at most the records
    of the last ``flush_interval`` seconds. ``mode: sync`` writes each statement's record durably
    before the statement is sent to the server (its result can only follow). ``store: sqlite`` keeps
    the trail in ``path`` (default ``<data_dir>/audit.db``); ``store: postgres`` in the database of
    ``dsn``/``dsn_env``/``dsn_file``, shared by a fleet. When the store cannot be written,
    ``on_failure: refuse`` refuses new statements and logins until it can again; ``spool`` keeps
    writing to ``<data_dir>/audit/spool`` and replays into the store when it returns. A store call
    that has not returned within ``store_timeout`` seconds (a frozen server, a network blackhole)
    counts as a failure; keep it below ``sync_timeout``. At ``max_pending`` unwritten records new
    statements and logins are refused and sessions ended; records beyond it are counted, and a
    ``records_lost`` record names how many once the store is back. ``statements``
    records the statement text, its fingerprint (shape with constants replaced) or neither, at most
    ``max_text`` bytes of it. ``retention_days`` purges older records (the purge is signed, the rest
    of the chain still verifies)."""

    enabled: bool = True
    mode: Literal["async", "sync"] = "async"
    store: Literal["sqlite", "postgres"] = "sqlite"
    path: str | None = None
    dsn: str | None = None
    dsn_env: str | None = None
    dsn_file: str | None = None
    statements: Literal["text", "fingerprint", "none"] = "text"
    max_text: int = 4096
    flush_interval: float = 0.2
    checkpoint_interval: float = 10.0
    on_failure: Literal["refuse", "spool"] = "refuse"
    max_pending: int = 200_000
    sync_timeout: float = 10.0
    store_timeout: float = 5.0
    retention_days: float | None = None
    signing_key_file: str | None = None
    writer_name: str | None = None
    recordings: AuditRecordings = msgspec.field(default_factory=AuditRecordings)
    exporters: list[AuditExporter] = msgspec.field(default_factory=list)


class AdminListen(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 6480


class AdminTls(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The admin API's server certificate and key (PEM files)."""

    cert: str
    key: str


class Webhook(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where approval requests and their outcomes are announced: a POST of ``format: json`` (a
    generic payload with the request and its approve/deny URLs) or ``slack`` (an incoming-webhook
    message with the identity, connection, statement and the approve link). The URL is taken from
    exactly one of ``url``, ``url_env`` or ``url_file`` (Slack webhook URLs are secrets: keep them
    out of the file). ``ca`` verifies an HTTPS receiver (default: the system's CAs); each delivery
    gives up after ``timeout`` seconds."""

    name: str
    url: str | None = None
    url_env: str | None = None
    url_file: str | None = None
    format: Literal["json", "slack"] = "json"
    ca: str | None = None
    timeout: float = 10.0


class Admin(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The admin HTTP API (approvals: list, show, approve, deny, request ahead of time; a minimal
    web page per request), on ``listen`` with ``tls`` when given. ``public_url`` is the base of the
    links the gateway hands out (notices, webhooks); set it when clients and approvers reach the API
    through another name (a load balancer, a wildcard listen address). ``webhooks`` are told of
    every approval request and its outcome."""

    listen: AdminListen = msgspec.field(default_factory=AdminListen)
    tls: AdminTls | None = None
    public_url: str | None = None
    webhooks: list[Webhook] = msgspec.field(default_factory=list)

    def base_url(self) -> str:
        """``public_url`` without a trailing slash, else the listen address's URL."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.listen.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.listen.port}"


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole file: the gateway process (listen ... shutdown, read at start) and the policy
    (issuers ... approvals, swapped atomically on reload)."""

    listen: Listen = msgspec.field(default_factory=Listen)
    data_dir: str = ".ostiary"
    masking_key_file: str | None = None
    workers: int = 0
    tls: ClientTls | None = None
    limits: Limits = msgspec.field(default_factory=Limits)
    shutdown: Shutdown = msgspec.field(default_factory=Shutdown)
    audit: Audit = msgspec.field(default_factory=Audit)
    admin: Admin | None = None
    dev: Dev = msgspec.field(default_factory=Dev)
    issuers: list[Issuer] = msgspec.field(default_factory=list)
    clients: list[Client] = msgspec.field(default_factory=list)
    identities: list[IdentityMatcher] = msgspec.field(default_factory=list)
    groups: list[Group] = msgspec.field(default_factory=list)
    connections: list[Connection] = msgspec.field(default_factory=list)
    grants: list[Grant] = msgspec.field(default_factory=list)
    guardrails: list[Guardrail] = msgspec.field(default_factory=list)
    masking: list[MaskingRule] = msgspec.field(default_factory=list)
    approvals: list[ApprovalRule] = msgspec.field(default_factory=list)

    def connection(self, name: str) -> Connection | None:
        for c in self.connections:
            if c.name == name:
                return c
        return None

    def effective_workers(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)


# Top-level keys whose values are lists: several files of a policy directory each add entries.
LIST_SECTIONS = (
    "issuers",
    "clients",
    "identities",
    "groups",
    "connections",
    "grants",
    "guardrails",
    "masking",
    "approvals",
)
# Keys read only when the gateway starts; a reload that changes them reports that a restart is needed.
PROCESS_SECTIONS = (
    "listen",
    "data_dir",
    "masking_key_file",
    "workers",
    "tls",
    "limits",
    "shutdown",
    "audit",
    "admin",
)

SECRET_SOURCES = ("password", "password_env", "password_file", "password_ref")


def secret_problems(obj: Any, path: str) -> list[tuple[str, str]]:
    """Exactly one secret source on a credential or client."""
    names = [n for n in SECRET_SOURCES if getattr(obj, n, None) is not None]
    if len(names) != 1:
        allowed = ", ".join(n for n in SECRET_SOURCES if hasattr(obj, n))
        return [(path, f"give exactly one of {allowed}")]
    if names[0] == "password_ref":
        return [
            (
                f"{path}.password_ref",
                "secret-manager references are not resolved by this release yet: "
                "use password_env or password_file",
            )
        ]
    return []


def resolve_secret(obj: Credential | Client) -> str:
    """Reads a secret now (so a rotated secret needs no reload). Raises ``OSError``/``KeyError``
    with a message that names the source, never the value."""
    if obj.password is not None:
        return obj.password
    if obj.password_env is not None:
        value = os.environ.get(obj.password_env)
        if value is None:
            raise KeyError(f"environment variable {obj.password_env} is not set")
        return value
    if obj.password_file is not None:
        try:
            return Path(obj.password_file).read_bytes().decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise OSError(f"{obj.password_file} is not UTF-8 text") from None
    raise KeyError("no password source")


def _not_a_file(path: Path, shown: str) -> str | None:
    """Why ``path`` cannot be read as a file (named ``shown``), or None."""
    if path.is_file():
        return None
    if path.is_dir():
        return f"{shown} is a directory, not a file"
    return f"file {shown} does not exist"


def secret_warnings(cfg: Config) -> list[tuple[str, str]]:
    """Passwords of static clients and upstream credentials that cannot be read now: a missing or
    unreadable ``password_file``, an unset ``password_env``. Valid (secrets are read at each login
    and may appear later), but every login that needs one fails until it can be read; ``serve`` and
    ``policy check`` show these so an operator sees them before the first client does."""
    owners: list[tuple[str, Client | Credential]] = [(f"clients[{i}]", c) for i, c in enumerate(cfg.clients)]
    for i, conn in enumerate(cfg.connections):
        owners.append((f"connections[{i}].upstream", conn.upstream))
        owners += [(f"connections[{i}].credentials.{n}", c) for n, c in conn.credentials.items()]
    out: list[tuple[str, str]] = []
    for where, owner in owners:
        if owner.password_env is not None and owner.password_env not in os.environ:
            problem = f"password_env: environment variable {owner.password_env} is not set"
        elif owner.password_file is not None:
            f = Path(owner.password_file)
            if not f.exists():
                problem = f"password_file: {f} does not exist"
            elif not f.is_file():
                problem = f"password_file: {f} is not a file"
            elif not os.access(f, os.R_OK):
                problem = f"password_file: {f} cannot be read (permissions)"
            else:
                continue
        else:
            continue
        out.append((where, f"{problem}; logins that need this password fail until it is there"))
    return out


def audit_problems(a: Audit) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if a.store == "postgres" and sum(x is not None for x in (a.dsn, a.dsn_env, a.dsn_file)) != 1:
        problems.append(("audit.store", "store: postgres needs exactly one of dsn, dsn_env, dsn_file"))
    if a.store == "sqlite" and any(x is not None for x in (a.dsn, a.dsn_env, a.dsn_file)):
        problems.append(("audit.dsn", "dsn, dsn_env and dsn_file are for store: postgres"))
    for name in ("flush_interval", "checkpoint_interval", "sync_timeout", "store_timeout"):
        if getattr(a, name) <= 0:
            problems.append((f"audit.{name}", "must be positive"))
    if a.max_text < 64:
        problems.append(("audit.max_text", "must be at least 64 bytes"))
    if a.max_pending < 1000:
        problems.append(("audit.max_pending", "must be at least 1000 records"))
    if a.retention_days is not None and a.retention_days <= 0:
        problems.append(("audit.retention_days", "must be positive (leave it out to keep everything)"))
    if a.recordings.max_rows < 0 or a.recordings.max_field < 16:
        problems.append(("audit.recordings", "max_rows must be >= 0 and max_field >= 16"))
    if a.recordings.object_store is not None:
        problems += object_store_problems(a.recordings.object_store, "audit.recordings.object_store")
    seen: set[str] = set()
    for i, e in enumerate(a.exporters):
        problems += exporter_problems(e, f"audit.exporters[{i}]", seen)
    return problems


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def object_store_problems(o: ObjectStore, path: str) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    url = urllib.parse.urlsplit(o.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        problems.append((f"{path}.url", f"{o.url!r} is not an http:// or https:// endpoint"))
    elif url.path not in ("", "/") or url.query or url.fragment or url.username:
        problems.append(
            (f"{path}.url", "give the endpoint only (scheme, host, port): the bucket goes in bucket")
        )
    elif url.scheme == "http" and o.ca is not None:
        problems.append((f"{path}.ca", "ca is for https:// endpoints"))
    if not _BUCKET.match(o.bucket) or ".." in o.bucket:
        problems.append((f"{path}.bucket", f"{o.bucket!r} is not a bucket name (3-63 of a-z, 0-9, '.', '-')"))
    elif not o.path_style and "." in o.bucket and url.scheme == "https":
        problems.append(
            (f"{path}.path_style", "a bucket name with dots needs path_style: true over https (TLS names)")
        )
    if o.prefix.startswith("/") or "//" in o.prefix or "\\" in o.prefix:
        problems.append((f"{path}.prefix", "a key prefix like recordings/ (no leading '/', no '//')"))
    if not o.region:
        problems.append((f"{path}.region", "give the region the signature is for (us-east-1 if unsure)"))
    for key in ("access_key", "secret_key"):
        if (getattr(o, f"{key}_env") is None) == (getattr(o, f"{key}_file") is None):
            problems.append((path, f"give exactly one of {key}_env, {key}_file"))
    if o.timeout <= 0:
        problems.append((f"{path}.timeout", "must be positive"))
    return problems


# The fields each exporter kind reads besides the common ones (name, kind, format, batch, ...).
EXPORTER_FIELDS = {
    "jsonl": ("path",),
    "splunk_hec": ("url", "token_env", "token_file", "index", "ca"),
    "elastic": (
        "url",
        "token_env",
        "token_file",
        "username",
        "password_env",
        "password_file",
        "index",
        "ca",
    ),
    "syslog": ("host", "port", "ca", "server_name"),
}
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def exporter_problems(e: AuditExporter, path: str, seen: set[str]) -> list[tuple[str, str]]:
    from ostiary.audit.records import KINDS

    problems: list[tuple[str, str]] = []
    if not e.name or not set(e.name) <= _NAME_CHARS or e.name[0] in ".-":
        problems.append((f"{path}.name", "use letters, digits, '_', '.' and '-' (it names the cursor file)"))
    elif e.name in seen:
        problems.append((f"{path}.name", f"another exporter is named {e.name}"))
    seen.add(e.name)
    used = EXPORTER_FIELDS[e.kind]
    for field in sorted({f for fields in EXPORTER_FIELDS.values() for f in fields} - set(used)):
        if getattr(e, field) is not None:
            problems.append((f"{path}.{field}", f"not used by kind {e.kind}"))
    if e.kind == "jsonl" and not e.path:
        problems.append((f"{path}.path", 'kind jsonl needs a file path (or "-" for stdout)'))
    if e.kind in ("splunk_hec", "elastic"):
        if not e.url or not e.url.startswith(("http://", "https://")):
            problems.append((f"{path}.url", f"kind {e.kind} needs an http:// or https:// url"))
        elif e.url.startswith("http://") and e.ca:
            problems.append((f"{path}.ca", "ca is for https:// urls"))
        tokens = sum(x is not None for x in (e.token_env, e.token_file))
        passwords = sum(x is not None for x in (e.password_env, e.password_file))
        if e.kind == "splunk_hec" and tokens != 1:
            problems.append((path, "kind splunk_hec needs exactly one of token_env, token_file"))
        if e.kind == "elastic":
            if tokens > 1 or passwords > 1 or (tokens and (passwords or e.username is not None)):
                problems.append(
                    (
                        path,
                        "give an API key (token_env or token_file) or username with password_env "
                        "or password_file, not both",
                    )
                )
            elif (e.username is None) != (passwords == 0):
                problems.append((path, "username needs one of password_env, password_file (and back)"))
    if e.kind == "syslog":
        if not e.host:
            problems.append((f"{path}.host", "kind syslog needs a host"))
        if e.port is not None and not 1 <= e.port <= 65535:
            problems.append((f"{path}.port", f"{e.port} is not a TCP port (1-65535)"))
        if e.transport == "tcp" and (e.ca or e.server_name):
            problems.append((f"{path}.ca", "ca and server_name are for transport: tls"))
    elif e.transport != "tcp":
        problems.append((f"{path}.transport", "transport is for kind syslog"))
    if not 1 <= e.batch <= 10_000:
        problems.append((f"{path}.batch", "must be between 1 and 10000 records"))
    for field in ("interval", "timeout"):
        if getattr(e, field) <= 0:
            problems.append((f"{path}.{field}", "must be positive"))
    if e.kinds is not None:
        unknown = [k for k in e.kinds if k not in KINDS]
        if unknown or not e.kinds:
            problems.append(
                (
                    f"{path}.kinds",
                    f"unknown kind(s) {', '.join(unknown) or '(empty list)'}; known: {', '.join(KINDS)}",
                )
            )
    return problems


def admin_problems(a: Admin, base: Path) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if not 0 <= a.listen.port <= 65535:
        problems.append(("admin.listen.port", f"{a.listen.port} is not a TCP port (0-65535)"))
    if a.tls is not None:
        for field in ("cert", "key"):
            value = getattr(a.tls, field)
            if why := _not_a_file(base / value, value):
                problems.append((f"admin.tls.{field}", why))
    if a.public_url is not None:
        u = urllib.parse.urlsplit(a.public_url)
        if u.scheme not in ("http", "https") or not u.netloc or u.query or u.fragment:
            problems.append(
                (
                    "admin.public_url",
                    "give the base URL approvers open, like https://ostiary.example.com or "
                    "https://gw.example.com/ostiary (no query or fragment)",
                )
            )
    seen: set[str] = set()
    for i, w in enumerate(a.webhooks):
        p = f"admin.webhooks[{i}]"
        if not w.name:
            problems.append((f"{p}.name", "name the webhook (it appears in logs and the audit trail)"))
        elif w.name in seen:
            problems.append((f"{p}.name", f"another webhook is named {w.name}"))
        seen.add(w.name)
        sources = [n for n in ("url", "url_env", "url_file") if getattr(w, n) is not None]
        if len(sources) != 1:
            problems.append((p, "give exactly one of url, url_env, url_file"))
        elif w.url is not None and not w.url.startswith(("http://", "https://")):
            problems.append((f"{p}.url", "must be an http:// or https:// URL"))
        elif w.url is not None and w.url.startswith("http://") and w.ca is not None:
            problems.append((f"{p}.ca", "ca is for https:// urls"))
        if w.url_file is not None and not (base / w.url_file).is_file():
            problems.append((f"{p}.url_file", f"file {w.url_file} does not exist"))
        if w.ca is not None and not (base / w.ca).is_file():
            problems.append((f"{p}.ca", f"file {w.ca} does not exist"))
        if w.timeout <= 0:
            problems.append((f"{p}.timeout", "must be positive (seconds)"))
    return problems


def _check(cfg: Config, base: Path) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if not 0 <= cfg.listen.port <= 65535:
        problems.append(("listen.port", f"{cfg.listen.port} is not a TCP port (0-65535)"))
    if not cfg.listen.backlog >= 1:
        problems.append(("listen.backlog", "must be at least 1 (connections waiting to be accepted)"))
    if cfg.workers < 0:
        problems.append(("workers", "must be 0 (one per core) or a positive number"))
    if cfg.tls is not None:
        for field in ("cert", "key", "client_ca"):
            value = getattr(cfg.tls, field)
            if value is not None and (why := _not_a_file(base / value, value)):
                problems.append((f"tls.{field}", why))
    problems += audit_problems(cfg.audit)
    store = cfg.audit.recordings.object_store
    if store is not None and store.ca is not None and not (base / store.ca).is_file():
        problems.append(("audit.recordings.object_store.ca", f"file {store.ca} does not exist"))
    if cfg.admin is not None:
        problems += admin_problems(cfg.admin, base)
    lim = cfg.limits
    for name in ("max_message", "max_statement", "max_startup"):
        if not getattr(lim, name) >= 1:
            problems.append((f"limits.{name}", "must be a positive number of bytes"))
    if lim.max_statement > lim.max_message:
        problems.append(("limits.max_statement", "cannot exceed limits.max_message"))
    if not lim.startup_timeout > 0:
        problems.append(("limits.startup_timeout", "must be a positive number of seconds"))
    if not lim.max_connections >= 1:
        problems.append(("limits.max_connections", "must be at least 1"))
    if not cfg.shutdown.grace >= 0:
        problems.append(("shutdown.grace", "must be 0 or a positive number of seconds"))
    for i, client in enumerate(cfg.clients):
        problems += secret_problems(client, f"clients[{i}]")
    from ostiary.policy.check import policy_problems

    problems += policy_problems(cfg, base)
    return problems


def _resolve_paths(cfg: Config, base: Path) -> None:
    # Absolute, but symlinks kept: a Kubernetes secret mount swaps its `..data` symlink to rotate
    # certificates, and a path resolved at start would go on naming the old directory.
    root = Path(os.path.abspath(base))

    def fix(p: str | None) -> str | None:
        return None if p is None else str(root / p)

    cfg.data_dir = str(fix(cfg.data_dir))
    cfg.masking_key_file = fix(cfg.masking_key_file)
    cfg.audit.path = fix(cfg.audit.path)
    cfg.audit.dsn_file = fix(cfg.audit.dsn_file)
    cfg.audit.signing_key_file = fix(cfg.audit.signing_key_file)
    store = cfg.audit.recordings.object_store
    if store is not None:
        store.access_key_file, store.secret_key_file = fix(store.access_key_file), fix(store.secret_key_file)
        store.ca = fix(store.ca)
    for exp in cfg.audit.exporters:
        if exp.path != "-":
            exp.path = fix(exp.path)
        exp.token_file, exp.password_file, exp.ca = fix(exp.token_file), fix(exp.password_file), fix(exp.ca)
    if cfg.tls is not None:
        cfg.tls.cert = str(fix(cfg.tls.cert))
        cfg.tls.key = str(fix(cfg.tls.key))
        cfg.tls.client_ca = fix(cfg.tls.client_ca)
    if cfg.admin is not None:
        if cfg.admin.tls is not None:
            cfg.admin.tls.cert = str(fix(cfg.admin.tls.cert))
            cfg.admin.tls.key = str(fix(cfg.admin.tls.key))
        for hook in cfg.admin.webhooks:
            hook.ca, hook.url_file = fix(hook.ca), fix(hook.url_file)
    for conn in cfg.connections:
        t = conn.upstream.tls
        t.ca, t.cert, t.key = fix(t.ca), fix(t.cert), fix(t.key)
        for cred in [conn.upstream, *conn.credentials.values()]:
            cred.password_file = fix(cred.password_file)
    for client in cfg.clients:
        client.password_file = fix(client.password_file)
    for issuer in cfg.issuers:
        issuer.ca = fix(issuer.ca)
        issuer.jwks_file = fix(issuer.jwks_file)


def parse(
    data: Any, source: str = "<config>", base: Path | None = None, marks: Marks | None = None
) -> Config:
    """Validates an already-loaded mapping. Relative paths are taken from ``base``; ``marks`` maps
    paths inside the data to ``file:line`` for messages."""
    base = base or Path.cwd()
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the file must be a YAML mapping; an example:\n" + EXAMPLE)])
    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as e:
        # msgspec stops at the first problem; each section and each item of a list (each value of
        # a mapping) is converted on its own to find them all.
        found = _type_problems(data, Config, "") or [_problem(e, "", Config)]
        raise ConfigError(source, found + _checks_without(data, found, base), marks) from None
    problems = _check(cfg, base)
    if problems:
        raise ConfigError(source, problems, marks)
    _resolve_paths(cfg, base)
    return cfg


def _checks_without(data: dict[str, Any], found: list[tuple[str, str]], base: Path) -> list[tuple[str, str]]:
    """The other checks' problems, so one run lists them all: the values with type problems are
    left out (their defaults stand in) and the rest is checked. Nothing when that still does not
    convert (a required field was wrong)."""
    pruned = copy.deepcopy(data)
    for path, _ in found:
        _drop(pruned, path)
    try:
        cfg = msgspec.convert(pruned, Config)
    except msgspec.ValidationError:
        return []
    bad = {path for path, _ in found}
    return [p for p in _check(cfg, base) if p[0] not in bad]


def _drop(data: Any, path: str) -> None:
    """Removes the value at ``path`` (``grants[0].access``, ``listen.port``) when it is a mapping key."""
    steps = [s for s in re.split(r"\.|(?=\[)", path) if s]
    node = data
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if step.startswith("[") and step.endswith("]") and step[1:-1].isdigit():
            idx = int(step[1:-1])
            if not isinstance(node, list) or idx >= len(node) or last:
                return
            node = node[idx]
        elif isinstance(node, dict) and step in node:
            if last:
                del node[step]
                return
            node = node[step]
        else:
            return


def _problem(e: msgspec.ValidationError, prefix: str, root: Any) -> tuple[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$.listen.port`" as (path, message), the path
    under ``prefix``, with the allowed values of an enum and the fields of an object named."""
    msg, path = str(e), ""
    if " - at `$" in msg:
        msg, _, rest = msg.partition(" - at `$")
        path = rest.rstrip("`")
    full = f"{prefix}{path}".lstrip(".")
    at = _type_at(root, path)
    if msg.startswith("Invalid enum value") and at is not None:
        values = [v for v in _literal_values(at) if isinstance(v, str)]
        if values:
            msg += f" (one of: {', '.join(values)})"
    elif msg.startswith("Object contains unknown field") and at is not None:
        names = _field_names(at)
        if names:
            unknown = msg.rpartition("`")[0].rpartition("`")[2]
            full = f"{full}.{unknown}".lstrip(".")
            close = difflib.get_close_matches(unknown, names, n=1)
            msg += f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(names)})"
    return full, msg


def _members(t: Any) -> list[Any]:
    """The types a hint stands for: the members of a union, else itself."""
    if get_origin(t) in (Union, types.UnionType):
        return [a for a in get_args(t) if a is not type(None)]
    return [t]


def _field_names(t: Any) -> list[str]:
    for m in _members(t):
        if isinstance(m, type) and issubclass(m, msgspec.Struct):
            return [f.encode_name for f in msgspec.structs.fields(m)]
    return []


def _literal_values(t: Any) -> list[Any]:
    return [v for m in _members(t) if get_origin(m) is Literal for v in get_args(m)]


def _type_at(root: Any, path: str) -> Any:
    """The type hint at a msgspec path (``.grants[0].access``, ``[...]`` for a mapping's values)
    under ``root``, or None where it cannot be followed."""
    t = root
    for name, index in re.findall(r"\.([^.\[]+)|(\[[^\]]*\])", path):
        nxt = None
        for m in _members(t):
            if name and isinstance(m, type) and issubclass(m, msgspec.Struct):
                nxt = next((f.type for f in msgspec.structs.fields(m) if f.encode_name == name), None)
            elif index and get_origin(m) in (list, tuple, set, frozenset) and get_args(m):
                nxt = get_args(m)[0]
            elif index and get_origin(m) is dict and len(get_args(m)) == 2:
                nxt = get_args(m)[1]
            if nxt is not None:
                break
        if nxt is None:
            return None
        t = nxt
    return t


def _type_problems(data: Any, t: Any, prefix: str) -> list[tuple[str, str]]:
    """Every type problem of ``data`` against the struct ``t``: each field converted on its own,
    lists item by item and mappings value by value, so that one problem does not hide the others.
    Empty when the parts convert but the whole does not (then the caller reports msgspec's own)."""
    if not (isinstance(t, type) and issubclass(t, msgspec.Struct) and isinstance(data, dict)):
        return []
    problems: list[tuple[str, str]] = []
    fields = {f.encode_name: f.type for f in msgspec.structs.fields(t)}
    for key, value in data.items():
        where = f"{prefix}.{key}"
        if key not in fields:
            try:
                msgspec.convert({key: value}, t)
            except msgspec.ValidationError as e:
                problems.append(_problem(e, prefix, t))
            continue
        ft = fields[key]
        parts: list[tuple[str, Any, Any]] = []
        origin = get_origin(ft)
        if origin is list and isinstance(value, list):
            parts = [(f"{where}[{i}]", item, get_args(ft)[0]) for i, item in enumerate(value)]
        elif origin is dict and isinstance(value, dict):
            parts = [(f"{where}.{k}", item, get_args(ft)[1]) for k, item in value.items()]
        else:
            parts = [(where, value, ft)]
        for at, item, it in parts:
            try:
                msgspec.convert(item, it)
            except msgspec.ValidationError as e:
                inner = [
                    p
                    for m in _members(it)
                    if isinstance(m, type) and issubclass(m, msgspec.Struct)
                    for p in _type_problems(item, m, at)
                ]
                problems.extend(inner or [_problem(e, at, it)])
    return problems


def json_schema() -> str:
    """The JSON Schema of the configuration and policy file (published as deploy/ostiary.schema.json)."""
    import json

    schema = msgspec.json.schema(Config)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Ostiary gateway configuration and policy"
    return json.dumps(schema, indent=2, sort_keys=True)


Marks = dict[str, str]


def _index(node: yaml.Node, path: str, where: str, out: Marks, offsets: dict[str, int]) -> None:
    """Records ``path -> file:line`` for every mapping value and sequence item under ``node``."""
    out.setdefault(path, f"{where}:{node.start_mark.line + 1}")
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                child = f"{path}.{key.value}" if path else str(key.value)
                out.setdefault(child, f"{where}:{key.start_mark.line + 1}")
                _index(value, child, where, out, offsets)
    elif isinstance(node, yaml.SequenceNode):
        shift = offsets.get(path, 0)
        for i, item in enumerate(node.value):
            _index(item, f"{path}[{i + shift}]", where, out, offsets)


def _read_yaml(p: Path) -> tuple[Any, yaml.Node | None, bytes]:
    """One file's data, its node tree (for marks) and its bytes (for the policy version), read once
    so the version is that of what was parsed. The file must be UTF-8 (YAML's encoding)."""
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), [("", f"cannot read the file: {e.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1
        line, column = raw.count(b"\n", 0, e.start) + 1, len(raw[start : e.start].decode("utf-8")) + 1
        problem = f"not UTF-8: byte 0x{raw[e.start]:02x} (offset {e.start}); save the file as UTF-8"
        raise ConfigError(str(p), [(f"line {line}, column {column}", problem)]) from None
    try:
        data, node = yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(str(p), [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    if node is not None and (dups := _duplicate_keys(node, "")):
        raise ConfigError(str(p), dups)
    return data, node, raw


def _duplicate_keys(node: yaml.Node, path: str) -> list[tuple[str, str]]:
    """Keys given twice in one mapping: YAML loaders keep the last silently (`access: read-only`
    then `access: read-write` would grant writes), so each is a problem, with both lines."""
    out: list[tuple[str, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                child = f"{path}.{key.value}" if path else str(key.value)
                line = key.start_mark.line + 1
                if key.value in seen:
                    out.append(
                        (f"line {line}", f"{child} is given twice (also on line {seen[key.value]}): keep one")
                    )
                else:
                    seen[key.value] = line
                out += _duplicate_keys(value, child)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(item, f"{path}[{i}]")
    return out


def policy_files(path: Path) -> list[Path]:
    """The files a policy path stands for: itself, or a directory's *.yaml and *.yml, sorted."""
    if path.is_dir():
        return sorted(q for q in path.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file())
    return [path]


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Marks, bytes]:
    """Reads a file or a directory of files into one mapping. In a directory, list sections
    (``grants``, ...) are concatenated in file-name order and any other key may appear in one file
    only. Returns the data, the marks and the raw bytes of every file (for the policy version)."""
    p = Path(path)
    files = policy_files(p)
    if not files:
        raise ConfigError(str(p), [("", "the directory holds no .yaml or .yml files")])
    merged: dict[str, Any] = {}
    marks: Marks = {}
    owner: dict[str, Path] = {}
    raw = b""
    problems: list[tuple[str, str]] = []
    for f in files:
        data, node, content = _read_yaml(f)
        raw += f.name.encode() + b"\0" + content + b"\0"
        if data is None:
            continue
        if not isinstance(data, dict):
            problems.append((str(f), "the file must be a YAML mapping"))
            continue
        offsets = {k: len(merged[k]) for k in LIST_SECTIONS if isinstance(merged.get(k), list)}
        if node is not None:
            _index(node, "", str(f), marks, offsets)
        for key, value in data.items():
            if key in LIST_SECTIONS and isinstance(value, list) and isinstance(merged.get(key, []), list):
                merged.setdefault(key, []).extend(value)
            elif key in merged:
                problems.append((str(key), f"defined in both {owner[key]} and {f}"))
            else:
                merged[key] = value
            owner.setdefault(key, f)
    if problems:
        raise ConfigError(str(p), problems, marks)
    return merged, marks, raw


def load(path: str | os.PathLike[str]) -> Config:
    """Loads and validates a file or directory. Raises ``ConfigError`` with every problem."""
    p = Path(path)
    data, marks, _ = read(p)
    return parse(data, str(p), p if p.is_dir() else p.parent, marks)
