"""Tensors on the wire: ``(name, dtype, shape)`` in the header, raw little-endian bytes after it.

A request or result carries its tensors' descriptions in the header and their bytes,
concatenated in the same order, as the frame's raw payload (see :mod:`drm_wire.framing`).
Decoding slices that payload with ``memoryview`` and wraps it with ``numpy.frombuffer``:
no copy between the receive buffer and the array handed to onnxruntime.

Only dtypes from :data:`DTYPES` cross the wire: numeric types with a fixed size. Object,
string and structured dtypes never do (they would let a peer smuggle Python objects or
variable-length data past the byte-length check).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from .errors import ErrorCode, LocalProtocolError
from .limits import MAX_STR_LEN, MAX_TENSOR_ELEMENTS, MAX_TENSOR_RANK, MAX_TENSORS

__all__ = ["DTYPES", "Tensor", "tensors_from_wire", "tensors_to_wire"]

#: The allow-list: wire name -> little-endian numpy dtype. Names follow numpy (and ONNX's
#: ``tensor(float)`` maps to ``float32`` and so on).
DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    name: np.dtype(code)
    for name, code in {
        "bool": "?",
        "int8": "i1",
        "uint8": "u1",
        "int16": "<i2",
        "uint16": "<u2",
        "int32": "<i4",
        "uint32": "<u4",
        "int64": "<i8",
        "uint64": "<u8",
        "float16": "<f2",
        "float32": "<f4",
        "float64": "<f8",
    }.items()
}


#: The reverse of :data:`DTYPES`, for :meth:`Tensor.from_numpy` (a search of the list cost
#: more than the rest of the wrapping).
_NAMES: Final[Mapping[np.dtype[Any], str]] = {dtype: name for name, dtype in DTYPES.items()}


def _fail(message: str, **fields: Any) -> LocalProtocolError:
    return LocalProtocolError(message, code=fields.pop("code", ErrorCode.BAD_REQUEST), **fields)


def check_shape(shape: object, field: str = "shape") -> tuple[int, ...]:
    """Validate a concrete tensor shape and return it as a tuple."""
    if type(shape) is not tuple and type(shape) is not list:
        raise _fail("shape must be a list of ints", field=field)
    if len(shape) > MAX_TENSOR_RANK:
        raise _fail(
            "tensor rank too large",
            field=field,
            code=ErrorCode.LIMIT_EXCEEDED,
            limit=MAX_TENSOR_RANK,
            got=len(shape),
        )
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise _fail("shape dimensions must be non-negative ints", field=field)
    # Zero dimensions count as 1 here: with one of them the product is 0 whatever the
    # others are, and [0, 2**63] would pass a bound on the product alone, then fail in
    # numpy, which cannot even reshape to a dimension past its index type.
    elements = math.prod(dim or 1 for dim in shape)
    if elements > MAX_TENSOR_ELEMENTS:
        raise _fail(
            "tensor has too many elements",
            field=field,
            code=ErrorCode.LIMIT_EXCEEDED,
            limit=MAX_TENSOR_ELEMENTS,
            got=elements,
        )
    return tuple(shape)


def check_name(name: object, field: str = "name") -> str:
    """Validate a tensor or model name: a non-empty printable string within the limit."""
    if type(name) is not str or not name or len(name) > MAX_STR_LEN or not name.isprintable():
        raise _fail("names must be non-empty printable strings", field=field)
    return name


@dataclass(frozen=True, slots=True, kw_only=True)
class Tensor:
    """One named tensor whose bytes are exactly ``prod(shape) * itemsize`` long.

    Attributes:
        name: the model input or output it belongs to.
        dtype: a key of :data:`DTYPES`.
        shape: concrete dimensions.
        data: the raw little-endian bytes, C order. Kept as a ``memoryview`` so that a
            tensor decoded from the wire shares the receive buffer.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def __post_init__(self) -> None:
        check_name(self.name)
        if type(self.dtype) is not str or self.dtype not in DTYPES:
            raise _fail("dtype not allowed", field="dtype", got=str(self.dtype)[:32])
        object.__setattr__(self, "shape", check_shape(self.shape))
        if type(self.data) is not memoryview:
            raise _fail("tensor data must be a memoryview", field="data")
        expected = math.prod(self.shape) * DTYPES[self.dtype].itemsize
        if self.data.nbytes != expected:
            raise _fail(
                "tensor byte length does not match shape and dtype",
                field="data",
                limit=expected,
                got=self.data.nbytes,
            )

    @classmethod
    def from_numpy(cls, name: str, array: np.ndarray[Any, Any]) -> Tensor:
        """Wrap a numpy array, converting it to C order and little-endian only if needed."""
        dtype_name = _NAMES.get(array.dtype.newbyteorder("<"))
        if dtype_name is None:
            raise _fail("dtype not allowed", field="dtype", got=str(array.dtype))
        wanted = DTYPES[dtype_name]
        if array.dtype is wanted and array.flags.c_contiguous:
            contiguous = array  # the usual case, without np.require's own checks
        else:
            # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
            contiguous = np.require(array, dtype=wanted, requirements="C")
        data = memoryview(contiguous.data).cast("B") if contiguous.size else memoryview(b"")
        return cls(name=name, dtype=dtype_name, shape=tuple(contiguous.shape), data=data)

    def to_numpy(self) -> np.ndarray[Any, Any]:
        """The tensor as a numpy array sharing this tensor's bytes (read-only if they are)."""
        return np.frombuffer(self.data, dtype=DTYPES[self.dtype]).reshape(self.shape)

    def describe(self) -> dict[str, Any]:
        """The header entry for this tensor (its bytes travel in the payload)."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def tensors_to_wire(tensors: Sequence[Tensor]) -> tuple[list[dict[str, Any]], list[memoryview]]:
    """Split tensors into header entries and the payload buffers, in the same order."""
    return [t.describe() for t in tensors], [t.data for t in tensors if t.data.nbytes]


def tensors_from_wire(entries: object, payload: memoryview, field: str) -> tuple[Tensor, ...]:
    """Rebuild tensors from header entries and the payload, without copying the bytes.

    Raises:
        LocalProtocolError: a malformed entry, a dtype not allowed, or a payload whose
            length is not exactly the sum of the tensors' sizes. (The caller turns this
            into a remote error when the entries came from a peer.)
    """
    if type(entries) is not list:
        raise _fail("tensors must be a list", field=field)
    if len(entries) > MAX_TENSORS:
        raise _fail(
            "too many tensors",
            field=field,
            code=ErrorCode.LIMIT_EXCEEDED,
            limit=MAX_TENSORS,
            got=len(entries),
        )
    tensors = []
    offset = 0
    for entry in entries:
        if type(entry) is not dict or entry.keys() != {"name", "dtype", "shape"}:
            raise _fail("each tensor needs exactly name, dtype and shape", field=field)
        dtype = entry["dtype"]
        if type(dtype) is not str or dtype not in DTYPES:
            raise _fail("dtype not allowed", field=field, got=str(dtype)[:32])
        shape = check_shape(entry["shape"], field)
        size = math.prod(shape) * DTYPES[dtype].itemsize
        if offset + size > payload.nbytes:
            raise _fail("payload shorter than the tensors it should hold", field=field)
        tensors.append(
            Tensor(
                name=entry["name"], dtype=dtype, shape=shape, data=payload[offset : offset + size]
            )
        )
        offset += size
    if offset != payload.nbytes:
        raise _fail("payload longer than the tensors it should hold", field=field)
    return tuple(tensors)
