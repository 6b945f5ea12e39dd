"""MessageChannel over memory and lockstep streams: hello, send/receive, writes, handlers.

Rules: no sockets and no sleeps; every timeout runs on ``autojump_clock``; each test
parametrised over ``stream_pair`` (``conftest.py``) runs on a buffered pair and on a
lockstep pair (where every write waits for the peer's read, so any missing concurrency
deadlocks). Requests and reading on demand are in ``test_request_channel.py``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import trio
import trio.testing

from drm_wire.errors import LocalProtocolError, RemoteProtocolError
from drm_wire.messages import (
    Grant,
    Heartbeat,
    Hello,
    InferenceRequest,
    Message,
    PeerRole,
    UsageReport,
    Welcome,
)
from drm_wire.net.channel import (
    JOIN_BELOW,
    ChannelBroken,
    ChannelClosed,
    ChannelError,
    open_channel,
)
from drm_wire.net.request_channel import open_request_channel
from drm_wire.protocol import PROTOCOL_VERSION, SUPPORTED_VERSIONS, Link, Side
from drm_wire.tensors import Tensor
from tests.net.channel_fakes import (
    CLIENT_SOFTWARE,
    SERVER_SOFTWARE,
    RawPeer,
    RecordingStream,
    StreamPair,
    channel_pair,
    infer,
    result_for,
    serve_requests,
    shake_hands,
)


async def test_hello_welcome(stream_pair: StreamPair) -> None:
    async with channel_pair(stream_pair, Link.CUSTODIAN, handshake=False) as (client, server):
        assert (client.version, server.version) == (None, None)
        hellos: list[Hello] = []

        async def custodian() -> None:
            hellos.append(await server.accept_hello(software=SERVER_SOFTWARE))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(custodian)
            welcome = await client.hello(
                role=PeerRole.ENCLAVE,
                software=CLIENT_SOFTWARE,
                license="license-1",
                instance_id="instance-1",
            )
        assert welcome.version == PROTOCOL_VERSION
        assert welcome.software == SERVER_SOFTWARE
        assert hellos == [
            Hello(
                versions=SUPPORTED_VERSIONS,
                role=PeerRole.ENCLAVE,
                software=CLIENT_SOFTWARE,
                license="license-1",
                instance_id="instance-1",
            )
        ]
        assert client.version == server.version == PROTOCOL_VERSION
        assert "custodian client open version=3" in repr(client)


async def test_messages_both_ways_then_clean_close(stream_pair: StreamPair) -> None:
    client_stream, server_stream = stream_pair()
    async with open_channel(server_stream, Link.CUSTODIAN, Side.SERVER) as server:
        async with open_channel(client_stream, Link.CUSTODIAN, Side.CLIENT) as client:
            await shake_hands(client, server)
            await server.send(Grant(grant_id=1, units=5, granted_total=5))
            assert await client.receive() == Grant(grant_id=1, units=5, granted_total=5)
            await client.send(UsageReport(seq=1, served_total=2))
            await client.send(Heartbeat(seq=9))
            assert await server.receive() == UsageReport(seq=1, served_total=2)
        # The client left its block: the server reads what was sent, then a clean end.
        assert [message async for message in server] == [Heartbeat(seq=9)]
        with pytest.raises(ChannelClosed, match="peer closed the connection"):
            await server.receive()
        with pytest.raises(ChannelClosed):
            await server.send(Heartbeat(seq=10))


async def test_send_before_hello_is_a_local_error(stream_pair: StreamPair) -> None:
    async with channel_pair(stream_pair, handshake=False) as (client, server):
        with pytest.raises(LocalProtocolError, match="not allowed in state await_hello"):
            await client.send(infer(1))
        await shake_hands(client, server)  # nothing was sent: the channel is intact


async def test_an_error_in_the_block_propagates_unwrapped(stream_pair: StreamPair) -> None:
    client_stream, _server_stream = stream_pair()
    with pytest.raises(KeyError, match="mine"):
        async with open_channel(client_stream, Link.CONSUMER, Side.CLIENT):
            raise KeyError("mine")
    with pytest.raises(trio.ClosedResourceError):
        await client_stream.send_all(b"x")  # the stream was closed


async def test_a_tensor_payload_is_written_as_its_own_buffer(stream_pair: StreamPair) -> None:
    array = np.arange(3 * 480 * 480, dtype=np.float32).reshape(1, 3, 480, 480)  # 2.76 MB
    client_stream, server_stream = stream_pair()
    recording = RecordingStream(client_stream)
    async with (
        open_request_channel(recording, Link.CONSUMER, Side.CLIENT) as client,
        open_channel(server_stream, Link.CONSUMER, Side.SERVER) as server,
    ):
        await shake_hands(client, server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_requests, server, 1)
            request = InferenceRequest(
                request_id=1, model="m", inputs=(Tensor.from_numpy("x", array),)
            )
            result = await client.request(request)
    assert np.array_equal(result.outputs[0].to_numpy(), array * 2)
    header_write, payload_write = recording.writes[-2:]
    assert header_write < 200
    assert payload_write == array.nbytes == 2_764_800


async def test_frames_up_to_join_below_go_out_as_one_write(stream_pair: StreamPair) -> None:
    """A small frame is one buffer (one TLS record, one wake-up of the peer); from
    ``JOIN_BELOW + 1`` bytes on, the header and the payload go as they are."""
    client_stream, server_stream = stream_pair()
    recording = RecordingStream(client_stream)

    async def writes_for(payload_bytes: int) -> list[int]:
        array = np.zeros(payload_bytes, dtype=np.uint8)
        request = InferenceRequest(
            request_id=client.next_request_id(),
            model="m",
            inputs=(Tensor.from_numpy("x", array),),
        )
        before = len(recording.writes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_requests, server, 1)
            await client.request(request)
        return recording.writes[before:]

    async with (
        open_request_channel(recording, Link.CONSUMER, Side.CLIENT) as client,
        open_channel(server_stream, Link.CONSUMER, Side.SERVER) as server,
    ):
        await shake_hands(client, server)
        (probe,) = await writes_for(JOIN_BELOW - 1024)
        header = probe - (JOIN_BELOW - 1024)
        assert await writes_for(JOIN_BELOW - header) == [JOIN_BELOW]
        assert await writes_for(JOIN_BELOW - header + 1) == [header, JOIN_BELOW - header + 1]


# --- a handler in the reader task (set_handler) ------------------------------------------


async def test_a_handler_gets_every_message_after_the_hello_in_order(
    stream_pair: StreamPair,
) -> None:
    client_stream, server_stream = stream_pair()
    handled: list[int] = []
    async with open_channel(server_stream, Link.CONSUMER, Side.SERVER) as server:

        async def handle(message: Message) -> None:
            assert isinstance(message, InferenceRequest)
            handled.append(message.request_id)
            await trio.testing.wait_all_tasks_blocked()  # nothing else is read meanwhile
            assert handled[-1] == message.request_id
            await server.send(result_for(message))

        server.set_handler(handle)
        async with open_request_channel(client_stream, Link.CONSUMER, Side.CLIENT) as client:
            _, hello = await shake_hands(client, server)  # the hello still goes to receive
            assert hello.software == CLIENT_SOFTWARE
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(client.request, infer(client.next_request_id(), i))
                    await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(1), pytest.raises(ChannelClosed, match="peer closed"):
            await server.wait_ended()  # the client left cleanly
    assert handled == [1, 2, 3, 4, 5]


async def test_wait_ended_raises_how_the_channel_ended(
    stream_pair: StreamPair, autojump_clock: trio.testing.MockClock
) -> None:
    async def ignore(message: Message) -> None:
        await trio.lowlevel.checkpoint()

    client_stream, server_stream = stream_pair()
    raw = RawPeer(client_stream, Link.CONSUMER, Side.CLIENT)
    async with open_channel(server_stream, Link.CONSUMER, Side.SERVER) as server:
        server.set_handler(ignore)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw.hello_as_client)
            await server.accept_hello(software=SERVER_SOFTWARE)
        await raw.send_unchecked(Welcome(version=PROTOCOL_VERSION, software="not the client's"))
        with trio.fail_after(10), pytest.raises(RemoteProtocolError):
            await server.wait_ended()


async def test_a_handler_that_fails_ends_the_channel(stream_pair: StreamPair) -> None:
    async def handle(message: Message) -> None:
        raise LocalProtocolError("the handler broke a rule")

    async with channel_pair(stream_pair) as (client, server):
        server.set_handler(handle)
        # On a lockstep pair the server may close before the send returns: either is fine.
        with contextlib.suppress(ChannelError):
            await client.send(infer(client.next_request_id()))
        with trio.fail_after(1), pytest.raises(ChannelBroken, match="the handler broke a rule"):
            await server.wait_ended()


async def test_a_bug_in_a_handler_propagates_out_of_open_channel(stream_pair: StreamPair) -> None:
    async def handle(message: Message) -> None:
        raise KeyError("a bug")

    async def run() -> None:
        async with channel_pair(stream_pair) as (client, server):
            server.set_handler(handle)
            with contextlib.suppress(ChannelError):
                await client.send(infer(client.next_request_id()))
            with trio.fail_after(1):
                await server.wait_ended()

    with pytest.raises(ExceptionGroup) as info:
        await run()
    assert info.group_contains(KeyError, match="a bug")


async def test_a_client_handler_leaves_the_welcome_to_hello(stream_pair: StreamPair) -> None:
    """The custodian link's client side: what follows the welcome goes to the handler."""
    client_stream, server_stream = stream_pair()
    handled: list[Message] = []

    async def handle(message: Message) -> None:
        handled.append(message)

    async with (
        open_channel(client_stream, Link.CUSTODIAN, Side.CLIENT) as client,
        open_channel(server_stream, Link.CUSTODIAN, Side.SERVER) as server,
    ):
        client.set_handler(handle)

        async def custodian() -> None:
            await server.accept_hello(software=SERVER_SOFTWARE)
            await server.send(Grant(grant_id=1, units=5, granted_total=5))  # right behind

        async with trio.open_nursery() as nursery:
            nursery.start_soon(custodian)
            welcome = await client.hello(role=PeerRole.ENCLAVE, software=CLIENT_SOFTWARE)
        assert welcome.software == SERVER_SOFTWARE
        with trio.fail_after(1):
            while not handled:
                await trio.testing.wait_all_tasks_blocked()
    assert handled == [Grant(grant_id=1, units=5, granted_total=5)]
