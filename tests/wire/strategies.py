"""Hypothesis strategies that build every message type with valid, varied values."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from drm_wire import messages as m
from drm_wire.errors import ErrorCode
from drm_wire.limits import MAX_GRANT_UNITS, MAX_UINT, MAX_WAIT_SECONDS
from drm_wire.model.terms import MAX_BOUND, Terms, Unit
from drm_wire.tensors import DTYPES, Tensor

uints = st.integers(min_value=0, max_value=MAX_UINT)
names = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "Zs")), min_size=1, max_size=40
).filter(str.isprintable)
texts = st.text(max_size=200)
digests = st.binary(min_size=32, max_size=32)
versions = st.integers(min_value=1, max_value=65535)


@st.composite
def tensors(draw: st.DrawFn) -> Tensor:
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    count = int(np.prod(shape)) if shape else 1
    size = count * DTYPES[dtype].itemsize
    raw = draw(st.binary(min_size=size, max_size=size))
    return Tensor(name=draw(names), dtype=dtype, shape=shape, data=memoryview(raw))


tensor_tuples = st.lists(tensors(), max_size=4).map(tuple)
specs = st.builds(
    m.TensorSpec,
    name=names,
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.none() | st.integers(0, 10_000), max_size=8).map(tuple),
)
dim_terms = st.integers(0, MAX_BOUND) | st.tuples(st.integers(0, 100), st.integers(100, MAX_BOUND))
input_names = st.text(alphabet="abcxyz_", min_size=1, max_size=8)
terms = st.builds(
    Terms,
    unit=st.sampled_from(Unit),
    max_batch=st.none() | st.integers(1, MAX_GRANT_UNITS),
    inputs=st.dictionaries(input_names, st.lists(dim_terms, min_size=1, max_size=8).map(tuple),
                           max_size=3).map(lambda d: tuple(sorted(d.items()))),
    batch_axis=st.dictionaries(input_names, st.none() | st.integers(0, 7), max_size=3).map(
        lambda d: tuple(sorted(d.items()))
    ),
    share_metadata=st.sets(names, max_size=4).map(lambda keys: tuple(sorted(keys))),
    preprocess=st.none() | st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,31}", fullmatch=True),
)  # fmt: skip
#: Shared metadata: sorted (key, text) pairs, values of any text (non-ASCII included).
metadata = st.dictionaries(names, st.text(max_size=300), max_size=4).map(
    lambda d: tuple(sorted(d.items()))
)


@st.composite
def model_begins(draw: st.DrawFn) -> m.ModelBegin:
    """A ``model_begin`` whose metadata keys are among those its terms share."""
    shared = draw(metadata)
    lent = draw(terms)
    keys = tuple(sorted({*lent.share_metadata, *(key for key, _ in shared)}))[:16]
    shared = tuple(entry for entry in shared if entry[0] in keys)
    return m.ModelBegin(
        name=draw(names), size=draw(st.integers(1, 2**31 - 1)), sha256=draw(digests),
        terms=Terms(**{**{f: getattr(lent, f) for f in lent.__dataclass_fields__},
                       "share_metadata": keys}),
        metadata=shared,
    )  # fmt: skip


models = st.builds(
    m.ModelDescription,
    name=names,
    sha256=digests,
    inputs=st.lists(specs, max_size=3).map(tuple),
    outputs=st.lists(specs, max_size=3).map(tuple),
    terms=terms,
    metadata=metadata,
)
waits = st.none() | st.floats(min_value=0.0, max_value=MAX_WAIT_SECONDS)


@st.composite
def grants(draw: st.DrawFn) -> m.Grant:
    units = draw(st.integers(1, MAX_GRANT_UNITS))
    return m.Grant(
        grant_id=draw(uints), units=units, granted_total=draw(st.integers(units, MAX_UINT))
    )


#: One strategy per message class; the test suite checks that none is missing.
MESSAGES: dict[type[m.Message], st.SearchStrategy[Any]] = {
    m.Hello: st.builds(
        m.Hello,
        versions=st.lists(versions, min_size=1, max_size=16).map(tuple),
        role=st.sampled_from(m.PeerRole),
        software=names,
        license=st.none() | names,
        instance_id=st.none() | names,
        held=st.none()
        | st.lists(
            st.builds(m.HeldModel, name=names, sha256=digests, terms_sha256=digests),
            max_size=4,
            unique_by=lambda held: held.name,
        ).map(tuple),
    ),
    m.Welcome: st.builds(m.Welcome, version=versions, software=names),
    m.Refusal: st.builds(
        m.Refusal,
        code=st.sampled_from(ErrorCode),
        message=names,
        supported_versions=st.lists(versions, max_size=16).map(tuple),
    ),
    m.Error: st.builds(
        m.Error, code=st.sampled_from(ErrorCode), message=texts, request_id=st.none() | uints
    ),
    m.ModelBegin: model_begins(),
    m.ModelChunk: st.builds(
        m.ModelChunk,
        offset=st.integers(0, 2**31 - 1),
        data=st.binary(min_size=1, max_size=300).map(memoryview),
    ),
    m.ModelEnd: st.builds(m.ModelEnd, name=names),
    m.ModelLoaded: st.builds(m.ModelLoaded, name=names, sha256=digests),
    m.ModelKeep: st.builds(
        m.ModelKeep, name=names, size=st.integers(1, 2**31 - 1), sha256=digests, terms=terms
    ),
    m.ModelLoadFailed: st.builds(
        m.ModelLoadFailed,
        name=names,
        sha256=digests,
        code=st.sampled_from(m.LoadFailure),
        reason=names,
    ),
    m.Grant: grants(),
    m.UsageReport: st.builds(
        lambda seq, served, share: m.UsageReport(
            seq=seq, served_total=served, requests_total=served // share
        ),
        uints,
        uints,
        st.integers(1, 64),
    ),
    m.UsageAck: st.builds(m.UsageAck, seq=uints, served_total=uints),
    m.Block: st.builds(m.Block, block_id=st.integers(1, MAX_UINT), reason=texts),
    m.BlockAck: st.builds(m.BlockAck, block_id=st.integers(1, MAX_UINT)),
    m.Demand: st.integers(0, MAX_GRANT_UNITS).flatmap(
        lambda units: st.builds(
            m.Demand,
            seq=uints,
            units=st.just(units),
            parked_requests=st.just(0) if units == 0 else st.integers(1, MAX_GRANT_UNITS),
            granted_total=uints,
        )
    ),
    m.Unblock: st.builds(m.Unblock),
    m.Heartbeat: st.builds(m.Heartbeat, seq=uints),
    m.Recall: st.builds(m.Recall, recall_id=uints, units=st.integers(1, MAX_GRANT_UNITS)),
    m.Returned: st.builds(
        lambda recall_id, returned, served, share, final: m.Returned(
            recall_id=recall_id,
            returned_total=returned,
            served_total=served,
            requests_total=served // share,
            final=final or recall_id is None,
        ),
        st.none() | uints,
        uints,
        uints,
        st.integers(1, 64),
        st.booleans(),
    ),
    m.ReturnAck: st.builds(m.ReturnAck, recall_id=st.none() | uints, returned_total=uints),
    m.InferenceRequest: st.builds(
        m.InferenceRequest, request_id=uints, model=names, inputs=tensor_tuples, wait=waits
    ),
    m.Waiting: st.builds(m.Waiting, request_id=uints, position=uints),
    m.InferenceResult: st.builds(
        m.InferenceResult,
        request_id=uints,
        outputs=tensor_tuples,
        inferences_left=uints,
        cost=st.integers(1, MAX_GRANT_UNITS),
    ),
    m.ModelInfoRequest: st.builds(m.ModelInfoRequest, request_id=uints),
    m.ModelInfo: st.builds(
        m.ModelInfo,
        request_id=uints,
        models=st.lists(models, max_size=3).map(tuple),
        inferences_left=uints,
        state=st.sampled_from(m.EnclaveState),
    ),
}

any_message = st.one_of(*MESSAGES.values())
