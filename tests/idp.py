"""A local OIDC identity provider for end-to-end tests: real keys, a JWKS served over HTTPS.

``LocalIdp`` holds an RSA and an EC signing key, serves their JWKS at ``/jwks`` (and a discovery
document at ``/.well-known/openid-configuration``) over TLS with a trustme certificate for 127.0.0.1,
and mints tokens shaped like GitHub Actions' with pyjwt. ``up`` switches the server between serving
and answering 503, to simulate an outage.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import trustme
from cryptography.hazmat.primitives.asymmetric import ec, rsa

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"


def github_claims(
    repository: str = "acme/shop", ref: str = "refs/heads/main", **extra: Any
) -> dict[str, Any]:
    owner = repository.split("/")[0]
    claims: dict[str, Any] = {
        "sub": f"repo:{repository}:ref:{ref}",
        "repository": repository,
        "repository_owner": owner,
        "repository_id": "4242",
        "ref": ref,
        "ref_type": "branch",
        "environment": "production",
        "workflow": "deploy",
        "workflow_ref": f"{repository}/.github/workflows/deploy.yml@{ref}",
        "job_workflow_ref": f"{repository}/.github/workflows/deploy.yml@{ref}",
        "actor": "octocat",
        "event_name": "push",
        "run_id": "1001",
    }
    claims.update(extra)
    return claims


class LocalIdp:
    def __init__(self, directory: Path, issuer: str = GITHUB_ISSUER) -> None:
        self.issuer = issuer
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.published: list[tuple[str, Any, str]] = [
            ("rsa-1", self.rsa, "RS256"),
            ("ec-1", self.ec, "ES256"),
        ]
        self.up = True
        self.requests = 0
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_path = directory / "idp-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                idp.requests += 1
                if not idp.up:
                    self.send_error(503)
                    return
                if self.path == "/jwks":
                    body = json.dumps(idp.jwks()).encode()
                elif self.path == "/.well-known/openid-configuration":
                    body = json.dumps({"issuer": idp.issuer, "jwks_uri": f"{idp.url}/jwks"}).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key, alg in self.published:
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
            jwk.update(kid=kid, alg=alg, use="sig")
            keys.append(jwk)
        return {"keys": keys}

    def rotate(self) -> None:
        """Publishes a new RSA key (kid rsa-2) next to the old ones."""
        self.rsa2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.published.append(("rsa-2", self.rsa2, "RS256"))

    def mint(
        self,
        claims: dict[str, Any],
        *,
        audience: str = "ostiary-test",
        lifetime: float = 300,
        kid: str = "rsa-1",
        key: Any = None,
        alg: str | None = None,
        issued_at: float | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        published = {k: (v, a) for k, v, a in self.published}
        signing_key, default_alg = published.get(kid, (self.rsa, "RS256"))
        now = time.time() if issued_at is None else issued_at
        body = {
            "iss": self.issuer,
            "aud": audience,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
            "jti": str(uuid.uuid4()),
            **claims,
        }
        return jwt.encode(
            body,
            key if key is not None else signing_key,
            algorithm=alg or default_alg,
            headers={"kid": kid, **(headers or {})},
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
