"""The admin API's hostile catalogue (threat model D01, D03, D08): exact status codes, and
every refused request leaves the ledger and the hooks untouched."""

from __future__ import annotations

import http.client
import json
import os
import ssl
from collections.abc import Iterable
from urllib.parse import quote

import pytest
import structlog
import trio

from drm_wire.limits import MAX_GRANT_UNITS

from .admin_server import FORM, JSON, Reply, Server
from .admin_server import server as server  # the fixture

SUPPLY = "/supply_inferences"


async def _refused(
    server: Server,
    status: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: Iterable[tuple[str, str]] = (),
    *,
    auth: bool = True,
) -> Reply:
    """Send one request; check its status, and that nothing changed."""
    await server.ledger.supply("borrower", 7, idempotency_key="baseline")
    before = await server.balance()
    calls = len(server.hooks.calls)
    reply = await server.call(method, path, body, headers, auth=auth)
    assert reply.status == status, reply.body
    assert await server.balance() == before
    assert len(server.hooks.calls) == calls
    if method != "HEAD" and reply.headers.get("content-type") == "application/json":
        assert reply.json()["error"]
    return reply


# --- D01: authentication --------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer short",
        "Bearer " + "A" * 43,
        "Bearer " + "A" * 500,
        "Bearer é",
    ],
)
async def test_missing_or_wrong_token_is_401(server: Server, authorization: str | None) -> None:
    headers = [FORM] + ([("Authorization", authorization)] if authorization is not None else [])
    reply = await _refused(server, 401, "POST", SUPPLY, b"number_inferences=5", headers, auth=False)
    assert reply.headers["www-authenticate"].startswith("Bearer")


async def test_token_one_character_off_is_401(server: Server) -> None:
    token = server.state.admin_token
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    for candidate in (wrong, token + "A", token[:-1], token.upper()):
        header = [("Authorization", f"Bearer {candidate}"), FORM]
        await _refused(server, 401, "POST", SUPPLY, b"number_inferences=5", header, auth=False)


async def test_two_authorization_headers_are_401(server: Server) -> None:
    # The right token and a wrong one: the server must not pick the one it likes.
    headers = [*server.auth, ("Authorization", "Bearer nope"), FORM]
    await _refused(server, 401, "POST", SUPPLY, b"number_inferences=5", headers, auth=False)


async def test_token_in_the_query_string_is_refused(server: Server) -> None:
    token = server.state.admin_token
    await _refused(server, 401, "GET", f"/usage?access_token={token}", auth=False)
    await _refused(server, 400, "GET", f"/usage?access_token={token}")


async def test_bearer_scheme_is_case_insensitive(server: Server) -> None:
    headers = [("Authorization", f"bearer {server.state.admin_token}")]
    assert (await server.call("GET", "/usage", headers=headers, auth=False)).status == 200


# --- D03: numbers ---------------------------------------------------------------------

BAD_NUMBERS = [
    "-1",
    "+1",
    "1e3",
    "1_000",
    "1,000",
    "1.5",
    "0x10",
    "abc",
    "\u0665",  # ARABIC-INDIC DIGIT FIVE: int() accepts it
    "\uff15",  # FULLWIDTH DIGIT FIVE: so does this
    " 5",
    "5 ",
    "5\n",
    "05",
    "0",
    "",
    str(MAX_GRANT_UNITS + 1),
    str(2**63),
    "9" * 4000,
]


@pytest.mark.parametrize("value", BAD_NUMBERS)
async def test_bad_number_in_a_form_is_400(server: Server, value: str) -> None:
    body = f"number_inferences={quote(value)}".encode()
    reply = await _refused(server, 400, "POST", SUPPLY, body, [FORM])
    assert reply.json()["field"] == "number_inferences"


@pytest.mark.parametrize(
    "value", ["5", 0, -1, 1.5, 5.0, True, None, [5], {"n": 5}, MAX_GRANT_UNITS + 1, 2**64]
)
async def test_bad_number_in_json_is_400(server: Server, value: object) -> None:
    body = json.dumps({"number_inferences": value}).encode()
    reply = await _refused(server, 400, "POST", SUPPLY, body, [JSON])
    assert reply.json()["field"] == "number_inferences"


async def test_the_largest_number_is_accepted(server: Server) -> None:
    body = f"number_inferences={MAX_GRANT_UNITS}".encode()
    assert (await server.call("POST", SUPPLY, body, [FORM])).status == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"number_inferences=1&number_inferences=2", "number_inferences"),
        (b"number_inferences=5&owner=other", "owner"),
        (b"number_inferences=5&borrower=..", "borrower"),
        (b"other=5", "other"),
        (b"", "number_inferences"),
        (b"number_inferences", "body"),
        (b"number_inferences=5&&", "body"),
        (b"number_inferences=%ff", "body"),
        ("number_inferences=\u0665".encode(), "body"),  # a raw non-ASCII byte in a form body
    ],
)
async def test_malformed_form_is_400(server: Server, body: bytes, field: str) -> None:
    reply = await _refused(server, 400, "POST", SUPPLY, body, [FORM])
    assert reply.json()["field"] == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{", "body"),
        (b"", "body"),
        (b"[5]", "body"),
        (b"5", "body"),
        (b'{"number_inferences": 5, "number_inferences": 6}', "body"),
        (b'{"number_inferences": NaN}', "body"),
        (b'{"number_inferences": 1e3}', "number_inferences"),
        (b'{"number_inferences": 5, "extra": 1}', "extra"),
        (b"{}", "number_inferences"),
        (b'\xff{"number_inferences": 5}', "body"),
        (b"[" * 4000, "body"),
        (b'{"number_inferences": ' + b"[" * 3000 + b"]" * 1000, "body"),
    ],
)
async def test_malformed_json_is_400(server: Server, body: bytes, field: str) -> None:
    reply = await _refused(server, 400, "POST", SUPPLY, body, [JSON])
    assert reply.json()["field"] == field


@pytest.mark.parametrize("key", ["", "x" * 129, "has space", "semi;colon", "ünïcode", "new\tline"])
async def test_bad_idempotency_key_is_400(server: Server, key: str) -> None:
    headers = [FORM, ("Idempotency-Key", key)]
    reply = await _refused(server, 400, "POST", SUPPLY, b"number_inferences=5", headers)
    assert reply.json()["field"] == "Idempotency-Key"


async def test_two_idempotency_keys_are_400(server: Server) -> None:
    headers = [FORM, ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    await _refused(server, 400, "POST", SUPPLY, b"number_inferences=5", headers)


async def test_bad_block_reason_is_400(server: Server) -> None:
    for body, headers in [
        (b"reason=" + b"x" * 1025, [FORM]),
        (b"reason=a%0Ab", [FORM]),
        (json.dumps({"reason": 5}).encode(), [JSON]),
        (b"reason=a&reason=b", [FORM]),
        (b"why=because", [FORM]),
    ]:
        reply = await _refused(server, 400, "POST", "/block", body, headers)
        assert reply.json()["field"] in {"reason", "why"}
    assert not (await server.balance()).blocked


# --- D08: methods, paths, sizes, types, time ------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", SUPPLY, "POST"),
        ("PUT", SUPPLY, "POST"),
        ("DELETE", "/block", "POST"),
        ("GET", "/unblock", "POST"),
        ("POST", "/usage", "GET"),
        ("HEAD", "/usage", "GET"),
        ("POST", "/metrics", "GET"),
        ("POST", "/healthz", "GET"),
    ],
)
async def test_wrong_method_is_405_with_allow(
    server: Server, method: str, path: str, allow: str
) -> None:
    reply = await _refused(server, 405, method, path, b"number_inferences=5", [FORM])
    assert reply.headers["allow"] == allow


@pytest.mark.parametrize("path", ["/", "/supply", "/supply_inferences/", "/admin", "/%2e%2e/x"])
async def test_unknown_path_is_404(server: Server, path: str) -> None:
    reply = await _refused(server, 404, "POST", path, b"number_inferences=5", [FORM])
    assert reply.json()["message"] == (
        "no such endpoint; there are POST /supply_inferences, POST /block, POST /unblock, "
        "GET /usage, GET /metrics, GET /healthz, POST /reclaim, GET /borrowers, "
        "POST /borrowers, POST /borrowers/NAME/supply_inferences, POST /borrowers/NAME/block, "
        "POST /borrowers/NAME/unblock, POST /borrowers/NAME/reclaim, "
        "POST /borrowers/NAME/remove, POST /borrowers/NAME/models, GET /borrowers/NAME/usage"
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/"), ("GET", "/admin"), ("GET", SUPPLY), ("POST", "/usage"), ("POST", "/healthz")],
)
async def test_without_the_token_no_path_or_method_is_told_apart(
    server: Server, method: str, path: str
) -> None:
    """D08: 401 before 404 and 405, so the endpoints cannot be listed without the token."""
    reply = await _refused(server, 401, method, path, b"number_inferences=5", [FORM], auth=False)
    assert reply.json()["error"] == "unauthorized"
    assert "allow" not in reply.headers


async def test_oversized_body_is_413(server: Server) -> None:
    big = b"number_inferences=5&" + b"x" * 5000
    await _refused(server, 413, "POST", SUPPLY, big, [FORM])
    # Declared larger than it is: refused on the header, before reading.
    await _refused(server, 413, "POST", SUPPLY, b"number_inferences=5",
                   [FORM, ("Content-Length", "5000")])  # fmt: skip
    # Chunked, with no Content-Length: counted while read.
    chunks = [b"number_inferences=5&"] + [b"y" * 1000] * 5
    await _refused(server, 413, "POST", SUPPLY, iter(chunks), [FORM])
    # 4 KiB exactly is within the limit (and then a malformed form).
    await _refused(server, 400, "POST", SUPPLY, b"n=" + b"5" * 4094, [FORM])


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "multipart/form-data; boundary=x", "application/jsonx", "application/xml"],
)
async def test_wrong_content_type_is_415(server: Server, content_type: str | None) -> None:
    headers = [("Content-Type", content_type)] if content_type else []
    await _refused(server, 415, "POST", SUPPLY, b"number_inferences=5", headers)
    await _refused(server, 415, "POST", "/block", b"reason=x", headers)


async def test_slow_body_is_408(server: Server) -> None:
    # The fixture's app waits 1 s for a body; this one never sends its last byte.
    def stall() -> int:
        context = ssl.create_default_context(cafile=os.fspath(server.state.ca_cert_path))
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=20)
        try:
            conn.putrequest("POST", SUPPLY)
            for name, value in [*server.auth, FORM, ("Content-Length", "19")]:
                conn.putheader(name, value)
            conn.endheaders(b"number_inferences=")
            return conn.getresponse().status
        finally:
            conn.close()

    before = await server.balance()
    assert await trio.to_thread.run_sync(stall) == 408
    assert await server.balance() == before


async def test_client_gone_mid_body_changes_nothing(server: Server) -> None:
    def abandon() -> None:
        context = ssl.create_default_context(cafile=os.fspath(server.state.ca_cert_path))
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=20)
        conn.putrequest("POST", SUPPLY)
        for name, value in [*server.auth, FORM, ("Content-Length", "19")]:
            conn.putheader(name, value)
        conn.endheaders(b"number_inferences=")
        conn.close()

    before = await server.balance()
    with structlog.testing.capture_logs() as logs:
        await trio.to_thread.run_sync(abandon)
        await trio.sleep(0.2)
    assert not [entry for entry in logs if entry["log_level"] in {"error", "critical"}]
    assert await server.balance() == before
    assert (await server.call("GET", "/healthz")).status == 200
