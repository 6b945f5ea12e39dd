"""The enclave's redial schedule: it grows with every session that did not serve.

The schedule itself (:class:`Backoff`) is checked over a simulated hour; then the real
enclave daemon (``drm_enclave.serve.serve``, in-process) dials a custodian on loopback,
with real RA-TLS, that refuses it in each way it can, on trio's :class:`MockClock`, and
the test counts the connections the custodian gets in a fixed window of (virtual) time.
The clock jumps only after a short real idle time (``autojump_threshold``), so that the
loopback sockets' bytes always arrive before a timeout could fire.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from drm_enclave.custodian_link import Backoff, LinkTiming, Outcome
from drm_enclave.identity import EnclaveIdentity, simulated_measurement
from drm_enclave.runtime import EnclaveRuntime
from drm_enclave.serve import serve
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_cache import CollateralCache
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.pccs import CaType
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.ratls_cert import build_ratls_certificate
from drm_wire.errors import ErrorCode
from drm_wire.messages import Error, Unblock
from drm_wire.net.channel import open_channel
from drm_wire.net.ratls_context import custodian_server_context
from drm_wire.net.tls import accept_tls
from drm_wire.protocol import Link, Side
from tests.enclave.enclave_fakes import (
    HOST,
    enclave_config,
    enclave_policy,
    shared_pki,
)

#: The defaults: 0.1 s first, 5 s cap for what retrying may fix, 60 s after a refusal.
TIMING = LinkTiming()
#: The window the tests count connections in (virtual seconds).
WINDOW = 600.0


def _attempts_in(window: float, outcome: Outcome, timing: LinkTiming = TIMING) -> int:
    backoff, elapsed, attempts = Backoff(timing), 0.0, 0
    while elapsed < window:
        attempts += 1
        elapsed += backoff.next_delay(outcome)
    return attempts


def test_the_schedule_grows_to_its_caps_and_resets_only_after_serving() -> None:
    backoff = Backoff(TIMING)
    delays = [backoff.next_delay(Outcome.REFUSED) for _ in range(12)]
    ceilings = [min(60.0, 0.1 * 2**n) for n in range(1, 13)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    ramp = delays[:9]  # below the cap each ceiling is twice the last: it never shrinks
    assert ramp == sorted(ramp)
    assert backoff.failures == 12
    assert 30.0 <= backoff.next_delay(Outcome.FAILED) <= 60.0 or backoff.failures == 13
    assert backoff.next_delay(Outcome.FAILED) <= 5.0  # what retrying may fix: capped soon
    assert backoff.next_delay(Outcome.SERVED) <= 0.1
    assert backoff.failures == 0
    # An hour of refusals: the ramp, then one dial every 30-60 s.
    assert 60 <= _attempts_in(3600.0, Outcome.REFUSED) <= 60 + 12 + 3600 / 30
    # An hour of a custodian that is down: one dial every 2.5-5 s.
    assert 720 <= _attempts_in(3600.0, Outcome.FAILED) <= 6 + 3600 / 2.5


def test_attestation_refusals_are_redialled_soon_a_few_times_in_a_row() -> None:
    """Even after an hour of a custodian that was down (the delay at its cap), the first
    attestation refusals are redialled within ``soon_delay``; then the delay grows."""
    backoff = Backoff(TIMING)
    for _ in range(720):
        backoff.next_delay(Outcome.FAILED)
    soon = [backoff.next_delay(Outcome.ATTESTATION_REFUSED) for _ in range(TIMING.soon_retries)]
    assert all(TIMING.soon_delay / 2 <= d <= TIMING.soon_delay for d in soon), soon
    assert 30.0 <= backoff.next_delay(Outcome.ATTESTATION_REFUSED) <= 60.0
    assert 30.0 <= backoff.next_delay(Outcome.ATTESTATION_REFUSED) <= 60.0
    # Another outcome ends the run of refusals: the next refusal is redialled soon again.
    backoff.next_delay(Outcome.FAILED)
    assert backoff.next_delay(Outcome.ATTESTATION_REFUSED) <= TIMING.soon_delay
    # A refusal after the hello (license in use...) never counts as one.
    assert 30.0 <= backoff.next_delay(Outcome.REFUSED) <= 60.0
    assert 30.0 <= backoff.next_delay(Outcome.ATTESTATION_REFUSED) <= 60.0 or backoff.soon
    # A lasting refusal costs the custodian those few dials once, then the trickle.
    assert _attempts_in(3600.0, Outcome.ATTESTATION_REFUSED) <= (
        TIMING.soon_retries + 60 + 12 + 3600 / 30
    )


# --- the real enclave, a refusing custodian, a window of virtual time ---------------------


Refuse = Callable[[trio.SocketStream, trio.abc.Stream], Awaitable[None]]


async def _count_connections(
    tmp_path: Path,
    refuse: Callable[[Policy], Refuse],
    *,
    policy_for_custodian: Callable[[Policy], Policy] = lambda policy: policy,
    window: float = WINDOW,
) -> tuple[int, list[MutableMapping[str, Any]]]:
    """Run the enclave for ``window`` virtual seconds against ``refuse``; count dials."""
    pki = shared_pki()
    platform = SimulatedPlatform.create(tmp_path / "sim")
    policy = enclave_policy(pki, platform)
    handler = refuse(policy)
    custodian_policy = policy_for_custodian(policy)
    context = custodian_server_context(pki.server_cert, pki.server_key, custodian_policy)
    connections = 0

    async def accept(transport: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        try:
            stream = await accept_tls(transport, context)
        except Exception:
            return  # the policy refused it in the handshake: the alert is sent
        await handler(transport, stream)

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host=HOST)
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, accept, listeners)
            config = enclave_config(pki, port, tmp_path / "sim", timing=TIMING)
            await nursery.start(functools.partial(serve, config, runtime=EnclaveRuntime()))
            await trio.sleep(window)
            nursery.cancel_scope.cancel()
    return connections, [e for e in logs if e["event"] in ("custodian_refused", "custodian_redial")]


def _error_after_hello(code: ErrorCode, message: str) -> Callable[[Policy], Refuse]:
    def make(_: Policy) -> Refuse:
        async def refuse(transport: trio.SocketStream, stream: trio.abc.Stream) -> None:
            async with open_channel(stream, Link.CUSTODIAN, Side.SERVER) as channel:
                await channel.accept_hello(software="refusing-custodian")
                await channel.send(Error(code=code, message=message))

        return refuse

    return make


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.02)


#: The ramp to the cap (0.2 + 0.4 + ... + 51.2 at most) and then one dial per 30-60 s.
MOST_REFUSED: int = 10 + int(WINDOW / 30) + 1


async def test_license_in_use_costs_the_custodian_a_trickle(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """The refusal comes after the hello (the link was up): it still grows the delay."""
    dials, logs = await _count_connections(
        tmp_path, _error_after_hello(ErrorCode.DUPLICATE_INSTANCE, "another instance holds it")
    )
    assert 8 <= dials <= MOST_REFUSED, dials
    refused = [e for e in logs if e["event"] == "custodian_refused"]
    assert dials - 1 <= len(refused) <= dials
    assert {e["log_level"] for e in refused} == {"error"}
    assert {e["reason"] for e in refused} == {"license_in_use"}
    assert str(refused[0]["fix"]).startswith(
        "the license's live enclave instances are at its cap (one, unless the owner set "
        "max_instances): stop one, or ask the owner to raise the cap (the custodian said: "
        "another instance holds it)"
    )
    assert max(float(str(e["retry_in"])) for e in refused) >= 30.0


async def test_a_policy_refusal_says_so_and_costs_a_trickle(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """The custodian's policy refuses the enclave inside the handshake (a TLS alert)."""
    other_build = functools.partial(dataclasses.replace, mr_enclave=(b"\x01" * 32,))
    dials, logs = await _count_connections(
        tmp_path, _error_after_hello(ErrorCode.INTERNAL, "unused"), policy_for_custodian=other_build
    )
    assert 8 <= dials <= MOST_REFUSED + TIMING.soon_retries, dials
    refused = [e for e in logs if e["event"] == "custodian_refused"]
    assert dials - 1 <= len(refused) <= dials
    assert {e["reason"] for e in refused} == {"attestation_refused"}
    # The first few are redialled soon (the custodian may be fetching collateral)...
    soon = refused[: TIMING.soon_retries]
    assert [e["retry_soon"] for e in soon] == [True] * TIMING.soon_retries
    assert {e["log_level"] for e in soon} == {"warning"}
    # ... then the delay grows as after any refusal, at error level.
    later = refused[TIMING.soon_retries :]
    assert {e["log_level"] for e in later} == {"error"}
    assert not any(e["retry_soon"] for e in later)
    assert max(float(str(e["retry_in"])) for e in later) >= 30.0
    assert str(refused[0]["fix"]).startswith(
        "the custodian's policy refused this enclave's attestation (TLS alert: "
    )


async def test_a_busy_custodian_is_retried_soon_but_not_in_a_storm(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """``busy`` is retryable by design: the delay grows to ``backoff_max`` only."""
    window = 120.0
    dials, logs = await _count_connections(
        tmp_path, _error_after_hello(ErrorCode.BUSY, "too many enclaves"), window=window
    )
    assert window / 5 <= dials <= 6 + window / 2.5, dials
    assert not [e for e in logs if e["event"] == "custodian_refused"]


async def test_a_session_that_serves_resets_the_delay(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """A custodian that unblocks (the serving state), then drops the link: redial soon."""

    def make(_: Policy) -> Refuse:
        async def serve_then_drop(transport: trio.SocketStream, stream: trio.abc.Stream) -> None:
            async with open_channel(stream, Link.CUSTODIAN, Side.SERVER) as channel:
                await channel.accept_hello(software="flaky-custodian")
                await channel.send(Unblock())
                await trio.sleep(1.0)  # serving, heartbeats and all, then the link goes

        return serve_then_drop

    window = 30.0
    dials, logs = await _count_connections(tmp_path, make, window=window)
    redials = [e for e in logs if e["event"] == "custodian_redial"]
    assert dials - 1 <= len(redials) <= dials  # the last session may be under way
    assert {e["failures"] for e in redials} == {0}
    assert dials >= window / 1.2


async def test_a_custodian_still_fetching_collateral_is_redialled_within_seconds(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    """The custodian was down for ten minutes (the enclave's delay at its cap); it comes
    back with an empty collateral cache and a policy that needs a TCB status. Its first
    handshake is refused (no collateral yet: a TLS alert, no error code) while the cache
    fetches this platform's collateral; the enclave redials within seconds, not at the
    refusal cap, and is accepted."""
    pki = shared_pki()
    platform = SimulatedPlatform.create(tmp_path / "sim")
    policy = dataclasses.replace(enclave_policy(pki, platform), accept_unknown_tcb_status=False)

    async def fetch(fmspc: bytes, ca: CaType) -> Collateral:
        await trio.sleep(0.5)  # the PCCS takes its time
        return Collateral.from_json(platform.collateral())

    cache = CollateralCache(fetch)
    context = custodian_server_context(pki.server_cert, pki.server_key, policy, collateral=cache)
    refused: list[float] = []
    linked = trio.Event()

    async def accept(transport: trio.SocketStream) -> None:
        try:
            stream = await accept_tls(transport, context)
            async with open_channel(stream, Link.CUSTODIAN, Side.SERVER) as channel:
                await channel.accept_hello(software="custodian-fetching-collateral")
                linked.set()
                await channel.send(Unblock())
                await trio.sleep_forever()
        except Exception:
            refused.append(trio.current_time())

    probe = (await trio.open_tcp_listeners(0, host=HOST))[0]
    port = probe.socket.getsockname()[1]
    await probe.aclose()  # nobody listens there yet: the enclave's dials fail
    measurement = simulated_measurement(pki.ca_pem)
    provider = platform.quote_provider(
        mr_enclave=measurement.mr_enclave, mr_signer=measurement.mr_signer
    )
    unstapled = EnclaveIdentity(  # an enclave that staples nothing
        build_ratls_certificate(provider), measurement.mr_enclave, simulated=True
    )
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            config = enclave_config(pki, port, tmp_path / "sim", timing=TIMING)
            await nursery.start(
                functools.partial(serve, config, runtime=EnclaveRuntime(), identity=unstapled)
            )
            await trio.sleep(600.0)
            await nursery.start(cache.run)
            listeners = await trio.open_tcp_listeners(port, host=HOST)
            back = trio.current_time()
            nursery.start_soon(trio.serve_listeners, accept, listeners)
            with trio.fail_after(TIMING.backoff_max + TIMING.soon_delay + 2.0):
                await linked.wait()
            nursery.cancel_scope.cancel()
    assert len(refused) == 1
    assert refused[0] - back <= TIMING.backoff_max + 0.5
    (refusal,) = [e for e in logs if e["event"] == "custodian_refused"]
    assert refusal["retry_soon"] is True
    assert refusal["log_level"] == "warning"
    assert float(str(refusal["retry_in"])) <= TIMING.soon_delay
