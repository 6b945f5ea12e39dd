"""pyOpenSSL's private cffi handles, for three things its public API does slowly.

:class:`~drm_wire.net.tls.TLSStream` moves every byte through pyOpenSSL, whose public
calls each cost a copy or a record at a time that a bulk link cannot afford (a 200 MB
model, a 2.76 MB tensor). With the handles of the OpenSSL functions underneath
(``OpenSSL._util.ffi`` / ``lib``), it

* decrypts straight into the caller's buffer (:data:`SSL_READ`);
* encrypts a whole write in one call (:func:`whole_writes`);
* sends ciphertext from the buffer the outgoing BIO was read into (:data:`BIO_READ`).

The handles are private to pyOpenSSL: each is ``None`` (or a no-op) where a release lacks
it, and the stream then takes the public call, which raises what it raises. Tests patch
:data:`SSL_READ` and :data:`BIO_READ` to ``None`` to run those paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL

__all__ = ["BIO_READ", "SSL_READ", "whole_writes"]


def _load_ssl_read() -> tuple[Any, Any] | None:
    """pyOpenSSL's cffi handles, for decrypting straight into a caller's buffer.

    ``Connection.recv_into`` decrypts into a temporary buffer and copies from there (its
    own comment regrets it), a sizeable share of the decryption time of a model transfer.
    Without the handles the public ``recv_into`` is used.
    """
    try:
        from OpenSSL._util import ffi, lib  # optional and private: see above
    except ImportError:  # pragma: no cover - depends on the pyOpenSSL release
        return None
    needed = ("SSL_read", "SSL_get_error", "SSL_ERROR_WANT_READ")
    if not all(hasattr(lib, name) for name in needed):  # pragma: no cover
        return None
    return ffi, lib


#: ``(ffi, lib)`` with ``SSL_read``, or ``None``.
SSL_READ = _load_ssl_read()


def whole_writes(conn: SSL.Connection) -> None:
    """Clear ``SSL_MODE_ENABLE_PARTIAL_WRITE`` on ``conn``, where the handles allow it.

    pyOpenSSL turns it on, and with it each ``Connection.send`` encrypts one 16 KiB
    record: a 2.76 MB tensor took ~170 Python calls to encrypt, and a 200 MB model
    ~12,800, a large share of the sender's CPU. Without it one call encrypts all it is
    given. Without the handles, sends go a record at a time as before.
    """
    ssl = getattr(conn, "_ssl", None)
    if SSL_READ is None or ssl is None or not hasattr(SSL_READ[1], "SSL_clear_mode"):
        return  # depends on the pyOpenSSL release (tested with the handles hidden)
    lib = SSL_READ[1]
    lib.SSL_clear_mode(ssl, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)


def _load_bio_read() -> tuple[Any, Any, Callable[[str, int], Any]] | None:
    """The handles for reading the outgoing BIO into a buffer we then send from.

    ``Connection.bio_read`` reads into a fresh buffer and returns a ``bytes`` copy of it:
    two copies of every ciphertext byte (a 200 MB model: 400 MB of copying). Reading
    into an uncleared cffi buffer and sending from a view of it is one. Without the
    handles ``bio_read`` is used.
    """
    if SSL_READ is None or not hasattr(SSL_READ[1], "BIO_read"):
        return None  # pragma: no cover - depends on the pyOpenSSL release
    ffi, lib = SSL_READ
    return ffi, lib, ffi.new_allocator(should_clear_after_alloc=False)


#: ``(ffi, lib, allocate)`` with ``BIO_read`` and an allocator that does not clear, or
#: ``None``.
BIO_READ = _load_bio_read()
