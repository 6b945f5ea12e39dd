"""Sans-IO assembly of the model the custodian streams to the enclave.

Theory of operation
-------------------
The custodian sends ``model_begin`` (name, size, SHA-256), then ``model_chunk`` messages
whose offsets tile ``[0, size)`` in order, then ``model_end`` (name). A
:class:`ModelReceiver` is made from the :class:`~drm_wire.messages.ModelBegin` and fed the
rest; it does no I/O (the custodian link moves the bytes) and never touches the disk.

Memory: the receiver allocates ONE ``bytearray`` of the announced size up front and copies
each chunk into place, so the model costs its size once, not a list of chunks plus a
``b"".join`` copy. The announced size is bounded by
:data:`~drm_wire.limits.MAX_MODEL_BYTES` (checked by ``ModelBegin`` itself), and the
custodian that announces it is an authenticated peer.

Integrity: each chunk also goes into an incremental SHA-256 as it arrives (``hashlib``
releases the GIL for large updates), so the digest is ready when the last byte lands and
:meth:`ModelReceiver.finish` only compares it.

States: ``RECEIVING`` until :meth:`~ModelReceiver.finish` succeeds (``DONE``); any error
moves to ``FAILED`` for good, and the buffer is released. Every refusal is a
:class:`~drm_wire.errors.RemoteProtocolError` naming the field and the numbers at fault:
the custodian broke the transfer protocol, so the link closes and the daemon lives on.
"""

from __future__ import annotations

import hashlib
import hmac
from enum import Enum
from typing import final

from drm_wire.errors import ErrorCode, RemoteProtocolError
from drm_wire.messages import ModelBegin, ModelChunk, ModelEnd

__all__ = ["ModelReceiver", "ReceiverState"]


class ReceiverState(Enum):
    """Where a transfer stands."""

    #: Chunks are expected (possibly none yet).
    RECEIVING = "receiving"
    #: ``finish`` checked size and digest; the model is in :attr:`ModelReceiver.buffer`.
    DONE = "done"
    #: A chunk or the end was refused; the receiver accepts nothing more.
    FAILED = "failed"


@final
class ModelReceiver:
    """Assembles one model transfer into a single preallocated buffer.

    Example::

        receiver = ModelReceiver(begin)
        receiver.add(chunk)          # for each model_chunk, in order
        model = receiver.finish(end) # memoryview of exactly begin.size bytes
    """

    __slots__ = ("_begin", "_buffer", "_hash", "_received", "_state")

    def __init__(self, begin: ModelBegin) -> None:
        if type(begin) is not ModelBegin:
            raise TypeError("ModelReceiver needs a ModelBegin")
        self._begin = begin
        self._buffer: bytearray | None = bytearray(begin.size)
        self._hash = hashlib.sha256()
        self._received = 0
        self._state = ReceiverState.RECEIVING

    def __repr__(self) -> str:
        return (
            f"<ModelReceiver {self._begin.name!r} {self._state.name} "
            f"{self._received}/{self._begin.size} bytes>"
        )

    @property
    def name(self) -> str:
        """The model's name as announced."""
        return self._begin.name

    @property
    def size(self) -> int:
        """The announced size in bytes."""
        return self._begin.size

    @property
    def received(self) -> int:
        """Bytes received so far (always the next expected offset)."""
        return self._received

    @property
    def progress(self) -> float:
        """Fraction of the announced size received, from 0.0 to 1.0."""
        return self._received / self._begin.size

    @property
    def state(self) -> ReceiverState:
        """Where the transfer stands."""
        return self._state

    def _fail(
        self,
        message: str,
        *,
        field: str,
        code: ErrorCode = ErrorCode.PROTOCOL_ERROR,
        limit: int | None = None,
        got: object = None,
    ) -> RemoteProtocolError:
        self._state = ReceiverState.FAILED
        self._buffer = None  # a refused transfer keeps no model bytes around
        return RemoteProtocolError(
            message, code=code, field=field, limit=limit, got=got, state="receiving"
        )

    def _check_receiving(self, what: str) -> bytearray:
        if self._state is not ReceiverState.RECEIVING or self._buffer is None:
            raise RemoteProtocolError(
                f"{what} after the model transfer ended", state=self._state.value
            )
        return self._buffer

    def add(self, chunk: ModelChunk) -> None:
        """Copy one chunk into place and hash it.

        Raises:
            RemoteProtocolError: the chunk does not start where the previous one ended
                (a gap, an overlap, a repeat or a reordering: ``field="offset"``), or it
                would run past the announced size (``LIMIT_EXCEEDED``), or the transfer
                already ended or failed.
        """
        buffer = self._check_receiving("model_chunk")
        data = chunk.data
        nbytes = data.nbytes
        if chunk.offset != self._received:
            raise self._fail(
                f"model_chunk at offset {chunk.offset}, expected {self._received} "
                "(chunks must be contiguous and in order)",
                field="offset",
                limit=self._received,
                got=chunk.offset,
            )
        end = self._received + nbytes
        if end > self._begin.size:
            raise self._fail(
                f"model_chunk would end at byte {end}, past the announced size {self._begin.size}",
                field="data",
                code=ErrorCode.LIMIT_EXCEEDED,
                limit=self._begin.size,
                got=end,
            )
        if data.format != "B" or data.ndim != 1:
            data = data.cast("B") if data.c_contiguous else memoryview(data.tobytes())
        # memoryview slice assignment is one memcpy. (``bytearray[a:b] = view`` would
        # first copy the view into a temporary bytearray: a chunk-sized allocation.)
        memoryview(buffer)[self._received : end] = data
        self._hash.update(data)
        self._received = end

    def finish(self, end: ModelEnd) -> memoryview:
        """Check that the whole model arrived intact; return it.

        Returns:
            A read-only ``memoryview`` of exactly the announced size over the receiver's
            buffer (no copy). Pass it to :func:`drm_enclave.model_host.load_model`.

        Raises:
            RemoteProtocolError: ``end`` names another model (``field="name"``), bytes are
                missing (``field="size"``), the SHA-256 differs from the one announced
                (``field="sha256"``), or the transfer already ended or failed.
        """
        buffer = self._check_receiving("model_end")
        if end.name != self._begin.name:
            raise self._fail(
                f"model_end names {end.name[:64]!r}, but the transfer is {self.name[:64]!r}",
                field="name",
            )
        if self._received != self._begin.size:
            raise self._fail(
                f"model ended after {self._received} of {self._begin.size} bytes",
                field="size",
                limit=self._begin.size,
                got=self._received,
            )
        digest = self._hash.digest()
        if not hmac.compare_digest(digest, self._begin.sha256):
            raise self._fail(
                "model SHA-256 does not match the one announced in model_begin",
                field="sha256",
                got=digest.hex(),
            )
        self._state = ReceiverState.DONE
        return memoryview(buffer).toreadonly()

    def release(self) -> None:
        """Drop the receiver's reference to the buffer (after the model is loaded).

        The memory is freed once no ``memoryview`` from :meth:`finish` is alive either.
        """
        self._buffer = None
        if self._state is ReceiverState.RECEIVING:
            self._state = ReceiverState.FAILED
