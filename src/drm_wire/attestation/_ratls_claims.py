"""The TCG DICE tagged-evidence value of RA-TLS certificates: CBOR claims and evidence.

Format (CCC-Attestation interoperable RA-TLS spec; Gramine >= 1.8): the extension value is
CBOR ``60000([bstr quote, bstr claims])``; ``claims`` is a serialised CBOR map of text keys
to byte strings, with the required ``pubkey-hash`` = serialised ``[hash-alg-id, hash]``
(IANA named-information ids 1/7/8 = SHA-256/384/512, over the certificate's SPKI DER) and an
optional ``nonce``; other claims are ignored. Private to :mod:`.ratls`, which re-exports the
public names.

cbor2 is called only here, and every decode goes through :func:`_cbor_exactly`, the one
place its exceptions become :class:`CertificateFormatError`. Input is bounded by the
extension size limit (8 KiB) before it gets here.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import ClassVar, Final

import cbor2

from drm_wire.errors import AttestationError

__all__ = [
    "HASH_ALG_SHA256",
    "TCG_EVIDENCE_TAG",
    "CertificateFormatError",
    "Claims",
    "decode_tcg_evidence",
    "encode_claims",
    "encode_tcg_evidence",
]

#: CBOR tag of the Intel TEE quote evidence format (``<tag1>`` of the CCC spec), Gramine's.
TCG_EVIDENCE_TAG: Final = 60000
#: IANA named-information hash algorithm ids the CCC spec requires a verifier to support.
HASH_ALG_SHA256: Final = 1
_HASHES: Final = {HASH_ALG_SHA256: hashlib.sha256, 7: hashlib.sha384, 8: hashlib.sha512}


class CertificateFormatError(AttestationError):
    """The certificate is not a well-formed RA-TLS certificate (DER, PEM, extensions, CBOR)."""

    check: ClassVar[str] = "ratls_format"


@dataclass(frozen=True, slots=True, kw_only=True)
class Claims:
    """The TCG evidence custom claims (CCC interoperable RA-TLS spec).

    Attributes:
        raw: the serialised claims map, exactly as carried: its SHA-256 is in the quote.
        hash_alg: IANA named-information id of the ``pubkey-hash`` algorithm (1, 7 or 8).
        pubkey_hash: hash of the certificate's SubjectPublicKeyInfo DER.
        nonce: the optional ``nonce`` claim (Gramine does not emit one).
        other: names of further claims, which are ignored (rats-tls adds some).
    """

    raw: bytes
    hash_alg: int
    pubkey_hash: bytes
    nonce: bytes | None
    other: tuple[str, ...]

    def hash_of(self, spki_der: bytes) -> bytes:
        """Hash ``spki_der`` with this claim's algorithm."""
        return _HASHES[self.hash_alg](spki_der).digest()


def encode_claims(
    spki_der: bytes, *, hash_alg: int = HASH_ALG_SHA256, nonce: bytes | None = None
) -> bytes:
    """Serialise the claims map binding ``spki_der``, deterministically (as Gramine does).

    Raises:
        ValueError: ``hash_alg`` is not 1, 7 or 8.
    """
    if hash_alg not in _HASHES:
        raise ValueError(f"unsupported hash algorithm id {hash_alg}")
    entry = cbor2.dumps([hash_alg, _HASHES[hash_alg](spki_der).digest()], canonical=True)
    claims: dict[str, bytes] = {"pubkey-hash": entry}
    if nonce is not None:
        claims["nonce"] = nonce
    return cbor2.dumps(claims, canonical=True)


def encode_tcg_evidence(quote: bytes, claims: bytes) -> bytes:
    """The TCG tagged-evidence extension value: CBOR ``60000([quote, claims])``."""
    return cbor2.dumps(cbor2.CBORTag(TCG_EVIDENCE_TAG, [quote, claims]), canonical=True)


def _cbor_exactly(data: bytes, what: str) -> object:
    """Decode one CBOR item that spans ``data`` exactly; the one place cbor2 errors map."""
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except (
        cbor2.CBORError,
        ValueError,
        TypeError,
        LookupError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise CertificateFormatError(f"{what} is not valid CBOR") from exc
    if stream.tell() != len(data):
        raise CertificateFormatError(f"{what}: {len(data) - stream.tell()} trailing bytes")
    return item


def _decode_claims(raw: bytes) -> Claims:
    claims = _cbor_exactly(raw, "claims")
    if not isinstance(claims, dict) or not all(isinstance(k, str) for k in claims):
        raise CertificateFormatError("claims are not a map with text keys")
    entry_raw = claims.get("pubkey-hash")
    if not isinstance(entry_raw, bytes):
        raise CertificateFormatError("claims have no pubkey-hash byte string (key not bound)")
    entry = _cbor_exactly(entry_raw, "pubkey-hash")
    if not (isinstance(entry, list | tuple) and len(entry) == 2 and type(entry[0]) is int):
        raise CertificateFormatError("pubkey-hash is not [hash-alg-id, hash-value]")
    alg, digest = entry
    if alg not in _HASHES:
        raise CertificateFormatError(f"pubkey-hash algorithm id {alg} is not 1, 7 or 8")
    if not isinstance(digest, bytes) or len(digest) != _HASHES[alg]().digest_size:
        raise CertificateFormatError("pubkey-hash value has the wrong size for its algorithm")
    nonce = claims.get("nonce")
    if nonce is not None and not isinstance(nonce, bytes):
        raise CertificateFormatError("nonce claim is not a byte string")
    other = tuple(sorted(k for k in claims if k not in ("pubkey-hash", "nonce")))
    return Claims(raw=raw, hash_alg=alg, pubkey_hash=digest, nonce=nonce, other=other)


def decode_tcg_evidence(value: bytes) -> tuple[bytes, Claims]:
    """Split an evidence extension value into its quote and parsed claims.

    Checks the structure only; the key binding is :mod:`.ratls`'s job.

    Raises:
        CertificateFormatError: not exactly one CBOR item, wrong tag or shape, or claims
            without a well-formed ``pubkey-hash`` (so the key would not be bound).
    """
    item = _cbor_exactly(value, "TCG evidence")
    if not isinstance(item, cbor2.CBORTag) or item.tag != TCG_EVIDENCE_TAG:
        raise CertificateFormatError(f"TCG evidence is not CBOR tag {TCG_EVIDENCE_TAG}")
    pair = item.value
    if not (
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and all(isinstance(p, bytes) for p in pair)
    ):
        raise CertificateFormatError("TCG evidence is not [bstr quote, bstr claims]")
    return pair[0], _decode_claims(pair[1])
