"""Requests matched to their replies over a channel: the consumer client's side of its link.

The module is named for the class it holds, :class:`RequestChannel`: a
:class:`~drm_wire.net.channel.MessageChannel` that can also ask (``requests`` alone would
read as the HTTP library). Only the consumer link has requests and only its client asks
them, so the daemons do not use this layer, and a reader of :mod:`drm_wire.net.channel`
need not hold it in mind.

Theory of operation
-------------------
:func:`open_request_channel` runs a :class:`RequestChannel` as
:func:`~drm_wire.net.channel.open_channel` runs the core channel, over the same reader,
writer and ending. :meth:`RequestChannel.request` sends a request and waits for its
reply; any number may be in flight at once.

*Matching replies.* The sans-IO :class:`~drm_wire.protocol.Connection` keeps the one
record of which request ids are in flight: it refuses to send an id that is in flight,
and refuses a reply (or a ``Waiting``) that answers none. This layer only records who
waits for which reply: ``_pending`` maps an id to its waiting caller. The entry is made
when the connection takes the request, under the send lock and before any byte of it is
written, so no reply can come before it; it goes when the reply comes, when the caller
gives up (cancelled, or its ``on_waiting`` raised) or when the channel fails. A reply the
connection accepted but that nobody waits for therefore answers a request whose caller
gave up: it is dropped, as are its ``Waiting`` messages. (So send requests through
:meth:`~RequestChannel.request`: a reply to one sent with ``send`` is dropped too.) A
``Waiting`` goes to its request's ``on_waiting`` callback, called in the reading task;
every other message goes where the core channel puts it (its inbox, or its handler).

*Reading on demand* (``open_request_channel(..., read_on_demand=True)``, the consumer
client's way) is for a link whose server speaks only to answer: the state machine lets
nothing else through after the welcome. There is no reader task: the task waiting for a
reply, or in :meth:`RequestChannel.receive`, reads the stream itself, one task at a
time. The others wait to be woken, either by their reply (read by the reading task) or
by the turn, which a reader hands to the longest waiting task that is not done once its
own reply came (or it was cancelled). A reply is then not handed from a reader task to
the requester, which saves a pass of the scheduler and a hand-over per round trip, in
wall time and in client CPU. An idle connection reads nothing, so a peer that closes it
is noticed by the next request, which fails as it would have.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Final, overload

import trio

from drm_wire.errors import PeerError, RemoteProtocolError
from drm_wire.messages import (
    Error,
    InferenceRequest,
    InferenceResult,
    Message,
    ModelInfo,
    ModelInfoRequest,
    Waiting,
)
from drm_wire.net.channel import MessageChannel, run_channel
from drm_wire.net.channel_errors import Failure
from drm_wire.protocol import Link, Side

__all__ = ["RequestChannel", "WaitingCallback", "open_request_channel"]

#: Called with each ``Waiting`` for a request; see :meth:`RequestChannel.request`.
WaitingCallback = Callable[[Waiting], object]

#: Request type -> the reply that finishes it (besides an ``Error`` with its id).
_REPLY_TO: Final[dict[type[Message], type[InferenceResult] | type[ModelInfo]]] = {
    InferenceRequest: InferenceResult,
    ModelInfoRequest: ModelInfo,
}


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


class RequestChannel(MessageChannel):
    """A :class:`~drm_wire.net.channel.MessageChannel` that can also ask, and wait for the
    answer. Made by :func:`open_request_channel`.

    Any number of tasks may call :meth:`send` and :meth:`request` at once; messages that
    are not replies to a request are meant for one receiving task.
    """

    def __init__(
        self, stream: trio.abc.Stream, link: Link, side: Side, *, read_on_demand: bool = False
    ) -> None:
        super().__init__(stream, link, side)
        #: Requests whose caller waits for the reply, by id (see the module docstring).
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._on_demand = read_on_demand
        #: Reading on demand: whether a task is reading, and the others that wait (FIFO).
        self._reading = False
        self._waiters: list[_Waiter] = []

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
            on_waiting: called from the reading task with each ``Waiting`` for this
                request. It must not block; an exception it raises is raised here instead
                of a reply.

        Raises:
            PeerError: the peer answered with an ``Error``; the channel stays open.
            LocalProtocolError: the request id is already in flight.
            ChannelClosed, ChannelBroken, RemoteProtocolError, PeerError: the channel ended
                before the reply came (the error has a note naming the request).
        """
        request_id = message.request_id
        pending = _Pending(_REPLY_TO[type(message)], on_waiting)

        def committed() -> None:  # the connection took it: from now on a reply may come
            self._pending[request_id] = pending

        try:
            await self._send(message, committed)
            if self._on_demand:
                await self._read_on_demand(pending.waiter)
            else:
                await pending.done.wait()
        except BaseException:
            if self._pending.get(request_id) is pending:
                del self._pending[request_id]  # given up: its reply is dropped when it comes
            raise
        reply = pending.reply
        if reply is None:
            if pending.callback_error is not None:
                raise pending.callback_error
            self._raise_failure(note=f"request {request_id} was in flight")
        if isinstance(reply, Error):
            raise PeerError(reply.code, reply.message, request_id)
        return reply

    async def receive(self) -> Message:
        """The next message that is not a reply to :meth:`request`; reading on demand,
        the calling task reads it when no other task is reading.

        Raises:
            ChannelClosed, RemoteProtocolError, PeerError, ChannelBroken: as
                :meth:`MessageChannel.receive <drm_wire.net.channel.MessageChannel.receive>`.
        """
        if not self._on_demand:
            return await super().receive()
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    return self._inbox.receive_nowait()
                except trio.WouldBlock:
                    await self._read_on_demand(_Waiter(self._until_received))
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._raise_failure()

    # --- replies --------------------------------------------------------------------

    async def _dispatch(self, message: Message) -> Failure | None:
        if (
            isinstance(message, Waiting | InferenceResult | ModelInfo | Error)
            and message.request_id is not None
        ):
            # The connection checked that it answers a request in flight: if nobody waits
            # for it, its caller gave up, and it is dropped.
            pending = self._pending.get(message.request_id)
            if pending is not None:
                self._answer(message.request_id, pending, message)
            return None
        return await super()._dispatch(message)

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

    # --- reading on demand ------------------------------------------------------------

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

    async def _enqueue(self, message: Message) -> None:
        if not self._on_demand:
            await super()._enqueue(message)
            return
        # A turn that reads a message for the inbox ends there (_until_received): the slot
        # is free, and no cancellation can fall between decode and store.
        self._inbox_send.send_nowait(message)

    # --- failure ----------------------------------------------------------------------

    def _fail(self, error: Failure, cause: BaseException | None) -> None:
        """Fail the channel, and with it every request still waiting and every reader."""
        super()._fail(error, cause)
        for waiter in self._waiters:
            waiter.wake.set()
        for pending in self._pending.values():
            pending.done.set()
        self._pending.clear()


def open_request_channel(
    stream: trio.abc.Stream, link: Link, side: Side, *, read_on_demand: bool = False
) -> AbstractAsyncContextManager[RequestChannel]:
    """Run a :class:`RequestChannel` over ``stream`` for the duration of the block.

    With ``read_on_demand``, no reader task runs: the tasks that wait read (see the module
    docstring). Otherwise as :func:`~drm_wire.net.channel.open_channel`.
    """
    make = partial(RequestChannel, stream, link, side, read_on_demand=read_on_demand)
    return run_channel(make, reader_task=not read_on_demand)
