"""Protocol version 3's model delivery against real processes (docs/links.md, "Version 3").

* A bad model among good ones: a model that passes the custodian's checks but is larger
  than the enclave's ``--max-model-mib`` (an honest resource limit of the borrower's
  configuration) does not load there; the others serve, consumers get
  ``model_unavailable`` for it, and the custodian logs the error naming the model and the
  instance (and counts it in ``/metrics``).
* Transfer skip (I18): a link cut by the fault proxy and re-established moves no model
  byte the second time (measured through the proxy), and serving resumes; after a
  custodian restart, a changed model file and changed terms are streamed again while
  the unchanged model is kept, and a model no longer uploaded is withdrawn.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Final

import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from drm_consumer import Client, ModelUnavailable
from drm_lab.deployment import Enclave, Lab
from drm_lab.faults import fault_proxy
from drm_lab.models import covidnet_like_model, tiny_model, two_input_model
from drm_lab.processes import LOOPBACK
from drm_wire.attestation.policy import Policy
from drm_wire.messages import EnclaveState, ModelDescription

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: One step against real processes on loopback: only bounds a hang.
STEP: Final = 30.0
#: Custodian -> enclave bytes a re-established link may carry without any model: the TLS
#: handshake (certificates and the custodian's chain), hello, heartbeats, grants. A model
#: of several MB cannot hide in it.
LINK_OVERHEAD: Final = 64 * 1024


def _inputs(model: ModelDescription) -> dict[str, np.ndarray[Any, Any]]:
    return {
        spec.name: np.full([d or 1 for d in spec.shape], 0.5, dtype=spec.dtype)
        for spec in model.inputs
    }


async def _wait_log(daemon_wait: Any, event: str, **fields: object) -> dict[str, Any]:
    result: dict[str, Any] = await trio.to_thread.run_sync(
        partial(daemon_wait, event, timeout=STEP, **fields)
    )
    return result


def _model_metrics(lab: Lab) -> dict[tuple[str, str, str], float]:
    """The custodian's ``/metrics`` model samples: (name, model, outcome or "") -> value."""
    assert lab.admin is not None
    status, doc = lab.admin.call("GET", "/metrics")
    assert status == 200
    return {
        (sample.name, sample.labels["model"], sample.labels.get("outcome", "")): sample.value
        for family in text_string_to_metric_families(doc["_raw"])
        for sample in family.samples
        if "model" in sample.labels and not sample.name.endswith("_created")
    }


async def _serve_each(lab: Lab, enclave: Enclave, *names: str) -> None:
    """One inference of each named model; the enclave must be serving."""
    policy = Policy.load(lab.policy_path)
    async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
        info = await client.info()
        assert info.state is EnclaveState.SERVING
        with trio.fail_after(STEP):
            for name in names:
                await client.infer(name, _inputs(info.models[name]), wait=0)


async def test_a_model_too_large_for_the_enclave_leaves_the_others_serving(lab: Lab) -> None:
    models = [
        lab.write_model("tiny", tiny_model()),
        lab.write_model("large", covidnet_like_model(2.0)),  # valid; about 2 MB
        lab.write_model("two_input", two_input_model()),
    ]
    custodian = await trio.to_thread.run_sync(partial(lab.start_custodian, models, initial=10))
    enclave: Enclave = await trio.to_thread.run_sync(
        partial(lab.start_enclave, options=["--max-model-mib", "1"])
    )
    failed = await _wait_log(custodian.wait_for, "model_load_failed", model="large")
    assert failed["level"] == "error"
    assert (failed["instance"], failed["code"]) == (enclave.instance_id, "too_large")
    assert "over this enclave's max_model_mib (1 MiB)" in failed["reason"]
    logged = enclave.daemon.find("model_load_failed", model="large")
    assert logged is not None
    assert logged["level"] == "error"

    await _serve_each(lab, enclave, "tiny", "two_input")
    policy = Policy.load(lab.policy_path)
    async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
        info = await client.info()
        assert set(info.models) == {"tiny", "two_input"}
        with pytest.raises(ModelUnavailable) as caught:
            await client.infer("large", {"x": np.zeros((1, 4), dtype=np.float32)}, wait=0)
        text = str(caught.value)
        assert "'large' could not be loaded in this enclave (too_large: " in text
        assert "raise its max_model_mib" in text
        assert (await client.info()).inferences_left == info.inferences_left  # not charged
    assert custodian.find("custodian_link_failed") is None
    assert enclave.daemon.find("custodian_link_failed") is None  # the link never dropped
    metrics = await trio.to_thread.run_sync(_model_metrics, lab)
    assert metrics[("drm_custodian_model_transfers_total", "large", "failed")] == 1
    assert metrics[("drm_custodian_model_transfers_total", "tiny", "loaded")] == 1


async def test_a_cut_link_is_re_established_without_moving_a_model_byte(lab: Lab) -> None:
    big = lab.write_model("big", covidnet_like_model(8.0))
    tiny = lab.write_model("tiny", tiny_model())
    size = (await trio.to_thread.run_sync(big.stat)).st_size
    custodian = await trio.to_thread.run_sync(partial(lab.start_custodian, [big, tiny], initial=10))
    async with fault_proxy(lab.custodian_port) as proxy:
        enclave: Enclave = await trio.to_thread.run_sync(lab.start_enclave, proxy.port)
        first = proxy.downstream.forwarded
        assert first > size  # the first link carried the models
        await _serve_each(lab, enclave, "big", "tiny")

        seen = len(enclave.daemon.events)
        seen_custodian = len(custodian.events)
        before = proxy.downstream.forwarded
        assert proxy.cut() == 1
        await _wait_log(partial(enclave.daemon.wait_for, after=seen), "custodian_link_up")
        for name in ("big", "tiny"):
            await _wait_log(
                partial(custodian.wait_for, after=seen_custodian), "model_transfer_skipped",
                model=name,
            )  # fmt: skip
        second = proxy.downstream.forwarded - before
        assert second < LINK_OVERHEAD, f"the second link carried {second} bytes"
        assert proxy.accepted == 2
        await _serve_each(lab, enclave, "big", "tiny")
    assert custodian.find("model_transfer_started", after=seen_custodian) is None
    skipped = enclave.daemon.find_all("model_transfer_skipped", after=seen)
    assert sorted(e["model"] for e in skipped) == ["big", "tiny"]
    metrics = await trio.to_thread.run_sync(_model_metrics, lab)
    assert metrics[("drm_custodian_model_bytes_sent_total", "big", "")] == size
    assert metrics[("drm_custodian_model_transfers_total", "big", "kept")] == 1


async def test_changed_file_or_terms_after_a_custodian_restart_are_streamed_again(
    lab: Lab,
) -> None:
    models = [
        lab.write_model("same", tiny_model()),
        lab.write_model("replaced", tiny_model()),
        lab.write_model("reterm", two_input_model()),
        dropped := lab.write_model("dropped", tiny_model()),
    ]
    await trio.to_thread.run_sync(partial(lab.start_custodian, models, initial=10))
    enclave: Enclave = await trio.to_thread.run_sync(lab.start_enclave)
    assert lab.custodian is not None
    await trio.to_thread.run_sync(lab.custodian.stop)

    # The owner replaces one model file and sets terms on another, then restarts.
    lab.write_model("replaced", covidnet_like_model(0.5))
    (lab.workdir / "reterm.terms.toml").write_text("max_batch = 8\n", encoding="utf-8")
    seen = len(enclave.daemon.events)
    # ... and no longer lends another.
    restarted = await trio.to_thread.run_sync(partial(lab.restart_custodian, without=[dropped]))
    await _wait_log(partial(enclave.daemon.wait_for, after=seen), "custodian_link_up")
    await _wait_log(partial(enclave.daemon.wait_for, after=seen), "model_withdrawn")
    for name in ("replaced", "reterm"):
        await _wait_log(restarted.wait_for, "model_delivered", model=name)
    await _wait_log(restarted.wait_for, "model_transfer_skipped", model="same")
    assert restarted.find("model_transfer_started", model="same") is None
    await _serve_each(lab, enclave, "same", "replaced", "reterm")
    policy = Policy.load(lab.policy_path)
    async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
        info = await client.info()
        assert info.models["reterm"].terms.max_batch == 8
        assert info.models["replaced"].sha256 != info.models["same"].sha256
        assert set(info.models) == {"same", "replaced", "reterm"}  # "dropped" withdrawn
