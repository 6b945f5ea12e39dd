"""The peer-verification hook, in both directions, over memory streams.

A refused peer must fail the handshake before any application byte is delivered.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from drm_lab.certs import Identity
from drm_wire.net._tls_context import _PeerCheck
from drm_wire.net.tls import (
    PeerVerificationError,
    TLSStream,
    client_context,
    server_context,
)
from tests.net.helpers import (
    PinningVerifier,
    Proof,
    RefusedError,
    handshake_both,
    memory_pair,
    pump_raw_handshake,
)


async def _handshake_outcomes(
    client: TLSStream, server: TLSStream
) -> tuple[BaseException | None, BaseException | None]:
    """Run both handshakes; return what each raised (or None)."""
    outcomes: dict[str, BaseException | None] = {}

    async def run(name: str, stream: TLSStream) -> None:
        try:
            await stream.do_handshake()
        except (PeerVerificationError, trio.BrokenResourceError) as exc:
            outcomes[name] = exc
        else:
            outcomes[name] = None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "client", client)
        nursery.start_soon(run, "server", server)
    return outcomes["client"], outcomes["server"]


async def test_self_signed_server_accepted_by_verifier(
    enclave_id: Identity, client_id: Identity
) -> None:
    # RA-TLS shape: a self-signed server leaf that only the verifier can judge
    # (OpenSSL says "depth zero self-signed" with ok=0; the verifier decides alone).
    verifier = PinningVerifier(enclave_id.der)
    client_ctx = client_context(verifier=verifier)
    server_ctx = server_context(certificate=enclave_id.cert, private_key=enclave_id.key)
    client, server = memory_pair(client_ctx, server_ctx)
    before = client.peer_identity
    assert before is None
    await handshake_both(client, server)
    assert client.peer_identity == Proof(enclave_id.der)
    assert client.peer_identity_as(Proof).der == enclave_id.der
    assert verifier.calls == [enclave_id.der]  # once per handshake
    assert client.peer_certificate_der() == enclave_id.der
    assert server.peer_identity is None
    with pytest.raises(PeerVerificationError, match="not verified as Proof"):
        server.peer_identity_as(Proof)
    await client.aclose()
    await server.aclose()


async def test_mutual_verification_gives_both_proofs(
    enclave_id: Identity, client_id: Identity, ca: Identity
) -> None:
    # The enclave-custodian link: the custodian (server) verifies the enclave's quote;
    # the enclave (client) pins the custodian CA and, here, also the custodian's leaf.
    custodian = client_id  # any CA-issued leaf will do as the custodian's certificate
    server_verifier = PinningVerifier(enclave_id.der)
    client_verifier = PinningVerifier(custodian.der)
    client_ctx = client_context(
        certificate=enclave_id.cert,
        private_key=enclave_id.key,
        verifier=client_verifier,
        ca_certificates=[ca.cert],
    )
    server_ctx = server_context(
        certificate=custodian.cert,
        private_key=custodian.key,
        verifier=server_verifier,
        require_client_certificate=True,
    )
    client, server = memory_pair(client_ctx, server_ctx)
    await handshake_both(client, server)
    assert server.peer_identity == Proof(enclave_id.der)
    assert client.peer_identity == Proof(custodian.der)
    assert server.peer_certificate_der() == enclave_id.der
    assert server_verifier.calls == [enclave_id.der]
    assert client_verifier.calls == [custodian.der]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"hello")
        assert await server.receive_some() == b"hello"
    await client.aclose()
    await server.aclose()


async def test_optional_client_certificate(
    enclave_id: Identity, server_id: Identity, ca: Identity
) -> None:
    # With a verifier but no requirement, a client without a certificate gets in
    # unverified, and one with a certificate is verified.
    server_verifier = PinningVerifier(enclave_id.der)
    server_ctx = server_context(
        certificate=server_id.cert, private_key=server_id.key, verifier=server_verifier
    )
    anonymous, server = memory_pair(client_context(ca_certificates=[ca.cert]), server_ctx)
    await handshake_both(anonymous, server)
    assert server.peer_identity is None
    assert server.peer_certificate_der() is None
    await anonymous.aclose()
    await server.aclose()

    enclave_ctx = client_context(
        certificate=enclave_id.cert, private_key=enclave_id.key, ca_certificates=[ca.cert]
    )
    enclave, server = memory_pair(enclave_ctx, server_ctx)
    await handshake_both(enclave, server)
    assert server.peer_identity == Proof(enclave_id.der)
    await enclave.aclose()
    await server.aclose()


async def test_client_refuses_server(enclave_id: Identity, server_id: Identity) -> None:
    verifier = PinningVerifier(enclave_id.der)  # pins a different certificate
    client_ctx = client_context(verifier=verifier)
    server_ctx = server_context(certificate=server_id.cert, private_key=server_id.key)
    client, server = memory_pair(client_ctx, server_ctx)
    client_exc, server_exc = await _handshake_outcomes(client, server)

    assert isinstance(client_exc, PeerVerificationError)
    assert isinstance(client_exc.__cause__, RefusedError)
    assert client.peer_identity is None
    assert isinstance(server_exc, trio.BrokenResourceError)
    assert "alert" in str(server_exc)
    # The client cannot send, and the server never delivers an application byte.
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"secret input")
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    await client.aclose()
    await server.aclose()


async def test_server_refuses_client(
    enclave_id: Identity, server_id: Identity, client_id: Identity, ca: Identity
) -> None:
    server_verifier = PinningVerifier(enclave_id.der)  # client_id is not the pinned one
    client_ctx = client_context(
        certificate=client_id.cert, private_key=client_id.key, ca_certificates=[ca.cert]
    )
    server_ctx = server_context(
        certificate=server_id.cert,
        private_key=server_id.key,
        verifier=server_verifier,
        require_client_certificate=True,
    )
    client, server = memory_pair(client_ctx, server_ctx)
    received: list[bytes] = []

    async def client_side() -> None:
        # TLS 1.3: the client's handshake is complete once it has sent its certificate
        # and Finished, so it learns of the refusal from the server's alert when it reads.
        await client.do_handshake()
        await client.send_all(b"secret model bytes")
        with pytest.raises(trio.BrokenResourceError, match="alert"):
            await client.receive_some()

    async def server_side() -> None:
        with pytest.raises(PeerVerificationError) as info:
            await server.do_handshake()
        assert isinstance(info.value.__cause__, RefusedError)
        with pytest.raises(trio.BrokenResourceError):
            received.append(await server.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_side)
        nursery.start_soon(server_side)
    assert received == []
    assert server_verifier.calls == [client_id.der]
    assert server.peer_identity is None
    await client.aclose()
    await server.aclose()


async def test_server_requires_a_client_certificate(
    enclave_id: Identity, server_id: Identity, ca: Identity
) -> None:
    server_verifier = PinningVerifier(enclave_id.der)
    client_ctx = client_context(ca_certificates=[ca.cert])  # no client certificate
    server_ctx = server_context(
        certificate=server_id.cert,
        private_key=server_id.key,
        verifier=server_verifier,
        require_client_certificate=True,
    )
    client, server = memory_pair(client_ctx, server_ctx)

    async def client_side() -> None:
        await client.do_handshake()
        with pytest.raises(trio.BrokenResourceError, match="certificate required"):
            await client.receive_some()

    async def server_side() -> None:
        with pytest.raises(trio.BrokenResourceError, match="certificate"):
            await server.do_handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_side)
        nursery.start_soon(server_side)
    assert server_verifier.calls == []
    await client.aclose()
    await server.aclose()


async def test_untrusted_chain_is_refused(other_ca: Identity, server_id: Identity) -> None:
    client_ctx = client_context(ca_certificates=[other_ca.cert])
    server_ctx = server_context(certificate=server_id.cert, private_key=server_id.key)
    client, server = memory_pair(client_ctx, server_ctx)
    client_exc, server_exc = await _handshake_outcomes(client, server)
    assert isinstance(client_exc, trio.BrokenResourceError)
    assert "certificate verify failed" in str(client_exc)
    assert "X509 verify error" in str(client_exc)
    assert isinstance(server_exc, trio.BrokenResourceError)
    await client.aclose()
    await server.aclose()


async def test_chain_and_verifier_combined(ca: Identity, server_id: Identity) -> None:
    # Both must agree: a trusted chain and the verifier's approval of the leaf.
    verifier = PinningVerifier(server_id.der)
    client_ctx = client_context(verifier=verifier, ca_certificates=[ca.cert])
    server_ctx = server_context(certificate=server_id.cert, private_key=server_id.key)
    client, server = memory_pair(client_ctx, server_ctx)
    await handshake_both(client, server)
    assert client.peer_identity == Proof(server_id.der)
    assert verifier.calls == [server_id.der]
    await client.aclose()
    await server.aclose()


def test_context_argument_checks(server_id: Identity, client_id: Identity) -> None:
    with pytest.raises(ValueError, match="needs a verifier or ca_certificates"):
        server_context(
            certificate=server_id.cert,
            private_key=server_id.key,
            require_client_certificate=True,
        )
    with pytest.raises(ValueError, match="given together"):
        client_context(certificate=client_id.cert)


async def test_sni_hostname_is_accepted(ca: Identity, server_id: Identity) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client = TLSStream(
        client_transport,
        client_context(ca_certificates=[ca.cert]),
        server_side=False,
        server_hostname="localhost",
    )
    server = TLSStream(
        server_transport,
        server_context(certificate=server_id.cert, private_key=server_id.key),
        server_side=True,
    )
    await handshake_both(client, server)
    await client.aclose()
    await server.aclose()


def test_foreign_connection_fails_closed(enclave_id: Identity, server_id: Identity) -> None:
    # A Connection made from our context without TLSStream has no place to record the
    # verdict, so the verify callback refuses the peer instead of waving it through.
    verifier = PinningVerifier(server_id.der)
    client = SSL.Connection(client_context(verifier=verifier), None)
    client.set_connect_state()
    server = SSL.Connection(
        server_context(certificate=server_id.cert, private_key=server_id.key), None
    )
    server.set_accept_state()
    with pytest.raises(SSL.Error, match="certificate verify failed"):
        pump_raw_handshake(client, server)
    assert verifier.calls == []


def test_session_resumption_cannot_skip_the_verifier(
    enclave_id: Identity, server_id: Identity, ca: Identity
) -> None:
    # A resumed session would skip certificate verification, hence the verifier; the
    # contexts disable resumption, so offering the old session gets a full handshake.
    server_verifier = PinningVerifier(enclave_id.der)
    server_ctx = server_context(
        certificate=server_id.cert,
        private_key=server_id.key,
        verifier=server_verifier,
        require_client_certificate=True,
    )
    client_ctx = client_context(
        certificate=enclave_id.cert, private_key=enclave_id.key, ca_certificates=[ca.cert]
    )

    def connect(session: SSL.Session | None) -> tuple[SSL.Connection, _PeerCheck]:
        client = SSL.Connection(client_ctx, None)
        client.set_app_data(_PeerCheck())
        client.set_connect_state()
        if session is not None:
            client.set_session(session)
        server = SSL.Connection(server_ctx, None)
        check = _PeerCheck()
        server.set_app_data(check)
        server.set_accept_state()
        pump_raw_handshake(client, server)
        return client, check

    first, first_check = connect(None)
    assert first_check.identity == Proof(enclave_id.der)
    _second, second_check = connect(first.get_session())
    assert second_check.identity == Proof(enclave_id.der)
    assert server_verifier.calls == [enclave_id.der, enclave_id.der]
