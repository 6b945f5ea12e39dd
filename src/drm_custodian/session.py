"""One admitted enclave link, custodian side: model transfer, grants, blocks, usage reports.

:class:`EnclaveSession` is the state of one attested, licensed enclave instance on one
link. :func:`~drm_custodian.enclave_link.handle_connection` makes and runs it once the
enclave is admitted; the admin API reaches it through the
:class:`~drm_custodian.registry.Registry` (as a :class:`~drm_custodian.registry.LiveSession`).

Theory of operation
-------------------
The session takes the link over after ``hello`` and the license check (docs/links.md,
steps 1 and 2; see :mod:`drm_custodian.enclave_link`) and runs the rest of the steps:

1. Three tasks run in the session's nursery until one of them ends the link:

   * the *receiver* owns ``channel.receive()``, under a deadline of
     ``heartbeat_interval * heartbeat_misses``: any message is a sign of life, none for
     that long and the link is dead. It records usage reports (ledger first, then
     ``usage_ack`` with the report's own seq and total) and returns (ledger first, then
     ``return_ack`` naming the recorded total; a return the ledger refuses, I20, is
     logged and ends the link with ``protocol_error``), and hands ``model_loaded`` to
     the transfer. After a final return the instance has stopped: the pump sends it
     nothing more (the state machine would refuse a grant), and the ledger refuses its
     instance id from then on;
   * the *heartbeat* task sends ``heartbeat`` every interval (at its phase's tick of the
     daemon's one :class:`~drm_custodian.heartbeats.HeartbeatClock`);
   * the *main* task streams each model (``model_begin``, chunks of a memoryview over the
     bytes held in memory, ``model_end``) and waits for its answer (name and digest must
     match) before the next; then re-syncs (``block`` if the borrower is blocked, else
     the instance's last grant again, else a first grant or ``unblock``) and becomes the
     *grant pump*.

   Version 3 (docs/links.md, "Version 3"): a model the enclave's ``hello`` says it holds
   with the same SHA-256 and the same terms digest gets ``model_keep`` instead of a
   transfer (logged ``model_transfer_skipped``; the enclave still checks digest and
   terms). The answer is ``model_loaded`` or ``model_load_failed``: a failure is logged
   at error level naming the model, the instance and the enclave's reason, counted, and
   the next model follows; a failure during a transfer (the enclave refused it at
   ``model_begin``) ends that transfer at the next chunk. A claim to hold a model costs
   the custodian nothing and gains the enclave nothing: without the bytes it cannot
   serve that model. ``model_event`` counts each outcome and the bytes sent (/metrics).

2. The pump is the only task that sends grants, blocks and unblocks, so they never
   interleave: it sleeps until woken (by the admin hooks, by a usage report, by a refused
   grant), reads the borrower's balance, pushes ``block``/``unblock`` when the blocked
   state changed, and asks :func:`~drm_custodian.grants.plan_grant` for a top-up, which it
   commits to the ledger before sending (invariant I6). A supply through the admin API
   commits the grants it makes due in its own transaction (one fsync where a parked
   request used to wait for two) and hands them to the pump, which sends them as they
   are: grants carry the instance's cumulative total, so a grant overtaken by a newer one
   is simply not sent.

3. Demand and recall (I23, I24; docs/links.md, "Version 4"): the enclave's ``demand``
   says what its parked requests lack. The grant rule tops an instance with that *need*
   up to a full lease, and leaves what others need to them when it has none. When the
   pump finds a need the borrower's remaining supply cannot cover, it asks the
   registry's donors (same borrower, no request parked, holding units, no recall
   unanswered, not dry since their last report), the one holding most first, to recall
   what is lacking, within this instance's lease; each donor's pump sends ``recall``
   (one unanswered per link). Its ``returned`` is credited as the ledger accepts it
   (I20), settles the asker (which looks again), and wakes the borrower's other
   sessions to grant the units where they are needed.

4. Blocks (I25): each ``block`` carries the link's next block id; the enclave's
   ``block_ack`` for the current one is logged (``block_acknowledged``) and shown by
   the admin API through the registry.

Every send is under ``send_timeout`` and every wait on the peer under a deadline.
Whatever ends the link is raised to the caller, which logs it; a protocol error of the
enclave's is first told to it in an ``error`` (best effort, bounded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hmac
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog
import trio
from OpenSSL import SSL

from drm_custodian.grants import DEFAULT_LEASE, check_lease, plan_grant
from drm_custodian.heartbeats import HeartbeatClock
from drm_custodian.ledger import Balance, GrantPlan, Ledger
from drm_custodian.ledger import Grant as LedgerGrant
from drm_custodian.models import ModelFile
from drm_custodian.registry import Registry
from drm_custodian.state import CustodianState, LicenseRecord
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.errors import (
    ErrorCode,
    LocalProtocolError,
    PeerError,
    RemoteProtocolError,
    first_leaf,
)
from drm_wire.limits import (
    HANDSHAKE_TIMEOUT,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_MISSES,
    HELLO_TIMEOUT,
    MAX_GRANT_UNITS,
    MODEL_CHUNK_BYTES,
)
from drm_wire.messages import (
    Block,
    BlockAck,
    Demand,
    Error,
    Grant,
    Heartbeat,
    HeldModel,
    Message,
    ModelBegin,
    ModelChunk,
    ModelEnd,
    ModelKeep,
    ModelLoaded,
    ModelLoadFailed,
    Recall,
    ReturnAck,
    Returned,
    Unblock,
    UsageAck,
    UsageReport,
    terms_digest,
)
from drm_wire.net.channel import ERROR_FRAME_TIMEOUT, ChannelError, MessageChannel

__all__ = [
    "DEFAULT_RECLAIM_MARGIN",
    "MODEL_LOADED_TIMEOUT",
    "SEND_TIMEOUT",
    "EnclaveSession",
    "LinkDead",
    "SessionConfig",
    "SessionContext",
    "send_last_words",
]

log = structlog.get_logger(__name__)

#: One message to the enclave, a 4 MiB model chunk included. 30 s is 140 KB/s: any link
#: an enclave could use does better, and a peer that stops reading is cut off.
SEND_TIMEOUT: Final = 30.0
#: From ``model_end`` to ``model_loaded``: the enclave checks the digest and builds an
#: onnxruntime session from memory, seconds for a 2 GB model on a slow enclave.
MODEL_LOADED_TIMEOUT: Final = 120.0


#: Added to the enclave's detection timeout before a lost instance's units may be written
#: off (I21): time for a link that is slow rather than dead to show itself, and for an
#: enclave whose host delays the custodian's bytes to notice the silence.
DEFAULT_RECLAIM_MARGIN: Final = 60.0


class LinkDead(Exception):
    """The enclave sent nothing for ``heartbeat_interval * heartbeat_misses`` seconds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """Tunables of every enclave session (tests shorten the timeouts)."""

    lease: int = DEFAULT_LEASE
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_misses: int = HEARTBEAT_MISSES
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    hello_timeout: float = HELLO_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    model_loaded_timeout: float = MODEL_LOADED_TIMEOUT
    reclaim_margin: float = DEFAULT_RECLAIM_MARGIN

    def __post_init__(self) -> None:
        check_lease(self.lease)
        if self.heartbeat_misses < 1:
            raise ValueError("heartbeat_misses must be at least 1")
        if not self.reclaim_margin >= 0:
            raise ValueError("reclaim_margin must not be negative")
        for name in ("heartbeat_interval", "handshake_timeout", "hello_timeout",
                     "send_timeout", "model_loaded_timeout"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")

    @property
    def dead_after(self) -> float:
        """Silence after which the link is dead (on either side: both use the same
        heartbeat interval and misses, docs/links.md)."""
        return self.heartbeat_interval * self.heartbeat_misses

    @property
    def reclaim_window(self) -> float:
        """How long the custodian must have sent an instance nothing before its units in
        doubt may be written off (I21): the enclave's detection timeout plus the margin."""
        return self.dead_after + self.reclaim_margin


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionContext:
    """What every enclave link shares: made once by :func:`~drm_custodian.serve.serve`."""

    state: CustodianState
    ledger: Ledger
    models: Sequence[ModelFile]
    tls_context: SSL.Context
    registry: Registry
    config: SessionConfig = field(default_factory=SessionConfig)
    #: TLS handshakes that may run at once (I17); ``None``: no cap.
    handshake_slots: trio.Semaphore | None = None
    #: Called with the limit's name when a cap turns a connection away (a metric).
    limit_hit: Callable[[str], object] = lambda name: None
    #: Called with a model's name, how its delivery ended (``loaded``, ``kept``,
    #: ``failed``) and the model bytes sent for it (metrics).
    model_event: Callable[[str, str, int], object] = lambda model, outcome, sent: None
    #: The one timer of every link's heartbeats (running); ``None``: each session sleeps.
    heartbeat_clock: HeartbeatClock | None = None


async def send_last_words(channel: MessageChannel, code: ErrorCode, message: str) -> None:
    """Tell the peer why the link closes (best effort, bounded)."""
    # Already gone (the channel ended): nobody left to tell.
    with (
        trio.move_on_after(ERROR_FRAME_TIMEOUT),
        contextlib.suppress(ChannelError, RemoteProtocolError, PeerError),
    ):
        await channel.send(Error(code=code, message=message))


class EnclaveSession:
    """One licensed, attested enclave instance on one link (see the module docstring)."""

    def __init__(
        self,
        ctx: SessionContext,
        channel: MessageChannel,
        identity: VerifiedEnclave,
        record: LicenseRecord,
        instance_id: str,
        *,
        held: Sequence[HeldModel] = (),
    ) -> None:
        self._ctx = ctx
        self._cfg = ctx.config
        #: The models this license's enclaves receive, read from its record at link time
        #: (a change to the borrower's models applies on the next link); the others are
        #: never sent on this link.
        self._models = tuple(m for m in ctx.models if record.may_receive(m.name))
        #: The largest cost of one request under the terms of the models lent, so that a
        #: parked request costing more than half a lease is still topped up (Q13).
        largest = max((m.max_cost or 1 for m in self._models), default=1)
        self._reserve = min(largest, self._cfg.lease)
        self._ledger = ctx.ledger
        self._channel = channel
        self.identity = identity
        self._record = record
        self._instance_id = instance_id
        self._finished = trio.Event()
        self._cancel_scope = trio.CancelScope()
        self._wakeup = trio.Event()
        #: Woken to read the ledger (not only to send a grant committed elsewhere).
        self._sync_due = True
        #: The newest grant committed by a supply for this instance, not yet sent, and the
        #: supply it leaves the borrower after it.
        self._committed: tuple[LedgerGrant, int] | None = None
        #: The granted total the enclave has been sent (``granted_total`` is set before
        #: the send), and an event set each time it grows or the session ends.
        self._sent_total = 0
        self._sent = trio.Event()
        #: The ledger's view of this instance, kept current by this session alone.
        self.granted_total = 0
        self.served_total = 0
        #: Units it gave back (recalls answered, I20), as the ledger recorded them.
        self.returned_total = 0
        #: Units to recall from it when its pump next runs (0: none), and whether a
        #: recall it was sent is still unanswered (one at a time).
        self._recall_due = 0
        self.recall_pending = False
        self._recall_ids = itertools.count(1)
        #: The instance the recall due or unanswered is for (told when it is answered).
        self._recall_for: EnclaveSession | None = None
        #: A recall of its answered with nothing: not asked again until it reports usage
        #: (its units are held by running requests), or recalls would spin.
        self.recall_dry = False
        #: Version 4. Its latest demand (docs/links.md, "Version 4"): units its parked
        #: requests lack, as of its granted total ``_demand_base``, and how many wait.
        self.demand_units = 0
        self.parked_requests = 0
        self._demand_base = 0
        #: Units asked of donors for its demand, by donor, not answered yet.
        self._asked: dict[str, int] = {}
        #: Whether the enclave was last told ``block``; that block's id, and whether
        #: the enclave acknowledged it (I25).
        self.told_blocked = False
        self._block_ids = itertools.count(1)
        self.block_id = 0
        self.block_acknowledged = False
        #: All models delivered; grants and blocks may flow.
        self.ready = False
        #: What the enclave's hello says it holds, by name (version 3).
        self._held = {entry.name: entry for entry in held}
        #: The model whose answer is awaited (sent or being sent), if any.
        self._pending: ModelFile | None = None
        self._answer_send, self._answers = trio.open_memory_channel[ModelLoaded | ModelLoadFailed](
            1
        )
        #: Models the enclave reported it could not load on this link, by name: reason.
        self.failed_models: dict[str, str] = {}
        #: The enclave sent its final return: it stopped cleanly; nothing more is sent.
        self.stopped = False

    def __repr__(self) -> str:
        return (
            f"<EnclaveSession {self.borrower} {self._instance_id[:8]} ready={self.ready} "
            f"granted={self.granted_total} served={self.served_total}>"
        )

    # LiveSession
    @property
    def borrower(self) -> str:
        return self._record.borrower

    @property
    def license_id(self) -> str:
        return self._record.license_id

    @property
    def instance_id(self) -> str:
        return self._instance_id

    @property
    def finished(self) -> trio.Event:
        return self._finished

    def wake(self) -> None:
        self._sync_due = True
        self._wakeup.set()

    @property
    def grant_plan(self) -> GrantPlan:
        """The grant rule for this link, for a ledger transaction to run (a supply's).

        An instance with demand is topped up to its lease; one without leaves the units
        its borrower's other instances lack to them (grants go first where requests
        wait, I24)."""
        need = self.need
        held_back = 0 if need else self._ctx.registry.need(self.borrower, self._instance_id)
        return functools.partial(
            _plan, lease=self._cfg.lease, reserve=self._reserve, need=need, held_back=held_back
        )

    @property
    def need(self) -> int:
        """Units its parked requests lack now: its demand less what it was granted since
        the enclave counted it (never below 0; a claimed total above ours counts as ours)."""
        if not self.parked_requests:
            return 0
        granted_since = max(self.granted_total - self._demand_base, 0)
        return max(self.demand_units - granted_since, 0)

    @property
    def outstanding(self) -> int:
        """Units granted to this instance and neither reported served nor given back."""
        return max(self.granted_total - self.served_total - self.returned_total, 0)

    def recall(self, units: int, asker: EnclaveSession | None = None) -> bool:
        """Ask the enclave, soon, to give back up to ``units`` idle units for ``asker``
        (its pump sends the ``recall``; the ledger credits only what its ``returned``
        confirms, I20). Returns whether it will be asked: one recall at a time."""
        if units <= 0 or self.recall_pending or self._recall_due or self.stopped:
            return False
        self._recall_due = units
        self._recall_for = asker
        self._wakeup.set()
        return True

    def _recall_settled(self, donor: str) -> None:
        """A recall asked for this instance was answered (or its donor went): look again."""
        if self._asked.pop(donor, None) is not None:
            self.wake()

    def _settle_recall(self) -> None:
        asker, self._recall_for = self._recall_for, None
        if asker is not None:
            asker._recall_settled(self._instance_id)

    def finish(self) -> None:
        """The session has ended: say so to whoever waits on it."""
        self._finished.set()
        self._sent_changed()
        self._recall_due = 0
        self._settle_recall()  # whoever waits for our units looks elsewhere

    async def wait_sent(self, granted_total: int) -> None:
        """Return once a grant bringing the instance to ``granted_total`` (or beyond) is
        on the wire, or the session has ended."""
        while self._sent_total < granted_total and not self._finished.is_set():
            await self._sent.wait()

    def _sent_changed(self) -> None:
        self._sent.set()
        self._sent = trio.Event()

    def grant_committed(self, grant: LedgerGrant, remaining: int) -> None:
        """Send ``grant``, committed by someone else's transaction, as soon as possible."""
        if self._committed is None or grant.cumulative > self._committed[0].cumulative:
            self._committed = (grant, remaining)
        self._wakeup.set()

    def close(self) -> None:
        log.info("enclave_session_closing")
        self._cancel_scope.cancel()

    # --- running ---------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the link until it ends.

        Raises:
            LinkDead, ChannelError, RemoteProtocolError, PeerError, trio.TooSlowError:
                the link ended (see the module docstring); the caller logs it.
        """
        log.info("enclave_linked")
        with self._cancel_scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive_loop)
                    nursery.start_soon(self._heartbeats)
                    nursery.start_soon(self._deliver_then_pump)
            except BaseExceptionGroup as group:
                ours, _ = group.split(RemoteProtocolError)
                if ours is not None:
                    error = first_leaf(ours)  # if several tasks saw one, the first says why
                    if isinstance(error, RemoteProtocolError):
                        await send_last_words(self._channel, error.code, error.message[:200])
                raise
        if self._cancel_scope.cancelled_caught:
            log.info("enclave_session_closed")

    async def _send(self, message: Message) -> None:
        # A bare cancel scope: trio.fail_after's context manager costs a generator on
        # every message, heartbeats included.
        with trio.CancelScope(deadline=trio.current_time() + self._cfg.send_timeout) as scope:
            await self._channel.send(message)
        if scope.cancelled_caught:
            raise trio.TooSlowError(f"sending {message.TYPE} took {self._cfg.send_timeout} s")

    async def _heartbeats(self) -> None:
        clock = self._ctx.heartbeat_clock
        phase = clock.take_phase() if clock is not None else 0
        for seq in itertools.count(1):
            await self._send(Heartbeat(seq=seq))
            if clock is None:
                await trio.sleep(self._cfg.heartbeat_interval)
            else:
                await clock.wait(phase)

    async def _receive_loop(self) -> None:
        dead_after = self._cfg.dead_after
        # One deadline for the link's silence, moved as each message arrives (a cancel
        # scope per message cost more than the heartbeat it waited for); the handling of
        # a message is not under it, as a wait for the ledger is not the enclave's silence.
        with trio.CancelScope() as silence:
            while True:
                silence.deadline = trio.current_time() + dead_after
                message = await self._channel.receive()
                if isinstance(message, Heartbeat):
                    continue
                silence.deadline = math.inf
                if isinstance(message, UsageReport):
                    await self._on_usage(message)
                elif isinstance(message, Returned):
                    await self._on_returned(message)
                elif isinstance(message, Demand):
                    self._on_demand(message)
                elif isinstance(message, BlockAck):
                    self._on_block_ack(message)
                elif isinstance(message, ModelLoaded | ModelLoadFailed):
                    self._on_answer(message)
                else:  # the state machine lets nothing else from an enclave through
                    raise RemoteProtocolError(f"unexpected {message.TYPE}", field="type")
        log.warning("enclave_link_dead", silent_for=dead_after)
        raise LinkDead(f"no message from the enclave for {dead_after} s")

    # --- model transfer ----------------------------------------------------------------

    async def _deliver_then_pump(self) -> None:
        try:
            for model in self._models:
                await self._deliver(model)
            await self._resync()
        except LocalProtocolError:
            if not self.stopped:
                raise
            # It stopped (a final return) before it was ever synced: nothing more to send.
            log.info("enclave_stopped_before_sync")
            return
        self.ready = True
        while not self.stopped:
            if self._recall_due and not self.recall_pending:
                await self._push_recall()
            if self._committed is not None:
                (grant, remaining), self._committed = self._committed, None
                await self._push_grant(grant, remaining)
            if self._sync_due:
                self._sync_due = False
                await self._sync()
            await self._wakeup.wait()
            self._wakeup = trio.Event()

    def _on_answer(self, answer: ModelLoaded | ModelLoadFailed) -> None:
        """An enclave's answer about a model: it must be the model under way."""
        pending = self._pending
        if pending is None:
            raise RemoteProtocolError(f"{answer.TYPE} for no model sent", field="type")
        if answer.name != pending.name or not hmac.compare_digest(answer.sha256, pending.sha256):
            log.error(
                "model_loaded_mismatch",
                model=pending.name,
                answer=answer.TYPE,
                got_name=answer.name[:64],
                got_sha256=answer.sha256.hex(),
            )
            raise RemoteProtocolError(
                f"{answer.TYPE} does not match the model sent", field="sha256"
            )
        self._pending = None
        self._answer_send.send_nowait(answer)

    def _holds(self, model: ModelFile) -> bool:
        """Whether the enclave's hello says it holds exactly these bytes under these terms."""
        held = self._held.get(model.name)
        return (
            held is not None
            and hmac.compare_digest(held.sha256, model.sha256)
            and hmac.compare_digest(held.terms_sha256, terms_digest(model.terms))
        )

    async def _deliver(self, model: ModelFile) -> None:
        size = len(model.data)
        started = trio.current_time()
        self._pending = model  # before the first send: an answer may come back at once
        if self._holds(model):
            await self._send(
                ModelKeep(name=model.name, size=size, sha256=model.sha256, terms=model.terms)
            )
            sent = 0
        else:
            sent = await self._stream(model)
        with trio.fail_after(self._cfg.model_loaded_timeout):
            answer = await self._answers.receive()
        if isinstance(answer, ModelLoadFailed):
            self.failed_models[model.name] = answer.reason
            self._ctx.model_event(model.name, "failed", sent)
            log.error(
                "model_load_failed",
                model=model.name,
                instance=self._instance_id,
                code=answer.code.value,
                reason=answer.reason[:300],
                sha256=model.sha256.hex(),
                bytes_sent=sent,
            )
            return
        if sent == 0:
            self._ctx.model_event(model.name, "kept", 0)
            log.info("model_transfer_skipped", model=model.name, size=size)
            return
        self._ctx.model_event(model.name, "loaded", sent)
        log.info(
            "model_delivered",
            model=model.name,
            size=size,
            seconds=round(trio.current_time() - started, 3),
        )

    async def _stream(self, model: ModelFile) -> int:
        """``model_begin``, the chunks, ``model_end``; return the model bytes sent. An
        enclave that refuses the model while it streams ends the chunks early."""
        size = len(model.data)
        log.info("model_transfer_started", model=model.name, size=size, sha256=model.sha256.hex())
        await self._send(
            ModelBegin(
                name=model.name,
                size=size,
                sha256=model.sha256,
                terms=model.terms,
                metadata=model.metadata,
            )
        )
        view = memoryview(model.data)
        next_tenth = 1
        sent = 0
        for offset in range(0, size, MODEL_CHUNK_BYTES):
            if self._pending is None:  # answered already: refused at model_begin
                log.info("model_transfer_abandoned", model=model.name, sent=sent, size=size)
                break
            done = min(offset + MODEL_CHUNK_BYTES, size)
            await self._send(ModelChunk(offset=offset, data=view[offset:done]))
            sent = done
            if done * 10 >= next_tenth * size:
                next_tenth = done * 10 // size + 1
                log.info(
                    "model_transfer_progress",
                    model=model.name,
                    sent=done,
                    size=size,
                    percent=done * 100 // size,
                )
        await self._send(ModelEnd(name=model.name))
        return sent

    # --- grants, blocks and usage -------------------------------------------------------

    async def _resync(self) -> None:
        """After every model is loaded: ``block``, or the instance's last grant again.

        An instance never granted anything has no grant to re-send (a grant carries at
        least one unit): it gets its first grant if supply allows, else ``unblock``, so
        every new link hears one of ``block``, ``grant`` or ``unblock`` after its models
        (the enclave resumes serving, or parks requests, only once it has).
        """
        borrower, instance = self.borrower, self._instance_id
        last = await self._ledger.last_grant(borrower, instance)
        self.served_total = await self._ledger.served_total(borrower, instance)
        self.granted_total = last.cumulative if last is not None else 0
        known = await self._ledger.instance(borrower, instance)
        self.returned_total = known.returned if known is not None else 0
        balance = await self._ledger.balance(borrower)
        if balance.blocked:
            await self._push_block()
        elif last is not None:
            await self._send(
                Grant(grant_id=last.grant_id, units=last.units, granted_total=last.cumulative)
            )
            log.info("grant_resynced", granted_total=last.cumulative, grant_id=last.grant_id)
        elif not await self._sync():
            await self._send(Unblock())
            log.info("unblock_resynced")

    async def _push_recall(self) -> None:
        units, self._recall_due = min(self._recall_due, MAX_GRANT_UNITS), 0
        recall_id = next(self._recall_ids)
        self.recall_pending = True
        try:
            await self._send(Recall(recall_id=recall_id, units=units))
        except LocalProtocolError:
            self.recall_pending = False
            self._settle_recall()
            if not self.stopped:
                raise
            return  # it stopped meanwhile: its final return gives everything back
        log.info("recall_sent", recall_id=recall_id, units=units)

    def _ask_recalls(self, balance: Balance) -> None:
        """Recall for this instance's demand what the borrower's remaining supply cannot
        cover (I24): from instances with no request parked, the one holding most first,
        never more than the demand still lacks after grants and recalls under way, and
        never beyond what this instance's lease has room for (a demand is a claim)."""
        if balance.blocked or balance.remaining > 0 or self.stopped:
            return
        room = self._cfg.lease - self.outstanding
        want = min(self.need, room) - sum(self._asked.values())
        if want <= 0:
            return
        for donor in self._ctx.registry.recall_donors(self.borrower, self._instance_id):
            units = min(want, donor.outstanding)
            if donor.recall(units, self):
                self._asked[donor.instance_id] = units
                log.info(
                    "recall_asked", donor=donor.instance_id, units=units, holds=donor.outstanding
                )
                want -= units
                if want <= 0:
                    return

    def _on_demand(self, demand: Demand) -> None:
        """The enclave's parked requests lack ``demand.units`` (version 4): grant them
        first, recall for them what supply cannot cover. A claim bounded by the message's
        limits and, in what it can draw, by the lease."""
        was_waiting = self.parked_requests > 0
        self.demand_units = demand.units
        self.parked_requests = demand.parked_requests
        self._demand_base = demand.granted_total
        log.debug(
            "demand_received",
            seq=demand.seq,
            units=demand.units,
            parked_requests=demand.parked_requests,
            need=self.need,
        )
        if self.ready and self.need:
            self.wake()
        elif was_waiting and not self.parked_requests and self.outstanding:
            # Nobody waits here any more: what it holds may go where requests wait.
            self._ctx.registry.wake_needy(self.borrower, self._instance_id)

    def _on_block_ack(self, ack: BlockAck) -> None:
        """The enclave starts nothing more until an unblock (I25). Only the current
        block's acknowledgement counts; a repeated or stale one changes nothing."""
        if not self.told_blocked or ack.block_id != self.block_id or self.block_acknowledged:
            log.debug("block_ack_ignored", block_id=ack.block_id, current=self.block_id)
            return
        self.block_acknowledged = True
        log.info(
            "block_acknowledged",
            borrower=self.borrower,
            instance=self._instance_id,
            block_id=ack.block_id,
        )
        self._ctx.registry.block_acknowledged(self.borrower)

    async def _push_block(self) -> None:
        reason = self._ctx.registry.block_reason(self.borrower)
        # Before the send: the acknowledgement may be read before the send returns.
        self.block_id = block_id = next(self._block_ids)
        self.block_acknowledged = False
        self.told_blocked = True
        await self._send(Block(block_id=block_id, reason=reason))
        log.info("block_pushed", reason=reason, block_id=block_id)

    async def _sync(self) -> bool:
        """Push a block, an unblock or a grant if the ledger says one is due.

        Returns:
            Whether a message was sent.
        """
        # The balance and the grant in one ledger transaction (one trip to its thread).
        balance, grant = await self._ledger.grant_due(
            self.borrower, self._instance_id, self.grant_plan
        )
        if balance.blocked:
            if self.told_blocked:
                return False
            await self._push_block()
            return True
        sent = self.told_blocked
        if self.told_blocked:
            await self._send(Unblock())
            self.told_blocked = self.block_acknowledged = False
            log.info("unblock_pushed")
        if grant is not None:
            await self._push_grant(grant, balance.remaining - grant.units)
            sent = True
            balance = dataclasses.replace(balance, remaining=balance.remaining - grant.units)
        if balance.remaining == 0 and self.outstanding == 0:
            log.info("quota_exhausted", granted_total=self.granted_total)
        if self.need:
            self._ask_recalls(balance)
        return sent

    async def _push_grant(self, grant: LedgerGrant, remaining: int) -> None:
        """Send a durable grant, unless a newer one (a higher total) went out already."""
        if grant.cumulative <= self.granted_total:
            return
        self.granted_total = grant.cumulative
        # When the push started, for the log below: its own timestamp comes after the send
        # and after whatever ran in between (a log line before the send would delay it).
        send_started = time.time()
        try:
            await self._send(
                Grant(grant_id=grant.grant_id, units=grant.units, granted_total=grant.cumulative)
            )
        except LocalProtocolError:
            if not self.stopped:
                raise
            # Committed while the final return was on its way: never sent, so the enclave
            # never held it; it stays in doubt for this instance until the owner reclaims.
            log.warning("grant_unsent_after_stop", units=grant.units, grant_id=grant.grant_id)
            return
        self._sent_total = max(self._sent_total, grant.cumulative)
        self._sent_changed()
        log.info(
            "grant_pushed",
            units=grant.units,
            granted_total=grant.cumulative,
            grant_id=grant.grant_id,
            remaining=remaining,
            send_started=round(send_started, 6),
        )

    async def _on_usage(self, report: UsageReport) -> None:
        borrower = self.borrower
        result = await self._ledger.record_usage(
            borrower,
            self._instance_id,
            report.served_total,
            report.seq,
            requests_total=report.requests_total,
        )
        donor_again = result.served_total != self.served_total and not self.parked_requests
        if result.served_total != self.served_total:
            self.recall_dry = False  # its running requests ended: it may hold idle units
        self.served_total = result.served_total
        if result.over_grant:
            log.error(
                "enclave_over_grant",
                served_total=result.served_total,
                granted_total=result.granted,
            )
        # Durable now: acknowledge with the report's own numbers (the enclave checks them).
        await self._send(UsageAck(seq=report.seq, served_total=report.served_total))
        balance = result.balance
        log.info(
            "consumption_report",
            borrower=borrower,
            instance=self._instance_id,
            served=result.served_total,
            borrower_served=balance.served,
            remaining=max(balance.supplied - balance.served, 0),
            seq=report.seq,
        )
        # Wake the pump only when this report calls for a message (a grant, a block or an
        # unblock) or ends the quota: a busy enclave reports tens of times a second, and a
        # ledger trip for nothing would cost every one of them.
        exhausted = balance.remaining == 0 and self.outstanding == 0
        due = (
            self.grant_plan(balance, self.granted_total - self.returned_total, self.served_total)
            > 0
        )
        # A need the report did not cover (its lease had no room before) may now be
        # recalled for.
        if self.ready and (balance.blocked != self.told_blocked or exhausted or due or self.need):
            self.wake()
        if donor_again and self.outstanding:
            self._ctx.registry.wake_needy(self.borrower, self._instance_id)

    async def _on_returned(self, returned: Returned) -> None:
        """Record a return (its served total first), then acknowledge the recorded total;
        refuse one the ledger refuses (I20)."""
        result = await self._ledger.record_return(
            self.borrower,
            self._instance_id,
            returned_total=returned.returned_total,
            served_total=returned.served_total,
            requests_total=returned.requests_total,
            final=returned.final,
            recall_id=returned.recall_id,
        )
        self.served_total = result.served_total
        if returned.recall_id is not None:
            self.recall_pending = False
            self.recall_dry = not result.credited
        if result.refused is not None:
            self._settle_recall()
            log.error(
                "enclave_return_refused",
                reason=result.refused,
                returned_total=returned.returned_total,
                served_total=result.served_total,
                granted_total=result.granted,
                final=returned.final,
            )
            raise RemoteProtocolError(f"return refused: {result.refused}", field="returned_total")
        self.returned_total = result.returned_total
        if returned.final:
            self.stopped = True
            self.ready = False  # a supply plans no grant for it any more
            self._wakeup.set()  # the pump sees it and ends
        await self._send(
            ReturnAck(recall_id=returned.recall_id, returned_total=result.returned_total)
        )
        balance = result.balance
        log.info(
            "units_returned",
            borrower=self.borrower,
            instance=self._instance_id,
            recall_id=returned.recall_id,
            credited=result.credited,
            returned_total=result.returned_total,
            served=result.served_total,
            final=returned.final,
            remaining=balance.remaining,
            in_doubt=balance.in_doubt,
        )
        if returned.recall_id is not None:
            self._settle_recall()  # the asker looks again: grants what came back, or asks on
        if result.credited:
            # Supply is back: others may want it (those without demand leave what the
            # askers lack to them). A recall's units are not for this one to take again.
            for session in self._ctx.registry.sessions(self.borrower):
                if session is not self or returned.recall_id is None:
                    session.wake()


def _plan(
    balance: Balance,
    granted_total: int,
    served_total: int,
    *,
    lease: int,
    reserve: int,
    need: int = 0,
    held_back: int = 0,
) -> int:
    """The units to grant an instance now (a :data:`GrantPlan` once ``lease``,
    ``reserve``, its ``need`` and the units ``held_back`` for others are bound)."""
    return plan_grant(
        remaining=balance.remaining - held_back,
        granted_total=granted_total,
        served_total=served_total,
        lease=lease,
        reserve=reserve,
        need=need,
    )
