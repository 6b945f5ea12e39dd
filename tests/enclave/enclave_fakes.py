"""A fake custodian and a fake consumer for driving the real enclave daemon in-process.

Both are built from ``drm_wire`` pieces only (TLS contexts, ``open_channel``, messages),
over loopback sockets. The fake custodian accepts one enclave session at a time and hands
each to the test as a :class:`FakeSession` that the test drives message by message; it
sends heartbeats on its own unless told to fall silent.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import inspect
import ipaddress
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from drm_enclave.custodian_link import LinkTiming
from drm_enclave.identity import License
from drm_enclave.runtime import EnclaveRuntime
from drm_enclave.serve import EnclaveConfig, serve
from drm_lab.models import tiny_model
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.measurement import simulated_mr_enclave, simulated_mr_signer
from drm_wire.attestation.policy import Policy
from drm_wire.errors import PeerError
from drm_wire.limits import MODEL_CHUNK_BYTES
from drm_wire.messages import (
    Block,
    BlockAck,
    Demand,
    EnclaveState,
    Grant,
    Heartbeat,
    Hello,
    InferenceRequest,
    InferenceResult,
    Message,
    ModelBegin,
    ModelChunk,
    ModelEnd,
    ModelInfo,
    ModelInfoRequest,
    ModelLoaded,
    PeerRole,
    Unblock,
    UsageAck,
    Waiting,
)
from drm_wire.model.terms import Terms
from drm_wire.net.channel import MessageChannel, open_channel
from drm_wire.net.ratls_context import consumer_client_context, custodian_server_context
from drm_wire.net.request_channel import RequestChannel, open_request_channel
from drm_wire.net.tls import accept_tls, open_tls_client
from drm_wire.protocol import Link, Side
from drm_wire.tensors import Tensor

HOST = "127.0.0.1"
#: Generous bound on any single wait in these tests; only a bug reaches it.
TIMEOUT = 15.0
#: Short link timings, so that kill-switch and redial tests take well under a second, yet
#: a custodian heartbeating every 0.1 s is never declared dead on a busy test machine.
FAST_TIMING = LinkTiming(
    heartbeat_interval=0.1, heartbeat_misses=6, backoff_initial=0.01, backoff_max=0.05
)
LICENSE = License("acme", "lic_" + "ab" * 16, "s3cret-value-never-logged")


def write_license(path: Path) -> Path:
    """Write :data:`LICENSE` as the license file ``drm_custodian init`` hands out."""
    doc = {
        "format": "drm-license",
        "version": 1,
        "borrower": LICENSE.borrower,
        "license_id": LICENSE.license_id,
        "secret": LICENSE.secret,
    }
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


M = TypeVar("M", bound=Message)


# --- PKI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A custodian CA and a serverAuth certificate it issued for 127.0.0.1."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    server_cert: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)


def make_pki(name: str = "fake custodian CA") -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "custodian")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return Pki(ca_cert, ca_key, cert, key)


def enclave_policy(pki: Pki, platform: SimulatedPlatform) -> Policy:
    """What the fake custodian and the fake consumer accept: this build, simulated."""
    return Policy(
        mr_enclave=(simulated_mr_enclave(custodian_ca=pki.ca_pem),),
        mr_signer=simulated_mr_signer(),
        isv_prod_id=0,
        accept_unknown_tcb_status=True,
        simulation_root=platform.root_certificate,
    )


def enclave_config(pki: Pki, port: int, sim_dir: Path | None, **overrides: object) -> EnclaveConfig:
    values: dict[str, object] = {
        "custodian_host": HOST,
        "custodian_port": port,
        "custodian_ca_pem": pki.ca_pem,
        "license": LICENSE,
        "listen_host": HOST,
        "listen_port": 0,
        "attestation": "simulated",
        "simulation_dir": sim_dir,
        "timing": FAST_TIMING,
    }
    values.update(overrides)
    return EnclaveConfig(**values)  # type: ignore[arg-type]


# --- the fake custodian ------------------------------------------------------------------


@dataclass
class FakeSession:
    """One enclave connection as the fake custodian sees it, driven by the test."""

    channel: MessageChannel
    hello: Hello
    heartbeats: bool = True
    closed: trio.Event = field(default_factory=trio.Event)
    grant_ids: int = 0
    block_ids: int = 0
    #: Demands and block acknowledgements received while waiting for something else
    #: (version 4: they come whenever requests park or a block holds).
    demands: list[Demand] = field(default_factory=list)
    block_acks: list[BlockAck] = field(default_factory=list)

    async def next(self, kind: type[M]) -> M:
        """The next message that is not a heartbeat; it must be a ``kind``. Demands and
        block acknowledgements on the way are recorded, unless one is what is asked for."""
        with trio.fail_after(TIMEOUT):
            while True:
                message = await self.channel.receive()
                if isinstance(message, kind):
                    break
                if isinstance(message, Demand):
                    self.demands.append(message)
                elif isinstance(message, BlockAck):
                    self.block_acks.append(message)
                elif not isinstance(message, Heartbeat):
                    break
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    async def send_model(
        self,
        name: str,
        data: bytes,
        chunk: int = MODEL_CHUNK_BYTES,
        terms: Terms | None = None,
        *,
        begin: bool = True,
    ) -> None:
        """``model_begin`` (unless ``begin`` is false: already sent), chunks, ``model_end``."""
        digest = hashlib.sha256(data).digest()
        if begin:
            await self.channel.send(
                ModelBegin(name=name, size=len(data), sha256=digest, terms=terms or Terms())
            )
        view = memoryview(data)
        for offset in range(0, len(data), chunk):
            await self.channel.send(ModelChunk(offset=offset, data=view[offset : offset + chunk]))
        await self.channel.send(ModelEnd(name=name))

    async def grant(self, units: int, granted_total: int) -> None:
        self.grant_ids += 1
        await self.channel.send(
            Grant(grant_id=self.grant_ids, units=units, granted_total=granted_total)
        )

    async def ack(self, seq: int, served_total: int) -> None:
        await self.channel.send(UsageAck(seq=seq, served_total=served_total))

    async def block(self) -> None:
        self.block_ids += 1
        await self.channel.send(Block(block_id=self.block_ids, reason="test"))

    async def unblock(self) -> None:
        await self.channel.send(Unblock())

    def close(self) -> None:
        self.closed.set()


class FakeCustodian:
    """Listens for enclaves on loopback; each verified session goes to :meth:`session`."""

    def __init__(self, pki: Pki, policy: Policy, *, heartbeat_interval: float = 0.1) -> None:
        self.context = custodian_server_context(pki.server_cert, pki.server_key, policy)
        self.heartbeat_interval = heartbeat_interval
        self.port = 0
        self.handshake_failures = 0
        self.handshake_failed = trio.Event()
        self.hellos = 0
        self._send, self._sessions = trio.open_memory_channel[FakeSession](16)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def session(self) -> FakeSession:
        with trio.fail_after(TIMEOUT):
            return await self._sessions.receive()

    async def _handle(self, transport: trio.SocketStream) -> None:
        try:
            stream = await accept_tls(transport, self.context)
        except Exception:
            self.handshake_failures += 1
            self.handshake_failed.set()
            return
        async with open_channel(stream, Link.CUSTODIAN, Side.SERVER) as channel:
            try:
                hello = await channel.accept_hello(software="fake-custodian")
            except Exception:
                return
            self.hellos += 1
            session = FakeSession(channel, hello)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, session)
                await self._send.send(session)
                await session.closed.wait()
                nursery.cancel_scope.cancel()

    async def _heartbeats(self, session: FakeSession) -> None:
        seq = 0
        try:
            while True:
                if session.heartbeats:
                    await session.channel.send(Heartbeat(seq=seq))
                    seq += 1
                await trio.sleep(self.heartbeat_interval)
        except Exception:
            return  # the session ended


# --- the fake consumer -------------------------------------------------------------------


def tiny_input(rows: int = 1) -> tuple[Tensor, ...]:
    array = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    return (Tensor.from_numpy("x", array),)


class FakeConsumer:
    """A consumer connection: RA-TLS against the policy, hello, then requests."""

    def __init__(self, channel: RequestChannel) -> None:
        self.channel = channel

    async def info(self) -> ModelInfo:
        with trio.fail_after(TIMEOUT):
            return await self.channel.request(
                ModelInfoRequest(request_id=self.channel.next_request_id())
            )

    async def infer(
        self,
        inputs: tuple[Tensor, ...] | None = None,
        *,
        model: str = "tiny",
        wait: float | None = 0.0,
        waiting: list[Waiting] | None = None,
        parked: trio.Event | None = None,
    ) -> InferenceResult:
        def on_waiting(message: Waiting) -> None:
            if waiting is not None:
                waiting.append(message)
            if parked is not None:
                parked.set()

        request = InferenceRequest(
            request_id=self.channel.next_request_id(),
            model=model,
            inputs=tiny_input() if inputs is None else inputs,
            wait=wait,
        )
        with trio.fail_after(TIMEOUT):
            return await self.channel.request(request, on_waiting=on_waiting)


async def fail_a_parked_request(consumer: FakeConsumer, action: Callable[[], object]) -> PeerError:
    """Park one request, run ``action`` (sync or async), and return the error it gets."""
    parked = trio.Event()
    errors: list[PeerError] = []

    async def parked_request() -> None:
        try:
            await consumer.infer(wait=None, parked=parked)
        except PeerError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked_request)
        with trio.fail_after(TIMEOUT):
            await parked.wait()
        result = action()
        if inspect.isawaitable(result):
            await result
    (error,) = errors
    return error


@asynccontextmanager
async def consumer(
    address: tuple[str, int], policy: Policy, *, local_address: str | None = None
) -> AsyncIterator[FakeConsumer]:
    stream = await open_tls_client(
        address[0], address[1], consumer_client_context(policy), local_address=local_address
    )
    async with open_request_channel(stream, Link.CONSUMER, Side.CLIENT) as channel:
        await channel.hello(role=PeerRole.CONSUMER, software="fake-consumer")
        yield FakeConsumer(channel)


# --- the whole rig -----------------------------------------------------------------------


@functools.cache
def shared_pki() -> Pki:
    """One custodian PKI per test process (key generation is the slow part)."""
    return make_pki()


@dataclass
class Rig:
    """A fake custodian, the real enclave daemon (``serve``) linked to it, and helpers."""

    custodian: FakeCustodian
    runtime: EnclaveRuntime
    address: tuple[str, int]
    policy: Policy
    nursery: trio.Nursery

    async def link(
        self, *, granted_total: int = 0, model: bytes | None = None, terms: Terms | None = None
    ) -> FakeSession:
        """Accept the enclave's next session, deliver the model (under ``terms``), re-sync,
        wait for serving."""
        session = await self.custodian.session()
        data = tiny_model() if model is None else model
        await session.send_model("tiny", data, terms=terms)
        loaded = await session.next(ModelLoaded)
        assert loaded.name == "tiny"
        assert loaded.sha256 == hashlib.sha256(data).digest()
        if granted_total:
            await session.grant(granted_total, granted_total)
        else:
            await session.unblock()  # the re-sync marker when nothing was granted yet
        await self.wait_state(EnclaveState.SERVING)
        return session

    async def wait_state(self, state: EnclaveState) -> None:
        with trio.fail_after(TIMEOUT):
            await self.runtime.wait_for(lambda runtime: runtime.state is state)

    def consumer(
        self, *, local_address: str | None = None
    ) -> AbstractAsyncContextManager[FakeConsumer]:
        """A consumer connection, from ``local_address`` (another loopback address is
        another client to the enclave's fairness between clients)."""
        return consumer(self.address, self.policy, local_address=local_address)


@asynccontextmanager
async def running_enclave(
    tmp_path: Path, *, custodian_pki: Pki | None = None, **overrides: object
) -> AsyncIterator[Rig]:
    """Start the fake custodian and ``serve()``; stop both on exit."""
    pki = shared_pki()
    sim_dir = tmp_path / "sim"
    platform = SimulatedPlatform.create(sim_dir)
    policy = enclave_policy(pki, platform)
    custodian = FakeCustodian(custodian_pki or pki, policy)
    runtime = EnclaveRuntime()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(custodian.serve)
        config = enclave_config(pki, port, sim_dir, **overrides)
        address = await nursery.start(functools.partial(serve, config, runtime=runtime))
        yield Rig(custodian, runtime, address, policy, nursery)
        nursery.cancel_scope.cancel()
