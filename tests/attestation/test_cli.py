"""``python -m drm_wire.attestation inspect``: output, verdicts and exit statuses."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from drm_wire.attestation.cli import main
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.ratls_cert import build_ratls_certificate, parse_ratls_certificate

DATA = Path(__file__).parent.parent / "data"
CERT = DATA / "ratls" / "gramine-cert.pem"
POLICY = DATA / "policy" / "gramine-debug.toml"
AT = "2024-06-01T00:00:00"


def _run(*argv: str) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    status = main(["inspect", *argv, "--json"], out=out)
    return status, json.loads(out.getvalue())


def test_real_certificate_with_policy_is_accepted() -> None:
    status, report = _run(str(CERT), "--policy", str(POLICY), "--at", AT)
    assert status == 0
    assert report["verdict"] == "accepted"
    assert report["kind"] == "ratls-certificate"
    assert report["key_binding"] == {
        "bound": True,
        "pubkey_hash_alg": 1,
        "legacy_carrier": "gramine-legacy",
    }
    tcg, legacy = report["quotes"]
    assert (tcg["carrier"], legacy["carrier"]) == ("tcg", "gramine-legacy")
    assert tcg["mr_enclave"] == legacy["mr_enclave"]
    assert tcg["debug"] is True
    assert tcg["pck_chain"][-1] == "Intel SGX Root CA"
    assert tcg["signatures"] == "verified"
    assert tcg["tcb_status"] is None
    assert tcg["policy"] == "accepted"
    assert report["at"].startswith("2024-06-01T00:00:00+00:00")


def test_refusal_exits_1_with_the_failed_check(tmp_path: Path) -> None:
    strict = tmp_path / "strict.toml"
    strict.write_text(POLICY.read_text().replace("allow_debug = true", "allow_debug = false"))
    status, report = _run(str(CERT), "--policy", str(strict), "--at", AT)
    assert status == 1
    assert report["verdict"] == "refused"
    assert report["error"]["class"] == "DebugEnclaveError"
    assert report["error"]["check"] == "debug"
    status, report = _run(str(CERT), "--at", "2040-01-01T00:00:00Z")
    assert status == 1
    assert report["error"]["class"] == "CertificateValidityError"


def test_raw_quote_with_collateral(tmp_path: Path) -> None:
    collateral = DATA / "sgx" / "dcap_v3_quote_collateral.json"
    status, report = _run(str(DATA / "sgx" / "dcap_v3_quote.bin"), "--collateral", str(collateral),
                          "--at", "2025-07-01T00:00:00+00:00")  # fmt: skip
    assert status == 0
    assert report["kind"] == "quote"
    assert report["quotes"][0]["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert report["quotes"][0]["advisory_ids"]


def test_simulated_certificate_needs_the_simulation_root(tmp_path: Path) -> None:
    platform = SimulatedPlatform.create(tmp_path / "sim")
    provider = platform.quote_provider(mr_enclave=bytes(32), mr_signer=bytes(32))
    cert = tmp_path / "cert.der"
    cert.write_bytes(build_ratls_certificate(provider).certificate_der)
    status, report = _run(str(cert))
    assert status == 1
    assert report["error"]["class"] == "UntrustedRootError"
    status, report = _run(str(cert), "--trust-simulation-root", str(platform.root_certificate_path))
    assert status == 0
    assert all(q["simulated"] for q in report["quotes"])
    raw = tmp_path / "quote.bin"
    raw.write_bytes(parse_ratls_certificate(cert.read_bytes()).quote)
    status, report = _run(str(raw), "--trust-simulation-root", str(platform.root_certificate_path))
    assert status == 0
    assert report["quotes"][0]["qe_vendor_id"] == b"DRM-SIMULATED-QE".hex()


@pytest.mark.parametrize(
    "argv",
    [["missing.pem"], [str(CERT), "--at", "yesterday"], [str(CERT), "--policy", "missing.toml"]],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    status, report = _run(*argv)
    assert status == 2
    assert report["verdict"] == "error"


def test_garbage_input_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x30\x03junk")
    status, report = _run(str(junk))
    assert status == 1
    assert report["error"]["class"] == "CertificateFormatError"


def test_text_output_and_module_entry_point() -> None:
    out = io.StringIO()
    assert main(["inspect", str(CERT), "--policy", str(POLICY), "--at", AT], out=out) == 0
    assert "verdict: accepted" in out.getvalue()
    assert "quote (tcg):" in out.getvalue()
    result = subprocess.run(
        [sys.executable, "-m", "drm_wire.attestation", "inspect", str(CERT), "--at", "2040-01-01"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "verdict: refused" in result.stdout
