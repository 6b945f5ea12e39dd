"""Small helpers for the sans-IO tests: encode a message, decode bytes, compare messages."""

from __future__ import annotations

from drm_wire import messages as m
from drm_wire.framing import FrameDecoder, encode_frame
from drm_wire.tensors import Tensor


def encode(message: m.Message) -> bytes:
    """The exact bytes of one message on the wire."""
    header, payload = message.to_wire()
    return b"".join(bytes(part) for part in encode_frame(header, payload))


def decode_all(data: bytes, *, chunk: int | None = None) -> list[m.Message]:
    """Decode every complete message in ``data``, fed in slices of ``chunk`` bytes."""
    decoder = FrameDecoder(m.payload_limit)
    out: list[m.Message] = []
    step = chunk or max(len(data), 1)
    for start in range(0, len(data), step):
        decoder.receive_data(data[start : start + step])
        while (frame := decoder.next_frame()) is not None:
            out.append(m.from_frame(frame))
    return out


def normalise(value: object) -> object:
    """Make messages comparable: memoryviews become bytes, recursively."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, Tensor):
        return (value.name, value.dtype, value.shape, bytes(value.data))
    if isinstance(value, tuple):
        return tuple(normalise(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        fields = tuple(normalise(getattr(value, f)) for f in value.__dataclass_fields__)
        return (type(value).__name__, *fields)
    return value
