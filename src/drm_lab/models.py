"""Deterministic ONNX test models, built with ``onnx.helper`` from seeded numpy.

Every builder returns the serialized ``ModelProto`` as ``bytes`` and is cached for the
test session, so the ~32 MB CNN is built once (about a second). The valid models:

* :func:`tiny_model`: ``x`` float32 [N, 4] -> Gemm (3x4) -> Softmax -> ``y`` [N, 3].
* :func:`two_input_model`: ``a`` float32 [N, 4] and ``b`` int64 [N] sharing the dynamic
  dim ``N``; ``y = a * b[:, None]``.
* :func:`two_by_two_model`: the same inputs, two outputs: ``y`` float32 and ``k`` int64.
* :func:`covidnet_like_model`: NHWC [1, 480, 480, 3] -> Transpose -> 5 x (Conv3x3 + Relu +
  MaxPool) -> FC -> FC 2 -> Softmax, about ``weights_mb`` MB of weights (the shape the
  benchmarks call "cnn").
  With ``dynamic_batch=True``, the same over ``[N, 480, 480, 3]``.
* :func:`exporter_dims_model`: ``x`` [?, 3, ?, ?] -> mean -> ``y`` [?, 3], its dynamic
  dims named as exporters name them (``?``, empty, unset, ``unk__N``, named).
* :func:`shared_dim_model`: two inputs sharing the symbolic dim ``L`` that onnxruntime
  lets differ.
* :func:`big_model`: a MatMul + Relu chain of about ``mb`` MB, for upload tests.
* :func:`canary_model`: the tiny model plus a :data:`CANARY` initializer, 32 random bytes
  drawn once per process, that tests search for in logs and files (M05).
* :func:`failing_model`: loads, but every run fails inside a node called
  :data:`SECRET_NODE_NAME` (to check that ORT's log does not leak node names, M06).
* :func:`with_metadata`: any of them with ONNX ``metadata_props`` set (a label list, a
  key its owner keeps to itself).

And hostile ones (M01-M03): :func:`external_data_model`, :func:`custom_domain_model`,
:func:`string_io_model`, :func:`truncated_model`, :func:`random_bytes`, :func:`zip_bytes`,
:data:`EMPTY`.
"""

from __future__ import annotations

import io
import itertools
import os
import zipfile
from functools import cache
from typing import Final, Literal

import numpy as np

# onnx is not a runtime dependency of the project: the test, bench and demo dependency
# groups install it, and only this module of drm_lab needs it.
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "CANARY",
    "DIM_STYLES",
    "EMPTY",
    "SECRET_NODE_NAME",
    "big_model",
    "canary_model",
    "contrib_op_model",
    "covidnet_like_model",
    "custom_domain_model",
    "exporter_dims_model",
    "external_data_model",
    "failing_model",
    "local_function_model",
    "random_bytes",
    "shared_dim_model",
    "string_io_model",
    "tiny_model",
    "truncated_model",
    "two_input_model",
    "unknown_op_model",
    "with_metadata",
    "zip_bytes",
]

OPSET: Final = 17
#: 32 random bytes, fresh for each test process, so a leak from an earlier run cannot
#: make a later scan pass or fail by accident.
CANARY: Final = os.urandom(32)
#: A node name that must never appear in ORT's log output.
SECRET_NODE_NAME: Final = "node_name_that_must_not_be_logged_5f3a"
EMPTY: Final = b""


def _model(graph: onnx.GraphProto, *, domains: tuple[tuple[str, int], ...] = ()) -> bytes:
    opsets = [helper.make_opsetid("", OPSET), *(helper.make_opsetid(d, v) for d, v in domains)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="drm-tests")
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


def _tiny_graph(name: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 4)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "W", "B"], ["logits"], transB=1, name=f"{name}_gemm"),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1, name=f"{name}_softmax"),
    ]
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")]
    return nodes, inits


def _tiny_io() -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return (
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
    )


@cache
def tiny_model() -> bytes:
    """``x`` float32 [N, 4] -> Gemm 3x4 -> Softmax -> ``y`` float32 [N, 3]."""
    nodes, inits = _tiny_graph("tiny")
    x, y = _tiny_io()
    return _model(helper.make_graph(nodes, "tiny", [x], [y], inits))


@cache
def two_input_model() -> bytes:
    """``a`` float32 [N, 4], ``b`` int64 [N] -> ``y = a * b[:, None]`` float32 [N, 4]."""
    nodes = [
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["bf", "axis1"], ["bcol"]),
        helper.make_node("Mul", ["a", "bcol"], ["y"]),
    ]
    axis = numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [axis],
    )
    return _model(graph)


@cache
def two_by_two_model() -> bytes:
    """Two inputs, two outputs, one of them int64: what a standard client must round-trip.

    ``a`` float32 [N, 4], ``b`` int64 [N] -> ``y = a * b[:, None]`` float32 [N, 4] and
    ``k = argmax(a, axis=1) + b`` int64 [N].
    """
    nodes = [
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["bf", "axis1"], ["bcol"]),
        helper.make_node("Mul", ["a", "bcol"], ["y"]),
        helper.make_node("ArgMax", ["a"], ["am"], axis=1, keepdims=0),
        helper.make_node("Add", ["am", "b"], ["k"]),
    ]
    axis = numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")
    graph = helper.make_graph(
        nodes,
        "two_by_two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["N"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["N"]),
        ],
        [axis],
    )
    return _model(graph)


@cache
def covidnet_like_model(weights_mb: float = 32.0, *, dynamic_batch: bool = False) -> bytes:
    """A two-class CNN over a 480x480 RGB image in NHWC, about ``weights_mb`` MB of weights.

    Input ``input`` float32 [1, 480, 480, 3]; output ``probs`` float32 [1, 2]. With
    ``dynamic_batch``, the same weights over a batch: ``input`` [N, 480, 480, 3] ->
    ``probs`` [N, 2] (the shape most exporters give a CNN).
    """
    rng = np.random.default_rng(1)
    batch: str | int = "N" if dynamic_batch else 1
    channels = [3, 16, 32, 64, 128, 128]
    nodes = [helper.make_node("Transpose", ["input"], ["t0"], perm=[0, 3, 1, 2])]
    inits: list[onnx.TensorProto] = []
    conv_bytes = 0
    side = 480
    for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        b = np.zeros(cout, dtype=np.float32)
        inits += [
            numpy_helper.from_array(w, f"conv{i}_w"),
            numpy_helper.from_array(b, f"conv{i}_b"),
        ]
        conv_bytes += w.nbytes + b.nbytes
        nodes += [
            helper.make_node(
                "Conv", [f"t{i}", f"conv{i}_w", f"conv{i}_b"], [f"c{i}"], pads=[1, 1, 1, 1]
            ),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            helper.make_node(
                "MaxPool", [f"r{i}"], [f"t{i + 1}"], kernel_shape=[2, 2], strides=[2, 2]
            ),
        ]
        side //= 2
    flat = channels[-1] * side * side
    hidden = max(2, int((weights_mb * 1e6 - conv_bytes) / (4 * (flat + 3))))
    fc1 = (rng.standard_normal((flat, hidden)) * np.sqrt(2.0 / flat)).astype(np.float32)
    fc2 = (rng.standard_normal((hidden, 2)) * np.sqrt(1.0 / hidden)).astype(np.float32)
    inits += [
        numpy_helper.from_array(
            np.array([-1 if dynamic_batch else 1, flat], dtype=np.int64), "flat_shape"
        ),
        numpy_helper.from_array(fc1, "fc1_w"),
        numpy_helper.from_array(np.zeros(hidden, dtype=np.float32), "fc1_b"),
        numpy_helper.from_array(fc2, "fc2_w"),
        numpy_helper.from_array(np.zeros(2, dtype=np.float32), "fc2_b"),
    ]
    last = f"t{len(channels) - 1}"
    nodes += [
        helper.make_node("Reshape", [last, "flat_shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc1_w", "fc1_b"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "fc2_w", "fc2_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "covidnet_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 480, 480, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 2])],
        inits,
    )
    return _model(graph)


#: How exporters name dynamic dims (:func:`exporter_dims_model`): paddle2onnx writes
#: ``?`` for every one, others leave the name empty or the dim unset, tf2onnx writes
#: ``unk__N``, torch.onnx names them after the axis (``batch``, ``height``).
DIM_STYLES: Final = ("?", "empty", "unnamed", "unk", "named")


def _dims(style: str, count: int) -> list[str | None]:
    if style == "?":
        return ["?"] * count
    if style == "empty":
        return [""] * count
    if style == "unnamed":
        return [None] * count
    if style == "unk":
        return [f"unk__{i}" for i in range(count)]
    names: list[str | None] = ["batch", "height", "width"]
    return names[:count]


@cache
def exporter_dims_model(style: str = "?") -> bytes:
    """An image classifier head as exporters name its dims: ``x`` float32 [?, 3, ?, ?]
    (batch, channels, height, width; named per ``style``, one of :data:`DIM_STYLES`)
    -> mean over height and width -> ``y`` float32 [?, 3].

    Shaped like the text-direction classifier of an OCR package, whose exporter names
    every dynamic dim ``?`` and which its own package feeds 1x3x48x192 inputs.
    """
    batch, height, width = _dims(style, 3)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
        f"exporter_dims_{style}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
    )
    return _model(graph)


@cache
def shared_dim_model() -> bytes:
    """Two inputs whose second dims share the symbolic name ``L`` but need not agree:
    ``a`` float32 [N, L] and ``b`` float32 [N, L] -> ``y`` = sum(a, 1) + sum(b, 1) [N].
    onnxruntime runs it with ``a`` 2x3 and ``b`` 2x5."""
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["a", "axes"], ["sa"], keepdims=0),
            helper.make_node("ReduceSum", ["b", "axes"], ["sb"], keepdims=0),
            helper.make_node("Add", ["sa", "sb"], ["y"]),
        ],
        "shared_dim",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "L"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "L"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [axes],
    )
    return _model(graph)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@cache
def big_model(mb: float = 200.0, layers: int = 3) -> bytes:
    """``x`` float32 [1, D] -> ``layers`` x (MatMul DxD + Relu) -> Softmax, ~``mb`` MB.

    protobuf's ``SerializeToString`` takes seconds for 200 MB, so the weights are spliced
    in by hand: the skeleton (graph without initializers) is serialized normally, then a
    second ``graph`` field holding only the initializers is appended. Protobuf merges
    repeated occurrences of a message field, so parsers see one graph with all of them.
    """
    dim = max(2, int((mb * 1e6 / (4 * layers)) ** 0.5))
    # Tiling one seeded random block keeps a 200 MB build well under a second.
    block = np.random.default_rng(2).random(1 << 18, dtype=np.float32) - np.float32(0.5)
    block *= np.float32(1.0 / dim)
    nodes = []
    for i in range(layers):
        nodes += [
            helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]),
            helper.make_node("Relu", [f"m{i}"], [f"h{i + 1}"]),
        ]
    nodes[0].input[0] = "x"
    nodes.append(helper.make_node("Softmax", [f"h{layers}"], ["y"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dim])],
    )
    pieces: list[bytes] = []  # one join at the end: no 200 MB intermediate copies
    raw_size = dim * dim * 4
    for i in range(layers):
        head = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim])
        tensor_head = head.SerializeToString() + _varint(9 << 3 | 2) + _varint(raw_size)
        init_len = len(tensor_head) + raw_size
        pieces += [_varint(5 << 3 | 2) + _varint(init_len) + tensor_head]  # initializer
        pieces.append(np.resize(np.roll(block, i), dim * dim).tobytes())
    graph_len = sum(map(len, pieces))
    # A second ``graph`` field, merged into the first by every protobuf parser.
    return b"".join([_model(graph), _varint(7 << 3 | 2), _varint(graph_len), *pieces])


@cache
def canary_model() -> bytes:
    """The tiny model plus a uint8[32] initializer holding :data:`CANARY`.

    The canary feeds the output (``y + 0 * sum(canary)``) so no optimiser may drop it
    before the session holds it.
    """
    nodes, inits = _tiny_graph("canary")
    nodes[-1].output[0] = "probs"
    nodes += [
        helper.make_node("Cast", ["canary"], ["canary_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["canary_f"], ["canary_sum"], keepdims=0),
        helper.make_node("Mul", ["canary_sum", "zero"], ["canary_zero"]),
        helper.make_node("Add", ["probs", "canary_zero"], ["y"]),
    ]
    inits += [
        numpy_helper.from_array(np.frombuffer(CANARY, dtype=np.uint8).copy(), "canary"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    x, y = _tiny_io()
    return _model(helper.make_graph(nodes, "canary", [x], [y], inits))


@cache
def failing_model() -> bytes:
    """Loads fine; every run fails in a Reshape named :data:`SECRET_NODE_NAME`.

    ``x`` float32 [N, 4] is reshaped to [3, -1], which no N of the form 4k with k not a
    multiple of 3 allows (use N = 1).
    """
    shape = numpy_helper.from_array(np.array([3, -1], dtype=np.int64), "bad_shape")
    node = helper.make_node("Reshape", ["x", "bad_shape"], ["y"], name=SECRET_NODE_NAME)
    graph = helper.make_graph(
        [node],
        "failing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, None])],
        [shape],
    )
    return _model(graph)


def _external_tensor(location: str) -> onnx.TensorProto:
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[3, 4])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


@cache
def external_data_model(
    location: str = "../outside.bin",
    where: Literal["initializer", "subgraph", "constant", "sparse", "function"] = "initializer",
) -> bytes:
    """A model whose weight ``W`` lives in an external file at ``location`` (M02).

    ``where`` puts that tensor in a top-level initializer, an initializer of an ``If``
    branch, a ``Constant`` node's ``value`` attribute, a sparse initializer's values, or a
    ``Constant`` inside a model-local function.
    """
    x, y = _tiny_io()
    softmax = helper.make_node("Softmax", ["logits"], ["y"], axis=-1)
    gemm = helper.make_node("Gemm", ["x", "W"], ["logits"], transB=1)
    tensor = _external_tensor(location)
    functions = []
    if where == "initializer":
        graph = helper.make_graph([gemm, softmax], "ext", [x], [y], [tensor])
    elif where == "constant":
        const = helper.make_node("Constant", [], ["W"], value=tensor)
        graph = helper.make_graph([const, gemm, softmax], "ext", [x], [y])
    elif where == "sparse":
        values = _external_tensor(location)
        values.name, values.dims[:] = "W_values", [12]
        indices = numpy_helper.from_array(np.arange(12, dtype=np.int64), "W_indices")
        sparse = helper.make_sparse_tensor(values, indices, [3, 4])
        graph = helper.make_graph([gemm, softmax], "ext", [x], [y], sparse_initializer=[sparse])
    elif where == "function":
        const = helper.make_node("Constant", [], ["W"], value=tensor)
        fgemm = helper.make_node("Gemm", ["fx", "W"], ["fy"], transB=1)
        functions.append(
            helper.make_function(
                "local.fn",
                "LoadW",
                ["fx"],
                ["fy"],
                [const, fgemm],
                [helper.make_opsetid("", OPSET)],
            )
        )
        call = helper.make_node("LoadW", ["x"], ["logits"], domain="local.fn")
        graph = helper.make_graph([call, softmax], "ext", [x], [y])
    else:
        branch_out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
        branch = helper.make_graph([gemm], "then", [], [branch_out], [tensor])
        other = helper.make_graph(
            [helper.make_node("Gemm", ["x", "W2"], ["logits"], transB=1)],
            "else",
            [],
            [branch_out],
            [numpy_helper.from_array(np.zeros((3, 4), dtype=np.float32), "W2")],
        )
        cond = numpy_helper.from_array(np.array(True), "cond")
        if_node = helper.make_node(
            "If", ["cond"], ["logits"], then_branch=branch, else_branch=other
        )
        graph = helper.make_graph([if_node, softmax], "ext", [x], [y], [cond])
    opsets = [helper.make_opsetid("", OPSET)]
    if functions:
        opsets.append(helper.make_opsetid("local.fn", 1))
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


@cache
def custom_domain_model(domain: str = "com.example.unregistered", op: str = "Exfiltrate") -> bytes:
    """The tiny model with an extra op ``op`` from ``domain``, which nobody registered (M03)."""
    nodes, inits = _tiny_graph("custom")
    nodes[-1].output[0] = "probs"
    nodes.append(helper.make_node(op, ["probs"], ["y"], domain=domain))
    x, y = _tiny_io()
    return _model(helper.make_graph(nodes, "custom", [x], [y], inits), domains=((domain, 1),))


@cache
def string_io_model() -> bytes:
    """A valid model whose input is ``tensor(string)``: not a dtype the wire carries."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [1])],
    )
    return _model(graph)


@cache
def truncated_model() -> bytes:
    """The CNN's serialization cut in the middle of its weights."""
    data = covidnet_like_model()
    return data[: len(data) // 2]


@cache
def random_bytes(size: int = 4096, seed: int = 3) -> bytes:
    """``size`` seeded random bytes."""
    return np.random.default_rng(seed).bytes(size)


@cache
def zip_bytes() -> bytes:
    """A zip archive holding the tiny model (what a user might upload by mistake)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.onnx", tiny_model())
    return out.getvalue()


@cache
def local_function_model() -> bytes:
    """The tiny model's Gemm wrapped in a function defined by the model (domain ``local.fn``).

    Such a node is not a custom op: its body is in the model, in standard ops.
    """
    nodes, inits = _tiny_graph("fn")
    body = helper.make_node("Gemm", ["fx", "fw", "fb"], ["fy"], transB=1)
    function = helper.make_function(
        "local.fn", "Dense", ["fx", "fw", "fb"], ["fy"], [body], [helper.make_opsetid("", OPSET)]
    )
    nodes[0] = helper.make_node("Dense", ["x", "W", "B"], ["logits"], domain="local.fn")
    x, y = _tiny_io()
    graph = helper.make_graph(nodes, "fn", [x], [y], inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("local.fn", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


@cache
def contrib_op_model() -> bytes:
    """The tiny model followed by ``com.microsoft``'s Gelu: a registered non-standard domain."""
    nodes, inits = _tiny_graph("contrib")
    nodes[-1].output[0] = "probs"
    nodes.append(helper.make_node("Gelu", ["probs"], ["y"], domain="com.microsoft"))
    x, y = _tiny_io()
    graph = helper.make_graph(nodes, "contrib", [x], [y], inits)
    return _model(graph, domains=(("com.microsoft", 1),))


@cache
def unknown_op_model() -> bytes:
    """A standard-domain op that does not exist, in a node named :data:`SECRET_NODE_NAME`:
    onnxruntime refuses it, and its error message names the node."""
    nodes, inits = _tiny_graph("unknown")
    nodes[-1].output[0] = "probs"
    nodes.append(helper.make_node("NoSuchOperator", ["probs"], ["y"], name=SECRET_NODE_NAME))
    x, y = _tiny_io()
    return _model(helper.make_graph(nodes, "unknown", [x], [y], inits))


def with_metadata(model: bytes, properties: dict[str, str]) -> bytes:
    """``model`` with these ``metadata_props`` (key -> text), the others dropped."""
    proto = onnx.load_from_string(model)
    helper.set_model_props(proto, properties)
    data: bytes = proto.SerializeToString()
    return data
