"""``drm_consumer.preprocess`` against references computed here, with numpy, on synthetic
images made with Pillow (sizes chosen so the reference is exact: no resize, or an exact 2x
reduction, or a uniform image)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from drm_consumer.preprocess import (
    ImageInput,
    InputError,
    Preset,
    TensorInput,
    choose_preset,
    covidnet,
    fit_inputs,
    imagenet,
    load_input,
)
from drm_wire.messages import ModelDescription, TensorSpec

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def random_pixels(height: int, width: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_png(path: Path, pixels: np.ndarray[Any, Any]) -> Path:
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def load_pixels(path: Path) -> np.ndarray[Any, Any]:
    loaded = load_input(path)
    assert isinstance(loaded, ImageInput)
    return loaded.pixels


def spec(name: str, dtype: str, shape: tuple[int | None, ...]) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def model(*inputs: TensorSpec) -> ModelDescription:
    return ModelDescription(
        name="m",
        sha256=hashlib.sha256(b"m").digest(),
        inputs=inputs,
        outputs=(spec("y", "float32", (None, 2)),),
    )


# --- images ----------------------------------------------------------------------------


def test_png_decodes_to_the_same_rgb_pixels(tmp_path: Path) -> None:
    pixels = random_pixels(37, 53)
    assert np.array_equal(load_pixels(save_png(tmp_path / "a.png", pixels)), pixels)


def test_greyscale_and_rgba_become_rgb(tmp_path: Path) -> None:
    grey = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    assert np.array_equal(load_pixels(tmp_path / "g.png"), np.stack([grey] * 3, axis=2))
    rgba = np.random.default_rng(2).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "c.png")
    assert np.array_equal(load_pixels(tmp_path / "c.png"), rgba[:, :, :3])


def test_sixteen_bit_grey_keeps_the_high_byte(tmp_path: Path) -> None:
    grey = np.random.default_rng(3).integers(0, 65536, (10, 12), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert np.array_equal(load_pixels(tmp_path / "g16.png"), np.stack([grey >> 8] * 3, axis=2))


def test_covidnet_crops_the_top_then_the_central_square(tmp_path: Path) -> None:
    # 521 rows: int(521 * 0.08) = 41 are dropped, leaving 480; 600 columns: 60 each side.
    pixels = random_pixels(521, 600)
    batch = covidnet(load_pixels(save_png(tmp_path / "x.png", pixels)))
    expected = pixels[41:521, 60:540].astype(np.float32) / 255
    assert batch.dtype == np.float32
    assert batch.shape == (1, 480, 480, 3)
    assert np.array_equal(batch[0], expected)


def test_covidnet_halves_with_the_linear_rule(tmp_path: Path) -> None:
    # 1043 rows: 83 dropped, 960 left; 1000 columns: a 960 square from column 20. cv2's
    # INTER_LINEAR at exactly half size is the mean of each 2x2 block.
    pixels = random_pixels(1043, 1000, seed=4)
    batch = covidnet(load_pixels(save_png(tmp_path / "x.png", pixels)))
    square = pixels[83:1043, 20:980].astype(np.float64)
    expected = square.reshape(480, 2, 480, 2, 3).mean(axis=(1, 3)) / 255
    assert batch.shape == (1, 480, 480, 3)
    assert np.abs(batch[0] - expected).max() <= 0.5 / 255 + 1e-6
    # The result is 8-bit, as cv2.resize's is for an 8-bit image.
    assert np.allclose(batch * 255, np.rint(batch * 255), atol=1e-3)


def test_covidnet_of_a_tall_image_crops_vertically(tmp_path: Path) -> None:
    # 700 rows: 56 dropped, 644 left; 480 columns: the square starts at row (644-480)//2.
    pixels = random_pixels(700, 480, seed=5)
    batch = covidnet(load_pixels(save_png(tmp_path / "x.png", pixels)))
    assert np.array_equal(batch[0], pixels[56 + 82 : 56 + 82 + 480].astype(np.float32) / 255)


def test_imagenet_center_crop_and_normalisation(tmp_path: Path) -> None:
    # Shorter side already 256: no resize. Crop rows 16..240, columns 38..262.
    pixels = random_pixels(256, 300, seed=6)
    batch = imagenet(load_pixels(save_png(tmp_path / "x.png", pixels)))
    crop = pixels[16:240, 38:262].astype(np.float32) / 255
    expected = ((crop - MEAN) / STD).transpose(2, 0, 1)
    assert batch.dtype == np.float32
    assert batch.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(batch[0], expected, rtol=0, atol=1e-6)


def test_imagenet_portrait_crop(tmp_path: Path) -> None:
    pixels = random_pixels(400, 256, seed=7)
    batch = imagenet(pixels)
    crop = pixels[88:312, 16:240].astype(np.float32) / 255
    np.testing.assert_allclose(batch[0], ((crop - MEAN) / STD).transpose(2, 0, 1), atol=1e-6)


def test_imagenet_resizes_the_shorter_side_to_256(tmp_path: Path) -> None:
    colour = np.array([200, 100, 30], dtype=np.uint8)
    pixels = np.broadcast_to(colour, (600, 1000, 3)).copy()
    batch = imagenet(load_pixels(save_png(tmp_path / "x.png", pixels)))
    assert batch.shape == (1, 3, 224, 224)
    expected = (colour.astype(np.float32) / 255 - MEAN) / STD
    np.testing.assert_allclose(batch[0], np.broadcast_to(expected[:, None, None], (3, 224, 224)))


def test_not_an_image_nor_a_tensor_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="not a JPEG or PNG"):
        load_input(tmp_path / "x.txt")
    Image.fromarray(random_pixels(4, 4)).save(tmp_path / "x.gif", format="GIF")
    with pytest.raises(InputError, match="not a JPEG or PNG"):
        load_input(tmp_path / "x.gif")
    with pytest.raises(InputError, match="cannot read"):
        load_input(tmp_path / "missing.png")


def test_too_many_pixels_are_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("drm_consumer.preprocess.MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InputError, match="limit"):
        load_input(save_png(tmp_path / "x.png", random_pixels(11, 10)))


# --- tensor files ----------------------------------------------------------------------


def test_npy_and_npz_round_trip(tmp_path: Path) -> None:
    a = np.arange(12, dtype=">f4").reshape(3, 4)
    np.save(tmp_path / "a.npy", a)
    loaded = load_input(tmp_path / "a.npy")
    assert isinstance(loaded, TensorInput)
    assert list(loaded.arrays) == [None]
    assert np.array_equal(loaded.arrays[None], a)
    np.savez_compressed(tmp_path / "b.npz", x=a, y=np.ones(2, dtype=np.int64))
    loaded = load_input(tmp_path / "b.npz")
    assert isinstance(loaded, TensorInput)
    assert sorted(loaded.arrays, key=str) == ["x", "y"]
    assert np.array_equal(loaded.arrays["x"], a)


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="dtype object"):
        load_input(tmp_path / "o.npy")
    np.savez(tmp_path / "o.npz", x=np.array(["s"], dtype=object))
    with pytest.raises(InputError, match="dtype object"):
        load_input(tmp_path / "o.npz")


def test_a_header_that_claims_more_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lie.npy"
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}
        )
        handle.write(b"\0" * 16)
    with pytest.raises(InputError, match="header says"):
        load_input(path)


def test_too_large_files_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("drm_consumer.preprocess.MAX_INPUT_BYTES", 1000)
    np.save(tmp_path / "big.npy", np.zeros(1000, dtype=np.float32))
    with pytest.raises(InputError, match="limit"):
        load_input(tmp_path / "big.npy")
    np.savez_compressed(tmp_path / "big.npz", x=np.zeros(1000, dtype=np.float32))
    with pytest.raises(InputError, match="limit"):
        load_input(tmp_path / "big.npz")


# --- auto and fitting ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "shape", "output", "preset"),
    [
        ("float32", (None, 480, 480, 3), (None, 2), Preset.COVIDNET),
        ("float32", (1, 480, 480, 3), (1, 2), Preset.COVIDNET),
        # Nothing else is guessed from a shape: an ImageNet-like input, an object
        # detector's dynamic image, a COVID-Net-sized input with another head.
        ("float32", (None, 3, 224, 224), (None, 2), None),
        ("float32", (None, 3, None, None), (None, 2), None),
        ("float32", (None, None, None, 3), (None, 2), None),
        ("float32", (None, 480, 480, 3), (None, 3), None),
        ("float32", (None, 480, 480, 3), (None, 100, 4), None),
        ("float32", (2, 480, 480, 3), (2, 2), None),
        ("float16", (None, 480, 480, 3), (None, 2), None),
        ("float32", (None, 224, 224, 3), (None, 2), None),
        ("float32", (None, 4), (None, 2), None),
    ],
)
def test_auto_recognises_only_the_covidnet_shape(
    dtype: str,
    shape: tuple[int | None, ...],
    output: tuple[int | None, ...],
    preset: Preset | None,
) -> None:
    described = replace(model(spec("x", dtype, shape)), outputs=(spec("y", "float32", output),))
    assert choose_preset(described) is preset


def test_auto_does_not_guess_for_two_inputs_or_two_outputs() -> None:
    image = spec("x", "float32", (None, 480, 480, 3))
    assert choose_preset(model(image, spec("z", "float32", (None, 1)))) is None
    two_outputs = replace(
        model(image), outputs=(spec("y", "float32", (None, 2)), spec("w", "float32", (None, 2)))
    )
    assert choose_preset(two_outputs) is None


def test_fit_names_the_only_input() -> None:
    a = np.zeros((2, 4), dtype=np.float32)
    fitted = fit_inputs(model(spec("x", "float32", (None, 4))), {None: a})
    assert list(fitted) == ["x"]
    assert fitted["x"] is a


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((2, 4), dtype=np.float64), "dtype differs"),
        (np.zeros(4, dtype=np.float32), "rank differs"),
        (np.zeros((2, 5), dtype=np.float32), "shape differs"),
    ],
)
def test_fit_refuses_a_tensor_that_does_not_fit(array: np.ndarray[Any, Any], problem: str) -> None:
    with pytest.raises(InputError, match=problem):
        fit_inputs(model(spec("x", "float32", (None, 4))), {None: array})


def test_fit_checks_input_names() -> None:
    two = model(spec("a", "float32", (None, 4)), spec("b", "int64", (None,)))
    with pytest.raises(InputError, match="by name"):
        fit_inputs(two, {None: np.zeros((1, 4), dtype=np.float32)})
    with pytest.raises(InputError, match="unknown: c; missing: b"):
        fit_inputs(two, {"a": np.zeros((1, 4), dtype=np.float32), "c": np.zeros(1)})
    fitted = fit_inputs(
        two, {"b": np.zeros(1, dtype=np.int64), "a": np.zeros((1, 4), dtype=np.float32)}
    )
    assert list(fitted) == ["a", "b"]
