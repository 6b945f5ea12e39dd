"""A channel with ReceiveLimits: frame deadlines, the minimum rate and the memory budget
(I17), over memory streams on trio's ``autojump_clock``: no sockets, no sleeps. Each test
runs twice: over bare memory streams (the reader's ``receive_some`` path) and over TLS on
memory streams (payloads decrypted into their growing storage: ``receive_into``)."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial

import numpy as np
import pytest
import trio
import trio.testing

from drm_lab.certs import Identity
from drm_wire.codec import pack_header
from drm_wire.errors import ErrorCode, RemoteProtocolError
from drm_wire.framing import PAYLOAD_KEY
from drm_wire.limits import KiB, MiB
from drm_wire.messages import Error, InferenceRequest, Message
from drm_wire.net.budget import HEADER_READ, MIN_CONNECTION_SHARE, MemoryBudget, ReceiveLimits
from drm_wire.net.channel import MessageChannel, open_channel
from drm_wire.net.tls import client_context, server_context
from drm_wire.protocol import Closed, Link, Side
from drm_wire.tensors import Tensor
from tests.net.channel_fakes import SERVER_SOFTWARE, RawPeer, StreamPair, infer
from tests.net.helpers import memory_pair

GRACE = 5.0
RATE = 1 * KiB  # bytes/s
TIMEOUT = 30.0


def _limits(budget: MemoryBudget | None = None) -> ReceiveLimits:
    return ReceiveLimits(
        budget=budget or MemoryBudget(),
        frame_timeout=TIMEOUT,
        min_rate=RATE,
        rate_grace=GRACE,
    )


@pytest.fixture(params=["plain", "tls"])
def pair(request: pytest.FixtureRequest, ca: Identity, server_id: Identity) -> StreamPair:
    """The consumer's and the server's stream: bare memory streams, or TLS over them."""
    if request.param == "plain":
        return trio.testing.memory_stream_pair
    server_ctx = server_context(certificate=server_id.cert, private_key=server_id.key)
    client_ctx = client_context(ca_certificates=[ca.cert])
    return partial(memory_pair, client_ctx, server_ctx)


@asynccontextmanager
async def _server(
    pair: StreamPair, limits: ReceiveLimits
) -> AsyncIterator[tuple[RawPeer, MessageChannel]]:
    """A hand-driven consumer facing a limited server channel, hello done."""
    client_stream, server_stream = pair()
    raw = RawPeer(client_stream, Link.CONSUMER, Side.CLIENT)
    async with open_channel(server_stream, Link.CONSUMER, Side.SERVER, limits=limits) as server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw.hello_as_client)
            await server.accept_hello(software=SERVER_SOFTWARE)
        yield raw, server


def _announce(payload_len: int, request_id: int = 1) -> bytes:
    header = {
        "type": "infer",
        "request_id": request_id,
        "model": "m",
        "inputs": [{"name": "x", "dtype": "uint8", "shape": [payload_len]}],
        "wait": None,
        PAYLOAD_KEY: payload_len,
    }
    body = pack_header(header)
    return struct.pack(">I", len(body)) + body


async def _ended(server: MessageChannel) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        await server.wait_ended()
    return info.value


async def _told(raw: RawPeer) -> Error:
    message = await raw.receive()
    assert isinstance(message, Error), message
    assert isinstance(await raw.receive(), Closed)
    return message


async def test_an_idle_partial_frame_is_closed_after_the_grace(
    pair: StreamPair,
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = MemoryBudget()
    async with _server(pair, _limits(budget)) as (raw, server):
        start = trio.current_time()
        await raw.send_bytes(_announce(64 * MiB) + b"x")
        error = await _told(raw)
        assert error.code is ErrorCode.TIMEOUT
        assert trio.current_time() - start == pytest.approx(GRACE, abs=0.01)
        assert (await _ended(server)).code is ErrorCode.TIMEOUT
    assert budget.peak < 64 * KiB  # what arrived and one read, never the 64 MiB announced
    assert budget.used == 0


async def test_a_trickle_is_given_time_for_what_it_sent_only(
    pair: StreamPair,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Half the minimum rate: closed once the bytes sent no longer earn more time."""
    async with _server(pair, _limits()) as (raw, server):
        start = trio.current_time()
        await raw.send_bytes(_announce(MiB))
        with trio.move_on_after(60):
            try:
                while True:
                    await raw.send_bytes(b"z" * 512)
                    await trio.sleep(1.0)
            except trio.BrokenResourceError:
                pass
        took = trio.current_time() - start
        # 512 B/s against 1 KiB/s after 5 s: the deadline 5 + t/2 is met at t = 10 s.
        assert 9.0 <= took <= 12.0
        assert (await _ended(server)).code is ErrorCode.TIMEOUT


async def test_no_frame_outlives_the_frame_timeout(
    pair: StreamPair, autojump_clock: trio.testing.MockClock
) -> None:
    """Above the minimum rate but too long in all: cut at the timeout."""
    async with _server(pair, _limits()) as (raw, server):
        start = trio.current_time()
        await raw.send_bytes(_announce(MiB))
        with trio.move_on_after(60):
            try:
                while True:
                    await raw.send_bytes(b"z" * (4 * KiB))
                    await trio.sleep(1.0)
            except trio.BrokenResourceError:
                pass
        assert trio.current_time() - start == pytest.approx(TIMEOUT, abs=1.01)
        assert (await _ended(server)).code is ErrorCode.TIMEOUT


async def test_idle_between_frames_is_not_limited_and_frames_in_time_arrive(
    pair: StreamPair,
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = MemoryBudget()
    received: list[Message] = []
    async with _server(pair, _limits(budget)) as (raw, server):

        async def handle(message: Message) -> None:
            received.append(message)

        server.set_handler(handle)
        await trio.sleep(3600)  # an idle consumer between requests keeps its connection
        request = infer(1, 0.25, shape=(64 * KiB,))
        await raw.send(request)
        await trio.testing.wait_all_tasks_blocked()
        assert len(received) == 1
        assert isinstance(received[0], InferenceRequest)
        assert received[0].inputs[0].to_numpy().tolist() == request.inputs[0].to_numpy().tolist()
    assert budget.used == 0


async def test_a_kept_payload_stays_charged_until_released(
    pair: StreamPair,
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = MemoryBudget()
    kept = []
    async with _server(pair, _limits(budget)) as (raw, server):

        async def handle(message: Message) -> None:
            kept.append(server.hold_payload())

        server.set_handler(handle)
        await raw.send(infer(1, shape=(256 * KiB,)))
        await trio.testing.wait_all_tasks_blocked()
        assert kept[0].nbytes >= MiB
        assert budget.used >= MiB
        kept[0].release()
        assert budget.used < 64 * KiB


async def test_a_connection_whose_share_is_full_is_read_no_further(
    pair: StreamPair,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Requests kept by the handler fill the connection's share: the next frame waits for
    memory, and past its deadline the peer is told ``busy``, not blamed for slowness."""
    budget = MemoryBudget(4 * MIN_CONNECTION_SHARE, per_connection=MIN_CONNECTION_SHARE)
    kept = []
    async with _server(pair, _limits(budget)) as (raw, server):

        async def handle(message: Message) -> None:
            kept.append(server.hold_payload())

        server.set_handler(handle)
        for request_id in range(1, 4):  # 3 x 20 MiB kept: 60 of the share's 65 MiB
            await raw.send(infer(request_id, shape=(5 * MiB,)))
        await trio.testing.wait_all_tasks_blocked()
        assert len(kept) == 3

        async def send_fourth() -> None:
            with suppress(trio.BrokenResourceError):
                await raw.send(infer(4, shape=(5 * MiB,)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_fourth)
            error = await _told(raw)
        assert error.code is ErrorCode.BUSY
        assert (await _ended(server)).code is ErrorCode.BUSY
        assert len(kept) == 3
    assert budget.used == sum(charge.nbytes for charge in kept)
    for charge in kept:
        charge.release()
    assert budget.used == 0


async def test_a_stalled_large_payload_holds_about_what_arrived(
    pair: StreamPair, autojump_clock: trio.testing.MockClock
) -> None:
    """3 MiB of an announced 32 MiB, then nothing: what the connection held never passed
    twice what arrived and one read (the storage doubles past PAYLOAD_READ, no faster)."""
    budget = MemoryBudget()
    sent = 3 * MiB
    async with _server(pair, _limits(budget)) as (raw, server):
        await raw.send_bytes(_announce(32 * MiB) + b"z" * sent)
        error = await _told(raw)
        assert error.code is ErrorCode.TIMEOUT
        assert (await _ended(server)).code is ErrorCode.TIMEOUT
    assert sent <= budget.peak <= 2 * sent + HEADER_READ
    assert budget.used == 0


async def test_large_payloads_arrive_intact_one_after_another(
    pair: StreamPair, autojump_clock: trio.testing.MockClock
) -> None:
    budget = MemoryBudget()
    rng = np.random.default_rng(3)
    arrays = [rng.random((1, 3, 480, 480), dtype=np.float32) for _ in range(3)]
    received: list[np.ndarray] = []
    async with _server(pair, _limits(budget)) as (raw, server):

        async def handle(message: Message) -> None:
            assert isinstance(message, InferenceRequest)
            received.append(message.inputs[0].to_numpy().copy())

        server.set_handler(handle)
        for request_id, array in enumerate(arrays, 1):
            await raw.send(
                InferenceRequest(
                    request_id=request_id,
                    model="m",
                    inputs=(Tensor.from_numpy("x", array),),
                )
            )
        await trio.testing.wait_all_tasks_blocked()
    assert len(received) == len(arrays)
    for got, sent in zip(received, arrays, strict=True):
        assert np.array_equal(got, sent)
    assert budget.peak <= 2 * arrays[0].nbytes
    assert budget.used == 0
