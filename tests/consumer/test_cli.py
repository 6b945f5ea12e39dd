"""``python -m drm_consumer`` as a real subprocess against the in-process fake enclave.

The fake (tests.consumer.fake_enclave) serves the real RA-TLS consumer link on 127.0.0.1
port 0 in the test's nursery; the command runs with ``trio.run_process`` and a policy file
written for the fake's simulated identity.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from PIL import Image

from drm_consumer.cli import (
    EXIT_ATTESTATION,
    EXIT_CONNECTION,
    EXIT_CUSTODIAN,
    EXIT_NO_INFERENCES,
    EXIT_OK,
    EXIT_USAGE,
    main,
)
from drm_daemon.command import EXIT_BROKEN_PIPE
from drm_lab.pccs import PccsBehaviour, RunningPccs, running_pccs
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.ratls_cert import RatlsCredentials, build_ratls_certificate
from drm_wire.errors import ErrorCode
from drm_wire.messages import (
    Error,
    InferenceRequest,
    InferenceResult,
    Message,
    ModelDescription,
    ModelInfo,
    ModelInfoRequest,
    TensorSpec,
    Waiting,
)
from drm_wire.model.terms import Terms
from drm_wire.net.channel import ChannelError, MessageChannel
from drm_wire.net.tls import TLSStream
from drm_wire.tensors import Tensor
from tests.attestation.dcap_helpers import real_collateral_text
from tests.consumer.conftest import MR_ENCLAVE, MR_SIGNER, make_policy
from tests.consumer.fake_enclave import (
    HOST,
    MODEL_DESCRIPTION,
    FakeEnclave,
    fail_with,
    park_then_answer,
    sample_input,
)

#: One subprocess run; far above what it takes (about half a second).
RUN_TIMEOUT = 20.0
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _spec(name: str, shape: tuple[int | None, ...]) -> TensorSpec:
    return TensorSpec(name=name, dtype="float32", shape=shape)


COVIDNET = ModelDescription(
    name="covidnet",
    sha256=hashlib.sha256(b"covidnet").digest(),
    inputs=(_spec("input_1", (None, 480, 480, 3)),),
    outputs=(_spec("softmax", (None, 2)),),
)
CLASSIFIER = ModelDescription(
    name="classifier",
    sha256=hashlib.sha256(b"classifier").digest(),
    inputs=(_spec("pixels", (None, 3, 224, 224)),),
    outputs=(_spec("scores", (None, 10)),),
)
SCORES = np.array([[0.01, 0.3, 0.05, 0.02, 0.4, 0.03, 0.1, 0.04, 0.02, 0.03]], dtype=np.float32)


class ScriptedEnclave(FakeEnclave):
    """The fake enclave, serving :attr:`models` (the fake's tiny model by default)."""

    def __init__(self, credentials: RatlsCredentials) -> None:
        super().__init__(credentials)
        self.models: tuple[ModelDescription, ...] = (MODEL_DESCRIPTION,)

    async def _answer(self, channel: MessageChannel, message: Message) -> None:
        if not isinstance(message, ModelInfoRequest):
            await super()._answer(channel, message)
            return
        with contextlib.suppress(ChannelError):  # the client went away
            await channel.send(
                ModelInfo(
                    request_id=message.request_id,
                    models=self.models,
                    inferences_left=self.inferences_left,
                    state=self.state,
                )
            )

    async def _handle(self, tcp: trio.SocketStream) -> None:
        # A client that exits on an error closes its connection forcefully; the real
        # enclave shrugs that off, and so must the fake.
        try:
            await super()._handle(tcp)
        except* ChannelError:
            pass

    def inference_requests(self) -> list[InferenceRequest]:
        return [m for m in self.requests if isinstance(m, InferenceRequest)]


def reply_with(name: str, array: np.ndarray[Any, Any]) -> Any:
    """A behaviour answering every inference with ``array`` as output ``name``."""

    async def behaviour(
        fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest
    ) -> None:
        fake.inferences_left -= 1
        await channel.send(
            InferenceResult(
                request_id=request.request_id,
                outputs=(Tensor.from_numpy(name, array),),
                inferences_left=fake.inferences_left,
            )
        )

    return behaviour


async def park_until_the_deadline(
    fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest
) -> None:
    """What the enclave does with no inferences left: wait at most ``request.wait``."""
    if request.wait == 0:
        await channel.send(
            Error(code=ErrorCode.NO_INFERENCES, message="none left", request_id=request.request_id)
        )
        return
    await channel.send(Waiting(request_id=request.request_id, position=1))
    await trio.sleep(request.wait if request.wait is not None else 3600)
    await channel.send(
        Error(code=ErrorCode.NO_INFERENCES, message="waited", request_id=request.request_id)
    )


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture
async def fake(nursery: trio.Nursery, credentials: RatlsCredentials) -> ScriptedEnclave:
    enclave = ScriptedEnclave(credentials)
    await nursery.start(enclave.serve)
    return enclave


@pytest.fixture
def workdir(tmp_path: Path, policy: Policy) -> Path:
    """The command's working directory, with the fake's ``policy.toml`` in it."""
    policy.write(tmp_path / "policy.toml")
    return tmp_path


async def in_process_query(fake: FakeEnclave, cwd: Path, *args: str | Path) -> Result:
    return await run_main(cwd, "query", "--address", HOST, "--port", str(fake.port), *args)


async def run_cli(cwd: Path, *args: str | Path) -> Result:
    with trio.fail_after(RUN_TIMEOUT):
        process = await trio.run_process(
            [sys.executable, "-m", "drm_consumer", *map(str, args)],
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return Result(process.returncode, process.stdout.decode(), process.stderr.decode())


async def run_main(cwd: Path, *args: str | Path) -> Result:
    """``main()`` in a worker thread (it calls ``trio.run``): for the cheaper extra cases."""
    out, log = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args] + ["--policy", str(cwd / "policy.toml")]
    with trio.fail_after(RUN_TIMEOUT):
        code = await trio.to_thread.run_sync(partial(main, argv, out=out, log=log))
    return Result(code, out.getvalue(), log.getvalue())


async def query(fake: FakeEnclave, cwd: Path, *args: str | Path) -> Result:
    return await run_cli(cwd, "query", "--address", HOST, "--port", str(fake.port), *args)


def covid_image(path: Path) -> np.ndarray[Any, Any]:
    """A PNG whose COVID-Net preprocessing is an exact crop (see test_preprocess)."""
    pixels = np.random.default_rng(0).integers(0, 256, (521, 600, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return pixels[41:521, 60:540].astype(np.float32)[None] / 255


# --- success ---------------------------------------------------------------------------


async def test_image_with_auto_covidnet_prints_the_covid_probability(
    fake: ScriptedEnclave, workdir: Path
) -> None:
    fake.models = (COVIDNET,)
    fake.behaviour = reply_with("softmax", np.array([[0.27, 0.73]], dtype=np.float32))
    expected = covid_image(workdir / "cxr.png")
    result = await query(fake, workdir, "--input", "cxr.png")
    assert result.returncode == EXIT_OK, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Probability of COVID positivity: 0.73"
    assert lines[1] == "Cost: 1 inference"
    assert lines[2] == "Inferences left: 99"
    assert lines[3].startswith(f"Attested: MRENCLAVE {MR_ENCLAVE.hex()}, SIMULATED")
    # The simulated platform staples its own collateral: the production path judged it.
    assert lines[3].endswith("TCB status UpToDate, advisories none")
    assert "auto picked covidnet" in result.stderr
    [request] = fake.inference_requests()
    assert request.model == "covidnet"
    [tensor] = request.inputs
    assert tensor.name == "input_1"
    assert np.array_equal(tensor.to_numpy(), expected)


async def test_jpeg_with_imagenet_labels_and_json(fake: ScriptedEnclave, workdir: Path) -> None:
    fake.models = (CLASSIFIER,)
    fake.behaviour = reply_with("scores", SCORES)
    Image.new("RGB", (300, 256), (10, 200, 90)).save(workdir / "photo.jpg", format="JPEG")
    labels = [f"label {i}" for i in range(10)]
    (workdir / "labels.txt").write_text("\n".join(labels) + "\n")
    result = await query(
        fake, workdir, "--input", "photo.jpg", "--preprocess", "imagenet",
        "--labels", "labels.txt", "--json",
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    document = result.json()
    assert document["model"] == "classifier"
    assert document["preprocess"] == "imagenet"
    assert document["inferences_left"] == 99
    top = document["prediction"]["rows"][0]
    assert [entry["class"] for entry in top] == [4, 1, 6, 2, 7]
    assert [entry["label"] for entry in top] == [
        "label 4",
        "label 1",
        "label 6",
        "label 2",
        "label 7",
    ]
    assert top[0]["score"] == pytest.approx(0.4)
    assert document["outputs"]["scores"]["shape"] == [1, 10]
    assert document["attestation"]["mr_enclave"] == MR_ENCLAVE.hex()
    assert document["attestation"]["simulated"] is True
    [request] = fake.inference_requests()
    pixels = np.asarray(Image.open(workdir / "photo.jpg").convert("RGB"), dtype=np.float32)
    crop = pixels[16:240, 38:262] / 255
    expected = ((crop - MEAN) / STD).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(request.inputs[0].to_numpy(), expected, atol=1e-5)


async def test_npy_input_prints_the_top_classes(fake: ScriptedEnclave, workdir: Path) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    result = await query(fake, workdir, "--input", "x.npy")
    assert result.returncode == EXIT_OK, result.stderr
    # The fake's model doubles x = [0, 1, 2, 3]: class 3 scores highest.
    assert result.stdout.splitlines()[:5] == [
        "Top 4 classes (output y):",
        "  1. class 3: 6.0000",
        "  2. class 2: 4.0000",
        "  3. class 1: 2.0000",
        "  4. class 0: 0.0000",
    ]
    assert "Inferences left: 99" in result.stdout
    [request] = fake.inference_requests()
    assert np.array_equal(request.inputs[0].to_numpy(), sample_input(rows=1))


async def test_npz_input_with_json(fake: ScriptedEnclave, workdir: Path) -> None:
    np.savez(workdir / "x.npz", x=sample_input(rows=2))
    result = await query(
        fake, workdir, "--input", "x.npz", "--model", "tiny", "--preprocess", "none", "--json"
    )
    assert result.returncode == EXIT_OK, result.stderr
    document = result.json()
    assert document["outputs"]["y"]["values"] == (sample_input(rows=2) * 2).tolist()
    assert len(document["prediction"]["rows"]) == 2


async def test_waits_for_inferences_then_succeeds(fake: ScriptedEnclave, workdir: Path) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    parked = trio.Event()

    async def park(fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest) -> None:
        parked.set()
        await park_then_answer(fake, channel, request)

    fake.behaviour = park
    results: list[Result] = []

    async def run() -> None:
        results.append(await query(fake, workdir, "--input", "x.npy"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.fail_after(RUN_TIMEOUT):
            await parked.wait()
        await trio.sleep(0.3)
        fake.release.set()
    [result] = results
    assert result.returncode == EXIT_OK, result.stderr
    assert "waiting for the custodian to supply more (queue position 1)" in result.stderr
    assert "Inferences supplied after 0:00" in result.stderr
    assert "\r" not in result.stderr  # plain lines on a pipe
    assert fake.inference_requests()[0].wait is None
    assert "Inferences left: 99" in result.stdout


# --- failures --------------------------------------------------------------------------


async def test_no_wait_fails_at_once_with_4(fake: ScriptedEnclave, workdir: Path) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    fake.behaviour = park_until_the_deadline
    result = await query(fake, workdir, "--input", "x.npy", "--no-wait", "--json")
    assert result.returncode == EXIT_NO_INFERENCES
    assert result.json()["error"]["kind"] == "NoInferencesLeft"
    assert fake.inference_requests()[0].wait == 0.0


async def test_wait_timeout_fails_with_4(fake: ScriptedEnclave, workdir: Path) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    fake.behaviour = park_until_the_deadline
    result = await query(fake, workdir, "--input", "x.npy", "--wait", "0.5")
    assert result.returncode == EXIT_NO_INFERENCES
    assert "of at most 0.5 s" in result.stderr
    assert "Gave up waiting for inferences after" in result.stderr
    assert fake.inference_requests()[0].wait == 0.5


async def test_wrong_policy_is_refused_with_3_and_nothing_sent(
    fake: ScriptedEnclave, workdir: Path, platform: SimulatedPlatform
) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    make_policy(platform, mr_enclave=hashlib.sha256(b"another").digest()).write(
        workdir / "other.toml"
    )
    result = await query(fake, workdir, "--input", "x.npy", "--policy", "other.toml")
    assert result.returncode == EXIT_ATTESTATION, result.stderr
    assert "attestation was refused" in result.stderr
    assert fake.requests == []
    assert fake.handshakes_completed == 0


async def test_a_policy_for_another_simulated_platform_says_which_root_to_use(
    fake: ScriptedEnclave, workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    elsewhere = SimulatedPlatform.create(tmp_path_factory.mktemp("other") / "platform")
    make_policy(elsewhere).write(workdir / "other.toml")
    result = await query(fake, workdir, "--input", "x.npy", "--policy", "other.toml")
    assert result.returncode == EXIT_ATTESTATION, result.stderr
    assert result.stderr == (
        f"python -m drm_consumer: error: connecting to {HOST}:{fake.port}: the enclave's "
        "attestation was refused (UntrustedRootError: PCK chain: chain ends at an untrusted "
        "root): its quote does not chain to a root the policy trusts. A real SGX quote "
        "needs Intel's root; a SIMULATED enclave's needs the policy's [simulation] root to "
        "be that enclave's platform: use the policy `drm_enclave measure --simulation-dir "
        "DIR` wrote with the enclave's own DIR\n"
    )
    assert fake.requests == []


async def test_a_reader_that_leaves_ends_the_command_quietly(
    fake: ScriptedEnclave, workdir: Path
) -> None:
    """``query ... | head -1``: the reader is gone before the answer is written."""
    np.save(workdir / "x.npy", sample_input(rows=1))

    def run() -> tuple[int, str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "drm_consumer", "query", "--address", HOST,
             "--port", str(fake.port), "--input", "x.npy"],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()  # as head does once it has its line
        with process:
            stderr = process.stderr.read()
            return process.wait(RUN_TIMEOUT), stderr

    status, stderr = await trio.to_thread.run_sync(run)
    assert status == EXIT_BROKEN_PIPE == 141
    assert stderr == "preprocess: auto: a tensor file is sent as it is\n"  # no traceback
    assert len(fake.requests) == 2  # it ran: model info, then the inference


async def test_closed_port_fails_with_6(workdir: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]
    for listener in listeners:
        await listener.aclose()
    np.save(workdir / "x.npy", sample_input(rows=1))
    result = await run_cli(
        workdir, "query", "--address", HOST, "--port", str(port), "--input", "x.npy"
    )
    assert result.returncode == EXIT_CONNECTION, result.stderr
    # What the OS said and what to check: not trio's "all attempts to connect ... failed
    # (ExceptionGroup ...)".
    assert result.stderr == (
        f"python -m drm_consumer: error: connecting to {HOST}:{port}: cannot connect: "
        "connection refused; is the enclave running (`drm_enclave serve`), and is this the "
        "address and port of its --listen?\n"
    )


async def _vanish(fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest) -> None:
    """The enclave process dies mid-request: TCP goes, with no TLS close_notify."""
    tls = channel.stream
    assert isinstance(tls, TLSStream)
    tcp = tls.transport_stream
    assert isinstance(tcp, trio.SocketStream)
    tcp.socket.close()


async def test_an_enclave_that_dies_mid_request_is_said_so(
    fake: ScriptedEnclave, workdir: Path
) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    fake.behaviour = _vanish
    result = await in_process_query(fake, workdir, "--input", workdir / "x.npy", "--no-wait")
    assert result.returncode == EXIT_CONNECTION, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"python -m drm_consumer: error: inference on {HOST}:{fake.port}: the enclave closed "
        "the connection without a goodbye (it stopped or crashed, or the network cut it); "
        "nothing more came of this request: retry, and if it persists, tell the enclave's "
        "operator"
    )


@pytest.mark.parametrize("code", [ErrorCode.CUSTODIAN_UNREACHABLE, ErrorCode.BLOCKED])
async def test_custodian_unreachable_or_blocked_fails_with_5(
    fake: ScriptedEnclave, workdir: Path, code: ErrorCode
) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    fake.behaviour = fail_with(code)
    run = query if code is ErrorCode.CUSTODIAN_UNREACHABLE else in_process_query
    result = await run(fake, workdir, "--input", workdir / "x.npy")
    assert result.returncode == EXIT_CUSTODIAN, result.stderr
    assert code.value in result.stderr


async def test_busy_fails_with_6(fake: ScriptedEnclave, workdir: Path) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    fake.behaviour = fail_with(ErrorCode.BUSY)
    result = await in_process_query(fake, workdir, "--input", workdir / "x.npy")
    assert result.returncode == EXIT_CONNECTION, result.stderr


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((1, 4), dtype=np.float64), "dtype differs"),
        (np.zeros((1, 5), dtype=np.float32), "shape differs"),
    ],
)
async def test_a_tensor_that_does_not_fit_fails_with_2_before_sending(
    fake: ScriptedEnclave, workdir: Path, array: np.ndarray[Any, Any], problem: str
) -> None:
    np.save(workdir / "x.npy", array)
    run = query if problem == "dtype differs" else in_process_query
    result = await run(fake, workdir, "--input", workdir / "x.npy")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert problem in result.stderr
    assert fake.inference_requests() == []


async def test_an_image_no_preset_fits_fails_with_2(fake: ScriptedEnclave, workdir: Path) -> None:
    covid_image(workdir / "cxr.png")
    result = await in_process_query(fake, workdir, "--input", workdir / "cxr.png")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "--preprocess auto does not know" in result.stderr
    assert fake.inference_requests() == []


async def test_auto_does_not_guess_imagenet_from_a_shape(
    fake: ScriptedEnclave, workdir: Path
) -> None:
    """An ImageNet-like input shape is no reason to spend an inference on ImageNet
    preprocessing: ``auto`` asks for ``--preprocess`` (2), and nothing is sent."""
    fake.models = (CLASSIFIER,)
    fake.behaviour = reply_with("scores", SCORES)
    Image.new("RGB", (300, 256), (10, 200, 90)).save(workdir / "photo.jpg", format="JPEG")
    result = await in_process_query(fake, workdir, "--input", workdir / "photo.jpg", "--json")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "give --preprocess covidnet or imagenet" in result.stderr
    assert result.json()["error"]["kind"] == "input"
    assert fake.inference_requests() == []


def two_outputs(first: np.ndarray[Any, Any], second: np.ndarray[Any, Any]) -> Any:
    """A behaviour answering with outputs ``probs`` and ``boxes``."""

    async def behaviour(
        fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest
    ) -> None:
        fake.inferences_left -= 1
        outputs = (Tensor.from_numpy("probs", first), Tensor.from_numpy("boxes", second))
        await channel.send(
            InferenceResult(
                request_id=request.request_id,
                outputs=outputs,
                inferences_left=fake.inferences_left,
            )
        )

    return behaviour


async def test_covid_wording_only_with_the_covidnet_preset_and_every_output_printed(
    fake: ScriptedEnclave, workdir: Path
) -> None:
    softmax = np.array([[0.27, 0.73]], dtype=np.float32)
    boxes = np.arange(8, dtype=np.int64).reshape(1, 2, 4)
    fake.models = (CLASSIFIER,)
    fake.behaviour = two_outputs(softmax, boxes)
    Image.new("RGB", (300, 256), (10, 200, 90)).save(workdir / "photo.jpg", format="JPEG")
    result = await in_process_query(
        fake, workdir, "--input", workdir / "photo.jpg", "--preprocess", "imagenet"
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert "COVID" not in result.stdout  # a two-class softmax of another model
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "Top 2 classes (output probs):",
        "  1. class 1: 0.7300",
        "  2. class 0: 0.2700",
    ]
    assert "Output boxes: int64 [1, 2, 4] [[[0 1 2 3]" in lines[3]

    covid_image(workdir / "cxr.png")
    fake.models = (COVIDNET,)
    result = await in_process_query(fake, workdir, "--input", workdir / "cxr.png")
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.splitlines()[0] == "Probability of COVID positivity: 0.73"
    assert result.stdout.splitlines()[1].startswith("Output boxes: int64 [1, 2, 4]")
    (workdir / "labels.txt").write_text("negative\npositive\n")
    result = await in_process_query(
        fake, workdir, "--input", workdir / "cxr.png", "--labels", workdir / "labels.txt"
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.splitlines()[1:3] == [
        "  1. positive (class 1): 0.7300",
        "  2. negative (class 0): 0.2700",
    ]


async def test_a_folder_is_served_over_one_connection_with_a_summary(
    fake: ScriptedEnclave, workdir: Path
) -> None:
    folder = workdir / "inputs"
    folder.mkdir()
    np.save(folder / "a.npy", sample_input(rows=1))
    (folder / "b.npy").write_bytes(b"\x93NUMPY not really")
    np.save(folder / "c.npy", sample_input(rows=1).astype(np.float64))  # does not fit
    np.save(folder / "d.npy", sample_input(rows=2))
    (folder / ".hidden.npy").write_bytes(b"skipped")
    (folder / "sub").mkdir()
    result = await in_process_query(fake, workdir, "--input", folder)
    assert result.returncode == EXIT_USAGE, result.stderr  # the first failure's status
    lines = result.stdout.splitlines()
    for name in ("a", "b", "c", "d"):
        assert f"== {folder / name}.npy ==" in lines
    assert lines[lines.index(f"== {folder / 'b'}.npy ==") + 1].startswith("Failed: ")
    assert "dtype differs" in lines[lines.index(f"== {folder / 'c'}.npy ==") + 1]
    assert lines[-2] == (
        "Summary: 4 inputs: 2 served (0 after waiting for inferences), 2 failed; "
        "inferences left: 98"
    )
    assert len(fake.inference_requests()) == 2
    assert fake.handshakes_completed == 1

    result = await in_process_query(
        fake, workdir, "--input", folder / "a.npy", folder / "d.npy", "--json"
    )
    assert result.returncode == EXIT_OK, result.stderr
    documents = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d.get("input") for d in documents[:2]] == [str(folder / "a.npy"), str(folder / "d.npy")]
    assert [d["cost"] for d in documents[:2]] == [1, 1]
    summary = documents[2]["summary"]
    assert (summary["served"], summary["failed"], summary["inferences_left"]) == (2, 0, 96)


async def test_several_models_need_model(fake: ScriptedEnclave, workdir: Path) -> None:
    fake.models = (MODEL_DESCRIPTION, COVIDNET)
    np.save(workdir / "x.npy", sample_input(rows=1))
    result = await in_process_query(fake, workdir, "--input", workdir / "x.npy")
    assert result.returncode == EXIT_USAGE
    assert "pick one of covidnet, tiny" in result.stderr


async def test_no_policy_file_fails_with_2(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", sample_input(rows=1))
    result = await run_cli(tmp_path, "query", "--address", HOST, "--input", "x.npy")
    assert result.returncode == EXIT_USAGE
    assert "no ./policy.toml" in result.stderr


# --- info ------------------------------------------------------------------------------


async def test_info_text_and_json(fake: ScriptedEnclave, workdir: Path) -> None:
    fake.models = (MODEL_DESCRIPTION, COVIDNET)
    args = ("info", "--address", HOST, "--port", str(fake.port))
    text, as_json = await run_cli(workdir, *args), await run_main(workdir, *args, "--json")
    assert text.returncode == EXIT_OK, text.stderr
    assert "State: serving" in text.stdout
    assert "Inferences left: 100" in text.stdout
    assert "  input  input_1: float32 [?, 480, 480, 3]" in text.stdout
    assert "  output y: float32 [?, 4]" in text.stdout
    assert f"MRENCLAVE {MR_ENCLAVE.hex()}" in text.stdout
    document = as_json.json()
    assert [m["name"] for m in document["models"]] == ["tiny", "covidnet"]
    assert document["models"][1]["inputs"][0]["shape"] == [None, 480, 480, 3]
    assert document["state"] == "serving"
    assert document["attestation"]["tcb_status"] == "UpToDate"
    assert document["attestation"]["advisory_ids"] == []
    assert fake.inference_requests() == []


async def test_a_bad_collateral_file_is_refused_with_2_before_connecting(
    fake: ScriptedEnclave, workdir: Path
) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    (workdir / "bundle.json").write_text('{"tcb_info": 1}')
    result = await query(fake, workdir, "--input", "x.npy", "--collateral", "bundle.json")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "bad collateral: not a collateral bundle" in result.stderr
    assert fake.handshakes_completed == 0


async def test_given_collateral_for_another_platform_leaves_the_staple_to_judge(
    fake: ScriptedEnclave, workdir: Path
) -> None:
    np.save(workdir / "x.npy", sample_input(rows=1))
    (workdir / "bundle.json").write_text(real_collateral_text())  # Intel's, FMSPC 00A067110000
    result = await query(fake, workdir, "--input", "x.npy", "--collateral", "bundle.json")
    assert result.returncode == EXIT_OK, result.stderr
    assert "TCB status UpToDate" in result.stdout


# --- collateral from a PCCS, for an enclave that staples none ---------------------------


@pytest.fixture
async def bare(nursery: trio.Nursery, platform: SimulatedPlatform) -> ScriptedEnclave:
    """An enclave whose certificate staples no collateral (as on SGX hardware today)."""
    provider = platform.quote_provider(mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER)
    enclave = ScriptedEnclave(build_ratls_certificate(provider))
    await nursery.start(enclave.serve)
    return enclave


@pytest.fixture
def strict(tmp_path: Path, policy: Policy) -> Path:
    """A production policy for the simulated root: UpToDate only, never an unknown status."""
    replace(policy, accept_unknown_tcb_status=False).write(tmp_path / "policy.toml")
    return tmp_path


def _tcb_requests(pccs: RunningPccs) -> list[str]:
    return [q["fmspc"][0] for p, q in pccs.behaviour.requests if p.endswith("/tcb")]


async def test_without_a_pccs_an_enclave_that_staples_nothing_is_refused(
    bare: ScriptedEnclave, strict: Path
) -> None:
    result = await run_main(strict, "info", "--address", HOST, "--port", str(bare.port))
    assert result.returncode == EXIT_ATTESTATION, result.stderr
    assert "TCB status unknown" in result.stderr


async def test_pccs_collateral_is_fetched_after_the_first_refusal_then_accepted(
    bare: ScriptedEnclave, strict: Path, platform: SimulatedPlatform
) -> None:
    bundle = json.loads(platform.collateral())
    async with running_pccs(strict, PccsBehaviour(bundle=bundle)) as pccs:
        result = await run_main(strict, "info", "--address", HOST, "--port", str(bare.port),
                                "--pccs-url", pccs.url, "--pccs-ca", pccs.ca_path,
                                "--json")  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    assert result.json()["attestation"]["tcb_status"] == "UpToDate"
    # One platform, the PCK CA type its PCK names, fetched once: between the handshakes.
    assert _tcb_requests(pccs) == [b"SIMFMS".hex().upper()]
    crls = sorted(q["ca"][0] for p, q in pccs.behaviour.requests if p.endswith("/pckcrl"))
    assert crls == ["platform"]


async def test_a_failing_pccs_is_an_attestation_refusal_naming_it(
    bare: ScriptedEnclave, strict: Path, platform: SimulatedPlatform
) -> None:
    bundle = json.loads(platform.collateral())
    async with running_pccs(strict, PccsBehaviour(bundle=bundle, status=503)) as pccs:
        result = await run_main(strict, "info", "--address", HOST, "--port", str(bare.port),
                                "--pccs-url", pccs.url, "--pccs-ca", pccs.ca_path)  # fmt: skip
    assert result.returncode == EXIT_ATTESTATION, result.stderr
    assert f"(FMSPC {b'SIMFMS'.hex().upper()}) could not be fetched from {pccs.url}" in (
        result.stderr
    )
    assert "HTTP 503" in result.stderr


async def test_forged_collateral_from_the_pccs_never_gets_the_enclave_accepted(
    bare: ScriptedEnclave, strict: Path, platform: SimulatedPlatform
) -> None:
    """A PCCS (or whoever sits in its place) serving tampered TCB info: fetched, then
    refused at the second handshake, since it does not verify to the pinned root."""
    bundle = json.loads(platform.collateral())
    async with running_pccs(strict, PccsBehaviour(bundle=bundle, tamper_tcb_info=True)) as pccs:
        result = await run_main(strict, "info", "--address", HOST, "--port", str(bare.port),
                                "--pccs-url", pccs.url, "--pccs-ca", pccs.ca_path)  # fmt: skip
    assert result.returncode == EXIT_ATTESTATION, result.stderr
    assert len(_tcb_requests(pccs)) == 1  # fetched once (its PCK CA), no third handshake
    assert bare.inference_requests() == []


@pytest.mark.parametrize(
    ("url", "ca"),
    [("http://127.0.0.1:1", None), ("https://127.0.0.1:1", "missing.pem")],
    ids=["plain-http", "missing-ca"],
)
async def test_a_bad_pccs_setting_fails_with_2_before_connecting(
    bare: ScriptedEnclave, strict: Path, url: str, ca: str | None
) -> None:
    extra = [] if ca is None else ["--pccs-ca", str(strict / ca)]
    result = await run_main(strict, "info", "--address", HOST, "--port", str(bare.port),
                            "--pccs-url", url, *extra)  # fmt: skip
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "bad --pccs-url or --pccs-ca" in result.stderr
    assert bare.handshakes_completed == 0


async def test_query_with_a_pccs_runs_the_inference_after_the_second_handshake(
    bare: ScriptedEnclave, strict: Path, platform: SimulatedPlatform
) -> None:
    np.save(strict / "x.npy", sample_input(rows=1))
    bundle = json.loads(platform.collateral())
    async with running_pccs(strict, PccsBehaviour(bundle=bundle)) as pccs:
        result = await run_cli(strict, "query", "--address", HOST, "--port", str(bare.port),
                               "--input", "x.npy", "--pccs-url", pccs.url,
                               "--pccs-ca", pccs.ca_path)  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    assert "TCB status UpToDate" in result.stdout
    assert len(bare.inference_requests()) == 1


async def test_the_progress_bar_is_drawn_on_a_terminal(
    fake: ScriptedEnclave, workdir: Path
) -> None:
    """On a terminal, several inputs get a progress bar on standard error (beside the
    results on standard output); on a pipe, none (the e2e folder test)."""
    folder = workdir / "inputs"
    folder.mkdir()
    for number in range(3):
        np.save(folder / f"{number}.npy", sample_input(rows=1))
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80x24
    try:
        with trio.fail_after(RUN_TIMEOUT):
            process = await trio.run_process(
                [sys.executable, "-m", "drm_consumer", "query", "--address", HOST,
                 "--port", str(fake.port), "--input", str(folder), "--policy", "policy.toml"],
                cwd=workdir, capture_stdout=True, stderr=terminal, check=False,
            )  # fmt: skip
        os.close(terminal)
        drawn = b""
        with contextlib.suppress(OSError):  # EIO once the terminal's writer is gone
            while chunk := os.read(controller, 65536):
                drawn += chunk
    finally:
        os.close(controller)
    assert process.returncode == EXIT_OK
    assert b"3/3" in drawn
    assert process.stdout.decode().count("== ") == 3
    assert "3 inputs: 3 served" in process.stdout.decode()


async def test_auto_follows_the_preprocessing_the_terms_name(
    fake: ScriptedEnclave, workdir: Path
) -> None:
    """The owner's terms name ``imagenet``: ``auto`` uses it; a name this client does not
    have is a usage error, and nothing is sent."""
    fake.behaviour = reply_with("scores", SCORES)
    Image.new("RGB", (300, 256), (10, 200, 90)).save(workdir / "photo.jpg", format="JPEG")
    fake.models = (replace(CLASSIFIER, terms=Terms(preprocess="imagenet")),)
    result = await in_process_query(fake, workdir, "--input", workdir / "photo.jpg")
    assert result.returncode == EXIT_OK, result.stderr
    assert "auto picked imagenet: the terms of model 'classifier' name it" in result.stderr
    assert len(fake.inference_requests()) == 1
    fake.models = (replace(CLASSIFIER, terms=Terms(preprocess="letterbox-640")),)
    result = await in_process_query(fake, workdir, "--input", workdir / "photo.jpg")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "name its preprocessing 'letterbox-640', which this client does not have" in (
        result.stderr
    )
    assert len(fake.inference_requests()) == 1
