"""Version negotiation through MessageChannel.hello / accept_hello, against hand-driven peers."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from drm_wire.errors import ErrorCode, PeerError, RemoteProtocolError
from drm_wire.limits import HELLO_TIMEOUT
from drm_wire.messages import Error, Hello, PeerRole, Refusal, Welcome
from drm_wire.net.channel import ChannelClosed, HelloRefused
from drm_wire.protocol import SUPPORTED_VERSIONS, Closed, Link
from tests.net.channel_fakes import (
    CLIENT_SOFTWARE,
    StreamPair,
    client_and_raw_server,
    infer,
    raw_client_and_server,
)


# (3,): the last release's peers (no demand, no block acknowledgement) are refused.
@pytest.mark.parametrize("versions", [(7, 8), (3,), (1, 2, 3)])
async def test_server_refuses_a_client_without_a_common_version(
    stream_pair: StreamPair, versions: tuple[int, ...]
) -> None:
    answers: list[object] = []
    async with raw_client_and_server(stream_pair, handshake=False) as (raw, server):

        async def client() -> None:
            await raw.send(Hello(versions=versions, role=PeerRole.CONSUMER, software="old"))
            answers.extend(await raw.receive_until_eof())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            with pytest.raises(RemoteProtocolError, match="no protocol version") as info:
                await server.accept_hello(software="server")
        assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
        assert info.value.got == versions
        with pytest.raises(ChannelClosed):
            await server.receive()
    assert len(answers) == 1
    refusal = answers[0]
    assert isinstance(refusal, Refusal)
    assert refusal.code is ErrorCode.UNSUPPORTED_VERSION
    assert refusal.supported_versions == SUPPORTED_VERSIONS


async def test_client_raises_hello_refused_with_the_code(stream_pair: StreamPair) -> None:
    async with client_and_raw_server(stream_pair, handshake=False) as (client, raw):

        async def refuse() -> None:
            assert isinstance(await raw.receive(), Hello)
            await raw.send(
                Refusal(
                    code=ErrorCode.UNSUPPORTED_VERSION,
                    message="only version 3",
                    supported_versions=(3,),
                )
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refuse)
            with pytest.raises(HelloRefused, match="only version 3") as info:
                await client.hello(role=PeerRole.CONSUMER, software=CLIENT_SOFTWARE)
        assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
        assert info.value.supported_versions == (3,)
        assert isinstance(info.value, PeerError)
        with pytest.raises(ChannelClosed, match="refused"):
            await client.send(infer(1))


async def test_welcome_with_an_unknown_version_is_a_protocol_error(stream_pair: StreamPair) -> None:
    async with client_and_raw_server(stream_pair, Link.CUSTODIAN, handshake=False) as (
        client,
        raw,
    ):
        answers: list[object] = []

        async def misbehave() -> None:
            assert isinstance(await raw.receive(), Hello)
            await raw.send_unchecked(Welcome(version=9, software="future-server"))
            answers.extend(await raw.receive_until_eof())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(misbehave)
            with pytest.raises(RemoteProtocolError, match="version 9 is not supported") as info:
                await client.hello(role=PeerRole.ENCLAVE, software=CLIENT_SOFTWARE)
        assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
        assert client.version is None
    assert answers == [
        Error(code=ErrorCode.UNSUPPORTED_VERSION, message="version 9 is not supported")
    ]


async def test_connection_error_instead_of_welcome_is_peer_error(stream_pair: StreamPair) -> None:
    async with client_and_raw_server(stream_pair, handshake=False) as (client, raw):

        async def busy() -> None:
            assert isinstance(await raw.receive(), Hello)
            await raw.send(Error(code=ErrorCode.BUSY, message="too many connections"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy)
            with pytest.raises(PeerError, match="too many connections") as info:
                await client.hello(role=PeerRole.CONSUMER, software=CLIENT_SOFTWARE)
        assert info.value.code is ErrorCode.BUSY
        assert info.value.request_id is None


async def test_wrong_role_is_reported_to_the_client(stream_pair: StreamPair) -> None:
    async with raw_client_and_server(stream_pair, Link.CONSUMER, handshake=False) as (raw, server):
        answers: list[object] = []

        async def impostor() -> None:
            await raw.send_unchecked(
                Hello(versions=SUPPORTED_VERSIONS, role=PeerRole.ENCLAVE, software="x")
            )
            answers.extend(await raw.receive_until_eof())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(impostor)
            with pytest.raises(RemoteProtocolError, match="cannot open a consumer link") as info:
                await server.accept_hello(software="server")
        assert info.value.field == "role"
    assert len(answers) == 1
    error = answers[0]
    assert isinstance(error, Error)
    assert error.code is ErrorCode.PROTOCOL_ERROR
    assert "cannot open a consumer link" in error.message


async def test_client_hello_timeout_closes_the_channel(
    stream_pair: StreamPair, autojump_clock: trio.testing.MockClock
) -> None:
    async with client_and_raw_server(stream_pair, handshake=False) as (client, raw):
        seen: list[object] = []

        async def silent() -> None:
            seen.append(await raw.receive())  # takes the hello, never answers
            seen.append(await raw.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(silent)
            start = trio.current_time()
            with pytest.raises(trio.TooSlowError, match=r"no welcome within 10\.0 s"):
                await client.hello(role=PeerRole.CONSUMER, software=CLIENT_SOFTWARE)
            assert trio.current_time() - start == pytest.approx(HELLO_TIMEOUT)
        with pytest.raises(ChannelClosed, match="no welcome"):
            await client.send(infer(1))
    assert isinstance(seen[0], Hello)
    assert isinstance(seen[1], Closed)


async def test_server_hello_timeout_tells_the_client(
    stream_pair: StreamPair, autojump_clock: trio.testing.MockClock
) -> None:
    async with raw_client_and_server(stream_pair, handshake=False) as (raw, server):
        answers: list[object] = []

        async def silent_client() -> None:
            answers.extend(await raw.receive_until_eof())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(silent_client)
            with pytest.raises(trio.TooSlowError, match=r"no hello within 2\.5 s"):
                await server.accept_hello(software="server", hello_timeout=2.5)
            assert trio.current_time() == pytest.approx(2.5)
    assert answers == [Error(code=ErrorCode.TIMEOUT, message="no hello within 2.5 s")]
