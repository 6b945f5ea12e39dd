"""One custodian per state directory: an OS lock on a file of its own (I16).

Two custodians on one state directory would share one ledger and one registry each: both
would admit an enclave on the same license, and a ``block`` sent to one would leave the
other's enclave serving. :func:`lock_state_dir` takes an exclusive ``flock`` on
``<state>/custodian.lock`` (never on the ledger: SQLite holds POSIX locks there, and
closing any descriptor of a file drops a process's POSIX locks on it), without waiting:
a second process gets :class:`StateLockedError`, which names the holder's PID. The lock
goes with the process, however it ends (the kernel drops it when the descriptor closes),
so a crash leaves no stale lock to clean up: the file stays, unlocked.

What a lock cannot stop: a copy of the state directory on another machine (or a network
file system that does not pass ``flock`` on) has a lock file of its own. Nothing on the
wire tells two copies apart: each would admit an enclave on the license and lend what its
own copy of the ledger still holds. A copy needs the owner's CA key and admin token, so it
is the owner's own doing (a restored backup) or a theft of the owner's keys, against
which no lock helps; docs/production.md says how to restore a backup safely.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Final, Self

from drm_custodian._state_files import check_dir, check_owner_and_mode
from drm_wire.errors import ConfigError

__all__ = ["LOCK_FILE", "StateLock", "StateLockedError", "lock_state_dir"]

#: The lock file, in the state directory; it holds the holder's PID (for the message).
LOCK_FILE: Final = "custodian.lock"
_MAX_PID_TEXT: Final = 32


class StateLockedError(ConfigError):
    """Another process holds the state directory's lock.

    Attributes:
        pid: the holder's PID as it wrote it, or ``None`` if it could not be read.
    """

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = "another process" if pid is None else f"process {pid}"
        super().__init__(
            f"{holder} already runs a custodian on this state directory; stop it first "
            "(two custodians on one ledger would lend one license twice)",
            path=str(path),
        )
        self.pid = pid


class StateLock:
    """A held lock; :meth:`release` (or the process's end) drops it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lock_state_dir(state_dir: str | os.PathLike[str]) -> StateLock:
    """Take the state directory's lock, or fail at once naming who holds it.

    Blocking (an open and a non-blocking ``flock``): call it before ``trio.run``.

    Raises:
        StateLockedError: another process holds it.
        ConfigError: the directory or the lock file is unusable (missing, a symlink,
            owned by someone else, writable by others).
    """
    root = Path(state_dir)
    check_dir(root)
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the lock file: {exc.strerror}", path=str(path)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("not a regular file", path=str(path))
        check_owner_and_mode(path, st, secret=False)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"cannot lock: {exc.strerror}", path=str(path)) from exc
            raise StateLockedError(root, _read_pid(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return StateLock(path, fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, _MAX_PID_TEXT, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
