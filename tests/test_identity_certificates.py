"""Identities of client certificates: trustme-issued ones, and SPIFFE X.509-SVIDs built with cryptography."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ostiary.errors import AuthenticationFailed
from ostiary.identity import Identity
from ostiary.identity.certificates import certificate_identity


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_trustme_client_certificate() -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("ci@acme.test", "runner.acme.test", common_name="ci-runner")
    chain = [der(blob.bytes()) for blob in leaf.cert_chain_pems]
    identity = certificate_identity(chain)
    cert = x509.load_der_x509_certificate(chain[0])
    assert identity.name == "ci-runner"
    assert identity.issuer == "certificate" and identity.method == "certificate"
    a = identity.attributes
    assert a["common_name"] == "ci-runner" and a["subject"].startswith("CN=ci-runner,")
    assert a["dns"] == "runner.acme.test" and a["email"] == "ci@acme.test"
    assert a["serial"] == format(cert.serial_number, "x")
    assert a["fingerprint_sha256"] == cert.fingerprint(hashes.SHA256()).hex()
    assert a["not_after"] == cert.not_valid_after_utc.isoformat()
    assert identity.expires == cert.not_valid_after_utc.timestamp()
    assert "spiffe_id" not in a and "uri" not in a


def svid(*uris: str, common_name: str | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme spire")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    if uris:
        names = [x509.UniformResourceIdentifier(uri) for uri in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_spiffe_svid() -> None:
    identity = certificate_identity([svid("spiffe://acme.test/ns/prod/sa/api")])
    assert identity.name == "spiffe://acme.test/ns/prod/sa/api"
    assert identity.attributes["spiffe_id"] == "spiffe://acme.test/ns/prod/sa/api"
    assert identity.attributes["trust_domain"] == "acme.test"
    assert identity.attributes["uri"] == "spiffe://acme.test/ns/prod/sa/api"
    assert identity.attributes["subject"] == ""


@pytest.mark.parametrize(
    "uris",
    [
        ("spiffe://acme.test/a", "spiffe://acme.test/b"),  # two SPIFFE IDs: ambiguous
        ("spiffe://ACME.test/a",),  # not a valid SPIFFE ID
        ("spiffe://acme.test:8443/a",),
    ],
)
def test_no_spiffe_id_unless_exactly_one_valid(uris: tuple[str, ...]) -> None:
    identity = certificate_identity([svid(*uris, common_name="fallback")])
    assert "spiffe_id" not in identity.attributes and "trust_domain" not in identity.attributes
    assert identity.name == "fallback"
    assert identity.attributes["uri"] == ",".join(uris)


def test_name_falls_back_to_the_fingerprint() -> None:
    identity = certificate_identity([svid()])
    assert identity.name == "sha256:" + identity.attributes["fingerprint_sha256"]


def test_no_or_unparsable_certificate() -> None:
    with pytest.raises(AuthenticationFailed) as e:
        certificate_identity([])
    assert e.value.code == "28000" and e.value.reason == "the client presented no certificate"
    with pytest.raises(AuthenticationFailed) as e:
        certificate_identity([b"\x30\x03\x02\x01\x00"])
    assert e.value.code == "28P01" and e.value.reason == "the client certificate cannot be parsed"


def test_each_san_is_matched_on_its_own(tmp_path: Path) -> None:
    # A glob over the SANs joined with commas matched across two names: a certificate for
    # db-x.evil.example and ci.acme.internal matched "db-*.acme.internal". Each name is matched on
    # its own, and a certificate matches when one of its names does.
    from ostiary import config
    from ostiary.policy.evaluate import CompiledPolicy

    ca = trustme.CA()

    def identity(*names: str) -> Identity:
        leaf = ca.issue_cert(*names, common_name="c")
        return certificate_identity([der(blob.bytes()) for blob in leaf.cert_chain_pems])

    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    data = {
        "tls": {"cert": "cert.pem", "key": "key.pem", "client_ca": "ca.pem"},
        "identities": [
            {"name": "db-hosts", "issuer": "certificate", "match": {"dns": "db-*.acme.internal"}},
            {"name": "exact", "issuer": "certificate", "match": {"dns": "db-2.acme.internal"}},
        ],
        "connections": [
            {"name": "app", "upstream": {"host": "h", "database": "d", "user": "u", "password": "p"}}
        ],
        "grants": [{"name": "g", "identities": ["db-hosts"], "connection": "app"}],
    }
    policy = CompiledPolicy(config.parse(data, "t", tmp_path))
    mixed = identity("db-x.evil.example", "ci.acme.internal")
    assert mixed.attributes["dns"] == "db-x.evil.example,ci.acme.internal"  # shown joined
    assert mixed.values["dns"] == ("db-x.evil.example", "ci.acme.internal")
    assert policy.names_of(mixed) == set()
    chain: list[str] = []
    assert policy.names_of(mixed, chain) == set()
    assert any("'db-x.evil.example' nor 'ci.acme.internal'" in line for line in chain), chain
    two = identity("db-2.acme.internal", "db-2")
    assert policy.names_of(two) == {"db-hosts", "exact"}
    assert policy.names_of(two, []) == {"db-hosts", "exact"}
    assert policy.names_of(identity("db-1.acme.internal")) == {"db-hosts"}
