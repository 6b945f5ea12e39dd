"""A stand-in for systemd's notification socket, for tests that run the daemons.

:class:`NotifySocket` binds a datagram socket in the abstract namespace (no file, no
path-length limit, gone with the socket) and gives the environment that points a child
at it (``NOTIFY_SOCKET=@name``, ``WATCHDOG_USEC``). Every datagram is kept, parsed into
its ``VAR=value`` assignments, with the monotonic time it was read. :meth:`wait_for`
blocks with a deadline, never a sleep.
"""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Final

#: Start-up of either daemon on a loaded machine (the enclave dials, attests, loads).
NOTIFY_TIMEOUT: Final = 60.0


@dataclass(frozen=True, slots=True)
class Notification:
    """One datagram: its assignments, and when the test read it (``time.monotonic``)."""

    fields: dict[str, str]
    at: float

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str) -> str | None:
        return self.fields.get(key)


@dataclass(eq=False)
class NotifySocket:
    """The listening end of ``NOTIFY_SOCKET``; close it (or use ``with``)."""

    name: str = field(default_factory=lambda: f"@drm-test-notify-{secrets.token_hex(8)}")
    received: list[Notification] = field(default_factory=list)
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def environment(self, watchdog_usec: int | None = None) -> dict[str, str]:
        """What systemd would set for a ``Type=notify`` service (with ``WatchdogSec=``)."""
        env = {"NOTIFY_SOCKET": self.name}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def _receive(self, timeout: float) -> Notification | None:
        self.sock.settimeout(max(timeout, 0.0))  # 0: non-blocking
        try:
            data = self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return None
        pairs = (line.partition("=") for line in data.decode().split("\n") if line)
        note = Notification({key: value for key, _, value in pairs}, time.monotonic())
        self.received.append(note)
        return note

    def drain(self) -> list[Notification]:
        """Read whatever is already queued, without waiting; all received so far."""
        while self._receive(0.0) is not None:
            pass
        return self.received

    def wait_for(
        self, key: str, value: str | None = None, *, timeout: float = NOTIFY_TIMEOUT, after: int = 0
    ) -> Notification:
        """The first notification (from index ``after``) that sets ``key`` (to ``value``).

        Raises:
            AssertionError: none came within ``timeout``; the message lists what did.
        """
        deadline = time.monotonic() + timeout
        index = after
        while True:
            while index < len(self.received):
                note = self.received[index]
                index += 1
                if key in note and (value is None or note.get(key) == value):
                    return note
            left = deadline - time.monotonic()
            if left <= 0 or (self._receive(left) is None and time.monotonic() >= deadline):
                shown = [n.fields for n in self.received]
                raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {shown}")

    def values(self, key: str) -> list[str]:
        """Every value ``key`` was given, in order."""
        return [n.fields[key] for n in self.received if key in n]
