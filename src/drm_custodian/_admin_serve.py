"""Hypercorn's trio worker for the admin API, with a look at each connection's first byte.

Theory of operation
-------------------
``hypercorn.trio.serve`` wraps its listening sockets in a ``trio.SSLListener``: a plain
``http://`` request to the HTTPS port then fails inside the TLS handshake, and the client
gets an empty reply (curl: "Empty reply from server"), which says nothing of the cause.
:func:`serve_https` runs the same pieces of hypercorn (its ``TCPServer`` per connection,
its worker context and shutdown) over plain TCP listeners and starts TLS per connection
itself, after peeking at the first byte the client sent:

* a TLS record starts with a content type byte (a handshake is 22): TLS goes on, exactly
  as under ``hypercorn.trio.serve``;
* an HTTP request starts with its method, an ASCII capital letter: the request head is
  read with h11 (bounded by :data:`~drm_custodian._admin_http.MAX_HEADER_BYTES` and the
  read timeout) and answered with a plain-text ``400`` that names the ``https://`` URL of
  this port, then the connection is closed. Nothing of the request is acted on and no
  token is read: the same request over TLS goes through the whole pipeline.

The peek costs one ``recv(MSG_PEEK)`` per connection and takes nothing from the stream.
A client that sends nothing within the TLS handshake timeout is closed, as before.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from typing import Final

import h11
import structlog
import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from drm_custodian._admin_http import MAX_HEADER_BYTES
from drm_wire.net.address import format_address

__all__ = ["PLAIN_HTTP_HINT", "serve_https"]

log = structlog.get_logger(__name__)

#: The body of the answer to plain HTTP; ``{url}`` is this port's ``https://`` URL.
PLAIN_HTTP_HINT: Final = "this port speaks HTTPS: use {url}\n"
#: Bytes of a refused request's body read (and dropped) after the answer, so that closing
#: the socket does not reset the connection before the client has read the answer.
_DRAIN_BYTES: Final = 64 * 1024
_DRAIN_TIMEOUT: Final = 1.0


async def serve_https(
    app: ASGIFramework,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` as ``hypercorn.trio.serve(app, config, mode="asgi")`` does (binds,
    graceful shutdown, ``task_status`` with the bound ``https://`` URLs), answering plain
    HTTP with a 400 that says to use HTTPS (see the module docstring)."""
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    context = WorkerContext(None)
    ssl_context = config.create_ssl_context()
    assert ssl_context is not None, "the admin API is HTTPS only"
    listeners = []
    binds = []
    for sock in config.create_sockets().secure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")

    async def connection(tcp: trio.SocketStream) -> None:
        first = b""
        with trio.move_on_after(config.ssl_handshake_timeout):
            with suppress(OSError):  # the client went away
                first = await tcp.socket.recv(1, socket.MSG_PEEK)
        if first.isupper():
            with suppress(OSError, trio.BrokenResourceError):
                await _answer_plain_http(tcp, config)
        elif first:
            stream = trio.SSLStream(tcp, ssl_context, server_side=True, https_compatible=True)
            await TCPServer(wrapped, config, context, {}, stream)
        await trio.aclose_forcefully(tcp)

    async with trio.open_nursery() as server_nursery:
        task_status.started(binds)
        try:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                if shutdown_trigger is not None:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                nursery.start_soon(raise_shutdown, context.terminate.wait)
                nursery.start_soon(
                    partial(
                        trio.serve_listeners, connection, listeners, handler_nursery=server_nursery
                    )
                )
                await trio.sleep_forever()
        except BaseExceptionGroup as error:
            _, others = error.split((ShutdownError, KeyboardInterrupt))
            if others is not None:
                raise others from None
        finally:
            await context.terminated.set()
            server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout


async def _answer_plain_http(tcp: trio.SocketStream, config: Config) -> None:
    """Read a plain-HTTP request head (h11) and answer 400 with this port's HTTPS URL."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    host, port = tcp.socket.getsockname()[:2]
    client = format_address(*tcp.socket.getpeername()[:2])
    request: h11.Request | None = None
    with trio.move_on_after(config.read_timeout or 10):
        try:
            while request is None:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await tcp.receive_some(16 * 1024)
                    conn.receive_data(data)
                    if not data:
                        break
                elif isinstance(event, h11.Request):
                    request = event
                else:
                    break
        except h11.RemoteProtocolError:
            pass
    log.info("admin_plain_http_refused", client=client, parsed=request is not None)
    if request is None:
        return  # not HTTP after all, or too slow: closed without an answer
    url = f"https://{format_address(host, port)}/"
    body = PLAIN_HTTP_HINT.format(url=url).encode()
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    with trio.move_on_after(config.read_timeout or 10):
        await tcp.send_all(
            conn.send(h11.Response(status_code=400, headers=headers))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
        await tcp.send_eof()
    drained = 0
    with trio.move_on_after(_DRAIN_TIMEOUT):
        while drained < _DRAIN_BYTES and (data := await tcp.receive_some(16 * 1024)):
            drained += len(data)
