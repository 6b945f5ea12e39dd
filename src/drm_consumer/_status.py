"""The live "waiting for inferences" status line of ``python -m drm_consumer query``.

:meth:`WaitStatus.waiting` is the client's ``on_waiting`` callback: it runs in the task
reading the connection, so it only records the queue position and wakes the ticker.
:meth:`WaitStatus.run` is the ticker task: once the enclave first says the request is
parked, it redraws the line with the elapsed time. On a terminal the line is rewritten in
place (``\\r``) several times a second; on a pipe or file it degrades to plain lines: one
when the wait starts or the queue position changes, and one every :data:`PLAIN_EVERY`
seconds. :meth:`WaitStatus.finish` ends the line with how long the wait took.
"""

from __future__ import annotations

from typing import Final, TextIO

import trio

__all__ = ["PLAIN_EVERY", "TTY_TICK", "WaitStatus", "format_elapsed"]

#: How often the terminal line is redrawn (seconds).
TTY_TICK: Final = 0.25
#: How often a plain "still waiting" line is written when the output is not a terminal.
PLAIN_EVERY: Final = 30.0


def format_elapsed(seconds: float) -> str:
    """``0:07``, ``12:30``, ``1:02:03``."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_limit(seconds: float) -> str:
    """``--wait`` as given: ``1.5 s`` below a minute, ``2:30`` above."""
    return f"{seconds:g} s" if seconds < 60 else format_elapsed(seconds)


class WaitStatus:
    """Shows that a request is parked until the custodian supplies inferences.

    Args:
        stream: where the line goes (standard error).
        limit: the ``--wait`` bound in seconds, or ``None`` for no bound.
        interactive: rewrite the line in place; by default when ``stream`` is a terminal.
    """

    def __init__(
        self, stream: TextIO, *, limit: float | None, interactive: bool | None = None
    ) -> None:
        self._stream = stream
        self._limit = limit
        self._interactive = stream.isatty() if interactive is None else interactive
        self._started: float | None = None
        self._position: int | None = None
        self._shown_position: int | None = None
        self._next_plain = 0.0
        self._width = 0
        self._changed = trio.Event()

    @property
    def waited(self) -> bool:
        """Whether the enclave ever said the request was parked."""
        return self._started is not None

    def elapsed(self) -> float:
        """Seconds since the enclave first said the request was parked (0 if never)."""
        return 0.0 if self._started is None else trio.current_time() - self._started

    def waiting(self, position: int) -> None:
        """The ``on_waiting`` callback: record the position, wake the ticker. Never blocks."""
        if self._started is None:
            self._started = trio.current_time()
        self._position = position
        self._changed.set()

    async def run(self) -> None:
        """Redraw the status until cancelled (start it beside the inference)."""
        await self._changed.wait()
        while True:
            self._changed = trio.Event()
            self._draw()
            with trio.move_on_after(TTY_TICK if self._interactive else 1.0):
                await self._changed.wait()  # a new position is shown at once

    def finish(self, outcome: str) -> None:
        """End the status with ``outcome`` and the time waited, if there was a wait."""
        if self._started is None:
            return
        self._write_line(f"{outcome} after {format_elapsed(self.elapsed())}", final=True)

    def _text(self) -> str:
        elapsed = format_elapsed(self.elapsed())
        bound = "" if self._limit is None else f" of at most {_format_limit(self._limit)}"
        return (
            f"No inferences left: waiting for the custodian to supply more "
            f"(queue position {self._position}), {elapsed} elapsed{bound}"
        )

    def _draw(self) -> None:
        if self._interactive:
            self._write_line(self._text(), final=False)
            return
        elapsed = self.elapsed()
        if self._position != self._shown_position or elapsed >= self._next_plain:
            self._shown_position = self._position
            self._next_plain = (elapsed // PLAIN_EVERY + 1) * PLAIN_EVERY
            self._write_line(self._text(), final=True)

    def _write_line(self, text: str, *, final: bool) -> None:
        if self._interactive:
            padding = " " * max(0, self._width - len(text))
            self._width = 0 if final else len(text)
            self._stream.write(f"\r{text}{padding}" + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
