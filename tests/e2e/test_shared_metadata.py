"""Shared model metadata and the owner's named preprocessing, against real daemons.

The owner lends an image model whose ONNX ``metadata_props`` hold a label list and a note
it keeps to itself; its terms file shares ``labels`` and names the ``imagenet``
preprocessing. The consumer's ``info`` shows the labels (and never the note), ``query``
with ``--preprocess auto`` follows the terms, and ``--labels-from metadata`` names the
classes. Neither daemon's log, nor anything the consumer is told, holds the note.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Final

import pytest
from PIL import Image

from drm_consumer.cli import EXIT_OK, EXIT_USAGE
from drm_lab.deployment import Enclave, Lab
from drm_lab.models import exporter_dims_model, with_metadata
from drm_lab.processes import LOOPBACK, python_command

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COMMAND_TIMEOUT: Final = 60.0
LABELS: Final = "red\ngreen\nblue\n"
NOTE: Final = "owner-only note 9c1f"
TERMS: Final = 'share_metadata = ["labels"]\npreprocess = "imagenet"\n'


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


def test_shared_labels_and_named_preprocessing_reach_the_consumer_and_nothing_else(
    lab: Lab,
) -> None:
    data = with_metadata(exporter_dims_model(), {"labels": LABELS, "owner_notes": NOTE})
    model = lab.write_model("image", data)
    (lab.workdir / "image.terms.toml").write_text(TERMS, encoding="utf-8")
    lab.start_custodian([model], initial=5)
    enclave = lab.start_enclave()
    seen: list[str] = []

    status, out, err = consumer(lab, enclave, "info", "--json")
    assert status == EXIT_OK, err
    seen += [out, err]
    (described,) = json.loads(out)["models"]
    assert described["metadata"] == {"labels": LABELS}
    assert described["terms"]["share_metadata"] == ["labels"]
    assert described["terms"]["preprocess"] == "imagenet"
    status, out, err = consumer(lab, enclave, "info")
    assert status == EXIT_OK, err
    seen += [out, err]
    assert "  metadata labels: 3 lines, 15 bytes: red | green | blue" in out.splitlines()
    assert "preprocessing imagenet" in out

    photo = lab.workdir / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo)
    status, out, err = consumer(lab, enclave, "query", "--input", photo,
                                "--labels-from", "metadata")  # fmt: skip
    assert status == EXIT_OK, err
    seen += [out, err]
    assert "auto picked imagenet: the terms of model 'image' name it" in err
    assert out.splitlines()[0] == "Top 3 classes (output y):"
    assert out.splitlines()[1].startswith("  1. red (class 0): ")
    assert out.splitlines()[2].startswith("  2. blue (class 2): ")

    status, out, err = consumer(lab, enclave, "query", "--input", photo,
                                "--labels-from", "metadata:owner_notes")  # fmt: skip
    assert status == EXIT_USAGE, err
    seen += [out, err]
    assert "shares no metadata 'owner_notes' (it shares: labels)" in err

    assert lab.custodian is not None
    for text in [*seen, enclave.daemon.log_text(tail=10_000), lab.custodian.log_text(tail=10_000)]:
        assert NOTE not in text
        assert "owner_notes" not in text or "shares no metadata" in text
