"""A model's inputs and outputs as the enclave serves them, read from an onnxruntime session.

onnxruntime describes each graph input and output by a ``NodeArg``: a name, a type string
(``tensor(float)``) and a shape whose entries are an ``int`` for a fixed dim and a
``str`` (a symbolic name, possibly empty) or ``None`` for a dynamic one. On the wire a
dynamic dim is ``None`` whatever the exporter called it: a symbolic name is not a
constraint onnxruntime enforces when it receives inputs (two inputs whose dims share the
name ``N`` may be fed different sizes; ``?`` is only the exporter's way to say "unknown"),
so the enclave does not enforce one either. What a request may carry along a dynamic dim
is set by the owner's terms (:mod:`.terms`), not by the names. Both daemons read the
signature through this module: the custodian to check terms against the model before it
lends it, the enclave to check and price requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from ..errors import LocalProtocolError
from ..limits import MAX_TENSOR_RANK, MAX_TENSORS
from ..messages import TensorSpec
from ..tensors import DTYPES
from .scan import ModelError, _name

__all__ = ["ORT_TYPES", "io_spec", "signature"]

#: ORT's ``tensor(...)`` type strings -> the wire's dtype names.
ORT_TYPES: Final = {
    f"tensor({ {'float32': 'float', 'float64': 'double'}.get(name, name) })": name
    for name in DTYPES
}


def io_spec(arg: Any, what: str) -> TensorSpec:
    """One session input or output (an onnxruntime ``NodeArg``) as a wire spec.

    Raises:
        ModelError: a type the wire cannot carry, a rank over ``MAX_TENSOR_RANK``, or a
            name the wire refuses.
    """
    dtype = ORT_TYPES.get(arg.type)
    if dtype is None:
        raise ModelError(f"{what} {_name(arg.name)} has type {arg.type}, which the wire lacks")
    shape = list(arg.shape or [])
    if len(shape) > MAX_TENSOR_RANK:
        raise ModelError(f"{what} {_name(arg.name)} has rank {len(shape)} > {MAX_TENSOR_RANK}")
    dims = tuple(d if type(d) is int and d >= 0 else None for d in shape)
    try:
        return TensorSpec(name=arg.name, dtype=dtype, shape=dims)
    except LocalProtocolError as exc:
        raise ModelError(f"{what} name or shape not servable: {exc.message}") from None


def signature(
    inputs: Iterable[Any], outputs: Iterable[Any], *, skip: Iterable[str] = ()
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The served inputs and outputs of a session (``session.get_inputs()``, ``...outputs()``).

    Args:
        skip: input names that are not the consumer's to feed (weights fed in place).

    Raises:
        ModelError: as :func:`io_spec`, or fewer than 1 or more than ``MAX_TENSORS``
            inputs or outputs.
    """
    skipped = frozenset(skip)
    ins = tuple(io_spec(arg, "input") for arg in inputs if arg.name not in skipped)
    outs = tuple(io_spec(arg, "output") for arg in outputs)
    if not ins or len(ins) > MAX_TENSORS or not outs or len(outs) > MAX_TENSORS:
        raise ModelError(f"needs 1 to {MAX_TENSORS} inputs and outputs")
    return ins, outs
