"""A bounded walk over an ONNX model's protobuf wire format, before onnxruntime sees it.

It refuses what onnxruntime would otherwise act on dangerously: tensors whose data lives
in an external file (M02: a model could make the enclave read host files, cf. onnx
CVE-2022-25882 and CVE-2024-27318), and operators from domains the CPU build does not
implement (M03: they would need a custom-op library). The walk reads tags, varints and
lengths only and skips weights by their length, so it costs well under a millisecond even
for a 200 MB model, and it needs no ``onnx`` package inside the enclave.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from drm_wire.errors import DrmError, ErrorCode

__all__ = ["ALLOWED_DOMAINS", "MAX_GRAPH_DEPTH", "ModelError", "scan_model"]

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
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ModelError("malformed protobuf (field number 0)")
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire_type, value, pos
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
        yield number, wire_type, start, pos


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
