"""``POST /reclaim`` (I21) over real TLS on loopback, against a real ledger: the owner's
write-off of a lost instance, its window, and what a hostile or mistaken caller gets."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from drm_custodian.admin import USAGE_ENDED_LISTED
from drm_custodian.admin_client import format_usage

from .admin_server import BORROWER, FORM, JSON, Server
from .admin_server import server as server  # the fixture

LOST = "0123456789abcdef" * 2
STOPPED = "f" * 32


async def _lend(server: Server) -> None:
    """Supply 20; LOST got 8 and served 3, then crashed; STOPPED got 6, served 2, returned 4."""
    await server.ledger.supply(BORROWER, 20)
    await server.ledger.record_grant(BORROWER, LOST, 8)
    await server.ledger.record_usage(BORROWER, LOST, 3, 1, requests_total=3)
    await server.ledger.record_grant(BORROWER, STOPPED, 6)
    await server.ledger.record_return(
        BORROWER, STOPPED, returned_total=4, served_total=2, requests_total=2, final=True
    )


async def _reclaim(server: Server, instance: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    reply = await server.call("POST", "/reclaim", f"instance={instance}".encode(), [FORM])
    return reply.status, reply.json(), reply.headers


async def test_a_lost_instance_is_written_off_once_after_its_window(server: Server) -> None:
    await _lend(server)
    server.hooks.silence = 1.0  # the custodian sent it something a second ago
    status, doc, headers = await _reclaim(server, LOST)
    assert (status, doc["error"], doc["field"]) == (409, "reclaim_too_soon", "instance")
    assert "retry in 62.0 s" in doc["message"]
    assert headers["retry-after"] == "63"
    assert (await server.balance()).reclaimed == 0

    server.hooks.silence = 63.5
    status, doc, _ = await _reclaim(server, LOST)
    assert status == 200
    assert (doc["instance"], doc["written_off"]) == (LOST, 5)
    assert (doc["in_doubt"], doc["reclaimed"], doc["returned"], doc["remaining"]) == (0, 5, 4, 15)
    states = {row["instance"]: row["state"] for row in doc["by_instance"]}
    assert states == {LOST: "reclaimed", STOPPED: "stopped_clean"}
    assert server.hooks.calls[-1] == ("reclaimed", BORROWER, None)
    rows = {line.split()[0]: line.split()[1:] for line in format_usage(doc).splitlines()[-2:]}
    assert rows[LOST] == ["reclaimed", "8", "3", "0", "5", "0"]

    status, doc, _ = await _reclaim(server, LOST)
    assert (status, doc["error"]) == (409, "already_reclaimed")
    assert (await server.balance()).reclaimed == 5


async def test_a_live_instance_or_an_unknown_one_is_not_written_off(server: Server) -> None:
    await _lend(server)
    server.hooks.silence = None  # linked now
    status, doc, _ = await _reclaim(server, LOST)
    assert (status, doc["error"]) == (409, "instance_live")
    assert "SIGTERM" in doc["message"]
    server.hooks.silence = 1e9
    status, doc, _ = await _reclaim(server, "a" * 32)
    assert (status, doc["error"]) == (404, "unknown_instance")
    assert (await server.balance()).reclaimed == 0


@pytest.mark.parametrize(
    ("body", "content_type", "field"),
    [
        (b"", FORM, "instance"),
        (b"instance=" + b"A" * 32, FORM, "instance"),  # ids are lower-case hex
        (b"instance=" + b"a" * 33, FORM, "instance"),
        (b"instance=../../etc", FORM, "instance"),
        (json.dumps({"instance": 12345}).encode(), JSON, "instance"),
        (json.dumps({"instance": LOST, "units": 99}).encode(), JSON, "units"),
    ],
)
async def test_hostile_reclaims_are_refused_before_the_ledger(
    server: Server, body: bytes, content_type: tuple[str, str], field: str
) -> None:
    await _lend(server)
    server.hooks.silence = 1e9
    before = await server.balance()
    reply = await server.call("POST", "/reclaim", body, [content_type])
    assert reply.status == 400, reply.body
    assert reply.json()["field"] == field
    assert await server.balance() == before


async def test_reclaim_needs_the_token_and_a_post(server: Server) -> None:
    await _lend(server)
    server.hooks.silence = 1e9
    reply = await server.call("POST", "/reclaim", f"instance={LOST}".encode(), [FORM], auth=False)
    assert reply.status == 401
    reply = await server.call("GET", "/reclaim")
    assert (reply.status, reply.headers["allow"]) == (405, "POST")
    assert (await server.balance()).reclaimed == 0


async def test_metrics_count_gone_instances_in_doubt_not_each_instance(server: Server) -> None:
    await _lend(server)
    reply = await server.call("GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    (sample,) = families["drm_custodian_instances_in_doubt"].samples
    assert sample.value == 1  # LOST; STOPPED settled
    assert families["drm_custodian_returned"].samples[0].value == 4
    assert not any(LOST in str(s.labels) for f in families.values() for s in f.samples)
    text = await trio.to_thread.run_sync(partial(format_usage, {"returned": 4}))
    assert text.split() == ["returned", "4"]


async def test_usage_lists_live_and_in_doubt_instances_and_the_last_ended_ones(
    server: Server,
) -> None:
    """Months of enclave restarts: ``usage`` stays bounded. Every in-doubt instance is
    listed however old, ended ones only the most recent ``USAGE_ENDED_LISTED``."""
    await server.ledger.supply(BORROWER, 1000)
    await server.ledger.record_grant(BORROWER, LOST, 2)  # the oldest: still listed
    ended = [f"{n:032x}" for n in range(1, USAGE_ENDED_LISTED + 4)]
    for instance in ended:  # granted 1 and stopped cleanly, one after the other
        await server.ledger.record_grant(BORROWER, instance, 1)
        await server.ledger.record_return(
            BORROWER, instance, returned_total=1, served_total=0, requests_total=0, final=True
        )
    reply = await server.call("GET", "/usage")
    assert reply.status == 200
    doc = reply.json()
    listed = [row["instance"] for row in doc["by_instance"]]
    assert listed == sorted([LOST, *ended[3:]])  # the three granted to first are left out
    assert doc["by_instance_omitted"] == 3
    assert doc["in_doubt"] == 2
    assert format_usage(doc).splitlines()[-1] == "(and 3 older ended instances not listed)"
