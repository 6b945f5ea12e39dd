"""The PCCS-backed collateral cache: fetch on first sight, refresh before nextUpdate, keep
serving while the service is down, fail closed once expired. Time: trio's autojump clock
drives the waits, and the wall clock the validity checks read is derived from it."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from drm_lab.pccs import PccsBehaviour, running_pccs
from drm_wire.attestation.collateral import Collateral, TcbStatus
from drm_wire.attestation.collateral_cache import REFRESH_MARGIN, CollateralCache
from drm_wire.attestation.errors import CollateralExpiredError
from drm_wire.attestation.pccs import CaType, PccsClient, PccsError
from drm_wire.attestation.verify import verify_quote

from .dcap_helpers import FMSPC, REAL_NOW, SIM_NOW, TestPki, real_quote
from .test_pccs import REAL

PKI = TestPki()
QUOTE = PKI.quote()
START = SIM_NOW - timedelta(days=4)  # the test PKI's CRLs are current SIM_NOW-10d..+20d
VALIDITY = timedelta(days=2)


class Service:
    """What the cache fetches from: collateral issued at the current wall time."""

    def __init__(self) -> None:
        self.up = True
        self.fetches: list[tuple[bytes, str, datetime]] = []

    def wall(self) -> datetime:
        return START + timedelta(seconds=trio.current_time())

    async def fetch(self, fmspc: bytes, ca: CaType) -> Collateral:
        await trio.sleep(0.1)  # a request takes time
        if not self.up:
            raise PccsError("GET tcb: ConnectError: connection refused")
        now = self.wall()
        self.fetches.append((fmspc, ca, now))
        text = PKI.collateral(issue=now - timedelta(minutes=1), next_update=now + VALIDITY)
        return Collateral.from_json(text)


def _status(cache: CollateralCache, now: datetime) -> TcbStatus | None:
    return verify_quote(QUOTE, trust=PKI.trust(), collateral=cache, now=now).tcb_status


async def test_first_sight_then_refresh_before_next_update(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    cache = CollateralCache(service.fetch, clock=service.wall)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        # The first handshake has nothing: judged without collateral, the FMSPC is noted.
        assert _status(cache, service.wall()) is None
        assert cache.platforms() == [FMSPC]
        await trio.sleep(1)
        assert _status(cache, service.wall()) is TcbStatus.UP_TO_DATE
        assert [(f, ca) for f, ca, _ in service.fetches] == [
            (FMSPC, "processor"), (FMSPC, "platform"),
        ]  # fmt: skip
        # Six days on, across three nextUpdates, it was refreshed before each.
        for _ in range(6 * 24):
            await trio.sleep(3600)
            assert _status(cache, service.wall()) is TcbStatus.UP_TO_DATE
        refreshes = len(service.fetches) // 2
        assert 4 <= refreshes <= 6
        age = cache.age(FMSPC)
        assert age is not None
        assert age < (VALIDITY - REFRESH_MARGIN).total_seconds() + 3600
        nursery.cancel_scope.cancel()


async def test_down_service_serves_what_it_has_then_fails_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    cache = CollateralCache(service.fetch, clock=service.wall)
    cache.want(FMSPC)  # known in advance: fetched before any handshake
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        await trio.sleep(1)
        assert _status(cache, service.wall()) is TcbStatus.UP_TO_DATE
        service.up = False
        with capture_logs() as logs:
            await trio.sleep((VALIDITY - timedelta(hours=1)).total_seconds())
            # Refresh failed (and is retried), but what is held is still current.
            assert _status(cache, service.wall()) is TcbStatus.UP_TO_DATE
        failures = [e for e in logs if e["event"] == "collateral_fetch_failed"]
        assert failures
        assert all(e["log_level"] == "warning" for e in failures)
        assert failures[-1]["serving_age_seconds"] > 0
        await trio.sleep(2 * 3600)  # past nextUpdate: fail closed
        with pytest.raises(CollateralExpiredError):
            _status(cache, service.wall())
        service.up = True  # back: the next retry fetches, and handshakes pass again
        await trio.sleep(RETRY_CEILING)
        assert _status(cache, service.wall()) is TcbStatus.UP_TO_DATE
        nursery.cancel_scope.cancel()


RETRY_CEILING = 700.0


async def test_the_cache_over_a_real_pccs(tmp_path: Path) -> None:
    """Intel's sample quote: its PCK is the Processor CA's, so only that CRL is fetched."""
    behaviour = PccsBehaviour(bundle=dict(REAL))
    async with (
        running_pccs(tmp_path, behaviour) as pccs,
        PccsClient(pccs.url, ca=pccs.ca_path) as client,
    ):

        async def fetch(fmspc: bytes, ca: CaType) -> Collateral:
            return await client.fetch(fmspc, ca=ca)

        cache = CollateralCache(fetch, clock=lambda: REAL_NOW)
        real_fmspc = bytes.fromhex("00A067110000")
        assert verify_quote(real_quote(), collateral=cache, now=REAL_NOW).tcb_status is None
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            with trio.fail_after(10):
                await cache.wait_for(real_fmspc)
            nursery.cancel_scope.cancel()
    verified = verify_quote(real_quote(), collateral=cache, now=REAL_NOW)
    assert verified.tcb_status is TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED
    crls = [q["ca"] for path, q in behaviour.requests if path.endswith("/pckcrl")]
    assert crls == [["processor"]]
    assert list(cache.ages()) == [(real_fmspc, "processor")]


async def test_only_the_pck_ca_a_verifier_names_is_fetched(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service()
    cache = CollateralCache(service.fetch, clock=service.wall)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        assert cache.candidates(FMSPC, "platform") == []
        await trio.sleep(1)
        assert [(f, ca) for f, ca, _ in service.fetches] == [(FMSPC, "platform")]
        assert len(cache.candidates(FMSPC, "platform")) == 1
        assert len(cache.candidates(FMSPC)) == 1  # no CA named: whatever is held
        # A quote from the other CA of the same platform: noted, fetched, kept apart.
        assert cache.candidates(FMSPC, "processor") == []
        await trio.sleep(1)
        assert [(f, ca) for f, ca, _ in service.fetches] == [
            (FMSPC, "platform"), (FMSPC, "processor"),
        ]  # fmt: skip
        assert len(cache.candidates(FMSPC, "processor")) == 1
        assert sorted(ca for _, ca in cache.ages()) == ["platform", "processor"]
        nursery.cancel_scope.cancel()
