"""TLSStream against trio's generic stream checks, over memory and trickle transports."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from drm_lab.certs import Identity
from drm_wire.net.tls import TLSStream, client_context, server_context
from tests.net.helpers import handshake_both, lockstep_pair, memory_pair, trickle_pair


@pytest.fixture
def contexts(ca: Identity, server_id: Identity) -> tuple[SSL.Context, SSL.Context]:
    client_ctx = client_context(ca_certificates=[ca.cert])
    server_ctx = server_context(certificate=server_id.cert, private_key=server_id.key)
    return client_ctx, server_ctx


async def test_check_two_way_stream(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        return memory_pair(*contexts)

    async def clogged_stream_maker() -> tuple[TLSStream, TLSStream]:
        client, server = lockstep_pair(*contexts)
        # Handshake first: otherwise a receive_some meant to unclog the peer would itself
        # start a handshake and block (the same reason trio's own SSLStream test does it).
        await handshake_both(client, server)
        return client, server

    await trio.testing.check_two_way_stream(stream_maker, clogged_stream_maker)


async def test_trickle_handshake_and_data(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    client, server = trickle_pair(*contexts)
    payload = bytes(range(256)) * 66  # 16.5 KiB: one full record, then a short one
    got = bytearray()

    async def read_all() -> None:
        while len(got) < len(payload):
            got.extend(await server.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        nursery.start_soon(read_all)
    assert got == payload
    assert client.tls_version == server.tls_version == "TLSv1.3"
    assert client.cipher is not None
    assert client.peer_certificate_der() is not None
    assert server.peer_certificate_der() is None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"pong")
        assert await client.receive_some(4) == b"pong"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.aclose)
        assert await server.receive_some() == b""
    await server.aclose()


async def test_random_transport_chunking(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    # Ciphertext arrives in random pieces, so record headers are split at every
    # position; the record counting in receive_some must never stall or lose data.
    rng = random.Random(7)
    client, server = trickle_pair(*contexts, chunk_size=lambda: rng.randint(1, 40_000))
    payload = rng.randbytes(1_000_000)
    got = bytearray()

    async def send_pieces() -> None:
        view = memoryview(payload)
        while view:
            size = rng.randint(1, 70_000)
            await client.send_all(view[:size])
            view = view[size:]

    async def read_all() -> None:
        while len(got) < len(payload):
            got.extend(await server.receive_some(rng.randint(1, 300_000)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_pieces)
        nursery.start_soon(read_all)
    assert got == payload
    await client.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


async def test_small_receives_split_a_record(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    client, server = memory_pair(*contexts)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"abcdef")
        assert await server.receive_some(2) == b"ab"
    assert await server.receive_some(3) == b"cde"
    assert await server.receive_some() == b"f"
    await client.aclose()
    assert await server.receive_some() == b""
    assert await server.receive_some() == b""  # stays at EOF
    await server.aclose()


async def test_non_byte_memoryview_is_sent_as_bytes(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    client, server = memory_pair(*contexts)
    words = memoryview(bytearray(range(16))).cast("I")  # 4 items of 4 bytes
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, words)
        assert await server.receive_some() == bytes(range(16))
    await client.aclose()
    await server.aclose()


async def test_repr_shows_state(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    client, server = memory_pair(*contexts)
    assert repr(client) == "<TLSStream client ok not handshaken>"
    await handshake_both(client, server)
    assert repr(server) == "<TLSStream server ok handshaken>"
    await client.aclose()
    assert repr(client) == "<TLSStream client closed handshaken>"
    await server.aclose()
