"""The QE identities pinned per trust anchor, checked against signed evidence."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.errors import QeIdentityError
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.qe_identity import (
    INTEL_QE_IDENTITY,
    SIMULATED_QE_IDENTITY,
    PinnedQeIdentity,
    check_qe_identity,
)
from drm_wire.attestation.quote import parse_quote
from drm_wire.attestation.verify import TrustAnchors, verify_quote

from .dcap_helpers import REAL_NOW, real_collateral_text, real_quote


def test_intels_pinned_qe_is_the_one_intel_signed() -> None:
    # The collateral's QE identity is signed by Intel (verify_quote checks it below); the
    # pinned constant must say exactly the same, field by field.
    collateral = Collateral.from_json(real_collateral_text())
    verify_quote(real_quote(), collateral=collateral, now=REAL_NOW)
    signed = collateral.qe_identity
    for name in ("mrsigner", "isvprodid", "miscselect", "miscselect_mask", "attributes",
                 "attributes_mask"):  # fmt: skip
        assert getattr(INTEL_QE_IDENTITY, name) == getattr(signed, name), name


def test_the_real_quote_passes_the_pinned_check_without_collateral() -> None:
    verified = verify_quote(real_quote(), now=REAL_NOW)
    assert verified.tcb_status is None
    check_qe_identity(parse_quote(real_quote()).qe_report, INTEL_QE_IDENTITY, what="Intel")


def test_the_real_quote_is_refused_when_another_qe_is_pinned() -> None:
    other = PinnedQeIdentity(
        mrsigner=bytes(32),
        isvprodid=1,
        miscselect=0,
        miscselect_mask=0xFFFFFFFF,
        attributes=INTEL_QE_IDENTITY.attributes,
        attributes_mask=INTEL_QE_IDENTITY.attributes_mask,
    )
    with pytest.raises(QeIdentityError, match="MRSIGNER 8c4f5775"):
        verify_quote(real_quote(), trust=TrustAnchors(intel_qe_identity=other), now=REAL_NOW)


def test_a_simulated_quote_is_checked_against_the_simulated_qe(tmp_path: Path) -> None:
    platform = SimulatedPlatform.create(tmp_path / "sim")
    now = datetime.now(UTC)
    quote = platform.quote(b"x", mr_enclave=bytes(32), mr_signer=bytes(32))
    check_qe_identity(parse_quote(quote).qe_report, SIMULATED_QE_IDENTITY, what="sim")
    assert verify_quote(quote, trust=platform.trust_anchors(), now=now).simulated
    # Intel's QE pinned in the simulation slot refuses the simulated QE.
    trust = TrustAnchors(
        simulation_root=platform.root_certificate, simulation_qe_identity=INTEL_QE_IDENTITY
    )
    with pytest.raises(QeIdentityError, match="simulated platform's pinned QE identity"):
        verify_quote(quote, trust=trust, now=now)


def test_pinned_identity_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        PinnedQeIdentity(mrsigner=b"x", isvprodid=1, miscselect=0, miscselect_mask=0,
                         attributes=bytes(16), attributes_mask=bytes(16))  # fmt: skip
    with pytest.raises(ValueError, match="attributes_mask"):
        PinnedQeIdentity(mrsigner=bytes(32), isvprodid=1, miscselect=0, miscselect_mask=0,
                         attributes=bytes(16), attributes_mask=bytes(15))  # fmt: skip
