"""An in-process fake enclave: the real consumer-link server stack, scripted answers.

Everything below the answers is the product's own code: a simulated platform's RA-TLS
certificate (:func:`~drm_wire.attestation.gramine.make_enclave_identity`),
:func:`~drm_wire.net.ratls_context.enclave_server_context`, :func:`~drm_wire.net.tls.accept_tls`
over a real loopback socket, and a server-side
:class:`~drm_wire.net.channel.MessageChannel`. Only the inference is fake: a
:data:`Behaviour` decides what each ``infer`` gets back, so a test can make the enclave
park a request, fail it with any code, or hold answers until many requests are in flight.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import numpy as np
import trio

from drm_wire.attestation.ratls_cert import RatlsCredentials
from drm_wire.errors import DrmError, ErrorCode
from drm_wire.messages import (
    EnclaveState,
    Error,
    Hello,
    InferenceRequest,
    InferenceResult,
    Message,
    ModelDescription,
    ModelInfo,
    ModelInfoRequest,
    TensorSpec,
    Waiting,
)
from drm_wire.net.channel import ChannelError, MessageChannel, open_channel
from drm_wire.net.ratls_context import enclave_server_context
from drm_wire.net.tls import accept_tls
from drm_wire.protocol import Link, Side
from drm_wire.tensors import Tensor

HOST = "127.0.0.1"
MODEL = "tiny"
MODEL_DESCRIPTION = ModelDescription(
    name=MODEL,
    sha256=bytes(range(32)),
    inputs=(TensorSpec(name="x", dtype="float32", shape=(None, 4)),),
    outputs=(TensorSpec(name="y", dtype="float32", shape=(None, 4)),),
)

#: What the fake does with one ``infer``: it must send the reply itself.
Behaviour = Callable[["FakeEnclave", MessageChannel, InferenceRequest], Awaitable[None]]


def doubled(request: InferenceRequest) -> tuple[Tensor, ...]:
    """The fake model: ``y = 2 * x`` for the first input."""
    return (Tensor.from_numpy("y", request.inputs[0].to_numpy() * 2),)


async def answer(fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest) -> None:
    """The default behaviour: take one unit and send ``2 * x``."""
    fake.inferences_left -= 1
    await channel.send(
        InferenceResult(
            request_id=request.request_id,
            outputs=doubled(request),
            inferences_left=fake.inferences_left,
        )
    )


async def park_then_answer(
    fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest
) -> None:
    """Say ``waiting`` (position 1), wait for :attr:`FakeEnclave.release`, then answer."""
    await channel.send(Waiting(request_id=request.request_id, position=1))
    await fake.release.wait()
    await answer(fake, channel, request)


def fail_with(code: ErrorCode, message: str = "refused by the fake") -> Behaviour:
    """A behaviour that answers every request with ``error`` ``code``."""

    async def behaviour(
        fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest
    ) -> None:
        await channel.send(Error(code=code, message=message, request_id=request.request_id))

    return behaviour


class FakeEnclave:
    """A consumer-link server on 127.0.0.1 with a scripted inference.

    Attributes:
        port: where it listens (once :meth:`serve` started).
        behaviour: what each ``infer`` gets; replace it in a test.
        inferences_left: reported in results and ``model_info``.
        release: set it to let :func:`park_then_answer` requests go.
        hellos, requests: every hello and request received, in order.
        handshakes_completed, handshakes_failed: TLS outcomes, per connection.
        handshake_failed: set when a handshake failed (so a test can wait for the server
            side to have seen it, without sleeping).
        answer_hello: ``False`` makes it a server that goes silent after TLS.
    """

    def __init__(self, credentials: RatlsCredentials) -> None:
        self._context = enclave_server_context(credentials)
        self.port = 0
        self.behaviour: Behaviour = answer
        self.inferences_left = 100
        self.state = EnclaveState.SERVING
        self.release = trio.Event()
        self.hellos: list[Hello] = []
        self.requests: list[Message] = []
        self.handshakes_completed = 0
        self.handshakes_failed = 0
        self.handshake_failed = trio.Event()
        #: False: complete the TLS handshake, then never answer the hello.
        self.answer_hello = True

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``nursery.start`` returns once :attr:`port` is set."""
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host=HOST))
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()

    async def _handle(self, tcp: trio.SocketStream) -> None:
        try:
            tls = await accept_tls(tcp, self._context)
        except (trio.BrokenResourceError, trio.TooSlowError, DrmError):
            self.handshakes_failed += 1
            self.handshake_failed.set()
            return
        self.handshakes_completed += 1
        try:
            async with open_channel(tls, Link.CONSUMER, Side.SERVER) as channel:
                if not self.answer_hello:
                    await trio.sleep_forever()
                self.hellos.append(await channel.accept_hello(software="fake-enclave"))
                async with trio.open_nursery() as nursery:
                    async for message in channel:
                        self.requests.append(message)
                        nursery.start_soon(self._answer, channel, message)
        except ChannelError:
            pass  # the client went away

    async def _answer(self, channel: MessageChannel, message: Message) -> None:
        try:
            if isinstance(message, ModelInfoRequest):
                await channel.send(
                    ModelInfo(
                        request_id=message.request_id,
                        models=(MODEL_DESCRIPTION,),
                        inferences_left=self.inferences_left,
                        state=self.state,
                    )
                )
            elif isinstance(message, InferenceRequest):
                await self.behaviour(self, channel, message)
        except ChannelError:
            pass  # the client went away before its answer


def sample_input(rows: int = 2, offset: float = 0.0) -> np.ndarray[Any, Any]:
    """A float32 [rows, 4] input whose values identify it."""
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + np.float32(offset)
