"""Several enclave processes on one license, sharing one supply (I23, Q06), on loopback.

The license record admits two live instances. Both link and serve from one supply; a
third is refused naming the cap and backs off, and gets in once a place frees; the
borrower's last units, raced for by consumers of both enclaves at once, are served at
most once in all; a block reaches each enclave. Every step checks the ledger: served <=
granted and not returned <= supplied.
"""

from __future__ import annotations

import json
import os
from functools import partial
from typing import Any, Final

import pytest
import trio

from drm_consumer import Blocked, Client, NoInferencesLeft
from drm_lab.deployment import Enclave, Lab
from drm_lab.models import tiny_model
from drm_lab.processes import LOOPBACK
from drm_wire.attestation.policy import Policy
from tests.e2e.test_faults import STEP, _check_ledger, _inputs, _only_model, _wait_log, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Consumers per enclave racing for the last units.
RACERS: Final = 3
#: How long a parked request may wait while another enclave of its borrower holds idle
#: units: its demand, a recall and its answer (a ledger commit), and a grant (another),
#: each a loopback round trip; generous, it bounds a hang under load.
RECALL_BOUND: Final = 10.0
#: Parked requests served from recalled units in the recall test (its latency figures).
TRIALS: Final = 30


def _admit(lab: Lab, max_instances: int) -> None:
    """The owner's license record admits ``max_instances`` live instances (the record's
    field, as the custodian reads it when it starts)."""
    (record,) = (lab.state_dir / "licenses").iterdir()
    doc = json.loads(record.read_text())
    record.write_text(json.dumps({**doc, "max_instances": max_instances}))
    os.chmod(record, 0o600)


async def _usage(lab: Lab) -> dict[str, Any]:
    assert lab.admin is not None
    doc: dict[str, Any] = await trio.to_thread.run_sync(lab.admin.usage)
    counters = {k: int(doc[k]) for k in ("supplied", "granted", "served", "in_doubt")}
    _check_ledger({**counters, **{k: int(doc[k]) for k in ("remaining", "returned", "reclaimed")}})
    held = doc["granted"] - doc["returned"] - doc["reclaimed"]
    assert doc["served"] <= held <= doc["supplied"], doc  # I23, at every look
    return doc


async def _race(client: Client, model: Any, tries: int) -> int:
    """Infer ``tries`` times without waiting for supply; how many were answered."""
    answered = 0
    for i in range(tries):
        try:
            await client.infer(model.name, _inputs(model, i), wait=0)
        except NoInferencesLeft:
            continue
        answered += 1
    return answered


async def test_two_enclaves_share_one_supply_and_a_third_waits_for_a_place(lab: Lab) -> None:
    _admit(lab, 2)
    tiny = lab.write_model("tiny", tiny_model())
    await trio.to_thread.run_sync(partial(lab.start_custodian, [tiny], initial=10, lease=4))
    assert lab.custodian is not None
    first: Enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    second: Enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    doc = await _usage(lab)
    assert (doc["instances"], doc["granted"], doc["remaining"]) == (2, 8, 2)  # a lease each

    policy = Policy.load(lab.policy_path)
    async with (
        Client.connect(LOOPBACK, first.consumer_port, policy=policy) as one,
        Client.connect(LOOPBACK, second.consumer_port, policy=policy) as two,
    ):
        model = await _only_model(one)
        # Beat the meter: consumers of both enclaves race for the borrower's 10 units with
        # 24 requests. Whatever the interleaving of reports and top-ups, at most 10 are
        # answered, and every answer is in the ledger, charged to the instance that gave it
        # (units a racer left unused stay with their instance, in doubt, unless recalled).
        answered: list[int] = []

        async def race(port: int) -> None:
            async with Client.connect(LOOPBACK, port, policy=policy) as client:
                answered.append(await _race(client, model, 4))

        with trio.fail_after(STEP):
            async with trio.open_nursery() as nursery:
                for enclave in (first, second):
                    for _ in range(RACERS):
                        nursery.start_soon(race, enclave.consumer_port)
        assert sum(answered) <= 10

        async def settled() -> bool:
            return bool((await _usage(lab))["served"] == sum(answered))

        await eventually(settled, "both enclaves' reports")
        doc = await _usage(lab)
        held = doc["granted"] - doc["returned"]  # units recalled were granted again
        assert doc["served"] == sum(answered) <= held <= doc["supplied"] == 10
        assert sum(answered) >= 8, answered  # both leases were served from
        by_instance = {entry["instance"]: entry for entry in doc["by_instance"]}
        for enclave in (first, second):
            entry = by_instance[enclave.instance_id]
            assert entry["served"] <= entry["granted"] <= 4 + 10  # its leases, from the supply

        # A block reaches each enclave, and each acknowledges it (I25): the block's
        # answer waits for both; nothing is served on either after it.
        await trio.to_thread.run_sync(lab.supply, 6)
        assert lab.admin is not None
        blocked = await trio.to_thread.run_sync(partial(lab.admin.block, "audit", wait=5))
        assert (blocked["blocked"], blocked["block_acknowledged"]) == (True, 2), blocked
        rows = {row["instance"]: row for row in blocked["by_instance"]}
        for enclave in (first, second):
            assert rows[enclave.instance_id]["block_acknowledged"] is True
            await _wait_log(enclave.daemon.wait_for, "custodian_blocked", reason="audit")
            await _wait_log(enclave.daemon.wait_for, "block_acknowledged")
            await _wait_log(
                lab.custodian.wait_for, "block_acknowledged", instance=enclave.instance_id
            )
        for client in (one, two):
            with trio.fail_after(STEP), pytest.raises(Blocked):
                await client.infer(model.name, _inputs(model), wait=0)

    # A third is refused, naming the cap, and backs off; granted nothing, it serves
    # nothing. A place frees (the first stops cleanly): the third gets in.
    third: Enclave = await trio.to_thread.run_sync(
        partial(lab.start_enclave, lab.custodian_port, link_up=False)
    )
    refused = await _wait_log(
        lab.custodian.wait_for, "enclave_duplicate_instance", instance=third.instance_id
    )
    assert refused["max_instances"] == 2
    logged = await _wait_log(third.daemon.wait_for, "custodian_refused")
    assert logged["reason"] == "license_in_use"
    assert "admits 2 live enclave instances" in str(logged["fix"])
    assert float(logged["retry_in"]) > 0

    assert third.instance_id not in {e["instance"] for e in (await _usage(lab))["by_instance"]}
    await trio.to_thread.run_sync(first.daemon.stop)
    await _wait_log(third.daemon.wait_for, "custodian_link_up")
    doc = await _usage(lab)
    assert doc["instances"] == 2
    assert doc["served"] == sum(answered)  # nothing was served after the block
    assert doc["returned"] > 0  # the stopped instance gave back what it held


async def test_a_parked_request_is_served_from_units_recalled_from_an_idle_enclave(
    lab: Lab,
) -> None:
    """The supply is all lent out: the idle enclave holds a lease of 40 units, the busy one
    has served its 4. Then, TRIALS times, a request parks on the busy one: it sends its
    demand (1 unit), the custodian recalls exactly that from the idle one, credits what it
    confirms and grants it to the busy one, and the parked request is served, within
    RECALL_BOUND. One recall per parked request, nothing moved without demand. Prints
    the parked -> served latencies (docs/production.md)."""
    _admit(lab, 2)
    tiny = lab.write_model("tiny", tiny_model())
    await trio.to_thread.run_sync(partial(lab.start_custodian, [tiny], initial=44, lease=40))
    idle: Enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    busy: Enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    doc = await _usage(lab)
    rows = {row["instance"]: row for row in doc["by_instance"]}
    assert (rows[idle.instance_id]["granted"], rows[busy.instance_id]["granted"]) == (40, 4)
    policy = Policy.load(lab.policy_path)
    waits: list[float] = []
    async with Client.connect(LOOPBACK, busy.consumer_port, policy=policy) as client:
        model = await _only_model(client)
        assert await _race(client, model, 4) == 4
        for trial in range(TRIALS):
            started = trio.current_time()
            with trio.fail_after(RECALL_BOUND):
                await client.infer(model.name, _inputs(model, trial), wait=RECALL_BOUND)
            waits.append(trio.current_time() - started)
    recalled = idle.daemon.find_all("units_recalled")
    assert [(r["asked"], r["returned_total"]) for r in recalled] == [
        (1, n) for n in range(1, TRIALS + 1)
    ]

    async def settled() -> bool:
        return bool((await _usage(lab))["served"] == 4 + TRIALS)

    await eventually(settled, "the busy enclave's reports")
    doc = await _usage(lab)
    assert (doc["supplied"], doc["returned"], doc["granted"]) == (44, TRIALS, 44 + TRIALS)
    waits.sort()
    p50, p99 = waits[len(waits) // 2], waits[min(len(waits) - 1, len(waits) * 99 // 100)]
    print(
        f"parked -> served over {TRIALS} trials (demand, recall, grant): "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {waits[-1] * 1000:.1f} ms"
    )
