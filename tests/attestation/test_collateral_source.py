"""Several collateral candidates for one platform: the newest that verifies decides."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from drm_wire.attestation.collateral import Collateral, TcbStatus
from drm_wire.attestation.collateral_source import CollateralSet, chain_sources
from drm_wire.attestation.errors import (
    CollateralExpiredError,
    CollateralSignatureError,
    RevokedError,
)
from drm_wire.attestation.verify import verify_quote
from drm_wire.errors import ConfigError

from .dcap_helpers import (
    PLATFORM_PCESVN,
    PLATFORM_SVNS,
    REAL_NOW,
    SIM_NOW,
    TestPki,
    real_collateral_text,
    real_quote,
)

PKI = TestPki()
QUOTE = PKI.quote()
BETTER = tuple(min(s + 1, 255) for s in PLATFORM_SVNS)


def _load(text: str) -> Collateral:
    return Collateral.from_json(text)


def _status(*items: Collateral) -> TcbStatus | None:
    return verify_quote(
        QUOTE, trust=PKI.trust(), collateral=CollateralSet(items), now=SIM_NOW
    ).tcb_status


#: After a TCB recovery (evaluation data 18) the platform's level is out of date.
RECOVERED = _load(
    PKI.collateral(
        evaluation_number=18,
        tcb_levels=[
            (BETTER, PLATFORM_PCESVN, "UpToDate"),
            (PLATFORM_SVNS, PLATFORM_PCESVN, "OutOfDate"),
        ],
    )
)
BEFORE = _load(PKI.collateral(evaluation_number=17))


def test_the_newest_collateral_decides_whatever_the_order() -> None:
    assert _status(BEFORE) is TcbStatus.UP_TO_DATE
    # A host stapling the old collateral cannot hide the recovery the verifier knows of.
    assert _status(BEFORE, RECOVERED) is TcbStatus.OUT_OF_DATE
    assert _status(RECOVERED, BEFORE) is TcbStatus.OUT_OF_DATE


def test_a_forged_newer_candidate_is_passed_over() -> None:
    forged = _load(PKI.collateral(evaluation_number=99, tcb_signer=TestPki().tcb_key))
    assert _status(forged, BEFORE) is TcbStatus.UP_TO_DATE
    with pytest.raises(CollateralSignatureError):
        _status(forged)


def test_expired_collateral_fails_closed() -> None:
    expired = _load(PKI.collateral(next_update=SIM_NOW - timedelta(seconds=1)))
    with pytest.raises(CollateralExpiredError) as refused:
        _status(expired)
    assert refused.value.check == "collateral_expired"
    assert _status(expired, BEFORE) is TcbStatus.UP_TO_DATE


def test_a_verdict_of_the_newest_valid_candidate_is_final() -> None:
    revoked = _load(PKI.collateral(evaluation_number=18, revoke_leaf=True))
    with pytest.raises(RevokedError):
        _status(BEFORE, revoked)


def test_no_candidate_for_the_platform_gives_no_status() -> None:
    other = _load(PKI.collateral(fmspc=bytes.fromhex("112233445566")))
    assert _status(other) is None
    # The real collateral is for FMSPC 00A067110000 only.
    real = CollateralSet([_load(real_collateral_text())])
    assert real.candidates(bytes.fromhex("00A067110000"))
    assert verify_quote(real_quote(), collateral=real, now=REAL_NOW).tcb_status is not None


def test_sources_chain() -> None:
    assert chain_sources(None, None) is None
    one = CollateralSet([BEFORE])
    assert chain_sources(None, one) is one
    both = chain_sources(CollateralSet([BEFORE]), CollateralSet([RECOVERED]))
    assert both is not None
    assert verify_quote(QUOTE, trust=PKI.trust(), collateral=both, now=SIM_NOW).tcb_status is (
        TcbStatus.OUT_OF_DATE
    )


def test_loading_bundles(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(real_collateral_text())
    assert len(CollateralSet.load([good])) == 1
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a collateral bundle") as info:
        CollateralSet.load([good, tmp_path / "bad.json"])
    assert "bad.json" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read collateral"):
        CollateralSet.load([tmp_path / "missing.json"])
