"""The development issuer: tokens for the demo and the tests, signed by a key in ``data_dir``.

Rules of this module: for development only (nothing enables it unless the configuration asks for the
dev issuer). Its URL, ``https://dev.ostiary.invalid``, is never fetched: the gateway reads the public
keys from ``{data_dir}/dev-issuer/jwks.json``. The ES256 (P-256) private key is
``{data_dir}/dev-issuer/key.pem``, created on first use with mode 0600 in a 0700 directory, atomically
(two processes starting together end up with the same key). The key id is the key's RFC 7638
thumbprint, so the JWKS can always be rebuilt from the key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ostiary.identity.issuers import ResolvedIssuer, resolve_issuer

if TYPE_CHECKING:
    from ostiary.config import Config

DEV_ISSUER_NAME = "dev"
DEV_ISSUER_URL = "https://dev.ostiary.invalid"
DEV_MAX_LIFETIME = 24 * 3600.0


def _directory(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "dev-issuer"


def ensure_dev_key(data_dir: str | os.PathLike[str]) -> Path:
    """The path of the development private key, created (with its JWKS) if missing."""
    directory = _directory(data_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key_path = directory / "key.pem"
    if not key_path.exists():
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        temporary = directory / f".key-{secrets.token_hex(8)}.pem"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            with contextlib.suppress(FileExistsError):  # another process made one first: use that
                os.link(temporary, key_path)
        finally:
            temporary.unlink()
    jwks = json.dumps({"keys": [_public_jwk(_load_key(key_path))]}, indent=2) + "\n"
    jwks_path = directory / "jwks.json"
    if not jwks_path.exists() or jwks_path.read_text() != jwks:
        temporary = directory / f".jwks-{secrets.token_hex(8)}.json"
        temporary.write_text(jwks)
        os.replace(temporary, jwks_path)
    return key_path


def dev_issuer(
    data_dir: str | os.PathLike[str], audiences: Sequence[str] = ("ostiary",), *, create: bool = True
) -> ResolvedIssuer:
    """The development issuer, keys from its JWKS file. With ``create`` False nothing is written
    (a dry run); the JWKS file may then not exist yet."""
    if create:
        ensure_dev_key(data_dir)
    return ResolvedIssuer(
        name=DEV_ISSUER_NAME,
        issuer=DEV_ISSUER_URL,
        audiences=tuple(audiences),
        algorithms=("ES256",),
        jwks_url=None,
        jwks_file=str(_directory(data_dir) / "jwks.json"),
        discovery=False,
        ca=None,
        clock_skew=60.0,
        max_lifetime=DEV_MAX_LIFETIME,
        required_claims=(),
        reject_reused_jti=False,
        name_claim="sub",
        attributes=(),
        jwks_ttl=60.0,
        jwks_max_stale=3600.0,
        jwks_refresh_min_interval=1.0,
        fetch_timeout=10.0,
    )


def mint(
    data_dir: str | os.PathLike[str],
    subject: str,
    claims: dict[str, object],
    audience: str = "ostiary",
    lifetime: float = 600,
    issuer_url: str = DEV_ISSUER_URL,
) -> str:
    """A token of the development issuer for ``subject`` with ``claims`` added. ``iss``, ``sub``, ``aud``,
    ``iat``, ``nbf``, ``exp`` and a random ``jti`` are set here and win over ``claims``."""
    if not lifetime > 0:
        raise ValueError("lifetime must be a positive number of seconds")
    key = _load_key(ensure_dev_key(data_dir))
    now = int(time.time())
    payload = {
        **claims,
        "iss": issuer_url,
        "sub": subject,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + int(lifetime),
        "jti": secrets.token_urlsafe(16),
    }
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": _thumbprint(key.public_key())})


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{path} is not a P-256 private key")
    return key


def _members(public: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The required members of the public JWK, the input of the RFC 7638 thumbprint."""
    numbers = public.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }


def _thumbprint(public: ec.EllipticCurvePublicKey) -> str:
    canonical = json.dumps(_members(public), separators=(",", ":"), sort_keys=True).encode()
    return _b64(hashlib.sha256(canonical).digest())


def _public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    public = key.public_key()
    return {**_members(public), "kid": _thumbprint(public), "use": "sig", "alg": "ES256"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def resolved_issuers(cfg: Config, *, create: bool = True) -> list[ResolvedIssuer]:
    """Every issuer a configuration trusts: its ``issuers`` and, with ``dev.issuer``, the development
    issuer (whose key is created unless ``create`` is False, for dry runs)."""
    issuers = [resolve_issuer(i) for i in cfg.issuers]
    if cfg.dev.issuer:
        issuers.append(dev_issuer(cfg.data_dir, tuple(cfg.dev.audiences), create=create))
    return issuers
