"""Test kit for the identity package: real keys, a real HTTPS JWKS server, a clock tests can move.

``JwksServer`` serves documents over HTTPS on 127.0.0.1 (a trustme CA, whose PEM is at ``ca_path``)
from a stdlib ``ThreadingHTTPServer`` in a thread; tests change ``documents``, take it ``up`` or
down (503), make it slow (``delay`` seconds before each answer) or trickle its answers (``trickle``
seconds between bytes), add ``redirects`` and read ``requests`` (a count per path). ``run_caches``
runs a JWKS cache per issuer in a nursery, as the gateway does, for the duration of one async
function.
"""

from __future__ import annotations

import collections
import functools
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self, TypeVar

import jwt
import trio
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from ostiary.identity.issuers import ResolvedIssuer
from ostiary.identity.jwks import JwksCache

T = TypeVar("T")


class Clock:
    """A wall clock that only moves when told."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class SigningKey:
    private: Any
    alg: str
    kid: str | None

    def jwk(self, **extra: Any) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = OKPAlgorithm.to_jwk(public, as_dict=True)
        if self.kid is not None:
            data["kid"] = self.kid
        return {**data, **extra}

    def sign(self, claims: Mapping[str, Any], *, alg: str | None = None, **header: Any) -> str:
        headers = {"kid": self.kid, **header} if self.kid is not None else dict(header)
        return jwt.encode(dict(claims), self.private, algorithm=alg or self.alg, headers=headers)

    def with_kid(self, kid: str | None) -> SigningKey:
        return replace(self, kid=kid)


@functools.cache
def signing_keys() -> dict[str, SigningKey]:
    """One key per algorithm the tests use; RS256 and PS256 share the RSA key."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "RS256": SigningKey(rsa_key, "RS256", "rsa"),
        "PS256": SigningKey(rsa_key, "PS256", "rsa"),
        "ES256": SigningKey(ec.generate_private_key(ec.SECP256R1()), "ES256", "ec256"),
        "ES384": SigningKey(ec.generate_private_key(ec.SECP384R1()), "ES384", "ec384"),
        "EdDSA": SigningKey(ed25519.Ed25519PrivateKey.generate(), "EdDSA", "ed25519"),
    }


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [key.jwk() for key in keys]}


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up early (the size cap) are expected


class JwksServer:
    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.ca_path = directory / "jwks-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(context)
        self.documents: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        self.up = True
        self.send_length = True
        self.delay = 0.0
        self.trickle = 0.0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.requests[self.path] += 1
                time.sleep(owner.delay)
                if owner.trickle:
                    # The status line and headers one byte at a time, each well within any per-read
                    # timeout: only a bound on the whole fetch ends this.
                    for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"." * 200:
                        self.wfile.write(bytes([byte]))
                        time.sleep(owner.trickle)
                    return
                if not owner.up:
                    self.send_error(503)
                    return
                if self.path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = owner.documents.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if owner.send_length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.base_url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()

    def serve(self, path: str, document: Any) -> None:
        self.documents[path] = document if isinstance(document, bytes) else json.dumps(document).encode()

    def serve_discovery(self, jwks_path: str = "/jwks", **overrides: Any) -> None:
        self.serve(
            "/.well-known/openid-configuration",
            {"issuer": self.base_url, "jwks_uri": self.base_url + jwks_path, **overrides},
        )


def issuer_for(server: JwksServer, **overrides: Any) -> ResolvedIssuer:
    """An issuer at the server's URL with keys from its ``/jwks``; fields overridable."""
    fields: dict[str, Any] = {
        "name": "ci",
        "issuer": server.base_url,
        "audiences": ("ostiary",),
        "algorithms": ("RS256", "PS256", "ES256", "ES384", "EdDSA"),
        "jwks_url": server.base_url + "/jwks",
        "jwks_file": None,
        "discovery": False,
        "ca": str(server.ca_path),
        "clock_skew": 60.0,
        "max_lifetime": 3600.0,
        "required_claims": (),
        "reject_reused_jti": False,
        "name_claim": "sub",
        "attributes": (),
        "jwks_ttl": 600.0,
        "jwks_max_stale": 3600.0,
        "jwks_refresh_min_interval": 30.0,
        "fetch_timeout": 5.0,
    }
    fields.update(overrides)
    return ResolvedIssuer(**fields)


def run_caches(
    issuers: Sequence[ResolvedIssuer],
    clock: Callable[[], float],
    body: Callable[[dict[str, JwksCache]], Awaitable[T]],
) -> T:
    """Start a cache per issuer (each after its first fetch), run ``body`` with them, stop them."""

    async def main() -> T:
        async with trio.open_nursery() as nursery:
            caches: dict[str, JwksCache] = {}
            for issuer in issuers:
                caches[issuer.name] = JwksCache(issuer, clock=clock)
                await nursery.start(caches[issuer.name].run)
            result = await body(caches)
            nursery.cancel_scope.cancel()
        return result

    return trio.run(main)
