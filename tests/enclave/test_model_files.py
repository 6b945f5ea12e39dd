"""Nothing of the model reaches the disk (I7, M05, M06): receive, load, run, fail to load.

Two levels of evidence: directory listings of the working and temporary directories
before and after (in-process), and every file-creating or file-writing ``open`` the whole
process makes, recorded by ``strace`` in a subprocess (skipped where strace cannot run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from drm_enclave.model_host import ModelError, load_model  # first: telemetry off

# isort: split
import numpy as np
import pytest

from drm_enclave.model_receiver import ModelReceiver
from drm_lab import models
from drm_wire.messages import ModelEnd
from drm_wire.model.scan import PLACEHOLDER_LOCATION
from drm_wire.tensors import Tensor
from tests.enclave.test_model_receiver import begin, chunks

ROOT = Path(__file__).resolve().parents[2]


def listing(*roots: Path) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")}


def scenario() -> None:
    """Receive a model, load it, run it; load the canary model and the hostile ones."""
    receiver = ModelReceiver(begin())
    for part in chunks():
        receiver.add(part)
    load_model("big", receiver.finish(ModelEnd(name="big")))
    for data in (models.canary_model(), models.covidnet_like_model()):
        hosted = load_model("m", data)
        spec = hosted.description.inputs[0]
        shape = tuple(1 if d is None else d for d in spec.shape)
        hosted.run((Tensor.from_numpy(spec.name, np.ones(shape, np.float32)),))
    for bad in (models.external_data_model(), models.unknown_op_model(), models.zip_bytes()):
        with pytest.raises(ModelError):
            load_model("bad", bad)


def test_no_new_files_in_cwd_or_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert tempfile.gettempdir() == str(tmp)
    before = listing(work, tmp)
    scenario()
    assert listing(work, tmp) == before == set()
    out, err = capfd.readouterr()
    assert models.CANARY.hex() not in out + err


_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import drm_enclave.model_host  # first: it must switch onnxruntime's telemetry off
from tests.enclave.test_model_files import scenario
scenario()
print("scenario done")
"""

#: ``openat(..., flags)`` lines whose flags create or write a file.
_WRITE_OPEN = re.compile(
    r'open(?:at)?\((?:[^,]*, )?"([^"]*)", ([A-Z_|]*(?:O_WRONLY|O_RDWR|O_CREAT)[A-Z_|]*)'
)
_OTHER_WRITES = re.compile(r"\b(creat|rename|renameat2?|link|linkat|symlink|mknod|truncate)\(")


@pytest.mark.slow
def test_strace_sees_no_file_written(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    trace = tmp_path / "trace.txt"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(tmp_path)}
    command = [strace, "-f", "-qq", "-o", str(trace), "-e", "trace=%file",
               sys.executable, "-c", _SCRIPT, str(ROOT)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    if result.returncode != 0 and "ptrace" in result.stderr.lower():
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scenario done" in result.stdout
    lines = trace.read_text().splitlines()
    assert any("openat" in line for line in lines)  # the trace did record the process
    written = [
        line
        for line in lines
        if (m := _WRITE_OPEN.search(line)) and not m.group(1).startswith(("/dev/", "/proc/"))
    ]
    others = [line for line in lines if _OTHER_WRITES.search(line) and "ENOENT" not in line]
    assert written == []
    assert others == []
    assert {p.name for p in tmp_path.iterdir()} == {"trace.txt"}
    assert models.CANARY not in trace.read_bytes()
    assert "DeveloperTools" not in trace.read_text()  # onnxruntime's telemetry queue
    # The big model's weights were split off (placeholders in place): no placeholder's
    # location was ever looked up as a file (read, stat or open).
    assert PLACEHOLDER_LOCATION not in trace.read_text()


_TELEMETRY_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "host-first":
    import drm_enclave.model_host
import onnxruntime
from drm_enclave.model_host import ModelError, load_model
from drm_lab import models
load_model("tiny", models.tiny_model())
try:
    load_model("unknown", models.unknown_op_model())
except ModelError:
    pass
"""


@pytest.mark.parametrize("order", ["host-first", "onnxruntime-first"])
def test_onnxruntime_telemetry_writes_nothing(tmp_path: Path, order: str) -> None:
    # onnxruntime 1.32 queues telemetry (error messages naming nodes included) in
    # ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ unless ORT_DISABLE_TELEMETRY is set
    # before its import, which importing the host does.
    # onnxruntime also stays quiet when CI is set, which would make the control pass
    # vacuously on a CI machine: the child runs as on an operator's machine.
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    env.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / ".cache"))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    command = [sys.executable, "-c", _TELEMETRY_SCRIPT, str(ROOT), order]
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    written = listing(tmp_path)
    if order == "host-first":
        assert written == set()
    else:  # the control: the check does see what onnxruntime writes on its own
        assert any("DeveloperTools" in path for path in written)
