"""SGX DCAP ECDSA quotes (v3, and SGX v4): parse and assemble, no cryptography here.

Layout (all integers little-endian; Intel SGX ECDSA Quote Library API, appendix A, and
Intel's ``sgx_quote_3.h`` / ``sgx_quote_4.h``; Phala ``dcap-qvl`` ``src/quote.rs``)::

    0    header (48)            version, att key type, tee type, qe/pce svn, vendor, user data
    48   report body (384)      the enclave's SGX report (MRENCLAVE, report data...)
    432  u32 signature_data_len
    436  signature data         v3: sig(64) key(64) qe_report(384) qe_sig(64)
                                    u16 auth_len + auth, u16 type 5 + u32 len + PEM chain
                                v4: sig(64) key(64), u16 type 6 + u32 len + [qe_report,
                                    qe_sig, auth, nested type-5 cert data]

Every length read from the quote is checked against the bytes that remain before it is
used, and the whole quote is bounded by :data:`MAX_QUOTE_BYTES`, so a hostile quote can
neither index past the end nor make us allocate much. Parsing proves nothing: only
:func:`drm_wire.attestation.verify.verify_quote` says a quote is genuine.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from drm_wire.attestation.errors import QuoteFormatError, UnsupportedQuoteError

__all__ = [
    "ATTESTATION_KEY_TYPE_ECDSA_P256",
    "ATTRIBUTE_DEBUG",
    "ATTRIBUTE_EINITTOKEN_KEY",
    "ATTRIBUTE_INIT",
    "ATTRIBUTE_MODE64BIT",
    "ATTRIBUTE_PROVISION_KEY",
    "CERT_DATA_PCK_CHAIN",
    "CERT_DATA_QE_REPORT",
    "INTEL_QE_VENDOR_ID",
    "MAX_QUOTE_BYTES",
    "QUOTE_HEADER_BYTES",
    "REPORT_BODY_BYTES",
    "SIGNED_QUOTE_BYTES",
    "TEE_TYPE_SGX",
    "Quote",
    "QuoteHeader",
    "ReportBody",
    "build_quote",
    "parse_quote",
]

QUOTE_HEADER_BYTES: Final = 48
REPORT_BODY_BYTES: Final = 384
#: The quote signature covers header and report body: ``quote[0:432]``.
SIGNED_QUOTE_BYTES: Final = QUOTE_HEADER_BYTES + REPORT_BODY_BYTES
#: Gramine's ``SGX_QUOTE_MAX_SIZE``: it refuses larger quotes in RA-TLS certificates, and real
#: quotes with a three-certificate PCK chain are about 4.6 KiB, so 8 KiB is ample.
MAX_QUOTE_BYTES: Final = 8192

#: Vendor id of Intel's Quoting Enclave (``sgx_quote_3.h``). Simulated quotes use another.
INTEL_QE_VENDOR_ID: Final = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

#: Header ``att_key_type`` for ECDSA-256-with-P-256, the only one Intel's QE produces.
ATTESTATION_KEY_TYPE_ECDSA_P256: Final = 2
#: Header ``tee_type`` for SGX (TDX is 0x81; version 3 calls this field reserved, always 0).
TEE_TYPE_SGX: Final = 0
#: Certification data: PEM PCK chain (leaf, platform/processor CA, root).
CERT_DATA_PCK_CHAIN: Final = 5
#: Certification data: QE report wrapper used by v4 quotes (holds a nested type 5).
CERT_DATA_QE_REPORT: Final = 6

# SGX attribute flag bits (gramine ``sgx_arch.h``).
ATTRIBUTE_INIT: Final = 0x01
ATTRIBUTE_DEBUG: Final = 0x02
ATTRIBUTE_MODE64BIT: Final = 0x04
ATTRIBUTE_PROVISION_KEY: Final = 0x10
ATTRIBUTE_EINITTOKEN_KEY: Final = 0x20

_SUPPORTED_VERSIONS: Final = (3, 4)
_SIG_BYTES: Final = 64
_KEY_BYTES: Final = 64

# Report body: (name, size) in order; "reserved*" keep unknown bytes so to_bytes() is exact.
_BODY_LAYOUT: Final = (
    ("cpu_svn", 16), ("misc_select", 4), ("reserved1", 12), ("isv_ext_prod_id", 16),
    ("attributes_flags", 8), ("attributes_xfrm", 8), ("mr_enclave", 32), ("reserved2", 32),
    ("mr_signer", 32), ("reserved3", 32), ("config_id", 64), ("isv_prod_id", 2),
    ("isv_svn", 2), ("config_svn", 2), ("reserved4", 42), ("isv_family_id", 16),
    ("report_data", 64),
)  # fmt: skip
_BODY_INTS: Final = frozenset(
    {"misc_select", "attributes_flags", "attributes_xfrm", "isv_prod_id", "isv_svn", "config_svn"}
)
_HEADER: Final = struct.Struct("<HHIHH16s20s")


def _check_bytes(owner: str, name: str, value: bytes, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{owner}.{name} must be {size} bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportBody:
    """An SGX report body (``sgx_report_body_t``, 384 bytes): what an enclave is.

    Used for the enclave's own report in the quote and for the Quoting Enclave's report.
    Construct it directly to build a quote; :meth:`to_bytes` is the exact inverse of
    :meth:`parse`, reserved areas included.
    """

    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes_flags: int
    attributes_xfrm: int
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes
    reserved1: bytes = field(default=bytes(12), repr=False)
    reserved2: bytes = field(default=bytes(32), repr=False)
    reserved3: bytes = field(default=bytes(32), repr=False)
    reserved4: bytes = field(default=bytes(42), repr=False)

    def __post_init__(self) -> None:
        for name, size in _BODY_LAYOUT:
            value = getattr(self, name)
            if name in _BODY_INTS:
                if not isinstance(value, int) or not 0 <= value < 1 << (8 * size):
                    raise ValueError(f"ReportBody.{name} must fit in {size} bytes")
            else:
                _check_bytes("ReportBody", name, value, size)

    @classmethod
    def parse(cls, data: bytes) -> ReportBody:
        """Parse exactly :data:`REPORT_BODY_BYTES` bytes.

        Raises:
            QuoteFormatError: ``data`` is not 384 bytes long.
        """
        if len(data) != REPORT_BODY_BYTES:
            raise QuoteFormatError(f"report body must be {REPORT_BODY_BYTES} bytes")
        values: dict[str, int | bytes] = {}
        offset = 0
        for name, size in _BODY_LAYOUT:
            chunk = bytes(data[offset : offset + size])
            values[name] = int.from_bytes(chunk, "little") if name in _BODY_INTS else chunk
            offset += size
        return cls(**values)  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        """Serialise back to the 384-byte wire form."""
        parts = []
        for name, size in _BODY_LAYOUT:
            value = getattr(self, name)
            parts.append(value.to_bytes(size, "little") if name in _BODY_INTS else value)
        return b"".join(parts)

    @property
    def debug(self) -> bool:
        """Whether the enclave was launched in debug mode (its memory is readable)."""
        return bool(self.attributes_flags & ATTRIBUTE_DEBUG)


@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteHeader:
    """The 48-byte quote header (``sgx_quote_header_t`` / ``sgx_quote4_header_t``)."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    def __post_init__(self) -> None:
        for name, bits in (
            ("version", 16), ("attestation_key_type", 16), ("tee_type", 32),
            ("qe_svn", 16), ("pce_svn", 16),
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 1 << bits:
                raise ValueError(f"QuoteHeader.{name} must fit in {bits} bits")
        _check_bytes("QuoteHeader", "qe_vendor_id", self.qe_vendor_id, 16)
        _check_bytes("QuoteHeader", "user_data", self.user_data, 20)

    @classmethod
    def parse(cls, data: bytes) -> QuoteHeader:
        """Parse exactly :data:`QUOTE_HEADER_BYTES` bytes.

        Raises:
            QuoteFormatError: ``data`` is not 48 bytes long.
        """
        if len(data) != QUOTE_HEADER_BYTES:
            raise QuoteFormatError(f"quote header must be {QUOTE_HEADER_BYTES} bytes")
        version, key_type, tee_type, qe_svn, pce_svn, vendor, user = _HEADER.unpack(data)
        return cls(
            version=version,
            attestation_key_type=key_type,
            tee_type=tee_type,
            qe_svn=qe_svn,
            pce_svn=pce_svn,
            qe_vendor_id=vendor,
            user_data=user,
        )

    def to_bytes(self) -> bytes:
        """Serialise back to the 48-byte wire form."""
        return _HEADER.pack(
            self.version,
            self.attestation_key_type,
            self.tee_type,
            self.qe_svn,
            self.pce_svn,
            self.qe_vendor_id,
            self.user_data,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Quote:
    """A parsed (not verified) ECDSA quote.

    Attributes:
        signature: quote signature, r||s, 32 bytes each, big-endian.
        attestation_key: the QE's attestation public key, X||Y, big-endian.
        qe_report: the Quoting Enclave's report, parsed; ``qe_report_raw`` is what is signed.
        qe_report_signature: r||s by the PCK leaf key over ``qe_report_raw``.
        qe_auth_data: hashed with the attestation key into ``qe_report.report_data``.
        certification_data_type: always :data:`CERT_DATA_PCK_CHAIN` once unwrapped.
        pck_chain_pem: the PEM chain as carried (may end with a NUL byte).
        raw: the whole quote, exactly as received.
    """

    header: QuoteHeader
    body: ReportBody
    signature: bytes
    attestation_key: bytes
    qe_report: ReportBody
    qe_report_raw: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    certification_data_type: int
    pck_chain_pem: bytes
    raw: bytes = field(repr=False)

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the quote signature covers: header and report body."""
        return self.raw[:SIGNED_QUOTE_BYTES]


class _Reader:
    """Bounded cursor: every read checks the remaining length first."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = start
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def take(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            raise QuoteFormatError(f"quote truncated in {what}: need {size}, have {self.remaining}")
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def sub(self, size: int, what: str) -> _Reader:
        """A reader over the next ``size`` bytes, which this reader skips."""
        if size > self.remaining:
            raise QuoteFormatError(f"{what} length {size} runs past the end ({self.remaining})")
        child = _Reader(self._data, self._pos, self._pos + size)
        self._pos += size
        return child

    def expect_end(self, what: str) -> None:
        if self.remaining:
            raise QuoteFormatError(f"{self.remaining} unexpected trailing bytes after {what}")


def _cert_data(reader: _Reader, expected: int, what: str) -> _Reader:
    cert_type = reader.u16(f"{what} type")
    size = reader.u32(f"{what} size")
    if cert_type != expected:
        raise UnsupportedQuoteError(f"{what} type {cert_type} is not supported (need {expected})")
    return reader.sub(size, what)


def _qe_part(reader: _Reader) -> tuple[bytes, bytes, bytes]:
    qe_report_raw = reader.take(REPORT_BODY_BYTES, "QE report")
    qe_signature = reader.take(_SIG_BYTES, "QE report signature")
    auth = reader.take(reader.u16("QE auth data size"), "QE auth data")
    return qe_report_raw, qe_signature, auth


def parse_quote(data: bytes) -> Quote:
    """Parse a v3 or SGX v4 ECDSA-P256 quote, checking every length.

    Args:
        data: the quote bytes, exactly (trailing bytes are refused).

    Returns:
        The parsed quote. Nothing in it is verified yet.

    Raises:
        QuoteFormatError: truncated, oversized, a length past the end, trailing bytes.
        UnsupportedQuoteError: a version, TEE type, key type or certification data type
            we do not handle (TDX, version 5, P-384 attestation key, non-PCK-chain data).
    """
    data = bytes(data)
    if len(data) > MAX_QUOTE_BYTES:
        raise QuoteFormatError(f"quote is {len(data)} bytes, more than {MAX_QUOTE_BYTES}")
    reader = _Reader(data)
    header = QuoteHeader.parse(reader.take(QUOTE_HEADER_BYTES, "header"))
    if header.version not in _SUPPORTED_VERSIONS:
        raise UnsupportedQuoteError(f"quote version {header.version} is not supported")
    if header.tee_type != TEE_TYPE_SGX:
        raise UnsupportedQuoteError(f"TEE type {header.tee_type:#x} is not SGX")
    if header.attestation_key_type != ATTESTATION_KEY_TYPE_ECDSA_P256:
        kind = header.attestation_key_type
        raise UnsupportedQuoteError(f"attestation key type {kind} is not ECDSA P-256")
    body = ReportBody.parse(reader.take(REPORT_BODY_BYTES, "report body"))
    sig_data = reader.sub(reader.u32("signature data size"), "signature data")
    reader.expect_end("signature data")
    signature = sig_data.take(_SIG_BYTES, "quote signature")
    attestation_key = sig_data.take(_KEY_BYTES, "attestation key")
    if header.version == 3:
        qe_report_raw, qe_signature, auth = _qe_part(sig_data)
        chain = _cert_data(sig_data, CERT_DATA_PCK_CHAIN, "certification data")
    else:
        wrapper = _cert_data(sig_data, CERT_DATA_QE_REPORT, "certification data")
        qe_report_raw, qe_signature, auth = _qe_part(wrapper)
        chain = _cert_data(wrapper, CERT_DATA_PCK_CHAIN, "nested certification data")
        wrapper.expect_end("QE report certification data")
    sig_data.expect_end("certification data")
    return Quote(
        header=header,
        body=body,
        signature=signature,
        attestation_key=attestation_key,
        qe_report=ReportBody.parse(qe_report_raw),
        qe_report_raw=qe_report_raw,
        qe_report_signature=qe_signature,
        qe_auth_data=auth,
        certification_data_type=CERT_DATA_PCK_CHAIN,
        pck_chain_pem=chain.take(chain.remaining, "PCK chain"),
        raw=data,
    )


def build_quote(
    *,
    header: QuoteHeader,
    body: ReportBody,
    signature: bytes,
    attestation_key: bytes,
    qe_report: ReportBody,
    qe_report_signature: bytes,
    qe_auth_data: bytes,
    pck_chain_pem: bytes,
) -> bytes:
    """Assemble quote bytes in the layout :func:`parse_quote` reads (v3 or SGX v4).

    Signing is the caller's job: sign ``header.to_bytes() + body.to_bytes()`` with the
    attestation key and ``qe_report.to_bytes()`` with the PCK leaf key. Used by the
    simulated platform and by tests that need hostile but well-formed quotes.

    Raises:
        ValueError: a field has the wrong size, or ``header.version`` is not 3 or 4.
    """
    _check_bytes("quote", "signature", signature, _SIG_BYTES)
    _check_bytes("quote", "attestation_key", attestation_key, _KEY_BYTES)
    _check_bytes("quote", "qe_report_signature", qe_report_signature, _SIG_BYTES)
    if header.version not in _SUPPORTED_VERSIONS:
        raise ValueError("build_quote makes version 3 or 4 quotes")
    if len(qe_auth_data) > 0xFFFF:
        raise ValueError("qe_auth_data must be at most 65535 bytes")
    chain = struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(pck_chain_pem)) + pck_chain_pem
    auth = struct.pack("<H", len(qe_auth_data)) + qe_auth_data
    tail = qe_report.to_bytes() + qe_report_signature + auth + chain
    if header.version == 4:
        tail = struct.pack("<HI", CERT_DATA_QE_REPORT, len(tail)) + tail
    sig_data = signature + attestation_key + tail
    return header.to_bytes() + body.to_bytes() + struct.pack("<I", len(sig_data)) + sig_data
