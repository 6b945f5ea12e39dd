"""Framing and codec under hostile input (threat model W01-W14).

Every case must end in exactly one exception type, RemoteProtocolError, with the right
code, raised before memory is committed to the hostile claim.
"""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drm_wire import codec
from drm_wire import messages as m
from drm_wire.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from drm_wire.framing import PAYLOAD_KEY, FrameDecoder, encode_frame
from drm_wire.limits import (
    MAX_BIN_LEN,
    MAX_CONTAINER_LEN,
    MAX_HEADER_BYTES,
    MAX_NESTING,
    MAX_PAYLOAD_BYTES,
    MAX_STR_LEN,
    MODEL_CHUNK_BYTES,
    MiB,
)
from drm_wire.protocol import CLOSED, NEED_DATA, Connection, Link, Side

from .helpers import encode
from .strategies import any_message


def prefixed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def decode_one(data: bytes) -> object:
    decoder = FrameDecoder(m.payload_limit)
    decoder.receive_data(data)
    frame = decoder.next_frame()
    return None if frame is None else m.from_frame(frame)


def rejects(
    data: bytes, match: str | None = None, code: ErrorCode | None = None
) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode_one(data)
    if code is not None:
        assert info.value.code is code
    return info.value


def test_w01_zero_length_prefix() -> None:
    rejects(b"\0\0\0\0", "empty frame header")


def test_w02_huge_prefix_is_refused_before_buffering() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        error = rejects(b"\xff\xff\xff\xff", "too large", ErrorCode.LIMIT_EXCEEDED)
        assert tracemalloc.get_traced_memory()[1] - before < MiB
    finally:
        tracemalloc.stop()
    assert error.limit == MAX_HEADER_BYTES
    assert error.got == 2**32 - 1


def test_w02_payload_above_the_cap_for_its_type_is_refused_before_allocation() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        header = {"type": "model_chunk", "offset": 0, PAYLOAD_KEY: MODEL_CHUNK_BYTES + 1}
        error = rejects(prefixed(codec.pack_header(header)), "payload too large")
        header = {"type": "heartbeat", "seq": 0, PAYLOAD_KEY: 1}
        rejects(prefixed(codec.pack_header(header)), "payload too large")
        header = {"type": "infer", PAYLOAD_KEY: 2**63 - 1}
        rejects(prefixed(codec.pack_header(header)), "payload too large")
        assert tracemalloc.get_traced_memory()[1] - before < MiB
    finally:
        tracemalloc.stop()
    assert error.limit == MODEL_CHUNK_BYTES
    assert error.code is ErrorCode.LIMIT_EXCEEDED


@pytest.mark.parametrize("bad", [-1, True, 1.5, "3", None])
def test_payload_length_must_be_a_non_negative_int(bad: object) -> None:
    rejects(prefixed(codec.pack_header({"type": "heartbeat", PAYLOAD_KEY: bad})), "payload length")


@settings(max_examples=50, deadline=None)
@given(any_message)
def test_w03_one_byte_at_a_time(message: m.Message) -> None:
    data = encode(message)
    decoder = FrameDecoder(m.payload_limit)
    frames = []
    for i in range(len(data)):
        decoder.receive_data(data[i : i + 1])
        if (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert len(frames) == 1
    assert not decoder.mid_frame


@pytest.mark.parametrize("cut", [1, 3, 4, 6, -1])
def test_w04_eof_mid_frame_is_a_protocol_error_and_clean_eof_is_closed(cut: int) -> None:
    payload = memoryview(b"x" * 100)
    data = encode(m.ModelChunk(offset=0, data=payload))
    connection = Connection(Link.CUSTODIAN, Side.CLIENT)
    connection.receive_data(data[:cut])
    assert connection.next_message() is NEED_DATA
    connection.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        connection.next_message()
    clean = Connection(Link.CUSTODIAN, Side.CLIENT)
    clean.receive_data(b"")
    assert clean.next_message() is CLOSED


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never used in msgpack
        b"\x81\xa4type",  # map header with a key and no value
        b"\xa3ab\xff",  # str with invalid UTF-8 and short
        b"\x81\xa2ab\xa2\xff\xfe",  # map whose value is invalid UTF-8
        b"\xd9",  # str8 with no length byte
        bytes(range(256)),
    ],
    ids=["c1", "truncated-map", "bad-utf8-key", "bad-utf8-value", "str8-no-len", "junk"],
)
def test_w05_malformed_bodies(body: bytes) -> None:
    rejects(prefixed(body))


def test_w06_trailing_bytes_and_two_objects() -> None:
    one = codec.pack_header({"type": "heartbeat", "seq": 1})
    rejects(prefixed(one + b"\x00"), "trailing bytes")
    rejects(prefixed(one + one), "trailing bytes")


@pytest.mark.parametrize("value", [1, "x", [1], None, True, b"x"], ids=repr)
def test_w07_top_level_must_be_a_map(value: object) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    rejects(prefixed(body), "must be a map")


def test_w09_nesting_at_the_cap_and_past_it() -> None:
    def nested(depth: int) -> dict[str, object]:
        value: object = 1
        for _ in range(depth - 1):
            value = [value]
        return {"type": "heartbeat", "x": value}

    # depth counts the top-level map as 1; this one is exactly at the cap: accepted by the
    # codec (the message layer then refuses the unknown field).
    assert codec.unpack_header(codec.pack_header(nested(MAX_NESTING)))
    error = rejects(prefixed(codec.pack_header(nested(MAX_NESTING + 1))), "nested too deeply")
    assert error.code is ErrorCode.LIMIT_EXCEEDED
    deep = b"\x81\xa1x" + b"\x91" * 1025 + b"\x01"
    rejects(prefixed(deep), "nested too deeply", ErrorCode.LIMIT_EXCEEDED)
    deep_maps = b"\x81\xa1x" * 2000 + b"\x01"
    rejects(prefixed(deep_maps))


@pytest.mark.parametrize(
    "body",
    [
        b"\xdf\xff\xff\xff\xff" + b"\0" * 11,  # map32 claiming 2**32-1 entries
        b"\xdd\xff\xff\xff\xff" + b"\0" * 11,  # array32
        b"\x81\xa1x\xdd\xff\xff\xff\xff" + b"\0" * 5,  # nested array32
        b"\x81\xa1x\xdb\xff\xff\xff\xff" + b"\0" * 5,  # str32
        b"\x81\xa1x\xc6\xff\xff\xff\xff" + b"\0" * 5,  # bin32
    ],
    ids=["map32", "array32", "nested-array32", "str32", "bin32"],
)
def test_w10_huge_container_claims_in_a_tiny_frame(body: bytes) -> None:
    rejects(prefixed(body))


@pytest.mark.parametrize("wrap", ["list", "map", "both"])
def test_nesting_cap_counts_maps_and_lists_alike(wrap: str) -> None:
    def nested(depth: int) -> dict[str, object]:
        value: object = 1
        for level in range(depth - 1):
            as_map = wrap == "map" or (wrap == "both" and level % 2)
            value = {"k": value} if as_map else [value]
        return {"type": "heartbeat", "x": value}

    assert codec.unpack_header(codec.pack_header(nested(MAX_NESTING)))
    rejects(
        prefixed(codec.pack_header(nested(MAX_NESTING + 1))),
        "nested too deeply",
        ErrorCode.LIMIT_EXCEEDED,
    )


@pytest.mark.parametrize(
    "value",
    [[{b"k": 1}], {"a": {b"k": 1}}, [[0, {"a": [{b"k": 1}]}]]],
    ids=["map-in-list", "map-in-map", "deep"],
)
def test_keys_of_nested_maps_must_be_strings(value: object) -> None:
    body = msgpack.packb({"type": "heartbeat", "x": value}, use_bin_type=True)
    rejects(prefixed(body), "header keys must be strings")


@pytest.mark.parametrize(
    "body",
    [
        b"\x81\xa1x\xd4\x05\x00",  # fixext1, type 5
        b"\x81\xa1x\xd6\xff\x00\x00\x00\x00",  # timestamp32 (ext -1)
        b"\x81\xa1x\xc7\x03\xff\x00\x00\x00",  # timestamp ext -1 with a bad length
        b"\x81\x01\x02",  # int key
        b"\x81\xc4\x01x\x01",  # bytes key
        b"\x82\xa1x\x01\xa1x\x02",  # duplicate key
    ],
    ids=["ext5", "timestamp", "timestamp-bad-len", "int-key", "bytes-key", "dup-key"],
)
def test_w11_ext_types_odd_keys_and_duplicates(body: bytes) -> None:
    rejects(prefixed(body))


def test_string_binary_and_container_limits_at_and_past() -> None:
    def header(value: object) -> bytes:
        return bytes(msgpack.packb({"x": value}, use_bin_type=True))

    for value in ("s" * MAX_STR_LEN, b"b" * MAX_BIN_LEN, [0] * MAX_CONTAINER_LEN):
        assert codec.unpack_header(header(value))["x"] == value
    for value in ("s" * (MAX_STR_LEN + 1), b"b" * (MAX_BIN_LEN + 1), [0] * (MAX_CONTAINER_LEN + 1)):
        with pytest.raises(RemoteProtocolError) as info:
            codec.unpack_header(header(value))
        assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    many_keys = {f"k{i}": 0 for i in range(MAX_CONTAINER_LEN + 1)}
    with pytest.raises(RemoteProtocolError):
        codec.unpack_header(msgpack.packb(many_keys))


def header_of_exactly(size: int) -> bytes:
    """A valid header map of exactly ``size`` bytes, padded with strings under MAX_STR_LEN."""
    pad = [""]
    body = codec.pack_header({"type": "heartbeat", "pad": pad})
    # Each step adds at most 1,000 characters, so str16 headers never change size class
    # under us by more than the step; the loop ends in at most size / 1,000 * 2 steps.
    while len(body) < size:
        if len(pad[-1]) >= 4000:
            pad.append("")
        else:
            pad[-1] += "p" * min(1000, size - len(body), 4000 - len(pad[-1]))
        body = codec.pack_header({"type": "heartbeat", "pad": pad})
    assert len(body) == size
    return body


def test_header_size_at_the_limit_and_past_it() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(prefixed(header_of_exactly(MAX_HEADER_BYTES)))
    frame = decoder.next_frame()
    assert frame is not None
    assert frame.header["type"] == "heartbeat"
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", MAX_HEADER_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match="frame header too large") as info:
        decoder.next_frame()
    assert info.value.limit == MAX_HEADER_BYTES
    body = header_of_exactly(MAX_HEADER_BYTES + 1)
    with pytest.raises(LocalProtocolError, match="header too large"):
        encode_frame(codec.unpack_header(body))


def test_payload_at_the_limit_and_past_it() -> None:
    decoder = FrameDecoder()
    at = prefixed(codec.pack_header({"type": "x", PAYLOAD_KEY: MAX_PAYLOAD_BYTES}))
    decoder.receive_data(at)
    assert decoder.next_frame() is None  # accepted, waiting for the payload
    past = prefixed(codec.pack_header({"type": "x", PAYLOAD_KEY: MAX_PAYLOAD_BYTES + 1}))
    rejects(past, "payload too large", ErrorCode.LIMIT_EXCEEDED)
    with pytest.raises(LocalProtocolError, match="payload too large"):
        encode_frame({"type": "x"}, [memoryview(bytearray(MAX_PAYLOAD_BYTES + 1))])


def test_model_chunk_payload_at_its_cap() -> None:
    data = memoryview(bytearray(MODEL_CHUNK_BYTES))
    (message,) = [decode_one(encode(m.ModelChunk(offset=0, data=data)))]
    assert isinstance(message, m.ModelChunk)
    assert message.data.nbytes == MODEL_CHUNK_BYTES


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_w14_random_bytes_raise_only_the_protocol_error(data: bytes) -> None:
    connection = Connection(Link.CONSUMER, Side.SERVER)
    try:
        connection.receive_data(data)
        # Every message consumes at least 5 bytes, so at most len(data) iterations.
        for _ in range(len(data) + 1):
            if connection.next_message() in (NEED_DATA, CLOSED):
                break
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(any_message, st.data())
def test_w14_mutated_valid_frames_raise_only_the_protocol_error(
    message: m.Message, data: st.DataObject
) -> None:
    raw = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] = data.draw(st.integers(0, 255))
    decoder = FrameDecoder(m.payload_limit)
    decoder.receive_data(bytes(raw))
    try:
        # Each frame consumes at least 5 bytes, so this loop ends.
        while (frame := decoder.next_frame()) is not None:
            m.from_frame(frame)
    except RemoteProtocolError:
        pass


def test_max_size_headers_back_to_back_on_one_decoder() -> None:
    frame = prefixed(header_of_exactly(MAX_HEADER_BYTES))
    decoder = FrameDecoder()
    for _ in range(3):
        decoder.receive_data(frame)
        decoded = decoder.next_frame()
        assert decoded is not None
        assert decoded.header["type"] == "heartbeat"
