"""The enclave link, custodian side: a real ``serve()`` on loopback and a fake enclave.

The fake enclave is made of the same drm_wire pieces the real one uses: a simulated SGX
platform, an RA-TLS certificate from ``make_enclave_identity('simulated')``, the
``enclave_client_context`` pinning the custodian CA, ``open_channel`` and ``hello`` with
the license from the custodian's ``init``. Waits are bounded by ``TIMEOUT``; the heartbeat
test shortens the custodian's heartbeat instead of sleeping. The last test gives the
per-connection boundary's log of a link's end the exceptions a session's tasks raise,
with no link at all.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from drm_custodian import enclave_link
from drm_custodian.admin_client import AdminClient
from drm_custodian.ledger import Balance, Ledger
from drm_custodian.models import ModelFile
from drm_custodian.serve import BoundAddresses, ServeConfig, serve
from drm_custodian.session import SessionConfig
from drm_custodian.state import CustodianState, init_state_dir, load_state_dir
from drm_lab.models import CANARY, big_model, canary_model, tiny_model, two_input_model
from drm_wire.attestation.gramine import SimulatedEnclave, make_enclave_identity
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.ratls_cert import RatlsCredentials
from drm_wire.errors import ConfigError, ErrorCode, PeerError, RemoteProtocolError
from drm_wire.framing import encode_frame
from drm_wire.limits import MODEL_CHUNK_BYTES
from drm_wire.messages import (
    Block,
    Grant,
    Heartbeat,
    HeldModel,
    LoadFailure,
    Message,
    ModelBegin,
    ModelChunk,
    ModelEnd,
    ModelKeep,
    ModelLoaded,
    ModelLoadFailed,
    PeerRole,
    Recall,
    Returned,
    Unblock,
    UsageAck,
    UsageReport,
    terms_digest,
)
from drm_wire.net.channel import (
    ChannelBroken,
    ChannelClosed,
    ChannelError,
    MessageChannel,
    open_channel,
)
from drm_wire.net.ratls_context import enclave_client_context
from drm_wire.net.tls import client_context, open_tls_client
from drm_wire.protocol import Link, Side
from tests.simulation import simulation_policy

MR_ENCLAVE = hashlib.sha256(b"drm custodian session tests: enclave").digest()
OTHER_MR_ENCLAVE = hashlib.sha256(b"a modified enclave").digest()
MR_SIGNER = hashlib.sha256(b"drm custodian session tests: signer").digest()
#: Generous for loopback; only a bug waits this long.
TIMEOUT = 10.0
BORROWER = "borrower"

M = TypeVar("M", bound=Message)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("sim") / "platform")


def _credentials(platform: SimulatedPlatform, mr_enclave: bytes = MR_ENCLAVE) -> RatlsCredentials:
    simulation = SimulatedEnclave(platform, mr_enclave=mr_enclave, mr_signer=MR_SIGNER)
    return make_enclave_identity("simulated", simulation=simulation)


@pytest.fixture(scope="module")
def credentials(platform: SimulatedPlatform) -> RatlsCredentials:
    return _credentials(platform)


@pytest.fixture(scope="module")
def policy(platform: SimulatedPlatform) -> Policy:
    return simulation_policy(platform, MR_ENCLAVE)


@pytest.fixture(scope="module")
def models() -> tuple[ModelFile, ...]:
    return (
        ModelFile.from_bytes("tiny", tiny_model()),
        ModelFile.from_bytes("two_input", two_input_model()),
    )


@dataclass
class Custodian:
    """A running ``serve()`` and what a test needs to talk to it."""

    bound: BoundAddresses
    state: CustodianState
    license: str
    ledger: Ledger  # a second connection to the daemon's ledger file, for reading
    credentials: RatlsCredentials
    models: Sequence[ModelFile]
    stop: trio.Event  # the shutdown trigger: what SIGTERM sets in the daemon
    stopped: trio.Event

    @property
    def admin(self) -> AdminClient:
        return AdminClient.from_state(self.state, port=self.bound.admin[1])

    async def admin_call(self, call: Callable[[AdminClient], Any]) -> Any:
        return await trio.to_thread.run_sync(call, self.admin)

    async def balance(self) -> Balance:
        return await self.ledger.balance(BORROWER)

    @asynccontextmanager
    async def link(
        self,
        *,
        instance_id: str | None = None,
        license: str | None = None,
        credentials: RatlsCredentials | None = None,
        heartbeat: bool = True,
        held: tuple[HeldModel, ...] | None = (),
    ) -> AsyncIterator[MessageChannel]:
        """A fake enclave's link: TLS with RA-TLS, hello, and heartbeats every 0.2 s.

        ``license=""`` sends a hello without any license; ``held`` is what the hello says
        the enclave holds.
        """
        context = enclave_client_context(credentials or self.credentials, self.state.ca_cert)
        stream = await open_tls_client("127.0.0.1", self.bound.enclave[1], context)
        async with open_channel(stream, Link.CUSTODIAN, Side.CLIENT) as channel:
            await channel.hello(
                role=PeerRole.ENCLAVE,
                software="fake-enclave/0",
                license=self.license if license is None else (license or None),
                instance_id=instance_id or secrets.token_hex(16),
                held=held,
            )
            async with trio.open_nursery() as nursery:
                if heartbeat:
                    nursery.start_soon(_beat, channel)
                yield channel
                nursery.cancel_scope.cancel()


async def _beat(channel: MessageChannel) -> None:
    seq = 0
    while True:
        seq += 1
        try:
            await channel.send(Heartbeat(seq=seq))
        except (ChannelError, PeerError):
            return
        await trio.sleep(0.2)


CustodianFactory = Callable[..., Any]


@pytest.fixture
async def start_custodian(
    tmp_path: Path,
    nursery: trio.Nursery,
    credentials: RatlsCredentials,
    policy: Policy,
    models: tuple[ModelFile, ...],
) -> AsyncIterator[CustodianFactory]:
    made = await init_state_dir(tmp_path / "state", borrower=BORROWER)
    state = load_state_dir(made.path)
    handoff = json.loads(made.license_path.read_text())
    license = f"{handoff['license_id']}:{handoff['secret']}"
    ledgers: list[Ledger] = []
    started: list[Custodian] = []

    async def start(
        *,
        initial_inferences: int = 0,
        session: SessionConfig | None = None,
        models: Sequence[ModelFile] = models,
        link_frame_timeout: float = 30.0,
        max_instances: int = 1,
    ) -> Custodian:
        licensed = replace(
            state,
            licenses={
                key: replace(record, max_instances=max_instances)
                for key, record in state.licenses.items()
            },
        )
        config = ServeConfig(
            state=licensed,
            models=models,
            policy=policy,
            port=0,
            admin_port=0,
            initial_inferences=initial_inferences,
            session=session or SessionConfig(),
            link_frame_timeout=link_frame_timeout,
        )
        stop, stopped = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[BoundAddresses]) -> None:
            try:
                await serve(config, shutdown_trigger=stop.wait, task_status=task_status)
            finally:
                stopped.set()

        bound: BoundAddresses = await nursery.start(run)
        ledger = await Ledger.open(state.ledger_path)
        ledgers.append(ledger)
        custodian = Custodian(bound, state, license, ledger, credentials, models, stop, stopped)
        started.append(custodian)
        return custodian

    yield start
    for custodian in started:
        custodian.stop.set()
        with trio.fail_after(TIMEOUT):
            await custodian.stopped.wait()
    for ledger in ledgers:
        await ledger.aclose()


# --- the fake enclave's side of the protocol --------------------------------------------------


async def receive(channel: MessageChannel, kind: type[M]) -> M:
    """The next message that is not a heartbeat; it must be a ``kind``."""
    with trio.fail_after(TIMEOUT):
        while True:
            message = await channel.receive()
            if not isinstance(message, Heartbeat):
                assert isinstance(message, kind), message
                return message


async def take_model(channel: MessageChannel) -> tuple[ModelBegin, bytes, int]:
    """Receive one model transfer; return its begin, bytes and chunk count (no answer)."""
    begin = await receive(channel, ModelBegin)
    data = bytearray()
    chunks = 0
    while True:
        message = await receive(channel, Message)
        if isinstance(message, ModelEnd):
            assert message.name == begin.name
            return begin, bytes(data), chunks
        assert isinstance(message, ModelChunk)
        assert message.offset == len(data)
        data += message.data
        chunks += 1


async def load_models(channel: MessageChannel, count: int) -> list[tuple[str, bytes]]:
    """Receive ``count`` models, checking each, and answer ``model_loaded`` for each."""
    received = []
    for _ in range(count):
        begin, data, _chunks = await take_model(channel)
        assert len(data) == begin.size
        assert hashlib.sha256(data).digest() == begin.sha256
        await channel.send(ModelLoaded(name=begin.name, sha256=begin.sha256))
        received.append((begin.name, data))
    return received


async def drain(channel: MessageChannel) -> None:
    """Take messages until the channel ends (bounded by ``TIMEOUT``)."""
    with trio.fail_after(TIMEOUT):
        while True:
            await channel.receive()


async def report(channel: MessageChannel, seq: int, served_total: int) -> UsageAck:
    await channel.send(UsageReport(seq=seq, served_total=served_total))
    return await receive(channel, UsageAck)


# --- tests ---------------------------------------------------------------------------------


async def test_models_delivered_in_order_then_the_initial_supply_is_granted(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    async with custodian.link() as channel:
        received = await load_models(channel, 2)
        assert received == [(m.name, m.data) for m in custodian.models]
        grant = await receive(channel, Grant)
        assert (grant.units, grant.granted_total) == (5, 5)
    assert (await custodian.balance()).granted == 5


async def test_a_large_model_goes_in_chunks_and_its_bytes_are_never_logged(
    start_custodian: CustodianFactory,
) -> None:
    big = ModelFile.from_bytes("big", big_model(mb=9))
    canary = ModelFile.from_bytes("canary", canary_model())
    custodian = await start_custodian(models=(canary, big))
    with capture_logs() as logs:
        async with custodian.link() as channel:
            begin, data, chunks = await take_model(channel)
            await channel.send(ModelLoaded(name=begin.name, sha256=begin.sha256))
            assert data == canary.data
            begin, data, chunks = await take_model(channel)
            await channel.send(ModelLoaded(name=begin.name, sha256=begin.sha256))
            assert data == big.data
            assert chunks == -(-len(big.data) // MODEL_CHUNK_BYTES) >= 3
            await receive_until_quiet(channel)
    progress = [e["percent"] for e in logs if e["event"] == "model_transfer_progress"]
    assert progress
    assert progress[-1] == 100
    assert [e["model"] for e in logs if e["event"] == "model_delivered"] == ["canary", "big"]
    text = repr(logs)
    assert CANARY.hex() not in text
    assert repr(CANARY)[2:-1] not in text


async def receive_until_quiet(channel: MessageChannel, quiet: float = 0.3) -> list[Message]:
    """Whatever non-heartbeat messages arrive until none has for ``quiet`` seconds."""
    got: list[Message] = []
    while True:
        with trio.move_on_after(quiet) as scope:
            message = await channel.receive()
        if scope.cancelled_caught:
            return got
        if not isinstance(message, Heartbeat):
            got.append(message)


async def test_nothing_follows_a_model_until_model_loaded(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    async with custodian.link() as channel:
        begin, _, _ = await take_model(channel)
        assert await receive_until_quiet(channel) == []  # no next model, no grant yet
        await channel.send(ModelLoaded(name=begin.name, sha256=begin.sha256))
        await load_models(channel, 1)
        assert isinstance(await receive(channel, Grant), Grant)


async def test_a_wrong_digest_closes_that_link_and_the_daemon_lives_on(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    with capture_logs() as logs:
        async with custodian.link() as channel:
            begin, _, _ = await take_model(channel)
            await channel.send(ModelLoaded(name=begin.name, sha256=bytes(32)))
            with pytest.raises(PeerError) as caught:
                await receive(channel, Grant)
            assert caught.value.code is ErrorCode.PROTOCOL_ERROR
    assert any(e["event"] == "model_loaded_mismatch" for e in logs)
    async with custodian.link() as channel:  # the next enclave is served as usual
        await load_models(channel, 2)
        assert (await receive(channel, Grant)).granted_total == 5


async def test_supply_through_the_admin_api_pushes_a_grant(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian()
    async with custodian.link() as channel:
        await load_models(channel, 2)
        # Nothing supplied, no grant to re-send: unblock is the enclave's signal to serve
        # (parking requests until a grant comes).
        assert await receive_until_quiet(channel) == [Unblock()]
        with capture_logs() as logs:
            doc = await custodian.admin_call(lambda admin: admin.supply(7))
        # The grant was committed with the supply (one transaction): the answer shows it.
        assert (doc["instances"], doc["granted"], doc["remaining"]) == (1, 7, 0)
        assert [e["granted_now"] for e in logs if e["event"] == "admin_supply"] == [7]
        grant = await receive(channel, Grant)
        assert (grant.units, grant.granted_total) == (7, 7)
        assert await receive_until_quiet(channel) == []  # sent once


async def test_usage_is_recorded_acked_and_topped_up(start_custodian: CustodianFactory) -> None:
    custodian = await start_custodian(initial_inferences=100, session=SessionConfig(lease=10))
    with capture_logs() as logs:
        async with custodian.link() as channel:
            await load_models(channel, 2)
            assert (await receive(channel, Grant)).granted_total == 10
            ack = await report(channel, 1, 3)
            assert (ack.seq, ack.served_total) == (1, 3)
            assert (await custodian.balance()).served == 3
            assert await receive_until_quiet(channel) == []  # 7 outstanding: no top-up
            await report(channel, 2, 6)
            grant = await receive(channel, Grant)  # 4 outstanding < 5: up to a lease
            assert (grant.units, grant.granted_total) == (6, 16)
            replayed = await report(channel, 1, 3)  # a stale report changes nothing
            assert (replayed.seq, replayed.served_total) == (1, 3)
    balance = await custodian.balance()
    assert (balance.supplied, balance.granted, balance.served) == (100, 16, 6)
    lines = [e for e in logs if e["event"] == "consumption_report"]
    assert lines[1]["served"] == 6
    assert lines[1]["remaining"] == 94
    assert lines[1]["borrower"] == BORROWER
    assert len(lines[1]["instance"]) == 32


async def test_over_grant_is_flagged(start_custodian: CustodianFactory) -> None:
    custodian = await start_custodian(initial_inferences=2)
    with capture_logs() as logs:
        async with custodian.link() as channel:
            await load_models(channel, 2)
            await receive(channel, Grant)
            await report(channel, 1, 5)
    assert any(e["event"] == "enclave_over_grant" and e["log_level"] == "error" for e in logs)


async def test_a_second_instance_is_refused_and_the_first_keeps_serving(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    async with custodian.link() as first:
        await load_models(first, 2)
        await receive(first, Grant)
        async with custodian.link() as second:
            with pytest.raises(PeerError) as caught:
                await receive(second, ModelBegin)
            assert caught.value.code is ErrorCode.DUPLICATE_INSTANCE
        assert (await report(first, 1, 1)).served_total == 1


async def test_a_license_serves_its_cap_of_instances_from_one_shared_supply(
    start_custodian: CustodianFactory,
) -> None:
    """I23: three instances of one license share 10 units (leases of 4): 4 + 4 + 2, never
    more; a fourth is refused naming the cap; a supply tops up every live instance, in
    one transaction, no further than the supply; a block reaches each one."""
    custodian = await start_custodian(
        initial_inferences=10, session=SessionConfig(lease=4), max_instances=3
    )
    async with (
        custodian.link() as first,
        custodian.link() as second,
        custodian.link() as third,
    ):
        totals = []
        for channel in (first, second, third):  # each linked and synced before the next
            await load_models(channel, 2)
            totals.append((await receive(channel, Grant)).granted_total)
        assert totals == [4, 4, 2]
        assert (await custodian.balance()).remaining == 0
        with capture_logs() as logs:
            async with custodian.link() as fourth:
                with pytest.raises(PeerError) as caught:
                    await receive(fourth, ModelBegin)
        assert caught.value.code is ErrorCode.DUPLICATE_INSTANCE
        assert caught.value.detail == (
            "this license admits 3 live enclave instances and 3 are linked"
        )
        refused = [e for e in logs if e["event"] == "enclave_duplicate_instance"]
        assert [e["max_instances"] for e in refused] == [3]

        # All three serve what they hold (one that runs out while another holds units
        # has the custodian recall from that one: nothing idle, so nothing comes back);
        # then a supply of 5 is shared, and only 5 goes out.
        for channel, served in ((first, 4), (second, 4), (third, 2)):
            await channel.send(UsageReport(seq=1, served_total=served))
        for channel, served in ((first, 4), (second, 4), (third, 2)):
            for message in await receive_until_quiet(channel):
                if isinstance(message, Recall):
                    await channel.send(
                        Returned(
                            recall_id=message.recall_id,
                            returned_total=0,
                            served_total=served,
                            requests_total=served,
                            final=False,
                        )
                    )
                else:
                    assert message == UsageAck(seq=1, served_total=served), message
        assert (await custodian.balance()).returned == 0
        doc = await custodian.admin_call(lambda admin: admin.supply(5))
        assert (doc["supplied"], doc["granted"], doc["remaining"]) == (15, 15, 0)
        topped = [await receive_until_quiet(c) for c in (first, second, third)]
        units = [sum(m.units for m in got if isinstance(m, Grant)) for got in topped]
        assert sum(units) == 5, topped
        assert max(units) <= 4, topped
        balance = await custodian.balance()
        assert balance.served <= balance.granted <= balance.supplied == 15

        await custodian.admin_call(lambda admin: admin.block("audit"))
        for channel in (first, second, third):
            assert (await receive(channel, Block)).reason == "audit"
    assert (await custodian.balance()).granted == 15


async def test_the_same_instance_reconnecting_replaces_its_old_link_and_is_resynced(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    instance = secrets.token_hex(16)
    async with custodian.link(instance_id=instance) as old:
        await load_models(old, 2)
        assert (await receive(old, Grant)).granted_total == 5
        await report(old, 1, 2)
        async with custodian.link(instance_id=instance) as new:
            await load_models(new, 2)
            resync = await receive(new, Grant)  # the last grant again, nothing new
            assert (resync.units, resync.granted_total) == (5, 5)
            with pytest.raises(ChannelError):
                await receive(old, Grant)
    assert (await custodian.balance()).granted == 5


@pytest.mark.parametrize("presented", ["wrong", "lic_0123456789abcdef0123456789abcdef:x", ""])
async def test_a_bad_license_is_refused_uniformly(
    start_custodian: CustodianFactory, presented: str
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    if presented == "wrong":
        presented = custodian.license.partition(":")[0] + ":not-the-secret"
    async with custodian.link(license=presented) as channel:
        with pytest.raises(PeerError) as caught:
            await receive(channel, ModelBegin)
    assert caught.value.code is ErrorCode.ATTESTATION_FAILED
    assert caught.value.detail == "attestation failed"


async def test_a_bad_instance_id_is_refused(start_custodian: CustodianFactory) -> None:
    custodian = await start_custodian(initial_inferences=5)
    async with custodian.link(instance_id="not-hex") as channel:
        with pytest.raises(PeerError) as caught:
            await receive(channel, ModelBegin)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR


async def test_a_license_without_an_id_is_refused_and_not_logged(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    secret = custodian.license.partition(":")[2]
    with capture_logs() as logs:
        async with custodian.link(license=secret) as channel:
            with pytest.raises(PeerError) as caught:
                await receive(channel, ModelBegin)
    assert caught.value.code is ErrorCode.ATTESTATION_FAILED
    assert secret not in repr(logs)
    assert any(e.get("license_id") == "<malformed>" for e in logs)


async def test_a_client_without_a_certificate_fails_the_handshake(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    context = client_context(ca_certificates=[custodian.state.ca_cert])
    with capture_logs() as logs:
        stream = await open_tls_client("127.0.0.1", custodian.bound.enclave[1], context)
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(TIMEOUT):
            await stream.receive_some()
        await stream.aclose()
        async with custodian.link() as channel:  # the daemon serves the next one
            await load_models(channel, 2)
    assert any(e["event"] == "enclave_handshake_failed" for e in logs)


async def test_an_enclave_outside_the_policy_never_gets_a_model_byte(
    start_custodian: CustodianFactory, platform: SimulatedPlatform
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    modified = _credentials(platform, OTHER_MR_ENCLAVE)
    got: list[Message] = []
    with (
        capture_logs() as logs,
        pytest.raises((ChannelError, trio.BrokenResourceError, PeerError)),
    ):
        async with custodian.link(credentials=modified) as channel:
            got.extend(await receive_until_quiet(channel))
    assert got == []
    refused = [e for e in logs if e["event"] == "enclave_refused"]
    assert refused
    assert "MRENCLAVE" in refused[0]["reason"]
    assert refused[0]["fix"] == (
        "if this enclave should be served, the policy (serve --policy) must accept its "
        "measurement: `drm_enclave measure` on its build prints it"
    )
    assert not any(e["event"] == "model_transfer_started" for e in logs)


async def test_an_enclave_of_another_simulated_platform_is_refused_with_the_fix(
    start_custodian: CustodianFactory, tmp_path: Path
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    elsewhere = SimulatedPlatform.create(tmp_path / "elsewhere")
    with (
        capture_logs() as logs,
        pytest.raises((ChannelError, trio.BrokenResourceError, PeerError)),
    ):
        async with custodian.link(credentials=_credentials(elsewhere)) as channel:
            await receive_until_quiet(channel)
    (refused,) = [e for e in logs if e["event"] == "enclave_refused"]
    assert "untrusted root" in refused["reason"]
    assert refused["fix"].startswith(
        "its quote does not chain to a root the policy trusts: a real SGX quote needs "
        "Intel's root; a SIMULATED enclave's needs the policy's [simulation] root to be "
    )


async def test_a_silent_enclave_is_declared_dead(start_custodian: CustodianFactory) -> None:
    fast = SessionConfig(heartbeat_interval=0.05, heartbeat_misses=3)
    custodian = await start_custodian(initial_inferences=5, session=fast)
    with capture_logs() as logs:
        async with custodian.link(heartbeat=False) as channel:
            with pytest.raises(ChannelError):
                await drain(channel)  # the model comes, but we never say a word
    assert any(e["event"] == "enclave_link_dead" for e in logs)
    assert (await custodian.admin_call(lambda admin: admin.usage()))["instances"] == 0


async def test_the_custodian_sends_heartbeats(start_custodian: CustodianFactory) -> None:
    fast = SessionConfig(heartbeat_interval=0.05, heartbeat_misses=100)
    custodian = await start_custodian(initial_inferences=5, session=fast)
    async with custodian.link() as channel:
        beats = 0
        with trio.fail_after(TIMEOUT):
            while beats < 5:
                beats += isinstance(await channel.receive(), Heartbeat)


async def test_block_and_unblock_are_pushed(start_custodian: CustodianFactory) -> None:
    custodian = await start_custodian(initial_inferences=5)
    async with custodian.link() as channel:
        await load_models(channel, 2)
        await receive(channel, Grant)
        await custodian.admin_call(lambda admin: admin.block("maintenance"))
        assert (await receive(channel, Block)).reason == "maintenance"
        await custodian.admin_call(lambda admin: admin.supply(10))
        assert await receive_until_quiet(channel) == []  # blocked: no grant
        await custodian.admin_call(lambda admin: admin.unblock())
        assert isinstance(await receive(channel, Unblock), Unblock)
        assert (await receive(channel, Grant)).granted_total == 15


async def test_a_blocked_borrower_gets_block_after_the_models(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    await custodian.admin_call(lambda admin: admin.block(""))
    async with custodian.link() as channel:
        await load_models(channel, 2)
        block = await receive(channel, Block)
        assert block.reason  # a default reason when the operator gave none
        assert await receive_until_quiet(channel) == []
    assert (await custodian.balance()).granted == 0


async def test_shutdown_closes_the_links(start_custodian: CustodianFactory) -> None:
    custodian = await start_custodian(initial_inferences=5)
    with capture_logs() as logs:
        async with custodian.link() as channel:
            await load_models(channel, 2)
            await receive(channel, Grant)
            custodian.stop.set()  # what SIGTERM does in the daemon
            with pytest.raises(ChannelError):
                await receive(channel, Grant)
        with trio.fail_after(TIMEOUT):
            await custodian.stopped.wait()
    events = [e["event"] for e in logs]
    assert events.index("custodian_stopping") < events.index("custodian_stopped")


@pytest.mark.parametrize(
    ("error", "event"),
    [
        (ChannelClosed("the peer closed the connection"), "enclave_disconnected"),
        (
            ExceptionGroup(
                "two tasks saw the link go",
                [ChannelClosed("the peer closed"), ExceptionGroup("", [ChannelBroken("lost")])],
            ),
            "enclave_disconnected",
        ),
        (
            ExceptionGroup("", [ChannelClosed("the peer closed"), KeyError("a bug")]),
            "enclave_session_failed",
        ),
        (KeyError("a bug"), "enclave_session_failed"),
    ],
)
def test_how_a_session_end_is_logged(error: Exception, event: str) -> None:
    with capture_logs() as logs:
        try:
            raise error
        except Exception as exc:
            enclave_link._log_end(exc, lambda name: None)
    assert [entry["event"] for entry in logs] == [event]
    if event == "enclave_disconnected":
        assert logs[0]["reason"] == "ChannelClosed"


# --- version 3: load failures and transfer skip ---------------------------------------------


def _held(model: ModelFile, **changes: bytes) -> HeldModel:
    values = {"sha256": model.sha256, "terms_sha256": terms_digest(model.terms), **changes}
    return HeldModel(name=model.name, **values)


async def _metrics(custodian: Custodian) -> dict[tuple[str, str, str], float]:
    """``/metrics``' model samples: (sample name, model, outcome or "") -> value."""
    status, _, body = await custodian.admin_call(lambda admin: admin.request("GET", "/metrics"))
    assert status == 200
    return {
        (sample.name, sample.labels["model"], sample.labels.get("outcome", "")): sample.value
        for family in text_string_to_metric_families(bytes(body).decode())
        for sample in family.samples
        if "model" in sample.labels and not sample.name.endswith("_created")
    }


async def test_a_model_the_enclave_cannot_load_is_logged_and_the_others_follow(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    tiny, two_input = custodian.models
    instance = secrets.token_hex(16)
    with capture_logs() as logs:
        async with custodian.link(instance_id=instance) as channel:
            begin, _, _ = await take_model(channel)
            await channel.send(
                ModelLoadFailed(
                    name=begin.name,
                    sha256=begin.sha256,
                    code=LoadFailure.OUT_OF_MEMORY,
                    reason="out of memory while loading it",
                )
            )
            assert [name for name, _ in await load_models(channel, 1)] == [two_input.name]
            grant = await receive(channel, Grant)  # the link goes on to serve the others
            assert grant.granted_total == 5
    (failed,) = [e for e in logs if e["event"] == "model_load_failed"]
    assert failed["log_level"] == "error"
    assert (failed["model"], failed["instance"]) == (tiny.name, instance)
    assert (failed["code"], failed["reason"]) == ("out_of_memory", "out of memory while loading it")
    metrics = await _metrics(custodian)
    assert metrics[("drm_custodian_model_transfers_total", "tiny", "failed")] == 1
    assert metrics[("drm_custodian_model_transfers_total", "two_input", "loaded")] == 1
    assert metrics[("drm_custodian_model_bytes_sent_total", "tiny", "")] == len(tiny.data)


async def test_a_refusal_at_model_begin_ends_the_transfer_early(
    start_custodian: CustodianFactory,
) -> None:
    chunks = 16
    huge = ModelFile.from_bytes("huge", bytes(chunks * MODEL_CHUNK_BYTES))
    custodian = await start_custodian(initial_inferences=5, models=(huge,))
    with capture_logs() as logs:
        async with custodian.link() as channel:
            begin = await receive(channel, ModelBegin)
            # Refused before a single chunk is read: the custodian can only have put what
            # the socket buffers hold on its way.
            await channel.send(
                ModelLoadFailed(
                    name=begin.name, sha256=begin.sha256, code=LoadFailure.TOO_LARGE, reason="big"
                )
            )
            received = 0
            while not isinstance(message := await receive(channel, Message), ModelEnd):
                assert isinstance(message, ModelChunk)
                received += 1
            assert received < chunks
            await receive(channel, Grant)
    (abandoned,) = [e for e in logs if e["event"] == "model_transfer_abandoned"]
    assert abandoned["sent"] == received * MODEL_CHUNK_BYTES
    metrics = await _metrics(custodian)
    assert metrics[("drm_custodian_model_bytes_sent_total", "huge", "")] == abandoned["sent"]
    assert metrics[("drm_custodian_model_transfers_total", "huge", "failed")] == 1


async def test_a_held_model_gets_model_keep_and_no_byte(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    tiny, two_input = custodian.models
    with capture_logs() as logs:
        # A hostile enclave may claim to hold what it never received: it gets no byte of
        # it, so it cannot serve it (nothing else changes: its grants are charged as ever).
        async with custodian.link(held=(_held(tiny),)) as channel:
            keep = await receive(channel, ModelKeep)
            assert (keep.name, keep.sha256, keep.size) == (tiny.name, tiny.sha256, len(tiny.data))
            assert keep.terms == tiny.terms
            await channel.send(ModelLoaded(name=keep.name, sha256=keep.sha256))
            assert [name for name, _ in await load_models(channel, 1)] == [two_input.name]
            await receive(channel, Grant)
    (skipped,) = [e for e in logs if e["event"] == "model_transfer_skipped"]
    assert skipped["model"] == tiny.name
    metrics = await _metrics(custodian)
    assert metrics[("drm_custodian_model_transfers_total", "tiny", "kept")] == 1
    assert metrics[("drm_custodian_model_bytes_sent_total", "tiny", "")] == 0


@pytest.mark.parametrize("change", ["sha256", "terms_sha256"])
async def test_a_model_held_with_other_bytes_or_terms_is_streamed(
    start_custodian: CustodianFactory, change: str
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    tiny, two_input = custodian.models
    async with custodian.link(held=(_held(tiny, **{change: b"\x05" * 32}),)) as channel:
        received = await load_models(channel, 2)
        assert received == [(tiny.name, tiny.data), (two_input.name, two_input.data)]


@pytest.mark.parametrize(
    "answer",
    [
        # For no model under way (all delivered): a late or invented answer.
        ModelLoadFailed(name="tiny", sha256=b"\x01" * 32, code=LoadFailure.NOT_HELD, reason="x"),
        ModelLoaded(name="two_input", sha256=b"\x01" * 32),
    ],
    ids=["load_failed", "loaded"],
)
async def test_an_answer_for_no_model_under_way_closes_the_link(
    start_custodian: CustodianFactory, answer: Message
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    async with custodian.link() as channel:
        await load_models(channel, 2)
        await receive(channel, Grant)
        await channel.send(answer)
        with pytest.raises(PeerError) as caught:
            await drain(channel)
        assert caught.value.code is ErrorCode.PROTOCOL_ERROR
        assert "for no model sent" in caught.value.detail


async def test_a_failure_naming_another_model_closes_the_link(
    start_custodian: CustodianFactory,
) -> None:
    custodian = await start_custodian(initial_inferences=5)
    _, two_input = custodian.models
    async with custodian.link() as channel:
        await take_model(channel)
        await channel.send(
            ModelLoadFailed(
                name=two_input.name, sha256=two_input.sha256, code=LoadFailure.NOT_HELD, reason="x"
            )
        )
        with pytest.raises(PeerError) as caught:
            await drain(channel)
        assert caught.value.code is ErrorCode.PROTOCOL_ERROR
        assert "model_load_failed does not match the model sent" in caught.value.detail


async def test_a_frame_stalled_mid_way_ends_the_link_logged_and_counted(
    start_custodian: CustodianFactory,
) -> None:
    """I17 on the enclave-link port: an attested enclave that sends part of a frame and
    stops is told ``timeout`` once the frame's deadline passes, not held forever."""
    custodian = await start_custodian(initial_inferences=5, link_frame_timeout=0.3)
    frame = b"".join(encode_frame({"type": "heartbeat", "seq": 1}))
    logged = trio.Event()

    def watch(
        _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if event["event"] == "enclave_frame_too_slow":
            logged.set()
        return event

    with capture_logs(processors=[watch]) as logs:
        async with custodian.link(heartbeat=False) as channel:
            await channel.stream.send_all(frame[:6])  # the prefix and part of the header
            with pytest.raises(PeerError) as told:
                await drain(channel)
        with trio.fail_after(TIMEOUT):
            await logged.wait()  # the custodian's side of the link has ended too
    status, _, body = await trio.to_thread.run_sync(custodian.admin.request, "GET", "/metrics")
    assert told.value.code is ErrorCode.TIMEOUT
    assert "frame must arrive within 0.3 s" in str(told.value)
    stalled = [e for e in logs if e["event"] == "enclave_frame_too_slow"]
    assert len(stalled) == 1
    assert status == 200
    assert 'drm_custodian_enclave_link_refused_total{limit="frame_timeout"} 1.0' in body.decode()


async def test_a_frame_that_keeps_coming_is_not_cut(start_custodian: CustodianFactory) -> None:
    """The deadline runs from a frame's first byte: a link idle between frames for longer
    than the frame timeout keeps serving."""
    custodian = await start_custodian(initial_inferences=5, link_frame_timeout=0.3)
    async with custodian.link(heartbeat=False) as channel:
        await load_models(channel, 2)
        await receive(channel, Grant)
        await trio.sleep(0.5)  # idle past the frame timeout: not a frame
        assert (await report(channel, 1, 1)).seq == 1


def test_links_that_find_the_budget_full_are_logged_and_counted() -> None:
    hits: list[str] = []
    error = RemoteProtocolError(
        "the server's memory for requests is full; retry later", code=ErrorCode.BUSY
    )
    with capture_logs() as logs:
        enclave_link._log_end(ExceptionGroup("", [error]), hits.append)
    assert [entry["event"] for entry in logs] == ["enclave_link_budget_full"]
    assert hits == ["budget_full"]


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"link_budget": 64 * 1024 * 1024}, "link_budget"),
        ({"link_frame_timeout": 0.0}, "link_frame_timeout"),
        ({"link_frame_timeout": float("nan")}, "link_frame_timeout"),
    ],
)
def test_link_limits_out_of_range_are_config_errors(
    tmp_path: Path, policy: Policy, models: tuple[ModelFile, ...], changes: dict[str, Any], key: str
) -> None:
    state = trio.run(partial(init_state_dir, tmp_path / "state", borrower=BORROWER))
    with pytest.raises(ConfigError) as info:
        ServeConfig(state=load_state_dir(state.path), models=models, policy=policy, **changes)
    assert info.value.key == key
