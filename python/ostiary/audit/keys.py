"""The writer's Ed25519 signing key and the checkpoints it signs.

A checkpoint says "writer W's chain reached record ``seq`` whose hash is ``hash``" (and, after a
retention purge, "records up to ``purged_through`` were removed; the last of them hashed
``purged_hash``"). It is signed over its canonical JSON. Checkpoints are kept in the store and the
newest one also in ``<data_dir>/audit/head-<writer>.json``, so removing the tail of a chain together
with its checkpoints still shows against that file, or against checkpoints exported to a SIEM.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class Checkpoint(msgspec.Struct, kw_only=True, frozen=True):
    writer: str
    seq: int
    hash: str
    ts: int
    key_id: str
    purged_through: int = 0
    purged_hash: str = ""


class SignedCheckpoint(msgspec.Struct, kw_only=True, frozen=True):
    checkpoint: Checkpoint
    signature: str  # base64

    def body(self) -> bytes:
        return checkpoint_body(self.checkpoint)


_enc = msgspec.json.Encoder(order="sorted")


def checkpoint_body(cp: Checkpoint) -> bytes:
    return _enc.encode(cp)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_pem(text: str | bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(text.encode() if isinstance(text, str) else text)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path`` (PKCS#8 PEM), created with mode 0600 on first use."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_signing_key(path)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return key
    loaded = serialization.load_pem_private_key(data, password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return loaded


def sign(key: Ed25519PrivateKey, cp: Checkpoint) -> SignedCheckpoint:
    return SignedCheckpoint(checkpoint=cp, signature=base64.b64encode(key.sign(checkpoint_body(cp))).decode())


def check_signature(public: Ed25519PublicKey, signed: SignedCheckpoint) -> bool:
    try:
        public.verify(base64.b64decode(signed.signature), signed.body())
    except (InvalidSignature, ValueError):
        return False
    return True
