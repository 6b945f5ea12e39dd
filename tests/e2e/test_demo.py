"""``nox -s demo`` as a user runs it: ``demo/run.py`` under this interpreter, as a subprocess.

* The whole story succeeds (exit 0) and its transcript says what the issue asks for: the
  queries' remaining counts, the wait, the curl supply, 4 served, the unreachable refusal;
  the temporary directory is gone afterwards.
* A deviation fails it: with the admin port already taken the custodian cannot start,
  and the demo says what it expected and what happened, and exits 1.
* Ctrl-C (SIGINT to the demo alone) while a query waits stops every program the demo
  started: none of their process ids is alive afterwards.
* ``demo/covidnet.py`` writes the same model and image every time, with COVID-Net CXR-2's
  input and output.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import onnx
import onnx.numpy_helper
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT: Final = Path(__file__).resolve().parents[2]
DEMO: Final = ROOT / "demo" / "run.py"
#: The whole demo takes about 10 s on two cores; this only bounds a hang.
DEMO_TIMEOUT: Final = 180.0
#: What the demo may take to react to SIGINT: stopping two daemons, each bounded.
INTERRUPT_TIMEOUT: Final = 60.0

_WORKDIR: Final = re.compile(r"^Work directory \(every command runs there\): (.+)$", re.M)
_PID: Final = re.compile(r"^ +\[[a-z ]+: pid (\d+)\]$", re.M)


def _demo(*args: str, timeout: float = DEMO_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _workdir(transcript: str) -> Path:
    found = _WORKDIR.search(transcript)
    assert found is not None, transcript
    return Path(found.group(1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _in_order(transcript: str, needles: Sequence[str]) -> None:
    """Each needle occurs in the transcript, after the previous one."""
    position = 0
    for needle in needles:
        found = transcript.find(needle, position)
        assert found >= 0, f"{needle!r} missing (after offset {position}):\n{transcript}"
        position = found + len(needle)


def test_the_demo_tells_the_whole_story() -> None:
    done = _demo()
    transcript = done.stdout
    assert done.returncode == 0, f"{transcript}\n{done.stderr}"
    _in_order(
        transcript,
        [
            "SIMULATION MODE",
            "[1/6]",
            "$ python -m drm_custodian init --state-dir custodian-state",
            "policy written to policy.toml",
            "[2/6]",
            "UNTRAINED",
            "[3/6]",
            "$ python -m drm_custodian serve",
            "--initial-inferences 3",
            "$ python -m drm_enclave serve",
            "--attestation simulated",
            "custodian: enclave attested",
            "ok: the enclave serves covidnet with 3 inferences left",
            "[4/6]",
            "$ python -m drm_consumer query",
            "Probability of COVID positivity:",
            "Inferences left: 2",
            "ok: answered; 2 inferences left",
            "Inferences left: 1",
            "ok: answered; 1 inference left",
            "Inferences left: 0",
            "ok: answered; 0 inferences left",
            "No inferences left: waiting for the custodian to supply more (queue position 1)",
            "ok: no inferences left: the fourth query waits for the custodian",
            "[5/6]",
            '$ curl --cacert custodian-state/ca.pem \\\n        -H "Authorization: Bearer '
            '$(cat custodian-state/admin.token)" \\\n        -d number_inferences=5 https://',
            '"added": 5',
            "Inferences supplied after",
            "Inferences left: 4",
            "ok: the waiting query completed; 4 inferences left",
            "[6/6]",
            "$ python -m drm_custodian usage --state-dir custodian-state",
            "served     4",
            "ok: 4 served",
            "$ kill -TERM",
            "ok: the custodian stopped; the enclave lost its link",
            "error: custodian_unreachable",
            "ok: refused: custodian unreachable (exit status 5)",
            "Demo complete: every step behaved as described.",
        ],
    )
    assert "DEMO FAILED" not in transcript
    assert not _workdir(transcript).exists()
    for pid in map(int, _PID.findall(transcript)):
        assert not _alive(pid), f"process {pid} outlived the demo"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_busy_admin_port_fails_the_demo_with_what_was_expected(busy_port: int) -> None:
    done = _demo("--admin-port", str(busy_port))
    transcript = done.stdout
    assert done.returncode == 1, f"{transcript}\n{done.stderr}"
    _in_order(
        transcript,
        [
            f"--admin-port {busy_port} &",
            "DEMO FAILED in step 3/6: The custodian starts with 3 inferences",
            "expected: the custodian to start listening",
            "happened: the custodian exited with status 1",
            "its last lines:",
            "custodian_failed",
            "(run with --keep to keep the work directory for a closer look)",
        ],
    )
    assert "[4/6]" not in transcript
    assert not _workdir(transcript).exists()


def _read_lines(stream: Iterator[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_ctrl_c_stops_every_program_the_demo_started() -> None:
    # A shell that runs the suite as a background job starts it with SIGINT ignored, and
    # an ignored signal stays ignored across exec: the demo would never see the Ctrl-C.
    # A handler (not an "ignore") in place for the fork gives the demo the default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [sys.executable, str(DEMO)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while True:  # bounded: each get() waits at most DEMO_TIMEOUT
            line = lines.get(timeout=DEMO_TIMEOUT)
            assert line is not None, "".join(seen)
            seen.append(line)
            if line.startswith("  ok: no inferences left: the fourth query waits"):
                break
        process.send_signal(signal.SIGINT)
        status = process.wait(INTERRUPT_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(INTERRUPT_TIMEOUT)
    process.stdout.close()
    while (line := lines.get_nowait()) is not None:
        seen.append(line)
    transcript = "".join(seen)
    assert status == 130, transcript
    assert "Interrupted: stopping every program the demo started." in transcript
    pids = [int(p) for p in _PID.findall(transcript)]
    assert len(pids) == 3, transcript  # the custodian, the enclave, the waiting query
    for pid in pids:
        assert not _alive(pid), f"process {pid} outlived the interrupted demo"
    assert not _workdir(transcript).exists()


def test_the_model_is_covidnet_shaped_and_the_same_every_time(tmp_path: Path) -> None:
    script = ROOT / "demo" / "covidnet.py"
    for name in ("first", "second"):
        done = subprocess.run(
            [sys.executable, str(script), "--out-dir", str(tmp_path / name), "--weights-mb", "2"],
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "UNTRAINED" in done.stdout
    for file in ("covidnet.onnx", "chest-xray.png"):
        assert (tmp_path / "first" / file).read_bytes() == (tmp_path / "second" / file).read_bytes()
    model = onnx.load(tmp_path / "first" / "covidnet.onnx")
    (image,), (probs,) = model.graph.input, model.graph.output
    dims = [d.dim_value for d in image.type.tensor_type.shape.dim]
    assert (image.type.tensor_type.elem_type, dims) == (onnx.TensorProto.FLOAT, [1, 480, 480, 3])
    assert [d.dim_value for d in probs.type.tensor_type.shape.dim] == [1, 2]
    assert model.graph.node[-1].op_type == "Softmax"
    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert 1.5e6 < weights < 2.5e6
