"""TLSStream over real TCP sockets on 127.0.0.1: open_tls_client and accept_tls."""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from drm_lab.certs import Identity
from drm_wire.net import _openssl_handles, _socket_io, tls
from drm_wire.net.tls import TLSStream, accept_tls, client_context, open_tls_client, server_context
from tests.net.helpers import handshake_both

Handler = Callable[[trio.SocketStream], Awaitable[None]]
LOOPBACK = "127.0.0.1"


@pytest.fixture
def client_ctx(ca: Identity) -> SSL.Context:
    return client_context(ca_certificates=[ca.cert])


@pytest.fixture
def server_ctx(server_id: Identity) -> SSL.Context:
    return server_context(certificate=server_id.cert, private_key=server_id.key)


@pytest.fixture
async def serve(
    nursery: trio.Nursery,
) -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """Start a one-connection-at-a-time TCP server on loopback; returns its port."""

    async def start(handler: Handler) -> int:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOOPBACK))
        port: int = listeners[0].socket.getsockname()[1]
        return port

    yield start
    nursery.cancel_scope.cancel()


def _pattern(size: int, seed: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


async def _receive_exactly(stream: TLSStream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await stream.receive_some()
        assert chunk, "unexpected EOF"
        got += chunk
    return bytes(got)


async def _send_in_pieces(stream: TLSStream, data: bytes, piece: int) -> None:
    view = memoryview(data)
    for start in range(0, len(view), piece):
        await stream.send_all(view[start : start + piece])


async def test_bulk_both_directions_then_clean_close(
    serve: Callable[[Handler], Awaitable[int]], client_ctx: SSL.Context, server_ctx: SSL.Context
) -> None:
    size = 4 * 1024 * 1024
    up, down = _pattern(size, 1), _pattern(size, 2)
    server_got: list[bytes] = []

    async def handler(tcp: trio.SocketStream) -> None:
        stream = await accept_tls(tcp, server_ctx)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(_send_in_pieces, stream, down, 1024 * 1024)
            server_got.append(await _receive_exactly(stream, size))
        # leaving the block sent close_notify

    port = await serve(handler)
    client = await open_tls_client(LOOPBACK, port, client_ctx)
    assert client.tls_version == "TLSv1.3"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_in_pieces, client, up, 300_000)
        got = await _receive_exactly(client, size)
    assert got == down
    assert await client.receive_some() == b""  # the server's close_notify
    await client.aclose()
    assert server_got == [up]


def test_one_send_encrypts_many_records(client_ctx: SSL.Context) -> None:
    """pyOpenSSL's partial-write mode (one 16 KiB record per ``Connection.send``) is off:
    a whole write into the growing memory BIO cannot stop half-way, and it takes a quarter
    less CPU. The bulk test above checks such writes arrive intact."""
    transport, _ = trio.testing.memory_stream_pair()
    stream = TLSStream(transport, client_ctx, server_side=False, server_hostname="localhost")
    assert _openssl_handles.SSL_READ is not None
    lib = _openssl_handles.SSL_READ[1]
    mode = lib.SSL_set_mode(stream._conn._ssl, 0)  # adds nothing; returns the mode
    assert mode & lib.SSL_MODE_ENABLE_PARTIAL_WRITE == 0


async def test_without_the_private_handles_sends_go_a_record_at_a_time(
    serve: Callable[[Handler], Awaitable[int]],
    client_ctx: SSL.Context,
    server_ctx: SSL.Context,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where pyOpenSSL's private handles are gone (a future release), partial-write mode
    stays on and each ``Connection.send`` encrypts one record: slower, every byte intact."""
    assert _openssl_handles.SSL_READ is not None
    lib = _openssl_handles.SSL_READ[1]
    monkeypatch.setattr(_openssl_handles, "SSL_READ", None)
    size = 1024 * 1024 + 5
    data = _pattern(size, 3)

    async def handler(tcp: trio.SocketStream) -> None:
        async with await accept_tls(tcp, server_ctx) as stream:
            await stream.send_all(data)

    port = await serve(handler)
    async with await open_tls_client(LOOPBACK, port, client_ctx) as client:
        mode = lib.SSL_set_mode(client._conn._ssl, 0)  # adds nothing; returns the mode
        assert mode & lib.SSL_MODE_ENABLE_PARTIAL_WRITE
        assert await _receive_exactly(client, size) == data


def _count_bio_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch ``Connection.bio_read`` to record the size of every read that found bytes."""
    sizes: list[int] = []
    original = SSL.Connection.bio_read

    def bio_read(conn: SSL.Connection, bufsiz: int) -> bytes:
        data = original(conn, bufsiz)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(SSL.Connection, "bio_read", bio_read)
    return sizes


@pytest.mark.parametrize("handles", [True, False], ids=["bio-read-handles", "without"])
async def test_ciphertext_is_read_from_the_bio_once(
    serve: Callable[[Handler], Awaitable[int]],
    client_ctx: SSL.Context,
    server_ctx: SSL.Context,
    monkeypatch: pytest.MonkeyPatch,
    handles: bool,
) -> None:
    """The outgoing BIO is read into a buffer that is sent as it is (``bio_read`` would
    copy it again into ``bytes``). ``bio_read`` then only ever finds the BIO empty; where
    the private handles are gone it carries everything. Every byte arrives either way."""
    reads = _count_bio_reads(monkeypatch)
    if not handles:
        monkeypatch.setattr(_openssl_handles, "BIO_READ", None)
    size = 3 * 1024 * 1024 + 7
    data = _pattern(size, 4)

    async def handler(tcp: trio.SocketStream) -> None:
        async with await accept_tls(tcp, server_ctx) as stream:
            await stream.send_all(data)
            assert await _receive_exactly(stream, 1) == b"k"  # the client has it all
            assert await stream.receive_some() == b""  # then closes (close_notify)

    port = await serve(handler)
    client = await open_tls_client(LOOPBACK, port, client_ctx)
    assert await _receive_exactly(client, size) == data
    await client.send_all(b"k")
    await client.aclose()
    if handles:
        assert reads == []  # handshake flights, data and close_notify went the one-copy way
    else:
        assert sum(reads) > size  # all of it, record overhead and handshake included


async def test_both_sides_ask_for_large_socket_buffers_where_the_kernel_allows(
    serve: Callable[[Handler], Awaitable[int]], client_ctx: SSL.Context, server_ctx: SSL.Context
) -> None:
    """Large tensors go out in few steps where the kernel's caps allow the whole
    SOCKET_BUFFER_BYTES (Linux grants double what is asked); elsewhere autotuning stays."""
    want = {
        option: tls.socket_buffer_size(option) for option in (socket.SO_SNDBUF, socket.SO_RCVBUF)
    }
    granted: list[dict[int, int]] = []

    def sizes(stream: TLSStream) -> dict[int, int]:
        sock = stream.transport_stream.socket  # type: ignore[attr-defined]
        return {option: sock.getsockopt(socket.SOL_SOCKET, option) for option in want}

    async def handler(tcp: trio.SocketStream) -> None:
        async with await accept_tls(tcp, server_ctx) as stream:
            granted.append(sizes(stream))
            await stream.send_all(b"ok")

    port = await serve(handler)
    async with await open_tls_client(LOOPBACK, port, client_ctx) as client:
        granted.append(sizes(client))
        assert await client.receive_some() == b"ok"
    assert len(granted) == 2
    for side in granted:
        for option, size in want.items():
            if size is not None:
                assert side[option] >= size


@pytest.mark.parametrize(
    ("cap", "asked"), [(8 * 1024 * 1024, tls.SOCKET_BUFFER_BYTES), (212992, None), (None, None)]
)
def test_a_buffer_is_asked_for_only_where_the_cap_allows_all_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int | None, asked: int | None
) -> None:
    """Asking turns autotuning off: a buffer locked at a low cap would shrink a long-haul
    link's window, so below the full amount (or without /proc) nothing is asked."""
    path = tmp_path / "rmem_max"
    if cap is not None:
        path.write_text(f"{cap}\n")
    monkeypatch.setitem(_socket_io._BUFFER_CAPS, socket.SO_RCVBUF, str(path))
    assert tls.socket_buffer_size(socket.SO_RCVBUF) == asked


async def test_ragged_eof_is_broken_resource(
    serve: Callable[[Handler], Awaitable[int]], client_ctx: SSL.Context, server_ctx: SSL.Context
) -> None:
    async def handler(tcp: trio.SocketStream) -> None:
        stream = await accept_tls(tcp, server_ctx)
        await stream.send_all(b"partial")
        await tcp.aclose()  # drop TCP without close_notify

    port = await serve(handler)
    client = await open_tls_client(LOOPBACK, port, client_ctx)
    assert await client.receive_some() == b"partial"
    with pytest.raises(trio.BrokenResourceError, match="ragged EOF"):
        await client.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()  # stays broken
    await client.aclose()


async def test_server_that_is_not_tls(
    serve: Callable[[Handler], Awaitable[int]], client_ctx: SSL.Context
) -> None:
    async def handler(tcp: trio.SocketStream) -> None:
        await tcp.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 4)
        await tcp.receive_some()

    port = await serve(handler)
    with pytest.raises(trio.BrokenResourceError, match="TLS handshake failed"):
        await open_tls_client(LOOPBACK, port, client_ctx)


async def test_client_that_is_not_tls(
    serve: Callable[[Handler], Awaitable[int]], server_ctx: SSL.Context
) -> None:
    outcome: list[BaseException] = []
    done = trio.Event()

    async def handler(tcp: trio.SocketStream) -> None:
        try:
            await accept_tls(tcp, server_ctx)
        except trio.BrokenResourceError as exc:
            outcome.append(exc)
        done.set()

    port = await serve(handler)
    async with await trio.open_tcp_stream(LOOPBACK, port) as tcp:
        await tcp.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await done.wait()
    assert len(outcome) == 1
    assert "TLS handshake failed" in str(outcome[0])


async def test_peer_drops_tcp_during_handshake(
    serve: Callable[[Handler], Awaitable[int]], client_ctx: SSL.Context
) -> None:
    async def handler(tcp: trio.SocketStream) -> None:
        await tcp.receive_some()  # the ClientHello
        await tcp.aclose()

    port = await serve(handler)
    with pytest.raises(trio.BrokenResourceError, match="during the TLS handshake"):
        await open_tls_client(LOOPBACK, port, client_ctx)


# --- the socket path: TLSStream reads and writes a SocketStream's socket itself ----------


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two connected TCP streams on loopback, without a server task."""
    listener = trio.socket.socket()
    try:
        await listener.bind((LOOPBACK, 0))
        listener.listen(1)
        client = await trio.open_tcp_stream(LOOPBACK, listener.getsockname()[1])
        accepted, _ = await listener.accept()
    finally:
        listener.close()
    return client, trio.SocketStream(accepted)


async def _tls_over_tcp(
    client_ctx: SSL.Context, server_ctx: SSL.Context
) -> tuple[TLSStream, TLSStream]:
    """A client and a server TLSStream over a loopback TCP pair, not yet handshaken."""
    client_tcp, server_tcp = await _tcp_pair()
    return (
        TLSStream(client_tcp, client_ctx, server_side=False),
        TLSStream(server_tcp, server_ctx, server_side=True),
    )


async def test_check_two_way_stream_over_tcp(
    client_ctx: SSL.Context, server_ctx: SSL.Context
) -> None:
    # trio's generic checks (one schedule point per call, closing, conflicts) on the path
    # that skips the SocketStream's own methods.
    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        return await _tls_over_tcp(client_ctx, server_ctx)

    await trio.testing.check_two_way_stream(stream_maker, None)


async def test_a_socket_transport_is_read_and_written_directly(
    client_ctx: SSL.Context, server_ctx: SSL.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: object) -> None:
        raise AssertionError("the SocketStream's own methods were called")

    monkeypatch.setattr(trio.SocketStream, "send_all", refuse)
    monkeypatch.setattr(trio.SocketStream, "receive_some", refuse)
    client, server = await _tls_over_tcp(client_ctx, server_ctx)
    data = _pattern(3 << 20, 7)  # more than the kernel buffers: the sender waits
    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, data)
        assert await _receive_exactly(server, len(data)) == data
        await server.send_all(b"back")
        assert await client.receive_some() == b"back"


async def _transfer_both_ways(
    client_ctx: SSL.Context, server_ctx: SSL.Context, size: int, seed: int
) -> None:
    client, server = await _tls_over_tcp(client_ctx, server_ctx)
    up, down = _pattern(size, seed), _pattern(size, seed + 1)
    got: dict[str, bytes] = {}

    async def receive(name: str, stream: TLSStream) -> None:
        got[name] = await _receive_exactly(stream, size)

    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(_send_in_pieces, client, up, 70_001)
        nursery.start_soon(_send_in_pieces, server, down, 50_003)
        nursery.start_soon(receive, "server", server)
        nursery.start_soon(receive, "client", client)
    assert got == {"server": up, "client": down}


async def test_streams_sharing_a_thread_share_its_receive_buffer_safely(
    client_ctx: SSL.Context, server_ctx: SSL.Context
) -> None:
    # Four streams in this thread read through one buffer, interleaved at every wait;
    # a fifth pair runs in another thread, with a buffer of its own.
    size = 2 << 20

    async def in_another_thread() -> None:
        run = partial(trio.run, _transfer_both_ways, client_ctx, server_ctx, size, 100)
        await trio.to_thread.run_sync(run)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_another_thread)
        for seed in (1, 3):
            nursery.start_soon(_transfer_both_ways, client_ctx, server_ctx, size, seed)


async def test_closing_under_a_parked_sender_sends_no_close_notify_mid_record(
    client_ctx: SSL.Context, server_ctx: SSL.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, server = await _tls_over_tcp(client_ctx, server_ctx)
    await handshake_both(client, server)
    outcome: list[BaseException] = []
    writes: list[int] = []  # every transport write the client starts
    transport_send = TLSStream._transport_send

    async def counted(self: TLSStream, data: bytes) -> None:
        writes.append(len(data))
        await transport_send(self, data)

    monkeypatch.setattr(TLSStream, "_transport_send", counted)

    async def sender() -> None:
        try:
            await client.send_all(_pattern(16 << 20, 1))  # parks: the server does not read
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        started = len(writes)
        await client.aclose()  # from another task, with a record half-written
    # aclose started no write of its own: a close_notify could have landed mid-record as
    # soon as the peer made room, before the parked sender ran again.
    assert len(writes) == started
    assert len(outcome) == 1  # the parked sender learns of the close
    # The server reads what arrived, then the end: a ragged EOF, not a record broken by a
    # close_notify written into the middle of it.
    with pytest.raises(trio.BrokenResourceError, match="ragged EOF"):
        await _receive_to_the_end(server)
    await server.aclose()


async def test_a_reset_peer_breaks_a_sender(
    client_ctx: SSL.Context, server_ctx: SSL.Context
) -> None:
    client, server = await _tls_over_tcp(client_ctx, server_ctx)
    await handshake_both(client, server)
    server_tcp = server.transport_stream
    assert isinstance(server_tcp, trio.SocketStream)
    server_tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await server_tcp.aclose()  # linger 0: the kernel answers with a reset
    with pytest.raises(trio.BrokenResourceError, match="TLS transport failed while sending"):
        await _send_until_it_fails(client)
    await client.aclose()


async def _receive_to_the_end(stream: TLSStream) -> None:
    while await stream.receive_some():
        pass


async def _send_until_it_fails(stream: TLSStream) -> None:
    for _ in range(64):  # the first writes may land before the reset is seen
        await stream.send_all(b"x" * 65536)
