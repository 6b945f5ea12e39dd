"""The RA-TLS result cache: a hit must decide exactly as a full verification would.

No sockets: the verifier is called directly, as OpenSSL's callback would call it. Every
case is checked against ``verify_enclave_certificate`` (the uncached reference), with a
cold cache and with a cache that already holds the certificate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.identity import verify_enclave_certificate
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.ratls_cert import RatlsCredentials, build_ratls_certificate
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.net.ratls_context import VerificationCache, make_cached_certificate_verifier
from tests.attestation.dcap_helpers import real_collateral_text

MR_ENCLAVE = hashlib.sha256(b"drm cache test enclave").digest()
MR_SIGNER = hashlib.sha256(b"drm cache test signer").digest()
NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("ratls-cache") / "platform", now=NOW)


def _build(platform: SimulatedPlatform, *, debug: bool = False, svn: int = 0) -> RatlsCredentials:
    provider = platform.quote_provider(
        mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER, debug=debug, isv_svn=svn
    )
    return build_ratls_certificate(provider)


@pytest.fixture(scope="module")
def der(platform: SimulatedPlatform) -> bytes:
    return _build(platform).certificate_der


@pytest.fixture(scope="module")
def debug_der(platform: SimulatedPlatform) -> bytes:
    return _build(platform, debug=True).certificate_der


@pytest.fixture(scope="module")
def policy(platform: SimulatedPlatform) -> Policy:
    return Policy(
        mr_enclave=(MR_ENCLAVE,),
        mr_signer=MR_SIGNER,
        isv_prod_id=0,
        accept_unknown_tcb_status=True,
        simulation_root=platform.root_certificate,
    )


def _fields(enclave: VerifiedEnclave) -> tuple[object, ...]:
    return (
        enclave.mr_enclave,
        enclave.mr_signer,
        enclave.isv_prod_id,
        enclave.isv_svn,
        enclave.debug,
        enclave.tcb_status,
        enclave.simulated,
        enclave.public_key_spki,
        enclave.verified_quote.quote.raw,
    )


def _at(when: datetime) -> Callable[[], datetime]:
    return lambda: when


def _flip_in_quote(der: bytes) -> bytes:
    """One bit of the first quote's MRENCLAVE flipped (the certificate still parses)."""
    position = der.index(MR_ENCLAVE)
    return der[:position] + bytes([der[position] ^ 1]) + der[position + 1 :]


def test_hit_and_miss_give_the_reference_answer(der: bytes, policy: Policy) -> None:
    cache = VerificationCache()
    verify = make_cached_certificate_verifier(policy, clock=_at(NOW), cache=cache)
    reference = verify_enclave_certificate(der, policy, now=NOW)
    cold = verify(der)
    warm = verify(der)
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    assert _fields(cold) == _fields(warm) == _fields(reference)
    assert warm is not cold  # a fresh proof per handshake, from Policy.check


# Each case: (policy change, clock, which certificate); all must be refused.
CASES: dict[str, tuple[Callable[[Policy], Policy], datetime, str]] = {
    "other-mrenclave": (lambda p: replace(p, mr_enclave=(bytes(32),)), NOW, "good"),
    "other-mrsigner": (lambda p: replace(p, mr_signer=bytes(32)), NOW, "good"),
    "product-id": (lambda p: replace(p, isv_prod_id=7), NOW, "good"),
    "svn-too-low": (lambda p: replace(p, min_isv_svn=1), NOW, "good"),
    "needs-collateral": (lambda p: replace(p, accept_unknown_tcb_status=False), NOW, "good"),
    "no-simulation": (lambda p: replace(p, simulation_root=None), NOW, "good"),
    "chain-expired": (lambda p: p, NOW + timedelta(days=3651), "good"),
    "chain-not-yet-valid": (lambda p: p, NOW - timedelta(days=1), "good"),
    "debug": (lambda p: p, NOW, "debug"),
    "tampered": (lambda p: p, NOW, "tampered"),
}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_refusals_match_the_reference(
    case: str, warm: bool, der: bytes, debug_der: bytes, policy: Policy
) -> None:
    change, when, which = CASES[case]
    presented = {"good": der, "debug": debug_der, "tampered": _flip_in_quote(der)}[which]
    refusing = change(policy)
    with pytest.raises(Exception) as reference:  # noqa: PT011 - any refusal; compared below
        verify_enclave_certificate(presented, refusing, now=when)
    cache = VerificationCache()
    if warm:  # the cache already holds every certificate, verified under a lenient policy
        lenient = replace(policy, allow_debug=True)
        warm_up = make_cached_certificate_verifier(lenient, clock=_at(NOW), cache=cache)
        warm_up(der)
        warm_up(debug_der)
    entries = len(cache)
    verify = make_cached_certificate_verifier(refusing, clock=_at(when), cache=cache)
    with pytest.raises(type(reference.value)) as refused:
        verify(presented)
    assert type(refused.value) is type(reference.value)
    assert len(cache) == entries  # a refusal is never stored
    if warm and which != "tampered" and case != "no-simulation":
        assert cache.hits == 1  # decided on the cached signatures, with the checks re-applied


def test_naive_clock_is_a_bug(der: bytes, policy: Policy) -> None:
    cache = VerificationCache()
    make_cached_certificate_verifier(policy, clock=_at(NOW), cache=cache)(der)
    naive = make_cached_certificate_verifier(policy, clock=_at(datetime(2030, 1, 1)), cache=cache)
    with pytest.raises(ValueError, match="timezone-aware"):
        naive(der)
    with pytest.raises(ValueError, match="timezone-aware"):
        make_cached_certificate_verifier(policy, clock=_at(datetime(2030, 1, 1)), cache=None)(der)


def test_cache_is_a_bounded_lru(platform: SimulatedPlatform, der: bytes, policy: Policy) -> None:
    cache = VerificationCache(size=2)
    verify = make_cached_certificate_verifier(policy, clock=_at(NOW), cache=cache)
    others = [_build(platform).certificate_der for _ in range(2)]
    for item in (der, *others):
        verify(item)
    assert len(cache) == 2
    verify(others[1])
    assert cache.hits == 1
    verify(der)  # evicted first: verified again
    assert (cache.hits, cache.misses) == (1, 4)
    assert "2/2" in repr(cache)
    cache.clear()
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)
    with pytest.raises(ValueError, match="size"):
        VerificationCache(size=0)


def test_no_cache_and_collateral_bypass_the_cache(der: bytes, policy: Policy) -> None:
    cache = VerificationCache()
    uncached = make_cached_certificate_verifier(policy, clock=_at(NOW), cache=None)
    assert _fields(uncached(der)) == _fields(verify_enclave_certificate(der, policy, now=NOW))
    # With collateral the full verification runs every time, as the reference does. (Intel's
    # collateral cannot judge a simulated quote, so both refuse, in the same way.)
    collateral = Collateral.from_json(real_collateral_text())
    with pytest.raises(Exception) as reference:  # noqa: PT011 - compared below
        verify_enclave_certificate(der, policy, collateral=collateral, now=NOW)
    verify = make_cached_certificate_verifier(
        policy, collateral=collateral, clock=_at(NOW), cache=cache
    )
    with pytest.raises(type(reference.value)):
        verify(der)
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)
