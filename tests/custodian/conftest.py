"""Fixtures for the custodian's tests: a fresh ledger file per test."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drm_custodian.ledger import Ledger


class FakeClock:
    """A wall clock that ticks one second per reading, so ``at`` columns are predictable."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1_000_000)

    def __call__(self) -> float:
        return float(next(self._ticks))


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


@pytest.fixture
async def ledger(ledger_path: Path) -> AsyncIterator[Ledger]:
    opened = await Ledger.open(ledger_path, clock=FakeClock())
    try:
        yield opened
    finally:
        await opened.aclose()
