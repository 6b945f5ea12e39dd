"""Small pieces of :class:`~drm_wire.net.tls.TLSStream` that need no I/O.

* :class:`ConflictDetector`: trio's "one task per direction" rule.
* :func:`describe`: a readable reason from a pyOpenSSL error.
* :class:`RecordCounter`: knows whether OpenSSL holds a complete TLS record, so the
  stream never pays for an ``SSL_read`` that can only fail with ``WantReadError``.

How the record counter works
----------------------------
Every TLS record starts with a 5-byte header whose last two bytes are the body length.
The stream shows the counter every byte it feeds to OpenSSL (:meth:`RecordCounter.fed`),
so it counts complete records *in*. A record is *out* when ``SSL_read`` has returned its
last byte (the stream calls :meth:`RecordCounter.returned_one` when ``pending()`` is 0).
OpenSSL also consumes records that carry no application data (session tickets, key
updates) without returning anything, so "out" can only lag behind the truth: the
stream may try one ``SSL_read`` too many, never one too few. Each ``WantReadError``
means every complete record has been consumed, which resynchronises the counts
(:meth:`RecordCounter.drained`). The counts start untrusted and are distrusted again
after the handshake, whose records the stream does not follow one by one.
"""

from __future__ import annotations

import trio
from OpenSSL import SSL

from drm_wire.limits import KiB

__all__ = ["ConflictDetector", "RecordCounter", "describe"]

#: TLS record header: type (1), legacy version (2), length (2).
_HEADER = 5
#: Largest legal record body (RFC 8446 section 5.2: 2**14 + 256).
_MAX_BODY = 16 * KiB + 256


class ConflictDetector:
    """Raise ``trio.BusyResourceError`` when two tasks use one direction at once.

    Like trio's private ``ConflictDetector``, which we do not import.
    """

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._held = False
        self._message = message

    @property
    def held(self) -> bool:
        """Whether a task is inside the guarded section now."""
        return self._held

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False


def describe(exc: SSL.Error) -> str:
    """Turn pyOpenSSL's ``[(lib, func, reason), ...]`` into ``"reason; reason"``."""
    if exc.args and isinstance(exc.args[0], list):
        reasons = [str(item[-1]) for item in exc.args[0] if isinstance(item, tuple) and item]
        if reasons:
            return "; ".join(reasons)
    return repr(exc)


class RecordCounter:
    """Counts complete TLS records fed to OpenSSL against those it has handed back.

    Attributes:
        trusted: whether the counts may be relied on (see the module docstring).
    """

    __slots__ = ("_head", "_in", "_out", "_rest", "trusted")

    def __init__(self) -> None:
        self._in = 0  # complete records fed
        self._out = 0  # records known to be consumed
        self._rest = 0  # bytes of the current record not fed yet (0: at a header)
        self._head = bytearray()  # a header split across two feeds
        self.trusted = False

    def __repr__(self) -> str:
        return f"<RecordCounter in={self._in} out={self._out} trusted={self.trusted}>"

    def none_buffered(self) -> bool:
        """True when OpenSSL is known to hold no complete record we have not seen out.

        Plaintext OpenSSL already decrypted (``pending()``) is the caller's to check.
        """
        return self.trusted and self._out >= self._in

    def returned_one(self) -> None:
        """``SSL_read`` returned the last byte of a record."""
        self._out += 1

    def drained(self) -> None:
        """``SSL_read`` said "want read": every complete record fed has been consumed."""
        self._out = self._in
        self.trusted = True

    def fed(self, data: bytes | bytearray | memoryview) -> None:
        """Follow the record framing over ``data``, just written into OpenSSL's BIO."""
        size = len(data)
        rest = self._rest
        head = self._head
        if head:
            need = _HEADER - len(head)
            head += data[:need]
            if len(head) < _HEADER:
                return
            rest = need + self._body_length(head[3], head[4])
            head.clear()
        if rest > size:
            self._rest = rest - size
            return
        complete = 1 if rest else 0
        pos = rest
        while pos + _HEADER <= size:
            end = pos + _HEADER + self._body_length(data[pos + 3], data[pos + 4])
            if end > size:
                self._rest = end - size
                self._in += complete
                return
            complete += 1
            pos = end
        self._rest = 0
        if pos < size:
            head += data[pos:]
        self._in += complete

    def _body_length(self, high: int, low: int) -> int:
        length = (high << 8) | low
        if length > _MAX_BODY:
            # Not TLS framing. Stop trusting the counts so the next receive asks OpenSSL,
            # which reports the garbage, instead of waiting for a record that never ends.
            self.trusted = False
        return length
