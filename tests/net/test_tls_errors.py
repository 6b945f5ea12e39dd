"""Deadlines, misuse and the OK / BROKEN / CLOSED states of TLSStream."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from drm_lab.certs import Identity
from drm_wire.limits import HANDSHAKE_TIMEOUT
from drm_wire.net.tls import TLSStream, client_context, server_context
from tests.net.helpers import handshake_both, lockstep_pair, memory_pair


@pytest.fixture
def contexts(ca: Identity, server_id: Identity) -> tuple[SSL.Context, SSL.Context]:
    client_ctx = client_context(ca_certificates=[ca.cert])
    server_ctx = server_context(certificate=server_id.cert, private_key=server_id.key)
    return client_ctx, server_ctx


async def test_handshake_timeout_against_silent_peer(
    autojump_clock: trio.testing.MockClock, contexts: tuple[SSL.Context, SSL.Context]
) -> None:
    client_transport, _silent = trio.testing.memory_stream_pair()
    client = TLSStream(client_transport, contexts[0], server_side=False)
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError, match=f"within {HANDSHAKE_TIMEOUT} s"):
        await client.send_all(b"never sent")
    assert trio.current_time() - start == pytest.approx(HANDSHAKE_TIMEOUT)
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    await client.aclose()


async def test_custom_handshake_timeout_on_server(
    autojump_clock: trio.testing.MockClock, contexts: tuple[SSL.Context, SSL.Context]
) -> None:
    _silent, server_transport = trio.testing.memory_stream_pair()
    server = TLSStream(server_transport, contexts[1], server_side=True, handshake_timeout=2.5)
    with pytest.raises(trio.TooSlowError, match=r"within 2\.5 s"):
        await server.do_handshake()
    await server.aclose()


async def test_read_timeout_leaves_stream_usable(
    autojump_clock: trio.testing.MockClock, contexts: tuple[SSL.Context, SSL.Context]
) -> None:
    client, server = memory_pair(*contexts)
    await handshake_both(client, server)
    client.read_timeout = 5.0
    with pytest.raises(trio.TooSlowError, match=r"nothing for 5\.0 s"):
        await client.receive_some()
    await server.send_all(b"late")
    assert await client.receive_some() == b"late"
    await client.aclose()
    await server.aclose()


async def test_concurrent_send_all_is_busy(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    client, server = lockstep_pair(*contexts)
    await handshake_both(client, server)
    with pytest.RaisesGroup(trio.BusyResourceError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"one")
            nursery.start_soon(client.send_all, b"two")
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


async def test_concurrent_receive_some_is_busy(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    client, server = memory_pair(*contexts)
    await handshake_both(client, server)
    with pytest.RaisesGroup(trio.BusyResourceError):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some)
            nursery.start_soon(server.receive_some)
    await client.aclose()
    await server.aclose()


async def test_use_after_aclose(contexts: tuple[SSL.Context, SSL.Context]) -> None:
    client, server = memory_pair(*contexts)
    await handshake_both(client, server)
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await client.do_handshake()
    with pytest.raises(trio.ClosedResourceError):
        await client.wait_send_all_might_not_block()
    await client.aclose()  # idempotent
    await server.aclose()


async def test_cancelled_send_breaks_the_stream(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    # Once bytes are encrypted they are committed; a cancelled send cannot be retried.
    client, server = lockstep_pair(*contexts)
    await handshake_both(client, server)
    with trio.move_on_after(0.01) as scope:
        await client.send_all(b"x" * 100_000)  # the peer never reads: blocks
    assert scope.cancelled_caught
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"y")
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


async def test_cancelled_receive_keeps_the_stream(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    client, server = memory_pair(*contexts)
    await handshake_both(client, server)
    with trio.move_on_after(0.01):
        await server.receive_some()
    await client.send_all(b"still fine")
    assert await server.receive_some() == b"still fine"
    await client.aclose()
    await server.aclose()


async def test_aclose_gives_up_on_a_peer_that_does_not_read(
    autojump_clock: trio.testing.MockClock, contexts: tuple[SSL.Context, SSL.Context]
) -> None:
    client, server = lockstep_pair(*contexts)
    await handshake_both(client, server)
    start = trio.current_time()
    await client.aclose()  # close_notify cannot be delivered; bounded wait, then close
    assert trio.current_time() - start == pytest.approx(1.0)
    # Whether the peer saw the close_notify depends on the transport; either way it ends.
    with contextlib.suppress(trio.BrokenResourceError):
        assert await server.receive_some() == b""
    await server.aclose()


async def test_aclose_when_cancelled_still_closes(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    client, server = memory_pair(*contexts)
    await handshake_both(client, server)
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")
    await server.aclose()


async def test_concurrent_handshake_triggers_run_one_handshake(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    client, server = memory_pair(*contexts)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(client.send_all, b"ping")
        assert await server.receive_some() == b"ping"
    await client.do_handshake()  # already done: a checkpoint only
    await client.aclose()
    await server.aclose()


async def test_wait_send_all_might_not_block_handshakes_first(
    contexts: tuple[SSL.Context, SSL.Context],
) -> None:
    client, server = memory_pair(*contexts)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.wait_send_all_might_not_block()
    assert client.tls_version == "TLSv1.3"
    await client.aclose()
    await server.aclose()
