"""The tolerant DER walk: bounded, every length checked; hostile bytes only ever raise
AttestationError subclasses (never IndexError, struct.error or a third-party exception)."""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drm_wire.attestation import _der
from drm_wire.attestation.ratls_cert import CertificateFormatError, parse_ratls_certificate
from drm_wire.errors import AttestationError

PEM = (Path(__file__).parent.parent / "data" / "ratls" / "gramine-cert.pem").read_bytes()
DER = base64.b64decode(b"".join(PEM.splitlines()[1:-1]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x30", "truncated length"),
        (b"\x30\x80\x00\x00", "indefinite"),
        (b"\x30\x85\x01\x00\x00\x00\x00", "length field"),
        (b"\x30\x81\x05\x00", "non-minimal"),
        (b"\x30\x82\x00\x80" + bytes(0x80), "non-minimal"),
        (b"\x30\x05\x00", "claims 5 bytes"),
        (b"\x1f\x01\x00", "multi-byte tag"),
        (b"\x30\x00\x00", "trailing"),
        (b"\x02\x01\x00", "expected tag"),
    ],
)
def test_malformed_der_elements(data: bytes, message: str) -> None:
    with pytest.raises(_der.DerError, match=message):
        _der.single(data, _der.TAG_SEQUENCE)


def test_children_must_fill_parent_and_be_constructed() -> None:
    data = b"\x30\x03\x02\x02\x00"  # child claims 2 bytes, 1 remains
    with pytest.raises(_der.DerError):
        _der.children(data, _der.read_tlv(data, 0, len(data)))
    prim = b"\x04\x00"
    with pytest.raises(_der.DerError, match="not constructed"):
        _der.children(prim, _der.read_tlv(prim, 0, 2))


def test_certificate_parts_of_real_gramine_cert() -> None:
    spki, extensions = _der.certificate_parts(DER)
    assert spki.startswith(
        bytes.fromhex("3076301006072a8648ce3d020106052b81040022036200 04".replace(" ", ""))
    )
    assert bytes.fromhex("06092a864886f84d8a3906") in extensions
    assert bytes.fromhex("678105050409") in extensions
    assert bytes.fromhex("551d13") in extensions  # basicConstraints


def test_not_v3_certificate_is_refused() -> None:
    v1 = DER.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x00", 1)
    with pytest.raises(CertificateFormatError, match="v3"):
        parse_ratls_certificate(v1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_attestation_errors(data: bytes) -> None:
    with pytest.raises(AttestationError):
        parse_ratls_certificate(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(DER) - 1), st.integers(0, 255))
def test_mutated_real_cert_parses_or_raises_attestation_error(position: int, value: int) -> None:
    mutated = bytearray(DER)
    mutated[position] = value
    with contextlib.suppress(AttestationError):
        parse_ratls_certificate(bytes(mutated))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(DER) - 1))
def test_every_truncation_is_refused(length: int) -> None:
    with pytest.raises(CertificateFormatError):
        parse_ratls_certificate(DER[:length])
