"""The fault campaign (drm_lab.chaos) with fixed seeds, and its checker against a build
broken on purpose.

A short campaign runs in the default suite; ``nox -s chaos`` runs the full one. The
broken build is made only here: a ``sitecustomize`` module in the test's directory, put
on the daemons' ``PYTHONPATH`` by the lab, patches the enclave's quota so that every grant
lets it serve one unit more than it was granted. Production code has no switch for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from drm_lab.chaos import Campaign, Topology, run_campaign

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Fixed seeds: the draws are the same on every run.
SEED: Final = 19
SHORT: Final = 24

#: Imported by every daemon of the broken build's lab before anything else.
SERVE_ONE_MORE: Final = """
import drm_enclave.quota as quota

_add = quota.Quota._add


def _add_one_more(self, units):
    woken = _add(self, units)
    return woken + self._give(1)  # one unit nobody granted


quota.Quota._add = _add_one_more
"""


async def test_a_short_campaign_finds_no_violation(tmp_path: Path) -> None:
    """I1, I2, I5, I20, I21: a short seeded campaign of real faults against real
    processes; every check after every step holds."""
    report = await run_campaign(tmp_path / "lab", seed=SEED, faults=SHORT)
    assert report.violations == [], report.text()
    assert report.counted >= SHORT
    assert report.steps_checked > SHORT // 2
    assert len(report.faults) >= 4, report.text()  # several kinds, not one repeated
    assert report.answers > 0, "the consumers were never served: nothing was checked"


async def test_the_checker_catches_an_enclave_that_serves_beyond_its_grant(
    tmp_path: Path,
) -> None:
    """The same campaign against an enclave patched to serve one more unit per grant:
    the checker reports the answers the ledger does not cover."""
    patch = tmp_path / "broken"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(SERVE_ONE_MORE, encoding="utf-8")
    report = await run_campaign(
        tmp_path / "lab",
        seed=SEED,
        faults=SHORT,
        env={"PYTHONPATH": str(patch)},
        stop_on_violation=True,
    )
    assert report.violations, report.text()
    caught = " ".join(report.violations)
    assert "beyond the grant" in caught or "the ledger covers" in caught, report.text()


def test_a_topology_this_custodian_cannot_run_is_refused(tmp_path: Path) -> None:
    Topology(1, 1).check_supported()
    for shape in (Topology(2, 1), Topology(1, 3), Topology(0, 1)):
        with pytest.raises(ValueError, match="borrower"):
            shape.check_supported()
    with pytest.raises(ValueError, match="one live enclave per license"):
        Campaign(tmp_path, seed=1, faults=1, topology=Topology(2, 3))
    assert not any(tmp_path.iterdir()), "a refused campaign started something"
