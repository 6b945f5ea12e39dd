"""Hostile and edge cases the real data cannot show, built with a local test PKI.

Each case names the exception class it must raise: the class says which check refused it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from drm_wire.attestation.errors import (
    CertificateChainError,
    CertificateValidityError,
    CollateralError,
    CollateralExpiredError,
    CollateralSignatureError,
    QeBindingError,
    QeIdentityError,
    QeReportSignatureError,
    QuoteSignatureError,
    RevokedError,
    TcbLevelError,
    UntrustedRootError,
)
from drm_wire.attestation.quote import (
    INTEL_QE_VENDOR_ID,
    QuoteHeader,
    ReportBody,
    build_quote,
    parse_quote,
)
from drm_wire.attestation.verify import (
    Collateral,
    TcbStatus,
    TrustAnchors,
    VerifiedQuote,
    verify_quote,
)

from .dcap_helpers import (
    FMSPC,
    PCE_ID,
    PLATFORM_PCESVN,
    PLATFORM_SVNS,
    QE_AUTH,
    SIM_NOW,
    TEST_QE_IDENTITY,
    TestPki,
    make_cert,
    raw_signature,
    sgx_extension,
)

PKI = TestPki()
TRUST = PKI.trust()
PKI_EXTENSION = sgx_extension(FMSPC, PLATFORM_SVNS, PLATFORM_PCESVN, PCE_ID)
#: A quote from the test PKI that claims Intel's QE vendor id, for the "Intel" slot.
INTEL_LIKE_QUOTE = PKI.quote(vendor=INTEL_QE_VENDOR_ID)
BETTER = tuple(min(s + 1, 255) for s in PLATFORM_SVNS)


def _verify(
    quote: bytes, collateral: str | None = None, *, pki: TestPki = PKI, now: datetime = SIM_NOW
) -> VerifiedQuote:
    trust = pki.trust()
    loaded = Collateral.from_json(collateral) if collateral is not None else None
    return verify_quote(quote, trust=trust, collateral=loaded, now=now)


def test_simulated_quote_verifies_with_the_explicit_root() -> None:
    verified = _verify(PKI.quote(), PKI.collateral())
    assert verified.simulated
    assert verified.tcb_status is TcbStatus.UP_TO_DATE
    assert verified.advisory_ids == ("TEST-SA-0",)
    assert verified.pck_pcesvn == PLATFORM_PCESVN


def test_simulated_quote_v4() -> None:
    assert parse_quote(PKI.quote(version=4)).header.version == 4
    assert _verify(PKI.quote(version=4), PKI.collateral()).simulated


def test_simulation_root_is_never_trusted_by_default() -> None:
    with pytest.raises(UntrustedRootError):
        verify_quote(PKI.quote(), now=SIM_NOW)


def test_simulation_root_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "root.pem"
    path.write_bytes(PKI.root.public_bytes(serialization.Encoding.PEM))
    trust = dataclasses.replace(
        TrustAnchors.with_simulation_root(path), simulation_qe_identity=TEST_QE_IDENTITY
    )
    assert verify_quote(PKI.quote(), trust=trust, now=SIM_NOW).simulated


def test_chain_ending_at_another_root() -> None:
    with pytest.raises(UntrustedRootError):
        _verify(TestPki().quote(), pki=PKI)


def test_chain_with_wrong_issuer() -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = make_cert("Test PCK CA", other_key, (PKI.root, PKI.root_key), ca=True)
    with pytest.raises(CertificateChainError, match="issuer or signature"):
        _verify(PKI.quote(chain=PKI.chain_pem(PKI.leaf, other_ca, PKI.root)))


def test_chain_in_the_wrong_order() -> None:
    with pytest.raises(CertificateChainError):
        _verify(PKI.quote(chain=PKI.chain_pem(PKI.ca, PKI.leaf, PKI.root)))


def test_chain_too_short() -> None:
    with pytest.raises(CertificateChainError, match="2 to 5"):
        _verify(PKI.quote(chain=PKI.chain_pem(PKI.root)))


def test_chain_not_pem() -> None:
    with pytest.raises(CertificateChainError):
        _verify(PKI.quote(chain=b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))


def test_leaf_that_is_a_ca() -> None:
    pki = TestPki(leaf_ca=True)
    with pytest.raises(CertificateChainError, match="leaf certificate is a CA"):
        _verify(pki.quote(), pki=pki)


def test_leaf_key_usage_without_digital_signature() -> None:
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=True, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    leaf = make_cert("Leaf", PKI.leaf_key, (PKI.ca, PKI.ca_key), ca=False, key_usage=usage)
    with pytest.raises(CertificateChainError, match="leaf key may not sign"):
        _verify(PKI.quote(chain=PKI.chain_pem(leaf, PKI.ca, PKI.root)))


def test_issuer_key_usage_without_cert_sign() -> None:
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    ca = make_cert("CA", key, (PKI.root, PKI.root_key), ca=True, key_usage=usage)
    leaf = make_cert("Leaf", PKI.leaf_key, (ca, key), ca=False)
    with pytest.raises(CertificateChainError, match="may not sign certs"):
        _verify(PKI.quote(chain=PKI.chain_pem(leaf, ca, PKI.root)))


def test_intermediate_that_is_not_a_ca() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    not_ca = make_cert("Not a CA", key, (PKI.root, PKI.root_key), ca=False)
    leaf = make_cert("Leaf", PKI.leaf_key, (not_ca, key), ca=False)
    with pytest.raises(CertificateChainError, match="not a CA"):
        _verify(PKI.quote(chain=PKI.chain_pem(leaf, not_ca, PKI.root)))


def test_path_length_exceeded() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sub_ca = make_cert("Sub CA", key, (PKI.ca, PKI.ca_key), ca=True)  # PKI.ca has pathlen 0
    leaf = make_cert("Leaf", PKI.leaf_key, (sub_ca, key), ca=False)
    with pytest.raises(CertificateChainError, match="path length"):
        _verify(PKI.quote(chain=PKI.chain_pem(leaf, sub_ca, PKI.ca, PKI.root)))


def test_expired_pck_certificate() -> None:
    with pytest.raises(CertificateValidityError):
        _verify(PKI.quote(), now=datetime(2030, 1, 2, tzinfo=UTC))
    with pytest.raises(CertificateValidityError):
        _verify(PKI.quote(), now=datetime(2024, 12, 31, tzinfo=UTC))


def test_quote_signed_by_another_key() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(QuoteSignatureError):
        _verify(PKI.quote(quote_signer=other))


def test_qe_report_signed_by_another_key() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(QeReportSignatureError):
        _verify(PKI.quote(qe_signer=other))


def test_qe_binding_mismatch() -> None:
    with pytest.raises(QeBindingError):
        _verify(PKI.quote(qe_report=PKI.qe_report(report_data=bytes(64))))
    good = PKI.qe_report().report_data
    with pytest.raises(QeBindingError):  # the second half must be zero
        _verify(PKI.quote(qe_report=PKI.qe_report(report_data=good[:32] + b"\x01" * 32)))


def test_attestation_key_not_on_the_curve() -> None:
    bad_key = b"\x01" * 64
    qe = dataclasses.replace(
        PKI.qe_report(), report_data=hashlib.sha256(bad_key + QE_AUTH).digest() + bytes(32)
    )
    header = QuoteHeader(version=3, attestation_key_type=2, tee_type=0, qe_svn=1, pce_svn=1,
                         qe_vendor_id=bytes(16), user_data=bytes(20))  # fmt: skip
    body = ReportBody.parse(bytes(384))
    quote = build_quote(
        header=header,
        body=body,
        signature=b"\x01" * 64,
        attestation_key=bad_key,
        qe_report=qe,
        qe_report_signature=raw_signature(PKI.leaf_key, qe.to_bytes()),
        qe_auth_data=QE_AUTH,
        pck_chain_pem=PKI.chain_pem(),
    )
    with pytest.raises(QuoteSignatureError, match="not a P-256 point"):
        _verify(quote)


# --- revocation and collateral --------------------------------------------------------


def test_revoked_pck_certificate() -> None:
    with pytest.raises(RevokedError, match="PCK certificate is revoked"):
        _verify(PKI.quote(), PKI.collateral(revoke_leaf=True))
    # The same under the test root standing in for Intel's (not simulated).
    collateral = Collateral.from_json(PKI.collateral(revoke_leaf=True))
    with pytest.raises(RevokedError, match="PCK certificate is revoked"):
        verify_quote(INTEL_LIKE_QUOTE, trust=PKI.as_intel(), collateral=collateral, now=SIM_NOW)


def test_revoked_pck_ca() -> None:
    with pytest.raises(RevokedError, match="PCK CA certificate is revoked"):
        _verify(PKI.quote(), PKI.collateral(revoke_ca=True))


def test_revoked_tcb_level() -> None:
    levels = [(PLATFORM_SVNS, PLATFORM_PCESVN, "Revoked")]
    with pytest.raises(RevokedError, match="platform TCB level"):
        _verify(PKI.quote(), PKI.collateral(tcb_levels=levels))


def test_revoked_qe_level() -> None:
    with pytest.raises(RevokedError, match="Quoting Enclave"):
        _verify(PKI.quote(), PKI.collateral(qe_levels=[(1, "Revoked")]))


def test_collateral_signed_by_another_key() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(CollateralSignatureError, match="TCB info"):
        _verify(PKI.quote(), PKI.collateral(tcb_signer=other))


def test_collateral_from_another_root() -> None:
    other = TestPki()
    trust = PKI.trust()
    # Both chains verify on their own, but the collateral is rooted elsewhere.
    collateral = Collateral.from_json(other.collateral())
    with pytest.raises(CollateralSignatureError):
        verify_quote(PKI.quote(), trust=trust, collateral=collateral, now=SIM_NOW)


def test_pck_crl_issued_by_the_wrong_ca() -> None:
    doc = json.loads(PKI.collateral())
    doc["pck_crl"] = PKI.crl((PKI.root, PKI.root_key), ())
    with pytest.raises(CollateralError, match="another CA"):
        _verify(PKI.quote(), json.dumps(doc))


def test_pck_crl_chain_for_another_ca() -> None:
    doc = json.loads(PKI.collateral())
    doc["pck_crl_issuer_chain"] = json.loads(TestPki().collateral())["pck_crl_issuer_chain"]
    with pytest.raises(CollateralError):
        _verify(PKI.quote(), json.dumps(doc))


def test_collateral_expired() -> None:
    past = SIM_NOW - timedelta(days=60)
    collateral = PKI.collateral(issue=past, next_update=past + timedelta(days=30))
    with pytest.raises(CollateralExpiredError, match="TCB info"):
        _verify(PKI.quote(), collateral)


def test_crl_expired_while_collateral_is_current() -> None:
    late = SIM_NOW + timedelta(days=22)  # CRLs end at +20 days, TCB info at +25
    with pytest.raises(CollateralExpiredError, match="CRL"):
        _verify(PKI.quote(), PKI.collateral(), now=late)


def test_first_matching_tcb_level_wins() -> None:
    levels = [
        (BETTER, PLATFORM_PCESVN, "UpToDate"),
        (PLATFORM_SVNS, PLATFORM_PCESVN + 1, "SWHardeningNeeded"),
        (PLATFORM_SVNS, PLATFORM_PCESVN, "ConfigurationNeeded"),
        ((0,) * 16, 0, "OutOfDate"),
    ]
    verified = _verify(PKI.quote(), PKI.collateral(tcb_levels=levels))
    assert verified.tcb_status is TcbStatus.CONFIGURATION_NEEDED
    assert verified.advisory_ids == ("TEST-SA-2",)


def test_platform_below_every_level() -> None:
    with pytest.raises(TcbLevelError, match="below every"):
        _verify(PKI.quote(), PKI.collateral(tcb_levels=[(BETTER, 0, "UpToDate")]))


def test_tcb_info_for_another_fmspc() -> None:
    with pytest.raises(TcbLevelError, match="another platform"):
        _verify(PKI.quote(), PKI.collateral(fmspc=bytes(6)))


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        ("UpToDate", TcbStatus.OUT_OF_DATE),
        ("SWHardeningNeeded", TcbStatus.OUT_OF_DATE),
        ("ConfigurationNeeded", TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED),
        ("ConfigurationAndSWHardeningNeeded", TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED),
        ("OutOfDate", TcbStatus.OUT_OF_DATE),
    ],
)
def test_out_of_date_qe_drags_the_platform_down(platform: str, expected: TcbStatus) -> None:
    quote = PKI.quote(qe_report=PKI.qe_report(isv_svn=5))
    levels = [(PLATFORM_SVNS, PLATFORM_PCESVN, platform)]
    verified = _verify(quote, PKI.collateral(tcb_levels=levels))
    assert verified.tcb_status is expected


def test_qe_below_every_identity_level() -> None:
    quote = PKI.quote(qe_report=PKI.qe_report(isv_svn=1))
    with pytest.raises(QeIdentityError, match="below every"):
        _verify(quote, PKI.collateral())


@pytest.mark.parametrize(
    "change",
    [
        {"mr_signer": b"\x99" * 32},
        {"isv_prod_id": 2},
        {"misc_select": 1},
        {"attributes_flags": 0x13},  # DEBUG is inside the attributes mask
    ],
)
def test_qe_is_not_intels_qe(change: dict[str, Any]) -> None:
    quote = PKI.quote(qe_report=PKI.qe_report(**change))
    with pytest.raises(QeIdentityError):
        _verify(quote, PKI.collateral())
    # Without collateral the QE is checked against the identity pinned for the root.
    with pytest.raises(QeIdentityError):
        _verify(quote)
    intel_like = PKI.quote(qe_report=PKI.qe_report(**change), vendor=INTEL_QE_VENDOR_ID)
    with pytest.raises(QeIdentityError):
        verify_quote(intel_like, trust=PKI.as_intel(), now=SIM_NOW)


#: The rogue QE of the issue's review: a non-Intel MRSIGNER, ISVPRODID 77, DEBUG and
#: PROVISION_KEY, certified by the genuine PCK key (a launch-control host can do this).
ROGUE_QE: dict[str, Any] = {"mr_signer": b"\x77" * 32, "isv_prod_id": 77, "attributes_flags": 0x13}


@pytest.mark.parametrize("with_collateral", [False, True], ids=["pinned", "collateral"])
def test_rogue_qe_under_an_intel_like_root_is_refused(with_collateral: bool) -> None:
    # The test root stands in for Intel's (test-only trust anchors): not simulated.
    quote = PKI.quote(qe_report=PKI.qe_report(**ROGUE_QE), vendor=INTEL_QE_VENDOR_ID)
    collateral = Collateral.from_json(PKI.collateral()) if with_collateral else None
    with pytest.raises(QeIdentityError, match="MRSIGNER 7777"):
        verify_quote(quote, trust=PKI.as_intel(), collateral=collateral, now=SIM_NOW)
    trust = PKI.as_intel()
    genuine = verify_quote(INTEL_LIKE_QUOTE, trust=trust, collateral=collateral, now=SIM_NOW)
    assert not genuine.simulated


def test_intels_pinned_qe_refuses_the_test_qe() -> None:
    # Intel's root slot with Intel's pinned QE: a QE with another MRSIGNER is refused even
    # though its chain verifies (the default TrustAnchors pin Intel's QE).
    trust = dataclasses.replace(PKI.as_intel(), intel_qe_identity=TrustAnchors().intel_qe_identity)
    with pytest.raises(QeIdentityError, match="Intel's pinned QE identity"):
        verify_quote(INTEL_LIKE_QUOTE, trust=trust, now=SIM_NOW)


def test_masked_out_attribute_bits_are_ignored() -> None:
    quote = PKI.quote(qe_report=PKI.qe_report(attributes_flags=0x15, attributes_xfrm=0xE7))
    assert _verify(quote, PKI.collateral()).tcb_status is TcbStatus.UP_TO_DATE


def test_pck_leaf_without_sgx_extension() -> None:
    leaf = make_cert("Leaf", PKI.leaf_key, (PKI.ca, PKI.ca_key), ca=False)
    quote = PKI.quote(chain=PKI.chain_pem(leaf, PKI.ca, PKI.root))
    verified = _verify(quote)
    assert (verified.pck_fmspc, verified.pck_cpusvn, verified.pck_pcesvn) == (None, None, None)
    with pytest.raises(TcbLevelError, match="no SGX extension"):
        _verify(quote, PKI.collateral())


def test_malformed_sgx_extension() -> None:
    leaf = make_cert("Leaf", PKI.leaf_key, (PKI.ca, PKI.ca_key), ca=False, extra=b"\x30\x05\x30")
    with pytest.raises(CertificateChainError, match="SGX extension"):
        _verify(PKI.quote(chain=PKI.chain_pem(leaf, PKI.ca, PKI.root)))


def test_collateral_needs_intels_three_certificate_chain() -> None:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(4)]
    root = make_cert("Root", keys[0], None, ca=True)
    ca1 = make_cert("CA 1", keys[1], (root, keys[0]), ca=True)
    ca2 = make_cert("CA 2", keys[2], (ca1, keys[1]), ca=True)
    leaf = make_cert("Leaf", keys[3], (ca2, keys[2]), ca=False, extra=PKI_EXTENSION)
    quote = PKI.quote(chain=PKI.chain_pem(leaf, ca2, ca1, root), qe_signer=keys[3])
    trust = TrustAnchors(simulation_root=root, simulation_qe_identity=TEST_QE_IDENTITY)
    assert verify_quote(quote, trust=trust, now=SIM_NOW).simulated
    collateral = Collateral.from_json(PKI.collateral())
    with pytest.raises(CertificateChainError, match="exactly"):
        verify_quote(quote, trust=trust, collateral=collateral, now=SIM_NOW)
