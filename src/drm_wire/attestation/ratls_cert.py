"""RA-TLS certificates in Gramine's format: build them, take them apart, check key binding.

An RA-TLS certificate is a self-signed X.509 certificate whose key is bound to an SGX quote
carried in an extension (Gramine's ``tools/sgx/ra-tls``). Two carriers exist and Gramine
(>= 1.8) emits both, each with its own quote:

* legacy: OID content bytes ``06 09 2A 86 48 86 F8 4D 8A 39 06`` (Gramine's historical
  mistake, dotted ``0.6.9.42.840.113741.1337.6``), value = the raw quote, whose
  ``report_data`` is ``SHA-256(SubjectPublicKeyInfo DER) || 0*32``;
* TCG DICE tagged evidence, OID 2.23.133.5.4.9, value = CBOR ``60000([quote, claims])``
  where ``claims`` is a serialised CBOR map ``{"pubkey-hash": [alg, hash(SPKI)]}`` and the
  quote's ``report_data`` is ``SHA-256(claims) || 0*32`` (CCC interoperable RA-TLS spec).

For interoperability the Intel SGX SDK's carrier (OID 1.2.840.113741.1.13.1, raw quote) is
read like the legacy one; that producer reuses the claims-bound TCG quote there, so a legacy
quote may bind the key through the claims hash when (and only when) valid claims are present.
As in Gramine's verifier, only ``report_data[0:32]`` is compared.

Parsing is deliberately tolerant of the *certificate* (see :mod:`._der`: real Gramine certs
carry an AlgorithmIdentifier NULL that pyca/cryptography refuses) and strict about the
*evidence*: the key binding is always required, a present-but-invalid TCG extension never
falls back to the legacy one, and when both are present they must describe the same enclave.
**Stapled collateral.** TLS has no stapling channel for a *client* certificate, and a
consumer may reach no PCCS at all, so the enclave may carry its platform's collateral
bundle (the JSON of :class:`~.collateral.Collateral`) in a non-critical extension,
:data:`STAPLED_COLLATERAL_OID` (an ITU-T X.667 UUID arc: no registration needed). It is
evidence like the quote, never trusted as such: a verifier checks it exactly like
collateral it fetched (signatures to the pinned root, validity at ``now``) and uses the
newest valid collateral among its sources (:mod:`.collateral_source`). Peers that do not
know the OID ignore it (non-critical).

The self-signature and validity dates are not checked, as in Gramine's own verifier: the
TLS handshake proves possession of the key, and the quote is what vouches for it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import ClassVar, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ

from drm_wire.attestation import _der
from drm_wire.attestation._ratls_claims import (
    HASH_ALG_SHA256,
    TCG_EVIDENCE_TAG,
    CertificateFormatError,
    Claims,
    decode_tcg_evidence,
    encode_claims,
    encode_tcg_evidence,
)
from drm_wire.attestation.quote import parse_quote
from drm_wire.errors import AttestationError

__all__ = [
    "GRAMINE_NOT_AFTER",
    "GRAMINE_NOT_BEFORE",
    "HASH_ALG_SHA256",
    "INTEL_SGX_QUOTE_OID",
    "LEGACY_QUOTE_OID",
    "MAX_EXTENSION_BYTES",
    "MAX_STAPLED_COLLATERAL_BYTES",
    "MIN_EXTENSION_BYTES",
    "STAPLED_COLLATERAL_OID",
    "TCG_EVIDENCE_OID",
    "TCG_EVIDENCE_TAG",
    "CertificateFormatError",
    "Claims",
    "EvidenceMismatchError",
    "KeyBindingError",
    "QuoteProvider",
    "RatlsCredentials",
    "RatlsEvidence",
    "build_ratls_certificate",
    "encode_claims",
    "encode_tcg_evidence",
    "parse_ratls_certificate",
    "restaple",
]

#: Gramine's legacy quote extension, as cryptography spells its quirky content bytes.
LEGACY_QUOTE_OID: Final = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
#: TCG DICE ``tcg-dice-tagged-evidence``.
TCG_EVIDENCE_OID: Final = x509.ObjectIdentifier("2.23.133.5.4.9")
#: Intel SGX SDK's RA-TLS quote extension (1.2.840.113741.1.13.1), read for interop only.
INTEL_SGX_QUOTE_OID: Final = x509.ObjectIdentifier("1.2.840.113741.1.13.1")

# OID *content* bytes (what follows the 06 LL header) we recognise, by carrier.
_LEGACY_OIDS: Final = {
    bytes.fromhex("06092a864886f84d8a3906"): "gramine-legacy",
    bytes.fromhex("2a864886f84d010d01"): "intel-sgx-sdk",
}
_TCG_OID: Final = bytes.fromhex("678105050409")

#: Gramine's extractor wants ``04 82 LL LL`` and at most ``SGX_QUOTE_MAX_SIZE``.
#: Stapled collateral is a bundle (~14 KiB for a real platform); 40 KiB keeps the whole
#: certificate under MAX_CERTIFICATE_BYTES with both quotes.
MAX_STAPLED_COLLATERAL_BYTES: Final = 40 * 1024
#: The extension that carries stapled collateral: 2.25 + a random UUID (X.667).
STAPLED_COLLATERAL_OID: Final = x509.ObjectIdentifier(
    "2.25.313667103745363979516568158793094427274"
)
#: Content bytes of STAPLED_COLLATERAL_OID, as the tolerant DER reader keys extensions.
_STAPLED_OID_CONTENT: Final = bytes(
    der_encoder.encode(univ.ObjectIdentifier(STAPLED_COLLATERAL_OID.dotted_string))
)[2:]
MIN_EXTENSION_BYTES: Final = 256
MAX_EXTENSION_BYTES: Final = 8192
#: Two extensions of 8 KiB, base64 overhead and the rest of the certificate fit easily.
MAX_CERTIFICATE_BYTES: Final = 64 * 1024

GRAMINE_NOT_BEFORE: Final = datetime(2001, 1, 1, tzinfo=UTC)
GRAMINE_NOT_AFTER: Final = datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)
_GRAMINE_NAME: Final = x509.Name(
    [
        x509.NameAttribute(NameOID.COMMON_NAME, "RATLS"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "GramineDevelopers"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    ]
)
_CURVES: Final = (ec.SECP256R1, ec.SECP384R1)  # what Gramine's verifier accepts

#: ``(report_data: 64 bytes) -> quote``: Gramine's ``/dev/attestation`` or the simulation.
QuoteProvider = Callable[[bytes], bytes]


class KeyBindingError(AttestationError):
    """The quote does not bind the certificate's public key (missing or wrong hash)."""

    check: ClassVar[str] = "key_binding"


class EvidenceMismatchError(AttestationError):
    """Both quote extensions are present but describe different enclaves."""

    check: ClassVar[str] = "evidence_mismatch"


def _spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True, slots=True)
class RatlsCredentials:
    """A fresh RA-TLS key pair and certificate, ready for pyOpenSSL.

    ``SSL.Context.use_certificate`` / ``use_privatekey`` take the cryptography objects
    directly; the PEM/DER forms are for files and for ``gramine-ratls``-style tooling.
    """

    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def certificate_der(self) -> bytes:
        """The certificate, DER."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def certificate_pem(self) -> bytes:
        """The certificate, PEM (label ``CERTIFICATE``)."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key_der(self) -> bytes:
        """The private key, unencrypted PKCS#8 DER. Secret: never log it."""
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def private_key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM. Secret: never log it."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _report_data(digest: bytes) -> bytes:
    return digest + bytes(64 - len(digest))


def _checked_value(value: bytes, what: str) -> bytes:
    if not MIN_EXTENSION_BYTES <= len(value) <= MAX_EXTENSION_BYTES:
        raise CertificateFormatError(
            f"{what} extension is {len(value)} bytes; Gramine needs "
            f"{MIN_EXTENSION_BYTES}..{MAX_EXTENSION_BYTES}"
        )
    return value


def build_ratls_certificate(
    quote_provider: QuoteProvider,
    *,
    private_key: ec.EllipticCurvePrivateKey | None = None,
    not_before: datetime = GRAMINE_NOT_BEFORE,
    not_after: datetime = GRAMINE_NOT_AFTER,
    legacy_extension: bool = True,
    tcg_extension: bool = True,
    stapled_collateral: bytes | None = None,
) -> RatlsCredentials:
    """Make a key (P-384 by default) and a certificate exactly as Gramine's attester does.

    The provider is called once per extension, with the report data that extension needs,
    so the certificate carries two different quotes, as Gramine's does. To re-issue the
    certificate with fresh collateral, pass the same key and a provider that returns the
    same quotes: the report data depends only on the key.

    Raises:
        CertificateFormatError: a quote does not fit Gramine's extension size limits, or
            ``stapled_collateral`` is empty or larger than ``MAX_STAPLED_COLLATERAL_BYTES``.
        ValueError: no extension requested, or the key is not on P-256/P-384.
    """
    if not (legacy_extension or tcg_extension):
        raise ValueError("an RA-TLS certificate needs at least one quote extension")
    key = private_key if private_key is not None else ec.generate_private_key(ec.SECP384R1())
    if not isinstance(key.curve, _CURVES):
        raise ValueError(f"RA-TLS keys are P-256 or P-384, not {key.curve.name}")
    public_key = key.public_key()
    spki = _spki_der(public_key)
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_GRAMINE_NAME)
        .issuer_name(_GRAMINE_NAME)
        .serial_number(1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .public_key(public_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    if legacy_extension:
        quote = quote_provider(_report_data(hashlib.sha256(spki).digest()))
        value = _checked_value(quote, "legacy quote")
        builder = builder.add_extension(x509.UnrecognizedExtension(LEGACY_QUOTE_OID, value), False)
    if tcg_extension:
        claims = encode_claims(spki)
        quote = quote_provider(_report_data(hashlib.sha256(claims).digest()))
        value = _checked_value(encode_tcg_evidence(quote, claims), "TCG evidence")
        builder = builder.add_extension(x509.UnrecognizedExtension(TCG_EVIDENCE_OID, value), False)
    if stapled_collateral is not None:
        value = _stapled(stapled_collateral)
        extension = x509.UnrecognizedExtension(STAPLED_COLLATERAL_OID, value)
        builder = builder.add_extension(extension, critical=False)
    return RatlsCredentials(key, builder.sign(key, hashes.SHA256()))


def restaple(credentials: RatlsCredentials, stapled_collateral: bytes | None) -> RatlsCredentials:
    """The same key and the very same quotes, with ``stapled_collateral`` in place of what
    ``credentials`` stapled (``None``: nothing, once what it stapled has expired): how an
    enclave that runs for weeks staples refreshed collateral without asking its platform
    for new quotes.

    Every quote is matched to the extension it came from by its report data (which depends
    only on the key), so a certificate whose quotes do not bind its key cannot be re-issued.

    Raises:
        CertificateFormatError: ``credentials`` is not an RA-TLS certificate this module
            reads, or a quote does not bind its key, or the staple is empty or too large.
    """
    evidence = parse_ratls_certificate(credentials.certificate_der)
    by_report_data = {parse_quote(q).body.report_data: q for q in evidence.quotes}

    def same_quote(report_data: bytes) -> bytes:
        quote = by_report_data.get(report_data)
        if quote is None:
            raise CertificateFormatError("a quote in the certificate does not bind its key")
        return quote

    return build_ratls_certificate(
        same_quote,
        private_key=credentials.private_key,
        not_before=credentials.certificate.not_valid_before_utc,
        not_after=credentials.certificate.not_valid_after_utc,
        legacy_extension=evidence.legacy_quote is not None,
        tcg_extension=evidence.tcg_quote is not None,
        stapled_collateral=stapled_collateral,
    )


def _stapled(value: bytes) -> bytes:
    if not 0 < len(value) <= MAX_STAPLED_COLLATERAL_BYTES:
        raise CertificateFormatError(
            f"stapled collateral is {len(value)} bytes; at most {MAX_STAPLED_COLLATERAL_BYTES}"
        )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class RatlsEvidence:
    """What an RA-TLS certificate carries, with the key binding already checked.

    Nothing here is *verified*: the quotes still need
    :func:`~drm_wire.attestation.verify.verify_quote` and a policy.

    Attributes:
        spki_der: the certificate's SubjectPublicKeyInfo, as encoded in the certificate.
        public_key: that key (EC P-256 or P-384).
        tcg_quote: the quote from the TCG evidence extension, if present.
        claims: the TCG claims (``None`` without that extension).
        legacy_quote: the quote from the legacy extension, if present.
        legacy_carrier: which legacy OID carried it (``"gramine-legacy"``...), or ``None``.
        stapled_collateral: the collateral bundle bytes the peer stapled, or ``None``
            (size-checked only; parse and verify it like any collateral).
    """

    spki_der: bytes
    public_key: ec.EllipticCurvePublicKey
    tcg_quote: bytes | None
    claims: Claims | None
    legacy_quote: bytes | None
    legacy_carrier: str | None
    stapled_collateral: bytes | None = None

    @property
    def quotes(self) -> tuple[bytes, ...]:
        """Every quote carried, the preferred (TCG) one first."""
        return tuple(q for q in (self.tcg_quote, self.legacy_quote) if q is not None)

    @property
    def quote(self) -> bytes:
        """The preferred quote: TCG if present, else legacy."""
        return self.quotes[0]


def _load_key(spki: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(spki)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # cryptography's parse errors
        raise CertificateFormatError("SubjectPublicKeyInfo does not parse") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _CURVES):
        raise CertificateFormatError(f"RA-TLS key must be EC P-256/P-384, not {type(key).__name__}")
    return key


def _check_binding(quote: bytes, expected: tuple[bytes, ...], what: str) -> None:
    actual = parse_quote(quote).body.report_data[:32]
    if not any(hmac.compare_digest(actual, digest) for digest in expected):
        raise KeyBindingError(f"{what} quote report_data does not bind the certificate key")


def parse_ratls_certificate(data: bytes) -> RatlsEvidence:
    """Take an RA-TLS certificate (DER or PEM) apart and check its key binding.

    Args:
        data: DER, or PEM with label ``CERTIFICATE`` or ``TRUSTED CERTIFICATE``.

    Returns:
        The evidence, whose quotes bind the certificate's key. Not yet verified.

    Raises:
        CertificateFormatError: malformed DER/PEM, wrong key type, no quote extension, an
            extension of the wrong size, malformed TCG CBOR or claims, no ``pubkey-hash``.
        KeyBindingError: a hash does not match the key (claims, or a quote's report data).
        EvidenceMismatchError: both extensions present but for different enclaves.
        QuoteFormatError, UnsupportedQuoteError: a carried quote does not parse.
    """
    data = bytes(data)
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise CertificateFormatError(f"certificate larger than {MAX_CERTIFICATE_BYTES} bytes")
    try:
        der = _der.certificate_from_pem(data) if data.lstrip().startswith(b"-----") else data
        spki, extensions = _der.certificate_parts(der)
    except _der.DerError as exc:
        raise CertificateFormatError(f"malformed certificate: {exc}") from exc
    public_key = _load_key(spki)
    spki_hash = hashlib.sha256(spki).digest()

    tcg_quote = claims = legacy_quote = legacy_carrier = None
    if _TCG_OID in extensions:
        tcg_quote, claims = decode_tcg_evidence(_checked_value(extensions[_TCG_OID], "TCG"))
        if not hmac.compare_digest(claims.pubkey_hash, claims.hash_of(spki)):
            raise KeyBindingError("pubkey-hash claim does not match the certificate key")
        _check_binding(tcg_quote, (hashlib.sha256(claims.raw).digest(),), "TCG")
    for oid, carrier in _LEGACY_OIDS.items():
        if oid in extensions:
            if legacy_quote is not None:
                raise CertificateFormatError("more than one legacy quote extension")
            legacy_quote, legacy_carrier = _checked_value(extensions[oid], carrier), carrier
    if legacy_quote is not None:
        # Gramine binds the SPKI directly; Intel's SDK reuses the TCG quote (claims hash).
        accepted = (
            (spki_hash,) if claims is None else (spki_hash, hashlib.sha256(claims.raw).digest())
        )
        _check_binding(legacy_quote, accepted, "legacy")
    if tcg_quote is None and legacy_quote is None:
        raise CertificateFormatError("no RA-TLS quote extension")
    if tcg_quote is not None and legacy_quote is not None:
        bodies = (parse_quote(q).body for q in (tcg_quote, legacy_quote))
        tcg_body, legacy_body = (replace(b, report_data=bytes(64)) for b in bodies)
        if tcg_body != legacy_body:
            raise EvidenceMismatchError("TCG and legacy quotes describe different enclaves")
    stapled = extensions.get(_STAPLED_OID_CONTENT)
    return RatlsEvidence(
        stapled_collateral=None if stapled is None else _stapled(stapled),
        spki_der=spki,
        public_key=public_key,
        tcg_quote=tcg_quote,
        claims=claims,
        legacy_quote=legacy_quote,
        legacy_carrier=legacy_carrier,
    )
