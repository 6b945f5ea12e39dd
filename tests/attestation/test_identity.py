"""The top-level check: RA-TLS certificate + policy -> VerifiedEnclave, on real Gramine,
rats-tls and Intel SGX SDK certificates and on the full simulated round trip."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from drm_wire.attestation.collateral import Collateral, TcbStatus
from drm_wire.attestation.errors import CertificateValidityError, UntrustedRootError
from drm_wire.attestation.identity import make_certificate_verifier, verify_enclave_certificate
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import (
    DebugEnclaveError,
    MeasurementMismatchError,
    Policy,
    SimulationRefusedError,
    TcbStatusError,
)
from drm_wire.attestation.ratls_cert import KeyBindingError, build_ratls_certificate
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.attestation.verify import verify_quote
from drm_wire.errors import AttestationError

DATA = Path(__file__).parent.parent / "data"
GRAMINE_CERT = (DATA / "ratls" / "gramine-cert.pem").read_bytes()
#: Inside the validity of the PCK chains in all three real certificates.
REAL_NOW = datetime(2024, 6, 1, tzinfo=UTC)
NOW = datetime.now(UTC)
MR_ENCLAVE = bytes.fromhex("5e" * 32)
MR_SIGNER = bytes.fromhex("51" * 32)


@pytest.fixture(scope="module")
def gramine_policy() -> Policy:
    return Policy.load(DATA / "policy" / "gramine-debug.toml")


def test_real_gramine_certificate_verifies(gramine_policy: Policy) -> None:
    enclave = verify_enclave_certificate(GRAMINE_CERT, gramine_policy, now=REAL_NOW)
    assert enclave.mr_enclave.hex().startswith("0866e7ca")
    assert enclave.mr_signer.hex().startswith("adc53501")
    assert (enclave.isv_prod_id, enclave.isv_svn, enclave.debug) == (0, 0, True)
    assert enclave.simulated is False
    assert enclave.tcb_status is None
    assert enclave.public_key_spki is not None
    assert len(enclave.public_key_spki) == 120
    assert enclave.verified_quote.quote.header.qe_svn == 9
    assert "DEBUG" in repr(enclave)


def test_real_gramine_certificate_refusals(gramine_policy: Policy) -> None:
    cases: list[tuple[Policy, datetime, type[AttestationError]]] = [
        (replace(gramine_policy, allow_debug=False), REAL_NOW, DebugEnclaveError),
        (replace(gramine_policy, mr_enclave=(bytes(32),)), REAL_NOW, MeasurementMismatchError),
        (replace(gramine_policy, accept_unknown_tcb_status=False), REAL_NOW, TcbStatusError),
        (gramine_policy, datetime(2035, 1, 1, tzinfo=UTC), CertificateValidityError),
    ]
    for policy, now, expected in cases:
        with pytest.raises(expected) as info:
            verify_enclave_certificate(GRAMINE_CERT, policy, now=now)
        assert type(info.value) is expected


@pytest.mark.parametrize("name", ["rats-tls-cert.pem", "intel-sgxsdk-cert.pem"])
def test_other_producers_verify(name: str, gramine_policy: Policy) -> None:
    from drm_wire.attestation.ratls_cert import parse_ratls_certificate

    data = (DATA / "ratls" / name).read_bytes()
    body = verify_quote(parse_ratls_certificate(data).quote, now=REAL_NOW).quote.body
    policy = replace(gramine_policy, mr_enclave=(body.mr_enclave,), mr_signer=body.mr_signer)
    enclave = verify_enclave_certificate(data, policy, now=REAL_NOW)
    assert enclave.mr_enclave == body.mr_enclave
    assert not enclave.simulated


# --- the simulated round trip ----------------------------------------------------------


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def sim_policy_file(platform: SimulatedPlatform, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("policy")
    (directory / "sim-root.pem").write_bytes(platform.root_certificate_path.read_bytes())
    path = directory / "policy.toml"
    path.write_text(
        "[enclave]\n"
        f'mr_enclave = ["{MR_ENCLAVE.hex()}"]\n'
        f'mr_signer = "{MR_SIGNER.hex()}"\n'
        "isv_prod_id = 3\nmin_isv_svn = 1\naccept_unknown_tcb_status = true\n"
        '[simulation]\ntrust_root = "sim-root.pem"\n'
    )
    return path


def test_full_simulated_round_trip(platform: SimulatedPlatform, sim_policy_file: Path) -> None:
    provider = platform.quote_provider(
        mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER, isv_prod_id=3, isv_svn=1
    )
    creds = build_ratls_certificate(provider)
    policy = Policy.load(sim_policy_file)
    enclave = verify_enclave_certificate(creds.certificate_der, policy, now=NOW)
    assert isinstance(enclave, VerifiedEnclave)
    assert enclave.simulated
    assert not enclave.debug
    assert enclave.tcb_status is None
    assert (enclave.mr_enclave, enclave.mr_signer, enclave.isv_svn) == (MR_ENCLAVE, MR_SIGNER, 1)
    spki = creds.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert enclave.public_key_spki == spki
    hook = make_certificate_verifier(policy, clock=lambda: NOW)
    assert hook(creds.certificate_pem).mr_enclave == MR_ENCLAVE


def test_simulated_certificate_refusals(
    platform: SimulatedPlatform, sim_policy_file: Path, tmp_path: Path
) -> None:
    good = platform.quote_provider(
        mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER, isv_prod_id=3, isv_svn=1
    )
    der = build_ratls_certificate(good).certificate_der
    policy = Policy.load(sim_policy_file)
    other = SimulatedPlatform.create(tmp_path / "other")
    unbound = build_ratls_certificate(lambda rd: good(bytes(64))).certificate_der
    cases: list[tuple[bytes, Policy, type[AttestationError]]] = [
        (der, replace(policy, simulation_root=None, simulation_root_path=None), UntrustedRootError),
        (der, replace(policy, simulation_root=other.root_certificate), UntrustedRootError),
        (unbound, policy, KeyBindingError),
        (der, replace(policy, mr_enclave=(bytes(32),)), MeasurementMismatchError),
    ]
    for data, checked, expected in cases:
        with pytest.raises(expected) as info:
            verify_enclave_certificate(data, checked, now=NOW)
        assert type(info.value) is expected


def test_simulated_quote_refused_by_policy_without_simulation(
    platform: SimulatedPlatform, sim_policy_file: Path
) -> None:
    quote = platform.quote(
        b"", mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER, isv_prod_id=3, isv_svn=1
    )
    verified = verify_quote(quote, trust=platform.trust_anchors(), now=NOW)
    policy = replace(Policy.load(sim_policy_file), simulation_root=None, simulation_root_path=None)
    with pytest.raises(SimulationRefusedError):
        policy.check(verified)


def test_tcb_status_from_real_collateral() -> None:
    quote = (DATA / "sgx" / "dcap_v3_quote.bin").read_bytes()
    collateral = Collateral.from_json((DATA / "sgx" / "dcap_v3_quote_collateral.json").read_bytes())
    verified = verify_quote(quote, collateral=collateral, now=datetime(2025, 7, 1, tzinfo=UTC))
    body = verified.quote.body
    accepted = frozenset({TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED})
    strict = Policy(mr_enclave=(body.mr_enclave,), isv_prod_id=0, tcb_statuses=accepted)
    with pytest.raises(TcbStatusError) as info:
        strict.check(verified)
    assert type(info.value) is TcbStatusError
    assert verified.tcb_status is not None
    lax = replace(strict, tcb_statuses=accepted | {verified.tcb_status})
    enclave = lax.check(verified)
    assert enclave.tcb_status is TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED
    assert enclave.public_key_spki is None


def test_verified_enclave_cannot_be_forged_or_changed(gramine_policy: Policy) -> None:
    with pytest.raises(TypeError):
        VerifiedEnclave()
    enclave = verify_enclave_certificate(GRAMINE_CERT, gramine_policy, now=REAL_NOW)
    with pytest.raises(AttributeError):
        enclave.mr_enclave = bytes(32)
    with pytest.raises(AttributeError):
        del enclave.debug


def test_the_proof_object_depends_on_neither_its_maker_nor_its_user() -> None:
    """``policy`` makes the proof and ``identity`` hands it out: neither imports the other
    back, so the proof's module loads alone and ``policy`` loads without ``identity``."""
    code = (
        "import sys\n"
        "import drm_wire.attestation.verified_enclave\n"
        "loaded = [m for m in ('drm_wire.attestation.policy', 'drm_wire.attestation.identity')"
        " if m in sys.modules]\n"
        "import drm_wire.attestation.policy\n"
        "loaded.append('drm_wire.attestation.identity' in sys.modules)\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[False]"
