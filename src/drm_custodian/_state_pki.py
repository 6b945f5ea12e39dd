"""Certificates for the custodian's state directory: its CA and its TLS server certificate.

Both keys are ECDSA P-256 and both certificates are signed with SHA-256: 128-bit security,
what TLS everywhere uses, and the curve OpenSSL has a fast constant-time implementation of.
Every admin call (``curl`` opens a new connection) and every enclave link pays a handshake,
one signature and two verifications, each several times cheaper on P-256 than on P-384
(docs/production.md, *Measurements behind the design*). State directories made with
P-384 keys still load. The CA is ``CA:TRUE, pathlen:0`` (it signs server certificates
only); the server certificate carries the hostname in its SAN (plus 127.0.0.1 and ::1 for
``localhost``) and the serverAuth EKU, and is presented on both the admin API and the
enclave link.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The CA outlives several server certificates; the server certificate is renewed from it.
CA_VALIDITY: Final = dt.timedelta(days=10 * 365)
SERVER_VALIDITY: Final = dt.timedelta(days=3 * 365)
#: Back-date ``not_valid_before`` so a peer whose clock runs a little slow accepts it.
_CLOCK_SKEW: Final = dt.timedelta(minutes=5)

#: The curve of new keys, and the hash their certificates are signed with.
CURVE: Final = ec.SECP256R1
SIGNATURE_HASH: Final = hashes.SHA256
#: The CA curves a state directory may hold (P-384: directories made before the change).
CA_CURVES: Final = frozenset({"secp256r1", "secp384r1"})


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_KEY_USAGE_FLAGS: Final = (
    "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
    "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
)  # fmt: skip


def _key_usage(*allowed: str) -> x509.KeyUsage:
    return x509.KeyUsage(**{flag: flag in allowed for flag in _KEY_USAGE_FLAGS})


def _issue(
    subject: str,
    public: ec.EllipticCurvePublicKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey],
    now: dt.datetime,
    validity: dt.timedelta,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer[0])
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer[1], SIGNATURE_HASH())


def make_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "drm custodian CA")])
    return _issue(
        "drm custodian CA", key.public_key(), (name, key), now, CA_VALIDITY,
        [(x509.BasicConstraints(ca=True, path_length=0), True),
         (_key_usage("key_cert_sign", "crl_sign"), True)],
    )  # fmt: skip


def make_server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hostname: str,
    now: dt.datetime,
) -> x509.Certificate:
    names: list[x509.GeneralName]
    try:
        names = [x509.IPAddress(ipaddress.ip_address(hostname))]
    except ValueError:
        names = [x509.DNSName(hostname)]
    if hostname == "localhost":
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return _issue(
        hostname if len(hostname) <= 64 else "drm custodian",
        key.public_key(), (ca_cert.subject, ca_key), now, SERVER_VALIDITY,
        [(x509.SubjectAlternativeName(names), False),
         (x509.BasicConstraints(ca=False, path_length=None), True),
         (_key_usage("digital_signature"), True),
         (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
         (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False)],
    )  # fmt: skip
