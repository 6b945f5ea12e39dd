"""MessageChannel failures: hostile bytes, peers that vanish, cancelled writes, backpressure.

Every failure must reach every waiter as a clear error (never a hang, never an exception
group out of ``open_channel``), and a peer that broke the protocol must be told why.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from drm_wire.codec import Header
from drm_wire.errors import ErrorCode, PeerError, RemoteProtocolError
from drm_wire.messages import (
    EnclaveState,
    Error,
    Heartbeat,
    InferenceRequest,
    ModelInfo,
    PeerRole,
)
from drm_wire.net.channel import (
    ERROR_FRAME_TIMEOUT,
    RECEIVE_BUFFER,
    ChannelBroken,
    ChannelClosed,
    MessageChannel,
)
from drm_wire.net.request_channel import RequestChannel, open_request_channel
from drm_wire.protocol import Link, Side
from tests.net.channel_fakes import (
    FailingStream,
    RawPeer,
    StreamPair,
    channel_pair,
    client_and_raw_server,
    frame_bytes,
    infer,
    raw_client_and_server,
)


def _infer_header(request_id: int) -> Header:
    return {"type": "infer", "request_id": request_id, "model": "m", "inputs": [], "wait": None}


#: name -> (bytes from a hostile client after hello, code it is told, text in the message,
#: messages the server application receives before the error).
HOSTILE: dict[str, tuple[bytes, ErrorCode, str, int]] = {
    "huge_prefix": (b"\xff\xff\xff\xff", ErrorCode.LIMIT_EXCEEDED, "frame header too large", 0),
    "empty_header": (b"\x00\x00\x00\x00", ErrorCode.PROTOCOL_ERROR, "empty frame header", 0),
    "not_msgpack": (b"\x00\x00\x00\x03\xc1\xc1\xc1", ErrorCode.PROTOCOL_ERROR, "malformed", 0),
    "unknown_type": (frame_bytes({"type": "nope"}), ErrorCode.PROTOCOL_ERROR, "unknown message", 0),
    "bad_field": (
        frame_bytes({"type": "model_info_request", "request_id": -1}),
        ErrorCode.PROTOCOL_ERROR,
        "request_id: must be between 0",
        0,
    ),
    "payload_on_a_small_message": (
        frame_bytes({"type": "model_info_request", "request_id": 1, "payload_len": 10}),
        ErrorCode.LIMIT_EXCEEDED,
        "payload too large for this message",
        0,
    ),
    "wrong_link": (
        frame_bytes({"type": "heartbeat", "seq": 1}),
        ErrorCode.PROTOCOL_ERROR,
        "heartbeat from the client is not allowed in state open",
        0,
    ),
    "forbidden_in_state": (
        frame_bytes({"type": "welcome", "version": 1, "software": "x"}),
        ErrorCode.PROTOCOL_ERROR,
        "welcome from the client is not allowed in state open",
        0,
    ),
    "duplicate_request_id": (
        frame_bytes(_infer_header(5)) + frame_bytes(_infer_header(5)),
        ErrorCode.PROTOCOL_ERROR,
        "request id 5 is already in flight",
        1,
    ),
}


@pytest.mark.parametrize(
    ("data", "code", "text", "delivered"), list(HOSTILE.values()), ids=list(HOSTILE)
)
async def test_hostile_bytes_get_an_error_frame_and_a_close(
    stream_pair: StreamPair, data: bytes, code: ErrorCode, text: str, delivered: int
) -> None:
    answers: list[object] = []
    async with raw_client_and_server(stream_pair) as (raw, server):

        async def hostile() -> None:
            await raw.send_bytes(data)
            answers.extend(await raw.receive_until_eof())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hostile)
            received = []

            async def application() -> None:
                async for message in server:
                    received.append(message)

            with pytest.raises(RemoteProtocolError, match=text) as info:
                await application()
        assert info.value.code is code
        assert len(received) == delivered  # what arrived intact before the error
        with pytest.raises(RemoteProtocolError, match=text):  # and so does every later call
            await server.send(Heartbeat(seq=1))
    assert answers == [Error(code=code, message=info.value.message)]


async def test_a_peer_that_does_not_read_its_error_frame_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with raw_client_and_server(trio.testing.lockstep_stream_pair) as (raw, server):
        await raw.send_bytes(b"\xff\xff\xff\xff")  # then never reads again
        with pytest.raises(RemoteProtocolError, match="frame header too large"):
            await server.receive()
        assert trio.current_time() == pytest.approx(ERROR_FRAME_TIMEOUT)


async def test_peer_closing_mid_frame_fails_every_pending_request(stream_pair: StreamPair) -> None:
    failures: list[BaseException] = []

    async def ask(client: RequestChannel, request_id: int) -> None:
        try:
            await client.request(infer(request_id))
        except RemoteProtocolError as exc:
            failures.append(exc)

    async with client_and_raw_server(stream_pair) as (client, raw):
        async with trio.open_nursery() as nursery:
            for request_id in (1, 2, 3):
                nursery.start_soon(ask, client, request_id)
            for _ in range(3):
                assert isinstance(await raw.receive(), InferenceRequest)
            frame = frame_bytes({"type": "result", "request_id": 2, "payload_len": 16})
            await raw.send_bytes(frame + b"\x00" * 5)  # 11 payload bytes short
            await raw.stream.aclose()
        with pytest.raises(RemoteProtocolError, match="middle of a frame"):
            await client.receive()
    assert len(failures) == 3
    for exc in failures:
        assert "middle of a frame" in str(exc)
        assert any("was in flight" in note for note in exc.__notes__)


async def test_clean_close_with_requests_in_flight(stream_pair: StreamPair) -> None:
    async with client_and_raw_server(stream_pair) as (client, raw):

        async def close_after_one() -> None:
            assert isinstance(await raw.receive(), InferenceRequest)
            await raw.stream.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_after_one)
            with pytest.raises(ChannelClosed, match="peer closed the connection"):
                await client.request(infer(1))
        # (On lockstep the close can also land while the request's write is finishing.)
        with pytest.raises(ChannelClosed):
            await client.request(infer(2))


async def test_connection_error_from_the_peer_fails_pending_requests(
    stream_pair: StreamPair,
) -> None:
    async with client_and_raw_server(stream_pair) as (client, raw):

        async def blocked() -> None:
            assert isinstance(await raw.receive(), InferenceRequest)
            await raw.send(Error(code=ErrorCode.BLOCKED, message="borrower blocked"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked)
            with pytest.raises(PeerError, match="borrower blocked") as info:
                await client.request(infer(1))
        assert info.value.code is ErrorCode.BLOCKED
        assert info.value.request_id is None
        with pytest.raises(PeerError, match="borrower blocked"):
            await client.receive()


async def test_a_reply_of_the_wrong_type_is_a_protocol_error(stream_pair: StreamPair) -> None:
    answers: list[object] = []
    async with client_and_raw_server(stream_pair) as (client, raw):

        async def confused() -> None:
            assert isinstance(await raw.receive(), InferenceRequest)
            await raw.send(
                ModelInfo(request_id=1, models=(), inferences_left=0, state=EnclaveState.LOADING)
            )
            answers.extend(await raw.receive_until_eof())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(confused)
            with pytest.raises(RemoteProtocolError, match="model_info does not answer request 1"):
                await client.request(infer(1))
    assert answers == [
        Error(code=ErrorCode.PROTOCOL_ERROR, message="model_info does not answer request 1")
    ]


async def test_a_cancelled_send_breaks_the_channel() -> None:
    failures: list[BaseException] = []
    async with client_and_raw_server(trio.testing.lockstep_stream_pair) as (client, raw):

        async def first() -> None:
            try:
                await client.request(infer(1))
            except ChannelBroken as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            assert isinstance(await raw.receive(), InferenceRequest)  # then stops reading
            with trio.CancelScope() as scope:

                async def cancel_when_blocked() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()

                nursery.start_soon(cancel_when_blocked)
                await client.request(infer(2, shape=(1000,)))  # blocked: nobody reads
            assert scope.cancelled_caught
        with pytest.raises(ChannelBroken, match="sending infer failed part-way"):
            await client.send(infer(3))
        with pytest.raises(ChannelBroken):
            await client.receive()
        assert "ChannelBroken" in repr(client)
    assert len(failures) == 1
    assert "was in flight" in failures[0].__notes__[0]


async def test_backpressure_stops_the_reader_at_the_bound() -> None:
    sent = 0
    total = 20

    async def custodian(server: MessageChannel) -> None:
        nonlocal sent
        for seq in range(total):
            await server.send(Heartbeat(seq=seq))
            sent += 1

    async with (
        channel_pair(trio.testing.lockstep_stream_pair, Link.CUSTODIAN) as (
            client,
            server,
        ),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(custodian, server)
        await trio.testing.wait_all_tasks_blocked()
        # RECEIVE_BUFFER messages wait in the channel, one more in the reader's hand;
        # the next write blocks in the transport until the application receives.
        assert sent == RECEIVE_BUFFER + 1
        got = [await client.receive() for _ in range(total)]
    assert got == [Heartbeat(seq=seq) for seq in range(total)]


async def test_aclose_fails_pending_requests(stream_pair: StreamPair) -> None:
    async with client_and_raw_server(stream_pair) as (client, raw):

        async def close_when_asked() -> None:
            assert isinstance(await raw.receive(), InferenceRequest)
            await client.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_when_asked)
            with pytest.raises(ChannelClosed, match="the channel was closed"):
                await client.request(infer(1))


async def test_a_lost_connection_breaks_the_channel(stream_pair: StreamPair) -> None:
    client_stream, server_stream = stream_pair()
    failing = FailingStream(client_stream)
    raw = RawPeer(server_stream, Link.CONSUMER, Side.SERVER)
    async with open_request_channel(failing, Link.CONSUMER, Side.CLIENT) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw.hello_as_server)
            await client.hello(role=PeerRole.CONSUMER, software="c")

        async def reset() -> None:
            assert isinstance(await raw.receive(), InferenceRequest)
            failing.fail_next = True
            await raw.send_bytes(b"\x00")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reset)
            with pytest.raises(ChannelBroken, match="connection was lost") as info:
                await client.request(infer(1))
        assert isinstance(info.value.__cause__, trio.BrokenResourceError)
        with pytest.raises(ChannelBroken):
            await client.send(infer(2))
