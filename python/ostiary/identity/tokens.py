"""Token (JWT) validation: from a bearer token to an ``Identity``, or a rejection that says why.

Rules of this module:

* Every check has its own reason text, and a reason never contains the token, its signature or key
  material; the values it may name (iss, kid, alg, aud) are attacker-controlled and cut by ``shown``.
* The header is checked before any key is looked up: ``alg`` must be asymmetric and accepted by the
  issuer named in the (still unverified) ``iss``; ``none`` and HMAC are refused outright, which also
  shuts out the RSA-public-key-as-HMAC-secret confusion. Critical header extensions are refused.
* pyjwt verifies the signature, the audience and the issuer with exactly the token's ``alg`` and the
  issuer's key for it. Times are checked here, against the injectable clock: ``exp`` and ``iat`` are
  required and finite, ``nbf`` optional, each with the issuer's ``clock_skew``; the lifetime (``exp``
  minus the earlier of ``iat`` and ``nbf``) may not exceed the issuer's ``max_lifetime``.
* With ``reject_reused_jti``, a token opens one session: its ``jti`` is remembered until its ``exp``
  (plus skew) and a second use is refused. A login validating the token only holds the jti (another
  login with it is refused meanwhile, so two at once cannot both get in); the gateway commits it once
  the session is admitted and logged in upstream, and releases it when the login fails for another
  reason (no grant, several grants, the upstream down), so the token can be used for a corrected try.
  Validations that open no session (the admin API's) pass ``remember=False`` and neither consult nor
  change the memory. The memory is bounded: when it is full of unexpired entries, tokens of such
  issuers are refused (28000) rather than anything forgotten. It lives in this process only: gateway
  instances behind one address do not share it (a shared store arrives with the audit/store work). It
  carries over policy reloads (``configure``).
* Attributes (what policy matches on) are strings; see ``claim_attributes`` for how claims become them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import heapq
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import jwt
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from ostiary.errors import AuthenticationFailed
from ostiary.identity import Identity
from ostiary.identity.issuers import ResolvedIssuer
from ostiary.identity.jwks import JwksCache, shown
from ostiary.identity.spiffe import spiffe_trust_domain

MAX_TOKEN_BYTES = 16 * 1024
MAX_HEADER_SEGMENT = 4096
MAX_CLAIM_DEPTH = 8
DEFAULT_JTI_CAPACITY = 100_000
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})

_SEGMENT = re.compile(rb"[A-Za-z0-9_-]*")


def looks_like_jwt(secret: bytes) -> bool:
    """Whether a presented password is shaped like a JWS compact token (three base64url segments, the
    first a JSON object with ``alg``). Cheap; a static password will not look like one."""
    parts = secret.split(b".")
    if len(parts) != 3 or not parts[0] or not parts[1] or len(parts[0]) > MAX_HEADER_SEGMENT:
        return False
    if not all(_SEGMENT.fullmatch(part) for part in parts):
        return False
    header = _json_segment(parts[0])
    return isinstance(header, dict) and "alg" in header


def claim_attributes(claims: Mapping[str, Any], aliases: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    """The claims as policy attributes, all strings.

    Scalars become attributes under their claim name; nested objects are flattened with dotted names
    (``{"kubernetes.io": {"namespace": "x"}}`` gives ``kubernetes.io.namespace``), down to
    ``MAX_CLAIM_DEPTH`` levels. Strings stay as they are, booleans become ``true``/``false``, numbers
    their decimal form; null is left out. Lists are left out: a joined list would let a glob match
    across elements (``aud`` is the exception, as the audience that matched, set by the validator).
    Then each alias ``(attribute, dotted claim path)`` of the issuer's preset is set from the claim at
    that path, replacing a claim of the same name (and removing it when the path holds no scalar), so a
    preset attribute always means what the preset says. A ``spiffe_id`` that is not a valid SPIFFE ID
    is dropped; a valid one adds ``trust_domain``.
    """
    attributes: dict[str, str] = {}
    _flatten(claims, "", attributes, 0)
    for name, path in aliases:
        value = _attribute_value(claim_at(claims, path))
        if value is None:
            attributes.pop(name, None)
        else:
            attributes[name] = value
    spiffe_id = attributes.pop("spiffe_id", None)
    attributes.pop("trust_domain", None)
    if spiffe_id is not None and (trust_domain := spiffe_trust_domain(spiffe_id)) is not None:
        attributes["spiffe_id"] = spiffe_id
        attributes["trust_domain"] = trust_domain
    return attributes


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim at a dotted path, or None. Claim names may hold dots themselves (``kubernetes.io``):
    at each level the shortest name that exists is taken first, then longer ones."""
    parts = path.split(".")

    def walk(value: Any, start: int) -> Any:
        if start == len(parts):
            return value
        if not isinstance(value, dict):
            return None
        for end in range(start + 1, len(parts) + 1):
            key = ".".join(parts[start:end])
            if key in value and (found := walk(value[key], end)) is not None:
                return found
        return None

    return walk(claims, 0)


class SeenTokens:
    """The ``jti`` of tokens already used or held by a login under way, each until its expiry, at most
    ``capacity`` at a time. Keys are ``(issuer URL, jti)``. A key is used, held, or free (held by a
    login that then failed: the next login may hold it again); free keys stay until they expire, so
    a token tried again and again costs no more memory."""

    def __init__(self, capacity: int = DEFAULT_JTI_CAPACITY) -> None:
        self.capacity = capacity
        self._until: dict[tuple[str, str], float] = {}
        self._expiries: list[tuple[float, tuple[str, str]]] = []  # heap of (until, key)
        self._held: set[tuple[str, str]] = set()
        self._free: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        return len(self._until)

    def hold(self, key: tuple[str, str], until: float, now: float) -> None:
        """Hold a key not used yet for a login, or raise AuthenticationFailed: 28P01 for a token used
        already or held by another login, 28000 when full."""
        while self._expiries and self._expiries[0][0] <= now:
            expiry, gone = heapq.heappop(self._expiries)
            if self._until.get(gone) == expiry:
                del self._until[gone]
                self._held.discard(gone)
                self._free.discard(gone)
        if key in self._held:
            raise AuthenticationFailed(
                "28P01", "token is in use by another login that has not finished (its jti was seen before)"
            )
        if key in self._free:
            self._free.discard(key)
            self._held.add(key)
            if until > self._until[key]:
                self._until[key] = until
                heapq.heappush(self._expiries, (until, key))
            return
        if key in self._until:
            raise AuthenticationFailed("28P01", "token was already used (its jti was seen before)")
        if len(self._until) >= self.capacity:
            raise AuthenticationFailed(
                "28000",
                f"the gateway remembers {self.capacity} unexpired token ids already and would have to "
                "forget one to accept another (reject_reused_jti): try again later",
            )
        self._until[key] = until
        self._held.add(key)
        heapq.heappush(self._expiries, (until, key))

    def commit(self, key: tuple[str, str]) -> None:
        """A held key is used for good (until it expires)."""
        self._held.discard(key)

    def release(self, key: tuple[str, str]) -> None:
        """A held key was not used after all: the next login may hold it."""
        if key in self._held:
            self._held.discard(key)
            self._free.add(key)


class TokenValidator:
    """Validates tokens of the configured issuers. ``caches`` maps issuer names to their JWKS caches."""

    def __init__(
        self,
        issuers: Sequence[ResolvedIssuer],
        caches: Mapping[str, JwksCache],
        *,
        clock: Callable[[], float] = time.time,
        jti_capacity: int = DEFAULT_JTI_CAPACITY,
        key_wait: float | None = None,
    ) -> None:
        """``key_wait``: how long a validation waits for a refresh of the issuer's keys (a token
        naming a key not fetched yet) at most; None for the issuer's ``fetch_timeout``."""
        self._clock = clock
        self.key_wait = key_wait
        self.seen = SeenTokens(jti_capacity)
        self._by_url: dict[str, ResolvedIssuer] = {}
        self._caches: Mapping[str, JwksCache] = {}
        self.configure(issuers, caches)

    def configure(self, issuers: Sequence[ResolvedIssuer], caches: Mapping[str, JwksCache]) -> None:
        """Use these issuers from now on (a policy reload); the memory of used token ids is kept.
        Raises ValueError if two issuers share an issuer URL or an issuer has no cache."""
        by_url: dict[str, ResolvedIssuer] = {}
        for issuer in issuers:
            if issuer.issuer in by_url:
                raise ValueError(
                    f"issuers {by_url[issuer.issuer].name} and {issuer.name} have the same issuer URL "
                    f"{issuer.issuer}"
                )
            if issuer.name not in caches:
                raise ValueError(f"issuer {issuer.name} has no JWKS cache")
            by_url[issuer.issuer] = issuer
        self._by_url = by_url
        self._caches = dict(caches)

    async def validate(self, token: bytes | str, *, remember: bool = True) -> Identity:
        """The identity of a valid token; AuthenticationFailed (28P01 for the token, 28000 when the
        gateway cannot decide, such as unavailable keys) otherwise. With ``reject_reused_jti`` and
        ``remember``, the token's jti is held for this login: the caller must ``commit`` or
        ``release`` the identity (until then the token is refused to others, which fails closed)."""
        raw = _as_bytes(token)
        header, unverified = _unverified_parts(raw)
        alg = header.get("alg")
        if not isinstance(alg, str):
            _reject("token header has no alg")
        if alg.lower() == "none":
            _reject("unsigned tokens (alg none) are not accepted")
        if alg.upper() in HMAC_ALGORITHMS:
            _reject("symmetric (HMAC) algorithms are not accepted")
        if "crit" in header or "b64" in header:
            _reject("token header uses critical extensions (crit, b64), which are not supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            _reject("token header kid is not a string")
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            _reject("token has no iss (issuer) claim")
        issuer = self._by_url.get(iss)
        if issuer is None:
            _reject(f"untrusted issuer {shown(iss)}: no issuer of the policy has this URL")
        if alg not in issuer.algorithms:
            _reject(
                f"algorithm {shown(alg)} is not accepted for issuer {issuer.name} "
                f"(accepted: {', '.join(issuer.algorithms)})"
            )

        key = await self._caches[issuer.name].key_for(kid, alg, wait=self.key_wait)
        claims = _verified_claims(raw, key, alg, issuer, kid)

        now = self._clock()
        skew = issuer.clock_skew
        exp = _time_claim(claims, "exp")
        iat = _time_claim(claims, "iat")
        nbf = _time_claim(claims, "nbf") if claims.get("nbf") is not None else None
        if exp <= now - skew:
            _reject(f"token expired {now - exp:.0f} s ago")
        if iat > now + skew:
            _reject(f"token is not valid yet: iat is {iat - now:.0f} s ahead of the gateway's clock")
        if nbf is not None and nbf > now + skew:
            _reject(f"token is not valid yet: nbf is {nbf - now:.0f} s ahead of the gateway's clock")
        lifetime = exp - (iat if nbf is None else min(iat, nbf))
        if lifetime > issuer.max_lifetime:
            _reject(
                f"token lifetime {lifetime:.0f} s is longer than the {issuer.max_lifetime:g} s issuer "
                f"{issuer.name} accepts (max_lifetime)"
            )
        for required in issuer.required_claims:
            if claim_at(claims, required) is None:
                _reject(f"token lacks claim {required}, which issuer {issuer.name} requires")
        name = claim_at(claims, issuer.name_claim)
        if not isinstance(name, str) or not name:
            _reject(f"token has no {issuer.name_claim} claim (a non-empty string) to name the identity by")

        held = None
        if issuer.reject_reused_jti:
            jti = claims.get("jti")
            if not isinstance(jti, str) or not jti:
                _reject(f"token has no jti claim, and issuer {issuer.name} rejects reused tokens")
            if remember:
                held = (issuer.issuer, jti)

        attributes = claim_attributes(claims, issuer.attributes)
        attributes["issuer"] = issuer.issuer
        if isinstance(claims.get("sub"), str):
            attributes["subject"] = claims["sub"]
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        attributes["aud"] = next(a for a in issuer.audiences if a in audiences)
        if held is not None:
            # Last: a validation that fails after holding would leave the token held until it expires.
            self.seen.hold(held, exp + skew, now)
        return Identity(
            name=name, issuer=issuer.name, method="token", attributes=attributes, expires=exp, jti=held
        )

    def commit(self, identity: Identity) -> None:
        """The login of ``identity`` became a session: its token's jti is used for good."""
        if identity.jti is not None:
            self.seen.commit(identity.jti)

    def release(self, identity: Identity) -> None:
        """The login of ``identity`` did not become a session: its token may be used again (no-op
        once committed)."""
        if identity.jti is not None:
            self.seen.release(identity.jti)


def _reject(reason: str) -> NoReturn:
    raise AuthenticationFailed("28P01", reason)


def _as_bytes(token: bytes | str) -> bytes:
    if isinstance(token, str):
        try:
            token = token.encode("ascii")
        except UnicodeEncodeError:
            _reject("not a JWT: the token has characters outside base64url")
    if len(token) > MAX_TOKEN_BYTES:
        _reject(f"token is longer than {MAX_TOKEN_BYTES} bytes")
    return token


def _unverified_parts(raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, not yet verified: only to choose the issuer, key and algorithm."""
    parts = raw.split(b".")
    if len(parts) != 3 or not all(_SEGMENT.fullmatch(part) for part in parts):
        _reject("not a JWT: expected three base64url segments separated by dots")
    header = _json_segment(parts[0])
    if not isinstance(header, dict):
        _reject("not a JWT: the header is not a base64url JSON object")
    claims = _json_segment(parts[1])
    if not isinstance(claims, dict):
        _reject("not a JWT: the claims are not a base64url JSON object")
    for what, value in (("header", header), ("claims", claims)):
        if not _is_unicode(value):
            # JSON may escape an unpaired surrogate (\ud800), which no UTF-8 text holds: such a value
            # could be neither matched by policy nor written to a client or the log.
            _reject(f"not a JWT: text in the {what} is not valid Unicode (an unpaired surrogate)")
    return header, claims


def _is_unicode(value: Any) -> bool:
    """Whether every string in a parsed JSON value, object keys included, can be encoded as UTF-8.
    Iterative: the value may be nested as deep as the JSON parser allowed."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return False
    return True


def _json_segment(segment: bytes) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        return None


def _verified_claims(
    raw: bytes, key: jwt.PyJWK, alg: str, issuer: ResolvedIssuer, kid: str | None
) -> dict[str, Any]:
    """pyjwt's checks: signature, issuer, audience, exp and iat present, sub and jti strings if present."""
    try:
        return jwt.decode(
            raw,
            key=key.key,
            algorithms=[alg],
            audience=list(issuer.audiences),
            issuer=issuer.issuer,
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "require": ["exp", "iat"],
            },
        )
    except jwt.InvalidSignatureError:
        _reject(f"bad signature (key kid {shown(kid)} of issuer {issuer.name})")
    except jwt.MissingRequiredClaimError as e:
        _reject(f"token has no {e.claim} claim")
    except jwt.InvalidAudienceError:
        _reject(f"token audience is not one this gateway accepts for issuer {issuer.name}")
    except jwt.InvalidIssuerError:
        _reject(f"token iss does not match issuer {issuer.name}")
    except InvalidSubjectError:
        _reject("token sub claim is not a string")
    except InvalidJTIError:
        _reject("token jti claim is not a string")
    except jwt.PyJWTError as e:
        _reject(f"malformed token ({type(e).__name__})")


def _time_claim(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    seconds = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        # An integer beyond the float range (JSON allows a 1 followed by 400 zeros) cannot be a time.
        with contextlib.suppress(OverflowError):
            seconds = float(value)
    if not math.isfinite(seconds):
        _reject(f"token {name} claim is not a finite number of seconds")
    return seconds


def _flatten(claims: Mapping[str, Any], prefix: str, into: dict[str, str], depth: int) -> None:
    for name, value in claims.items():
        if isinstance(value, dict):
            if depth + 1 < MAX_CLAIM_DEPTH:
                _flatten(value, f"{prefix}{name}.", into, depth + 1)
        elif (text := _attribute_value(value)) is not None:
            into[f"{prefix}{name}"] = text


def _attribute_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None
