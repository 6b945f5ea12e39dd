"""``python -m drm_consumer query`` on a folder, and ``--preprocess auto``, against real
daemons.

A folder of good and bad inputs is served over one connection (the enclave logs one
``consumer_connected``): each bad input is reported with its reason and the rest are
served; the exit status is the first failure's. ``auto`` spends no inference on an
image for a model it does not recognise (an image classifier head ``[?, 3, ?, ?]``, the
shape the old ``auto`` took for ImageNet's): it exits 2 asking for ``--preprocess``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from PIL import Image

from drm_consumer.cli import EXIT_NO_INFERENCES, EXIT_OK, EXIT_USAGE
from drm_lab.deployment import Enclave, Lab
from drm_lab.models import exporter_dims_model, tiny_model
from drm_lab.processes import LOOPBACK, python_command

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: One command against real processes on loopback: generous, only bounds a hang.
COMMAND_TIMEOUT: Final = 60.0
#: What the custodian supplies: one inference for the image, two for the folder.
SUPPLY: Final = 3


def consumer(lab: Lab, enclave: Enclave, *args: str | Path) -> tuple[int, str, str]:
    argv = python_command(
        "drm_consumer", *args, "--address", LOOPBACK, "--port", str(enclave.consumer_port),
        "--policy", lab.policy_path,
    )  # fmt: skip
    done = subprocess.run(
        argv, cwd=lab.workdir, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        check=False,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def inferences_left(lab: Lab, enclave: Enclave) -> int:
    status, out, err = consumer(lab, enclave, "info", "--json")
    assert status == EXIT_OK, err
    return int(json.loads(out)["inferences_left"])


def test_auto_refuses_to_guess_and_a_folder_is_served_over_one_connection(lab: Lab) -> None:
    models = [
        lab.write_model("tiny", tiny_model()),
        lab.write_model("image", exporter_dims_model()),
    ]
    lab.start_custodian(models, initial=SUPPLY)
    enclave = lab.start_enclave()
    photo = lab.workdir / "photo.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(photo)

    # --preprocess auto: no guess for a [?, 3, ?, ?] input; nothing is spent.
    status, out, err = consumer(lab, enclave, "query", "--model", "image", "--input", photo)
    assert status == EXIT_USAGE, err
    assert "--preprocess auto does not know" in err
    assert "give --preprocess covidnet or imagenet" in err
    assert out == ""
    assert inferences_left(lab, enclave) == SUPPLY
    # Named, it is served; a two-class output is not called COVID, every output shown.
    status, out, err = consumer(
        lab, enclave, "query", "--model", "image", "--input", photo, "--preprocess", "imagenet"
    )
    assert status == EXIT_OK, err
    assert out.splitlines()[0] == "Top 3 classes (output y):"
    assert "COVID" not in out
    assert "Inferences left: 2" in out.splitlines()

    folder = lab.workdir / "inputs"
    folder.mkdir()
    np.save(folder / "a_good.npy", np.full((1, 4), 0.5, dtype=np.float32))
    (folder / "b_garbage.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    np.save(folder / "c_float64.npy", np.full((1, 4), 0.5, dtype=np.float64))
    np.save(folder / "d_good.npy", np.full((1, 4), 0.25, dtype=np.float32))
    Image.new("RGB", (8, 8)).save(folder / "e_photo.png")
    np.save(folder / "f_too_big.npy", np.zeros((65, 4), dtype=np.float32))  # terms: <= 64
    np.save(folder / "g_good.npy", np.full((1, 4), 0.75, dtype=np.float32))  # none left
    connected = len(enclave.daemon.find_all("consumer_connected"))
    status, out, err = consumer(
        lab, enclave, "query", "--model", "tiny", "--input", folder, "--preprocess", "none",
        "--no-wait", "--json",
    )  # fmt: skip
    assert status == EXIT_USAGE, err  # the first failure's: b_garbage
    documents = [json.loads(line) for line in out.splitlines()]
    results = {Path(d["input"]).name: d for d in documents[:-1]}
    assert list(results) == sorted(p.name for p in folder.iterdir())
    served = {name for name, d in results.items() if "error" not in d}
    assert served == {"a_good.npy", "d_good.npy"}
    assert [results[n]["inferences_left"] for n in ("a_good.npy", "d_good.npy")] == [1, 0]
    errors = {name: d["error"] for name, d in results.items() if "error" in d}
    assert {name: e["exit_code"] for name, e in errors.items()} == {
        "b_garbage.npy": EXIT_USAGE,
        "c_float64.npy": EXIT_USAGE,
        "e_photo.png": EXIT_USAGE,
        "f_too_big.npy": EXIT_USAGE,
        "g_good.npy": EXIT_NO_INFERENCES,
    }
    assert "dtype differs" in errors["c_float64.npy"]["message"]
    assert "needs a .npy or .npz tensor" in errors["e_photo.png"]["message"]
    assert errors["f_too_big.npy"]["kind"] == "BadRequest"
    summary = documents[-1]["summary"]
    assert (summary["inputs"], summary["served"], summary["failed"]) == (7, 2, 5)
    assert (summary["waited"], summary["not_attempted"], summary["inferences_left"]) == (0, 0, 0)
    assert documents[-1]["attestation"]["simulated"] is True
    # One connection for the whole folder.
    assert len(enclave.daemon.find_all("consumer_connected")) == connected + 1

    # Text mode: each input headed by its file, each failure said, then the summary.
    status, out, err = consumer(
        lab, enclave, "query", "--model", "tiny", "--input", folder / "g_good.npy",
        folder / "b_garbage.npy", "--no-wait",
    )  # fmt: skip
    assert status == EXIT_NO_INFERENCES, err  # the first failure's: g_good
    lines = out.splitlines()
    assert lines[0] == f"== {folder / 'g_good.npy'} =="
    assert lines[1].startswith("Failed: no_inferences: ")
    assert lines[2] == f"== {folder / 'b_garbage.npy'} =="
    assert lines[3].startswith("Failed: ")
    assert lines[4] == (
        "Summary: 2 inputs: 0 served (0 after waiting for inferences), 2 failed; inferences left: 0"
    )
    assert lines[5].startswith("Attested: MRENCLAVE ")
    assert "\r" not in err  # not a terminal: no progress bar
