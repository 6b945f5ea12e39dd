"""Many light enclave links against one real custodian: the scale bench's machinery.

The custodian is the real daemon (a :class:`~drm_lab.deployment.Lab` process, its
borrowers made with ``drm_custodian borrower add``); the enclaves are light, in this
process: :class:`LightEnclave` is one link, a real RA-TLS client socket on loopback (its
certificate carries a simulated quote made exactly as ``drm_enclave --attestation
simulated`` makes it, one key pair per link) speaking the real protocol through
:mod:`drm_wire` (hello with the license, model transfer answered with ``model_loaded``
once the digest is checked, grants, usage reports, heartbeats, recall -> ``returned``,
block and unblock), without onnxruntime, a consumer port or a watchdog. Many of them
share one trio loop.

What the light enclave does not expect from a custodian ends its link as the real one's
does: a :class:`~drm_wire.errors.RemoteProtocolError` from its handler, which the channel
tells the custodian; the link's end then propagates out of :meth:`LightEnclave.run` and
fails the run. Nothing is skipped quietly.

:func:`run_fleet` is the whole measurement (admission, supply -> grant, recall -> parked
request served, heartbeat CPU at idle, custodian RSS per link); :func:`echo_floor` is the
floor of the idle CPU figure: the same number of bare TLS messages a second, of the same
size, into a minimal trio TLS echo server in its own process. ``bench/fleet.py`` prints
them; ``tests/e2e/test_fleet_bench.py`` runs both small.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import itertools
import json
import math
import multiprocessing
import os
import random
import resource
import secrets
import ssl
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL

from drm_enclave.cli import load_license
from drm_enclave.identity import (
    SIMULATED_ISV_PROD_ID,
    load_simulated_platform,
    simulated_measurement,
)
from drm_lab.certs import Pems, make_pems
from drm_lab.deployment import Lab
from drm_lab.models import tiny_model
from drm_lab.processes import LOOPBACK, python_command, run_command
from drm_wire.attestation.gramine import SimulatedEnclave, make_enclave_identity
from drm_wire.errors import RemoteProtocolError
from drm_wire.framing import encode_frame
from drm_wire.limits import HEARTBEAT_INTERVAL
from drm_wire.messages import (
    Block,
    BlockAck,
    Demand,
    Grant,
    Heartbeat,
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
    ReturnAck,
    Returned,
    Unblock,
    UsageAck,
    UsageReport,
)
from drm_wire.net.channel import MessageChannel, open_channel
from drm_wire.net.ratls_context import enclave_client_context
from drm_wire.net.tls import TLSStream, client_context, open_tls_client, server_context
from drm_wire.protocol import Link, Side

__all__ = [
    "FleetPlan",
    "FleetResult",
    "LightEnclave",
    "cpu_seconds",
    "echo_floor",
    "heartbeat_frame_size",
    "raise_open_files",
    "rss_bytes",
    "run_fleet",
]

SOFTWARE: Final = "drm-light-enclave/1"
#: How long any one wait of the fleet on the custodian may take before the run fails.
STEP_TIMEOUT: Final = 60.0
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


# --- process figures ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` now (``/proc/PID/statm``)."""
    return int(Path(f"/proc/{pid}/statm").read_text(encoding="ascii").split()[1]) * _PAGE


def raise_open_files(needed: int) -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit (children inherit
    it); return ``(soft, hard)`` after. Raises ``RuntimeError`` if ``needed`` descriptors
    do not fit under the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise RuntimeError(f"{needed} file descriptors needed, the hard limit is {hard}")
    return soft, hard


def heartbeat_frame_size() -> int:
    """Bytes of one ``heartbeat`` frame on the custodian link (before TLS)."""
    header, payload = Heartbeat(seq=1_000_000).to_wire()
    return sum(memoryview(b).nbytes for b in encode_frame(header, payload))


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- one light enclave ----------------------------------------------------------------


@dataclass(slots=True)
class _Transfer:
    begin: ModelBegin
    digest: Any = field(default_factory=hashlib.sha256)
    received: int = 0


class LightEnclave:
    """One enclave link without an enclave behind it: counters instead of a quota.

    Its quota is ``granted_total - returned_total - served_total`` (:attr:`available`);
    :meth:`serve` spends units and reports them, one report in flight at a time as the
    real accounting does. Grants are recorded with the monotonic time they arrived.
    """

    def __init__(
        self,
        borrower: str,
        license_value: str,
        context: SSL.Context,
        *,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
    ) -> None:
        self.borrower = borrower
        self.instance_id = secrets.token_hex(16)
        self._license = license_value
        self._context = context
        self._interval = heartbeat_interval
        self.granted_total = 0
        self.served_total = 0
        self.returned_total = 0
        self.requests_total = 0
        self.blocked: bool | None = None
        #: The first grant, block or unblock after the models: the link serves.
        self.synced = trio.Event()
        #: ``(time.monotonic(), granted_total)`` of every grant received.
        self.grants: list[tuple[float, int]] = []
        self.dialled_at = math.nan
        self.hello_at = math.nan
        self.recalls = 0
        self.models: dict[str, bytes] = {}
        self._channel: MessageChannel | None = None
        self._changed = trio.Event()
        self._seq = 1
        self._demand_seq = 0
        self._report: UsageReport | None = None
        self._returns: collections.deque[Returned] = collections.deque()
        self._transfer: _Transfer | None = None

    def __repr__(self) -> str:
        return (
            f"<LightEnclave {self.borrower} {self.instance_id[:8]} granted={self.granted_total} "
            f"served={self.served_total} returned={self.returned_total}>"
        )

    @property
    def available(self) -> int:
        """Units it holds and has not served."""
        return self.granted_total - self.returned_total - self.served_total

    @property
    def idle(self) -> bool:
        """Nothing of its own in flight (no report, no return unanswered)."""
        return self._report is None and not self._returns

    async def run(self, host: str, port: int) -> None:
        """Dial, attest, hello, then heartbeat until cancelled; a link that ends otherwise
        raises how it ended."""
        self.dialled_at = time.monotonic()
        stream = await open_tls_client(host, port, self._context, handshake_timeout=STEP_TIMEOUT)
        async with open_channel(stream, Link.CUSTODIAN, Side.CLIENT) as channel:
            self._channel = channel
            channel.set_handler(self._handle)
            self.hello_at = time.monotonic()
            await channel.hello(
                role=PeerRole.ENCLAVE,
                software=SOFTWARE,
                license=self._license,
                instance_id=self.instance_id,
                held=(),
                hello_timeout=STEP_TIMEOUT,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, channel)
                await channel.wait_ended()

    async def _heartbeats(self, channel: MessageChannel) -> None:
        await trio.sleep(random.uniform(0, self._interval))  # links do not beat in step
        for seq in itertools.count():
            await channel.send(Heartbeat(seq=seq))
            await trio.sleep(self._interval)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` holds (checked after every message)."""
        while not done():
            await self._changed.wait()

    async def serve(self, units: int) -> None:
        """Spend ``units`` of the quota and report them (after the report in flight is
        acknowledged, if any)."""
        if not 0 < units <= self.available:
            raise ValueError(f"{units} units asked, {self.available} held")
        await self.wait_until(lambda: self._report is None)
        assert self._channel is not None
        self.served_total += units
        self.requests_total += units
        report = UsageReport(
            seq=self._seq, served_total=self.served_total, requests_total=self.requests_total
        )
        self._seq += 1
        self._report = report
        await self._channel.send(report)

    async def demand(self, units: int, parked_requests: int) -> None:
        """Tell the custodian what its parked requests lack (0, 0: nobody waits)."""
        self._demand_seq += 1
        await self._send(
            Demand(
                seq=self._demand_seq,
                units=units,
                parked_requests=parked_requests,
                granted_total=self.granted_total,
            )
        )

    async def _send(self, message: Message) -> None:
        assert self._channel is not None
        await self._channel.send(message)

    async def _handle(self, message: Message) -> None:
        """One message from the custodian, in the channel's reader task."""
        if isinstance(message, Heartbeat):
            return
        if isinstance(message, Grant):
            self.granted_total = max(self.granted_total, message.granted_total)
            self.grants.append((time.monotonic(), message.granted_total))
            self.synced.set()
        elif isinstance(message, ModelChunk):
            transfer = self._transfer
            if transfer is None:  # pragma: no cover - the state machine orders begin < chunk
                raise RemoteProtocolError("model_chunk outside a transfer", field="type")
            if message.offset != transfer.received:
                raise RemoteProtocolError("model_chunk out of order", field="offset")
            transfer.digest.update(message.data)
            transfer.received += len(message.data)
        elif isinstance(message, ModelBegin):
            self._transfer = _Transfer(message)
        elif isinstance(message, ModelEnd):
            await self._model_end(message)
        elif isinstance(message, ModelKeep):
            if self.models.get(message.name) == message.sha256:
                await self._send(ModelLoaded(name=message.name, sha256=message.sha256))
            else:
                await self._send(
                    ModelLoadFailed(
                        name=message.name,
                        sha256=message.sha256,
                        code=LoadFailure.NOT_HELD,
                        reason="not held",
                    )
                )
        elif isinstance(message, UsageAck):
            report = self._report
            if report is None or (message.seq, message.served_total) != (
                report.seq,
                report.served_total,
            ):
                raise RemoteProtocolError("usage_ack answers no report in flight", field="seq")
            self._report = None
        elif isinstance(message, Recall):
            await self._recalled(message)
        elif isinstance(message, ReturnAck):
            sent = self._returns.popleft() if self._returns else None
            if sent is None or (message.recall_id, message.returned_total) != (
                sent.recall_id,
                sent.returned_total,
            ):
                raise RemoteProtocolError("return_ack answers no return in flight", field="type")
        elif isinstance(message, Block):
            self.blocked = True
            self.synced.set()
            await self._send(BlockAck(block_id=message.block_id))
        elif isinstance(message, Unblock):
            self.blocked = False
            self.synced.set()
        else:
            raise RemoteProtocolError(f"{message.TYPE} is not for this enclave", field="type")
        self._notify()

    async def _model_end(self, end: ModelEnd) -> None:
        transfer, self._transfer = self._transfer, None
        if transfer is None:  # pragma: no cover - the state machine orders begin < end
            raise RemoteProtocolError("model_end outside a transfer", field="type")
        begin = transfer.begin
        if (
            end.name != begin.name
            or transfer.received != begin.size
            or transfer.digest.digest() != begin.sha256
        ):
            raise RemoteProtocolError("the model does not match its model_begin", field="sha256")
        self.models[begin.name] = begin.sha256
        await self._send(ModelLoaded(name=begin.name, sha256=begin.sha256))

    async def _recalled(self, recall: Recall) -> None:
        """Give back at most the units asked for that are idle, at once (all of them are:
        a light enclave has no request in flight)."""
        self.recalls += 1
        self.returned_total += min(recall.units, max(self.available, 0))
        returned = Returned(
            recall_id=recall.recall_id,
            returned_total=self.returned_total,
            served_total=self.served_total,
            requests_total=self.requests_total,
            final=False,
        )
        self._returns.append(returned)
        await self._send(returned)


# --- the fleet --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetPlan:
    """The shape of one run.

    Attributes:
        borrowers: borrowers made with ``borrower add``.
        per_borrower: light enclaves per borrower (also each one's ``--max-instances``).
        lease: the custodian's ``--lease``.
        dials: dials in flight at once while the fleet links (a fleet coming up, not a
            thundering herd: the custodian's handshake slots are a cap, not a queue).
        supply_rounds: supplies timed (round robin over the borrowers).
        recall_rounds: parks timed (round robin over the borrowers).
        block_rounds: blocks timed until every enclave of the borrower acknowledged
            (each then unblocked).
        idle_seconds: how long the custodian's CPU is sampled with every link idle.
        serve_options: more ``drm_custodian serve`` flags.
    """

    borrowers: int = 50
    per_borrower: int = 20
    lease: int = 100
    dials: int = 64
    supply_rounds: int = 100
    recall_rounds: int = 100
    block_rounds: int = 50
    idle_seconds: float = 20.0
    serve_options: tuple[str, ...] = ()

    @property
    def links(self) -> int:
        return self.borrowers * self.per_borrower


@dataclass(slots=True)
class FleetResult:
    """What :func:`run_fleet` measured (seconds, bytes, CPU seconds)."""

    plan: FleetPlan
    setup_seconds: float = 0.0
    #: first dial -> last first grant, and first hello -> last first grant.
    admit_from_dial: float = 0.0
    admit_from_hello: float = 0.0
    #: POST -> each enclave of the borrower received its grant; and -> the last of them.
    supply_grant: list[float] = field(default_factory=list)
    supply_all: list[float] = field(default_factory=list)
    #: POST -> its 200 answer (the supply committed, its grants handed to the pumps).
    supply_answer: list[float] = field(default_factory=list)
    #: POST -> the custodian started sending the round's last grant (``send_started`` of
    #: its ``grant_pushed`` log lines; both wall clocks of this machine): the custodian's
    #: share of ``supply_all``.
    supply_pushed: list[float] = field(default_factory=list)
    #: park (the ``demand`` of an enclave that spent its last unit) -> the grant that
    #: serves it.
    recall_served: list[float] = field(default_factory=list)
    #: ``POST /block`` with ``wait`` -> its answer, which comes once every live instance
    #: of the borrower acknowledged the block (I25): the custodian's own count.
    block_acked: list[float] = field(default_factory=list)
    idle_seconds: float = 0.0
    idle_custodian_cpu: float = 0.0
    idle_generator_cpu: float = 0.0
    idle_log_lines: int = 0
    rss_no_links: int = 0
    rss_links: int = 0
    rss_after_idle: int = 0
    generator_rss: int = 0
    borrowers: dict[str, dict[str, Any]] = field(default_factory=dict)
    enclaves: list[LightEnclave] = field(default_factory=list)

    @property
    def rss_per_link(self) -> float:
        return (self.rss_links - self.rss_no_links) / self.plan.links

    def ledger_mismatches(self) -> list[str]:
        """Where the custodian's books (``/borrowers/NAME/usage`` at the end) differ from
        what the light enclaves hold, or break I23 (served <= granted and not returned <=
        supplied): the figures mean nothing if the run went wrong."""
        found = []
        for name, doc in self.borrowers.items():
            mine = [e for e in self.enclaves if e.borrower == name]
            held = sum(e.granted_total - e.returned_total for e in mine)
            served = sum(e.served_total for e in mine)
            books = (doc["granted"] - doc["returned"] - doc["reclaimed"], doc["served"])
            if books != (held, served):
                found.append(f"{name}: the custodian says {books}, its enclaves {(held, served)}")
            if not doc["served"] <= books[0] <= doc["supplied"]:
                found.append(f"{name}: I23 broken: {doc}")
        return found


class _Admin:
    """The admin API over an HTTPS connection made before each call and outside its
    timing, so that a timed call does not pay a TLS handshake (blocking: call from a
    thread)."""

    def __init__(self, lab: Lab) -> None:
        assert lab.admin is not None
        self._api = lab.admin
        context = ssl.create_default_context(cafile=os.fspath(lab.admin.ca_path))
        #: ``time.time()`` when the last call was sent.
        self.sent_wall = 0.0
        self._conn = http.client.HTTPSConnection(
            lab.admin.host, lab.admin.port, timeout=STEP_TIMEOUT, context=context
        )

    def call(
        self, method: str, path: str, form: dict[str, str] | None = None
    ) -> tuple[float, float, dict[str, Any]]:
        """``(sent_at, answered_at, document)`` (``time.monotonic()``); any status but
        200 raises."""
        headers = {"Authorization": f"Bearer {self._api.token}"}
        body = None
        if form is not None:
            body = urlencode(form).encode("ascii")
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        self._conn.close()
        self._conn.connect()  # the admin server closes idle connections: a fresh one
        sent_at = time.monotonic()
        self.sent_wall = time.time()
        self._conn.request(method, path, body=body, headers=headers)
        response = self._conn.getresponse()
        data = response.read()
        answered_at = time.monotonic()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        doc = json.loads(data)
        assert isinstance(doc, dict)
        return sent_at, answered_at, doc

    def supply(self, borrower: str, units: int) -> tuple[float, float]:
        sent_at, answered_at, _ = self.call(
            "POST", f"/borrowers/{borrower}/supply_inferences", {"number_inferences": str(units)}
        )
        return sent_at, answered_at

    def usage(self, borrower: str) -> dict[str, Any]:
        return self.call("GET", f"/borrowers/{borrower}/usage")[2]

    def block(self, borrower: str) -> tuple[float, float, dict[str, Any]]:
        """Block, answered once every live instance acknowledged it (or after 10 s)."""
        return self.call("POST", f"/borrowers/{borrower}/block", {"wait": "10"})

    def unblock(self, borrower: str) -> None:
        self.call("POST", f"/borrowers/{borrower}/unblock")

    def close(self) -> None:
        self._conn.close()


def _borrower_names(count: int) -> list[str]:
    return [f"fleet{i:03d}" for i in range(count)]


def add_borrowers(lab: Lab, names: Sequence[str], max_instances: int) -> dict[str, str]:
    """``drm_custodian borrower add NAME --max-instances N`` for each (the daemon is not
    running: the state directory is changed directly); each one's ``hello`` license value
    from its handoff file. Blocking."""
    licenses = {}
    for name in names:
        run_command(
            python_command(
                "drm_custodian", "borrower", "add", name,
                "--max-instances", str(max_instances), "--state-dir", lab.state_dir,
            ),
            cwd=lab.workdir,
        )  # fmt: skip
        path = lab.state_dir / "handoff" / f"{name}.license.json"
        licenses[name] = load_license(path).hello_value()
    return licenses


def client_contexts(lab: Lab, count: int) -> list[SSL.Context]:
    """``count`` RA-TLS client contexts, each with its own key pair and simulated quote,
    as ``drm_enclave serve --attestation simulated`` makes them against this lab's
    simulated platform and custodian CA. Blocking."""
    ca_pem = lab.ca_path.read_bytes()
    measurement = simulated_measurement(ca_pem)
    simulation = SimulatedEnclave(
        load_simulated_platform(lab.simulation_dir),
        mr_enclave=measurement.mr_enclave,
        mr_signer=measurement.mr_signer,
        isv_prod_id=SIMULATED_ISV_PROD_ID,
    )
    ca = x509.load_pem_x509_certificate(ca_pem)
    return [
        enclave_client_context(
            make_enclave_identity("simulated", simulation=simulation),
            ca,
            custodian_name=LOOPBACK,
        )
        for _ in range(count)
    ]


async def _link_all(
    nursery: trio.Nursery, enclaves: Sequence[LightEnclave], port: int, dials: int
) -> None:
    """Link every enclave, at most ``dials`` between dial and first sync at once."""
    limiter = trio.CapacityLimiter(dials)

    async def link(enclave: LightEnclave) -> None:
        async with limiter:
            nursery.start_soon(enclave.run, LOOPBACK, port)
            await enclave.synced.wait()

    with trio.fail_after(STEP_TIMEOUT * max(1, len(enclaves) // 100)):
        async with trio.open_nursery() as dialling:
            for enclave in enclaves:
                dialling.start_soon(link, enclave)


async def _settle(enclaves: Sequence[LightEnclave]) -> None:
    """Wait until no enclave has a report or a return in flight."""
    with trio.fail_after(STEP_TIMEOUT):
        for enclave in enclaves:
            await enclave.wait_until(lambda e=enclave: e.idle)  # type: ignore[misc]


async def _supply_round(
    admin: _Admin, group: Sequence[LightEnclave], result: FleetResult
) -> tuple[float, set[str]]:
    """Bring each enclave of one borrower below half a lease, then supply exactly what
    tops them all up again; time POST -> each grant received."""
    lease = result.plan.lease
    spend = lease // 2 + 1
    for enclave in group:
        await enclave.serve(min(spend, enclave.available))
    await _settle(group)
    before = [e.granted_total for e in group]
    units = sum(lease - e.available for e in group)
    sent_at, answered_at = await trio.to_thread.run_sync(admin.supply, group[0].borrower, units)
    with trio.fail_after(STEP_TIMEOUT):
        for enclave, total in zip(group, before, strict=True):
            await enclave.wait_until(lambda e=enclave, t=total: e.granted_total > t)  # type: ignore[misc]
    arrivals = [
        next(at for at, granted in e.grants if granted > total)
        for e, total in zip(group, before, strict=True)
    ]
    result.supply_grant += [at - sent_at for at in arrivals]
    result.supply_all.append(max(arrivals) - sent_at)
    result.supply_answer.append(answered_at - sent_at)
    return admin.sent_wall, {e.instance_id for e in group}


def _pushed_after(events: Sequence[dict[str, Any]], sent: float, instances: set[str]) -> float:
    """Seconds from ``sent`` (wall clock) until the custodian started sending the first
    grant after it to each of ``instances``, the last of them (``nan`` if one is missing)."""
    first: dict[str, float] = {}
    for event in events:
        if event.get("event") != "grant_pushed" or event.get("instance") not in instances:
            continue
        started = float(event["send_started"])
        if started >= sent and event["instance"] not in first:
            first[event["instance"]] = started
    return max(first.values()) - sent if len(first) == len(instances) else math.nan


async def _recall_round(enclave: LightEnclave, result: FleetResult) -> None:
    """Park: spend every unit the enclave holds and report it, then one request parks and
    the enclave sends its ``demand`` for one unit, as a real one does; the custodian
    recalls from a peer of the same borrower and grants. Time the park -> the grant
    received, then serve the parked request and clear the demand."""
    await enclave.serve(enclave.available)
    before = enclave.granted_total
    parked_at = time.monotonic()
    await enclave.demand(1, 1)
    with trio.fail_after(STEP_TIMEOUT):
        await enclave.wait_until(lambda: enclave.granted_total > before)
    arrived = next(at for at, granted in enclave.grants if granted > before)
    result.recall_served.append(arrived - parked_at)
    await enclave.demand(0, 0)
    await enclave.serve(1)


async def _block_round(admin: _Admin, group: Sequence[LightEnclave], result: FleetResult) -> None:
    """Block one borrower and time the answer that says all its enclaves acknowledged;
    check each did, then unblock and wait until each was told."""
    borrower = group[0].borrower
    sent_at, answered_at, doc = await trio.to_thread.run_sync(admin.block, borrower)
    if doc["block_acknowledged"] != len(group):
        raise RuntimeError(f"{borrower}: {doc['block_acknowledged']} of {len(group)} acknowledged")
    with trio.fail_after(STEP_TIMEOUT):
        for enclave in group:
            await enclave.wait_until(lambda e=enclave: e.blocked is True)  # type: ignore[misc]
    result.block_acked.append(answered_at - sent_at)
    await trio.to_thread.run_sync(admin.unblock, borrower)
    with trio.fail_after(STEP_TIMEOUT):
        for enclave in group:
            await enclave.wait_until(lambda e=enclave: e.blocked is False)  # type: ignore[misc]


async def run_fleet(
    workdir: Path, plan: FleetPlan, *, log: Callable[[str], object] = lambda line: None
) -> FleetResult:
    """One custodian process and ``plan.links`` light enclaves in this process; every
    figure of :class:`FleetResult`. ``log`` is told each step as it starts."""
    result = FleetResult(plan)
    started = time.monotonic()
    raise_open_files(plan.links + 256)
    lab = Lab(workdir)
    names = _borrower_names(plan.borrowers)
    try:
        log("init, measure, borrower add")
        await trio.to_thread.run_sync(lab.prepare)
        licenses = await trio.to_thread.run_sync(add_borrowers, lab, names, plan.per_borrower)
        log(f"{plan.links} RA-TLS identities")
        contexts = await trio.to_thread.run_sync(client_contexts, lab, plan.links + 1)
        tiny = lab.write_model("tiny", tiny_model())
        log("custodian serve")
        custodian = await trio.to_thread.run_sync(
            partial(
                lab.start_custodian,
                [tiny],
                initial=0,
                lease=plan.lease,
                options=plan.serve_options,
            )
        )
        pid = custodian.process.pid
        admin = await trio.to_thread.run_sync(_Admin, lab)
        try:
            await _measure(lab, admin, names, licenses, contexts, plan, pid, result, log)
        finally:
            admin.close()
    finally:
        await trio.to_thread.run_sync(lab.stop_all)
    result.setup_seconds = time.monotonic() - started
    return result


async def _measure(
    lab: Lab,
    admin: _Admin,
    names: Sequence[str],
    licenses: dict[str, str],
    contexts: list[SSL.Context],
    plan: FleetPlan,
    pid: int,
    result: FleetResult,
    log: Callable[[str], object],
) -> None:
    assert lab.custodian is not None
    port = lab.custodian_port
    interval = HEARTBEAT_INTERVAL
    # One link of the init borrower (no supply) and back: the custodian's first handshake,
    # session and ledger look-ups are paid before RSS with no links is read.
    init_license = load_license(lab.license_path).hello_value()
    async with trio.open_nursery() as nursery:
        warm = LightEnclave("borrower", init_license, contexts.pop(), heartbeat_interval=interval)
        await _link_all(nursery, [warm], port, 1)
        nursery.cancel_scope.cancel()
    await trio.sleep(1.0)
    result.rss_no_links = rss_bytes(pid)

    for name in names:
        await trio.to_thread.run_sync(admin.supply, name, plan.per_borrower * plan.lease)
    groups = {
        name: [
            LightEnclave(name, licenses[name], contexts.pop(), heartbeat_interval=interval)
            for _ in range(plan.per_borrower)
        ]
        for name in names
    }
    # Interleaved: consecutive dials go to different borrowers, as a fleet comes up.
    enclaves = [e for row in zip(*groups.values(), strict=True) for e in row]
    result.enclaves = enclaves
    async with trio.open_nursery() as nursery:
        log(f"admit {len(enclaves)} links")
        await _link_all(nursery, enclaves, port, plan.dials)
        first_grants = [e.grants[0][0] for e in enclaves]
        if any(e.granted_total != plan.lease for e in enclaves):
            raise RuntimeError("an enclave was not granted a full lease at admission")
        result.admit_from_dial = max(first_grants) - min(e.dialled_at for e in enclaves)
        result.admit_from_hello = max(first_grants) - min(e.hello_at for e in enclaves)
        await trio.sleep(2 * interval)
        result.rss_links = rss_bytes(pid)

        log(f"idle {plan.idle_seconds:g} s")
        lines_before = len(lab.custodian.lines)
        cpu_before, own_before = cpu_seconds(pid), cpu_seconds(os.getpid())
        idle_started = time.monotonic()
        await trio.sleep(plan.idle_seconds)
        result.idle_seconds = time.monotonic() - idle_started
        result.idle_custodian_cpu = cpu_seconds(pid) - cpu_before
        result.idle_generator_cpu = cpu_seconds(os.getpid()) - own_before
        result.idle_log_lines = len(lab.custodian.lines) - lines_before
        result.rss_after_idle = rss_bytes(pid)
        result.generator_rss = rss_bytes(os.getpid())

        log(f"supply -> grant x{plan.supply_rounds}")
        rounds = [
            await _supply_round(admin, groups[names[i % len(names)]], result)
            for i in range(plan.supply_rounds)
        ]
        log(f"recall -> parked request served x{plan.recall_rounds}")
        for i in range(plan.recall_rounds):
            group = groups[names[i % len(names)]]
            await _recall_round(group[(i // len(names)) % len(group)], result)
        log(f"block -> acknowledged by every enclave x{plan.block_rounds}")
        for i in range(plan.block_rounds):
            await _block_round(admin, groups[names[i % len(names)]], result)
        await _settle(enclaves)
        for name in names:
            result.borrowers[name] = await trio.to_thread.run_sync(admin.usage, name)
        events = lab.custodian.find_all("grant_pushed")
        result.supply_pushed = [_pushed_after(events, *sent) for sent in rounds]
        nursery.cancel_scope.cancel()


# --- the floor: bare TLS messages into a minimal echo server -------------------------------


def _floor_server_context(pems: Pems) -> SSL.Context:
    key = load_pem_private_key(pems.key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return server_context(certificate=x509.load_pem_x509_certificate(pems.cert), private_key=key)


async def _echo_serve(pems: Pems, pipe: Connection) -> None:
    context = _floor_server_context(pems)
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    pipe.send(listeners[0].socket.getsockname()[1])

    async def handler(tcp: trio.SocketStream) -> None:
        stream = TLSStream(tcp, context, server_side=True)
        try:
            await stream.do_handshake()
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handler, listeners)


def echo_server_main(pems: Pems, pipe: Connection) -> None:
    """Entry point of the echo server's process: answers each TLS read with its bytes."""
    raise_open_files(0)
    trio.run(_echo_serve, pems, pipe)


@dataclass(frozen=True, slots=True)
class Floor:
    """The echo server's CPU seconds over ``seconds`` of ``links`` connections each
    sending one ``size``-byte message every ``interval`` (and reading its echo), and the
    seconds it took to open them all (TLS handshakes, ``dials`` at once)."""

    links: int
    size: int
    interval: float
    seconds: float
    server_cpu: float
    client_cpu: float
    connect_seconds: float
    #: Messages echoed back within the ``seconds`` measured, on all connections.
    echoed: int


async def echo_floor(
    links: int, size: int, interval: float, seconds: float, *, dials: int = 64
) -> Floor:
    """Spawn the echo server, open ``links`` TLS connections, send a message of ``size``
    bytes on each every ``interval`` seconds for ``seconds``; the server's CPU."""
    raise_open_files(links + 256)
    pems = make_pems()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=echo_server_main, args=(pems, child), daemon=True)
    process.start()
    try:
        if not await trio.to_thread.run_sync(parent.poll, STEP_TIMEOUT):
            raise RuntimeError("the echo server did not report its port")
        port: int = parent.recv()
        assert process.pid is not None
        context = client_context(ca_certificates=[x509.load_pem_x509_certificate(pems.ca)])
        message = secrets.token_bytes(size)
        connected = 0
        echoed = [0]
        all_connected = trio.Event()

        async def one(limiter: trio.CapacityLimiter) -> None:
            nonlocal connected
            async with limiter:
                stream = await open_tls_client(LOOPBACK, port, context, server_hostname="localhost")
            connected += 1
            if connected == links:
                all_connected.set()
            await trio.sleep(random.uniform(0, interval))
            try:
                while True:
                    await stream.send_all(message)
                    got = 0
                    while got < size:
                        data = await stream.receive_some()
                        if not data:
                            raise RuntimeError("the echo server closed a connection")
                        got += len(data)
                    echoed[0] += 1
                    await trio.sleep(interval)
            finally:
                await trio.aclose_forcefully(stream)

        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(dials)
            connect_started = time.monotonic()
            for _ in range(links):
                nursery.start_soon(one, limiter)
            with trio.fail_after(STEP_TIMEOUT):
                await all_connected.wait()
            connect_seconds = time.monotonic() - connect_started
            await trio.sleep(2 * interval)
            server_before, own_before = cpu_seconds(process.pid), cpu_seconds(os.getpid())
            echoed_before = echoed[0]
            begin = time.monotonic()
            await trio.sleep(seconds)
            elapsed = time.monotonic() - begin
            count = echoed[0] - echoed_before
            server_cpu = cpu_seconds(process.pid) - server_before
            client_cpu = cpu_seconds(os.getpid()) - own_before
            nursery.cancel_scope.cancel()
    finally:
        process.terminate()
        await trio.to_thread.run_sync(process.join, 10)
    return Floor(links, size, interval, elapsed, server_cpu, client_cpu, connect_seconds, count)


def summary(samples: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 of ``samples``."""
    return statistics.median(samples), percentile(samples, 0.99)
