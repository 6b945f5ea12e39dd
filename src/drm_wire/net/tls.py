"""TLS 1.3 as a ``trio.abc.Stream``, over pyOpenSSL memory BIOs.

Theory of operation
-------------------
``SSL.Connection(ctx, None)`` owns no socket: OpenSSL reads ciphertext from an incoming
memory BIO (we fill it with ``bio_write`` from whatever the transport stream delivered)
and writes ciphertext to an outgoing memory BIO (we empty it with ``bio_read`` and hand
the bytes to the transport). All waiting happens in trio, on the transport; OpenSSL
calls never block. A memory BIO grows as needed, so OpenSSL never says "want write".

*Sending.* pyOpenSSL turns on ``SSL_MODE_ENABLE_PARTIAL_WRITE``, so ``Connection.send``
would encrypt at most one record (16 KiB) per call; we clear it
(:func:`~drm_wire.net._openssl_handles.whole_writes`), so one call encrypts up to
``_FLUSH_BYTES`` as many records: the outgoing BIO is a memory BIO that grows as needed,
so a whole write never stops half-way. ``send_all`` loops over a memoryview of the
caller's buffer (no copy of the payload) and, every ``_FLUSH_BYTES`` of plaintext, moves
the whole outgoing BIO to the transport in one read sized from the record overhead, so
one large write replaces many small ones. That read lands in a
buffer which is then sent as it is (:data:`~drm_wire.net._openssl_handles.BIO_READ`):
``bio_read`` would copy every ciphertext byte a second time.
Once bytes are encrypted they are committed: a send that fails or is cancelled after that
leaves the stream BROKEN (never "maybe sent").

*Receiving.* ``SSL_read`` returns one record at most. ``receive_some`` drains records
until ``max_bytes`` is reached or no complete record is left, so a bulk reader pays
Python overhead per ``receive_some`` call rather than per 16 KiB. A
:class:`~drm_wire.net._ssl_util.RecordCounter` follows the record framing of the
ciphertext we feed, so we know when nothing is left without a doomed ``SSL_read`` (a
raised ``WantReadError`` costs about as much as decrypting a small record). A read
outcome is one of: data; ``WantReadError`` (feed more); ``ZeroReturnError``
(close_notify: return ``b""``); transport EOF without close_notify (ragged EOF:
``trio.BrokenResourceError``); any other ``SSL.Error`` (``trio.BrokenResourceError``).
Waiting on the transport is cancel-safe (nothing is consumed), so a cancelled or
timed-out receive leaves the stream usable.

*Transport.* Over a ``trio.SocketStream`` (every TCP link) the stream reads and writes
the socket's descriptor itself, as :mod:`drm_wire.net._socket_io` explains; any other
transport (memory streams in tests) is used through its ``Stream`` methods. Either way
transport errors become ``trio.BrokenResourceError``.

*Handshake.* Runs once, on ``do_handshake()`` or the first send/receive, under a lock so
that a sender and a receiver task can both trigger it, and under ``fail_after
(handshake_timeout)``. A server leaves its session tickets in the BIO until its first
send, so finishing the handshake never waits for a peer that is not reading. In TLS 1.3
the post-handshake traffic (tickets, key updates) needs no reply before our next write,
so after the handshake only ``send_all`` writes to the transport and the two directions
never contend for it.

*Peer verification* runs inside OpenSSL's verify callback during the handshake (see
:mod:`drm_wire.net._tls_context`): a refused peer fails the handshake before any
application byte moves. A client learns in ``do_handshake`` that it refused the server;
in TLS 1.3 a client whose certificate the server refuses has already finished its own
handshake, so it learns of it from the server's alert on its first ``receive_some``.

*State* is OK, BROKEN (a failure left the TLS state unknown: only ``aclose`` works) or
CLOSED, as in ``trio.SSLStream``.
"""

from __future__ import annotations

import contextlib
import enum
import operator
from collections.abc import Callable
from typing import NoReturn, TypeVar

import trio
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from drm_wire.errors import DrmError
from drm_wire.limits import HANDSHAKE_TIMEOUT, KiB
from drm_wire.net import _openssl_handles as _handles
from drm_wire.net import _socket_io
from drm_wire.net._socket_io import SOCKET_BUFFER_BYTES, socket_buffer_size
from drm_wire.net._ssl_util import ConflictDetector, RecordCounter, describe
from drm_wire.net._tls_context import (
    PeerVerifier,
    _PeerCheck,
    client_context,
    server_context,
    sni_name,
)

__all__ = [
    "SOCKET_BUFFER_BYTES",
    "PeerVerificationError",
    "PeerVerifier",
    "TLSStream",
    "accept_tls",
    "client_context",
    "open_tls_client",
    "server_context",
    "socket_buffer_size",
]

T = TypeVar("T")


#: Largest plaintext in one TLS record; ``SSL_read`` never returns more.
_RECORD = 16 * KiB
#: Ciphertext bytes a TLS 1.3 AEAD record adds: 5 header + 1 content type + 16 tag.
_RECORD_OVERHEAD = 22
#: Plaintext encrypted before the outgoing BIO is flushed: big enough to amortise the
#: transport call, small enough that the ciphertext is still in cache when it is sent.
_FLUSH_BYTES = 256 * KiB
#: Size hint for flushing a handshake flight: a certificate chain plus signatures fits,
#: so each flight goes out in one transport write.
_HANDSHAKE_FLIGHT = 8 * KiB
#: Default ``receive_some`` size, the transport's read size: 16 records per call on bulk.
DEFAULT_RECEIVE_BYTES = _socket_io.READ_BYTES
#: How long ``aclose`` tries to deliver close_notify to a peer that is not reading.
CLOSE_NOTIFY_TIMEOUT = 1.0


class PeerVerificationError(DrmError):
    """The peer-verification hook refused the peer; the handshake failed.

    The verifier's own exception is the ``__cause__``. The stream is broken.
    """


class _State(enum.Enum):
    #: Usable.
    OK = "ok"
    #: A failure left the TLS state unknown; only ``aclose()`` is allowed.
    BROKEN = "broken"
    #: ``aclose()`` was called.
    CLOSED = "closed"


class TLSStream(trio.abc.Stream):
    """A TLS 1.3 stream over another ``trio.abc.Stream``, driven by pyOpenSSL.

    Args:
        transport_stream: the stream carrying ciphertext (usually TCP).
        context: from :func:`client_context` or :func:`server_context`.
        server_side: which end of the handshake we are.
        server_hostname: SNI to send (client side; ignored for IP literals).
        handshake_timeout: seconds the whole handshake may take, verification included.
        read_timeout: if not ``None``, ``receive_some`` raises ``trio.TooSlowError``
            when the peer sends nothing for that long. The stream stays usable, since
            waiting consumes nothing. ``None`` (the default) leaves deadlines to the
            caller, e.g. a heartbeat-driven reader.

    Like ``trio.SSLStream``, this is a ``Stream`` and not a ``HalfCloseableStream``:
    there is no ``send_eof``. ``aclose`` sends close_notify, which the peer reads as
    ``b""``.

    Attributes:
        transport_stream: the wrapped stream. Do not use it directly.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        context: SSL.Context,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        read_timeout: float | None = None,
    ) -> None:
        self.transport_stream = transport_stream
        self._socket = _socket_io.own_socket(transport_stream)
        self.handshake_timeout = handshake_timeout
        self.read_timeout = read_timeout
        self._server_side = server_side
        self._state = _State.OK
        self._handshake_done = False
        self._handshake_lock = trio.Lock()
        self._records = RecordCounter()
        self._got_close_notify = False
        self._peer_check = _PeerCheck()
        self._conn = SSL.Connection(context, None)
        _handles.whole_writes(self._conn)
        self._conn.set_app_data(self._peer_check)
        if server_side:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            sni = sni_name(server_hostname)
            if sni is not None:
                self._conn.set_tlsext_host_name(sni)
        self._send_conflict = ConflictDetector("another task is sending on this TLS stream")
        self._receive_conflict = ConflictDetector("another task is receiving on this TLS stream")

    def __repr__(self) -> str:
        role = "server" if self._server_side else "client"
        shake = "handshaken" if self._handshake_done else "not handshaken"
        return f"<TLSStream {role} {self._state.value} {shake}>"

    # --- peer information ----------------------------------------------------------

    @property
    def peer_identity(self) -> object:
        """The verifier's proof object, or ``None`` (no verifier, or no handshake yet)."""
        return self._peer_check.identity if self._handshake_done else None

    def peer_identity_as(self, kind: type[T]) -> T:
        """Return :attr:`peer_identity` as ``kind``, for code that needs a verified peer.

        Raises:
            PeerVerificationError: no proof of that type (no verifier, no handshake).
        """
        identity = self.peer_identity
        if not isinstance(identity, kind):
            raise PeerVerificationError(f"peer was not verified as {kind.__name__}")
        return identity

    def peer_certificate_der(self) -> bytes | None:
        """The DER of the peer's leaf certificate, or ``None`` if it sent none."""
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            return None
        return cert.public_bytes(Encoding.DER)

    @property
    def tls_version(self) -> str | None:
        """Negotiated protocol, e.g. ``"TLSv1.3"``; ``None`` before the handshake."""
        return self._conn.get_protocol_version_name() if self._handshake_done else None

    @property
    def cipher(self) -> str | None:
        """Negotiated cipher suite, e.g. ``"TLS_AES_256_GCM_SHA384"``."""
        return self._conn.get_cipher_name() if self._handshake_done else None

    # --- state helpers -------------------------------------------------------------

    def _check_status(self) -> None:
        if self._state is _State.OK:
            return
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TLS stream is broken")
        raise trio.ClosedResourceError("this TLS stream was closed")

    def _fail(self, message: str) -> trio.BrokenResourceError | trio.ClosedResourceError:
        """Mark the stream broken (unless closed) and return the error to raise."""
        if self._state is _State.CLOSED:
            return trio.ClosedResourceError("this TLS stream was closed")
        self._state = _State.BROKEN
        return trio.BrokenResourceError(message)

    def _mark_broken(self) -> None:
        if self._state is _State.OK:
            self._state = _State.BROKEN

    # --- transport I/O -------------------------------------------------------------

    async def _transport_send(self, data: bytes | memoryview) -> None:
        try:
            if self._socket is None:
                await self.transport_stream.send_all(data)
            else:
                await _socket_io.send_all(self._socket, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._fail(f"TLS transport failed while sending: {exc!r}") from exc

    async def _transport_receive(self) -> tuple[bytes | bytearray | memoryview, bool]:
        """One transport read, and whether it was a schedule point. The bytes are valid
        until the next schedule point (see :func:`~drm_wire.net._socket_io.receive`)."""
        if self._socket is None:
            return await self.transport_stream.receive_some(DEFAULT_RECEIVE_BYTES), True
        return await _socket_io.receive(self._socket)

    async def _flush(self, plaintext_bytes: int) -> None:
        """Send the outgoing BIO, expected to hold ``plaintext_bytes`` encrypted."""
        size = plaintext_bytes + (plaintext_bytes // _RECORD + 1) * _RECORD_OVERHEAD + 1 * KiB
        while True:
            out = self._outgoing(size)
            if out is None:
                return
            await self._transport_send(out)
            if len(out) < size:
                return

    def _outgoing(self, size: int) -> bytes | memoryview | None:
        """Up to ``size`` bytes of the outgoing BIO; ``None`` if it is empty.

        A view of a new buffer the BIO was read into (``BIO_READ``), alive as long as the
        view: a task parked mid-write keeps its own. An empty BIO, or any BIO
        error, goes through ``bio_read``, which raises what pyOpenSSL raises.
        """
        conn = self._conn
        bio = getattr(conn, "_from_ssl", None)
        handles = _handles.BIO_READ
        if handles is not None and bio is not None:
            ffi, lib, allocate = handles
            buffer = allocate("char[]", size)
            count = lib.BIO_read(bio, buffer, size)
            if count > 0:
                return memoryview(ffi.buffer(buffer, count))
        try:
            return conn.bio_read(size)
        except SSL.WantReadError:
            return None

    async def _fill(self) -> bool:
        """Move one transport read into the incoming BIO; return whether that was a
        schedule point (a read from a socket with data waiting is not).

        Raises:
            trio.BrokenResourceError: the transport failed or hit EOF (a ragged EOF: a
                clean close would have been a close_notify record, seen by OpenSSL).
            trio.TooSlowError: ``read_timeout`` passed; the stream stays usable.
        """
        try:
            if self.read_timeout is None or not self._handshake_done:
                # (During the handshake, handshake_timeout is the deadline.)
                data, yielded = await self._transport_receive()
            else:
                with trio.fail_after(self.read_timeout):
                    data, yielded = await self._transport_receive()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._fail(f"TLS transport failed while receiving: {exc!r}") from exc
        except trio.TooSlowError:
            raise trio.TooSlowError(f"peer sent nothing for {self.read_timeout} s") from None
        if not data:
            stage = "TLS handshake" if not self._handshake_done else "TLS session"
            raise self._fail(
                f"peer closed the TCP connection during the {stage} without a TLS "
                "close_notify (ragged EOF); data may have been truncated"
            )
        self._conn.bio_write(data)
        self._records.fed(data)
        return yielded

    # --- handshake -----------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake (peer verification included) if it has not run yet.

        Send and receive call this implicitly; call it explicitly to learn about a
        refused peer before doing anything else.

        Raises:
            PeerVerificationError: our verifier refused the peer.
            trio.TooSlowError: the handshake took longer than ``handshake_timeout``.
            trio.BrokenResourceError: any other handshake failure (not TLS, alert from
                the peer, transport failure).
            trio.ClosedResourceError: the stream was closed.
        """
        self._check_status()
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        async with self._handshake_lock:
            self._check_status()
            if self._finished_meanwhile():
                return
            timeout = self.handshake_timeout
            try:
                with trio.fail_after(timeout):
                    await self._handshake_io()
            except trio.TooSlowError:
                self._mark_broken()
                raise trio.TooSlowError(
                    f"TLS handshake did not finish within {timeout} s"
                ) from None
            except BaseException:
                self._mark_broken()
                raise
            self._handshake_done = True
            self._records.trusted = False  # records may have arrived with the last flight

    def _finished_meanwhile(self) -> bool:
        # A separate method so the type checker does not assume the flag unchanged
        # across the lock's await: another task may have done the handshake.
        return self._handshake_done

    async def _handshake_io(self) -> None:
        conn = self._conn
        while True:
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                await self._flush(_HANDSHAKE_FLIGHT)
                await self._fill()
                continue
            except SSL.Error as exc:
                await self._send_alert()
                self._raise_handshake_error(exc)
            break
        # A client's last step queued its Finished (and certificate): the server waits
        # for them. A TLS 1.3 server's last step only queued session tickets; they wait
        # for its first send, since flushing them now could block on a client that is
        # not reading (it is done and may only be sending), as trio.SSLStream also found.
        if not self._server_side:
            await self._flush(_HANDSHAKE_FLIGHT)

    async def _send_alert(self) -> None:
        """Best effort: tell the peer why the handshake failed, so it fails fast too."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush(_HANDSHAKE_FLIGHT)

    def _raise_handshake_error(self, exc: SSL.Error) -> NoReturn:
        check = self._peer_check
        if check.error is not None:
            self._mark_broken()
            raise PeerVerificationError(f"peer refused by verifier: {check.error}") from check.error
        detail = describe(exc)
        if check.chain_error is not None:
            errno, depth = check.chain_error
            detail += f" (X509 verify error {errno} at depth {depth})"
        raise self._fail(f"TLS handshake failed: {detail}") from exc

    # --- the Stream interface ------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``.

        Raises:
            trio.BusyResourceError: another task is sending.
            trio.BrokenResourceError: the stream or transport failed; the stream is now
                broken (also after a cancellation mid-send).
            trio.ClosedResourceError: the stream was closed.
            PeerVerificationError, trio.TooSlowError: see :meth:`do_handshake`.
        """
        with self._send_conflict:
            yielded = await self._start()
            view = memoryview(data)
            if view.itemsize != 1 or view.ndim != 1:
                view = view.cast("B")
            total = len(view)
            if not total:
                if not yielded:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            conn = self._conn
            pos = 0
            try:
                while pos < total:
                    start = pos
                    end = min(pos + _FLUSH_BYTES, total)
                    while pos < end:
                        pos += conn.send(view[pos:end])
                    await self._flush(end - start)
            except SSL.Error as exc:
                raise self._fail(f"TLS send failed: {describe(exc)}") from exc
            except BaseException:
                self._mark_broken()  # ciphertext may be half-sent: never "maybe sent"
                raise

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the transport can take data (after the handshake, if pending)."""
        with self._send_conflict:
            self._check_status()
            if not self._handshake_done:
                await self.do_handshake()
            try:
                await self.transport_stream.wait_send_all_might_not_block()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._fail(f"TLS transport failed: {exc!r}") from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return decrypted bytes (up to ``max_bytes``), or ``b""`` after close_notify.

        Raises:
            ValueError, TypeError: bad ``max_bytes``.
            trio.BusyResourceError: another task is receiving.
            trio.BrokenResourceError: a TLS error or a ragged EOF (the peer closed TCP
                without close_notify); the stream is now broken.
            trio.ClosedResourceError: the stream was closed.
            trio.TooSlowError: ``read_timeout`` passed (the stream stays usable).
            PeerVerificationError: see :meth:`do_handshake`.
        """
        with self._receive_conflict:
            if max_bytes is None:
                max_bytes = DEFAULT_RECEIVE_BYTES
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            return await self._receive(lambda: self._drain(max_bytes), b"")

    async def receive_into(self, buffer: memoryview) -> int:
        """Decrypt into the start of ``buffer``; return the count, or 0 after close_notify.

        Like :meth:`receive_some` (same errors, same waiting), but the plaintext lands in
        the caller's buffer instead of new ``bytes``: a bulk receiver (a frame payload, a
        model chunk in its final place) is spared the copy out of those ``bytes`` and the
        join of the records it drained.

        Raises:
            TypeError, ValueError: ``buffer`` is not a writable, contiguous byte view, or
                is empty.
            See :meth:`receive_some` for the rest.
        """
        with self._receive_conflict:
            if type(buffer) is not memoryview or buffer.readonly:
                raise TypeError("receive_into needs a writable memoryview")
            if buffer.format != "B" or buffer.ndim != 1 or not buffer.contiguous:
                raise TypeError("receive_into needs a contiguous memoryview of bytes")
            if not buffer.nbytes:
                raise ValueError("receive_into needs a non-empty buffer")
            return await self._receive(lambda: self._drain_into(buffer), 0)

    async def _start(self) -> bool:
        """What every send and receive starts with: the status, a cancellation point, the
        handshake if it is not done. Returns whether that already yielded (a handshake)."""
        self._check_status()
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._handshake_done:
            return False
        await self.do_handshake()
        return True

    async def _receive(self, drain: Callable[[], T | None], closed: T) -> T:
        """Both receive methods' loop: ``drain`` what OpenSSL holds, else feed it and retry;
        ``closed`` once close_notify came. Exactly one schedule point either way."""
        yielded = await self._start()
        while True:
            got = closed if self._got_close_notify else drain()
            if got is not None:
                if not yielded:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return got
            yielded = await self._fill() or yielded

    def _drain_into(self, buffer: memoryview) -> int | None:
        """Decrypt buffered records into ``buffer``; ``None`` if OpenSSL needs input first.

        The same loop as :meth:`_drain`, writing each record in place: with ``SSL_read``
        straight into ``buffer`` while that succeeds, and with ``Connection.recv_into`` for
        anything else, so every error is reported exactly as :meth:`_drain` reports it.
        """
        conn = self._conn
        records = self._records
        size = buffer.nbytes
        total = 0
        ssl = getattr(conn, "_ssl", None)
        handles = _handles.SSL_READ
        if handles is not None and ssl is not None and not records.none_buffered():
            ffi, lib = handles
            with ffi.from_buffer(buffer, require_writable=True) as target:
                while total < size:
                    got = lib.SSL_read(ssl, target + total, min(size - total, _RECORD))
                    if got <= 0:
                        if lib.SSL_get_error(ssl, got) == lib.SSL_ERROR_WANT_READ:
                            records.drained()
                            return total or None
                        break  # recv_into below asks again and raises what it is
                    total += got
            # The record count was not kept up: the next drain asks OpenSSL instead.
            records.trusted = False
        while total < size:
            got = self._record(conn.recv_into, buffer[total:], min(size - total, _RECORD))
            if got is None:
                break
            total += got
        if not total:
            return 0 if self._got_close_notify else None
        return total

    def _drain(self, max_bytes: int) -> bytes | None:
        """Decrypt buffered records; ``None`` if OpenSSL needs more input first."""
        chunks: list[bytes] = []
        total = 0
        while total < max_bytes:
            chunk = self._record(self._conn.recv, min(max_bytes - total, _RECORD))
            if chunk is None:
                break
            chunks.append(chunk)
            total += len(chunk)
        if not chunks:
            return b"" if self._got_close_notify else None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _record(self, read: Callable[..., T], *args: object) -> T | None:
        """One ``read`` of a record at most, with the bookkeeping both drains share;
        ``None`` when there is nothing more for now (want read, or close_notify came)."""
        conn, records = self._conn, self._records
        if records.none_buffered() and not conn.pending():
            return None  # OpenSSL could only say "want read"
        try:
            got = read(*args)
        except SSL.WantReadError:
            records.drained()
            return None
        except SSL.ZeroReturnError:
            self._got_close_notify = True
            return None
        except SSL.Error as exc:
            raise self._fail(f"TLS receive failed: {describe(exc)}") from exc
        if not conn.pending():
            records.returned_one()
        return got

    async def aclose(self) -> None:
        """Send close_notify (best effort, bounded), then close the transport.

        Errors delivering close_notify to a gone or busy peer are ignored; anything
        else (including cancellation) is re-raised after the transport is closed.
        """
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        say_goodbye = self._state is _State.OK and self._handshake_done
        self._state = _State.CLOSED
        try:
            if say_goodbye:
                await self._send_close_notify()
        finally:
            await self.transport_stream.aclose()

    async def _send_close_notify(self) -> None:
        conn = self._conn
        if self._send_conflict.held:
            return  # a sender is mid-write (cancelled, or parked): a record may be half-sent
        try:
            conn.shutdown()
            with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT):
                await self._flush(0)  # the close_notify record, and anything queued before it
        except (
            SSL.Error,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.BusyResourceError,
        ):
            pass  # peer gone, or a cancelled sender still owns the transport


async def open_tls_client(
    host: str | bytes,
    port: int,
    context: SSL.Context,
    *,
    server_hostname: str | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    read_timeout: float | None = None,
    local_address: str | None = None,
) -> TLSStream:
    """Connect over TCP, then complete the TLS handshake (verification included).

    ``handshake_timeout`` bounds the TCP connect and, separately, the handshake.
    ``local_address`` is the local IP to connect from (``None``: the system's choice).

    Raises:
        OSError: the TCP connection could not be made.
        trio.TooSlowError: the connect or the handshake took too long.
        PeerVerificationError, trio.BrokenResourceError: see
            :meth:`TLSStream.do_handshake`; the TCP stream is closed first.
    """
    try:
        with trio.fail_after(handshake_timeout):
            tcp = await trio.open_tcp_stream(host, port, local_address=local_address)
    except trio.TooSlowError:
        raise trio.TooSlowError(
            f"TCP connect to {host!r} port {port} did not finish within {handshake_timeout} s"
        ) from None
    if server_hostname is None and isinstance(host, str):
        server_hostname = host
    _socket_io.bulk_buffers(tcp)
    stream = TLSStream(
        tcp,
        context,
        server_side=False,
        server_hostname=server_hostname,
        handshake_timeout=handshake_timeout,
        read_timeout=read_timeout,
    )
    await _handshake_or_close(stream)
    return stream


async def accept_tls(
    transport_stream: trio.abc.Stream,
    context: SSL.Context,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    read_timeout: float | None = None,
) -> TLSStream:
    """Server side: wrap an accepted stream and complete the handshake.

    Meant for a ``trio.serve_tcp`` handler; on failure the transport is closed.

    Raises:
        See :meth:`TLSStream.do_handshake`.
    """
    _socket_io.bulk_buffers(transport_stream)
    stream = TLSStream(
        transport_stream,
        context,
        server_side=True,
        handshake_timeout=handshake_timeout,
        read_timeout=read_timeout,
    )
    await _handshake_or_close(stream)
    return stream


async def _handshake_or_close(stream: TLSStream) -> None:
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
