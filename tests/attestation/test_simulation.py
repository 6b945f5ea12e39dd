"""The INSECURE simulated platform: exact v3 layout, verifiable only with its root trusted,
always marked simulated, loud in the log."""

from __future__ import annotations

import hashlib
import stat
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from structlog.testing import capture_logs

from drm_wire.attestation.collateral import Collateral, TcbStatus
from drm_wire.attestation.errors import (
    CertificateValidityError,
    CollateralExpiredError,
    CollateralSignatureError,
    QuoteSignatureError,
    UntrustedRootError,
)
from drm_wire.attestation.insecure_simulation import SIMULATED_QE_VENDOR_ID, SimulatedPlatform
from drm_wire.attestation.quote import INTEL_QE_VENDOR_ID, parse_quote
from drm_wire.attestation.verify import TrustAnchors, verify_quote
from drm_wire.errors import ConfigError

MR_ENCLAVE = bytes(range(32))
MR_SIGNER = bytes(range(32, 64))
NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("sim") / "platform")


@pytest.fixture(scope="module")
def quote(platform: SimulatedPlatform) -> bytes:
    return platform.quote(
        b"report-data", mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER, isv_prod_id=7, isv_svn=3
    )


def test_directory_layout_and_key_modes(platform: SimulatedPlatform) -> None:
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in platform.directory.iterdir()}
    assert set(files) == {
        "sim-root.pem", "sim-intermediate.pem", "sim-pck.pem", "sim-pck.key", "sim-attestation.key",
        "sim-tcb-signing.pem", "sim-tcb-signing.key", "sim-root-ca.crl", "sim-pck-ca.crl",
    }  # fmt: skip
    assert files["sim-pck.key"] == files["sim-attestation.key"] == 0o600
    assert files["sim-tcb-signing.key"] == 0o600
    assert platform.root_certificate_path == platform.directory / "sim-root.pem"
    assert "INSECURE" in repr(platform)


def test_certificates_say_simulated(platform: SimulatedPlatform) -> None:
    for cert in (
        platform.root_certificate,
        platform.intermediate_certificate,
        platform.pck_certificate,
    ):
        (cn,) = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        assert "SIMULATED" in str(cn.value)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_quote_has_the_exact_v3_layout(platform: SimulatedPlatform, quote: bytes) -> None:
    version, key_type, reserved, _qe_svn, _pce_svn, vendor = struct.unpack_from("<HHIHH16s", quote)
    assert (version, key_type, reserved, vendor) == (3, 2, 0, SIMULATED_QE_VENDOR_ID)
    assert vendor != INTEL_QE_VENDOR_ID
    assert quote[112:144] == MR_ENCLAVE
    assert quote[176:208] == MR_SIGNER
    assert struct.unpack_from("<HH", quote, 304) == (7, 3)
    assert quote[368:432] == b"report-data".ljust(64, b"\0")
    assert quote[96] == 0x05  # INIT | MODE64BIT, no DEBUG
    (sig_len,) = struct.unpack_from("<I", quote, 432)
    assert 436 + sig_len == len(quote)
    sig, att_key = quote[436:500], quote[500:564]
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + att_key)
    der_sig = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    public.verify(der_sig, quote[:432], ec.ECDSA(hashes.SHA256()))
    qe_report = quote[564:948]
    (auth_len,) = struct.unpack_from("<H", quote, 1012)
    auth = quote[1014 : 1014 + auth_len]
    assert qe_report[320:352] == hashlib.sha256(att_key + auth).digest()
    cert_type, cert_len = struct.unpack_from("<HI", quote, 1014 + auth_len)
    chain = quote[1020 + auth_len :]
    assert cert_type == 5
    assert cert_len == len(chain)
    assert chain.endswith(b"-----\n\0")
    parsed = parse_quote(quote)
    assert parsed.body.mr_enclave == MR_ENCLAVE
    assert parsed.body.to_bytes() == quote[48:432]
    assert len(x509.load_pem_x509_certificates(parsed.pck_chain_pem.rstrip(b"\0"))) == 3


def test_verifies_only_with_the_simulation_root_trusted(
    platform: SimulatedPlatform, quote: bytes, tmp_path: Path
) -> None:
    verified = verify_quote(quote, trust=platform.trust_anchors(), now=NOW)
    assert verified.simulated is True
    assert verified.tcb_status is None
    with pytest.raises(UntrustedRootError) as info:
        verify_quote(quote, now=NOW)
    assert type(info.value) is UntrustedRootError
    other = SimulatedPlatform.create(tmp_path / "other")
    with pytest.raises(UntrustedRootError) as info:
        verify_quote(quote, trust=other.trust_anchors(), now=NOW)
    assert type(info.value) is UntrustedRootError
    from_file = TrustAnchors.with_simulation_root(platform.root_certificate_path)
    assert verify_quote(quote, trust=from_file, now=NOW).simulated


def test_tampered_quote_fails_its_signature(platform: SimulatedPlatform, quote: bytes) -> None:
    tampered = bytearray(quote)
    tampered[112] ^= 1  # one bit of MRENCLAVE
    with pytest.raises(QuoteSignatureError) as info:
        verify_quote(bytes(tampered), trust=platform.trust_anchors(), now=NOW)
    assert type(info.value) is QuoteSignatureError


def test_expired_simulation_chain(tmp_path: Path) -> None:
    old = SimulatedPlatform.create(
        tmp_path / "old", now=NOW - timedelta(days=30), valid_for=timedelta(days=1)
    )
    quote = old.quote(b"", mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER)
    with pytest.raises(CertificateValidityError) as info:
        verify_quote(quote, trust=old.trust_anchors(), now=NOW)
    assert type(info.value) is CertificateValidityError


def test_every_use_logs_a_warning(platform: SimulatedPlatform, tmp_path: Path) -> None:
    with capture_logs() as logs:
        SimulatedPlatform.create(tmp_path / "p")
        loaded = SimulatedPlatform.load(tmp_path / "p")
        loaded.quote(b"", mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER)
        loaded.quote_provider(mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER)(b"x")
    assert [e["event"] for e in logs] == ["insecure_simulation_used"] * 4
    assert {e["log_level"] for e in logs} == {"warning"}
    assert [e["action"] for e in logs] == ["create_platform", "load_platform", "quote", "quote"]


def test_load_round_trip(platform: SimulatedPlatform) -> None:
    loaded = SimulatedPlatform.load(platform.directory)
    assert loaded.root_certificate == platform.root_certificate
    quote = loaded.quote(b"", mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER, debug=True)
    verified = verify_quote(quote, trust=platform.trust_anchors(), now=NOW)
    assert verified.quote.body.debug


def test_create_refuses_to_overwrite(platform: SimulatedPlatform) -> None:
    with pytest.raises(FileExistsError):
        SimulatedPlatform.create(platform.directory)


def test_load_errors_are_config_errors(platform: SimulatedPlatform, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as info:
        SimulatedPlatform.load(tmp_path / "missing")
    assert type(info.value) is ConfigError
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in platform.directory.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "sim-root.pem").write_bytes(b"not a pem")
    with pytest.raises(ConfigError, match="does not parse"):
        SimulatedPlatform.load(broken)
    other = SimulatedPlatform.create(tmp_path / "other")
    (broken / "sim-root.pem").write_bytes((platform.directory / "sim-root.pem").read_bytes())
    (broken / "sim-pck.key").write_bytes((other.directory / "sim-pck.key").read_bytes())
    with pytest.raises(ConfigError, match="does not match"):
        SimulatedPlatform.load(broken)


def test_report_data_longer_than_64_bytes_is_refused(platform: SimulatedPlatform) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        platform.quote(bytes(65), mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER)


# --- the platform's own collateral: the production verification path ------------------


def test_the_platform_issues_collateral_that_judges_its_quotes(
    platform: SimulatedPlatform, quote: bytes
) -> None:
    collateral = Collateral.from_json(platform.collateral(now=NOW))
    assert collateral.tcb_info.fmspc == b"SIMFMS"
    verified = verify_quote(quote, trust=platform.trust_anchors(), collateral=collateral, now=NOW)
    assert verified.simulated
    assert verified.tcb_status is TcbStatus.UP_TO_DATE
    assert verified.pck_fmspc == b"SIMFMS"
    # Intel's trust anchors alone never accept it, collateral or not.
    with pytest.raises(UntrustedRootError):
        verify_quote(quote, collateral=collateral, now=NOW)


def test_simulated_collateral_expires(platform: SimulatedPlatform, quote: bytes) -> None:
    collateral = Collateral.from_json(platform.collateral(now=NOW))
    later = NOW + timedelta(days=31)
    with pytest.raises(CollateralExpiredError):
        verify_quote(quote, trust=platform.trust_anchors(), collateral=collateral, now=later)


def test_another_platforms_collateral_does_not_judge_this_one(
    platform: SimulatedPlatform, quote: bytes, tmp_path: Path
) -> None:
    other = SimulatedPlatform.create(tmp_path / "other", now=NOW)
    collateral = Collateral.from_json(other.collateral(now=NOW))
    with pytest.raises(CollateralSignatureError):
        verify_quote(quote, trust=platform.trust_anchors(), collateral=collateral, now=NOW)


def test_a_platform_without_collateral_files_says_so(tmp_path: Path) -> None:
    made = SimulatedPlatform.create(tmp_path / "old", now=NOW)
    (made.directory / "sim-tcb-signing.key").unlink()
    with pytest.raises(ConfigError, match="issues no collateral"):
        SimulatedPlatform.load(made.directory).collateral(now=NOW)
