"""RequestChannel over memory and lockstep streams: requests, replies, reading on demand.

Rules: no sockets and no sleeps; every timeout runs on ``autojump_clock``; each test runs
on a buffered and a lockstep ``stream_pair`` (``conftest.py``), and each one parametrised
over ``read_on_demand`` runs with the client's reader task and with the requesting tasks
reading themselves.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from drm_wire.errors import ErrorCode, LocalProtocolError, PeerError
from drm_wire.messages import (
    EnclaveState,
    Error,
    InferenceRequest,
    InferenceResult,
    ModelInfo,
    ModelInfoRequest,
    Waiting,
)
from drm_wire.net.channel import ChannelError
from drm_wire.net.request_channel import RequestChannel
from tests.net.channel_fakes import (
    StreamPair,
    channel_pair,
    infer,
    result_for,
    serve_requests,
)


@pytest.fixture(params=[False, True], ids=["reader_task", "on_demand"])
def read_on_demand(request: pytest.FixtureRequest) -> bool:
    """How the client channel reads: its reader task, or the requesting tasks themselves."""
    on_demand: bool = request.param
    return on_demand


async def test_hundred_requests_in_flight_answered_out_of_order(
    stream_pair: StreamPair, read_on_demand: bool
) -> None:
    count = 100
    results: dict[int, InferenceResult] = {}

    async def ask(client: RequestChannel, value: float) -> None:
        request = infer(client.next_request_id(), value)
        results[request.request_id] = await client.request(request)
        assert results[request.request_id].outputs[0].to_numpy().tolist() == [2 * value] * 4

    async with (
        channel_pair(stream_pair, read_on_demand=read_on_demand) as (client, server),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(serve_requests, server, count)
        for i in range(count):
            nursery.start_soon(ask, client, float(i))
    assert sorted(results) == list(range(1, count + 1))


async def test_waiting_goes_to_the_callback_then_the_result(
    stream_pair: StreamPair, read_on_demand: bool
) -> None:
    waits: list[Waiting] = []
    async with channel_pair(stream_pair, read_on_demand=read_on_demand) as (client, server):

        async def enclave() -> None:
            request = await server.receive()
            assert isinstance(request, InferenceRequest)
            await server.send(Waiting(request_id=request.request_id, position=2))
            await server.send(Waiting(request_id=request.request_id, position=1))
            await server.send(result_for(request, inferences_left=0))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(enclave)
            result = await client.request(infer(5, 1.5), on_waiting=waits.append)
    assert [w.position for w in waits] == [2, 1]
    assert result.inferences_left == 0
    assert result.outputs[0].to_numpy().tolist() == [3.0] * 4


async def test_waiting_without_callback_is_ignored(
    stream_pair: StreamPair, read_on_demand: bool
) -> None:
    async with channel_pair(stream_pair, read_on_demand=read_on_demand) as (client, server):

        async def enclave() -> None:
            request = await server.receive()
            assert isinstance(request, InferenceRequest)
            await server.send(Waiting(request_id=request.request_id, position=0))
            await server.send(result_for(request))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(enclave)
            assert (await client.request(infer(1))).request_id == 1


async def test_error_reply_is_peer_error_and_the_channel_stays_open(
    stream_pair: StreamPair,
    read_on_demand: bool,
) -> None:
    async with channel_pair(stream_pair, read_on_demand=read_on_demand) as (client, server):

        async def enclave() -> None:
            first = await server.receive()
            assert isinstance(first, InferenceRequest)
            await server.send(
                Error(code=ErrorCode.NO_INFERENCES, message="none left", request_id=1)
            )
            second = await server.receive()
            assert isinstance(second, ModelInfoRequest)
            await server.send(
                ModelInfo(request_id=2, models=(), inferences_left=0, state=EnclaveState.SERVING)
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(enclave)
            with pytest.raises(PeerError, match="none left") as info:
                await client.request(infer(client.next_request_id()))
            assert info.value.code is ErrorCode.NO_INFERENCES
            assert info.value.request_id == 1
            info_reply = await client.request(ModelInfoRequest(request_id=client.next_request_id()))
            assert info_reply.state is EnclaveState.SERVING


async def test_a_cancelled_request_drops_its_late_reply(
    stream_pair: StreamPair, read_on_demand: bool, autojump_clock: trio.testing.MockClock
) -> None:
    async with channel_pair(stream_pair, read_on_demand=read_on_demand) as (client, server):
        with trio.move_on_after(1):
            await client.request(infer(1))
        request = await server.receive()
        assert isinstance(request, InferenceRequest)

        async def late_reply_then_serve() -> None:
            # Concurrent with request 2: a client that reads on demand reads nothing
            # while no request waits, and a lockstep write waits for a read.
            await server.send(Waiting(request_id=1, position=0))
            await server.send(result_for(request))
            await serve_requests(server, 1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_reply_then_serve)
            assert (await client.request(infer(2))).request_id == 2
        with trio.move_on_after(5) as scope:  # the late reply was not handed to receive()
            await client.receive()
        assert scope.cancelled_caught


async def test_duplicate_request_id_is_refused_locally(
    stream_pair: StreamPair, read_on_demand: bool
) -> None:
    async with (
        channel_pair(stream_pair, read_on_demand=read_on_demand) as (client, server),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(client.request, infer(3))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(LocalProtocolError, match="already in flight"):
            await client.request(infer(3))
        await serve_requests(server, 1)


async def test_on_waiting_error_is_raised_by_request(
    stream_pair: StreamPair, read_on_demand: bool
) -> None:
    class Boom(Exception):
        pass

    def explode(waiting: Waiting) -> None:
        raise Boom(waiting.position)

    async with channel_pair(stream_pair, read_on_demand=read_on_demand) as (client, server):
        requests: list[InferenceRequest] = []

        async def enclave() -> None:
            request = await server.receive()
            assert isinstance(request, InferenceRequest)
            requests.append(request)
            await server.send(Waiting(request_id=1, position=4))

        async def late_reply_then_serve() -> None:  # concurrent with request 2: see above
            await server.send(result_for(requests[0]))  # dropped: request 1 was given up
            await serve_requests(server, 1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(enclave)
            with pytest.raises(Boom):
                await client.request(infer(1), on_waiting=explode)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_reply_then_serve)
            assert (await client.request(infer(2))).request_id == 2


# --- reading on demand -----------------------------------------------------------------


async def test_on_demand_a_reply_read_by_another_task_returns_at_once(
    stream_pair: StreamPair,
) -> None:
    """Request 1 holds the read turn; the reply to request 2 comes first: request 2 must
    return while request 1 still waits (the turn ends at any finished request)."""
    order: list[int] = []
    async with channel_pair(stream_pair, read_on_demand=True) as (client, server):

        async def ask(request_id: int) -> None:
            await client.request(infer(request_id))
            order.append(request_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, 1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(ask, 2)
            first, second = await server.receive(), await server.receive()
            assert isinstance(first, InferenceRequest)
            assert isinstance(second, InferenceRequest)
            await server.send(result_for(second))
            with trio.fail_after(1):
                while order != [2]:
                    await trio.testing.wait_all_tasks_blocked()
            await server.send(result_for(first))
    assert order == [2, 1]


async def test_on_demand_an_idle_client_learns_of_a_close_at_its_next_request(
    stream_pair: StreamPair,
) -> None:
    async with channel_pair(stream_pair, read_on_demand=True) as (client, server):
        await server.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert "open" in repr(client)  # nothing read: it cannot know yet
        with pytest.raises(ChannelError):
            await client.request(infer(client.next_request_id()))
        with pytest.raises(ChannelError):  # and every later request fails the same way
            await client.request(infer(client.next_request_id()))


async def test_on_demand_a_cancelled_reader_hands_the_turn_on(stream_pair: StreamPair) -> None:
    results: list[InferenceResult] = []
    async with channel_pair(stream_pair, read_on_demand=True) as (client, server):
        reader = trio.CancelScope()

        async def ask_and_read() -> None:
            with reader:
                await client.request(infer(1))

        async def ask_and_wait() -> None:
            results.append(await client.request(infer(2)))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_and_read)
                await trio.testing.wait_all_tasks_blocked()  # request 1 has the turn
                nursery.start_soon(ask_and_wait)
                await trio.testing.wait_all_tasks_blocked()  # request 2 waits for it
                _, second = await server.receive(), await server.receive()
                assert isinstance(second, InferenceRequest)
                reader.cancel()
                await trio.testing.wait_all_tasks_blocked()
                await server.send(result_for(second))  # lockstep: someone must read it
    assert [result.request_id for result in results] == [2]
