"""The signing keys of one trusted issuer: fetched, cached, refreshed, and chosen for a token's kid and alg.

Theory of operation. ``JwksCache.run`` (a task in the gateway's nursery) is the only code that fetches:
once at start, then every ``jwks_ttl`` seconds, after a failure again on a backoff schedule, and sooner
when ``key_for`` asks because a token names a key the cache does not hold or the keys went stale. Such
asks are rate limited (one fetch per ``jwks_refresh_min_interval``) and every caller that asks while a
fetch is under way waits for that same fetch, at most ``fetch_timeout`` seconds (or the shorter wait
the caller gives: a login must not spend its whole startup timeout on a slow issuer); a fetch the
caller stopped waiting for goes on. A fetch is blocking stdlib I/O and parsing in a worker thread
(``trio.to_thread``): the trio loop never blocks on it. A policy reload that changes an issuer but not
where its keys come from hands the old cache's keys to the new one (``keys_from``), so a reload during
an issuer outage does not throw away keys ``jwks_max_stale`` still allows.

Rules of this module:

* HTTPS only, certificate and host name verified (against the issuer's ``ca`` or the system roots);
  a redirect may not leave HTTPS; discovery's ``jwks_uri`` must be HTTPS and the discovery document
  must name our issuer. Nothing else (file:, ftp:, data:) can be opened by a fetch.
* Bounded: each document is at most ``MAX_DOCUMENT_BYTES`` and a key set at most ``MAX_KEYS`` keys; a
  whole fetch (connection, TLS handshake, status line, headers, body, discovery included) gives up
  after ``fetch_timeout``: each socket operation gets only the time left (``_DeadlineSocket``; a per
  read timeout alone let a server sending a byte a second hold a fetch open for ever), and the trio
  side stops waiting for the worker thread at the same deadline. Such a fetch is a failed one.
* A fetched set replaces the previous one whole: a key the issuer withdrew stops working at the next
  refresh. A failed fetch, or a set without one usable key, keeps the previous set.
* One unusable key never spoils the set: it is skipped and logged. Unusable: not for signatures
  (``use`` other than ``sig``, ``key_ops`` without ``verify``), symmetric (``oct``), carrying private
  key members, of an unsupported type or curve, RSA below 2048 bits, or not decodable.
* Fail closed: keys are usable until ``jwks_max_stale`` seconds after the last successful fetch;
  after that, and before any success, ``key_for`` raises ``AuthenticationFailed("28000", ...)``.
* Reasons (which clients see) name the issuer, kid and alg (cut by ``shown``), never key material;
  why fetches fail (URLs, network errors) goes to the log and ``describe``, not to clients.
"""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from ostiary.errors import AuthenticationFailed
from ostiary.identity import printable
from ostiary.identity.issuers import ResolvedIssuer

log = logging.getLogger("ostiary.identity")

MAX_DOCUMENT_BYTES = 1 << 20
MAX_KEYS = 100
MIN_RSA_BITS = 2048
RETRY_FIRST = 2.0  # seconds before the first retry after a failed fetch, doubling up to RETRY_MAX
RETRY_MAX = 60.0
READ_SIZE = 64 * 1024

# What key can verify each algorithm: (kty, accepted curves or None for RSA).
KEY_TYPES: dict[str, tuple[str, frozenset[str] | None]] = {
    **{alg: ("RSA", None) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
# The algorithm pyjwt needs to build each kind of key (the key object is the same for every
# algorithm of its type; the token's own alg is checked against KEY_TYPES).
_BUILD_AS = {
    ("EC", "P-256"): "ES256",
    ("EC", "P-384"): "ES384",
    ("OKP", "Ed25519"): "EdDSA",
    ("OKP", "Ed448"): "EdDSA",
}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def shown(value: object) -> str:
    """Attacker-controlled text (kid, alg, iss, URLs) as ``printable`` makes it, quoted."""
    return f"'{printable(value)}'"


@dataclass(frozen=True)
class _Key:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own "alg", if it declares one
    jwk: jwt.PyJWK

    def unfit_for(self, alg: str) -> str | None:
        """Why this key cannot verify a token signed with ``alg``, or None if it can."""
        kty, curves = KEY_TYPES.get(alg, ("", None))
        if self.kty != kty:
            return f"is an {self.kty} key, which cannot verify {shown(alg)}"
        if curves is not None and self.crv not in curves:
            return f"is on curve {self.crv}, which cannot verify {shown(alg)}"
        if self.alg is not None and self.alg != alg:
            return f"is declared for {shown(self.alg)}, not {shown(alg)}"
        return None


class _FetchError(Exception):
    """A fetch failed; the message is for the log and the 28000 reason (no key material)."""


class _UnusableKey(Exception):
    """One key of a set cannot be used; the message says why."""


class _DeadlineSocket(ssl.SSLSocket):
    """A TLS socket whose every operation (handshake, read, write) gets only the time left before
    ``deadline`` (monotonic), and none once it has passed. Made per fetch by ``_deadline_socket``."""

    deadline = 0.0

    def _time_left(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("took longer than fetch_timeout")
        self.settimeout(left)

    def do_handshake(self, *args: Any, **kwargs: Any) -> None:
        self._time_left()
        super().do_handshake(*args, **kwargs)

    def read(self, *args: Any, **kwargs: Any) -> Any:
        self._time_left()
        return super().read(*args, **kwargs)

    def send(self, *args: Any, **kwargs: Any) -> int:
        self._time_left()
        return super().send(*args, **kwargs)


def _deadline_socket(deadline: float) -> type[ssl.SSLSocket]:
    """A ``_DeadlineSocket`` class for one fetch (the TLS handshake runs as the socket is made, so the
    deadline must be known by its class)."""
    return type("_FetchSocket", (_DeadlineSocket,), {"deadline": deadline})


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme != "https":
            raise _FetchError(f"{shown(req.full_url)} redirects to {shown(newurl)}, which is not HTTPS")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class JwksCache:
    """The keys of one issuer. Run ``run`` in a nursery; ask ``key_for`` for the key of a token.

    ``keys_from``: the cache this one replaces (a policy reload changed the issuer). When both take
    their keys from the same place (``same_key_source``), its keys and the time of its last success
    carry over: ``jwks_max_stale`` still counts from the last fetch that really succeeded."""

    def __init__(
        self,
        issuer: ResolvedIssuer,
        *,
        clock: Callable[[], float] = time.time,
        keys_from: JwksCache | None = None,
    ) -> None:
        self.issuer = issuer
        self._clock = clock
        self._keys: tuple[_Key, ...] = ()
        self.last_success: float | None = None  # clock time of the last successful fetch
        self.last_attempt: float | None = None
        self.last_error: str | None = None
        self._failures = 0
        if keys_from is not None and same_key_source(keys_from.issuer, issuer):
            self._keys = keys_from._keys
            self.last_success = keys_from.last_success
            self.last_error = keys_from.last_error
        self._fetching = False
        self._wake = trio.Event()  # set by key_for to ask run for a fetch now
        self._fetched = trio.Event()  # set when the next fetch ends, then replaced

    @property
    def key_count(self) -> int:
        return len(self._keys)

    @property
    def source(self) -> str:
        """Where the keys come from, for status pages and log lines."""
        if self.issuer.jwks_file is not None:
            return f"file {self.issuer.jwks_file}"
        if self.issuer.jwks_url is not None:
            return self.issuer.jwks_url
        return f"discovery {self._discovery_url()}"

    def describe(self) -> dict[str, Any]:
        """Status for health endpoints."""
        return {
            "issuer": self.issuer.name,
            "source": self.source,
            "keys": self.key_count,
            "kids": [key.kid for key in self._keys],
            "last_success": self.last_success,
            "last_attempt": self.last_attempt,
            "last_error": self.last_error,
            "usable": self._unusable_reason() is None,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch now (a failure is logged, not raised), report started, then keep the keys fresh."""
        await self._fetch()
        task_status.started()
        while True:
            if self._failures:
                delay = min(self.issuer.jwks_ttl, RETRY_MAX, RETRY_FIRST * 2 ** (self._failures - 1))
            else:
                delay = self.issuer.jwks_ttl
            with trio.move_on_after(delay):
                await self._wake.wait()
            await self._fetch()

    async def key_for(self, kid: str | None, alg: str, *, wait: float | None = None) -> jwt.PyJWK:
        """The key that verifies a token with header ``kid`` and ``alg`` (``alg`` already accepted by the
        issuer). A refresh this needs is waited for at most ``wait`` seconds (never more than
        ``fetch_timeout``). Raises AuthenticationFailed: 28P01 for a key the issuer does not have or
        that does not fit ``alg``, 28000 when the issuer's keys are unavailable, which includes a
        refresh for an unknown kid that did not end within the wait (it goes on: a retry may find it)."""
        waited = self.issuer.fetch_timeout if wait is None else min(wait, self.issuer.fetch_timeout)
        ended = True
        if not self._with_kid(kid) or self._unusable_reason() is not None:
            ended = await self._refresh(waited)
        if (unusable := self._unusable_reason()) is not None:
            raise AuthenticationFailed("28000", unusable)
        found = self._with_kid(kid)
        name = self.issuer.name
        if not found and not ended:
            raise AuthenticationFailed(
                "28000",
                f"keys of issuer {name} are unavailable: fetching them for kid {shown(kid)} took longer "
                f"than {waited:g} s; try again",
            )
        if kid is None:
            fitting = [key for key in found if key.unfit_for(alg) is None]
            if len(fitting) == 1:
                return fitting[0].jwk
            if not fitting:
                raise AuthenticationFailed(
                    "28P01", f"token has no kid and issuer {name} has no key for {shown(alg)}"
                )
            raise AuthenticationFailed("28P01", f"token has no kid and issuer {name} has several keys")
        if not found:
            raise AuthenticationFailed("28P01", f"unknown signing key (kid {shown(kid)}) for issuer {name}")
        reasons = []
        for key in found:
            if (why := key.unfit_for(alg)) is None:
                return key.jwk
            reasons.append(why)
        raise AuthenticationFailed("28P01", f"signing key kid {shown(kid)} of issuer {name} {reasons[0]}")

    def _with_kid(self, kid: str | None) -> list[_Key]:
        return [key for key in self._keys if kid is None or key.kid == kid]

    def _unusable_reason(self) -> str | None:
        """Why no key of this issuer may be used now (never fetched, or stale), or None. Clients see
        it: the cause of the failed fetches (URLs, network errors) stays in the log and ``describe``."""
        name = self.issuer.name
        if self.last_success is None:
            return f"the keys of issuer {name} could not be fetched (the gateway's log says why)"
        age = self._clock() - self.last_success
        if age > self.issuer.jwks_max_stale:
            return (
                f"keys of issuer {name} are unavailable: the last successful fetch was {age:.0f} s ago, "
                f"more than jwks_max_stale ({self.issuer.jwks_max_stale:g} s)"
            )
        return None

    async def _refresh(self, wait: float) -> bool:
        """Have ``run`` fetch (unless one started less than jwks_refresh_min_interval ago) and wait for
        the fetch under way or asked for, at most ``wait`` seconds. False if that fetch had not ended
        by then (it goes on without this caller)."""
        if not self._fetching:
            if (
                self.last_attempt is not None
                and self._clock() - self.last_attempt < self.issuer.jwks_refresh_min_interval
            ):
                return True
            self._wake.set()
        fetched = self._fetched
        with trio.move_on_after(wait):
            await fetched.wait()
        return fetched.is_set()

    async def _fetch(self) -> None:
        self._wake = trio.Event()
        self._fetching = True
        self.last_attempt = self._clock()
        try:
            # The worker thread keeps to the same deadline (``_load``), so it does not outlive an
            # abandoned fetch by more than a moment; this bound also covers what the thread cannot
            # (a name lookup, a proxy's CONNECT).
            with trio.move_on_after(self.issuer.fetch_timeout) as waiting:
                loaded = await trio.to_thread.run_sync(self._load, abandon_on_cancel=True)
            if waiting.cancelled_caught:
                raise _FetchError(
                    f"{self.source}: no keys within fetch_timeout ({self.issuer.fetch_timeout:g} s)"
                )
            keys, skipped = loaded
        except Exception as e:
            # A fetch must not end the gateway: anything unforeseen counts as a failed fetch too.
            self._failures += 1
            self.last_error = str(e) if isinstance(e, _FetchError) else f"unexpected {type(e).__name__}: {e}"
            log.warning(
                "issuer %s: fetching keys failed (%d in a row), keeping %d keys: %s",
                self.issuer.name,
                self._failures,
                len(self._keys),
                self.last_error,
                exc_info=not isinstance(e, _FetchError),
            )
        else:
            for why in skipped:
                log.warning("issuer %s: skipped a key of %s: %s", self.issuer.name, self.source, why)
            changed = {k.kid for k in keys} != {k.kid for k in self._keys} if self._keys else True
            self._keys = keys
            self.last_success = self._clock()
            self.last_error = None
            self._failures = 0
            # Said when the keys change (at start, on rotation); a refresh that finds the same
            # kids is a debug line, not one every TTL.
            log.log(
                logging.INFO if changed else logging.DEBUG,
                "issuer %s: %d keys from %s",
                self.issuer.name,
                len(keys),
                self.source,
            )
        finally:
            self._fetching = False
            fetched, self._fetched = self._fetched, trio.Event()
            fetched.set()

    # Everything below runs in a worker thread.

    def _load(self) -> tuple[tuple[_Key, ...], list[str]]:
        """Fetch and parse the key set: (usable keys, why each other key was skipped)."""
        deadline = time.monotonic() + self.issuer.fetch_timeout
        try:
            if self.issuer.jwks_file is not None:
                with open(self.issuer.jwks_file, "rb") as f:
                    data = f.read(MAX_DOCUMENT_BYTES + 1)
                if len(data) > MAX_DOCUMENT_BYTES:
                    raise _FetchError(f"{self.source} is larger than {MAX_DOCUMENT_BYTES} bytes")
                return _parse_key_set(data, self.source)
            opener = self._opener(deadline)
            url = self.issuer.jwks_url
            if url is None:
                url = self._jwks_uri_from_discovery(opener, deadline)
            return _parse_key_set(_get(opener, url, deadline), url)
        except (OSError, ValueError, RecursionError, http.client.HTTPException) as e:
            raise _FetchError(f"{type(e).__name__}: {e}") from e

    def _opener(self, deadline: float) -> urllib.request.OpenerDirector:
        """An opener that speaks HTTPS only (no http:, file:, ftp: or data: handlers), whose sockets
        give up at ``deadline`` (monotonic)."""
        context = ssl.create_default_context(cafile=self.issuer.ca)
        context.sslsocket_class = _deadline_socket(deadline)
        opener = urllib.request.OpenerDirector()
        for handler in (
            urllib.request.ProxyHandler(),
            urllib.request.HTTPSHandler(context=context),
            _HttpsOnlyRedirects(),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
        ):
            opener.add_handler(handler)
        return opener

    def _discovery_url(self) -> str:
        return self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"

    def _jwks_uri_from_discovery(self, opener: urllib.request.OpenerDirector, deadline: float) -> str:
        url = self._discovery_url()
        document = json.loads(_get(opener, url, deadline))
        if not isinstance(document, dict):
            raise _FetchError(f"the discovery document at {url} is not a JSON object")
        if document.get("issuer") != self.issuer.issuer:
            raise _FetchError(
                f"the discovery document at {url} names issuer {shown(document.get('issuer'))}, "
                f"not {shown(self.issuer.issuer)}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urllib.parse.urlsplit(jwks_uri).scheme != "https":
            raise _FetchError(
                f"the discovery document at {url} has jwks_uri {shown(jwks_uri)}, not an https:// URL"
            )
        return jwks_uri


def same_key_source(a: ResolvedIssuer, b: ResolvedIssuer) -> bool:
    """Whether two issuer entries fetch the same keys the same way: the same JWKS URL, file or
    discovery document (named by the issuer URL), trusted with the same ``ca``."""

    def source(i: ResolvedIssuer) -> tuple[object, ...]:
        where = i.jwks_file or i.jwks_url or i.issuer.rstrip("/")
        return (i.jwks_file is not None, i.jwks_url is not None, where, i.ca)

    return source(a) == source(b)


def _get(opener: urllib.request.OpenerDirector, url: str, deadline: float) -> bytes:
    """GET ``url``: the body, at most MAX_DOCUMENT_BYTES, read before ``deadline`` (monotonic)."""
    if urllib.parse.urlsplit(url).scheme != "https":
        raise _FetchError(f"{shown(url)} is not an https:// URL")
    timeout = max(deadline - time.monotonic(), 0.001)
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "ostiary"})
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        raise _FetchError(f"GET {url}: HTTP {e.code} {e.reason}") from None
    with response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > MAX_DOCUMENT_BYTES:
            raise _FetchError(f"GET {url}: the document is larger than {MAX_DOCUMENT_BYTES} bytes")
        body = bytearray()
        while chunk := response.read1(READ_SIZE):
            body += chunk
            if len(body) > MAX_DOCUMENT_BYTES:
                raise _FetchError(f"GET {url}: the document is larger than {MAX_DOCUMENT_BYTES} bytes")
            if time.monotonic() > deadline:
                raise _FetchError(f"GET {url}: took longer than fetch_timeout")
    return bytes(body)


def _parse_key_set(data: bytes, where: str) -> tuple[tuple[_Key, ...], list[str]]:
    document = json.loads(data)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _FetchError(f"{where} is not a JWKS document (an object with a keys list)")
    entries = document["keys"]
    if len(entries) > MAX_KEYS:
        raise _FetchError(f"{where} has {len(entries)} keys, more than the {MAX_KEYS} accepted")
    keys: list[_Key] = []
    skipped: list[str] = []
    for i, entry in enumerate(entries):
        try:
            keys.append(_parse_key(entry))
        except _UnusableKey as e:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            skipped.append(f"key {i} (kid {shown(kid)}): {e}")
    if not keys:
        raise _FetchError(f"{where} has no usable key ({'; '.join(skipped) or 'the set is empty'})")
    return tuple(keys), skipped


def _parse_key(entry: object) -> _Key:
    if not isinstance(entry, dict):
        raise _UnusableKey("not a JSON object")
    kty, crv, kid, alg = (entry.get(member) for member in ("kty", "crv", "kid", "alg"))
    if kid is not None and not isinstance(kid, str):
        raise _UnusableKey("its kid is not a string")
    if alg is not None and not isinstance(alg, str):
        raise _UnusableKey("its alg is not a string")
    if entry.get("use", "sig") != "sig":
        raise _UnusableKey(f"its use is {shown(entry.get('use'))}, not 'sig'")
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise _UnusableKey("its key_ops do not include 'verify'")
    if kty == "oct":
        raise _UnusableKey("a symmetric (oct) key: symmetric keys are never accepted")
    if _PRIVATE_MEMBERS & entry.keys():
        raise _UnusableKey("it carries private key members")
    if kty == "RSA":
        build_as = "RS256"
    elif kty in ("EC", "OKP"):
        found = _BUILD_AS.get((kty, crv)) if isinstance(crv, str) else None
        if found is None:
            raise _UnusableKey(f"unsupported {kty} curve {shown(crv)}")
        build_as = found
    else:
        raise _UnusableKey(f"unsupported key type {shown(kty)}")
    try:
        jwk = jwt.PyJWK(entry, algorithm=build_as)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as e:
        raise _UnusableKey(f"not a valid {kty} key ({type(e).__name__})") from None
    if isinstance(jwk.key, RSAPublicKey) and jwk.key.key_size < MIN_RSA_BITS:
        raise _UnusableKey(f"an RSA key of {jwk.key.key_size} bits, fewer than {MIN_RSA_BITS}")
    return _Key(kid=kid, kty=kty, crv=crv if isinstance(crv, str) else None, alg=alg, jwk=jwk)
