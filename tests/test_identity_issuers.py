"""Issuer entries: presets, overrides, and every problem reported with a path and a fix."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from ostiary.identity.issuers import issuer_problems, resolve_issuer
from ostiary.policy.model import Issuer


def entry(**fields: Any) -> Issuer:
    return msgspec.convert({"name": "ci", "audiences": ["ostiary"], **fields}, Issuer)


def problems(**fields: Any) -> dict[str, str]:
    found = issuer_problems(entry(**fields), "issuers[0]")
    assert len(found) == len(dict(found)), found
    return dict(found)


def test_github_preset() -> None:
    resolved = resolve_issuer(entry(preset="github-actions"))
    assert resolved.issuer == "https://token.actions.githubusercontent.com"
    assert resolved.discovery and resolved.jwks_url is None and resolved.jwks_file is None
    assert resolved.algorithms == ("RS256",) and resolved.name_claim == "sub"
    assert resolved.max_lifetime == 3600
    assert hash(resolved) == hash(resolve_issuer(entry(preset="github-actions")))


def test_google_preset_and_overrides() -> None:
    resolved = resolve_issuer(entry(preset="google", required_claims=["hd"], max_lifetime=600))
    assert resolved.jwks_url == "https://www.googleapis.com/oauth2/v3/certs" and not resolved.discovery
    assert resolved.name_claim == "email" and resolved.required_claims == ("email", "hd")
    assert resolved.max_lifetime == 600
    assert resolve_issuer(entry(preset="google", discovery=True)).discovery


def test_kubernetes_preset() -> None:
    resolved = resolve_issuer(entry(preset="kubernetes", issuer="https://kubernetes.default.svc"))
    assert resolved.discovery and resolved.algorithms == ("RS256", "ES256")
    assert dict(resolved.attributes)["namespace"] == "kubernetes.io.namespace"
    assert resolved.max_lifetime == 86400
    from_file = resolve_issuer(
        entry(
            preset="kubernetes",
            issuer="https://kubernetes.default.svc",
            jwks_file="/etc/ostiary/k8s-jwks.json",
        )
    )
    assert not from_file.discovery and from_file.jwks_file == "/etc/ostiary/k8s-jwks.json"


def test_without_preset() -> None:
    resolved = resolve_issuer(
        entry(issuer="https://idp.acme.test", algorithms=["EdDSA"], name_claim="client_id")
    )
    assert resolved.discovery and resolved.algorithms == ("EdDSA",) and resolved.name_claim == "client_id"
    assert resolved.max_lifetime == 3600 and resolved.attributes == ()


def test_a_good_entry_has_no_problems() -> None:
    assert problems(preset="gitlab", issuer="https://gitlab.acme.test") == {}


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        (
            {"preset": "github-actions", "audiences": []},
            "audiences",
            "would accept tokens minted for any service",
        ),
        ({"preset": "github-actions", "audiences": [" "]}, "audiences[0]", "an empty audience"),
        (
            {"preset": "kubernetes"},
            "issuer",
            "the kubernetes preset needs issuer: the cluster's service-account",
        ),
        ({"preset": "spiffe"}, "issuer", "the spiffe preset needs issuer"),
        ({}, "issuer", "an issuer needs issuer"),
        ({"issuer": "http://idp.acme.test"}, "issuer", "is not an https:// URL"),
        ({"issuer": "https://idp.acme.test?x=1"}, "issuer", "must not have a query or fragment"),
        ({"issuer": "https://idp.acme.test:99999"}, "issuer", "is not a valid URL"),
        (
            {"preset": "github-actions", "jwks_url": "https://a.test/jwks", "jwks_file": "/k.json"},
            "jwks_file",
            "keys come from exactly one of jwks_url, jwks_file or discovery; jwks_url and jwks_file are set",
        ),
        (
            {"issuer": "https://idp.acme.test", "jwks_file": "/k.json", "discovery": True},
            "discovery",
            "jwks_file and discovery are set",
        ),
        (
            {"issuer": "https://idp.acme.test", "discovery": False},
            "discovery",
            "the keys would come from nowhere",
        ),
        (
            {"issuer": "https://idp.acme.test", "jwks_url": "http://idp.acme.test/jwks"},
            "jwks_url",
            "not an https://",
        ),
        ({"preset": "gitlab", "max_lifetime": 0}, "max_lifetime", "must be a positive number"),
        ({"preset": "gitlab", "jwks_ttl": -1}, "jwks_ttl", "must be a positive number"),
        ({"preset": "gitlab", "fetch_timeout": float("nan")}, "fetch_timeout", "must be a positive number"),
        ({"preset": "gitlab", "jwks_ttl": 600, "jwks_max_stale": 60}, "jwks_max_stale", "at least jwks_ttl"),
        (
            {"preset": "gitlab", "jwks_refresh_min_interval": 0},
            "jwks_refresh_min_interval",
            "at least 1 second",
        ),
        ({"preset": "gitlab", "clock_skew": -5}, "clock_skew", "between 0 and 300 seconds"),
        ({"preset": "gitlab", "clock_skew": 3600}, "clock_skew", "between 0 and 300 seconds"),
        ({"preset": "gitlab", "name_claim": ""}, "name_claim", "an empty name_claim"),
        ({"preset": "gitlab", "required_claims": [""]}, "required_claims[0]", "an empty claim name"),
        ({"preset": "gitlab", "algorithms": []}, "algorithms", "no algorithms"),
        ({"preset": "gitlab", "name": " "}, "name", "an issuer needs a name"),
    ],
)
def test_problems(fields: dict[str, Any], where: str, message: str) -> None:
    found = problems(**fields)
    assert message in found[f"issuers[0].{where}"], found


def test_every_problem_at_once_and_resolve_refuses() -> None:
    cfg = entry(preset="kubernetes", audiences=[], max_lifetime=-1)
    assert {p for p, _ in issuer_problems(cfg, "issuers[2]")} == {
        "issuers[2].issuer",
        "issuers[2].audiences",
        "issuers[2].max_lifetime",
    }
    with pytest.raises(ValueError, match="needs issuer"):
        resolve_issuer(cfg)


def test_only_asymmetric_algorithms() -> None:
    found = problems(preset="gitlab", algorithms=["RS256", "HS256", "none", "ES512"])
    assert (
        "'HS256' is never accepted: tokens must be signed with an asymmetric key"
        in found["issuers[0].algorithms[1]"]
    )
    assert "'none' is never accepted" in found["issuers[0].algorithms[2]"]
    assert "unknown algorithm 'ES512'" in found["issuers[0].algorithms[3]"]
    assert "issuers[0].algorithms[0]" not in found
