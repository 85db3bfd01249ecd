"""Token validation with real keys and a real HTTPS JWKS: the identity of good tokens, and every
rejection with its own reason, which never contains the token or its signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import stat
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from identity_kit import Clock, JwksServer, SigningKey, issuer_for, jwks, run_caches, signing_keys
from ostiary.errors import AuthenticationFailed
from ostiary.identity import Identity
from ostiary.identity.dev import DEV_ISSUER_NAME, DEV_ISSUER_URL, dev_issuer, ensure_dev_key, mint
from ostiary.identity.issuers import PRESETS, ResolvedIssuer
from ostiary.identity.jwks import JwksCache
from ostiary.identity.tokens import TokenValidator, claim_at, claim_attributes, looks_like_jwt

KEYS = signing_keys()
RSA, EC256 = KEYS["RS256"], KEYS["ES256"]
REMOVE = object()

GITHUB_CLAIMS: dict[str, Any] = {
    "sub": "repo:acme/shop:ref:refs/heads/main",
    "repository": "acme/shop",
    "repository_owner": "acme",
    "repository_id": "4242",
    "ref": "refs/heads/main",
    "ref_type": "branch",
    "ref_protected": True,
    "environment": "production",
    "workflow": "deploy",
    "workflow_ref": "acme/shop/.github/workflows/deploy.yml@refs/heads/main",
    "job_workflow_ref": "acme/shop/.github/workflows/deploy.yml@refs/heads/main",
    "actor": "octocat",
    "event_name": "push",
    "sha": "5b1c0e9f3a",
    "run_id": "9001",
    "run_attempt": 1,
}


class Env:
    """One issuer at the test server, a moveable clock, and helpers to validate tokens."""

    def __init__(self, server: JwksServer) -> None:
        self.server = server
        self.clock = Clock()
        self.issuer = issuer_for(server, name="github")

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(self.clock())
        claims = {
            **GITHUB_CLAIMS,
            "iss": self.issuer.issuer,
            "aud": "ostiary",
            "iat": now,
            "nbf": now - 300,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not REMOVE}

    def validate(
        self, *tokens: str, issuer: ResolvedIssuer | None = None
    ) -> list[Identity | AuthenticationFailed]:
        """Validate the tokens in turn with one validator: each gives an identity or a rejection."""
        issuer = issuer or self.issuer

        async def body(caches: dict[str, JwksCache]) -> list[Identity | AuthenticationFailed]:
            validator = TokenValidator([issuer], caches, clock=self.clock)
            results: list[Identity | AuthenticationFailed] = []
            for token in tokens:
                try:
                    results.append(await validator.validate(token))
                except AuthenticationFailed as e:
                    results.append(e)
            return results

        return run_caches([issuer], self.clock, body)

    def accept(self, token: str, issuer: ResolvedIssuer | None = None) -> Identity:
        [result] = self.validate(token, issuer=issuer)
        assert isinstance(result, Identity), result
        return result

    def reject(self, token: str, issuer: ResolvedIssuer | None = None, code: str = "28P01") -> str:
        [result] = self.validate(token, issuer=issuer)
        assert isinstance(result, AuthenticationFailed), result
        assert result.code == code, result.reason
        assert_secret_free(result.reason, token)
        return result.reason


def assert_secret_free(reason: str, token: str) -> None:
    assert token not in reason
    for segment in token.split("."):
        if len(segment) > 8:
            assert segment not in reason


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with JwksServer(tmp_path) as server:
        server.serve("/jwks", jwks(RSA, EC256, KEYS["ES384"], KEYS["EdDSA"]))
        yield Env(server)


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "ES384", "EdDSA"])
def test_valid_token_of_each_key_type(env: Env, alg: str) -> None:
    claims = env.claims()
    identity = env.accept(KEYS[alg].sign(claims))
    assert identity.name == "repo:acme/shop:ref:refs/heads/main"
    assert identity.issuer == "github" and identity.method == "token"
    assert identity.expires == claims["exp"]
    a = identity.attributes
    assert a["repository"] == "acme/shop" and a["ref"] == "refs/heads/main"
    assert a["environment"] == "production"
    assert a["job_workflow_ref"] == "acme/shop/.github/workflows/deploy.yml@refs/heads/main"
    assert a["ref_protected"] == "true" and a["run_attempt"] == "1"
    assert a["issuer"] == env.issuer.issuer and a["subject"] == claims["sub"] and a["aud"] == "ostiary"


def test_audience_lists_give_the_matched_audience(env: Env) -> None:
    issuer = replace(env.issuer, audiences=("ostiary", "ostiary-staging"))
    identity = env.accept(RSA.sign(env.claims(aud=["sts.amazonaws.com", "ostiary-staging"])), issuer)
    assert identity.attributes["aud"] == "ostiary-staging"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("hunter2", "not a JWT: expected three base64url segments separated by dots"),
        ("a.b", "not a JWT: expected three base64url segments separated by dots"),
        ("a+b.c.d", "not a JWT: expected three base64url segments separated by dots"),
        ("bm90IGpzb24.e30.c2ln", "not a JWT: the header is not a base64url JSON object"),
        ("eyJhbGciOiJSUzI1NiJ9.WzFd.c2ln", "not a JWT: the claims are not a base64url JSON object"),
        ("eyJ0eXAiOiJKV1QifQ.e30.c2ln", "token header has no alg"),
        ("jörg.a.b", "not a JWT: the token has characters outside base64url"),
        ("a." * 9000 + "a", "token is longer than 16384 bytes"),
    ],
)
def test_malformed_tokens(env: Env, token: str, reason: str) -> None:
    assert env.reject(token) == reason


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def test_alg_none_is_refused(env: Env) -> None:
    token = unsigned({"alg": "none", "kid": "rsa"}, env.claims())
    assert env.reject(token) == "unsigned tokens (alg none) are not accepted"
    assert (
        env.reject(unsigned({"alg": "nOnE"}, env.claims())) == "unsigned tokens (alg none) are not accepted"
    )


def test_hmac_is_refused_including_the_rsa_public_key_as_secret(env: Env) -> None:
    pem = RSA.private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signing_input = unsigned({"alg": "HS256", "kid": "rsa"}, env.claims()).rsplit(".", 1)[0]
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    assert env.reject(token) == "symmetric (HMAC) algorithms are not accepted"


def test_algorithm_must_be_accepted_by_the_issuer(env: Env) -> None:
    issuer = replace(env.issuer, algorithms=("RS256",))
    reason = env.reject(EC256.sign(env.claims()), issuer)
    assert reason == "algorithm 'ES256' is not accepted for issuer github (accepted: RS256)"


def test_critical_header_extensions_are_refused(env: Env) -> None:
    token = RSA.sign(env.claims(), crit=["exp"], exp=1)
    assert env.reject(token) == "token header uses critical extensions (crit, b64), which are not supported"


def test_untrusted_issuer(env: Env) -> None:
    reason = env.reject(RSA.sign(env.claims(iss="https://evil.example/" + "x" * 300)))
    assert reason.startswith("untrusted issuer 'https://evil.example/xxx")
    assert len(reason) < 200
    assert env.reject(RSA.sign(env.claims(iss=REMOVE))) == "token has no iss (issuer) claim"


def test_unknown_kid(env: Env) -> None:
    reason = env.reject(RSA.with_kid("rotated-away").sign(env.claims()))
    assert reason == "unknown signing key (kid 'rotated-away') for issuer github"


def test_key_that_does_not_fit_the_algorithm(env: Env) -> None:
    token = RSA.sign(env.claims(), alg="RS256", kid="ec256")
    reason = env.reject(token)
    assert reason == "signing key kid 'ec256' of issuer github is an EC key, which cannot verify 'RS256'"


def test_bad_signature(env: Env) -> None:
    forged = SigningKey(ec.generate_private_key(ec.SECP256R1()), "ES256", "ec256")  # same kid, another key
    assert env.reject(forged.sign(env.claims())) == "bad signature (key kid 'ec256' of issuer github)"
    good = EC256.sign(env.claims())
    header, _, signature = good.split(".")
    tampered = env.claims(sub="repo:acme/admin:ref:refs/heads/main")
    other_payload = unsigned({}, tampered).split(".")[1]
    assert (
        env.reject(f"{header}.{other_payload}.{signature}")
        == "bad signature (key kid 'ec256' of issuer github)"
    )


def test_times(env: Env) -> None:
    now = int(env.clock())
    cases = {
        "expired": (env.claims(iat=now - 400, nbf=now - 400, exp=now - 61), "token expired 61 s ago"),
        "iat ahead": (
            env.claims(iat=now + 120, nbf=now, exp=now + 300),
            "token is not valid yet: iat is 120 s ahead of the gateway's clock",
        ),
        "nbf ahead": (
            env.claims(iat=now, nbf=now + 90, exp=now + 300),
            "token is not valid yet: nbf is 90 s ahead of the gateway's clock",
        ),
        "no exp": (env.claims(exp=REMOVE), "token has no exp claim"),
        "no iat": (env.claims(iat=REMOVE), "token has no iat claim"),
        "exp not a number": (env.claims(exp="tomorrow"), "token exp claim is not a finite number of seconds"),
        "exp NaN": (env.claims(exp=math.nan), "token exp claim is not a finite number of seconds"),
        "too long": (
            env.claims(iat=now, nbf=now - 300, exp=now + 3400),
            "token lifetime 3700 s is longer than the 3600 s issuer github accepts (max_lifetime)",
        ),
    }
    for name, (claims, reason) in cases.items():
        assert env.reject(RSA.sign(claims)) == reason, name
    # Within clock_skew: accepted.
    env.accept(RSA.sign(env.claims(iat=now + 59, nbf=now + 59, exp=now + 300)))
    env.accept(RSA.sign(env.claims(iat=now - 400, nbf=now - 400, exp=now - 59)))


def test_injected_clock_decides_expiry(env: Env) -> None:
    token = RSA.sign(env.claims())
    env.accept(token)
    env.clock.advance(361)
    assert env.reject(token) == "token expired 61 s ago"


def test_audience(env: Env) -> None:
    reason = env.reject(RSA.sign(env.claims(aud="https://github.com/acme")))
    assert reason == "token audience is not one this gateway accepts for issuer github"
    assert env.reject(RSA.sign(env.claims(aud=REMOVE))) == "token has no aud claim"


def test_required_and_name_claims(env: Env) -> None:
    google_like = replace(env.issuer, name_claim="email", required_claims=("email_verified",))
    reason = env.reject(RSA.sign(env.claims(email="ci@acme.test")), google_like)
    assert reason == "token lacks claim email_verified, which issuer github requires"
    reason = env.reject(RSA.sign(env.claims(email_verified=True)), google_like)
    assert reason == "token has no email claim (a non-empty string) to name the identity by"
    identity = env.accept(RSA.sign(env.claims(email="ci@acme.test", email_verified=True)), google_like)
    assert identity.name == "ci@acme.test"


def test_reused_jti(env: Env) -> None:
    issuer = replace(env.issuer, reject_reused_jti=True)
    token = RSA.sign(env.claims())
    first, second = env.validate(token, token, issuer=issuer)
    assert isinstance(first, Identity) and first.jti == (issuer.issuer, jti_of(token))
    # Held by the first login, which has not finished: refused, so two at once cannot both get in.
    assert isinstance(second, AuthenticationFailed) and second.code == "28P01"
    assert second.reason == "token is in use by another login that has not finished (its jti was seen before)"
    reason = env.reject(RSA.sign(env.claims(jti=REMOVE)), issuer)
    assert reason == "token has no jti claim, and issuer github rejects reused tokens"


def jti_of(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


def test_jti_is_used_up_by_a_session_only(env: Env) -> None:
    """A login holds its token's jti; the jti is used up when the login becomes a session (commit)
    and free again when it fails for another reason (release: no grant, the upstream down ...)."""
    issuer = replace(env.issuer, reject_reused_jti=True)
    token = RSA.sign(env.claims())

    async def body(caches: dict[str, JwksCache]) -> None:
        validator = TokenValidator([issuer], caches, clock=env.clock)
        refused = await validator.validate(token)
        validator.release(refused)  # e.g. several grants applied and none was chosen
        validator.release(refused)  # twice is harmless
        retry = await validator.validate(token)
        with pytest.raises(AuthenticationFailed, match="in use by another login"):
            await validator.validate(token)  # a second login while the retry is under way
        validator.commit(retry)
        validator.release(retry)  # after the commit: no effect
        with pytest.raises(AuthenticationFailed, match="already used"):
            await validator.validate(token)
        assert len(validator.seen) == 1
        # Validations that open no session (the admin API's) neither check nor change the memory.
        looked = await validator.validate(token, remember=False)
        assert looked.jti is None and looked.name == retry.name
        other = RSA.sign(env.claims())
        await validator.validate(other, remember=False)
        validator.commit(await validator.validate(other))
        assert len(validator.seen) == 2
        # Freed entries expire like used ones.
        env.clock.advance(300 + issuer.clock_skew)
        await validator.validate(RSA.sign(env.claims()))
        assert len(validator.seen) == 1

    run_caches([issuer], env.clock, body)


def test_jti_memory_is_bounded_and_fails_closed(env: Env) -> None:
    issuer = replace(env.issuer, reject_reused_jti=True)
    now = int(env.clock())
    short = RSA.sign(env.claims(exp=now + 10))
    long = [RSA.sign(env.claims()) for _ in range(2)]

    async def body(caches: dict[str, JwksCache]) -> None:
        validator = TokenValidator([issuer], caches, clock=env.clock, jti_capacity=2)
        await validator.validate(short)
        await validator.validate(long[0])
        with pytest.raises(AuthenticationFailed) as e:
            await validator.validate(long[1])
        assert e.value.code == "28000" and "remembers 2 unexpired token ids" in e.value.reason
        env.clock.advance(10 + issuer.clock_skew)  # the short token's entry expires: room again
        await validator.validate(long[1])
        assert len(validator.seen) == 2
        # A policy reload keeps the memory, held entries and used ones.
        validator.seen.commit((issuer.issuer, jti_of(long[1])))
        validator.configure([issuer], caches)
        with pytest.raises(AuthenticationFailed, match="in use by another login"):
            await validator.validate(long[0])
        with pytest.raises(AuthenticationFailed, match="already used"):
            await validator.validate(long[1])

    run_caches([issuer], env.clock, body)


def test_unavailable_keys_fail_closed(env: Env) -> None:
    env.server.up = False
    reason = env.reject(RSA.sign(env.claims()), code="28000")
    assert reason.startswith("the keys of issuer github could not be fetched")


def test_validator_refuses_ambiguous_issuers(env: Env) -> None:
    async def body(caches: dict[str, JwksCache]) -> None:
        with pytest.raises(ValueError, match="same issuer URL"):
            TokenValidator(
                [env.issuer, replace(env.issuer, name="other")], {**caches, "other": caches["github"]}
            )
        with pytest.raises(ValueError, match="no JWKS cache"):
            TokenValidator([replace(env.issuer, name="other")], caches)

    run_caches([env.issuer], env.clock, body)


def test_looks_like_jwt() -> None:
    assert looks_like_jwt(RSA.sign({"sub": "x"}).encode())
    assert looks_like_jwt(unsigned({"alg": "none"}, {}).encode())
    for password in [b"hunter2", b"correct.horse.battery", b"a.b.c", b"", b"..", b"eyJ0eXAiOiJKV1QifQ.e30.x"]:
        assert not looks_like_jwt(password)


def test_claim_attributes() -> None:
    claims = {
        "sub": "system:serviceaccount:shop:api",
        "aud": ["a", "b"],
        "exp": 1700000000,
        "ratio": 0.5,
        "admin": False,
        "nothing": None,
        "groups": ["x", "y"],
        "kubernetes.io": {
            "namespace": "shop",
            "serviceaccount": {"name": "api", "uid": "u-1"},
            "pod": {"name": "api-7d9"},
        },
        "namespace": "spoofed",
        "deep": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": "too deep"}}}}}}}},
    }
    attributes = claim_attributes(claims, PRESETS["kubernetes"].attributes)
    assert attributes["kubernetes.io.namespace"] == "shop"
    assert attributes["kubernetes.io.serviceaccount.uid"] == "u-1"
    assert attributes["namespace"] == "shop" and attributes["serviceaccount"] == "api"
    assert attributes["pod"] == "api-7d9"
    assert (
        attributes["exp"] == "1700000000" and attributes["ratio"] == "0.5" and attributes["admin"] == "false"
    )
    assert "aud" not in attributes and "groups" not in attributes and "nothing" not in attributes
    assert "deep.a.b.c.d.e.f.g.h" not in attributes
    assert claim_at(claims, "kubernetes.io.serviceaccount.name") == "api"
    # A preset alias with nothing at its path removes a claim of the same name.
    assert "namespace" not in claim_attributes({"namespace": "spoofed"}, PRESETS["kubernetes"].attributes)


def test_spiffe_attributes() -> None:
    aliases = PRESETS["spiffe"].attributes
    good = claim_attributes({"sub": "spiffe://acme.test/ns/prod/sa/api"}, aliases)
    assert good["spiffe_id"] == "spiffe://acme.test/ns/prod/sa/api" and good["trust_domain"] == "acme.test"
    for sub in [
        "spiffe://Acme.test/x",
        "spiffe://acme.test/a//b",
        "spiffe://acme.test/../x",
        "https://acme.test/x",
    ]:
        attributes = claim_attributes({"sub": sub, "trust_domain": "forged"}, aliases)
        assert "spiffe_id" not in attributes and "trust_domain" not in attributes


def test_dev_issuer_round_trip(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key_path = ensure_dev_key(data_dir)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert ensure_dev_key(data_dir) == key_path  # the same key the second time
    issuer = dev_issuer(data_dir)
    token = mint(data_dir, "repo:acme/demo:ref:refs/heads/main", {"repository": "acme/demo", "iss": "forged"})
    header = jwt.get_unverified_header(token)
    [published] = json.loads((data_dir / "dev-issuer" / "jwks.json").read_text())["keys"]
    assert header["alg"] == "ES256" and header["kid"] == published["kid"]
    assert "d" not in published

    async def body(caches: dict[str, JwksCache]) -> Identity:
        return await TokenValidator([issuer], caches).validate(token)

    identity = run_caches([issuer], Clock(), body)
    assert identity.issuer == DEV_ISSUER_NAME and identity.name == "repo:acme/demo:ref:refs/heads/main"
    assert (
        identity.attributes["repository"] == "acme/demo" and identity.attributes["issuer"] == DEV_ISSUER_URL
    )


def test_dev_kid_is_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    ensure_dev_key(tmp_path)
    [published] = json.loads((tmp_path / "dev-issuer" / "jwks.json").read_text())["keys"]
    members = {k: published[k] for k in ("crv", "kty", "x", "y")}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    assert published["kid"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert jwt.PyJWK(published).key_id == published["kid"]
