"""Input files to the tensors a model takes: images (with a preset), ``.npy`` and ``.npz``.

Everything here runs on the consumer's machine before anything is sent, and every size is
bounded before the bytes it describes are read:

* :func:`load_input` reads a JPEG or PNG image (Pillow, those two decoders only, at most
  :data:`MAX_IMAGE_PIXELS`), or a ``.npy`` / ``.npz`` tensor file (``allow_pickle=False``;
  every array header is checked against the file's size and :data:`MAX_INPUT_BYTES`
  before numpy allocates anything). The kind is told by the file's first bytes, not its
  name.
* :func:`covidnet` and :func:`imagenet` are the two image presets; :func:`choose_preset`
  is ``auto``: it names the preset of a model it recognises exactly (COVID-Net's shape),
  and nothing else.
* :func:`fit_inputs` checks tensors against the model's inputs (names, dtype, rank, fixed
  dimensions) and raises :class:`InputError` for anything that does not fit.

Presets:

``covidnet``
    The COVID-Net CXR-2 demo's ``process_image_file``: drop the top 8 % of the rows
    (``int(h * 0.08)``), take the central square, resize to 480x480 with OpenCV's
    ``INTER_LINEAR`` rule (half-pixel centres, edge clamping, no antialiasing; the result
    rounded to 8 bits as ``cv2.resize`` does for 8-bit images), then RGB float32 / 255,
    NHWC, batch of one. (The original read the file with ``cv2.imread``, whose channel
    order is BGR; this preset sends RGB.)
``imagenet``
    torchvision's ``Resize(256)`` (shorter side to 256, Pillow bilinear), ``CenterCrop(224)``,
    ``ToTensor()`` and ``Normalize`` with the ImageNet mean and standard deviation: NCHW
    float32, batch of one.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import numpy.lib.format as npy_format

from drm_wire.limits import MAX_PAYLOAD_BYTES, MAX_TENSOR_RANK, MAX_TENSORS
from drm_wire.messages import ModelDescription
from drm_wire.tensors import DTYPES

__all__ = [
    "COVIDNET_SIZE",
    "IMAGENET_CROP",
    "IMAGENET_MEAN",
    "IMAGENET_RESIZE",
    "IMAGENET_STD",
    "MAX_IMAGE_PIXELS",
    "MAX_INPUT_BYTES",
    "ImageInput",
    "InputError",
    "Preset",
    "TensorInput",
    "choose_preset",
    "covidnet",
    "describe_shape",
    "fit_inputs",
    "imagenet",
    "load_input",
]

#: Largest input file, and largest array in one: what one request can carry anyway.
MAX_INPUT_BYTES: Final = MAX_PAYLOAD_BYTES
#: Largest image decoded (width x height): 40 Mpx, far above any radiograph or photo.
MAX_IMAGE_PIXELS: Final = 40_000_000

COVIDNET_SIZE: Final = 480
COVIDNET_TOP_PERCENT: Final = 0.08
IMAGENET_RESIZE: Final = 256
IMAGENET_CROP: Final = 224
IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)

_NPY_MAGIC: Final = b"\x93NUMPY"
_ZIP_MAGIC: Final = b"PK\x03\x04"
_IMAGE_FORMATS: Final = ("JPEG", "PNG")


class InputError(Exception):
    """The input file cannot be read, or does not fit the model. Nothing was sent."""


class Preset(StrEnum):
    """What ``--preprocess`` accepts."""

    AUTO = "auto"
    COVIDNET = "covidnet"
    IMAGENET = "imagenet"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class ImageInput:
    """A decoded image: ``pixels`` is uint8 RGB, shape (height, width, 3)."""

    pixels: np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class TensorInput:
    """Arrays from a tensor file: ``{None: a}`` for ``.npy``, name -> array for ``.npz``."""

    arrays: dict[str | None, np.ndarray[Any, Any]]


# --- loading ---------------------------------------------------------------------------


def load_input(path: Path) -> ImageInput | TensorInput:
    """Read an image, ``.npy`` or ``.npz`` file, telling which by its first bytes.

    Raises:
        InputError: unreadable, too large, not one of those formats, or malformed.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            magic = handle.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size > MAX_INPUT_BYTES:
        raise InputError(f"{path} is {size} bytes; the limit is {MAX_INPUT_BYTES}")
    try:
        if magic.startswith(_NPY_MAGIC):
            return TensorInput({None: _load_npy(path, size)})
        if magic.startswith(_ZIP_MAGIC):
            return TensorInput(_load_npz(path))
        return ImageInput(_load_image(path))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _check_npy_header(stream: IO[bytes], available: int, what: str) -> None:
    """Read an array header from ``stream`` and refuse what we would not load."""
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise InputError(f"{what}: .npy format version {version} is not supported")
    except ValueError as exc:
        raise InputError(f"{what}: not a valid .npy array ({exc})") from exc
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise InputError(f"{what}: dtype {dtype} cannot be sent (only plain numeric arrays)")
    if dtype.newbyteorder("<") not in DTYPES.values():
        raise InputError(f"{what}: dtype {dtype} cannot be sent (allowed: {', '.join(DTYPES)})")
    if len(shape) > MAX_TENSOR_RANK:
        raise InputError(f"{what}: rank {len(shape)} is above the limit of {MAX_TENSOR_RANK}")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > min(available, MAX_INPUT_BYTES):
        raise InputError(
            f"{what}: the header says {describe_shape(shape)} {dtype} ({nbytes} bytes) but "
            f"the data is {available} bytes (limit {MAX_INPUT_BYTES})"
        )


def _load_npy(path: Path, size: int) -> np.ndarray[Any, Any]:
    with path.open("rb") as handle:
        _check_npy_header(handle, size, str(path))
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InputError(f"{path}: not a valid .npy array ({exc})") from exc
    assert isinstance(array, np.ndarray)
    return array


def _load_npz(path: Path) -> dict[str | None, np.ndarray[Any, Any]]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_TENSORS:
                raise InputError(f"{path}: {len(members)} arrays; the limit is {MAX_TENSORS}")
            total = sum(m.file_size for m in members)
            if total > MAX_INPUT_BYTES:
                raise InputError(f"{path}: {total} bytes uncompressed; limit {MAX_INPUT_BYTES}")
            for member in members:
                if not member.filename.endswith(".npy"):
                    raise InputError(f"{path}: {member.filename!r} is not a .npy array")
                with archive.open(member) as stream:
                    what = f"{path}[{member.filename[:-4]}]"
                    _check_npy_header(stream, member.file_size, what)
        with np.load(path, allow_pickle=False) as npz:
            return {name: np.asarray(npz[name]) for name in npz.files}
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a valid .npz file ({exc})") from exc


def _load_image(path: Path) -> np.ndarray[Any, Any]:
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - Pillow is a dependency
        raise InputError("reading images needs Pillow (pip install pillow)") from exc
    try:
        with Image.open(path, formats=_IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"{path}: {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS}"
                )
            image.load()
            # cv2.imread and torchvision's loaders both honour the EXIF orientation.
            upright = ImageOps.exif_transpose(image)
            if upright.mode.startswith("I;16"):  # 16-bit grey: to 8 bits, as cv2 does
                grey = (np.asarray(upright, dtype=np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(upright.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError as exc:
        raise InputError(
            f"{path}: not a JPEG or PNG image, nor a .npy or .npz tensor file"
        ) from exc
    except (Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot decode the image ({exc})") from exc


# --- presets ---------------------------------------------------------------------------


def _linear_axis(
    in_size: int, out_size: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """OpenCV's INTER_LINEAR sampling along one axis: low index, high index, weight."""
    source = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    source = np.clip(source, 0.0, in_size - 1)
    low = np.floor(source).astype(np.intp)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (source - low).astype(np.float32)


def _resize_linear(pixels: np.ndarray[Any, Any], height: int, width: int) -> np.ndarray[Any, Any]:
    """``cv2.resize(pixels, (width, height))`` for uint8 HWC pixels (to within rounding)."""
    low, high, weight = _linear_axis(pixels.shape[0], height)
    rows = pixels[low].astype(np.float32) * (1 - weight)[:, None, None]
    rows += pixels[high].astype(np.float32) * weight[:, None, None]
    low, high, weight = _linear_axis(pixels.shape[1], width)
    out = rows[:, low] * (1 - weight)[None, :, None] + rows[:, high] * weight[None, :, None]
    result: np.ndarray[Any, Any] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return result


def covidnet(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The COVID-Net CXR-2 preprocessing (see the module docs): float32 [1, 480, 480, 3]."""
    cropped = pixels[int(pixels.shape[0] * COVIDNET_TOP_PERCENT) :]
    height, width = cropped.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = cropped[top : top + side, left : left + side]
    resized = _resize_linear(square, COVIDNET_SIZE, COVIDNET_SIZE)
    batch: np.ndarray[Any, Any] = (resized.astype(np.float32) / np.float32(255.0))[None]
    return batch


def imagenet(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """torchvision's ImageNet evaluation transform (see the module docs): [1, 3, 224, 224]."""
    from PIL import Image

    height, width = pixels.shape[:2]
    image = Image.fromarray(pixels, mode="RGB") if pixels.shape[2:] == (3,) else None
    if image is None:
        raise InputError("the imagenet preset needs an RGB image")
    short, long = min(height, width), max(height, width)
    if short != IMAGENET_RESIZE:
        new_long = int(IMAGENET_RESIZE * long / short)
        size = (IMAGENET_RESIZE, new_long) if width <= height else (new_long, IMAGENET_RESIZE)
        image = image.resize(size, Image.Resampling.BILINEAR)
    resized = np.asarray(image, dtype=np.uint8)
    top = round((resized.shape[0] - IMAGENET_CROP) / 2.0)
    left = round((resized.shape[1] - IMAGENET_CROP) / 2.0)
    crop = resized[top : top + IMAGENET_CROP, left : left + IMAGENET_CROP]
    scaled = crop.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    normalised: np.ndarray[Any, Any] = ((scaled - mean) / std).astype(np.float32)
    batch: np.ndarray[Any, Any] = np.ascontiguousarray(normalised.transpose(2, 0, 1))[None]
    return batch


def _fits(shape: tuple[int | None, ...], wanted: tuple[int, ...]) -> bool:
    return len(shape) == len(wanted) and all(
        d is None or d == w for d, w in zip(shape, wanted, strict=True)
    )


def choose_preset(model: ModelDescription) -> Preset | None:
    """``auto``: the preset of a model recognised exactly, or ``None``.

    Only one model is recognised: COVID-Net's shape, as the demo lends it: one float32
    input ``[1 or ?, 480, 480, 3]`` (NHWC) and one float32 output ``[1 or ?, 2]``. A shape
    alone says nothing of how a model was trained (an object detector also takes
    ``[?, 3, ?, ?]``), so anything else gets no guess: the caller names the preprocessing.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return None
    (spec,), (output,) = model.inputs, model.outputs
    if (
        spec.dtype == "float32"
        and spec.shape[0] in (1, None)
        and spec.shape[1:] == (COVIDNET_SIZE, COVIDNET_SIZE, 3)
        and output.dtype == "float32"
        and output.shape[0] in (1, None)
        and output.shape[1:] == (2,)
    ):
        return Preset.COVIDNET
    return None


# --- fitting ---------------------------------------------------------------------------


def describe_shape(shape: tuple[int | None, ...] | tuple[int, ...]) -> str:
    """``[?, 480, 480, 3]``: a shape as the messages show it (``?`` is dynamic)."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _wire_dtype(array: np.ndarray[Any, Any]) -> str | None:
    little = array.dtype.newbyteorder("<")
    return next((name for name, dtype in DTYPES.items() if dtype == little), None)


def fit_inputs(
    model: ModelDescription, arrays: Mapping[str | None, np.ndarray[Any, Any]]
) -> dict[str, np.ndarray[Any, Any]]:
    """Match arrays to the model's inputs; ``None`` names the only input.

    Returns:
        input name -> array, in the model's input order.

    Raises:
        InputError: a missing or unknown input name, or a dtype, rank or fixed dimension
            that differs from the model's.
    """
    specs = {spec.name: spec for spec in model.inputs}
    named: dict[str, np.ndarray[Any, Any]] = {}
    for name, array in arrays.items():
        if name is None:
            if len(specs) != 1:
                raise InputError(
                    f"model {model.name!r} takes {len(specs)} inputs "
                    f"({', '.join(specs)}): give them by name in a .npz file"
                )
            name = model.inputs[0].name
        named[name] = array
    unknown = sorted(set(named) - set(specs))
    missing = [name for name in specs if name not in named]
    if unknown or missing:
        raise InputError(
            f"model {model.name!r} takes inputs {', '.join(specs)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    for name, spec in specs.items():
        array = named[name]
        dtype = _wire_dtype(array)
        wanted = f"{spec.dtype} {describe_shape(spec.shape)}"
        got = f"{dtype or array.dtype} {describe_shape(array.shape)}"
        problem = None
        if dtype != spec.dtype:
            problem = "dtype"
        elif array.ndim != len(spec.shape):
            problem = "rank"
        elif not _fits(spec.shape, array.shape):
            problem = "shape"
        if problem is not None:
            raise InputError(
                f"input {name!r} of model {model.name!r} takes {wanted}, "
                f"but the input is {got} ({problem} differs)"
            )
    return {name: named[name] for name in specs}
