"""Fakes for the MessageChannel tests: a hand-driven peer, channel pairs and messages.

:class:`RawPeer` is the other end of a channel without a :class:`MessageChannel`: a real
sans-IO :class:`~drm_wire.protocol.Connection` over a bare stream, plus ways to send what
a well-behaved channel never would (unchecked messages, raw bytes). It is a fake built
from our own parts, not a mock.
"""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import numpy as np
import trio

from drm_wire.codec import Header, pack_header
from drm_wire.framing import encode_frame
from drm_wire.messages import (
    Hello,
    InferenceRequest,
    InferenceResult,
    Message,
    PeerRole,
    Welcome,
)
from drm_wire.net.channel import MessageChannel, open_channel
from drm_wire.net.request_channel import RequestChannel, open_request_channel
from drm_wire.protocol import SUPPORTED_VERSIONS, Closed, Connection, Link, NeedData, Side
from drm_wire.tensors import Tensor

StreamPair = Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]]

CLIENT_SOFTWARE = "channel-test-client/1"
SERVER_SOFTWARE = "channel-test-server/1"


def role_for(link: Link) -> PeerRole:
    """The role a client announces on ``link``."""
    return PeerRole.ENCLAVE if link is Link.CUSTODIAN else PeerRole.CONSUMER


class RawPeer:
    """One end of a link driven by hand over a bare stream."""

    def __init__(self, stream: trio.abc.Stream, link: Link, side: Side) -> None:
        self.stream = stream
        self.conn = Connection(link, side)

    async def send(self, message: Message) -> None:
        """Send through the state machine, as a correct peer would."""
        for buffer in self.conn.send(message):
            await self.stream.send_all(buffer)

    async def send_unchecked(self, message: Message) -> None:
        """Send a well-formed frame that the state machine may forbid."""
        header, payload = message.to_wire()
        for buffer in encode_frame(header, payload):
            await self.stream.send_all(buffer)

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Message | Closed:
        """The next message from the channel, or ``CLOSED`` at its clean EOF."""
        while True:
            event = self.conn.next_message()
            if not isinstance(event, NeedData):
                return event
            self.conn.receive_data(await self.stream.receive_some())

    async def receive_until_eof(self) -> list[Message]:
        """Every message until the channel's clean EOF."""
        messages = []
        while not isinstance(message := await self.receive(), Closed):
            messages.append(message)
        return messages

    async def hello_as_client(self, role: PeerRole | None = None) -> Welcome:
        await self.send(
            Hello(
                versions=SUPPORTED_VERSIONS,
                role=role or role_for(self.conn.link),
                software=CLIENT_SOFTWARE,
            )
        )
        welcome = await self.receive()
        assert isinstance(welcome, Welcome)
        return welcome

    async def hello_as_server(self) -> Hello:
        hello = await self.receive()
        assert isinstance(hello, Hello)
        await self.send(Welcome(version=SUPPORTED_VERSIONS[0], software=SERVER_SOFTWARE))
        return hello


class RecordingStream(trio.abc.Stream):
    """A stream that records the size of every ``send_all`` before passing it on."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(memoryview(data).nbytes)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class FailingStream(RecordingStream):
    """A stream that fails like a reset connection once ``fail_next`` is set and data comes."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.fail_next = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if self.fail_next:
            raise trio.BrokenResourceError("connection reset (fake)")
        return data


def frame_bytes(header: Header) -> bytes:
    """A length-prefixed frame around any header, valid or not."""
    body = pack_header(header)
    return struct.pack(">I", len(body)) + body


async def shake_hands(client: MessageChannel, server: MessageChannel) -> tuple[Welcome, Hello]:
    """Run hello and accept_hello concurrently."""
    hellos: list[Hello] = []

    async def accept() -> None:
        hellos.append(await server.accept_hello(software=SERVER_SOFTWARE))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        welcome = await client.hello(role=role_for(client.link), software=CLIENT_SOFTWARE)
    return welcome, hellos[0]


@asynccontextmanager
async def channel_pair(
    make_pair: StreamPair,
    link: Link = Link.CONSUMER,
    *,
    handshake: bool = True,
    read_on_demand: bool = False,
) -> AsyncIterator[tuple[RequestChannel, MessageChannel]]:
    """Client (that can ask) and server channels over a fresh stream pair, hello done unless
    told not to."""
    client_stream, server_stream = make_pair()
    async with (
        open_request_channel(
            client_stream, link, Side.CLIENT, read_on_demand=read_on_demand
        ) as client,
        open_channel(server_stream, link, Side.SERVER) as server,
    ):
        if handshake:
            await shake_hands(client, server)
        yield client, server


@asynccontextmanager
async def client_and_raw_server(
    make_pair: StreamPair, link: Link = Link.CONSUMER, *, handshake: bool = True
) -> AsyncIterator[tuple[RequestChannel, RawPeer]]:
    """A client channel (that can ask) facing a hand-driven server."""
    client_stream, server_stream = make_pair()
    raw = RawPeer(server_stream, link, Side.SERVER)
    async with open_request_channel(client_stream, link, Side.CLIENT) as client:
        if handshake:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.hello_as_server)
                await client.hello(role=role_for(link), software=CLIENT_SOFTWARE)
        yield client, raw


@asynccontextmanager
async def raw_client_and_server(
    make_pair: StreamPair, link: Link = Link.CONSUMER, *, handshake: bool = True
) -> AsyncIterator[tuple[RawPeer, MessageChannel]]:
    """A hand-driven client facing a server channel."""
    client_stream, server_stream = make_pair()
    raw = RawPeer(client_stream, link, Side.CLIENT)
    async with open_channel(server_stream, link, Side.SERVER) as server:
        if handshake:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.hello_as_client)
                await server.accept_hello(software=SERVER_SOFTWARE)
        yield raw, server


def infer(request_id: int, value: float = 0.0, shape: tuple[int, ...] = (4,)) -> InferenceRequest:
    """An inference request whose input is filled with ``value``."""
    array = np.full(shape, value, dtype=np.float32)
    return InferenceRequest(
        request_id=request_id, model="m", inputs=(Tensor.from_numpy("x", array),)
    )


def result_for(request: InferenceRequest, inferences_left: int = 7) -> InferenceResult:
    """The fake model: output = input * 2, under the request's id."""
    doubled = request.inputs[0].to_numpy() * 2
    return InferenceResult(
        request_id=request.request_id,
        outputs=(Tensor.from_numpy("y", doubled),),
        inferences_left=inferences_left,
    )


async def serve_requests(server: MessageChannel, count: int, *, seed: int = 0) -> None:
    """Fake enclave: take ``count`` requests, then answer them in a shuffled order."""
    requests: list[InferenceRequest] = []
    while len(requests) < count:
        request = await server.receive()
        assert isinstance(request, InferenceRequest)
        requests.append(request)
    random.Random(seed).shuffle(requests)
    for request in requests:
        await server.send(result_for(request))
