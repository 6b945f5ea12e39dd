"""The enclave enforces the model's lending terms before any quota is taken (I14, Q12).

The real enclave daemon, linked to a fake custodian that sends the model with its terms,
and a consumer speaking the protocol. Each test checks what the quota charged against the
request's cost under the terms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from drm_enclave.model_host import BadInputError, ModelError, load_model
from drm_lab import models
from drm_wire.errors import ErrorCode, PeerError
from drm_wire.messages import InferenceResult, ModelLoaded, UsageReport
from drm_wire.model.terms import Terms, Unit
from drm_wire.tensors import Tensor
from tests.enclave.enclave_fakes import TIMEOUT, running_enclave, tiny_input

BATCH_16 = Terms(max_batch=16)


# --- the model host -----------------------------------------------------------------


@pytest.mark.parametrize("style", models.DIM_STYLES)
def test_exporter_dim_names_are_served_at_their_package_sizes(style: str) -> None:
    """A 1x3x48x192 input to a model whose dims are all ``?`` (or empty, unset, unk__N):
    what the exporter's own package feeds it. A batch of 8 costs 8."""
    model = load_model("cls", models.exporter_dims_model(style))
    one = Tensor.from_numpy("x", np.ones((1, 3, 48, 192), np.float32))
    assert model.check_inputs([one]) == 1
    (y,) = model.run([one])
    assert y.shape == (1, 3)
    eight = Tensor.from_numpy("x", np.ones((8, 3, 48, 192), np.float32))
    assert model.check_inputs([eight]) == 8


def test_a_shared_symbolic_name_is_not_a_constraint() -> None:
    """onnxruntime runs ``a`` [2, 3] and ``b`` [2, 5] though both dims are named ``L``;
    the batch axes must agree, the rest need not."""
    model = load_model("shared", models.shared_dim_model())
    a = Tensor.from_numpy("a", np.ones((2, 3), np.float32))
    b = Tensor.from_numpy("b", np.ones((2, 5), np.float32))
    assert model.check_inputs([a, b]) == 2
    (y,) = model.run([a, b])
    assert y.to_numpy().tolist() == [8.0, 8.0]
    b3 = Tensor.from_numpy("b", np.ones((3, 5), np.float32))
    with pytest.raises(BadInputError, match="batch sizes differ: input 'a' has 2, input 'b' has 3"):
        model.check_inputs([a, b3])


def test_every_run_path_enforces_the_terms() -> None:
    model = load_model("tiny", models.tiny_model(), terms=BATCH_16)
    with pytest.raises(BadInputError, match=r"dim 0 is 17: the batch size must be in \[1, 16\]"):
        model.run(tiny_input(17))
    with pytest.raises(BadInputError):
        model.run_inline(tiny_input(17))
    assert len(model.run(tiny_input(16))[0].to_numpy()) == 16


def test_terms_that_do_not_fit_the_model_are_refused_at_load() -> None:
    with pytest.raises(ModelError, match="its terms do not fit it: input 'x' dim 0 is dynamic"):
        load_model("tiny", models.tiny_model(), terms=Terms(unit=Unit.REQUEST))


# --- the consumer server and the quota ----------------------------------------------


async def test_a_batch_costs_its_size_and_the_custodian_hears_it(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=20, terms=BATCH_16)
        async with rig.consumer() as consumer:
            result = await consumer.infer(tiny_input(8))
            assert (result.cost, result.inferences_left) == (8, 12)
            assert result.outputs[0].shape == (8, 3)
            assert rig.runtime.quota.served_total == 8
            report = await session.next(UsageReport)
            assert report.served_total == 8


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (17, r"input 'x' dim 0 is 17: the batch size must be in \[1, 16\]"),
        (0, r"input 'x' dim 0 is 0: the batch size must be in \[1, 16\]"),
        (1_000_000, r"input 'x' dim 0 is 1000000: the batch size must be in \[1, 16\]"),
    ],
)
async def test_a_batch_outside_the_terms_is_refused_and_costs_nothing(
    tmp_path: Path, rows: int, message: str
) -> None:
    async with running_enclave(tmp_path) as rig:
        await rig.link(granted_total=20, terms=BATCH_16)
        async with rig.consumer() as consumer:
            with pytest.raises(PeerError, match=message) as caught:
                await consumer.infer(tiny_input(rows))
            assert caught.value.code is ErrorCode.BAD_REQUEST
            quota = rig.runtime.quota
            assert (quota.available, quota.in_use, quota.served_total) == (20, 0, 0)


async def test_the_default_terms_close_the_million_row_hole(tmp_path: Path) -> None:
    """The issue's measurement: one request of 1,000,000 rows used to cost one unit."""
    async with running_enclave(tmp_path) as rig:
        await rig.link(granted_total=100)  # no terms sent: the defaults
        async with rig.consumer() as consumer:
            with pytest.raises(PeerError, match=r"dim 0 is 1000000: the batch size must be in"):
                await consumer.infer(tiny_input(1_000_000))
            result = await consumer.infer(tiny_input(64))
            assert (result.cost, rig.runtime.quota.served_total) == (64, 64)


async def test_a_request_parks_until_its_whole_cost_is_granted(tmp_path: Path) -> None:
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=5, terms=BATCH_16)
        async with rig.consumer() as consumer:
            results: list[InferenceResult] = []
            parked = trio.Event()

            async def batch_of_8() -> None:
                results.append(await consumer.infer(tiny_input(8), wait=None, parked=parked))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(batch_of_8)
                with trio.fail_after(TIMEOUT):
                    await parked.wait()
                assert rig.runtime.quota.demand == 8
                # A smaller request does not barge past the parked one.
                with pytest.raises(PeerError) as caught:
                    await consumer.infer(tiny_input(1), wait=0.0)
                assert caught.value.code is ErrorCode.NO_INFERENCES
                await session.grant(3, 8)
            (result,) = results
            assert (result.cost, result.inferences_left) == (8, 0)
            assert rig.runtime.quota.served_total == 8


async def test_the_same_model_under_other_terms_is_loaded_again(tmp_path: Path) -> None:
    """Terms are part of the model's identity: a session is kept only for the same bytes
    under the same terms."""
    async with running_enclave(tmp_path) as rig:
        session = await rig.link(granted_total=3, terms=BATCH_16)
        first = rig.runtime.models["tiny"]
        session.close()
        second = await rig.custodian.session()
        await second.send_model("tiny", models.tiny_model(), terms=Terms(max_batch=2))
        await second.next(ModelLoaded)
        await second.grant(3, 3)
        with trio.fail_after(TIMEOUT):
            await rig.runtime.wait_for(lambda runtime: runtime.models["tiny"] is not first)
        assert rig.runtime.models["tiny"].terms == Terms(max_batch=2)
        async with rig.consumer() as consumer:
            with pytest.raises(PeerError, match=r"must be in \[1, 2\]"):
                await consumer.infer(tiny_input(3))
