"""The enclave staples its own collateral in its RA-TLS certificate, and keeps it fresh.

A consumer may reach no PCCS at all, and TLS has no stapling channel for a client
certificate (the custodian link), so the enclave carries its platform's collateral bundle
in its certificate (:data:`~drm_wire.attestation.ratls_cert.STAPLED_COLLATERAL_OID`): a
verifier with nothing else still gets a full verdict (TCB status) inside the handshake.

How
---
The platform is read from the enclave's own quote: the FMSPC from its PCK certificate's
SGX extension, the PCK CA type (``processor`` or ``platform``) from that certificate's
issuer, so only the CRL that covers it is fetched. A
:class:`~drm_wire.attestation.collateral_cache.CollateralCache` fetches that one platform
from the borrower's PCCS (``--pccs-url``) and refreshes it before ``nextUpdate``; in
simulation without a PCCS the simulated platform issues its own, through the same cache.
Each time the cache refreshes, :class:`Stapler`:

1. checks the bundle the way every verifier will: our own quote is verified with it
   against the pinned root (Intel's; the simulated platform's in simulation), at the
   injected wall clock. A bundle for another FMSPC, or one that does not verify (forged,
   expired, for the other PCK CA: ``CollateralError``), is **never stapled**: logged at
   error level (``collateral_not_stapled``) and the last good staple stays. Genuine
   collateral whose verdict refuses this platform (revoked, TCB level) is stapled all the
   same, so an older staple cannot hide it (it is logged at error level);
2. re-issues the certificate with :func:`~drm_wire.attestation.ratls_cert.restaple` (the
   same key, the very same quotes: nothing asks the platform for a new quote);
3. installs it (``install``): the daemon builds fresh TLS contexts with it, for the
   consumer port and for the custodian link, and hands them to both
   (``set_context``). A context cannot be changed once a connection was made from it, and
   need not be: live connections keep the context, and the certificate, they were made
   with, while every new handshake (a new consumer, the custodian link's next dial)
   presents the new one.

While the PCCS is down the cache keeps what it has and logs ``collateral_fetch_failed``
with its age; the staple stays while it is current. When it expires with nothing newer,
the certificate is re-issued **without** a staple (``staple_expired``, error level):
expired collateral is never offered; verifiers with their own collateral still judge us,
the others refuse (TCB status unknown) until the PCCS is back.

Threats A15 (collateral a host controls) and A16 (the service down, collateral past
``nextUpdate``) in docs/threat-model.md cover this module.

Wall time comes from an injected ``clock`` (validity checks); waits use trio's clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import structlog
import trio

from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_cache import CachedCollateral, CollateralCache, Fetcher
from drm_wire.attestation.collateral_source import freshness
from drm_wire.attestation.errors import CertificateChainError, CollateralError
from drm_wire.attestation.pccs import CaType, quote_platform
from drm_wire.attestation.quote import parse_quote
from drm_wire.attestation.ratls_cert import (
    MAX_STAPLED_COLLATERAL_BYTES,
    RatlsCredentials,
    parse_ratls_certificate,
    restaple,
)
from drm_wire.attestation.verify import TrustAnchors, collateral_window, verify_quote
from drm_wire.errors import AttestationError, ConfigError

__all__ = ["Stapler", "own_platform"]

_log = structlog.get_logger("drm_enclave.staple")

#: Re-check the staple at least this often (seconds of trio's clock), so a wall clock
#: that jumps (or drifts from trio's) is noticed within a day.
_RECHECK: Final = 86400.0


def own_platform(credentials: RatlsCredentials) -> tuple[bytes, CaType]:
    """The FMSPC and PCK CA type of the platform that quoted ``credentials``.

    Raises:
        ConfigError: the quote's PCK certificate names no FMSPC or no known PCK CA (then
            no collateral can be fetched for it).
    """
    quote = parse_quote(parse_ratls_certificate(credentials.certificate_der).quote)
    try:
        platform = quote_platform(quote)
    except CertificateChainError as exc:
        raise ConfigError(f"our quote's PCK certificate does not parse: {exc}") from exc
    if platform is None:
        raise ConfigError(
            "our quote's PCK certificate names no FMSPC or PCK CA: no collateral to staple"
        )
    return platform


def _check_name(exc: AttestationError) -> str:
    return str(getattr(exc, "check", type(exc).__name__))


class Stapler:
    """Keeps the enclave's certificate stapled with current, verified collateral.

    Args:
        credentials: our RA-TLS key and certificate (it may staple something already:
            checked like any bundle, and kept while it is current).
        install: puts re-issued credentials in use for new connections (every TLS
            context that presents our certificate).
        fetch: where collateral comes from (the PCCS client, or the simulated platform).
        trust: the pinned roots our quote chains to.
        clock: wall time for validity checks (default: the system clock).
    """

    def __init__(
        self,
        credentials: RatlsCredentials,
        *,
        install: Callable[[RatlsCredentials], None],
        fetch: Fetcher,
        trust: TrustAnchors,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.fmspc, self.ca = own_platform(credentials)
        self.credentials = credentials
        self._install_credentials = install
        self._trust = trust
        self._clock = clock or (lambda: datetime.now(UTC))
        self.cache = CollateralCache(fetch, clock=self._clock)
        evidence = parse_ratls_certificate(credentials.certificate_der)
        self._quote = evidence.quote
        #: What the certificate staples now (parsed), and until when it is current.
        self.stapled: Collateral | None = None
        self._ends: datetime | None = None
        #: Certificates installed since the start (tests and logs).
        self.issued = 0
        if evidence.stapled_collateral is not None:
            self._adopt(evidence.stapled_collateral)

    def _adopt(self, text: bytes) -> None:
        """Keep the staple the certificate was made with, if it verifies; else drop it."""
        try:
            collateral = Collateral.from_json(text)
        except CollateralError as exc:
            _log.error("collateral_not_stapled", reason=f"initial staple: {exc}")
            self._install(None, None)
            return
        if self._check(collateral, "initial"):
            self.stapled, self._ends = collateral, collateral_window(collateral)[1]
        else:
            self._install(None, None)

    def _check(self, collateral: Collateral, origin: str) -> bool:
        """Whether ``collateral`` may be stapled (module docstring, step 1)."""
        fmspc = collateral.tcb_info.fmspc
        if fmspc != self.fmspc:
            _log.error(
                "collateral_not_stapled",
                origin=origin,
                reason=f"it is for FMSPC {fmspc.hex().upper()}, "
                f"this platform is {self.fmspc.hex().upper()}",
            )
            return False
        try:
            verified = verify_quote(
                self._quote, trust=self._trust, collateral=collateral, now=self._clock()
            )
        except (CollateralError, CertificateChainError) as exc:
            _log.error("collateral_not_stapled", origin=origin, check=_check_name(exc),
                       reason=str(exc))  # fmt: skip
            return False
        except AttestationError as exc:  # genuine collateral; its verdict refuses us
            _log.error(
                "own_tcb_refused",
                check=_check_name(exc),
                reason=str(exc),
                note="stapled anyway: verifiers will refuse this platform until it is fixed",
            )
            return True
        _log.info(
            "own_tcb_status",
            tcb_status=None if verified.tcb_status is None else verified.tcb_status.value,
            advisory_ids=list(verified.advisory_ids),
        )
        return True

    def _fits(self, text: str) -> bool:
        """Whether the bundle fits the certificate's extension (a PCCS answers up to
        ``MAX_RESPONSE_BYTES``; a PCK CRL listing many revoked platforms can be large)."""
        size = len(text.encode())
        if size <= MAX_STAPLED_COLLATERAL_BYTES:
            return True
        _log.error(
            "collateral_not_stapled",
            origin="pccs",
            check="size",
            reason=f"the bundle is {size} bytes; a staple holds at most "
            f"{MAX_STAPLED_COLLATERAL_BYTES}: verifiers need collateral of their own",
        )
        return False

    def _install(self, collateral: Collateral | None, text: str | None) -> None:
        credentials = restaple(self.credentials, None if text is None else text.encode())
        self._install_credentials(credentials)
        self.credentials = credentials
        self.stapled = collateral
        self._ends = None if collateral is None else collateral_window(collateral)[1]
        self.issued += 1

    def consider(self) -> None:
        """Staple the cached bundle if it is newer than the staple and verifies; drop an
        expired staple. Runs on every cache refresh and at the staple's expiry."""
        held: CachedCollateral | None = self.cache.held(self.fmspc, self.ca)
        now = self._clock()
        if (
            held is not None
            and held.text is not None
            and held.collateral is not self.stapled
            and (self.stapled is None or freshness(held.collateral) >= freshness(self.stapled))
            and self._fits(held.text)
            and self._check(held.collateral, "pccs")
        ):
            self._install(held.collateral, held.text)
            _log.info(
                "collateral_stapled",
                fmspc=self.fmspc.hex().upper(),
                ca=self.ca,
                tcb_evaluation_data_number=held.collateral.tcb_info.tcb_evaluation_data_number,
                valid_until=None if self._ends is None else self._ends.isoformat(),
                certificates_issued=self.issued,
            )
        elif self._ends is not None and now > self._ends:
            ended = self._ends
            self._install(None, None)
            _log.error(
                "staple_expired",
                expired_at=ended.isoformat(),
                fmspc=self.fmspc.hex().upper(),
                message="the stapled collateral expired and no newer collateral verified: "
                "the certificate staples nothing now; consumers without a PCCS cannot judge "
                "this enclave until the PCCS answers again",
            )

    def _until_expiry(self) -> float:
        if self._ends is None:
            return _RECHECK
        left = (self._ends - self._clock()).total_seconds()
        return min(_RECHECK, max(0.0, left) + 1.0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch, check, staple and re-staple, forever (cancel to stop)."""
        self.cache.want(self.fmspc, self.ca)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.cache.run)
            task_status.started()
            await self.cache.attempted()
            if self.cache.held(self.fmspc, self.ca) is None:
                _log.error(
                    "staple_unavailable",
                    fmspc=self.fmspc.hex().upper(),
                    ca=self.ca,
                    stapled=self.stapled is not None,
                    message="no collateral from the PCCS yet (collateral_fetch_failed says "
                    "why); serving on, and fetching again: verifiers without their own "
                    "collateral refuse this enclave until it staples",
                )
            while True:
                self.consider()
                with trio.move_on_after(self._until_expiry()):
                    await self.cache.changed()
