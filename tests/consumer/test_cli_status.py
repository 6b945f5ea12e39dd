"""The waiting status line: rewritten in place on a terminal, plain lines on a pipe."""

from __future__ import annotations

import io

import pytest
import trio
import trio.testing

from drm_consumer._status import PLAIN_EVERY, WaitStatus, format_elapsed


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00"), (7.9, "0:07"), (750, "12:30"), (3723, "1:02:03")]
)
def test_format_elapsed(seconds: float, text: str) -> None:
    assert format_elapsed(seconds) == text


async def test_nothing_is_shown_without_a_wait(autojump_clock: trio.testing.MockClock) -> None:
    stream = Terminal()
    status = WaitStatus(stream, limit=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(status.run)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    status.finish("Inferences supplied")
    assert stream.getvalue() == ""


async def test_terminal_line_is_rewritten_in_place(autojump_clock: trio.testing.MockClock) -> None:
    stream = Terminal()
    status = WaitStatus(stream, limit=30.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(status.run)
        await trio.sleep(1)
        status.waiting(2)
        await trio.sleep(3.1)
        status.waiting(1)
        await trio.sleep(1.1)
        nursery.cancel_scope.cancel()
    status.finish("Inferences supplied")
    text = stream.getvalue()
    assert "\n" not in text[:-1]  # one line, rewritten with \r, ended once
    frames = text.split("\r")[1:]
    assert "(queue position 2), 0:00 elapsed of at most 30 s" in frames[0]
    assert any("(queue position 2), 0:03 elapsed" in frame for frame in frames)
    assert "(queue position 1), 0:04 elapsed" in frames[-2]
    assert frames[-1].startswith("Inferences supplied after 0:04")
    assert frames[-1].endswith("\n")
    assert len(frames[-1].rstrip("\n")) >= len(frames[-2])  # padded over the longer line


async def test_pipe_gets_plain_lines_on_change_and_periodically(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = io.StringIO()
    status = WaitStatus(stream, limit=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(status.run)
        status.waiting(3)
        await trio.sleep(PLAIN_EVERY + 5.5)
        status.waiting(1)
        await trio.sleep(2.5)
        nursery.cancel_scope.cancel()
    status.finish("Gave up waiting for inferences")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 4
    assert "(queue position 3), 0:00 elapsed" in lines[0]
    assert "(queue position 3), 0:30 elapsed" in lines[1]
    assert "(queue position 1), 0:35 elapsed" in lines[2]
    assert lines[3] == "Gave up waiting for inferences after 0:38"
