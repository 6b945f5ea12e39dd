"""The sans-IO model receiver: contiguous chunks into one buffer, size and SHA-256 checks."""

from __future__ import annotations

import hashlib
import mmap
import tracemalloc

import pytest

from drm_enclave.model_host import load_model
from drm_enclave.model_receiver import ModelReceiver, ReceiverState
from drm_wire.errors import ErrorCode, RemoteProtocolError
from drm_wire.limits import MODEL_CHUNK_BYTES
from drm_wire.messages import ModelBegin, ModelChunk, ModelEnd
from tests import models

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
