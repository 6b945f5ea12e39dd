"""Two borrowers served by one custodian, as real processes on loopback.

The first borrower comes from ``init``; the second is added over the admin API while the
custodian runs (no restart) with one of the two models. Each runs its own enclave on its
own license. The test checks, from the ledger and from what consumers see: a supply to
one never reaches the other; a block of one leaves the other serving; the model the
second borrower's license does not list never reaches its enclave (not a byte: the
custodian's bytes-sent counter for it equals one delivery, to the other enclave); and a
removal cuts the removed borrower's enclave at once and refuses its license after.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Final

import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from drm_consumer import Client
from drm_lab.deployment import Enclave, Lab
from drm_lab.models import tiny_model, two_input_model
from drm_lab.processes import LOOPBACK
from drm_wire.attestation.policy import Policy
from drm_wire.messages import EnclaveState, ModelDescription

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: One step against real processes on loopback: only bounds a hang.
STEP: Final = 30.0
POLL: Final = 0.05


def _inputs(model: ModelDescription) -> dict[str, np.ndarray[Any, Any]]:
    return {
        spec.name: np.full([d or 1 for d in spec.shape], 0.5, dtype=spec.dtype)
        for spec in model.inputs
    }


async def _call(lab: Lab, method: str, path: str, **form: str) -> dict[str, Any]:
    assert lab.admin is not None
    status, doc = await trio.to_thread.run_sync(partial(lab.admin.call, method, path, form or None))
    assert status == 200, doc
    return doc


async def _state_of(lab: Lab, enclave: Enclave) -> tuple[EnclaveState, dict[str, Any], int]:
    policy = Policy.load(lab.policy_path)
    async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
        info = await client.info()
        return info.state, dict(info.models), info.inferences_left


async def _until(lab: Lab, enclave: Enclave, state: EnclaveState, left: int | None = None) -> None:
    """Poll the enclave's own report (another process: no event to wait on), bounded."""
    seen: tuple[object, ...] = ()
    for _ in range(int(STEP / POLL)):
        now, _, inferences_left = await _state_of(lab, enclave)
        seen = (now, inferences_left)
        if now is state and (left is None or inferences_left == left):
            return
        await trio.sleep(POLL)
    pytest.fail(f"enclave did not reach {state} (left {left}); last {seen}")


async def _infer(lab: Lab, enclave: Enclave, model: str) -> None:
    policy = Policy.load(lab.policy_path)
    async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
        info = await client.info()
        with trio.fail_after(STEP):
            await client.infer(model, _inputs(info.models[model]), wait=0)


def _bytes_sent(lab: Lab) -> dict[str, float]:
    assert lab.admin is not None
    status, doc = lab.admin.call("GET", "/metrics")
    assert status == 200
    return {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(doc["_raw"])
        for sample in family.samples
        if sample.name == "drm_custodian_model_bytes_sent_total"
    }


async def test_two_borrowers_one_custodian(lab: Lab) -> None:
    tiny = lab.write_model("tiny", tiny_model())
    pair = lab.write_model("pair", two_input_model())
    pair_size = (await trio.Path(pair).stat()).st_size
    await trio.to_thread.run_sync(partial(lab.start_custodian, [tiny, pair], initial=0))
    custodian = lab.custodian
    assert custodian is not None

    added = await _call(lab, "POST", "/borrowers", name="acme", models="tiny")
    acme_license = Path(added["license_file"])
    first = await trio.to_thread.run_sync(lab.start_enclave)
    second = await trio.to_thread.run_sync(partial(lab.start_enclave, license_path=acme_license))

    # Each borrower's supply reaches its own enclave only.
    await _call(lab, "POST", "/borrowers/acme/supply_inferences", number_inferences="3")
    await _call(lab, "POST", "/supply_inferences", borrower="borrower", number_inferences="2")
    await _until(lab, second, EnclaveState.SERVING, left=3)
    await _until(lab, first, EnclaveState.SERVING, left=2)
    await _infer(lab, second, "tiny")
    acme = await _call(lab, "GET", "/borrowers/acme/usage")
    own = await _call(lab, "GET", "/borrowers/borrower/usage")
    assert (acme["supplied"], acme["granted"], acme["served"]) == (3, 3, 1)
    assert (own["supplied"], own["granted"], own["served"]) == (2, 2, 0)
    assert [row["instance"] for row in acme["by_instance"]] == [second.instance_id]
    assert [row["instance"] for row in own["by_instance"]] == [first.instance_id]

    # The model acme's license does not list never reaches its enclave.
    _, second_models, _ = await _state_of(lab, second)
    _, first_models, _ = await _state_of(lab, first)
    assert set(second_models) == {"tiny"}
    assert set(first_models) == {"tiny", "pair"}
    assert second.daemon.find("model_receiving", model="pair") is None
    sent = await trio.to_thread.run_sync(_bytes_sent, lab)
    assert sent["pair"] == pair_size  # one delivery: to the first borrower's enclave

    # Blocking one leaves the other serving.
    await _call(lab, "POST", "/borrowers/acme/block", reason="audit")
    await _until(lab, second, EnclaveState.BLOCKED)
    await _infer(lab, first, "pair")
    own = await _call(lab, "GET", "/borrowers/borrower/usage")
    assert own["served"] == 1

    # Removal cuts acme's enclave at once; its license is refused from then on.
    seen = len(custodian.events)
    await _call(lab, "POST", "/borrowers/acme/remove")
    await _until(lab, second, EnclaveState.CUSTODIAN_UNREACHABLE)
    await trio.to_thread.run_sync(
        partial(
            custodian.wait_for,
            "enclave_license_refused",
            after=seen,
            license_id=added["license_id"],
            timeout=STEP,
        )
    )
    await _infer(lab, first, "tiny")  # the other borrower is untouched
    acme = await _call(lab, "GET", "/borrowers/acme/usage")
    assert (acme["supplied"], acme["served"]) == (3, 1)  # its history stays
    listed = await _call(lab, "GET", "/borrowers")
    removed = {row["borrower"]: row["removed"] for row in listed["borrowers"]}
    assert removed == {"acme": True, "borrower": False}
