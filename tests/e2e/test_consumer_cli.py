"""``python -m drm_consumer`` against the real daemons: every exit status a user can meet.

``tests/consumer/test_cli.py`` covers the command line in depth against a scripted enclave
(each preprocessing preset, the status line, every error code); the demo
(``tests/e2e/test_demo.py``) shows an image query, a wait that ends in success and the
kill switch. Here the same commands run, as a user's script runs them, against a real
custodian and a real simulated enclave: success with ``--json``, ``info``, no inferences
left with ``--no-wait`` and after ``--wait``, a refused attestation, a blocked borrower,
an input that does not fit, and nothing listening.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import subprocess
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from PIL import Image

from drm_consumer.cli import (
    EXIT_ATTESTATION,
    EXIT_CONNECTION,
    EXIT_CUSTODIAN,
    EXIT_NO_INFERENCES,
    EXIT_OK,
    EXIT_USAGE,
)
from drm_lab.processes import python_command
from drm_wire.attestation.policy import Policy
from tests.e2e.conftest import INITIAL_INFERENCES, Deployment

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: One command against real processes on loopback: generous, only bounds a hang.
COMMAND_TIMEOUT: Final = 60.0


def consumer(
    deployment: Deployment, *args: str | Path, port: int | None = None
) -> tuple[int, str, str]:
    """Run ``python -m drm_consumer ARGS --address ... --port ...``; status, stdout, stderr."""
    argv = python_command(
        "drm_consumer", *args,
        "--address", deployment.consumer_host,
        "--port", str(deployment.consumer_port if port is None else port),
    )  # fmt: skip
    done = subprocess.run(
        argv, cwd=deployment.workdir, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        check=False,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def inputs(deployment: Deployment) -> dict[str, Path]:
    """A tensor that fits the tiny model ([N, 4] float32) and an image that cannot."""
    tensor = deployment.workdir / "x.npy"
    np.save(tensor, np.full((1, 4), 0.5, dtype=np.float32))
    image = deployment.workdir / "photo.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(image)
    return {"tensor": tensor, "image": image}


def test_query_info_and_running_out(deployment: Deployment, inputs: dict[str, Path]) -> None:
    policy = str(deployment.policy_path)
    status, out, err = consumer(deployment, "info", "--policy", policy, "--json")
    assert status == EXIT_OK, err
    info = json.loads(out)
    assert [m["name"] for m in info["models"]] == ["tiny"]
    assert info["inferences_left"] == INITIAL_INFERENCES
    assert info["attestation"]["simulated"] is True

    for left in range(INITIAL_INFERENCES - 1, -1, -1):
        status, out, err = consumer(
            deployment, "query", "--input", inputs["tensor"], "--policy", policy, "--json"
        )
        assert status == EXIT_OK, err
        result = json.loads(out)
        assert result["inferences_left"] == left
        (y,) = result["outputs"].values()
        assert (y["dtype"], y["shape"]) == ("float32", [1, 3])
        assert np.isclose(np.sum(y["values"]), 1.0, rtol=1e-5)

    query = ("query", "--input", inputs["tensor"], "--policy", policy)
    status, _, err = consumer(deployment, *query, "--no-wait")
    assert status == EXIT_NO_INFERENCES, err
    status, _, err = consumer(deployment, *query, "--wait", "0.5")
    assert status == EXIT_NO_INFERENCES, err
    assert deployment.admin.usage()["served"] == INITIAL_INFERENCES  # nothing charged


def test_a_batch_shows_its_price_and_waits_for_all_of_it(
    deployment: Deployment, inputs: dict[str, Path]
) -> None:
    """I14: ``info`` shows the terms; a batch of k rows costs k, shown as such; with
    fewer than k left, ``--no-wait`` and ``--wait`` fail and charge nothing."""
    policy = str(deployment.policy_path)
    status, out, err = consumer(deployment, "info", "--policy", policy)
    assert status == EXIT_OK, err
    assert (
        "  terms: 1 inference per item along the batch axis, batch at most 64; "
        "x 1..64 x 4 (batch axis 0)" in out.splitlines()
    )
    batch = deployment.workdir / "batch.npy"
    np.save(batch, np.full((INITIAL_INFERENCES + 1, 4), 0.5, dtype=np.float32))  # one too many
    query = ("query", "--input", batch, "--policy", policy)
    status, _, err = consumer(deployment, *query, "--no-wait")
    assert status == EXIT_NO_INFERENCES, err
    status, _, err = consumer(deployment, *query, "--wait", "0.5")
    assert status == EXIT_NO_INFERENCES, err
    np.save(batch, np.full((INITIAL_INFERENCES, 4), 0.5, dtype=np.float32))  # exactly enough
    status, out, err = consumer(deployment, *query, "--no-wait")
    assert status == EXIT_OK, err
    assert f"Cost: {INITIAL_INFERENCES} inferences" in out.splitlines()
    assert "Inferences left: 0" in out.splitlines()
    usage = deployment.admin.usage()
    assert (usage["served"], usage["requests"]) == (INITIAL_INFERENCES, 1)


def test_refusals_each_have_their_status(
    deployment: Deployment, inputs: dict[str, Path], tmp_path: Path
) -> None:
    policy = Policy.load(deployment.policy_path)
    other = tmp_path / "another-build.toml"
    dataclasses.replace(policy, mr_enclave=(hashlib.sha256(b"another build").digest(),)).write(
        other
    )
    status, _, err = consumer(deployment, "query", "--input", inputs["tensor"], "--policy", other)
    assert status == EXIT_ATTESTATION, err

    status, _, err = consumer(
        deployment, "query", "--input", inputs["image"], "--policy", str(deployment.policy_path)
    )
    assert status == EXIT_USAGE, err  # no preset makes a picture into the tiny model's [N, 4]

    deployment.admin.block("audit")
    status, _, err = consumer(
        deployment, "query", "--input", inputs["tensor"], "--policy", str(deployment.policy_path)
    )
    assert status == EXIT_CUSTODIAN, err
    assert "blocked" in err
    assert deployment.admin.usage()["served"] == 0

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    status, _, err = consumer(
        deployment, "info", "--policy", str(deployment.policy_path), port=closed_port
    )
    assert status == EXIT_CONNECTION, err
