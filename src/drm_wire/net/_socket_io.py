"""The TCP socket under a :class:`~drm_wire.net.tls.TLSStream`, read and written directly.

Over a ``trio.SocketStream`` (every TCP link) the TLS stream reads and writes the
socket's descriptor itself (:func:`receive`: ``os.readv`` into one buffer per thread;
:func:`send_all`: ``os.write``; waiting in trio with ``wait_readable`` /
``wait_writable``) instead of calling the transport's ``send_all`` and ``receive_some``:
those wrap each system call in several layers of Python (conflict detection, error
translation, a context manager per call), about a ninth of the instructions of a small
message's round trip. The behaviour is the same: one schedule point per send, a closed
socket is ``trio.ClosedResourceError`` (closing it wakes a waiting task), and a failed
call is the ``OSError`` the stream turns into ``trio.BrokenResourceError``. Any other
transport (memory streams in tests) is used through its ``Stream`` methods.

Also here: the kernel buffer sizes each TCP link asks for (:func:`bulk_buffers`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Final

import trio

from drm_wire.limits import KiB

__all__ = [
    "READ_BYTES",
    "SOCKET_BUFFER_BYTES",
    "bulk_buffers",
    "own_socket",
    "receive",
    "send_all",
    "socket_buffer_size",
]

#: The most one transport read takes: 16 TLS records.
READ_BYTES: Final = 256 * KiB


def own_socket(transport_stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket to read and write directly, if ``transport_stream`` is a plain TCP
    ``trio.SocketStream`` on a system whose ``os.readv`` / ``os.write`` take sockets."""
    if type(transport_stream) is not trio.SocketStream or os.name != "posix":
        return None
    return transport_stream.socket


async def send_all(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``sock``, as ``SocketStream.send_all`` does, with one
    schedule point (the first wait, or a shielded checkpoint if none was needed).

    Raises:
        trio.ClosedResourceError: the socket is closed, or was closed while we waited.
        OSError: the write failed (the peer reset the connection, say).
    """
    view = memoryview(data)
    sent = 0
    waited = False
    while sent < len(view):
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the transport socket was closed")
        try:
            sent += os.write(fd, view[sent:])
        except BlockingIOError:
            waited = True
            await trio.lowlevel.wait_writable(sock)
    if not waited:
        await trio.lowlevel.cancel_shielded_checkpoint()


class _ReceiveBuffer(threading.local):
    """One transport read buffer per thread, shared by every stream the thread runs.

    A read lands here and is copied into OpenSSL's BIO before the task yields, so no
    two reads ever need it at once. A new ``bytes`` per read instead meant allocating
    :data:`READ_BYTES` and shrinking it to the few hundred bytes a small message takes,
    which fragments the heap: under consumers that reconnect often, the enclave's RSS
    kept rising; with this buffer it levels off (``bench/soak.py``). ``malloc_trim`` gave
    that memory back in both cases: it is free heap, not live objects.
    """

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_BYTES))


_RECEIVE_BUFFER = _ReceiveBuffer()


async def receive(sock: trio.socket.SocketType) -> tuple[memoryview, bool]:
    """Read what ``sock`` has (up to :data:`READ_BYTES`; empty at EOF), waiting for
    some if it has nothing; and whether it waited. Not a schedule point unless it waits:
    the stream's receive methods add the one they promise.

    The bytes are a view of this thread's :class:`_ReceiveBuffer`: use them before the
    next schedule point.

    Raises:
        trio.ClosedResourceError: the socket is closed, or was closed while we waited.
        OSError: the read failed.
    """
    view = _RECEIVE_BUFFER.view
    waited = False
    while True:
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the transport socket was closed")
        try:
            return view[: os.readv(fd, (view,))], waited
        except BlockingIOError:
            waited = True
            await trio.lowlevel.wait_readable(sock)


#: Kernel buffers asked for on each side of a TLS connection. With the defaults a 2.76 MB
#: tensor went out in many small steps, each waking the peer, until autotuning grew the
#: buffers, if it did; with these, such a request is quicker and its time steadier
#: (docs/production.md, *Measurements behind the design*).
SOCKET_BUFFER_BYTES: Final = 4 * 1024 * KiB

#: Where Linux caps what a process may ask for. Asking fixes the size and turns TCP's
#: autotuning off for that buffer, so we only ask where the cap allows the whole amount:
#: a buffer locked at a small cap (208 KiB on many hosts) would cap a long-haul link's
#: window far below what autotuning reaches (~6 MiB by default), and the custodian link
#: carries whole models across sites.
_BUFFER_CAPS: Final = {
    socket.SO_SNDBUF: "/proc/sys/net/core/wmem_max",
    socket.SO_RCVBUF: "/proc/sys/net/core/rmem_max",
}


def socket_buffer_size(option: int) -> int | None:
    """What to ask for ``option`` (SO_SNDBUF or SO_RCVBUF), or ``None`` to leave the
    kernel's autotuning alone (the cap is lower, or unknown: not Linux)."""
    try:
        with open(_BUFFER_CAPS[option], "rb") as cap_file:
            cap = int(cap_file.read())
    except (OSError, ValueError):
        return None
    return SOCKET_BUFFER_BYTES if cap >= SOCKET_BUFFER_BYTES else None


def bulk_buffers(transport_stream: trio.abc.Stream) -> None:
    """Ask for :data:`SOCKET_BUFFER_BYTES` on a TCP transport where the kernel allows it."""
    sock = getattr(transport_stream, "socket", None)
    if sock is None or sock.type != socket.SOCK_STREAM:
        return
    for option in _BUFFER_CAPS:
        size = socket_buffer_size(option)
        if size is not None:
            with contextlib.suppress(OSError):  # a tuning, not a requirement
                sock.setsockopt(socket.SOL_SOCKET, option, size)
