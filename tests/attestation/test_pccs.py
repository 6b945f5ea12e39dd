"""The PCS/PCCS client and the offline bundle commands, against a test PCCS on loopback
that serves the real collateral of tests/data/sgx/ as Intel's API does."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import trio

from drm_lab.pccs import PccsBehaviour, RunningPccs, running_pccs
from drm_wire.attestation.cli import main
from drm_wire.attestation.collateral import Collateral, TcbStatus
from drm_wire.attestation.errors import CollateralSignatureError
from drm_wire.attestation.pccs import PccsClient, PccsError, crl_hex, signed_member
from drm_wire.attestation.verify import verify_quote

from .dcap_helpers import QUOTE_PATH, REAL_NOW, real_collateral_text, real_quote

FMSPC = bytes.fromhex("00A067110000")
REAL = json.loads(real_collateral_text())


def _behaviour(**kw: object) -> PccsBehaviour:
    return PccsBehaviour(bundle=dict(REAL), **kw)  # type: ignore[arg-type]


async def _fetch(pccs: RunningPccs, fmspc: bytes = FMSPC) -> Collateral:
    async with PccsClient(pccs.url, ca=pccs.ca_path) as client:
        return await client.fetch(fmspc)


def _same_as_real(collateral: Collateral) -> None:
    real = Collateral.from_json(real_collateral_text())
    assert collateral.tcb_info_body == real.tcb_info_body
    assert collateral.qe_identity_body == real.qe_identity_body
    assert collateral.pck_crl == real.pck_crl
    assert collateral.root_ca_crl == real.root_ca_crl
    verified = verify_quote(real_quote(), collateral=collateral, now=REAL_NOW)
    assert verified.tcb_status is TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED


@pytest.mark.parametrize(
    "variant",
    [
        {},  # Intel's PCS: v4 header, DER CRL when asked, root CRL as DER
        {"tcb_header": "SGX-TCB-Info-Issuer-Chain"},  # the v3 header name
        {"crl_encoding": "pem"},  # a service that ignores encoding=der
        {"crl_encoding": "hex", "root_crl_encoding": "hex"},  # a PCCS answering hex text
        {"root_crl_encoding": "pem"},
    ],
    ids=["pcs", "v3-header", "pem-crl", "hex-crls", "pem-root-crl"],
)
async def test_each_service_flavour_gives_the_real_collateral(
    tmp_path: Path, variant: dict[str, object]
) -> None:
    async with running_pccs(tmp_path, _behaviour(**variant)) as pccs:
        _same_as_real(await _fetch(pccs))
        paths = [path for path, _ in pccs.behaviour.requests]
        assert paths == [
            "/sgx/certification/v4/tcb",
            "/sgx/certification/v4/qe/identity",
            "/sgx/certification/v4/pckcrl",
            "/sgx/certification/v4/rootcacrl",
        ]
        assert pccs.behaviour.requests[0][1] == {"fmspc": ["00A067110000"]}
        assert pccs.behaviour.requests[2][1] == {"ca": ["processor"], "encoding": ["der"]}


async def test_a_tampered_body_is_fetched_but_never_verifies(tmp_path: Path) -> None:
    async with running_pccs(tmp_path, _behaviour(tamper_tcb_info=True)) as pccs:
        collateral = await _fetch(pccs)
    with pytest.raises(CollateralSignatureError, match="TCB info"):
        verify_quote(real_quote(), collateral=collateral, now=REAL_NOW)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"drop_header": "TCB-Info-Issuer-Chain"}, "no TCB-Info-Issuer-Chain header"),
        ({"drop_header": "SGX-PCK-CRL-Issuer-Chain"}, "no SGX-PCK-CRL-Issuer-Chain"),
        ({"status": 503}, "HTTP 503"),
        ({"oversized": True}, "response over"),
    ],
)
async def test_a_broken_service_is_an_error(
    tmp_path: Path, variant: dict[str, object], message: str
) -> None:
    async with running_pccs(tmp_path, _behaviour(**variant)) as pccs:
        with pytest.raises(PccsError, match=message):
            await _fetch(pccs)


async def test_another_fmspc_is_not_found(tmp_path: Path) -> None:
    async with running_pccs(tmp_path, _behaviour()) as pccs:
        with pytest.raises(PccsError, match="HTTP 404"):
            await _fetch(pccs, bytes.fromhex("112233445566"))


async def test_an_untrusted_or_unreachable_service_is_an_error(tmp_path: Path) -> None:
    async with running_pccs(tmp_path, _behaviour()) as pccs:
        url = pccs.url
        async with PccsClient(url) as client:  # the system store does not know the test CA
            with pytest.raises(PccsError, match="ConnectError"):
                await client.fetch(FMSPC)
        assert pccs.behaviour.requests == []
    async with PccsClient(url, ca=pccs.ca_path, timeout=2.0) as client:  # now closed
        with pytest.raises(PccsError, match="ConnectError"):
            await client.fetch(FMSPC)


def test_plain_http_is_refused() -> None:
    with pytest.raises(ValueError, match="https"):
        PccsClient("http://127.0.0.1:8081")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"tcbInfo": {}}',
        b'{"tcbInfo": {}, "signature": "00", "extra": 1}',
        b'{"tcbInfo": [], "signature": "00"}',
        b'[{"tcbInfo": {}, "signature": "00"}]',
    ],
)
def test_signed_member_refuses_other_shapes(body: bytes) -> None:
    with pytest.raises(PccsError):
        signed_member(body, "tcbInfo")


@pytest.mark.parametrize("last", [0x20, 0x0A, 0x0D, 0x09, 0x0B, 0x0C])
def test_a_der_crl_ending_in_a_white_space_byte_is_read_whole(last: int) -> None:
    """A DER CRL's last bytes are its signature's: any value, white space's included
    (1 in 43 of the simulated platform's fresh CRLs). They are never stripped."""
    der = bytes.fromhex(REAL["root_ca_crl"])
    body = der[:-1] + bytes([last])
    assert crl_hex(body, "root CA CRL") == body.hex()
    assert crl_hex(body.hex().encode() + b"\n", "root CA CRL") == body.hex()


def test_signed_member_keeps_the_exact_bytes() -> None:
    inner = '{ "b" : 1,\n "a":[1, 2] }'
    body = ('  {"signature" : "ab",\n"tcbInfo":  ' + inner + " }").encode()
    assert signed_member(body, "tcbInfo") == (inner.encode(), "ab")


async def test_collateral_fetch_and_show_commands(tmp_path: Path) -> None:
    out = tmp_path / "bundle.json"
    async with running_pccs(tmp_path, _behaviour()) as pccs:
        argv = ["collateral", "fetch", "--pccs-url", pccs.url, "--pccs-ca", str(pccs.ca_path),
                "--quote", str(QUOTE_PATH), "--out", str(out)]  # fmt: skip
        printed = io.StringIO()
        assert await trio.to_thread.run_sync(lambda: main(argv, out=printed)) == 0
    assert "FMSPC 00A067110000, PCK CA processor" in printed.getvalue()
    _same_as_real(Collateral.from_json(out.read_bytes()))
    shown = io.StringIO()
    assert main(["collateral", "show", str(out), "--at", "2025-07-01T00:00:00Z", "--json"],
                out=shown) == 0  # fmt: skip
    report = json.loads(shown.getvalue())
    assert report["fmspc"] == "00A067110000"
    assert report["tcb_evaluation_data_number"] == 17
    assert report["pck_crl"]["issuer"] == "Intel SGX PCK Processor CA"
    assert report["valid"]["until"].startswith("2025-07-19")
    assert report["current"] is True
    expired = io.StringIO()
    assert main(["collateral", "show", str(out), "--at", "2025-08-01T00:00:00Z"], out=expired) == 1
    assert "current: False" in expired.getvalue()
    # inspect reads the bundle.
    verdict = io.StringIO()
    argv = ["inspect", str(QUOTE_PATH), "--collateral", str(out), "--at", "2025-07-01", "--json"]
    assert main(argv, out=verdict) == 0
    assert json.loads(verdict.getvalue())["quotes"][0]["advisory_ids"] == [
        "INTEL-SA-00289",
        "INTEL-SA-00615",
    ]


def test_collateral_fetch_usage_errors(tmp_path: Path) -> None:
    argv = ["collateral", "fetch", "--pccs-url", "https://127.0.0.1:1", "--fmspc", "zz",
            "--out", str(tmp_path / "x.json")]  # fmt: skip
    assert main(argv) == 2
    assert main(["collateral", "show", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text("{}")
    assert main(["collateral", "show", str(tmp_path / "bad.json")]) == 1
