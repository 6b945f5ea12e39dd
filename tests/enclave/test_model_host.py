"""The model host: refusals (M01-M04, M06), descriptions, runs and the inline/thread policy."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

# First: importing the host switches onnxruntime's telemetry off before onnxruntime loads.
from drm_enclave import model_host

# isort: split
import numpy as np
import onnxruntime as ort
import pytest
import trio

from drm_enclave.model_host import (
    BadInputError,
    HostedModel,
    InferenceError,
    ModelError,
    load_model,
)
from drm_lab import models
from drm_wire.errors import DrmError, ErrorCode, LocalProtocolError
from drm_wire.messages import ModelDescription, TensorSpec
from drm_wire.model.terms import Terms, Unit
from drm_wire.tensors import Tensor

CPU = ["CPUExecutionProvider"]
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def tiny() -> HostedModel:
    return load_model("tiny", models.tiny_model())


@pytest.fixture(scope="module")
def two() -> HostedModel:
    return load_model("two", models.two_input_model())


@pytest.fixture(scope="module")
def cnn() -> HostedModel:
    return load_model("covidnet", models.covidnet_like_model())


class SessionSpy:
    """Stands in for ``ort.InferenceSession`` to prove it was never created."""

    calls = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        type(self).calls += 1
        raise AssertionError("a session was created for a model that should be refused")


@pytest.fixture
def no_session(monkeypatch: pytest.MonkeyPatch) -> type[SessionSpy]:
    SessionSpy.calls = 0
    monkeypatch.setattr(ort, "InferenceSession", SessionSpy)
    return SessionSpy


def t(name: str, array: np.ndarray[Any, Any]) -> Tensor:
    return Tensor.from_numpy(name, array)


def x_batch(n: int = 2) -> np.ndarray[Any, Any]:
    return np.random.default_rng(n).random((n, 4), dtype=np.float32)


# --- M01: not a model ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(models.EMPTY, "empty", id="empty"),
        pytest.param(models.random_bytes(), "malformed protobuf", id="random"),
        pytest.param(models.random_bytes(16, seed=9), "", id="random-16"),
        pytest.param(models.zip_bytes(), "malformed protobuf", id="zip"),
        pytest.param(models.truncated_model(), "truncated", id="truncated"),
        pytest.param(models.tiny_model()[:-3], "", id="truncated-tail"),
        pytest.param(b"\x08\x08", "no graph", id="no-graph"),
        pytest.param(
            models.unknown_op_model(), r"onnxruntime refused it \(INVALID_GRAPH\)", id="unknown-op"
        ),
    ],
)
def test_m01_not_a_model(data: bytes, reason: str) -> None:
    with pytest.raises(ModelError, match=f"^invalid model: .*{reason}") as info:
        load_model("m", data)
    assert isinstance(info.value, DrmError)
    assert info.value.code is ErrorCode.BAD_REQUEST
    # The process is fine afterwards: a good model loads and runs.
    assert load_model("m", models.tiny_model()).run((t("x", x_batch()),))


def test_m01_size_limit(monkeypatch: pytest.MonkeyPatch, no_session: type[SessionSpy]) -> None:
    monkeypatch.setattr(model_host, "MAX_MODEL_BYTES", 100)
    with pytest.raises(ModelError, match=r"^invalid model: \d+ bytes is over the limit of 100$"):
        load_model("m", models.tiny_model())
    assert no_session.calls == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_any_buffer(kind: type[Any]) -> None:
    hosted = load_model("tiny", kind(models.tiny_model()))
    assert hosted.description.sha256 == hashlib.sha256(models.tiny_model()).digest()


def test_bad_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        load_model("", models.tiny_model())
    with pytest.raises(ValueError, match="intra_op_threads"):
        load_model("m", models.tiny_model(), intra_op_threads=0)
    with pytest.raises(ValueError, match="sha256 must be 32 bytes"):
        load_model("m", models.tiny_model(), sha256=bytes(31))


def test_known_digest_is_used_as_given() -> None:
    known = hashlib.sha256(models.tiny_model()).digest()
    assert load_model("m", models.tiny_model(), sha256=known).description.sha256 == known


# --- M02: external data --------------------------------------------------------------


@pytest.mark.parametrize("where", ["initializer", "subgraph", "constant", "sparse", "function"])
@pytest.mark.parametrize("location", ["../outside.bin", "weights.bin", "/etc/passwd"])
def test_m02_external_data_refused_before_session(
    where: Any, location: str, no_session: type[SessionSpy], tmp_path: Path
) -> None:
    (tmp_path / "weights.bin").write_bytes(bytes(48))
    with pytest.raises(ModelError, match=r"^invalid model: a tensor keeps its data in an external"):
        load_model("m", models.external_data_model(location, where))
    assert no_session.calls == 0


# --- M03: custom domains -------------------------------------------------------------


def test_m03_unregistered_domain_refused(no_session: type[SessionSpy]) -> None:
    with pytest.raises(ModelError) as info:
        load_model("m", models.custom_domain_model())
    assert str(info.value) == (
        "invalid model: operator 'Exfiltrate' from domain 'com.example.unregistered' "
        "is not registered (custom operators are refused)"
    )
    assert no_session.calls == 0


def test_m03_registered_domains_and_local_functions_load() -> None:
    x = x_batch()
    for data in (models.contrib_op_model(), models.local_function_model()):
        reference = ort.InferenceSession(data, providers=CPU)
        (out,) = load_model("m", data).run((t("x", x),))
        np.testing.assert_allclose(out.to_numpy(), reference.run(None, {"x": x})[0], rtol=1e-5)


def test_m03_no_custom_ops_library_anywhere_in_src() -> None:
    pattern = re.compile(r"register_custom_ops_library\s*\(")
    offenders = [p for p in SRC.rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_unservable_io_dtype() -> None:
    with pytest.raises(ModelError, match=r"input 's' has type tensor\(string\)"):
        load_model("m", models.string_io_model())


# --- M04: inputs ---------------------------------------------------------------------


A = np.ones((2, 4), dtype=np.float32)
B = np.arange(2, dtype=np.int64)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        pytest.param((t("a", A),), r"takes 2 input\(s\) \('a', 'b'\), got 1", id="missing"),
        pytest.param((t("a", A), t("b", B), t("c", B)), "got 3", id="extra"),
        pytest.param((t("a", A), t("c", B)), "^unknown input 'c'$", id="unknown-name"),
        pytest.param((t("a", A), t("a", A)), "^duplicate input 'a'$", id="duplicate"),
        pytest.param(
            (t("a", A), t("b", B.astype(np.int32))), "'b' must be int64, got int32", id="dtype"
        ),
        pytest.param(
            (t("a", A.astype(np.float64)), t("b", B)),
            "must be float32, got float64",
            id="dtype-float64",
        ),
        pytest.param((t("a", A[None]), t("b", B)), "'a' must have rank 2, got 3", id="rank"),
        pytest.param(
            (t("a", np.ones((2, 5), np.float32)), t("b", B)),
            "'a' dim 1 must be 4, got 5",
            id="concrete-dim",
        ),
        pytest.param(
            (t("a", A), t("b", np.arange(3))),
            "batch sizes differ: input 'a' has 2, input 'b' has 3",
            id="batch-mismatch",
        ),
        pytest.param((t("a", A), "b"), "inputs must be Tensor values", id="not-a-tensor"),
    ],
)
def test_m04_bad_inputs(two: HostedModel, tensors: Any, message: str) -> None:
    with pytest.raises(BadInputError, match=message) as info:
        two.check_inputs(tensors)
    assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(BadInputError, match=message):
        two.run(tensors)


def test_m04_inputs_in_any_order(two: HostedModel) -> None:
    (forward,) = two.run((t("a", A), t("b", B)))
    (backward,) = two.run((t("b", B), t("a", A)))
    np.testing.assert_array_equal(forward.to_numpy(), A * B[:, None])
    np.testing.assert_array_equal(backward.to_numpy(), forward.to_numpy())


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: t("x", np.array([["a", "b", "c", "d"]])), id="str-dtype"),
        pytest.param(lambda: t("x", np.array([[object()] * 4])), id="object-dtype"),
        pytest.param(
            lambda: Tensor(name="x", dtype="object", shape=(1, 4), data=memoryview(b"")),
            id="object-name",
        ),
        pytest.param(
            lambda: Tensor(name="x", dtype="float32", shape=(-1, 4), data=memoryview(b"")),
            id="negative-dim",
        ),
        pytest.param(
            lambda: Tensor(name="x", dtype="float32", shape=(2**40, 4), data=memoryview(b"")),
            id="huge-dim",
        ),
        pytest.param(
            lambda: Tensor(name="x", dtype="float32", shape=(1, 4), data=memoryview(bytes(15))),
            id="byte-length",
        ),
    ],
)
def test_m04_tensors_that_cannot_exist(make: Any) -> None:
    # These never reach check_inputs: a Tensor validates itself at construction, and the
    # wire decoder builds Tensors, so each is a request error before any quota is taken.
    with pytest.raises(LocalProtocolError) as info:
        make()
    assert info.value.code in (ErrorCode.BAD_REQUEST, ErrorCode.LIMIT_EXCEEDED)


def test_m04_bad_input_never_reaches_the_session(
    two: HostedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Refuse:
        def run(self, *args: object) -> None:
            raise AssertionError("session.run called with bad input")

    monkeypatch.setattr(two, "_session", Refuse())
    with pytest.raises(BadInputError):
        two.run((t("a", A),))


def test_m04_weights_fed_in_place_cannot_be_supplied(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large model's MatMul weights are graph inputs of its session (see the module's
    *Memory*): they are not in the description, and a request cannot name, so replace,
    one of them."""
    monkeypatch.setattr(model_host, "IN_PLACE_BYTES", 1)
    hosted = load_model("big", models.big_model(2.0, layers=1))
    (spec,) = hosted.description.inputs
    assert spec.name == "x"
    assert {arg.name for arg in hosted._session.get_inputs()} == {"x", "w0"}
    dim = spec.shape[1]
    assert dim is not None
    x = np.ones((1, dim), np.float32)
    w0 = np.zeros((dim, dim), np.float32)
    with pytest.raises(BadInputError, match="got 2"):
        hosted.run((t("x", x), t("w0", w0)))
    with pytest.raises(BadInputError, match="unknown input 'w0'"):
        hosted.run((t("w0", w0),))
    (y,) = hosted.run((t("x", x),))
    assert np.isfinite(y.to_numpy()).all()
    assert not np.allclose(y.to_numpy(), 1 / dim)  # not the output of w0 = 0


# --- M06: session options and ORT's log ----------------------------------------------


def test_m06_session_options(tiny: HostedModel) -> None:
    for options in (tiny.session_options, model_host.session_options(2)):
        assert options.optimized_model_filepath == ""
        assert options.enable_profiling is False
        assert options.log_severity_level == 4
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert options.get_session_config_entry("session.load_model_format") == "ONNX"


def test_m06_ort_logs_no_node_names(capfd: pytest.CaptureFixture[str]) -> None:
    hosted = load_model("failing", models.failing_model())
    with pytest.raises(InferenceError) as info:
        hosted.run((t("x", np.ones((1, 4), np.float32)),))
    assert info.value.code is ErrorCode.INFERENCE_FAILED
    assert models.SECRET_NODE_NAME not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    with pytest.raises(ModelError) as load_info:
        load_model("unknown", models.unknown_op_model())
    assert models.SECRET_NODE_NAME not in str(load_info.value)
    out, err = capfd.readouterr()
    assert models.SECRET_NODE_NAME not in out + err


def test_m06_check_detects_leaks(capfd: pytest.CaptureFixture[str]) -> None:
    # The check above can fail: ORT at its default severity does print the node's name.
    options = ort.SessionOptions()
    options.log_severity_level = 2
    session = ort.InferenceSession(
        models.failing_model(), options, providers=["CPUExecutionProvider"]
    )
    with pytest.raises(Exception, match=models.SECRET_NODE_NAME):
        session.run(None, {"x": np.ones((1, 4), np.float32)})
    assert models.SECRET_NODE_NAME in capfd.readouterr().err


# --- description and runs ------------------------------------------------------------


def test_description_tiny(tiny: HostedModel) -> None:
    assert tiny.description == ModelDescription(
        name="tiny",
        sha256=hashlib.sha256(models.tiny_model()).digest(),
        inputs=(TensorSpec(name="x", dtype="float32", shape=(None, 4)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=(None, 3)),),
        # Default terms, made explicit: one unit per row, at most 64 rows.
        terms=Terms(
            unit=Unit.ITEM, max_batch=64, inputs=(("x", ((1, 64), 4)),), batch_axis=(("x", 0),)
        ),
    )


def test_description_cnn(cnn: HostedModel) -> None:
    assert cnn.description == ModelDescription(
        name="covidnet",
        sha256=hashlib.sha256(models.covidnet_like_model()).digest(),
        inputs=(TensorSpec(name="input", dtype="float32", shape=(1, 480, 480, 3)),),
        outputs=(TensorSpec(name="probs", dtype="float32", shape=(1, 2)),),
        # No dynamic dim: one unit per request.
        terms=Terms(
            unit=Unit.ITEM,
            max_batch=64,
            inputs=(("input", (1, 480, 480, 3)),),
            batch_axis=(("input", None),),
        ),
    )
    assert 30e6 < len(models.covidnet_like_model()) < 34e6


def test_description_two_inputs(two: HostedModel) -> None:
    assert two.description.inputs == (
        TensorSpec(name="a", dtype="float32", shape=(None, 4)),
        TensorSpec(name="b", dtype="int64", shape=(None,)),
    )


@pytest.mark.parametrize("batch", [1, 7])
def test_run_matches_onnxruntime_tiny(tiny: HostedModel, batch: int) -> None:
    x = x_batch(batch)
    reference = ort.InferenceSession(models.tiny_model(), providers=CPU)
    (y,) = tiny.run((t("x", x),))
    assert (y.name, y.dtype, y.shape) == ("y", "float32", (batch, 3))
    np.testing.assert_allclose(y.to_numpy(), reference.run(None, {"x": x})[0], rtol=1e-6)


def test_run_matches_onnxruntime_cnn(cnn: HostedModel) -> None:
    image = np.random.default_rng(5).random((1, 480, 480, 3), dtype=np.float32)
    reference = ort.InferenceSession(
        models.covidnet_like_model(), providers=["CPUExecutionProvider"]
    )
    (probs,) = cnn.run((t("input", image),))
    expected = reference.run(None, {"input": image})[0]
    np.testing.assert_allclose(probs.to_numpy(), expected, rtol=1e-4, atol=1e-6)
    assert probs.to_numpy().sum() == pytest.approx(1.0, abs=1e-5)


def test_run_with_read_only_wire_bytes(tiny: HostedModel) -> None:
    x = x_batch(3)
    wire = memoryview(x.tobytes())  # as decoded from a frame: read-only, shared
    tensor = Tensor(name="x", dtype="float32", shape=(3, 4), data=wire)
    (y,) = tiny.run((tensor,))
    np.testing.assert_allclose(y.to_numpy(), tiny.run((t("x", x),))[0].to_numpy())


def test_canary_model_runs_and_leaves_no_trace(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    hosted = load_model("canary", models.canary_model())
    (y,) = hosted.run((t("x", x_batch()),))
    assert y.shape == (2, 3)
    out, err = capfd.readouterr()
    text = out + err + caplog.text + repr(hosted) + repr(hosted.description)
    assert models.CANARY.hex() not in text
    assert models.CANARY not in text.encode("utf-8", "surrogateescape")


# --- run_async and its policy --------------------------------------------------------


class ThreadCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = trio.to_thread.run_sync

        async def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(*args, **kwargs)

        monkeypatch.setattr(trio.to_thread, "run_sync", counting)


async def test_run_async_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Generous thresholds, so a loaded test machine cannot make a tiny run look slow.
    monkeypatch.setattr(model_host, "INLINE_FAST", 1.0)
    monkeypatch.setattr(model_host, "INLINE_BUDGET", 2.0)
    hosted = load_model("tiny", models.tiny_model())
    threads = ThreadCounter(monkeypatch)
    small, large = (t("x", x_batch(1)),), (t("x", x_batch(64)),)
    (first,) = await hosted.run_async(small)
    assert threads.calls == 1  # an unmeasured size runs off the loop
    await hosted.run_async(small)
    assert threads.calls == 1  # measured fast: inline now
    await hosted.run_async(large)
    assert threads.calls == 2  # larger than any measured run: thread again
    # One slow run sends that size (and larger) back to the thread.
    hosted._observe(16, 3.0)
    await hosted.run_async(small)
    assert threads.calls == 3
    np.testing.assert_allclose(first.to_numpy(), hosted.run(small)[0].to_numpy())


async def test_run_inline_follows_and_feeds_the_same_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(model_host, "INLINE_FAST", 1.0)
    monkeypatch.setattr(model_host, "INLINE_BUDGET", 2.0)
    hosted = load_model("tiny", models.tiny_model())
    small, large = (t("x", x_batch(1)),), (t("x", x_batch(64)),)
    assert not hosted.runs_inline(small)  # never measured
    (y,) = hosted.run_inline(small)  # a caller may run it anyway; the run is observed
    assert hosted.runs_inline(small)
    assert not hosted.runs_inline(large)
    np.testing.assert_array_equal(y.to_numpy(), hosted.run(small)[0].to_numpy())
    hosted._observe(4, 3.0)  # one slow run sends that size (and larger) back to a thread
    assert not hosted.runs_inline(small)
    with pytest.raises(BadInputError):
        hosted.run_inline((t("x", np.zeros((1, 5), dtype=np.float32)),))


@pytest.mark.parametrize("inline", [True, False])
async def test_run_async_forced_paths_agree(tiny: HostedModel, inline: bool) -> None:
    x = x_batch(4)
    (y,) = await tiny.run_async((t("x", x),), inline=inline)
    np.testing.assert_array_equal(y.to_numpy(), tiny.run((t("x", x),))[0].to_numpy())


async def test_run_async_bad_input_raises_before_running(two: HostedModel) -> None:
    with pytest.raises(BadInputError):
        await two.run_async((t("a", A),))


async def test_run_async_cancelled_before_start_runs_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hosted = load_model("tiny", models.tiny_model())
    ran: list[object] = []

    class Spy:
        def run(self, *args: object) -> None:
            ran.append(args)

    monkeypatch.setattr(hosted, "_session", Spy())
    with trio.CancelScope() as scope:
        scope.cancel()
        await hosted.run_async((t("x", x_batch()),))
    assert scope.cancelled_caught
    assert ran == []


async def test_thread_run_is_not_abandoned_on_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    hosted = load_model("tiny", models.tiny_model())
    results: list[object] = []

    class CancelMidRun:
        def run(self, names: object, feeds: dict[str, Any]) -> list[Any]:
            trio.from_thread.run_sync(scope.cancel)  # the consumer goes away mid-run
            return [np.full((len(feeds["x"]), 3), 1 / 3, np.float32)]

    monkeypatch.setattr(hosted, "_session", CancelMidRun())
    with trio.CancelScope() as scope:
        results.append(await hosted.run_async((t("x", x_batch()),), inline=False))
        await trio.lowlevel.checkpoint()
    # The run had started, so its result came back (to be charged) despite the cancel.
    assert scope.cancelled_caught
    assert len(results) == 1
