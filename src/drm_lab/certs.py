"""Test certificates made with ``cryptography``: a CA, CA-issued leaves, self-signed certs.

ECDSA P-256 and P-384, like the product's own keys. Nothing here is written to disk.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import NameOID

_NOW = datetime.datetime.now(datetime.UTC)
_VALID = (_NOW - datetime.timedelta(days=1), _NOW + datetime.timedelta(days=30))


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        """The certificate's DER, as a verifier sees it."""
        return self.cert.public_bytes(Encoding.DER)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_VALID[0])
        .not_valid_after(_VALID[1])
    )


def make_ca(common_name: str, curve: ec.EllipticCurve | None = None) -> Identity:
    """A self-signed CA certificate."""
    key = ec.generate_private_key(curve or ec.SECP384R1())
    cert = (
        _builder(common_name, _name(common_name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    return Identity(cert, key)


def _san() -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )


def make_leaf(ca: Identity, common_name: str, curve: ec.EllipticCurve | None = None) -> Identity:
    """A leaf certificate issued by ``ca`` (SAN localhost / 127.0.0.1)."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    cert = (
        _builder(common_name, ca.cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Identity(cert, key)


def make_self_signed(common_name: str) -> Identity:
    """A self-signed leaf, shaped like an RA-TLS certificate (minus the quote)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key)
        .add_extension(_san(), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Identity(cert, key)


@dataclass(frozen=True)
class Pems:
    """PEM bytes of the CA certificate, the server leaf and its key (PKCS #8).

    What a benchmark hands to a server in another process, or to a TLS stack that loads
    PEM (grpcio, the standard library's ``ssl``).
    """

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def of(cls, ca: Identity, leaf: Identity) -> Pems:
        """``leaf`` and its issuer ``ca`` as PEM."""
        return cls(
            ca=ca.cert.public_bytes(Encoding.PEM),
            cert=leaf.cert.public_bytes(Encoding.PEM),
            key=leaf.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        )


def make_pems() -> Pems:
    """ECDSA P-256 CA and server leaf (SAN localhost, 127.0.0.1): the custodian's key type."""
    ca = make_ca("bench-ca", ec.SECP256R1())
    return Pems.of(ca, make_leaf(ca, "bench-server"))
