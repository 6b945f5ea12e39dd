"""``python -m drm_custodian``: init, serve, supply, usage and SIGTERM as real processes.

The daemon's JSON log lines on stderr are how the test learns the port-0 ports
(``custodian_listening``). Error paths that stop before ``trio.run`` are checked in
process through :func:`drm_custodian.cli.main`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from drm_custodian.cli import (
    EXIT_API_ERROR,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    main,
)
from drm_custodian.models import read_model_file
from drm_lab.models import tiny_model
from drm_lab.processes import Daemon, python_command, start_daemon
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.errors import ConfigError
from drm_wire.limits import MAX_MODEL_BYTES
from tests.simulation import simulation_policy

MR_ENCLAVE = hashlib.sha256(b"drm custodian cli tests: enclave").digest()
#: Start-up (imports, key loading, two listeners) plus a margin for a loaded machine.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass
class Files:
    state: Path
    model: Path
    policy: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("cli")
    platform = SimulatedPlatform.create(root / "platform")
    policy = simulation_policy(platform, MR_ENCLAVE)
    policy.write(root / "policy.toml")
    (root / "tiny.onnx").write_bytes(tiny_model())
    return Files(root / "state", root / "tiny.onnx", root / "policy.toml")


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(START_TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "drm_custodian", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@contextmanager
def daemon(files: Files, *extra: str) -> Iterator[Daemon]:
    """``serve`` as a real process; yields once it logged ``custodian_listening``."""
    args: list[str | Path] = ["--state-dir", files.state, "--upload", files.model]
    args += ["--policy", files.policy, "--port", "0", "--admin-port", "0", *extra]
    argv = python_command("drm_custodian", "serve", *args)
    running = start_daemon("custodian", argv, cwd=files.state.parent)
    try:
        running.wait_for("custodian_listening", timeout=START_TIMEOUT)
        yield running
    finally:
        running.stop()


def admin_port(running: Daemon) -> str:
    event = running.find("custodian_listening")
    assert event is not None
    return str(event["admin_address"]).rpartition(":")[2]


async def stop(running: Daemon) -> int:
    started = trio.current_time()
    running.terminate()
    status = await trio.to_thread.run_sync(running.wait_exit, STOP_TIMEOUT)
    print(f"stopped in {trio.current_time() - started:.2f} s")
    return status


@pytest.mark.slow
async def test_init_serve_supply_usage_and_sigterm(files: Files) -> None:
    made = await run_cli("init", "--state-dir", str(files.state), "--borrower", "acme")
    assert made.returncode == EXIT_OK, made.stderr
    out = made.stdout.decode()
    assert str(files.state / "ca.pem") in out
    assert str(files.state / "handoff" / "acme.license.json") in out

    again = await run_cli("init", "--state-dir", str(files.state))
    assert again.returncode == EXIT_CONFIG
    assert b"already initialised" in again.stderr

    with daemon(files, "--initial-inferences", "3") as running:
        port = admin_port(running)
        supplied = await run_cli(
            "supply", "5", "--state-dir", str(files.state), "--admin-port", port
        )
        assert supplied.returncode == EXIT_OK, supplied.stderr
        usage = await run_cli(
            "usage", "--json", "--state-dir", str(files.state), "--admin-port", port
        )
        assert usage.returncode == EXIT_OK, usage.stderr
        doc = json.loads(usage.stdout)
        assert usage.stdout.endswith(b"}\n")  # a final newline, for shells and pipes
        assert doc["borrower"] == "acme"
        assert (doc["supplied"], doc["remaining"], doc["instances"]) == (8, 8, 0)
        blocked = await run_cli("block", "--reason", "audit", "--wait", "0.5",
                                "--state-dir", str(files.state), "--admin-port", port)  # fmt: skip
        assert blocked.returncode == EXIT_OK
        assert b"blocked    True" in blocked.stdout
        assert b"block_acknowledged 0" in blocked.stdout  # no enclave is linked
        assert await stop(running) == 0
    events = [e.get("event") for e in running.events]
    assert events.index("custodian_stopping") < events.index("custodian_stopped")

    # A restart with the same --initial-inferences does not supply again.
    with daemon(files, "--initial-inferences", "3") as running:
        port = admin_port(running)
        usage = await run_cli(
            "usage", "--json", "--state-dir", str(files.state), "--admin-port", port
        )
        assert json.loads(usage.stdout)["supplied"] == 8
        assert await stop(running) == 0
    assert running.find("initial_supply_skipped") is not None

    down = await run_cli("usage", "--state-dir", str(files.state), "--admin-port", port)
    assert down.returncode == EXIT_UNREACHABLE


def test_serve_refuses_a_missing_model_before_listening(files: Files, tmp_path: Path) -> None:
    err = io.StringIO()
    state = tmp_path / "state"
    assert main(["init", "--state-dir", str(state)], stdout=io.StringIO()) == EXIT_OK
    status = main(
        ["serve", "--state-dir", str(state), "--upload", str(tmp_path / "missing.onnx"),
         "--policy", str(files.policy)],
        stderr=err,
    )  # fmt: skip
    assert status == EXIT_CONFIG
    assert "missing.onnx" in err.getvalue()


def test_serve_refuses_a_bad_policy(files: Files, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert main(["init", "--state-dir", str(state)], stdout=io.StringIO()) == EXIT_OK
    bad = tmp_path / "policy.toml"
    bad.write_text("[enclave]\nisv_prod_id = 0\n")
    err = io.StringIO()
    status = main(
        ["serve", "--state-dir", str(state), "--upload", str(files.model), "--policy", str(bad)],
        stderr=err,
    )
    assert status == EXIT_CONFIG
    assert "mr_enclave" in err.getvalue()


async def test_serve_says_which_port_is_taken(files: Files, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert (await run_cli("init", "--state-dir", str(state))).returncode == EXIT_OK
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await run_cli(
            "serve", "--state-dir", str(state), "--upload", str(files.model),
            "--policy", str(files.policy), "--port", "0", "--admin-port", str(port),
        )  # fmt: skip
    assert done.returncode == EXIT_FAILED
    failures = [
        json.loads(line) for line in done.stderr.splitlines() if b"custodian_failed" in line
    ]
    # Which port, chosen by which option, and what to do; not "Exceptions from Trio
    # nursery (1 sub-exception)", nor a bare "[Errno 98] Address already in use".
    assert [f["kind"] for f in failures] == ["ListenError"], done.stderr
    assert failures[0]["error"] == (
        f"cannot listen for the admin API on 127.0.0.1:{port}: another program already "
        "listens there (is this daemon running already?): stop it, or choose another "
        "--admin-port"
    )


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert main(["init", "--state-dir", str(state)], stdout=io.StringIO()) == EXIT_OK
    before = (state / "ca.pem").read_bytes()
    err = io.StringIO()
    assert main(["init", "--state-dir", str(state)], stderr=err) == EXIT_CONFIG
    assert "nothing was changed" in err.getvalue()
    assert (state / "ca.pem").read_bytes() == before


def test_model_files_are_bounded(tmp_path: Path) -> None:
    huge = tmp_path / "huge.onnx"
    with huge.open("wb") as handle:  # sparse: no disk is used
        handle.truncate(MAX_MODEL_BYTES + 1)
    with pytest.raises(ConfigError, match="larger than"):
        read_model_file(huge)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="1 to"):
        read_model_file(empty)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_model_file(os.devnull)
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_model())
    loaded = read_model_file(model)
    assert loaded.name == "tiny"
    assert loaded.sha256 == hashlib.sha256(tiny_model()).digest()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["supply", "--state-dir", "x", "abc"],
         "argument N: 'abc' is not a number of inferences (a whole number, such as 5)"),
        (["supply", "--state-dir", "x", "--", "-5"],
         "argument N: must be between 1 and 1000000, got -5 (a supply only adds: to stop "
         "lending, use block)"),
        (["supply", "--state-dir", "x", "0"],
         "argument N: must be between 1 and 1000000, got 0 (a supply only adds: to stop "
         "lending, use block)"),
        (["supply", "--state-dir", "x", "1000001"],
         "argument N: must be between 1 and 1000000, got 1000001 (a supply only adds: to "
         "stop lending, use block)"),
        (["serve", "--state-dir", "x", "--upload", "m.onnx", "--policy", "p.toml",
          "--initial-inferences", "-1"],
         "argument --initial-inferences: must be between 0 and 1000000, got -1"),
        (["serve", "--state-dir", "x", "--upload", "m.onnx", "--policy", "p.toml",
          "--link-budget", "abc"],
         "argument --link-budget: 'abc' is not a whole number: it must be from 66 to "
         "1000000 (MiB)"),
        (["serve", "--state-dir", "x", "--upload", "m.onnx", "--policy", "p.toml",
          "--reclaim-margin", "86401"],
         "argument --reclaim-margin: must be from 0 to 86400 (seconds), not 86401"),
        (["block", "--state-dir", "x", "--wait", "11"],
         "argument --wait: must be a number of seconds from 0 to 10, got '11'"),
        (["block", "--state-dir", "x", "--wait", "nan"],
         "argument --wait: must be a number of seconds from 0 to 10, got 'nan'"),
        (["block", "--state-dir", "x", "--wait", "soon"],
         "argument --wait: must be a number of seconds from 0 to 10, got 'soon'"),
    ],
)  # fmt: skip
def test_bad_counts_are_usage_errors_that_say_what_is_allowed(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == EXIT_CONFIG
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")


def test_supply_n_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["supply", "--help"])
    assert re.search(r"^  N +inferences to add, 1 to 1000000$", capsys.readouterr().out, re.M)


def test_init_on_an_initialised_directory_exits_2_as_help_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert main(["init", "--state-dir", str(state)], stdout=io.StringIO()) == EXIT_OK
    assert main(["init", "--state-dir", str(state)], stderr=io.StringIO()) == EXIT_CONFIG == 2
    with pytest.raises(SystemExit):
        main(["init", "--help"])
    assert "2  bad command line or configuration (init: the state directory exists)" in (
        capsys.readouterr().out
    )


async def test_admin_commands_neither_warn_of_the_handoff_nor_hide_the_fix(
    files: Files, tmp_path: Path
) -> None:
    """The handoff warning is the daemon's, at its start; an admin command that cannot
    reach the daemon says what to check."""
    state = tmp_path / "state"
    assert (await run_cli("init", "--state-dir", str(state))).returncode == EXIT_OK
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connection refused
        done = await run_cli("usage", "--state-dir", str(state), "--admin-port", str(port))
    assert done.returncode == EXIT_UNREACHABLE
    assert done.stderr.decode() == (
        f"error: cannot reach the admin API at https://127.0.0.1:{port}: connection "
        f"refused; is `drm_custodian serve` running, with --admin-port {port}?\n"
    )


@pytest.mark.slow
async def test_borrower_commands_through_the_daemon_and_without_it(tmp_path: Path) -> None:
    platform = SimulatedPlatform.create(tmp_path / "platform")
    simulation_policy(platform, MR_ENCLAVE).write(tmp_path / "policy.toml")
    (tmp_path / "tiny.onnx").write_bytes(tiny_model())
    files = Files(tmp_path / "state", tmp_path / "tiny.onnx", tmp_path / "policy.toml")
    state = str(files.state)
    assert (await run_cli("init", "--state-dir", state, "--borrower", "acme")).returncode == 0

    with daemon(files) as running:
        port = admin_port(running)
        where = ("--state-dir", state, "--admin-port", port)
        added = await run_cli("borrower", "add", "globex", "--models", "tiny",
                              "--max-instances", "3", *where)  # fmt: skip
        assert added.returncode == EXIT_OK, added.stderr
        assert str(files.state / "handoff" / "globex.license.json") in added.stdout.decode()
        assert running.find("borrower_added", borrower="globex") is not None  # the daemon wrote
        unknown = await run_cli("borrower", "add", "initech", "--models", "huge", *where)
        assert unknown.returncode == EXIT_API_ERROR
        assert b"not lent by this custodian: huge" in unknown.stderr

        ambiguous = await run_cli("supply", "3", *where)
        assert ambiguous.returncode == EXIT_API_ERROR
        assert b"2 borrowers (acme, globex)" in ambiguous.stderr
        supplied = await run_cli("supply", "3", "--borrower", "globex", *where)
        assert supplied.returncode == EXIT_OK, supplied.stderr
        blocked = await run_cli("block", "--borrower", "acme", *where)
        assert blocked.returncode == EXIT_OK, blocked.stderr
        missing = await run_cli("usage", "--borrower", "nobody", *where)
        assert missing.returncode == EXIT_API_ERROR
        assert b"no borrower nobody" in missing.stderr

        listed = await run_cli("borrower", "list", "--json", *where)
        rows = {row["borrower"]: row for row in json.loads(listed.stdout)["borrowers"]}
        assert (rows["globex"]["supplied"], rows["globex"]["blocked"]) == (3, False)
        assert (rows["acme"]["supplied"], rows["acme"]["blocked"]) == (0, True)
        assert (rows["globex"]["models"], rows["globex"]["max_instances"]) == (["tiny"], 3)

        removed = await run_cli("borrower", "remove", "globex", *where)
        assert removed.returncode == EXIT_OK, removed.stderr
        usage = await run_cli("usage", "--json", *where)  # one borrower left: no --borrower
        assert json.loads(usage.stdout)["borrower"] == "acme"
        assert await stop(running) == 0

    # No daemon: the command takes the state lock and changes the files itself.
    added = await run_cli("borrower", "add", "initech", "--state-dir", state)
    assert added.returncode == EXIT_OK, added.stderr
    again = await run_cli("borrower", "add", "globex", "--state-dir", state)
    assert again.returncode == EXIT_CONFIG
    assert b"never reused" in again.stderr
    listed = await run_cli("borrower", "list", "--json", "--state-dir", state)
    rows = {row["borrower"]: row for row in json.loads(listed.stdout)["borrowers"]}
    assert set(rows) == {"acme", "globex", "initech"}
    assert rows["globex"]["removed"] is True
    assert rows["globex"]["supplied"] == 3  # its history stays
    bad = await run_cli("borrower", "add", "../x", "--state-dir", state)
    assert bad.returncode == EXIT_CONFIG
    changed = await run_cli("borrower", "set-models", "initech", "--models", "tiny",
                            "--state-dir", state)  # fmt: skip
    assert changed.returncode == EXIT_OK, changed.stderr
    assert b"initech models: tiny" in changed.stdout
    listed = await run_cli("borrower", "list", "--json", "--state-dir", state)
    rows = {row["borrower"]: row for row in json.loads(listed.stdout)["borrowers"]}
    assert rows["initech"]["models"] == ["tiny"]
