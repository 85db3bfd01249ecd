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
from ostiary.identity import Identity
from ostiary.identity.dev import dev_issuer
from ostiary.identity.issuers import ResolvedIssuer, resolve_issuer
from ostiary.identity.tokens import claim_attributes
from ostiary.policy.evaluate import CompiledPolicy


class ExplainError(Exception):
    """The claims or arguments cannot be explained against this policy (says why)."""


def _issuers(cfg: Config) -> list[ResolvedIssuer]:
    found = [resolve_issuer(i) for i in cfg.issuers]
    if cfg.dev.issuer:
        found.append(dev_issuer(cfg.data_dir, tuple(cfg.dev.audiences), create=False))
    return found


def identity_from_claims(cfg: Config, claims: Mapping[str, Any], issuer: str | None = None) -> Identity:
    """The identity the gateway would derive from these claims. The issuer is found by the ``iss``
    claim, or named (by its policy name) with ``issuer``."""
    issuers = _issuers(cfg)
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
) -> tuple[bool, list[str]]:
    """The decision and the chain of rules behind it, as lines."""
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
    return verdict.grant is not None, [head, *lines]


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
    return lines
