"""The Open Inference Protocol's tensors, sans-IO: an HTTP body in, wire tensors out, and
the enclave's outputs back as a v2 response body.

Theory of operation
-------------------
A ``POST /v2/models/{name}/infer`` body is JSON, or (Triton's binary tensor data
extension, what ``tritonclient`` sends with ``binary_data=True``) a JSON header of exactly
``Inference-Header-Content-Length`` bytes followed by the raw tensors, in the order of the
inputs whose ``parameters`` carry a ``binary_data_size``. :func:`parse_infer` turns either
into :class:`~drm_wire.tensors.Tensor` values the enclave's wire carries, checking every
limit first (threat model G01-G03): the JSON's size and nesting, the number of inputs,
each shape's rank and dims, ``prod(shape) * itemsize`` against the payload limit *before*
anything is allocated, every binary size against its shape exactly, and the binary part
consumed exactly. JSON ``data`` may be flat or nested (row-major) and must hold exactly
``prod(shape)`` values of the datatype's kind (``true``/``false`` for ``BOOL``, integers in
range for the integer types, numbers for the float types; no ``NaN`` tokens). ``BYTES``
and ``BF16`` tensors are refused: the enclave takes only the fixed-size numeric dtypes of
:data:`~drm_wire.tensors.DTYPES`.

:func:`render_infer` builds the response: the requested outputs (all, in the model's
order, when none were named), each as JSON ``data`` or, when asked for (the output's
``binary_data`` parameter, else the request's ``binary_data_output``), as raw bytes after
the JSON header, whose length it returns for the ``Inference-Header-Content-Length``
response header.

Request ``parameters``: ``binary_data_output``; ``wait`` (seconds) bounds how long the
request waits for a supply when no inferences are left. ``tritonclient`` sends
``timeout`` (microseconds) and ``priority`` only when its caller sets them: ``timeout`` is
taken as the wait bound when there is no ``wait`` (capped at ``MAX_WAIT_SECONDS``; Triton
itself applies it only to requests queued for a dynamic batcher, and the closest thing
here is the queue for a supply), and ``priority`` (a non-negative integer) is accepted
and ignored: the enclave serves its requests in arrival order. The sequence parameters
are refused: no model here keeps state between requests.

Every refusal is a :class:`V2Error` with the message a client shows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from drm_wire.errors import DrmError
from drm_wire.limits import MAX_PAYLOAD_BYTES, MAX_TENSOR_RANK, MAX_TENSORS, MAX_WAIT_SECONDS, MiB
from drm_wire.tensors import DTYPES, Tensor

__all__ = [
    "DATATYPES",
    "MAX_DIM",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "InferRequest",
    "RequestedOutput",
    "V2Error",
    "datatype_of",
    "parse_infer",
    "render_infer",
]

#: v2 datatype -> the wire's dtype name (docs/protocol of KServe v2, "Tensor Data Types").
DATATYPES: Final[Mapping[str, str]] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_V2_NAMES: Final[Mapping[str, str]] = {wire: v2 for v2, wire in DATATYPES.items()}
#: Datatypes of the protocol that the enclave's wire cannot carry.
_UNSUPPORTED: Final[Mapping[str, str]] = {
    "BYTES": "BYTES tensors are not supported: the enclave takes only fixed-size numeric "
    "tensors (BOOL, UINT8-64, INT8-64, FP16, FP32, FP64)",
    "BF16": "BF16 tensors are not supported: the enclave's wire has no bfloat16",
}
#: The JSON part of a request: the whole body in JSON mode, the header in binary mode.
#: Parsed JSON costs about ten times its text in Python objects, so this is far below the
#: binary payload's limit: large tensors belong in the binary extension.
MAX_JSON_BYTES: Final = 8 * MiB
#: Nesting of the JSON document: the request object, its ``inputs`` list, an input, its
#: ``parameters`` or ``data``, and up to :data:`MAX_TENSOR_RANK` levels of nested data.
MAX_JSON_DEPTH: Final = 4 + MAX_TENSOR_RANK
#: Largest dimension of a shape (any larger one cannot fit the payload limit anyway).
MAX_DIM: Final = MAX_PAYLOAD_BYTES
#: Longest request ``id`` echoed back.
MAX_ID_CHARS: Final = 256

_INPUT_KEYS: Final = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS: Final = frozenset({"name", "parameters"})
_REQUEST_KEYS: Final = frozenset({"id", "parameters", "inputs", "outputs"})
_REQUEST_PARAMETERS: Final = frozenset({"binary_data_output", "wait", "timeout", "priority"})
#: tritonclient's ``timeout`` and ``priority`` are uint64 on Triton's side.
_MAX_UINT64: Final = 2**64 - 1


class V2Error(DrmError):
    """The request does not fit the protocol or our limits: HTTP 400 (or ``status``)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client named, and whether it wants it as binary data."""

    name: str
    binary: bool | None


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A parsed inference request.

    Attributes:
        id: the client's request id, echoed in the response.
        inputs: the tensors, ready for the enclave.
        outputs: the outputs asked for, or ``None`` for all of them.
        binary_output: the request's ``binary_data_output`` parameter.
        wait: the request's ``wait`` parameter (seconds), if given.
    """

    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool
    wait: float | None


def datatype_of(dtype: str) -> str:
    """The v2 datatype of a wire dtype name (``float32`` -> ``FP32``)."""
    return _V2_NAMES[dtype]


def _no_constants(token: str) -> None:
    raise V2Error(f"invalid JSON: {token} is not a number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise V2Error("invalid JSON: a key appears twice in one object")
    return document


def _depth(document: object) -> int:
    """Nesting depth, without recursion (so a hostile document cannot exhaust the stack)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Sequence[object] = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _load_json(text: bytes) -> dict[str, Any]:
    if len(text) > MAX_JSON_BYTES:
        raise V2Error(
            f"the JSON part is {len(text)} bytes, over {MAX_JSON_BYTES}: send large tensors "
            "with the binary data extension",
            status=413,
        )
    try:
        document = json.loads(
            text.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_no_duplicates
        )
    except V2Error:
        raise
    except RecursionError:
        raise V2Error(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise V2Error(f"invalid JSON: {exc}") from None
    if type(document) is not dict:
        raise V2Error("the request must be a JSON object")
    if _depth(document) > MAX_JSON_DEPTH:
        raise V2Error(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return document


def _object(value: object, what: str, keys: frozenset[str]) -> dict[str, Any]:
    if type(value) is not dict:
        raise V2Error(f"{what} must be a JSON object")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise V2Error(f"{what}: unknown field {unknown[0][:64]!r}")
    return value


def _parameters(holder: dict[str, Any], what: str, allowed: frozenset[str]) -> dict[str, Any]:
    parameters = holder.get("parameters", {})
    if type(parameters) is not dict:
        raise V2Error(f"{what}: parameters must be a JSON object")
    for key in parameters:
        if key not in allowed:
            raise V2Error(f"{what}: parameter {key[:64]!r} is not supported")
    return parameters


def _flag(parameters: Mapping[str, Any], key: str, what: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and type(value) is not bool:
        raise V2Error(f"{what}: parameter {key!r} must be true or false")
    return value


def _shape(value: object, what: str) -> tuple[int, ...]:
    if type(value) is not list or len(value) > MAX_TENSOR_RANK:
        raise V2Error(f"{what}: shape must be a list of at most {MAX_TENSOR_RANK} dims")
    for dim in value:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise V2Error(f"{what}: every dim of the shape must be an integer from 0 to {MAX_DIM}")
    return tuple(value)


def _flatten(data: object, what: str) -> list[Any]:
    """Row-major leaves of a nested list (depth already bounded by the parser's check)."""
    if type(data) is not list:
        raise V2Error(f"{what}: data must be a list")
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_array(
    data: object, dtype: str, shape: tuple[int, ...], what: str
) -> np.ndarray[Any, Any]:
    flat = _flatten(data, what)
    count = math.prod(shape)
    if len(flat) != count:
        raise V2Error(f"{what}: data holds {len(flat)} values, shape {list(shape)} needs {count}")
    kinds = {type(v) for v in flat}
    target = DTYPES[dtype]
    allowed = {bool} if target.kind == "b" else {int} if target.kind in "iu" else {int, float}
    if not kinds <= allowed:
        wrong = sorted(k.__name__ for k in kinds - allowed)[0]
        raise V2Error(f"{what}: data holds a {wrong} value, not a {datatype_of(dtype)} one")
    if target.kind in "iu" and flat:
        info = np.iinfo(target)
        if min(flat) < info.min or max(flat) > info.max:
            raise V2Error(f"{what}: a value is out of range for {datatype_of(dtype)}")
    with np.errstate(over="ignore"):  # a float beyond FP16/FP32's range is inf, as numpy
        return np.array(flat, dtype=target).reshape(shape)


def _input(entry: object, index: int, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    """One input; ``offset`` is where its binary data starts, returned moved past it."""
    what = f"input {index}"
    entry = _object(entry, what, _INPUT_KEYS)
    name = entry.get("name")
    if type(name) is not str:
        raise V2Error(f"{what}: name must be a string")
    what = f"input {name[:64]!r}"
    datatype = entry.get("datatype")
    if type(datatype) is not str:
        raise V2Error(f"{what}: datatype must be a string")
    if datatype in _UNSUPPORTED:
        raise V2Error(f"{what}: {_UNSUPPORTED[datatype]}")
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise V2Error(f"{what}: unknown datatype {datatype[:32]!r}")
    shape = _shape(entry.get("shape"), what)
    parameters = _parameters(entry, what, frozenset({"binary_data_size"}))
    size = math.prod(shape) * DTYPES[dtype].itemsize
    if size > MAX_PAYLOAD_BYTES:
        raise V2Error(f"{what}: {size} bytes, over the limit of {MAX_PAYLOAD_BYTES}", status=413)
    binary_size = parameters.get("binary_data_size")
    try:
        if binary_size is None:
            if "data" not in entry:
                raise V2Error(f"{what}: neither data nor a binary_data_size parameter")
            array = _json_array(entry["data"], dtype, shape, what)
            return Tensor.from_numpy(name, array), offset
        if "data" in entry:
            raise V2Error(f"{what}: both data and a binary_data_size parameter")
        if type(binary_size) is not int or binary_size != size:
            raise V2Error(
                f"{what}: binary_data_size is {str(binary_size)[:32]}, but shape {list(shape)} "
                f"of {datatype} takes {size} bytes"
            )
        if offset + size > len(binary):
            raise V2Error(f"{what}: the binary data ends {offset + size - len(binary)} bytes short")
        tensor = Tensor(name=name, dtype=dtype, shape=shape, data=binary[offset : offset + size])
    except DrmError as exc:  # a name or shape the wire refuses (LocalProtocolError)
        if isinstance(exc, V2Error):
            raise
        raise V2Error(f"{what}: {exc}") from exc
    if dtype == "bool" and bytes(tensor.data).strip(b"\x00\x01"):
        raise V2Error(f"{what}: BOOL binary data must hold only 0 and 1 bytes")
    return tensor, offset + size


def _outputs(value: object) -> tuple[RequestedOutput, ...] | None:
    if value is None:
        return None
    if type(value) is not list or not 0 < len(value) <= MAX_TENSORS:
        raise V2Error(f"outputs must be a list of 1 to {MAX_TENSORS} outputs")
    wanted: list[RequestedOutput] = []
    for index, entry in enumerate(value):
        entry = _object(entry, f"output {index}", _OUTPUT_KEYS)
        name = entry.get("name")
        if type(name) is not str or not name:
            raise V2Error(f"output {index}: name must be a string")
        parameters = _parameters(entry, f"output {name[:64]!r}", frozenset({"binary_data"}))
        if any(w.name == name for w in wanted):
            raise V2Error(f"output {name[:64]!r} is asked for twice")
        wanted.append(RequestedOutput(name, _flag(parameters, "binary_data", f"output {name!r}")))
    return tuple(wanted)


def _wait(parameters: Mapping[str, Any]) -> float | None:
    """The ``wait`` parameter, else ``timeout`` (microseconds) as the wait bound; checks
    ``priority``, which is otherwise ignored."""
    priority = parameters.get("priority")
    if priority is not None and (type(priority) is not int or not 0 <= priority <= _MAX_UINT64):
        raise V2Error("parameter 'priority' must be a non-negative integer")
    timeout = parameters.get("timeout")
    if timeout is not None and (type(timeout) is not int or not 0 <= timeout <= _MAX_UINT64):
        raise V2Error("parameter 'timeout' must be a non-negative integer of microseconds")
    value = parameters.get("wait")
    if value is None:
        return None if timeout is None else min(timeout / 1e6, MAX_WAIT_SECONDS)
    if type(value) not in (int, float) or not 0 <= value <= MAX_WAIT_SECONDS:
        raise V2Error(
            f"parameter 'wait' must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}"
        )
    return float(value)


def parse_infer(body: bytes | memoryview, header_length: int | None) -> InferRequest:
    """Parse an inference request body.

    Args:
        body: the whole body, as received.
        header_length: the ``Inference-Header-Content-Length`` header (already checked to
            be digits), or ``None`` when the body is all JSON.

    Raises:
        V2Error: the body does not fit the protocol or a limit; nothing was sent.
    """
    view = memoryview(body).cast("B")
    if header_length is None:
        header_length = len(view)
    if header_length > len(view):
        raise V2Error(
            f"Inference-Header-Content-Length is {header_length}, but the body has only "
            f"{len(view)} bytes"
        )
    document = _object(_load_json(bytes(view[:header_length])), "the request", _REQUEST_KEYS)
    binary = view[header_length:]
    request_id = document.get("id")
    if request_id is not None and (type(request_id) is not str or len(request_id) > MAX_ID_CHARS):
        raise V2Error(f"id must be a string of at most {MAX_ID_CHARS} characters")
    parameters = _parameters(document, "the request", _REQUEST_PARAMETERS)
    inputs = document.get("inputs")
    if type(inputs) is not list or not 0 < len(inputs) <= MAX_TENSORS:
        raise V2Error(f"inputs must be a list of 1 to {MAX_TENSORS} inputs")
    tensors: list[Tensor] = []
    offset = 0
    for index, entry in enumerate(inputs):
        tensor, offset = _input(entry, index, binary, offset)
        if any(t.name == tensor.name for t in tensors):
            raise V2Error(f"input {tensor.name!r} is given twice")
        tensors.append(tensor)
    if offset != len(binary):
        raise V2Error(
            f"the body has {len(binary) - offset} bytes of binary data that no input's "
            "binary_data_size accounts for"
        )
    return InferRequest(
        id=request_id,
        inputs=tuple(tensors),
        outputs=_outputs(document.get("outputs")),
        binary_output=bool(_flag(parameters, "binary_data_output", "the request")),
        wait=_wait(parameters),
    )


def render_infer(
    *,
    model: str,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray[Any, Any]],
    parameters: Mapping[str, int | float | str | bool],
) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON header when binary data follows it.

    Raises:
        V2Error: a requested output is not among ``outputs`` (check first with
            :func:`check_outputs` to refuse before spending an inference).
    """
    wanted = request.outputs or tuple(RequestedOutput(name, None) for name in outputs)
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in wanted:
        array = outputs.get(output.name)
        if array is None:
            raise V2Error(f"the model has no output {output.name!r}")
        tensor = Tensor.from_numpy(output.name, array)
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": datatype_of(tensor.dtype),
            "shape": list(tensor.shape),
        }
        binary = request.binary_output if output.binary is None else output.binary
        if binary:
            entry["parameters"] = {"binary_data_size": tensor.data.nbytes}
            blobs.append(tensor.data.tobytes())
        else:
            entry["data"] = np.asarray(array).ravel().tolist()
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model, "model_version": "1"}
    if request.id is not None:
        document["id"] = request.id
    document["parameters"] = dict(parameters)
    document["outputs"] = entries
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def check_outputs(request: InferRequest, names: Sequence[str]) -> None:
    """Refuse a request for an output the model does not have, before it is run."""
    for output in request.outputs or ():
        if output.name not in names:
            raise V2Error(f"the model has no output {output.name[:64]!r}")
