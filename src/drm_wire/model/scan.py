"""A bounded walk over an ONNX model's protobuf wire format, before onnxruntime sees it.

It refuses what onnxruntime would otherwise act on dangerously: tensors whose data lives
in an external file (M02: a model could make the enclave read host files, cf. onnx
CVE-2022-25882 and CVE-2024-27318), and operators from domains the CPU build does not
implement (M03: they would need a custom-op library). The walk reads tags, varints and
lengths only and skips weights by their length, so it costs well under a millisecond even
for a 200 MB model, and it needs no ``onnx`` package inside the enclave.

The same walk also splits a model for loading (:func:`split_weights`): the large raw
initializers of the main graph stay where they arrived, in the receiver's buffer, and a
small *skeleton* (the model with each of them replaced by a placeholder, or declared as a
graph input instead) is all that onnxruntime parses. See :mod:`drm_enclave.model_host` for
why (peak memory).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from drm_wire.errors import DrmError, ErrorCode

__all__ = [
    "ALLOWED_DOMAINS",
    "FEED_OPS",
    "MAX_GRAPH_DEPTH",
    "MIN_SPLIT_BYTES",
    "PLACEHOLDER_LOCATION",
    "ModelError",
    "SplitModel",
    "Weight",
    "scan_model",
    "split_weights",
]

#: Operator domains onnxruntime's CPU build implements and a model may use: the ONNX
#: standard ("" and its alias "ai.onnx"), ONNX-ML, and Microsoft's contrib ops.
ALLOWED_DOMAINS: Final = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


#: Nesting of subgraphs (``If`` inside ``Loop``...). Real models nest a few levels;
#: protobuf's own parser stops at 100.
MAX_GRAPH_DEPTH: Final = 32


class ModelError(DrmError):
    """The model's bytes were refused ("invalid model: ..."). No session exists.

    Attributes:
        reason: the text after "invalid model: ". It never quotes weights; onnxruntime's
            own messages (which name nodes) are reduced to their status category.
    """

    code = ErrorCode.BAD_REQUEST

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid model: {reason}")
        self.reason = reason


def _name(text: str) -> str:
    """A peer- or model-supplied name, quoted and cut short for an error message."""
    return repr(text[:64] + ("..." if len(text) > 64 else ""))


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(field, wire_type, a, b)`` for each field of the message ``buf[pos:end]``.

    ``a, b`` are the bounds of a length-delimited value; ``a`` is the value of a varint.

    Raises:
        ModelError: malformed wire format (bad tag, overlong varint, truncated value).
    """
    for number, wire_type, _, a, b in _spans(buf, pos, end):
        yield number, wire_type, a, b


def _spans(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """:func:`_fields`, plus where each field starts (its tag): ``(field, wt, tag, a, b)``."""
    while pos < end:
        tag = pos
        key, pos = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ModelError("malformed protobuf (field number 0)")
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire_type, tag, value, pos
            continue
        if wire_type == _LEN:
            length, pos = _varint(buf, pos, end)
            start, pos = pos, pos + length
        elif wire_type in (_I64, _I32):
            start, pos = pos, pos + (8 if wire_type == _I64 else 4)
        else:
            raise ModelError(f"malformed protobuf (wire type {wire_type})")
        if pos > end:
            raise ModelError("malformed protobuf (a field runs past the end: truncated?)")
        yield number, wire_type, tag, start, pos


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ModelError("malformed protobuf (bad varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


class _Scan:
    """What the walk collects: every node's ``(domain, op_type)`` and the local functions."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.ops: set[tuple[str, str]] = set()
        self.functions: set[tuple[str, str]] = set()
        self.graphs = 0

    def text(self, a: int, b: int) -> str:
        return bytes(self.buf[a:b]).decode("utf-8", "replace")

    def sub(self, a: int, b: int, wire_type: int) -> Iterator[tuple[int, int, int, int]]:
        if wire_type != _LEN:
            raise ModelError("malformed protobuf (a message field is not length-delimited)")
        return _fields(self.buf, a, b)

    def model(self) -> None:
        for number, wt, a, b in _fields(self.buf, 0, self.buf.nbytes):
            if number == 7:  # ModelProto.graph (repeated occurrences merge)
                self.graph(a, b, wt, 0)
                self.graphs += 1
            elif number == 25:  # ModelProto.functions
                self.function(a, b, wt)
            elif number == 20:  # ModelProto.training_info: initialization = 1, algorithm = 2
                for n, wt2, a2, b2 in self.sub(a, b, wt):
                    if n in (1, 2):
                        self.graph(a2, b2, wt2, 1)

    def graph(self, a: int, b: int, wt: int, depth: int) -> None:
        if depth > MAX_GRAPH_DEPTH:
            raise ModelError(f"subgraphs nested deeper than {MAX_GRAPH_DEPTH}")
        for number, wt2, a2, b2 in self.sub(a, b, wt):
            if number == 1:  # GraphProto.node
                self.node(a2, b2, wt2, depth)
            elif number == 5:  # GraphProto.initializer
                self.tensor(a2, b2, wt2)
            elif number == 15:  # GraphProto.sparse_initializer
                self.sparse(a2, b2, wt2)

    def node(self, a: int, b: int, wt: int, depth: int) -> None:
        op = domain = ""
        for number, wt2, a2, b2 in self.sub(a, b, wt):
            if number == 4:  # NodeProto.op_type
                op = self.text(a2, b2)
            elif number == 7:  # NodeProto.domain
                domain = self.text(a2, b2)
            elif number == 5:  # NodeProto.attribute
                self.attribute(a2, b2, wt2, depth)
        self.ops.add((domain, op))

    def attribute(self, a: int, b: int, wt: int, depth: int) -> None:
        for number, wt2, a2, b2 in self.sub(a, b, wt):
            if number in (5, 10):  # AttributeProto.t, .tensors
                self.tensor(a2, b2, wt2)
            elif number in (6, 11):  # AttributeProto.g, .graphs
                self.graph(a2, b2, wt2, depth + 1)
            elif number in (22, 23):  # AttributeProto.sparse_tensor, .sparse_tensors
                self.sparse(a2, b2, wt2)

    def tensor(self, a: int, b: int, wt: int) -> None:
        for number, wt2, value, _ in self.sub(a, b, wt):
            # TensorProto.external_data = 13; TensorProto.data_location = 14 (1: EXTERNAL)
            if number == 13 or (number == 14 and wt2 == _VARINT and value == 1):
                raise ModelError("a tensor keeps its data in an external file")

    def sparse(self, a: int, b: int, wt: int) -> None:
        for number, wt2, a2, b2 in self.sub(a, b, wt):
            if number in (1, 2):  # SparseTensorProto.values, .indices
                self.tensor(a2, b2, wt2)

    def function(self, a: int, b: int, wt: int) -> None:
        name = domain = ""
        for number, wt2, a2, b2 in self.sub(a, b, wt):
            if number == 1:  # FunctionProto.name
                name = self.text(a2, b2)
            elif number == 10:  # FunctionProto.domain
                domain = self.text(a2, b2)
            elif number == 7:  # FunctionProto.node
                self.node(a2, b2, wt2, 1)
            elif number == 11:  # FunctionProto.attribute_proto (defaults)
                self.attribute(a2, b2, wt2, 1)
        self.functions.add((domain, name))


def scan_model(buf: memoryview) -> None:
    """Refuse external data (M02) and unregistered operator domains (M03).

    Raises:
        ModelError: either of those, or a wire format too broken to walk.
    """
    scan = _Scan(buf)
    scan.model()
    if not scan.graphs:
        raise ModelError("no graph (not an ONNX model?)")
    for domain, op in sorted(scan.ops - scan.functions):
        if domain not in ALLOWED_DOMAINS:
            raise ModelError(
                f"operator {_name(op)} from domain {_name(domain)} is not registered "
                "(custom operators are refused)"
            )


# --- splitting the weights off ----------------------------------------------------------

#: Raw initializers at least this large are left in the receiver's buffer and handed to
#: onnxruntime as external initializers; smaller ones stay in the skeleton. They must:
#: onnxruntime's shape inference reads constants such as a ``Reshape`` shape or
#: ``Unsqueeze`` axes from the model and refuses external ones (its own rule of thumb:
#: such constants are under 128 bytes); and copying small tensors costs little anyway.
MIN_SPLIT_BYTES: Final = 64 * 1024

#: The ``location`` of every placeholder. onnxruntime's ``AddExternalInitializers``
#: replaces a placeholder by name before it could ever resolve a location (strace shows no
#: file access for it: ``tests/enclave/test_model_files.py``); the name is not a path.
PLACEHOLDER_LOCATION: Final = "drm-enclave:in-memory"

#: ``TensorProto.DataType`` -> bytes per element, for the fixed-size types a raw
#: initializer can hold (float, uint8, int8, uint16, int16, int32, int64, bool, float16,
#: double, uint32, uint64, bfloat16).
_ITEMSIZE: Final = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
                    16: 2}  # fmt: skip
#: ``TensorProto.DataType`` -> numpy type string, for the types a weight may be fed in as a
#: graph input (:data:`FEED_OPS` compute in them): float, float16, double.
_FEED_DTYPES: Final = {1: "<f4", 10: "<f2", 11: "<f8"}

#: Operators (domain, op_type) whose weight operand onnxruntime reads as fast from a graph
#: input as from an initializer: a MatMul's or Gemm's weight is only ever multiplied (no
#: graph rewrite depends on it being constant, and prepacking is off for such large models
#: anyway). A weight whose every consumer in the main graph is one of these may be fed in
#: place (``feed_bytes`` of :func:`split_weights`); others (a Conv's weight, which
#: onnxruntime's layout and BatchNorm rewrites need constant) stay initializers.
FEED_OPS: Final = frozenset((domain, op) for domain in ("", "ai.onnx") for op in ("MatMul", "Gemm"))

#: TensorProto fields that hold data other than ``raw_data`` (9), or a segment (3).
_OTHER_DATA: Final = frozenset({3, 4, 5, 6, 7, 10, 11})


@dataclass(frozen=True, slots=True)
class Weight:
    """One initializer left in place: ``buf[start:end]`` is its little-endian raw data."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    start: int
    end: int

    @property
    def itemsize(self) -> int:
        """Bytes per element of :attr:`data_type` (a fixed-size type, by construction)."""
        return _ITEMSIZE[self.data_type]

    @property
    def nbytes(self) -> int:
        """The raw data's length."""
        return self.end - self.start

    @property
    def feed_dtype(self) -> str | None:
        """numpy's type string for a weight that may be fed as a graph input, else None."""
        return _FEED_DTYPES.get(self.data_type)


@dataclass(frozen=True, slots=True)
class SplitModel:
    """A scanned model cut in two: the skeleton onnxruntime parses, and the weights.

    Attributes:
        skeleton: the model without the weights' data.
        weights: initializers replaced by a placeholder (for external initializers).
        inputs: initializers the skeleton declares as graph inputs instead, to be fed at
            every run straight from the buffer (empty unless ``feed_bytes`` was given).
    """

    skeleton: bytes
    weights: tuple[Weight, ...]
    inputs: tuple[Weight, ...] = ()


def _key(number: int, wire_type: int) -> bytes:
    return _encode_varint(number << 3 | wire_type)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, value: bytes) -> bytes:
    return _key(number, _LEN) + _encode_varint(len(value)) + value


#: Appended to a tensor in place of its raw data: ``data_location = EXTERNAL`` and an
#: ``external_data`` entry ``location = PLACEHOLDER_LOCATION``.
_PLACEHOLDER_TAIL: Final = (
    _len_field(13, _len_field(1, b"location") + _len_field(2, PLACEHOLDER_LOCATION.encode()))
    + _key(14, _VARINT)
    + _encode_varint(1)
)


def _weight(buf: memoryview, a: int, b: int, min_bytes: int) -> tuple[bytes, Weight] | None:
    """The placeholder and the weight for the ``TensorProto`` at ``buf[a:b]``, or ``None``
    if it is not a plain raw tensor of at least ``min_bytes`` (then it stays embedded)."""
    name: str | None = None
    data_type = 0
    dims: list[int] = []
    raw: tuple[int, int] | None = None
    kept: list[memoryview] = []
    for number, wire_type, tag, start, end in _spans(buf, a, b):
        if number == 9 and wire_type == _LEN and raw is None:
            raw = (start, end)
            continue
        kept.append(buf[tag:end])
        if number in _OTHER_DATA or number == 9:
            return None
        if number == 1 and wire_type == _VARINT:
            dims.append(start)
        elif number == 1 and wire_type == _LEN:
            pos = start
            while pos < end:
                dim, pos = _varint(buf, pos, end)
                dims.append(dim)
        elif number == 2 and wire_type == _VARINT:
            data_type = start
        elif number == 8 and wire_type == _LEN and name is None:
            try:  # (onnxruntime gets names as UTF-8 strings; an odd one stays embedded)
                name = bytes(buf[start:end]).decode("utf-8", "strict") if end > start else None
            except UnicodeDecodeError:
                return None
        elif number in (1, 2, 8):  # an odd encoding, or a repeated singular field
            return None
    itemsize = _ITEMSIZE.get(data_type)
    if name is None or raw is None or itemsize is None or any(d >= 2**63 for d in dims):
        return None
    start, end = raw
    if end - start < min_bytes or math.prod(dims) * itemsize != end - start:
        return None
    placeholder = b"".join(kept) + _PLACEHOLDER_TAIL
    return placeholder, Weight(name, data_type, tuple(dims), start, end)


def _graph_input(weight: Weight) -> bytes:
    """A ``GraphProto.input`` entry (``ValueInfoProto``) with the weight's name, type, dims."""
    dims = b"".join(_len_field(1, _key(1, _VARINT) + _encode_varint(d)) for d in weight.dims)
    tensor_type = _key(1, _VARINT) + _encode_varint(weight.data_type) + _len_field(2, dims)
    value_info = _len_field(1, weight.name.encode()) + _len_field(2, _len_field(1, tensor_type))
    return _len_field(11, value_info)


def _main_graph_uses(buf: memoryview) -> tuple[dict[str, set[tuple[str, str]]], set[str]]:
    """Each name's consumers ``(domain, op_type)`` among the main graph's nodes, and the
    names of its declared inputs and outputs."""
    uses: dict[str, set[tuple[str, str]]] = {}
    declared: set[str] = set()
    for number, wire_type, a, b in _fields(buf, 0, buf.nbytes):
        if number != 7 or wire_type != _LEN:
            continue
        for number2, wire_type2, a2, b2 in _fields(buf, a, b):
            if wire_type2 != _LEN:
                continue
            if number2 in (11, 12):  # GraphProto.input, .output: ValueInfoProto.name = 1
                for number3, wire_type3, a3, b3 in _fields(buf, a2, b2):
                    if number3 == 1 and wire_type3 == _LEN:
                        declared.add(bytes(buf[a3:b3]).decode("utf-8", "replace"))
            elif number2 == 1:  # GraphProto.node
                op = domain = ""
                names: list[str] = []
                for number3, wire_type3, a3, b3 in _fields(buf, a2, b2):
                    if wire_type3 != _LEN:
                        continue
                    text = bytes(buf[a3:b3]).decode("utf-8", "replace")
                    if number3 == 1:  # NodeProto.input
                        names.append(text)
                    elif number3 == 4:
                        op = text
                    elif number3 == 7:
                        domain = text
                for name in names:
                    uses.setdefault(name, set()).add((domain, op))
    return uses, declared


def split_weights(
    buf: memoryview, min_bytes: int = MIN_SPLIT_BYTES, *, feed_bytes: int | None = None
) -> SplitModel | None:
    """Cut a model that :func:`scan_model` accepted into a skeleton and its large weights.

    Every initializer of the main graph that is a plain ``raw_data`` tensor of a
    fixed-size type, at least ``min_bytes`` long, is replaced in the skeleton by a
    placeholder (same name, type and dims; data marked external, at
    :data:`PLACEHOLDER_LOCATION`) and listed in :attr:`SplitModel.weights`. Everything
    else (subgraphs, functions, small or typed tensors) is copied into the skeleton
    unchanged, field by field.

    With ``feed_bytes``, the weights consumed only by :data:`FEED_OPS` (in a float type,
    not declared as graph inputs or outputs already) become graph inputs of the skeleton
    instead, listed in :attr:`SplitModel.inputs`, provided they total at least
    ``feed_bytes``: onnxruntime then never copies them (see :mod:`drm_enclave.model_host`).

    Returns:
        ``None`` when there is nothing to split (no such weight, or two of them share a
        name): the model is then loaded as it is.

    Raises:
        ModelError: a wire format too broken to walk (never after ``scan_model``).
    """
    found: dict[int, tuple[bytes, Weight]] = {}  # by the offset of the initializer's tag
    for number, wire_type, _, a, b in _spans(buf, 0, buf.nbytes):
        if number == 7 and wire_type == _LEN:  # ModelProto.graph
            for number2, wire_type2, tag2, a2, b2 in _spans(buf, a, b):
                if number2 == 5 and wire_type2 == _LEN:  # GraphProto.initializer
                    cut = _weight(buf, a2, b2, min_bytes)
                    if cut is not None:
                        found[tag2] = cut
    names = [weight.name for _, weight in found.values()]
    if not found or len(set(names)) != len(names):  # duplicates: onnxruntime judges
        return None
    fed: set[str] = set()
    if feed_bytes is not None:
        uses, declared = _main_graph_uses(buf)
        fed = {
            weight.name
            for _, weight in found.values()
            if weight.feed_dtype is not None
            and weight.name not in declared
            and uses.get(weight.name)
            and uses[weight.name] <= FEED_OPS
        }
        if sum(w.nbytes for _, w in found.values() if w.name in fed) < feed_bytes:
            fed = set()
    pieces: list[bytes | memoryview] = []
    for number, wire_type, tag, a, b in _spans(buf, 0, buf.nbytes):
        if number != 7 or wire_type != _LEN:  # not ModelProto.graph: copied as is
            pieces.append(buf[tag:b])
            continue
        graph: list[bytes | memoryview] = []
        for _, _, tag2, _, b2 in _spans(buf, a, b):
            cut = found.get(tag2)
            if cut is None:
                graph.append(buf[tag2:b2])
            elif cut[1].name in fed:
                graph.append(_graph_input(cut[1]))
            else:
                graph.append(_len_field(5, cut[0]))
        pieces.append(_len_field(7, b"".join(graph)))
    weights = tuple(weight for _, weight in found.values())
    return SplitModel(
        b"".join(pieces),
        tuple(w for w in weights if w.name not in fed),
        tuple(w for w in weights if w.name in fed),
    )
