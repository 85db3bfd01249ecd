"""From what a client presented to an ``Identity``: certificate, token, or static password.

Rules of this module: one entry point per kind of proof, each raising ``AuthenticationFailed`` with a
reason that names the failed check and never the secret. A client that presents a verified client
certificate while certificate identities are in the policy is authenticated by it and is not asked for
a password. A password that looks like a JWT is validated as a token; anything else is checked against
the static clients in constant time.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping

from ostiary.config import Client, Config, resolve_secret
from ostiary.errors import AuthenticationFailed
from ostiary.identity import ClientHello, Identity, printable
from ostiary.identity.certificates import certificate_identity
from ostiary.identity.tokens import TokenValidator, looks_like_jwt

log = logging.getLogger("ostiary.identity")


class Authenticator:
    def __init__(self, cfg: Config, validator: TokenValidator) -> None:
        self._clients: Mapping[str, Client] = {c.user: c for c in cfg.clients}
        self.validator = validator
        self.certificates = any(m.issuer == "certificate" for m in cfg.identities)

    def by_certificate(self, hello: ClientHello) -> Identity | None:
        """The identity of a verified client certificate, when the policy uses certificate identities."""
        if not self.certificates or not hello.peer_certificates:
            return None
        return certificate_identity(hello.peer_certificates)

    async def by_password(self, hello: ClientHello, secret: bytes) -> Identity:
        if looks_like_jwt(secret):
            return await self.validator.validate(secret)
        return self._static(hello, secret)

    def _static(self, hello: ClientHello, secret: bytes) -> Identity:
        client = self._clients.get(hello.user)
        # Compare against something even for unknown users so timing does not reveal them.
        expected = b"\0" * 32
        readable = client is not None
        if client is not None:
            try:
                expected = resolve_secret(client).encode()
            except (OSError, KeyError) as e:
                # The reason is the operator's (it names a file or a variable): the client gets the
                # same answer as for a wrong password, so it learns neither that the user exists
                # nor where its secret lives.
                why = e.args[0] if isinstance(e, KeyError) else e
                log.warning("the password of static client %r cannot be read: %s", client.user, why)
                readable = False
        matches = hmac.compare_digest(expected, secret)
        if not (readable and matches):
            if not self._clients:
                raise AuthenticationFailed(
                    "28P01", "the password is not a token (JWT) and this gateway has no static clients"
                )
            # The user name is the client's, unauthenticated: it reaches the log only made printable.
            raise AuthenticationFailed(
                "28P01", f'password authentication failed for user "{printable(hello.user)}"'
            )
        return Identity(
            name=hello.user, issuer="password", method="password", attributes={"user": hello.user}
        )
