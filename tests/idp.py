"""A local OIDC identity provider for end-to-end tests: real keys, a JWKS served over HTTPS.

``LocalIdp`` holds an RSA and an EC signing key and publishes their JWKS at ``/jwks`` through
``identity_kit.JwksServer`` (TLS with a trustme certificate for 127.0.0.1; ``up`` False answers 503,
to simulate an outage), and mints tokens shaped like GitHub Actions' with pyjwt.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from identity_kit import JwksServer, SigningKey

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
        self.published = [SigningKey(self.rsa, "RS256", "rsa-1"), SigningKey(self.ec, "ES256", "ec-1")]
        directory.mkdir(parents=True, exist_ok=True)
        self.server = JwksServer(directory).__enter__()
        self.ca_path = self.server.ca_path
        self.url = self.server.base_url
        self._publish()

    @property
    def up(self) -> bool:
        return self.server.up

    @up.setter
    def up(self, value: bool) -> None:
        self.server.up = value

    @property
    def requests(self) -> int:
        """Requests the server has answered, all paths."""
        return sum(self.server.requests.values())

    def _publish(self) -> None:
        self.server.serve("/jwks", {"keys": [k.jwk(alg=k.alg, use="sig") for k in self.published]})

    def rotate(self) -> None:
        """Publishes a new RSA key (kid rsa-2) next to the old ones."""
        self.rsa2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.published.append(SigningKey(self.rsa2, "RS256", "rsa-2"))
        self._publish()

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
        published = {k.kid: k for k in self.published}
        signer = published.get(kid)
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
        signing_key = key if key is not None else (signer.private if signer is not None else self.rsa)
        algorithm = alg or (signer.alg if signer is not None else "RS256")
        return jwt.encode(body, signing_key, algorithm=algorithm, headers={"kid": kid, **(headers or {})})

    def close(self) -> None:
        self.server.__exit__(None, None, None)
