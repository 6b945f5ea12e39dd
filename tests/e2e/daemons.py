"""Run the real programs as subprocesses, on loopback, and wait for what they log.

Theory of operation
-------------------
Both daemons log one JSON object per line on stderr (``drm_daemon.logs``; a pipe is not a
terminal, so the JSON renderer is chosen). A :class:`Daemon` starts its process with
stderr (and stdout) on pipes and one reader thread per pipe that parses each line and
appends it to the daemon's log under a condition variable. :meth:`Daemon.wait_for`
blocks, with a deadline, until an event with a given name (and fields) has been logged,
and fails with the whole captured log if the deadline passes or the process exits first:
a test never sleeps on a guess, and a failure shows what the daemon said.

Readiness is what the daemons log (``docs/links.md`` and the daemons' contract):

* custodian ``custodian_listening`` with ``enclave_address`` and ``admin_address``
  (``"host:port"``; we pass port 0 so the OS picks free ports);
* enclave ``enclave_serving`` with ``consumer_address``, and ``custodian_link_up`` once it
  is attested to its custodian and has the model loaded.

:meth:`Daemon.stop` sends SIGTERM and waits a bounded time for a clean exit, then
SIGKILLs. The one-shot commands (``init``, ``measure``) go through :func:`run_command`,
also bounded. :class:`AdminApi` is the operator's HTTPS call (``http.client`` verifying
the custodian CA and host name), blocking: call it from ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import urlencode

#: The enclave may need to make a simulated platform, dial, be attested, receive the model
#: and build an ONNX Runtime session; on a loaded CI machine that takes seconds, not tens.
STARTUP_TIMEOUT: Final = 60.0
#: A clean SIGTERM shutdown closes links and the ledger; longer than that is a bug.
STOP_TIMEOUT: Final = 15.0
#: ``init`` makes keys and a ledger; ``measure`` hashes the enclave's code.
COMMAND_TIMEOUT: Final = 60.0
#: One admin HTTPS call on loopback.
HTTP_TIMEOUT: Final = 10.0
#: Lines of a daemon's log kept for a failure message (the tail is what matters).
LOG_TAIL: Final = 200

LogEvent = dict[str, Any]


class DaemonError(AssertionError):
    """A daemon or command did not do what the test waited for; the message has its log."""


def python_command(module: str, *args: str | os.PathLike[str]) -> list[str]:
    """``python -m module args...`` with this interpreter (the project's venv)."""
    return [sys.executable, "-m", module, *(os.fspath(a) for a in args)]


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["ORT_DISABLE_TELEMETRY"] = "1"
    env.pop("PYTHONWARNINGS", None)
    env.update(extra or {})
    return env


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a one-shot command printed, and its exit status."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def events(self) -> list[LogEvent]:
        """The JSON log lines of stderr, parsed (other lines skipped)."""
        return [e for e in map(_parse, self.stderr.splitlines()) if "_raw" not in e]


def run_command(
    argv: Sequence[str],
    *,
    cwd: Path,
    timeout: float = COMMAND_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run a one-shot command to completion, bounded; fail with its output unless it exits 0.

    Raises:
        DaemonError: it timed out or exited non-zero.
    """
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            env=_environment(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DaemonError(
            f"{' '.join(argv)} did not finish within {timeout} s\n"
            f"stdout:\n{_text(exc.stdout)}\nstderr:\n{_text(exc.stderr)}"
        ) from None
    result = CommandResult(list(argv), done.returncode, done.stdout, done.stderr)
    if done.returncode != 0:
        raise DaemonError(
            f"{' '.join(argv)} exited with {done.returncode}\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return result


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _parse(line: str) -> LogEvent:
    try:
        value = json.loads(line)
    except ValueError:
        return {"_raw": line}
    return value if isinstance(value, dict) else {"_raw": line}


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise DaemonError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


@dataclass(eq=False)
class Daemon:
    """One long-running program under test. Use :func:`start_daemon`.

    Attributes:
        name: for messages ("custodian", "enclave").
        argv: the command line.
        process: the running process.
        events: every stderr line so far, parsed (``{"_raw": line}`` when not JSON).
    """

    name: str
    argv: list[str]
    process: subprocess.Popen[str]
    events: list[LogEvent] = field(default_factory=list)
    stdout_lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _readers: list[threading.Thread] = field(default_factory=list)
    _eof: int = 0

    def __repr__(self) -> str:
        return f"<Daemon {self.name} pid={self.process.pid} rc={self.process.poll()}>"

    # --- reading the log ------------------------------------------------------------

    def _start_readers(self) -> None:
        assert self.process.stderr is not None
        assert self.process.stdout is not None
        for stream, sink in (
            (self.process.stderr, self._add_event),
            (self.process.stdout, self._add_stdout),
        ):
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

    def _add_event(self, line: str) -> None:
        event = _parse(line)
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def _add_stdout(self, line: str) -> None:
        with self._changed:
            self.stdout_lines.append(line)
            self._changed.notify_all()

    def log_text(self, tail: int = LOG_TAIL) -> str:
        """The last ``tail`` log lines, as the daemon wrote them (for failure messages)."""
        with self._changed:
            lines = [
                e["_raw"] if "_raw" in e else json.dumps(e, sort_keys=True)
                for e in self.events[-tail:]
            ]
            out = self.stdout_lines[-tail:]
        text = "\n".join(lines)
        if out:
            text += "\n--- stdout ---\n" + "\n".join(out)
        return text

    def wait_for_line(self, prefix: str, *, timeout: float = STARTUP_TIMEOUT) -> None:
        """Block until a stderr line that is not JSON starts with ``prefix``.

        Raises:
            DaemonError: the deadline passed first. The message carries the log.
        """

        def seen() -> bool:
            return any(e.get("_raw", "").startswith(prefix) for e in self.events)

        with self._changed:
            if not self._changed.wait_for(seen, timeout=timeout):
                raise DaemonError(f"{self.name} did not write {prefix!r}\n{self.log_text()}")

    def find(self, event: str, *, after: int = 0, **fields: object) -> LogEvent | None:
        """The first logged ``event`` (from index ``after``) whose fields match, or ``None``."""
        with self._changed:
            for entry in self.events[after:]:
                if entry.get("event") == event and all(
                    entry.get(k) == v for k, v in fields.items()
                ):
                    return entry
        return None

    def wait_for(
        self,
        event: str,
        *,
        timeout: float = STARTUP_TIMEOUT,
        after: int = 0,
        **fields: object,
    ) -> LogEvent:
        """Block until ``event`` (with these field values) is logged; return it.

        Raises:
            DaemonError: the deadline passed, or the process exited and its log ended
                without it. The message carries the log.
        """

        def found_or_dead() -> LogEvent | bool | None:
            hit = self.find(event, after=after, **fields)
            if hit is not None:
                return hit
            return self._eof >= len(self._readers) or None

        with self._changed:
            outcome = self._changed.wait_for(found_or_dead, timeout=timeout)
        if isinstance(outcome, dict):
            return outcome
        if outcome:  # its output ended: it exited (or is about to; reap it, bounded)
            try:
                why = f"exited with {self.process.wait(STOP_TIMEOUT)}"
            except subprocess.TimeoutExpired:
                why = "closed its output but still runs"
        else:
            why = f"did not log it within {timeout} s"
        raise DaemonError(
            f"{self.name} was expected to log {event!r} {fields or ''} but {why}\n"
            f"command: {' '.join(self.argv)}\n--- log ---\n{self.log_text()}"
        )

    # --- stopping -------------------------------------------------------------------

    def terminate(self) -> None:
        """Send SIGTERM (the daemons' clean shutdown); do not wait."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit; its status (negative: killed by that signal).

        Raises:
            DaemonError: it is still running after ``timeout``.
        """
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(
                f"{self.name} still runs {timeout} s after SIGTERM\n--- log ---\n{self.log_text()}"
            ) from None

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
        for thread in self._readers:
            thread.join(timeout)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        return status


def start_daemon(
    name: str,
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> Daemon:
    """Start ``argv`` with piped output and start reading its log."""
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=_environment(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    daemon = Daemon(name, list(argv), process)
    daemon._start_readers()
    return daemon


@dataclass(frozen=True, slots=True)
class AdminApi:
    """The custodian's admin API over HTTPS, as an operator's script would call it.

    The server certificate is checked against the custodian CA, host name included.
    """

    host: str
    port: int
    token: str = field(repr=False)
    ca_path: Path

    @classmethod
    def from_state_dir(cls, state_dir: Path, address: str) -> AdminApi:
        """The admin API at ``address`` (``host:port``), with the state directory's token."""
        host, port = parse_address(address)
        token = (state_dir / "admin.token").read_text(encoding="ascii").strip()
        return cls(host, port, token, state_dir / "ca.pem")

    def call(
        self, method: str, path: str, form: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One authenticated request; the status and the JSON answer."""
        context = ssl.create_default_context(cafile=os.fspath(self.ca_path))
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=HTTP_TIMEOUT, context=context
        )
        headers = {"Authorization": f"Bearer {self.token}"}
        body = None
        if form is not None:
            body = urlencode(form).encode("ascii")
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {"_raw": data.decode(errors="replace")}
        return response.status, doc if isinstance(doc, dict) else {"_raw": doc}

    def supply(self, units: int) -> dict[str, Any]:
        """``POST /supply_inferences`` with ``number_inferences``; the usage document."""
        status, doc = self.call("POST", "/supply_inferences", {"number_inferences": str(units)})
        if status != 200:
            raise DaemonError(f"supply_inferences answered {status}: {doc}")
        return doc

    def block(self, reason: str = "") -> dict[str, Any]:
        """``POST /block``: the borrower's enclaves stop serving."""
        status, doc = self.call("POST", "/block", {"reason": reason} if reason else None)
        if status != 200:
            raise DaemonError(f"block answered {status}: {doc}")
        return doc

    def unblock(self) -> dict[str, Any]:
        """``POST /unblock``: serving may resume."""
        status, doc = self.call("POST", "/unblock")
        if status != 200:
            raise DaemonError(f"unblock answered {status}: {doc}")
        return doc

    def usage(self) -> dict[str, Any]:
        """``GET /usage``: supplied, granted, served, remaining, blocked, instances."""
        status, doc = self.call("GET", "/usage")
        if status != 200:
            raise DaemonError(f"usage answered {status}: {doc}")
        return doc
