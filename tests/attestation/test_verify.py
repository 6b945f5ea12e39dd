"""Verification of the real Intel quote and collateral, the proof object and the cache."""

from __future__ import annotations

import dataclasses
import json
import struct
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from drm_wire.attestation import _pck
from drm_wire.attestation.errors import (
    CertificateValidityError,
    CollateralError,
    CollateralExpiredError,
    CollateralSignatureError,
    QeBindingError,
    QeReportSignatureError,
    QuoteSignatureError,
    UnsupportedQuoteError,
    UntrustedRootError,
)
from drm_wire.attestation.intel_root import (
    INTEL_SGX_ROOT_CA_SHA256,
    INTEL_SGX_ROOT_CA_SPKI_DER,
    intel_root_public_key,
)
from drm_wire.attestation.quote import parse_quote
from drm_wire.attestation.verify import (
    Collateral,
    TcbStatus,
    TrustAnchors,
    VerifiedQuote,
    clear_chain_cache,
    verify_quote,
)

from .dcap_helpers import REAL_NOW, SIM_NOW, TestPki, real_collateral_text, real_quote

QUOTE = real_quote()
TEXT = real_collateral_text()
COLLATERAL = Collateral.from_json(TEXT)


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def test_real_quote_with_collateral_is_configuration_and_sw_hardening_needed() -> None:
    """The expected status, worked out by hand from the collateral.

    The PCK leaf's SGX extension says FMSPC 00A067110000, PCE-ID 0000, component SVNs
    (11, 11, 2, 2, 255, 1, 0, 0, ...) and PCESVN 13. TCB info (same FMSPC) lists levels best
    first: level 1 needs component 7 >= 12 (we have 0), so it fails; level 2 needs
    (11, 11, 2, 2, 255, 1, 0, ...) and PCESVN 13, all met: "ConfigurationAndSWHardeningNeeded"
    with advisories INTEL-SA-00289 and INTEL-SA-00615. The QE report has ISVSVN 10, at or
    above the first QE identity level (8, "UpToDate"), so the QE does not drag it down.
    """
    verified = verify_quote(QUOTE, collateral=COLLATERAL, now=REAL_NOW)
    assert verified.tcb_status is TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED
    assert verified.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert not verified.simulated
    assert verified.pck_fmspc == bytes.fromhex("00a067110000")
    assert verified.pck_pcesvn == 13
    assert verified.pck_cpusvn == bytes([11, 11, 2, 2, 255, 1]) + bytes(10)
    assert verified.report == verified.quote.body == parse_quote(QUOTE).body


def test_real_quote_without_collateral() -> None:
    verified = verify_quote(QUOTE, now=REAL_NOW)
    assert verified.tcb_status is None
    assert verified.advisory_ids == ()
    assert not verified.simulated
    assert verified.pck_fmspc == bytes.fromhex("00a067110000")


def test_real_quote_verifies_until_its_pck_certificate_expires() -> None:
    verify_quote(QUOTE, now=datetime(2023, 9, 21, tzinfo=UTC))
    verify_quote(QUOTE, now=datetime(2030, 9, 20, tzinfo=UTC))
    for now in (datetime(2023, 9, 20, tzinfo=UTC), datetime(2030, 9, 21, tzinfo=UTC)):
        with pytest.raises(CertificateValidityError, match="depth 0"):
            verify_quote(QUOTE, now=now)


def test_pinned_root_is_the_root_in_the_real_chains() -> None:
    quote = parse_quote(QUOTE)
    chains = [
        x509.load_pem_x509_certificates(quote.pck_chain_pem.rstrip(b"\0")),
        list(COLLATERAL.tcb_info_issuer_chain),
        list(COLLATERAL.pck_crl_issuer_chain),
    ]
    for chain in chains:
        root = chain[-1]
        assert _pck.spki_der(root) == INTEL_SGX_ROOT_CA_SPKI_DER
        assert root.fingerprint(hashes.SHA256()) == INTEL_SGX_ROOT_CA_SHA256
        assert root.subject.rfc4514_string().startswith("C=US,ST=CA,L=Santa Clara")
    assert _pck.spki_der(chains[0][-1]) == intel_root_public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_another_pinned_key_makes_the_real_chain_untrusted() -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(UntrustedRootError):
        verify_quote(QUOTE, trust=TrustAnchors(intel_root_public_key=other), now=REAL_NOW)


def test_a_simulation_root_does_not_make_a_real_quote_simulated() -> None:
    trust = TestPki().trust()
    assert not verify_quote(QUOTE, trust=trust, now=REAL_NOW).simulated


def test_parsed_quote_is_reparsed_from_its_raw_bytes() -> None:
    quote = parse_quote(QUOTE)
    forged = dataclasses.replace(quote, body=dataclasses.replace(quote.body, isv_svn=99))
    verified = verify_quote(forged, now=REAL_NOW)
    assert verified.quote.body.isv_svn == quote.body.isv_svn != 99


def test_naive_now_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify_quote(QUOTE, now=datetime(2025, 7, 1))


def test_verified_quote_has_no_public_constructor() -> None:
    verified = verify_quote(QUOTE, now=REAL_NOW)
    fields = {f.name: getattr(verified, f.name) for f in dataclasses.fields(verified)}
    with pytest.raises(TypeError, match="only by verify_quote"):
        VerifiedQuote(**fields, _token=object())
    with pytest.raises(TypeError):
        VerifiedQuote(**fields)
    with pytest.raises((TypeError, ValueError)):
        dataclasses.replace(verified, tcb_status=TcbStatus.UP_TO_DATE)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        verified.simulated = True  # type: ignore[misc]


# --- the real quote, tampered --------------------------------------------------------


def test_quote_signature_flipped() -> None:
    with pytest.raises(QuoteSignatureError):
        verify_quote(_flip(QUOTE, 436 + 10), now=REAL_NOW)


def test_report_body_changed_breaks_the_quote_signature() -> None:
    with pytest.raises(QuoteSignatureError):
        verify_quote(_flip(QUOTE, 48 + 320), now=REAL_NOW)  # report_data


def test_qe_report_signature_flipped() -> None:
    with pytest.raises(QeReportSignatureError):
        verify_quote(_flip(QUOTE, 948 + 5), now=REAL_NOW)


def test_qe_auth_data_changed_breaks_the_binding() -> None:
    with pytest.raises(QeBindingError):
        verify_quote(_flip(QUOTE, 1014 + 3), now=REAL_NOW)


def test_attestation_key_replaced_breaks_the_binding() -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    xy = other.x.to_bytes(32, "big") + other.y.to_bytes(32, "big")
    with pytest.raises(QeBindingError):
        verify_quote(QUOTE[:500] + xy + QUOTE[564:], now=REAL_NOW)


def test_intel_rooted_quote_must_come_from_intels_qe() -> None:
    patched = bytearray(QUOTE)
    patched[12:28] = b"\x01" * 16
    with pytest.raises(UnsupportedQuoteError, match="non-Intel"):
        verify_quote(bytes(patched), now=REAL_NOW)


def test_unsupported_att_key_type_fails_before_any_crypto() -> None:
    patched = bytearray(QUOTE)
    struct.pack_into("<H", patched, 2, 3)
    with pytest.raises(UnsupportedQuoteError):
        verify_quote(bytes(patched), now=REAL_NOW)


# --- the real collateral, tampered or out of date -------------------------------------


@pytest.mark.parametrize(
    "now", [datetime(2025, 6, 19, 10, 0, tzinfo=UTC), datetime(2025, 7, 19, 11, 0, tzinfo=UTC)]
)
def test_collateral_outside_its_window(now: datetime) -> None:
    with pytest.raises(CollateralExpiredError):
        verify_quote(QUOTE, collateral=COLLATERAL, now=now)


def _doc(**changes: str) -> Collateral:
    return Collateral.from_json(json.dumps({**json.loads(TEXT), **changes}))


@pytest.mark.parametrize("key", ["tcb_info_signature", "qe_identity_signature"])
def test_collateral_signature_broken(key: str) -> None:
    doc = json.loads(TEXT)
    signature = bytearray(bytes.fromhex(doc[key]))
    signature[7] ^= 0x80
    with pytest.raises(CollateralSignatureError, match="signature does not verify"):
        verify_quote(QUOTE, collateral=_doc(**{key: signature.hex()}), now=REAL_NOW)


def test_collateral_body_reserialised_no_longer_matches_its_signature() -> None:
    body = json.dumps(json.loads(json.loads(TEXT)["tcb_info"]), indent=1)
    with pytest.raises(CollateralSignatureError, match="TCB info"):
        verify_quote(QUOTE, collateral=_doc(tcb_info=body), now=REAL_NOW)


def test_collateral_signing_chain_swapped_for_the_pck_ca_chain() -> None:
    chain = json.loads(TEXT)["pck_crl_issuer_chain"]
    with pytest.raises(CollateralSignatureError, match="TCB info chain"):
        verify_quote(QUOTE, collateral=_doc(tcb_info_issuer_chain=chain), now=REAL_NOW)


def test_crls_swapped() -> None:
    doc = json.loads(TEXT)
    swapped = _doc(pck_crl=doc["root_ca_crl"], root_ca_crl=doc["pck_crl"])
    with pytest.raises(CollateralError, match="another CA"):
        verify_quote(QUOTE, collateral=swapped, now=REAL_NOW)


# --- the chain cache -------------------------------------------------------------------


def test_cache_hit_skips_signatures_but_not_dates() -> None:
    clear_chain_cache()
    verify_quote(QUOTE, now=REAL_NOW)
    assert (_pck.CHAIN_CACHE.hits, _pck.CHAIN_CACHE.misses) == (0, 1)
    verify_quote(QUOTE, now=REAL_NOW)
    assert _pck.CHAIN_CACHE.hits == 1
    with pytest.raises(CertificateValidityError):
        verify_quote(QUOTE, now=datetime(2031, 1, 1, tzinfo=UTC))
    assert _pck.CHAIN_CACHE.hits == 2


def test_cache_is_keyed_by_trust_anchors() -> None:
    pki = TestPki()
    quote = pki.quote()
    assert verify_quote(quote, trust=pki.trust(), now=SIM_NOW)
    with pytest.raises(UntrustedRootError):
        verify_quote(quote, now=SIM_NOW)


def test_failures_are_not_cached() -> None:
    clear_chain_cache()
    pki = TestPki()
    with pytest.raises(UntrustedRootError):
        verify_quote(pki.quote(), now=SIM_NOW)
    assert len(_pck.CHAIN_CACHE) == 0
