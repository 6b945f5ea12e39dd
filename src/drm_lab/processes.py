"""Run the real programs as subprocesses, on loopback, and wait for what they print.

Theory of operation
-------------------
Both daemons log one JSON object per line on stderr (``drm_daemon.logs``; a pipe is not a
terminal, so the JSON renderer is chosen). :func:`start_daemon` starts a long-running
program (a daemon, or a query left waiting) with its output on pipes, and one reader
thread per pipe appends each line to the :class:`Daemon`'s log under a condition
variable: the line as written to :attr:`Daemon.lines`, and parsed to
:attr:`Daemon.events`. Standard output either has a pipe of its own
(:attr:`Daemon.stdout_lines`; the tests keep the log apart from what a program prints)
or shares stderr's, so that the demo shows both in the order they were written.

:meth:`Daemon.wait_for` blocks, with a deadline, until an event with a given name (and
fields) has been logged; :meth:`Daemon.wait_for_line` likewise for a line of text. Both
fail with :class:`Deviation` if the deadline passes or the process's output ends first:
nobody sleeps on a guess, and a failure says what was expected, what happened, and the
program's last lines.

Readiness is what the daemons log (``docs/links.md`` and the daemons' contract):

* custodian ``custodian_listening`` with ``enclave_address`` and ``admin_address``
  (``"host:port"``; we pass port 0 so the OS picks free ports);
* enclave ``enclave_serving`` with ``consumer_address``, and ``custodian_link_up`` once it
  is attested to its custodian and has the model loaded.

:meth:`Daemon.stop` sends SIGTERM and waits a bounded time for a clean exit, then
SIGKILLs, and always reaps. The one-shot commands (``init``, ``measure``, a query) go
through :func:`run_command`, also bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeVar

__all__ = [
    "COMMAND_TIMEOUT",
    "LOG_TAIL",
    "LOOPBACK",
    "STARTUP_TIMEOUT",
    "STOP_TIMEOUT",
    "CommandResult",
    "Daemon",
    "Deviation",
    "LogEvent",
    "environment",
    "parse_address",
    "python_command",
    "run_command",
    "start_daemon",
]

#: Every program of the lab listens and dials here.
LOOPBACK: Final = "127.0.0.1"
#: The enclave may need to make a simulated platform, dial, be attested, receive the model
#: and build an ONNX Runtime session; on a loaded CI machine that takes seconds, not tens.
STARTUP_TIMEOUT: Final = 60.0
#: A clean SIGTERM shutdown closes links and the ledger; longer than that is a bug.
STOP_TIMEOUT: Final = 15.0
#: ``init`` makes keys and a ledger; ``measure`` hashes the enclave's code.
COMMAND_TIMEOUT: Final = 60.0
#: Lines of a program's output kept for a failure message (the tail is what matters).
LOG_TAIL: Final = 200

LogEvent = dict[str, Any]
_T = TypeVar("_T")


class Deviation(AssertionError):
    """A program did not do what was expected of it.

    The demo shows :attr:`expected`, :attr:`happened` and the end of :attr:`output`; the
    message (what a failed test shows) has all three, and the command line when known.

    Attributes:
        expected: what should have happened ("the custodian to start listening").
        happened: what did ("the custodian exited with status 1").
        output: the program's output, or its last lines.
    """

    def __init__(
        self,
        expected: str,
        happened: str,
        output: Sequence[str] = (),
        *,
        command: Sequence[str] = (),
    ) -> None:
        self.expected = expected
        self.happened = happened
        self.output = list(output)
        message = f"expected {expected}, but {happened}"
        if command:
            message += f"\ncommand: {' '.join(command)}"
        if self.output:
            message += "\n--- output ---\n" + "\n".join(self.output)
        super().__init__(message)


def python_command(module: str, *args: str | os.PathLike[str]) -> list[str]:
    """``python -m module args...`` with this interpreter (the project's venv)."""
    return [sys.executable, "-m", module, *(os.fspath(a) for a in args)]


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment as every program of the lab gets it, plus ``extra``.

    Output unbuffered (a line is seen when it is written), onnxruntime's telemetry off,
    and no ``PYTHONWARNINGS`` inherited from whoever runs the lab.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["ORT_DISABLE_TELEMETRY"] = "1"
    env.pop("PYTHONWARNINGS", None)
    env.update(extra or {})
    return env


def _pipes(env: Mapping[str, str] | None, merge_output: bool) -> dict[str, Any]:
    """How every program of the lab is started: :func:`environment`, no standard input,
    its output read as text on pipes (stderr on stdout's with ``merge_output``)."""
    return {
        "env": environment(env),
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.STDOUT if merge_output else subprocess.PIPE,
        "text": True,
        "encoding": "utf-8",
        "errors": "replace",
    }


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise Deviation("a host:port address", f"got {address!r}")
    return host.strip("[]"), int(port)


def _parse(line: str) -> LogEvent:
    try:
        value = json.loads(line)
    except ValueError:
        return {"_raw": line}
    return value if isinstance(value, dict) else {"_raw": line}


def _matches(entry: LogEvent, event: str, fields: Mapping[str, object]) -> bool:
    return entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items())


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# --- one-shot commands --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a one-shot command printed, and its exit status."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        """Standard output, then standard error, line by line."""
        return [*self.stdout.splitlines(), *self.stderr.splitlines()]

    def events(self) -> list[LogEvent]:
        """The JSON log lines of stderr, parsed (other lines skipped)."""
        return [e for e in map(_parse, self.stderr.splitlines()) if "_raw" not in e]


def run_command(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path,
    timeout: float = COMMAND_TIMEOUT,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    merge_output: bool = False,
) -> CommandResult:
    """Run a one-shot command to completion, bounded.

    With ``merge_output`` standard error goes to standard output, in the order the
    command wrote them (:attr:`CommandResult.stderr` is then empty).

    Raises:
        Deviation: it did not finish within ``timeout``, or (with ``check``) it exited
            with a status other than 0.
    """
    command = [os.fspath(a) for a in argv]
    try:
        done = subprocess.run(
            command, cwd=cwd, **_pipes(env, merge_output), timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        output = [*_text(exc.stdout).splitlines(), *_text(exc.stderr).splitlines()]
        raise Deviation(
            "the command to finish", f"it still ran after {timeout:g} s", output, command=command
        ) from None
    result = CommandResult(command, done.returncode, done.stdout, done.stderr or "")
    if check and done.returncode != 0:
        raise Deviation(
            "the command to succeed",
            f"it exited with status {done.returncode}",
            result.lines(),
            command=command,
        )
    return result


# --- long-running programs ----------------------------------------------------------


@dataclass(eq=False)
class Daemon:
    """One long-running program: a daemon, or a query left waiting. Use :func:`start_daemon`.

    Attributes:
        name: for messages ("custodian", "enclave", "fourth query").
        argv: the command line.
        process: the running process.
        lines: its log so far, line by line as written: stderr, or stdout and stderr in
            the order written when they share a pipe.
        events: :attr:`lines` parsed, index for index (``{"_raw": line}`` when not JSON).
        stdout_lines: its stdout so far, when stdout has a pipe of its own.
    """

    name: str
    argv: list[str]
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    events: list[LogEvent] = field(default_factory=list)
    stdout_lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _readers: list[threading.Thread] = field(default_factory=list)
    _eof: int = 0

    def __repr__(self) -> str:
        return f"<Daemon {self.name} pid={self.process.pid} rc={self.process.poll()}>"

    # --- reading the output ---------------------------------------------------------

    def _start_readers(self) -> None:
        assert self.process.stdout is not None
        streams: list[tuple[IO[str], Callable[[str], None]]]
        if self.process.stderr is None:  # stdout shares stderr's pipe: all of it is the log
            streams = [(self.process.stdout, self._add_line)]
        else:
            streams = [
                (self.process.stderr, self._add_line),
                (self.process.stdout, self._add_stdout),
            ]
        for stream, sink in streams:
            thread = threading.Thread(
                target=self._read, args=(stream, sink), name=f"{self.name}-log", daemon=True
            )
            thread.start()
            self._readers.append(thread)

    def _read(self, stream: IO[str], sink: Callable[[str], None]) -> None:
        try:
            for line in stream:
                sink(line.rstrip("\n"))
        except (OSError, ValueError):
            pass  # the pipe was closed under us at teardown
        finally:
            with self._changed:
                self._eof += 1
                self._changed.notify_all()

    def _add_line(self, line: str) -> None:
        event = _parse(line)
        with self._changed:
            self.lines.append(line)
            self.events.append(event)
            self._changed.notify_all()

    def _add_stdout(self, line: str) -> None:
        with self._changed:
            self.stdout_lines.append(line)
            self._changed.notify_all()

    @property
    def _ended(self) -> bool:
        """Every pipe reached its end: the process exited (or closed its output)."""
        return self._eof >= len(self._readers)

    def output(self, tail: int = LOG_TAIL) -> list[str]:
        """The last ``tail`` lines of the log, then of stdout when it has its own pipe."""
        with self._changed:
            lines = self.lines[-tail:]
            if self.stdout_lines:
                lines += ["--- stdout ---", *self.stdout_lines[-tail:]]
        return lines

    def log_text(self, tail: int = LOG_TAIL) -> str:
        """:meth:`output` as one text (for failure messages)."""
        return "\n".join(self.output(tail))

    def find(self, event: str, *, after: int = 0, **fields: object) -> LogEvent | None:
        """The first logged ``event`` (from index ``after``) whose fields match, or ``None``."""
        with self._changed:
            return next((e for e in self.events[after:] if _matches(e, event, fields)), None)

    def find_all(self, event: str, *, after: int = 0, **fields: object) -> list[LogEvent]:
        """Every logged ``event`` so far (from index ``after``) whose fields match."""
        with self._changed:
            return [e for e in self.events[after:] if _matches(e, event, fields)]

    def wait_for(
        self,
        event: str,
        *,
        timeout: float = STARTUP_TIMEOUT,
        after: int = 0,
        expected: str | None = None,
        check: Callable[[LogEvent], bool] | None = None,
        **fields: object,
    ) -> LogEvent:
        """Block until ``event`` (with these field values, passing ``check``) is logged.

        ``expected`` says what is awaited, for the failure.

        Raises:
            Deviation: the deadline passed, or the process's output ended without it.
        """

        def search() -> LogEvent | None:
            with self._changed:
                hits = (e for e in self.events[after:] if _matches(e, event, fields))
                return next((e for e in hits if check is None or check(e)), None)

        awaited = expected or f"the {self.name} to log {event!r} {fields or ''}".rstrip()
        return self._await(search, awaited, timeout)

    def wait_for_line(
        self,
        matches: str | Callable[[str], bool],
        *,
        timeout: float = STARTUP_TIMEOUT,
        after: int = 0,
        expected: str | None = None,
    ) -> str:
        """Block until a line of the log (from index ``after``) matches; return it.

        ``matches`` is a test of the line, or a prefix it starts with.

        Raises:
            Deviation: the deadline passed, or the process's output ended without it.
        """

        def test(line: str) -> bool:
            return line.startswith(matches) if isinstance(matches, str) else matches(line)

        def search() -> str | None:
            with self._changed:
                return next((line for line in self.lines[after:] if test(line)), None)

        what = repr(matches) if isinstance(matches, str) else "the line awaited"
        awaited = expected or f"the {self.name} to write {what}"
        return self._await(search, awaited, timeout)

    def _await(self, search: Callable[[], _T | None], expected: str, timeout: float) -> _T:
        found: list[_T] = []

        def found_or_ended() -> bool:
            hit = search()
            if hit is not None:
                found.append(hit)
            return bool(found) or self._ended

        with self._changed:
            self._changed.wait_for(found_or_ended, timeout=timeout)
        if found:
            return found[0]
        if self._ended:  # its output ended: it exited (or is about to; reap it, bounded)
            try:
                happened = f"the {self.name} exited with status {self.process.wait(STOP_TIMEOUT)}"
            except subprocess.TimeoutExpired:
                happened = f"the {self.name} closed its output but still runs"
        else:
            happened = f"the {self.name} did not within {timeout:g} s"
        raise Deviation(expected, happened, self.output(), command=self.argv)

    # --- stopping -------------------------------------------------------------------

    def terminate(self) -> None:
        """Send SIGTERM (the daemons' clean shutdown, Ctrl-C in a terminal); do not wait."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = STOP_TIMEOUT, *, expected: str | None = None) -> int:
        """Wait for the process to exit and its output to be read; its exit status
        (negative: killed by that signal).

        Raises:
            Deviation: it is still running after ``timeout``.
        """
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise Deviation(
                expected or f"the {self.name} to exit",
                f"the {self.name} still runs after {timeout:g} s",
                self.output(),
                command=self.argv,
            ) from None
        self._close(timeout)
        return status

    def kill(self) -> int:
        """SIGKILL (no clean shutdown of any kind) and reap; the exit status."""
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait at most ``timeout``, then SIGKILL; always reaps the process.

        Returns:
            The exit status (``-9`` if it had to be killed).
        """
        self.terminate()
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait(timeout)
        self._close(timeout)
        return status

    def _close(self, timeout: float) -> None:
        """Let the readers reach the end of the output (bounded), then close the pipes."""
        for thread in self._readers:
            thread.join(timeout)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def start_daemon(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    merge_output: bool = False,
) -> Daemon:
    """Start ``argv`` with its output on pipes, and start reading them.

    With ``merge_output`` stdout and stderr share one pipe (:attr:`Daemon.lines` then
    holds both, in the order written).
    """
    command = [os.fspath(a) for a in argv]
    process = subprocess.Popen(command, cwd=cwd, **_pipes(env, merge_output))
    daemon = Daemon(name, command, process)
    daemon._start_readers()
    return daemon
