"""The enclave's consumer-facing server: RA-TLS, then many requests per connection.

Theory of operation
-------------------
:meth:`ConsumerServer.handle` runs once per accepted TCP connection, in the handler
nursery of ``trio.serve_listeners``. It binds ``peer``, ``conn_id`` and ``role`` for every
log line of the connection, refuses the connection with ``Error(busy)`` past
``max_connections``, completes the TLS handshake with our RA-TLS certificate (the consumer
verifies it inside the handshake, before sending any data), accepts the consumer's hello,
then handles each request in the channel's reader task (``MessageChannel.set_handler``:
no hand-over to another task per request):

* ``model_info_request`` is answered inline (it only reads the runtime);
* ``infer`` is answered inline too when it needs no wait: refused outright, or its cost in
  quota is free and its model is known to run fast enough to stay on the loop
  (:meth:`HostedModel.runs_inline`). A task per request costs a spawn and two more
  passes of the scheduler, a large share of a tiny model's round trip, for nothing: the
  run would block the loop just the same inside a task;
* any other ``infer`` becomes a task in the connection's request nursery, at most
  ``max_in_flight`` at once (past that: ``Error(busy)`` for that request), so one
  connection may have many requests in flight, parked on quota or running in a thread.

One inference, in order: the model must be loaded (``model_not_found``; while the enclave
is suspended with no such model, the suspension code), the tensors must match its inputs
and be within the model's lending terms, which price it (``bad_request``: before any quota
is taken, so a bad request costs nothing; I14), then the request's cost in units of quota,
all at once (:meth:`Quota.acquire`: ``no_inferences``, ``busy``, ``blocked``,
``custodian_unreachable``; while parked, a ``waiting`` message tells the consumer its
position), then the run. An output commits the lease and counts its units (the reporter
is woken), and the result says what the request cost; a failed run releases the lease
(``inference_failed``, nothing counted). The lease is ended on every path, cancellation
included.

When the consumer goes away, its parked and queued requests are cancelled (their units go
back); a run already started finishes and is counted, since it was served.

Logs never hold tensors: requests are logged by id, model and outcome only.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Final

import structlog
import trio
from OpenSSL import SSL

from drm_wire.errors import DrmError, ErrorCode, LocalProtocolError
from drm_wire.limits import HANDSHAKE_TIMEOUT, HELLO_TIMEOUT
from drm_wire.messages import (
    Error,
    InferenceRequest,
    InferenceResult,
    Message,
    ModelInfo,
    ModelInfoRequest,
    Waiting,
)
from drm_wire.net.channel import ERROR_FRAME_TIMEOUT, ChannelClosed, MessageChannel, open_channel
from drm_wire.net.tls import accept_tls
from drm_wire.protocol import Link, Side
from drm_wire.tensors import Tensor

from .custodian_link import SOFTWARE
from .model_host import BadInputError, HostedModel, InferenceError
from .quota import Lease, QuotaError
from .runtime import EnclaveRuntime

__all__ = ["ConsumerLimits", "ConsumerServer"]

_log = structlog.get_logger("drm_enclave.consumer_server")

#: What ends a consumer connection from the peer's side (or a failed handshake).
_CONNECTION_ENDED: Final = (
    DrmError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    SSL.Error,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerLimits:
    """Caps and deadlines of the consumer server.

    Attributes:
        max_connections: live consumer connections; more are refused with ``busy``.
            Each costs a TLS session, a reader task and up to two message buffers.
        max_in_flight: requests in flight on one connection (parked, queued or running);
            more get ``busy``. Bounds the tasks (and tensor memory) one consumer can hold.
        handshake_timeout: the TLS handshake, RA-TLS certificate included.
        hello_timeout: the consumer's hello after the handshake.
    """

    max_connections: int = 256
    max_in_flight: int = 64
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    hello_timeout: float = HELLO_TIMEOUT


class ConsumerServer:
    """Serves consumers from the shared :class:`EnclaveRuntime`.

    Args:
        runtime: quota, accounting and models.
        context: from ``enclave_server_context`` (our RA-TLS credentials).
        limits: caps and deadlines.
    """

    def __init__(
        self,
        runtime: EnclaveRuntime,
        context: SSL.Context,
        limits: ConsumerLimits | None = None,
    ) -> None:
        self._runtime = runtime
        self._context = context
        self._limits = limits or ConsumerLimits()
        self._connections = 0
        self._running = 0
        self._idle = trio.Event()
        self._idle.set()
        self._conn_ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"<ConsumerServer connections={self._connections} {self._runtime!r}>"

    @property
    def connections(self) -> int:
        """Live consumer connections."""
        return self._connections

    @property
    def requests(self) -> int:
        """Inference requests in flight, over all connections."""
        return self._running

    async def wait_idle(self) -> None:
        """Return once no inference request is in flight (for a graceful shutdown)."""
        await self._idle.wait()

    async def handle(self, transport: trio.abc.Stream) -> None:
        """One consumer connection, from TCP accept to close. Never raises (but Cancelled)."""
        conn_id = next(self._conn_ids)
        with structlog.contextvars.bound_contextvars(
            peer=_peer_name(transport), conn_id=conn_id, role="consumer"
        ):
            log = _log.bind()
            self._connections += 1
            try:
                await self._connection(transport, log)
            except _CONNECTION_ENDED as exc:
                log.info("consumer_disconnected", reason=type(exc).__name__)
            except Exception:
                # The per-connection boundary: a bug here closes this connection only.
                log.exception("consumer_connection_crashed")
            finally:
                self._connections -= 1
                await trio.aclose_forcefully(transport)

    async def _connection(
        self, transport: trio.abc.Stream, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        limits = self._limits
        stream = await accept_tls(
            transport, self._context, handshake_timeout=limits.handshake_timeout
        )
        async with open_channel(stream, Link.CONSUMER, Side.SERVER) as channel:
            if self._connections > limits.max_connections:
                log.warning("consumer_refused_busy", connections=self._connections)
                with trio.move_on_after(ERROR_FRAME_TIMEOUT):
                    await channel.send(
                        Error(code=ErrorCode.BUSY, message="too many connections; retry later")
                    )
                return
            async with trio.open_nursery() as requests:
                # Requests are dispatched in the channel's reader task (set_handler).
                channel.set_handler(
                    functools.partial(
                        self._dispatch,
                        channel=channel,
                        requests=requests,
                        in_flight=_Counter(),
                        log=log,
                    )
                )
                hello = await channel.accept_hello(
                    software=SOFTWARE, hello_timeout=limits.hello_timeout
                )
                log.info(
                    "consumer_connected", software=hello.software[:64], version=channel.version
                )
                reason = await _until_ended(channel)
                requests.cancel_scope.cancel()  # the consumer left: nobody takes replies
            log.info("consumer_disconnected", reason=reason)

    async def _dispatch(
        self,
        message: Message,
        channel: MessageChannel,
        requests: trio.Nursery,
        in_flight: _Counter,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """One request, in the channel's reader task: answered now, or handed to a task."""
        if isinstance(message, ModelInfoRequest):
            await channel.send(self._model_info(message.request_id))
        elif isinstance(message, InferenceRequest):
            if (reply := self._answer_now(message, log)) is not None:
                await self._send_reply(channel, reply)
                return
            if in_flight.value >= self._limits.max_in_flight:
                log.info("request_refused_busy", request_id=message.request_id)
                await channel.send(
                    Error(
                        code=ErrorCode.BUSY,
                        message="too many requests in flight on this connection",
                        request_id=message.request_id,
                    )
                )
                return
            in_flight.value += 1
            self._request_started()
            requests.start_soon(self._infer_task, channel, requests, message, in_flight, log)
        # The consumer state machine lets nothing else through.

    async def _send_reply(self, channel: MessageChannel, reply: InferenceResult | Error) -> None:
        """Send a fast-path reply, counted as in flight for :meth:`wait_idle` meanwhile."""
        self._request_started()
        try:
            await channel.send(reply)
        finally:
            self._request_ended()

    def _request_started(self) -> None:
        self._running += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def _request_ended(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    def _answer_now(
        self, request: InferenceRequest, log: structlog.typing.FilteringBoundLogger
    ) -> InferenceResult | Error | None:
        """The reply to ``request`` if it needs no wait, else ``None`` (a task serves it).

        No wait: it is refused before any quota (the model, the inputs, a suspension), or
        a unit is free now and its model runs inline. Nothing here is a schedule point.
        """
        checked = self._checked(request, log)
        if isinstance(checked, Error):
            return checked
        model, cost = checked
        if not model.runs_inline(request.inputs):
            return None
        try:
            lease = self._runtime.quota.try_acquire(cost)
        except QuotaError as exc:
            return _refused(log, request, exc.code, str(exc))
        if lease is None:
            return None  # park (or refuse, per its wait) in a task
        try:
            outputs = model.run_inline(request.inputs)
        except (InferenceError, BadInputError) as exc:
            return self._failed(lease, request, exc, log)
        except BaseException:
            lease.release()
            raise
        return self._served(lease, request, outputs, log)

    def _checked(
        self, request: InferenceRequest, log: structlog.typing.FilteringBoundLogger
    ) -> tuple[HostedModel, int] | Error:
        """The request's model and its cost under the model's terms, with its inputs
        checked, or the refusal (no quota taken)."""
        runtime = self._runtime
        model = runtime.models.get(request.model)
        if model is None:
            suspended = runtime.quota.suspended
            if suspended is not None and not runtime.models:
                return _refused(log, request, suspended, "the enclave is not serving")
            return _refused(
                log, request, ErrorCode.MODEL_NOT_FOUND, "no model of that name is loaded"
            )
        try:
            cost = model.check_inputs(request.inputs)
        except BadInputError as exc:
            return _refused(log, request, ErrorCode.BAD_REQUEST, str(exc))
        return model, cost

    def _model_info(self, request_id: int) -> ModelInfo:
        runtime = self._runtime
        return ModelInfo(
            request_id=request_id,
            models=tuple(model.description for model in runtime.models.values()),
            inferences_left=runtime.quota.available,
            state=runtime.state,
        )

    async def _infer_task(
        self,
        channel: MessageChannel,
        requests: trio.Nursery,
        request: InferenceRequest,
        in_flight: _Counter,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        log = log.bind(request_id=request.request_id, model=request.model[:64])
        try:
            reply = await self._infer(channel, requests, request, log)
            await channel.send(reply)
        except (DrmError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The connection ended under this request; the receive loop sees it too.
            log.debug("reply_not_sent", reason=type(exc).__name__)
        finally:
            in_flight.value -= 1
            self._request_ended()

    async def _infer(
        self,
        channel: MessageChannel,
        requests: trio.Nursery,
        request: InferenceRequest,
        log: structlog.typing.FilteringBoundLogger,
    ) -> InferenceResult | Error:
        checked = self._checked(request, log)
        if isinstance(checked, Error):
            return checked
        model, cost = checked
        waiting = _WaitingNotice(channel, request.request_id)
        try:
            lease = await self._runtime.quota.acquire(
                request.wait,
                units=cost,
                on_parked=lambda position: waiting.parked(requests, position),
            )
        except QuotaError as exc:
            waiting.done = True
            return _refused(log, request, exc.code, str(exc))
        waiting.done = True
        if waiting.position:  # debug: the end of a grant wake-up, as the enclave sees it
            log.debug("parked_request_resumed", position=waiting.position)
        return await self._run(lease, model, request, log)

    async def _run(
        self,
        lease: Lease,
        model: HostedModel,
        request: InferenceRequest,
        log: structlog.typing.FilteringBoundLogger,
    ) -> InferenceResult | Error:
        try:
            outputs = await model.run_async(request.inputs)
        except (InferenceError, BadInputError) as exc:
            return self._failed(lease, request, exc, log)
        except BaseException:
            lease.release()
            raise
        return self._served(lease, request, outputs, log)

    def _failed(
        self,
        lease: Lease,
        request: InferenceRequest,
        exc: InferenceError | BadInputError,
        log: structlog.typing.FilteringBoundLogger,
    ) -> Error:
        lease.release()
        log.info("inference_failed", request_id=request.request_id, error=str(exc))
        code = ErrorCode.INFERENCE_FAILED if isinstance(exc, InferenceError) else exc.code
        return Error(code=code, message=str(exc), request_id=request.request_id)

    def _served(
        self,
        lease: Lease,
        request: InferenceRequest,
        outputs: tuple[Tensor, ...],
        log: structlog.typing.FilteringBoundLogger,
    ) -> InferenceResult:
        lease.commit()  # the output exists: the units are served, whatever happens next
        self._runtime.served(lease.units)
        left = self._runtime.quota.available
        # per request: debug only
        log.debug(
            "inference_served",
            request_id=request.request_id,
            cost=lease.units,
            inferences_left=left,
        )
        return InferenceResult(
            request_id=request.request_id, outputs=outputs, inferences_left=left, cost=lease.units
        )


def _refused(
    log: structlog.typing.FilteringBoundLogger,
    request: InferenceRequest,
    code: ErrorCode,
    message: str,
) -> Error:
    """A refusal before any quota was taken (logged with the request's id and model)."""
    log.info(
        "inference_refused",
        request_id=request.request_id,
        model=request.model[:64],
        code=code.value,
    )
    return Error(code=code, message=message, request_id=request.request_id)


class _Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


async def _until_ended(channel: MessageChannel) -> str:
    """Wait until the connection ends; return how it ended."""
    try:
        await channel.wait_ended()
    except ChannelClosed:
        return "closed"
    except _CONNECTION_ENDED as exc:  # e.g. a protocol error: the peer was told why
        return f"{type(exc).__name__}: {str(exc)[:200]}"


class _WaitingNotice:
    """Sends one ``waiting`` for a parked request, unless its final reply went first."""

    __slots__ = ("channel", "done", "position", "request_id")

    def __init__(self, channel: MessageChannel, request_id: int) -> None:
        self.channel = channel
        self.request_id = request_id
        self.done = False
        self.position = 0  # where it parked (1-based); 0: it did not park

    def parked(self, requests: trio.Nursery, position: int) -> None:
        # Called synchronously by Quota.acquire: it must not block, so a task sends it.
        self.position = position
        requests.start_soon(self._send, position)

    async def _send(self, position: int) -> None:
        if self.done:
            return
        try:
            await self.channel.send(Waiting(request_id=self.request_id, position=position))
        except LocalProtocolError:
            pass  # the final reply overtook it: the request is no longer in flight
        except (DrmError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection ended; the request task finds out on its own


def _peer_name(stream: trio.abc.Stream) -> str:
    socket = getattr(stream, "socket", None)
    if socket is None:
        return "unknown"
    try:
        host, port = socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"
