"""Settling unused inferences with real processes (I20, I21; docs/links.md, *Returning
units*): a clean stop returns what the enclave did not use, a crash leaves it in doubt
until the owner writes it off, and the ledger's numbers say exactly that.

The custodian and the enclave run as processes on loopback (:mod:`drm_lab`); the consumer
is :class:`drm_consumer.Client` in the test process. Every wait is a log event of a
daemon (:meth:`Daemon.wait_for`) or a process exit; the reclaim window is set by the
custodian's ``--reclaim-margin`` and its end is the custodian's own log line
``instance_reclaimable``, so no test sleeps.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any, Final

import numpy as np
import pytest
import trio

from drm_consumer import Client
from drm_lab.deployment import Enclave, Lab
from drm_lab.models import tiny_model
from drm_lab.processes import LOOPBACK, python_command, run_command
from drm_wire.attestation.policy import Policy
from drm_wire.messages import ModelDescription

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Bounds a hang of one step against real processes; only a bug waits this long.
STEP: Final = 30.0


def _inputs(model: ModelDescription) -> dict[str, np.ndarray[Any, Any]]:
    return {
        spec.name: np.full([d or 1 for d in spec.shape], 0.5, dtype=spec.dtype)
        for spec in model.inputs
    }


async def _serve(lab: Lab, enclave: Enclave, count: int) -> None:
    policy = Policy.load(lab.policy_path)
    async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
        info = await client.info()
        (model,) = info.models.values()
        with trio.fail_after(STEP):
            for _ in range(count):
                await client.infer(model.name, _inputs(model), wait=0)


async def _usage(lab: Lab) -> dict[str, Any]:
    assert lab.admin is not None
    return await trio.to_thread.run_sync(lab.admin.usage)


def _instance(doc: dict[str, Any], instance_id: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = [r for r in doc["by_instance"] if r["instance"] == instance_id]
    (row,) = rows
    return row


async def test_a_clean_stop_returns_what_was_not_served(lab: Lab) -> None:
    """Supply 20, lend a lease of 8, serve 3, SIGTERM: the ledger credits the 5 unused
    units back, the instance is ``stopped_clean`` with nothing in doubt, and the next
    enclave can be lent them."""
    tiny = lab.write_model("tiny", tiny_model())
    await trio.to_thread.run_sync(partial(lab.start_custodian, [tiny], initial=20, lease=8))
    enclave: Enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    await _serve(lab, enclave, 3)
    status = await trio.to_thread.run_sync(enclave.daemon.stop)
    assert status == 0, enclave.daemon.log_text()
    returned = enclave.daemon.find("enclave_units_returned")
    assert returned is not None, enclave.daemon.log_text()
    assert (returned["served_total"], returned["in_doubt"]) == (3, 0)
    assert returned["returned_total"] == returned["granted_total"] - 3
    assert lab.custodian is not None
    await trio.to_thread.run_sync(
        partial(lab.custodian.wait_for, "enclave_disconnected", timeout=STEP)
    )
    doc = await _usage(lab)
    assert (doc["served"], doc["in_doubt"], doc["instances"]) == (3, 0, 0)
    assert doc["returned"] == doc["granted"] - 3
    assert doc["remaining"] == 20 - 3  # everything not served is supply again
    row = _instance(doc, enclave.instance_id)
    assert (row["state"], row["in_doubt"], row["served"]) == ("stopped_clean", 0, 3)
    credited = lab.custodian.find("units_returned", instance=enclave.instance_id, final=True)
    assert credited is not None
    assert credited["credited"] == doc["returned"]
    # The next enclave gets a lease from what came back.
    second: Enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    await _serve(lab, second, 8)


async def test_a_crash_leaves_units_in_doubt_until_the_owner_writes_them_off(lab: Lab) -> None:
    """kill -9: the units stay in doubt; ``reclaim`` is refused while the window runs
    (the message says when it will be allowed), accepted after it, its own record (not a
    return), and the written-off instance shows as ``reclaimed``."""
    tiny = lab.write_model("tiny", tiny_model())
    await trio.to_thread.run_sync(
        partial(
            lab.start_custodian, [tiny], initial=20, lease=8,
            options=["--reclaim-margin", "3600"],
        )
    )  # fmt: skip
    enclave: Enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    await _serve(lab, enclave, 2)
    assert await trio.to_thread.run_sync(enclave.daemon.kill) == -9
    custodian = lab.custodian
    assert custodian is not None
    await trio.to_thread.run_sync(partial(custodian.wait_for, "enclave_disconnected", timeout=STEP))
    doc = await _usage(lab)
    granted = doc["granted"]
    row = _instance(doc, enclave.instance_id)
    assert row["state"] == "in_doubt"
    assert row["in_doubt"] == granted - row["served"] > 0
    assert (doc["returned"], doc["reclaimed"]) == (0, 0)

    assert lab.admin is not None
    admin = lab.admin
    status, early = await trio.to_thread.run_sync(
        admin.call, "POST", "/reclaim", {"instance": enclave.instance_id}
    )
    assert (status, early["error"]) == (409, "reclaim_too_soon")
    assert "retry in" in early["message"]
    status, bad = await trio.to_thread.run_sync(
        admin.call, "POST", "/reclaim", {"instance": "not-an-instance"}
    )
    assert (status, bad["field"]) == (400, "instance")
    assert (await _usage(lab))["reclaimed"] == 0  # refused: nothing written

    # The owner restarts the custodian with no margin: the window is then the enclave's
    # detection timeout, counted from the start, and the custodian says when it has passed.
    await trio.to_thread.run_sync(custodian.stop)
    argv = lab.custodian.argv if lab.custodian else []
    argv[argv.index("--reclaim-margin") + 1] = "0"
    restarted = await trio.to_thread.run_sync(lab.restart_custodian)
    ready = await trio.to_thread.run_sync(
        partial(restarted.wait_for, "instance_reclaimable", timeout=STEP)
    )
    assert (ready["instance"], ready["in_doubt"]) == (enclave.instance_id, row["in_doubt"])
    admin = lab.admin
    assert admin is not None
    # The owner's command, as the README gives it.
    command = python_command(
        "drm_custodian", "reclaim", "--state-dir", lab.state_dir,
        "--admin-port", str(admin.port), "--instance", enclave.instance_id, "--json",
    )  # fmt: skip
    done = await trio.to_thread.run_sync(partial(run_command, command, cwd=lab.workdir))
    doc = json.loads(done.stdout)
    assert doc["written_off"] == row["in_doubt"]
    assert (doc["reclaimed"], doc["returned"], doc["in_doubt"]) == (row["in_doubt"], 0, 0)
    assert doc["remaining"] == 20 - row["served"]
    assert _instance(doc, enclave.instance_id)["state"] == "reclaimed"
    assert restarted.find("admin_reclaim", instance=enclave.instance_id) is not None
    # Once only: a second write-off of the same instance is refused.
    status, again = await trio.to_thread.run_sync(
        admin.call, "POST", "/reclaim", {"instance": enclave.instance_id}
    )
    assert (status, again["error"]) == (409, "already_reclaimed")
