"""The enclave's consumer-facing server: RA-TLS, then many requests per connection.

Theory of operation
-------------------
:meth:`ConsumerServer.handle` runs once per accepted TCP connection, in the handler
nursery of ``trio.serve_listeners``. It binds ``peer``, ``conn_id`` and ``role`` for every
log line of the connection, refuses the connection with ``Error(busy)`` past
``max_connections`` (unless a connection that sits idle can make room: see below),
completes the TLS handshake with our RA-TLS certificate (the consumer
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
  connection may have many requests in flight, parked on quota or running in a thread;
  of those at most ``max_parked_per_connection`` may wait for quota (past that: ``busy``),
  so one consumer cannot take the whole park queue from the others.

Fairness between clients (R09). Parked requests are served round-robin per *client*, not
per connection or in arrival order (:class:`~.quota.Quota`), so a client that opens many
connections and parks many requests is served one request per turn like any other. The
client key is the SHA-256 of the consumer's certificate when it presents one, else the
peer's IP address without the port: every connection from one address is one client
(consumers behind one NAT share a turn), and a client cannot earn more turns by opening
more connections or ports.

Bounded memory and time for every peer (I17). The port is open to anyone who can reach
it, before any authentication of the consumer, so every resource a connection holds has a
cap (:class:`ConsumerLimits`): connections, TLS handshakes in progress, the handshake and
the hello deadlines, and the memory of what is received: one
:class:`~drm_wire.net.budget.MemoryBudget` shared by all connections, charged for bytes
received (payloads grow as they arrive), with a share per connection, and a deadline and
minimum rate for every frame (:class:`~drm_wire.net.budget.ReceiveLimits`). A request task
keeps its payload charged until it ends. Each limit that bites logs a warning (or info,
per request) and counts in :attr:`ConsumerServer.limit_counts`.

Connection slots cannot be held by idling: when a connection arrives past
``max_connections``, the connection that has been idle the longest (it said hello, has no
request in flight and no frame under way) is told ``busy`` and closed to make room; only
when none is idle is the newcomer refused. A consumer that keeps a connection for later
may so lose it under pressure, and reconnects; one that holds a slot must keep a request
in flight on it.

One inference, in order: the model must be loaded (``model_unavailable`` with why and
what to do when the custodian lent it and it did not load here; ``model_not_found``;
while the enclave is suspended with no such model, the suspension code), the tensors
must match its inputs and be within the model's lending terms, which price it
(``bad_request``: before any quota is taken, so a bad request costs nothing; I14), then
the request's cost in units of quota, all at once (:meth:`Quota.acquire`:
``no_inferences``, ``busy``, ``blocked``, ``custodian_unreachable``; while parked, a
``waiting`` message tells the consumer its position), then the run. An output commits
the lease and counts its units (the reporter is woken), and the result says what the
request cost; a failed run releases the lease (``inference_failed``, nothing counted).
The lease is ended on every path, cancellation included.

When the consumer goes away, its parked and queued requests are cancelled (their units go
back); a run already started finishes and is counted, since it was served.

Logs never hold tensors: requests are logged by id, model and outcome only.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import itertools
from dataclasses import dataclass
from typing import Final

import structlog
import trio
from OpenSSL import SSL

from drm_wire.errors import DrmError, ErrorCode, LocalProtocolError, RemoteProtocolError
from drm_wire.limits import (
    CONNECTION_SHARE_BYTES,
    FRAME_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    HELLO_TIMEOUT,
    MIN_TRANSFER_RATE,
    PAYLOAD_BUDGET_BYTES,
    RATE_GRACE,
)
from drm_wire.messages import (
    Error,
    InferenceRequest,
    InferenceResult,
    Message,
    ModelInfo,
    ModelInfoRequest,
    Waiting,
)
from drm_wire.net.budget import Charge, MemoryBudget, ReceiveLimits
from drm_wire.net.channel import ERROR_FRAME_TIMEOUT, ChannelClosed, MessageChannel, open_channel
from drm_wire.net.tls import TLSStream, accept_tls
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
        max_connections: live consumer connections. Past it a new connection closes the
            one idle the longest, or, with none idle, is refused with ``busy``. Each costs
            a TLS session, a reader task and its share of the payload budget.
        max_handshakes: TLS handshakes in progress; a connection waits for a slot at
            most ``handshake_timeout``, then is closed. Bounds the CPU and memory that
            peers who never finish a handshake can take.
        max_in_flight: requests in flight on one connection (parked, queued or running);
            more get ``busy``. Bounds the tasks one consumer can hold.
        max_parked_per_connection: of those, how many may wait for quota at once; more
            get ``busy``, so one consumer cannot fill the park queue.
        handshake_timeout: the TLS handshake, RA-TLS certificate included.
        hello_timeout: the consumer's hello after the handshake.
        frame_timeout, min_rate, rate_grace: how long a frame may take once its first
            byte arrived, and the average rate (bytes/s) it must keep after the grace
            (:class:`~drm_wire.net.budget.ReceiveLimits`).
        payload_budget: bytes all connections may hold, received and not yet answered.
        connection_share: the most of it one connection may hold.
    """

    max_connections: int = 256
    max_handshakes: int = 64
    max_in_flight: int = 64
    max_parked_per_connection: int = 16
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    hello_timeout: float = HELLO_TIMEOUT
    frame_timeout: float = FRAME_TIMEOUT
    min_rate: float = MIN_TRANSFER_RATE
    rate_grace: float = RATE_GRACE
    payload_budget: int = PAYLOAD_BUDGET_BYTES
    connection_share: int = CONNECTION_SHARE_BYTES

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_handshakes", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_parked_per_connection < 0:
            raise ValueError("max_parked_per_connection must not be negative")
        self.receive_limits(MemoryBudget(self.payload_budget, per_connection=self.connection_share))

    def receive_limits(self, budget: MemoryBudget) -> ReceiveLimits:
        """The channel limits these caps describe, drawing on ``budget``."""
        return ReceiveLimits(
            budget=budget,
            frame_timeout=self.frame_timeout,
            min_rate=self.min_rate,
            rate_grace=self.rate_grace,
        )


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
        self._limits = limits = limits or ConsumerLimits()
        self._budget = MemoryBudget(limits.payload_budget, per_connection=limits.connection_share)
        self._receive_limits = limits.receive_limits(self._budget)
        self._handshakes = trio.Semaphore(limits.max_handshakes)
        #: How often each limit bit, by name (see :meth:`limit_counts`).
        self._limit_counts: collections.Counter[str] = collections.Counter()
        self._connections = 0
        self._live: dict[MessageChannel, _Counter] = {}  # admitted connections
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

    @property
    def budget(self) -> MemoryBudget:
        """The payload memory budget (``used``, ``peak``, ``waits``)."""
        return self._budget

    def limit_counts(self) -> dict[str, int]:
        """How often each limit bit since start: ``connections``, ``handshakes``,
        ``in_flight``, ``parked`` (requests or connections refused), ``idle_closed``
        (idle connections closed to admit another), ``frame_timeout``,
        ``budget_full`` (connections closed), ``budget_waits`` (reads that waited for
        memory)."""
        return {**self._limit_counts, "budget_waits": self._budget.waits}

    def _limit_hit(self, name: str) -> None:
        self._limit_counts[name] += 1

    async def wait_idle(self) -> None:
        """Return once no inference request is in flight (for a graceful shutdown)."""
        await self._idle.wait()

    def set_context(self, context: SSL.Context) -> None:
        """Present ``context``'s certificate (re-stapled: :mod:`~drm_enclave.staple`) to
        consumers that connect from now on; live connections keep theirs."""
        self._context = context

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
            except Exception as exc:  # noqa: BLE001 - the per-connection boundary
                _log_ending(log, exc)
            finally:
                self._connections -= 1
                await trio.aclose_forcefully(transport)

    async def _connection(
        self, transport: trio.abc.Stream, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        limits = self._limits
        with trio.move_on_after(limits.handshake_timeout) as waiting:
            await self._handshakes.acquire()
        if waiting.cancelled_caught:
            self._limit_hit("handshakes")
            log.warning("consumer_handshake_slots_full", max_handshakes=limits.max_handshakes)
            return
        try:
            stream = await accept_tls(
                transport, self._context, handshake_timeout=limits.handshake_timeout
            )
        finally:
            self._handshakes.release()
        async with open_channel(
            stream, Link.CONSUMER, Side.SERVER, limits=self._receive_limits
        ) as channel:
            if self._connections > limits.max_connections and not await self._evict_idle(log):
                self._limit_hit("connections")
                log.warning("consumer_refused_busy", connections=self._connections)
                with trio.move_on_after(ERROR_FRAME_TIMEOUT):
                    await channel.send(
                        Error(code=ErrorCode.BUSY, message="too many connections; retry later")
                    )
                return
            state = self._live[channel] = _Counter(channel, _client_key(transport, stream))
            try:
                async with trio.open_nursery() as requests:
                    # Requests are dispatched in the channel's reader task (set_handler).
                    channel.set_handler(
                        functools.partial(
                            self._dispatch,
                            channel=channel,
                            requests=requests,
                            in_flight=state,
                            log=log,
                        )
                    )
                    hello = await channel.accept_hello(
                        software=SOFTWARE, hello_timeout=limits.hello_timeout
                    )
                    state.last_active = trio.current_time()
                    log.info(
                        "consumer_connected", software=hello.software[:64], version=channel.version
                    )
                    reason = await self._until_ended(channel, log)
                    requests.cancel_scope.cancel()  # the consumer left: nobody takes replies
            finally:
                del self._live[channel]
            log.info("consumer_disconnected", reason=reason)

    async def _evict_idle(self, log: structlog.typing.FilteringBoundLogger) -> bool:
        """Close the connection idle the longest to admit a new one; ``False`` if none is
        idle (said hello, no request in flight, no frame under way)."""
        idle = [
            state
            for state in self._live.values()
            if state.last_active is not None and not state.value and not state.channel.receiving
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda state: state.last_active or 0.0)
        self._limit_hit("idle_closed")
        log.warning(
            "consumer_idle_connection_closed",
            idle_seconds=round(trio.current_time() - (victim.last_active or 0.0), 3),
            connections=self._connections,
        )
        victim.last_active = None  # not a candidate again while it closes
        with trio.move_on_after(ERROR_FRAME_TIMEOUT):
            with contextlib.suppress(DrmError, trio.BrokenResourceError, trio.ClosedResourceError):
                await victim.channel.send(
                    Error(
                        code=ErrorCode.BUSY,
                        message="closed while idle to admit another connection; "
                        "reconnect when you have a request",
                    )
                )
        await victim.channel.aclose()
        return True

    async def _dispatch(
        self,
        message: Message,
        channel: MessageChannel,
        requests: trio.Nursery,
        in_flight: _Counter,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """One request, in the channel's reader task: answered now, or handed to a task."""
        if in_flight.last_active is not None:
            in_flight.last_active = trio.current_time()
        if isinstance(message, ModelInfoRequest):
            await channel.send(self._model_info(message.request_id))
        elif isinstance(message, InferenceRequest):
            if (reply := self._answer_now(message, log)) is not None:
                await self._send_reply(channel, reply)
                return
            if in_flight.value >= self._limits.max_in_flight:
                self._limit_hit("in_flight")
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
            charge = channel.hold_payload()  # the tensors stay charged until the task ends
            requests.start_soon(
                self._infer_task, channel, requests, message, in_flight, charge, log
            )
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
            unavailable = runtime.unavailable.get(request.model)
            if unavailable is not None:  # lent, but it did not load here (version 3)
                return _refused(log, request, ErrorCode.MODEL_UNAVAILABLE, unavailable)
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
        charge: Charge,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        log = log.bind(request_id=request.request_id, model=request.model[:64])
        try:
            reply = await self._infer(channel, requests, request, in_flight, log)
            charge.release()  # the reply holds the outputs; the request is done with
            await channel.send(reply)
        except (DrmError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The connection ended under this request; the receive loop sees it too.
            log.debug("reply_not_sent", reason=type(exc).__name__)
        finally:
            charge.release()
            in_flight.value -= 1
            if in_flight.last_active is not None:
                in_flight.last_active = trio.current_time()
            self._request_ended()

    async def _infer(
        self,
        channel: MessageChannel,
        requests: trio.Nursery,
        request: InferenceRequest,
        in_flight: _Counter,
        log: structlog.typing.FilteringBoundLogger,
    ) -> InferenceResult | Error:
        checked = self._checked(request, log)
        if isinstance(checked, Error):
            return checked
        model, cost = checked
        quota = self._runtime.quota
        if (
            in_flight.parked >= self._limits.max_parked_per_connection
            and request.wait != 0
            and (quota.parked > 0 or quota.available < cost)
            and quota.suspended is None
        ):  # it would park (nothing here is a schedule point before acquire parks)
            self._limit_hit("parked")
            return _refused(
                log,
                request,
                ErrorCode.BUSY,
                f"this connection already has {in_flight.parked} requests waiting for "
                "inferences; retry later",
            )
        waiting = _WaitingNotice(channel, request.request_id)

        def parked(position: int) -> None:
            in_flight.parked += 1
            waiting.parked(requests, position)

        try:
            lease = await quota.acquire(
                request.wait, units=cost, on_parked=parked, client=in_flight.client
            )
        except QuotaError as exc:
            waiting.done = True
            return _refused(log, request, exc.code, str(exc))
        finally:
            if waiting.position:
                in_flight.parked -= 1
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

    async def _until_ended(
        self, channel: MessageChannel, log: structlog.typing.FilteringBoundLogger
    ) -> str:
        """Wait until the connection ends; return how it ended (and log a limit that
        ended it)."""
        try:
            await channel.wait_ended()
        except ChannelClosed:
            return "closed"
        except _CONNECTION_ENDED as exc:  # e.g. a protocol error: the peer was told why
            if isinstance(exc, RemoteProtocolError) and exc.code is ErrorCode.TIMEOUT:
                self._limit_hit("frame_timeout")
                log.warning("consumer_frame_too_slow", error=exc.message[:200])
            elif isinstance(exc, RemoteProtocolError) and exc.code is ErrorCode.BUSY:
                self._limit_hit("budget_full")
                log.warning(
                    "consumer_payload_budget_full",
                    used=self._budget.used,
                    budget=self._budget.total,
                )
            elif isinstance(exc, RemoteProtocolError):
                _protocol_error(log, exc)
            return f"{type(exc).__name__}: {str(exc)[:200]}"


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
    """A connection's requests in flight, how many of them are parked, when it was last
    active (``None`` before its hello, or once it is being closed), and whose it is (the
    client key its parked requests queue under)."""

    __slots__ = ("channel", "client", "last_active", "parked", "value")

    def __init__(self, channel: MessageChannel, client: str) -> None:
        self.channel = channel
        self.client = client
        self.value = 0
        self.parked = 0
        self.last_active: float | None = None


def _log_ending(log: structlog.typing.FilteringBoundLogger, exc: Exception) -> None:
    """Log how a connection ended with ``exc``, once, as what it is.

    What the peer did (a protocol error, a failed handshake, a lost connection) often
    arrives inside an exception group, from the nurseries the connection runs in: it is
    still the peer's doing, not a crash. Only an exception of another kind is a bug here,
    logged with its traceback; it closes this connection only.
    """
    leaves = _leaves(exc)
    if not all(isinstance(leaf, _CONNECTION_ENDED) for leaf in leaves):
        log.error("consumer_connection_crashed", exc_info=exc)
        return
    for leaf in leaves:
        if isinstance(leaf, RemoteProtocolError):
            _protocol_error(log, leaf)
    log.info("consumer_disconnected", reason=type(leaves[0]).__name__)


def _protocol_error(log: structlog.typing.FilteringBoundLogger, exc: RemoteProtocolError) -> None:
    """The consumer broke the protocol (and was told so): a warning, naming what it did."""
    log.warning(
        "consumer_protocol_error",
        code=exc.code.value,
        error=exc.message[:200],
        field=exc.field,
        state=exc.state,
    )


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, exception groups flattened (``exc`` if none)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


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


def _client_key(transport: trio.abc.Stream, stream: TLSStream) -> str:
    """Whose requests these are, for fairness between clients (R09): ``cert:`` and the
    SHA-256 of the consumer's certificate if it presented one, else ``addr:`` and the
    peer's IP address without the port (``addr:unknown`` when there is none)."""
    der = stream.peer_certificate_der()
    if der is not None:
        return "cert:" + hashlib.sha256(der).hexdigest()
    socket = getattr(transport, "socket", None)
    if socket is None:
        return "addr:unknown"
    try:
        host = socket.getpeername()[0]
    except OSError:
        return "addr:unknown"
    return f"addr:{host}"


def _peer_name(stream: trio.abc.Stream) -> str:
    socket = getattr(stream, "socket", None)
    if socket is None:
        return "unknown"
    try:
        host, port = socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"
