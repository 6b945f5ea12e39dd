"""Version 3 on the enclave's side: a model that does not load is reported and the link
goes on; ``hello`` says which models are held and ``model_keep`` is checked against them.

The real enclave daemon (``serve``) runs against the fake custodian of
:mod:`tests.enclave.enclave_fakes`, which plays both an honest and a hostile custodian.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from drm_lab.models import random_bytes, tiny_model, two_input_model
from drm_wire.errors import ErrorCode, PeerError
from drm_wire.limits import MiB
from drm_wire.messages import (
    EnclaveState,
    LoadFailure,
    ModelBegin,
    ModelKeep,
    ModelLoaded,
    ModelLoadFailed,
    terms_digest,
)
from drm_wire.model.terms import Terms, Unit
from tests.enclave.enclave_fakes import FakeSession, Rig, running_enclave

TINY = tiny_model()
TINY_SHA256 = hashlib.sha256(TINY).digest()


async def _serving_tiny(rig: Rig, session: FakeSession, *, units: int = 3) -> None:
    """Deliver tiny on ``session``, grant, and wait until the enclave serves."""
    await session.send_model("tiny", TINY)
    assert (await session.next(ModelLoaded)).sha256 == TINY_SHA256
    await session.grant(units, units)
    await rig.wait_state(EnclaveState.SERVING)


async def test_a_model_that_does_not_load_is_reported_and_the_others_serve(
    tmp_path: Path,
) -> None:
    bad = random_bytes()  # its digest matches what is announced; it is no ONNX model
    with capture_logs() as logs:
        async with running_enclave(tmp_path) as rig:
            session = await rig.custodian.session()
            await session.send_model("bad", bad)
            failed = await session.next(ModelLoadFailed)
            assert (failed.name, failed.sha256) == ("bad", hashlib.sha256(bad).digest())
            assert failed.code is LoadFailure.INVALID_MODEL
            assert failed.reason.startswith("invalid model: ")
            await _serving_tiny(rig, session)  # the same link goes on
            async with rig.consumer() as consumer:
                assert (await consumer.infer()).inferences_left == 2
                with pytest.raises(PeerError) as caught:
                    await consumer.infer(model="bad")
                assert caught.value.code is ErrorCode.MODEL_UNAVAILABLE
                assert "'bad' could not be loaded in this enclave (invalid_model: " in str(
                    caught.value
                )
                assert "the model's owner must replace it" in str(caught.value)
                assert (await consumer.info()).inferences_left == 2  # nothing charged
            assert rig.custodian.hellos == 1  # no redial
    (logged,) = [e for e in logs if e["event"] == "model_load_failed"]
    assert logged["log_level"] == "error"
    assert (logged["model"], logged["code"]) == ("bad", "invalid_model")
    assert not [e for e in logs if e["event"] == "custodian_link_failed"]


async def test_a_model_over_max_model_mib_is_refused_at_model_begin(tmp_path: Path) -> None:
    size = 2 * MiB
    digest = hashlib.sha256(bytes(size)).digest()
    async with running_enclave(tmp_path, max_model_bytes=MiB) as rig:
        session = await rig.custodian.session()
        # Only the begin: the refusal comes before any byte of the model is sent.
        await session.channel.send(ModelBegin(name="huge", size=size, sha256=digest))
        failed = await session.next(ModelLoadFailed)
        assert failed.code is LoadFailure.TOO_LARGE
        assert failed.reason == (
            f"the model is {size} bytes, over this enclave's max_model_mib (1 MiB)"
        )
        # The custodian ends the transfer (here after two chunks already on their way):
        # they are dropped, and the link goes on.
        await session.send_model("huge", bytes(size), chunk=MiB, begin=False)
        await _serving_tiny(rig, session)
        assert set(rig.runtime.models) == {"tiny"}
        async with rig.consumer() as consumer:
            with pytest.raises(PeerError) as caught:
                await consumer.infer(model="huge")
            assert caught.value.code is ErrorCode.MODEL_UNAVAILABLE
            assert "raise its max_model_mib" in str(caught.value)


async def test_a_held_model_is_kept_without_a_transfer(tmp_path: Path) -> None:
    with capture_logs() as logs:
        async with running_enclave(tmp_path) as rig:
            first = await rig.custodian.session()
            assert first.hello.held == ()  # holds nothing yet
            await _serving_tiny(rig, first)
            first.close()  # the link is cut; the enclave redials
            second = await rig.custodian.session()
            (held,) = second.hello.held or ()
            assert (held.name, held.sha256) == ("tiny", TINY_SHA256)
            assert held.terms_sha256 == terms_digest(Terms())
            await second.channel.send(
                ModelKeep(name="tiny", size=len(TINY), sha256=TINY_SHA256, terms=Terms())
            )
            assert (await second.next(ModelLoaded)).sha256 == TINY_SHA256
            await second.grant(3, 3)  # the same total: a re-sync adds nothing
            await rig.wait_state(EnclaveState.SERVING)
            async with rig.consumer() as consumer:
                assert (await consumer.infer()).inferences_left == 2
    (skipped,) = [e for e in logs if e["event"] == "model_transfer_skipped"]
    assert skipped["model"] == "tiny"


@pytest.mark.parametrize(
    ("keep", "why"),
    [
        # A hostile (or confused) custodian: other bytes, other terms, a model never sent.
        (ModelKeep(name="tiny", size=len(TINY), sha256=b"\x07" * 32, terms=Terms()), "bytes"),
        (
            ModelKeep(
                name="tiny", size=len(TINY), sha256=TINY_SHA256, terms=Terms(unit=Unit.REQUEST)
            ),
            "terms",
        ),
        (ModelKeep(name="other", size=len(TINY), sha256=TINY_SHA256, terms=Terms()), "name"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
async def test_model_keep_for_what_is_not_held_serves_nothing_of_it(
    tmp_path: Path, keep: ModelKeep, why: str
) -> None:
    async with running_enclave(tmp_path) as rig:
        first = await rig.custodian.session()
        await _serving_tiny(rig, first)
        first.close()
        second = await rig.custodian.session()
        await second.channel.send(keep)
        failed = await second.next(ModelLoadFailed)
        assert (failed.name, failed.sha256, failed.code) == (
            keep.name,
            keep.sha256,
            LoadFailure.NOT_HELD,
        )
        await second.send_model("two_input", two_input_model())
        await second.next(ModelLoaded)
        await second.grant(3, 3)
        await rig.wait_state(EnclaveState.SERVING)
        # The session held for tiny is dropped if the keep named it with other bytes or
        # terms: the custodian lends something else now, and the old one must not serve.
        assert "tiny" not in rig.runtime.models or why == "name"
        async with rig.consumer() as consumer:
            with pytest.raises(PeerError) as caught:
                await consumer.infer(model=keep.name)
            assert caught.value.code is ErrorCode.MODEL_UNAVAILABLE
            assert "not_held" in str(caught.value)


async def test_a_model_the_custodian_no_longer_lends_is_withdrawn_at_the_re_sync(
    tmp_path: Path,
) -> None:
    with capture_logs() as logs:
        async with running_enclave(tmp_path) as rig:
            first = await rig.custodian.session()
            await first.send_model("two_input", two_input_model())
            await first.next(ModelLoaded)
            await _serving_tiny(rig, first)
            first.close()
            # The owner restarted its custodian without two_input: only tiny comes back.
            second = await rig.custodian.session()
            assert {held.name for held in second.hello.held or ()} == {"tiny", "two_input"}
            await second.channel.send(
                ModelKeep(name="tiny", size=len(TINY), sha256=TINY_SHA256, terms=Terms())
            )
            await second.next(ModelLoaded)
            assert "two_input" in rig.runtime.models  # until the re-sync says all came
            await second.grant(3, 3)
            await rig.wait_state(EnclaveState.SERVING)
            assert set(rig.runtime.models) == {"tiny"}
            async with rig.consumer() as consumer:
                with pytest.raises(PeerError) as caught:
                    await consumer.infer(model="two_input")
                assert caught.value.code is ErrorCode.MODEL_NOT_FOUND
                assert (await consumer.infer()).inferences_left == 2
    (withdrawn,) = [e for e in logs if e["event"] == "model_withdrawn"]
    assert withdrawn["model"] == "two_input"
