"""A hostile client on the token login path, end to end against a real gateway subprocess.

The client presents a password shaped like a JWT, or a JWT with tricks in its header or claims, over
raw protocol (``pgraw``) where libpq could not send it, and psycopg where it could. Every refusal must
be one FATAL ErrorResponse, SQLSTATE 28P01 (the token is bad) or 28000 (no grant, keys unavailable,
TLS), or 08P01 (the password message itself breaks the protocol); neither it nor the gateway's log
may contain the token, its signature or key material; the gateway stays up and serves good tokens.

Documented behaviour (what these tests pin down):

* A password that is not shaped like a JWT (three base64url segments, the first a JSON object with
  ``alg``) is a static password; on a gateway without static clients: 28P01 "not a token". That
  includes a token with a trailing newline or a ``Bearer`` prefix.
* The password message is bounded by ``limits.max_startup`` (10,000 bytes by default) but always has
  room for a token of 16 KiB, the most the validator accepts: a longer message is refused by the
  wire (08P01) before validation, a longer token by the validator (28P01).
* Key-carrying headers (``jwk``, ``jku``, ``x5u``, ``x5c``) are ignored: keys come from the issuer's
  JWKS only, and the gateway fetches nothing a token names.
* Policy matches the token's claim values literally: a ``*`` in a claim is just a character, a list
  or object claim is not an attribute at all. A glob's ``*`` matches ``/`` and ``..`` (no path
  normalisation: ``acme/bi-*`` admits ``acme/bi-x/../../evil``) but not a newline.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import select
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from conftest import GatewayFactory, GatewayProcess
from idp import LocalIdp, github_claims
from ostiary.devcluster import PgCluster, TlsMaterial, free_port
from pgraw import RawConn, password_message, startup_message, typed
from test_pg_identity import connect, policy

DEAD_ISSUER = "https://dead-issuer.test"
STARTUP_TIMEOUT = 1.0  # limits.startup_timeout of the gateway of the silence test
ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_EC = ec.generate_private_key(ec.SECP256R1())


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIdp]:
    p = LocalIdp(tmp_path_factory.mktemp("hostile-idp"))
    yield p
    p.close()


def hostile_policy(
    pg: PgCluster, tls: TlsMaterial, idp: LocalIdp, tmp: Path, **limits: Any
) -> dict[str, Any]:
    """test_pg_identity's policy, plus an issuer whose keys cannot be fetched, and unknown kids
    rate limited to one refresh per 30 s (so a test can count the gateway's fetches)."""
    cfg = policy(pg, tls, idp, tmp)
    cfg["issuers"][0]["jwks_refresh_min_interval"] = 30
    cfg["issuers"].append(
        {
            "name": "dead",
            "issuer": DEAD_ISSUER,
            "audiences": ["ostiary-test"],
            "jwks_url": f"https://127.0.0.1:{free_port()}/jwks",  # nothing listens there
            "ca": str(idp.ca_path),
            "fetch_timeout": 1,
        }
    )
    cfg["identities"].append({"name": "dead-any", "issuer": "dead", "match": {"sub": "*"}})
    cfg["grants"].append({"name": "dead-all", "identities": ["dead-any"], "connection": "app"})
    if limits:
        cfg["limits"] = limits
    return cfg


@pytest.fixture
def gw(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    idp: LocalIdp,
    tmp_path: Path,
    reader_role: str,
) -> GatewayProcess:
    return gateway_factory(config=hostile_policy(pg, gateway_tls, idp, tmp_path))


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict[str, Any] | str, claims: dict[str, Any] | str, key: Any, alg: str = "RS256") -> str:
    """A token whose header and claims are exactly this JSON text (or these objects), signed with
    ``key`` by ``alg`` (or with an empty signature when ``key`` is None)."""
    header_text = header if isinstance(header, str) else json.dumps(header)
    payload = claims if isinstance(claims, str) else json.dumps(claims)
    signing_input = f"{b64(header_text)}.{b64(payload)}"
    if key is None:
        return signing_input + "."
    signature = jwt.algorithms.get_default_algorithms()[alg].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def jws(header: bytes | str, claims: bytes | str, signature: bytes = b"sig") -> str:
    """Three base64url segments of these raw bytes: no signing, no JSON checks."""
    return f"{b64(header)}.{b64(claims)}.{b64(signature)}"


def claims_of(idp: LocalIdp, **changes: Any) -> dict[str, Any]:
    """Good GitHub-shaped claims for this gateway, with changes (a value of ... removes the claim)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": idp.issuer,
        "aud": "ostiary-test",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        **github_claims(),
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not ...}


def claims_text(idp: LocalIdp, **raw: str) -> str:
    """Good claims as JSON text, with members given as raw JSON (for what json.dumps cannot write:
    1e400, a 401-digit integer, an unpaired surrogate escape)."""
    text = json.dumps(claims_of(idp, **dict.fromkeys(raw, ...)))
    return text[:-1] + "".join(f", {json.dumps(k)}: {v}" for k, v in raw.items()) + "}"


def secret_parts(secret: str) -> list[str]:
    """What must never be echoed: the password, and each long segment of it (signature included)."""
    return [*([secret] if secret else []), *(s for s in secret.split(".") if len(s) >= 16)]


def assert_secret_free(text: str, secret: str) -> None:
    for part in secret_parts(secret):
        assert part not in text, f"echoed {part[:20]}...: {text[:300]}"


def assert_log_clean(gw: GatewayProcess, idp: LocalIdp, secrets: list[str]) -> None:
    """The gateway's log names no token, no signature and no key material, and has no traceback."""
    log = gw.log()
    for secret in secrets:
        assert_secret_free(log, secret)
    for key in idp.published:
        jwk = key.jwk()
        material = str(jwk["n"] if "n" in jwk else jwk["x"])  # RSA modulus, EC x coordinate
        assert material not in log
    assert "Traceback" not in log and "failed unexpectedly" not in log, log[-3000:]


def password_exchange(gw: GatewayProcess, password: bytes | None, *, user: str = "ci") -> RawConn:
    """A TLS connection that sent its StartupMessage, got the cleartext password request and (unless
    ``password`` is None) answered with exactly these password bytes (NUL-terminated)."""
    c = RawConn(gw.port)
    try:
        c.start_tls(gw.tls.ca_cert)
        c.send(startup_message({"user": user, "database": "app"}))
        m = c.recv_message()
        assert m is not None and m[0] == b"R" and struct.unpack("!i", m[1][:4])[0] == 3, m
        if password is not None:
            c.send(typed(b"p", password + b"\0"))
    except BaseException:
        c.close()
        raise
    return c


def refusal(c: RawConn, timeout: float = 10) -> dict[str, str]:
    """The one FATAL ErrorResponse a connection gets before the gateway closes it."""
    with c:
        out = c.outcome(timeout)
    assert out.closed and len(out.errors) == 1 and len(out.messages) == 1, out.describe()
    err = out.errors[0]
    assert err["S"] == "FATAL", err
    return err


def login_error(gw: GatewayProcess, password: bytes | str, *, user: str = "ci") -> dict[str, str]:
    """The ErrorResponse of a raw TLS login with this password; asserts it does not echo it."""
    secret = password if isinstance(password, bytes) else password.encode()
    err = refusal(password_exchange(gw, secret, user=user))
    text = "\n".join(err.values())
    assert_secret_free(text, secret.decode(errors="replace"))
    return err


def assert_refused(gw: GatewayProcess, token: str, code: str, words: str) -> None:
    err = login_error(gw, token)
    assert err["C"] == code and words.lower() in err["M"].lower(), err


def assert_admitted_as(gw: GatewayProcess, token: str, role: str, **kw: Any) -> None:
    with connect(gw, token, **kw) as c:
        assert c.execute("select current_user").fetchone() == (role,)


# -- passwords that are not tokens -----------------------------------------------------------------


def test_garbage_shaped_like_a_token_is_a_bad_password(
    gw: GatewayProcess, idp: LocalIdp, subtests: pytest.Subtests
) -> None:
    good = idp.mint(github_claims())
    rs256 = '{"alg":"RS256","typ":"JWT","kid":"rsa-1"}'
    not_a_token = "not a token"
    cases: dict[str, tuple[bytes | str, str]] = {
        "a.b.c": ("a.b.c", not_a_token),
        "empty": ("", not_a_token),
        "two segments": (good.rsplit(".", 1)[0], not_a_token),
        "four segments": (good + ".x", not_a_token),
        "invalid base64 segments": ("!!!!.@@@@.####", not_a_token),
        "header not JSON": (jws("hello", "{}"), not_a_token),
        "header JSON but a list": (jws("[1]", "{}"), not_a_token),
        "header an object without alg": (jws('{"typ":"JWT"}', "{}"), not_a_token),
        "header of 5000 characters": (jws(json.dumps({"alg": "RS256", "x": "y" * 3700}), "{}"), not_a_token),
        "header not UTF-8": (jws(b'{"alg":"RS256","x":"\xff"}', "{}"), not_a_token),
        "non-UTF-8 bytes": (b"\xff\xfe." + good.encode()[:50] + b"\x80", not_a_token),
        "trailing newline": (good + "\n", not_a_token),
        "bearer prefix": ("Bearer " + good, not_a_token),
        "alg not a string": (jws('{"alg":7}', "{}"), "no alg"),
        "claims a JSON list": (jws(rs256, "[1, 2]"), "claims are not a base64url JSON object"),
        "claims not UTF-8": (jws(rs256, b'{"a":"\xff"}'), "claims are not"),
        "claims nested 3000 deep": (jws(rs256, "[" * 3000 + "]" * 3000), "claims are not"),
        "signature stripped": (good.rsplit(".", 1)[0] + ".", "bad signature"),
        "signature of another token": (
            good.rsplit(".", 1)[0] + "." + idp.mint(github_claims("acme/x")).rsplit(".", 1)[1],
            "bad signature",
        ),
        "9 KiB of claims": (idp.mint(github_claims(padding="p" * 6000), key=ATTACKER_RSA), "bad signature"),
    }
    for name, (password, words) in cases.items():
        with subtests.test(name):
            err = login_error(gw, password)
            assert err["C"] == "28P01" and words in err["M"], err
    assert_admitted_as(gw, idp.mint(github_claims()), "app")
    assert_log_clean(gw, idp, [good, *(p for p, _ in cases.values() if isinstance(p, str) and len(p) > 40)])


FORGED_LINE = "2026-01-01 00:00:00,000 INFO ostiary.server: auth allowed: admin (token via token)"


def test_user_name_cannot_forge_log_lines(gateway_factory: GatewayFactory) -> None:
    """With static clients, a password that is not a token is checked against them, and the refusal
    names the (unauthenticated) user: only made printable, so a newline cannot forge a log line."""
    gw = gateway_factory()  # static client ci, no issuers
    err = login_error(gw, "not-the-password", user=f"ci\n{FORGED_LINE}\x1b[31m")
    assert err["C"] == "28P01", err
    assert err["M"] == f'password authentication failed for user "ci?{FORGED_LINE}?[31m"', err
    assert f"\n{FORGED_LINE}" not in gw.log() and "\x1b" not in gw.log()


def test_identity_name_cannot_forge_log_lines(gw: GatewayProcess, idp: LocalIdp) -> None:
    sub = f"repo:nope/x\n{FORGED_LINE}\x1b[31m"
    token = forge({"alg": "RS256", "kid": "rsa-1"}, claims_of(idp, sub=sub, repository="nope/x"), idp.rsa)
    err = login_error(gw, token)
    assert err["C"] == "28000" and "no grant" in err["M"], err  # refused: this much holds
    assert "\n" not in err["M"] and "\x1b" not in err["M"], err
    assert f"\n{FORGED_LINE}" not in gw.log()


def test_malformed_or_oversized_password_messages_are_protocol_violations(
    gw: GatewayProcess, idp: LocalIdp, subtests: pytest.Subtests
) -> None:
    """The password message is bounded by limits.max_startup, but always has room for a 16 KiB token:
    a longer one is refused as soon as its length is read, whatever follows; a NUL inside the
    password or a missing terminator break the message. 08P01, never echoing the bytes."""
    token = idp.mint(github_claims())
    long_token = idp.mint(github_claims(padding="p" * 9000))  # a real, valid token of ~12.5 KiB
    assert 10_000 < len(long_token) < 16 * 1024
    assert_admitted_as(gw, long_token, "app")
    cases: dict[str, bytes] = {
        "100 KiB declared, 1 KiB sent": b"p" + struct.pack("!i", 100 * 1024 + 4) + token.encode()[:1024],
        "NUL inside the password": typed(b"p", token.encode() + b"\0" + token.encode() + b"\0"),
        "no terminator": typed(b"p", token.encode()),
        "2 GiB declared": b"p" + struct.pack("!i", 0x7FFFFFFF),
    }
    for name, message in cases.items():
        with subtests.test(name):
            c = password_exchange(gw, None)
            start = time.monotonic()
            c.send(message)
            err = refusal(c)
            assert time.monotonic() - start < 3, "not refused at once"
            assert err["C"] == "08P01" and "protocol violation" in err["M"], err
            assert_secret_free("\n".join(err.values()), token)

    with subtests.test("100 KiB sent whole"):
        # The refusal may be lost to the reset of a connection closed with unread input; what matters
        # is that it ends at once and the gateway goes on.
        c = password_exchange(gw, None)
        with c:
            with contextlib.suppress(OSError):
                c.send(password_message("x" * 100 * 1024))
            out = c.outcome(5)
        assert out.closed, out.describe()
        assert all(e["C"] == "08P01" for e in out.errors), out.describe()

    assert_admitted_as(gw, token, "app")
    assert_log_clean(gw, idp, [token, long_token])


def test_a_larger_max_startup_lets_longer_tokens_reach_the_validator(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, idp: LocalIdp, tmp_path: Path
) -> None:
    gw = gateway_factory(config=hostile_policy(pg, gateway_tls, idp, tmp_path, max_startup=20_000))
    long_token = idp.mint(github_claims(padding="p" * 9000))
    assert_admitted_as(gw, long_token, "app")
    too_long = idp.mint(github_claims(padding="p" * 12_000))
    assert 16 * 1024 < len(too_long) < 20_000
    assert_refused(gw, too_long, "28P01", "longer than 16384 bytes")
    assert_log_clean(gw, idp, [long_token, too_long])


# -- header tricks ---------------------------------------------------------------------------------


def test_header_tricks(gw: GatewayProcess, idp: LocalIdp, subtests: pytest.Subtests) -> None:
    claims = claims_of(idp)
    pem = idp.rsa.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    jwk_n = idp.published[0].jwk()["n"].encode()
    # A kid as long as fits: the header segment may be at most 4096 characters (a longer one is not a
    # token).
    long_kid = "k" * 3000
    cases: dict[str, tuple[str, str, str]] = {
        "alg None": (forge({"alg": "None", "kid": "rsa-1"}, claims, None), "28P01", "alg none"),
        "alg nOnE": (forge({"alg": "nOnE", "kid": "rsa-1"}, claims, None), "28P01", "alg none"),
        "alg none, real signature": (
            forge({"alg": "none", "kid": "rsa-1"}, claims, idp.rsa),
            "28P01",
            "alg none",
        ),
        "HS256, RSA public key PEM as secret": (
            forge({"alg": "HS256", "kid": "rsa-1"}, claims, pem, "HS256"),
            "28P01",
            "HMAC",
        ),
        "hs512, JWK modulus as secret": (
            forge({"alg": "hs512", "kid": "rsa-1"}, claims, jwk_n, "HS512"),
            "28P01",
            "HMAC",
        ),
        "RS256 naming the EC key": (
            forge({"alg": "RS256", "kid": "ec-1"}, claims, idp.rsa),
            "28P01",
            "EC key",
        ),
        "ES256 naming the RSA key": (
            forge({"alg": "ES256", "kid": "rsa-1"}, claims, idp.ec, "ES256"),
            "28P01",
            "RSA key",
        ),
        "PS256, not an accepted algorithm": (
            forge({"alg": "PS256", "kid": "rsa-1"}, claims, idp.rsa, "PS256"),
            "28P01",
            "not accepted",
        ),
        "alg 'RS256 ' (a trailing space)": (
            forge({"alg": "RS256 ", "kid": "rsa-1"}, claims, idp.rsa),
            "28P01",
            "not accepted",
        ),
        "alg 'rs256'": (forge({"alg": "rs256", "kid": "rsa-1"}, claims, idp.rsa), "28P01", "not accepted"),
        "alg EdDSA": (forge({"alg": "EdDSA", "kid": "rsa-1"}, claims, idp.rsa), "28P01", "not accepted"),
        "no kid, attacker's EC key": (
            forge({"alg": "ES256"}, claims, ATTACKER_EC, "ES256"),
            "28P01",
            "signature",
        ),
        "crit": (
            forge({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"], "exp": 1}, claims, idp.rsa),
            "28P01",
            "critical",
        ),
        "b64 false": (
            forge({"alg": "RS256", "kid": "rsa-1", "b64": False}, claims, idp.rsa),
            "28P01",
            "critical",
        ),
        "kid path traversal": (
            forge({"alg": "RS256", "kid": "../../../../etc/passwd"}, claims, ATTACKER_RSA),
            "28P01",
            "unknown signing key (kid '../../../../etc/passwd')",
        ),
        "kid of 3000 characters": (
            forge({"alg": "RS256", "kid": long_kid}, claims, ATTACKER_RSA),
            "28P01",
            "unknown signing key",
        ),
        "kid a number": (forge({"alg": "RS256", "kid": 1}, claims, idp.rsa), "28P01", "kid is not a string"),
        "kid with control characters": (
            forge({"alg": "RS256", "kid": "x\n\x1b[31mFATAL"}, claims, ATTACKER_RSA),
            "28P01",
            "kid 'x??[31mFATAL'",
        ),
        "kid with an unpaired surrogate": (
            forge('{"alg": "RS256", "kid": "rsa-1\\udc00"}', claims, idp.rsa),
            "28P01",
            "not valid Unicode",
        ),
        "duplicate alg, last is none": (
            forge('{"alg": "RS256", "kid": "rsa-1", "alg": "none"}', claims, idp.rsa),
            "28P01",
            "alg none",
        ),
    }
    for name, (token, code, words) in cases.items():
        with subtests.test(name):
            err = login_error(gw, token)
            assert err["C"] == code and words in err["M"], err
            assert len(err["M"]) < 300, err  # attacker text (the long kid) is cut
            assert long_kid[:200] not in err["M"]
    assert_admitted_as(gw, idp.mint(github_claims()), "app")
    assert_log_clean(gw, idp, [token for token, _, _ in cases.values()])


def test_keys_named_by_the_token_are_never_used(
    gw: GatewayProcess, idp: LocalIdp, subtests: pytest.Subtests
) -> None:
    """jwk, jku, x5u and x5c carry or point to the attacker's key: ignored (the signature is checked
    with the issuer's key of that kid), and nothing the token names is fetched."""
    claims = claims_of(idp)
    attacker_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(ATTACKER_RSA.public_key()))
    attacker_jwk.update(kid="attacker", alg="RS256", use="sig")
    evil_url = f"{idp.url}/attacker-jwks"
    headers: dict[str, dict[str, Any]] = {
        "jwk, kid of the issuer's key": {"jwk": attacker_jwk, "kid": "rsa-1"},
        "jwk, its own kid": {"jwk": attacker_jwk, "kid": "attacker"},
        "jwk, no kid": {"jwk": attacker_jwk},
        "jku": {"jku": evil_url, "kid": "rsa-1"},
        "x5u": {"x5u": evil_url, "kid": "rsa-1"},
        "x5c": {"x5c": [b64(b"not really a certificate")], "kid": "rsa-1"},
    }
    assert_admitted_as(gw, idp.mint(github_claims()), "app")  # the gateway has fetched its keys
    before = idp.requests
    for name, header in headers.items():
        with subtests.test(name):
            token = forge({"alg": "RS256", **header}, claims, ATTACKER_RSA)
            err = login_error(gw, token)
            assert err["C"] == "28P01", err
            assert "signature" in err["M"] or "unknown signing key (kid 'attacker')" in err["M"], err
    # The kid "attacker" is unknown, but unknown kids refresh at most once per 30 s, and the gateway
    # fetched its keys when it started: no request at all, least of all for the attacker's URL.
    assert idp.requests == before and idp.server.requests["/attacker-jwks"] == 0


# -- claim tricks ----------------------------------------------------------------------------------


def test_claim_tricks(gw: GatewayProcess, idp: LocalIdp, subtests: pytest.Subtests) -> None:
    """Tokens the issuer really signed, with odd claims: each refused with the check that failed."""
    now = int(time.time())
    rs = {"alg": "RS256", "kid": "rsa-1"}

    def signed(**changes: Any) -> str:
        return forge(rs, claims_of(idp, **changes), idp.rsa)

    def signed_raw(**members: str) -> str:
        return forge(rs, claims_text(idp, **members), idp.rsa)

    cases: dict[str, tuple[str, str, str]] = {
        "aud list without ours": (signed(aud=["sts.amazonaws.com", "other"]), "28P01", "audience"),
        "aud empty list": (signed(aud=[]), "28P01", "aud"),
        "aud a number": (signed(aud=7), "28P01", "audience"),
        "aud list with ours and a number": (signed(aud=["ostiary-test", 7]), "28P01", "audience"),
        "no aud": (signed(aud=...), "28P01", "no aud claim"),
        "iss with a trailing slash": (signed(iss=idp.issuer + "/"), "28P01", "untrusted issuer"),
        "iss in another case": (signed(iss=idp.issuer.upper()), "28P01", "untrusted issuer"),
        "iss a list": (signed(iss=[idp.issuer]), "28P01", "no iss"),
        "exp a string": (signed(exp=str(now + 300)), "28P01", "exp claim is not a finite number"),
        "exp 1e400 (infinity)": (signed_raw(exp="1e400"), "28P01", "exp claim is not a finite number"),
        "exp NaN": (signed_raw(exp="NaN"), "28P01", "exp claim is not a finite number"),
        "exp a 401-digit integer": (
            signed_raw(exp="1" + "0" * 400),
            "28P01",
            "exp claim is not a finite number",
        ),
        "iat a 401-digit integer": (signed_raw(iat="9" * 401), "28P01", "iat claim is not a finite number"),
        "nbf -1e400": (signed_raw(nbf="-1e400"), "28P01", "nbf claim is not a finite number"),
        "exp true": (signed(exp=True), "28P01", "exp claim is not a finite number"),
        "no exp": (signed(exp=...), "28P01", "no exp claim"),
        "no iat": (signed(iat=...), "28P01", "no iat claim"),
        "iat a year ago, exp in 5 min": (signed(iat=now - 366 * 86400, nbf=...), "28P01", "lifetime"),
        "nbf a year ago": (signed(nbf=now - 366 * 86400), "28P01", "lifetime"),
        "exp in a year": (signed(exp=now + 366 * 86400), "28P01", "lifetime"),
        "nbf in 10 min": (signed(nbf=now + 600), "28P01", "not valid yet"),
        "iat in 10 min": (signed(iat=now + 600), "28P01", "not valid yet"),
        "expired": (signed(iat=now - 900, nbf=now - 900, exp=now - 600), "28P01", "expired"),
        "no sub": (signed(sub=...), "28P01", "no sub claim"),
        "sub empty": (signed(sub=""), "28P01", "no sub claim"),
        "sub a number": (signed(sub=42), "28P01", "sub claim is not a string"),
        "jti a list": (signed(jti=["x"]), "28P01", "jti claim is not a string"),
        "sub with an unpaired surrogate": (
            signed_raw(sub='"repo:acme/shop\\ud800"'),
            "28P01",
            "not valid Unicode",
        ),
        "repository with an unpaired surrogate": (
            signed_raw(repository='"acme/shop\\udfff"'),
            "28P01",
            "not valid Unicode",
        ),
        "claim name with an unpaired surrogate": (
            signed_raw(**{"x\ud800": "1"}),
            "28P01",
            "not valid Unicode",
        ),
        "duplicate aud, last is foreign": (
            forge(
                rs,
                claims_text(idp).replace('"aud": "ostiary-test"', '"aud": "ostiary-test", "aud": "x"'),
                idp.rsa,
            ),
            "28P01",
            "audience",
        ),
    }
    for name, (token, code, words) in cases.items():
        with subtests.test(name):
            err = login_error(gw, token)
            assert err["C"] == code and words in err["M"], err
    assert_admitted_as(gw, idp.mint(github_claims()), "app")
    assert_log_clean(gw, idp, [token for token, _, _ in cases.values()])
    # A refusal without an identity names what was presented: the user and the token's digest.
    digest = hashlib.sha256(cases["expired"][0].encode()).hexdigest()[:32]
    assert f"auth refused: user 'ci' token {digest} via " in gw.log()


def test_audience_list_containing_ours_is_accepted(gw: GatewayProcess, idp: LocalIdp) -> None:
    token = forge(
        {"alg": "RS256", "kid": "rsa-1"},
        claims_of(idp, aud=["sts.amazonaws.com", "ostiary-test", "https://evil.example"]),
        idp.rsa,
    )
    assert_admitted_as(gw, token, "app")
    assert_log_clean(gw, idp, [token])


def test_claim_values_are_matched_literally(
    gw: GatewayProcess, idp: LocalIdp, subtests: pytest.Subtests
) -> None:
    """Matchers: shop-deploy needs repository acme/shop (and ref, environment); reporting matches
    acme/reports or acme/bi-* (grant reports-read, role app_reader); any-acme (repository_owner acme)
    only from 10.0.0.0/8, so never here."""

    def token(repository: Any, owner: Any = "acme") -> str:
        return idp.mint(github_claims(repository="x", repository_owner=owner) | {"repository": repository})

    refused = {
        "repository '*'": token("*", "*"),
        "repository '*/*' of owner acme": token("*/*"),
        "repository 'acme/*'": token("acme/*"),
        "repository a list": token(["acme/shop"]),
        "repository a list of two": token(["acme/shop", "acme/reports"]),
        "repository an object": token({"name": "acme/shop"}),
        "repository in another case": token("ACME/shop"),
        "repository with a trailing space": token("acme/shop "),
        "repository with a trailing newline": token("acme/shop\n"),
        "newline inside the glob's star": token("acme/bi-x\nacme/reports"),
    }
    for name, t in refused.items():
        with subtests.test(name):
            err = login_error(gw, t)
            assert err["C"] == "28000" and "no grant" in err["M"], err
    admitted = {
        "repository 'acme/bi-*' (a star in the value, matched by the glob's)": token("acme/bi-*"),
        "repository 'acme/bi-x/../../evil/y' (no path normalisation)": token("acme/bi-x/../../evil/y"),
    }
    for name, t in admitted.items():
        with subtests.test(name):
            assert_admitted_as(gw, t, "app_reader")
    with subtests.test("user names a grant the identity does not have"):
        # The user name only chooses among grants that apply: the shop token still gets shop-writes.
        assert_admitted_as(gw, idp.mint(github_claims()), "app", user="reports-read")
    assert_log_clean(gw, idp, [*refused.values(), *admitted.values()])


# -- the gateway cannot decide, or the client skips TLS --------------------------------------------


def test_unavailable_keys_fail_closed(gw: GatewayProcess, idp: LocalIdp) -> None:
    """Issuer dead's JWKS cannot be fetched: its tokens (even one signed with a key the gateway never
    saw, which asks for a refresh) are refused with 28000, naming no URL."""
    now = int(time.time())
    claims = {"iss": DEAD_ISSUER, "aud": "ostiary-test", "sub": "x", "iat": now, "exp": now + 60}
    for kid in ("k1", None):
        header = {"alg": "RS256", **({"kid": kid} if kid else {})}
        token = forge(header, claims, ATTACKER_RSA)
        err = login_error(gw, token)
        assert err["C"] == "28000" and "keys of issuer dead could not be fetched" in err["M"], err
        assert "127.0.0.1" not in err["M"] and "https" not in err["M"], err
    assert_admitted_as(gw, idp.mint(github_claims()), "app")


def test_plaintext_client_is_never_asked_for_a_token(gw: GatewayProcess, idp: LocalIdp) -> None:
    with RawConn(gw.port) as c:
        c.send(startup_message({"user": "ci", "database": "app"}))
        err = refusal(c)
    assert err["C"] == "28000" and "requires TLS" in err["M"], err


# -- load and time ---------------------------------------------------------------------------------


def test_flood_of_bad_tokens_leaves_good_sessions_alone(gw: GatewayProcess, idp: LocalIdp) -> None:
    """50 concurrent bad-token logins (bad signatures, unknown kids, garbage, alg none) while a good
    session runs queries: each is refused with 28P01, the session goes on, a new good token logs in,
    and unknown kids do not make the gateway fetch the JWKS (one refresh per 30 s at most)."""
    claims = claims_of(idp)
    bad = [
        forge({"alg": "RS256", "kid": "rsa-1"}, claims, ATTACKER_RSA),
        forge({"alg": "RS256", "kid": "nobody"}, claims, ATTACKER_RSA),
        forge({"alg": "none", "kid": "rsa-1"}, claims, None),
        "x.y.z",
        forge({"alg": "ES256", "kid": "ec-1"}, claims, ATTACKER_EC, "ES256"),
    ]
    stop = threading.Event()
    queries = 0

    with connect(gw, idp.mint(github_claims())) as session:
        before = idp.requests  # after the gateway's first fetch, which the good login waited for

        def keep_querying() -> None:
            nonlocal queries
            while not stop.is_set():
                assert session.execute("select 1").fetchone() == (1,)
                queries += 1

        with ThreadPoolExecutor(51) as pool:
            runner = pool.submit(keep_querying)
            start = time.monotonic()
            results = list(pool.map(lambda i: login_error(gw, bad[i % len(bad)]), range(50)))
            elapsed = time.monotonic() - start
            stop.set()
            runner.result()
        assert session.execute("select 2").fetchone() == (2,)
    assert [e["C"] for e in results] == ["28P01"] * 50, results
    assert elapsed < 20, elapsed
    assert queries > 0
    assert idp.requests - before <= 1
    assert_admitted_as(gw, idp.mint(github_claims()), "app")
    assert_log_clean(gw, idp, bad)


def test_client_that_never_finishes_its_password_is_dropped(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    idp: LocalIdp,
    tmp_path: Path,
    subtests: pytest.Subtests,
) -> None:
    """Startup sent, then silence, half a password message, or a byte a while: ended with 08P01 when
    limits.startup_timeout (1 s here) runs out, counted from the connection's start."""
    gw = gateway_factory(
        config=hostile_policy(pg, gateway_tls, idp, tmp_path, startup_timeout=STARTUP_TIMEOUT)
    )
    token = idp.mint(github_claims())
    message = password_message(token)

    def run(kind: str) -> tuple[dict[str, str], float]:
        start = time.monotonic()
        c = password_exchange(gw, None)
        if kind == "half a password message":
            c.send(message[: len(message) // 2])
        elif kind == "a byte every 0.2 s":
            # For up to 6 s, unless the gateway says something first (then stop writing, so that a
            # reset does not overtake its error): each byte must not restart the clock.
            for i in range(30):
                if select.select([c.sock], [], [], 0.2)[0]:
                    break
                c.send(message[i : i + 1])
        return refusal(c), time.monotonic() - start

    kinds = ["silence", "half a password message", "a byte every 0.2 s"]
    with ThreadPoolExecutor(len(kinds)) as pool:
        for kind, (err, elapsed) in zip(kinds, pool.map(run, kinds), strict=True):
            with subtests.test(kind):
                assert err["C"] == "08P01" and "did not complete within 1 s" in err["M"], err
                assert STARTUP_TIMEOUT * 0.8 <= elapsed < STARTUP_TIMEOUT + 3, elapsed  # well before 6 s
    assert_admitted_as(gw, token, "app")
    assert_log_clean(gw, idp, [token])
