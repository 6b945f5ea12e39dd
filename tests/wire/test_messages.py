"""Every message type: round trips, exact types, required and unknown fields."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum, StrEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drm_wire import codec
from drm_wire import messages as m
from drm_wire.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from drm_wire.framing import Frame
from drm_wire.model.terms import Terms
from drm_wire.protocol import Connection, Link, Side, State

from .helpers import decode_all, encode, normalise
from .strategies import MESSAGES, any_message


def test_every_message_type_has_a_strategy() -> None:
    assert set(MESSAGES) == set(m.MESSAGE_TYPES.values())


MESSAGE_CLASSES = sorted(MESSAGES, key=lambda cls: cls.TYPE)


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=[cls.TYPE for cls in MESSAGE_CLASSES])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(cls: type[m.Message], data: st.DataObject) -> None:
    message = data.draw(MESSAGES[cls])
    (decoded,) = decode_all(encode(message))
    assert type(decoded) is cls
    assert normalise(decoded) == normalise(message)


@settings(max_examples=60, deadline=None)
@given(st.lists(any_message, min_size=1, max_size=5), st.none() | st.integers(1, 7))
def test_stream_of_messages_in_slices_or_all_at_once(
    messages: list[m.Message], chunk: int | None
) -> None:
    data = b"".join(encode(message) for message in messages)
    decoded = decode_all(data, chunk=chunk)
    assert [normalise(x) for x in decoded] == [normalise(x) for x in messages]


def _frame(header: dict[str, Any]) -> Frame:
    return Frame(dict(header), memoryview(b""))


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        m.from_frame(_frame({"type": "launch_missiles"}))
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        m.from_frame(_frame({"seq": 1}))
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        m.from_frame(_frame({"type": 7}))


def test_missing_and_unknown_fields_are_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="served_total: missing") as info:
        m.from_frame(_frame({"type": "usage_report", "seq": 1, "requests_total": 0}))
    assert info.value.field == "served_total"
    # Version 2: a report always says how many requests its inferences came in.
    with pytest.raises(RemoteProtocolError, match="requests_total: missing") as info:
        m.from_frame(_frame({"type": "usage_report", "seq": 1, "served_total": 2}))
    with pytest.raises(RemoteProtocolError, match="a request costs at least one inference"):
        m.from_frame(
            _frame({"type": "usage_report", "seq": 1, "served_total": 2, "requests_total": 3})
        )
    # ... and a model always travels with its terms.
    with pytest.raises(RemoteProtocolError, match="terms: missing") as info:
        m.from_frame(_frame({"type": "model_begin", "name": "m", "size": 1, "sha256": bytes(32)}))
    with pytest.raises(RemoteProtocolError, match="extra: unknown field") as info:
        m.from_frame(
            _frame(
                {"type": "usage_report", "seq": 1, "served_total": 2, "requests_total": 1,
                 "extra": 0}
            )
        )  # fmt: skip
    assert info.value.field == "extra"


# W08: the int fields refuse everything that is not exactly an int in range.
NOT_UINTS = [True, False, 1.0, -1, 2**63, 2**64 - 1, "5", b"5", None, [1]]


@pytest.mark.parametrize("bad", NOT_UINTS, ids=repr)
def test_int_fields_are_exact(bad: object) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        m.from_frame(
            _frame({"type": "usage_report", "seq": bad, "served_total": 1, "requests_total": 1})
        )
    assert info.value.field == "seq"
    with pytest.raises(LocalProtocolError):
        m.UsageReport(seq=bad, served_total=1)  # type: ignore[arg-type]


# Found by fuzzing (tests/fuzz): a hello whose ``versions`` is the int 0, as the enclave
# receives it on the consumer port before any authentication.
HELLO_WITH_INT_VERSIONS = bytes.fromhex(
    "0000002684a474797065a568656c6c6fa876657273696f6e7300a4726f6c6500a8736f66747761726500"
)


def test_hello_whose_versions_is_an_int_is_a_protocol_error_that_closes() -> None:
    conn = Connection(Link.CONSUMER, Side.SERVER)
    conn.receive_data(HELLO_WITH_INT_VERSIONS)
    with pytest.raises(RemoteProtocolError, match="versions: must be a list") as info:
        conn.next_message()
    assert info.value.field == "versions"
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert conn.state is State.CLOSED
    assert conn.send_error(conn.error_for(info.value))  # the peer can be told why


# A list of versions is exactly a msgpack array: an int, a binary (whose bytes would read
# as versions), a string, a map or nil is refused, as the exact types promise.
NOT_VERSION_LISTS = [0, 7, b"\x01", b"", "1", {"1": 1}, None, 1.0, True]


@pytest.mark.parametrize("bad", NOT_VERSION_LISTS, ids=repr)
def test_version_lists_are_exactly_lists(bad: object) -> None:
    hello = {"type": "hello", "versions": bad, "role": "consumer", "software": "x"}
    refusal = {"type": "refusal", "code": "busy", "message": "x", "supported_versions": bad}
    for header, field in ((hello, "versions"), (refusal, "supported_versions")):
        wire = codec.unpack_header(codec.pack_header(header))  # as msgpack delivers it
        with pytest.raises(RemoteProtocolError, match=f"{field}: must be a list") as info:
            m.from_frame(_frame(wire))
        assert info.value.field == field


def test_wire_decoded_values_keep_exact_types_through_msgpack() -> None:
    # A bool survives msgpack as a bool, so True for an int is caught after a real decode.
    header = codec.unpack_header(codec.pack_header({"type": "heartbeat", "seq": True}))
    with pytest.raises(RemoteProtocolError, match="seq: must be an int"):
        m.from_frame(_frame(header))


HELD = m.HeldModel(name="m", sha256=b"x" * 32, terms_sha256=b"y" * 32)


def test_held_models_from_the_wire_are_exact_maps() -> None:
    base = {"type": "hello", "versions": [3], "role": "enclave", "software": "x"}
    entry = HELD.to_wire_entry()
    hello = m.from_frame(_frame({**base, "held": [entry]}))
    assert isinstance(hello, m.Hello)
    assert hello.held == (HELD,)
    for bad, field in (
        ([[1, 2]], "held"),
        ([{**entry, "extra": 1}], "extra"),
        ([{"name": "m", "sha256": b"x" * 32}], "terms_sha256"),
        ([{**entry, "sha256": "x" * 32}], "sha256"),
        ({"m": entry}, "held"),
    ):
        with pytest.raises(RemoteProtocolError) as info:
            m.from_frame(_frame({**base, "held": bad}))
        assert info.value.field == field, bad


def test_a_model_keep_needs_its_terms() -> None:
    header = {"type": "model_keep", "name": "m", "size": 1, "sha256": b"x" * 32}
    with pytest.raises(RemoteProtocolError) as info:
        m.from_frame(_frame(header))
    assert info.value.field == "terms"


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (m.Grant, {"grant_id": 1, "units": 0, "granted_total": 0}, "units"),
        (m.Grant, {"grant_id": 1, "units": 1_000_001, "granted_total": 2_000_000}, "units"),
        (m.Grant, {"grant_id": 1, "units": 5, "granted_total": 4}, "granted_total"),
        (m.ModelBegin, {"name": "m", "size": 0, "sha256": b"x" * 32}, "size"),
        (m.ModelBegin, {"name": "m", "size": 1, "sha256": b"x" * 31}, "sha256"),
        (m.ModelBegin, {"name": "", "size": 1, "sha256": b"x" * 32}, "name"),
        (m.ModelBegin, {"name": "a\nb", "size": 1, "sha256": b"x" * 32}, "name"),
        (m.Hello, {"versions": (), "role": "enclave", "software": "x"}, "versions"),
        (m.Hello, {"versions": (1,), "role": "custodian", "software": "x"}, "role"),
        (m.Hello, {"versions": (0,), "role": "enclave", "software": "x"}, "versions"),
        (m.Error, {"code": "no_such_code", "message": "x"}, "code"),
        # Version 3: held models, model_keep and model_load_failed.
        (m.Hello, {"versions": (3,), "role": "enclave", "software": "x", "held": 5}, "held"),
        (
            m.Hello,
            {"versions": (3,), "role": "enclave", "software": "x", "held": (HELD, HELD)},
            "held",
        ),
        (
            m.Hello,
            {"versions": (3,), "role": "enclave", "software": "x", "held": (HELD,) * 65},
            "held",
        ),
        (
            m.HeldModel,
            {"name": "m", "sha256": b"x" * 32, "terms_sha256": b"x" * 33},
            "terms_sha256",
        ),
        (m.ModelKeep, {"name": "m", "size": 0, "sha256": b"x" * 32, "terms": Terms()}, "size"),
        (m.ModelKeep, {"name": "m", "size": 1, "sha256": b"x" * 32, "terms": {"unit": 1}}, "terms"),
        (
            m.ModelLoadFailed,
            {"name": "m", "sha256": b"x" * 32, "code": "bored", "reason": "x"},
            "code",
        ),
        (
            m.ModelLoadFailed,
            {"name": "m", "sha256": b"x" * 32, "code": "too_large", "reason": ""},
            "reason",
        ),
        # Version 4: block ids, block_ack and demand, hostile values.
        (m.Block, {"block_id": 0, "reason": ""}, "block_id"),
        (m.Block, {"block_id": True, "reason": ""}, "block_id"),
        (m.BlockAck, {"block_id": 0}, "block_id"),
        (m.BlockAck, {"block_id": -1}, "block_id"),
        (m.BlockAck, {"block_id": 2**63}, "block_id"),
        (m.Demand, {"seq": -1, "units": 1, "parked_requests": 1, "granted_total": 0}, "seq"),
        (
            m.Demand,
            {"seq": 1, "units": 1_000_001, "parked_requests": 1, "granted_total": 0},
            "units",
        ),
        (m.Demand, {"seq": 1, "units": 2**64, "parked_requests": 1, "granted_total": 0}, "units"),
        (m.Demand, {"seq": 1, "units": 1.0, "parked_requests": 1, "granted_total": 0}, "units"),
        (
            m.Demand,
            {"seq": 1, "units": 5, "parked_requests": 1_000_001, "granted_total": 0},
            "parked_requests",
        ),
        (m.Demand, {"seq": 1, "units": 5, "parked_requests": 0, "granted_total": 0}, "units"),
        (m.Demand, {"seq": 1, "units": 0, "parked_requests": 2, "granted_total": 0}, "units"),
        (
            m.Demand,
            {"seq": 1, "units": 1, "parked_requests": 1, "granted_total": -5},
            "granted_total",
        ),
        (m.Error, {"code": "busy", "message": "x" * 4097}, "message"),
        (m.InferenceRequest, {"request_id": 1, "model": "m", "inputs": (), "wait": 5}, "wait"),
        (
            m.InferenceRequest,
            {"request_id": 1, "model": "m", "inputs": (), "wait": float("nan")},
            "wait",
        ),
        (m.InferenceRequest, {"request_id": 1, "model": "m", "inputs": (), "wait": -1.0}, "wait"),
        (
            m.InferenceRequest,
            {"request_id": 1, "model": "m", "inputs": (), "wait": 86_400.5},
            "wait",
        ),
        (m.InferenceRequest, {"request_id": 1, "model": "m", "inputs": [], "wait": None}, "inputs"),
        (m.ModelChunk, {"offset": 0, "data": memoryview(b"")}, "data"),
        (m.ModelChunk, {"offset": 0, "data": b"abc"}, "data"),
        (m.TensorSpec, {"name": "x", "dtype": "object", "shape": ()}, "dtype"),
        (m.TensorSpec, {"name": "x", "dtype": "float32", "shape": (-1,)}, "shape"),
    ],
)
def test_invalid_values_cannot_be_constructed(
    cls: type[Any], kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(LocalProtocolError) as info:
        cls(**kwargs)
    assert info.value.field == field


def _enum_members(value: object) -> list[Enum]:
    """Every enum member in a wire value, however deep in its lists and maps."""
    if isinstance(value, Enum):
        return [value]
    if isinstance(value, dict):
        return [e for item in value.values() for e in _enum_members(item)]
    if isinstance(value, list | tuple):
        return [e for item in value for e in _enum_members(item)]
    return []


@settings(max_examples=200, deadline=None)
@given(any_message)
def test_every_enum_field_goes_on_the_wire_as_its_value(message: m.Message) -> None:
    header, _ = message.to_wire()
    assert _enum_members(header) == []


class Colour(StrEnum):
    RED = "red"


class Step(IntEnum):
    ONE = 1


@dataclass(frozen=True, kw_only=True)
class Painted:
    """Message-shaped fields that matching annotation text missed: enums by a new name,
    and an optional one."""

    colour: Colour
    step: Step
    maybe: Colour | None = None
    layers: tuple[int, ...] = ()
    maybe_layers: tuple[int, ...] | None = None
    note: str | None = None
    count: int = 0


def test_enum_fields_are_found_by_their_type_not_their_name() -> None:
    plan = dict(m._wire_converters(Painted))

    def wire(name: str, value: object) -> object:
        convert = plan[name]
        return value if convert is None else convert(value)

    assert (type(wire("colour", Colour.RED)), type(wire("step", Step.ONE))) == (str, int)
    assert (type(wire("maybe", Colour.RED)), wire("maybe", None)) == (str, None)
    assert (wire("layers", (1, 2)), wire("maybe_layers", (3,))) == ([1, 2], [3])
    assert wire("maybe_layers", None) is None
    assert (plan["note"], plan["count"]) == (None, None)  # plain values go as they are


def test_error_codes_survive_the_wire() -> None:
    for code in ErrorCode:
        (decoded,) = decode_all(encode(m.Error(code=code, message="m", request_id=3)))
        assert isinstance(decoded, m.Error)
        assert decoded.code is code


def test_messages_are_immutable() -> None:
    message = m.Heartbeat(seq=1)
    with pytest.raises(AttributeError):
        message.seq = 2  # type: ignore[misc]


def test_payload_on_a_message_without_one_is_rejected() -> None:
    frame = Frame({"type": "heartbeat", "seq": 1}, memoryview(b"xyz"))
    with pytest.raises(RemoteProtocolError, match="carries no payload"):
        m.from_frame(frame)


def test_grant_units_wait_and_model_count_at_their_limits_and_past() -> None:
    from drm_wire.limits import MAX_GRANT_UNITS, MAX_MODELS, MAX_WAIT_SECONDS

    m.Grant(grant_id=1, units=MAX_GRANT_UNITS, granted_total=MAX_GRANT_UNITS)
    with pytest.raises(LocalProtocolError) as info:
        m.Grant(grant_id=1, units=MAX_GRANT_UNITS + 1, granted_total=MAX_GRANT_UNITS + 1)
    assert info.value.limit == MAX_GRANT_UNITS
    m.InferenceRequest(request_id=1, model="m", inputs=(), wait=MAX_WAIT_SECONDS)
    with pytest.raises(LocalProtocolError):
        m.InferenceRequest(request_id=1, model="m", inputs=(), wait=MAX_WAIT_SECONDS + 1.0)
    model = m.ModelDescription(name="m", sha256=b"\0" * 32, inputs=(), outputs=())
    info_at = m.ModelInfo(
        request_id=1, models=(model,) * MAX_MODELS, inferences_left=0, state=m.EnclaveState.SERVING
    )
    (decoded,) = decode_all(encode(info_at))
    assert isinstance(decoded, m.ModelInfo)
    assert len(decoded.models) == MAX_MODELS
    with pytest.raises(LocalProtocolError):
        m.ModelInfo(
            request_id=1,
            models=(model,) * (MAX_MODELS + 1),
            inferences_left=0,
            state=m.EnclaveState.SERVING,
        )
