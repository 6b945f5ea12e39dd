"""The demo's shell: each program shown as the command a user would type, then run.

Every program the demo runs is shown first as the shell command a user would type
(``python -m ...``, long lines wrapped with ``\\``), relative to the work directory, and
then run through :mod:`drm_lab.processes`: one-shot commands to completion under a
bound, the long-running ones (the two daemons, the query that waits) as
:class:`~drm_lab.processes.Daemon` processes whose stdout and stderr share one pipe, so
the demo can wait, with a deadline, for a readiness line (a daemon's JSON log event,
the consumer's "waiting" line) instead of sleeping, and show the output in the order it
was written. Anything that does not happen as described raises
:class:`~drm_lab.processes.Deviation`.

:meth:`Shell.close` stops every background process still running (SIGTERM, then SIGKILL
after a bound) and always reaps them; the demo calls it whatever happened, Ctrl-C
included.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

from drm_lab.processes import CommandResult, Daemon, run_command, start_daemon

__all__ = ["TAIL", "Shell", "command_line", "wrap"]

#: Lines of a program's output shown when it did not do what was expected.
TAIL: Final = 15
#: Where the transcript wraps a command (with ``\\``), for reading and copying.
WIDTH: Final = 92


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


class Shell:
    """Runs commands in the work directory, prints them, and owns the background ones.

    Args:
        workdir: the current directory of every command.
        out: the transcript.
    """

    def __init__(self, workdir: Path, out: TextIO) -> None:
        self.workdir = workdir
        self.out = out
        self._children: list[Daemon] = []

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
    ) -> CommandResult:
        """Show and run a one-shot command to completion (bounded); show its output.

        ``shown`` replaces the command as printed (the curl call runs under ``sh -c``).
        With ``show_stderr`` standard error is merged into standard output, in the order
        the command wrote them (``CommandResult.stderr`` is then empty); without it,
        standard error (the daemons' JSON logs, curl's progress meter) is kept apart and
        shown only when the command fails. Whatever its exit status, the caller checks it.

        Raises:
            Deviation: it did not finish within ``timeout``.
        """
        self.say(shown or wrap(command_line(argv), "  "))
        result = run_command(
            argv, cwd=self.workdir, timeout=timeout, check=False, merge_output=show_stderr
        )
        self.show_output(result.lines() if result.returncode else result.stdout.splitlines())
        return result

    def start(self, name: str, argv: Sequence[str | os.PathLike[str]]) -> Daemon:
        """Show and start a long-running command (``&`` in the transcript)."""
        self.say(wrap([*command_line(argv), "&"], "  "))
        child = start_daemon(name, argv, cwd=self.workdir, merge_output=True)
        self._children.append(child)
        self.say(f"    [{name}: pid {child.process.pid}]")
        return child

    def running(self) -> list[Daemon]:
        """The background processes that have not exited."""
        return [c for c in self._children if c.process.poll() is None]

    def close(self) -> None:
        """Stop every background process (the newest first) and reap it."""
        for child in reversed(self._children):
            child.stop()
