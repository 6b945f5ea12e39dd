"""Collateral from a PCCS, cached per FMSPC, for verifiers that run for a long time.

The FMSPC of a platform is known only inside the TLS verify callback, where no network
I/O can happen. So the cache is a :class:`~.collateral_source.CollateralSource` whose
:meth:`candidates` never blocks: it answers from memory, and a platform it has nothing
for is *noted*; :meth:`run` (a trio task) fetches noted platforms at once and refreshes
every cached one before its ``nextUpdate``. Until the first fetch lands the handshake is
judged without collateral (a production policy refuses it: TCB status unknown); the
enclave reconnects and is judged with it. That choice, and why it is safe, is in
docs/links.md ("Collateral and the handshake").

While the PCCS is down the cache keeps serving what it holds, logging
``collateral_fetch_failed`` (with the age of what it serves); what it holds is checked at
every verification like any collateral, so once it is past ``nextUpdate`` verification
fails closed (``collateral_expired``). Nothing here is trusted: a fetched bundle is only
kept if it parses, and it is verified to the pinned root on every use.

A fetcher may answer the bundle's JSON text rather than a parsed bundle: the cache then
parses it (strictly; a bundle that does not parse is a failed fetch) and keeps the text,
which :meth:`CollateralCache.held` gives back: what an enclave staples in its certificate
(:mod:`drm_enclave.staple`).

Wall time comes from an injected ``clock`` (validity checks); waiting uses trio's clock,
so tests drive refreshes with the autojump clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import structlog
import trio

from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.errors import CollateralError
from drm_wire.attestation.pccs import CaType, PccsError

__all__ = ["CachedCollateral", "CollateralCache", "Fetcher"]

#: Refresh this long before ``nextUpdate`` (Intel issues new collateral well before).
REFRESH_MARGIN: Final = timedelta(hours=12)
#: Retry a failed fetch after this, doubling up to RETRY_MAX.
RETRY_MIN: Final = 5.0
RETRY_MAX: Final = 600.0
#: Most platforms remembered (a custodian sees a handful).
MAX_PLATFORMS: Final = 64

#: ``(fmspc, ca) -> Collateral``: :meth:`PccsClient.fetch <.pccs.PccsClient.fetch>`; or
#: the bundle's JSON text (:meth:`~.pccs.PccsClient.fetch_bundle`), kept for stapling.
Fetcher = Callable[[bytes, CaType], Awaitable[Collateral | str]]
_CA_TYPES: Final[tuple[CaType, ...]] = ("processor", "platform")

_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CachedCollateral:
    """One cached bundle: parsed, when it was fetched, and its text (if fetched as text)."""

    collateral: Collateral
    fetched_at: datetime
    text: str | None = None


def _expiry(collateral: Collateral) -> datetime:
    ends = [collateral.tcb_info.next_update, collateral.qe_identity.next_update]
    ends += [c.next_update_utc for c in (collateral.pck_crl, collateral.root_ca_crl)
             if c.next_update_utc is not None]  # fmt: skip
    return min(ends)


class CollateralCache:
    """Per-FMSPC collateral for the PCK CA types its verifiers name, fetched and refreshed
    by :meth:`run`."""

    def __init__(self, fetch: Fetcher, *, clock: Callable[[], datetime] | None = None) -> None:
        self._fetch = fetch
        self._clock = clock or (lambda: datetime.now(UTC))
        self._entries: dict[tuple[bytes, CaType], CachedCollateral] = {}
        #: Platforms to fetch, each with the PCK CA types wanted for it.
        self._wanted: dict[bytes, set[CaType]] = {}
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._attempted = trio.Event()
        #: Counts the refreshes: result caches key on it, so new collateral applies at once.
        self.generation = 0

    # --- the verify callback's side: never blocks ------------------------------------

    def candidates(self, fmspc: bytes, ca: CaType | None = None) -> Sequence[Collateral]:
        """What is cached for ``fmspc`` and the PCK CA ``ca``; a platform (or CA) not seen
        before is noted for fetching: that CA's collateral only, both when ``ca`` is None."""
        found = [e.collateral for (f, c), e in self._entries.items()
                 if f == fmspc and ca in (None, c)]  # fmt: skip
        types = set(_CA_TYPES if ca is None else (ca,))
        noted = self._wanted.get(fmspc)
        if not found and ((noted is None and len(self._wanted) < MAX_PLATFORMS) or
                          (noted is not None and not types <= noted)):  # fmt: skip
            self.want(fmspc, ca)
            _log.info("collateral_wanted", fmspc=fmspc.hex().upper(), ca=ca or "both")
        return found

    def held(self, fmspc: bytes, ca: CaType) -> CachedCollateral | None:
        """The bundle cached for ``fmspc`` and PCK CA type ``ca``, if any."""
        return self._entries.get((fmspc, ca))

    def age(self, fmspc: bytes) -> float | None:
        """Seconds since the newest collateral held for ``fmspc`` was fetched (a metric)."""
        times = [e.fetched_at for (f, _), e in self._entries.items() if f == fmspc]
        return None if not times else (self._clock() - max(times)).total_seconds()

    def ages(self) -> dict[tuple[bytes, CaType], float]:
        """Seconds since each cached ``(fmspc, ca)`` entry was fetched (the metrics gauge).

        The age grows while the PCCS is down and drops back on the next good fetch, so an
        alert on it catches a refresh that keeps failing long before ``nextUpdate`` does.
        """
        now = self._clock()
        return {key: (now - e.fetched_at).total_seconds() for key, e in self._entries.items()}

    def platforms(self) -> list[bytes]:
        """Every FMSPC noted or cached."""
        return sorted(set(self._wanted) | {f for f, _ in self._entries})

    # --- the fetching task --------------------------------------------------------------

    async def wait_for(self, fmspc: bytes) -> None:
        """Return once something is cached for ``fmspc`` (noting it as wanted)."""
        self.want(fmspc)
        while not any(f == fmspc for f, _ in self._entries):
            await self._changed.wait()

    async def changed(self) -> None:
        """Return at the next successful fetch (of any platform)."""
        await self._changed.wait()

    async def attempted(self) -> None:
        """Return once the next round of fetches is over, whether or not they succeeded."""
        await self._attempted.wait()

    def want(self, fmspc: bytes, ca: CaType | None = None) -> None:
        """Fetch ``fmspc`` ahead of its first handshake (a platform known in advance), for
        the PCK CA type ``ca`` only, or for both when it is not known."""
        self._wanted.setdefault(fmspc, set()).update(_CA_TYPES if ca is None else (ca,))
        self._wake.set()

    async def _refresh(self, fmspc: bytes, ca: CaType) -> bool:
        try:
            fetched = await self._fetch(fmspc, ca)
            text = fetched if isinstance(fetched, str) else None
            collateral = Collateral.from_json(fetched) if isinstance(fetched, str) else fetched
        except (PccsError, CollateralError) as exc:
            held = self._entries.get((fmspc, ca))
            _log.warning(
                "collateral_fetch_failed",
                fmspc=fmspc.hex().upper(),
                ca=ca,
                error=str(exc)[:300],
                serving_age_seconds=None
                if held is None
                else (self._clock() - held.fetched_at).total_seconds(),
            )
            return False
        self._entries[(fmspc, ca)] = CachedCollateral(collateral, self._clock(), text)
        self.generation += 1
        self._changed.set()
        self._changed = trio.Event()
        _log.info(
            "collateral_refreshed",
            fmspc=fmspc.hex().upper(),
            ca=ca,
            tcb_evaluation_data_number=collateral.tcb_info.tcb_evaluation_data_number,
            next_update=_expiry(collateral).isoformat(),
        )
        return True

    def _due(self) -> float:
        """Seconds until the next refresh is due (0: now)."""
        now = self._clock()
        waits = [0.0 for f, types in self._wanted.items() for ca in types
                 if (f, ca) not in self._entries]  # fmt: skip
        for entry in self._entries.values():
            due = _expiry(entry.collateral) - REFRESH_MARGIN
            waits.append(max(0.0, (due - now).total_seconds()))
        return min(waits, default=float("inf"))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch wanted platforms and refresh cached ones, forever (cancel to stop)."""
        task_status.started()
        retry = RETRY_MIN
        while True:
            with trio.move_on_after(self._due()):
                await self._wake.wait()
            self._wake = trio.Event()
            now = self._clock()
            ok = True
            for fmspc, types in sorted(self._wanted.items()):
                for ca in sorted(types, reverse=True):  # processor first
                    entry = self._entries.get((fmspc, ca))
                    if entry is None or _expiry(entry.collateral) - REFRESH_MARGIN <= now:
                        ok = await self._refresh(fmspc, ca) and ok
            self._attempted.set()
            self._attempted = trio.Event()
            if ok:
                retry = RETRY_MIN
            else:
                await trio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)
