"""Typed messages over a ``trio.abc.Stream``: one reader at a time, one locked writer.

Theory of operation
-------------------
A :class:`MessageChannel` owns one sans-IO :class:`~drm_wire.protocol.Connection` and one
stream (a :class:`~drm_wire.net.tls.TLSStream` in production, memory streams in tests).
:func:`open_channel` is the only way to make one: it is an async context manager that runs
the reader task in a nursery of its own, so the reader cannot outlive the stream nor the
channel be used without its reader. (``run(task_status)`` for ``nursery.start`` was the
alternative; it would leave closing the stream, and failing what waits on it, to every
caller. trio-websocket's ``open_websocket`` makes the same choice.) A client may read on
demand instead, without a reader task (see *Reading on demand* below).

*Receiving.* The reader alone calls ``receive_some``. It feeds the bytes to the connection
and pulls messages until ``NEED_DATA``, and only then reads again, so the decoder never
holds more than one read's worth of bytes beyond the frame being decoded. While a payload
is being received and the stream can decrypt in place (``receive_into``, as
:class:`~drm_wire.net.tls.TLSStream` does), the reader reads straight into the payload's
buffer, which :meth:`MessageChannel.set_payload_sink` lets the application choose (the
enclave puts each model chunk where it belongs in the model): a 4 MiB chunk is then
written once instead of being copied three times on its way. A reply to a
:meth:`MessageChannel.request` goes to that request (``Waiting`` to its ``on_waiting``
callback); every other message goes into a memory channel of :data:`RECEIVE_BUFFER`
slots that :meth:`MessageChannel.receive` reads. When it is full, the reader stops
reading, the stream's buffers fill, and the peer's writes block: backpressure reaches TCP.
Instead, :meth:`~MessageChannel.set_handler` may be used: once the hello exchange is done,
the reader awaits the handler with each such message, in order, and reads on when it
returns. That spares every message a hand-over to another task (a trip through the
memory channel and one more pass of the scheduler: ~60-90 µs of a ~650 µs round trip of
a tiny message between two processes on the development VM), and backpressure is the
same: while the handler runs, nothing is read.

*Reading on demand* (``open_channel(..., read_on_demand=True)``) is the client's
counterpart, for a link whose server speaks only to answer (the consumer link: the
state machine lets nothing else through after the welcome). There is no reader task:
the task waiting for a reply, or in :meth:`MessageChannel.receive`, reads the stream
itself, one task at a time. The others wait to be woken, either by their reply (read by
the reading task) or by the turn, which a reader hands to the longest waiting task that
is not done once its own reply came (or it was cancelled). A reply is then not handed
from a reader task to the requester: ~55-140 µs less per round trip of a tiny request on
the development VM (and ~60 µs less client CPU). An idle connection reads nothing, so a
peer that closes it is noticed by the next request, which fails as it would have.

*Sending.* Writes are serialised by one ``trio.Lock`` (FIFO, so concurrent requests go
out in call order) and each buffer that ``Connection.send`` returns is written as is: the
payload buffers of a tensor are never concatenated. Once a frame is handed to the
connection it is committed: if writing it fails or is cancelled, the connection is told
(``send_failed``), the stream is closed and the channel is *broken*, never "maybe sent".

*Ending.* The first failure wins and is final: the peer's clean close, a protocol error,
a lost or broken stream, an ``Error`` from the peer, a refused hello, or :meth:`aclose`.
From then on every pending request and every send raises it, and ``receive`` raises it
once the messages that arrived intact before it have been taken. When the *peer* broke
the protocol, the reader first tells it why with an ``Error`` frame (best effort, at most
:data:`ERROR_FRAME_TIMEOUT`), then makes the failure visible and closes the stream.

What each call raises, and what the peer is told, is in
:mod:`drm_wire.net.channel_errors`. Each waiter gets its own copy of the failure, chained
to the cause. Nothing here logs: every failure reaches a caller as an exception, and the
per-connection boundary above logs it once.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final, NoReturn, Protocol, overload, runtime_checkable

import trio

from drm_wire.errors import (
    DrmError,
    ErrorCode,
    LocalProtocolError,
    PeerError,
    RemoteProtocolError,
)
from drm_wire.framing import PayloadSink
from drm_wire.limits import HELLO_TIMEOUT
from drm_wire.messages import (
    Error,
    Hello,
    InferenceRequest,
    InferenceResult,
    Message,
    ModelInfo,
    ModelInfoRequest,
    PeerRole,
    Refusal,
    Waiting,
    Welcome,
)
from drm_wire.net.channel_errors import (
    ERROR_FRAME_TIMEOUT,
    ChannelBroken,
    ChannelClosed,
    ChannelError,
    Failure,
    HelloRefused,
    copy_failure,
    send_last_words,
)
from drm_wire.protocol import (
    SUPPORTED_VERSIONS,
    Closed,
    Connection,
    Link,
    NeedData,
    Side,
    select_version,
)

__all__ = [
    "ERROR_FRAME_TIMEOUT",
    "RECEIVE_BUFFER",
    "ChannelBroken",
    "ChannelClosed",
    "ChannelError",
    "HelloRefused",
    "MessageChannel",
    "MessageHandler",
    "open_channel",
]

#: Messages the reader may decode ahead of :meth:`MessageChannel.receive`. Each one can
#: carry a payload of up to ``MAX_PAYLOAD_BYTES`` (64 MiB), so every slot may cost that
#: much per connection. One slot lets the reader decode the next message while the
#: application handles the current one, which is all the overlap one ordered stream
#: offers; past it, the reader stops reading and the peer's writes block in TCP.
RECEIVE_BUFFER: Final = 1

#: Frames up to this size are joined into one buffer before they are sent. A frame is a
#: header and a payload; sent apart, a small request costs two TLS records, two
#: ``send`` system calls and two wake-ups of the peer, which measured as a third of a tiny
#: model's round trip. Past this size the copy costs more than the extra call.
JOIN_BELOW: Final = 64 * 1024

#: Request type -> the reply that finishes it (besides an ``Error`` with its id).
_REPLY_TO: Final[dict[type[Message], type[InferenceResult] | type[ModelInfo]]] = {
    InferenceRequest: InferenceResult,
    ModelInfoRequest: ModelInfo,
}

WaitingCallback = Callable[[Waiting], object]
#: See :meth:`MessageChannel.set_handler`.
MessageHandler = Callable[[Message], Awaitable[None]]


@runtime_checkable
class ReceivesInto(Protocol):
    """A stream that can receive into a caller's buffer (see ``TLSStream.receive_into``)."""

    async def receive_into(self, buffer: memoryview) -> int:
        """Fill the start of ``buffer``; return the count, or 0 at the end of the stream."""
        ...


class _Waiter:
    """A task reading on demand: it is done when ``until()``, else it wants the read turn.

    ``wake`` is set when it may be done, or when the turn is passed to it.
    """

    __slots__ = ("until", "wake")

    def __init__(self, until: Callable[[], bool]) -> None:
        self.until = until
        self.wake = trio.Event()


class _Pending:
    """One request waiting for its reply."""

    __slots__ = ("callback_error", "done", "expects", "on_waiting", "reply", "waiter")

    def __init__(
        self, expects: type[InferenceResult] | type[ModelInfo], on_waiting: WaitingCallback | None
    ) -> None:
        self.expects = expects
        self.on_waiting = on_waiting
        self.done = trio.Event()
        self.reply: InferenceResult | ModelInfo | Error | None = None
        self.callback_error: Exception | None = None
        self.waiter = _Waiter(self.done.is_set)


class MessageChannel:
    """Typed messages over a stream. Made by :func:`open_channel`, which runs its reader.

    Any number of tasks may call :meth:`send` and :meth:`request` at once; messages that
    are not replies to a request are meant for one receiving task.
    """

    def __init__(
        self, stream: trio.abc.Stream, link: Link, side: Side, *, read_on_demand: bool = False
    ) -> None:
        self._stream = stream
        self._conn = Connection(link, side)
        self._send_lock = trio.Lock()
        self._inbox_send, self._inbox = trio.open_memory_channel[Message](RECEIVE_BUFFER)
        self._pending: dict[int, _Pending] = {}
        #: Requests whose caller gave up after sending: their replies are dropped.
        self._abandoned: set[int] = set()
        self._ids = itertools.count(1)
        self._failure: Failure | None = None
        self._failure_cause: BaseException | None = None
        self._ended = trio.Event()
        self._handler: MessageHandler | None = None
        self._on_demand = read_on_demand
        #: Reading on demand: whether a task is reading, and the others that wait (FIFO).
        self._reading = False
        self._waiters: list[_Waiter] = []
        self._receive_into = stream.receive_into if isinstance(stream, ReceivesInto) else None

    def __repr__(self) -> str:
        state = "open" if self._failure is None else type(self._failure).__name__
        return (
            f"<MessageChannel {self.link.value} {self.side.value} {state} "
            f"version={self.version} pending={len(self._pending)}>"
        )

    @property
    def stream(self) -> trio.abc.Stream:
        """The stream underneath (e.g. to read a TLS peer's identity). Do not use it for I/O."""
        return self._stream

    @property
    def link(self) -> Link:
        return self._conn.link

    @property
    def side(self) -> Side:
        return self._conn.side

    @property
    def version(self) -> int | None:
        """The agreed protocol version, once the hello exchange succeeded."""
        return self._conn.version

    # --- sending --------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """Send one message.

        Raises:
            LocalProtocolError: the message is not allowed now; nothing was sent and the
                channel is unchanged.
            ChannelBroken: writing failed (the channel is now broken).
            ChannelClosed, RemoteProtocolError, PeerError: the channel had already ended.
        """
        await trio.lowlevel.checkpoint_if_cancelled()  # nothing sent yet: not a failure
        try:
            # Uncontended, skip the lock's own schedule point: send_all below is one, and
            # each costs a trip through the scheduler and an epoll call per message.
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            self._raise_if_failed()
            buffers = self._conn.send(message)
            if len(buffers) > 1 and sum(memoryview(b).nbytes for b in buffers) <= JOIN_BELOW:
                buffers = [b"".join(buffers)]
            try:
                for buffer in buffers:
                    await self._stream.send_all(buffer)
            except BaseException as exc:
                # Part of the frame may be on the wire: the byte stream is unusable.
                self._conn.send_failed()
                self._fail(ChannelBroken(f"sending {message.TYPE} failed part-way"), exc)
                await trio.aclose_forcefully(self._stream)
                if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
                    self._raise_failure()
                raise
        finally:
            self._send_lock.release()

    def next_request_id(self) -> int:
        """A request id not used before on this channel (1, 2, 3...)."""
        return next(self._ids)

    @overload
    async def request(
        self, message: InferenceRequest, *, on_waiting: WaitingCallback | None = None
    ) -> InferenceResult: ...
    @overload
    async def request(
        self, message: ModelInfoRequest, *, on_waiting: WaitingCallback | None = None
    ) -> ModelInfo: ...
    async def request(
        self,
        message: InferenceRequest | ModelInfoRequest,
        *,
        on_waiting: WaitingCallback | None = None,
    ) -> InferenceResult | ModelInfo:
        """Send a request and wait for its reply; many may be in flight at once.

        There is no deadline here: an inference may wait for quota as long as the request's
        ``wait`` allows. Put the call under ``trio.fail_after`` to bound it; a cancelled
        request's reply is dropped when it comes.

        Args:
            message: the request; take its id from :meth:`next_request_id`.
            on_waiting: called from the reader task with each ``Waiting`` for this request.
                It must not block; an exception it raises is raised here instead of a reply.

        Raises:
            PeerError: the peer answered with an ``Error``; the channel stays open.
            LocalProtocolError: the request id is already in flight.
            ChannelClosed, ChannelBroken, RemoteProtocolError, PeerError: the channel ended
                before the reply came (the error has a note naming the request).
        """
        request_id = message.request_id
        if request_id in self._pending or request_id in self._abandoned:
            raise LocalProtocolError(
                f"request id {request_id} is already in flight", field="request_id"
            )
        pending = _Pending(_REPLY_TO[type(message)], on_waiting)
        self._pending[request_id] = pending
        sent = False
        try:
            await self.send(message)
            sent = True
            if self._on_demand:
                await self._read_on_demand(pending.waiter)
            else:
                await pending.done.wait()
        except BaseException:
            if self._pending.pop(request_id, None) is pending and sent:
                self._abandoned.add(request_id)
            raise
        reply = pending.reply
        if reply is None:
            if pending.callback_error is not None:
                raise pending.callback_error
            self._raise_failure(note=f"request {request_id} was in flight")
        if isinstance(reply, Error):
            raise PeerError(reply.code, reply.message, request_id)
        return reply

    # --- receiving ------------------------------------------------------------------

    async def receive(self) -> Message:
        """The next message that is not a reply to :meth:`request`.

        Raises:
            ChannelClosed: the peer closed cleanly, or the channel was closed.
            RemoteProtocolError: the peer broke the protocol (it was told, and the
                connection closed).
            PeerError: the peer sent a connection-level ``Error`` and closed.
            ChannelBroken: the stream failed or a send was cut off.
        """
        try:
            if not self._on_demand:
                return await self._inbox.receive()
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    return self._inbox.receive_nowait()
                except trio.WouldBlock:
                    await self._read_on_demand(_Waiter(self._until_received))
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._raise_failure()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        """Iteration stops at a clean close; any other end is raised."""
        try:
            return await self.receive()
        except ChannelClosed:
            raise StopAsyncIteration from None

    def set_handler(self, handler: MessageHandler) -> None:
        """Have the reader task await ``handler`` with each message, instead of queueing it
        for :meth:`receive`, once the hello exchange is done.

        Call it before the exchange (``hello``, ``welcome`` and ``refusal`` still go
        through :meth:`receive`), then wait for the end with :meth:`wait_ended`. The
        handler runs in the reader task, so nothing more is read until it returns: it
        should send its reply or start a task, not wait for anything else. An exception
        it raises ends the channel as if the stream had raised it (a
        ``RemoteProtocolError`` is sent to the peer, another ``DrmError`` breaks the
        channel; anything else propagates out of :func:`open_channel`).
        """
        self._handler = handler

    async def wait_ended(self) -> NoReturn:
        """Wait until the channel ends, then raise how it ended, as :meth:`receive` would
        (a clean close is :class:`ChannelClosed`)."""
        await self._ended.wait()
        self._raise_failure()

    def set_payload_sink(self, sink: PayloadSink | None) -> None:
        """Let ``sink`` choose where the payloads of later frames are received.

        For bulk data whose final place is known from the header (a model chunk's offset
        in the model buffer): the payload is then written there directly, and the message
        carries a view of it. ``None`` restores the channel's own buffers. See
        :data:`~drm_wire.framing.PayloadSink`.
        """
        self._conn.set_payload_sink(sink)

    # --- version negotiation ----------------------------------------------------------

    async def hello(
        self,
        *,
        role: PeerRole,
        software: str,
        license: str | None = None,
        instance_id: str | None = None,
        hello_timeout: float = HELLO_TIMEOUT,
    ) -> Welcome:
        """Client: offer our versions and wait for the server's choice.

        Raises:
            HelloRefused: the server refused (``code``, ``supported_versions``).
            trio.TooSlowError: no answer within ``hello_timeout``; the channel is closed.
            RemoteProtocolError: the server chose a version we do not speak, or broke the
                protocol otherwise.
            ChannelClosed, ChannelBroken, PeerError: see :meth:`receive`.
        """
        hello = Hello(
            versions=SUPPORTED_VERSIONS,
            role=role,
            software=software,
            license=license,
            instance_id=instance_id,
        )
        try:
            with trio.fail_after(hello_timeout):
                await self.send(hello)
                reply = await self.receive()
        except trio.TooSlowError:
            reason = f"no welcome within {hello_timeout} s"
            await self._abort(ChannelClosed(reason), None)
            raise trio.TooSlowError(f"the server sent {reason}") from None
        if isinstance(reply, Refusal):
            raise HelloRefused(reply.code, reply.message, reply.supported_versions)
        if not isinstance(reply, Welcome):  # the state machine lets nothing else through
            raise RemoteProtocolError(f"{reply.TYPE} is not an answer to hello", field="type")
        return reply

    async def accept_hello(self, *, software: str, hello_timeout: float = HELLO_TIMEOUT) -> Hello:
        """Server: wait for the client's hello, then welcome it or refuse it.

        Raises:
            RemoteProtocolError: the client speaks no version we do (code
                ``UNSUPPORTED_VERSION``; it was sent a ``Refusal`` and the channel closed),
                or broke the protocol otherwise.
            trio.TooSlowError: no hello within ``hello_timeout``; the client was sent a
                ``timeout`` error and the channel closed.
            ChannelClosed, ChannelBroken, PeerError: see :meth:`receive`.
        """
        try:
            with trio.fail_after(hello_timeout):
                hello = await self.receive()
                if not isinstance(hello, Hello):  # the state machine lets nothing else through
                    raise RemoteProtocolError(f"{hello.TYPE} is not a hello", field="type")
                version = select_version(hello)
                if version is None:
                    await self.send(
                        Refusal(
                            code=ErrorCode.UNSUPPORTED_VERSION,
                            message=f"no common protocol version; this server speaks "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))}",
                            supported_versions=SUPPORTED_VERSIONS,
                        )
                    )
                else:
                    await self.send(Welcome(version=version, software=software))
        except trio.TooSlowError:
            reason = f"no hello within {hello_timeout} s"
            await self._abort(
                ChannelClosed(reason), None, tell_peer=Error(code=ErrorCode.TIMEOUT, message=reason)
            )
            raise trio.TooSlowError(f"the client sent {reason}") from None
        if version is None:
            await self._abort(ChannelClosed("refused the client's hello"), None)
            raise RemoteProtocolError(
                "the client speaks no protocol version we do",
                code=ErrorCode.UNSUPPORTED_VERSION,
                field="versions",
                got=hello.versions,
            )
        return hello

    # --- closing --------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the channel and its stream; pending requests raise :class:`ChannelClosed`."""
        self._fail(ChannelClosed("the channel was closed"), None)
        await self._stream.aclose()

    # --- the reader task ------------------------------------------------------------

    async def _read_loop(self, until: Callable[[], bool] | None = None) -> None:
        """Read and dispatch until the channel ends, or (on demand) until ``until()``."""
        cause: BaseException | None = None
        try:
            ended = await self._read_messages(until)
            if ended is None:
                return
        except RemoteProtocolError as exc:
            await self._abort(exc, exc, tell_peer=Connection.error_for(exc))
            return
        except trio.BrokenResourceError as exc:
            ended, cause = ChannelBroken(f"the connection was lost: {exc}"), exc
        except trio.ClosedResourceError as exc:
            ended, cause = ChannelClosed("the stream was closed"), exc
        except trio.TooSlowError as exc:  # the stream's own read timeout
            ended, cause = ChannelBroken("the peer sent nothing within the read timeout"), exc
        except DrmError as exc:  # the stream's peer verification, for one
            ended, cause = ChannelBroken(f"the stream failed: {exc}"), exc
        await self._abort(ended, cause)

    async def _read_messages(self, until: Callable[[], bool] | None) -> Failure | None:
        """Decode and dispatch messages until the connection ends (return how it ended)
        or ``until()`` (return ``None``)."""
        conn = self._conn
        receive_into = self._receive_into
        while True:
            event = conn.next_message()
            if isinstance(event, NeedData):
                if receive_into is None or (target := conn.payload_buffer()) is None:
                    conn.receive_data(await self._stream.receive_some())
                elif count := await receive_into(target):
                    conn.payload_filled(count)
                else:
                    conn.receive_data(b"")  # the end of the stream, mid-payload
            elif isinstance(event, Closed):
                return ChannelClosed("the peer closed the connection")
            else:
                ended = await self._dispatch(event)
                if ended is not None:
                    return ended
                if until is not None and until():
                    return None

    async def _read_on_demand(self, waiter: _Waiter) -> None:
        """Until ``waiter.until()`` or the channel fails: read if no task does, else wait
        to be woken (done, or handed the turn). A reader reads until its own condition
        holds, then hands the turn to the longest waiting task that is not done."""
        while not waiter.until() and self._failure is None:
            if not self._reading:
                self._reading = True
                try:
                    await self._read_loop(waiter.until)
                finally:
                    self._reading = False
                    self._pass_turn()
                continue
            self._waiters.append(waiter)
            try:
                await waiter.wake.wait()
            except BaseException:
                self._waiters.remove(waiter)
                self._pass_turn()  # cancelled: had the turn come to us meanwhile, pass it on
                raise
            self._waiters.remove(waiter)
            waiter.wake = trio.Event()

    def _pass_turn(self) -> None:
        """Wake the longest waiting task that is not done, unless a task is reading."""
        if self._reading:
            return
        for waiter in self._waiters:
            if not waiter.until():
                waiter.wake.set()
                return

    def _until_received(self) -> bool:
        return self._inbox.statistics().current_buffer_used > 0

    async def _dispatch(self, message: Message) -> Failure | None:
        if isinstance(message, Error) and message.request_id is None:
            return PeerError(message.code, message.message)
        if isinstance(message, Waiting | InferenceResult | ModelInfo | Error):
            request_id = message.request_id
            assert request_id is not None
            pending = self._pending.get(request_id)
            if pending is not None:
                self._answer(request_id, pending, message)
                return None
            if request_id in self._abandoned:
                if not isinstance(message, Waiting):
                    self._abandoned.discard(request_id)
                return None
        if (
            self._handler is not None
            and self._conn.version is not None
            and not isinstance(message, Welcome)  # hello() takes it (the client's side)
        ):
            await self._handler(message)
            return None
        try:
            if self._on_demand:
                # A turn that reads a message for the inbox ends there (_until_received):
                # the slot is free, and no cancellation can fall between decode and store.
                self._inbox_send.send_nowait(message)
            else:
                await self._inbox_send.send(message)
        except trio.ClosedResourceError:
            return ChannelClosed("the channel was closed")  # _fail() ran meanwhile
        if isinstance(message, Refusal):
            return ChannelClosed("the server refused the hello")
        return None

    def _answer(
        self,
        request_id: int,
        pending: _Pending,
        message: Waiting | InferenceResult | ModelInfo | Error,
    ) -> None:
        if isinstance(message, Waiting):
            if pending.on_waiting is None:
                return
            try:
                pending.on_waiting(message)
            except Exception as exc:  # noqa: BLE001 - raised by request(), in its caller's task
                pending.callback_error = exc
                self._abandoned.add(request_id)
            else:
                return
        elif isinstance(message, Error | pending.expects):
            pending.reply = message
        else:
            raise RemoteProtocolError(
                f"{message.TYPE} does not answer request {request_id}",
                field="type",
                state=self._conn.state.value,
            )
        del self._pending[request_id]
        pending.done.set()
        pending.waiter.wake.set()

    # --- failure ----------------------------------------------------------------------

    def _fail(self, error: Failure, cause: BaseException | None) -> None:
        """Record the first failure and wake everything that waits on the channel."""
        if self._failure is not None:
            return
        self._failure, self._failure_cause = error, cause
        self._ended.set()
        for waiter in self._waiters:
            waiter.wake.set()
        self._inbox_send.close()
        for pending in self._pending.values():
            pending.done.set()
        self._pending.clear()
        self._abandoned.clear()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            self._raise_failure()

    def _raise_failure(self, note: str | None = None) -> NoReturn:
        assert self._failure is not None
        error = copy_failure(self._failure)
        if note is not None:
            error.add_note(note)
        raise error from self._failure_cause

    async def _abort(
        self, error: Failure, cause: BaseException | None, *, tell_peer: Error | None = None
    ) -> None:
        """Tell the peer why (best effort, bounded), fail the channel, close the stream."""
        if self._failure is not None:
            return
        if tell_peer is not None:
            with trio.move_on_after(ERROR_FRAME_TIMEOUT):
                async with self._send_lock:
                    if self._failure is None:
                        await send_last_words(self._conn, self._stream, tell_peer)
        self._fail(error, cause)
        await self._stream.aclose()


@asynccontextmanager
async def open_channel(
    stream: trio.abc.Stream, link: Link, side: Side, *, read_on_demand: bool = False
) -> AsyncIterator[MessageChannel]:
    """Run a :class:`MessageChannel` over ``stream`` for the duration of the block.

    On exit the reader is cancelled and the channel and stream are closed (gracefully, or
    forcefully when the block raised). An exception from the block propagates as itself,
    not wrapped in an exception group.
    """
    channel = MessageChannel(stream, link, side, read_on_demand=read_on_demand)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            if not read_on_demand:
                nursery.start_soon(channel._read_loop)
            try:
                yield channel
            except BaseException as exc:  # noqa: BLE001 - re-raised below, outside the nursery
                body_error = exc
            nursery.cancel_scope.cancel()
    finally:
        if body_error is None:
            await channel.aclose()
        else:
            channel._fail(ChannelClosed("the channel was closed"), None)
            await trio.aclose_forcefully(stream)
    if body_error is not None:
        raise body_error
