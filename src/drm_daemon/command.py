"""How the programs' command lines end: their status, and quietly when the reader left.

``python -m drm_consumer query ... | head -1`` closes the pipe after one line; the next
write (or the flush at exit) raises ``BrokenPipeError``, which Python would print as a
traceback, and again as "Exception ignored" at shutdown. :func:`exit_with` ends the
program quietly instead, with the status a shell gives a program killed by ``SIGPIPE``
(128 + 13), as ``yes | head`` does.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Final, NoReturn

__all__ = ["EXIT_BROKEN_PIPE", "exit_with"]

#: What a shell reports for a program that SIGPIPE ended: 141.
EXIT_BROKEN_PIPE: Final = 128 + signal.SIGPIPE


def exit_with(main: Callable[[], int]) -> NoReturn:
    """Run ``main``, flush standard output, and exit with ``main``'s status."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        status = _reader_left()
    except BaseExceptionGroup as group:  # written from inside a trio nursery
        _, rest = group.split(BrokenPipeError)
        if rest is not None:
            raise
        status = _reader_left()
    sys.exit(status)


def _reader_left() -> int:
    # Whatever is still buffered would fail again at exit: send it nowhere.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE
