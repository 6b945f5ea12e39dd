"""A small pool of attested connections to one enclave, kept open and replaced when lost.

Theory of operation
-------------------
Each of the pool's ``size`` slots is a task that holds one
:class:`~drm_consumer.client.Client`: it connects (TCP, then the TLS handshake in which
the enclave's RA-TLS attestation is checked against the policy, then ``hello``), offers
the client to requests, and waits until a request finds the connection broken. It then
connects again, attesting again: no connection is ever used that was not attested when
it was made (I8), and a restarted enclave is judged afresh (G06). Failed connects back off
(:data:`BACKOFF_FIRST` doubling to :data:`BACKOFF_MAX`); the last failure is kept, so a
request that finds no live connection can say why (attestation refused, or unreachable).

Each client multiplexes any number of requests (the enclave caps them per connection,
docs/links.md), so a request takes the live client with the fewest requests in flight.

*An idle connection may be dead.* The client reads only while a request waits, so a
connection the enclave closed while idle (it restarted, or it dropped the connection idle
the longest to make room) is noticed only by the next request, and an inference sent on
it may or may not have run. So a connection idle for more than :data:`IDLE_PROBE` seconds
is first asked for the enclave's model info (free, and safe to ask twice); if that fails,
the connection is replaced (re-attested) and the inference goes on the new one. An
inference whose connection fails after it was sent is not retried: it might have been
served and charged.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final

import structlog
import trio

from drm_consumer.client import Client, EnclaveInfo
from drm_consumer.errors import (
    AttestationRefused,
    ConnectionFailed,
    ConsumerError,
    RequestFailed,
)

__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "IDLE_PROBE", "EnclavePool"]

log = structlog.get_logger(__name__)

#: Seconds a connection may sit idle before a request probes it with a model-info request.
IDLE_PROBE: Final = 1.0
#: First pause after a failed connect, doubled per failure up to :data:`BACKOFF_MAX`.
BACKOFF_FIRST: Final = 0.1
BACKOFF_MAX: Final = 5.0

#: Makes one attested connection (``Client.connect`` bound to the address and policy).
Connect = Callable[[], AbstractAsyncContextManager[Client]]


def _connection_ended(exc: ConsumerError) -> bool:
    """Whether the client is finished: lost, or ended by the enclave with a code (a
    connection-level ``busy`` when it has too many connections)."""
    return isinstance(exc, ConnectionFailed) or (
        isinstance(exc, RequestFailed) and exc.request_id is None
    )


class _Slot:
    __slots__ = ("broken", "client", "in_flight", "last_used")

    def __init__(self) -> None:
        self.client: Client | None = None
        self.broken = trio.Event()
        self.in_flight = 0
        self.last_used = -math.inf


class EnclavePool:
    """Attested connections to one enclave; run :meth:`run` in a nursery, then
    :meth:`client` per request.

    Args:
        connect: makes one attested connection.
        size: connections kept open.
        on_attested: called with the client each time a connection was attested.
        on_connect_failed: called with the error each time a connect failed.
    """

    def __init__(
        self,
        connect: Connect,
        *,
        size: int = 2,
        on_attested: Callable[[Client], object] = lambda _client: None,
        on_connect_failed: Callable[[ConsumerError], object] = lambda _error: None,
    ) -> None:
        if not 1 <= size <= 64:
            raise ValueError("the pool holds 1 to 64 connections")
        self._connect = connect
        self._slots = [_Slot() for _ in range(size)]
        self._changed = trio.Event()
        self._on_attested = on_attested
        self._on_connect_failed = on_connect_failed
        #: The last connect failure, or ``None`` once a connection is up.
        self.last_error: ConsumerError | None = None

    @property
    def live(self) -> int:
        """Connections open and attested now."""
        return sum(1 for slot in self._slots if slot.client is not None)

    async def run(self) -> None:
        """Keep every slot connected until cancelled."""
        async with trio.open_nursery() as nursery:
            for index, slot in enumerate(self._slots):
                nursery.start_soon(self._keep, index, slot)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _keep(self, index: int, slot: _Slot) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                async with self._connect() as client:
                    slot.broken = trio.Event()
                    slot.client, slot.last_used = client, trio.current_time()
                    self.last_error = None
                    backoff = BACKOFF_FIRST
                    self._on_attested(client)
                    self._notify()
                    try:
                        await slot.broken.wait()
                    finally:
                        slot.client = None
                log.info("gateway_connection_replaced", slot=index)
                continue
            except Exception as exc:  # a connect's failure, whatever raised it
                if not isinstance(exc, ConsumerError):
                    log.exception("gateway_connect_error", slot=index)
                    exc = ConnectionFailed(f"connecting to the enclave failed: {exc}")
                self.last_error = exc
                self._on_connect_failed(exc)
                log.warning(
                    "gateway_connect_failed",
                    slot=index,
                    error=type(exc).__name__,
                    detail=str(exc),
                    retry_in=backoff,
                )
                self._notify()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _pick(self) -> _Slot | None:
        live = [slot for slot in self._slots if slot.client is not None]
        return min(live, key=lambda slot: slot.in_flight) if live else None

    async def _wait_live(self, within: float) -> _Slot:
        """A live slot; waits at most ``within`` for one to come up."""
        with trio.move_on_after(within):
            while True:
                slot = self._pick()
                if slot is not None:
                    return slot
                if isinstance(self.last_error, AttestationRefused):
                    raise self.last_error
                await self._changed.wait()
        if self.last_error is not None:
            raise self.last_error
        raise ConnectionFailed(f"no attested connection to the enclave within {within:g} s")

    @asynccontextmanager
    async def client(self, *, within: float, probe: bool = True) -> AsyncIterator[Client]:
        """A live attested client for one request.

        A :class:`ConnectionFailed` raised inside the block, or an error that ended the
        whole connection, marks the connection broken (its slot reconnects). With
        ``probe``, a connection idle past :data:`IDLE_PROBE` is checked first, and replaced
        once if it is dead.

        Raises:
            AttestationRefused: the last connect was refused, and none is live.
            ConnectionFailed: no live connection within ``within``.
        """
        slot = await self._wait_live(within)
        if probe and trio.current_time() - slot.last_used > IDLE_PROBE:
            slot = await self._probed(slot, within)
        client = slot.client
        assert client is not None
        slot.in_flight += 1
        try:
            yield client
        except ConsumerError as exc:
            if _connection_ended(exc):
                self._break(slot, client)
            raise
        finally:
            slot.in_flight -= 1
            slot.last_used = trio.current_time()

    async def _probed(self, slot: _Slot, within: float) -> _Slot:
        client = slot.client
        assert client is not None
        try:
            await client.info()
        except ConsumerError as exc:
            if _connection_ended(exc):
                log.info("gateway_idle_connection_dead", error=type(exc).__name__)
                self._break(slot, client)
                return await self._wait_live(within)
            # else the enclave answered: the connection is alive
        slot.last_used = trio.current_time()
        return slot

    def _break(self, slot: _Slot, client: Client) -> None:
        if slot.client is client:
            slot.client = None
            slot.broken.set()

    async def info(self, *, within: float) -> EnclaveInfo:
        """The enclave's model info over a live connection (safe to retry: it costs
        nothing), replacing a dead connection once."""
        for attempt in range(2):
            try:
                async with self.client(within=within, probe=False) as client:
                    return await client.info()
            except ConnectionFailed:
                if attempt:
                    raise
        raise AssertionError("unreachable")
