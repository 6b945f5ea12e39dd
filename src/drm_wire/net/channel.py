"""Typed messages over a ``trio.abc.Stream``: one reader task, one locked writer.

Theory of operation
-------------------
A :class:`MessageChannel` owns one sans-IO :class:`~drm_wire.protocol.Connection` and one
stream (a :class:`~drm_wire.net.tls.TLSStream` in production, memory streams in tests).
:func:`open_channel` is the only way to make one: it is an async context manager that runs
the reader task in a nursery of its own, so the reader cannot outlive the stream nor the
channel be used without its reader. (``run(task_status)`` for ``nursery.start`` was the
alternative; it would leave closing the stream, and failing what waits on it, to every
caller. trio-websocket's ``open_websocket`` makes the same choice.) This is the whole
channel of the two daemons; the consumer client's requests, matched to their replies and
read on demand, are a layer on top: :mod:`drm_wire.net.request_channel`.

*Receiving.* The reader alone calls ``receive_some``. It feeds the bytes to the connection
and pulls messages until ``NEED_DATA``, and only then reads again, so the decoder never
holds more than one read's worth of bytes beyond the frame being decoded. A stream that
can decrypt in place (``receive_into``, as :class:`~drm_wire.net.tls.TLSStream` can) is
read straight into the payload's buffer, which :meth:`MessageChannel.set_payload_sink`
lets the application choose: a 4 MiB model chunk is then written once, where it belongs
in the model, instead of being copied three times on its way.

Each message goes into a memory channel of :data:`RECEIVE_BUFFER` slots that
:meth:`MessageChannel.receive` reads (this is how the custodian reads each enclave). When
it is full, the reader stops reading, the stream's buffers fill, and the peer's writes
block: backpressure reaches TCP. Or, with :meth:`~MessageChannel.set_handler` (the
enclave, on both its links), the reader awaits the handler with each message once the
hello exchange is done, and reads on when it returns: no hand-over to another task (a
trip through the memory channel and a pass of the scheduler, a sizeable share of a tiny
message's round trip), and the same backpressure: while the handler runs, nothing is read.

*Sending.* Writes are serialised by one ``trio.Lock`` (FIFO, so concurrent requests go
out in call order) and each buffer that ``Connection.send`` returns is written as is: the
payload buffers of a tensor are never concatenated. Once a frame is handed to the
connection it is committed: if writing it fails or is cancelled, the connection is told
(``send_failed``), the stream is closed and the channel is *broken*, never "maybe sent".

*Receiving from peers nobody vouches for* (the consumer port): with :class:`ReceiveLimits`
the decoder grows payloads as their bytes arrive, every read is reserved from a
:class:`~drm_wire.net.budget.MemoryBudget` before it is made, and a frame must arrive
within its deadline (the rate and timeout of the limits). A stream that can decrypt in
place still does, into a payload's storage grown (and charged) just before the read
that needs the room: receiving those bytes as new ``bytes`` and appending them would
copy each payload several times over. A decoded message's bytes stay
charged until the handler returns, or until whoever takes them with
:meth:`MessageChannel.hold_payload` releases them. A frame that misses its deadline ends
the channel with a ``timeout`` error to the peer (``busy`` if it was our memory that was
short), as a :class:`~drm_wire.errors.RemoteProtocolError` of that code.

*Ending.* The first failure wins and is final: the peer's clean close, a protocol error,
a lost or broken stream, an ``Error`` from the peer, a refused hello, or :meth:`aclose`.
From then on every send and every waiter raises it (each its own copy, chained to the
cause; :mod:`drm_wire.net.channel_errors` says which class means what), and ``receive``
does once the messages that arrived intact before it are taken. When the *peer* broke
the protocol, the reader first tells it why with an ``Error`` frame (best effort, at
most :data:`ERROR_FRAME_TIMEOUT`), then makes the failure visible and closes the stream.
Nothing here logs: every failure reaches a caller as an exception, and the
per-connection boundary above logs it once.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Final, NoReturn, Protocol, TypeVar, runtime_checkable

import trio

from drm_wire.errors import DrmError, ErrorCode, PeerError, RemoteProtocolError
from drm_wire.framing import PayloadSink
from drm_wire.limits import HELLO_TIMEOUT
from drm_wire.messages import Error, HeldModel, Hello, Message, PeerRole, Refusal, Welcome
from drm_wire.net.budget import HEADER_READ, NO_CHARGE, PAYLOAD_READ, Charge, ReceiveLimits
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
    "ReceiveLimits",
    "open_channel",
    "run_channel",
]

#: Messages the reader may decode ahead of :meth:`MessageChannel.receive`. Each one can
#: carry a payload of up to ``MAX_PAYLOAD_BYTES`` (64 MiB), so every slot may cost that
#: much per connection. One slot lets the reader decode the next message while the
#: application handles the current one, which is all the overlap one ordered stream
#: offers; past it, the reader stops reading and the peer's writes block in TCP.
RECEIVE_BUFFER: Final = 1

#: Frames up to this size are joined into one buffer before they are sent. A frame is a
#: header and a payload; sent apart, a small request costs two TLS records, two
#: ``send`` system calls and two wake-ups of the peer, a large share of a tiny model's
#: round trip. Past this size the copy costs more than the extra call.
JOIN_BELOW: Final = 64 * 1024

#: See :meth:`MessageChannel.set_handler`.
MessageHandler = Callable[[Message], Awaitable[None]]

_C = TypeVar("_C", bound="MessageChannel")


@runtime_checkable
class ReceivesInto(Protocol):
    """A stream that can receive into a caller's buffer (see ``TLSStream.receive_into``)."""

    async def receive_into(self, buffer: memoryview) -> int:
        """Fill the start of ``buffer``; return the count, or 0 at the end of the stream."""
        ...


class MessageChannel:
    """Typed messages over a stream. Made by :func:`open_channel`, which runs its reader.

    Any number of tasks may :meth:`send` at once; what it receives is for one task, or for
    its handler.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        link: Link,
        side: Side,
        *,
        limits: ReceiveLimits | None = None,
    ) -> None:
        self._stream = stream
        self._limits = limits
        self._account = limits.budget.account() if limits is not None else None
        self._charge = NO_CHARGE
        self._conn = Connection(link, side, grow_payloads=limits is not None)
        self._send_lock = trio.Lock()
        self._inbox_send, self._inbox = trio.open_memory_channel[Message](RECEIVE_BUFFER)
        self._failure: Failure | None = None
        self._failure_cause: BaseException | None = None
        self._ended = trio.Event()
        self._handler: MessageHandler | None = None
        self._receive_into = stream.receive_into if isinstance(stream, ReceivesInto) else None

    def __repr__(self) -> str:
        state = "open" if self._failure is None else type(self._failure).__name__
        return (
            f"<{type(self).__name__} {self.link.value} {self.side.value} {state} "
            f"version={self.version} in_flight={self._conn.in_flight}>"
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
    def receiving(self) -> bool:
        """Whether part of a frame has arrived and the rest not yet."""
        return self._conn.mid_frame

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
        await self._send(message)

    async def _send(self, message: Message, committed: Callable[[], None] | None = None) -> None:
        """:meth:`send`; ``committed()`` runs once the connection took the message, before
        any of it is written (the request layer registers its request there)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # nothing sent yet: not a failure
        try:
            # Uncontended, skip the lock's own schedule point: send_all below is one, and
            # each costs a trip through the scheduler and an epoll call per message.
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            if self._failure is not None:
                self._raise_failure()
            buffers = self._conn.send(message)
            if committed is not None:
                committed()
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

    # --- receiving ------------------------------------------------------------------

    async def receive(self) -> Message:
        """The next message (on a request channel, one that no request took as its reply).

        Raises:
            ChannelClosed: the peer closed cleanly, or the channel was closed.
            RemoteProtocolError: the peer broke the protocol (it was told, and the
                connection closed).
            PeerError: the peer sent a connection-level ``Error`` and closed.
            ChannelBroken: the stream failed or a send was cut off.
        """
        try:
            return await self._inbox.receive()
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

    @property
    def ended(self) -> bool:
        """Whether the channel has ended (closed by either side, or failed)."""
        return self._ended.is_set()

    async def wait_ended(self) -> NoReturn:
        """Wait until the channel ends, then raise how it ended, as :meth:`receive` would
        (a clean close is :class:`ChannelClosed`)."""
        await self._ended.wait()
        self._raise_failure()

    def hold_payload(self) -> Charge:
        """From a handler: keep the memory of the message being handled charged after
        the handler returns, until the returned charge is released (a request task that
        keeps the message calls it, and releases the charge when done). Without
        :class:`ReceiveLimits`, or called twice, it is a charge of nothing."""
        charge, self._charge = self._charge, NO_CHARGE
        return charge

    def set_payload_sink(self, sink: PayloadSink | None) -> None:
        """Let ``sink`` choose where the payloads of later frames are received.

        For bulk data whose place is known from the header (a model chunk's offset in the
        model): it is written there directly, and the message carries a view of it.
        ``None`` restores the channel's own buffers (see :data:`~drm_wire.framing.PayloadSink`).
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
        held: tuple[HeldModel, ...] | None = None,
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
            held=held,
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

    # --- the reader ------------------------------------------------------------------

    async def _read_loop(self, until: Callable[[], bool] | None = None) -> None:
        """Read and dispatch until the channel ends, or until ``until()`` (the request
        layer reads on demand so, in the task that waits)."""
        cause: BaseException | None = None
        ended: Failure | None
        try:
            if self._limits is not None:
                assert until is None, "a channel with ReceiveLimits has a reader task"
                ended = await self._read_limited(self._limits)
            else:
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

    async def _read_limited(self, limits: ReceiveLimits) -> Failure:
        """:meth:`_read_messages` for an untrusted peer: every read reserved from the
        budget first, every frame under its deadline (see the module docstring)."""
        conn = self._conn
        account = self._account
        assert account is not None
        share = limits.budget.per_connection
        receive_into = self._receive_into
        started: float | None = None  # when the frame under way was first seen
        received = 0  # bytes read since
        while True:
            held = conn.held_bytes
            event = conn.next_message()
            if isinstance(event, NeedData):
                if started is None and conn.mid_frame:
                    started, received = trio.current_time(), 0
                deadline = math.inf if started is None else limits.frame_deadline(started, received)
                # Read ahead what the peer has shown it sends: a payload's reads grow with
                # the bytes it brought (up to PAYLOAD_READ), so an idle peer reserves one
                # small read, and a bulk sender reaches full-size reads within a few.
                want = HEADER_READ
                grow = 0
                if due := conn.payload_due:
                    want = min(PAYLOAD_READ, max(HEADER_READ, received), max(due, HEADER_READ))
                into = due > 0 and receive_into is not None
                if into and not conn.payload_room:
                    # Decrypt straight into the payload, whose storage is full: grow it by
                    # a read, or by what it holds once past PAYLOAD_READ (doubling, so a
                    # large payload takes a few steps), never past what is due.
                    grow = min(due, max(want, conn.payload_received))
                # (A share holds a full frame and a read: never below one byte.)
                want = max(1, min(want, share - conn.held_bytes))
                grow = min(grow, share - conn.held_bytes)
                target = conn.held_bytes + (grow if into else want)
                # Out of time while memory was short is our doing (busy); else the peer's.
                reserving = not account.fits(target)
                with trio.CancelScope(deadline=deadline) as scope:
                    await account.reserve_reading(target)
                    reserving = False
                    if into:
                        assert receive_into is not None
                        if grow > 0:
                            conn.grow_payload(grow)
                        room = conn.payload_buffer()
                        assert room is not None
                        with room:  # released before the storage may grow again
                            count = await receive_into(room)
                    else:
                        data = await self._stream.receive_some(want)
                if scope.cancelled_caught:
                    raise _frame_late(limits, started, received, reserving=reserving)
                if not into:
                    count = len(data)
                    conn.receive_data(data)
                elif count:
                    conn.payload_filled(count)
                else:
                    conn.receive_data(b"")  # the end of the stream, mid-payload
                if started is not None:
                    received += count
            elif isinstance(event, Closed):
                return ChannelClosed("the peer closed the connection")
            else:
                started = None
                self._charge = account.split(held - conn.held_bytes, keep_reading=HEADER_READ)
                try:
                    ended = await self._dispatch(event)
                finally:
                    self.hold_payload().release()
                if ended is not None:
                    return ended

    async def _dispatch(self, message: Message) -> Failure | None:
        if isinstance(message, Error) and message.request_id is None:
            return PeerError(message.code, message.message)
        if (
            self._handler is not None
            and self._conn.version is not None
            and not isinstance(message, Welcome)  # hello() takes it (the client's side)
        ):
            await self._handler(message)
            return None
        try:
            await self._enqueue(message)
        except trio.ClosedResourceError:
            return ChannelClosed("the channel was closed")  # _fail() ran meanwhile
        if isinstance(message, Refusal):
            return ChannelClosed("the server refused the hello")
        return None

    async def _enqueue(self, message: Message) -> None:
        """Put ``message`` in the inbox for :meth:`receive`, once a slot is free."""
        await self._inbox_send.send(message)

    # --- ending -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the channel and its stream; pending requests raise :class:`ChannelClosed`."""
        self._fail(ChannelClosed("the channel was closed"), None)
        await self._stream.aclose()

    def _fail(self, error: Failure, cause: BaseException | None) -> None:
        """Record the first failure and wake everything that waits on the channel."""
        if self._failure is not None:
            return
        self._failure, self._failure_cause = error, cause
        self._ended.set()
        self._inbox_send.close()
        if self._account is not None:
            self._account.close()

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


def open_channel(
    stream: trio.abc.Stream, link: Link, side: Side, *, limits: ReceiveLimits | None = None
) -> AbstractAsyncContextManager[MessageChannel]:
    """Run a :class:`MessageChannel` over ``stream`` for the duration of the block.

    ``limits``: receive from an untrusted peer under a memory budget and frame deadlines.

    On exit the reader is cancelled and the channel and stream are closed (gracefully, or
    forcefully when the block raised). An exception from the block propagates as itself,
    not wrapped in an exception group.
    """
    return run_channel(partial(MessageChannel, stream, link, side, limits=limits))


def _frame_late(
    limits: ReceiveLimits, started: float | None, received: int, *, reserving: bool
) -> RemoteProtocolError:
    """Why a frame missed its deadline, as the error the peer is told."""
    if reserving:
        return RemoteProtocolError(
            "the server's memory for requests is full; retry later", code=ErrorCode.BUSY
        )
    return RemoteProtocolError(
        f"a frame must arrive within {limits.frame_timeout:g} s, at {limits.min_rate:g} "
        f"bytes/s or more after {limits.rate_grace:g} s ({received} bytes came)",
        code=ErrorCode.TIMEOUT,
    )


@asynccontextmanager
async def run_channel(make: Callable[[], _C], *, reader_task: bool = True) -> AsyncIterator[_C]:
    """Run the channel ``make()`` builds, as :func:`open_channel` does: the one place that
    starts a channel's reader task (unless ``reader_task`` is false: the channel then
    reads on demand) and closes its stream, for every kind of channel."""
    channel = make()
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            if reader_task:
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
            await trio.aclose_forcefully(channel.stream)
    if body_error is not None:
        raise body_error
