"""Every single flipped bit in signed evidence makes verification fail, and only cleanly.

The evidence is the real Intel quote and collateral. A flip anywhere in what is signed
(directly, or through the chain of signatures that vouches for it) must raise an
:class:`AttestationError` subclass: never pass, never raise anything else. Exhaustive runs
(all ~20,000 bits of the PCK chain, all bits of both CRLs) were done once by hand; these
tests sample the same spaces on every run.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from drm_wire.attestation.quote import build_quote, parse_quote
from drm_wire.attestation.verify import Collateral, verify_quote
from drm_wire.errors import AttestationError

from .dcap_helpers import REAL_NOW, pem_of, real_collateral_text, real_quote

QUOTE = real_quote()
PARSED = parse_quote(QUOTE)
DOC: dict[str, Any] = json.loads(real_collateral_text())
COLLATERAL = Collateral.from_json(real_collateral_text())
PCK_DERS = [
    c.public_bytes(serialization.Encoding.DER)
    for c in x509.load_pem_x509_certificates(PARSED.pck_chain_pem.rstrip(b"\0"))
]

# Signed parts of the v3 quote: (start, end) byte ranges.
QUOTE_REGIONS = {
    "header+body": (0, 432),
    "quote signature": (436, 500),
    "attestation key": (500, 564),
    "QE report": (564, 948),
    "QE report signature": (948, 1012),
    "QE auth data (with its size)": (1012, 1046),
}
SETTINGS = settings(max_examples=300, deadline=None)


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def test_unmodified_evidence_verifies() -> None:
    """The baseline the flips are measured against."""
    assert verify_quote(QUOTE, collateral=COLLATERAL, now=REAL_NOW).tcb_status is not None


@SETTINGS
@given(st.data())
def test_flipped_bit_in_signed_quote_parts(data: st.DataObject) -> None:
    start, end = data.draw(st.sampled_from(sorted(QUOTE_REGIONS.values())))
    bit = data.draw(st.integers(start * 8, end * 8 - 1))
    with pytest.raises(AttestationError):
        verify_quote(_flip(QUOTE, bit), collateral=COLLATERAL, now=REAL_NOW)


@SETTINGS
@given(st.data())
def test_flipped_bit_in_pck_chain_der(data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(PCK_DERS) - 1))
    bit = data.draw(st.integers(0, len(PCK_DERS[index]) * 8 - 1))
    ders = list(PCK_DERS)
    ders[index] = _flip(ders[index], bit)
    quote = build_quote(
        header=PARSED.header,
        body=PARSED.body,
        signature=PARSED.signature,
        attestation_key=PARSED.attestation_key,
        qe_report=PARSED.qe_report,
        qe_report_signature=PARSED.qe_report_signature,
        qe_auth_data=PARSED.qe_auth_data,
        pck_chain_pem=b"".join(pem_of(der) for der in ders) + b"\0",
    )
    with pytest.raises(AttestationError):
        verify_quote(quote, now=REAL_NOW)


def _pem_chain_field(key: str, index: int, bit: int) -> str:
    certs = x509.load_pem_x509_certificates(DOC[key].encode())
    ders = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    ders[index] = _flip(ders[index], bit % (len(ders[index]) * 8))
    return b"".join(pem_of(der) for der in ders).decode()


def _mutate_collateral(key: str, bit: int, index: int) -> str:
    """A copy of the collateral JSON with one bit of ``key``'s signed bytes flipped."""
    value = DOC[key]
    if key in ("tcb_info", "qe_identity"):
        raw = value.encode()
        flipped = _flip(raw, bit % (len(raw) * 8))
        new: str = flipped.decode("utf-8", "surrogateescape")
    elif key.endswith("_chain"):
        new = _pem_chain_field(key, index, bit)
    else:  # hex: signatures and DER CRLs; flip the bytes, not the hex text
        raw = bytes.fromhex(value)
        new = _flip(raw, bit % (len(raw) * 8)).hex()
    return json.dumps({**DOC, key: new})


@SETTINGS
@given(
    st.sampled_from(
        [
            "tcb_info",
            "qe_identity",
            "tcb_info_signature",
            "qe_identity_signature",
            "root_ca_crl",
            "pck_crl",
            "tcb_info_issuer_chain",
            "qe_identity_issuer_chain",
            "pck_crl_issuer_chain",
        ]
    ),
    st.integers(0, 1 << 20),
    st.integers(0, 1),
)
def test_flipped_bit_in_collateral(key: str, bit: int, index: int) -> None:
    text = _mutate_collateral(key, bit, index)
    with pytest.raises(AttestationError):
        verify_quote(QUOTE, collateral=Collateral.from_json(text), now=REAL_NOW)
