"""The demo's child processes: run them, show them, wait on what they print, stop them.

Every program the demo runs is shown first as the shell command a user would type
(``python -m ...``, long lines wrapped with ``\\``), relative to the work directory. One-shot
commands run to completion under a bound; the long-running ones (the two daemons, the
query that waits) are :class:`Background` processes whose merged stdout and stderr a
reader thread collects line by line, so the demo can wait, with a deadline, for a
readiness line (a daemon's JSON log event, the consumer's "waiting" line) instead of
sleeping. Anything that does not happen as described raises :class:`Deviation`, which
says what was expected and what happened, with the process's last lines.

:meth:`Shell.close` stops every background process still running (SIGTERM, then SIGKILL
after a bound) and always reaps them; the demo calls it whatever happened, Ctrl-C
included.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TextIO

__all__ = ["Background", "Completed", "Deviation", "Shell", "command_line", "wrap"]

#: How long a clean SIGTERM shutdown may take before the process is killed.
STOP_TIMEOUT: Final = 15.0
#: Lines of a process's output shown when it did not do what was expected.
TAIL: Final = 15
#: Where the transcript wraps a command (with ``\\``), for reading and copying.
WIDTH: Final = 92


class Deviation(Exception):
    """A step did not behave as described."""

    def __init__(self, expected: str, happened: str, output: Sequence[str] = ()) -> None:
        super().__init__(f"expected {expected}, but {happened}")
        self.expected = expected
        self.happened = happened
        self.output = list(output)[-TAIL:]


def wrap(tokens: Sequence[str], indent: str = "") -> str:
    """Shell-quoted ``tokens`` as one command, wrapped with ``\\`` before :data:`WIDTH`.

    An option and its value stay on one line.
    """
    groups: list[str] = []
    for token in tokens:
        option = groups and groups[-1].startswith("-") and " " not in groups[-1]
        if option and not token.startswith("-"):
            groups[-1] += " " + token
            continue
        groups.append(token)
    lines = [indent + "$ " + groups[0]]
    for group in groups[1:]:
        if len(lines[-1]) + 1 + len(group) > WIDTH - 2:
            lines[-1] += " \\"
            lines.append(indent + "      " + group)
        else:
            lines[-1] += " " + group
    return "\n".join(lines)


def command_line(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``argv`` shell-quoted as the transcript shows it: this interpreter is ``python``."""
    shown = [os.fspath(a) for a in argv]
    if shown and shown[0] == sys.executable:
        shown[0] = "python"
    return [shlex.quote(a) for a in shown]


@dataclass(frozen=True, slots=True)
class Completed:
    """A one-shot command's exit status and output."""

    returncode: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        """Standard output, then standard error, line by line."""
        return [*self.stdout.splitlines(), *self.stderr.splitlines()]


@dataclass(eq=False)
class Background:
    """A long-running child: its output lines and a way to wait for one of them."""

    name: str
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _ended: bool = False
    _reader: threading.Thread | None = None

    def start_reading(self) -> None:
        """Collect the output on a thread (a daemon thread: it never blocks the exit)."""
        assert self.process.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout,), name=self.name, daemon=True
        )
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        except (OSError, ValueError):
            pass  # closed under us by stop()
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def wait_line(
        self, matches: Callable[[str], bool], expected: str, timeout: float, after: int = 0
    ) -> str:
        """The first line (from index ``after``) that ``matches``; bounded.

        Raises:
            Deviation: the process ended, or ``timeout`` passed, without printing one.
        """

        def found() -> str | bool | None:
            for line in self.lines[after:]:
                if matches(line):
                    return line
            return self._ended or None

        with self._changed:
            outcome = self._changed.wait_for(found, timeout=timeout)
        if isinstance(outcome, str):
            return outcome
        if outcome:
            happened = f"the {self.name} exited with status {self._wait(STOP_TIMEOUT)}"
        else:
            happened = f"the {self.name} did not within {timeout:g} s"
        raise Deviation(expected, happened, self.lines)

    def wait_event(
        self,
        event: str,
        expected: str,
        timeout: float,
        check: Callable[[dict[str, Any]], bool] = lambda _: True,
    ) -> dict[str, Any]:
        """The first JSON log line for ``event`` that passes ``check``, parsed; bounded."""

        def matches(line: str) -> bool:
            entry = _json(line)
            return entry is not None and entry.get("event") == event and check(entry)

        found = _json(self.wait_line(matches, expected, timeout))
        assert found is not None
        return found

    def events(self, event: str) -> list[dict[str, Any]]:
        """Every JSON log line for ``event`` so far."""
        with self._changed:
            parsed = [_json(line) for line in self.lines]
        return [e for e in parsed if e is not None and e.get("event") == event]

    def wait_exit(self, expected: str, timeout: float) -> int:
        """Wait for the process to exit on its own; its status.

        Raises:
            Deviation: it still runs after ``timeout``.
        """
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Deviation(
                expected, f"the {self.name} still runs after {timeout:g} s", self.lines
            ) from None
        self._join()
        return status

    def terminate(self, expected: str, timeout: float) -> int:
        """SIGTERM, as Ctrl-C in its terminal would stop it; wait for the exit, bounded."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(expected, timeout)

    def stop(self) -> int:
        """SIGTERM, a bounded wait, then SIGKILL; always reaps. The exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self._wait(STOP_TIMEOUT)
        self._join()
        return status

    def _wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout)

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _json(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Shell:
    """Runs commands in the work directory, prints them, and owns the background ones.

    Args:
        workdir: the current directory of every command.
        out: the transcript.
    """

    def __init__(self, workdir: Path, out: TextIO) -> None:
        self.workdir = workdir
        self.out = out
        self._children: list[Background] = []
        self._env = dict(os.environ, PYTHONUNBUFFERED="1")

    def say(self, text: str = "") -> None:
        """One line of the transcript."""
        print(text, file=self.out, flush=True)

    def show_output(self, lines: Sequence[str]) -> None:
        """A command's output, indented under it."""
        for line in lines:
            self.say(f"    | {line}")

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        timeout: float,
        *,
        shown: str | None = None,
        show_stderr: bool = True,
    ) -> Completed:
        """Show and run a one-shot command to completion (bounded); show its output.

        ``shown`` replaces the command as printed (the curl call runs under ``sh -c``).
        With ``show_stderr`` standard error is merged into standard output, in the order
        the command wrote them (``Completed.stderr`` is then empty); without it, standard
        error (the daemons' JSON logs, curl's progress meter) is kept apart and shown
        only when the command fails.

        Raises:
            Deviation: it did not finish within ``timeout``.
        """
        self.say(shown or wrap(command_line(argv), "  "))
        try:
            done = subprocess.run(  # noqa: S603 (our own interpreter and the demo's commands)
                [os.fspath(a) for a in argv],
                cwd=self.workdir,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if show_stderr else subprocess.PIPE,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            output = [*_text(exc.stdout).splitlines(), *_text(exc.stderr).splitlines()]
            raise Deviation(
                "the command to finish", f"it still ran after {timeout:g} s", output
            ) from None
        result = Completed(done.returncode, done.stdout, done.stderr or "")
        self.show_output(result.lines() if done.returncode else result.stdout.splitlines())
        return result

    def start(self, name: str, argv: Sequence[str | os.PathLike[str]]) -> Background:
        """Show and start a long-running command (``&`` in the transcript)."""
        self.say(wrap([*command_line(argv), "&"], "  "))
        process = subprocess.Popen(  # noqa: S603 (our own interpreter and the demo's commands)
            [os.fspath(a) for a in argv],
            cwd=self.workdir,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        child = Background(name, process)
        self._children.append(child)
        child.start_reading()
        self.say(f"    [{name}: pid {process.pid}]")
        return child

    def running(self) -> list[Background]:
        """The background processes that have not exited."""
        return [c for c in self._children if c.process.poll() is None]

    def close(self) -> None:
        """Stop every background process (the newest first) and reap it."""
        for child in reversed(self._children):
            child.stop()


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
