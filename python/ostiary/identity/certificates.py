"""Client certificates: the identity of the leaf certificate a client presented.

Rules of this module: it only reads. The TLS layer has already verified the chain against the
client CA, the validity period and the key usage; nothing here makes a certificate more or less
trusted. Attributes are strings and absent when the certificate has no such field. A SPIFFE ID is
taken only from exactly one ``spiffe://`` URI SAN that is a valid SPIFFE ID (X.509-SVIDs carry exactly
one); the name is the SPIFFE ID, else the subject's common name, else the subject, else the fingerprint.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from ostiary.errors import AuthenticationFailed
from ostiary.identity import Identity
from ostiary.identity.spiffe import spiffe_trust_domain

CERTIFICATE_ISSUER = "certificate"


def certificate_identity(der_chain: Sequence[bytes]) -> Identity:
    """The identity of the first (leaf) certificate of a verified chain, each DER-encoded."""
    if not der_chain:
        raise AuthenticationFailed("28000", "the client presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der_chain[0])
    except ValueError:
        raise AuthenticationFailed("28P01", "the client certificate cannot be parsed") from None

    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    not_after = cert.not_valid_after_utc
    attributes = {
        "subject": cert.subject.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "fingerprint_sha256": fingerprint,
        "not_after": not_after.isoformat(),
    }
    common_names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if common_names and isinstance(common_names[0], str):
        attributes["common_name"] = common_names[0]
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    multi: dict[str, tuple[str, ...]] = {}
    for attribute, values in (
        ("dns", names.get_values_for_type(x509.DNSName)),
        ("email", names.get_values_for_type(x509.RFC822Name)),
        ("uri", uris),
    ):
        if values:
            # Shown joined; matched name by name (Identity.values).
            attributes[attribute] = ",".join(values)
            multi[attribute] = tuple(values)
    spiffe_ids = [uri for uri in uris if uri.startswith("spiffe://")]
    if len(spiffe_ids) == 1 and (trust_domain := spiffe_trust_domain(spiffe_ids[0])) is not None:
        attributes["spiffe_id"] = spiffe_ids[0]
        attributes["trust_domain"] = trust_domain

    name = (
        attributes.get("spiffe_id")
        or attributes.get("common_name")
        or attributes["subject"]
        or f"sha256:{fingerprint}"
    )
    return Identity(
        name=name,
        issuer=CERTIFICATE_ISSUER,
        method="certificate",
        attributes=attributes,
        expires=not_after.timestamp(),
        values=multi,
    )
