"""Collateral stapled in the enclave's RA-TLS certificate: judged like any collateral."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from drm_wire.attestation.collateral import Collateral, TcbStatus
from drm_wire.attestation.collateral_source import CollateralSet
from drm_wire.attestation.errors import (
    CollateralError,
    CollateralExpiredError,
    CollateralSignatureError,
)
from drm_wire.attestation.identity import verify_enclave_certificate
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import Policy, TcbStatusError
from drm_wire.attestation.ratls_cert import (
    MAX_STAPLED_COLLATERAL_BYTES,
    CertificateFormatError,
    build_ratls_certificate,
    parse_ratls_certificate,
    restaple,
)
from drm_wire.net.ratls_context import VerificationCache, make_cached_certificate_verifier

NOW = datetime.now(UTC)
MR_ENCLAVE = bytes.fromhex("5a" * 32)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("staple") / "platform", now=NOW)


@pytest.fixture(scope="module")
def policy(platform: SimulatedPlatform) -> Policy:
    # A production policy but for the simulation root: UpToDate only, no unknown status.
    return Policy(
        mr_enclave=(MR_ENCLAVE,),
        isv_prod_id=0,
        simulation_root=platform.root_certificate,
        simulation_root_path=str(platform.root_certificate_path),
    )


def _certificate(
    platform: SimulatedPlatform,
    stapled: bytes | None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    provider = platform.quote_provider(mr_enclave=MR_ENCLAVE, mr_signer=bytes(32))
    credentials = build_ratls_certificate(provider, private_key=key, stapled_collateral=stapled)
    return credentials.certificate_der


def test_stapled_collateral_gives_a_full_verdict(
    platform: SimulatedPlatform, policy: Policy
) -> None:
    bundle = platform.collateral(now=NOW).encode()
    der = _certificate(platform, bundle)
    assert parse_ratls_certificate(der).stapled_collateral == bundle
    enclave = verify_enclave_certificate(der, policy, now=NOW)
    assert enclave.tcb_status is TcbStatus.UP_TO_DATE
    assert enclave.simulated
    # Without it the production policy refuses: the TCB status is unknown.
    with pytest.raises(TcbStatusError, match="unknown"):
        verify_enclave_certificate(_certificate(platform, None), policy, now=NOW)


def test_reissued_with_the_same_key_and_quote(platform: SimulatedPlatform, policy: Policy) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    first = _certificate(platform, platform.collateral(now=NOW).encode(), key)
    later = NOW + timedelta(days=20)
    again = _certificate(platform, platform.collateral(now=later).encode(), key)
    one, two = parse_ratls_certificate(first), parse_ratls_certificate(again)
    assert one.spki_der == two.spki_der
    assert one.stapled_collateral != two.stapled_collateral
    # The old staple has expired 35 days on; the re-issued one is current.
    at = NOW + timedelta(days=35)
    with pytest.raises(CollateralExpiredError):
        verify_enclave_certificate(first, policy, now=at)
    assert verify_enclave_certificate(again, policy, now=at).tcb_status is TcbStatus.UP_TO_DATE


def test_the_verifiers_newer_collateral_beats_an_old_staple(
    platform: SimulatedPlatform, policy: Policy
) -> None:
    old = platform.collateral(now=NOW - timedelta(days=29)).encode()
    der = _certificate(platform, old)
    own = CollateralSet([Collateral.from_json(platform.collateral(now=NOW))])
    at = NOW + timedelta(days=2)  # the staple expired a day ago; the verifier's is current
    enclave = verify_enclave_certificate(der, policy, collateral=own, now=at)
    assert enclave.tcb_status is TcbStatus.UP_TO_DATE
    with pytest.raises(CollateralExpiredError):
        verify_enclave_certificate(der, policy, now=at)


def test_a_staple_from_another_platform_is_refused(
    platform: SimulatedPlatform, policy: Policy, tmp_path: Path
) -> None:
    other = SimulatedPlatform.create(tmp_path / "other", now=NOW)
    der = _certificate(platform, other.collateral(now=NOW).encode())
    with pytest.raises(CollateralSignatureError):
        verify_enclave_certificate(der, policy, now=NOW)


def test_a_tampered_staple_is_refused(platform: SimulatedPlatform, policy: Policy) -> None:
    document = json.loads(platform.collateral(now=NOW))
    document["tcb_info"] = document["tcb_info"].replace('"UpToDate"', '"UpToDate" ', 1)
    der = _certificate(platform, json.dumps(document).encode())
    with pytest.raises(CollateralSignatureError, match="TCB info"):
        verify_enclave_certificate(der, policy, now=NOW)


@pytest.mark.parametrize("junk", [b"not json", b"{}", b"[1, 2]", b"\xff" * 300])
def test_a_malformed_staple_is_refused(
    platform: SimulatedPlatform, policy: Policy, junk: bytes
) -> None:
    with pytest.raises(CollateralError):
        verify_enclave_certificate(_certificate(platform, junk), policy, now=NOW)


def test_an_oversized_staple_is_refused(platform: SimulatedPlatform) -> None:
    with pytest.raises(CertificateFormatError, match="stapled collateral"):
        _certificate(platform, b"x" * (MAX_STAPLED_COLLATERAL_BYTES + 1))
    with pytest.raises(CertificateFormatError, match="stapled collateral"):
        _certificate(platform, b"")


def test_the_result_cache_serves_a_stapled_verdict_only_while_it_is_current(
    platform: SimulatedPlatform, policy: Policy
) -> None:
    cache = VerificationCache()
    clock = [NOW]
    verify = make_cached_certificate_verifier(policy, clock=lambda: clock[0], cache=cache)
    der = _certificate(platform, platform.collateral(now=NOW).encode())
    assert verify(der).tcb_status is TcbStatus.UP_TO_DATE
    assert verify(der).tcb_status is TcbStatus.UP_TO_DATE
    assert (len(cache), cache.hits) == (1, 1)
    clock[0] = NOW + timedelta(days=29)
    assert verify(der).tcb_status is TcbStatus.UP_TO_DATE
    clock[0] = NOW + timedelta(days=31)  # the staple expired: re-verified, refused
    with pytest.raises(CollateralExpiredError):
        verify(der)
    # A stricter policy takes effect on a hit too.
    clock[0] = NOW
    strict = replace(policy, tcb_statuses=frozenset({TcbStatus.OUT_OF_DATE}))
    verify_strict = make_cached_certificate_verifier(strict, clock=lambda: clock[0], cache=cache)
    with pytest.raises(TcbStatusError, match="UpToDate is not accepted"):
        verify_strict(der)


def test_a_verifiers_own_collateral_is_cached_by_generation(
    platform: SimulatedPlatform, policy: Policy
) -> None:
    der = _certificate(platform, None)
    own = CollateralSet([Collateral.from_json(platform.collateral(now=NOW))])
    verify = make_cached_certificate_verifier(policy, collateral=own, clock=lambda: NOW)
    assert verify(der).tcb_status is TcbStatus.UP_TO_DATE
    assert verify(der).tcb_status is TcbStatus.UP_TO_DATE


def test_restaple_keeps_the_key_and_quotes_and_swaps_the_staple(
    platform: SimulatedPlatform, policy: Policy
) -> None:
    provider = platform.quote_provider(mr_enclave=MR_ENCLAVE, mr_signer=bytes(32))
    bare = build_ratls_certificate(provider)
    with pytest.raises(TcbStatusError):  # nothing stapled: status unknown
        verify_enclave_certificate(bare.certificate_der, policy, now=NOW)
    old = platform.collateral(now=NOW - timedelta(days=29)).encode()
    fresh = platform.collateral(now=NOW).encode()
    first = restaple(bare, old)
    second = restaple(first, fresh)
    before, after = (parse_ratls_certificate(c.certificate_der) for c in (bare, second))
    assert second.private_key is bare.private_key
    assert after.spki_der == before.spki_der
    assert (after.tcg_quote, after.legacy_quote) == (before.tcg_quote, before.legacy_quote)
    assert after.stapled_collateral == fresh
    assert second.certificate.not_valid_after_utc == bare.certificate.not_valid_after_utc
    at = NOW + timedelta(days=2)  # the old staple expired a day ago; the new one is current
    with pytest.raises(CollateralExpiredError):
        verify_enclave_certificate(first.certificate_der, policy, now=at)
    enclave = verify_enclave_certificate(second.certificate_der, policy, now=at)
    assert enclave.tcb_status is TcbStatus.UP_TO_DATE


def test_restaple_refuses_an_empty_or_oversized_staple(platform: SimulatedPlatform) -> None:
    provider = platform.quote_provider(mr_enclave=MR_ENCLAVE, mr_signer=bytes(32))
    bare = build_ratls_certificate(provider)
    for staple in (b"", b"x" * (MAX_STAPLED_COLLATERAL_BYTES + 1)):
        with pytest.raises(CertificateFormatError):
            restaple(bare, staple)
