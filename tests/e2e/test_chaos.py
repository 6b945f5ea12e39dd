"""The fault campaign (drm_lab.chaos) with fixed seeds, and its checker against builds
broken on purpose.

A short campaign runs in the default suite (two borrowers, two enclaves each);
``nox -s chaos`` runs the full one. The broken builds are made only here: a
``sitecustomize`` module in the test's directory, put on the daemons' ``PYTHONPATH`` by
the lab, patches one daemon. Production code has no switch for either:

* the enclave's quota lets it serve one unit more than each grant;
* the custodian credits a recall's units to the borrower's supply as it sends the
  ``recall``, before the enclave confirms what it gave back (I20), so it may grant to
  another enclave units the first one is still serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from drm_lab.chaos import MAX_ENCLAVES, Campaign, Topology, run_campaign

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Fixed seeds: the draws are the same on every run.
SEED: Final = 19
SHORT: Final = 20
SHORT_TOPOLOGY: Final = Topology(borrowers=2, enclaves=2)

#: Imported by every daemon of the broken enclave's lab before anything else.
SERVE_ONE_MORE: Final = """
import drm_enclave.quota as quota

_add = quota.Quota._add


def _add_one_more(self, units):
    woken = _add(self, units)
    return woken + self._give(1)  # one unit nobody granted


quota.Quota._add = _add_one_more
"""

#: Imported by every daemon of the broken custodian's lab: as a session sends ``recall``,
#: it records a return of the units asked for and wakes the borrower's other sessions
#: (which may then be granted them), instead of crediting what the enclave confirms.
CREDIT_ON_RECALL: Final = """
import drm_custodian.session as session

_push_recall = session.EnclaveSession._push_recall


async def _push_recall_credited(self):
    units = min(self._recall_due, session.MAX_GRANT_UNITS)
    if units > 0 and not self.stopped:
        result = await self._ledger.record_return(
            self.borrower,
            self.instance_id,
            returned_total=self.returned_total + units,
            served_total=self.served_total,
            requests_total=0,
            final=False,
        )
        if result.refused is None:
            self.returned_total = result.returned_total
            for other in self._ctx.registry.sessions(self.borrower):
                if other is not self:
                    other.wake()
    await _push_recall(self)


session.EnclaveSession._push_recall = _push_recall_credited
"""

#: The recall campaign: one borrower's two enclaves share a small supply, both hammered
#: (the busier one runs out first and asks for the other's units), with faults that keep
#: the custodian's view of the donor stale (its usage reports held back or late) while
#: its consumers go on being served. A donor left idle would give back exactly what a
#: credit made early counted, hiding it: the early credit shows only when the donor
#: serves between the ``recall``'s send and its answer.
RECALL_SEED: Final = 4
RECALL_FAULTS: Final = 16
RECALL_WEIGHTS: Final = {"supply": 4, "partition": 3, "delay": 1, "cut": 1}


def _broken(tmp_path: Path, source: str) -> dict[str, str]:
    patch = tmp_path / "broken"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(source, encoding="utf-8")
    return {"PYTHONPATH": str(patch)}


async def _recall_campaign(tmp_path: Path, env: dict[str, str] | None = None) -> str:
    report = await run_campaign(
        tmp_path / "lab",
        seed=RECALL_SEED,
        # A broken build stops at its first violation; the bound only ends a run that
        # never finds one.
        faults=RECALL_FAULTS if env is None else 3 * RECALL_FAULTS,
        topology=Topology(borrowers=1, enclaves=2),
        env=env,
        stop_on_violation=env is not None,
        weights=RECALL_WEIGHTS,
        supply=8,
        workers=[2, 1],
    )
    assert report.recalls > 0, "no recall was sent: the campaign did not test one"
    if env is None:
        assert report.violations == [], report.text()
        assert report.counted >= RECALL_FAULTS
    else:
        assert report.violations, report.text()
    return " ".join(report.violations)


async def test_a_short_campaign_finds_no_violation(tmp_path: Path) -> None:
    """I1, I2, I5, I20, I21, I22, I23: a short seeded campaign of real faults against two
    borrowers' enclaves; every check after every step holds."""
    report = await run_campaign(tmp_path / "lab", seed=SEED, faults=SHORT, topology=SHORT_TOPOLOGY)
    assert report.violations == [], report.text()
    assert report.counted >= SHORT
    assert report.steps_checked > SHORT // 2
    assert len(report.faults) >= 4, report.text()  # several kinds, not one repeated
    assert set(report.answers_by_borrower) == {"customer1", "customer2"}
    assert all(report.answers_by_borrower.values()), "a borrower was never served"


async def test_the_checker_catches_an_enclave_that_serves_beyond_its_grant(
    tmp_path: Path,
) -> None:
    """The short campaign against an enclave patched to serve one more unit per grant:
    the checker reports the answers the ledger does not cover."""
    report = await run_campaign(
        tmp_path / "lab",
        seed=SEED,
        faults=SHORT,
        topology=SHORT_TOPOLOGY,
        env=_broken(tmp_path, SERVE_ONE_MORE),
        stop_on_violation=True,
    )
    assert report.violations, report.text()
    caught = " ".join(report.violations)
    assert "beyond the grant" in caught or "the ledger covers" in caught, report.text()


async def test_recalls_under_faults_find_no_violation(tmp_path: Path) -> None:
    """I20, I23: the recall campaign against the real custodian: recalls are sent, and
    every check holds (the control for the broken custodian below)."""
    await _recall_campaign(tmp_path)


async def test_the_checker_catches_a_custodian_that_credits_a_recall_before_it_is_confirmed(
    tmp_path: Path,
) -> None:
    """The same recall campaign against a custodian that credits a recall as it sends it:
    units the donor serves before the ``recall`` reaches it are then counted twice, and
    the checker reports the borrower served beyond what it holds (and the donor's
    served plus returned beyond its grant)."""
    caught = await _recall_campaign(tmp_path, _broken(tmp_path, CREDIT_ON_RECALL))
    assert "exceed granted" in caught or "<= held" in caught, caught


def test_a_topology_the_campaign_cannot_run_is_refused(tmp_path: Path) -> None:
    Topology(2, 3).check_supported()
    Topology(1, MAX_ENCLAVES).check_supported()
    for shape in (Topology(0, 1), Topology(1, 0)):
        with pytest.raises(ValueError, match="at least one borrower and one enclave"):
            shape.check_supported()
    with pytest.raises(ValueError, match=f"at most {MAX_ENCLAVES} enclave processes"):
        Campaign(tmp_path, seed=1, faults=1, topology=Topology(2, MAX_ENCLAVES // 2 + 1))
    with pytest.raises(ValueError, match="one count per slot"):
        Campaign(tmp_path, seed=1, faults=1, topology=Topology(1, 2), workers=[1])
    with pytest.raises(ValueError, match="weights name fault kinds"):
        Campaign(tmp_path, seed=1, faults=1, weights={"meteor": 1})
    assert not any(tmp_path.iterdir()), "a refused campaign started something"
