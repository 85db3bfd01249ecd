"""Who is asking: workload identities from tokens (OIDC/JWT), client certificates and static passwords.

Rules of this package: validation is strict and fails closed; a rejection says which check failed and
never echoes the token, a signature or key material; nothing here blocks the trio loop (JWKS fetches run
in worker threads, on their own schedule, never on the data path of an established session).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHOWN_LENGTH = 100


def printable(value: object) -> str:
    """Attacker-controlled text (a user name, a token's claims) as it may appear in a reason sent to
    a client or in a log line: non-printable characters (newlines, escapes) replaced by ``?``, so it
    cannot forge a line, and cut to about 100 characters."""
    text = "".join(c if c.isprintable() else "?" for c in str(value)[: SHOWN_LENGTH + 1])
    if len(text) > SHOWN_LENGTH:
        text = text[:SHOWN_LENGTH] + "..."
    return text


@dataclass(frozen=True)
class Identity:
    """Who a session belongs to.

    ``issuer`` is the name of the trusted issuer in the policy file, ``"certificate"`` for a client
    certificate, or ``"password"`` for a static client. ``name`` is stable for the same workload (the
    token's ``sub`` or the preset's name claim, the certificate's SPIFFE ID or subject, the client's
    user name). ``attributes`` are what policy matches on, all strings (claims flattened, see
    ``identity.tokens.claim_attributes``). ``expires`` is the token's ``exp`` (epoch seconds) if any.
    """

    name: str
    issuer: str
    method: str  # "token", "certificate" or "password"
    attributes: dict[str, str] = field(default_factory=dict)
    expires: float | None = None
    # Attributes with several values (a certificate's DNS, email and URI SANs): each value on its
    # own, matched one by one (``attributes`` shows them joined with commas, for people only: a
    # glob over the joined text would match across two names).
    values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # A token's (issuer URL, jti) when its issuer rejects reused tokens: held by the token validator
    # from the login's validation until it becomes a session (``TokenValidator.commit``) or fails
    # (``TokenValidator.release``). None for other identities and for validations that hold nothing.
    jti: tuple[str, str] | None = field(default=None, compare=False)

    def values_of(self, key: str) -> tuple[str, ...]:
        """The values policy matches ``key`` against: each of a multi-valued attribute's, else the
        attribute's one value, else none."""
        if key in self.values:
            return self.values[key]
        value = self.attributes.get(key)
        return () if value is None else (value,)


@dataclass(frozen=True)
class ClientHello:
    """What the gateway knows about a client when it authenticates it."""

    user: str
    database: str
    peer: str
    tls: bool
    peer_certificates: tuple[bytes, ...] = ()
