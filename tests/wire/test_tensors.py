"""Tensors: the dtype allow-list, shape and length checks, and zero-copy decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from drm_wire import messages as m
from drm_wire.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from drm_wire.limits import MAX_TENSOR_ELEMENTS, MAX_TENSOR_RANK, MAX_TENSORS
from drm_wire.tensors import DTYPES, Tensor, tensors_from_wire

from .helpers import decode_all, encode

ALLOWED = [np.dtype(d) for d in DTYPES.values()]


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from(ALLOWED + [d.newbyteorder(">") for d in ALLOWED if d.itemsize > 1]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    )
)
def test_numpy_round_trip_any_allowed_dtype_and_byte_order(array: np.ndarray) -> None:
    tensor = Tensor.from_numpy("x", array)
    request = m.InferenceRequest(request_id=1, model="m", inputs=(tensor,))
    (decoded,) = decode_all(encode(request))
    assert isinstance(decoded, m.InferenceRequest)
    out = decoded.inputs[0].to_numpy()
    assert out.dtype == array.dtype.newbyteorder("<")
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_non_contiguous_arrays_are_made_contiguous() -> None:
    array = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    np.testing.assert_array_equal(Tensor.from_numpy("x", array).to_numpy(), array)


@pytest.mark.parametrize(
    "dtype", [object, "U3", "S3", "complex64", "datetime64[s]", [("a", "i4")]], ids=str
)
def test_dtypes_outside_the_allow_list_are_refused(dtype: object) -> None:
    with pytest.raises(LocalProtocolError, match="dtype not allowed"):
        Tensor.from_numpy("x", np.zeros(2, dtype=dtype))


def test_decoding_does_not_copy_the_payload() -> None:
    payload = memoryview(bytearray(np.arange(6, dtype=np.float32).tobytes()))
    entries = [{"name": "x", "dtype": "float32", "shape": [2, 3]}]
    (tensor,) = tensors_from_wire(entries, payload, "inputs")
    array = tensor.to_numpy()
    assert np.shares_memory(array, np.frombuffer(payload, dtype=np.uint8))
    assert array.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_several_tensors_share_one_payload_in_order() -> None:
    a = np.arange(3, dtype=np.int64)
    b = np.ones((2, 2), dtype=np.float16)
    request = m.InferenceRequest(
        request_id=9, model="m", inputs=(Tensor.from_numpy("a", a), Tensor.from_numpy("b", b))
    )
    (decoded,) = decode_all(encode(request))
    assert isinstance(decoded, m.InferenceRequest)
    np.testing.assert_array_equal(decoded.inputs[0].to_numpy(), a)
    np.testing.assert_array_equal(decoded.inputs[1].to_numpy(), b)


@pytest.mark.parametrize(
    ("entries", "payload_len", "match"),
    [
        ([{"name": "x", "dtype": "float32", "shape": [2]}], 7, "shorter"),
        ([{"name": "x", "dtype": "float32", "shape": [2]}], 9, "longer"),
        ([{"name": "x", "dtype": "float32", "shape": [2]}], 0, "shorter"),
        ([{"name": "x", "dtype": "object", "shape": [2]}], 16, "dtype not allowed"),
        ([{"name": "x", "dtype": "float32", "shape": [-1]}], 4, "non-negative"),
        ([{"name": "x", "dtype": "float32", "shape": [True]}], 4, "non-negative"),
        ([{"name": "x", "dtype": "float32", "shape": 4}], 16, "list of ints"),
        ([{"name": "x", "dtype": "float32", "shape": [1] * 9}], 4, "rank too large"),
        ([{"name": "x", "dtype": "float32", "shape": [2**40, 2**40]}], 4, "too many elements"),
        ([{"name": "x", "dtype": "float32"}], 4, "exactly name, dtype and shape"),
        ([{"name": "x", "dtype": "float32", "shape": [1], "extra": 1}], 4, "exactly"),
        ([{"name": "", "dtype": "float32", "shape": [1]}], 4, "names"),
        ("x", 4, "must be a list"),
    ],
)
def test_hostile_tensor_headers(entries: object, payload_len: int, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        tensors_from_wire(entries, memoryview(bytes(payload_len)), "inputs")


def test_hostile_tensor_header_from_the_wire_is_a_remote_error() -> None:
    from drm_wire.framing import Frame

    header = {
        "type": "infer",
        "request_id": 1,
        "model": "m",
        "wait": None,
        "inputs": [{"name": "x", "dtype": "float32", "shape": [3]}],
    }
    with pytest.raises(RemoteProtocolError, match="longer") as info:
        m.from_frame(Frame(header, memoryview(bytes(16))))
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_rank_at_the_limit_and_past_it() -> None:
    Tensor.from_numpy("x", np.zeros((1,) * MAX_TENSOR_RANK, dtype=np.uint8))
    with pytest.raises(LocalProtocolError, match="rank too large") as info:
        Tensor.from_numpy("x", np.zeros((1,) * (MAX_TENSOR_RANK + 1), dtype=np.uint8))
    assert info.value.limit == MAX_TENSOR_RANK


def test_tensor_count_at_the_limit_and_past_it() -> None:
    one = Tensor.from_numpy("x", np.zeros(1, dtype=np.uint8))
    m.InferenceRequest(request_id=1, model="m", inputs=(one,) * MAX_TENSORS)
    with pytest.raises(LocalProtocolError):
        m.InferenceRequest(request_id=1, model="m", inputs=(one,) * (MAX_TENSORS + 1))
    entries = [one.describe()] * (MAX_TENSORS + 1)
    with pytest.raises(LocalProtocolError, match="too many tensors"):
        tensors_from_wire(entries, memoryview(bytes(MAX_TENSORS + 1)), "inputs")


# Found by fuzzing (tests/fuzz): with a zero dimension the product is 0 whatever the
# others are, so each dimension needs its own bound, or numpy cannot even reshape.
@pytest.mark.parametrize(
    "shape",
    [[0, 2**63], [0, 2**64 - 1], [2**40, 0, 2**40], [0, MAX_TENSOR_ELEMENTS + 1]],
    ids=str,
)
def test_a_zero_dimension_does_not_unbound_the_others(shape: list[int]) -> None:
    entries = [{"name": "x", "dtype": "float32", "shape": shape}]
    with pytest.raises(LocalProtocolError, match="too many elements") as info:
        tensors_from_wire(entries, memoryview(b""), "inputs")
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    assert info.value.limit == MAX_TENSOR_ELEMENTS
    with pytest.raises(LocalProtocolError, match="too many elements"):
        Tensor(name="x", dtype="float32", shape=tuple(shape), data=memoryview(b""))


def test_an_empty_tensor_at_the_dimension_limit_reaches_numpy() -> None:
    entries = [{"name": "x", "dtype": "float32", "shape": [0, MAX_TENSOR_ELEMENTS]}]
    (tensor,) = tensors_from_wire(entries, memoryview(b""), "inputs")
    assert tensor.to_numpy().shape == (0, MAX_TENSOR_ELEMENTS)


def test_tensor_data_must_match_shape() -> None:
    with pytest.raises(LocalProtocolError, match="byte length") as info:
        Tensor(name="x", dtype="float32", shape=(2,), data=memoryview(b"\0" * 7))
    assert (info.value.limit, info.value.got) == (8, 7)
