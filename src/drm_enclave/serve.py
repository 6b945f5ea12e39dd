"""The enclave daemon's process structure: one nursery tree, started by :func:`serve`.

::

    serve                                  (task_status.started(consumer address))
    ├── consumer listener                  trio.serve_listeners(handler_nursery=handlers)
    │   └── handlers: one task per consumer connection
    │       └── requests: one task per inference in flight
    ├── stapler                            our collateral: fetch, check, re-staple
    │   └── collateral cache               refresh before nextUpdate (drm_enclave.staple)
    └── custodian link                     dial / session / redial, forever
        └── session: receive loop, heartbeats, reporter, model loaders

The consumer port opens first, so a consumer can connect (and learn the state) at once;
every request fails with ``custodian_unreachable`` until the custodian link is synced.

Shutdown is a trigger (``shutdown_trigger``; ``__main__`` wires it to SIGTERM/SIGINT), then
a drain under one deadline (:attr:`EnclaveConfig.shutdown_grace`):

1. the kill switch falls for good (:meth:`EnclaveRuntime.begin_shutdown`): parked and new
   requests fail with ``custodian_unreachable``, a clear answer rather than a cut
   connection; the consumer port stops accepting;
2. inferences already running finish and their results are sent;
3. while the custodian link is up, the reporter sends the last usage report and the
   custodian acknowledges it, so every inference served is in its ledger (I4);
4. the unused units go back (I20): once the link is synced, every idle unit is taken out
   of the quota and the final ``returned`` goes, and the daemon waits, at most
   :attr:`EnclaveConfig.return_timeout`, for the custodian's ``return_ack``. Without one
   (custodian unreachable, no answer in time) the units stay in doubt, and the log line
   ``enclave_units_in_doubt`` says how many and what the owner can do;
5. then everything is cancelled: the link closes, connections close.

Cancelling :func:`serve` from outside skips the drain: the link's ``finally`` still throws
the kill switch.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog
import trio
from cryptography import x509

from drm_daemon.listen import cannot_listen
from drm_wire.attestation.gramine import Backend
from drm_wire.attestation.pccs import CaType, PccsClient
from drm_wire.attestation.ratls_cert import RatlsCredentials
from drm_wire.attestation.verify import TrustAnchors
from drm_wire.errors import ConfigError
from drm_wire.limits import MAX_MODEL_BYTES
from drm_wire.net.ratls_context import enclave_client_context, enclave_server_context

from .consumer_server import ConsumerLimits, ConsumerServer
from .custodian_link import CustodianLink, LinkTiming
from .identity import EnclaveIdentity, License, make_identity
from .runtime import EnclaveRuntime
from .staple import Stapler

__all__ = ["DEFAULT_CONSUMER_PORT", "EnclaveConfig", "serve"]

#: The consumer port (docs/links.md, consumer link).
DEFAULT_CONSUMER_PORT = 9924

_log = structlog.get_logger("drm_enclave.serve")


#: Seconds a clean stop waits for the acknowledgement of its final return
#: (``return_timeout``, ``--return-timeout``).
DEFAULT_RETURN_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class EnclaveConfig:
    """Everything :func:`serve` needs; :mod:`drm_enclave.cli` builds it from flags and files.

    Attributes:
        custodian_host, custodian_port: where the custodian's enclave link listens.
        custodian_ca_pem: the pinned custodian CA, exactly as read from its file (it is
            part of the simulated measurement).
        license: the borrower's license.
        listen_host, listen_port: the consumer port (0: any free port).
        attestation: ``auto``, ``gramine`` or ``simulated``.
        simulation_dir: the INSECURE simulated platform's directory, if any.
        pccs_url, pccs_ca: the borrower's PCCS (or Intel's PCS), where the enclave fetches
            its platform's collateral to staple (:mod:`drm_enclave.staple`), and the CA to
            verify it with. Without one, a simulated enclave staples what its platform
            issues, and an SGX one staples nothing.
        intra_op_threads: onnxruntime threads per session.
        max_model_bytes: the largest model loaded (``max_model_mib``); a larger one is
            refused at ``model_begin`` and reported (docs/links.md, "Version 3").
        instance_id: 32 hex characters, fixed for the process.
        timing, limits: link timings and consumer caps.
        shutdown_grace: seconds a shutdown waits for running inferences and the last usage
            acknowledgement before cutting everything.
        return_timeout: seconds a shutdown then waits for a synced custodian link and
            the acknowledgement of its final return (the units stay in doubt after it).
    """

    custodian_host: str
    custodian_port: int
    custodian_ca_pem: bytes
    license: License
    listen_host: str = "127.0.0.1"
    listen_port: int = DEFAULT_CONSUMER_PORT
    attestation: Backend = "auto"
    simulation_dir: Path | None = None
    pccs_url: str | None = None
    pccs_ca: Path | None = None
    intra_op_threads: int = 1
    max_model_bytes: int = MAX_MODEL_BYTES
    instance_id: str = field(default_factory=lambda: secrets.token_hex(16))
    timing: LinkTiming = field(default_factory=LinkTiming)
    limits: ConsumerLimits = field(default_factory=ConsumerLimits)
    shutdown_grace: float = 10.0
    return_timeout: float = DEFAULT_RETURN_TIMEOUT

    def custodian_ca(self) -> x509.Certificate:
        """The pinned CA, parsed.

        Raises:
            ConfigError: the file is not one PEM certificate.
        """
        try:
            return x509.load_pem_x509_certificate(self.custodian_ca_pem)
        except ValueError as exc:
            raise ConfigError("the custodian CA is not a PEM certificate") from exc


async def serve(
    config: EnclaveConfig,
    *,
    runtime: EnclaveRuntime | None = None,
    identity: EnclaveIdentity | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    wall_clock: Callable[[], datetime] | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the enclave daemon until ``shutdown_trigger`` returns (then drain), or cancelled.

    Args:
        config: the daemon's configuration.
        runtime: the shared state to use (tests pass one to observe it); a fresh one
            by default.
        identity: RA-TLS credentials to use; by default made from ``config.attestation``.
        shutdown_trigger: awaited once serving; when it returns, the daemon drains and
            :func:`serve` returns. ``None``: run until cancelled.
        wall_clock: the time collateral validity is judged at (tests move it); the
            system clock by default.
        task_status: receives the bound consumer address ``(host, port)`` once the
            consumer port is listening.

    Raises:
        ConfigError: the CA, the attestation backend or the simulated platform is unusable.
        OSError: the consumer port cannot be bound.
    """
    ca = config.custodian_ca()
    if identity is None:
        identity = make_identity(
            config.attestation,
            custodian_ca_pem=config.custodian_ca_pem,
            simulation_dir=config.simulation_dir,
            self_staple=config.pccs_url is None,
        )
    try:
        # The custodian's certificate must name the host we dial: this guards against a
        # misconfigured --custodian, not against the host (which chooses what we dial).
        client_context = enclave_client_context(
            identity.credentials, ca, custodian_name=config.custodian_host
        )
    except ValueError as exc:
        raise ConfigError(str(exc), key="custodian_ca") from exc
    server_context = enclave_server_context(identity.credentials)
    runtime = runtime if runtime is not None else EnclaveRuntime()
    consumers = ConsumerServer(runtime, server_context, config.limits)
    link = CustodianLink(
        runtime,
        host=config.custodian_host,
        port=config.custodian_port,
        context=client_context,
        license=config.license,
        instance_id=config.instance_id,
        intra_op_threads=config.intra_op_threads,
        timing=config.timing,
        max_model_bytes=config.max_model_bytes,
    )

    def install(credentials: RatlsCredentials) -> None:
        """A re-stapled certificate, for every connection made from now on."""
        consumers.set_context(enclave_server_context(credentials))
        link.set_context(
            enclave_client_context(credentials, ca, custodian_name=config.custodian_host)
        )

    stapler, pccs = _stapler(config, identity, install, wall_clock)
    try:
        listeners = await trio.open_tcp_listeners(config.listen_port, host=config.listen_host)
    except OSError as exc:
        raise cannot_listen(
            exc, "consumers", config.listen_host, config.listen_port, "--listen"
        ) from exc
    host, port = listeners[0].socket.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        handlers = await nursery.start(_handler_nursery)
        accepting = trio.CancelScope()
        nursery.start_soon(_accept, accepting, consumers, listeners, handlers)
        _log.info(
            "enclave_serving",
            consumer_address=f"{_host_for_url(host)}:{port}",
            mr_enclave=identity.mr_enclave.hex(),
            simulated=identity.simulated,
            custodian=f"{config.custodian_host}:{config.custodian_port}",
            license_id=config.license.license_id,
            instance_id=config.instance_id,
        )
        if stapler is not None:
            await nursery.start(_run_stapler, stapler, pccs)
        task_status.started((host, port))
        nursery.start_soon(link.run)
        if shutdown_trigger is None:
            return  # the nursery runs until cancelled
        await shutdown_trigger()
        runtime.begin_shutdown()
        accepting.cancel()
        with trio.move_on_after(config.shutdown_grace) as grace:
            await consumers.wait_idle()
            await runtime.wait_for(lambda r: r.accounting.unreported == 0 or not r.link_up)
        _log.info(
            "enclave_drained",
            timed_out=grace.cancelled_caught,
            in_flight=consumers.requests,
            unreported=runtime.accounting.unreported,
        )
        await _return_units(runtime, config.return_timeout, config.instance_id)
        nursery.cancel_scope.cancel()


def _stapler(
    config: EnclaveConfig,
    identity: EnclaveIdentity,
    install: Callable[[RatlsCredentials], None],
    wall_clock: Callable[[], datetime] | None,
) -> tuple[Stapler | None, PccsClient | None]:
    """What keeps our certificate stapled, and the PCCS client it fetches with (if any).

    Raises:
        ConfigError: a PCCS is configured but its URL or CA is unusable, or our quote
            names no platform to fetch collateral for.
    """
    clock = wall_clock or (lambda: datetime.now(UTC))
    platform = identity.platform
    trust = TrustAnchors() if platform is None else platform.trust_anchors()
    if config.pccs_url is not None:
        try:
            client = PccsClient(config.pccs_url, ca=config.pccs_ca)
        except (ValueError, OSError) as exc:  # OSError: the CA file (ssl reads it)
            raise ConfigError(f"unusable PCCS: {exc}", key="pccs_url") from exc

        async def from_pccs(fmspc: bytes, ca: CaType) -> str:
            return await client.fetch_bundle(fmspc, ca=ca)

        stapler = Stapler(
            identity.credentials, install=install, fetch=from_pccs, trust=trust, clock=clock
        )
        _log.info("stapling_from_pccs", pccs=client.base_url, fmspc=stapler.fmspc.hex().upper(),
                  ca=stapler.ca)  # fmt: skip
        return stapler, client
    if platform is None:
        _log.warning(
            "no_collateral_to_staple",
            message="no --pccs-url: the certificate staples no collateral, so a verifier "
            "without its own (--pccs-url or --collateral) cannot judge this enclave's TCB",
        )
        return None, None

    async def from_platform(fmspc: bytes, ca: CaType) -> str:
        return platform.collateral(now=clock())

    try:
        stapler = Stapler(
            identity.credentials, install=install, fetch=from_platform, trust=trust, clock=clock
        )
    except ConfigError as exc:  # a platform made by an older release: no SGX extension
        _log.warning("no_collateral_to_staple", reason=str(exc))
        return None, None
    return stapler, None


async def _run_stapler(
    stapler: Stapler,
    pccs: PccsClient | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await stapler.run(task_status=task_status)
    finally:
        if pccs is not None:
            with trio.CancelScope(shield=True):
                await pccs.__aexit__()


async def _return_units(runtime: EnclaveRuntime, within: float, instance_id: str) -> None:
    """Step 4 of the drain: the final return, and its acknowledgement, within ``within`` s."""
    quota, accounting = runtime.quota, runtime.accounting
    sent = False
    with trio.move_on_after(within):
        await runtime.wait_for(lambda r: r.synced)
        runtime.return_all()
        sent = True
        await runtime.wait_for(lambda r: not r.accounting.returns_pending or not r.link_up)
    # What the custodian still counts against this instance: held by requests that did
    # not finish in time, or everything idle when the return was not acknowledged.
    in_doubt = quota.granted_total - quota.served_total - accounting.returns_acked
    # Settled only when the custodian acknowledged all that was taken back (a link lost
    # and made again meanwhile drops the returns in flight: not acknowledged).
    if sent and accounting.returns_acked == quota.returned_total:
        _log.info(
            "enclave_units_returned",
            returned_total=accounting.returns_acked,
            served_total=quota.served_total,
            granted_total=quota.granted_total,
            in_doubt=in_doubt,
        )
        return
    _log.warning(
        "enclave_units_in_doubt",
        units=in_doubt,
        instance_id=instance_id,
        why=(
            "the custodian did not acknowledge the return in time"
            if sent
            else "no synced custodian link to return them on"
        ),
        fix=(
            "they stay charged to the borrower; the owner may write them off with "
            f"`drm_custodian reclaim --instance {instance_id}` once the custodian has sent "
            "this instance nothing for longer than its reclaim window"
        ),
    )


async def _accept(
    scope: trio.CancelScope,
    consumers: ConsumerServer,
    listeners: list[trio.SocketListener],
    handlers: trio.Nursery,
) -> None:
    with scope:
        await trio.serve_listeners(consumers.handle, listeners, handler_nursery=handlers)


async def _handler_nursery(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    async with trio.open_nursery() as handlers:
        task_status.started(handlers)
        await trio.sleep_forever()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
