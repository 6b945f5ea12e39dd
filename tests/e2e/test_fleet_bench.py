"""The scale bench's machinery, small: a real custodian and light enclave links (I23).

``bench/fleet.py`` runs 1,000 links by hand; this runs the same :func:`run_fleet` with 4
borrowers x 5 links and a few rounds, and :func:`echo_floor` with as many connections,
so the bench cannot rot: every phase must complete against the real daemon, and the
custodian's books must agree with what the light enclaves hold. The light enclave's own
checks (it never lets a message it does not expect pass) are tested here too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import pytest
import trio

from drm_lab.fleet import (
    FleetPlan,
    LightEnclave,
    cpu_seconds,
    echo_floor,
    heartbeat_frame_size,
    rss_bytes,
    run_fleet,
)
from drm_wire.errors import RemoteProtocolError
from drm_wire.messages import ReturnAck, UsageAck, UsageReport, Waiting
from drm_wire.net.tls import client_context

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PLAN: Final = FleetPlan(
    borrowers=4,
    per_borrower=5,
    lease=10,
    supply_rounds=8,
    recall_rounds=8,
    block_rounds=4,
    idle_seconds=1.0,
)


async def test_the_fleet_bench_runs_small_and_the_books_agree(tmp_path: Path) -> None:
    result = await run_fleet(tmp_path, PLAN)

    enclaves = result.enclaves
    assert len(enclaves) == 20
    assert {e.borrower for e in enclaves} == set(result.borrowers)
    assert len(result.borrowers) == 4
    # Every round was timed: each supply reached the borrower's 5 enclaves, each park
    # was served by a grant made of what a peer of the same borrower gave back.
    assert len(result.supply_grant) == 8 * 5
    assert len(result.supply_all) == 8
    assert len(result.recall_served) == 8
    # Each block was answered once the custodian counted all 5 enclaves' block_ack
    # (the round checks the count and that each enclave got the block and the unblock).
    assert len(result.block_acked) == 4
    assert all(e.blocked is False for e in enclaves)
    # The custodian's share of each supply, from its log: it started sending the last
    # grant after the POST and before that grant arrived (one machine's clocks).
    assert len(result.supply_pushed) == 8
    for pushed, received in zip(result.supply_pushed, result.supply_all, strict=True):
        assert 0 < pushed <= received + 0.005
    assert all(
        0 < s < 60 for s in [*result.supply_grant, *result.recall_served, *result.block_acked]
    )
    assert sum(e.recalls for e in enclaves) >= 8
    assert sum(e.returned_total for e in enclaves) > 0
    assert 0 < result.admit_from_hello <= result.admit_from_dial
    assert result.ledger_mismatches() == []
    for doc in result.borrowers.values():
        assert (doc["remaining"], doc["instances"]) == (0, 5), doc
    assert result.idle_seconds >= 1.0
    assert result.idle_custodian_cpu >= 0
    assert result.rss_links > 0
    assert result.rss_no_links > 0


async def test_the_echo_floor_sends_as_many_messages_as_heartbeats() -> None:
    floor = await echo_floor(20, heartbeat_frame_size(), 0.2, 0.5)
    assert (floor.links, floor.size) == (20, heartbeat_frame_size())
    assert floor.seconds >= 0.5
    assert floor.connect_seconds > 0
    assert floor.server_cpu >= 0
    assert floor.client_cpu >= 0
    # Each connection sends every 0.2 s once answered: echoes came, and no more than that.
    assert 0 < floor.echoed <= 20 * (floor.seconds / 0.2 + 1)


def test_process_figures_read_proc() -> None:
    assert cpu_seconds(os.getpid()) > 0
    assert rss_bytes(os.getpid()) > 1_000_000


async def test_a_light_enclave_lets_no_unexpected_message_pass() -> None:
    """A message it does not handle, an acknowledgement of nothing: protocol errors
    (which end its link, told to the custodian), never skipped."""
    enclave = LightEnclave("b", "lic:secret", client_context())
    with pytest.raises(RemoteProtocolError, match="waiting is not for this enclave"):
        await enclave._handle(Waiting(request_id=1, position=1))
    with pytest.raises(RemoteProtocolError, match="usage_report is not for this enclave"):
        await enclave._handle(UsageReport(seq=1, served_total=1))
    with pytest.raises(RemoteProtocolError, match="answers no report"):
        await enclave._handle(UsageAck(seq=1, served_total=0))
    with pytest.raises(RemoteProtocolError, match="answers no return"):
        await enclave._handle(ReturnAck(recall_id=1, returned_total=0))
    with pytest.raises(ValueError, match="0 held"):
        await enclave.serve(1)
    await trio.lowlevel.checkpoint()
