"""Where a verifier finds collateral for a quote, and which of several it trusts.

A verifier may hold collateral from several places: bundles handed to it
(``--collateral FILE``, one per platform), a PCCS cache, and whatever the peer staples
in its certificate. :class:`CollateralSource` is what they have in common: given the
platform's FMSPC (read from the PCK leaf inside verification, so a source never
guesses), it returns the candidates. :func:`~.verify.verify_quote` then judges each
candidate exactly alike (signatures to the pinned root, CRLs, validity window at
``now``) and uses the **newest one that verifies**: highest ``tcbEvaluationDataNumber``,
then newest TCB info, then newest PCK CRL. A candidate that does not verify (forged,
expired, for the other PCK CA) is passed over; if none verifies, the newest one's error
is raised, so expired collateral fails closed (``collateral_expired``). A verdict from a
candidate that verified (revoked, rogue QE, TCB level) is final: an older candidate can
never overrule it, so a host cannot staple old collateral to hide a TCB recovery.

The verifier also passes the PCK CA type that issued the PCK leaf (``processor`` or
``platform``; ``None`` when the issuer names neither), so a source that fetches fetches
only the CRL that covers it; a fixed source may ignore it (collateral for the other CA is
passed over at verification).

A source with no candidate for the FMSPC gives no TCB status: the quote is judged as
without collateral (QE against the pinned identity, status unknown, which a production
policy refuses).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from drm_wire.attestation._pck import CaType
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.errors import CollateralError
from drm_wire.errors import ConfigError

__all__ = [
    "CollateralSet",
    "CollateralSource",
    "chain_sources",
    "newest_first",
    "with_stapled",
]


@runtime_checkable
class CollateralSource(Protocol):
    """Anything that can offer collateral for a platform."""

    def candidates(self, fmspc: bytes, ca: CaType | None = None) -> Sequence[Collateral]:
        """The collateral it holds for ``fmspc`` and PCK CA ``ca`` (any order; may be
        empty; ``ca`` is a hint: anything else offered is passed over at verification)."""
        ...


def freshness(collateral: Collateral) -> tuple[int, datetime, datetime]:
    """The sort key of "newest": evaluation data number, TCB info issue, PCK CRL update."""
    return (
        collateral.tcb_info.tcb_evaluation_data_number,
        collateral.tcb_info.issue_date,
        collateral.pck_crl.last_update_utc.astimezone(UTC),
    )


def newest_first(items: Iterable[Collateral]) -> list[Collateral]:
    """Candidates in the order :func:`~.verify.verify_quote` tries them."""
    return sorted(items, key=freshness, reverse=True)


class CollateralSet:
    """A fixed set of collateral bundles (files given to a verifier), by FMSPC."""

    def __init__(self, items: Iterable[Collateral] = ()) -> None:
        self._by_fmspc: dict[bytes, list[Collateral]] = {}
        for item in items:
            self._by_fmspc.setdefault(item.tcb_info.fmspc, []).append(item)

    @classmethod
    def load(cls, paths: Iterable[str | Path]) -> CollateralSet:
        """Read bundle files (``collateral fetch`` output, or the dcap-qvl JSON layout).

        Parsing is strict; signatures and dates are checked at verification, each time.

        Raises:
            ConfigError: a file cannot be read or is not a collateral bundle (naming it).
        """
        items = []
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read collateral: {exc.strerror}", path=str(path)
                ) from exc
            try:
                items.append(Collateral.from_json(data))
            except CollateralError as exc:
                raise ConfigError(f"not a collateral bundle: {exc}", path=str(path)) from exc
        return cls(items)

    def candidates(self, fmspc: bytes, ca: CaType | None = None) -> Sequence[Collateral]:
        return tuple(self._by_fmspc.get(fmspc, ()))

    @property
    def generation(self) -> int:
        """Never changes: the set is fixed (result caches key on this)."""
        return 0

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_fmspc.values())

    def __repr__(self) -> str:
        platforms = ", ".join(f.hex().upper() for f in self._by_fmspc)
        return f"<CollateralSet {len(self)} bundle(s) for FMSPC {platforms or 'none'}>"


class _Chained:
    def __init__(self, sources: Sequence[CollateralSource]) -> None:
        self._sources = tuple(sources)

    def candidates(self, fmspc: bytes, ca: CaType | None = None) -> Sequence[Collateral]:
        return tuple(c for source in self._sources for c in source.candidates(fmspc, ca))

    @property
    def generation(self) -> int | None:
        """Changes whenever a part's does (parts only count up); None if a part has none."""
        parts = [getattr(s, "generation", None) for s in self._sources]
        if not all(isinstance(p, int) for p in parts):
            return None
        return sum(p for p in parts if isinstance(p, int))


def chain_sources(*sources: CollateralSource | None) -> CollateralSource | None:
    """One source offering every candidate of ``sources`` (``None`` ones skipped)."""
    present = [s for s in sources if s is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else _Chained(present)


def with_stapled(
    collateral: Collateral | CollateralSource | None, stapled: bytes | None
) -> Collateral | CollateralSource | None:
    """The verifier's own collateral plus what the peer stapled (parsed strictly).

    Raises:
        CollateralError: the stapled bytes are not a collateral bundle: the peer's evidence
            is malformed, and is refused like a malformed quote.
    """
    if stapled is None:
        return collateral
    theirs = CollateralSet([Collateral.from_json(stapled)])
    if isinstance(collateral, Collateral):
        return chain_sources(CollateralSet([collateral]), theirs)
    return chain_sources(collateral, theirs)
