"""RA-TLS inside the handshake, both directions, over real loopback sockets.

A simulated platform (made once per session) stands in for SGX. Every refused peer must
fail the handshake: the side that did not refuse never gets an application byte.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import json
import pathlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from drm_lab.certs import Identity, make_ca
from drm_lab.pccs import PccsBehaviour, running_pccs
from drm_wire.attestation import _pck
from drm_wire.attestation.collateral import Collateral, TcbStatus
from drm_wire.attestation.collateral_cache import CollateralCache
from drm_wire.attestation.errors import UntrustedRootError
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.pccs import CaType, PccsClient
from drm_wire.attestation.policy import (
    DebugEnclaveError,
    MeasurementMismatchError,
    Policy,
    TcbStatusError,
)
from drm_wire.attestation.ratls_cert import (
    CertificateFormatError,
    RatlsCredentials,
    build_ratls_certificate,
)
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.attestation.verify import clear_chain_cache
from drm_wire.errors import AttestationError
from drm_wire.net.ratls_context import (
    VERIFICATION_CACHE,
    CustodianCertificateError,
    VerifiedCustodian,
    consumer_client_context,
    custodian_server_context,
    enclave_client_context,
    enclave_server_context,
)
from drm_wire.net.tls import (
    PeerVerificationError,
    TLSStream,
    accept_tls,
    client_context,
    open_tls_client,
    server_context,
)
from tests.simulation import simulation_policy

HOST = "127.0.0.1"
MR_ENCLAVE = hashlib.sha256(b"drm test enclave").digest()
OTHER_MR_ENCLAVE = hashlib.sha256(b"some other enclave").digest()
MR_SIGNER = hashlib.sha256(b"drm test signer").digest()
CUSTODIAN_DNS = "custodian.drm.test"
#: Generous for a loopback handshake; keeps a bug from hanging the suite.
TIMEOUT = 10.0


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("ratls") / "platform")


def _enclave(
    platform: SimulatedPlatform, mr_enclave: bytes = MR_ENCLAVE, *, debug: bool = False
) -> RatlsCredentials:
    provider = platform.quote_provider(mr_enclave=mr_enclave, mr_signer=MR_SIGNER, debug=debug)
    return build_ratls_certificate(provider)


@pytest.fixture(scope="session")
def enclave(platform: SimulatedPlatform) -> RatlsCredentials:
    return _enclave(platform)


@pytest.fixture(scope="session")
def policy(platform: SimulatedPlatform) -> Policy:
    return simulation_policy(platform, MR_ENCLAVE)


@pytest.fixture(scope="session")
def custodian_ca() -> Identity:
    return make_ca("drm-test-custodian-ca")


def _custodian_leaf(
    ca: Identity,
    *,
    usages: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.SERVER_AUTH,),
) -> Identity:
    """A custodian server certificate: SAN custodian.drm.test and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName(CUSTODIAN_DNS), x509.IPAddress(ipaddress.ip_address(HOST))]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "drm-test-custodian")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    return Identity(builder.sign(ca.key, hashes.SHA256()), key)


@pytest.fixture(scope="session")
def custodian(custodian_ca: Identity) -> Identity:
    return _custodian_leaf(custodian_ca)


# --- a one-connection loopback server --------------------------------------------------


@dataclass
class ServerSide:
    """What the server saw: its handshake error, or the proof and the bytes it received."""

    error: BaseException | None = None
    identity: object = None
    received: bytes = b""
    handshaken: bool = False


async def _serve_one(listener: trio.SocketListener, ctx: SSL.Context, seen: ServerSide) -> None:
    tcp = await listener.accept()
    try:
        stream = await accept_tls(tcp, ctx, handshake_timeout=TIMEOUT)
    except (PeerVerificationError, trio.BrokenResourceError) as exc:
        seen.error = exc
        return
    seen.handshaken = True
    seen.identity = stream.peer_identity
    async with stream:
        try:
            while data := await stream.receive_some():
                seen.received += data
                await stream.send_all(data.upper())
        except trio.BrokenResourceError as exc:
            seen.error = exc


async def _run(server_ctx: SSL.Context, client: Callable[[int], Awaitable[None]]) -> ServerSide:
    """Serve one connection with ``server_ctx`` while ``client(port)`` runs; both finish."""
    seen = ServerSide()
    with trio.fail_after(TIMEOUT):
        listener = (await trio.open_tcp_listeners(0, host=HOST))[0]
        port = listener.socket.getsockname()[1]
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(_serve_one, listener, server_ctx, seen)
            await client(port)
    return seen


async def _connect(ctx: SSL.Context, port: int) -> TLSStream:
    return await open_tls_client(HOST, port, ctx, handshake_timeout=TIMEOUT)


async def _ping(stream: TLSStream) -> bytes:
    async with stream:
        await stream.send_all(b"ping")
        return await stream.receive_some()


async def _refused_by_server(stream: TLSStream) -> BaseException:
    """TLS 1.3: a client the server refuses finishes its handshake, then reads the alert."""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):  # the server may be gone already
            await stream.send_all(b"secret")  # never decrypted: its handshake failed
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.receive_some()
    return info.value


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- consumer <-> enclave ---------------------------------------------------------------


async def test_consumer_verifies_enclave_and_data_flows(
    enclave: RatlsCredentials, policy: Policy
) -> None:
    proofs: list[VerifiedEnclave] = []

    async def consumer(port: int) -> None:
        stream = await _connect(consumer_client_context(policy), port)
        proofs.append(stream.peer_identity_as(VerifiedEnclave))
        assert await _ping(stream) == b"PING"

    seen = await _run(enclave_server_context(enclave), consumer)
    [proof] = proofs
    assert proof.mr_enclave == MR_ENCLAVE
    assert proof.mr_signer == MR_SIGNER
    assert proof.simulated
    assert not proof.debug
    assert proof.public_key_spki == _spki(enclave.certificate)
    assert seen.received == b"ping"
    assert seen.identity is None  # the enclave asks consumers for no certificate
    assert seen.error is None


def _refusing_policy(case: str, policy: Policy) -> Policy:
    if case == "other-mrenclave":
        return replace(policy, mr_enclave=(OTHER_MR_ENCLAVE,))
    if case == "untrusted-simulation":
        return replace(policy, simulation_root=None, simulation_root_path=None)
    return policy  # "debug": the policy is fine, the enclave is not


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("other-mrenclave", MeasurementMismatchError),
        ("untrusted-simulation", UntrustedRootError),
        ("debug", DebugEnclaveError),
    ],
)
async def test_consumer_refuses_enclave(
    case: str,
    expected: type[AttestationError],
    platform: SimulatedPlatform,
    enclave: RatlsCredentials,
    policy: Policy,
) -> None:
    served = _enclave(platform, debug=True) if case == "debug" else enclave
    consumer_policy = _refusing_policy(case, policy)

    async def consumer(port: int) -> None:
        with pytest.raises(PeerVerificationError) as info:
            await _connect(consumer_client_context(consumer_policy), port)
        assert type(info.value.__cause__) is expected

    seen = await _run(enclave_server_context(served), consumer)
    assert not seen.handshaken
    assert isinstance(seen.error, trio.BrokenResourceError)  # the consumer's alert
    assert seen.received == b""


# --- enclave -> custodian ---------------------------------------------------------------


@pytest.mark.parametrize("name", [None, CUSTODIAN_DNS, "CUSTODIAN.drm.test.", HOST])
async def test_enclave_and_custodian_verify_each_other(
    name: str | None,
    enclave: RatlsCredentials,
    policy: Policy,
    custodian_ca: Identity,
    custodian: Identity,
) -> None:
    proofs: list[VerifiedCustodian] = []

    async def dial(port: int) -> None:
        ctx = enclave_client_context(enclave, custodian_ca.cert, custodian_name=name)
        stream = await _connect(ctx, port)
        proofs.append(stream.peer_identity_as(VerifiedCustodian))
        assert await _ping(stream) == b"PING"

    server_ctx = custodian_server_context(custodian.cert, custodian.key, policy)
    seen = await _run(server_ctx, dial)
    assert seen.error is None
    assert seen.received == b"ping"
    assert isinstance(seen.identity, VerifiedEnclave)
    assert seen.identity.mr_enclave == MR_ENCLAVE
    assert seen.identity.public_key_spki == _spki(enclave.certificate)  # this instance
    [proof] = proofs
    assert proof.certificate == custodian.cert
    assert proof.name == name


async def test_custodian_refuses_unknown_enclave(
    platform: SimulatedPlatform, policy: Policy, custodian_ca: Identity, custodian: Identity
) -> None:
    stranger = _enclave(platform, OTHER_MR_ENCLAVE)

    async def dial(port: int) -> None:
        stream = await _connect(enclave_client_context(stranger, custodian_ca.cert), port)
        assert isinstance(stream.peer_identity, VerifiedCustodian)  # it trusted the custodian
        await _refused_by_server(stream)

    seen = await _run(custodian_server_context(custodian.cert, custodian.key, policy), dial)
    assert not seen.handshaken
    assert isinstance(seen.error, PeerVerificationError)
    assert type(seen.error.__cause__) is MeasurementMismatchError
    assert seen.received == b""


async def test_custodian_refuses_client_without_certificate(
    policy: Policy, custodian_ca: Identity, custodian: Identity
) -> None:
    async def anonymous(port: int) -> None:
        stream = await _connect(client_context(ca_certificates=[custodian_ca.cert]), port)
        error = await _refused_by_server(stream)
        assert "certificate required" in str(error)

    seen = await _run(custodian_server_context(custodian.cert, custodian.key, policy), anonymous)
    assert not seen.handshaken
    assert isinstance(seen.error, trio.BrokenResourceError)
    assert "did not return a certificate" in str(seen.error)
    assert seen.received == b""


@dataclass
class RecordingVerifier:
    """An impostor custodian's client-certificate hook: records what it was shown."""

    shown: list[bytes]

    def __call__(self, der: bytes) -> object:
        self.shown.append(der)
        return der


@pytest.mark.parametrize("case", ["other-ca", "no-server-auth", "no-eku", "wrong-name"])
async def test_enclave_refuses_impostor_custodian(
    case: str, enclave: RatlsCredentials, custodian_ca: Identity
) -> None:
    other_ca = make_ca("not-the-custodian-ca")
    if case == "other-ca":
        impostor = _custodian_leaf(other_ca)
    elif case == "no-server-auth":  # e.g. a client certificate from the custodian CA
        impostor = _custodian_leaf(custodian_ca, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    elif case == "no-eku":
        impostor = _custodian_leaf(custodian_ca, usages=None)
    else:
        impostor = _custodian_leaf(custodian_ca)
    name = "elsewhere.drm.test" if case == "wrong-name" else CUSTODIAN_DNS
    recorder = RecordingVerifier([])
    impostor_ctx = server_context(
        certificate=impostor.cert,
        private_key=impostor.key,
        verifier=recorder,
        require_client_certificate=True,
    )

    async def dial(port: int) -> None:
        ctx = enclave_client_context(enclave, custodian_ca.cert, custodian_name=name)
        with pytest.raises((PeerVerificationError, trio.BrokenResourceError)) as info:
            await _connect(ctx, port)
        if case in ("no-eku", "wrong-name"):
            assert isinstance(info.value, PeerVerificationError)
            assert type(info.value.__cause__) is CustodianCertificateError
        else:  # refused by OpenSSL itself: no chain to the pin, or the ssl_server purpose
            assert type(info.value) is trio.BrokenResourceError
            # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY (20), X509_V_ERR_INVALID_PURPOSE (26)
            errno = 20 if case == "other-ca" else 26
            assert f"X509 verify error {errno} at depth 0" in str(info.value)

    seen = await _run(impostor_ctx, dial)
    assert not seen.handshaken
    assert recorder.shown == []  # the enclave refused before sending even its certificate
    assert seen.received == b""


# --- caches -------------------------------------------------------------------------------


async def test_second_handshakes_reuse_verification(
    platform: SimulatedPlatform, enclave: RatlsCredentials, policy: Policy
) -> None:
    clear_chain_cache()
    VERIFICATION_CACHE.clear()

    async def consumer(port: int) -> None:
        stream = await _connect(consumer_client_context(policy), port)
        assert await _ping(stream) == b"PING"

    async def handshake(creds: RatlsCredentials) -> tuple[int, int, int, int]:
        await _run(enclave_server_context(creds), consumer)
        chain = _pck.CHAIN_CACHE
        return chain.hits, chain.misses, VERIFICATION_CACHE.hits, VERIFICATION_CACHE.misses

    # First contact: one chain verification (the second quote carries the same chain).
    assert await handshake(enclave) == (1, 1, 0, 1)
    # The same enclave reconnects: nothing is parsed or verified again.
    assert await handshake(enclave) == (1, 1, 1, 1)
    # A restarted enclave on the same platform (new key, new certificate): the certificate
    # is new, but its PCK chain is not re-verified.
    assert await handshake(_enclave(platform)) == (3, 1, 1, 2)


# --- factory arguments -----------------------------------------------------------------


def test_factories_refuse_misconfiguration(
    enclave: RatlsCredentials, custodian_ca: Identity, custodian: Identity
) -> None:
    with pytest.raises(ValueError, match="not a CA"):
        enclave_client_context(enclave, custodian.cert)  # the leaf pinned by mistake
    for bad in ("", "*.drm.test", "a..b"):
        with pytest.raises(ValueError, match="host name"):
            enclave_client_context(enclave, custodian_ca.cert, custodian_name=bad)
    plain = RatlsCredentials(custodian.key, custodian.cert)
    with pytest.raises(CertificateFormatError):
        enclave_server_context(plain)
    with pytest.raises(CertificateFormatError):
        enclave_client_context(plain, custodian_ca.cert)


def test_verified_custodian_has_no_public_constructor(custodian: Identity) -> None:
    with pytest.raises(TypeError):
        VerifiedCustodian(custodian.cert, None, object())


# --- collateral from a PCCS, for enclaves that staple none ------------------------------


async def test_custodian_fetches_collateral_on_first_sight_then_accepts(
    platform: SimulatedPlatform,
    custodian_ca: Identity,
    custodian: Identity,
    tmp_path: pathlib.Path,
) -> None:
    # A production policy for the simulation root: UpToDate only, no unknown status.
    strict = replace(simulation_policy(platform, MR_ENCLAVE), accept_unknown_tcb_status=False)
    enclave = _enclave(platform)  # staples nothing
    bundle = json.loads(platform.collateral())
    async with (
        running_pccs(tmp_path, PccsBehaviour(bundle=bundle)) as pccs,
        PccsClient(pccs.url, ca=pccs.ca_path) as client,
        trio.open_nursery() as nursery,
    ):

        async def fetch(fmspc: bytes, ca: CaType) -> Collateral:
            return await client.fetch(fmspc, ca=ca)

        cache = CollateralCache(fetch)
        await nursery.start(cache.run)
        server_ctx = custodian_server_context(
            custodian.cert, custodian.key, strict, collateral=cache
        )

        async def dial_refused(port: int) -> None:
            stream = await _connect(enclave_client_context(enclave, custodian_ca.cert), port)
            await _refused_by_server(stream)

        seen = await _run(server_ctx, dial_refused)
        assert isinstance(seen.error, PeerVerificationError)
        assert type(seen.error.__cause__) is TcbStatusError  # unknown: noted for fetching
        with trio.fail_after(TIMEOUT):
            await cache.wait_for(b"SIMFMS")

        async def dial(port: int) -> None:
            assert (
                await _ping(
                    await _connect(enclave_client_context(enclave, custodian_ca.cert), port)
                )
                == b"PING"
            )

        seen = await _run(server_ctx, dial)
        assert seen.error is None
        assert isinstance(seen.identity, VerifiedEnclave)
        assert seen.identity.tcb_status is TcbStatus.UP_TO_DATE
        nursery.cancel_scope.cancel()
