"""The enclave staples its platform's collateral, fetched from the borrower's PCCS, and a
consumer with no PCCS of its own gets a full verdict from it; between real processes.

``drm_enclave serve --pccs-url`` points at the test PCCS of ``drm_lab.pccs`` (HTTPS on
loopback, Intel's API), which serves the simulated platform's collateral. The simulated
enclave then staples nothing of its own making: what it staples came from the PCCS. The
custodian (a production policy: TCB status UpToDate only, no PCCS of its own) and the
consumer (``--policy`` only) judge the enclave from the staple alone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from drm_lab.deployment import Lab
from drm_lab.models import tiny_model
from drm_lab.pccs import PccsBehaviour, pccs_in_background
from drm_lab.processes import LOOPBACK, python_command
from drm_wire.attestation._sim_collateral import SIMULATED_FMSPC
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import Policy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_consumer_without_pccs_gets_a_full_verdict_from_the_staple(
    lab: Lab, tmp_path: Path
) -> None:
    policy = Policy.load(lab.policy_path)
    assert not policy.accept_unknown_tcb_status  # what measure writes: a verdict is needed
    platform = SimulatedPlatform.load(lab.simulation_dir)
    behaviour = PccsBehaviour(bundle=json.loads(platform.collateral()))
    pccs_dir = tmp_path / "pccs"
    pccs_dir.mkdir()
    with pccs_in_background(pccs_dir, behaviour) as pccs:
        lab.start_custodian([lab.write_model("tiny", tiny_model())], initial=2)
        enclave = lab.start_enclave(
            options=["--pccs-url", pccs.url, "--pccs-ca", str(pccs.ca_path)]
        )
        stapled = enclave.daemon.wait_for("collateral_stapled")
        assert stapled["fmspc"] == SIMULATED_FMSPC.hex().upper()
        assert stapled["ca"] == "platform"
        asked = [(path, query) for path, query in behaviour.requests if "pckcrl" in path]
        assert asked
        assert {query["ca"][0] for _, query in asked} == {"platform"}  # only ours
        done = subprocess.run(
            python_command(
                "drm_consumer", "info", "--policy", lab.policy_path, "--json",
                "--address", LOOPBACK, "--port", str(enclave.consumer_port),
            ),
            cwd=lab.workdir, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["attestation"]["tcb_status"] == "UpToDate", info
    # The custodian judged the enclave from the staple too (it has no collateral).
    attested = lab.custodian.find("enclave_attested") if lab.custodian else None
    assert attested is not None
    assert attested.get("tcb_status") == "UpToDate", attested
