"""One enclave connection, custodian side: admission and the per-connection error boundary.

:func:`~drm_custodian.serve.serve` runs :func:`handle_connection` for every TCP stream
its enclave port accepts; what an admitted enclave then gets (models, grants, blocks) is
the business of :class:`~drm_custodian.session.EnclaveSession`.

Theory of operation
-------------------
:func:`handle_connection` is the per-connection boundary: it binds the log context
(``peer``, ``conn_id``, ``role``), then admits the enclave in the steps of docs/links.md:

1. TLS, in which the enclave's RA-TLS certificate is verified against the policy (a
   refused enclave never gets a byte); the verified identity is logged.
2. ``hello`` / ``welcome`` over a :class:`~drm_wire.net.channel.MessageChannel`; the
   instance id must be 32 hex characters (else ``error(protocol_error)``); the license in
   the hello is checked (a bad one gets a uniform ``error(attestation_failed)``); the
   license is claimed in the :class:`~drm_custodian.registry.Registry` (an instance past
   the license's ``max_instances`` live ones gets ``error(duplicate_instance)`` naming
   the cap, I23).

The admitted enclave's :class:`~drm_custodian.session.EnclaveSession` then runs, with
``borrower`` and ``instance`` bound to the log context, until the link ends; its claim is
released and the session marked finished however it ends. Whatever ends the link (a clean
close, a dead peer, a protocol error, a bug) is logged here and closes this one
connection; the daemon lives on.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Final

import structlog
import trio

from drm_custodian.registry import InstanceLimit
from drm_custodian.session import EnclaveSession, LinkDead, SessionContext, send_last_words
from drm_custodian.state import LicenseRejected
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.errors import ErrorCode, PeerError, RemoteProtocolError, first_leaf
from drm_wire.net.budget import ReceiveLimits
from drm_wire.net.channel import ChannelError, open_channel
from drm_wire.net.tls import PeerVerificationError, accept_tls
from drm_wire.protocol import Link, Side

__all__ = ["SOFTWARE", "handle_connection"]

log = structlog.get_logger(__name__)

SOFTWARE: Final = "drm-custodian/1"
#: The instance id an enclave chooses: 32 hex characters (docs/links.md, step 2).
_INSTANCE_ID_RE: Final = re.compile(r"[0-9a-fA-F]{32}", re.ASCII)
#: A license id as ``init`` makes them; anything else is not logged (it may be a secret).
_LICENSE_ID_RE: Final = re.compile(r"lic_[0-9a-f]{32}", re.ASCII)
#: What every refused license is told: nothing that tells ids and secrets apart.
_LICENSE_REFUSED: Final = "attestation failed"
_CONN_IDS = itertools.count(1)

#: How a link ends in the ordinary course of things: logged as a fact, not a crash.
_ENDINGS: Final = (
    ChannelError,
    RemoteProtocolError,
    PeerError,
    PeerVerificationError,
    LinkDead,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


async def handle_connection(
    transport: trio.abc.Stream,
    ctx: SessionContext,
    *,
    peer: str,
    limits: ReceiveLimits | None = None,
) -> None:
    """Serve one enclave connection until it ends; never raises (but Cancelled).

    Args:
        transport: the accepted TCP stream (TLS is done here).
        ctx: what the sessions share.
        peer: the remote address, for the log.
        limits: the frame deadlines and memory budget the link is read under (I17); a
            frame that misses them ends the link, logged and counted with
            ``ctx.limit_hit``.
    """
    with structlog.contextvars.bound_contextvars(
        peer=peer, conn_id=next(_CONN_IDS), role="enclave"
    ):
        try:
            await _serve_connection(transport, ctx, limits)
        except Exception as exc:  # noqa: BLE001 - the per-connection boundary; _log_end logs it
            _log_end(exc, ctx.limit_hit)
        except BaseExceptionGroup as group:
            # A failure that met a cancellation (shutdown): log the failure, let the
            # cancellation (or KeyboardInterrupt) go on.
            errors, others = group.split(Exception)
            if errors is not None:
                _log_end(errors, ctx.limit_hit)
            if others is not None:
                raise others from None
        finally:
            await trio.aclose_forcefully(transport)


def _refusal_fix(cause: BaseException) -> str:
    """What the owner can do about an enclave the policy refused."""
    if type(cause).__name__ == "UntrustedRootError":
        return (
            "its quote does not chain to a root the policy trusts: a real SGX quote needs "
            "Intel's root; a SIMULATED enclave's needs the policy's [simulation] root to be "
            "that enclave's --simulation-dir platform (`drm_enclave measure "
            "--simulation-dir DIR` with the enclave's own DIR writes such a policy)"
        )
    return (
        "if this enclave should be served, the policy (serve --policy) must accept its "
        "measurement: `drm_enclave measure` on its build prints it"
    )


def _log_end(exc: Exception, limit_hit: Callable[[str], object]) -> None:
    error = _ending(exc)
    if isinstance(error, RemoteProtocolError) and error.code is ErrorCode.TIMEOUT:
        limit_hit("frame_timeout")  # I17: a frame stalled; the enclave was told why
        log.warning("enclave_frame_too_slow", detail=error.message[:300])
    elif isinstance(error, RemoteProtocolError) and error.code is ErrorCode.BUSY:
        limit_hit("budget_full")
        log.warning("enclave_link_budget_full", detail=error.message[:300])
    elif error is not None:
        log.info("enclave_disconnected", reason=type(error).__name__, detail=str(error)[:300])
    else:
        log.exception("enclave_session_failed")


def _ending(exc: BaseException) -> BaseException | None:
    """The first exception that ended a session, if all of them are ordinary endings.

    Several tasks of a session may see the link go at once (the receive loop and a send,
    say), and their nursery then raises a group of them: still a disconnect, not a bug.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc if isinstance(exc, _ENDINGS) else None
    endings, rest = exc.split(_ENDINGS)
    if endings is None or rest is not None:
        return None
    return first_leaf(endings)


async def _serve_connection(
    transport: trio.abc.Stream, ctx: SessionContext, limits: ReceiveLimits | None
) -> None:
    cfg = ctx.config
    slots = ctx.handshake_slots
    if slots is not None:
        # I17: at most so many handshakes (RA-TLS verification included) at once; a
        # connection waits for a slot no longer than a handshake may take.
        with trio.move_on_after(cfg.handshake_timeout) as waiting:
            await slots.acquire()
        if waiting.cancelled_caught:
            ctx.limit_hit("handshakes")
            log.warning("enclave_handshake_slots_full")
            return
    try:
        stream = await accept_tls(
            transport, ctx.tls_context, handshake_timeout=cfg.handshake_timeout
        )
    except PeerVerificationError as exc:
        # Refused inside the handshake: the enclave got no application byte (I8).
        cause = exc.__cause__ or exc
        log.warning("enclave_refused", reason=str(cause)[:300], fix=_refusal_fix(cause))
        return
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        # No client certificate, no common TLS version, a peer that hung up or stalled.
        log.info("enclave_handshake_failed", reason=str(exc.__cause__ or exc)[:300])
        return
    finally:
        if slots is not None:
            slots.release()
    identity = stream.peer_identity_as(VerifiedEnclave)
    log.info(
        "enclave_attested",
        mr_enclave=identity.mr_enclave.hex(),
        mr_signer=identity.mr_signer.hex(),
        isv_svn=identity.isv_svn,
        simulated=identity.simulated,
        debug=identity.debug,
        tcb_status=identity.tcb_status.value if identity.tcb_status else None,
        advisory_ids=list(identity.advisory_ids),
    )
    if identity.simulated:
        log.warning("insecure_simulated_enclave", mr_enclave=identity.mr_enclave.hex())
    async with open_channel(stream, Link.CUSTODIAN, Side.SERVER, limits=limits) as channel:
        hello = await channel.accept_hello(software=SOFTWARE, hello_timeout=cfg.hello_timeout)
        instance_id = hello.instance_id or ""
        if not _INSTANCE_ID_RE.fullmatch(instance_id):
            log.warning("enclave_bad_instance_id")
            await send_last_words(
                channel, ErrorCode.PROTOCOL_ERROR, "instance_id: 32 hex characters"
            )
            return
        try:
            license_id, _, secret = (hello.license or "").partition(":")
            record = ctx.state.verify_license(license_id, secret)
        except LicenseRejected:
            shown = license_id if _LICENSE_ID_RE.fullmatch(license_id) else "<malformed>"
            log.warning("enclave_license_refused", license_id=shown)
            await send_last_words(channel, ErrorCode.ATTESTATION_FAILED, _LICENSE_REFUSED)
            return
        with structlog.contextvars.bound_contextvars(
            borrower=record.borrower, instance=instance_id
        ):
            known = await ctx.ledger.instance(record.borrower, instance_id)
            if known is not None and known.retired is not None:
                # It stopped cleanly or the owner wrote it off (I20, I21): never again.
                log.warning("enclave_instance_retired", why=known.retired)
                await send_last_words(
                    channel,
                    ErrorCode.INSTANCE_RETIRED,
                    f"this enclave instance is {known.retired}: restart the enclave process "
                    "(a new process is a new instance)",
                )
                return
            session = EnclaveSession(
                ctx, channel, identity, record, instance_id, held=hello.held or ()
            )
            try:
                await ctx.registry.claim(session, max_instances=record.max_instances)
            except InstanceLimit as refused:
                log.warning(
                    "enclave_duplicate_instance",
                    license_id=record.license_id,
                    max_instances=refused.max_instances,
                )
                await send_last_words(channel, ErrorCode.DUPLICATE_INSTANCE, str(refused))
                return
            if ctx.state.licenses.get(record.license_id, record).removed:
                # Removed while this link was being checked: the removal's cut missed it.
                ctx.registry.release(session)
                log.warning("enclave_license_refused", license_id=record.license_id)
                await send_last_words(channel, ErrorCode.ATTESTATION_FAILED, _LICENSE_REFUSED)
                return
            try:
                await session.run()
            finally:
                ctx.registry.release(session)
                session.finish()
