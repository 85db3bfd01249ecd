"""Trusted token issuers: the presets for well-known ones, the checks of an issuer entry, its resolved form.

Rules of this module:

* Pure: no I/O, no trio. ``issuer_problems`` reports every problem of an entry at once, each as
  ``(path in the policy file, message a person can act on)``; ``resolve_issuer`` turns an entry
  without problems into a ``ResolvedIssuer``.
* An entry's explicit fields override its preset, except ``required_claims``, which add to the
  preset's (a preset's requirement cannot be dropped by accident).
* Issuer URLs and key URLs are HTTPS, always: there is no switch for plain HTTP, not even for
  localhost (the development issuer reads its keys from a file, see ``identity.dev``).
* ``ResolvedIssuer`` is frozen and hashable: the gateway keeps an issuer's JWKS cache across policy
  reloads when its resolved issuer is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from ostiary.policy.model import ALGORITHMS, Issuer

DEFAULT_ALGORITHMS = ("RS256", "ES256")
DEFAULT_MAX_LIFETIME = 3600.0
MAX_CLOCK_SKEW = 300.0


@dataclass(frozen=True)
class ResolvedIssuer:
    """An issuer entry merged with its preset: everything validation and key fetching need.

    Keys come from exactly one of ``jwks_url``, ``jwks_file`` or discovery
    (``{issuer}/.well-known/openid-configuration``). ``attributes`` are the preset's aliases,
    ``(attribute name, dotted claim path)``, added to the attributes flattened from the claims."""

    name: str
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_url: str | None
    jwks_file: str | None
    discovery: bool
    ca: str | None
    clock_skew: float
    max_lifetime: float
    required_claims: tuple[str, ...]
    reject_reused_jti: bool
    name_claim: str
    attributes: tuple[tuple[str, str], ...]
    jwks_ttl: float
    jwks_max_stale: float
    jwks_refresh_min_interval: float
    fetch_timeout: float


@dataclass(frozen=True)
class Preset:
    """What a preset fills in. ``issuer`` None: each install has its own, the entry must give it.
    ``jwks_url`` None: keys come from discovery unless the entry names another source."""

    issuer: str | None
    algorithms: tuple[str, ...]
    max_lifetime: float
    name_claim: str = "sub"
    jwks_url: str | None = None
    required_claims: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()
    issuer_hint: str = ""


# max_lifetime is measured as exp minus the earlier of iat and nbf. What the issuers mint: GitHub
# Actions ID tokens live 5 min with nbf up to 10 min before iat (one published sample from a GitHub
# enterprise shows 6 h: such installs must raise max_lifetime); GitLab's live the job timeout (1 h unless
# the project sets more) plus 5 s; Kubernetes projected tokens 1 h by default, configurable to a day or
# more; SPIRE's JWT-SVIDs 5 min by default.
PRESETS: Mapping[str, Preset] = {
    "github-actions": Preset(
        issuer="https://token.actions.githubusercontent.com",
        algorithms=("RS256",),
        max_lifetime=3600,
    ),
    "gitlab": Preset(
        issuer="https://gitlab.com",
        algorithms=("RS256",),
        max_lifetime=3600 + 300,
    ),
    "google": Preset(
        issuer="https://accounts.google.com",
        algorithms=("RS256",),
        max_lifetime=3600,
        name_claim="email",
        jwks_url="https://www.googleapis.com/oauth2/v3/certs",
        required_claims=("email",),
    ),
    "kubernetes": Preset(
        issuer=None,
        algorithms=("RS256", "ES256"),
        max_lifetime=86400,
        attributes=(
            ("namespace", "kubernetes.io.namespace"),
            ("serviceaccount", "kubernetes.io.serviceaccount.name"),
            ("pod", "kubernetes.io.pod.name"),
        ),
        issuer_hint="the cluster's service-account issuer URL "
        "(the issuer in `kubectl get --raw /.well-known/openid-configuration`)",
    ),
    "spiffe": Preset(
        issuer=None,
        algorithms=("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512"),
        max_lifetime=3600,
        attributes=(("spiffe_id", "sub"),),
        issuer_hint="the URL SPIRE puts in the iss of its JWT-SVIDs (its jwt_issuer setting)",
    ),
}


def issuer_problems(cfg: Issuer, path: str) -> list[tuple[str, str]]:
    """Every problem of an issuer entry; ``path`` is where the entry is in the policy file."""
    problems: list[tuple[str, str]] = []

    def add(where: str, message: str) -> None:
        problems.append((f"{path}.{where}", message))

    preset = PRESETS[cfg.preset] if cfg.preset is not None else None
    if not cfg.name.strip():
        add("name", "an issuer needs a name: identities refer to it")

    issuer = cfg.issuer if cfg.issuer is not None else preset.issuer if preset is not None else None
    if issuer is None:
        if preset is not None:
            add("issuer", f"the {cfg.preset} preset needs issuer: {preset.issuer_hint}")
        else:
            add("issuer", "an issuer needs issuer: the URL its tokens carry in iss (or a preset)")
    elif (why := _https_problem(issuer)) is not None:
        add("issuer", f"issuer {issuer!r} {why}: tokens carry it in iss and keys are fetched from it")

    if not cfg.audiences:
        add(
            "audiences",
            "an issuer without audiences would accept tokens minted for any service: "
            "list the audiences this gateway accepts",
        )
    for i, audience in enumerate(cfg.audiences):
        if not audience.strip():
            add(f"audiences[{i}]", "an empty audience: give the aud value tokens for this gateway carry")

    if cfg.algorithms is not None and not cfg.algorithms:
        add("algorithms", "no algorithms: list those the issuer signs with, or leave it out for the default")
    for i, alg in enumerate(cfg.algorithms or ()):
        if alg.upper().startswith("HS") or alg.lower() == "none":
            add(
                f"algorithms[{i}]",
                f"{alg!r} is never accepted: tokens must be signed with an asymmetric key "
                f"(one of {', '.join(ALGORITHMS)})",
            )
        elif alg not in ALGORITHMS:
            add(f"algorithms[{i}]", f"unknown algorithm {alg!r}: use one of {', '.join(ALGORITHMS)}")

    sources = [n for n, given in (("jwks_url", cfg.jwks_url), ("jwks_file", cfg.jwks_file)) if given]
    if cfg.discovery:
        sources.append("discovery")
    if len(sources) > 1:
        add(
            sources[1],
            f"keys come from exactly one of jwks_url, jwks_file or discovery; "
            f"{' and '.join(sources)} are set",
        )
    elif cfg.discovery is False and not sources and (preset is None or preset.jwks_url is None):
        add(
            "discovery",
            "discovery is off and neither jwks_url nor jwks_file is given: the keys would come from nowhere",
        )
    if cfg.jwks_url is not None and (why := _https_problem(cfg.jwks_url)) is not None:
        add("jwks_url", f"jwks_url {cfg.jwks_url!r} {why}")
    if cfg.jwks_file is not None and not cfg.jwks_file.strip():
        add("jwks_file", "an empty jwks_file: give the path of a JWKS document")

    if not (math.isfinite(cfg.clock_skew) and 0 <= cfg.clock_skew <= MAX_CLOCK_SKEW):
        add("clock_skew", f"clock_skew must be between 0 and {MAX_CLOCK_SKEW:g} seconds")
    if cfg.max_lifetime is not None and not _positive(cfg.max_lifetime):
        add(
            "max_lifetime",
            "max_lifetime must be a positive number of seconds (the longest exp - iat accepted)",
        )
    for field in ("jwks_ttl", "jwks_max_stale", "fetch_timeout"):
        if not _positive(getattr(cfg, field)):
            add(field, f"{field} must be a positive number of seconds")
    if _positive(cfg.jwks_ttl) and _positive(cfg.jwks_max_stale) and cfg.jwks_max_stale < cfg.jwks_ttl:
        add(
            "jwks_max_stale",
            "jwks_max_stale must be at least jwks_ttl, or keys would go stale between refreshes",
        )
    if not (math.isfinite(cfg.jwks_refresh_min_interval) and cfg.jwks_refresh_min_interval >= 1):
        add("jwks_refresh_min_interval", "jwks_refresh_min_interval must be at least 1 second")

    if cfg.name_claim is not None and not cfg.name_claim.strip():
        add("name_claim", "an empty name_claim: name the claim that identifies the workload (sub by default)")
    for i, claim in enumerate(cfg.required_claims):
        if not claim.strip():
            add(f"required_claims[{i}]", "an empty claim name")
    return problems


def resolve_issuer(cfg: Issuer) -> ResolvedIssuer:
    """The issuer entry merged with its preset. Raises ValueError if ``issuer_problems`` finds any."""
    problems = issuer_problems(cfg, cfg.name)
    if problems:
        raise ValueError("; ".join(f"{where}: {message}" for where, message in problems))
    preset = PRESETS[cfg.preset] if cfg.preset is not None else None
    issuer = cfg.issuer if cfg.issuer is not None else preset.issuer if preset is not None else None
    assert issuer is not None  # issuer_problems reports a missing one

    jwks_url, jwks_file, discovery = cfg.jwks_url, cfg.jwks_file, bool(cfg.discovery)
    if not (jwks_url or jwks_file or discovery):
        jwks_url = preset.jwks_url if preset is not None else None
        discovery = jwks_url is None

    if cfg.algorithms is not None:
        algorithms: tuple[str, ...] = tuple(cfg.algorithms)
    else:
        algorithms = preset.algorithms if preset is not None else DEFAULT_ALGORITHMS
    if cfg.max_lifetime is not None:
        max_lifetime = cfg.max_lifetime
    else:
        max_lifetime = preset.max_lifetime if preset is not None else DEFAULT_MAX_LIFETIME
    required = (preset.required_claims if preset is not None else ()) + tuple(cfg.required_claims)

    return ResolvedIssuer(
        name=cfg.name,
        issuer=issuer,
        audiences=tuple(cfg.audiences),
        algorithms=algorithms,
        jwks_url=jwks_url,
        jwks_file=jwks_file,
        discovery=discovery,
        ca=cfg.ca,
        clock_skew=cfg.clock_skew,
        max_lifetime=max_lifetime,
        required_claims=tuple(dict.fromkeys(required)),
        reject_reused_jti=cfg.reject_reused_jti,
        name_claim=cfg.name_claim or (preset.name_claim if preset is not None else "sub"),
        attributes=preset.attributes if preset is not None else (),
        jwks_ttl=cfg.jwks_ttl,
        jwks_max_stale=cfg.jwks_max_stale,
        jwks_refresh_min_interval=cfg.jwks_refresh_min_interval,
        fetch_timeout=cfg.fetch_timeout,
    )


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _https_problem(url: str) -> str | None:
    """Why ``url`` is not an acceptable HTTPS URL, or None."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme != "https":
        return "is not an https:// URL"
    if not parts.hostname or parts.username is not None or parts.password is not None:
        return "needs a host name and no user information"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None
