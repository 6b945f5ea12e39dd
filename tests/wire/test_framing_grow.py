"""FrameDecoder with ``grow_payloads``: memory follows the bytes received (I17)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drm_wire.codec import pack_header
from drm_wire.framing import PAYLOAD_KEY, FrameDecoder, encode_frame
from drm_wire.limits import MiB


def _announce(payload_len: int) -> bytes:
    body = pack_header({"type": "infer", PAYLOAD_KEY: payload_len})
    return struct.pack(">I", len(body)) + body


def test_an_announced_payload_costs_only_what_arrived() -> None:
    decoder = FrameDecoder(grow_payloads=True)
    decoder.receive_data(_announce(64 * MiB) + b"x")
    assert decoder.next_frame() is None
    assert decoder.held_bytes == 1
    assert decoder.payload_due == 64 * MiB - 1
    assert decoder.payload_buffer() is None  # no room until the reader makes it
    assert decoder.mid_frame


def test_an_eager_decoder_allocates_the_announced_size() -> None:
    """What growing is for: without it, one byte commits the whole announced size."""
    decoder = FrameDecoder()
    decoder.receive_data(_announce(8 * MiB) + b"x")
    assert decoder.next_frame() is None
    assert decoder.held_bytes == 8 * MiB


def test_a_grown_payload_is_the_bytes_sent_and_what_follows_is_kept() -> None:
    decoder = FrameDecoder(grow_payloads=True)
    payload = bytes(range(256)) * 64
    second = b"".join(encode_frame({"type": "heartbeat"}))
    decoder.receive_data(_announce(len(payload)) + payload[:10])
    assert decoder.next_frame() is None
    decoder.receive_data(payload[10:5000])
    assert decoder.next_frame() is None
    assert decoder.held_bytes == 5000
    decoder.receive_data(payload[5000:] + second)
    frame = decoder.next_frame()
    assert frame is not None
    assert bytes(frame.payload) == payload
    assert frame.header == {"type": "infer"}
    assert decoder.payload_due == 0
    assert decoder.held_bytes == len(second)
    follow = decoder.next_frame()
    assert follow is not None
    assert follow.header == {"type": "heartbeat"}
    assert decoder.held_bytes == 0
    assert not decoder.mid_frame


def test_a_payload_that_came_with_its_header_is_not_copied() -> None:
    decoder = FrameDecoder(grow_payloads=True)
    decoder.receive_data(b"".join(encode_frame({"type": "infer"}, [b"abc"])))
    frame = decoder.next_frame()
    assert frame is not None
    assert bytes(frame.payload) == b"abc"


def test_end_of_stream_mid_growing_payload_is_mid_frame() -> None:
    decoder = FrameDecoder(grow_payloads=True)
    decoder.receive_data(_announce(100) + b"12")
    assert decoder.next_frame() is None
    decoder.receive_data(b"")
    assert decoder.next_frame() is None
    assert decoder.eof
    assert decoder.mid_frame


@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=4),
    cuts=st.lists(st.integers(1, 700), min_size=1, max_size=30),
)
def test_growing_decodes_what_eager_decodes(sizes: list[int], cuts: list[int]) -> None:
    """Any slicing of any frames: the same frames, with or without growing."""
    wire = b"".join(
        b"".join(encode_frame({"type": "infer", "n": i}, [bytes([i]) * size] if size else []))
        for i, size in enumerate(sizes)
    )
    results = []
    for grow in (False, True):
        decoder = FrameDecoder(grow_payloads=grow)
        frames = []
        position = 0
        for cut in [*cuts, len(wire)]:
            decoder.receive_data(wire[position : position + cut])
            position += cut
            while (frame := decoder.next_frame()) is not None:
                frames.append((frame.header["n"], bytes(frame.payload)))
            if position >= len(wire):
                break
        results.append(frames)
        assert decoder.held_bytes == 0
    assert results[0] == results[1]
    assert [n for n, _ in results[1]] == list(range(len(sizes)))


def test_growing_never_holds_more_than_received() -> None:
    decoder = FrameDecoder(grow_payloads=True)
    decoder.receive_data(_announce(1000))
    assert decoder.next_frame() is None
    received = 0
    for _ in range(9):
        decoder.receive_data(b"z" * 100)
        received += 100
        assert decoder.next_frame() is None
        assert decoder.held_bytes == received
    decoder.receive_data(b"z" * 100)
    assert decoder.next_frame() is not None


@pytest.mark.parametrize("grow", [False, True])
def test_payload_due_counts_down(grow: bool) -> None:
    decoder = FrameDecoder(grow_payloads=grow)
    decoder.receive_data(_announce(50) + b"a" * 20)
    assert decoder.next_frame() is None
    assert decoder.payload_due == 30


def test_room_made_for_a_read_is_offered_and_held_until_filled() -> None:
    """The reader's path: grow by what it charged, receive into the room, report it."""
    decoder = FrameDecoder(grow_payloads=True)
    payload = bytes(range(256)) * 40
    decoder.receive_data(_announce(len(payload)) + payload[:10])
    assert decoder.next_frame() is None
    assert decoder.payload_room == 0
    decoder.grow_payload(4000)
    assert decoder.payload_room == 4000
    assert decoder.held_bytes == 4010  # the room counts, filled or not
    room = decoder.payload_buffer()
    assert room is not None
    with room:
        assert room.nbytes == 4000
        room[:1500] = payload[10:1510]
    decoder.payload_filled(1500)
    assert (decoder.payload_received, decoder.payload_room) == (1510, 2500)
    decoder.receive_data(payload[1510:5000])  # the room first, then appended
    assert decoder.held_bytes == 5000
    decoder.grow_payload(10**9)  # never past what is due
    assert decoder.held_bytes == len(payload)
    room = decoder.payload_buffer()
    assert room is not None
    with room:
        room[:] = payload[5000:]
    decoder.payload_filled(len(payload) - 5000)
    frame = decoder.next_frame()
    assert frame is not None
    assert bytes(frame.payload) == payload
    assert decoder.held_bytes == 0


def test_storage_cannot_grow_under_a_view_handed_out() -> None:
    """Growing may move the storage: refused while a view of it could be left dangling."""
    decoder = FrameDecoder(grow_payloads=True)
    decoder.receive_data(_announce(100_000))
    assert decoder.next_frame() is None
    decoder.grow_payload(10)
    view = decoder.payload_buffer()
    assert view is not None
    with pytest.raises(RuntimeError, match="view of the growing payload"):
        decoder.grow_payload(50_000)
    view.release()
    decoder.grow_payload(50_000)
    assert decoder.payload_room == 50_000


@pytest.mark.parametrize("room", [0, -5])
def test_growing_by_nothing_or_without_a_growing_payload_is_a_bug(room: int) -> None:
    decoder = FrameDecoder(grow_payloads=True)
    with pytest.raises(RuntimeError, match="no growing payload"):
        decoder.grow_payload(100)
    decoder.receive_data(_announce(100))
    assert decoder.next_frame() is None
    with pytest.raises(RuntimeError, match="no growing payload"):
        decoder.grow_payload(room)
    eager = FrameDecoder()
    eager.receive_data(_announce(100))
    assert eager.next_frame() is None
    with pytest.raises(RuntimeError, match="no growing payload"):
        eager.grow_payload(10)
