"""Every command in README.md is exercised here, so the README cannot rot.

Each fenced block of the README follows a marker, ``<!-- readme-test: NAME -->``, and
:data:`BLOCKS` says what this file does with each name. A block without a marker, a name
nobody handles, or a handled name the README lost, fails :func:`test_every_block_is_marked`.

The walkthrough (:func:`test_the_walkthrough_runs_as_written`) runs the README's blocks
for real, in order, in a temporary directory (``demo/`` linked into it), with ``python``
on ``PATH`` being this interpreter: the custodian and the enclave in the background
(waited on by their readiness log lines, and stopped with SIGINT as Ctrl-C would), the
consumer's four queries (the fourth waits), the ``curl`` supply, usage, block and
unblock, the query after the custodian stopped, and the Python example. The only edit
made to the text is the port numbers: the README writes out the default ports (7000,
6000, 9924) and the test replaces them with free ones, so that it never collides with
anything listening on this machine. A trailing ``# exits N`` comment is the exit status
a command must have (0 otherwise).

What cannot run in a test is checked another way, and each test says why: the install
lines (they download packages) name dependency groups that exist, the ``nox`` lines
name sessions that exist (``nox -s demo`` itself is run by ``tests/e2e/test_demo.py``),
the real COVID-Net commands (the model is not here) are run up to the point where they
need the missing file, which proves every flag parses.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import pytest

from drm_consumer import cli as consumer_cli
from drm_custodian.models import parse_models_table
from drm_lab.processes import Daemon, start_daemon
from drm_wire.messages import TensorSpec
from drm_wire.model.terms import OutsideTerms, resolve

ROOT: Final = Path(__file__).resolve().parents[1]
README: Final = ROOT / "README.md"

#: Every marker the README may use, and what happens to its block.
BLOCKS: Final = {
    "quickstart": "the two commands: sessions checked in noxfile.py",
    "diagram": "a drawing: nothing to run",
    "install": "downloads packages: the groups it names are checked",
    "owner": "walkthrough, terminal 1 (serve in the background)",
    "borrower": "walkthrough, terminal 2 (in the background)",
    "consumer": "walkthrough, terminal 3 (the fourth query waits)",
    "supply": "walkthrough: curl on the admin API",
    "usage": "walkthrough: the ledger",
    "block": "walkthrough: block, a refused query, unblock",
    "custodian-stopped": "walkthrough: the query after Ctrl-C in terminal 1",
    "python": "walkthrough: the Python example",
    "real-model": "no COVID-Net here: run until the missing file stops them",
    "nox": "sessions checked in noxfile.py",
    "develop": "downloads packages: the groups it names are checked",
    "inspect": "run from the repository's root",
    "terms": "a [models.NAME] table: parsed and resolved as the custodian does",
    "layout": "every directory listed exists",
}

#: The README's ports (the programs' defaults), replaced by free ones in the walkthrough.
README_PORTS: Final = ("7000", "6000", "9924")
#: One command on loopback, a daemon's start, or a query that waits: bounds a hang only.
TIMEOUT: Final = 60.0

_MARKER: Final = re.compile(r"^<!-- readme-test: ([a-z-]+) -->$")
_EXITS: Final = re.compile(r"#\s*exits (\d+)")
_WAITING: Final = "No inferences left: waiting for the custodian"


@dataclass(frozen=True)
class Block:
    """One fenced block: its marker name (or ``None``), language, text and line."""

    name: str | None
    language: str
    text: str
    line: int


def _blocks() -> list[Block]:
    blocks: list[Block] = []
    lines = README.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.startswith("```"):
            index += 1
            continue
        before = [text for text in lines[:index] if text.strip()]
        marker = _MARKER.match(before[-1]) if before else None
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        blocks.append(
            Block(
                marker.group(1) if marker else None,
                line[3:].strip(),
                "\n".join(lines[index + 1 : end]) + "\n",
                index + 1,
            )
        )
        index = end + 1
    return blocks


def _block(name: str) -> Block:
    (found,) = [b for b in _blocks() if b.name == name]
    return found


def _commands(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, comment-only lines dropped."""
    joined = block.text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def _expected_status(command: str) -> int:
    found = _EXITS.search(command)
    return 0 if found is None else int(found.group(1))


def test_every_block_is_marked() -> None:
    blocks = _blocks()
    unmarked = [f"line {b.line}" for b in blocks if b.name is None]
    assert not unmarked, f"README blocks without <!-- readme-test: NAME -->: {unmarked}"
    names = [b.name for b in blocks]
    assert len(names) == len(set(names)), f"a marker is used twice: {names}"
    assert set(names) == set(BLOCKS), (
        f"unknown markers {set(names) - set(BLOCKS)}, lost blocks {set(BLOCKS) - set(names)}"
    )
    for block in blocks:
        if block.name not in ("diagram", "layout", "python", "terms"):
            assert block.language == "sh", f"line {block.line}: say ```sh"
    assert _block("python").language == "python"


# --- what cannot run here -------------------------------------------------------------


def _nox_sessions() -> set[str]:
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    sessions = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if ast.unparse(target) == "nox.session":
                    sessions.add(node.name)
    return sessions


def test_the_two_commands_name_real_nox_sessions() -> None:
    """Not run: they would install the project and recurse into this very suite. The
    demo session runs ``demo/run.py``, which ``tests/e2e/test_demo.py`` runs as nox does."""
    commands = _commands(_block("quickstart"))
    assert [c.split("#")[0].strip() for c in commands] == [
        "python3 -m pip install nox && nox -s demo",
        "nox -s tests",
    ]
    named = set(re.findall(r"nox -s (\w+)", _block("quickstart").text + _block("nox").text))
    assert named == {"tests", "lint", "demo", "bench"}
    assert named <= _nox_sessions()
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    assert '"demo/run.py"' in noxfile


def test_install_lines_name_existing_dependency_groups() -> None:
    """Not run: they download packages. What they name must exist."""
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    defined = set(groups["dependency-groups"])
    for name in ("install", "develop"):
        text = _block(name).text
        assert "pip install -e ." in text
        named = set(re.findall(r"--group (\S+)", text))
        assert named, name
        assert named <= defined, f"{name}: unknown groups {named - defined}"
    assert (ROOT / "demo" / "covidnet.py").is_file()


def test_the_terms_example_is_what_the_custodian_reads() -> None:
    """The example is a config file's [models] table, valid for a detector whose inputs
    are images [?, 3, ?, ?] and im_shape [?, 2]: a batch of 16 costs 16, 17 is refused."""
    assert _block("terms").language == "toml"
    document = tomllib.loads(_block("terms").text)
    (terms,) = parse_models_table(document["models"], "README.md").values()
    images = TensorSpec(name="images", dtype="float32", shape=(None, 3, None, None))
    im_shape = TensorSpec(name="im_shape", dtype="float32", shape=(None, 2))
    pricing = resolve(terms, [images, im_shape])
    assert pricing.check({"images": (16, 3, 640, 1280), "im_shape": (16, 2)}) == 16
    with pytest.raises(OutsideTerms, match="dim 0 is 17"):
        pricing.check({"images": (17, 3, 640, 640), "im_shape": (17, 2)})


def test_the_layout_lists_existing_directories() -> None:
    listed = re.findall(r"^(\S+/)", _block("layout").text, re.MULTILINE)
    assert len(listed) >= 8
    missing = [path for path in listed if not (ROOT / path).is_dir()]
    assert not missing


def test_the_consumer_exit_codes_are_the_programs() -> None:
    section = README.read_text(encoding="utf-8").split("## Exit codes", 1)[1]
    table = section.split("\n\n")[2]
    listed = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    constants = {
        getattr(consumer_cli, name) for name in consumer_cli.__all__ if name.startswith("EXIT_")
    }
    assert listed == constants


def test_the_inspect_command_runs() -> None:
    (command,) = _commands(_block("inspect"))
    done = _sh(command, ROOT, _environment())
    assert done.returncode == 0, done.stdout
    assert "verdict: accepted" in done.stdout


# --- the walkthrough, for real ----------------------------------------------------------


def _environment() -> dict[str, str]:
    """``python`` on PATH is this interpreter (the venv the suite runs in)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTHONWARNINGS", None)
    return env


def _sh(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run one README command under bash, bounded; output and errors merged."""
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@dataclass(eq=False)
class _Script:
    """A README block running in the background, its output collected line by line."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    ended: bool = False

    def read(self, stream: IO[str]) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_line(self, matches: Callable[[str], bool]) -> None:
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(map(matches, self.lines)) or self.ended, TIMEOUT
            )
            assert found, "\n".join(self.lines)
            assert not self.ended, "\n".join(self.lines)


class _Walkthrough:
    """The README's terminals, in a temporary directory, on free ports."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = _environment()
        self.ports = dict(zip(README_PORTS, map(str, _free_ports(len(README_PORTS))), strict=True))
        self.daemons: list[Daemon] = []
        self.scripts: list[_Script] = []

    def text(self, block: str) -> str:
        """The block with the README's ports replaced by this run's."""
        text = _block(block).text
        for readme_port, port in self.ports.items():
            text = re.sub(rf"\b{readme_port}\b", port, text)
        return text

    def commands(self, block: str) -> list[str]:
        return _commands(Block(block, "sh", self.text(block), 0))

    def run(self, command: str) -> str:
        done = _sh(command, self.workdir, self.env)
        expected = _expected_status(command)
        assert done.returncode == expected, f"{command}\nexited {done.returncode}:\n{done.stdout}"
        return done.stdout

    def daemon(self, name: str, command: str) -> Daemon:
        daemon = start_daemon(
            name, ["bash", "-c", f"exec {command}"], cwd=self.workdir, env=self.env
        )
        self.daemons.append(daemon)
        return daemon

    def script(self, text: str) -> _Script:
        process = subprocess.Popen(
            ["bash", "-c", text],
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # so that close() can stop the queries it started too
        )
        assert process.stdout is not None
        script = _Script(process)
        threading.Thread(target=script.read, args=(process.stdout,), daemon=True).start()
        self.scripts.append(script)
        return script

    def close(self) -> None:
        for script in self.scripts:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(script.process.pid, signal.SIGKILL)
            script.process.wait(TIMEOUT)
            assert script.process.stdout is not None
            script.process.stdout.close()
        for daemon in reversed(self.daemons):
            daemon.stop()


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def walkthrough(tmp_path: Path) -> Iterator[_Walkthrough]:
    if shutil.which("bash") is None:
        pytest.skip("the README's commands are shell commands; bash is not installed")
    (tmp_path / "demo").symlink_to(ROOT / "demo", target_is_directory=True)
    walk = _Walkthrough(tmp_path)
    try:
        yield walk
    finally:
        walk.close()


def _left(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"^Inferences left: (\d+)$", output, re.MULTILINE)]


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(walkthrough: _Walkthrough) -> None:
    walk = walkthrough
    # Terminal 1: init, measure, the model; serve in the background.
    *setup, serve = walk.commands("owner")
    for command in setup:
        walk.run(command)
    for made in ("custodian-state/ca.pem", "policy.toml", "covidnet.onnx", "chest-xray.png"):
        assert (walk.workdir / made).is_file(), made
    custodian = walk.daemon("custodian", serve)
    custodian.wait_for("custodian_listening")

    # Terminal 2: the enclave, attested, with the model.
    (enclave_command,) = walk.commands("borrower")
    enclave = walk.daemon("enclave", enclave_command)
    enclave.wait_for("custodian_link_up", inferences_left=3, models=["covidnet"])

    # Terminal 3: info, then four queries; the fourth waits.
    consumer = walk.script(walk.text("consumer"))
    consumer.wait_line(lambda line: line.startswith(_WAITING))
    assert "State: serving" in consumer.lines
    assert _left("\n".join(consumer.lines)) == [3, 2, 1, 0]  # info, then the queries

    # The owner supplies 5 with curl; the fourth query completes.
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the README's supply command cannot run")
    (supply,) = walk.commands("supply")
    answer = json.loads(walk.run(supply).splitlines()[-1])  # after curl's progress meter
    assert answer["added"] == 5
    assert consumer.process.wait(TIMEOUT) == 0, "\n".join(consumer.lines)
    assert _left("\n".join(consumer.lines)) == [3, 2, 1, 0, 4]

    # Usage, once the enclave's report of the fourth inference is in the ledger.
    custodian.wait_for("consumption_report", borrower_served=4)
    (usage,) = walk.commands("usage")
    assert re.search(r"^served\s+4$", walk.run(usage), re.MULTILINE)

    # The Python example uses one more.
    example = walk.workdir / "example.py"
    example.write_text(walk.text("python"), encoding="utf-8")
    output = walk.run(f"python {example.name}")
    assert output.rstrip().endswith("inferences left: 3"), output

    # Block: refused with exit status 5; unblock.
    block, refused, unblock = walk.commands("block")
    walk.run(block)
    enclave.wait_for("custodian_blocked")
    assert "blocked" in walk.run(refused)
    walk.run(unblock)
    enclave.wait_for("custodian_unblocked")

    # Ctrl-C in terminal 1; the next query is refused: custodian unreachable.
    custodian.process.send_signal(signal.SIGINT)
    assert custodian.wait_exit() == 0
    enclave.wait_for("custodian_link_down")
    (after,) = walk.commands("custodian-stopped")
    assert "custodian_unreachable" in walk.run(after)

    # The real model's commands: every flag parses; only the missing files stop them.
    for command, missing in zip(
        walk.commands("real-model"), ("COVID-Net-CXR-2.onnx", "ex-covid.jpeg"), strict=True
    ):
        done = _sh(command, walk.workdir, walk.env)
        assert done.returncode == 2, done.stdout
        assert missing in done.stdout
        assert "usage:" not in done.stdout, done.stdout
