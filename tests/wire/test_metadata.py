"""Shared model metadata on the wire (protocol version 3): keys and sizes in the header,
values in the payload, every size checked before a byte is read, hostile frames refused.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from drm_wire import messages as m
from drm_wire.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from drm_wire.framing import Frame
from drm_wire.limits import MAX_METADATA_BYTES, MAX_METADATA_KEY_LEN, MAX_METADATA_KEYS
from drm_wire.model.terms import Terms, TermsError

from .helpers import decode_all, encode

DIGEST = hashlib.sha256(b"model").digest()
SHARED = Terms(share_metadata=("labels", "vocab"))
LABELS = "\n".join(f"class {i} é" for i in range(2000))  # past a header string (4 KiB)


def _begin_header(entries: list[Any], terms: Terms = SHARED) -> dict[str, Any]:
    return {"type": "model_begin", "name": "m", "size": 10, "sha256": DIGEST,
            "terms": terms.to_mapping(), "metadata": entries}  # fmt: skip


def test_values_larger_than_a_header_string_travel_as_payload() -> None:
    begin = m.ModelBegin(
        name="m", size=10, sha256=DIGEST, terms=SHARED,
        metadata=(("labels", LABELS), ("vocab", "")),
    )  # fmt: skip
    header, payload = begin.to_wire()
    assert header["metadata"] == [
        {"key": "labels", "size": len(LABELS.encode())},
        {"key": "vocab", "size": 0},
    ]
    assert b"".join(bytes(p) for p in payload) == LABELS.encode()
    (decoded,) = decode_all(encode(begin))
    assert isinstance(decoded, m.ModelBegin)
    assert decoded.metadata == begin.metadata
    assert decoded.terms.share_metadata == ("labels", "vocab")


def test_model_info_carries_each_models_metadata_in_order() -> None:
    def model(name: str, metadata: m.Metadata) -> m.ModelDescription:
        return m.ModelDescription(name=name, sha256=DIGEST, inputs=(), outputs=(), terms=SHARED,
                                  metadata=metadata)  # fmt: skip

    info = m.ModelInfo(
        request_id=1, inferences_left=3, state=m.EnclaveState.SERVING,
        models=(model("a", (("labels", "x\ny"),)), model("b", ()),
                model("c", (("labels", LABELS), ("vocab", "日本")))),
    )  # fmt: skip
    (decoded,) = decode_all(encode(info), chunk=777)
    assert isinstance(decoded, m.ModelInfo)
    assert [d.metadata for d in decoded.models] == [d.metadata for d in info.models]


@pytest.mark.parametrize(
    ("entries", "payload", "problem"),
    [
        ([{"key": "labels", "size": 10}], b"short", "runs past the payload"),
        ([{"key": "labels", "size": 2}], b"ok and more", "no metadata entry accounts"),
        ([], b"stray", "no metadata entry accounts"),
        ([{"key": "labels", "size": 2}], b"\xff\xfe", "not UTF-8"),
        ([{"key": "labels", "size": 2}, {"key": "labels", "size": 2}], b"abcd", "distinct"),
        ([{"key": "vocab", "size": 1}, {"key": "labels", "size": 1}], b"ab", "sorted"),
        ([{"key": "secret", "size": 1}], b"s", "its terms do not share"),
        ([{"key": "bad\nkey", "size": 1}], b"s", "printable"),
        ([{"key": "k" * (MAX_METADATA_KEY_LEN + 1), "size": 1}], b"s", "printable"),
        ([{"key": "labels", "size": -1}], b"", "between 0 and"),
        ([{"key": "labels", "size": MAX_METADATA_BYTES + 1}], b"", "between 0 and"),
        ([{"key": "labels", "size": MAX_METADATA_BYTES}, {"key": "vocab", "size": 1}],
         b"a" * (MAX_METADATA_BYTES + 1), "values too large"),
        ([{"key": "labels"}], b"", "missing"),
        ([{"key": "labels", "size": 1, "more": 1}], b"a", "unknown field"),
        (["labels"], b"", "must be a map"),
        ({"labels": 1}, b"", "must be a list"),
        ([{"key": f"k{i:02}", "size": 0} for i in range(MAX_METADATA_KEYS + 1)], b"",
         "at most"),
    ],
)  # fmt: skip
def test_hostile_metadata_in_model_begin_is_refused(
    entries: Any, payload: bytes, problem: str
) -> None:
    frame = Frame(_begin_header(entries), memoryview(payload))
    with pytest.raises(RemoteProtocolError, match=problem):
        m.from_frame(frame)


def test_hostile_metadata_in_model_info_is_refused() -> None:
    def frame(payload: bytes) -> Frame:
        entry = {
            "name": "a", "sha256": DIGEST, "inputs": [], "outputs": [],
            "terms": SHARED.to_mapping(), "metadata": [{"key": "labels", "size": 4}],
        }  # fmt: skip
        header = {"type": "model_info", "request_id": 1, "inferences_left": 0,
                  "state": "serving", "models": [entry]}  # fmt: skip
        return Frame(header, memoryview(payload))

    with pytest.raises(RemoteProtocolError, match="runs past"):
        m.from_frame(frame(b"ab"))
    with pytest.raises(RemoteProtocolError, match="no metadata entry accounts"):
        m.from_frame(frame(b"abcdef"))
    with pytest.raises(RemoteProtocolError, match="not UTF-8"):
        m.from_frame(frame(b"\xc3\x28ab"))
    info = m.from_frame(frame(b"abcd"))
    assert isinstance(info, m.ModelInfo)
    assert info.models[0].metadata == (("labels", "abcd"),)


def test_the_limits_are_checked_when_built_too() -> None:
    with pytest.raises(LocalProtocolError, match="too large") as info:
        m.ModelBegin(name="m", size=1, sha256=DIGEST, terms=SHARED,
                     metadata=(("labels", "x" * (MAX_METADATA_BYTES + 1)),))  # fmt: skip
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(LocalProtocolError, match="its terms do not share"):
        m.ModelBegin(name="m", size=1, sha256=DIGEST, metadata=(("labels", "x"),))
    with pytest.raises(LocalProtocolError, match="not valid text"):
        m.ModelBegin(name="m", size=1, sha256=DIGEST, terms=SHARED,
                     metadata=(("labels", "\ud800"),))  # fmt: skip


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"share_metadata": "labels"}, "must be a list"),
        ({"share_metadata": ["labels", "labels"]}, "twice"),
        ({"share_metadata": [""]}, "printable"),
        ({"share_metadata": [f"k{i}" for i in range(MAX_METADATA_KEYS + 1)]}, "at most"),
        ({"preprocess": "ImageNet"}, "lower-case"),
        ({"preprocess": "x" * 33}, "lower-case"),
        ({"preprocess": 3}, "lower-case"),
    ],
)
def test_terms_refuse_bad_sharing_and_preprocess(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(TermsError, match=problem):
        Terms.from_mapping(table)


def test_terms_keep_sharing_and_preprocess_through_the_wire_map() -> None:
    terms = Terms.from_mapping({"share_metadata": ["vocab", "labels"], "preprocess": "imagenet"})
    assert terms.share_metadata == ("labels", "vocab")
    assert Terms.from_mapping(terms.to_mapping()) == terms
    assert "share_metadata=labels,vocab preprocess=imagenet" in terms.describe()
