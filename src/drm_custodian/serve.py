"""The custodian daemon's process structure: one nursery tree, started by :func:`serve`.

What the daemon lends is read into memory (:mod:`drm_custodian.models`) before
:func:`serve` starts, and streamed from there to every enclave.

Theory of operation
-------------------
::

    serve()                          ledger opened first, closed last (shielded)
      admin nursery                  serve_admin (hypercorn) with SessionHooks; the
                                     reclaim watcher (logs instance_reclaimable, I21);
                                     the links' heartbeat clock
        session nursery              one task per enclave connection (handle_connection)
          listen nursery             trio.serve_tcp(handler_nursery=session nursery)

``task_status.started(BoundAddresses)`` reports the bound ports (port 0 works for both),
after the ``custodian_listening`` log line that process-level tests wait for.

The enclave-link port is open to the network before any peer is attested, so it has caps
(I17): at most ``max_links`` connections at once (more are closed at once; a fleet's
1,000 enclave links fit the default with room for reconnects) and at most
``max_link_handshakes`` TLS handshakes in progress (a connection waits for a slot no
longer than the handshake timeout). Each refusal logs a warning and counts in the admin
API's ``drm_custodian_enclave_link_refused_total{limit=...}`` metric. Attested peers are
still bounded: every link reads under the consumer port's machinery
(:class:`~drm_wire.net.budget.ReceiveLimits`), drawing on one ``link_budget`` for all
links and completing each frame within ``link_frame_timeout`` at the minimum rate, so an
enclave that stalls mid-frame is closed (``frame_timeout``) and links that together hold
the budget wait for it, then are told ``busy`` (``budget_full``), both counted in the
same metric.

Shutdown is a trigger: when ``shutdown_trigger`` returns (``__main__`` wires it to
SIGTERM/SIGINT), the tree is taken down inside out, in this order: stop accepting (the
listen nursery is cancelled); close every enclave link (each session is cancelled and
closes its TLS stream with close_notify, so its enclave trips its kill switch at once;
whatever is left after :data:`LINK_CLOSE_TIMEOUT`, e.g. a connection still in its
handshake, is cut); stop the admin server
(hypercorn's graceful shutdown, under :data:`ADMIN_STOP_TIMEOUT`); close the ledger; log
``custodian_stopped``. Cancelling :func:`serve` from outside takes the same tree down
all at once, and the ledger is still closed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

import structlog
import trio
from cryptography.hazmat.primitives import serialization
from prometheus_client import Counter

from drm_custodian._state_files import read_checked
from drm_custodian.admin import DEFAULT_ADMIN_PORT, AdminApp, serve_admin
from drm_custodian.borrowers import BorrowerBook
from drm_custodian.enclave_link import handle_connection
from drm_custodian.heartbeats import HeartbeatClock
from drm_custodian.ledger import IdempotencyConflict, Ledger
from drm_custodian.models import ModelFile
from drm_custodian.registry import Registry, SessionHooks
from drm_custodian.session import SessionConfig, SessionContext
from drm_custodian.state import CustodianState
from drm_daemon.listen import ListenError, cannot_listen
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_cache import CollateralCache
from drm_wire.attestation.collateral_source import CollateralSource, chain_sources
from drm_wire.attestation.pccs import CaType, PccsClient
from drm_wire.attestation.policy import Policy
from drm_wire.errors import ConfigError, first_leaf
from drm_wire.limits import FRAME_TIMEOUT, MAX_GRANT_UNITS, MiB
from drm_wire.net._tls_context import PrivateKey
from drm_wire.net.address import format_address
from drm_wire.net.budget import MIN_CONNECTION_SHARE, MemoryBudget, ReceiveLimits
from drm_wire.net.ratls_context import custodian_server_context

__all__ = [
    "ADMIN_STOP_TIMEOUT",
    "DEFAULT_ENCLAVE_PORT",
    "DEFAULT_MAX_LINKS",
    "DEFAULT_MAX_LINK_HANDSHAKES",
    "LINK_CLOSE_TIMEOUT",
    "BoundAddresses",
    "ServeConfig",
    "initial_supply_key",
    "serve",
]

log = structlog.get_logger(__name__)

#: The original demo's enclave-link port.
DEFAULT_ENCLAVE_PORT: Final = 7000
#: Longest wait for the admin server's graceful stop (hypercorn's own is 3 s).
ADMIN_STOP_TIMEOUT: Final = 5.0
#: Longest wait for the enclave links to close gracefully at shutdown; connections still
#: in their handshake are cut then. TLS's own close_notify budget is 1 s.
LINK_CLOSE_TIMEOUT: Final = 1.0
#: Enclave-link connections at once (I17): a fleet of 1,000 enclaves, each possibly with a
#: stale connection not yet noticed while it redials, and room for more. Each costs a TLS
#: session and a task (a linked one also its model transfers, bounded by the models).
DEFAULT_MAX_LINKS: Final = 4096
#: TLS handshakes in progress at once: RA-TLS verification is CPU work; 256 lets a whole
#: fleet redial after a restart within a few rounds of handshake timeouts.
DEFAULT_MAX_LINK_HANDSHAKES: Final = 256
#: Bytes all enclave links may hold of frames being received (I17). An idle link keeps one
#: small read reserved (16 KiB), so the default cap of links, all idle, holds 64 MiB;
#: their frames carry no bulk payloads. (At least one full-size frame's share.)
DEFAULT_LINK_BUDGET: Final = 128 * MiB
#: The largest ``link_budget`` accepted (a typo guard).
MAX_LINK_BUDGET: Final = 1_000_000 * MiB


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeConfig:
    """Everything :func:`serve` needs; models are already in memory.

    Attributes:
        state: the loaded state directory.
        models: the models lent to every enclave, in order (non-empty).
        policy: the enclaves accepted.
        collateral: Intel collateral bundles the verifier uses (beside what enclaves staple).
        pccs_url, pccs_ca: a PCS/PCCS to fetch and refresh collateral from (cached per
            platform, see :mod:`drm_wire.attestation.collateral_cache`), and its CA.
        address, port: the enclave link's listening address; port 0 picks one.
        admin_address, admin_port: the admin API's (loopback only); port 0 picks one.
        initial_inferences: supplied once, at the first start with this state directory,
            to ``borrower``.
        borrower: the account ``initial_inferences`` goes to; by default the state's only
            borrower. The admin API acts on every borrower.
        session: per-link tunables (lease size, heartbeats, timeouts).
        max_links: enclave-link connections at once; more are closed at once.
        max_link_handshakes: enclave-link TLS handshakes in progress at once.
        link_budget: bytes all enclave links may hold of frames being received.
        link_frame_timeout: seconds an enclave's frame may take once its first byte came.
    """

    state: CustodianState
    models: Sequence[ModelFile]
    policy: Policy
    collateral: CollateralSource | None = None
    pccs_url: str | None = None
    pccs_ca: Path | None = None
    address: str = "127.0.0.1"
    port: int = DEFAULT_ENCLAVE_PORT
    admin_address: str = "127.0.0.1"
    admin_port: int = DEFAULT_ADMIN_PORT
    initial_inferences: int = 0
    borrower: str | None = None
    session: SessionConfig = field(default_factory=SessionConfig)
    max_links: int = DEFAULT_MAX_LINKS
    max_link_handshakes: int = DEFAULT_MAX_LINK_HANDSHAKES
    link_budget: int = DEFAULT_LINK_BUDGET
    link_frame_timeout: float = FRAME_TIMEOUT

    def __post_init__(self) -> None:
        if not MIN_CONNECTION_SHARE <= self.link_budget <= MAX_LINK_BUDGET:
            raise ConfigError(
                f"must be from {MIN_CONNECTION_SHARE // MiB + 1} MiB (one full-size frame) "
                f"to {MAX_LINK_BUDGET // MiB} MiB",
                key="link_budget",
            )
        if not 0 < self.link_frame_timeout <= 3600:
            raise ConfigError("must be above 0, at most 3600 seconds", key="link_frame_timeout")
        for key in ("max_links", "max_link_handshakes"):
            if getattr(self, key) < 1:
                raise ConfigError("must be at least 1", key=key)
        if not self.models:
            raise ConfigError("at least one model is needed", key="models")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError("two models have the same name", key="models")
        for key in ("port", "admin_port"):
            if not 0 <= getattr(self, key) <= 65535:
                raise ConfigError("must be a port number (0 picks a free one)", key=key)
        if not 0 <= self.initial_inferences <= MAX_GRANT_UNITS:
            raise ConfigError(f"must be between 0 and {MAX_GRANT_UNITS}", key="initial_inferences")

    def admin_borrower(self) -> str | None:
        """The borrower ``initial_inferences`` goes to: the one named, or the only one
        (``None`` when there are several and none is named).

        Raises:
            ConfigError: the named borrower has no license, or initial inferences are asked
                for with several borrowers and none named.
        """
        borrowers = self.state.borrowers
        if self.borrower is not None:
            if self.borrower not in borrowers:
                raise ConfigError("no license for this borrower", key="borrower")
            return self.borrower
        if len(borrowers) == 1:
            return next(iter(borrowers))
        if self.initial_inferences:
            raise ConfigError(
                "several borrowers: supply each with `supply --borrower NAME`",
                key="initial_inferences",
            )
        return None


@dataclass(frozen=True, slots=True)
class BoundAddresses:
    """Where :func:`serve` listens: ``(host, port)`` of the enclave link and the admin API."""

    enclave: tuple[str, int]
    admin: tuple[str, int]


def initial_supply_key(state: CustodianState) -> str:
    """The idempotency key of ``--initial-inferences``: one per state directory.

    Derived from the custodian CA, which is unique to the state directory and survives a
    move of it, so a restart (with any N) never supplies again.
    """
    der = state.ca_cert.public_bytes(serialization.Encoding.DER)
    return f"initial-supply-{hashlib.sha256(der).hexdigest()[:32]}"


def _load_server_key(state: CustodianState) -> PrivateKey:
    key = serialization.load_pem_private_key(
        read_checked(state.server_key_path, secret=True), password=None
    )
    if not isinstance(key, PrivateKey):  # load_state_dir checked it matches the certificate
        raise ConfigError("unsupported server key type", path=str(state.server_key_path))
    return key


async def _initial_supply(ledger: Ledger, state: CustodianState, borrower: str, units: int) -> None:
    if units == 0:
        return
    key = initial_supply_key(state)
    try:
        result = await ledger.supply(borrower, units, idempotency_key=key)
    except IdempotencyConflict:
        log.warning("initial_supply_skipped", reason="made at an earlier start with another N")
        return
    if result.replayed:
        log.info("initial_supply_skipped", reason="made at an earlier start", units=result.units)
    else:
        log.info("initial_supply", borrower=borrower, units=units)


def _cannot_listen(
    group: BaseExceptionGroup[OSError], what: str, host: str, port: int, option: str
) -> ListenError:
    exc = first_leaf(group)
    assert isinstance(exc, OSError)
    return cannot_listen(exc, what, host, port, option)


def _host_port(address: object) -> tuple[str, int]:
    assert isinstance(address, tuple)
    return str(address[0]), int(address[1])


def _pccs_cache(url: str, ca: Path | None) -> tuple[CollateralCache, PccsClient]:
    client = PccsClient(url, ca=ca)

    async def fetch(fmspc: bytes, ca_type: CaType) -> Collateral:
        return await client.fetch(fmspc, ca=ca_type)

    return CollateralCache(fetch), client


class DaemonHooks(SessionHooks):
    """:class:`SessionHooks` and what borrower removal needs: its enclaves cut at once."""

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        self._live = registry

    async def on_removed(self, borrower: str) -> None:
        for session in list(self._live.sessions(borrower)):
            session.close()


async def _announce_reclaimable(
    ledger: Ledger,
    registry: Registry,
    state: CustodianState,
    window: float,
    scope: trio.CancelScope,
) -> None:
    """Log ``instance_reclaimable`` once for each gone instance with units in doubt, when
    ``drm_custodian reclaim`` starts to accept it (I21): the owner learns what may be
    settled and when, without trying. Instances gone before this process started are due
    one window after the start."""
    announced: set[str] = set()
    with scope:
        while True:
            now = trio.current_time()
            next_due = math.inf
            every = [
                (borrower, record)
                for borrower in sorted({r.borrower for r in state.licenses.values()})
                for record in await ledger.instances(borrower)
            ]
            for borrower, record in every:
                live = registry.live_instances(borrower)
                instance = record.instance_id
                if instance in announced or instance in live or record.retired is not None:
                    continue
                if not record.in_doubt:
                    continue
                due = registry.ended_at(instance) + window
                if due <= now:
                    announced.add(instance)
                    log.warning(
                        "instance_reclaimable",
                        borrower=borrower,
                        instance=instance,
                        in_doubt=record.in_doubt,
                        fix=f"if that enclave is gone for good: drm_custodian reclaim "
                        f"--instance {instance}",
                    )
                else:
                    next_due = min(next_due, due)
            with trio.move_on_at(next_due):
                await registry.wait_ended()


async def _run_clock(clock: HeartbeatClock, scope: trio.CancelScope) -> None:
    with scope:
        await clock.run()


async def _run_cache(cache: CollateralCache, client: PccsClient, scope: trio.CancelScope) -> None:
    try:
        with scope:
            await cache.run()
    finally:
        with trio.CancelScope(shield=True):
            await client.__aexit__()


async def serve(
    config: ServeConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[BoundAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the custodian until ``shutdown_trigger`` returns (or forever, until cancelled).

    Raises:
        ConfigError: bad configuration (borrower, key, admin address).
        ListenError: a port could not be bound (the error names it and the option).
        LedgerStorageError: the ledger could not be opened.
    """
    state = config.state
    borrower = config.admin_borrower()
    private_key = await trio.to_thread.run_sync(_load_server_key, state)
    pccs = None if config.pccs_url is None else _pccs_cache(config.pccs_url, config.pccs_ca)
    cache = None if pccs is None else pccs[0]
    tls_context = custodian_server_context(
        state.server_cert,
        private_key,
        config.policy,
        collateral=chain_sources(config.collateral, cache),
    )
    ledger = await Ledger.open(state.ledger_path)
    try:
        await ledger.integrity_check()
        if borrower is not None:
            await _initial_supply(ledger, state, borrower, config.initial_inferences)
        registry = Registry(forget_after=config.session.reclaim_window)
        app = AdminApp(
            ledger=ledger,
            hooks=DaemonHooks(registry),
            token=state.admin_token,
            book=BorrowerBook(state, [m.name for m in config.models]),
            collateral_ages=None if cache is None else cache.ages,
            reclaim_window=config.session.reclaim_window,
        )
        refused = Counter(
            "drm_custodian_enclave_link_refused",
            "Enclave-link connections turned away or closed by a cap, by cap (links, "
            "handshakes, frame_timeout, budget_full).",
            ["limit"],
            registry=app.registry,
        )
        transfers = Counter(
            "drm_custodian_model_transfers",
            "Model deliveries to enclaves by model and outcome (loaded: streamed and "
            "loaded; kept: transfer skipped, the enclave held it; failed: did not load).",
            ["model", "outcome"],
            registry=app.registry,
        )
        model_bytes = Counter(
            "drm_custodian_model_bytes_sent",
            "Model bytes streamed to enclaves, by model.",
            ["model"],
            registry=app.registry,
        )

        def model_event(model: str, outcome: str, sent: int) -> None:
            transfers.labels(model=model, outcome=outcome).inc()
            model_bytes.labels(model=model).inc(sent)

        clock = HeartbeatClock(config.session.heartbeat_interval)
        ctx = SessionContext(
            state=state,
            ledger=ledger,
            models=tuple(config.models),
            tls_context=tls_context,
            registry=registry,
            config=config.session,
            handshake_slots=trio.Semaphore(config.max_link_handshakes),
            limit_hit=lambda name: refused.labels(limit=name).inc(),
            model_event=model_event,
            heartbeat_clock=clock,
        )
        live = 0
        link_limits = ReceiveLimits(
            budget=MemoryBudget(config.link_budget, per_connection=MIN_CONNECTION_SHARE),
            frame_timeout=config.link_frame_timeout,
        )

        async def handler(stream: trio.SocketStream) -> None:
            nonlocal live
            try:
                peer = format_address(*_host_port(stream.socket.getpeername()))
            except OSError:
                peer = "unknown"
            if live >= config.max_links:
                refused.labels(limit="links").inc()
                log.warning("enclave_link_refused_full", peer=peer, max_links=config.max_links)
                await trio.aclose_forcefully(stream)
                return
            live += 1
            try:
                await handle_connection(stream, ctx, peer=peer, limits=link_limits)
            finally:
                live -= 1

        admin_stop = trio.Event()
        cache_scope = trio.CancelScope()
        watch_scope = trio.CancelScope()
        clock_scope = trio.CancelScope()
        async with trio.open_nursery() as admin_nursery:
            admin_nursery.start_soon(_run_clock, clock, clock_scope)
            if pccs is not None:
                admin_nursery.start_soon(_run_cache, *pccs, cache_scope)
            admin_nursery.start_soon(
                _announce_reclaimable, ledger, registry, state,
                config.session.reclaim_window, watch_scope,
            )  # fmt: skip
            try:
                admin_bound: list[tuple[str, int]] = await admin_nursery.start(
                    partial(
                        serve_admin,
                        app,
                        certfile=state.server_cert_path,
                        keyfile=state.server_key_path,
                        host=config.admin_address,
                        port=config.admin_port,
                        shutdown_trigger=admin_stop.wait,
                    )
                )
            except* OSError as group:
                raise _cannot_listen(
                    group, "the admin API", config.admin_address, config.admin_port, "--admin-port"
                ) from None
            async with trio.open_nursery() as session_nursery:
                async with trio.open_nursery() as listen_nursery:
                    try:
                        listeners: list[trio.SocketListener] = await listen_nursery.start(
                            partial(
                                trio.serve_tcp,
                                handler,
                                config.port,
                                host=config.address,
                                handler_nursery=session_nursery,
                            )
                        )
                    except* OSError as group:
                        raise _cannot_listen(
                            group, "enclaves", config.address, config.port, "--port"
                        ) from None
                    bound = BoundAddresses(
                        enclave=_host_port(listeners[0].socket.getsockname()),
                        admin=admin_bound[0],
                    )
                    log.info(
                        "custodian_listening",
                        enclave_address=format_address(*bound.enclave),
                        admin_address=format_address(*bound.admin),
                        borrowers=sorted(state.borrowers),
                        models=[m.name for m in config.models],
                        lease=config.session.lease,
                    )
                    task_status.started(bound)
                    if shutdown_trigger is None:
                        await trio.sleep_forever()
                    await shutdown_trigger()
                    log.info("custodian_stopping")
                    listen_nursery.cancel_scope.cancel()  # 1. stop accepting
                # 2. close every enclave link (with close_notify, so each enclave sees a clean
                # end at once), then cut whatever is left (connections still handshaking).
                registry.close_all()
                session_nursery.cancel_scope.deadline = trio.current_time() + LINK_CLOSE_TIMEOUT
            admin_stop.set()  # 3. the admin server (the collateral cache, the watcher)
            cache_scope.cancel()
            watch_scope.cancel()
            clock_scope.cancel()
            admin_nursery.cancel_scope.deadline = trio.current_time() + ADMIN_STOP_TIMEOUT
    finally:
        with trio.CancelScope(shield=True):
            await ledger.aclose()  # 4. the ledger
        log.info("custodian_stopped")
