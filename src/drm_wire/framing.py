"""Frames: a length-prefixed msgpack header, optionally followed by a raw payload.

Wire layout of one frame::

    +------------------+-----------------------------+---------------------------+
    | u32 big-endian N | N bytes: msgpack map header | payload_len raw bytes     |
    +------------------+-----------------------------+---------------------------+

The header is one msgpack map (see :mod:`drm_wire.codec`). When it carries the key
``"payload_len"`` (a non-negative int), exactly that many raw bytes follow it: model chunks
and tensor data travel there instead of inside the map. Wrapping a tensor in a msgpack
``bin`` would cost a pack copy, a prefix concatenation copy and an unpack copy; the raw
payload costs one copy on receive and none on send, because the sender hands the
caller's buffer straight to the transport.

Limits are enforced before memory is committed: the header length against
:data:`~drm_wire.limits.MAX_HEADER_BYTES` as soon as the 4 prefix bytes are in, and the
payload length against a per-message-type cap as soon as the header is decoded, so a
hostile "4 GiB follows" costs nothing.

Theory of operation of :class:`FrameDecoder`: bytes arrive through ``receive_data`` in any
slicing. Header bytes accumulate in one ``bytearray``. Once a header is decoded and a
payload is announced, a buffer of exactly the payload size is allocated and further bytes
are copied straight into it (the one copy of a payload on receive); the completed frame
hands out a ``memoryview`` of that buffer, which numpy can wrap without copying. The buffer
is not zero-filled first (see :func:`_payload_storage`): no one sees it before every byte
of it has been received.
When the whole payload is already buffered by the time its header is decoded, the buffer
itself becomes the payload's storage and only the bytes after it are copied out.

*Growing payloads* (``grow_payloads=True``, for peers nobody vouches for: the consumer
port). Allocating the announced size up front lets a 10-byte header commit 64 MiB of the
enclave's memory (VmSize: what SGX commits) for one byte sent. A growing payload's storage
starts at what arrived with its header and grows only when asked: by
:meth:`FrameDecoder.grow_payload` (the I/O layer makes room for its next read once it has
charged that room to its budget, :mod:`drm_wire.net.budget`), or by exactly what
``receive_data`` brings that does not fit. :attr:`FrameDecoder.held_bytes` counts the
storage, filled or not, so what a frame holds is what was received plus the room its
reader charged for. The room is offered for receiving into
(:meth:`FrameDecoder.payload_buffer`) like a whole payload's buffer. The storage is a
``bytearray`` extended in place: ``realloc`` grows or remaps it, so the payload is not
copied as it grows (a fresh buffer and a copy at each step cost more CPU than decrypting
the bytes), and a ``bytearray`` refuses to be resized while a view of it is held, so no
view handed out can be left pointing at freed memory.

Two additions spare the bulk path (model chunks, 4 MiB each) its copies:

* *Receiving into the payload.* While a payload is being received,
  :meth:`FrameDecoder.payload_buffer` hands out the unfilled rest of it, so the I/O layer
  can decrypt straight into it (``TLSStream.receive_into``) and report the count with
  :meth:`FrameDecoder.payload_filled`, instead of producing ``bytes`` that
  ``receive_data`` then copies. Header bytes still travel through ``receive_data``.
* *Payload sinks.* A :data:`PayloadSink` set with :meth:`FrameDecoder.set_payload_sink`
  sees each decoded header before its payload is read and may return the buffer the
  payload is to land in (a model chunk's place in the model buffer), which then becomes
  the frame's payload: the payload is written once, where it is used. The sink only
  chooses where bytes go: the decoder checks the buffer's size, and the message layer
  still validates the frame as usual.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

import numpy as np

from .codec import Header, HeaderDecoder, pack_header
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .limits import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, PREFIX_BYTES

__all__ = ["PAYLOAD_KEY", "Buffer", "Frame", "FrameDecoder", "PayloadSink", "encode_frame"]

#: The header key that announces a raw payload and its length.
PAYLOAD_KEY: Final = "payload_len"

#: Anything the transport can send without a copy.
Buffer = bytes | bytearray | memoryview

#: Given a decoded header, the largest payload it may announce. The protocol layer maps
#: message types to caps; a message type that carries no bulk data gets 0.
PayloadLimit = Callable[[Header], int]

#: Given a decoded header (``payload_len`` removed) and its payload length, already checked
#: against the :data:`PayloadLimit`: a writable, contiguous byte ``memoryview`` of exactly
#: that length for the payload to be received into, or ``None`` for a buffer of the
#: decoder's own. Called before any payload byte is stored.
PayloadSink = Callable[[Header, int], memoryview | None]


def _default_payload_limit(header: Header) -> int:
    return MAX_PAYLOAD_BYTES


def _payload_storage(size: int) -> memoryview:
    """A writable byte buffer of ``size`` bytes, left uninitialised.

    ``bytearray(size)`` zero-fills what the payload then overwrites: a ``memset`` of every
    request's tensor bytes on the enclave's event loop, for nothing. The decoder hands
    the buffer out only once all of it is filled, so its old contents are never seen.
    """
    return np.empty(size, dtype=np.uint8).data


class Frame(NamedTuple):
    """One decoded frame: the header map and the raw payload (empty when there is none).

    A named tuple rather than a dataclass: it is built once per frame on the hot path,
    and tuple construction is several times cheaper.
    """

    header: Header
    payload: memoryview


_EMPTY: Final = memoryview(b"")
#: What a growing payload's new room is first filled with, a piece at a time.
_ZEROS: Final = memoryview(bytes(1024 * 1024))
_PREFIX: Final = struct.Struct(">I")
assert _PREFIX.size == PREFIX_BYTES


def encode_frame(header: Header, payload: Sequence[Buffer] = ()) -> list[Buffer]:
    """Encode a frame as a list of buffers to write in order, without copying the payload.

    Args:
        header: the message map. Must not already contain :data:`PAYLOAD_KEY`.
        payload: raw buffers that follow the header, concatenated on the wire.

    Raises:
        LocalProtocolError: the header or payload exceeds a limit, or cannot be encoded.
    """
    if not payload:
        return [_prefixed(header)]
    parts = [part for part in payload if memoryview(part).nbytes]
    payload_len = sum(memoryview(part).nbytes for part in parts)
    if payload_len > MAX_PAYLOAD_BYTES:
        raise LocalProtocolError(
            "payload too large",
            code=ErrorCode.LIMIT_EXCEEDED,
            limit=MAX_PAYLOAD_BYTES,
            got=payload_len,
        )
    if not payload_len:
        return [_prefixed(header)]
    return [_prefixed({**header, PAYLOAD_KEY: payload_len}), *parts]


def _prefixed(header: Header) -> bytes:
    body = pack_header(header)
    if len(body) > MAX_HEADER_BYTES:
        raise LocalProtocolError(
            "header too large", code=ErrorCode.LIMIT_EXCEEDED, limit=MAX_HEADER_BYTES, got=len(body)
        )
    return _PREFIX.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream into :class:`Frame` objects; sans-IO.

    Args:
        payload_limit: maps a decoded header to the largest payload it may announce.
        grow_payloads: grow each payload as its bytes arrive instead of allocating the
            announced size when the header arrives (see the module docstring).
    """

    __slots__ = (
        "_buffer",
        "_eof",
        "_filled",
        "_grow",
        "_growing",
        "_header",
        "_header_decoder",
        "_payload",
        "_payload_len",
        "_payload_limit",
        "_sink",
    )

    def __init__(
        self, payload_limit: PayloadLimit = _default_payload_limit, *, grow_payloads: bool = False
    ) -> None:
        self._payload_limit = payload_limit
        self._grow = grow_payloads
        self._growing: bytearray | None = None  # a growing payload's storage
        self._payload_len = 0
        self._header_decoder = HeaderDecoder()
        self._buffer = bytearray()
        self._header: Header | None = None
        self._payload: memoryview | None = None
        self._filled = 0
        self._eof = False
        self._sink: PayloadSink | None = None

    def __repr__(self) -> str:
        state = "payload" if self._header is not None else "header"
        return f"<FrameDecoder reading {state}, {len(self._buffer)} bytes buffered>"

    @property
    def eof(self) -> bool:
        """Whether the peer has closed its side (``receive_data(b"")`` was called)."""
        return self._eof

    @property
    def mid_frame(self) -> bool:
        """Whether part of a frame has been received but not all of it."""
        return bool(self._buffer) or self._header is not None

    @property
    def held_bytes(self) -> int:
        """Bytes of memory this decoder holds for frames not yet handed out: buffered
        bytes, plus the payload under way (its received part when it grows, else its
        whole buffer)."""
        held = len(self._buffer)
        if self._growing is not None:
            held += len(self._growing)
        elif self._payload is not None:
            held += len(self._payload)
        return held

    @property
    def payload_due(self) -> int:
        """Bytes of the payload under way still to arrive (0 between payloads)."""
        if self._header is None:
            return 0
        return self._payload_len - self._filled

    @property
    def payload_received(self) -> int:
        """Bytes of the payload under way received so far (0 between payloads)."""
        return self._filled if self._header is not None else 0

    @property
    def payload_room(self) -> int:
        """Bytes :meth:`payload_buffer` offers now: the unfilled rest of a whole
        payload's buffer, or the room of a growing payload (0 until it is grown)."""
        if self._growing is not None:
            return len(self._growing) - self._filled
        if self._payload is not None:
            return len(self._payload) - self._filled
        return 0

    def grow_payload(self, room: int) -> None:
        """Make room for ``room`` more bytes of the growing payload under way (never
        past its announced length), so that :meth:`payload_buffer` offers them.
        :attr:`held_bytes` grows by the room added: charge it before.

        Raises:
            RuntimeError: no growing payload is under way, ``room`` is below 1, or a view
                from :meth:`payload_buffer` is still held (release it first).
        """
        if self._growing is None or room < 1:
            raise RuntimeError(f"grow_payload({room}) while no growing payload is under way")
        self._resize_growing(min(self._payload_len, self._filled + room))

    def _resize_growing(self, size: int) -> None:
        growing = self._growing
        assert growing is not None
        try:
            while (missing := size - len(growing)) > 0:
                growing += _ZEROS[: min(missing, len(_ZEROS))]
        except BufferError as exc:
            raise RuntimeError("a view of the growing payload is still held") from exc

    def set_payload_sink(self, sink: PayloadSink | None) -> None:
        """Offer each later payload to ``sink`` first (``None``: always use own buffers).

        A frame whose header is already decoded keeps the buffer it has.
        """
        self._sink = sink

    def payload_buffer(self) -> memoryview | None:
        """The unfilled rest of the payload being received, or ``None`` if none is due.

        Write received bytes to its start, then call :meth:`payload_filled`. Anything the
        peer sends after the payload must not go here: the view is exactly as long as the
        bytes still due.
        """
        if self._growing is not None:
            if self._eof or self._filled == len(self._growing):
                return None
            return memoryview(self._growing)[self._filled :]
        payload = self._payload
        if payload is None or self._eof or self._filled == len(payload):
            return None
        return payload[self._filled :]

    def payload_filled(self, nbytes: int) -> None:
        """Record that ``nbytes`` were written at the start of :meth:`payload_buffer`.

        Raises:
            RuntimeError: no payload is being received, or ``nbytes`` is not between 1 and
                the bytes still due (a bug in the caller).
        """
        if (self._payload is None and self._growing is None) or self._eof:
            raise RuntimeError("payload_filled while no payload is being received")
        if not 0 < nbytes <= self.payload_room:
            raise RuntimeError(f"payload_filled({nbytes}) with {self.payload_room} bytes of room")
        self._filled += nbytes

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its side.

        Raises:
            RuntimeError: data after EOF (a bug in the caller).
        """
        if self._eof:
            raise RuntimeError("receive_data after EOF")
        if not data:
            self._eof = True
            return
        growing = self._growing
        if growing is not None:
            with memoryview(data) as view:
                filled = self._filled
                take = min(self._payload_len - filled, view.nbytes)
                fits = min(take, len(growing) - filled)  # in the room it was given
                if fits:
                    with memoryview(growing) as storage:
                        storage[filled : filled + fits] = view[:fits]
                growing += view[fits:take]
                self._filled += take
                if take < view.nbytes:
                    self._buffer += view[take:]
            return
        payload = self._payload
        if payload is None:
            self._buffer += data
            return
        view = memoryview(data)
        take = min(len(payload) - self._filled, view.nbytes)
        payload[self._filled : self._filled + take] = view[:take]
        self._filled += take
        if take < view.nbytes:
            self._buffer += view[take:]

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` if more bytes are needed.

        Raises:
            RemoteProtocolError: the bytes break the framing or a limit. The decoder is
                then unusable: the connection must close.
        """
        if self._header is not None:
            return self._finish_payload()
        buffer = self._buffer
        if len(buffer) < PREFIX_BYTES:
            return None
        (size,) = _PREFIX.unpack_from(buffer)
        if size == 0:
            raise RemoteProtocolError("empty frame header")
        if size > MAX_HEADER_BYTES:
            raise RemoteProtocolError(
                "frame header too large",
                code=ErrorCode.LIMIT_EXCEEDED,
                limit=MAX_HEADER_BYTES,
                got=size,
            )
        end = PREFIX_BYTES + size
        if len(buffer) < end:
            return None
        header = self._header_decoder.decode(buffer[PREFIX_BYTES:end])
        del buffer[:end]
        payload_len = header.pop(PAYLOAD_KEY, 0)
        if type(payload_len) is not int or payload_len < 0:
            raise RemoteProtocolError(
                "payload length must be a non-negative int", field=PAYLOAD_KEY
            )
        if payload_len == 0:
            return Frame(header, _EMPTY)
        limit = self._payload_limit(header)
        if payload_len > limit:
            raise RemoteProtocolError(
                "payload too large for this message",
                code=ErrorCode.LIMIT_EXCEEDED,
                field=PAYLOAD_KEY,
                limit=limit,
                got=payload_len,
            )
        payload = self._sink_buffer(header, payload_len) if self._sink is not None else None
        if payload is None:
            if len(buffer) >= payload_len:
                # The whole payload is already buffered: hand the buffer itself over as the
                # payload's storage and keep only what follows, instead of copying megabytes.
                rest = buffer[payload_len:]
                del buffer[payload_len:]
                self._buffer = rest
                return Frame(header, memoryview(buffer))
            if self._grow:
                # What is buffered is all this payload's: it becomes the growing payload.
                self._buffer, self._growing = bytearray(), buffer
                self._header, self._filled, self._payload_len = header, len(buffer), payload_len
                return None
            payload = _payload_storage(payload_len)
        take = min(len(buffer), payload_len)
        if take:
            with memoryview(buffer) as buffered:
                payload[:take] = buffered[:take]
            del buffer[:take]
        self._header, self._payload, self._filled = header, payload, take
        self._payload_len = payload_len
        return self._finish_payload()

    def _sink_buffer(self, header: Header, payload_len: int) -> memoryview | None:
        assert self._sink is not None
        target = self._sink(header, payload_len)
        if target is None:
            return None
        if (
            type(target) is not memoryview
            or target.readonly
            or target.format != "B"
            or target.ndim != 1
            or not target.contiguous
            or target.nbytes != payload_len
        ):
            raise TypeError(
                f"a payload sink must return None or a writable byte memoryview of "
                f"{payload_len} bytes, not {target!r}"
            )
        return target

    def _finish_payload(self) -> Frame | None:
        assert self._header is not None
        growing = self._growing
        if growing is not None:
            if self._filled < self._payload_len:
                return None
            frame = Frame(self._header, memoryview(growing))
            self._header, self._growing, self._filled = None, None, 0
            return frame
        payload = self._payload
        assert payload is not None
        if self._filled < len(payload):
            return None
        frame = Frame(self._header, payload)
        self._header, self._payload, self._filled = None, None, 0
        return frame
