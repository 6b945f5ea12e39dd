"""Why a daemon could not listen, in words that name the port and the fix.

``trio.open_tcp_listeners`` and hypercorn raise a bare ``OSError`` ("[Errno 98] Address
already in use") that names neither the address nor the option that chose it; the
daemons turn it into a :class:`ListenError` that does.
"""

from __future__ import annotations

import errno

from drm_wire.errors import DrmError
from drm_wire.net.address import format_address

__all__ = ["ListenError", "cannot_listen"]


class ListenError(DrmError):
    """A daemon could not listen on an address it was given."""


def cannot_listen(exc: OSError, what: str, host: str, port: int, option: str) -> ListenError:
    """The error to raise, ``from exc``, when listening for ``what`` failed.

    Args:
        exc: what the bind raised.
        what: who would have connected ("enclaves", "the admin API", "consumers").
        host, port: where it was asked to listen.
        option: the command-line option (and configuration key) that chose the port.
    """
    where = format_address(host, port)
    if exc.errno == errno.EADDRINUSE:
        fix = (
            f"another program already listens there (is this daemon running already?): "
            f"stop it, or choose another {option}"
        )
    elif exc.errno == errno.EACCES:
        fix = f"ports below 1024 need privileges: choose another {option}"
    elif exc.errno == errno.EADDRNOTAVAIL:
        fix = f"{host} is not an address of this machine"
    else:
        fix = exc.strerror or str(exc)
    return ListenError(f"cannot listen for {what} on {where}: {fix}")
