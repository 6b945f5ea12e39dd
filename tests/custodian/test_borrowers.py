"""Borrowers over the admin API: add, list, remove, and each one's supply, block and usage.

A real admin server on loopback (hypercorn, TLS) over a real state directory and ledger;
every refusal is checked to leave the ledger, the hooks and the state files unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from drm_custodian.state import LicenseRejected, load_state_dir

from .admin_server import BORROWER, FORM, JSON, Server, admin_server

MODELS = ("tiny", "big")


@pytest.fixture
async def server(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Server]:
    async with admin_server(tmp_path, nursery, models=MODELS) as running:
        yield running


def _form(**fields: str) -> bytes:
    return "&".join(f"{k}={v}" for k, v in fields.items()).encode()


async def _add(server: Server, name: str, **fields: str) -> dict[str, object]:
    reply = await server.call("POST", "/borrowers", _form(name=name, **fields), [FORM])
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert isinstance(doc, dict)
    return doc


def _secret(path: object) -> tuple[str, str]:
    assert isinstance(path, str)
    doc = json.loads(Path(path).read_text())
    assert doc["format"] == "drm-license"
    return doc["license_id"], doc["secret"]


async def _snapshot(server: Server) -> tuple[object, ...]:
    """What a refused request must leave as it was."""
    balances = [await server.ledger.balance(b) for b in (BORROWER, "acme", "globex")]
    files = sorted(os.listdir(server.state.path / "licenses"))
    return (*balances, len(server.hooks.calls), files, dict(server.state.licenses))


async def test_add_makes_a_license_like_inits_that_verifies_at_once(server: Server) -> None:
    doc = await _add(server, "acme", max_instances="3", models="tiny")
    assert doc["borrower"] == "acme"
    assert doc["max_instances"] == 3
    assert doc["models"] == ["tiny"]
    handoff = Path(str(doc["license_file"]))
    assert handoff == server.state.path / "handoff" / "acme.license.json"
    assert (await trio.Path(handoff).stat()).st_mode & 0o777 == 0o600
    license_id, secret = _secret(doc["license_file"])
    record = server.state.verify_license(license_id, secret)  # no restart needed
    assert (record.borrower, record.max_instances, record.models) == ("acme", 3, ("tiny",))
    assert record.may_receive("tiny")
    assert not record.may_receive("big")
    # What was written is what a restart reads back.
    again = load_state_dir(server.state.path, warn_handoff=False)
    assert again.licenses[license_id] == record
    assert again.borrowers == {BORROWER, "acme"}


async def test_list_shows_each_borrowers_account(server: Server) -> None:
    await _add(server, "acme")
    await server.call("POST", "/borrowers/acme/supply_inferences", b"number_inferences=5", [FORM])
    reply = await server.call("GET", "/borrowers")
    assert reply.status == 200
    rows = {row["borrower"]: row for row in reply.json()["borrowers"]}
    assert set(rows) == {BORROWER, "acme"}
    assert rows["acme"]["supplied"] == 5
    assert rows[BORROWER]["supplied"] == 0
    assert rows["acme"]["models"] is None
    assert rows["acme"]["removed"] is False
    for key in ("served", "in_doubt", "instances", "blocked", "max_instances"):
        assert key in rows["acme"]


async def test_supply_to_one_borrower_never_reaches_another(server: Server) -> None:
    await _add(server, "acme")
    reply = await server.call(
        "POST", "/borrowers/acme/supply_inferences", b"number_inferences=7", [FORM]
    )
    assert reply.status == 200, reply.body
    assert reply.json()["borrower"] == "acme"
    reply = await server.call(
        "POST", "/supply_inferences", b'{"number_inferences": 4, "borrower": "borrower"}', [JSON]
    )
    assert reply.status == 200, reply.body
    assert (await server.ledger.balance("acme")).supplied == 7
    assert (await server.ledger.balance(BORROWER)).supplied == 4
    assert server.hooks.calls == [("supplied", "acme", None), ("supplied", BORROWER, None)]


async def test_first_api_supply_with_several_borrowers_needs_a_borrower(server: Server) -> None:
    await _add(server, "acme")
    before = await _snapshot(server)
    reply = await server.call("POST", "/supply_inferences", b"number_inferences=5", [FORM])
    assert reply.status == 400
    assert reply.json() == {
        "error": "borrower_required",
        "field": "borrower",
        "message": "this custodian has 2 borrowers (acme, borrower): name one in the "
        "borrower field, or use /borrowers/NAME/...",
    }
    assert await _snapshot(server) == before
    reply = await server.call("GET", "/usage")
    assert reply.status == 400
    assert reply.json()["error"] == "borrower_required"


async def test_first_api_supply_with_one_borrower_is_unchanged(server: Server) -> None:
    reply = await server.call("POST", "/supply_inferences", b"number_inferences=5", [FORM])
    assert reply.status == 200
    assert reply.json()["borrower"] == BORROWER
    assert (await server.ledger.balance(BORROWER)).supplied == 5


async def test_block_of_one_borrower_leaves_the_other(server: Server) -> None:
    await _add(server, "acme")
    reply = await server.call("POST", "/borrowers/acme/block", b"reason=unpaid", [FORM])
    assert reply.status == 200, reply.body
    assert reply.json()["blocked"] is True
    assert (await server.ledger.balance("acme")).blocked
    assert not (await server.ledger.balance(BORROWER)).blocked
    assert server.hooks.calls == [("blocked", "acme", "unpaid")]
    reply = await server.call("POST", "/borrowers/acme/unblock")
    assert reply.status == 200
    assert not (await server.ledger.balance("acme")).blocked
    reply = await server.call("GET", "/borrowers/acme/usage")
    assert reply.status == 200
    assert reply.json()["borrower"] == "acme"


async def test_remove_refuses_the_license_cuts_enclaves_and_keeps_history(
    server: Server,
) -> None:
    doc = await _add(server, "acme")
    license_id, secret = _secret(doc["license_file"])
    await server.call("POST", "/borrowers/acme/supply_inferences", b"number_inferences=9", [FORM])
    reply = await server.call("POST", "/borrowers/acme/remove")
    assert reply.status == 200, reply.body
    assert reply.json()["removed"] is True
    assert server.hooks.calls[-1] == ("removed", "acme", None)
    with pytest.raises(LicenseRejected):
        server.state.verify_license(license_id, secret)
    assert not (server.state.path / "handoff" / "acme.license.json").exists()
    # History stays: usage answers, the ledger still holds the supply.
    reply = await server.call("GET", "/borrowers/acme/usage")
    assert reply.status == 200
    assert reply.json()["supplied"] == 9
    # It cannot be supplied, blocked, removed again, or its name reused.
    before = await _snapshot(server)
    for path in ("supply_inferences", "block", "remove"):
        body = b"number_inferences=1" if path == "supply_inferences" else None
        reply = await server.call("POST", f"/borrowers/acme/{path}", body, [FORM] if body else [])
        assert reply.status == 409, (path, reply.body)
        assert reply.json()["error"] == "borrower_removed"
    reply = await server.call("POST", "/borrowers", b"name=acme", [FORM])
    assert reply.status == 409
    assert "never reused" in reply.json()["message"]
    assert await _snapshot(server) == before
    # With one borrower left, the first API works unchanged again.
    reply = await server.call("POST", "/supply_inferences", b"number_inferences=2", [FORM])
    assert reply.status == 200
    assert reply.json()["borrower"] == BORROWER
    # A restart reads the removal back.
    again = load_state_dir(server.state.path, warn_handoff=False)
    with pytest.raises(LicenseRejected):
        again.verify_license(license_id, secret)
    assert again.borrowers == {BORROWER}


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"name=..", 400, "name"),
        (b"name=a%2Fb", 400, "name"),
        (b"name=-lead", 400, "name"),
        (b"name=" + b"x" * 65, 400, "name"),
        (b"name=caf%C3%A9", 400, "name"),
        (b"name=acme&max_instances=0", 400, "max_instances"),
        (b"name=acme&max_instances=two", 400, "max_instances"),
        (b"name=acme&max_instances=1001", 400, "max_instances"),
        (b"name=acme&models=", 400, "models"),
        (b"name=acme&models=tiny,tiny", 400, "models"),
        (b"name=acme&models=huge", 400, "models"),
        (b"name=acme&models=../x", 400, "models"),
        (b"name=acme&owner=x", 400, "owner"),
        (b"max_instances=2", 400, "name"),
        (b"name=borrower", 409, "name"),
    ],
)
async def test_hostile_adds_change_nothing(
    server: Server, body: bytes, status: int, field: str
) -> None:
    before = await _snapshot(server)
    handoff = sorted(os.listdir(server.state.path / "handoff"))
    reply = await server.call("POST", "/borrowers", body, [FORM])
    assert reply.status == status, reply.body
    assert reply.json()["field"] == field
    assert await _snapshot(server) == before
    assert sorted(os.listdir(server.state.path / "handoff")) == handoff


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("POST", "/borrowers/nobody/supply_inferences", 404, "unknown_borrower"),
        ("GET", "/borrowers/nobody/usage", 404, "unknown_borrower"),
        ("POST", "/borrowers/nobody/remove", 404, "unknown_borrower"),
        ("POST", "/borrowers/..%2F/block", 404, "not_found"),
        ("POST", "/borrowers/..%2E/block", 400, "bad_request"),
        ("POST", "/borrowers/-x/block", 400, "bad_request"),
        ("POST", "/borrowers/acme/other", 404, "not_found"),
        ("POST", "/borrowers/acme/usage/x", 404, "not_found"),
        ("GET", "/borrowers/acme/block", 405, "method_not_allowed"),
        ("POST", "/borrowers/acme/usage", 405, "method_not_allowed"),
    ],
)
async def test_hostile_borrower_paths(
    server: Server, method: str, path: str, status: int, error: str
) -> None:
    await _add(server, "acme")
    before = await _snapshot(server)
    body = b"number_inferences=1" if method == "POST" else None
    reply = await server.call(method, path, body, [FORM] if body else [])
    assert reply.status == status, reply.body
    assert reply.json()["error"] == error
    # Without the token, the same request is 401, and tells nothing about the borrower.
    reply = await server.call(method, path, body, [FORM] if body else [], auth=False)
    assert reply.status == 401
    assert await _snapshot(server) == before


async def test_first_api_borrower_field_is_checked(server: Server) -> None:
    await _add(server, "acme")
    before = await _snapshot(server)
    for body, status in (
        (b'{"number_inferences": 1, "borrower": "nobody"}', 404),
        (b'{"number_inferences": 1, "borrower": 5}', 400),
        (b'{"number_inferences": 1, "borrower": "../acme"}', 400),
    ):
        reply = await server.call("POST", "/supply_inferences", body, [JSON])
        assert reply.status == status, reply.body
        assert reply.json()["field"] == "borrower"
    assert await _snapshot(server) == before


async def test_metrics_are_labelled_by_borrower(server: Server) -> None:
    await _add(server, "acme")
    await server.call("POST", "/borrowers/acme/supply_inferences", b"number_inferences=3", [FORM])
    reply = await server.call("GET", "/metrics")
    text = reply.body.decode()
    assert 'drm_custodian_supplied{borrower="acme"} 3.0' in text
    assert 'drm_custodian_supplied{borrower="borrower"} 0.0' in text
    # No live instance: no per-instance series.
    assert "drm_custodian_instance_granted{" not in text


async def test_set_models_changes_what_the_next_link_reads(server: Server) -> None:
    doc = await _add(server, "acme", models="tiny")
    license_id, secret = _secret(doc["license_file"])
    reply = await server.call("POST", "/borrowers/acme/models", b"models=tiny,big", [FORM])
    assert reply.status == 200, reply.body
    assert reply.json() == {"borrower": "acme", "models": ["tiny", "big"]}
    # Each link reads its license record when it is made: the next one gets the new list.
    assert server.state.verify_license(license_id, secret).models == ("tiny", "big")
    reply = await server.call("POST", "/borrowers/acme/models", b"models=*", [FORM])
    assert reply.status == 200
    record = server.state.verify_license(license_id, secret)
    assert record.models is None
    assert record.may_receive("big")
    again = load_state_dir(server.state.path, warn_handoff=False)
    assert again.licenses[license_id] == record
    before = await _snapshot(server)
    for body, status in ((b"models=huge", 400), (b"models=", 400), (b"other=tiny", 400)):
        reply = await server.call("POST", "/borrowers/acme/models", body, [FORM])
        assert reply.status == status, reply.body
    assert await _snapshot(server) == before
    await server.call("POST", "/borrowers/acme/remove")
    before = await _snapshot(server)
    reply = await server.call("POST", "/borrowers/acme/models", b"models=tiny", [FORM])
    assert reply.status == 409
    assert await _snapshot(server) == before
