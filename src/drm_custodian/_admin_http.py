"""Request plumbing for the admin API (:mod:`drm_custodian.admin`): bounded body reading,
strict form and JSON field parsing, and the error that ends a request.

Nothing here touches the ledger: every failure is an :class:`HttpError` raised before the
app acts, which is why every 4xx leaves the ledger unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs

from hypercorn.typing import ASGIReceiveCallable, HTTPScope

from drm_daemon import asgi
from drm_daemon.asgi import HttpError, Response, header, json_response
from drm_wire.limits import MAX_GRANT_UNITS, KiB

__all__ = [
    "BODY_TIMEOUT",
    "IDEMPOTENCY_KEY_RE",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "HttpError",
    "Request",
    "Response",
    "error_body",
    "json_response",
    "parse_count",
    "read_body",
    "read_fields",
]

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


def error_body(exc: HttpError) -> dict[str, object]:
    """The admin API's error document: a stable code, a message, the field at fault."""
    body: dict[str, object] = {"error": exc.code, "message": str(exc)}
    if exc.field is not None:
        body["field"] = exc.field
    return body


@dataclass(frozen=True, slots=True)
class Request:
    scope: HTTPScope
    receive: ASGIReceiveCallable
    client: str
    body_timeout: float

    def header(self, name: bytes) -> str | None:
        """The one value of header ``name`` (lower case); 400 if it was sent twice."""
        return header(self.scope, name)


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
    return await asgi.read_body(
        request.scope, request.receive, limit=MAX_BODY_BYTES, time_limit=request.body_timeout
    )


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
