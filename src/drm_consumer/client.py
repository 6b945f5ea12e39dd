"""The consumer's async client: attest the enclave in the handshake, then ask it things.

Theory of operation
-------------------
:meth:`Client.connect` is an async context manager. It opens TCP, runs the TLS 1.3
handshake with :func:`~drm_wire.net.ratls_context.consumer_client_context`, whose verify
callback checks the enclave's RA-TLS certificate against the caller's :class:`Policy`: an
enclave that does not satisfy it fails the handshake, so not one byte of the caller's data
is ever written to it (:class:`~drm_consumer.errors.AttestationRefused`). Only then does it
open a :class:`~drm_wire.net.request_channel.RequestChannel` for the ``async with`` block
and exchange ``hello`` / ``welcome`` as a consumer. The channel reads on demand: the task
waiting for a reply reads the connection itself (one task at a time), as the enclave
speaks only to answer; this spares each reply a hand-over between tasks.

Each :meth:`Client.infer` and :meth:`Client.info` is one request with its own id on that
channel; the channel matches replies to requests, so any number of tasks may call them at
once on one client. A request that is cancelled (say by the caller's ``fail_after``) is
forgotten; its reply is dropped when it comes. A lost connection fails every request in
flight, and every later one, with :class:`~drm_consumer.errors.ConnectionFailed`.

There is no deadline on a request here: an inference may be parked by the enclave for as
long as its ``wait`` allows, and the enclave says so with ``waiting`` messages (the
``on_waiting`` callback). Bound the whole call with ``trio.fail_after`` if you need to.

Every foreign exception becomes a :mod:`drm_consumer.errors` class in one place,
:func:`~drm_consumer.errors.map_errors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, final

import numpy as np
import trio

from drm_consumer.errors import map_errors
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_source import CollateralSource
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.limits import HANDSHAKE_TIMEOUT
from drm_wire.messages import (
    EnclaveState,
    InferenceRequest,
    ModelDescription,
    ModelInfoRequest,
    PeerRole,
    Waiting,
)
from drm_wire.net.address import format_address
from drm_wire.net.ratls_context import consumer_client_context
from drm_wire.net.request_channel import RequestChannel, open_request_channel
from drm_wire.net.tls import open_tls_client
from drm_wire.protocol import Link, Side
from drm_wire.tensors import Tensor

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "Client",
    "EnclaveInfo",
    "InferenceOutcome",
    "Inputs",
]

#: The enclave's consumer port (docs/links.md, consumer link).
DEFAULT_PORT: Final = 9924
#: Bounds the TCP connect, and separately the TLS handshake (attestation included) and
#: the hello exchange. Verifying a first quote costs a few ECDSA checks; on loopback the
#: whole exchange takes milliseconds, so this only matters for a dead or stalled peer.
CONNECT_TIMEOUT: Final = HANDSHAKE_TIMEOUT
#: What we announce in ``hello``.
SOFTWARE: Final = "drm_consumer"

#: Named numpy arrays, or ready-made wire tensors (their names are the model's inputs).
Inputs = Mapping[str, np.ndarray[Any, Any]] | Sequence[Tensor]


@final
@dataclass(frozen=True, slots=True)
class InferenceOutcome:
    """What one inference returned.

    Attributes:
        outputs: output name -> array. The arrays are read-only views of the received
            frame (no copy); ``np.array(a)`` makes a writable copy.
        inferences_left: what the enclave had left after this inference.
        cost: the inferences this request was charged under the model's lending terms
            (its batch size, or 1).
    """

    outputs: dict[str, np.ndarray[Any, Any]]
    inferences_left: int
    cost: int = 1


@final
@dataclass(frozen=True, slots=True)
class EnclaveInfo:
    """What the enclave serves, and in what state it is.

    Attributes:
        models: model name -> name, SHA-256, inputs and outputs (dtype, shape with
            ``None`` for a dynamic dimension).
        inferences_left: inferences the enclave may still run before it must wait for
            the custodian.
        state: ``serving``, ``loading``, ``blocked`` or ``custodian_unreachable``.
    """

    models: dict[str, ModelDescription]
    inferences_left: int
    state: EnclaveState


class _CallbackFailed(Exception):
    """Carries an exception of the caller's ``on_waiting`` through the channel, unmapped."""

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


def _tensors(inputs: Inputs) -> tuple[Tensor, ...]:
    if isinstance(inputs, Mapping):
        return tuple(Tensor.from_numpy(name, np.asarray(a)) for name, a in inputs.items())
    tensors = tuple(inputs)
    for tensor in tensors:
        if not isinstance(tensor, Tensor):
            raise TypeError("inputs must be a mapping of arrays or a sequence of Tensor")
    return tensors


@final
class Client:
    """A verified connection to one enclave. Make one with :meth:`connect`.

    Any number of tasks may call :meth:`infer` and :meth:`info` at the same time.
    """

    def __init__(
        self, channel: RequestChannel, attestation: VerifiedEnclave, *, address: str
    ) -> None:
        """Internal: use :meth:`connect`, which verifies the enclave first."""
        self._channel = channel
        self._attestation = attestation
        self._address = address

    def __repr__(self) -> str:
        return f"<Client {self._address} {self._attestation!r} {self._channel!r}>"

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        policy: Policy,
        connect_timeout: float = CONNECT_TIMEOUT,
        collateral: Collateral | CollateralSource | None = None,
        read_in_background: bool = False,
    ) -> AsyncIterator[Client]:
        """Connect, verify the enclave against ``policy`` in the handshake, say hello.

        Args:
            host: the enclave's host name or address.
            port: its consumer port.
            policy: the enclaves to accept (``Policy.load("policy.toml")``).
            connect_timeout: seconds for the TCP connect, and again for the handshake and
                for the hello exchange.
            collateral: Intel collateral, for a TCB verdict on real SGX quotes.
            read_in_background: keep a task reading the connection, so that an idle
                connection the enclave closes is noticed at once (:meth:`wait_closed`
                returns); the long-lived blocking client's way. By default the task
                waiting for a reply reads (see the module docstring).

        Yields:
            The client, usable until the block exits (the connection is then closed).

        Raises:
            AttestationRefused: the enclave's evidence did not satisfy ``policy``; nothing
                was sent.
            ConnectionFailed: TCP, TLS or the hello failed or timed out.
        """
        address = format_address(host, port)
        what = f"connecting to {address}"
        context = consumer_client_context(policy, collateral=collateral)
        with map_errors(what):
            stream = await open_tls_client(host, port, context, handshake_timeout=connect_timeout)
        try:
            with map_errors(what):
                attestation = stream.peer_identity_as(VerifiedEnclave)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        async with open_request_channel(
            stream, Link.CONSUMER, Side.CLIENT, read_on_demand=not read_in_background
        ) as channel:
            with map_errors(what):
                await channel.hello(
                    role=PeerRole.CONSUMER, software=SOFTWARE, hello_timeout=connect_timeout
                )
            yield cls(channel, attestation, address=address)

    @property
    def attestation(self) -> VerifiedEnclave:
        """The proof that the peer is an enclave our policy accepts (from the handshake)."""
        return self._attestation

    @property
    def closed(self) -> bool:
        """Whether the connection has ended (see :meth:`wait_closed`)."""
        return self._channel.ended

    async def wait_closed(self) -> None:
        """Return once the connection has ended: closed by either side, or broken.

        Reading on demand (the default), an idle connection reads nothing, so the end is
        noticed only by a request; with ``read_in_background`` it is noticed at once.
        """
        try:
            await self._channel.wait_ended()
        except Exception:  # noqa: BLE001 - how it ended is the next request's to report
            return

    async def info(self) -> EnclaveInfo:
        """Ask the enclave which models it serves, its state, and the inferences left.

        Raises:
            ConnectionFailed: the connection failed or was closed.
            RequestFailed: the enclave answered with an error.
        """
        with map_errors(f"model info from {self._address}"):
            request = ModelInfoRequest(request_id=self._channel.next_request_id())
            reply = await self._channel.request(request)
        return EnclaveInfo(
            models={m.name: m for m in reply.models},
            inferences_left=reply.inferences_left,
            state=reply.state,
        )

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        wait: float | None = None,
        on_waiting: Callable[[int], object] | None = None,
    ) -> InferenceOutcome:
        """Run ``model`` on ``inputs`` inside the enclave.

        Args:
            model: the model's name (see :meth:`info`).
            inputs: input name -> array, or :class:`~drm_wire.tensors.Tensor` values.
            wait: when no inferences are left: ``None`` waits until the custodian supplies
                more, ``0`` fails at once with ``NoInferencesLeft``, ``N`` waits at most N
                seconds.
            on_waiting: called with the request's position in the queue each time the
                enclave says it is parked. It runs in whichever task is reading the
                connection at the time, so it must not block; an exception from it
                abandons the request and is raised here as itself.

        Returns:
            The outputs and the inferences left after this one.

        Raises:
            BadRequest: the inputs do not fit the model, or cannot travel (dtype not on
                the wire's allow-list, too large, ``wait`` out of range).
            ModelNotFound, ModelUnavailable, NoInferencesLeft, CustodianUnreachable, Blocked,
            Busy, InferenceFailed, RequestFailed: the enclave's answer.
            ConnectionFailed: the connection failed or was closed (the inference may or
                may not have run).
            TypeError: ``inputs`` holds something that is not a ``Tensor``.
        """
        callback = None if on_waiting is None else _waiting_callback(on_waiting)
        try:
            with map_errors(f"inference on {self._address}"):
                request = InferenceRequest(
                    request_id=self._channel.next_request_id(),
                    model=model,
                    inputs=_tensors(inputs),
                    wait=None if wait is None else float(wait),
                )
                result = await self._channel.request(request, on_waiting=callback)
        except _CallbackFailed as exc:
            error = exc.error
        else:
            return InferenceOutcome(
                outputs={t.name: t.to_numpy() for t in result.outputs},
                inferences_left=result.inferences_left,
                cost=result.cost,
            )
        raise error  # the caller's own exception, as the callback raised it


def _waiting_callback(on_waiting: Callable[[int], object]) -> Callable[[Waiting], object]:
    def callback(message: Waiting) -> None:
        try:
            on_waiting(message.position)
        except Exception as exc:
            raise _CallbackFailed(exc) from exc

    return callback
