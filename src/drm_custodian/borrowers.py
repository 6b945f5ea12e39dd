"""The custodian's borrowers: one license each, added and removed while the daemon runs.

A model owner lends to several customers from one custodian. Each customer is a
*borrower* with one license (:class:`~drm_custodian.state.LicenseRecord`), its own supply
and block in the ledger, and optionally a list of the models its enclaves receive.

:class:`BorrowerBook` is the one place that changes the set: ``borrower add`` writes a new
license record and the borrower's ``handoff/NAME.license.json`` (the same format and
handling as ``init``'s), ``borrower remove`` marks the record removed. Both change the
state directory's files and the in-memory table the enclave link checks licenses
against, so a new borrower's enclave can link at once and a removed one's license is
refused from then on; no restart. Only the process holding the state lock writes: the
daemon while it runs (the CLI then goes through the admin API), else the CLI itself.

A removed borrower's license record stays, marked removed: its history stays in the
ledger under its name, and that name is never given to another borrower (whose
enclaves would otherwise inherit the old one's supply and instances).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import structlog
import trio

from drm_custodian.state import (
    BORROWER_RE,
    HANDOFF,
    MAX_INSTANCES,
    MAX_LICENSE_MODELS,
    MODEL_NAME_RE,
    CustodianState,
    LicenseRecord,
    new_license,
    rewrite_license,
    write_license,
)
from drm_wire.errors import ConfigError

__all__ = [
    "MAX_BORROWERS",
    "AddedBorrower",
    "BorrowerBook",
    "BorrowerError",
    "parse_models",
]

log = structlog.get_logger(__name__)

#: Borrowers one custodian keeps, removed ones included (as many as licenses it loads).
MAX_BORROWERS: Final = 10_000


class BorrowerError(ConfigError):
    """A borrower change was refused; nothing was changed.

    Attributes:
        message: what was wrong, without the key.
        reason: ``bad_name``, ``bad_field``, ``exists``, ``unknown``, ``removed``,
            ``unknown_model``, ``too_many``.
    """

    def __init__(self, reason: str, message: str, *, key: str = "name") -> None:
        super().__init__(message, key=key)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class AddedBorrower:
    """What :meth:`BorrowerBook.add` made."""

    record: LicenseRecord
    #: The borrower's license file, with its secret: hand it over, then delete it.
    license_path: Path


def check_borrower_name(name: object) -> str:
    """A borrower name as it may appear in a file name, a URL path and a log line."""
    if not isinstance(name, str) or not BORROWER_RE.fullmatch(name):
        raise BorrowerError("bad_name", "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    return name


def parse_models(text: str) -> tuple[str, ...]:
    """``a,b`` -> ``("a", "b")``: distinct model names, at least one.

    Raises:
        BorrowerError: an empty list, a bad or repeated name, or too many.
    """
    names = tuple(part.strip() for part in text.split(","))
    if not names or len(names) > MAX_LICENSE_MODELS:
        raise BorrowerError(
            "bad_field", f"list 1 to {MAX_LICENSE_MODELS} model names", key="models"
        )
    for name in names:
        if not MODEL_NAME_RE.fullmatch(name):
            raise BorrowerError(
                "bad_field",
                f"{name!r} is not a model name ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}}, "
                "comma-separated)",
                key="models",
            )
    if len(set(names)) != len(names):
        raise BorrowerError("bad_field", "a model is named twice", key="models")
    return names


class BorrowerBook:
    """Adds and removes borrowers of a loaded state directory (see the module docstring).

    Args:
        state: the loaded state; its ``licenses`` table is changed in place.
        model_names: the models the daemon lends; a borrower may only be given these.
            ``None`` (no daemon): any well-formed names.
    """

    def __init__(self, state: CustodianState, model_names: Collection[str] | None = None) -> None:
        self._state = state
        self._models = None if model_names is None else frozenset(model_names)
        #: One change at a time: a check and its write must not interleave with another's.
        self._lock = trio.Lock()

    @property
    def active(self) -> list[str]:
        """Borrowers whose license works, sorted."""
        return sorted(self._state.borrowers)

    def records(self) -> list[LicenseRecord]:
        """Every license record, removed ones too, by borrower."""
        return sorted(self._state.licenses.values(), key=lambda r: r.borrower)

    def get(self, name: str) -> LicenseRecord | None:
        """The borrower's license record (also a removed one), or ``None``."""
        return self._state.license_of(name)

    async def add(
        self, name: str, *, max_instances: int = 1, models: tuple[str, ...] | None = None
    ) -> AddedBorrower:
        """Make the borrower's license; its enclaves may link as soon as this returns.

        Raises:
            BorrowerError: a bad name or field, a name in use (or once used), an unknown
                model, or too many borrowers. Nothing was written.
            ConfigError: the state directory refused the files.
        """
        check_borrower_name(name)
        if type(max_instances) is not int or not 1 <= max_instances <= MAX_INSTANCES:
            raise BorrowerError(
                "bad_field", f"must be from 1 to {MAX_INSTANCES}", key="max_instances"
            )
        models = self._check_models(models)
        async with self._lock:
            existing = self.get(name)
            if existing is not None:
                raise BorrowerError(
                    "exists",
                    f"borrower {name} was removed; a name is never reused"
                    if existing.removed
                    else f"borrower {name} exists (one license per borrower)",
                )
            if len(self._state.licenses) >= MAX_BORROWERS:
                raise BorrowerError("too_many", f"at most {MAX_BORROWERS} borrowers")
            record, secret = new_license(name, max_instances=max_instances, models=models)
            path = await trio.to_thread.run_sync(write_license, self._state.path, record, secret)
            self._state.licenses[record.license_id] = record
        log.info(
            "borrower_added",
            borrower=name,
            license_id=record.license_id,
            max_instances=max_instances,
            models=list(models) if models is not None else None,
        )
        return AddedBorrower(record, path)

    async def set_models(self, name: str, models: tuple[str, ...] | None) -> LicenseRecord:
        """Change the models the borrower's enclaves receive (``None``: every model lent).

        Live links keep what they were sent; each enclave's next link gets the new list
        (a model dropped from it is then withdrawn there, like one no longer lent).

        Raises:
            BorrowerError: a bad name or model, an unknown or removed borrower.
        """
        check_borrower_name(name)
        models = self._check_models(models)
        async with self._lock:
            record = self._changeable(name, "was removed")
            changed = replace(record, models=models)
            await self._store(changed)
        log.info(
            "borrower_models_set",
            borrower=name,
            models=list(models) if models is not None else None,
        )
        return changed

    def _changeable(self, name: str, if_removed: str) -> LicenseRecord:
        """The borrower's record, if it exists and was not removed (call under the lock)."""
        record = self.get(name)
        if record is None:
            raise BorrowerError("unknown", f"no borrower {name}")
        if record.removed:
            raise BorrowerError("removed", f"borrower {name} {if_removed}")
        return record

    async def _store(self, record: LicenseRecord) -> None:
        """Rewrite the record's file, then hold it in memory (call under the lock)."""
        await trio.to_thread.run_sync(rewrite_license, self._state.path, record)
        self._state.licenses[record.license_id] = record

    def _check_models(self, models: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if models is None:
            return None
        models = parse_models(",".join(models))
        unknown = sorted(set(models) - self._models) if self._models is not None else []
        if unknown:
            raise BorrowerError(
                "unknown_model",
                f"not lent by this custodian: {', '.join(unknown)} (it lends "
                f"{', '.join(sorted(self._models or ()))})",
                key="models",
            )
        return models

    async def remove(self, name: str) -> LicenseRecord:
        """Stop the borrower's license working; its ledger history stays.

        The caller cuts its live enclaves (the daemon's admin hook does). The handoff file,
        if still there, is deleted: it holds a secret that no longer opens anything.

        Raises:
            BorrowerError: a bad name, an unknown or already removed borrower.
        """
        check_borrower_name(name)
        async with self._lock:
            record = self._changeable(name, "is already removed")
            removed = replace(record, removed=True)
            await self._store(removed)
            handoff = self._state.path / HANDOFF / f"{name}.license.json"
            with contextlib.suppress(FileNotFoundError):
                await trio.to_thread.run_sync(os.unlink, handoff)
        log.warning("borrower_removed", borrower=name, license_id=record.license_id)
        return removed
