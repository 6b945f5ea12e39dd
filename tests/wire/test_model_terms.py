"""Lending terms (I14, Q12): parsing, resolution against a model's inputs, request checks.

Pure: no onnxruntime, no I/O. The model inputs are wire ``TensorSpec`` values, ``None``
for a dynamic dim, as :mod:`drm_wire.model.signature` reads them from a session.
"""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drm_wire.errors import ErrorCode
from drm_wire.limits import MAX_GRANT_UNITS
from drm_wire.messages import ModelBegin, TensorSpec
from drm_wire.model.terms import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_DIM,
    OutsideTerms,
    Terms,
    TermsError,
    Unit,
    resolve,
)
from tests.wire.strategies import terms as any_terms


def spec(name: str, *shape: int | None, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


IMAGES = spec("images", None, 3, None, None)
X = spec("x", None, 4)


def toml(text: str) -> Terms:
    return Terms.from_mapping(tomllib.loads(text))


# --- parsing --------------------------------------------------------------------------


def test_the_readme_example_parses() -> None:
    terms = toml(
        'unit = "item"\nmax_batch = 16\n'
        "[inputs]\nimages = [[1, 16], 3, [32, 1280], [32, 1280]]\n"
        '[batch_axis]\nimages = 0\nim_shape = "none"\n'
    )
    assert terms == Terms(
        unit=Unit.ITEM,
        max_batch=16,
        inputs=(("images", ((1, 16), 3, (32, 1280), (32, 1280))),),
        batch_axis=(("im_shape", None), ("images", 0)),
    )
    assert terms.describe() == "unit=item max_batch=16 images=[1..16]x3x[32..1280]x[32..1280]"


def test_no_terms_are_the_defaults() -> None:
    assert Terms.from_mapping({}) == Terms() == Terms(unit=Unit.ITEM)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"unit": "inference"}, 'unit must be "item" or "request"'),
        ({"unit": 1}, 'unit must be "item" or "request"'),
        ({"max_batch": 0}, "max_batch must be an integer from 1"),
        ({"max_batch": True}, "max_batch must be an integer from 1"),
        ({"max_batch": MAX_GRANT_UNITS + 1}, "max_batch must be an integer from 1"),
        ({"max_batch": "8"}, "max_batch must be an integer from 1"),
        ({"price": 1}, "unknown key 'price' in terms"),
        ({"inputs": [1, 2]}, "inputs must be a table"),
        ({"inputs": {"x": 4}}, "input 'x' must list 1 to 8 dims"),
        ({"inputs": {"x": []}}, "input 'x' must list 1 to 8 dims"),
        ({"inputs": {"x": [1] * 9}}, "input 'x' must list 1 to 8 dims"),
        ({"inputs": {"x": [-1, 4]}}, "input 'x' dim 0 must be an integer from 0"),
        ({"inputs": {"x": [2**70, 4]}}, "input 'x' dim 0 must be an integer from 0"),
        ({"inputs": {"x": [[16, 1], 4]}}, "input 'x' dim 0 has minimum 16 over maximum 1"),
        ({"inputs": {"x": [[1, 2, 3], 4]}}, "input 'x' dim 0 must be an integer or"),
        ({"inputs": {"x": [1.5, 4]}}, "input 'x' dim 0 must be an integer or"),
        ({"inputs": {"x": [[1, "9"], 4]}}, "input 'x' dim 0 maximum must be an integer"),
        ({"batch_axis": {"x": 8}}, "batch_axis of input 'x' must be an integer from 0 to 7"),
        ({"batch_axis": {"x": "first"}}, "batch_axis of input 'x' must be an integer"),
        ({"inputs": {f"i{n}": [1] for n in range(65)}}, "inputs must be a table of at most"),
    ],
)
def test_bad_terms_are_refused_naming_what(table: dict[str, Any], message: str) -> None:
    with pytest.raises(TermsError, match=message.replace("[", r"\[")):
        Terms.from_mapping(table)


@given(any_terms)
def test_terms_travel_in_model_begin_unchanged(terms: Terms) -> None:
    begin = ModelBegin(name="m", size=1, sha256=bytes(32), terms=terms)
    header, _ = begin.to_wire()
    assert Terms.from_mapping(header["terms"]) == terms


# --- resolution against the model's inputs ------------------------------------------------


def test_defaults_bound_every_dynamic_dim() -> None:
    pricing = resolve(Terms(), [IMAGES])
    assert pricing.inputs[0].dims == (
        (1, DEFAULT_MAX_BATCH),
        (3, 3),
        (1, DEFAULT_MAX_DIM),
        (1, DEFAULT_MAX_DIM),
    )
    assert pricing.inputs[0].batch_axis == 0
    assert pricing.max_cost == DEFAULT_MAX_BATCH


def test_a_model_without_a_dynamic_axis_costs_one_per_request() -> None:
    pricing = resolve(Terms(), [spec("input", 1, 480, 480, 3)])
    assert pricing.inputs[0].batch_axis is None
    assert pricing.max_cost == 1
    assert pricing.check({"input": (1, 480, 480, 3)}) == 1


def test_a_fixed_batch_and_a_dynamic_sequence_cost_one() -> None:
    pricing = resolve(Terms(), [spec("ids", 1, None)])
    assert pricing.check({"ids": (1, 4096)}) == 1
    with pytest.raises(OutsideTerms, match=r"input 'ids' dim 1 is 4097: it must be in \[1, 4096\]"):
        pricing.check({"ids": (1, 4097)})


@pytest.mark.parametrize(
    ("terms", "inputs", "message"),
    [
        (Terms(inputs=(("z", (1,)),)), [X], "inputs names input 'z', which the model lacks"),
        (Terms(batch_axis=(("z", 0),)), [X], "batch_axis names input 'z', which the model"),
        (Terms(inputs=(("x", (1, 4, 4)),)), [X], "input 'x' has 2 dims, its terms list 3"),
        (Terms(inputs=(("x", (1, 5)),)), [X], "input 'x' dim 1 is fixed at 4 by the model"),
        (Terms(inputs=(("x", (1, (5, 9))),)), [X], "input 'x' dim 1 is fixed at 4 by"),
        (Terms(batch_axis=(("x", 2),)), [X], "batch_axis 2 of input 'x': it has 2 dims"),
        (
            Terms(unit=Unit.REQUEST),
            [X],
            "input 'x' dim 0 is dynamic and unbounded: unit = \"request\" needs a bound",
        ),
        (
            Terms(unit=Unit.REQUEST, max_batch=8),
            [IMAGES],
            "input 'images' dim 2 is dynamic and unbounded",
        ),
        (
            Terms(inputs=(("x", ((0, 0), 4)),)),
            [X],
            "input 'x' dim 0 \\(the batch axis\\) allows no batch size",
        ),
    ],
)
def test_terms_that_do_not_fit_the_model_are_refused(
    terms: Terms, inputs: list[TensorSpec], message: str
) -> None:
    with pytest.raises(TermsError, match=message):
        resolve(terms, inputs)


def test_request_terms_with_every_dynamic_dim_bounded() -> None:
    terms = Terms(unit=Unit.REQUEST, inputs=(("images", ((1, 16), 3, (32, 1280), (32, 1280))),))
    pricing = resolve(terms, [IMAGES])
    assert pricing.max_cost == 1
    assert pricing.check({"images": (16, 3, 1280, 32)}) == 1
    with pytest.raises(OutsideTerms, match=r"dim 0 is 17: the batch size must be in \[1, 16\]"):
        pricing.check({"images": (17, 3, 32, 32)})


def test_max_batch_caps_an_owner_bound_on_the_batch_axis() -> None:
    pricing = resolve(Terms(max_batch=8, inputs=(("x", ((1, 100), 4)),)), [X])
    assert pricing.inputs[0].dims[0] == (1, 8)
    assert pricing.max_cost == 8


def test_as_terms_makes_every_default_explicit_and_resolves_to_the_same() -> None:
    pricing = resolve(Terms(), [IMAGES, spec("im_shape", None, 2)])
    explicit = pricing.as_terms()
    assert explicit.max_batch == DEFAULT_MAX_BATCH
    assert resolve(explicit, [IMAGES, spec("im_shape", None, 2)]) == pricing


# --- the check and cost of a request --------------------------------------------------


def test_a_batch_costs_its_size_and_batches_must_agree() -> None:
    pricing = resolve(Terms(max_batch=16), [X, spec("b", None, dtype="int64")])
    assert pricing.check({"x": (8, 4), "b": (8,)}) == 8
    with pytest.raises(OutsideTerms, match="batch sizes differ: input 'x' has 8, input 'b' has 9"):
        pricing.check({"x": (8, 4), "b": (9,)})


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1_000_000, 4), r"input 'x' dim 0 is 1000000: the batch size must be in \[1, 16\]"),
        ((0, 4), r"input 'x' dim 0 is 0: the batch size must be in \[1, 16\]"),
        ((17, 4), r"input 'x' dim 0 is 17"),
    ],
)
def test_a_batch_outside_the_terms_is_refused_naming_input_dim_value_bound(
    shape: tuple[int, ...], message: str
) -> None:
    pricing = resolve(Terms(max_batch=16), [X])
    with pytest.raises(OutsideTerms, match=message) as info:
        pricing.check({"x": shape})
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.field == "x"
    assert info.value.got == shape[0]


def test_exporter_dims_named_alike_are_independent() -> None:
    """``?`` everywhere (as paddle2onnx names them): a 1x3x48x192 input is served."""
    pricing = resolve(Terms(), [IMAGES])
    assert pricing.check({"images": (1, 3, 48, 192)}) == 1
    with pytest.raises(OutsideTerms, match=r"dim 3 is 16000: it must be in \[1, 4096\]"):
        pricing.check({"images": (1, 3, 48, 16000)})


dims = st.integers(0, 5000)


@given(batch=st.integers(-2, 70), height=dims, width=dims, max_batch=st.integers(1, 64))
def test_cost_is_the_batch_exactly_when_every_dim_is_within_bounds(
    batch: int, height: int, width: int, max_batch: int
) -> None:
    """Whatever the shape: either the request costs its batch, or it is refused."""
    terms = Terms(max_batch=max_batch, inputs=(("images", ((1, 64), 3, (32, 1280), (16, 4096))),))
    pricing = resolve(terms, [IMAGES])
    shape = (batch, 3, height, width)
    inside = 1 <= batch <= max_batch and 32 <= height <= 1280 and 16 <= width <= 4096
    if inside:
        assert pricing.check({"images": shape}) == batch
    else:
        with pytest.raises(OutsideTerms):
            pricing.check({"images": shape})


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
)  # fmt: skip
keys = st.sampled_from(["unit", "max_batch", "inputs", "batch_axis"])


@given(st.dictionaries(keys, junk, max_size=4))
def test_hostile_terms_from_the_wire_are_refused_cleanly(table: dict[str, Any]) -> None:
    """A peer's terms map is data: anything but valid terms is a TermsError (turned into a
    protocol error by the message), never another exception; valid ones survive the trip."""
    try:
        terms = Terms.from_mapping(table)
    except TermsError:
        return
    assert Terms.from_mapping(terms.to_mapping()) == terms
