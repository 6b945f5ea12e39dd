"""What the two HTTP front ends share: the custodian's admin API and the consumer's
inference gateway are ASGI apps on hypercorn's trio worker, and both end a bad request
the same way before acting on it.

hypercorn (h11) parses HTTP; what is left to an app, and written once here, is reading a
body under a size limit and a deadline (hypercorn buffers nothing for us: a body arrives as
the client sends it), reading a header that must appear at most once, and answering the
lifespan protocol. Each app renders :class:`HttpError` in its own body format: the admin
API names a code and the field at fault, the gateway answers the Open Inference Protocol's
``{"error": message}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

__all__ = [
    "HttpApp",
    "HttpError",
    "Response",
    "check_header_size",
    "header",
    "json_response",
    "lifespan",
    "read_body",
    "send_response",
]


class HttpError(Exception):
    """Ends a request with ``status`` before the app changed anything.

    ``code`` is a stable snake_case name for programs (``bad_request``, ``too_large``,
    ...), the message is for people, ``field`` names the header, form field or part of the
    body at fault when there is one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.headers = dict(headers or {})


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def json_response(status: int, document: object, **headers: str) -> Response:
    return Response(status, json.dumps(document).encode() + b"\n", headers=headers)


def check_header_size(scope: HTTPScope, limit: int) -> None:
    """431 when the request line's headers are over ``limit`` bytes as sent (name, value,
    ": " and CRLF). h11 bounds headers only while they are incomplete; this bounds what
    arrived whole in one read."""
    if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > limit:
        raise HttpError(431, "headers_too_large", f"headers over {limit} bytes")


def header(scope: HTTPScope, name: bytes) -> str | None:
    """The one value of header ``name`` (lower case), or ``None``; 400 if it came twice
    (two values of one header are two answers to one question: take neither)."""
    values = [v for k, v in scope["headers"] if k.lower() == name]
    if len(values) > 1:
        text = name.decode("latin-1")
        raise HttpError(400, "bad_request", f"header {text} sent more than once", field=text)
    return values[0].decode("latin-1") if values else None


async def read_body(
    scope: HTTPScope, receive: ASGIReceiveCallable, *, limit: int, time_limit: float
) -> bytes:
    """The whole body: at most ``limit`` bytes, all of it within ``time_limit`` seconds.

    A ``Content-Length`` over the limit is refused (413) before a byte of the body is
    read; one that lies is caught as the bytes arrive. The chunks are joined once at the
    end: growing one buffer chunk by chunk cost a large body several copies.
    """
    length = header(scope, b"content-length")
    if length is not None and (not length.isascii() or not length.isdigit()):
        raise HttpError(400, "bad_request", "invalid Content-Length", field="Content-Length")
    too_large = HttpError(413, "too_large", f"body over {limit} bytes")
    if length is not None and int(length) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        with trio.fail_after(time_limit):
            while True:
                event = await receive()
                if event["type"] != "http.request":  # http.disconnect
                    raise HttpError(400, "bad_request", "the client went away")
                chunk = event.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
                if not event.get("more_body", False):
                    return b"".join(chunks)
    except trio.TooSlowError:
        raise HttpError(408, "timeout", f"body not received within {time_limit:g} s") from None


async def send_response(
    send: ASGISendCallable, response: Response, *extra: tuple[bytes, bytes]
) -> None:
    """Send ``response`` whole, with its length and type and the ``extra`` headers."""
    headers = [
        (b"content-type", response.content_type.encode()),
        (b"content-length", str(len(response.body)).encode()),
        *extra,
        *((k.lower().encode(), v.encode()) for k, v in response.headers.items()),
    ]
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": headers,
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


async def lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Answer hypercorn's lifespan protocol: nothing to start or stop."""
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class HttpApp:
    """An ASGI app that serves HTTP in :meth:`http` and answers lifespan events; a
    websocket is refused (returning without accepting makes hypercorn answer 403)."""

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http":
            await self.http(scope, receive, send)

    async def http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        raise NotImplementedError
