"""The enclave's link to its custodian: dial, attest, receive models and grants, report usage.

Theory of operation
-------------------
:class:`CustodianLink` feeds the shared :class:`~.runtime.EnclaveRuntime` (quota,
accounting, models; the consumer server reads it). It dials the custodian forever
(:class:`Backoff`), verifies it against the pinned CA inside the TLS handshake
(``enclave_client_context``), says ``hello`` with the license and this process's
instance id, then runs one *session* per connection (``docs/links.md``, custodian link):

* a handler in the channel's reader task (``MessageChannel.set_handler``, so a grant
  wakes parked requests without a hand-over to another task): model transfers (a
  :class:`~.model_receiver.ModelReceiver` per ``model_begin``; on ``model_end`` a task
  loads the session off the event loop and answers ``model_loaded``), grants, usage
  acknowledgements, ``block``/``unblock``, heartbeats;
* a watchdog: the link is dead after ``heartbeat_interval * heartbeat_misses`` without
  any message;
* a heartbeat sender (every ``heartbeat_interval``);
* a reporter that sends :meth:`Accounting.next_report` when
  :meth:`Accounting.report_due_at` says a report is due (at once after a quiet period,
  soon when the custodian needs it to refill, else once a period), and before any
  report the returns :meth:`Accounting.next_return` has queued (a recall's answer, or
  the final return of a clean stop: docs/links.md, *Returning units*), so one task
  orders them and no report follows a final return. Version 4: the same task sends
  ``block_ack`` once a block holds, and ``demand`` when what the parked requests lack
  changes (at most one per ``report_spacing``, after a report of what was served).

Kill switch: the quota starts suspended (``CUSTODIAN_UNREACHABLE``). The moment a session
ends, for whatever reason (EOF, error, missed heartbeats, a protocol error, shutdown), the
task that saw it calls :meth:`EnclaveRuntime.link_lost` *before* anything else awaits, so
parked and new requests fail at once. On a new verified link, the quota resumes only once
the link is *synced*: hello done, every model transfer finished loading, and the
custodian's first ``grant`` (its re-sent total), ``unblock`` or ``block`` received.
Grants are totals (:meth:`Accounting.on_grant`), so the re-sent one adds nothing twice.

Redials: every session that ends before the link reached the serving state (its first
grant, block or unblock) counts as a failure, however far it got (a refusal after the
hello), so the delay grows, exponentially and jittered, until a session serves; only
then does it start again from ``backoff_initial``. A refusal that retrying cannot fix
(:func:`classify`: the license is in use or refused, the custodian's policy refused this
enclave's attestation, the custodian's certificate is not the pinned CA's) is logged at
error level with its reason and what to do, and its delay grows to
``refused_backoff_max`` (a minute) rather than ``backoff_max``, so a refused enclave
costs its custodian a trickle of connections. Any other failure (a custodian that is
down, a cut link, a ``busy`` answer) is retried within ``backoff_max``: a custodian that
comes back is re-joined soon.

One refusal is retryable by design: a custodian whose collateral cache has not seen this
enclave's platform yet judges the first handshake without collateral, refuses it (a TLS
alert, the same as a policy refusal: no error code can be sent before the handshake
ends) and fetches that platform's collateral at once (docs/links.md, "Collateral and the
handshake"). So the first ``soon_retries`` attestation refusals in a row are redialled
within ``soon_delay`` (seconds), whatever the delay had grown to; after them the delay
grows as for any refusal. A policy that really refuses the enclave costs the custodian
those few dials once per run of refusals, then the trickle.

Models stay in memory across reconnects. Version 3 (docs/links.md, "Version 3"): the
``hello`` lists them (``held``: name, SHA-256, digest of the terms), and the custodian
answers a model held with the same bytes under the same terms with ``model_keep``
instead of streaming it again; the enclave checks that ``model_keep`` names exactly the
session it holds (digest and terms) before it confirms with ``model_loaded``, else
answers ``model_load_failed`` (``not_held``). A re-streamed model whose SHA-256 and
terms match the loaded one is checked (size and digest) and confirmed without creating
a new session.

A model that does not load (:class:`~.model_host.ModelError`, a ``MemoryError``, or
larger than ``max_model_bytes``, which is refused at ``model_begin`` so its bytes are
dropped as they arrive, never held) is reported to the custodian with
``model_load_failed`` (code and reason) and logged at error level; the link goes on,
the other models serve, and consumers asking for that one get ``model_unavailable``
(:meth:`EnclaveRuntime.load_failed`).
"""

from __future__ import annotations

import enum
import functools
import itertools
import math
import secrets
from dataclasses import dataclass
from typing import Final

import structlog
import trio
from OpenSSL import SSL

from drm_wire.errors import DrmError, ErrorCode, PeerError, RemoteProtocolError, first_leaf
from drm_wire.limits import (
    HANDSHAKE_TIMEOUT,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_MISSES,
    MAX_MODEL_BYTES,
    MiB,
)
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
    ReturnAck,
    Unblock,
    UsageAck,
    terms_digest,
)
from drm_wire.net.channel import MessageChannel, open_channel
from drm_wire.net.ratls_context import VerifiedCustodian
from drm_wire.net.tls import PeerVerificationError, TLSStream, open_tls_client
from drm_wire.protocol import Link, Side

from .identity import License
from .model_host import HostedModel, ModelError, load_model
from .model_receiver import ModelReceiver
from .runtime import EnclaveRuntime

__all__ = [
    "SOFTWARE",
    "Backoff",
    "CustodianLink",
    "LinkLost",
    "LinkTiming",
    "Outcome",
    "backoff_delay",
    "classify",
]

#: What we announce in ``hello``.
SOFTWARE: Final = "drm-enclave/0.1"
#: The most bytes of model names ``hello``'s ``held`` may carry (a header is at most 64
#: KiB): a model past it is not claimed, and simply streamed again.
HELD_NAMES_BUDGET: Final = 16 * 1024
#: The longest reason ``model_load_failed`` carries (the detail stays in our log).
_MAX_FAILURE_REASON: Final = 300

_log = structlog.get_logger("drm_enclave.custodian_link")
_random = secrets.SystemRandom()


class LinkLost(DrmError):
    """The custodian sent nothing for ``heartbeat_interval * heartbeat_misses`` seconds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkTiming:
    """The custodian link's timings (seconds); tests shrink them.

    Attributes:
        heartbeat_interval: how often we send a heartbeat.
        heartbeat_misses: intervals without any message before the link is dead.
        backoff_initial: the first redial delay (before jitter).
        backoff_max: the cap on the redial delay: a custodian that comes back is
            re-joined within this long.
        refused_backoff_max: the cap after a refusal that retrying cannot fix (see
            :func:`classify`): a minute, so that a refused enclave costs its custodian a
            connection a minute, and the operator has time to read the error.
        soon_retries, soon_delay: attestation refusals in a row redialled within
            ``soon_delay`` (the custodian may be fetching this platform's collateral),
            before the delay grows as after any refusal.
        handshake_timeout: TCP connect, and separately the TLS handshake.
        report_spacing: the least time between two usage reports, urgent ones included
            (see :mod:`~drm_enclave.accounting`): an urgent report waits this long after
            the last one, so under load one report carries what was served meanwhile. It
            must stay far below the time a quarter lease lasts (refills are planned from
            reports): 250 units at 2,000 inferences a second is 125 ms.
        report_period: the longest the custodian's view of usage lags while the instance
            serves and nothing is urgent, and the quiet time after which a report goes at
            once. One report (a ledger row) per period at most, besides urgent ones.
    """

    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_misses: int = HEARTBEAT_MISSES
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    refused_backoff_max: float = 60.0
    soon_retries: int = 3
    soon_delay: float = 2.0
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    report_spacing: float = 0.01
    report_period: float = 1.0

    @property
    def dead_after(self) -> float:
        """Silence after which the link is declared dead."""
        return self.heartbeat_interval * self.heartbeat_misses


def backoff_delay(failures: int, timing: LinkTiming, *, cap: float | None = None) -> float:
    """Delay before redial number ``failures + 1``: exponential, capped, in [c/2, c] where
    ``c`` is ``backoff_initial * 2**failures`` capped at ``cap`` (default ``backoff_max``)."""
    cap = timing.backoff_max if cap is None else cap
    ceiling = min(cap, timing.backoff_initial * 2 ** min(failures, 32))
    return _random.uniform(ceiling / 2, ceiling)


class Outcome(enum.Enum):
    """How a session (or a dial) ended, for :class:`Backoff`."""

    #: The link reached the serving state (a grant, block or unblock): start again.
    SERVED = "served"
    #: Anything retrying may fix (custodian down, link cut, ``busy``): grow, capped soon.
    FAILED = "failed"
    #: A refusal retrying cannot fix: grow to ``refused_backoff_max``.
    REFUSED = "refused"
    #: The custodian's policy refused our attestation in the handshake: perhaps only
    #: until its collateral cache has this platform's collateral, so the first
    #: ``soon_retries`` in a row are redialled soon; then as ``REFUSED``.
    ATTESTATION_REFUSED = "attestation_refused"


@dataclass(slots=True)
class Backoff:
    """The redial schedule: grows with every session that did not serve (module docstring).

    Attributes:
        failures: sessions since the last one that served.
        refused_in_a_row: attestation refusals since any other outcome.
    """

    timing: LinkTiming
    failures: int = 0
    refused_in_a_row: int = 0

    @property
    def soon(self) -> bool:
        """Whether the last delay was a soon redial after an attestation refusal."""
        return 0 < self.refused_in_a_row <= self.timing.soon_retries

    def next_delay(self, outcome: Outcome) -> float:
        """The delay before the next dial, after a session that ended with ``outcome``."""
        if outcome is Outcome.ATTESTATION_REFUSED:
            self.refused_in_a_row += 1
            self.failures += 1
            if self.soon:
                return _random.uniform(self.timing.soon_delay / 2, self.timing.soon_delay)
            return backoff_delay(self.failures, self.timing, cap=self.timing.refused_backoff_max)
        self.refused_in_a_row = 0
        if outcome is Outcome.SERVED:
            self.failures = 0
            return backoff_delay(0, self.timing)
        self.failures += 1
        cap = self.timing.refused_backoff_max if outcome is Outcome.REFUSED else None
        return backoff_delay(self.failures, self.timing, cap=cap)


#: What the custodian's error codes mean for this enclave, and what to do about them.
_REFUSALS: Final = {
    ErrorCode.DUPLICATE_INSTANCE: (
        "license_in_use",
        "the license's live enclave instances are at its cap (one, unless the owner set "
        "max_instances): stop one, or ask the owner to raise the cap",
    ),
    ErrorCode.ATTESTATION_FAILED: (
        "license_refused",
        "the custodian does not know this license: check that --license is the file the "
        "owner's `drm_custodian init` made for this custodian",
    ),
    ErrorCode.INSTANCE_RETIRED: (
        "instance_retired",
        "the custodian retired this instance (it stopped cleanly, or the owner wrote its "
        "units off after losing it): restart the enclave process, which links as a new "
        "instance",
    ),
    ErrorCode.UNSUPPORTED_VERSION: (
        "unsupported_version",
        "the custodian speaks another protocol version: upgrade the older side",
    ),
    ErrorCode.PROTOCOL_ERROR: (
        "protocol_error",
        "the custodian found this enclave's messages malformed: a bug; report it",
    ),
}
#: TLS alerts a custodian sends when it refuses our certificate (its policy refused us).
_REFUSED_ALERTS: Final = (
    "alert unknown ca",
    "alert bad certificate",
    "alert certificate unknown",
    "alert access denied",
    "alert certificate required",
    "alert handshake failure",
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal retrying cannot fix: a stable ``reason`` and what to do (``fix``).

    ``in_handshake``: the custodian's policy refused our attestation in the handshake,
    which a custodian still fetching this platform's collateral does too (redialled soon
    a few times: :attr:`Outcome.ATTESTATION_REFUSED`).
    """

    reason: str
    fix: str
    in_handshake: bool = False


def classify(exc: BaseException) -> Refusal | None:
    """The refusal ``exc`` stands for, or ``None`` if retrying may fix it."""
    if isinstance(exc, PeerError) and exc.code in _REFUSALS:
        reason, fix = _REFUSALS[exc.code]
        return Refusal(reason, f"{fix} (the custodian said: {exc.detail[:200]})")
    if isinstance(exc, PeerVerificationError):
        return Refusal(
            "custodian_not_trusted",
            "the custodian's certificate does not chain to the pinned CA: check "
            "--custodian-ca and --custodian (is it this owner's custodian?)",
        )
    chain: list[BaseException] = [exc]
    while (cause := chain[-1].__cause__) is not None and len(chain) < 8:
        chain.append(cause)
    text = " ".join(str(e) for e in chain).lower()
    if any(alert in text for alert in _REFUSED_ALERTS):  # the stream's words for an alert
        return Refusal(
            "attestation_refused",
            "the custodian's policy refused this enclave's attestation (TLS alert: "
            f"{_alert(text)}): ask the owner to accept this build (its policy must name the "
            "measurement `drm_enclave measure` prints) and, in simulation, this "
            "--simulation-dir's platform",
            in_handshake=True,
        )
    return None


def _alert(text: str) -> str:
    for alert in _REFUSED_ALERTS:
        if alert in text:
            return alert.removeprefix("alert ")
    return "refused"  # pragma: no cover - classify only calls it on a match


#: What ends a session or a dial attempt; anything else is a bug and propagates.
_LINK_ERRORS: Final = (
    DrmError,  # channel ended, peer error, protocol error, verification, bad model
    OSError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    SSL.Error,
)


class CustodianLink:
    """Keeps the enclave linked to its custodian; :meth:`run` never returns.

    Args:
        runtime: the shared state to feed.
        host, port: the custodian's enclave-link address.
        context: from ``enclave_client_context`` (our RA-TLS cert, the pinned CA).
        license: the borrower's license.
        instance_id: 32 hex characters, fixed for the process.
        intra_op_threads: onnxruntime threads per session.
        timing: heartbeats, backoff and handshake deadline.
        max_model_bytes: the largest model this enclave takes (``max_model_mib``): a
            larger one is refused at ``model_begin`` with ``model_load_failed``
            (``too_large``), before any of its bytes is held.
    """

    def __init__(
        self,
        runtime: EnclaveRuntime,
        *,
        host: str,
        port: int,
        context: SSL.Context,
        license: License,
        instance_id: str,
        intra_op_threads: int = 1,
        timing: LinkTiming | None = None,
        max_model_bytes: int = MAX_MODEL_BYTES,
    ) -> None:
        self._runtime = runtime
        self._host = host
        self._port = port
        self._context = context
        self._license = license
        self._instance_id = instance_id
        self._threads = intra_op_threads
        self._timing = timing or LinkTiming()
        self._max_model_bytes = max_model_bytes
        #: The transfer under way, and the SHA-256 its model_begin announced.
        self._receiver: tuple[ModelReceiver, ModelBegin] | None = None
        #: A transfer refused at its model_begin: its chunks are dropped until model_end.
        self._refused: ModelBegin | None = None
        #: The current session reached the serving state (a grant, block or unblock).
        self._served = False
        #: The refusal that ended the last attempt, if retrying cannot fix it.
        self._refusal: Refusal | None = None
        self.backoff = Backoff(self._timing)
        #: When the session last heard from the custodian (trio's clock), for _watchdog.
        self._heard_at = 0.0

    def __repr__(self) -> str:
        return f"<CustodianLink {self._host}:{self._port} {self._runtime.state.value}>"

    def set_context(self, context: SSL.Context) -> None:
        """Dial with ``context`` (a re-stapled certificate: :mod:`~drm_enclave.staple`)
        from the next dial on; a live session keeps the connection it has."""
        self._context = context

    async def run(self) -> None:
        """Dial, run a session, and redial with backoff, until cancelled."""
        for attempt in itertools.count(1):
            with structlog.contextvars.bound_contextvars(
                peer=f"{self._host}:{self._port}", conn_id=attempt, role="custodian"
            ):
                await self._attempt(_log)
                if self._served:
                    outcome = Outcome.SERVED
                elif self._refusal is not None and self._refusal.in_handshake:
                    outcome = Outcome.ATTESTATION_REFUSED
                elif self._refusal is not None:
                    outcome = Outcome.REFUSED
                else:
                    outcome = Outcome.FAILED
                delay = self.backoff.next_delay(outcome)
                if self._refusal is not None and not self._served:
                    # A soon redial may pass (the custodian fetching collateral): a warning.
                    (_log.warning if self.backoff.soon else _log.error)(
                        "custodian_refused",
                        reason=self._refusal.reason,
                        fix=self._refusal.fix,
                        retry_in=round(delay, 1),
                        retry_soon=self.backoff.soon,
                        failures=self.backoff.failures,
                    )
                else:
                    _log.info(
                        "custodian_redial",
                        delay=round(delay, 3),
                        failures=self.backoff.failures,
                    )
            await trio.sleep(delay)

    async def _attempt(self, log: structlog.typing.FilteringBoundLogger) -> None:
        """One dial and, if it verifies, one session; every way it can end is logged."""
        self._served = False
        self._refusal = None
        try:
            stream = await open_tls_client(
                self._host,
                self._port,
                self._context,
                handshake_timeout=self._timing.handshake_timeout,
            )
            await self._session(stream, log)
        except BaseExceptionGroup as group:
            matched, rest = group.split(_LINK_ERRORS)
            self._runtime.link_lost()
            if rest is not None:
                raise rest from None
            assert matched is not None
            self._failed(log, first_leaf(matched), matched)
        except _LINK_ERRORS as exc:
            self._runtime.link_lost()
            self._failed(log, exc)
        finally:
            self._runtime.link_lost()
            self._receiver = None
            self._refused = None

    def held(self) -> tuple[HeldModel, ...]:
        """The models this enclave holds a session for, as ``hello`` announces them."""
        held: list[HeldModel] = []
        budget = HELD_NAMES_BUDGET
        for name, model in self._runtime.models.items():
            budget -= len(name.encode())
            if budget < 0:
                break
            held.append(
                HeldModel(
                    name=name,
                    sha256=model.description.sha256,
                    terms_sha256=terms_digest(model.terms),
                )
            )
        return tuple(held)

    async def _session(self, stream: TLSStream, log: structlog.typing.FilteringBoundLogger) -> None:
        custodian = stream.peer_identity_as(VerifiedCustodian)
        async with open_channel(stream, Link.CUSTODIAN, Side.CLIENT) as channel:
            try:
                async with trio.open_nursery() as nursery:
                    connected = trio.Event()
                    channel.set_handler(
                        functools.partial(
                            self._handle,
                            channel=channel,
                            nursery=nursery,
                            connected=connected,
                            log=log,
                        )
                    )
                    welcome = await channel.hello(
                        role=PeerRole.ENCLAVE,
                        software=SOFTWARE,
                        license=self._license.hello_value(),
                        instance_id=self._instance_id,
                        held=self.held(),
                        hello_timeout=self._timing.handshake_timeout,
                    )
                    self._runtime.link_connected()
                    log.info(
                        "custodian_connected",
                        custodian_subject=custodian.certificate.subject.rfc4514_string(),
                        version=welcome.version,
                        custodian_software=welcome.software,
                        instance_id=self._instance_id,
                    )
                    self._heard_at = trio.current_time()
                    connected.set()
                    nursery.start_soon(self._heartbeats, channel)
                    nursery.start_soon(self._reports, channel, log)
                    nursery.start_soon(self._watchdog)
                    await channel.wait_ended()  # raises how it ended
            finally:
                self._runtime.link_lost()  # before the channel's (bounded) close

    # --- the session's tasks ----------------------------------------------------------

    async def _watchdog(self) -> None:
        """Declare the link dead after ``dead_after`` seconds without any message."""
        dead_after = self._timing.dead_after
        # A deadline that every message moves: sleeping to it costs nothing per message.
        while (due := self._heard_at + dead_after) > trio.current_time():  # noqa: ASYNC110
            await trio.sleep_until(due)
        self._runtime.link_lost()
        raise LinkLost(f"no message from the custodian for {dead_after} s")

    async def _handle(
        self,
        message: Message,
        *,
        channel: MessageChannel,
        nursery: trio.Nursery,
        connected: trio.Event,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """One message from the custodian, in the channel's reader task."""
        if not connected.is_set():  # came with the welcome: after the session's bookkeeping
            await connected.wait()
        self._heard_at = trio.current_time()
        if isinstance(message, Grant | Block | Unblock):
            self._served = True  # the serving state: the redial delay starts again
        if isinstance(message, Grant):
            await self._apply_grant(message, log)
            return
        try:
            self._dispatch(message, channel, nursery, log)
        except RemoteProtocolError:
            self._runtime.link_lost()  # at once; the reader then tells the custodian why
            raise

    async def _apply_grant(self, grant: Grant, log: structlog.typing.FilteringBoundLogger) -> None:
        """Apply a grant, and log it once the requests it woke have run.

        A log line is a write and wakes whoever reads the log: on a parked request's path
        it cost the push a tenth of a millisecond here. Two schedule points let every
        request the grant woke take its unit first (trio may run this task before or after
        them within a pass of the scheduler).
        """
        runtime = self._runtime
        added = runtime.on_grant(grant)
        left = runtime.quota.available
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        log.info(
            "grant_applied",
            grant_id=grant.grant_id,
            granted_total=grant.granted_total,
            added=added,
            inferences_left=left,
        )

    def _dispatch(
        self,
        message: Message,
        channel: MessageChannel,
        nursery: trio.Nursery,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        runtime = self._runtime
        if isinstance(message, Heartbeat):
            return
        if isinstance(message, ModelChunk):
            if self._refused is not None:
                return  # refused at model_begin: dropped, never held
            assert self._receiver is not None  # the state machine orders begin < chunk
            self._receiver[0].add(message)
        elif isinstance(message, ModelBegin):
            if message.size > self._max_model_bytes:
                self._refuse_transfer(message, channel, nursery, log)
                return
            self._receiver = (ModelReceiver(message), message)
            # Chunks are decrypted straight into their place in the model buffer.
            channel.set_payload_sink(ModelChunk.payload_sink(self._receiver[0].place))
            log.info("model_receiving", model=message.name, size=message.size)
        elif isinstance(message, ModelEnd):
            if self._refused is not None:
                self._refused = None  # answered at its model_begin already
                return
            assert self._receiver is not None
            channel.set_payload_sink(None)
            (receiver, begin), self._receiver = self._receiver, None
            buffer = receiver.finish(message)  # size and digest checked
            runtime.load_started()
            nursery.start_soon(self._load, channel, receiver, begin, buffer, log)
        elif isinstance(message, ModelKeep):
            runtime.load_started()
            nursery.start_soon(self._keep, channel, message, log)
        elif isinstance(message, UsageAck):
            runtime.on_ack(message)
            log.debug("usage_acked", seq=message.seq, served_total=message.served_total)
        elif isinstance(message, Recall):
            returned = runtime.on_recall(message)
            log.info(
                "units_recalled",
                recall_id=message.recall_id,
                asked=message.units,
                returned_total=returned.returned_total,
            )
        elif isinstance(message, ReturnAck):
            runtime.on_return_ack(message)
            log.info(
                "return_acked", recall_id=message.recall_id, returned_total=message.returned_total
            )
        elif isinstance(message, Block):
            runtime.on_block(message.reason, message.block_id)
        elif isinstance(message, Unblock):
            runtime.on_unblock()
        else:  # pragma: no cover - the state machine lets nothing else through
            raise RemoteProtocolError(f"{message.TYPE} is not for the enclave", field="type")

    async def _load(
        self,
        channel: MessageChannel,
        receiver: ModelReceiver,
        begin: ModelBegin,
        buffer: memoryview,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        name, sha256, terms = receiver.name, begin.sha256, begin.terms
        loaded = self._runtime.models.get(name)
        model: HostedModel | None = None
        try:
            # The terms are part of the model's identity (I14): a session is kept only for
            # the same bytes under the same terms (and the same shared metadata).
            if (
                loaded is None
                or loaded.description.sha256 != sha256
                or loaded.terms != terms
                or loaded.description.metadata != begin.metadata
            ):
                threads = self._threads
                failure: tuple[LoadFailure, str] | None = None
                try:
                    model = await trio.to_thread.run_sync(
                        functools.partial(  # finish() checked the digest: not twice
                            load_model,
                            name,
                            buffer,
                            intra_op_threads=threads,
                            sha256=sha256,
                            terms=terms,
                            metadata=begin.metadata,
                        ),
                        abandon_on_cancel=True,
                    )
                except ModelError as exc:
                    failure = (LoadFailure.INVALID_MODEL, str(exc))
                except MemoryError:
                    failure = (LoadFailure.OUT_OF_MEMORY, "out of memory while loading it")
                if failure is not None:
                    del buffer  # this task's view: the model's memory goes now
                    await self._load_failed(channel, begin, *failure, log=log, pending=True)
                    return
        finally:
            receiver.release()  # the buffer goes when this task's view does
        try:
            await channel.send(ModelLoaded(name=name, sha256=sha256))
        except BaseException:
            self._runtime.link_lost()
            raise
        self._runtime.load_finished(model, name=name)
        log.info("model_loaded", model=name, sha256=sha256.hex(), reused=model is None)

    # --- version 3: refused transfers, failed loads, kept models -----------------------

    def _refuse_transfer(
        self,
        begin: ModelBegin,
        channel: MessageChannel,
        nursery: trio.Nursery,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """Refuse a model larger than ``max_model_bytes`` at its ``model_begin``: say so
        at once (the custodian then ends the transfer) and drop whatever chunks were
        already on their way."""
        self._refused = begin
        reason = (
            f"the model is {begin.size} bytes, over this enclave's max_model_mib "
            f"({self._max_model_bytes // MiB} MiB)"
        )
        nursery.start_soon(
            functools.partial(
                self._load_failed, channel, begin, LoadFailure.TOO_LARGE, reason, log=log
            )
        )

    async def _load_failed(
        self,
        channel: MessageChannel,
        begin: ModelBegin | ModelKeep,
        code: LoadFailure,
        reason: str,
        *,
        log: structlog.typing.FilteringBoundLogger,
        pending: bool = False,
    ) -> None:
        """Report a model that will not be served here; the link goes on."""
        reason = reason[:_MAX_FAILURE_REASON]
        self._runtime.load_failed(begin.name, code, reason, pending=pending)
        log.error(
            "model_load_failed",
            model=begin.name,
            sha256=begin.sha256.hex(),
            code=code.value,
            reason=reason,
            instance_id=self._instance_id,
        )
        try:
            await channel.send(
                ModelLoadFailed(name=begin.name, sha256=begin.sha256, code=code, reason=reason)
            )
        except BaseException:
            self._runtime.link_lost()
            raise

    async def _keep(
        self, channel: MessageChannel, keep: ModelKeep, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        """``model_keep``: confirm the session held for exactly these bytes and terms."""
        held = self._runtime.models.get(keep.name)
        if held is None or held.description.sha256 != keep.sha256 or held.terms != keep.terms:
            await self._load_failed(
                channel,
                keep,
                LoadFailure.NOT_HELD,
                "model_keep names a model this enclave does not hold with that SHA-256 and "
                "those terms",
                log=log,
                pending=True,
            )
            return
        try:
            await channel.send(ModelLoaded(name=keep.name, sha256=keep.sha256))
        except BaseException:
            self._runtime.link_lost()
            raise
        self._runtime.load_finished(None, name=keep.name)
        log.info(
            "model_transfer_skipped", model=keep.name, sha256=keep.sha256.hex(), size=keep.size
        )

    async def _heartbeats(self, channel: MessageChannel) -> None:
        seq = 0
        try:
            while True:
                await channel.send(Heartbeat(seq=seq))
                seq += 1
                await trio.sleep(self._timing.heartbeat_interval)
        except BaseException:
            self._runtime.link_lost()
            raise

    async def _reports(
        self, channel: MessageChannel, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        runtime = self._runtime
        accounting, timing = runtime.accounting, self._timing
        demand_sent_at = -math.inf
        try:
            while True:
                due = accounting.report_due_at(
                    spacing=timing.report_spacing, period=timing.report_period
                )
                now = trio.current_time()
                ack = runtime.next_block_ack()
                if ack is not None:  # the quota already refuses to start anything
                    await channel.send(ack)
                    log.info("block_acknowledged", block_id=ack.block_id)
                    continue
                if runtime.demand_due():
                    demand_due = demand_sent_at + timing.report_spacing
                    if demand_due <= now:
                        # What was served goes first, so the custodian reads the demand
                        # against a current served total.
                        report = accounting.next_report(now)
                        if report is not None:
                            await channel.send(report)
                        demand = runtime.next_demand()
                        await channel.send(demand)
                        demand_sent_at = now
                        log.debug(
                            "demand_sent",
                            seq=demand.seq,
                            units=demand.units,
                            parked_requests=demand.parked_requests,
                        )
                        continue
                    wake_at = demand_due if due is None else min(due, demand_due)
                else:
                    wake_at = math.inf if due is None else due
                returned = accounting.next_return()
                if returned is not None:  # the same sender as reports: never one after a final
                    await channel.send(returned)
                    log.info(
                        "units_returned",
                        recall_id=returned.recall_id,
                        returned_total=returned.returned_total,
                        served_total=returned.served_total,
                        final=returned.final,
                    )
                    continue
                if due is not None and due <= now:
                    report = accounting.next_report(now)
                    assert report is not None  # due: something to report, none in flight
                    await channel.send(report)
                    log.debug("usage_reported", seq=report.seq, served_total=report.served_total)
                    continue
                with trio.move_on_at(wake_at):
                    await runtime.wait_usage_changed()
        except BaseException:
            self._runtime.link_lost()
            raise

    def _failed(
        self,
        log: structlog.typing.FilteringBoundLogger,
        exc: BaseException,
        group: BaseExceptionGroup[BaseException] | None = None,
    ) -> None:
        """Log how the attempt ended; remember a refusal among its errors, if any (the
        session's tasks may have seen the link go first, and the refusal second)."""
        leaves = [exc] if group is None else list(_leaves(group))
        self._refusal = next(filter(None, map(classify, leaves)), None)
        _log_failure(log, exc)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _log_failure(log: structlog.typing.FilteringBoundLogger, exc: BaseException) -> None:
    # The message of our own and the stream's errors never holds secrets (errors.py).
    cause = exc.__cause__
    log.warning(
        "custodian_link_failed",
        error_type=type(exc).__name__,
        error=str(exc)[:300],
        cause=None if cause is None else f"{type(cause).__name__}: {str(cause)[:200]}",
    )
