"""FrameDecoder's zero-copy paths: receiving into the payload, and payload sinks.

The bytes must come out the same as through ``receive_data``, every limit must still be
checked before a sink is asked for memory, and misuse by the I/O layer must fail loudly.
"""

from __future__ import annotations

import struct

import msgpack
import pytest

from drm_wire import messages as m
from drm_wire.codec import Header
from drm_wire.errors import ErrorCode, RemoteProtocolError
from drm_wire.framing import PAYLOAD_KEY, FrameDecoder, encode_frame
from drm_wire.limits import MODEL_CHUNK_BYTES

PAYLOAD = bytes(range(256)) * 40  # 10 KiB


def frame(header: Header, payload: bytes = PAYLOAD) -> bytes:
    return b"".join(bytes(part) for part in encode_frame(header, [payload]))


def chunk_frame(offset: int = 0, payload: bytes = PAYLOAD) -> bytes:
    return frame({"type": "model_chunk", "offset": offset}, payload)


def announce(header: Header, payload_len: int) -> bytes:
    body: bytes = msgpack.packb({**header, PAYLOAD_KEY: payload_len})
    return struct.pack(">I", len(body)) + body


def test_payload_buffer_is_none_between_payloads() -> None:
    decoder = FrameDecoder(m.payload_limit)
    assert decoder.payload_buffer() is None
    decoder.receive_data(chunk_frame()[:10])  # part of a header
    assert decoder.next_frame() is None
    assert decoder.payload_buffer() is None
    with pytest.raises(RuntimeError, match="no payload is being received"):
        decoder.payload_filled(1)


@pytest.mark.parametrize("step", [1, 1000, 4096, len(PAYLOAD)])
def test_receiving_into_the_payload_in_any_slicing(step: int) -> None:
    data = chunk_frame(offset=7) + frame({"type": "heartbeat", "seq": 1}, b"")
    header_end = len(data) - len(PAYLOAD) - len(frame({"type": "heartbeat", "seq": 1}, b""))
    decoder = FrameDecoder(m.payload_limit)
    decoder.receive_data(data[:header_end])
    assert decoder.next_frame() is None
    pos = header_end
    while (target := decoder.payload_buffer()) is not None:
        assert target.nbytes == header_end + len(PAYLOAD) - pos  # exactly what is still due
        count = min(step, target.nbytes)
        target[:count] = data[pos : pos + count]
        decoder.payload_filled(count)
        pos += count
        if pos < header_end + len(PAYLOAD):
            assert decoder.next_frame() is None
    got = decoder.next_frame()
    assert got is not None
    assert got.header == {"type": "model_chunk", "offset": 7}
    assert got.payload == PAYLOAD
    assert not decoder.mid_frame
    decoder.receive_data(data[pos:])  # what follows the payload goes the usual way
    after = decoder.next_frame()
    assert after is not None
    assert after.header == {"type": "heartbeat", "seq": 1}


@pytest.mark.parametrize("count", [0, -1, len(PAYLOAD) + 1])
def test_payload_filled_outside_what_is_due_is_a_bug(count: int) -> None:
    decoder = FrameDecoder(m.payload_limit)
    decoder.receive_data(announce({"type": "model_chunk", "offset": 0}, len(PAYLOAD)))
    assert decoder.next_frame() is None
    with pytest.raises(RuntimeError, match=rf"payload_filled\({count}\) with {len(PAYLOAD)} bytes"):
        decoder.payload_filled(count)


def test_eof_mid_payload_ends_receiving_into_it() -> None:
    decoder = FrameDecoder(m.payload_limit)
    decoder.receive_data(announce({"type": "model_chunk", "offset": 0}, len(PAYLOAD)))
    assert decoder.next_frame() is None
    assert decoder.payload_buffer() is not None
    decoder.receive_data(b"")
    assert decoder.payload_buffer() is None
    assert decoder.next_frame() is None
    assert decoder.mid_frame  # the connection turns this into "closed mid-frame"


class Sink:
    """Hands out slices of one buffer and records what it was asked."""

    def __init__(self, size: int = 4 * len(PAYLOAD), refuse: bool = False) -> None:
        self.memory = bytearray(size)
        self.asked: list[tuple[Header, int]] = []
        self.refuse = refuse

    def __call__(self, header: Header, payload_len: int) -> memoryview | None:
        self.asked.append((dict(header), payload_len))
        if self.refuse:
            return None
        return memoryview(self.memory)[:payload_len]


@pytest.mark.parametrize("split", [None, 0, 5, 5000])
def test_a_sink_gets_the_payload_in_place(split: int | None) -> None:
    sink = Sink()
    decoder = FrameDecoder(m.payload_limit)
    decoder.set_payload_sink(sink)
    data = chunk_frame(offset=3) + chunk_frame(offset=4, payload=b"next")
    if split is None:
        decoder.receive_data(data)  # the whole payload already buffered
    else:
        cut = len(data) - len(PAYLOAD) - len(chunk_frame(payload=b"next")) + split
        decoder.receive_data(data[:cut])
        first = decoder.next_frame()
        assert first is None
        decoder.receive_data(data[cut:])
    got = decoder.next_frame()
    assert got is not None
    assert got.payload.obj is sink.memory  # no buffer of the decoder's own
    assert bytes(sink.memory[: len(PAYLOAD)]) == PAYLOAD
    assert sink.asked[0] == ({"type": "model_chunk", "offset": 3}, len(PAYLOAD))
    second = decoder.next_frame()  # the bytes after the payload were kept
    assert second is not None
    assert bytes(second.payload) == b"next"


def test_a_sink_that_declines_leaves_the_decoder_its_own_buffers() -> None:
    sink = Sink(refuse=True)
    decoder = FrameDecoder(m.payload_limit)
    decoder.set_payload_sink(sink)
    decoder.receive_data(chunk_frame())
    got = decoder.next_frame()
    assert got is not None
    assert got.payload == PAYLOAD
    assert got.payload.obj is not sink.memory
    decoder.set_payload_sink(None)
    decoder.receive_data(chunk_frame())
    assert decoder.next_frame() is not None
    assert len(sink.asked) == 1  # not asked once removed


def test_a_sink_is_not_asked_for_frames_without_payload_nor_past_the_limit() -> None:
    sink = Sink()
    decoder = FrameDecoder(m.payload_limit)
    decoder.set_payload_sink(sink)
    decoder.receive_data(frame({"type": "heartbeat", "seq": 1}, b""))
    assert decoder.next_frame() is not None
    decoder.receive_data(announce({"type": "model_chunk", "offset": 0}, MODEL_CHUNK_BYTES + 1))
    with pytest.raises(RemoteProtocolError, match="payload too large") as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED
    assert sink.asked == []  # refused before any memory was asked for


@pytest.mark.parametrize(
    "bad",
    [
        lambda n: bytearray(n),  # not a memoryview
        lambda n: memoryview(bytes(n)),  # read-only
        lambda n: memoryview(bytearray(n + 1)),  # too long
        lambda n: memoryview(bytearray(n))[:-1],  # too short
        lambda n: memoryview(bytearray(2 * n))[::2],  # not contiguous
        lambda n: memoryview(bytearray(n)).cast("H"),  # not bytes (n is even)
    ],
)
def test_a_sink_must_return_exactly_the_payload_size(bad: object) -> None:
    decoder = FrameDecoder(m.payload_limit)
    decoder.set_payload_sink(lambda header, n: bad(n))  # type: ignore[operator]
    decoder.receive_data(chunk_frame())
    with pytest.raises(TypeError, match="payload sink must return None or a writable"):
        decoder.next_frame()


def test_model_chunk_sink_offers_only_chunks_with_an_int_offset() -> None:
    asked: list[tuple[int, int]] = []

    def place(offset: int, nbytes: int) -> memoryview | None:
        asked.append((offset, nbytes))
        return None

    sink = m.ModelChunk.payload_sink(place)
    assert sink({"type": "model_chunk", "offset": 8}, 5) is None
    assert sink({"type": "model_chunk", "offset": "8"}, 5) is None
    assert sink({"type": "model_chunk"}, 5) is None
    assert sink({"type": "inference_request", "offset": 8}, 5) is None
    assert sink({"type": ["model_chunk"], "offset": 8}, 5) is None
    assert asked == [(8, 5)]
