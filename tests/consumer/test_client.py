"""``drm_consumer.Client`` against the in-process fake enclave, over loopback RA-TLS."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
import trio

from drm_consumer import (
    AttestationRefused,
    BadRequest,
    Blocked,
    Busy,
    Client,
    ConnectionFailed,
    CustodianUnreachable,
    InferenceFailed,
    InferenceOutcome,
    ModelNotFound,
    NoInferencesLeft,
    RequestFailed,
    query,
)
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import MeasurementMismatchError, Policy
from drm_wire.errors import ErrorCode
from drm_wire.messages import EnclaveState, Error, InferenceRequest, PeerRole
from drm_wire.net.channel import MessageChannel
from drm_wire.tensors import Tensor
from tests.consumer.conftest import MR_ENCLAVE, MR_SIGNER, make_policy
from tests.consumer.fake_enclave import (
    HOST,
    MODEL,
    FakeEnclave,
    answer,
    fail_with,
    park_then_answer,
    sample_input,
)

#: Generous for loopback; only keeps a bug from hanging the suite.
TIMEOUT = 10.0


def _cause_chain(exc: BaseException) -> list[BaseException]:
    chain = []
    current: BaseException | None = exc
    while current is not None:
        chain.append(current)
        current = current.__cause__
    return chain


# --- connecting and attestation --------------------------------------------------------


async def test_connect_verifies_the_enclave_and_says_hello_as_a_consumer(
    fake_enclave: FakeEnclave, policy: Policy
) -> None:
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        assert client.attestation.mr_enclave == MR_ENCLAVE
        assert client.attestation.mr_signer == MR_SIGNER
        assert client.attestation.simulated
        await client.info()  # the hello exchange finished
    assert [h.role for h in fake_enclave.hellos] == [PeerRole.CONSUMER]
    assert fake_enclave.hellos[0].license is None


async def test_wrong_mrenclave_is_refused_before_any_application_byte(
    fake_enclave: FakeEnclave, platform: SimulatedPlatform
) -> None:
    wrong = make_policy(platform, mr_enclave=hashlib.sha256(b"another enclave").digest())
    with pytest.raises(AttestationRefused) as info:
        async with Client.connect(HOST, fake_enclave.port, policy=wrong):
            pytest.fail("connected to an enclave the policy refuses")
    assert any(isinstance(e, MeasurementMismatchError) for e in _cause_chain(info.value))
    with trio.fail_after(TIMEOUT):
        await fake_enclave.handshake_failed.wait()
    assert fake_enclave.handshakes_completed == 0
    assert fake_enclave.hellos == []
    assert fake_enclave.requests == []


async def test_an_untrusted_simulation_root_is_refused(
    fake_enclave: FakeEnclave,
) -> None:
    no_simulation = Policy(mr_enclave=(MR_ENCLAVE,), isv_prod_id=0, accept_unknown_tcb_status=True)
    with pytest.raises(AttestationRefused):
        async with Client.connect(HOST, fake_enclave.port, policy=no_simulation):
            pytest.fail("trusted a simulated quote without being told to")
    with trio.fail_after(TIMEOUT):
        await fake_enclave.handshake_failed.wait()
    assert fake_enclave.handshakes_completed == 0


async def test_nothing_listening_is_connection_failed(policy: Policy) -> None:
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]
    for listener in listeners:
        await listener.aclose()
    with pytest.raises(ConnectionFailed):
        async with Client.connect(HOST, port, policy=policy):
            pytest.fail("connected to a closed port")


async def test_a_silent_server_is_connection_failed_within_connect_timeout(
    policy: Policy, nursery: trio.Nursery
) -> None:
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def accept_and_say_nothing() -> None:
        accepted.append(await listeners[0].accept())

    nursery.start_soon(accept_and_say_nothing)
    start = trio.current_time()
    with pytest.raises(ConnectionFailed, match="timed out"):
        async with Client.connect(HOST, port, policy=policy, connect_timeout=0.2):
            pytest.fail("connected to a server that never answered the handshake")
    assert trio.current_time() - start < TIMEOUT
    for stream in accepted:
        await stream.aclose()
    await listeners[0].aclose()


async def test_no_welcome_is_connection_failed_within_connect_timeout(
    fake_enclave: FakeEnclave, policy: Policy
) -> None:
    fake_enclave.answer_hello = False
    with pytest.raises(ConnectionFailed, match="timed out"):
        async with Client.connect(HOST, fake_enclave.port, policy=policy, connect_timeout=0.2):
            pytest.fail("the hello cannot have succeeded")
    assert fake_enclave.handshakes_completed == 1


# --- info and inference ------------------------------------------------------------------


async def test_info(fake_enclave: FakeEnclave, policy: Policy) -> None:
    fake_enclave.inferences_left = 7
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        info = await client.info()
    assert info.inferences_left == 7
    assert info.state is EnclaveState.SERVING
    assert list(info.models) == [MODEL]
    assert [(s.name, s.dtype, s.shape) for s in info.models[MODEL].inputs] == [
        ("x", "float32", (None, 4))
    ]


async def test_infer_round_trip_with_numpy(fake_enclave: FakeEnclave, policy: Policy) -> None:
    fake_enclave.inferences_left = 2
    x = sample_input()
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        first = await client.infer(MODEL, {"x": x})
        second = await client.infer(MODEL, {"x": x + 1})
    np.testing.assert_array_equal(first.outputs["y"], x * 2)
    np.testing.assert_array_equal(second.outputs["y"], (x + 1) * 2)
    assert first.outputs["y"].dtype == np.float32
    assert (first.inferences_left, second.inferences_left) == (1, 0)
    request = fake_enclave.requests[0]
    assert isinstance(request, InferenceRequest)
    assert request.model == MODEL
    assert request.wait is None
    assert [(t.name, t.dtype, t.shape) for t in request.inputs] == [("x", "float32", (2, 4))]


async def test_infer_accepts_wire_tensors_and_an_int_wait(
    fake_enclave: FakeEnclave, policy: Policy
) -> None:
    x = sample_input(3)
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        outcome = await client.infer(MODEL, [Tensor.from_numpy("x", x)], wait=5)
    np.testing.assert_array_equal(outcome.outputs["y"], x * 2)
    request = fake_enclave.requests[0]
    assert isinstance(request, InferenceRequest)
    assert request.wait == 5.0


async def test_waiting_calls_on_waiting_then_returns_the_result(
    fake_enclave: FakeEnclave, policy: Policy
) -> None:
    fake_enclave.behaviour = park_then_answer
    positions: list[int] = []
    parked = trio.Event()

    def on_waiting(position: int) -> None:
        positions.append(position)
        parked.set()

    outcomes = []
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:

        async def run() -> None:
            outcomes.append(await client.infer(MODEL, {"x": sample_input()}, on_waiting=on_waiting))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await parked.wait()
                assert outcomes == []  # still parked
                fake_enclave.release.set()
    assert positions == [1]
    np.testing.assert_array_equal(outcomes[0].outputs["y"], sample_input() * 2)


async def test_an_exception_in_on_waiting_is_raised_as_itself(
    fake_enclave: FakeEnclave, policy: Policy
) -> None:
    fake_enclave.behaviour = park_then_answer

    def on_waiting(position: int) -> None:
        raise KeyError(position)

    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        with trio.fail_after(TIMEOUT), pytest.raises(KeyError):
            await client.infer(MODEL, {"x": sample_input()}, on_waiting=on_waiting)
        fake_enclave.behaviour = answer  # the connection is still usable
        outcome = await client.infer(MODEL, {"x": sample_input()})
    np.testing.assert_array_equal(outcome.outputs["y"], sample_input() * 2)


async def test_a_cancelled_request_leaves_the_client_usable(
    fake_enclave: FakeEnclave, policy: Policy
) -> None:
    fake_enclave.behaviour = park_then_answer
    parked = trio.Event()
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        with trio.move_on_after(TIMEOUT) as scope:
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    await client.infer(
                        MODEL, {"x": sample_input()}, on_waiting=lambda _: parked.set()
                    )

                nursery.start_soon(run)
                await parked.wait()
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught
        fake_enclave.behaviour = answer
        fake_enclave.release.set()  # the abandoned request's late result is dropped
        with trio.fail_after(TIMEOUT):
            outcome = await client.infer(MODEL, {"x": sample_input(1)})
    np.testing.assert_array_equal(outcome.outputs["y"], sample_input(1) * 2)


async def test_twenty_concurrent_inferences_on_one_client(
    fake_enclave: FakeEnclave, policy: Policy
) -> None:
    count = 20
    all_in = trio.Event()

    async def hold_until_all_arrived(
        fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest
    ) -> None:
        if len(fake.requests) == count:
            all_in.set()
        await all_in.wait()  # proves the 20 requests were in flight together
        await answer(fake, channel, request)

    fake_enclave.behaviour = hold_until_all_arrived
    results: dict[int, np.ndarray[Any, Any]] = {}
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:

        async def one(i: int) -> None:
            outcome = await client.infer(MODEL, {"x": sample_input(offset=100.0 * i)})
            results[i] = outcome.outputs["y"]

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, i)
    assert sorted(results) == list(range(count))
    for i, y in results.items():
        np.testing.assert_array_equal(y, sample_input(offset=100.0 * i) * 2)
    assert fake_enclave.inferences_left == 100 - count


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ErrorCode.NO_INFERENCES, NoInferencesLeft),
        (ErrorCode.CUSTODIAN_UNREACHABLE, CustodianUnreachable),
        (ErrorCode.BLOCKED, Blocked),
        (ErrorCode.BUSY, Busy),
        (ErrorCode.BAD_REQUEST, BadRequest),
        (ErrorCode.LIMIT_EXCEEDED, BadRequest),
        (ErrorCode.MODEL_NOT_FOUND, ModelNotFound),
        (ErrorCode.INFERENCE_FAILED, InferenceFailed),
        (ErrorCode.INTERNAL, RequestFailed),
        (ErrorCode.TIMEOUT, RequestFailed),
    ],
)
async def test_each_error_code_is_its_exception_and_the_client_stays_usable(
    fake_enclave: FakeEnclave, policy: Policy, code: ErrorCode, expected: type[RequestFailed]
) -> None:
    fake_enclave.behaviour = fail_with(code, "the detail")
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        with pytest.raises(RequestFailed) as info:
            await client.infer(MODEL, {"x": sample_input()}, wait=0.0)
        assert type(info.value) is expected
        assert info.value.code is code
        assert info.value.detail == "the detail"
        assert info.value.request_id == fake_enclave.requests[0].request_id  # type: ignore[attr-defined]
        fake_enclave.behaviour = answer
        outcome = await client.infer(MODEL, {"x": sample_input()})
    assert outcome.inferences_left == 99


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ErrorCode.BUSY, Busy),
        (ErrorCode.CUSTODIAN_UNREACHABLE, CustodianUnreachable),
        (ErrorCode.PROTOCOL_ERROR, ConnectionFailed),
        (ErrorCode.INTERNAL, ConnectionFailed),
    ],
)
async def test_a_connection_level_error_ends_the_client(
    fake_enclave: FakeEnclave,
    policy: Policy,
    code: ErrorCode,
    expected: type[Exception],
) -> None:
    async def hang_up(
        fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest
    ) -> None:
        await channel.send(Error(code=code, message="going away"))
        await channel.aclose()

    fake_enclave.behaviour = hang_up
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        with trio.fail_after(TIMEOUT), pytest.raises(expected) as info:
            await client.infer(MODEL, {"x": sample_input()})
        with pytest.raises(expected) as again:  # the end of the connection is final
            await client.info()
    for error in (info.value, again.value):
        if isinstance(error, RequestFailed):
            assert (error.code, error.request_id) == (code, None)


async def test_a_lost_connection_fails_requests_in_flight(
    fake_enclave: FakeEnclave, policy: Policy
) -> None:
    async def drop(fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest) -> None:
        await trio.aclose_forcefully(channel.stream)

    fake_enclave.behaviour = drop
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        with trio.fail_after(TIMEOUT), pytest.raises(ConnectionFailed):
            await client.infer(MODEL, {"x": sample_input()})


async def test_inputs_the_wire_cannot_carry_are_bad_request_and_not_sent(
    fake_enclave: FakeEnclave, policy: Policy
) -> None:
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        with pytest.raises(BadRequest):
            await client.infer(MODEL, {"x": np.array(["text"])})
        with pytest.raises(BadRequest):
            await client.infer(MODEL, {"x": sample_input()}, wait=-1.0)
        with pytest.raises(TypeError):
            await client.infer(MODEL, [sample_input()])  # type: ignore[list-item]
        await client.info()
    assert [type(r).__name__ for r in fake_enclave.requests] == ["ModelInfoRequest"]


async def test_use_after_the_block_is_connection_failed(
    fake_enclave: FakeEnclave, policy: Policy
) -> None:
    async with Client.connect(HOST, fake_enclave.port, policy=policy) as client:
        pass
    with pytest.raises(ConnectionFailed):
        await client.infer(MODEL, {"x": sample_input()})


async def test_sync_query(fake_enclave: FakeEnclave, policy: Policy) -> None:
    def call() -> InferenceOutcome:
        return query(
            HOST, fake_enclave.port, policy=policy, model=MODEL, inputs={"x": sample_input()}
        )

    with trio.fail_after(TIMEOUT):
        outcome = await trio.to_thread.run_sync(call)
    np.testing.assert_array_equal(outcome.outputs["y"], sample_input() * 2)
    assert outcome.inferences_left == 99
