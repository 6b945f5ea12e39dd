"""The enclave's shared state: quota, accounting, models, and where the custodian link stands.

The quota owns the granted and served totals; the accounting reports them (and turns the
custodian's grants into quota grants).

Theory of operation
-------------------
The custodian link (:mod:`drm_enclave.custodian_link`) is the only writer: it reports a
new link (:meth:`EnclaveRuntime.link_connected`), model loads, grants, blocks and
acknowledgements, and the loss of the link (:meth:`EnclaveRuntime.link_lost`). The
consumer server (:mod:`drm_enclave.consumer_server`) reads the models, the quota and the
state, and calls :meth:`EnclaveRuntime.served` after every committed inference, which
wakes the link's usage reporter when its schedule moves.

States, as ``model_info`` shows them::

    CUSTODIAN_UNREACHABLE --hello done--> LOADING --models loaded + re-sync--> SERVING
          ^                                  |                                 |  ^
          |                                  +---------- block ------> BLOCKED -+  | unblock
          +--------------------- link lost (any state) ----------------------------+

Models: at a link's re-sync every model the custodian lends has been answered for
(loaded, kept or failed; docs/links.md, "Version 3"), so a session held for a model it
did not name on this link is one the owner no longer lends: it is withdrawn.

The quota is suspended (``CUSTODIAN_UNREACHABLE``) in every state but ``SERVING``
(``BLOCKED`` while blocked), so nothing is served until a verified link has re-synced.
The *re-sync* is the custodian's first ``grant`` (its last total again), ``unblock`` or
``block`` after hello, once no model load is pending. A grant never lifts a block.

Single trio thread: every method runs on the event loop, and none awaits except the
``wait_*`` helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import structlog
import trio

from drm_wire.errors import ErrorCode
from drm_wire.limits import MAX_GRANT_UNITS
from drm_wire.messages import (
    BlockAck,
    Demand,
    EnclaveState,
    Grant,
    LoadFailure,
    Recall,
    ReturnAck,
    Returned,
    UsageAck,
)

from .accounting import Accounting
from .model_host import HostedModel
from .quota import Quota

__all__ = [
    "STOPPING_MESSAGE",
    "UNREACHABLE_MESSAGE",
    "EnclaveRuntime",
    "blocked_message",
    "unavailable_message",
]

_log = structlog.get_logger("drm_enclave.runtime")

#: What consumers are told while the custodian link is down: what happened, what to do.
UNREACHABLE_MESSAGE: Final = (
    "the enclave has no verified link to its custodian, so it serves nothing; it redials "
    "on its own: retry later, and if this lasts, tell the enclave's operator (its log says "
    "why)"
)
#: What consumers are told once the daemon is stopping.
STOPPING_MESSAGE: Final = "the enclave is shutting down: retry once it is back"
#: The longest owner's reason passed on to consumers (the admin API allows no longer).
_MAX_REASON: Final = 200


def blocked_message(reason: str) -> str:
    """What consumers are told while the owner blocks the borrower, with the owner's
    reason (printable characters only: it goes to a consumer's terminal)."""
    shown = "".join(c for c in reason[:_MAX_REASON] if c.isprintable()).strip()
    because = f" (reason: {shown})" if shown else ""
    return (
        f"the model owner blocked this borrower{because}; nothing is served until the owner "
        "unblocks it: ask the borrower's operator"
    )


#: What to do about a model that did not load, by cause (consumers and the operator).
_UNAVAILABLE_FIX: Final = {
    LoadFailure.TOO_LARGE: "the enclave's operator must raise its max_model_mib (and the "
    "enclave's memory), or the owner lend a smaller model",
    LoadFailure.OUT_OF_MEMORY: "the enclave's operator must give the enclave more memory",
    LoadFailure.INVALID_MODEL: "the model's owner must replace it",
    LoadFailure.NOT_HELD: "the enclave receives it again on its next link to the custodian",
}


def unavailable_message(name: str, code: LoadFailure, reason: str) -> str:
    """What consumers asking for a model that failed to load are told: what happened and
    what to do (printable characters only: it goes to a consumer's terminal)."""
    shown = "".join(c for c in reason[:_MAX_REASON] if c.isprintable()).strip()
    return (
        f"model {name[:64]!r} could not be loaded in this enclave ({code.value}: {shown}); "
        f"{_UNAVAILABLE_FIX[code]}. The enclave's other models are served"
    )


class EnclaveRuntime:
    """What the custodian link and the consumer server share. Single trio thread only.

    Attributes:
        quota: the inference quota, and the granted and served totals; suspended until a
            link is synced.
        accounting: the usage-report sequence over the quota's totals.
        models: loaded models by name.
        unavailable: models the custodian lends that did not load here, by name: the
            consumer's message (:func:`unavailable_message`). Version 3: the link goes on.
    """

    def __init__(self, *, max_parked: int | None = None) -> None:
        self.quota = Quota() if max_parked is None else Quota(max_parked=max_parked)
        self.quota.suspend(ErrorCode.CUSTODIAN_UNREACHABLE, UNREACHABLE_MESSAGE)
        self.accounting = Accounting(self.quota)
        self.models: dict[str, HostedModel] = {}
        self.unavailable: dict[str, str] = {}
        self._link_up = False
        self._synced = False
        self._blocked = False
        self._block_message = blocked_message("")
        self._loads_pending = 0
        #: The models the custodian delivered, kept or reported failed on this link.
        self._delivered: set[str] = set()
        self._announced = False
        self._stopping = False
        self._usage_changed = trio.Event()
        self._state_changed = trio.Event()
        #: Version 4. The block to acknowledge (its id), once the quota refuses to start
        #: anything; and the demand last sent on this link (units, requests) and its seq.
        self._block_ack_due: int | None = None
        self._demand_sent = (0, 0, 0)
        self._demand_seq = 0
        self.quota.demand_changed = self._demand_moved

    def __repr__(self) -> str:
        return (
            f"<EnclaveRuntime {self.state.value} models={sorted(self.models)} "
            f"{self.quota!r} {self.accounting!r}>"
        )

    # --- read side (consumer server) ----------------------------------------------

    @property
    def state(self) -> EnclaveState:
        """What ``model_info`` tells consumers."""
        if not self._link_up:
            return EnclaveState.CUSTODIAN_UNREACHABLE
        if self._blocked:
            return EnclaveState.BLOCKED
        if self._stopping:
            return EnclaveState.CUSTODIAN_UNREACHABLE
        if self.quota.suspended is None:
            return EnclaveState.SERVING
        return EnclaveState.LOADING

    @property
    def link_up(self) -> bool:
        """Whether a verified custodian link has said hello (synced or not)."""
        return self._link_up

    def served(self, units: int = 1) -> None:
        """A lease of ``units`` was just committed (the quota counted it): wake the usage
        reporter if that moves its schedule (:meth:`Accounting.served`).

        Only the usage reporter, and only then: the state does not change with a served
        inference, and waking every :meth:`wait_for` (the systemd phase reporter, the
        drain) or the reporter on the hot path would cost each inference a scheduler pass
        for nothing. The drain waits for ``unreported == 0``, which only an
        acknowledgement (:meth:`on_ack`) can bring.
        """
        if self.accounting.served(units):
            self._usage_changed.set()

    async def wait_usage_changed(self) -> None:
        """Return once the report schedule may have moved since the last call (an
        inference that matters to it, an acknowledgement, a new link, draining)."""
        await self._usage_changed.wait()
        self._usage_changed = trio.Event()

    async def wait_for(self, predicate: Callable[[EnclaveRuntime], bool]) -> None:
        """Wait until ``predicate(self)`` holds (checked after every state change)."""
        while not predicate(self):
            await self._state_changed.wait()

    def _changed(self) -> None:
        self._state_changed.set()
        self._state_changed = trio.Event()

    def begin_shutdown(self) -> None:
        """Stop serving for good (the daemon is stopping); the link may still flush usage."""
        self._stopping = True
        self.accounting.flush()
        self._usage_changed.set()
        failed = self.quota.suspend(ErrorCode.CUSTODIAN_UNREACHABLE, STOPPING_MESSAGE)
        _log.info("enclave_draining", failed_parked=failed, unreported=self.accounting.unreported)
        self._changed()

    # --- write side (custodian link) -------------------------------------------------

    def link_lost(self) -> None:
        """KILL SWITCH: no verified custodian link; fail parked and new requests at once."""
        if self.quota.suspended is not ErrorCode.CUSTODIAN_UNREACHABLE:
            failed = self.quota.suspend(ErrorCode.CUSTODIAN_UNREACHABLE, UNREACHABLE_MESSAGE)
            _log.warning("custodian_link_down", failed_parked=failed)
        self._link_up = self._synced = self._blocked = self._announced = False
        self._loads_pending = 0
        self._changed()

    def link_connected(self) -> None:
        """Hello done on a new verified link: loading until the custodian re-syncs."""
        self.accounting.link_restarted()
        self._block_ack_due = None  # block ids are the link's: a new one blocks anew
        self._demand_sent = (0, 0, 0)  # the custodian knows no demand of a new link's
        self._demand_seq = 0
        self._link_up = True
        self._synced = self._blocked = self._announced = False
        self._loads_pending = 0
        self._delivered = set()
        self._changed()

    def load_started(self) -> None:
        self._loads_pending += 1

    def load_finished(self, model: HostedModel | None, *, name: str | None = None) -> None:
        """A transfer was loaded (or matched the held model ``name``: ``model`` is None)."""
        if model is not None:
            name = model.description.name
            self.models[name] = model
            self.unavailable.pop(name, None)
        if name is not None:
            self._delivered.add(name)
        self._loads_pending -= 1
        self._maybe_resume()

    def load_failed(self, name: str, code: LoadFailure, reason: str, *, pending: bool) -> None:
        """The model ``name`` did not load (``pending``: after :meth:`load_started`).

        A session held under that name goes too: the custodian now lends other bytes or
        other terms, and the old ones must not be served in their place.
        """
        self.models.pop(name, None)
        self.unavailable[name] = unavailable_message(name, code, reason)
        self._delivered.add(name)
        if pending:
            self._loads_pending -= 1
        self._maybe_resume()

    @property
    def synced(self) -> bool:
        """Linked, re-synced and no model loading: a final return may be sent now."""
        return self._link_up and self._synced and self._loads_pending == 0

    def return_all(self) -> Returned:
        """Clean stop: take back every idle unit and queue the final return (I20)."""
        returned = self.accounting.take_back(None, final=True)
        self._usage_changed.set()
        self._changed()
        return returned

    def on_recall(self, recall: Recall) -> Returned:
        """The custodian recalls idle units: take back what is idle and queue the answer."""
        returned = self.accounting.on_recall(recall)
        self._usage_changed.set()
        return returned

    def on_return_ack(self, ack: ReturnAck) -> None:
        self.accounting.on_return_ack(ack)
        self._changed()

    def on_grant(self, grant: Grant) -> int:
        """Apply a grant (a total); return the units it added."""
        added = self.accounting.on_grant(grant)
        if self.accounting.final and added > 0:  # a grant that crossed the final return
            self._usage_changed.set()  # was taken back: send that return
        self._synced = True  # a grant never lifts a block: only unblock (or a new link) does
        self._maybe_resume()
        return added

    def on_block(self, reason: str = "", block_id: int | None = None) -> None:
        """The owner blocked the borrower; consumers are told ``reason`` (the owner's words).

        The quota refuses every request from this synchronous step on (parked ones fail
        with ``blocked``, a woken one that had not started gives its units back), so
        block ``block_id`` can be acknowledged at once (I25); requests already running
        finish and are reported as ever.
        """
        self._synced = self._blocked = True
        self._block_message = blocked_message(reason)
        failed = self.quota.suspend(ErrorCode.BLOCKED, self._block_message)
        _log.warning("custodian_blocked", failed_parked=failed, reason=reason, block_id=block_id)
        self._maybe_resume()
        if block_id is not None:
            self._block_ack_due = block_id
            self._usage_changed.set()

    def next_block_ack(self) -> BlockAck | None:
        """The acknowledgement of the newest block, if one is due (then no longer)."""
        block_id, self._block_ack_due = self._block_ack_due, None
        return None if block_id is None else BlockAck(block_id=block_id)

    # --- the demand signal (version 4) -----------------------------------------------

    def _demand_moved(self) -> None:
        if self._link_up and self.demand_figure() != self._demand_sent:
            self._usage_changed.set()  # the reporter sends it, spaced

    def demand_figure(self) -> tuple[int, int, int]:
        """What this instance's parked requests lack: units beyond what it holds (capped
        at ``MAX_GRANT_UNITS``), parked requests (capped the same), and the granted
        total that figure is as of (0 when nobody waits). A grant that leaves requests
        waiting changes it too: the custodian counts what it granted after the figure
        against it, so it must hear that they still lack units."""
        quota = self.quota
        units = min(quota.shortfall, MAX_GRANT_UNITS)
        if not units:
            return 0, 0, 0
        return units, min(quota.parked, MAX_GRANT_UNITS), quota.granted_total

    def demand_due(self) -> bool:
        """Whether the figure differs from the one the custodian last heard."""
        return (
            self.synced
            and not self.accounting.final
            and (self.demand_figure() != self._demand_sent)
        )

    def next_demand(self) -> Demand:
        """The demand message for the current figure, counted as sent."""
        units, requests, _ = self._demand_sent = self.demand_figure()
        self._demand_seq += 1
        return Demand(
            seq=self._demand_seq,
            units=units,
            parked_requests=requests,
            granted_total=self.quota.granted_total,
        )

    def on_unblock(self) -> None:
        self._synced = True
        was_blocked, self._blocked = self._blocked, False
        if was_blocked:
            _log.info("custodian_unblocked")
        self._maybe_resume()

    def on_ack(self, ack: UsageAck) -> None:
        self.accounting.on_ack(ack)
        self._usage_changed.set()
        self._changed()

    def _maybe_resume(self) -> None:
        if not (self._link_up and self._synced and self._loads_pending == 0):
            self._changed()
            return
        if self._blocked:
            if self.quota.suspended is not ErrorCode.BLOCKED:
                self.quota.suspend(ErrorCode.BLOCKED, self._block_message)
        elif self.quota.suspended is not None and not self._stopping:
            self.quota.resume()
        if not self._announced:
            self._announced = True
            self._withdraw_undelivered()
            _log.info(
                "custodian_link_up",
                state=self.state.value,
                models=sorted(self.models),
                inferences_left=self.quota.available,
                granted_total=self.quota.granted_total,
                served_total=self.quota.served_total,
            )
        self._changed()

    def _withdraw_undelivered(self) -> None:
        """At a link's re-sync, every model the custodian lends has been answered for: a
        session held for a model it did not deliver, keep or report on this link is one
        the owner no longer lends (a restart without it), and is no longer served."""
        for name in [name for name in self.models if name not in self._delivered]:
            del self.models[name]
            _log.warning("model_withdrawn", model=name)
        for name in [name for name in self.unavailable if name not in self._delivered]:
            del self.unavailable[name]
