"""The Gramine backend against a fake ``/dev/attestation`` directory, and the identity
factory's backend choice (never silently unattested)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from drm_wire.attestation.gramine import (
    GramineQuoteProvider,
    QuoteGenerationError,
    SimulatedEnclave,
    gramine_available,
    make_enclave_identity,
)
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.ratls_cert import KeyBindingError, parse_ratls_certificate
from drm_wire.attestation.verify import verify_quote
from drm_wire.errors import ConfigError

MR_ENCLAVE = bytes.fromhex("e1" * 32)
MR_SIGNER = bytes.fromhex("51" * 32)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("sim"))


def _fake_device(root: Path, quote: bytes, kind: str = "dcap") -> Path:
    root.mkdir()
    (root / "attestation_type").write_text(kind + "\n")
    (root / "user_report_data").write_bytes(bytes(64))
    (root / "quote").write_bytes(quote)
    return root


def test_detection(tmp_path: Path) -> None:
    assert not gramine_available(tmp_path / "absent")
    assert gramine_available(_fake_device(tmp_path / "dcap", b"q"))
    assert not gramine_available(_fake_device(tmp_path / "none", b"q", kind="none"))
    no_quote = _fake_device(tmp_path / "noquote", b"q")
    (no_quote / "quote").unlink()
    assert not gramine_available(no_quote)


def test_provider_writes_report_data_and_reads_quote(tmp_path: Path) -> None:
    root = _fake_device(tmp_path / "dev", b"the quote")
    provider = GramineQuoteProvider(root)
    assert provider(b"abc") == b"the quote"
    assert (root / "user_report_data").read_bytes() == b"abc".ljust(64, b"\0")
    with pytest.raises(ValueError, match="64 bytes"):
        provider(bytes(65))


def test_device_failures(tmp_path: Path) -> None:
    empty = _fake_device(tmp_path / "empty", b"")
    with pytest.raises(QuoteGenerationError, match="empty") as info:
        GramineQuoteProvider(empty)(b"")
    assert type(info.value) is QuoteGenerationError
    with pytest.raises(QuoteGenerationError, match="device failed"):
        GramineQuoteProvider(tmp_path / "absent")(b"")


def test_gramine_backend_builds_the_certificate_from_the_device(
    platform: SimulatedPlatform, tmp_path: Path
) -> None:
    # A file cannot answer each write with a fresh quote, so the quote binds nothing:
    # the verifier must notice, which is the point of requiring the key binding.
    quote = platform.quote(bytes(64), mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER)
    root = _fake_device(tmp_path / "dev", quote)
    credentials = make_enclave_identity("gramine", attestation_root=root)
    key, der = credentials.private_key, credentials.certificate_der
    assert key.curve.name == "secp384r1"
    with pytest.raises(KeyBindingError) as info:
        parse_ratls_certificate(der)
    assert type(info.value) is KeyBindingError
    auto_der = make_enclave_identity("auto", attestation_root=root).certificate_der
    assert quote in auto_der


def test_simulated_backend_round_trip(platform: SimulatedPlatform, tmp_path: Path) -> None:
    simulation = SimulatedEnclave(platform, mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER, isv_svn=4)
    for backend in ("simulated", "auto"):
        der = make_enclave_identity(
            backend, attestation_root=tmp_path / "absent", simulation=simulation
        ).certificate_der
        evidence = parse_ratls_certificate(der)
        now = datetime.now(UTC)
        for quote in evidence.quotes:
            verified = verify_quote(quote, trust=platform.trust_anchors(), now=now)
            assert verified.simulated
            assert verified.quote.body.isv_svn == 4


@pytest.mark.parametrize(
    ("backend", "message"),
    [("gramine", "not available"), ("auto", "no simulated platform"), ("simulated", "no simulated"),
     ("sgx", "unknown attestation backend")],
)  # fmt: skip
def test_factory_refuses_to_run_unattested(backend: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        make_enclave_identity(backend, attestation_root=tmp_path)  # type: ignore[arg-type]
    assert type(info.value) is ConfigError
