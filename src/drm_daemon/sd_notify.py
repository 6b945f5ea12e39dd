"""systemd service notifications (``Type=notify``, ``WatchdogSec=``), per sd_notify(3).

A :class:`Notifier` is read from the environment once, at start-up:

* ``NOTIFY_SOCKET``: the datagram socket systemd listens on, a path or ``@name`` for an
  abstract socket; unset (not under systemd) makes every call a no-op;
* ``WATCHDOG_USEC`` and ``WATCHDOG_PID``: the watchdog interval, for this process only
  when ``WATCHDOG_PID`` is unset or is our pid.

The daemons send ``READY=1`` once really ready, ``STATUS=...`` at each phase (what
``systemctl status`` shows), ``STOPPING=1`` when a signal asks them to stop, and run
:meth:`Notifier.watchdog` in their nursery: it sends ``WATCHDOG=1`` every half interval
*from the event loop*, so a loop that stalls stops the pings and systemd restarts the
service. Sending never blocks: a message systemd has no room for is dropped and logged
(once per run of failures).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Final

import structlog
import trio

__all__ = ["Notifier"]

_log = structlog.get_logger("drm_daemon.sd_notify")

#: STATUS= texts are one line for ``systemctl status``; longer ones are cut.
MAX_STATUS_CHARS: Final = 200


class Notifier:
    """Sends notifications to systemd; a no-op when ``address`` is ``None``.

    Args:
        address: the socket address as ``NOTIFY_SOCKET`` gives it (``@`` for abstract).
        watchdog_interval: seconds within which systemd expects ``WATCHDOG=1``, if any.
    """

    def __init__(self, address: str | None = None, *, watchdog_interval: float | None = None):
        if address is not None and not address.startswith(("/", "@")):
            _log.warning("sd_notify_unsupported_address", address=address)
            address = None
        self.address = address
        self.watchdog_interval = watchdog_interval if address is not None else None
        self._failing = False

    def __repr__(self) -> str:
        return f"<Notifier {self.address!r} watchdog={self.watchdog_interval}>"

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> Notifier:
        """The notifier systemd's environment describes (see the module docstring)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        interval = None
        usec, owner = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0:
            mine = not owner or (owner.isdigit() and int(owner) == (pid or os.getpid()))
            interval = int(usec) / 1e6 if mine else None
        return cls(address, watchdog_interval=interval)

    @property
    def enabled(self) -> bool:
        """Whether anything is sent (the process runs under systemd's notify protocol)."""
        return self.address is not None

    def notify(self, *assignments: str) -> None:
        """Send ``VAR=value`` assignments in one datagram; never blocks, never raises."""
        if self.address is None:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:  # a socket per message, as sd_notify(3) does: nothing to close at exit
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(assignments).encode(), socket.MSG_DONTWAIT, target)
        except OSError as exc:
            if not self._failing:  # once per run of failures, not once per ping
                _log.warning("sd_notify_failed", error=str(exc), message=assignments[0])
            self._failing = True
        else:
            self._failing = False

    def ready(self, status: str | None = None) -> None:
        """``READY=1``: start-up is complete (with a status line, if given)."""
        self.notify("READY=1", *(() if status is None else (_status(status),)))

    def status(self, text: str) -> None:
        """``STATUS=text``: what the service is doing, for ``systemctl status``."""
        self.notify(_status(text))

    def stopping(self, status: str | None = None) -> None:
        """``STOPPING=1``: a clean shutdown has begun."""
        self.notify("STOPPING=1", *(() if status is None else (_status(status),)))

    async def watchdog(self) -> None:
        """Send ``WATCHDOG=1`` every half interval until cancelled; return at once if no
        watchdog is configured. Runs on the event loop on purpose (see the module doc)."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval / 2)


def _status(text: str) -> str:
    line = " ".join(text.split())
    return f"STATUS={line[:MAX_STATUS_CHARS]}"
