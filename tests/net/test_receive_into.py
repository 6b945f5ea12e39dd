"""Receiving in place: TLSStream.receive_into and the channel's payload sinks.

Over real TCP on 127.0.0.1 unless the test needs to tamper with the ciphertext. Hostile
frames (cut short, oversized, cut by a ragged close) must end in the same errors as on the
copying path.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from drm_lab.certs import Identity
from drm_wire.codec import Header
from drm_wire.errors import ErrorCode, RemoteProtocolError
from drm_wire.limits import MODEL_CHUNK_BYTES
from drm_wire.messages import ModelBegin, ModelChunk
from drm_wire.net import _openssl_handles
from drm_wire.net.channel import ChannelBroken, ReceivesInto
from drm_wire.net.tls import TLSStream, client_context, server_context
from drm_wire.protocol import Link
from tests.net.channel_fakes import client_and_raw_server
from tests.net.helpers import handshake_both, wrap_pair

LOOPBACK = "127.0.0.1"
KiB = 1024


def pattern(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


@pytest.fixture
def contexts(ca: Identity, server_id: Identity) -> tuple[SSL.Context, SSL.Context]:
    return (
        client_context(ca_certificates=[ca.cert]),
        server_context(certificate=server_id.cert, private_key=server_id.key),
    )


@pytest.fixture
async def tcp_pair(
    contexts: tuple[SSL.Context, SSL.Context],
) -> AsyncIterator[tuple[TLSStream, TLSStream]]:
    """Client and server TLSStreams over one loopback TCP connection, handshake done."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    client_tcp = await trio.open_tcp_stream(LOOPBACK, port)
    server_tcp = await listeners[0].accept()
    await listeners[0].aclose()
    client, server = wrap_pair(*contexts, client_tcp, server_tcp)
    await handshake_both(client, server)
    yield client, server
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


async def receive_exactly_into(stream: TLSStream, size: int, step: int) -> bytes:
    target = memoryview(bytearray(size))
    pos = 0
    while pos < size:
        count = await stream.receive_into(target[pos : min(pos + step, size)])
        assert count > 0
        pos += count
    return bytes(target)


def test_tls_stream_receives_into() -> None:
    assert issubclass(TLSStream, ReceivesInto)
    assert not isinstance(trio.testing.memory_stream_pair()[0], ReceivesInto)


@pytest.mark.parametrize("direct", [True, False], ids=["ssl_read", "recv_into"])
@pytest.mark.parametrize("step", [1000, 16 * KiB + 3, 1 << 20])
async def test_receive_into_gets_every_byte_in_order(
    tcp_pair: tuple[TLSStream, TLSStream],
    monkeypatch: pytest.MonkeyPatch,
    direct: bool,
    step: int,
) -> None:
    if not direct:
        monkeypatch.setattr(_openssl_handles, "SSL_READ", None)  # pyOpenSSL's public recv_into only
    client, server = tcp_pair
    data = pattern(3 * MODEL_CHUNK_BYTES // 4 + 17)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, data + b"after")
        assert await receive_exactly_into(client, len(data), step) == data
    # receive_some takes over where receive_into stopped, record count and all.
    got = b""
    while len(got) < 5:
        got += await client.receive_some()
    assert got == b"after"


async def test_receive_into_returns_zero_after_close_notify(
    tcp_pair: tuple[TLSStream, TLSStream],
) -> None:
    client, server = tcp_pair
    await server.send_all(b"last")
    await server.aclose()
    target = memoryview(bytearray(64))
    assert await client.receive_into(target) == 4
    assert bytes(target[:4]) == b"last"
    assert await client.receive_into(target) == 0
    assert await client.receive_into(target) == 0  # and stays at the end


async def test_ragged_eof_breaks_receive_into(tcp_pair: tuple[TLSStream, TLSStream]) -> None:
    client, server = tcp_pair
    await server.send_all(b"x" * 100)
    await server.transport_stream.aclose()  # TCP close, no close_notify
    target = memoryview(bytearray(1000))
    assert await client.receive_into(target) == 100
    with pytest.raises(trio.BrokenResourceError, match="ragged EOF"):
        await client.receive_into(target)


@pytest.mark.parametrize(
    ("buffer", "error", "match"),
    [
        (b"immutable", TypeError, "writable memoryview"),
        (memoryview(b"immutable"), TypeError, "writable memoryview"),
        (memoryview(bytearray(8))[::2], TypeError, "contiguous"),
        (memoryview(bytearray(8)).cast("I"), TypeError, "contiguous memoryview of bytes"),
        (memoryview(bytearray(0)), ValueError, "non-empty"),
    ],
)
async def test_receive_into_refuses_unusable_buffers(
    contexts: tuple[SSL.Context, SSL.Context],
    buffer: object,
    error: type[Exception],
    match: str,
) -> None:
    client, _server = wrap_pair(*contexts, *trio.testing.memory_stream_pair())
    with pytest.raises(error, match=match):
        await client.receive_into(buffer)  # type: ignore[arg-type]


@pytest.mark.parametrize("direct", [True, False], ids=["ssl_read", "recv_into"])
async def test_tampered_record_breaks_the_stream(
    contexts: tuple[SSL.Context, SSL.Context], monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    if not direct:
        monkeypatch.setattr(_openssl_handles, "SSL_READ", None)
    to_client = trio.testing.MemorySendStream()
    client_in = trio.testing.MemoryReceiveStream()
    c2s_send, c2s_receive = trio.testing.memory_stream_one_way_pair()

    async def deliver() -> None:
        client_in.put_data(await to_client.get_data())

    to_client.send_all_hook = deliver
    client, server = wrap_pair(
        *contexts,
        trio.StapledStream(c2s_send, client_in),
        trio.StapledStream(to_client, c2s_receive),
    )
    await handshake_both(client, server)
    to_client.send_all_hook = None
    await server.send_all(b"a" * 40_000)  # three records
    ciphertext = bytearray(await to_client.get_data())
    ciphertext[20_000] ^= 1  # inside the second record
    client_in.put_data(bytes(ciphertext))
    target = memoryview(bytearray(40_000))
    with pytest.raises(trio.BrokenResourceError, match="TLS receive failed: decryption failed"):
        await client.receive_into(target)
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_into(target)


# --- the channel: payload sinks over TLS ---------------------------------------------------


class Sink:
    def __init__(self, size: int) -> None:
        self.memory = bytearray(size)
        self.asked: list[tuple[int, int]] = []

    def place(self, offset: int, nbytes: int) -> memoryview | None:
        self.asked.append((offset, nbytes))
        if offset + nbytes > len(self.memory):
            return None
        return memoryview(self.memory)[offset : offset + nbytes]


def chunk_header(offset: int, payload_len: int) -> bytes:
    from tests.net.channel_fakes import frame_bytes

    header: Header = {"type": "model_chunk", "offset": offset, "payload_len": payload_len}
    return frame_bytes(header)


async def test_model_chunks_land_where_the_sink_says(
    tcp_pair: tuple[TLSStream, TLSStream],
) -> None:
    data = pattern(2 * MODEL_CHUNK_BYTES + 12_345, seed=3)
    sink = Sink(len(data))
    async with client_and_raw_server(lambda: tcp_pair, Link.CUSTODIAN) as (enclave, custodian):
        enclave.set_payload_sink(ModelChunk.payload_sink(sink.place))

        async def send() -> None:
            await custodian.send(ModelBegin(name="m", size=len(data), sha256=bytes(32)))
            view = memoryview(data)
            for offset in range(0, len(data), MODEL_CHUNK_BYTES):
                chunk = view[offset : offset + MODEL_CHUNK_BYTES]
                await custodian.send(ModelChunk(offset=offset, data=chunk))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            assert isinstance(await enclave.receive(), ModelBegin)
            for offset in range(0, len(data), MODEL_CHUNK_BYTES):
                chunk = await enclave.receive()
                assert isinstance(chunk, ModelChunk)
                assert chunk.offset == offset
                assert chunk.data.obj is sink.memory  # received in place, not copied there
        assert sink.memory == data
        assert sink.asked == [(0, MODEL_CHUNK_BYTES), (MODEL_CHUNK_BYTES, MODEL_CHUNK_BYTES),
                              (2 * MODEL_CHUNK_BYTES, 12_345)]  # fmt: skip


@pytest.mark.parametrize("with_sink", [True, False])
async def test_a_chunk_cut_short_by_close_notify_is_a_protocol_error(
    tcp_pair: tuple[TLSStream, TLSStream], with_sink: bool
) -> None:
    sink = Sink(MODEL_CHUNK_BYTES)
    async with client_and_raw_server(lambda: tcp_pair, Link.CUSTODIAN) as (enclave, custodian):
        if with_sink:
            enclave.set_payload_sink(ModelChunk.payload_sink(sink.place))
        await custodian.send(ModelBegin(name="m", size=MODEL_CHUNK_BYTES, sha256=bytes(32)))
        await custodian.send_bytes(chunk_header(0, MODEL_CHUNK_BYTES) + b"z" * 100_000)
        await custodian.stream.aclose()
        assert isinstance(await enclave.receive(), ModelBegin)
        with pytest.raises(RemoteProtocolError, match="closed the connection in the middle"):
            await enclave.receive()
    assert sink.asked == ([(0, MODEL_CHUNK_BYTES)] if with_sink else [])


async def test_a_chunk_cut_short_by_a_ragged_close_breaks_the_channel(
    tcp_pair: tuple[TLSStream, TLSStream],
) -> None:
    sink = Sink(MODEL_CHUNK_BYTES)
    async with client_and_raw_server(lambda: tcp_pair, Link.CUSTODIAN) as (enclave, custodian):
        enclave.set_payload_sink(ModelChunk.payload_sink(sink.place))
        await custodian.send(ModelBegin(name="m", size=MODEL_CHUNK_BYTES, sha256=bytes(32)))
        await custodian.send_bytes(chunk_header(0, MODEL_CHUNK_BYTES) + b"z" * 100_000)
        stream = custodian.stream
        assert isinstance(stream, TLSStream)
        await stream.transport_stream.aclose()
        assert isinstance(await enclave.receive(), ModelBegin)
        with pytest.raises(ChannelBroken, match="connection was lost"):
            await enclave.receive()
    assert sink.memory[:100_000] == b"z" * 100_000  # it was receiving in place


async def test_an_oversized_chunk_is_refused_before_the_sink_is_asked(
    tcp_pair: tuple[TLSStream, TLSStream],
) -> None:
    sink = Sink(2 * MODEL_CHUNK_BYTES)
    async with client_and_raw_server(lambda: tcp_pair, Link.CUSTODIAN) as (enclave, custodian):
        enclave.set_payload_sink(ModelChunk.payload_sink(sink.place))
        await custodian.send(ModelBegin(name="m", size=MODEL_CHUNK_BYTES, sha256=bytes(32)))
        await custodian.send_bytes(chunk_header(0, MODEL_CHUNK_BYTES + 1))
        assert isinstance(await enclave.receive(), ModelBegin)
        with pytest.raises(RemoteProtocolError, match="payload too large") as info:
            await enclave.receive()
        assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    assert sink.asked == []


async def test_a_chunk_with_a_bad_header_is_refused_after_landing_in_place(
    tcp_pair: tuple[TLSStream, TLSStream],
) -> None:
    """The sink only chooses where bytes go: the message is validated as usual."""
    sink = Sink(MODEL_CHUNK_BYTES)
    async with client_and_raw_server(lambda: tcp_pair, Link.CUSTODIAN) as (enclave, custodian):
        enclave.set_payload_sink(ModelChunk.payload_sink(sink.place))
        await custodian.send(ModelBegin(name="m", size=MODEL_CHUNK_BYTES, sha256=bytes(32)))
        from tests.net.channel_fakes import frame_bytes

        bad: Header = {"type": "model_chunk", "offset": 0, "extra": 1, "payload_len": 10}
        await custodian.send_bytes(frame_bytes(bad) + b"q" * 10)
        assert isinstance(await enclave.receive(), ModelBegin)
        with pytest.raises(RemoteProtocolError, match="exactly offset and a payload"):
            await enclave.receive()
    assert sink.asked == [(0, 10)]
