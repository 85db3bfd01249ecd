"""SPIFFE IDs (``spiffe://trust-domain/path``), as in X.509-SVID URI SANs and JWT-SVID ``sub`` claims.

Rules of this module: a value is a SPIFFE ID only if it follows the SPIFFE ID specification exactly
(lowercase scheme, a trust domain of ``[a-z0-9._-]``, no port, user info, query or fragment, path
segments of ``[A-Za-z0-9._-]`` that are neither empty, ``.`` nor ``..``, at most 2048 bytes). Anything
else is not one, so policy never matches a ``spiffe_id`` or ``trust_domain`` derived from a near miss.
"""

from __future__ import annotations

import re

MAX_SPIFFE_ID_LENGTH = 2048

_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)*)")


def spiffe_trust_domain(value: str) -> str | None:
    """The trust domain of ``value`` if it is a valid SPIFFE ID, else None."""
    if len(value) > MAX_SPIFFE_ID_LENGTH:
        return None
    found = _SPIFFE_ID.fullmatch(value)
    if found is None:
        return None
    if any(segment in (".", "..") for segment in found.group(2).split("/")):
        return None
    return found.group(1)
