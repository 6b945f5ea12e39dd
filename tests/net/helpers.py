"""Stream-pair builders and fake verifiers shared by the TLS tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import trio.testing
from OpenSSL import SSL

from drm_wire.net.tls import TLSStream


def wrap_pair(
    client_ctx: SSL.Context,
    server_ctx: SSL.Context,
    client_transport: trio.abc.Stream,
    server_transport: trio.abc.Stream,
) -> tuple[TLSStream, TLSStream]:
    """Wrap two connected transports in client and server TLS streams."""
    client = TLSStream(client_transport, client_ctx, server_side=False)
    server = TLSStream(server_transport, server_ctx, server_side=True)
    return client, server


def memory_pair(client_ctx: SSL.Context, server_ctx: SSL.Context) -> tuple[TLSStream, TLSStream]:
    """TLS over ``trio.testing.memory_stream_pair`` (buffered, never blocks a sender)."""
    return wrap_pair(client_ctx, server_ctx, *trio.testing.memory_stream_pair())


def lockstep_pair(client_ctx: SSL.Context, server_ctx: SSL.Context) -> tuple[TLSStream, TLSStream]:
    """TLS over ``lockstep_stream_pair``: every send waits for the peer's receive."""
    return wrap_pair(client_ctx, server_ctx, *trio.testing.lockstep_stream_pair())


def _trickle_one_way(
    chunk_size: Callable[[], int],
) -> tuple[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]:
    send, receive = trio.testing.memory_stream_one_way_pair()

    async def pump() -> None:
        trio.testing.memory_stream_pump(send, receive, max_bytes=chunk_size())

    def pump_on_close() -> None:
        # Deliver what is left and then EOF; a receiver that is already gone is no error.
        with contextlib.suppress(trio.BrokenResourceError):
            trio.testing.memory_stream_pump(send, receive)

    send.send_all_hook = pump
    receive.receive_some_hook = pump
    send.close_hook = pump_on_close
    return send, receive


def trickle_pair(
    client_ctx: SSL.Context,
    server_ctx: SSL.Context,
    chunk_size: Callable[[], int] = lambda: 1,
) -> tuple[TLSStream, TLSStream]:
    """TLS over a transport that delivers ``chunk_size()`` bytes (default 1) per pump."""
    c2s_send, c2s_receive = _trickle_one_way(chunk_size)
    s2c_send, s2c_receive = _trickle_one_way(chunk_size)
    client_transport = trio.StapledStream(c2s_send, s2c_receive)
    server_transport = trio.StapledStream(s2c_send, c2s_receive)
    return wrap_pair(client_ctx, server_ctx, client_transport, server_transport)


async def handshake_both(a: TLSStream, b: TLSStream) -> None:
    """Run both handshakes concurrently."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.do_handshake)
        nursery.start_soon(b.do_handshake)


@dataclass(frozen=True)
class Proof:
    """What the fake verifier returns: stands in for ``VerifiedEnclave``."""

    der: bytes


class RefusedError(Exception):
    """What the fake verifier raises for an unknown certificate."""


@dataclass
class PinningVerifier:
    """Accepts exactly the pinned DER; counts its calls (it must run once per handshake)."""

    pinned: bytes
    calls: list[bytes] = field(default_factory=list)

    def __call__(self, der: bytes) -> Proof:
        self.calls.append(der)
        if der != self.pinned:
            raise RefusedError("certificate is not the pinned one")
        return Proof(der)


def pump_raw_handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Drive two bare pyOpenSSL connections through a handshake in memory."""
    for _ in range(5):
        for me, peer in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                me.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                peer.bio_write(me.bio_read(65536))
    with contextlib.suppress(SSL.WantReadError):
        client.recv(1)  # take in the server's post-handshake session tickets
