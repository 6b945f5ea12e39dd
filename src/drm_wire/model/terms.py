"""Lending terms: what one inference of a model is, and which shapes a request may have.

The model's owner sets them (a ``[models.NAME]`` table of the custodian's config file, or
a terms file next to the model); they travel with the model over the attested link, in
``model_begin``, and the enclave enforces them before a unit of quota is taken (I14).
Without them a model with a dynamic dim would let a borrower buy a whole batch, or an
image of any size, for one unit (Q12).

The terms (:class:`Terms`), as the owner writes them:

* ``unit``: ``"item"`` (the default) charges one unit per item along the batch axis;
  ``"request"`` one unit per request, allowed only when every dynamic dim of every input
  has an explicit bound, so that what one request may hold is what the owner decided;
* ``max_batch``: the largest batch (default :data:`DEFAULT_MAX_BATCH`);
* ``inputs``: for an input, one entry per dim: an ``int`` (that size exactly) or
  ``[min, max]`` (inclusive) for a dynamic dim;
* ``batch_axis``: for an input, its batch axis, or ``"none"`` when it has none. Default:
  axis 0 when the model leaves axis 0 dynamic, else none;
* ``share_metadata`` (protocol version 3): the keys of the model's ONNX
  ``metadata_props`` the owner shares with consumers (a label list, a character
  dictionary); the custodian sends those entries, and only those, with the model, and
  the enclave shows them in ``model_info``. Default: none;
* ``preprocess`` (protocol version 3): the name of the input preprocessing the model was
  trained with (``"covidnet"``, ``"imagenet"``...), which a consumer's ``--preprocess
  auto`` follows. Default: not said.

Resolved against the model's inputs (:func:`resolve`), they become a :class:`Pricing`:
every dim of every input with its inclusive ``[low, high]`` range (a fixed dim is
``[n, n]``), and the batch axis of each input. What the owner leaves unsaid gets a safe
default: a batch axis ``[1, max_batch]``; any other dynamic dim ``[1,``
:data:`DEFAULT_MAX_DIM` ``]``; and a request is never larger than the wire's payload
limit (``MAX_PAYLOAD_BYTES``) whatever the bounds. 64 items per request keeps one
request's cost well inside the default lease (1,000: a request must fit in one lease, see
``drm_custodian.grants``; the custodian lowers the default to half a smaller lease) and its
run short; 4,096 covers the image and sequence sizes exporters use (a 4K frame is 3,840
wide) while a 16,000-wide image, sixteen times the pixels of a 4,000-wide one, is refused:
an owner who wants more says so.

Cost (:meth:`Pricing.check`): under ``item``, every input with a batch axis must carry the
same batch size ``n`` (else ``bad_request``) and the request costs ``n``; a model with no
batch axis costs 1. Under ``request`` it costs 1. A request outside the terms is refused
with a :class:`OutsideTerms` naming the input, dim, value and bound, before any quota is
taken: it costs nothing.

Dimension names: an exporter's symbolic names (``N``, ``batch``, ``?``, ``unk__3``, empty)
are not constraints (see :mod:`.signature`): onnxruntime accepts inputs whose dims share a
name but differ, and so does the enclave, within the bounds. The batch size is the one
shared quantity that matters for the price, and it is the batch axes that say which dims
carry it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from ..errors import DrmError, ErrorCode, LocalProtocolError
from ..limits import (
    MAX_GRANT_UNITS,
    MAX_METADATA_KEY_LEN,
    MAX_METADATA_KEYS,
    MAX_TENSOR_ELEMENTS,
    MAX_TENSOR_RANK,
    MAX_TENSORS,
)

__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_DIM",
    "MAX_BOUND",
    "InputPrice",
    "OutsideTerms",
    "Pricing",
    "Terms",
    "TermsError",
    "Unit",
    "metadata_key",
    "resolve",
]

#: Largest batch a request may carry when the owner sets no ``max_batch``.
DEFAULT_MAX_BATCH: Final = 64
#: Largest size of a dynamic dim other than a batch axis when the owner sets no bound.
DEFAULT_MAX_DIM: Final = 4096
#: Largest bound anyone may write: no dim can be larger than a tensor's element limit.
MAX_BOUND: Final = MAX_TENSOR_ELEMENTS

#: A ``preprocess`` name: short, lower case, as a command-line choice is written.
_PREPROCESS_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
#: Every key of a terms table.
_KEYS: Final = frozenset(
    {"unit", "max_batch", "inputs", "batch_axis", "share_metadata", "preprocess"}
)

#: A dim as the owner sets it: an exact size, or an inclusive ``(low, high)`` range.
DimTerm = int | tuple[int, int]


class Unit(StrEnum):
    """What one inference (one unit of quota) is."""

    #: One unit per item along the batch axis.
    ITEM = "item"
    #: One unit per request, whatever its batch.
    REQUEST = "request"


class TermsError(LocalProtocolError):
    """Terms that are malformed, or do not fit the model's inputs. The message names the
    model input and dim at fault; ``field`` is the key."""


class OutsideTerms(DrmError):
    """A request's tensors are outside the model's terms (or its signature): refused with
    ``bad_request`` before any quota is taken, so it costs nothing.

    Attributes:
        field: the input at fault, if one is.
        got: the value seen (a dim, a count, a dtype).
    """

    code = ErrorCode.BAD_REQUEST

    def __init__(self, message: str, *, field: str | None = None, got: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.got = got


def _q(text: str) -> str:
    return repr(text[:64])


def _int(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise TermsError(f"{what} must be an integer from {low} to {high}, got {value!r}"[:300])
    return value


def _dim_term(value: object, what: str) -> DimTerm:
    if type(value) is int:
        return _int(value, what, 0, MAX_BOUND)
    if type(value) in (list, tuple) and len(value) == 2:  # type: ignore[arg-type]
        low = _int(value[0], f"{what} minimum", 0, MAX_BOUND)  # type: ignore[index]
        high = _int(value[1], f"{what} maximum", 0, MAX_BOUND)  # type: ignore[index]
        if low > high:
            raise TermsError(f"{what} has minimum {low} over maximum {high}")
        return (low, high)
    raise TermsError(f"{what} must be an integer or [minimum, maximum]")


def _name(value: object, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= 255:
        raise TermsError(f"{what} must be an input name")
    return value


def metadata_key(value: object, what: str = "a share_metadata key") -> str:
    """A metadata key: 1 to ``MAX_METADATA_KEY_LEN`` printable characters.

    Raises:
        TermsError: anything else (named ``what``).
    """
    if (
        type(value) is not str
        or not 0 < len(value) <= MAX_METADATA_KEY_LEN
        or not value.isprintable()
    ):
        raise TermsError(
            f"{what} must be 1 to {MAX_METADATA_KEY_LEN} printable characters",
            field="share_metadata",
        )
    return value


def _preprocess(value: object) -> str:
    if type(value) is not str or _PREPROCESS_NAME.fullmatch(value) is None:
        raise TermsError(
            "preprocess must be a name of 1 to 32 lower-case letters, digits, '_', '.' or '-'",
            field="preprocess",
        )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Terms:
    """The owner's terms for one model, validated at construction (:class:`TermsError`).

    ``inputs`` and ``batch_axis`` are tuples of ``(input name, value)`` sorted by name, so
    two equal sets of terms compare equal (the enclave compares them when it keeps a
    session). Use :meth:`from_mapping` to build them from TOML or the wire.
    """

    unit: Unit = Unit.ITEM
    max_batch: int | None = None
    inputs: tuple[tuple[str, tuple[DimTerm, ...]], ...] = ()
    batch_axis: tuple[tuple[str, int | None], ...] = ()
    share_metadata: tuple[str, ...] = ()
    preprocess: str | None = None

    def __post_init__(self) -> None:
        unit: object = self.unit
        if type(unit) is not Unit:
            if type(unit) is not str or unit not in Unit._value2member_map_:
                raise TermsError('unit must be "item" or "request"', field="unit")
            object.__setattr__(self, "unit", Unit(unit))
        if self.max_batch is not None:
            _int(self.max_batch, "max_batch", 1, MAX_GRANT_UNITS)
        for key, entries in (("inputs", self.inputs), ("batch_axis", self.batch_axis)):
            if type(entries) is not tuple or len(entries) > MAX_TENSORS:
                raise TermsError(f"{key} must name at most {MAX_TENSORS} inputs", field=key)
            names = [entry[0] for entry in entries]
            if names != sorted(set(names)):
                raise TermsError(f"{key} must name each input once, sorted", field=key)
        for name, dims in self.inputs:
            _name(name, "an inputs key")
            if type(dims) is not tuple or not dims or len(dims) > MAX_TENSOR_RANK:
                raise TermsError(f"input {_q(name)} must list 1 to {MAX_TENSOR_RANK} dims")
            for axis, dim in enumerate(dims):
                _dim_term(dim, f"input {_q(name)} dim {axis}")
        for name, batch in self.batch_axis:
            _name(name, "a batch_axis key")
            if batch is not None:
                _int(batch, f"batch_axis of input {_q(name)}", 0, MAX_TENSOR_RANK - 1)
        keys = self.share_metadata
        if type(keys) is not tuple or len(keys) > MAX_METADATA_KEYS:
            raise TermsError(
                f"share_metadata must list at most {MAX_METADATA_KEYS} keys",
                field="share_metadata",
            )
        for key in keys:
            metadata_key(key)
        if list(keys) != sorted(set(keys)):
            raise TermsError("share_metadata must name each key once, sorted",
                             field="share_metadata")  # fmt: skip
        if self.preprocess is not None:
            _preprocess(self.preprocess)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> Terms:
        """Terms from a TOML table or the wire's map (the same keys; see the module).

        ``batch_axis`` values are an axis or ``"none"`` (TOML has no null; the wire
        also accepts ``None``).

        Raises:
            TermsError: an unknown key, a wrong type, or a value out of range.
        """
        if not isinstance(table, Mapping):
            raise TermsError("terms must be a table")
        unknown = sorted(str(k) for k in table if k not in _KEYS)
        if unknown:
            raise TermsError(f"unknown key {_q(unknown[0])} in terms", field=unknown[0][:64])
        inputs = table.get("inputs", {})
        axes = table.get("batch_axis", {})
        for key, value in (("inputs", inputs), ("batch_axis", axes)):
            if not isinstance(value, Mapping) or len(value) > MAX_TENSORS:
                raise TermsError(f"{key} must be a table of at most {MAX_TENSORS} inputs")
        parsed_inputs = []
        for name, dims in inputs.items():
            _name(name, "an inputs key")
            if type(dims) not in (list, tuple) or len(dims) > MAX_TENSOR_RANK:
                raise TermsError(f"input {_q(name)} must list 1 to {MAX_TENSOR_RANK} dims")
            where = f"input {_q(name)} dim"
            parsed_inputs.append(
                (name, tuple(_dim_term(d, f"{where} {i}") for i, d in enumerate(dims)))
            )
        parsed_axes = []
        for name, axis in axes.items():
            _name(name, "a batch_axis key")
            parsed_axes.append((name, None if axis is None or axis == "none" else axis))
        shared = table.get("share_metadata", [])
        if type(shared) not in (list, tuple) or len(shared) > MAX_METADATA_KEYS:
            raise TermsError(
                f"share_metadata must be a list of at most {MAX_METADATA_KEYS} keys",
                field="share_metadata",
            )
        keys = [metadata_key(key) for key in shared]
        if len(set(keys)) != len(keys):
            raise TermsError("share_metadata names a key twice", field="share_metadata")
        return cls(
            unit=table.get("unit", Unit.ITEM),
            max_batch=table.get("max_batch"),
            inputs=tuple(sorted(parsed_inputs)),
            batch_axis=tuple(sorted(parsed_axes, key=lambda entry: entry[0])),
            share_metadata=tuple(sorted(keys)),
            preprocess=table.get("preprocess"),
        )

    def to_mapping(self) -> dict[str, Any]:
        """The wire's map (msgpack: lists for ranges, ``None`` for no batch axis)."""
        out: dict[str, Any] = {"unit": self.unit.value}
        if self.max_batch is not None:
            out["max_batch"] = self.max_batch
        if self.inputs:
            out["inputs"] = {
                name: [list(d) if type(d) is tuple else d for d in dims]
                for name, dims in self.inputs
            }
        if self.batch_axis:
            out["batch_axis"] = dict(self.batch_axis)
        if self.share_metadata:
            out["share_metadata"] = list(self.share_metadata)
        if self.preprocess is not None:
            out["preprocess"] = self.preprocess
        return out

    def describe(self) -> str:
        """One line for people: ``unit=item max_batch=16 x=[1..16]x4``."""
        parts = [f"unit={self.unit.value}"]
        if self.max_batch is not None:
            parts.append(f"max_batch={self.max_batch}")
        for name, dims in self.inputs:
            parts.append(f"{name}=" + "x".join(_show(d) for d in dims))
        if self.share_metadata:
            parts.append("share_metadata=" + ",".join(self.share_metadata))
        if self.preprocess is not None:
            parts.append(f"preprocess={self.preprocess}")
        return " ".join(parts)


def _show(dim: DimTerm) -> str:
    if isinstance(dim, int):
        return str(dim)
    low, high = dim
    return str(low) if low == high else f"[{low}..{high}]"


@dataclass(frozen=True, slots=True)
class InputPrice:
    """One input under resolved terms: each dim's inclusive range, and its batch axis."""

    name: str
    dtype: str
    dims: tuple[tuple[int, int], ...]
    batch_axis: int | None


@dataclass(frozen=True, slots=True)
class Pricing:
    """A model's terms resolved against its inputs: the check and cost of a request."""

    unit: Unit
    max_batch: int
    inputs: tuple[InputPrice, ...]
    share_metadata: tuple[str, ...] = ()
    preprocess: str | None = None

    @property
    def max_cost(self) -> int:
        """The most units one request within the terms can cost."""
        batched = [p.dims[p.batch_axis][1] for p in self.inputs if p.batch_axis is not None]
        if self.unit is Unit.REQUEST or not batched:
            return 1
        return min(batched)

    def as_terms(self) -> Terms:
        """These terms with every default made explicit (what ``info`` shows consumers)."""
        return Terms(
            unit=self.unit,
            max_batch=self.max_batch,
            inputs=tuple(
                sorted(
                    (p.name, tuple(lo if lo == hi else (lo, hi) for lo, hi in p.dims))
                    for p in self.inputs
                )
            ),
            batch_axis=tuple(sorted((p.name, p.batch_axis) for p in self.inputs)),
            share_metadata=self.share_metadata,
            preprocess=self.preprocess,
        )

    def check(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """The cost of a request whose inputs have these shapes (names and ranks already
        checked against the model), or :class:`OutsideTerms` naming the first dim out of
        its range or the batch sizes that disagree."""
        batch: tuple[str, int] | None = None
        for price in self.inputs:
            shape = shapes[price.name]
            for axis, (dim, (low, high)) in enumerate(zip(shape, price.dims, strict=True)):
                if not low <= dim <= high:
                    bound = f"must be {low}" if low == high else f"must be in [{low}, {high}]"
                    what = "the batch size" if axis == price.batch_axis else "it"
                    raise OutsideTerms(
                        f"input {_q(price.name)} dim {axis} is {dim}: {what} {bound} under "
                        "the model's terms",
                        field=price.name,
                        got=dim,
                    )
            if price.batch_axis is not None:
                size = shape[price.batch_axis]
                if batch is None:
                    batch = (price.name, size)
                elif batch[1] != size:
                    raise OutsideTerms(
                        f"batch sizes differ: input {_q(batch[0])} has {batch[1]}, input "
                        f"{_q(price.name)} has {size} (dim {price.batch_axis})",
                        field=price.name,
                        got=size,
                    )
        if self.unit is Unit.REQUEST or batch is None:
            return 1
        return batch[1]


def resolve(terms: Terms, inputs: Sequence[Any]) -> Pricing:
    """Resolve ``terms`` against a model's inputs (``TensorSpec``: name, dtype, shape with
    ``None`` for a dynamic dim).

    Raises:
        TermsError: the terms name an input the model lacks, list the wrong number of
            dims, contradict a fixed dim, leave a dynamic dim unbounded under
            ``unit = "request"``, or set a batch axis the input lacks. The message names
            the model input and dim.
    """
    specs = {spec.name: spec for spec in inputs}
    dims_of = dict(terms.inputs)
    axes_of = dict(terms.batch_axis)
    for key, names in (("inputs", dims_of), ("batch_axis", axes_of)):
        for name in names:
            if name not in specs:
                known = ", ".join(map(_q, specs))
                raise TermsError(
                    f"{key} names input {_q(name)}, which the model lacks (it has {known})",
                    field=key,
                )
    max_batch = terms.max_batch if terms.max_batch is not None else DEFAULT_MAX_BATCH
    prices = []
    for spec in inputs:
        shape = spec.shape
        owner = dims_of.get(spec.name)
        if owner is not None and len(owner) != len(shape):
            raise TermsError(
                f"input {_q(spec.name)} has {len(shape)} dims, its terms list {len(owner)}"
            )
        if spec.name in axes_of:
            axis = axes_of[spec.name]
            if axis is not None and axis >= len(shape):
                raise TermsError(f"batch_axis {axis} of input {_q(spec.name)}: it has "
                                 f"{len(shape)} dims")  # fmt: skip
        else:
            axis = 0 if shape and shape[0] is None else None
        ranges = tuple(
            _range(terms, spec.name, index, model_dim, owner[index] if owner else None,
                   index == axis, max_batch)
            for index, model_dim in enumerate(shape)
        )  # fmt: skip
        prices.append(InputPrice(spec.name, spec.dtype, ranges, axis))
    return Pricing(terms.unit, max_batch, tuple(prices), terms.share_metadata, terms.preprocess)


def _range(
    terms: Terms,
    name: str,
    index: int,
    model_dim: int | None,
    term: DimTerm | None,
    batch: bool,
    max_batch: int,
) -> tuple[int, int]:
    """The inclusive range of one dim: the model's fixed size, the owner's term, or the
    default; a batch axis also within ``[1, max_batch]``."""
    where = f"input {_q(name)} dim {index}"
    bound: tuple[int, int] | None
    if term is None:
        bound = None
    elif isinstance(term, int):
        bound = (term, term)
    else:
        bound = term
    if model_dim is not None:
        if bound is not None and not bound[0] <= model_dim <= bound[1]:
            raise TermsError(
                f"{where} is fixed at {model_dim} by the model, the terms say {_show(bound)}"
            )
        low, high = model_dim, model_dim
    elif bound is not None:
        low, high = bound
    else:
        if terms.unit is Unit.REQUEST and not (batch and terms.max_batch is not None):
            raise TermsError(
                f'{where} is dynamic and unbounded: unit = "request" needs a bound for '
                "every dynamic dim"
            )
        low, high = 1, max_batch if batch else DEFAULT_MAX_DIM
    if batch:
        low, high = max(low, 1), min(high, max_batch)  # a batch of nothing is refused
        if low > high:
            raise TermsError(
                f"{where} (the batch axis) allows no batch size from 1 to max_batch {max_batch}"
            )
    return low, high
