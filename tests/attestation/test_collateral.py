"""Collateral loading: the real Intel collateral, and strict refusal of anything odd."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from drm_wire.attestation.collateral import (
    MAX_COLLATERAL_BYTES,
    Collateral,
    QeIdentity,
    TcbInfo,
    TcbStatus,
)
from drm_wire.attestation.errors import CollateralError

from .dcap_helpers import real_collateral_text

TEXT = real_collateral_text()
DOC: dict[str, Any] = json.loads(TEXT)
TCB: dict[str, Any] = json.loads(DOC["tcb_info"])
QE: dict[str, Any] = json.loads(DOC["qe_identity"])


def _with(**changes: Any) -> str:
    doc = {**DOC, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not None})


def _tcb(**changes: Any) -> str:
    return json.dumps({k: v for k, v in {**TCB, **changes}.items() if v is not None})


def _qe(**changes: Any) -> str:
    return json.dumps({k: v for k, v in {**QE, **changes}.items() if v is not None})


def test_real_collateral_loads() -> None:
    collateral = Collateral.from_json(TEXT)
    info = collateral.tcb_info
    assert info.version == 3
    assert info.fmspc == bytes.fromhex("00a067110000")
    assert info.pce_id == bytes(2)
    assert info.issue_date == datetime(2025, 6, 19, 10, 56, 11, tzinfo=UTC)
    assert info.next_update == datetime(2025, 7, 19, 10, 56, 11, tzinfo=UTC)
    assert info.tcb_evaluation_data_number == 17
    assert info.tcb_levels[0].status is TcbStatus.SW_HARDENING_NEEDED
    assert info.tcb_levels[1].sgx_components[:7] == (11, 11, 2, 2, 255, 1, 0)
    assert info.tcb_levels[1].pcesvn == 13
    assert info.tcb_levels[1].advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    identity = collateral.qe_identity
    assert identity.isvprodid == 1
    assert identity.mrsigner.hex().upper().startswith("8C4F5775D796503E")
    assert identity.miscselect_mask == 0xFFFFFFFF
    assert identity.attributes_mask.hex() == "fbffffffffffffff0000000000000000"
    assert [level.isvsvn for level in identity.tcb_levels] == [8, 6, 5, 4, 2, 1]
    assert collateral.tcb_info_body == DOC["tcb_info"].encode()
    assert len(collateral.tcb_info_signature) == 64
    assert len(collateral.tcb_info_issuer_chain) == 2
    assert len(collateral.pck_crl) == 0
    assert len(collateral.root_ca_crl) == 0


def test_bytes_and_str_are_both_accepted() -> None:
    assert Collateral.from_json(TEXT.encode()).tcb_info_body == DOC["tcb_info"].encode()


def test_tcb_status_values_are_intels_spelling() -> None:
    assert [s.value for s in TcbStatus] == [
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "not valid JSON"),
        ("[]", "expected an object"),
        (b"\xff\xfe", "not valid JSON"),
        ('{"a": 1, "a": 2}', "duplicate key"),
        (_with(tcb_info=None), "missing"),
        (_with(extra="x"), "unknown"),
        (_with(tcb_info=7), "'tcb_info' missing or not str"),
        (_with(tcb_info_signature="zz" * 64), "not hex"),
        (_with(tcb_info_signature="00" * 63), "64 bytes"),
        (_with(pck_crl="00" * 10), "not a CRL|malformed"),
        (_with(pck_crl="xyz"), "malformed"),
        (
            _with(root_ca_crl="-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"),
            "malformed",
        ),
        (_with(tcb_info_issuer_chain="garbage"), "malformed"),
        (_with(tcb_info_issuer_chain=DOC["tcb_info_issuer_chain"].split("-----END")[0]), "mal"),
        (_with(qe_identity_issuer_chain="\u00e9"), "malformed"),
        (_with(tcb_info="{"), "TCB info: not valid JSON"),
        (_with(tcb_info="\ud800"), "TCB info: not valid JSON"),
        (_with(qe_identity="[1]"), "QE identity: expected an object"),
    ],
)
def test_malformed_collateral(text: str | bytes, match: str) -> None:
    with pytest.raises(CollateralError, match=match):
        Collateral.from_json(text)


def test_single_certificate_chain_is_refused() -> None:
    one = DOC["tcb_info_issuer_chain"].split("-----END CERTIFICATE-----")[0]
    with pytest.raises(CollateralError, match="signer and a root"):
        Collateral.from_json(_with(tcb_info_issuer_chain=one + "-----END CERTIFICATE-----\n"))


def test_oversized_collateral_is_refused() -> None:
    with pytest.raises(CollateralError, match="larger than"):
        Collateral.from_json(" " * (MAX_COLLATERAL_BYTES + 1))


def test_optional_pck_certificate_chain_key_is_allowed() -> None:
    Collateral.from_json(_with(pck_certificate_chain="ignored"))


def _level(**changes: Any) -> dict[str, Any]:
    return {**TCB["tcbLevels"][0], **changes}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (_tcb(version=4), "version 4"),
        (_tcb(version="3"), "'version' missing or not int"),
        (_tcb(id="TDX"), "not SGX"),
        (_tcb(tcbType=1), "tcbType"),
        (_tcb(fmspc="00A0671100"), "6 bytes"),
        (_tcb(pceId="0g00"), "not hex"),
        (_tcb(issueDate="yesterday"), "ISO 8601"),
        (_tcb(issueDate="2025-06-19T10:56:11"), "time zone"),
        (_tcb(tcbLevels=[]), "no tcbLevels"),
        (_tcb(tcbLevels="x"), "tcbLevels"),
        (_tcb(tcbEvaluationDataNumber=True), "tcbEvaluationDataNumber"),
        (_tcb(extra=1), "unknown"),
        (_tcb(tcbLevels=[_level(tcbStatus="Fine")]), "unknown tcbStatus"),
        (_tcb(tcbLevels=[_level(advisoryIDs=[1])]), "advisoryIDs"),
        (_tcb(tcbLevels=[_level(tcb={"sgxtcbcomponents": [{"svn": 1}] * 15, "pcesvn": 1})]), "16"),
        (
            _tcb(tcbLevels=[_level(tcb={"sgxtcbcomponents": [{"svn": 256}] * 16, "pcesvn": 1})]),
            "SVN",
        ),
        (
            _tcb(tcbLevels=[_level(tcb={"sgxtcbcomponents": [{"svn": 1}] * 16, "pcesvn": -1})]),
            "SVN",
        ),
        (
            _tcb(tcbLevels=[_level(tcb={"sgxtcbcomponents": [{"svn": True}] * 16, "pcesvn": 1})]),
            "svn",
        ),
        (
            _tcb(tcbLevels=[_level(tcb={"sgxtcbcomponents": [{"s": 1}] * 16, "pcesvn": 1})]),
            "missing",
        ),
        (_tcb(tcbLevels=[_level(tcb={"pcesvn": 1})]), "missing"),
        (_tcb(tcbLevels=[_level(surprise=1)]), "unknown"),
        (_tcb(tcbLevels=[[]]), "expected an object"),
    ],
)
def test_malformed_tcb_info(body: str, match: str) -> None:
    with pytest.raises(CollateralError, match=match):
        TcbInfo.from_json(body)
    with pytest.raises(CollateralError, match=match):
        Collateral.from_json(_with(tcb_info=body))


def test_tcb_info_version_2_layout() -> None:
    components = {f"sgxtcbcomp{i:02d}svn": i for i in range(1, 17)}
    level = {"tcb": {**components, "pcesvn": 9}, "tcbDate": "2024-01-01T00:00:00Z"}
    body = {k: v for k, v in TCB.items() if k != "id"}
    info = TcbInfo.from_json(
        json.dumps({**body, "version": 2, "tcbLevels": [{**level, "tcbStatus": "OutOfDate"}]})
    )
    assert info.tcb_levels[0].sgx_components == tuple(range(1, 17))
    assert info.tcb_levels[0].pcesvn == 9


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (_qe(id="QVE"), "id 'QE'"),
        (_qe(version=3), "version 2"),
        (_qe(mrsigner="00" * 31), "32 bytes"),
        (_qe(attributes="00"), "16 bytes"),
        (_qe(miscselect=0), "miscselect"),
        (_qe(isvprodid=1 << 16), "SVN"),
        (_qe(tcbLevels=[{"tcb": {"isvsvn": 1}, "tcbDate": "2020-01-01T00:00:00Z"}]), "missing"),
        (
            _qe(tcbLevels=[{"tcb": {"isvsvn": "1"}, "tcbDate": "x", "tcbStatus": "OutOfDate"}]),
            "SVN",
        ),
        (_qe(tcbLevels=[{"tcb": {}, "tcbDate": "x", "tcbStatus": "OutOfDate"}]), "missing"),
        (_qe(nextUpdate=None), "missing"),
    ],
)
def test_malformed_qe_identity(body: str, match: str) -> None:
    with pytest.raises(CollateralError, match=match):
        QeIdentity.from_json(body)
