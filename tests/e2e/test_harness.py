"""The harness itself, against stand-in daemons (tiny Python scripts), so that a broken
harness is told apart from a broken daemon."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import pytest

from drm_lab.processes import (
    Deviation,
    parse_address,
    python_command,
    run_command,
    start_daemon,
)

#: A stand-in daemon: logs JSON lines like drm_daemon.logs does, then waits for SIGTERM.
_DAEMON = textwrap.dedent(
    """
    import json, signal, sys
    def log(**event): print(json.dumps(event), file=sys.stderr, flush=True)
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: (log(event="stopping"), sys.exit(0)))
    print("not json", file=sys.stderr, flush=True)
    log(event="custodian_listening", enclave_address="127.0.0.1:1", admin_address="[::1]:2")
    if "--exit" in sys.argv:
        sys.exit(3)
    log(event="ready")
    signal.pause()
    """
)


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "standin.py"
    path.write_text(_DAEMON, encoding="utf-8")
    return path


def test_wait_for_returns_the_event_and_stop_is_clean(tmp_path: Path) -> None:
    daemon = start_daemon("standin", [sys.executable, str(_script(tmp_path))], cwd=tmp_path)
    try:
        event = daemon.wait_for("custodian_listening", timeout=30)
        assert parse_address(event["enclave_address"]) == ("127.0.0.1", 1)
        assert parse_address(event["admin_address"]) == ("::1", 2)
        daemon.wait_for("ready", timeout=30)
        assert {"_raw": "not json"} in daemon.events
    finally:
        assert daemon.stop() == 0
    assert daemon.find("stopping") is not None


def test_a_daemon_that_exits_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    daemon = start_daemon(
        "standin", [sys.executable, str(_script(tmp_path)), "--exit"], cwd=tmp_path
    )
    try:
        with pytest.raises(Deviation, match="exited with status 3") as info:
            daemon.wait_for("ready", timeout=30)
        assert "custodian_listening" in str(info.value)
    finally:
        daemon.stop()


def test_a_missing_event_times_out_with_the_log(tmp_path: Path) -> None:
    daemon = start_daemon("standin", [sys.executable, str(_script(tmp_path))], cwd=tmp_path)
    try:
        daemon.wait_for("ready", timeout=30)
        with pytest.raises(Deviation, match=r"within 0\.2 s") as info:
            daemon.wait_for("never_logged", timeout=0.2)
        assert "not json" in str(info.value)
    finally:
        daemon.stop()


def test_stop_kills_a_daemon_that_ignores_sigterm(tmp_path: Path) -> None:
    daemon = start_daemon(
        "standin", [sys.executable, str(_script(tmp_path)), "--ignore-term"], cwd=tmp_path
    )
    daemon.wait_for("ready", timeout=30)
    assert daemon.stop(timeout=0.5) == -signal.SIGKILL


def test_run_command_reports_failure_with_output(tmp_path: Path) -> None:
    ok = run_command(
        [
            sys.executable,
            "-c",
            "import sys, json; print(json.dumps({'event': 'x'}), file=sys.stderr)",
        ],
        cwd=tmp_path,
    )
    assert ok.events() == [{"event": "x"}]
    with pytest.raises(Deviation, match="exited with status 2"):
        run_command([sys.executable, "-c", "import sys; print('why'); sys.exit(2)"], cwd=tmp_path)
    assert python_command("drm_custodian", "init", tmp_path)[1:] == [
        "-m",
        "drm_custodian",
        "init",
        str(tmp_path),
    ]


#: A stand-in query: a line on stdout, one on stderr, then waits for SIGTERM.
_QUERY = textwrap.dedent(
    """
    import signal, sys
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("preprocess: picked a model", flush=True)
    print("No inferences left: waiting", file=sys.stderr, flush=True)
    signal.pause()
    """
)


def test_merged_output_keeps_the_order_and_waits_for_lines(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", _QUERY]
    query = start_daemon("query", argv, cwd=tmp_path, merge_output=True)
    try:
        assert query.wait_for_line("No inferences", timeout=30) == "No inferences left: waiting"
        assert query.wait_for_line(lambda line: "picked" in line, timeout=30).startswith("pre")
        assert query.lines == ["preprocess: picked a model", "No inferences left: waiting"]
        assert query.stdout_lines == []
        assert query.events == [{"_raw": line} for line in query.lines]
        with pytest.raises(Deviation, match=r"the query to answer, but .* within 0\.2 s") as info:
            query.wait_for_line("Inferences left", timeout=0.2, expected="the query to answer")
        assert info.value.output == query.lines
        query.terminate()
        assert query.wait_exit(30) == 0
    finally:
        query.stop()


def test_separate_output_and_the_end_of_it(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", _QUERY.replace("signal.pause()", "sys.exit(4)")]
    query = start_daemon("query", argv, cwd=tmp_path)
    try:
        with pytest.raises(Deviation, match="the query exited with status 4"):
            query.wait_for_line("Inferences left", timeout=30)
        assert query.lines == ["No inferences left: waiting"]
        assert query.stdout_lines == ["preprocess: picked a model"]
    finally:
        assert query.stop() == 4
