"""The sans-IO model receiver: contiguous chunks into one buffer, size and SHA-256 checks."""

from __future__ import annotations

import hashlib
import mmap
import threading
import tracemalloc

import pytest

from drm_enclave import model_receiver
from drm_enclave.model_host import load_model
from drm_enclave.model_receiver import PREFAULT_AHEAD, ModelReceiver, ReceiverState, _Prefaulter
from drm_lab import models
from drm_wire.errors import ErrorCode, RemoteProtocolError
from drm_wire.limits import MODEL_CHUNK_BYTES
from drm_wire.messages import ModelBegin, ModelChunk, ModelEnd

DATA = models.big_model(8.0)  # ~8 MB: three chunks of 4 MiB, the last one short
KiB = 1024


def begin(data: bytes = DATA, name: str = "big") -> ModelBegin:
    return ModelBegin(name=name, size=len(data), sha256=hashlib.sha256(data).digest())


def chunks(data: bytes = DATA, size: int = MODEL_CHUNK_BYTES) -> list[ModelChunk]:
    view = memoryview(data)
    return [ModelChunk(offset=o, data=view[o : o + size]) for o in range(0, len(data), size)]


def feed(receiver: ModelReceiver, parts: list[ModelChunk]) -> None:
    for part in parts:
        receiver.add(part)


@pytest.mark.parametrize("chunk_size", [MODEL_CHUNK_BYTES, 1_000_003, 64 * KiB])
def test_happy_path(chunk_size: int) -> None:
    receiver = ModelReceiver(begin())
    assert (receiver.progress, receiver.received, receiver.state) == (
        0.0,
        0,
        ReceiverState.RECEIVING,
    )
    parts = chunks(size=chunk_size)
    feed(receiver, parts[:1])
    assert receiver.received == chunk_size
    assert receiver.progress == pytest.approx(chunk_size / len(DATA))
    feed(receiver, parts[1:])
    model = receiver.finish(ModelEnd(name="big"))
    assert receiver.state is ReceiverState.DONE
    assert receiver.progress == 1.0
    assert model.readonly
    assert model.nbytes == len(DATA)
    assert model == DATA
    assert type(model.obj) is mmap.mmap  # a view of the one preallocated buffer, no copy
    assert "DONE" in repr(receiver)
    assert receiver.name == "big"
    assert receiver.size == len(DATA)


def test_received_model_loads() -> None:
    receiver = ModelReceiver(begin())
    feed(receiver, chunks())
    hosted = load_model("big", receiver.finish(ModelEnd(name="big")))
    receiver.release()
    assert hosted.description.sha256 == hashlib.sha256(DATA).digest()


def test_one_buffer_no_accumulated_copies() -> None:
    parts = chunks()
    tracemalloc.start()
    try:
        receiver = ModelReceiver(begin())
        feed(receiver, parts)
        receiver.finish(ModelEnd(name="big"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The buffer is an mmap (not traced here; its cost is in test_model_memory.py), and
    # nothing the size of a chunk is allocated on the way.
    assert peak < 256 * KiB


def refused(receiver: ModelReceiver, part: ModelChunk, match: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        receiver.add(part)
    assert receiver.state is ReceiverState.FAILED
    # A failed transfer accepts nothing more.
    with pytest.raises(RemoteProtocolError, match="after the model transfer ended"):
        receiver.add(chunks()[0])
    with pytest.raises(RemoteProtocolError, match="after the model transfer ended"):
        receiver.finish(ModelEnd(name="big"))
    return info.value


def test_out_of_order_chunk() -> None:
    receiver = ModelReceiver(begin())
    error = refused(receiver, chunks()[1], rf"offset {MODEL_CHUNK_BYTES}, expected 0 ")
    assert (error.field, error.got, error.limit) == ("offset", MODEL_CHUNK_BYTES, 0)
    assert error.code is ErrorCode.PROTOCOL_ERROR


def test_overlapping_chunk() -> None:
    receiver = ModelReceiver(begin())
    receiver.add(chunks()[0])
    overlap = ModelChunk(offset=MODEL_CHUNK_BYTES - 10, data=memoryview(DATA)[:100])
    error = refused(
        receiver, overlap, f"offset {MODEL_CHUNK_BYTES - 10}, expected {MODEL_CHUNK_BYTES}"
    )
    assert error.field == "offset"


def test_repeated_chunk() -> None:
    receiver = ModelReceiver(begin())
    receiver.add(chunks()[0])
    refused(receiver, chunks()[0], "offset 0, expected")


def test_gap() -> None:
    receiver = ModelReceiver(begin())
    receiver.add(ModelChunk(offset=0, data=memoryview(DATA)[:1000]))
    refused(receiver, ModelChunk(offset=1001, data=memoryview(DATA)[1001:2000]), "offset 1001")


def test_oversized_chunk() -> None:
    receiver = ModelReceiver(begin(DATA[:1000]))
    error = refused(
        receiver,
        ModelChunk(offset=0, data=memoryview(DATA)[:1001]),
        "would end at byte 1001, past the announced size 1000",
    )
    assert (error.code, error.limit, error.got) == (ErrorCode.LIMIT_EXCEEDED, 1000, 1001)


def finish_refused(receiver: ModelReceiver, end: ModelEnd, match: str) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        receiver.finish(end)
    assert receiver.state is ReceiverState.FAILED
    with pytest.raises(RemoteProtocolError, match="model_end after the model transfer ended"):
        receiver.finish(end)
    return info.value


def test_short_transfer() -> None:
    receiver = ModelReceiver(begin())
    feed(receiver, chunks()[:-1])
    error = finish_refused(
        receiver, ModelEnd(name="big"), f"ended after {MODEL_CHUNK_BYTES} of {len(DATA)} bytes$"
    )
    assert error.field == "size"


def test_wrong_digest() -> None:
    announced = ModelBegin(name="big", size=len(DATA), sha256=hashlib.sha256(b"other").digest())
    receiver = ModelReceiver(announced)
    feed(receiver, chunks())
    error = finish_refused(receiver, ModelEnd(name="big"), "SHA-256 does not match")
    assert error.field == "sha256"


def test_flipped_byte() -> None:
    corrupt = bytearray(DATA)
    corrupt[len(DATA) // 2] ^= 1
    receiver = ModelReceiver(begin())
    feed(receiver, chunks(bytes(corrupt)))
    finish_refused(receiver, ModelEnd(name="big"), "SHA-256 does not match")


def test_wrong_name_at_end() -> None:
    receiver = ModelReceiver(begin())
    feed(receiver, chunks())
    error = finish_refused(receiver, ModelEnd(name="other"), "model_end names 'other', but the")
    assert error.field == "name"


def test_finish_twice_and_add_after_finish() -> None:
    receiver = ModelReceiver(begin())
    feed(receiver, chunks())
    receiver.finish(ModelEnd(name="big"))
    with pytest.raises(RemoteProtocolError, match="model_end after the model transfer ended"):
        receiver.finish(ModelEnd(name="big"))
    with pytest.raises(RemoteProtocolError, match="model_chunk after the model transfer ended"):
        receiver.add(chunks()[0])
    assert receiver.state is ReceiverState.DONE


def test_release_mid_transfer() -> None:
    receiver = ModelReceiver(begin())
    receiver.add(chunks()[0])
    receiver.release()
    assert receiver.state is ReceiverState.FAILED
    with pytest.raises(RemoteProtocolError):
        receiver.add(chunks()[1])


def test_needs_a_model_begin() -> None:
    with pytest.raises(TypeError):
        ModelReceiver(ModelEnd(name="big"))  # type: ignore[arg-type]


# --- receiving in place (ModelReceiver.place) -----------------------------------------------


def placed(receiver: ModelReceiver, part: ModelChunk) -> ModelChunk:
    """What the link does: receive ``part``'s bytes where ``place`` says, if it says."""
    target = receiver.place(part.offset, part.data.nbytes)
    if target is None:
        return part
    target[:] = part.data
    return ModelChunk(offset=part.offset, data=target)


def test_chunks_received_in_place() -> None:
    parts = chunks()
    tracemalloc.start()
    try:
        receiver = ModelReceiver(begin())
        for part in parts:
            chunk = placed(receiver, part)
            assert chunk.data.obj is not DATA  # it was received into the model buffer
            receiver.add(chunk)
        model = receiver.finish(ModelEnd(name="big"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert model == DATA
    assert peak < 256 * KiB


def test_place_hands_out_only_fresh_ranges_within_the_model() -> None:
    receiver = ModelReceiver(begin())
    size = len(DATA)
    assert receiver.place(size - 10, 11) is None  # past the end
    assert receiver.place(0, 0) is None
    assert receiver.place(0, -1) is None
    first = receiver.place(0, 1000)
    assert first is not None
    assert (first.nbytes, first.readonly) == (1000, False)
    assert receiver.place(0, 1000) is None  # handed out already
    assert receiver.place(999, 10) is None  # overlaps it
    assert receiver.place(5000, 10) is not None  # a gap is no verdict: add() judges
    assert receiver.place(1000, 10) is None  # before the last range handed out
    assert receiver.state is ReceiverState.RECEIVING


def test_place_after_the_transfer_ended() -> None:
    receiver = ModelReceiver(begin())
    feed(receiver, chunks())
    receiver.finish(ModelEnd(name="big"))
    assert receiver.place(0, 10) is None
    failed = ModelReceiver(begin())
    refused(failed, chunks()[1], "expected 0")
    assert failed.place(0, 10) is None
    released = ModelReceiver(begin())
    released.release()
    assert released.place(0, 10) is None


def test_a_chunk_copied_then_the_next_ones_in_place() -> None:
    """The link sets the sink only once model_begin is handled: the reader may be ahead."""
    parts = chunks()
    assert len(parts) == 2
    receiver = ModelReceiver(begin())
    ahead = placed(receiver, parts[1])  # decoded before chunk 0 was added
    assert ahead.data.obj is not DATA
    receiver.add(parts[0])  # copied
    receiver.add(ahead)
    assert receiver.finish(ModelEnd(name="big")) == DATA


def test_a_chunk_placed_over_one_not_yet_added_fails_the_transfer() -> None:
    """A hostile offset can only win a range nobody else writes: add() then refuses it."""
    parts = chunks()
    receiver = ModelReceiver(begin())
    half = MODEL_CHUNK_BYTES // 2
    hostile = placed(receiver, ModelChunk(offset=half, data=parts[0].data))
    receiver.add(parts[0])
    refused(receiver, hostile, rf"offset {half}, expected {MODEL_CHUNK_BYTES}")
    assert receiver.place(2 * MODEL_CHUNK_BYTES, 10) is None


def test_a_placed_range_is_hashed_as_received() -> None:
    corrupt = bytearray(DATA)
    corrupt[MODEL_CHUNK_BYTES + 5] ^= 1
    receiver = ModelReceiver(begin())
    feed(receiver, [placed(receiver, part) for part in chunks(bytes(corrupt))])
    finish_refused(receiver, ModelEnd(name="big"), "SHA-256 does not match")


# --- prefaulting ----------------------------------------------------------------------------


def smaps_entry(view: memoryview) -> tuple[str, dict[str, str]]:
    """The permissions (e.g. ``rw-p``) and fields of the mapping that holds ``view``
    (Linux /proc/self/smaps)."""
    import ctypes

    start = ctypes.addressof(ctypes.c_char.from_buffer(view.obj))
    perms: str | None = None
    fields: dict[str, str] = {}
    with open("/proc/self/smaps", encoding="ascii") as smaps:
        for line in smaps:
            head, *rest = line.split()
            if "-" in head and not head.endswith(":"):
                if perms is not None:
                    break
                low, high = (int(part, 16) for part in head.split("-"))
                if low <= start < high:
                    perms = rest[0]
            elif perms is not None:
                fields[head.rstrip(":")] = " ".join(rest)
    if perms is None:
        raise AssertionError("mapping not found")
    return perms, fields


def mapping_rss(view: memoryview) -> int:
    """Resident bytes of the mapping that holds ``view``."""
    return int(smaps_entry(view)[1]["Rss"].split()[0]) * 1024


def test_the_buffer_is_private_memory() -> None:
    """``mmap.mmap(-1, n)`` is MAP_SHARED (shmem) unless told: its pages cost ~1.7x CPU."""
    receiver = ModelReceiver(begin())
    view = receiver.place(0, MODEL_CHUNK_BYTES)
    assert view is not None
    perms, _ = smaps_entry(view)
    assert perms == "rw-p"
    view.release()
    receiver.release()


def test_prefaulter_stays_a_window_ahead_and_keeps_contents() -> None:
    size = 3 * PREFAULT_AHEAD
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    marker = PREFAULT_AHEAD - 4096 + 7
    buffer[marker] = 0xAB  # written before the prefaulter gets there
    prefaulter = _Prefaulter(buffer, size)
    try:
        if prefaulter.wait_populated(PREFAULT_AHEAD, timeout=30) == 0:
            pytest.skip("MADV_POPULATE_WRITE is not available here")
        assert prefaulter.wait_populated(PREFAULT_AHEAD, timeout=30) == PREFAULT_AHEAD
        view = memoryview(buffer)
        assert PREFAULT_AHEAD <= mapping_rss(view) < PREFAULT_AHEAD + 4 * KiB * 16
        assert buffer[marker] == 0xAB
        prefaulter.advance(mmap.PAGESIZE + 1)
        ahead = mmap.PAGESIZE + PREFAULT_AHEAD  # a window past it, in whole pages
        assert prefaulter.wait_populated(ahead, timeout=30) == ahead
        prefaulter.advance(size - 1)
        assert prefaulter.wait_populated(size, timeout=30) == size  # capped at the end
        assert mapping_rss(view) == size
        view.release()
    finally:
        prefaulter.join()


def test_prefaulter_stops_when_asked() -> None:
    buffer = mmap.mmap(-1, 2 * PREFAULT_AHEAD, flags=mmap.MAP_PRIVATE)
    prefaulter = _Prefaulter(buffer, 2 * PREFAULT_AHEAD)
    prefaulter.join()
    assert prefaulter.wait_populated(2 * PREFAULT_AHEAD, timeout=0) <= PREFAULT_AHEAD


def test_receiver_threads_end_with_the_transfer() -> None:
    receiver = ModelReceiver(begin())
    feed(receiver, chunks())
    receiver.finish(ModelEnd(name="big"))
    assert not any(t.name == "model-prefault" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("madvise", [None, lambda address, length, advice: -1])
def test_without_prefaulting_pages_fault_in_as_before(
    monkeypatch: pytest.MonkeyPatch, madvise: object
) -> None:
    """No madvise (not Linux, a library OS) or a kernel that refuses the advice."""
    monkeypatch.setattr(model_receiver, "_MADVISE", madvise)
    receiver = ModelReceiver(begin())
    assert receiver._prefault.wait_populated(1, timeout=30) == 0
    feed(receiver, [placed(receiver, part) for part in chunks()])
    assert receiver.finish(ModelEnd(name="big")) == DATA
