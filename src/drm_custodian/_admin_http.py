"""Request plumbing for the admin API (:mod:`drm_custodian.admin`): bounded body reading,
strict form and JSON field parsing, and the error that ends a request.

Nothing here touches the ledger: every failure is an :class:`HttpError` raised before the
app acts, which is why every 4xx leaves the ledger unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope

from drm_wire.limits import MAX_GRANT_UNITS, KiB

#: Largest request body. The biggest legitimate one is a block reason (1 KiB of prose,
#: percent-encoded at most 3x); 4 KiB bounds what an attacker can make us buffer.
MAX_BODY_BYTES: Final = 4 * KiB
#: Time to receive a whole body once the headers are in. An operator's curl sends it in
#: one packet; 10 s tolerates a slow link but not a slowloris body.
BODY_TIMEOUT: Final = 10.0
#: Largest request line plus headers: h11 answers 400 past it while they are incomplete,
#: and the app answers 431 past it when they arrived in one read. An operator's curl
#: sends well under 1 KiB.
MAX_HEADER_BYTES: Final = 8 * KiB
#: Idempotency keys: bounded, and a charset that is safe in logs.
IDEMPOTENCY_KEY_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)
#: Threat model D03: ASCII digits, no sign, no leading zero, no separators, at most 10
#: digits (so the value is bounded before it is converted).
_COUNT_RE: Final = re.compile(r"[1-9][0-9]{0,9}", re.ASCII)
_FORM: Final = "application/x-www-form-urlencoded"
_JSON: Final = "application/json"


class HttpError(Exception):
    """Ends a request with ``status`` and a JSON error body; nothing was changed."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, object] = {"error": error, "message": message}
        if field is not None:
            self.body["field"] = field
        self.headers = dict(headers or {})


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Request:
    scope: HTTPScope
    receive: ASGIReceiveCallable
    client: str
    body_timeout: float

    def header(self, name: bytes) -> str | None:
        """The one value of header ``name`` (lower case); 400 if it was sent twice."""
        values = [v for k, v in self.scope["headers"] if k.lower() == name]
        if len(values) > 1:
            raise HttpError(400, "bad_request", "header sent more than once", field=name.decode())
        return values[0].decode("latin-1") if values else None


def json_response(status: int, doc: Mapping[str, object], **headers: str) -> Response:
    return Response(status, json.dumps(doc).encode() + b"\n", headers=headers)


def parse_count(value: object, *, text: bool) -> int:
    """Threat model D03: a plain ASCII decimal (``text``) or a JSON integer, in
    [1, MAX_GRANT_UNITS]; else 400."""
    if text and type(value) is str and _COUNT_RE.fullmatch(value):
        value = int(value)
    if type(value) is not int or not 1 <= value <= MAX_GRANT_UNITS:
        raise HttpError(
            400,
            "bad_request",
            f"must be a whole number from 1 to {MAX_GRANT_UNITS}, in plain digits",
            field="number_inferences",
        )
    return value


async def read_body(request: Request) -> bytes:
    length = request.header(b"content-length")
    if length is not None and (not length.isascii() or not length.isdigit()):
        raise HttpError(400, "bad_request", "invalid Content-Length", field="Content-Length")
    if length is not None and int(length) > MAX_BODY_BYTES:
        raise HttpError(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    try:
        with trio.fail_after(request.body_timeout):
            while True:
                event = await request.receive()
                if event["type"] != "http.request":  # http.disconnect
                    raise HttpError(400, "bad_request", "client went away")
                body += event.get("body", b"")
                if len(body) > MAX_BODY_BYTES:
                    raise HttpError(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")
                if not event.get("more_body", False):
                    return bytes(body)
    except trio.TooSlowError:
        raise HttpError(
            408, "timeout", f"body not received within {request.body_timeout} s"
        ) from None


async def read_fields(
    request: Request, *, allowed: set[str], required: bool, optional: frozenset[str] = frozenset()
) -> tuple[dict[str, object], bool]:
    """The body as a flat map of fields, each at most once, all known; and whether it was
    a form (all values text) rather than JSON (typed values). With ``required``, every
    field of ``allowed`` must be there; those of ``optional`` may be."""
    known = allowed | optional
    content_type = request.header(b"content-type")
    body = await read_body(request)
    if not body and content_type is None and not required:
        return {}, False
    media = (content_type or "").partition(";")[0].strip().lower()
    if media == _FORM:
        try:
            parsed = parse_qs(
                body.decode("ascii"),
                keep_blank_values=True,
                strict_parsing=bool(body),
                max_num_fields=len(known) + 1,
                errors="strict",
            )
        except ValueError as exc:  # UnicodeDecodeError too
            raise HttpError(
                400, "bad_request", f"malformed form body: {exc}", field="body"
            ) from None
        for name, values in parsed.items():
            if len(values) != 1:
                raise HttpError(400, "bad_request", "given more than once", field=name)
        fields: dict[str, object] = {name: values[0] for name, values in parsed.items()}
    elif media == _JSON:
        try:
            doc = json.loads(
                body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
            )
        except (ValueError, RecursionError) as exc:  # 4 KiB of "[" nests too deep to parse
            raise HttpError(400, "bad_request", f"malformed JSON: {exc}", field="body") from None
        if not isinstance(doc, dict):
            raise HttpError(400, "bad_request", "must be a JSON object", field="body")
        fields = doc
    else:
        raise HttpError(
            415,
            "unsupported_media_type",
            f"send {_FORM} or {_JSON}",
            headers={"Accept-Post": f"{_FORM}, {_JSON}"},
        )
    for name in fields:
        if name not in known:
            raise HttpError(400, "bad_request", "unknown field", field=name[:64])
    if required:
        missing = sorted(allowed - fields.keys())
        if missing:
            raise HttpError(400, "bad_request", "required", field=missing[0])
    return fields, media == _FORM


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise _DuplicateKey("a key appears twice")
    return doc


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


async def lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
