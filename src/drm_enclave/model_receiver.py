"""Sans-IO assembly of the model the custodian streams to the enclave.

Theory of operation
-------------------
The custodian sends ``model_begin`` (name, size, SHA-256), then ``model_chunk`` messages
whose offsets tile ``[0, size)`` in order, then ``model_end`` (name). A
:class:`ModelReceiver` is made from the :class:`~drm_wire.messages.ModelBegin` and fed the
rest; it does no I/O (the custodian link moves the bytes) and never touches the disk.

Memory: the receiver maps ONE anonymous, private buffer of the announced size up front
(``mmap``: memory only, no file) and each chunk lands in place, so the model costs its
size once, not a list of chunks plus a ``b"".join`` copy. The mapping's pages are the
kernel's zero pages until a chunk lands in them: nothing is zero-filled up front (a
``bytearray`` memsets its whole size with the event loop stalled), and RSS grows only
with the bytes actually received. The announced size is bounded by
:data:`~drm_wire.limits.MAX_MODEL_BYTES` (checked by ``ModelBegin`` itself), and the
custodian that announces it is an authenticated peer; a custodian that announces 2 GiB
and sends less costs what it sent. (``MAP_POPULATE`` would make those pages cheaper for
the kernel, but it commits the whole announced size at once and stalls the event loop
while doing it.)

Ownership: :meth:`ModelReceiver.finish` hands the buffer over to the view it returns and
keeps no reference, so the model's memory goes as soon as the last view (and numpy array)
over it does. :func:`drm_enclave.model_host.load_model` needs it only while onnxruntime
copies the weights, except for a large model whose MatMul/Gemm weights it feeds from this
buffer at every run: then the loaded model keeps the buffer (its only copy of them).

Receiving in place: :meth:`ModelReceiver.place` is the link's payload sink
(:meth:`~drm_wire.net.channel.MessageChannel.set_payload_sink`): it hands out the slice of
the buffer a chunk announces, so the chunk is decrypted straight into its place and
:meth:`~ModelReceiver.add` has nothing to copy (before, every 4 MiB chunk was copied three
times on the event loop: out of the TLS records, into the frame decoder's buffer, into
the model buffer). Slices are handed out only past everything handed out or received so
far and within the model, so they never overlap each other nor bytes already hashed;
``add`` still checks every chunk for order and size, whatever buffer it arrived in, so a
chunk placed where it does not belong fails the transfer as before. A chunk that arrives
elsewhere (the first one may, while the link has not yet set the sink) is copied.

Integrity: each chunk, once in place, goes into an incremental SHA-256 computed by a
worker thread (:class:`_Hasher`; ``hashlib`` releases the GIL for large updates), so the
event loop only copies bytes while the digest keeps pace on another core, and
:meth:`ModelReceiver.finish` waits for the last few updates, then compares. On the loop,
hashing was a sizeable share of each chunk's time (docs/production.md, *Measurements
behind the design*).

Page faults: the first write to each 4 KiB page of the buffer costs a fault and the
kernel's zeroing of the page, which on the event loop was the largest cost of a transfer
once the copies were gone. The mapping must be ``MAP_PRIVATE``: ``mmap.mmap(-1, n)`` is
``MAP_SHARED`` by default, i.e. shared memory (shmem, kept in the page cache), whose pages
cost markedly more CPU to make present than private ones. That CPU is the prefault
thread's, off the event loop, so ``bench/e2e.py --only delivery`` shows no change of the
transfer time, but on a busy host it is CPU the loop does not get. Huge pages
(``MADV_HUGEPAGE``) were tried too and left out: the kernel's compaction to find them made
transfers slower and their cost unpredictable (figures: docs/production.md, *Measurements
behind the design*).

A :class:`_Prefaulter` thread makes the pages present (``MADV_POPULATE_WRITE``, which
does not touch their contents, so it cannot race with a chunk landing) a bounded window
ahead of the bytes received, on another core while the loop decrypts. The window keeps
the doc's promise above: a custodian that announces more than it sends makes us commit at
most :data:`PREFAULT_AHEAD` more than it sent. Where the call is unavailable (not Linux,
kernels before 5.14, a library OS), pages fault on first write as before.

States: ``RECEIVING`` until :meth:`~ModelReceiver.finish` succeeds (``DONE``); any error
moves to ``FAILED`` for good, and the buffer is released. Every refusal is a
:class:`~drm_wire.errors.RemoteProtocolError` naming the field and the numbers at fault:
the custodian broke the transfer protocol, so the link closes and the daemon lives on.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import mmap
import queue
import sys
import threading
import weakref
from collections.abc import Callable
from enum import Enum
from typing import Final, final

from drm_wire.errors import ErrorCode, RemoteProtocolError
from drm_wire.limits import MiB
from drm_wire.messages import ModelBegin, ModelChunk, ModelEnd

__all__ = ["PREFAULT_AHEAD", "ModelReceiver", "ReceiverState"]

#: How far past the bytes received the buffer's pages are made present in advance: eight
#: chunks, so the prefaulter stays ahead of the loop that receives them.
PREFAULT_AHEAD: Final = 32 * MiB
#: Pages made present per ``madvise`` call: small enough that the loop rarely waits for
#: the page it writes, large enough that the calls cost nothing next to the faults.
_PREFAULT_STEP: Final = 2 * MiB
#: Linux's ``MADV_POPULATE_WRITE`` (5.14+); Python 3.11's ``mmap`` lacks the constant.
_MADV_POPULATE_WRITE: Final = 23


def _load_madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` through ctypes, which releases the GIL around the call.

    ``mmap.madvise`` holds the GIL while the kernel populates pages, which would stall the
    event loop as long as the faults it is meant to spare it.
    """
    if sys.platform != "linux":
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE: Final = _load_madvise()


class ReceiverState(Enum):
    """Where a transfer stands."""

    #: Chunks are expected (possibly none yet).
    RECEIVING = "receiving"
    #: ``finish`` checked size and digest and handed the model over.
    DONE = "done"
    #: A chunk or the end was refused; the receiver accepts nothing more.
    FAILED = "failed"


@final
class _Hasher:
    """SHA-256 of the views it is given, in order, in a thread of its own.

    The views are slices of the receiver's buffer that no one writes again, so the thread
    reads them while the event loop fills the next ones. One thread per transfer: it ends
    at :meth:`digest` or :meth:`stop`.
    """

    __slots__ = ("_hash", "_queue", "_stopped", "_thread")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="model-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (view := self._queue.get()) is not None:
            with view:
                if not self._stopped:
                    self._hash.update(view)

    def update(self, view: memoryview) -> None:
        self._queue.put(view)

    def digest(self) -> bytes:
        """The digest of everything given so far (waits for the thread to catch up)."""
        self._queue.put(None)
        self._thread.join()
        return self._hash.digest()

    def stop(self) -> None:
        """Skip what is still queued and end the thread (without waiting for it)."""
        self._stopped = True
        self._queue.put(None)


@final
class _Prefaulter:
    """Makes the pages of a buffer present ahead of the writer, in a thread of its own.

    It never goes past the limit :meth:`advance` sets, and stops at the end of the buffer,
    at :meth:`stop`, or at the first failed call (the kernel does not support it): the
    pages it has not reached fault in on first write, as they would without it.
    """

    __slots__ = (
        "_address",
        "_buffer",
        "_changed",
        "_done",
        "_ended",
        "_limit",
        "_size",
        "_stopped",
        "_thread",
    )

    def __init__(self, buffer: mmap.mmap, size: int) -> None:
        # The thread holds the mapping, so its address stays valid until the thread ends.
        self._buffer: mmap.mmap | None = buffer
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        self._size = size
        self._limit = min(size, PREFAULT_AHEAD)
        self._done = 0
        self._stopped = False
        self._ended = False
        self._changed = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        if _MADVISE is None:
            self._ended = True
            self._buffer = None
            return
        self._thread = threading.Thread(target=self._run, name="model-prefault", daemon=True)
        self._thread.start()

    def advance(self, received: int) -> None:
        """``received`` bytes are in: allow pages up to :data:`PREFAULT_AHEAD` past them."""
        # Whole pages only: madvise wants a page-aligned start for the next step.
        ahead = (received + PREFAULT_AHEAD) // mmap.PAGESIZE * mmap.PAGESIZE
        limit = min(self._size, ahead)
        if limit > self._limit:
            with self._changed:
                self._limit = limit
                self._changed.notify_all()

    def stop(self) -> None:
        """End the thread soon (without waiting for it)."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def join(self) -> None:
        """Stop, and wait until the thread no longer uses the buffer."""
        self.stop()
        if self._thread is not None:
            self._thread.join()

    def wait_populated(self, nbytes: int, timeout: float) -> int:
        """Wait until ``nbytes`` are present or the thread ended; return how many are.

        For tests: the count never exceeds the limit :meth:`advance` set.
        """
        with self._changed:
            self._changed.wait_for(lambda: self._done >= nbytes or self._ended, timeout)
            return self._done

    def _run(self) -> None:
        madvise = _MADVISE
        assert madvise is not None
        done = 0
        try:
            while True:
                with self._changed:
                    self._done = done
                    self._changed.notify_all()
                    while not self._stopped and done >= self._limit:
                        if done >= self._size:
                            return
                        self._changed.wait()
                    if self._stopped:
                        return
                    end = min(self._limit, done + _PREFAULT_STEP)
                if madvise(self._address + done, end - done, _MADV_POPULATE_WRITE) != 0:
                    return  # unsupported here: the writer's faults do the work
                done = end
        finally:
            self._buffer = None
            with self._changed:
                self._ended = True
                self._changed.notify_all()


@final
class ModelReceiver:
    """Assembles one model transfer into a single preallocated buffer.

    Example::

        receiver = ModelReceiver(begin)
        receiver.add(chunk)          # for each model_chunk, in order
        model = receiver.finish(end) # memoryview of exactly begin.size bytes
    """

    __slots__ = (
        "__weakref__",
        "_begin",
        "_buffer",
        "_hash",
        "_placed",
        "_placed_end",
        "_prefault",
        "_received",
        "_state",
    )

    def __init__(self, begin: ModelBegin) -> None:
        if type(begin) is not ModelBegin:
            raise TypeError("ModelReceiver needs a ModelBegin")
        self._begin = begin
        # Anonymous and private (not mmap's default MAP_SHARED, see "Page faults" above):
        # never backed by a file; pages appear as chunks land.
        self._buffer: mmap.mmap | None = mmap.mmap(-1, begin.size, flags=mmap.MAP_PRIVATE)
        self._hash = _Hasher()
        # A receiver dropped mid-transfer (the link went away) must not leave its thread
        # waiting forever, holding views of the buffer.
        weakref.finalize(self, self._hash.stop)
        self._prefault = _Prefaulter(self._buffer, begin.size)
        weakref.finalize(self, self._prefault.stop)
        self._received = 0
        self._state = ReceiverState.RECEIVING
        #: Slices handed out by :meth:`place` and not yet added, by offset.
        self._placed: dict[int, memoryview] = {}
        #: Where the last slice handed out ends; none starts before it.
        self._placed_end = 0

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
        self._placed.clear()
        self._hash.stop()
        self._prefault.stop()
        return RemoteProtocolError(
            message, code=code, field=field, limit=limit, got=got, state="receiving"
        )

    def _check_receiving(self, what: str) -> mmap.mmap:
        if self._state is not ReceiverState.RECEIVING or self._buffer is None:
            raise RemoteProtocolError(
                f"{what} after the model transfer ended", state=self._state.value
            )
        return self._buffer

    def place(self, offset: int, nbytes: int) -> memoryview | None:
        """Where the chunk announced at ``offset`` with ``nbytes`` should be received.

        Returns:
            A writable view of ``[offset, offset + nbytes)`` of the buffer, or ``None``
            (receive it elsewhere; :meth:`add` copies it) when the range is not within the
            model, starts before a range already handed out or received, or the transfer
            is not receiving. ``None`` is no verdict: :meth:`add` judges the chunk.
        """
        buffer = self._buffer
        end = offset + nbytes
        if (
            buffer is None
            or self._state is not ReceiverState.RECEIVING
            or nbytes <= 0
            or offset < max(self._placed_end, self._received)
            or end > self._begin.size
        ):
            return None
        with memoryview(buffer) as whole:
            target = whole[offset:end]
        self._placed[offset] = target
        self._placed_end = end
        return target

    def add(self, chunk: ModelChunk) -> None:
        """Copy one chunk into place (unless it was received there) and hash it.

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
        placed = self._placed.pop(chunk.offset, None)
        if placed is not None and placed is data:
            # Received in place by way of place(): the bytes are where they belong. The
            # hasher gets a view of its own, as it releases the views it is given.
            self._hash.update(placed[:])
        else:
            if data.format != "B" or data.ndim != 1:
                data = data.cast("B") if data.c_contiguous else memoryview(data.tobytes())
            # memoryview slice assignment is one memcpy, with no temporary copy of the chunk.
            with memoryview(buffer) as target:
                target[self._received : end] = data
                self._hash.update(target[self._received : end])
        self._received = end
        self._prefault.advance(end)

    def finish(self, end: ModelEnd) -> memoryview:
        """Check that the whole model arrived intact; return it.

        Returns:
            A read-only ``memoryview`` of exactly the announced size over the receiver's
            buffer (no copy), which now owns that buffer: the receiver keeps no reference.
            Pass it to :func:`drm_enclave.model_host.load_model`.

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
        self._prefault.join()  # done by now: the model's pages are all present
        digest = self._hash.digest()
        if not hmac.compare_digest(digest, self._begin.sha256):
            raise self._fail(
                "model SHA-256 does not match the one announced in model_begin",
                field="sha256",
                got=digest.hex(),
            )
        self._state = ReceiverState.DONE
        self._buffer = None
        self._placed.clear()
        with memoryview(buffer) as view:
            return view.toreadonly()

    def release(self) -> None:
        """Drop the buffer of a transfer that did not finish (it accepts nothing more).

        After :meth:`finish` the receiver holds no buffer any more, so this only marks an
        unfinished transfer failed; the memory goes when no view over it is alive.
        """
        self._buffer = None
        self._placed.clear()
        if self._state is ReceiverState.RECEIVING:
            self._state = ReceiverState.FAILED
            self._hash.stop()
            self._prefault.stop()
