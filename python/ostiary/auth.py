"""Client authentication, behind one interface.

The gateway asks an ``Authenticator`` whether the secret a client presented (its PostgreSQL password)
proves an identity. Until workload identity (OIDC/JWT, mTLS) lands, ``StaticPasswords`` checks the
``clients`` section of the configuration. Rules: compare secrets in constant time; never put the
secret in an error message or a log line; a reason says which check failed.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Protocol

from ostiary.config import Client
from ostiary.errors import AuthenticationFailed


@dataclass(frozen=True)
class Identity:
    """Who a session belongs to: a stable name plus attributes policy can match on."""

    name: str
    method: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientHello:
    """What the gateway knows about a client when it authenticates it."""

    user: str
    database: str
    peer: str
    tls: bool
    peer_certificates: tuple[bytes, ...] = ()


class Authenticator(Protocol):
    def authenticate(self, hello: ClientHello, secret: bytes) -> Identity: ...

    def may_use(self, identity: Identity, connection: str) -> bool: ...


class StaticPasswords:
    """User names and passwords from the configuration file."""

    def __init__(self, clients: list[Client]) -> None:
        self._clients = {c.user: c for c in clients}

    def authenticate(self, hello: ClientHello, secret: bytes) -> Identity:
        client = self._clients.get(hello.user)
        # Compare against something even for unknown users so timing does not reveal them.
        try:
            expected = client.resolve().encode() if client is not None else b"\0" * 32
        except (OSError, KeyError) as e:
            raise AuthenticationFailed(
                "28000", f"the gateway cannot read the password of user {hello.user!r}: {e}"
            ) from None
        if client is None or not hmac.compare_digest(expected, secret):
            raise AuthenticationFailed("28P01", f'password authentication failed for user "{hello.user}"')
        return Identity(name=hello.user, method="password", attributes={"user": hello.user})

    def may_use(self, identity: Identity, connection: str) -> bool:
        client = self._clients.get(identity.name)
        return client is not None and (client.connections is None or connection in client.connections)
