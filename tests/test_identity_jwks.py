"""JWKS caches against a real HTTPS server: sources, bounds, broken keys, rotation, rate limit, staleness."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from identity_kit import Clock, JwksServer, SigningKey, issuer_for, jwks, run_caches, signing_keys
from ostiary.errors import AuthenticationFailed
from ostiary.identity.jwks import MAX_DOCUMENT_BYTES, JwksCache

KEYS = signing_keys()
RSA, EC256, EC384, ED = KEYS["RS256"], KEYS["ES256"], KEYS["ES384"], KEYS["EdDSA"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[JwksServer]:
    with JwksServer(tmp_path) as s:
        s.serve("/jwks", jwks(RSA, EC256, EC384, ED))
        yield s


async def failure(cache: JwksCache, kid: str | None, alg: str) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as e:
        await cache.key_for(kid, alg)
    return e.value


async def fetch_error(cache: JwksCache) -> str:
    """The cause of the failed fetches; clients are only told the keys could not be fetched."""
    e = await failure(cache, "rsa", "RS256")
    assert e.code == "28000"
    assert (
        e.reason
        == f"the keys of issuer {cache.issuer.name} could not be fetched (the gateway's log says why)"
    )
    assert cache.last_error is not None and cache.describe()["last_error"] == cache.last_error
    return cache.last_error


def test_keys_of_every_type_are_served_for_their_algorithms(server: JwksServer) -> None:
    async def body(caches: dict[str, JwksCache]) -> None:
        cache = caches["ci"]
        assert cache.key_count == 4
        for kid, alg in [
            ("rsa", "RS256"),
            ("rsa", "PS256"),
            ("ec256", "ES256"),
            ("ec384", "ES384"),
            ("ed25519", "EdDSA"),
        ]:
            assert (await cache.key_for(kid, alg)).key_id == kid
        status = cache.describe()
        assert status["usable"] and status["keys"] == 4 and status["last_error"] is None
        assert sorted(status["kids"]) == ["ec256", "ec384", "ed25519", "rsa"]

    run_caches([issuer_for(server)], Clock(), body)
    assert server.requests["/jwks"] == 1


def test_server_certificate_is_verified(server: JwksServer) -> None:
    async def body(caches: dict[str, JwksCache]) -> None:
        assert "CERTIFICATE_VERIFY_FAILED" in await fetch_error(caches["ci"])

    run_caches([issuer_for(server, ca=None)], Clock(), body)


def test_discovery_finds_the_jwks_uri(server: JwksServer) -> None:
    server.serve_discovery("/keys")
    server.serve("/keys", jwks(EC256))
    issuer = issuer_for(server, jwks_url=None, discovery=True)

    async def body(caches: dict[str, JwksCache]) -> None:
        assert (await caches["ci"].key_for("ec256", "ES256")).key_id == "ec256"
        assert caches["ci"].source.startswith("discovery https://127.0.0.1:")

    run_caches([issuer], Clock(), body)
    assert server.requests["/.well-known/openid-configuration"] == 1 and server.requests["/keys"] == 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"jwks_uri": "http://127.0.0.1:1/jwks"}, "not an https:// URL"),
        ({"jwks_uri": "file:///etc/passwd"}, "not an https:// URL"),
        ({"issuer": "https://elsewhere.example"}, "names issuer 'https://elsewhere.example'"),
    ],
)
def test_discovery_documents_are_checked(
    server: JwksServer, overrides: dict[str, Any], expected: str
) -> None:
    server.serve_discovery(**overrides)
    issuer = issuer_for(server, jwks_url=None, discovery=True)

    async def body(caches: dict[str, JwksCache]) -> None:
        assert expected in await fetch_error(caches["ci"])

    run_caches([issuer], Clock(), body)
    assert server.requests["/jwks"] == 0


def test_redirects_may_not_leave_https(server: JwksServer) -> None:
    server.redirects["/moved"] = server.base_url + "/jwks"
    server.redirects["/downgraded"] = server.base_url.replace("https:", "http:") + "/jwks"
    moved = issuer_for(server, name="moved", jwks_url=server.base_url + "/moved")
    downgraded = issuer_for(server, name="downgraded", jwks_url=server.base_url + "/downgraded")

    async def body(caches: dict[str, JwksCache]) -> None:
        assert caches["moved"].key_count == 4
        assert "which is not HTTPS" in await fetch_error(caches["downgraded"])

    run_caches([moved, downgraded], Clock(), body)


def test_one_broken_key_does_not_spoil_the_set(server: JwksServer, caplog: pytest.LogCaptureFixture) -> None:
    small_rsa = SigningKey(rsa.generate_private_key(public_exponent=65537, key_size=1024), "RS256", "small")
    p521 = SigningKey(ec.generate_private_key(ec.SECP521R1()), "ES512", "p521")
    broken = [
        {"kty": "RSA", "kid": "bad-modulus", "n": "!!!", "e": "AQAB"},
        {"kty": "EC", "kid": "off-curve", "crv": "P-256", "x": EC256.jwk()["x"], "y": EC384.jwk()["x"][:43]},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        RSA.with_kid("encryption").jwk(use="enc"),
        RSA.with_kid("wrap-only").jwk(key_ops=["wrapKey"]),
        {**EC256.with_kid("private").jwk(), "d": "AAAA"},
        small_rsa.jwk(),
        p521.jwk(),
        {"kty": "XYZ", "kid": "alien"},
        "not an object",
    ]
    server.serve("/jwks", {"keys": [*broken, EC256.jwk()]})

    async def body(caches: dict[str, JwksCache]) -> None:
        cache = caches["ci"]
        assert cache.key_count == 1
        assert (await cache.key_for("ec256", "ES256")).key_id == "ec256"
        for kid in (
            "bad-modulus",
            "off-curve",
            "hmac",
            "encryption",
            "wrap-only",
            "private",
            "small",
            "p521",
        ):
            e = await failure(cache, kid, "ES256")
            assert e.code == "28P01" and "unknown signing key" in e.reason

    with caplog.at_level(logging.WARNING, "ostiary.identity"):
        run_caches([issuer_for(server)], Clock(), body)
    skipped = "\n".join(r.getMessage() for r in caplog.records)
    for why in (
        "symmetric (oct)",
        "use is 'enc'",
        "key_ops",
        "private key members",
        "1024 bits",
        "curve 'P-521'",
    ):
        assert why in skipped
    assert "c2VjcmV0" not in skipped and "AAAA" not in skipped


@pytest.mark.parametrize("send_length", [True, False])
def test_oversize_documents_are_refused(server: JwksServer, send_length: bool) -> None:
    server.send_length = send_length
    padding = " " * MAX_DOCUMENT_BYTES
    server.serve("/jwks", ('{"keys": [' + json.dumps(EC256.jwk()) + "]" + padding + "}").encode())

    async def body(caches: dict[str, JwksCache]) -> None:
        assert f"larger than {MAX_DOCUMENT_BYTES} bytes" in await fetch_error(caches["ci"])

    run_caches([issuer_for(server)], Clock(), body)


def test_too_many_keys_are_refused(server: JwksServer) -> None:
    server.serve("/jwks", {"keys": [EC256.with_kid(f"k{i}").jwk() for i in range(101)]})

    async def body(caches: dict[str, JwksCache]) -> None:
        assert "101 keys, more than the 100 accepted" in await fetch_error(caches["ci"])

    run_caches([issuer_for(server)], Clock(), body)


def test_keys_from_a_file(server: JwksServer, tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(EC256)))

    async def body(caches: dict[str, JwksCache]) -> None:
        assert (await caches["ci"].key_for("ec256", "ES256")).key_id == "ec256"
        assert caches["ci"].source == f"file {path}"

    run_caches([issuer_for(server, jwks_url=None, jwks_file=str(path))], Clock(), body)
    assert server.requests["/jwks"] == 0


def test_key_rotation_and_rate_limited_refresh(server: JwksServer) -> None:
    server.serve("/jwks", jwks(EC256))
    clock = Clock()

    async def storm(cache: JwksCache, count: int) -> list[AuthenticationFailed]:
        failures: list[AuthenticationFailed] = []

        async def one(i: int) -> None:
            failures.append(await failure(cache, f"unknown-{i}", "ES256"))

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
        return failures

    async def body(caches: dict[str, JwksCache]) -> None:
        cache = caches["ci"]
        server.serve("/jwks", jwks(EC256, EC384))  # the issuer publishes a new key
        clock.advance(31)  # past jwks_refresh_min_interval since the first fetch
        assert (await cache.key_for("ec384", "ES384")).key_id == "ec384"
        assert server.requests["/jwks"] == 2
        # Right after a fetch, unknown kids do not cause another one.
        failures = await storm(cache, 20)
        assert server.requests["/jwks"] == 2
        assert {f.code for f in failures} == {"28P01"}
        assert all("unknown signing key (kid 'unknown-" in f.reason for f in failures)
        # Past the interval, a storm shares a single fetch.
        clock.advance(31)
        await storm(cache, 20)
        assert server.requests["/jwks"] == 3
        # A key the issuer withdrew stops working at the next fetch.
        server.serve("/jwks", jwks(EC384))
        clock.advance(31)
        await failure(cache, "unknown", "ES256")
        e = await failure(cache, "ec256", "ES256")
        assert e.code == "28P01" and "unknown signing key (kid 'ec256')" in e.reason

    run_caches([issuer_for(server)], clock, body)


def test_keys_are_refreshed_every_ttl(server: JwksServer) -> None:
    server.serve("/jwks", jwks(EC256))

    async def body(caches: dict[str, JwksCache]) -> None:
        server.serve("/jwks", jwks(EC256, EC384))
        with trio.fail_after(5):
            while caches["ci"].key_count != 2:
                await trio.sleep(0.02)
        assert server.requests["/jwks"] >= 2

    run_caches([issuer_for(server, jwks_ttl=0.1)], Clock(), body)


def test_outage_within_the_stale_bound_then_fail_closed(server: JwksServer) -> None:
    clock = Clock()

    async def body(caches: dict[str, JwksCache]) -> None:
        cache = caches["ci"]
        fetched_at = cache.last_success
        server.up = False
        clock.advance(3000)
        assert (await cache.key_for("rsa", "RS256")).key_id == "rsa"
        await failure(cache, "new", "RS256")  # tries a refresh: fails, keeps the keys
        assert cache.last_success == fetched_at and "HTTP 503" in (cache.last_error or "")
        assert (await cache.key_for("rsa", "RS256")).key_id == "rsa"
        clock.advance(700)
        e = await failure(cache, "rsa", "RS256")
        assert e.code == "28000"
        assert "keys of issuer ci are unavailable: the last successful fetch was 3700 s ago" in e.reason
        assert not cache.describe()["usable"]
        # Back up: the next request refreshes (stale keys ask for a fetch) and works again.
        server.up = True
        clock.advance(31)
        assert (await cache.key_for("rsa", "RS256")).key_id == "rsa"

    run_caches([issuer_for(server)], clock, body)


def test_never_fetched_fails_closed(server: JwksServer) -> None:
    server.up = False

    async def body(caches: dict[str, JwksCache]) -> None:
        assert "HTTP 503" in await fetch_error(caches["ci"])

    run_caches([issuer_for(server)], Clock(), body)


def test_keys_must_fit_the_algorithm(server: JwksServer) -> None:
    server.serve("/jwks", {"keys": [RSA.jwk(alg="RS256"), EC256.jwk(), EC384.jwk()]})

    async def body(caches: dict[str, JwksCache]) -> None:
        cache = caches["ci"]
        reasons = {
            (kid, alg): (await failure(cache, kid, alg)).reason
            for kid, alg in [("rsa", "ES256"), ("ec256", "ES384"), ("rsa", "PS256"), ("ec384", "EdDSA")]
        }
        assert (
            "signing key kid 'rsa' of issuer ci is an RSA key, which cannot verify 'ES256'"
            in reasons["rsa", "ES256"]
        )
        assert "is on curve P-256, which cannot verify 'ES384'" in reasons["ec256", "ES384"]
        assert "is declared for 'RS256', not 'PS256'" in reasons["rsa", "PS256"]
        assert "is an EC key, which cannot verify 'EdDSA'" in reasons["ec384", "EdDSA"]

    run_caches([issuer_for(server)], Clock(), body)


def test_tokens_without_kid(server: JwksServer) -> None:
    server.serve("/jwks", jwks(RSA, EC256, EC256.with_kid("ec256-second")))

    async def body(caches: dict[str, JwksCache]) -> None:
        cache = caches["ci"]
        assert (await cache.key_for(None, "RS256")).key_id == "rsa"
        several = await failure(cache, None, "ES256")
        assert several.reason == "token has no kid and issuer ci has several keys"
        none = await failure(cache, None, "EdDSA")
        assert none.reason == "token has no kid and issuer ci has no key for 'EdDSA'"

    run_caches([issuer_for(server)], Clock(), body)


def test_a_fetch_is_bounded_as_a_whole(server: JwksServer, caplog: pytest.LogCaptureFixture) -> None:
    """An issuer (or anything on the way to it) that sends its status line and headers a byte at a
    time, each byte well within any per-read timeout, does not hold a fetch open: the fetch fails
    after fetch_timeout (logged), its worker thread ends too, and the next fetch happens."""
    server.trickle = 0.1
    issuer = issuer_for(server, fetch_timeout=1.0, jwks_refresh_min_interval=0)

    async def main() -> None:
        cache = JwksCache(issuer, clock=Clock())
        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            with trio.fail_after(5):
                await nursery.start(cache.run)  # the first fetch, which trickles
            assert trio.current_time() - started < 2.5
            assert cache.key_count == 0 and "fetch_timeout" in (cache.last_error or "")
            # The thread gave up at the same deadline: it does not keep a worker thread's token.
            limiter = trio.to_thread.current_default_thread_limiter()
            with trio.fail_after(2):
                while limiter.borrowed_tokens:
                    await trio.sleep(0.05)
            server.trickle = 0
            with trio.fail_after(5):
                assert (await cache.key_for("rsa", "RS256")).key_id == "rsa"
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.WARNING, logger="ostiary.identity"):
        trio.run(main)
    assert "issuer ci: fetching keys failed (1 in a row), keeping 0 keys" in caplog.text
    assert server.requests["/jwks"] == 2


def test_a_login_waits_for_a_slow_refresh_only_as_long_as_it_is_told(server: JwksServer) -> None:
    """A token naming a key the cache does not hold asks for a refresh; when the issuer is slow the
    caller (a login, within its startup timeout) stops waiting after ``wait`` and is told the keys are
    unavailable (28000, not a bad token); the fetch goes on and serves the next login."""
    server.serve("/jwks", jwks(RSA))

    async def body(caches: dict[str, JwksCache]) -> None:
        cache = caches["ci"]
        server.serve("/jwks", jwks(RSA, EC256))  # the issuer rotates ...
        server.delay = 2.0  # ... and is slow
        started = trio.current_time()
        with pytest.raises(AuthenticationFailed) as e:
            await cache.key_for("ec256", "ES256", wait=0.5)
        assert trio.current_time() - started < 1.5
        assert e.value.code == "28000"
        assert e.value.reason == (
            "keys of issuer ci are unavailable: fetching them for kid 'ec256' took longer than 0.5 s; "
            "try again"
        )
        with trio.fail_after(5):
            while cache.key_count != 2:
                await trio.sleep(0.05)
        assert (await cache.key_for("ec256", "ES256", wait=0.5)).key_id == "ec256"
        assert server.requests["/jwks"] == 2

    run_caches([issuer_for(server, fetch_timeout=5.0, jwks_refresh_min_interval=0)], Clock(), body)


def test_a_changed_issuer_keeps_the_keys_of_the_same_source(server: JwksServer) -> None:
    """A policy reload replaces the cache of an issuer whose entry changed. With the same key source
    the keys carry over (and ``jwks_max_stale`` counts from the last real success), so an outage
    during the reload does not refuse the issuer's tokens; another source or ``ca`` starts empty."""
    clock = Clock()
    issuer = issuer_for(server)

    async def body(caches: dict[str, JwksCache]) -> None:
        old = caches["ci"]
        server.up = False
        clock.advance(100)
        same = JwksCache(replace(issuer, audiences=("ostiary", "other")), clock=clock, keys_from=old)
        moved = JwksCache(replace(issuer, jwks_url=server.base_url + "/keys"), clock=clock, keys_from=old)
        other_ca = JwksCache(replace(issuer, ca=None), clock=clock, keys_from=old)
        async with trio.open_nursery() as nursery:
            for cache in (same, moved, other_ca):
                await nursery.start(cache.run)  # each fetch fails: the issuer is down
            assert (await same.key_for("rsa", "RS256")).key_id == "rsa"
            assert same.last_success == old.last_success
            assert "HTTP 503" in (same.last_error or "")
            for cache in (moved, other_ca):
                assert (await failure(cache, "rsa", "RS256")).code == "28000"
            nursery.cancel_scope.cancel()

    run_caches([issuer], clock, body)
