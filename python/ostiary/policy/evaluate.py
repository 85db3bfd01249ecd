"""Pure policy evaluation: who may open which session, under which grant, and what a statement may do.

Rules of this module: no I/O, no clock (callers pass ``now``), no trio. ``CompiledPolicy`` is built once
per policy version; ``CompiledPolicy.admit`` runs once per session start and returns a ``Verdict``
carrying the chain of rules behind it (what ``ostiary policy explain`` prints); ``SessionPolicy`` is
compiled once per session, so a statement decision is a few set lookups and one precompiled pattern
per rule, never a walk over all grants.

Semantics, in order:
1. An identity is *named* by every identity matcher whose issuer is the identity's and whose ``match``
   entries all hold (exact value or glob; a list means any), by the static client of its user name,
   and by every group containing one of those names (transitively).
2. The grants for the requested connection that name one of those names are the candidates; a
   candidate applies when the peer's address is in its ``networks`` (if any) and ``now`` is inside
   one of its ``windows`` (if any).
3. One grant governs a session. When the client's user name is the name of an applying grant, that
   grant; otherwise the only applying grant; several applying grants without a choice are refused
   (the client picks with ``user=GRANT``), and so is a grant whose rules this release cannot enforce.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import re2

from ostiary.identity import Identity, printable
from ostiary.policy.globs import glob_to_re2
from ostiary.policy.masking import ColumnGlob, SessionMasking, compile_rules
from ostiary.policy.model import (
    READ_ONLY_DENIED_EFFECTS,
    READ_ONLY_KINDS,
    ApprovalRule,
    Connection,
    Grant,
    Guardrail,
    IdentityMatcher,
    MaskingRule,
    StatementMatch,
    Window,
)
from ostiary.policy.packs import PACKS

if TYPE_CHECKING:
    from ostiary.config import Config

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# Grant fields whose enforcement has not landed yet: a grant that uses them is refused at login.
PENDING_FIELDS: tuple[str, ...] = ()


def policy_version(raw: bytes) -> str:
    """The version of a policy: sha256 of the files' names and bytes, shown in logs and audit."""
    return hashlib.sha256(raw).hexdigest()


def _values_pattern(values: list[str]) -> str:
    return "|".join(f"(?:{glob_to_re2(v)})" for v in values)


class _Matcher:
    """One identity matcher. ``check`` explains itself (for ``policy explain`` and refusals); the
    fast path is ``_MatcherIndex``, which uses the same patterns."""

    def __init__(self, m: IdentityMatcher) -> None:
        self.name = m.name
        self.issuer = m.issuer
        self.tests: list[tuple[str, Any, str]] = []
        for key, value in m.match.items():
            values = value if isinstance(value, list) else [value]
            compiled = re2.compile(_values_pattern(values))
            self.tests.append((key, compiled, " or ".join(repr(v) for v in values)))

    def check(self, identity: Identity) -> tuple[bool, str]:
        """Whether it matches, and why (or why not)."""
        if identity.issuer != self.issuer:
            return False, f"issuer is {identity.issuer!r}, this identity needs {self.issuer!r}"
        for key, compiled, shown in self.tests:
            values = identity.values_of(key)
            if not values:
                return False, f"no attribute {key!r} (expected {shown})"
            if not any(compiled.fullmatch(v) is not None for v in values):
                held = values[0] if len(values) == 1 else " nor ".join(repr(v) for v in values)
                return False, f"{key} is {held!r}, expected {shown}" if len(values) == 1 else (
                    f"{key} is {held}, expected {shown}"
                )
        held = ", ".join(f"{k}={identity.attributes[k]!r}" for k, *_ in self.tests)
        return True, held or "every identity of this issuer"


class _MatcherIndex:
    """All matchers of one issuer, evaluated together: per attribute, one RE2 set of every
    matcher's pattern for it, so an identity costs one set match per attribute named in the policy
    (not one regex per matcher). A matcher matches when all its attributes' patterns do."""

    def __init__(self, matchers: list[_Matcher]) -> None:
        self.matchers = matchers
        self.needed = [len(m.tests) for m in matchers]
        self.sets: list[tuple[str, Any, list[int]]] = []
        by_key: dict[str, list[tuple[int, str]]] = {}
        for i, m in enumerate(matchers):
            for key, compiled, _ in m.tests:
                by_key.setdefault(key, []).append((i, compiled.pattern))
        for key, entries in by_key.items():
            s = re2.Set.FullMatchSet()
            owners = []
            for i, pattern in entries:
                s.Add(pattern)
                owners.append(i)
            s.Compile()
            self.sets.append((key, s, owners))

    def names(self, identity: Identity) -> list[str]:
        hits = [0] * len(self.matchers)
        for key, s, owners in self.sets:
            values = identity.values_of(key)
            matched: set[int] = set()
            for value in values:  # a matcher's test holds when one of the values matches it
                matched.update(s.Match(value) or ())  # None when nothing matches
            for j in matched:
                hits[owners[j]] += 1
        return [m.name for m, h, n in zip(self.matchers, hits, self.needed, strict=True) if h == n]


@dataclass(frozen=True)
class Verdict:
    """The outcome of a session start. ``grant`` is None when refused; ``code`` is the SQLSTATE."""

    grant: Grant | None
    chain: tuple[str, ...]
    reason: str = ""
    code: str = "28000"

    @property
    def allowed(self) -> bool:
        return self.grant is not None


def _in_window(w: Window, now: dt.datetime) -> bool:
    local = now.astimezone(zoneinfo.ZoneInfo(w.timezone))
    minutes = local.hour * 60 + local.minute
    start = int(w.start[:2]) * 60 + int(w.start[3:])
    end = int(w.end[:2]) * 60 + int(w.end[3:])
    day = DAYS[local.weekday()]
    if start <= end:
        return day in w.days and start <= minutes < end
    # Crosses midnight: the part after midnight belongs to the previous day's window.
    yesterday = DAYS[(local.weekday() - 1) % 7]
    return (day in w.days and minutes >= start) or (yesterday in w.days and minutes < end)


def _ignore(_: str) -> None:
    pass


class CompiledPolicy:
    """A policy version ready for evaluation. Build with ``CompiledPolicy(config, version)``."""

    def __init__(self, cfg: Config, version: str = "", mask_key: bytes = b"") -> None:
        self.config = cfg
        self.version = version
        # The gateway's secret for keyed-hash masking (read by the caller: this module does no I/O).
        self.mask_key = mask_key
        self._maskings: dict[tuple[str, ...], SessionMasking] = {}
        self.matchers = [_Matcher(m) for m in cfg.identities]
        by_issuer: dict[str, list[_Matcher]] = {}
        for m in self.matchers:
            by_issuer.setdefault(m.issuer, []).append(m)
        self._index = {issuer: _MatcherIndex(ms) for issuer, ms in by_issuer.items()}
        self.clients = {c.user for c in cfg.clients}
        self.groups = {g.name: list(g.members) for g in cfg.groups}
        self.grants_by_connection: dict[str, list[Grant]] = {}
        for g in cfg.grants:
            self.grants_by_connection.setdefault(g.connection, []).append(g)
        self.grants = {g.name: g for g in cfg.grants}
        self._networks = {
            g.name: [ipaddress.ip_network(n, strict=False) for n in g.networks] for g in cfg.grants
        }

    def names_of(self, identity: Identity, chain: list[str] | None = None) -> set[str]:
        """Every identity, client and group name the identity carries."""
        names: set[str] = set()
        if chain is None:
            index = self._index.get(identity.issuer)
            if index is not None:
                names.update(index.names(identity))
        else:
            for m in self.matchers:
                ok, why = m.check(identity)
                if ok:
                    names.add(m.name)
                chain.append(f"{'matches' if ok else 'does not match'} identity {m.name!r}: {why}")
        if identity.issuer == "password" and identity.name in self.clients:
            names.add(identity.name)
            if chain is not None:
                chain.append(f"is static client {identity.name!r}")
        changed = True
        while changed:
            changed = False
            for group, members in self.groups.items():
                if group not in names and names.intersection(members):
                    names.add(group)
                    changed = True
                    if chain is not None:
                        chain.append(f"is in group {group!r}")
        return names

    def admit(
        self,
        identity: Identity,
        connection: str,
        *,
        user: str | None = None,
        peer: str | None = None,
        now: dt.datetime,
        trace: bool = False,
        enforceable_only: bool = True,
    ) -> Verdict:
        """Decides a session start. ``peer`` is the client's IP address (no port). With ``trace``
        the verdict carries the chain of rules behind it (slower: every matcher explains itself).
        ``enforceable_only=False`` admits grants whose statement rules the data path cannot enforce
        yet (for ``policy explain --statement`` only)."""
        chain: list[str] | None = None
        if trace:
            chain = [f"identity {identity.name!r} (issuer {identity.issuer!r}, {identity.method})"]
        names = self.names_of(identity, chain)
        note = chain.append if chain is not None else _ignore
        if not names:
            note("no identity, client or group of the policy names it")
        candidates = [g for g in self.grants_by_connection.get(connection, []) if names & set(g.identities)]
        applying: list[Grant] = []
        addr = None
        if peer:
            try:
                addr = ipaddress.ip_address(peer)
            except ValueError:
                addr = None
        for g in candidates:
            nets = self._networks[g.name]
            if nets and (addr is None or not any(addr in n for n in nets)):
                note(f"grant {g.name!r}: skipped, {peer or 'the client'} is outside its networks")
                continue
            if g.windows and not any(_in_window(w, now) for w in g.windows):
                note(f"grant {g.name!r}: skipped, {now:%a %H:%M %Z} is outside its time windows")
                continue
            via = ", ".join(sorted(names & set(g.identities)))
            note(f"grant {g.name!r} applies (via {via}): {g.access} on {connection!r}")
            applying.append(g)
        if not applying:
            if not candidates:
                note(f"no grant on connection {connection!r} names this identity")
            reason = f'no grant lets "{printable(identity.name)}" use connection "{connection}"'
            return Verdict(None, tuple(chain or ()), reason, "28000")
        chosen: Grant | None = None
        if len(applying) > 1:
            chosen = next((g for g in applying if g.name == user), None)
            if chosen is None:
                options = ", ".join(g.name for g in applying)
                reason = f"several grants apply ({options}): choose one with user=<grant name>"
                note(f"refused: {reason}")
                return Verdict(None, tuple(chain or ()), reason, "28000")
        else:
            chosen = applying[0]
        pending = [f for f in PENDING_FIELDS if getattr(chosen, f) not in (None, [])]
        if pending and enforceable_only:
            reason = (
                f"grant {chosen.name!r} has {', '.join(pending)} rules, which this gateway cannot enforce "
                "yet, so it refuses the session"
            )
            note(f"refused: {reason}")
            return Verdict(None, tuple(chain or ()), reason, "28000")
        note(f"allowed under grant {chosen.name!r}")
        return Verdict(chosen, tuple(chain or ()), "", "")

    def compile_session(self, grant: Grant) -> SessionPolicy:
        return SessionPolicy(self, grant)

    def masking_rules(self, grant: Grant) -> list[MaskingRule]:
        """The masking rules of a session under ``grant``: its connection's, unless the grant is
        exempt, then its own; each once."""
        conn = self.config.connection(grant.connection)
        names = [*([] if grant.masking_exempt or conn is None else conn.masking), *grant.masking]
        defined = {m.name: m for m in self.config.masking}
        return [defined[n] for n in dict.fromkeys(names) if n in defined]

    def masking(self, grant: Grant) -> SessionMasking | None:
        """The compiled masking of ``grant``'s sessions (shared by all of them), None without rules."""
        rules = self.masking_rules(grant)
        if not rules:
            return None
        key = tuple(r.name for r in rules)
        compiled = self._maskings.get(key)
        if compiled is None:
            compiled = self._maskings[key] = compile_rules(rules, self.mask_key)
        return compiled

    def grant_terms(self, name: str) -> tuple[Any, ...] | None:
        """Everything a session under grant ``name`` depends on (the grant, its connection, the
        guardrails, masking and approval rules it names): when these differ between two versions,
        its sessions must reconnect."""
        g = self.grants.get(name)
        if g is None:
            return None
        defined = {r.name: r for r in self.config.guardrails}
        conn = self.config.connection(g.connection)
        names = [*(conn.guardrails if conn is not None else []), *g.guardrails]
        held = {a.name: a for a in self.config.approvals}
        return (
            g,
            session_terms(conn),
            tuple(defined.get(r) for r in names),
            tuple(self.masking_rules(g)),
            tuple(held.get(n) for n in g.approvals),
        )

    def grant_still_applies(
        self, identity: Identity, connection: str, grant_name: str, *, peer: str | None, now: dt.datetime
    ) -> bool:
        """For live sessions after a reload: does the same grant still admit this identity?"""
        verdict = self.admit(identity, connection, user=grant_name, peer=peer, now=now)
        return verdict.grant is not None and verdict.grant.name == grant_name


# Effects that read relations the statement does not name: relation and column rules cannot see
# what they read (a relation named in text, another connection, a relation's file on the server).
READS_UNSEEN = frozenset({"dynamic-sql", "remote", "server-files"})


def session_terms(conn: Connection | None) -> dict[str, Any] | None:
    """What of a connection an established session depends on, by name: where it leads, over
    which TLS, as which roles, under which rules. Not what only a login uses (``connect_timeout``,
    ``require_auth``) nor where the upstream password is read from: rotating that password, or
    moving it to a file, must not end every session. ``policy diff`` names the parts that differ."""
    if conn is None:
        return None
    up = conn.upstream
    return {
        "where it leads": f"{up.user}@{up.host}:{up.port}/{up.database}",
        "upstream TLS": up.tls,
        "roles": dict(sorted((name, c.user) for name, c in conn.credentials.items())),
        "plaintext clients": conn.allow_plaintext,
        "guardrails": list(conn.guardrails),
        "masking": list(conn.masking),
    }


@dataclass(frozen=True)
class StatementAnalysis:
    """What a statement does, as the SQL analyzer reports it (kinds of every sub-statement,
    relations read and written as ``schema.table``, functions called, UPDATE/DELETE without WHERE)."""

    kinds: frozenset[str]
    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    unbounded_write: bool = False
    text: str = ""
    effects: frozenset[str] = frozenset()
    literal_sensitive: bool = False
    # Column references whose values leave without their origin, relations used as whole rows
    # (what column masking rules cannot follow; ostiary_sql::columns).
    derived_columns: frozenset[str] = frozenset()
    whole_rows: frozenset[str] = frozenset()

    @staticmethod
    def of(sql: str) -> list[StatementAnalysis]:
        """Every statement of ``sql``, analysed by PostgreSQL's parser (``_core.analyze_sql``).
        Raises ``ostiary.errors.SqlError`` when the text does not parse."""
        from ostiary import _core

        raw = sql.encode()
        out = []
        for d in _core.analyze_sql(sql):
            out.append(
                StatementAnalysis(
                    kinds=frozenset(d["kinds"]),
                    reads=frozenset(d["reads"]),
                    writes=frozenset(d["writes"]),
                    functions=frozenset(d["functions"]),
                    unbounded_write=d["unbounded_write"],
                    text=raw[d["start"] : d["start"] + d["len"]].decode(errors="replace").strip(),
                    effects=frozenset(d["effects"]),
                    literal_sensitive=d["literal_sensitive"],
                    derived_columns=frozenset(d["derived_columns"]),
                    whole_rows=frozenset(d["whole_rows"]),
                )
            )
        return out


@dataclass(frozen=True)
class StatementDecision:
    allow: bool
    rule: str = ""
    message: str = ""
    chain: tuple[str, ...] = field(default_factory=tuple)
    # Whether the verdict holds for every text of the statement's shape (constants played no part).
    by_shape: bool = True
    # The SQLSTATE of a refusal: 42501, or 42601 for text that does not parse (as the server's).
    code: str = "42501"


class _Rule:
    """One guardrail (or approval) rule's match. ``schemas``: for rules that refuse or hold, the
    schemas an unqualified relation name can resolve to under the pinned default search_path
    (``public`` and the login role's own); such a name then also matches as ``schema.name`` for
    each, so `public.*` covers `accounts`. Allow rules match names as written (matching more
    would let more through)."""

    def __init__(
        self, g: Guardrail, schemas: tuple[str, ...] = (), views: dict[str, frozenset[str]] | None = None
    ) -> None:
        self.name = g.name
        self.deny = g.action == "deny"
        self.schemas = schemas
        # Views of the database (schema.view -> the relations under it, views of views followed),
        # filled from the catalog when the session starts: a rule that refuses or holds
        # public.orders also sees a write through a view over it, whatever the view is called.
        self.views = views if views is not None else {}
        self.message = g.message or f"denied by rule {g.name}"
        m: StatementMatch = g.match
        self.kinds = frozenset(m.kinds)
        self.relations = _union(m.relations)
        self.functions = frozenset(f.lower() for f in m.functions)
        self.effects = frozenset(m.effects)
        self.without_where = m.without_where
        self.pattern = re2.compile(m.pattern) if m.pattern is not None else None

    def matches(self, a: StatementAnalysis) -> bool:
        if self.kinds and not (self.kinds & a.kinds):
            # A rule on writes that refuses or holds relations also takes what changes those
            # relations' rows or where writes to them land: TRUNCATE, DROP, and ALTER (SET SCHEMA,
            # INHERIT, ATTACH PARTITION, a cascading foreign key, ALTER COLUMN TYPE ... USING, a
            # view renamed) of a relation it covers, named anywhere in the statement.
            if not (
                self.schemas
                and self.relations is not None
                and self.kinds & WRITE_KINDS
                and a.kinds & STRUCTURAL_KINDS
                and any(self.relations.fullmatch(r) for r in self._names(a, structural=True))
            ):
                return False
            return self._rest(a)
        if self.relations is not None and not any(self.relations.fullmatch(r) for r in self._names(a)):
            return False
        return self._rest(a)

    def _rest(self, a: StatementAnalysis) -> bool:
        if self.functions and not (self.functions & _function_names(a.functions)):
            return False
        if self.effects and not (self.effects & a.effects):
            return False
        if self.without_where and not a.unbounded_write:
            return False
        return not (self.pattern is not None and not self.pattern.search(a.text))

    def _names(self, a: StatementAnalysis, *, structural: bool = False) -> Iterable[str]:
        yield from self._variants(a.reads | a.writes)
        # A write through a view writes the relations under it, and so does an ALTER of the view
        # (renamed, it would leave the map read at session start). Reads through a view are what
        # its owner chose to show, as PostgreSQL's privileges treat them.
        through = (a.reads | a.writes) if structural else a.writes
        if self.schemas and self.views and through:
            bases: set[str] = set()
            for r in self._variants(through):
                bases.update(self.views.get(r, ()))
            yield from self._variants(bases)

    def _variants(self, names: Iterable[str]) -> Iterable[str]:
        for r in names:
            yield r
            if "." not in r:
                for schema in self.schemas:
                    yield f"{schema}.{r}"
            elif self.schemas:
                # Deny and hold rules (those with pinned schemas) fail closed: a glob written
                # without a schema (accounts) or without the database (public.accounts) also
                # holds public.accounts and app.public.accounts.
                parts = r.split(".")
                for i in range(1, len(parts)):
                    yield ".".join(parts[i:])


# Relations of pg_catalog (PostgreSQL 13 to 18): an unqualified name among them resolves there
# (pg_catalog is searched first, and search_path is pinned under relation rules).
PG_CATALOG_RELATIONS = frozenset(
    {
        "pg_aggregate",
        "pg_aios",
        "pg_am",
        "pg_amop",
        "pg_amproc",
        "pg_attrdef",
        "pg_attribute",
        "pg_auth_members",
        "pg_authid",
        "pg_available_extension_versions",
        "pg_available_extensions",
        "pg_backend_memory_contexts",
        "pg_cast",
        "pg_class",
        "pg_collation",
        "pg_config",
        "pg_constraint",
        "pg_conversion",
        "pg_cursors",
        "pg_database",
        "pg_db_role_setting",
        "pg_default_acl",
        "pg_depend",
        "pg_description",
        "pg_enum",
        "pg_event_trigger",
        "pg_extension",
        "pg_file_settings",
        "pg_foreign_data_wrapper",
        "pg_foreign_server",
        "pg_foreign_table",
        "pg_group",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        "pg_index",
        "pg_indexes",
        "pg_inherits",
        "pg_init_privs",
        "pg_language",
        "pg_largeobject",
        "pg_largeobject_metadata",
        "pg_locks",
        "pg_matviews",
        "pg_namespace",
        "pg_opclass",
        "pg_operator",
        "pg_opfamily",
        "pg_parameter_acl",
        "pg_partitioned_table",
        "pg_policies",
        "pg_policy",
        "pg_prepared_statements",
        "pg_prepared_xacts",
        "pg_proc",
        "pg_publication",
        "pg_publication_namespace",
        "pg_publication_rel",
        "pg_publication_tables",
        "pg_range",
        "pg_replication_origin",
        "pg_replication_origin_status",
        "pg_replication_slots",
        "pg_rewrite",
        "pg_roles",
        "pg_rules",
        "pg_seclabel",
        "pg_seclabels",
        "pg_sequence",
        "pg_sequences",
        "pg_settings",
        "pg_shadow",
        "pg_shdepend",
        "pg_shdescription",
        "pg_shmem_allocations",
        "pg_shmem_allocations_numa",
        "pg_shseclabel",
        "pg_stat_activity",
        "pg_stat_all_indexes",
        "pg_stat_all_tables",
        "pg_stat_archiver",
        "pg_stat_bgwriter",
        "pg_stat_checkpointer",
        "pg_stat_database",
        "pg_stat_database_conflicts",
        "pg_stat_gssapi",
        "pg_stat_io",
        "pg_stat_progress_analyze",
        "pg_stat_progress_basebackup",
        "pg_stat_progress_cluster",
        "pg_stat_progress_copy",
        "pg_stat_progress_create_index",
        "pg_stat_progress_vacuum",
        "pg_stat_recovery_prefetch",
        "pg_stat_replication",
        "pg_stat_replication_slots",
        "pg_stat_slru",
        "pg_stat_ssl",
        "pg_stat_subscription",
        "pg_stat_subscription_stats",
        "pg_stat_sys_indexes",
        "pg_stat_sys_tables",
        "pg_stat_user_functions",
        "pg_stat_user_indexes",
        "pg_stat_user_tables",
        "pg_stat_wal",
        "pg_stat_wal_receiver",
        "pg_stat_xact_all_tables",
        "pg_stat_xact_sys_tables",
        "pg_stat_xact_user_functions",
        "pg_stat_xact_user_tables",
        "pg_statio_all_indexes",
        "pg_statio_all_sequences",
        "pg_statio_all_tables",
        "pg_statio_sys_indexes",
        "pg_statio_sys_sequences",
        "pg_statio_sys_tables",
        "pg_statio_user_indexes",
        "pg_statio_user_sequences",
        "pg_statio_user_tables",
        "pg_statistic",
        "pg_statistic_ext",
        "pg_statistic_ext_data",
        "pg_stats",
        "pg_stats_ext",
        "pg_stats_ext_exprs",
        "pg_subscription",
        "pg_subscription_rel",
        "pg_tables",
        "pg_tablespace",
        "pg_timezone_abbrevs",
        "pg_timezone_names",
        "pg_transform",
        "pg_trigger",
        "pg_ts_config",
        "pg_ts_config_map",
        "pg_ts_dict",
        "pg_ts_parser",
        "pg_ts_template",
        "pg_type",
        "pg_user",
        "pg_user_mapping",
        "pg_user_mappings",
        "pg_views",
        "pg_wait_events",
    }
)


def catalog_read(rel: str) -> bool:
    """Whether ``rel`` (as written) is a relation of the system catalogs: ``pg_catalog.*``,
    ``information_schema.*``, or an unqualified name of pg_catalog."""
    schema, _, name = rel.rpartition(".")
    if schema:
        return schema.rpartition(".")[2] in ("pg_catalog", "information_schema")
    return name in PG_CATALOG_RELATIONS


# Every user view with the relations its query reads, views of views followed to their tables
# (pg_depend of the view's rewrite rule: 2618 = pg_rewrite, 1259 = pg_class). Run in the client's
# session, whose search_path the client may have set at startup: everything is qualified.
VIEWS_QUERY = (
    "WITH RECURSIVE dep AS (SELECT DISTINCT r.ev_class AS view, d.refobjid AS rel "
    "FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_depend d "
    "ON d.classid OPERATOR(pg_catalog.=) 2618::pg_catalog.oid "
    "AND d.objid OPERATOR(pg_catalog.=) r.oid "
    "AND d.refclassid OPERATOR(pg_catalog.=) 1259::pg_catalog.oid "
    "WHERE r.ev_type OPERATOR(pg_catalog.=) '1' "
    "AND r.ev_class OPERATOR(pg_catalog.>=) 16384::pg_catalog.oid "
    "AND d.refobjid OPERATOR(pg_catalog.<>) r.ev_class), "
    "closure(view, rel) AS (SELECT view, rel FROM dep "
    "UNION SELECT c.view, d.rel FROM closure c JOIN dep d ON d.view OPERATOR(pg_catalog.=) c.rel) "
    "SELECT vn.nspname, v.relname, bn.nspname, b.relname FROM closure c "
    "JOIN pg_catalog.pg_class v ON v.oid OPERATOR(pg_catalog.=) c.view "
    "JOIN pg_catalog.pg_namespace vn ON vn.oid OPERATOR(pg_catalog.=) v.relnamespace "
    "JOIN pg_catalog.pg_class b ON b.oid OPERATOR(pg_catalog.=) c.rel "
    "JOIN pg_catalog.pg_namespace bn ON bn.oid OPERATOR(pg_catalog.=) b.relnamespace"
)


WRITE_KINDS = frozenset({"insert", "update", "delete", "merge", "copy-from"})
STRUCTURAL_KINDS = frozenset({"truncate", "drop", "alter"})


# Built-ins that run the SQL text they are given (effect runs-sql).
RUNS_SQL = frozenset(
    {"query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "ts_stat", "ts_rewrite"}
)


def read_only_violation(a: StatementAnalysis) -> str | None:
    """What a read-only grant refuses in a statement: its kinds other than reads, else the effects
    a read-only grant denies (named, comma-separated), or None."""
    if not a.kinds <= READ_ONLY_KINDS:
        return ", ".join(sorted(a.kinds - READ_ONLY_KINDS))
    if a.effects & READ_ONLY_DENIED_EFFECTS:
        return ", ".join(sorted(a.effects & READ_ONLY_DENIED_EFFECTS))
    return None


def _function_names(functions: frozenset[str]) -> frozenset[str]:
    """Function names as called (``pg_catalog.lower``) and without their schema (``lower``)."""
    return functions | frozenset(f.rsplit(".", 1)[-1] for f in functions)


def _union(globs: Iterable[str]) -> Any:
    """One RE2 pattern (use ``fullmatch``) for any of ``globs``, or None when there are none."""
    pattern = _values_pattern(list(globs))
    return re2.compile(pattern) if pattern else None


class SessionPolicy:
    """One grant compiled for a session's statement decisions. ``guarded`` sessions have every new
    statement judged (``judge``); read-only ones without other rules only the text-flagged ones."""

    def __init__(self, policy: CompiledPolicy, grant: Grant) -> None:
        self.grant = grant
        self.read_only = grant.access == "read-only"
        self.kinds = frozenset(grant.statements) if grant.statements is not None else None
        # Statement kinds that only read (select, show, explain ...): what a read-only grant
        # refuses by effect is refused too, whatever the grant's access.
        self.reads_only = self.kinds is not None and self.kinds <= READ_ONLY_KINDS
        self.relations = _union(grant.relations) if grant.relations is not None else None
        defined = {g.name: g for g in policy.config.guardrails}
        conn = policy.config.connection(grant.connection)
        names = list(dict.fromkeys([*(conn.guardrails if conn is not None else []), *grant.guardrails]))
        # The read-only pack means what a read-only grant means (kinds and effects), checked first.
        self.read_only_pack = "read-only" in names
        # Where an unqualified name can resolve (search_path "$user", public, pinned under
        # relation rules): refusing and holding rules see it there too.
        login = (
            conn.credentials[grant.credential].user
            if conn is not None and grant.credential is not None and grant.credential in conn.credentials
            else (conn.upstream.user if conn is not None else "")
        )
        schemas = tuple(dict.fromkeys(s for s in ("public", login) if s))
        rules = [defined.get(n) or PACKS[n] for n in names if n != "read-only"]
        # The database's views, for the rules that refuse or hold (``set_views``).
        self.view_bases: dict[str, frozenset[str]] = {}
        self.rules = [_Rule(g, schemas, self.view_bases) if g.action == "deny" else _Rule(g) for g in rules]
        # Patterns look at the text, constants included: their verdicts hold per text only.
        self.by_text = any(r.pattern is not None for r in self.rules)
        self.masking = policy.masking(grant)
        # View columns masked through what they come from, by their own names (set from the
        # session's catalog query, ``SessionMasking.resolve``).
        self.view_globs: list[ColumnGlob] = []
        # Approval rules: statements they match are held for people to decide, every time (their
        # verdicts are never remembered by the data path).
        approvals = {a.name: a for a in policy.config.approvals}
        self.approvals = [
            (_Rule(Guardrail(name=a.name, action="allow", match=a.match), schemas, self.view_bases), a)
            for a in (approvals[n] for n in grant.approvals if n in approvals)
        ]
        self.by_text = self.by_text or any(m.pattern is not None for m, _ in self.approvals)
        # Unqualified names resolve through search_path: with relation rules (deny, allow, or the
        # approvals that hold statements) it must not move.
        self.pins_search_path = (
            self.relations is not None
            or any(r.relations is not None for r in self.rules)
            or any(m.relations is not None for m, _ in self.approvals)
        )

    @property
    def needs_views(self) -> bool:
        """Whether rules that refuse or hold name relations: then the database's views are read
        when the session starts (``VIEWS_QUERY``, ``set_views``)."""
        return any(r.deny and r.relations is not None for r in self.rules) or any(
            m.relations is not None for m, _ in self.approvals
        )

    def set_views(self, rows: list[list[str | None]]) -> None:
        """The rows of ``VIEWS_QUERY``: (view schema, view, schema, relation under it)."""
        bases: dict[str, set[str]] = {}
        for row in rows:
            if len(row) == 4 and all(row):
                vs, vn, bs, bn = (str(x) for x in row)
                bases.setdefault(f"{vs}.{vn}", set()).add(f"{bs}.{bn}")
        self.view_bases.clear()
        self.view_bases.update({k: frozenset(v) for k, v in bases.items()})

    @property
    def guarded(self) -> bool:
        # A read-only grant alone is enforced by the database plus the data path's escape check.
        pack_on_writer = self.read_only_pack and not self.read_only
        return (
            self.kinds is not None
            or self.relations is not None
            or bool(self.rules)
            or pack_on_writer
            or bool(self.approvals)
        )

    def approval_rule(self, text: str) -> ApprovalRule | None:
        """The first approval rule of the grant that any statement of ``text`` matches (None for
        text that does not parse: ``judge`` refuses that first)."""
        if not self.approvals:
            return None
        from ostiary.errors import SqlError

        try:
            analyses = StatementAnalysis.of(text)
        except SqlError:
            return None
        for a in analyses:
            for matcher, rule in self.approvals:
                if matcher.matches(a):
                    return rule
        return None

    def judge(self, text: str) -> StatementDecision:
        """Every statement of a Query or Parse text; the first refusal wins. What does not parse is
        refused, and so is turning ``standard_conforming_strings`` off (statements would then no
        longer mean what the analysis, which lexes with it on, says)."""
        from ostiary.errors import SqlError

        try:
            analyses = StatementAnalysis.of(text)
        except SqlError as e:
            # Never per shape: a malformed constant (0x) gives a text the shape of a valid one.
            if self.grant.allow_unparsed:
                return StatementDecision(True, "unparsed", by_shape=False)
            return StatementDecision(
                False,
                "unparsed",
                f"the gateway cannot analyse this statement: {e}",
                by_shape=False,
                code="42601",
            )
        by_shape = not self.by_text and not any(a.literal_sensitive for a in analyses)
        for a in analyses:
            if "lexer-change" in a.effects:
                return StatementDecision(
                    False,
                    "standard-conforming-strings",
                    "standard_conforming_strings must stay on, and client_encoding must not become "
                    "one whose characters can hide quotes (SJIS, BIG5, GBK, UHC, GB18030, JOHAB), "
                    "in sessions whose statements are judged",
                    by_shape=by_shape,
                )
            if self.pins_search_path and "search-path-change" in a.effects:
                return StatementDecision(
                    False,
                    "search-path",
                    "search_path cannot change under relation rules (unqualified names would move)",
                    by_shape=by_shape,
                )
            if self.pins_search_path and a.effects & READS_UNSEEN:
                return StatementDecision(
                    False,
                    "dynamic-sql",
                    "functions and views that read relations named in text or data (query_to_xml, "
                    "table_to_xml, ts_stat, pg_stats, logical decoding ...), over another connection "
                    "(dblink) or as server files (pg_read_binary_file of a relation's file) are "
                    "refused under relation rules, which cannot see what they read",
                    by_shape=by_shape,
                )
            d = self.masking_refusal(a, text) or self.decide(a)
            if not d.allow:
                return StatementDecision(d.allow, d.rule, d.message, by_shape=by_shape)
            if self.pins_search_path and "unnamed-relations" in a.effects:
                return StatementDecision(
                    False,
                    "unnamed-relations",
                    "TRUNCATE or DROP ... CASCADE, DROP OWNED and REASSIGN OWNED are refused under "
                    "relation rules: they reach relations the statement does not name",
                    by_shape=by_shape,
                )
            if self.pins_search_path and ("do" in a.kinds or "code" in a.effects):
                return StatementDecision(
                    False,
                    "code",
                    "DO blocks and functions, procedures, rules, triggers, views, operators, "
                    "aggregates, domains or casts defined here are refused under relation rules: "
                    "what their code reads or writes is out of their sight",
                    by_shape=by_shape,
                )
            if self.approvals and "execute" in a.kinds:
                # SQL EXECUTE runs a prepared statement by name: one prepared through the protocol
                # (whose executions are held there) or by SQL PREPARE; the text names neither what
                # it runs nor its rules.
                return StatementDecision(
                    False,
                    "approvals",
                    "SQL EXECUTE is refused in sessions with approval rules (it runs a prepared "
                    "statement the gateway cannot see here): run the statement itself, or execute "
                    "it through the protocol, where each execution is held with its parameters",
                    by_shape=by_shape,
                )
            if "prepare" in a.kinds:
                # Approval holds each execution with its values; an SQL PREPARE approved once
                # would let every later EXECUTE run unheld.
                for matcher, rule in self.approvals:
                    if matcher.matches(a):
                        return StatementDecision(
                            False,
                            rule.name,
                            f"statements that approval rule {rule.name} holds cannot be prepared "
                            "with SQL PREPARE (its EXECUTEs would not be held): run the statement "
                            "itself, or prepare it through the protocol, where each execution is "
                            "held with its parameters",
                            by_shape=by_shape,
                        )
        if self.approvals:
            held = list(dict.fromkeys(r.name for a in analyses for m, r in self.approvals if m.matches(a)))
            if len(held) > 1:
                # A request is approved under one rule, by its approvers: one text that several
                # rules hold (two statements, or one that does both) would pass on the votes of
                # one rule's approvers, or on a grant-scoped approval of the laxer one.
                return StatementDecision(
                    False,
                    "approvals",
                    f"this text matches approval rules {', '.join(held)}: a request is approved "
                    "under one rule; send the statements one at a time (a single statement "
                    "that several rules hold cannot be approved)",
                    by_shape=by_shape,
                )
        return StatementDecision(True, self.grant.name, by_shape=by_shape)

    def masking_refusal(self, a: StatementAnalysis, text: str) -> StatementDecision | None:
        """What masking cannot cover: COPY TO a server file or program (the data never passes the
        gateway), COPY TO under column rules (COPY names no columns) or in binary format; and,
        under column rules, a masked column used where its values leave without their origin
        (``column_rule_refusal``)."""
        m = self.masking
        if m is None:
            return None
        if "copy-to" not in a.kinds:
            return self.column_rule_refusal(a) if m.globs else None
        if a.effects & {"server-files", "program"}:
            why = "COPY TO a server file or program would bypass masking"
        elif m.globs:
            why = "COPY TO cannot be masked by column rules (COPY names no columns): use SELECT"
        elif m.has_content and "binary" in (a.text or text).lower():
            why = "binary COPY TO cannot be masked: use the text or CSV format"
        else:
            return None
        return StatementDecision(False, "masking", why)

    def column_rule_refusal(self, a: StatementAnalysis) -> StatementDecision | None:
        """Column rules mask result columns that RowDescription traces to a table's column. A
        masked column's value computed into an expression, cast, set operation, scalar or renamed
        subquery, RETURNING, or copied into another relation, and a whole row of a table a rule
        names, would leave unmasked: refused. Matched by the column name as written (and the
        table's name for whole rows), whatever the alias: without the catalog, strictly."""
        m = self.masking
        if m is None or not m.globs:
            return None
        globs = [*m.globs, *self.view_globs]
        if "do" in a.kinds or a.effects & {"code", "runs-sql"}:
            # The client's own code: what it reads and where it puts it (RAISE, an exception's
            # text, a function's result) is out of the statement check's sight.
            return StatementDecision(
                False,
                "masking",
                "DO blocks, functions that run SQL text and code defined in the session "
                "(functions, procedures, rules, triggers, views) are refused in sessions with column "
                "masking rules (their code could read a masked column and return or raise it)",
            )
        if a.effects & READS_UNSEEN:
            return StatementDecision(
                False,
                "masking",
                "statistics views (pg_stats), built-ins that read a relation named in text "
                "(table_to_xml ...), other connections (dblink) and server files are refused in "
                "sessions with column masking rules (they show column values without the column)",
            )
        for ref in sorted(a.derived_columns):
            column = ref.rsplit(".", 1)[-1]
            for g in globs:
                if g.matches_column(column):
                    return StatementDecision(
                        False,
                        "masking",
                        f"column {ref} is masked (rule {m.rule_name(g)}): select it as a plain "
                        "column; expressions, casts, set operations, renamed subqueries, RETURNING "
                        "and copies into other relations would carry it out unmasked",
                    )
        for rel in sorted(a.whole_rows):
            for g in globs:
                if g.matches_table(rel):
                    shown = "* (every relation)" if rel == "*" else rel
                    return StatementDecision(
                        False,
                        "masking",
                        f"a whole row of {shown} holds a masked column (rule {m.rule_name(g)}): "
                        "select its columns by name (and without a column alias list, which "
                        "renames them)",
                    )
        return None

    def copy_check(self, text: str) -> StatementDecision:
        """For sessions not otherwise judged: only ``masking_refusal`` (what does not parse is left
        to the server, which refuses it too). Sessions with column rules have every statement shape
        checked here; others only the statements that mention COPY."""
        from ostiary.errors import SqlError

        try:
            analyses = StatementAnalysis.of(text)
        except SqlError:
            return StatementDecision(True, "unparsed", by_shape=False)
        for a in analyses:
            if d := self.masking_refusal(a, text):
                return d
        return StatementDecision(True, self.grant.name)

    def decide(self, a: StatementAnalysis) -> StatementDecision:
        g = self.grant.name
        if (self.read_only or self.read_only_pack) and (why := read_only_violation(a)):
            return StatementDecision(False, "read-only", f"grant {g} is read-only ({why})")
        if self.kinds is not None and not a.kinds <= self.kinds:
            kinds = ", ".join(sorted(a.kinds - self.kinds))
            return StatementDecision(False, f"{g}.statements", f"grant {g} does not allow {kinds}")
        if self.kinds is not None and "do" not in self.kinds and "runs-sql" in a.effects:
            # query_to_xml('...') runs any statement, as a DO block would.
            return StatementDecision(
                False,
                f"{g}.statements",
                f"grant {g} does not allow do (a function that runs SQL text: "
                f"{', '.join(sorted(_function_names(a.functions) & RUNS_SQL)) or 'query_to_xml'})",
            )
        if self.reads_only and (writes := a.effects & READ_ONLY_DENIED_EFFECTS):
            # A list of reading kinds only means reading: a SELECT that writes large objects,
            # advances a sequence, locks rows or signals backends is not one.
            return StatementDecision(
                False,
                f"{g}.statements",
                f"grant {g} allows reading statements only ({', '.join(sorted(writes))})",
            )
        if self.relations is not None:
            # The system catalogs are read by every client (psql's \\d, drivers' type lookups,
            # ORMs at connect) and guarded by the database's own privileges: reads of them are not
            # the grant's to list. Writes are (UPDATE pg_settings).
            for rel in sorted(a.writes | {r for r in a.reads if not catalog_read(r)}):
                if not self.relations.fullmatch(rel):
                    # Names are matched as written: `customers` is not `public.customers`.
                    qualified = any("." in r for r in self.grant.relations or ())
                    hint = (
                        f" (relations are matched as written: write public.{rel} if that is the one meant)"
                        if "." not in rel and qualified
                        else ""
                    )
                    return StatementDecision(False, f"{g}.relations", f"grant {g} does not cover {rel}{hint}")
        for rule in self.rules:
            if rule.matches(a):
                if rule.deny:
                    return StatementDecision(False, rule.name, rule.message)
                return StatementDecision(True, rule.name)
        return StatementDecision(True, g)
