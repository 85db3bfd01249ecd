"""Cross-reference and value checks of the policy sections, for ``ostiary policy check`` and loading.

Rules of this module: pure (no I/O except ``is_file`` on paths the file names); every problem is
returned as ``(path inside the file, message saying what is wrong and what was expected)``, all of
them, never just the first. Names of issuers, identities, groups, static clients, connections, grants
and rules are checked for duplicates and dangling references.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import ipaddress
import os
import re
import zoneinfo
from pathlib import Path
from typing import TYPE_CHECKING

import re2

from ostiary.identity.issuers import issuer_problems, resolve_issuer
from ostiary.policy.evaluate import PENDING_FIELDS
from ostiary.policy.masking import rule_problems
from ostiary.policy.packs import PACKS

if TYPE_CHECKING:
    from ostiary.config import Config

# Issuer names with a fixed meaning in identities.
BUILTIN_ISSUERS = ("certificate", "password", "dev")
_TIME = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$|^24:00$")


def _duplicates(names: list[str], section: str, problems: list[tuple[str, str]]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            problems.append((f"{section}[{i}].name", f"{name!r} is defined twice in {section}"))
        seen.add(name)


def _re2_problem(pattern: str) -> str | None:
    try:
        re2.compile(pattern)
    except re2.error as e:
        return f"RE2 cannot compile this pattern: {e}"
    return None


def policy_problems(cfg: Config, base: Path) -> list[tuple[str, str]]:
    from ostiary.config import secret_problems

    problems: list[tuple[str, str]] = []

    # Issuers.
    _duplicates([i.name for i in cfg.issuers], "issuers", problems)
    for i, issuer in enumerate(cfg.issuers):
        p = f"issuers[{i}]"
        if issuer.name in BUILTIN_ISSUERS:
            problems.append((f"{p}.name", f"{issuer.name!r} is reserved; choose another name"))
        problems += issuer_problems(issuer, p)
        if issuer.jwks_file is not None and not (base / issuer.jwks_file).is_file():
            problems.append((f"{p}.jwks_file", f"file {issuer.jwks_file} does not exist"))
        if issuer.ca is not None and not (base / issuer.ca).is_file():
            problems.append((f"{p}.ca", f"file {issuer.ca} does not exist"))
    urls: dict[str, str] = {}
    for i, issuer in enumerate(cfg.issuers):
        if issuer_problems(issuer, ""):
            continue
        url = resolve_issuer(issuer).issuer
        if url in urls:
            problems.append(
                (f"issuers[{i}].issuer", f"issuer URL {url} is already trusted as issuer {urls[url]!r}")
            )
        urls.setdefault(url, issuer.name)
    issuer_names = {i.name for i in cfg.issuers}
    if cfg.dev.issuer:
        issuer_names.add("dev")
    if cfg.tls is not None and cfg.tls.client_ca is not None:
        issuer_names.add("certificate")
    if cfg.clients:
        issuer_names.add("password")

    # Identities, groups and static clients share one namespace: grants name any of them.
    _duplicates([c.user for c in cfg.clients], "clients", problems)
    _duplicates([m.name for m in cfg.identities], "identities", problems)
    _duplicates([g.name for g in cfg.groups], "groups", problems)
    kinds: dict[str, str] = {}
    for section, names in (
        ("clients", [c.user for c in cfg.clients]),
        ("identities", [m.name for m in cfg.identities]),
        ("groups", [g.name for g in cfg.groups]),
    ):
        for i, name in enumerate(names):
            other = kinds.get(name)
            if other is not None and other != section:
                where = f"{section}[{i}]." + ("user" if section == "clients" else "name")
                problems.append((where, f"{name!r} is already the name of one of the {other}"))
            kinds.setdefault(name, section)
    for i, m in enumerate(cfg.identities):
        p = f"identities[{i}]"
        if m.issuer not in issuer_names:
            hint = {
                "certificate": "client certificates need tls.client_ca",
                "dev": "the dev issuer needs dev.issuer: true",
                "password": "static passwords need a clients section",
            }.get(m.issuer, "declare it under issuers")
            problems.append((f"{p}.issuer", f"unknown issuer {m.issuer!r} ({hint})"))
        if not m.match and m.issuer not in ("password",):
            problems.append(
                (f"{p}.match", "an identity without match accepts every token of its issuer: add attributes")
            )
        for key, value in m.match.items():
            values = value if isinstance(value, list) else [value]
            if not key or not all(values):
                problems.append((f"{p}.match.{key}", "attribute names and values must not be empty"))
    identity_names = set(kinds)
    group_members = {g.name: g.members for g in cfg.groups}
    for i, g in enumerate(cfg.groups):
        for member in g.members:
            if member not in identity_names:
                problems.append((f"groups[{i}].members", f"unknown identity or group {member!r}"))
        if _in_cycle(g.name, group_members):
            problems.append((f"groups[{i}].members", f"group {g.name!r} contains itself"))

    # Connections.
    if not cfg.connections:
        problems.append(("connections", "no connections: add at least one (see the example)"))
    _duplicates([c.name for c in cfg.connections], "connections", problems)
    connections = {c.name: c for c in cfg.connections}
    for i, conn in enumerate(cfg.connections):
        p = f"connections[{i}]"
        up = conn.upstream
        problems += secret_problems(up, f"{p}.upstream")
        for cname, cred in conn.credentials.items():
            problems += secret_problems(cred, f"{p}.credentials.{cname}")
        if not 0 < up.port <= 65535:
            problems.append((f"{p}.upstream.port", f"{up.port} is not a TCP port"))
        if up.tls.mode == "verify-full" and up.tls.ca is None:
            problems.append((f"{p}.upstream.tls.ca", "verify-full needs a CA bundle"))
        for field in ("ca", "cert", "key"):
            value = getattr(up.tls, field)
            if value is not None and not (base / value).is_file():
                problems.append((f"{p}.upstream.tls.{field}", f"file {value} does not exist"))
        known_rules = {g.name for g in cfg.guardrails} | set(PACKS)
        for name in conn.guardrails:
            if name not in known_rules:
                problems.append((f"{p}.guardrails", f"unknown guardrails rule {name!r}"))
        for name in conn.masking:
            if name not in {m.name for m in cfg.masking}:
                problems.append((f"{p}.masking", f"unknown masking rule {name!r}"))
        if conn.allow_plaintext and cfg.tls is not None and cfg.tls.mode == "require":
            problems.append(
                (f"{p}.allow_plaintext", "tls.mode is require, so plaintext clients are refused anyway")
            )

    # Rules.
    _duplicates([r.name for r in cfg.guardrails], "guardrails", problems)
    _duplicates([r.name for r in cfg.masking], "masking", problems)
    _duplicates([r.name for r in cfg.approvals], "approvals", problems)
    matches = [(f"guardrails[{i}]", r.match) for i, r in enumerate(cfg.guardrails)]
    matches += [(f"approvals[{i}]", r.match) for i, r in enumerate(cfg.approvals)]
    for where, sm in matches:
        if sm.pattern is not None and (err := _re2_problem(sm.pattern)):
            problems.append((f"{where}.match.pattern", err))
        if not (sm.kinds or sm.relations or sm.functions or sm.effects or sm.pattern or sm.without_where):
            problems.append((f"{where}.match", "matches nothing: give kinds, relations, ..."))
    for i, rail in enumerate(cfg.guardrails):
        if rail.name in PACKS:
            problems.append(
                (f"guardrails[{i}].name", f"{rail.name!r} is a shipped rule pack; choose another")
            )
    for i, mr in enumerate(cfg.masking):
        # What RE2 accepts and what the engine runs must agree: both check every pattern.
        if mr.pattern is not None and (err := _re2_problem(mr.pattern)):
            problems.append((f"masking[{i}].pattern", err))
        for field, err in rule_problems(mr):
            problems.append((f"masking[{i}]" + (f".{field}" if field else ""), err))
    for i, ar in enumerate(cfg.approvals):
        for who in ar.approvers:
            if who not in identity_names:
                problems.append((f"approvals[{i}].approvers", f"unknown identity or group {who!r}"))
        if not ar.approvers:
            problems.append((f"approvals[{i}].approvers", "name at least one approver"))
        if ar.required < 1:
            problems.append((f"approvals[{i}].required", "must be at least 1"))
        if ar.timeout <= 0:
            problems.append((f"approvals[{i}].timeout", "must be positive (seconds)"))
        if ar.grant_minutes <= 0:
            problems.append((f"approvals[{i}].grant_minutes", "must be positive"))

    # Grants.
    _duplicates([g.name for g in cfg.grants], "grants", problems)
    guardrails = {g.name for g in cfg.guardrails} | set(PACKS)
    masking = {m.name for m in cfg.masking}
    approvals = {a.name for a in cfg.approvals}
    for i, grant in enumerate(cfg.grants):
        p = f"grants[{i}]"
        if not grant.identities:
            problems.append((f"{p}.identities", "name at least one identity, group or client"))
        for who in grant.identities:
            if who not in identity_names:
                problems.append((f"{p}.identities", f"unknown identity, group or client {who!r}"))
        target = connections.get(grant.connection)
        if target is None:
            known = ", ".join(sorted(connections)) or "none defined"
            problems.append((f"{p}.connection", f"unknown connection {grant.connection!r} (known: {known})"))
        elif grant.credential is not None and grant.credential not in target.credentials:
            known = ", ".join(sorted(target.credentials)) or "none defined"
            problems.append(
                (
                    f"{p}.credential",
                    f"connection {target.name!r} has no credential {grant.credential!r} (known: {known})",
                )
            )
        for field, defined in (("guardrails", guardrails), ("masking", masking), ("approvals", approvals)):
            for name in getattr(grant, field):
                if name not in defined:
                    problems.append((f"{p}.{field}", f"unknown {field} rule {name!r}"))
        for rel in grant.relations or []:
            if not rel:
                problems.append((f"{p}.relations", "relation globs must not be empty"))
        if grant.max_session is not None and grant.max_session <= 0:
            problems.append((f"{p}.max_session", "must be a positive number of seconds"))
        for j, net in enumerate(grant.networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                problems.append((f"{p}.networks[{j}]", f"{net!r} is not an address or CIDR network"))
        for j, w in enumerate(grant.windows):
            for field in ("start", "end"):
                if not _TIME.match(getattr(w, field)):
                    problems.append((f"{p}.windows[{j}].{field}", "expected HH:MM (00:00 to 24:00)"))
            try:
                zoneinfo.ZoneInfo(w.timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                problems.append((f"{p}.windows[{j}].timezone", f"unknown time zone {w.timezone!r}"))
            if not w.days:
                problems.append((f"{p}.windows[{j}].days", "name at least one day"))
    if not cfg.grants:
        problems.append(("grants", "no grants: nobody may use any connection (add at least one)"))
    return problems


def _in_cycle(start: str, members: dict[str, list[str]]) -> bool:
    stack, seen = list(members.get(start, [])), set()
    while stack:
        name = stack.pop()
        if name == start:
            return True
        if name in seen:
            continue
        seen.add(name)
        stack.extend(members.get(name, []))
    return False


def policy_warnings(cfg: Config) -> list[tuple[str, str]]:
    """Valid but worth a look: things this release cannot enforce yet are refused at login."""
    out: list[tuple[str, str]] = []
    for i, grant in enumerate(cfg.grants):
        pending = [f for f in PENDING_FIELDS if getattr(grant, f) not in (None, [])]
        if pending:
            out.append(
                (
                    f"grants[{i}]",
                    f"{', '.join(pending)}: these rules are not enforced by this release yet, so "
                    f"sessions under grant {grant.name!r} are refused (fail closed)",
                )
            )
    if cfg.dev.issuer:
        out.append(("dev.issuer", "the development issuer is trusted: never do this in production"))
    plain = [c.name for c in cfg.connections if not c.allow_plaintext]
    if cfg.tls is None and plain:
        out.append(
            (
                "tls",
                f"no TLS configured: every client of {', '.join(plain)} is refused (tokens travel as "
                "passwords); set tls: {cert, key}, or allow_plaintext on a connection for a trusted network",
            )
        )
    if cfg.admin is not None and cfg.admin.tls is None and not _loopback(cfg.admin.listen.host):
        out.append(
            (
                "admin.tls",
                f"the admin API listens on {cfg.admin.listen.host} without TLS: approvers' tokens would "
                "travel in clear; set admin.tls or listen on 127.0.0.1 behind a TLS proxy",
            )
        )
    for i, conn in enumerate(cfg.connections):
        up = conn.upstream
        if up.tls.mode == "verify-full" or _loopback(up.host) or up.host.startswith("/"):
            continue
        weak = not up.require_auth or {"none", "password", "md5"} & set(up.require_auth)
        if up.tls.mode == "disable":
            why = "the sessions (and the login) cross the network in clear"
        else:
            # SCRAM proves the server knows the password, but without channel binding a server in
            # the middle can relay the exchange to the real one and then read the session.
            why = "the server is not verified: whoever can pose as it can relay and read the sessions"
        if weak:
            why += ", and take the password (require_auth allows cleartext, MD5 or none)"
        out.append(
            (f"connections[{i}].upstream", f"tls.mode is {up.tls.mode}: {why}; set tls.mode: verify-full")
        )
    for setting, tls in (("tls.cert", cfg.tls), ("admin.tls.cert", cfg.admin.tls if cfg.admin else None)):
        if tls is not None and (problem := expiry_problem(tls.cert)) is not None:
            out.append((setting, problem))
    a = cfg.audit
    if a.enabled and a.store == "postgres" and a.dsn_env is not None and a.dsn_env not in os.environ:
        out.append(("audit.dsn_env", f"environment variable {a.dsn_env} is not set: serve cannot start"))
    if a.enabled and a.store == "postgres" and importlib.util.find_spec("psycopg") is None:
        out.append(("audit.store", "store: postgres needs psycopg: pip install 'ostiary[postgres]'"))
    return out


def certificate_expiry(path: str) -> dt.datetime | None:
    """When the first certificate of a PEM file stops being valid (None if it cannot be read: the
    checks that load it say why)."""
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read()).not_valid_after_utc
    except (OSError, ValueError):
        return None


def expiry_problem(path: str, soon_days: int = 14) -> str | None:
    """What to say of a certificate that has expired, or expires within ``soon_days``."""
    end = certificate_expiry(path)
    if end is None:
        return None
    left = end - dt.datetime.now(dt.UTC)
    if left.total_seconds() <= 0:
        return f"the certificate {path} expired on {end:%Y-%m-%d %H:%M} UTC"
    if left.days < soon_days:
        return f"the certificate {path} expires on {end:%Y-%m-%d %H:%M} UTC ({left.days} day(s) left)"
    return None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
