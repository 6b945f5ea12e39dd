"""The gateway's v2 codec: JSON and binary requests in, wire tensors out, and every way a
hostile body is refused (threat model G01-G03)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from drm_consumer.gateway.v2 import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    InferRequest,
    RequestedOutput,
    V2Error,
    check_outputs,
    parse_infer,
    render_infer,
)
from drm_wire.limits import MAX_PAYLOAD_BYTES, MAX_TENSORS, MAX_WAIT_SECONDS


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


def _binary(document: dict[str, Any], *blobs: bytes) -> tuple[bytes, int]:
    header = _json(document)
    return header + b"".join(blobs), len(header)


def _pair(a_size: int = 32, b_size: int = 16) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "a", "shape": [2, 4], "datatype": "FP32",
             "parameters": {"binary_data_size": a_size}},
            {"name": "b", "shape": [2], "datatype": "INT64",
             "parameters": {"binary_data_size": b_size}},
        ]
    }  # fmt: skip


A = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.array([2, -3], dtype=np.int64)


def test_binary_inputs_become_wire_tensors_sharing_the_body() -> None:
    body, length = _binary(_pair(), A.tobytes(), B.tobytes())
    request = parse_infer(body, length)
    a, b = request.inputs
    assert (a.name, a.dtype, a.shape) == ("a", "float32", (2, 4))
    np.testing.assert_array_equal(a.to_numpy(), A)
    np.testing.assert_array_equal(b.to_numpy(), B)
    assert request.outputs is None
    assert request.wait is None
    assert not request.binary_output


def test_json_inputs_flat_or_nested_give_the_same_tensor() -> None:
    for data in (A.ravel().tolist(), A.tolist()):
        document = {"inputs": [{"name": "a", "shape": [2, 4], "datatype": "FP32", "data": data}]}
        (tensor,) = parse_infer(_json(document), None).inputs
        np.testing.assert_array_equal(tensor.to_numpy(), A)


def test_request_parameters_and_outputs_are_read() -> None:
    document = {
        "id": "r1",
        "inputs": [{"name": "b", "shape": [1], "datatype": "BOOL", "data": [True]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "k"}],
        "parameters": {"binary_data_output": False, "wait": 2.5},
    }
    request = parse_infer(_json(document), None)
    assert request.id == "r1"
    assert request.wait == 2.5
    assert request.outputs == (RequestedOutput("y", True), RequestedOutput("k", None))
    assert request.inputs[0].to_numpy().tolist() == [True]


def _one_input(**parameters: object) -> bytes:
    return _json(
        {
            "inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
            "parameters": parameters,
        }
    )


def test_tritonclient_timeout_is_the_wait_bound_and_priority_is_ignored() -> None:
    """The body tritonclient builds for ``infer(..., priority=3, timeout=2_500_000)``."""
    utils = pytest.importorskip("tritonclient.http._utils")
    tensor = pytest.importorskip("tritonclient.http").InferInput("a", [2, 4], "FP32")
    tensor.set_data_from_numpy(A, binary_data=True)
    body, json_length = utils._get_inference_request(
        inputs=[tensor], request_id="", outputs=None, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=3, timeout=2_500_000, custom_parameters=None,
    )  # fmt: skip
    assert json_length is not None
    request = parse_infer(body, json_length)
    assert request.wait == 2.5
    np.testing.assert_array_equal(request.inputs[0].to_numpy(), A)


def test_wait_wins_over_timeout_and_timeout_is_capped() -> None:
    assert parse_infer(_one_input(wait=1, timeout=9_000_000), None).wait == 1.0
    assert parse_infer(_one_input(timeout=0), None).wait == 0.0
    assert parse_infer(_one_input(timeout=2**64 - 1), None).wait == MAX_WAIT_SECONDS
    assert parse_infer(_one_input(priority=0), None).wait is None


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"priority": -1}, "parameter 'priority' must be a non-negative integer"),
        ({"priority": "1"}, "parameter 'priority' must be a non-negative integer"),
        ({"priority": True}, "parameter 'priority' must be a non-negative integer"),
        ({"priority": 2**64}, "parameter 'priority' must be a non-negative integer"),
        ({"timeout": 1.5}, "parameter 'timeout' must be a non-negative integer"),
        ({"timeout": -1}, "parameter 'timeout' must be a non-negative integer"),
        ({"sequence_id": 7}, "parameter 'sequence_id' is not supported"),
    ],
)
def test_hostile_timeout_and_priority_are_refused(
    parameters: dict[str, object], message: str
) -> None:
    with pytest.raises(V2Error, match=message) as caught:
        parse_infer(_one_input(**parameters), None)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("document_or_body", "length", "message"),
    [
        (b"{not json", None, "invalid JSON"),
        (b'{"inputs": [], "inputs": []}', None, "a key appears twice"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
         None, "NaN is not a number"),
        (b"[1]", None, "must be a JSON object"),
        (b"\xff\xfe", None, "invalid JSON"),
        ({"inputs": []}, None, "inputs must be a list of 1 to 64"),
        ({"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, None,
         "BYTES tensors are not supported"),
        ({"inputs": [{"name": "s", "shape": [1], "datatype": "BF16", "data": [1.0]}]}, None,
         "BF16 tensors are not supported"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP128", "data": [1]}]}, None,
         "unknown datatype"),
        ({"inputs": [{"name": "a", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}, None,
         "data holds 2 values, shape [3] needs 3"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "INT32", "data": [1.5]}]}, None,
         "data holds a float value, not a INT32 one"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "UINT8", "data": [256]}]}, None,
         "out of range for UINT8"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [True]}]}, None,
         "data holds a bool value"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "BOOL", "data": [1]}]}, None,
         "data holds a int value, not a BOOL one"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": ["1"]}]}, None,
         "data holds a str value"),
        ({"inputs": [{"name": "a", "shape": [-1], "datatype": "FP32", "data": []}]}, None,
         "every dim of the shape must be an integer"),
        ({"inputs": [{"name": "a", "shape": [1] * 9, "datatype": "FP32", "data": [1]}]}, None,
         "shape must be a list of at most 8 dims"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]}, None,
         "neither data nor a binary_data_size"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1],
                      "parameters": {"shared_memory_region": "r"}}]}, None,
         "parameter 'shared_memory_region' is not supported"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}, None,
         "given twice"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1], "x": 1}]},
         None, "unknown field 'x'"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
          "parameters": {"wait": -1}}, None, "parameter 'wait' must be a number"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
          "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}, None,
         "must be true or false"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
          "outputs": [{"name": "y", "parameters": {"classification": 3}}]}, None,
         "parameter 'classification' is not supported"),
    ],
)  # fmt: skip
def test_malformed_requests_are_refused_with_a_message(
    document_or_body: object, length: int | None, message: str
) -> None:
    body = document_or_body if isinstance(document_or_body, bytes) else _json(document_or_body)
    with pytest.raises(V2Error, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        parse_infer(body, length)
    assert info.value.status == 400


def test_json_nested_past_the_depth_limit_is_refused_without_recursion() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(V2Error, match="nested deeper"):
        parse_infer(b'{"inputs": ' + deep + b"}", None)
    data: object = [1.0]
    for _ in range(MAX_JSON_DEPTH):
        data = [data]
    document = {"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": data}]}
    with pytest.raises(V2Error, match=f"nested deeper than {MAX_JSON_DEPTH}"):
        parse_infer(_json(document), None)


def test_a_json_part_over_its_limit_is_413_before_parsing() -> None:
    body = b" " * (MAX_JSON_BYTES + 1)
    with pytest.raises(V2Error, match="over") as info:
        parse_infer(body, None)
    assert info.value.status == 413


def test_a_shape_over_the_payload_limit_is_413_before_any_allocation() -> None:
    huge = MAX_PAYLOAD_BYTES // 4 + 1
    document = {"inputs": [{"name": "a", "shape": [huge], "datatype": "FP32",
                            "parameters": {"binary_data_size": huge * 4}}]}  # fmt: skip
    with pytest.raises(V2Error, match="over the limit") as info:
        parse_infer(_json(document), None)
    assert info.value.status == 413


def test_too_many_inputs_are_refused() -> None:
    one = {"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}
    document = {"inputs": [dict(one, name=f"i{n}") for n in range(MAX_TENSORS + 1)]}
    with pytest.raises(V2Error, match="1 to 64 inputs"):
        parse_infer(_json(document), None)


@pytest.mark.parametrize(
    ("sizes", "blobs", "message"),
    [
        ((31, 16), (A.tobytes()[:31], B.tobytes()), "binary_data_size is 31, but shape"),
        ((32, 16), (A.tobytes(), B.tobytes()[:8]), "ends 8 bytes short"),
        ((32, 16), (A.tobytes(), B.tobytes(), b"extra"), "5 bytes of binary data that no"),
    ],
)
def test_binary_sizes_that_do_not_match_the_shapes_are_refused(
    sizes: tuple[int, int], blobs: tuple[bytes, ...], message: str
) -> None:
    body, length = _binary(_pair(*sizes), *blobs)
    with pytest.raises(V2Error, match=message):
        parse_infer(body, length)


def test_a_lying_header_length_is_refused() -> None:
    body, length = _binary(_pair(), A.tobytes(), B.tobytes())
    with pytest.raises(V2Error, match="but the body has only"):
        parse_infer(body, len(body) + 1)
    with pytest.raises(V2Error, match="invalid JSON"):  # cuts the JSON short
        parse_infer(body, length - 1)
    with pytest.raises(V2Error, match="invalid JSON"):  # takes binary bytes as JSON
        parse_infer(body, length + 4)


def test_binary_bool_must_be_zero_or_one() -> None:
    document = {"inputs": [{"name": "m", "shape": [2], "datatype": "BOOL",
                            "parameters": {"binary_data_size": 2}}]}  # fmt: skip
    body, length = _binary(document, b"\x01\x07")
    with pytest.raises(V2Error, match="only 0 and 1"):
        parse_infer(body, length)


def test_a_name_the_wire_refuses_is_a_400() -> None:
    document = {"inputs": [{"name": "", "shape": [1], "datatype": "FP32", "data": [1]}]}
    with pytest.raises(V2Error, match="input ''"):
        parse_infer(_json(document), None)


def _request(outputs: tuple[RequestedOutput, ...] | None, binary: bool) -> InferRequest:
    return InferRequest(id="7", inputs=(), outputs=outputs, binary_output=binary, wait=None)


OUTPUTS: dict[str, np.ndarray[Any, Any]] = {
    "y": np.ones((2, 4), np.float32),
    "k": np.array([5, 6], np.int64),
}


def test_outputs_render_as_json_by_default() -> None:
    body, length = render_infer(
        model="pair", request=_request(None, False), outputs=OUTPUTS, parameters={"cost": 2}
    )
    assert length is None
    document = json.loads(body)
    assert document["id"] == "7"
    assert document["parameters"] == {"cost": 2}
    assert document["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [2, 4], "data": [1.0] * 8},
        {"name": "k", "datatype": "INT64", "shape": [2], "data": [5, 6]},
    ]


def test_binary_outputs_follow_the_json_header_in_order() -> None:
    wanted = (RequestedOutput("k", True), RequestedOutput("y", False))
    body, length = render_infer(
        model="pair", request=_request(wanted, False), outputs=OUTPUTS, parameters={}
    )
    assert length is not None
    document = json.loads(body[:length])
    k, y = document["outputs"]
    assert k == {"name": "k", "datatype": "INT64", "shape": [2],
                 "parameters": {"binary_data_size": 16}}  # fmt: skip
    assert y["data"] == [1.0] * 8
    assert body[length:] == OUTPUTS["k"].tobytes()


def test_an_unknown_requested_output_is_refused_before_the_inference() -> None:
    with pytest.raises(V2Error, match="no output 'z'"):
        check_outputs(_request((RequestedOutput("z", None),), False), ["y", "k"])
