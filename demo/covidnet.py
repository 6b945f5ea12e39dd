"""A COVID-Net-shaped ONNX model and a synthetic chest X-ray, for the demo and the README.

``python demo/covidnet.py --out-dir DIR`` writes ``DIR/covidnet.onnx`` and
``DIR/chest-xray.png``.

The model has the interface of COVID-Net CXR-2 (the model the original confidential-AI
demo lent): one input ``image``, float32 ``[1, 480, 480, 3]`` (NHWC, RGB scaled to
[0, 1]), and one output ``probs``, float32 ``[1, 2]``, a softmax over (negative,
positive). Inside it is a small CNN (Transpose to NCHW, five Conv 3x3 + Relu + MaxPool
blocks, two dense layers) whose weights are drawn from a seeded generator, so every run
builds the same bytes. **It is untrained**: its "probability of COVID positivity" means
nothing. It exists so the demo exercises what a real model would (a large upload to the
enclave, a 480x480 image through the consumer's ``covidnet`` preprocessing, a two-class
answer) without a download. Its weights default to :data:`DEFAULT_WEIGHTS_MB` MB, far
fewer than the real model's, which keeps the demo fast; ``--weights-mb`` changes that
without changing the interface.

The image is a grey, portrait chest radiograph drawn from ellipses and arcs (body, lungs,
spine, heart, ribs) with seeded noise: not a medical image, just something the
preprocessing crops and resizes as it would a real one.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageFilter

__all__ = [
    "DEFAULT_WEIGHTS_MB",
    "IMAGE_FILE",
    "INPUT_SHAPE",
    "MODEL_FILE",
    "build_model",
    "draw_chest_xray",
    "main",
]

#: COVID-Net CXR-2's input: one 480x480 RGB image, channels last.
INPUT_SHAPE: Final = (1, 480, 480, 3)
#: Enough weights to make the upload a real transfer, few enough to keep the demo quick.
DEFAULT_WEIGHTS_MB: Final = 8.0
MODEL_FILE: Final = "covidnet.onnx"
IMAGE_FILE: Final = "chest-xray.png"

_OPSET: Final = 17
_CHANNELS: Final = (3, 16, 32, 64, 128, 128)
_SEED: Final = 2020
#: The synthetic radiograph's size (width, height): portrait, like most chest films.
_IMAGE_SIZE: Final = (560, 640)


def _conv_block(
    index: int, cin: int, cout: int, rng: np.random.Generator
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    weight = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
    inits = [
        numpy_helper.from_array(weight.astype(np.float32), f"conv{index}_w"),
        numpy_helper.from_array(np.zeros(cout, dtype=np.float32), f"conv{index}_b"),
    ]
    source, out = f"t{index}", f"t{index + 1}"
    nodes = [
        helper.make_node(
            "Conv",
            [source, f"conv{index}_w", f"conv{index}_b"],
            [f"c{index}"],
            pads=[1, 1, 1, 1],
            name=f"conv{index}",
        ),
        helper.make_node("Relu", [f"c{index}"], [f"r{index}"], name=f"relu{index}"),
        helper.make_node(
            "MaxPool",
            [f"r{index}"],
            [out],
            kernel_shape=[2, 2],
            strides=[2, 2],
            name=f"pool{index}",
        ),
    ]
    return nodes, inits


def build_model(weights_mb: float = DEFAULT_WEIGHTS_MB) -> bytes:
    """The serialized model: same bytes for the same ``weights_mb`` (about that many MB)."""
    rng = np.random.default_rng(_SEED)
    nodes = [helper.make_node("Transpose", ["image"], ["t0"], perm=[0, 3, 1, 2], name="nchw")]
    inits: list[onnx.TensorProto] = []
    for index, (cin, cout) in enumerate(itertools.pairwise(_CHANNELS)):
        block_nodes, block_inits = _conv_block(index, cin, cout, rng)
        nodes += block_nodes
        inits += block_inits
    side = INPUT_SHAPE[1] >> (len(_CHANNELS) - 1)
    flat = _CHANNELS[-1] * side * side
    conv_bytes = sum(numpy_helper.to_array(t).nbytes for t in inits)
    hidden = max(2, int((weights_mb * 1e6 - conv_bytes) / (4 * (flat + 3))))
    dense1 = rng.standard_normal((flat, hidden)) * np.sqrt(2.0 / flat)
    dense2 = rng.standard_normal((hidden, 2)) * np.sqrt(1.0 / hidden)
    inits += [
        numpy_helper.from_array(np.array([1, flat], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(dense1.astype(np.float32), "dense1_w"),
        numpy_helper.from_array(np.zeros(hidden, dtype=np.float32), "dense1_b"),
        numpy_helper.from_array(dense2.astype(np.float32), "dense2_w"),
        numpy_helper.from_array(np.zeros(2, dtype=np.float32), "dense2_b"),
    ]
    last = f"t{len(_CHANNELS) - 1}"
    nodes += [
        helper.make_node("Reshape", [last, "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "dense1_w", "dense1_b"], ["h"], name="dense1"),
        helper.make_node("Relu", ["h"], ["hr"], name="dense1_relu"),
        helper.make_node("Gemm", ["hr", "dense2_w", "dense2_b"], ["logits"], name="dense2"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "covidnet_shaped_untrained",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(INPUT_SHAPE))],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 2])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET)],
        producer_name="drm-demo",
        doc_string="COVID-Net CXR-2's interface with untrained, seeded weights: not a diagnosis.",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def _ellipse(
    x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], cx: float, cy: float, rx: float, ry: float
) -> np.ndarray[Any, Any]:
    """1 inside the ellipse, 0 outside (the blur softens the edge later)."""
    return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0).astype(np.float64)


def draw_chest_xray() -> bytes:
    """A deterministic grey PNG that looks roughly like a frontal chest radiograph."""
    width, height = _IMAGE_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    x, y = x / width, y / height
    body = _ellipse(x, y, 0.5, 0.62, 0.46, 0.55)
    lungs = _ellipse(x, y, 0.32, 0.52, 0.14, 0.30) + _ellipse(x, y, 0.68, 0.52, 0.14, 0.30)
    ribs = (np.cos(2 * np.pi * (9 * y + 3 * (x - 0.5) ** 2)) > 0.55) * lungs
    spine = np.exp(-(((x - 0.5) / 0.035) ** 2)) * body
    heart = _ellipse(x, y, 0.56, 0.68, 0.12, 0.13)
    tone = 0.06 + 0.5 * body - 0.32 * lungs + 0.14 * ribs + 0.3 * spine + 0.18 * heart
    tone += np.random.default_rng(_SEED).normal(0.0, 0.02, tone.shape)
    pixels = (np.clip(tone, 0.0, 1.0) * 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L").filter(ImageFilter.GaussianBlur(2))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Write the model and the image into ``--out-dir``; print what was written."""
    parser = argparse.ArgumentParser(
        prog="python demo/covidnet.py",
        description="Write an UNTRAINED COVID-Net-shaped model and a synthetic chest X-ray.",
    )
    parser.add_argument("--out-dir", type=Path, default=Path(), metavar="DIR",
                        help="where to write them (default: the current directory)")  # fmt: skip
    parser.add_argument("--weights-mb", type=float, default=DEFAULT_WEIGHTS_MB, metavar="MB",
                        help=f"model weights (default {DEFAULT_WEIGHTS_MB:g} MB)")  # fmt: skip
    args = parser.parse_args(argv)
    if not 0.5 <= args.weights_mb <= 512:
        parser.error("--weights-mb must be between 0.5 and 512")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path, image_path = args.out_dir / MODEL_FILE, args.out_dir / IMAGE_FILE
    model = build_model(args.weights_mb)
    model_path.write_bytes(model)
    image_path.write_bytes(draw_chest_xray())
    shape = "x".join(map(str, INPUT_SHAPE))
    print(
        f"wrote {model_path}: {len(model) / 1e6:.1f} MB, input image float32 {shape}, "
        "output probs float32 1x2 (softmax); UNTRAINED, its predictions mean nothing"
    )
    print(f"wrote {image_path}: a synthetic chest X-ray, {_IMAGE_SIZE[0]}x{_IMAGE_SIZE[1]} grey")
    return 0


if __name__ == "__main__":
    sys.exit(main())
