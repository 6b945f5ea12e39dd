"""Blocking clients for scripts and long-running programs: :func:`query` and :func:`connect`.

:func:`query` is one call, one connection: ``trio.run`` inside, connect, verify the
enclave, one inference, close. A program making many calls uses :func:`connect`::

    with drm_consumer.connect(host, port, policy=policy) as enclave:
        for x in batches:
            outcome = enclave.infer("model", {"x": x})

Theory of operation
-------------------
:class:`SyncClient` runs one trio event loop on a thread of its own for its whole life,
and each blocking call is sent to that loop with ``trio.from_thread.run`` (the loop's
portal) and waits for the answer. A thread of our own rather than a ``trio.run`` per call:
the attested connection is a trio stream, which lives in one loop, so keeping it across
calls means keeping the loop; and the caller's program is not a trio program, so its
threads have no loop to lend.

*One attested connection.* A holder task owns the :class:`~drm_consumer.client.Client`
(its ``async with`` block) and keeps a task reading it, so that an enclave closing it
while it is idle (a restart, a ``busy`` eviction) is noticed at once: the holder then
lets it go and the next call connects again, with the full attestation check against
the same policy (re-attested; :attr:`SyncClient.connections` counts the handshakes).

*Several threads.* Every call is its own task in the loop, and the tasks share the one
connection: the request channel gives each request an id and matches replies to ids, so
calls from several threads are multiplexed on it, in flight together rather than in turn
behind a lock (an inference waiting for quota does not hold up another thread's
:meth:`~SyncClient.models`). Reconnecting is done by one task at a time, under a trio
lock; the calls that find the connection gone meanwhile wait for it and share it.

*Losing the connection.* A call in flight when the connection is lost raises
:class:`~drm_consumer.errors.ConnectionFailed`: an inference may or may not have run, and
it costs the borrower, so it is never sent again here. :meth:`~SyncClient.models` and
:meth:`~SyncClient.info` cost nothing: when the connection they were sent on has ended
they are asked once more on a new one.

*Closing.* :meth:`SyncClient.close` (or leaving the ``with`` block) cancels the calls
still waiting (each raises ``ConnectionFailed``), closes the connection (gracefully,
within :data:`CLOSE_TIMEOUT`), ends the loop and joins its thread. Every later call raises
``ConnectionFailed``. Errors are those of :mod:`drm_consumer.errors` throughout.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from contextlib import suppress
from types import TracebackType
from typing import Final, TypeVar, final

import trio

from drm_consumer.client import (
    CONNECT_TIMEOUT,
    DEFAULT_PORT,
    Client,
    EnclaveInfo,
    InferenceOutcome,
    Inputs,
)
from drm_consumer.errors import ConnectionFailed
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_source import CollateralSource
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.messages import ModelDescription
from drm_wire.net.address import format_address

__all__ = ["CLOSE_TIMEOUT", "SyncClient", "connect", "query"]

#: Bounds the graceful close of the connection, and then the join of the loop's thread.
CLOSE_TIMEOUT: Final = 10.0

_T = TypeVar("_T")


def query(
    host: str,
    port: int = DEFAULT_PORT,
    *,
    policy: Policy,
    model: str,
    inputs: Inputs,
    wait: float | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> InferenceOutcome:
    """Connect to the enclave, verify it, run one inference and disconnect.

    Not for use inside a running trio (or asyncio) event loop: use :class:`Client` there.
    For many calls use :func:`connect`, which verifies the enclave once.

    Args:
        host, port, policy, connect_timeout: as for :meth:`Client.connect`.
        model, inputs, wait: as for :meth:`Client.infer`.

    Raises:
        ConsumerError: the subclasses :meth:`Client.connect` and :meth:`Client.infer`
            raise.
    """

    async def run() -> InferenceOutcome:
        async with Client.connect(
            host, port, policy=policy, connect_timeout=connect_timeout
        ) as client:
            return await client.infer(model, inputs, wait=wait)

    return trio.run(run)


def connect(
    host: str,
    port: int = DEFAULT_PORT,
    *,
    policy: Policy,
    connect_timeout: float = CONNECT_TIMEOUT,
    collateral: Collateral | CollateralSource | None = None,
) -> SyncClient:
    """Start a :class:`SyncClient` and make its first attested connection.

    Use it as a context manager (``with connect(...) as enclave:``), or call
    :meth:`SyncClient.close`. Not for use inside a running event loop.

    Args:
        host, port, policy, connect_timeout, collateral: as for :meth:`Client.connect`;
            every reconnection uses them again.

    Raises:
        AttestationRefused: the enclave did not satisfy ``policy``; nothing was sent.
        ConnectionFailed: TCP, TLS or the hello failed or timed out.
    """
    client = SyncClient(
        host, port, policy=policy, connect_timeout=connect_timeout, collateral=collateral
    )
    try:
        client._start()
    except BaseException:
        client.close()
        raise
    return client


@final
class SyncClient:
    """A blocking client over one attested connection, kept (and remade) across calls.

    Make one with :func:`connect`. Its methods may be called from any number of threads
    at once (not from the client's own callbacks); see the module docstring.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        policy: Policy,
        connect_timeout: float,
        collateral: Collateral | CollateralSource | None,
    ) -> None:
        """Internal: use :func:`connect`."""
        self._host, self._port = host, port
        self._address = format_address(host, port)
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._collateral = collateral
        self._state_lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(
            target=self._thread_main, name=f"drm-consumer {self._address}", daemon=True
        )
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._crash: BaseException | None = None
        # Owned by the loop's thread from here on.
        self._client: Client | None = None
        self._attestation: VerifiedEnclave | None = None
        self._connections = 0
        self._calls: set[trio.CancelScope] = set()
        self._stopping: trio.Event
        self._connect_lock: trio.Lock
        self._nursery: trio.Nursery

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        return f"<SyncClient {self._address} {state} connections={self._connections}>"

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- the caller's side ------------------------------------------------------------

    @property
    def attestation(self) -> VerifiedEnclave:
        """The enclave's verified identity, from the latest handshake."""
        assert self._attestation is not None, "connect() made the first connection"
        return self._attestation

    @property
    def connections(self) -> int:
        """How many attested connections were made (the first, and each reconnection)."""
        return self._connections

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        wait: float | None = None,
        on_waiting: Callable[[int], object] | None = None,
    ) -> InferenceOutcome:
        """Run ``model`` on ``inputs``; as :meth:`Client.infer`, blocking.

        ``on_waiting`` runs in the client's own thread: it must not block, nor call this
        client.

        Raises:
            ConnectionFailed: the connection was lost while the request was in flight (it
                may or may not have been served; it is not sent again), a reconnection
                failed, or the client was closed.
            AttestationRefused: a reconnection found an enclave the policy refuses.
            RequestFailed: the enclave's answer (its subclasses, as for ``Client.infer``).
        """

        async def operation(client: Client) -> InferenceOutcome:
            return await client.infer(model, inputs, wait=wait, on_waiting=on_waiting)

        return self._run(operation, again=False)

    def info(self) -> EnclaveInfo:
        """The models served, the enclave's state and the inferences left.

        Raises:
            ConnectionFailed, AttestationRefused, RequestFailed: as for :meth:`infer`;
                asked once more on a new connection if the one it used had ended.
        """

        async def operation(client: Client) -> EnclaveInfo:
            return await client.info()

        return self._run(operation, again=True)

    def models(self) -> dict[str, ModelDescription]:
        """Model name -> its description (inputs, outputs, lending terms); see :meth:`info`."""
        return self.info().models

    def close(self) -> None:
        """Cancel the calls still waiting, close the connection, stop and join the thread.

        Idempotent; safe from any thread but the client's own.

        Raises:
            ConnectionFailed: the thread did not end within :data:`CLOSE_TIMEOUT` of the
                connection's close (it is a daemon thread: it does not keep the process).
        """
        with self._state_lock:
            if self._closing:
                already = True
            else:
                already, self._closing = False, True
        token = self._token
        if not already and token is not None:
            with suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop, trio_token=token)
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(2 * CLOSE_TIMEOUT)
            if self._thread.is_alive():
                raise ConnectionFailed(f"the client of {self._address} did not stop")

    def _start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._token is None:
            raise ConnectionFailed(f"the client of {self._address} could not start") from (
                self._crash
            )

        async def first(client: Client) -> None:
            return None

        self._run(first, again=False)

    def _run(self, operation: Callable[[Client], Awaitable[_T]], *, again: bool) -> _T:
        token = self._token
        if self._closing or token is None:
            raise ConnectionFailed(f"the client of {self._address} is closed")
        try:
            return trio.from_thread.run(self._call, operation, again, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled) as exc:
            raise ConnectionFailed(f"the client of {self._address} is closed") from exc

    def _thread_main(self) -> None:
        try:
            trio.run(self._loop)
        except BaseException as exc:  # noqa: BLE001 - reported to the callers, as closed
            self._crash = exc
        finally:
            self._ready.set()

    # --- the loop's side ----------------------------------------------------------------

    async def _loop(self) -> None:
        self._stopping = trio.Event()
        self._connect_lock = trio.Lock()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stopping.wait()
            for scope in self._calls:
                scope.cancel()
            # The holder sees _stopping too and closes gracefully; bound it.
            nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT

    def _stop(self) -> None:
        self._stopping.set()

    async def _call(self, operation: Callable[[Client], Awaitable[_T]], again: bool) -> _T:
        """Run ``operation`` on the connection (made first if needed), as a cancellable
        call that :meth:`close` ends with ``ConnectionFailed``."""
        with trio.CancelScope() as scope:
            self._calls.add(scope)
            try:
                if self._stopping.is_set():
                    scope.cancel()
                    await trio.lowlevel.checkpoint()
                client = await self._connection()
                try:
                    return await operation(client)
                except ConnectionFailed:
                    if not again or not client.closed:
                        raise
                return await operation(await self._connection())
            finally:
                self._calls.discard(scope)
        raise ConnectionFailed(f"the client of {self._address} was closed")

    async def _connection(self) -> Client:
        """The open connection, or a new one (attested) if it has ended."""
        async with self._connect_lock:
            client = self._client
            if client is None or client.closed:
                client = await self._nursery.start(self._hold)
            return client

    async def _hold(self, *, task_status: trio.TaskStatus[Client]) -> None:
        """Own one connection until it ends or the client stops."""
        connected: Client | None = None
        try:
            async with Client.connect(
                self._host,
                self._port,
                policy=self._policy,
                connect_timeout=self._connect_timeout,
                collateral=self._collateral,
                read_in_background=True,
            ) as client:
                connected = self._client = client
                self._attestation = client.attestation
                self._connections += 1
                task_status.started(client)
                async with trio.open_nursery() as watch:
                    watch.start_soon(_cancel_after, client.wait_closed, watch.cancel_scope)
                    watch.start_soon(_cancel_after, self._stopping.wait, watch.cancel_scope)
        except Exception:
            if connected is None:
                raise  # to the caller of start(): the connection could not be made
            # Ended while closing a connection already lost: nothing more to tell.
        finally:
            if connected is not None and self._client is connected:
                self._client = None


async def _cancel_after(event: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await event()
    scope.cancel()
