"""Certificate chains up to a pinned root (with a cache), and the PCK SGX extension.

Chains: a chain is ``[leaf, intermediates..., root]`` as carried in quotes and collateral.
Each link must name and be signed by the next certificate, every issuer must be a CA
(basic constraints, path length, keyCertSign), the leaf must not be one, and the last
certificate must be self-signed with a public key that is one of the trusted roots. The
signature work is the expensive part and depends only on the chain bytes and the trusted
roots, so successful results are kept in a small LRU keyed by exactly those; validity
dates depend on ``now`` and are re-checked on every call, hit or miss. Failures are never
cached (a peer could otherwise fill the cache with junk for free); revocation is checked by
the caller on every call because CRLs change.

The PCK leaf carries Intel's SGX extension (OID 1.2.840.113741.1.13.1), a DER SEQUENCE of
(OID, value) pairs: PPID, TCB (16 component SVNs, PCESVN, CPUSVN), PCE-ID, FMSPC, SGX type.
``cryptography`` gives it to us as raw bytes; :func:`parse_sgx_extension` reads it with a
small DER reader that only accepts definite lengths and checks every length against its
enclosing element.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from drm_wire._lru import LruCache
from drm_wire.attestation.errors import (
    AttestationError,
    CertificateChainError,
    CertificateValidityError,
    UntrustedRootError,
)

#: How many verified chains we remember. A verifier sees a handful of platforms (each with
#: one PCK chain) plus the two collateral chains; 128 is plenty and bounds memory (~3 KiB each).
CHAIN_CACHE_SIZE: Final = 128
_MAX_CHAIN_CERTS: Final = 5
_MAX_CHAIN_PEM_BYTES: Final = 16 * 1024

#: OID of Intel's SGX extension in PCK certificates.
SGX_EXTENSION_OID: Final = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX_OID_DER: Final = bytes.fromhex("2a864886f84d010d01")  # content bytes of the OID above

_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())

_E = TypeVar("_E", x509.BasicConstraints, x509.KeyUsage)

#: A trusted root: (DER SubjectPublicKeyInfo, whether it is the simulation root).
Root = tuple[bytes, bool]
#: Cache key: (chain bytes, trusted roots, whether the first certificate is a CA).
_Key = tuple[bytes, tuple[Root, ...], bool]


@dataclass(frozen=True, slots=True)
class VerifiedChain:
    """A chain whose links and root verified; dates still need checking against ``now``."""

    certs: tuple[x509.Certificate, ...]
    simulated: bool

    def check_dates(self, now: datetime, what: str) -> None:
        """Raise :class:`CertificateValidityError` unless every certificate is valid at ``now``."""
        for depth, cert in enumerate(self.certs):
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise CertificateValidityError(
                    f"{what}: certificate at depth {depth} is not valid at {now:%Y-%m-%d}"
                )


CHAIN_CACHE: Final = LruCache[_Key, VerifiedChain](CHAIN_CACHE_SIZE)


#: What ``cryptography`` raises on malformed or unsupported X.509 data. Certificates and
#: CRLs are parsed lazily, so these can come from any accessor, not only from loading.
X509_ERRORS: Final = (
    ValueError,
    TypeError,
    InvalidSignature,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,
    # cryptography *warns* about some malformed data (a negative serial number, a country
    # name that is not 2 letters). Where warnings are errors (our tests, -W error) the
    # warning is raised, and then it must still come out as an AttestationError.
    UserWarning,
)


@contextmanager
def x509_errors(error: type[AttestationError], what: str) -> Iterator[None]:
    """The one spot that turns ``cryptography``'s X.509 exceptions into ``error``."""
    try:
        yield
    except X509_ERRORS as exc:
        raise error(f"{what}: malformed or unsupported X.509 data") from exc


def strict_signature_bits(signed: x509.Certificate | x509.CertificateRevocationList) -> bool:
    """Whether the outer signature BIT STRING has no unused bits, as DER signatures must.

    ``cryptography`` accepts a nonzero "unused bits" octet when the dropped bits are zero.
    The signature still verifies, so this is not a forgery, but it makes the same
    certificate encodable in two ways (and a tampered byte go unnoticed); we refuse it.
    """
    der = signed.public_bytes(serialization.Encoding.DER)
    return der[len(der) - len(signed.signature) - 1] == 0


def spki_der(cert: x509.Certificate) -> bytes:
    """DER SubjectPublicKeyInfo of ``cert``, the form in which roots are pinned."""
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ecdsa_ok(key: ec.EllipticCurvePublicKey, rs: bytes, message: bytes) -> bool:
    """Verify a raw r||s P-256 signature; the one place InvalidSignature is translated."""
    der = encode_dss_signature(int.from_bytes(rs[:32], "big"), int.from_bytes(rs[32:], "big"))
    try:
        key.verify(der, message, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


def load_pem_chain(pem: bytes, what: str) -> tuple[x509.Certificate, ...]:
    """Load a PEM chain (a trailing NUL, as in quotes, is allowed)."""
    if len(pem) > _MAX_CHAIN_PEM_BYTES:
        raise CertificateChainError(f"{what}: chain larger than {_MAX_CHAIN_PEM_BYTES} bytes")
    with x509_errors(CertificateChainError, what):
        return tuple(x509.load_pem_x509_certificates(pem.removesuffix(b"\0")))


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_links(
    certs: Sequence[x509.Certificate], roots: tuple[Root, ...], leaf_ca: bool, what: str
) -> bool:
    """Check every link, the CA flags and the root; return whether the root is simulated."""
    if not 2 <= len(certs) <= _MAX_CHAIN_CERTS:
        raise CertificateChainError(f"{what}: need 2 to {_MAX_CHAIN_CERTS} certificates")
    for depth, cert in enumerate(certs):
        if not strict_signature_bits(cert):
            raise CertificateChainError(f"{what}: signature at depth {depth} is not strict DER")
        constraints = _extension(cert, x509.BasicConstraints)
        usage = _extension(cert, x509.KeyUsage)
        if depth == 0 and not leaf_ca:
            if constraints is not None and constraints.ca:
                raise CertificateChainError(f"{what}: leaf certificate is a CA")
            if usage is not None and not usage.digital_signature:
                raise CertificateChainError(f"{what}: leaf key may not sign")
            continue
        if constraints is None or not constraints.ca:
            raise CertificateChainError(f"{what}: issuer at depth {depth} is not a CA")
        if constraints.path_length is not None and depth - 1 > constraints.path_length:
            raise CertificateChainError(f"{what}: path length exceeded at depth {depth}")
        if usage is not None and not usage.key_cert_sign:
            raise CertificateChainError(f"{what}: issuer at depth {depth} may not sign certs")
    try:
        for child, parent in itertools.pairwise(certs):
            child.verify_directly_issued_by(parent)
        certs[-1].verify_directly_issued_by(certs[-1])
    except (ValueError, InvalidSignature) as exc:
        raise CertificateChainError(f"{what}: issuer or signature mismatch in chain") from exc
    root_key = spki_der(certs[-1])
    for key, simulated in roots:
        if key == root_key:
            return simulated
    raise UntrustedRootError(f"{what}: chain ends at an untrusted root")


def verify_chain(
    chain: bytes | Sequence[x509.Certificate],
    roots: tuple[Root, ...],
    *,
    now: datetime,
    what: str,
    leaf_ca: bool = False,
) -> VerifiedChain:
    """Verify ``chain`` (PEM bytes, or loaded certificates) up to one of ``roots`` at ``now``.

    ``leaf_ca`` says the first certificate is itself a CA (a CRL issuer chain), not an
    end entity.

    Raises:
        CertificateChainError: malformed, a broken link, CA flags wrong.
        UntrustedRootError: the chain ends at a root that is not in ``roots``.
        CertificateValidityError: a certificate is not valid at ``now``.
    """
    if isinstance(chain, bytes):
        chain_key = chain
    else:
        chain_key = b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain)
    key = (chain_key, roots, leaf_ca)
    result = CHAIN_CACHE.get(key)
    if result is None:
        certs = load_pem_chain(chain, what) if isinstance(chain, bytes) else tuple(chain)
        with x509_errors(CertificateChainError, what):
            result = VerifiedChain(certs, _check_links(certs, roots, leaf_ca, what))
        CHAIN_CACHE.put(key, result)
    result.check_dates(now, what)
    return result


# --- the SGX extension of PCK certificates -------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PckExtension:
    """What the PCK leaf says about the platform, from Intel's SGX extension."""

    fmspc: bytes  # 6 bytes: family-model-stepping-platform-customSKU
    pce_id: bytes  # 2 bytes
    cpusvn: bytes  # 16 bytes
    pcesvn: int
    tcb_components: tuple[int, ...]  # 16 SVNs, CPUSVN split per component


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Read one DER element in ``data[pos:end]``: (tag, content start, content end)."""
    if end - pos < 2:
        raise CertificateChainError("SGX extension: truncated element")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise CertificateChainError("SGX extension: multi-byte tags are not supported")
    pos += 2
    if first < 0x80:
        length = first
    elif 0x81 <= first <= 0x83:
        count = first & 0x7F
        if end - pos < count:
            raise CertificateChainError("SGX extension: truncated length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    else:
        raise CertificateChainError("SGX extension: unsupported length form")
    if length > end - pos:
        raise CertificateChainError("SGX extension: element runs past its parent")
    return tag, pos, pos + length


def _pairs(data: bytes, start: int, end: int) -> dict[bytes, tuple[int, int, int]]:
    """Read a SEQUENCE OF SEQUENCE { OID, value } into {oid content: value tlv}."""
    result: dict[bytes, tuple[int, int, int]] = {}
    pos = start
    while pos < end:
        tag, inner, pos = _tlv(data, pos, end)
        if tag != 0x30:
            raise CertificateChainError("SGX extension: expected SEQUENCE")
        oid_tag, oid_start, oid_end = _tlv(data, inner, pos)
        if oid_tag != 0x06:
            raise CertificateChainError("SGX extension: expected OID")
        oid = data[oid_start:oid_end]
        if oid in result:
            raise CertificateChainError("SGX extension: duplicate OID")
        result[oid] = _tlv(data, oid_end, pos)
    return result


def _value(items: dict[bytes, tuple[int, int, int]], oid: bytes, tag: int, data: bytes) -> bytes:
    found = items.get(oid)
    if found is None or found[0] != tag:
        raise CertificateChainError("SGX extension: required field missing or mistyped")
    return data[found[1] : found[2]]


def _uint(raw: bytes, bits: int) -> int:
    value = int.from_bytes(raw, "big", signed=True)
    if not raw or not 0 <= value < 1 << bits:
        raise CertificateChainError("SGX extension: SVN out of range")
    return value


def parse_sgx_extension(cert: x509.Certificate) -> PckExtension | None:
    """Read the SGX extension of a PCK leaf; ``None`` if the certificate has none.

    Raises:
        CertificateChainError: the extension is present but malformed.
    """
    try:
        with x509_errors(CertificateChainError, "PCK certificate"):
            ext = cert.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(ext, x509.UnrecognizedExtension):  # pragma: no cover - cryptography
        raise CertificateChainError("SGX extension: unexpected decoding")
    data = ext.value
    tag, start, end = _tlv(data, 0, len(data))
    if tag != 0x30 or end != len(data):
        raise CertificateChainError("SGX extension: expected one SEQUENCE")
    top = _pairs(data, start, end)
    tcb_start = top.get(_SGX_OID_DER + b"\x02")
    if tcb_start is None or tcb_start[0] != 0x30:
        raise CertificateChainError("SGX extension: TCB field missing")
    tcb = _pairs(data, tcb_start[1], tcb_start[2])
    tcb_oid = _SGX_OID_DER + b"\x02"
    components = tuple(
        _uint(_value(tcb, tcb_oid + bytes([i]), 0x02, data), 8) for i in range(1, 17)
    )
    cpusvn = _value(tcb, tcb_oid + b"\x12", 0x04, data)
    fmspc = _value(top, _SGX_OID_DER + b"\x04", 0x04, data)
    pce_id = _value(top, _SGX_OID_DER + b"\x03", 0x04, data)
    if len(cpusvn) != 16 or len(fmspc) != 6 or len(pce_id) != 2:
        raise CertificateChainError("SGX extension: CPUSVN, FMSPC or PCE-ID has the wrong size")
    return PckExtension(
        fmspc=fmspc,
        pce_id=pce_id,
        cpusvn=cpusvn,
        pcesvn=_uint(_value(tcb, tcb_oid + b"\x11", 0x02, data), 16),
        tcb_components=components,
    )


#: A PCK CA, as the PCS/PCCS ``ca`` parameter names it.
CaType = Literal["processor", "platform"]


def pck_ca_type(leaf: x509.Certificate) -> CaType | None:
    """Which PCK CA issued ``leaf``, as the PCS/PCCS ``ca`` parameter names it.

    Intel's PCK certificates are issued by "Intel SGX PCK Processor CA" or "Intel SGX PCK
    Platform CA" (Intel's PCK certificate and CRL profile), and each has its own CRL: a
    verifier needs the one that covers its leaf. Read from the issuer's common name (the
    simulated platform's names its platform CA the same way); ``None`` if it names neither.
    """
    names = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if len(names) == 1 else ""
    if "PCK Processor CA" in common_name:
        return "processor"
    if "PCK Platform CA" in common_name:
        return "platform"
    return None
