"""How a :class:`~drm_wire.net.channel.MessageChannel` ends: what its callers see, what its
peer is told.

A channel fails once and for good (see the theory of operation in
:mod:`drm_wire.net.channel`), and every call that waits on it then raises how it ended:
a clean end is :class:`ChannelClosed`; a lost or cut stream is :class:`ChannelBroken`; a
peer that broke the protocol is a :class:`~drm_wire.errors.RemoteProtocolError`; an
``Error`` from the peer is a :class:`~drm_wire.errors.PeerError`; a refused hello is a
:class:`HelloRefused`. The channel keeps the first failure as a :data:`Failure` and gives
each waiter its own copy (:func:`copy_failure`), chained to the cause.

A peer that broke the protocol, or missed the hello deadline, is first told why: one
connection-level ``Error`` frame, the channel's last words (:func:`send_last_words`),
within :data:`ERROR_FRAME_TIMEOUT`.

The names are importable from :mod:`drm_wire.net.channel` too, where their users find
them.
"""

from __future__ import annotations

from typing import Final

import trio

from drm_wire.errors import DrmError, ErrorCode, PeerError, RemoteProtocolError
from drm_wire.messages import Error
from drm_wire.protocol import Connection

__all__ = [
    "ERROR_FRAME_TIMEOUT",
    "ChannelBroken",
    "ChannelClosed",
    "ChannelError",
    "Failure",
    "HelloRefused",
    "copy_failure",
    "send_last_words",
]

#: How long a peer that broke the protocol (or missed the hello deadline) gets to take the
#: ``Error`` frame that says why, before the stream is closed. Short, so that a peer that
#: stops reading cannot hold the connection open; the same as TLS's close_notify budget.
ERROR_FRAME_TIMEOUT: Final = 1.0


class ChannelError(DrmError):
    """The channel can carry no more messages. The subclass says how it ended."""


class ChannelClosed(ChannelError):
    """The channel ended cleanly: the peer closed between frames, or we closed it."""


class ChannelBroken(ChannelError):
    """The stream failed, or a send was cut off part-way: bytes may have been lost."""


class HelloRefused(PeerError):
    """The server refused our hello; ``supported_versions`` are the versions it speaks."""

    def __init__(self, code: ErrorCode, message: str, supported_versions: tuple[int, ...]) -> None:
        super().__init__(code, message)
        self.supported_versions = supported_versions


#: What ends a channel, as it keeps it.
Failure = RemoteProtocolError | PeerError | ChannelError


def copy_failure(error: Failure) -> Failure:
    """A fresh exception like ``error``, for one more task to raise.

    An exception object is raised in one task only: raising it again elsewhere would
    splice that task's frames into its traceback.
    """
    if isinstance(error, RemoteProtocolError):
        return RemoteProtocolError(
            error.message,
            code=error.code,
            field=error.field,
            limit=error.limit,
            got=error.got,
            state=error.state,
        )
    if isinstance(error, PeerError):
        return PeerError(error.code, error.detail, error.request_id)
    return type(error)(*error.args)


async def send_last_words(conn: Connection, stream: trio.abc.Stream, message: Error) -> None:
    """Write ``message``, a connection-level ``Error``, as ``conn``'s last frame.

    Best effort: a peer that is gone is not told. The caller holds the send lock and
    bounds the wait (:data:`ERROR_FRAME_TIMEOUT`); a write cut off part-way breaks
    ``conn``.
    """
    try:
        for buffer in conn.send_error(message):
            await stream.send_all(buffer)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer is gone: there is nobody left to tell
    except BaseException:
        conn.send_failed()
        raise
