"""Dry runs of a policy: the decision for given claims, and what changes between two versions.

Rules of this module: pure, like evaluation; the claims given to ``explain`` are taken as if their
token had been validated (no signature, no time checks), because the question is what the policy
decides, not whether a token is good. Output is plain text lines, stable for review in CI.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from ostiary.config import Config
from ostiary.errors import SqlError
from ostiary.identity import Identity
from ostiary.identity.dev import resolved_issuers
from ostiary.identity.tokens import claim_attributes
from ostiary.policy.evaluate import CompiledPolicy, StatementAnalysis, session_terms
from ostiary.policy.model import Grant


class ExplainError(Exception):
    """The claims or arguments cannot be explained against this policy (says why)."""


def identity_from_claims(cfg: Config, claims: Mapping[str, Any], issuer: str | None = None) -> Identity:
    """The identity the gateway would derive from these claims. The issuer is found by the ``iss``
    claim, or named (by its policy name) with ``issuer``."""
    issuers = resolved_issuers(cfg, create=False)
    if issuer is not None:
        chosen = next((i for i in issuers if i.name == issuer), None)
        if chosen is None:
            raise ExplainError(f"no issuer named {issuer!r} in the policy")
    else:
        iss = claims.get("iss")
        chosen = next((i for i in issuers if i.issuer == iss), None)
        if chosen is None:
            known = ", ".join(f"{i.name} ({i.issuer})" for i in issuers) or "none"
            raise ExplainError(f"no issuer of the policy has iss {iss!r}; known: {known}")
    name = claims.get(chosen.name_claim)
    if not isinstance(name, str) or not name:
        raise ExplainError(
            f"the claims have no {chosen.name_claim!r} (the name claim of issuer {chosen.name})"
        )
    attributes = claim_attributes(dict(claims), chosen.attributes)
    attributes.setdefault("issuer", chosen.issuer)
    return Identity(name=name, issuer=chosen.name, method="token", attributes=attributes)


def explain(
    policy: CompiledPolicy,
    identity: Identity,
    connection: str,
    *,
    user: str | None = None,
    peer: str | None = None,
    now: dt.datetime,
    statement: str | None = None,
) -> tuple[bool, list[str]]:
    """The decision and the chain of rules behind it, as lines; with ``statement``, also the
    decision on each statement of it under the grant (allowed only if every one is)."""
    if policy.config.connection(connection) is None:
        names = ", ".join(c.name for c in policy.config.connections)
        raise ExplainError(f"no connection named {connection!r} (known: {names})")
    verdict = policy.admit(identity, connection, user=user, peer=peer, now=now, trace=True)
    lines = [f"  {step}" for step in verdict.chain]
    if verdict.grant is not None:
        g = verdict.grant
        conn = policy.config.connection(connection)
        assert conn is not None
        cred = conn.credentials[g.credential] if g.credential is not None else conn.upstream
        head = (
            f"ALLOW {identity.name} on {connection} under grant {g.name}: {g.access}, "
            f"as database role {cred.user}"
        )
        if g.max_session is not None:
            head += f", sessions end after {g.max_session:g} s"
    else:
        head = f"DENY {identity.name} on {connection}: {verdict.reason} (SQLSTATE {verdict.code})"
    allowed = verdict.grant is not None
    out = [head, *lines]
    if statement is not None:
        grant = verdict.grant
        if grant is None:
            # A grant refused only because its statement rules are not enforced yet is still explained.
            pending = policy.admit(
                identity, connection, user=user, peer=peer, now=now, enforceable_only=False
            ).grant
            if pending is not None:
                out.append(f"statements under grant {pending.name} (once statement rules are enforced):")
            grant = pending
        if grant is not None:
            ok, statement_lines = explain_statements(policy, grant, statement)
            allowed = allowed and ok
            out += statement_lines
    return allowed, out


def explain_statements(policy: CompiledPolicy, grant: Grant, sql: str) -> tuple[bool, list[str]]:
    """Each statement of ``sql`` judged under ``grant``: ALLOW/DENY, the rule and what was found."""
    try:
        analyses = StatementAnalysis.of(sql)
    except SqlError as e:
        return False, [f"DENY statement: {e} (what cannot be parsed is refused)"]
    session = policy.compile_session(grant)
    lines, allowed, refused = [], True, 0
    for i, a in enumerate(analyses, 1):
        d = session.decide(a)
        allowed = allowed and d.allow
        refused += not d.allow
        found = [f"kinds {', '.join(sorted(a.kinds))}"]
        for label, values in (
            ("reads", a.reads),
            ("writes", a.writes),
            ("functions", a.functions),
            ("effects", a.effects),
        ):
            if values:
                found.append(f"{label} {', '.join(sorted(values))}")
        if a.unbounded_write:
            found.append("no WHERE")
        verdict = "ALLOW" if d.allow else f"DENY by {d.rule}: {d.message}"
        held = next((r for m, r in session.approvals if m.matches(a)), None) if d.allow else None
        if held is not None:
            verdict = (
                f"HOLD for approval by rule {held.name} ({held.required} of {', '.join(held.approvers)}, "
                f"scope {held.scope}, up to {held.timeout:g} s)"
            )
        lines.append(f"statement {i}: {verdict}")
        lines.append(f"  {a.text[:200]}")
        lines.append(f"  ({'; '.join(found)})")
    verdict = "ALLOW" if allowed else "DENY"
    lines.append(f"{verdict} statements: {refused} of {len(analyses)} refused under grant {grant.name}")
    return allowed, lines


def _leaves(
    names: list[str], groups: Mapping[str, list[str]], seen: frozenset[str] = frozenset()
) -> set[str]:
    out: set[str] = set()
    for n in names:
        if n in groups:
            if n not in seen:
                out |= _leaves(groups[n], groups, seen | {n})
        else:
            out.add(n)
    return out


def access_map(cfg: Config) -> dict[tuple[str, str], set[str]]:
    """(identity or client, connection) -> descriptions of the grants that give it access."""
    groups = {g.name: list(g.members) for g in cfg.groups}
    out: dict[tuple[str, str], set[str]] = {}
    for g in cfg.grants:
        conn = cfg.connection(g.connection)
        cred = conn.credentials.get(g.credential or "") if conn is not None else None
        role = cred.user if cred is not None else (conn.upstream.user if conn is not None else "?")
        desc = f"{g.access} as {role} (grant {g.name})"
        for leaf in _leaves(g.identities, groups):
            out.setdefault((leaf, g.connection), set()).add(desc)
    return out


def diff(old: Config, new: Config) -> list[str]:
    """Which identities gain or lose access, and identities whose matchers changed."""
    before, after = access_map(old), access_map(new)
    lines: list[str] = []
    for key in sorted(set(before) | set(after)):
        who, conn = key
        b, a = before.get(key, set()), after.get(key, set())
        for d in sorted(a - b):
            lines.append(f"+ {who} gains {d} on {conn}")
        for d in sorted(b - a):
            lines.append(f"- {who} loses {d} on {conn}")
    old_m = {m.name: m for m in old.identities}
    new_m = {m.name: m for m in new.identities}
    for name in sorted(set(old_m) & set(new_m)):
        if old_m[name] != new_m[name]:
            o, n = old_m[name], new_m[name]
            lines.append(
                f"~ identity {name} now matches {n.issuer} {dict(n.match)} (was {o.issuer} {dict(o.match)})"
            )
    for name in sorted(set(old_m) - set(new_m)):
        lines.append(f"- identity {name} removed")
    for name in sorted(set(new_m) - set(old_m)):
        lines.append(f"+ identity {name} added: {new_m[name].issuer} {dict(new_m[name].match)}")
    lines += _connection_changes(old, new)
    # Rules and grants whose definitions changed: their sessions are ended at reload.
    for section in ("grants", "guardrails", "masking", "approvals"):
        was = {r.name: r for r in getattr(old, section)}
        now = {r.name: r for r in getattr(new, section)}
        kind = {
            "grants": "grant",
            "guardrails": "guardrail",
            "masking": "masking rule",
            "approvals": "approval rule",
        }
        for name in sorted(set(was) & set(now)):
            if was[name] != now[name]:
                lines.append(f"~ {kind[section]} {name} changed: its sessions reconnect at reload")
    return lines


def _connection_changes(old: Config, new: Config) -> list[str]:
    """Where connections lead, as which roles, over which TLS; login-only settings apart (they
    change no open session)."""
    lines: list[str] = []
    o = {c.name: c for c in old.connections}
    n = {c.name: c for c in new.connections}
    for name in sorted(set(o) - set(n)):
        lines.append(f"- connection {name} removed")
    for name in sorted(set(n) - set(o)):
        u = n[name].upstream
        lines.append(f"+ connection {name} added: {u.user}@{u.host}:{u.port}/{u.database}")
    for name in sorted(set(o) & set(n)):
        was, now = session_terms(o[name]), session_terms(n[name])
        assert was is not None and now is not None
        changed = [part for part in now if now[part] != was[part]]
        if "where it leads" in changed:
            lines.append(
                f"~ connection {name} now leads to {now['where it leads']} (was {was['where it leads']})"
            )
        if changed:
            lines.append(
                f"~ connection {name}: {', '.join(changed)} changed: its sessions reconnect at reload"
            )
        elif o[name] != n[name]:
            lines.append(
                f"~ connection {name}: login settings changed (connect_timeout, require_auth or where the "
                "password is read from): the next logins use them, open sessions stay"
            )
    return lines
