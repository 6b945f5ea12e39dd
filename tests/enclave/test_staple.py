"""The enclave staples its own collateral: fetched from a PCCS (the test PCCS of
``drm_lab.pccs``, real HTTPS on loopback), checked against the pinned root, stapled, and
presented by a real TLS handshake; hostile collateral is never stapled; an expired staple
is dropped, never offered. Validity is judged at an injected wall clock."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from OpenSSL import SSL
from structlog.testing import capture_logs

from drm_enclave.custodian_link import LinkTiming
from drm_enclave.serve import serve
from drm_enclave.staple import Stapler, own_platform
from drm_lab.pccs import PccsBehaviour, running_pccs
from drm_wire.attestation._sim_collateral import SIMULATED_FMSPC
from drm_wire.attestation.collateral import Collateral, TcbStatus
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.pccs import CaType, PccsClient, PccsError
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.ratls_cert import (
    MAX_STAPLED_COLLATERAL_BYTES,
    RatlsCredentials,
    build_ratls_certificate,
    parse_ratls_certificate,
)
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.messages import PeerRole
from drm_wire.net._tls_context import client_context
from drm_wire.net.ratls_context import enclave_server_context, make_cached_certificate_verifier
from drm_wire.net.request_channel import open_request_channel
from drm_wire.net.tls import PeerVerificationError, accept_tls, open_tls_client
from drm_wire.protocol import Link, Side
from tests.attestation.test_pccs import REAL
from tests.enclave.enclave_fakes import (
    HOST,
    FakeConsumer,
    enclave_config,
    enclave_policy,
    shared_pki,
)

NOW = datetime.now(UTC)
MR_ENCLAVE = bytes.fromhex("5a" * 32)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("staple") / "platform", now=NOW)


def _policy(platform: SimulatedPlatform) -> Policy:
    """A production policy (UpToDate only, no unknown status) for the simulation root."""
    return Policy(
        mr_enclave=(MR_ENCLAVE,), isv_prod_id=0, simulation_root=platform.root_certificate
    )


def _credentials(platform: SimulatedPlatform, stapled: str | None = None) -> RatlsCredentials:
    provider = platform.quote_provider(mr_enclave=MR_ENCLAVE, mr_signer=bytes(32))
    return build_ratls_certificate(
        provider, stapled_collateral=None if stapled is None else stapled.encode()
    )


class Wall:
    """The wall clock validity is judged at; tests move it."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


async def _presented(
    context: SSL.Context, policy: Policy, clock: Callable[[], datetime]
) -> tuple[bytes | None, VerifiedEnclave]:
    """A real TLS handshake against ``context``: the staple the server presented, and the
    verdict of a verifier that has no collateral of its own."""
    seen: list[bytes] = []
    verify = make_cached_certificate_verifier(policy, clock=clock, cache=None)

    def record(der: bytes) -> object:
        seen.append(der)
        return verify(der)

    async def serve_one(transport: trio.SocketStream) -> None:
        with contextlib.suppress(Exception):  # the client refused us: nothing to close
            stream = await accept_tls(transport, context)
            await stream.aclose()

    refused: PeerVerificationError | None = None
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, serve_one, listeners)
        try:
            with trio.fail_after(10):
                stream = await open_tls_client("127.0.0.1", port, client_context(verifier=record))
            verdict = stream.peer_identity_as(VerifiedEnclave)
            await stream.aclose()
        except PeerVerificationError as exc:
            refused = exc
        nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused
    return parse_ratls_certificate(seen[-1]).stapled_collateral, verdict


class Contexts:
    """The server contexts made from each certificate the stapler installs."""

    def __init__(self, credentials: RatlsCredentials) -> None:
        self.made = [enclave_server_context(credentials)]

    def install(self, credentials: RatlsCredentials) -> None:
        self.made.append(enclave_server_context(credentials))

    @property
    def current(self) -> SSL.Context:
        return self.made[-1]


def _stapler(
    platform: SimulatedPlatform,
    credentials: RatlsCredentials,
    fetch: Callable[[bytes, CaType], Any],
    wall: Wall,
) -> tuple[Stapler, Contexts]:
    contexts = Contexts(credentials)
    stapler = Stapler(
        credentials, install=contexts.install, fetch=fetch, trust=platform.trust_anchors(),
        clock=wall,
    )  # fmt: skip
    return stapler, contexts


async def _fetch_once(stapler: Stapler) -> None:
    """Run the cache until its first fetch attempt is over, then judge what it holds."""
    stapler.cache.want(stapler.fmspc, stapler.ca)
    async with trio.open_nursery() as nursery:
        await nursery.start(stapler.cache.run)
        with trio.fail_after(20):
            await stapler.cache.attempted()
        nursery.cancel_scope.cancel()
    stapler.consider()


def test_the_platform_is_read_from_our_own_quote(platform: SimulatedPlatform) -> None:
    assert own_platform(_credentials(platform)) == (SIMULATED_FMSPC, "platform")


async def test_pccs_collateral_is_verified_stapled_and_presented(
    platform: SimulatedPlatform, tmp_path: Path
) -> None:
    """The enclave starts with its platform's staple; the PCCS has newer collateral: it is
    checked, stapled on both contexts, and a verifier with no PCCS gets UpToDate from it.
    Only the PCK CA our quote names is asked for."""
    wall = Wall()
    first = platform.collateral(now=NOW - timedelta(days=1))
    newer = platform.collateral(now=NOW)
    behaviour = PccsBehaviour(bundle=json.loads(newer))
    async with (
        running_pccs(tmp_path, behaviour) as pccs,
        PccsClient(pccs.url, ca=pccs.ca_path) as client,
    ):

        async def fetch(fmspc: bytes, ca: CaType) -> str:
            return await client.fetch_bundle(fmspc, ca=ca)

        started = _credentials(platform, first)
        stapler, contexts = _stapler(platform, started, fetch, wall)
        old = contexts.current
        staple, verdict = await _presented(old, _policy(platform), wall)
        assert staple == first.encode()
        assert verdict.tcb_status is TcbStatus.UP_TO_DATE
        with capture_logs() as logs:
            await _fetch_once(stapler)
    assert stapler.issued == 1
    staple, verdict = await _presented(contexts.current, _policy(platform), wall)
    assert staple is not None
    assert json.loads(staple) == json.loads(newer)
    assert verdict.tcb_status is TcbStatus.UP_TO_DATE
    staple, _ = await _presented(old, _policy(platform), wall)
    assert staple == first.encode()  # the old context is untouched (its connections too)
    (stapled,) = [e for e in logs if e["event"] == "collateral_stapled"]
    assert stapled["fmspc"] == SIMULATED_FMSPC.hex().upper()
    crl_asks = [q["ca"] for path, q in behaviour.requests if path.endswith("/pckcrl")]
    assert crl_asks == [["platform"]]
    # Same key and the very same quotes: only the staple changed.
    before = parse_ratls_certificate(started.certificate_der)
    after = parse_ratls_certificate(stapler.credentials.certificate_der)
    assert (after.spki_der, after.quotes) == (before.spki_der, before.quotes)
    assert stapler.credentials.private_key is started.private_key


def _expired(platform: SimulatedPlatform) -> dict[str, Any]:
    bundle: dict[str, Any] = json.loads(platform.collateral(now=NOW - timedelta(days=40)))
    return bundle


@pytest.mark.parametrize(
    ("hostile", "check"),
    [
        ({"tamper_tcb_info": True}, "collateral_signature"),
        ({"expired": True}, "collateral_expired"),
    ],
    ids=["tampered", "expired"],
)
async def test_collateral_that_does_not_verify_is_never_stapled(
    platform: SimulatedPlatform, tmp_path: Path, hostile: dict[str, bool], check: str
) -> None:
    wall = Wall()
    bundle = _expired(platform) if hostile.get("expired") else json.loads(platform.collateral())
    behaviour = PccsBehaviour(bundle=bundle, tamper_tcb_info=hostile.get("tamper_tcb_info", False))
    async with (
        running_pccs(tmp_path, behaviour) as pccs,
        PccsClient(pccs.url, ca=pccs.ca_path) as client,
    ):

        async def fetch(fmspc: bytes, ca: CaType) -> str:
            return await client.fetch_bundle(fmspc, ca=ca)

        stapler, contexts = _stapler(platform, _credentials(platform), fetch, wall)
        with capture_logs() as logs:
            await _fetch_once(stapler)
    assert stapler.cache.held(SIMULATED_FMSPC, "platform") is not None  # fetched, parsed
    refused = [e for e in logs if e["event"] == "collateral_not_stapled"]
    assert [(e["check"], e["log_level"]) for e in refused] == [(check, "error")]
    assert stapler.issued == 0
    assert stapler.stapled is None
    with pytest.raises(PeerVerificationError, match="TCB status unknown"):
        await _presented(contexts.current, _policy(platform), wall)


async def test_collateral_for_another_platform_is_never_stapled(
    platform: SimulatedPlatform, tmp_path: Path
) -> None:
    """A PCCS that has only another platform answers 404 (a failed fetch); a source that
    answers another platform's (genuine, Intel-signed) bundle is refused by FMSPC."""
    wall = Wall()
    behaviour = PccsBehaviour(bundle=dict(REAL))
    async with (
        running_pccs(tmp_path, behaviour) as pccs,
        PccsClient(pccs.url, ca=pccs.ca_path) as client,
    ):

        async def from_pccs(fmspc: bytes, ca: CaType) -> str:
            return await client.fetch_bundle(fmspc, ca=ca)

        stapler, _ = _stapler(platform, _credentials(platform), from_pccs, wall)
        with capture_logs() as logs:
            await _fetch_once(stapler)
    assert stapler.cache.held(SIMULATED_FMSPC, "platform") is None
    assert [e["log_level"] for e in logs if e["event"] == "collateral_fetch_failed"] == ["warning"]
    assert stapler.issued == 0

    async def wrong_platform(fmspc: bytes, ca: CaType) -> str:
        return json.dumps(REAL)

    stapler, contexts = _stapler(platform, _credentials(platform), wrong_platform, wall)
    with capture_logs() as logs:
        await _fetch_once(stapler)
    (refused,) = [e for e in logs if e["event"] == "collateral_not_stapled"]
    assert "this platform is " + SIMULATED_FMSPC.hex().upper() in str(refused["reason"])
    assert stapler.issued == 0
    with pytest.raises(PeerVerificationError, match="TCB status unknown"):
        await _presented(contexts.current, _policy(platform), wall)


def _revoked(platform: SimulatedPlatform, now: datetime) -> str:
    """The platform's collateral, issued ``now``, whose only TCB level is Revoked: genuine
    (signed with the platform's TCB signing key, as its issuer would)."""
    bundle = json.loads(platform.collateral(now=now))
    info = json.loads(bundle["tcb_info"])
    info["tcbLevels"][0]["tcbStatus"] = "Revoked"
    info["tcbEvaluationDataNumber"] += 1  # Intel's next evaluation
    body = json.dumps(info, separators=(",", ":"))
    key = serialization.load_pem_private_key(
        (platform.directory / "sim-tcb-signing.key").read_bytes(), None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    r, s = decode_dss_signature(key.sign(body.encode(), ec.ECDSA(hashes.SHA256())))
    bundle["tcb_info"] = body
    bundle["tcb_info_signature"] = (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()
    return json.dumps(bundle)


async def test_genuine_collateral_that_revokes_the_platform_replaces_a_good_staple(
    platform: SimulatedPlatform,
) -> None:
    """The host cannot keep an older, favourable staple: newer genuine collateral is
    stapled even though its verdict refuses this platform (said at error level)."""
    wall = Wall()
    revoked = _revoked(platform, NOW)

    async def fetch(fmspc: bytes, ca: CaType) -> str:
        return revoked

    good = platform.collateral(now=NOW - timedelta(days=1))
    stapler, contexts = _stapler(platform, _credentials(platform, good), fetch, wall)
    with capture_logs() as logs:
        await _fetch_once(stapler)
    (refused,) = [e for e in logs if e["event"] == "own_tcb_refused"]
    assert (refused["check"], refused["log_level"]) == ("revocation", "error")
    assert stapler.issued == 1
    with pytest.raises(PeerVerificationError) as caught:
        await _presented(contexts.current, _policy(platform), wall)
    assert "revoked" in repr(caught.value.__cause__).lower()


async def test_a_bundle_too_large_to_staple_is_refused_not_fatal(
    platform: SimulatedPlatform,
) -> None:
    """Valid collateral the extension cannot hold (a huge PCK CRL, say): logged, not
    stapled, and the enclave goes on with what it had."""
    wall = Wall()
    padded = platform.collateral(now=NOW) + " " * MAX_STAPLED_COLLATERAL_BYTES

    async def huge(fmspc: bytes, ca: CaType) -> str:
        return padded

    stapler, contexts = _stapler(platform, _credentials(platform), huge, wall)
    with capture_logs() as logs:
        await _fetch_once(stapler)
    (refused,) = [e for e in logs if e["event"] == "collateral_not_stapled"]
    assert refused["check"] == "size"
    assert stapler.issued == 0
    with pytest.raises(PeerVerificationError, match="TCB status unknown"):
        await _presented(contexts.current, _policy(platform), wall)


async def test_an_expired_staple_is_dropped_never_offered(platform: SimulatedPlatform) -> None:
    """The PCCS is down: the staple is kept while current, then the certificate is
    re-issued without one (error level); a verifier then judges without collateral."""
    wall = Wall()

    async def down(fmspc: bytes, ca: CaType) -> Collateral:
        raise PccsError("GET tcb: ConnectError: connection refused")

    stapled = platform.collateral(now=NOW)
    stapler, contexts = _stapler(platform, _credentials(platform, stapled), down, wall)
    wall.now = NOW + timedelta(days=29)
    stapler.consider()
    assert stapler.issued == 0
    staple, verdict = await _presented(contexts.current, _policy(platform), wall)
    assert staple == stapled.encode()
    assert verdict.tcb_status is TcbStatus.UP_TO_DATE
    wall.now = NOW + timedelta(days=31)
    with capture_logs() as logs:
        stapler.consider()
    (expired,) = [e for e in logs if e["event"] == "staple_expired"]
    assert expired["log_level"] == "error"
    assert stapler.issued == 1
    with pytest.raises(PeerVerificationError, match="TCB status unknown"):
        await _presented(contexts.current, _policy(platform), wall)
    assert parse_ratls_certificate(stapler.credentials.certificate_der).stapled_collateral is None


# --- the enclave daemon (serve, in-process) over weeks of virtual time ---------------------

DAY = 86400.0
#: The custodian is away: the link redials rarely, so weeks of virtual time stay cheap.
RARE_REDIALS = LinkTiming(backoff_initial=3600.0, backoff_max=DAY, refused_backoff_max=DAY)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Jump only after a short real idle time: loopback bytes arrive before any deadline.
    return trio.testing.MockClock(autojump_threshold=0.02)


@asynccontextmanager
async def _consumer(
    address: tuple[str, int], policy: Policy, wall: Callable[[], datetime]
) -> AsyncIterator[tuple[FakeConsumer, Collateral, VerifiedEnclave]]:
    """A consumer with no collateral of its own: what the enclave stapled, and its verdict."""
    seen: list[tuple[bytes, VerifiedEnclave]] = []
    verify = make_cached_certificate_verifier(policy, clock=wall, cache=None)

    def record(der: bytes) -> VerifiedEnclave:
        verdict = verify(der)
        seen.append((der, verdict))
        return verdict

    with trio.fail_after(10):
        stream = await open_tls_client(*address, client_context(verifier=record))
    ((der, verdict),) = seen
    staple = parse_ratls_certificate(der).stapled_collateral
    assert staple is not None
    async with open_request_channel(stream, Link.CONSUMER, Side.CLIENT) as channel:
        await channel.hello(role=PeerRole.CONSUMER, software="consumer-without-pccs")
        yield FakeConsumer(channel), Collateral.from_json(staple), verdict


async def test_a_running_enclave_restaples_before_next_update(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """Simulated platform, no PCCS: the platform issues collateral for 30 days. Two months
    on, the enclave still staples current collateral; a consumer that connects after a
    refresh sees the new staple while one connected before keeps working."""
    start = datetime.now(UTC)

    def wall() -> datetime:
        return start + timedelta(seconds=trio.current_time())

    pki = shared_pki()
    platform = SimulatedPlatform.create(tmp_path / "sim", now=start)
    policy = replace(enclave_policy(pki, platform), accept_unknown_tcb_status=False)
    probe = (await trio.open_tcp_listeners(0, host=HOST))[0]
    port = probe.socket.getsockname()[1]
    await probe.aclose()  # no custodian: the consumer port serves model_info all the same
    config = enclave_config(pki, port, tmp_path / "sim", timing=RARE_REDIALS)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(partial(serve, config, wall_clock=wall))
            await trio.sleep(29 * DAY)
            async with _consumer(address, policy, wall) as (old, first, verdict):
                assert verdict.tcb_status is TcbStatus.UP_TO_DATE
                assert first.tcb_info.issue_date < start + timedelta(days=1)
                await old.info()
                await trio.sleep(DAY)  # past the refresh, 12 h before nextUpdate
                async with _consumer(address, policy, wall) as (new, second, verdict):
                    assert verdict.tcb_status is TcbStatus.UP_TO_DATE
                    assert second.tcb_info.issue_date > first.tcb_info.issue_date + timedelta(
                        days=29
                    )
                    await new.info()
                await old.info()  # the old connection, on the old certificate, still works
            await trio.sleep(31 * DAY)  # two nextUpdates since the start
            async with _consumer(address, policy, wall) as (late, third, verdict):
                assert verdict.tcb_status is TcbStatus.UP_TO_DATE
                assert third.tcb_info.issue_date > wall() - timedelta(days=30)
                await late.info()
            nursery.cancel_scope.cancel()
    stapled = [e for e in logs if e["event"] == "collateral_stapled"]
    assert 3 <= len(stapled) <= 4, stapled  # at the start, then before each nextUpdate
    assert not [e for e in logs if e["event"] in ("staple_expired", "collateral_not_stapled")]
