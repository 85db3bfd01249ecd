"""The policy language: msgspec structs that parse the policy file.

Rules of this module: structs only, with defaults a production gateway would want, and a docstring
on every struct saying what it means (they become the descriptions in the published JSON Schema).
No I/O, no validation beyond types: cross-references and values are checked in ``policy.load``.
Durations are seconds. Globs use ``*`` (any characters, ``/`` included), ``?`` and ``[...]``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# Asymmetric JWS algorithms only: "none" and HMAC (HS*) are never accepted.
Algorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
ALGORITHMS: tuple[str, ...] = Algorithm.__args__  # type: ignore[attr-defined]

Preset = Literal["github-actions", "gitlab", "google", "kubernetes", "spiffe"]

StatementKind = Literal[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "copy-to",
    "copy-from",
    "create",
    "alter",
    "drop",
    "truncate",
    "grant",
    "revoke",
    "set",
    "reset",
    "transaction",
    "call",
    "do",
    "prepare",
    "execute",
    "explain",
    "show",
    "session",
    "utility",
]
STATEMENT_KINDS: tuple[str, ...] = StatementKind.__args__  # type: ignore[attr-defined]
READ_ONLY_KINDS = frozenset(
    {"select", "copy-to", "set", "reset", "transaction", "explain", "prepare", "execute", "show", "session"}
)

# What a statement can do that no kind names (reported by the SQL analyzer).
Effect = Literal[
    "read-only-change",  # BEGIN/SET ... READ WRITE, SET default_transaction_read_only, set_config
    "role-change",  # SET ROLE, SET SESSION AUTHORIZATION
    "privileges",  # CREATE/ALTER ROLE, REASSIGN OWNED
    "program",  # COPY ... PROGRAM
    "server-files",  # COPY to/from a server file, lo_export, pg_read_file ...
    "server-control",  # pg_terminate_backend, pg_reload_conf, ALTER SYSTEM, LOAD ...
    "remote",  # dblink
    "code",  # CREATE FUNCTION / RULE / TRIGGER / VIEW
    "config-change",  # set_config
    "lexer-change",  # standard_conforming_strings off: statements would no longer mean what analysis says
    "search-path-change",  # SET search_path, set_config('search_path'): unqualified names move
    "dynamic-sql",  # query_to_xml, table_to_xml, ts_stat ...: read what their text or regclass names
    "runs-sql",  # query_to_xml, ts_stat, ts_rewrite: run the SQL text they are given (as DO does)
    "large-object-write",  # lo_create, lo_from_bytea, lo_put ... (read-only transactions allow them)
    "sequence-write",  # nextval, setval
    "unnamed-relations",  # TRUNCATE/DROP ... CASCADE, DROP OWNED, REASSIGN OWNED: relations named nowhere
    "row-lock",  # SELECT ... FOR UPDATE / SHARE
]
# Effects a read-only grant refuses, whatever the statement's kinds.
READ_ONLY_DENIED_EFFECTS = frozenset(
    {
        "read-only-change",
        "privileges",
        "program",
        "server-files",
        "server-control",
        "remote",
        "code",
        "runs-sql",
        "large-object-write",
        "sequence-write",
        "row-lock",
    }
)


class Issuer(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A trusted token issuer. With a ``preset``, only ``name`` and ``audiences`` are usually needed
    (plus ``issuer`` for GitLab self-managed, Kubernetes and SPIFFE, whose URLs differ per install).

    Keys come from exactly one of: ``jwks_url`` (HTTPS), OpenID discovery (``discovery: true``, the
    default when no other source is given: ``{issuer}/.well-known/openid-configuration``), or
    ``jwks_file`` (a JWKS document on disk, for air-gapped clusters)."""

    name: str
    preset: Preset | None = None
    issuer: str | None = None
    audiences: list[str] = msgspec.field(default_factory=list)
    algorithms: list[str] | None = None  # a subset of ALGORITHMS; the preset's when omitted
    jwks_url: str | None = None
    jwks_file: str | None = None
    discovery: bool | None = None
    ca: str | None = None  # CA bundle for the HTTPS fetches; system roots when omitted
    clock_skew: float = 60.0
    max_lifetime: float | None = None  # longest exp - min(iat, nbf); the preset's when omitted
    required_claims: list[str] = msgspec.field(default_factory=list)
    reject_reused_jti: bool = False
    name_claim: str | None = None  # the claim that names the identity; "sub" unless the preset says
    jwks_ttl: float = 600.0  # refresh the keys this often
    jwks_max_stale: float = 3600.0  # while the issuer is unreachable, last good keys work this long
    jwks_refresh_min_interval: float = 30.0  # rate limit of refreshes triggered by an unknown kid
    fetch_timeout: float = 10.0


class IdentityMatcher(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A named set of workloads: those authenticated by ``issuer`` (an issuer's name, ``certificate``
    for client certificates, ``password`` for static clients) whose attributes match every entry of
    ``match`` (attribute -> exact value or glob; a list means any of them)."""

    name: str
    issuer: str
    match: dict[str, str | list[str]] = msgspec.field(default_factory=dict)


class Group(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A name for several identities (or other groups)."""

    name: str
    members: list[str]


class UpstreamTls(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """TLS towards the server, with libpq's sslmode names."""

    mode: Literal["disable", "require", "verify-full"] = "disable"
    ca: str | None = None
    server_name: str | None = None
    cert: str | None = None
    key: str | None = None


class Credential(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An upstream database role and where its secret comes from: exactly one of ``password_env``,
    ``password_file``, ``password_ref`` (a secret-manager reference such as
    ``gcp-sm://projects/p/secrets/s/versions/latest``; resolving those is not built yet) or
    ``password`` (inline, for demos only)."""

    user: str
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    password_ref: str | None = None


UpstreamAuth = Literal["none", "password", "md5", "scram-sha-256"]


class Upstream(Credential, forbid_unknown_fields=True, kw_only=True):
    """Where the server is, and the default credential sessions use. ``require_auth`` (libpq's
    option of that name) lists the authentication methods the server may ask for; empty: any
    (``none`` is a server that asks for no password). ``connect_timeout`` bounds the connection and
    login together."""

    host: str
    port: int = 5432
    database: str
    tls: UpstreamTls = msgspec.field(default_factory=UpstreamTls)
    require_auth: list[UpstreamAuth] = msgspec.field(default_factory=list)
    connect_timeout: float = 10.0


class Connection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A database the gateway fronts; clients select it by name (their ``dbname``).
    ``credentials`` are further upstream roles that grants can choose by name (a reader grant uses a
    reader role). Tokens travel as passwords, so clients must use TLS unless ``allow_plaintext``.
    ``guardrails`` apply to every session on the connection, before the grant's own; ``masking``
    rules mask every session's results, with the grant's own, unless the grant is
    ``masking_exempt``."""

    name: str
    upstream: Upstream
    protocol: Literal["postgresql"] = "postgresql"
    credentials: dict[str, Credential] = msgspec.field(default_factory=dict)
    allow_plaintext: bool = False
    guardrails: list[str] = msgspec.field(default_factory=list)
    masking: list[str] = msgspec.field(default_factory=list)


class Window(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A weekly time window: ``days`` (mon..sun), ``start``/``end`` as HH:MM in ``timezone``.
    An ``end`` before ``start`` crosses midnight."""

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = msgspec.field(
        default_factory=lambda: ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    )
    start: str = "00:00"
    end: str = "24:00"
    timezone: str = "UTC"


class Grant(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Who (identities and groups, by name) may use which connection, and how.

    ``access`` read-only makes the upstream session read-only too. ``credential`` names one of the
    connection's ``credentials`` (the connection's upstream user when omitted). ``statements`` and
    ``relations`` narrow what SQL may run, ``guardrails``/``masking``/``approvals`` attach rules by
    name. ``max_session`` ends sessions after that many seconds; ``windows`` and ``networks``
    restrict when and from where a session may start. Statements the SQL analysis cannot parse are
    refused unless ``allow_unparsed``. ``masking_exempt`` lifts the connection's masking rules
    (a break-glass grant; pair it with approvals)."""

    name: str
    identities: list[str]
    connection: str
    access: Literal["read-only", "read-write"] = "read-only"
    credential: str | None = None
    statements: list[StatementKind] | None = None
    relations: list[str] | None = None
    guardrails: list[str] = msgspec.field(default_factory=list)
    masking: list[str] = msgspec.field(default_factory=list)
    masking_exempt: bool = False
    approvals: list[str] = msgspec.field(default_factory=list)
    max_session: float | None = None
    windows: list[Window] = msgspec.field(default_factory=list)
    networks: list[str] = msgspec.field(default_factory=list)
    allow_unparsed: bool = False


class StatementMatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a rule applies to; every given field must match (kinds, relation globs, functions,
    effects, and an RE2 ``pattern`` over the statement text as a last resort)."""

    kinds: list[StatementKind] = msgspec.field(default_factory=list)
    relations: list[str] = msgspec.field(default_factory=list)
    functions: list[str] = msgspec.field(default_factory=list)
    effects: list[Effect] = msgspec.field(default_factory=list)
    pattern: str | None = None
    without_where: bool = False


class Guardrail(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A statement rule: ``deny`` or ``allow`` statements that ``match``, telling the client
    ``message``. Shipped packs (``read-only``, ``no-destructive-ddl``, ``no-unbounded-writes``,
    ``no-privilege-changes``) can be named in grants without defining them."""

    name: str
    action: Literal["deny", "allow"] = "deny"
    match: StatementMatch = msgspec.field(default_factory=StatementMatch)
    message: str = ""


Detector = Literal[
    "card",
    "email",
    "ssn",
    "iban",
    "phone",
    "ipv4",
    "ipv6",
    "jwt",
    "gcp_private_key",
    "aws_access_key",
    "aws_secret_key",
    "api_key",
]
DETECTORS: tuple[str, ...] = Detector.__args__  # type: ignore[attr-defined]


class MaskingRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Masks values in results. What: whole values of ``columns`` (globs: ``column``,
    ``table.column`` or ``schema.table.column``; found through the catalog, so aliases do not
    escape them) and/or what the built-in ``detectors`` or the RE2 ``pattern`` find anywhere in
    a value (``validator``: luhn, mod97, ssn, ipv4 or jwt confirms a pattern's match). How:
    ``strategy`` redact (``replacement``), mask (same length in ``mask_char``), partial (keep the
    last ``keep_last`` characters, or an email's domain with ``keep_domain``), hash (keyed
    HMAC-SHA-256, stable, so masked values still join) or null."""

    name: str
    columns: list[str] = msgspec.field(default_factory=list)
    detectors: list[Detector] = msgspec.field(default_factory=list)
    pattern: str | None = None
    validator: Literal["luhn", "mod97", "ssn", "ipv4", "jwt"] | None = None
    strategy: Literal["redact", "mask", "partial", "hash", "null"] = "redact"
    replacement: str = "****"
    mask_char: str = "*"
    keep_last: int = 4
    keep_domain: bool = False


class ApprovalRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Holds statements that ``match`` until ``required`` of the ``approvers`` (identities or
    groups, each logged in with their own token) approve, up to ``timeout`` seconds, after which
    they are refused. The requester never approves their own request. ``scope: statement``
    approves the one statement held (its text and parameters); ``scope: grant`` lets the requester
    run statements this rule matches on the same connection and grant for ``grant_minutes``."""

    name: str
    match: StatementMatch = msgspec.field(default_factory=StatementMatch)
    approvers: list[str] = msgspec.field(default_factory=list)
    required: int = 1
    timeout: float = 900.0
    scope: Literal["statement", "grant"] = "statement"
    grant_minutes: float = 60.0
