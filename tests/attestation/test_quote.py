"""Quote parsing: the real Intel quote field by field, round trips, and hostile bytes."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drm_wire.attestation.errors import QuoteFormatError, UnsupportedQuoteError
from drm_wire.attestation.quote import (
    ATTRIBUTE_DEBUG,
    ATTRIBUTE_INIT,
    ATTRIBUTE_MODE64BIT,
    INTEL_QE_VENDOR_ID,
    MAX_QUOTE_BYTES,
    QUOTE_HEADER_BYTES,
    REPORT_BODY_BYTES,
    SIGNED_QUOTE_BYTES,
    Quote,
    QuoteHeader,
    ReportBody,
    build_quote,
    parse_quote,
)
from drm_wire.errors import AttestationError

from .dcap_helpers import real_quote

QUOTE = real_quote()
# Offsets in the real v3 quote (Intel SGX ECDSA Quote Library API, appendix A).
SIG_DATA_LEN_AT = 432
AUTH_LEN_AT = 436 + 576
CERT_TYPE_AT = AUTH_LEN_AT + 2 + 32
CERT_SIZE_AT = CERT_TYPE_AT + 2


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _rebuild(quote: Quote, **changes: object) -> bytes:
    fields: dict[str, object] = {
        "header": quote.header,
        "body": quote.body,
        "signature": quote.signature,
        "attestation_key": quote.attestation_key,
        "qe_report": quote.qe_report,
        "qe_report_signature": quote.qe_report_signature,
        "qe_auth_data": quote.qe_auth_data,
        "pck_chain_pem": quote.pck_chain_pem,
    }
    fields.update(changes)
    return build_quote(**fields)  # type: ignore[arg-type]


def test_constants() -> None:
    assert (QUOTE_HEADER_BYTES, REPORT_BODY_BYTES, SIGNED_QUOTE_BYTES) == (48, 384, 432)
    assert MAX_QUOTE_BYTES == 8192
    assert INTEL_QE_VENDOR_ID.hex() == "939a7233f79c4ca9940a0db3957f0607"


def test_real_quote_fields() -> None:
    quote = parse_quote(QUOTE)
    header = quote.header
    assert (header.version, header.attestation_key_type, header.tee_type) == (3, 2, 0)
    assert (header.qe_svn, header.pce_svn) == (10, 15)
    assert header.qe_vendor_id == INTEL_QE_VENDOR_ID
    assert quote.body.attributes_flags == ATTRIBUTE_INIT | ATTRIBUTE_MODE64BIT
    assert not quote.body.debug
    assert quote.qe_report.isv_svn == 10
    assert quote.qe_report.isv_prod_id == 1
    assert quote.qe_report.mr_signer.hex().startswith("8c4f5775d796503e")
    assert quote.qe_auth_data == bytes(range(32))
    assert quote.certification_data_type == 5
    assert quote.pck_chain_pem.endswith(b"-----END CERTIFICATE-----\n\0")
    assert quote.pck_chain_pem.count(b"BEGIN CERTIFICATE") == 3
    assert quote.signed_bytes == QUOTE[:432]
    assert quote.qe_report_raw == QUOTE[564:948]
    assert quote.raw == QUOTE


def test_round_trip_is_exact() -> None:
    quote = parse_quote(QUOTE)
    assert quote.header.to_bytes() == QUOTE[:48]
    assert quote.body.to_bytes() == QUOTE[48:432]
    assert ReportBody.parse(quote.qe_report_raw).to_bytes() == quote.qe_report_raw
    assert _rebuild(quote) == QUOTE


def test_reserved_bytes_survive_a_round_trip() -> None:
    raw = bytearray(QUOTE[48:432])
    raw[20] = 0x01  # reserved1 (Gramine calls its first byte cet_attributes)
    raw[300] = 0xFF  # reserved4
    assert ReportBody.parse(bytes(raw)).to_bytes() == bytes(raw)


def test_v4_sgx_quote_parses_to_the_same_fields() -> None:
    quote = parse_quote(QUOTE)
    v4 = _rebuild(quote, header=dataclasses.replace(quote.header, version=4))
    parsed = parse_quote(v4)
    assert parsed.header.version == 4
    assert len(v4) == len(QUOTE) + 6  # the type-6 wrapper header
    for name in ("body", "signature", "attestation_key", "qe_report", "qe_report_signature"):
        assert getattr(parsed, name) == getattr(quote, name)
    assert parsed.pck_chain_pem == quote.pck_chain_pem


def test_debug_flag() -> None:
    body = parse_quote(QUOTE).body
    assert dataclasses.replace(body, attributes_flags=body.attributes_flags | ATTRIBUTE_DEBUG).debug


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mr_enclave", bytes(31)),
        ("report_data", bytes(65)),
        ("isv_svn", 1 << 16),
        ("misc_select", -1),
    ],
)
def test_report_body_refuses_wrong_sizes(field: str, value: Any) -> None:
    body = parse_quote(QUOTE).body
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(body, **{field: value})


def test_header_refuses_wrong_sizes() -> None:
    header = parse_quote(QUOTE).header
    with pytest.raises(ValueError, match="qe_vendor_id"):
        dataclasses.replace(header, qe_vendor_id=bytes(15))
    with pytest.raises(ValueError, match="version"):
        dataclasses.replace(header, version=1 << 16)


def test_build_quote_refuses_bad_input() -> None:
    quote = parse_quote(QUOTE)
    with pytest.raises(ValueError, match="signature"):
        _rebuild(quote, signature=bytes(63))
    with pytest.raises(ValueError, match="version"):
        _rebuild(quote, header=dataclasses.replace(quote.header, version=5))


def test_every_truncation_is_a_format_error() -> None:
    for length in range(len(QUOTE)):
        with pytest.raises(QuoteFormatError):
            parse_quote(QUOTE[:length])


@pytest.mark.parametrize(
    ("offset", "fmt", "value"),
    [
        (SIG_DATA_LEN_AT, "<I", len(QUOTE)),  # signature data longer than the quote
        (SIG_DATA_LEN_AT, "<I", 0xFFFFFFFF),
        (SIG_DATA_LEN_AT, "<I", 100),  # shorter: the rest is trailing garbage
        (AUTH_LEN_AT, "<H", 0xFFFF),  # auth data past the end
        (AUTH_LEN_AT, "<H", 31),  # off by one: the cert type is read from the wrong place
        (CERT_SIZE_AT, "<I", 0xFFFFFFFF),  # cert data past the end
        (CERT_SIZE_AT, "<I", 100),  # cert data shorter than what follows
    ],
)
def test_length_fields_pointing_past_the_end(offset: int, fmt: str, value: int) -> None:
    with pytest.raises(AttestationError) as info:
        parse_quote(_patch(QUOTE, offset, fmt, value))
    assert isinstance(info.value, (QuoteFormatError, UnsupportedQuoteError))


def test_length_past_end_is_a_format_error() -> None:
    with pytest.raises(QuoteFormatError, match="past the end"):
        parse_quote(_patch(QUOTE, CERT_SIZE_AT, "<I", 0xFFFFFFFF))
    with pytest.raises(QuoteFormatError, match="truncated"):
        parse_quote(_patch(QUOTE, AUTH_LEN_AT, "<H", 0xFFFF))


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(QuoteFormatError, match="trailing"):
        parse_quote(QUOTE + b"\0")


def test_oversized_quote_is_refused_before_parsing() -> None:
    with pytest.raises(QuoteFormatError, match="8192"):
        parse_quote(QUOTE + bytes(MAX_QUOTE_BYTES))


@pytest.mark.parametrize("version", [0, 1, 2, 5, 6, 0xFFFF])
def test_other_versions_are_unsupported(version: int) -> None:
    with pytest.raises(UnsupportedQuoteError, match="version"):
        parse_quote(_patch(QUOTE, 0, "<H", version))


def test_tdx_is_unsupported() -> None:
    with pytest.raises(UnsupportedQuoteError, match="TEE type 0x81"):
        parse_quote(_patch(_patch(QUOTE, 0, "<H", 4), 4, "<I", 0x81))


@pytest.mark.parametrize("key_type", [0, 1, 3, 4])
def test_other_attestation_key_types_are_unsupported(key_type: int) -> None:
    with pytest.raises(UnsupportedQuoteError, match="attestation key type"):
        parse_quote(_patch(QUOTE, 2, "<H", key_type))


@pytest.mark.parametrize("cert_type", [1, 2, 3, 4, 6, 7, 0xFFFF])
def test_v3_certification_data_other_than_pck_chain(cert_type: int) -> None:
    with pytest.raises(UnsupportedQuoteError, match=f"type {cert_type} "):
        parse_quote(_patch(QUOTE, CERT_TYPE_AT, "<H", cert_type))


def test_v4_needs_the_type_6_wrapper_with_a_nested_type_5() -> None:
    quote = parse_quote(QUOTE)
    v4 = _rebuild(quote, header=dataclasses.replace(quote.header, version=4))
    outer_type_at = 436 + 128
    with pytest.raises(UnsupportedQuoteError, match="type 5"):
        parse_quote(_patch(v4, outer_type_at, "<H", 5))
    inner_type_at = outer_type_at + 6 + 384 + 64 + 2 + 32
    with pytest.raises(UnsupportedQuoteError, match="nested"):
        parse_quote(_patch(v4, inner_type_at, "<H", 4))
    with pytest.raises(QuoteFormatError, match="past the end"):
        parse_quote(_patch(v4, outer_type_at + 2, "<I", len(v4) - 436 - 128 - 6 - 1))


def test_v3_quote_rewritten_as_v4_header_fails_cleanly() -> None:
    with pytest.raises(UnsupportedQuoteError):
        parse_quote(_patch(QUOTE, 0, "<H", 4))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200))
def test_random_bytes_only_raise_attestation_errors(data: bytes) -> None:
    with pytest.raises(AttestationError):
        parse_quote(data)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(QUOTE) - 1), st.integers(0, 255)), max_size=8),
    st.integers(0, len(QUOTE)),
)
def test_mutated_quotes_parse_or_raise_attestation_errors(
    edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(QUOTE)
    for offset, value in edits:
        data[offset] = value
    try:
        quote = parse_quote(bytes(data[:cut]))
    except AttestationError:
        return
    assert quote.raw == bytes(data[:cut])
    assert QuoteHeader.parse(quote.raw[:48]) == quote.header
