"""Splitting a model's weights off (``split_weights``): what is cut, what stays, which
weights become graph inputs fed in place, and that onnxruntime computes the same outputs
from the skeleton plus the weights."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from drm_enclave import model_host  # first: telemetry off

# isort: split
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from drm_lab import models
from drm_wire.model.scan import (
    FEED_OPS,
    MIN_SPLIT_BYTES,
    PLACEHOLDER_LOCATION,
    ModelError,
    SplitModel,
    scan_model,
    split_weights,
)
from drm_wire.tensors import Tensor

CPU = ["CPUExecutionProvider"]
BIG = models.big_model(8.0)  # three float32 weights of ~2.7 MB


def split(
    data: bytes, min_bytes: int = MIN_SPLIT_BYTES, feed_bytes: int | None = None
) -> SplitModel | None:
    view = memoryview(data)
    scan_model(view)
    return split_weights(view, min_bytes, feed_bytes=feed_bytes)


def cut(data: bytes, min_bytes: int = MIN_SPLIT_BYTES, feed_bytes: int | None = None) -> SplitModel:
    """:func:`split` of a model that has something to split."""
    result = split(data, min_bytes, feed_bytes)
    assert result is not None
    return result


def test_big_model_weights_stay_in_place() -> None:
    result = split(BIG)
    assert result is not None
    original = onnx.load_model_from_string(BIG)
    raw = {t.name: t for t in original.graph.initializer}
    assert [w.name for w in result.weights] == ["w0", "w1", "w2"]
    for weight in result.weights:
        tensor = raw[weight.name]
        assert BIG[weight.start : weight.end] == tensor.raw_data  # offsets into the buffer
        assert weight.dims == tuple(tensor.dims)
        assert weight.data_type == TensorProto.FLOAT
    assert len(result.skeleton) < 4096  # the weights are not in it
    skeleton = onnx.load_model_from_string(result.skeleton)
    for placeholder in skeleton.graph.initializer:
        assert placeholder.data_location == TensorProto.EXTERNAL
        assert not placeholder.raw_data
        assert [(e.key, e.value) for e in placeholder.external_data] == [
            ("location", PLACEHOLDER_LOCATION)
        ]
        assert list(placeholder.dims) == list(raw[placeholder.name].dims)
    # Everything but the initializers' data is unchanged.
    for proto in (skeleton, original):
        del proto.graph.initializer[:]
    assert skeleton == original


def test_big_model_weights_fed_as_graph_inputs() -> None:
    result = cut(BIG, feed_bytes=1)
    assert result.weights == ()
    assert result.inputs == cut(BIG).weights
    original = onnx.load_model_from_string(BIG)
    skeleton = onnx.load_model_from_string(result.skeleton)
    assert not skeleton.graph.initializer
    declared = {i.name: i.type.tensor_type for i in skeleton.graph.input}
    for tensor in original.graph.initializer:
        assert declared[tensor.name].elem_type == tensor.data_type
        assert [d.dim_value for d in declared[tensor.name].shape.dim] == list(tensor.dims)
    # Everything but the initializers, now inputs, is unchanged.
    for proto in (skeleton, original):
        del proto.graph.initializer[:]
    weights = [i for i in skeleton.graph.input if i.name.startswith("w")]
    for weight in weights:
        skeleton.graph.input.remove(weight)
    assert skeleton == original


def test_fed_only_when_they_total_feed_bytes() -> None:
    total = sum(w.nbytes for w in cut(BIG).weights)
    assert len(cut(BIG, feed_bytes=total).inputs) == 3
    below = cut(BIG, feed_bytes=total + 1)
    assert below.inputs == ()
    assert below == cut(BIG)


def test_only_weights_of_matmul_and_gemm_are_fed() -> None:
    """A Conv's weight stays an initializer: onnxruntime's layout and BatchNorm rewrites
    need it constant. The Gemm weights and bias of the same model are fed (fc2_b is under
    128 bytes)."""
    assert ("", "Gemm") in FEED_OPS
    result = cut(models.covidnet_like_model(), min_bytes=128, feed_bytes=1)
    assert {w.name for w in result.inputs} == {"fc1_w", "fc1_b", "fc2_w"}
    assert len(result.weights) == 9
    assert all(w.name.startswith("conv") for w in result.weights)


def test_declared_input_or_other_type_not_fed() -> None:
    def model(w: TensorProto, declared: bool) -> bytes:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", w.data_type, [1, 4])]
            + ([helper.make_tensor_value_info("w", w.data_type, [4, 4])] if declared else []),
            [helper.make_tensor_value_info("y", w.data_type, [1, 4])],
            [w],
        )
        return models._model(graph)

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    assert len(cut(model(w, False), min_bytes=1, feed_bytes=1).inputs) == 1
    assert not cut(model(w, True), min_bytes=1, feed_bytes=1).inputs
    w32 = numpy_helper.from_array(np.ones((4, 4), np.int32), "w")
    assert not cut(model(w32, False), min_bytes=1, feed_bytes=1).inputs


def test_shape_constants_must_stay_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why MIN_SPLIT_BYTES is not tiny: onnxruntime's shape inference reads constants such
    as a Reshape shape from the model itself, and refuses to when they are external."""
    data = models.covidnet_like_model()
    assert model_host.load_model("m", data)
    result = split(data, min_bytes=1)
    assert result is not None
    assert "flat_shape" in [w.name for w in result.weights]  # 16 bytes, Reshape's shape
    monkeypatch.setattr(model_host, "split_weights", functools.partial(split_weights, min_bytes=1))
    with pytest.raises(ModelError, match=r"onnxruntime refused it \(FAIL\)"):
        model_host.load_model("m", data)


def test_nothing_to_split() -> None:
    assert split(models.tiny_model()) is None  # its weights are far below the threshold
    assert split(models.tiny_model(), min_bytes=1) is not None


def _one_weight_model(tensor: TensorProto, extra: tuple[TensorProto, ...] = ()) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", tensor.name], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [tensor, *extra],
    )
    return models._model(graph)


@pytest.mark.parametrize(
    "tensor",
    [
        # typed data (float_data), not raw_data
        pytest.param(helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0] * 4), id="typed"),
        # raw_data one byte short of what the dims say: onnxruntime judges it, embedded
        pytest.param(TensorProto(name="w", data_type=1, dims=[4], raw_data=bytes(15)), id="short"),
        # a string tensor has no fixed item size (and keeps its data in string_data)
        pytest.param(
            TensorProto(name="w", data_type=8, dims=[1], string_data=[b"ab"]), id="string"
        ),
        # no name
        pytest.param(
            helper.make_tensor("", TensorProto.FLOAT, [4], bytes(16), raw=True), id="unnamed"
        ),
    ],
)
def test_odd_tensors_stay_embedded(tensor: TensorProto) -> None:
    assert split(_one_weight_model(tensor), min_bytes=1) is None


def test_duplicate_names_split_nothing() -> None:
    w = numpy_helper.from_array(np.ones(4, np.float32), "w")
    assert split(_one_weight_model(w), min_bytes=1) is not None
    assert split(_one_weight_model(w, (w,)), min_bytes=1) is None


def test_name_not_utf8_stays_embedded() -> None:
    w = numpy_helper.from_array(np.ones(4, np.float32), "w")
    data = _one_weight_model(w).replace(b"\x42\x01w", b"\x42\x01\xff")  # name field "w"
    assert split(data, min_bytes=1) is None


# --- onnxruntime computes the same from skeleton + weights ----------------------------


def _feeds(session: ort.InferenceSession) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(5)
    feeds = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in arg.shape]
        dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64}[arg.type]
        feeds[arg.name] = (rng.random(shape) * 3).astype(dtype)
    return feeds


MODELS: dict[str, Callable[[], bytes]] = {
    "tiny": models.tiny_model,
    "two-inputs (int64 Unsqueeze axes)": models.two_input_model,
    "covidnet-like": models.covidnet_like_model,
    "big": lambda: BIG,
    "canary": models.canary_model,
    "contrib-op": models.contrib_op_model,
    "local-function": models.local_function_model,
}


@pytest.mark.parametrize("in_place", [False, True], ids=["copied", "in-place"])
@pytest.mark.parametrize("min_bytes", [128, MIN_SPLIT_BYTES])
@pytest.mark.parametrize("name", list(MODELS))
def test_split_load_matches_plain_onnxruntime(
    name: str, min_bytes: int, in_place: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = MODELS[name]()
    reference = ort.InferenceSession(data, providers=CPU)
    feeds = _feeds(reference)
    expected = reference.run(None, feeds)
    monkeypatch.setattr(
        model_host, "split_weights", functools.partial(split_weights, min_bytes=min_bytes)
    )
    if in_place:  # every MatMul/Gemm weight of min_bytes or more fed as an input
        monkeypatch.setattr(model_host, "IN_PLACE_BYTES", 1)
    # (only a read-only buffer is fed in place: bytes here, bytearray otherwise)
    hosted = model_host.load_model("m", data if in_place else bytearray(data))
    assert [spec.name for spec in hosted.description.inputs] == list(feeds)
    outputs = hosted.run([Tensor.from_numpy(k, v) for k, v in feeds.items()])
    for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-5, atol=1e-6)
