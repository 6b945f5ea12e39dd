"""Lending terms against real processes (I14, Q12, Q13): what a borrower's engineer tries.

A real custodian lends models with terms (a terms file next to the model), a real enclave
serves them, and the attacker is not ``drm_consumer`` (which a borrower would not use)
but a raw TLS client that writes frames with ``drm_wire``'s codec by hand, so nothing on
the client side can tidy a hostile request. Each attack is checked against the ledger:
the units it records equal the cost of the requests served under the terms.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Final

import numpy as np
import pytest
import trio

from drm_consumer import Client
from drm_lab.deployment import Lab
from drm_lab.models import exporter_dims_model, tiny_model, two_input_model
from drm_lab.processes import LOOPBACK, python_command
from drm_wire.attestation.policy import Policy
from drm_wire.errors import ErrorCode
from drm_wire.framing import FrameDecoder, encode_frame
from drm_wire.messages import Error, InferenceResult, Message, Welcome, from_frame
from drm_wire.net.ratls_context import consumer_client_context
from drm_wire.net.tls import TLSStream, open_tls_client

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: One step against real processes on loopback: only bounds a hang.
STEP: Final = 30.0
POLL_INTERVAL: Final = 0.05
TINY_TERMS: Final = "max_batch = 16\n"


class RawConsumer:
    """A consumer written by hand: TLS (verifying the enclave, as anyone would), then
    frames built from dicts with ``encode_frame``; replies decoded with the codec."""

    def __init__(self, stream: TLSStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.ids = itertools.count(1)

    async def send(self, header: dict[str, Any], payload: list[bytes] | None = None) -> None:
        for buffer in encode_frame(header, payload or []):
            await self.stream.send_all(buffer)

    async def receive(self) -> Message:
        with trio.fail_after(STEP):
            while (frame := self.decoder.next_frame()) is None:
                data = await self.stream.receive_some(1 << 20)
                self.decoder.receive_data(data)
                if not data:
                    raise EOFError("the enclave closed the connection")
        return from_frame(frame)

    async def hello(self) -> None:
        await self.send({"type": "hello", "versions": [3], "role": "consumer",
                         "software": "attacker"})  # fmt: skip
        assert isinstance(await self.receive(), Welcome)

    async def infer(self, model: str, tensors: list[tuple[str, str, list[int], bytes]]) -> Message:
        """One ``infer`` frame: tensors as (name, dtype, shape, raw bytes), shapes unchecked."""
        header = {
            "type": "infer",
            "request_id": next(self.ids),
            "model": model,
            "inputs": [{"name": n, "dtype": d, "shape": s} for n, d, s, _ in tensors],
            "wait": 0.0,
        }
        await self.send(header, [data for *_, data in tensors if data])
        return await self.receive()


def _rows(rows: int, width: int = 4) -> bytes:
    return np.ones((rows, width), np.float32).tobytes()


@asynccontextmanager
async def _connect(lab: Lab, port: int) -> AsyncIterator[RawConsumer]:
    context = consumer_client_context(Policy.load(lab.policy_path))
    stream = await open_tls_client(LOOPBACK, port, context)
    try:
        consumer = RawConsumer(stream)
        await consumer.hello()
        yield consumer
    finally:
        await trio.aclose_forcefully(stream)


async def _ledger_served(lab: Lab, expected: int) -> None:
    """Wait until the ledger records ``expected`` served (reports trail by up to a
    second), then check it stays there: nothing more was charged."""
    with trio.move_on_after(STEP):
        for _ in itertools.count():
            if (await trio.to_thread.run_sync(lab.usage))["served"] == expected:
                break
            await trio.sleep(POLL_INTERVAL)
    assert (await trio.to_thread.run_sync(lab.usage))["served"] == expected


def _refused(reply: Message, *fragments: str) -> None:
    assert isinstance(reply, Error), reply
    assert reply.code is ErrorCode.BAD_REQUEST, reply
    for fragment in fragments:
        assert fragment in reply.message, reply.message


async def test_hand_built_requests_cost_exactly_their_items(lab: Lab) -> None:
    tiny = lab.write_model("tiny", tiny_model())
    (tiny.parent / "tiny.terms.toml").write_text(TINY_TERMS, encoding="utf-8")
    two = lab.write_model("two", two_input_model())
    image = lab.write_model("image", exporter_dims_model("?"))
    await trio.to_thread.run_sync(partial(lab.start_custodian, [tiny, two, image], initial=200))
    enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    async with _connect(lab, enclave.consumer_port) as attacker:
        await _attacks(lab, attacker)
    # Negative and huge dims never make a tensor: the frame is refused as malformed and
    # the connection closed; still nothing charged.
    for shape in ([-1, 4], [2**40, 4]):
        async with _connect(lab, enclave.consumer_port) as attacker:
            await attacker.send(
                {"type": "infer", "request_id": 1, "model": "tiny", "wait": 0.0,
                 "inputs": [{"name": "x", "dtype": "float32", "shape": shape}]},
                [_rows(1)],
            )  # fmt: skip
            reply = await attacker.receive()
            assert isinstance(reply, Error), reply
            assert reply.request_id is None  # a connection-level error: it closes
    await _ledger_served(lab, 9)
    # The ledger counts inferences (items) and requests apart: 9 in 2 requests.
    assert lab.admin is not None
    usage = await trio.to_thread.run_sync(lab.admin.usage)
    assert (usage["served"], usage["requests"]) == (9, 2)


async def _attacks(lab: Lab, attacker: RawConsumer) -> None:
    f32 = "float32"

    # A batch of 8 within the terms: served, and charged 8.
    reply = await attacker.infer("tiny", [("x", f32, [8, 4], _rows(8))])
    assert isinstance(reply, InferenceResult), reply
    assert reply.cost == 8
    assert reply.outputs[0].shape == (8, 3)
    # A batch over max_batch, the million-row batch, a batch of nothing: refused.
    _refused(await attacker.infer("tiny", [("x", f32, [17, 4], _rows(17))]),
             "input 'x' dim 0 is 17", "[1, 16]")  # fmt: skip
    _refused(await attacker.infer("tiny", [("x", f32, [1_000_000, 4], _rows(1_000_000))]),
             "input 'x' dim 0 is 1000000")  # fmt: skip
    _refused(await attacker.infer("tiny", [("x", f32, [0, 4], b"")]), "dim 0 is 0")
    # Batched inputs whose batch sizes disagree (a[N, 4], b[N]): which one would it cost?
    _refused(
        await attacker.infer(
            "two",
            [("a", f32, [1, 4], _rows(1)), ("b", "int64", [64], np.ones(64, np.int64).tobytes())],
        ),
        "batch sizes differ: input 'a' has 1, input 'b' has 64",
    )
    # One "image" 16,000 pixels wide, to a model whose dims are all '?'.
    wide = np.ones((1, 3, 2, 16_000), np.float32).tobytes()
    _refused(await attacker.infer("image", [("x", f32, [1, 3, 2, 16_000], wide)]),
             "input 'x' dim 3 is 16000: it must be in [1, 4096]")  # fmt: skip
    # ... while the size its exporter's package feeds it is served, for one unit.
    served = np.ones((1, 3, 48, 192), np.float32).tobytes()
    reply = await attacker.infer("image", [("x", f32, [1, 3, 48, 192], served)])
    assert isinstance(reply, InferenceResult), reply
    assert reply.cost == 1
    # 9 units charged in all: the batch of 8 and the one image.
    await _ledger_served(lab, 9)
    assert reply.inferences_left == 200 - 9


def test_request_terms_on_an_unbounded_model_stop_the_custodian(lab: Lab) -> None:
    """``unit = "request"`` with a dynamic dim left unbounded: the custodian refuses to
    start (exit status 2), naming the model and the dim."""
    tiny = lab.write_model("tiny", tiny_model())
    (tiny.parent / "tiny.terms.toml").write_text('unit = "request"\n', encoding="utf-8")
    argv = python_command(
        "drm_custodian", "serve", "--state-dir", lab.state_dir, "--policy", lab.policy_path,
        "--upload", tiny, "--port", "0", "--admin-port", "0",
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=STEP, check=False)
    assert done.returncode == 2, done
    assert (
        "model 'tiny': its terms do not fit it: input 'x' dim 0 is dynamic and unbounded"
        in done.stderr
    )
    assert "custodian_listening" not in done.stdout


async def test_a_request_costing_more_than_half_the_lease_is_topped_up_not_parked_forever(
    lab: Lab,
) -> None:
    """Q13: with a lease of 20 and a largest request of 16, an enclave left holding 14
    (more than half the lease, the old top-up threshold) must still get the grant that
    lets a batch of 16 run: the planner tops up below the largest request's cost. The
    batch parks no longer than a grant takes, and is charged 16."""
    tiny = lab.write_model("tiny", tiny_model())
    (tiny.parent / "tiny.terms.toml").write_text(TINY_TERMS, encoding="utf-8")
    await trio.to_thread.run_sync(partial(lab.start_custodian, [tiny], initial=100, lease=20))
    enclave = await trio.to_thread.run_sync(lab.start_enclave, lab.custodian_port)
    policy = Policy.load(lab.policy_path)
    async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
        with trio.fail_after(STEP):
            first = await client.infer("tiny", {"x": np.ones((6, 4), np.float32)}, wait=0)
        assert (first.cost, first.inferences_left) == (6, 14)
        with trio.fail_after(STEP):
            batch = await client.infer("tiny", {"x": np.ones((16, 4), np.float32)})
        assert batch.cost == 16
    await _ledger_served(lab, 22)
