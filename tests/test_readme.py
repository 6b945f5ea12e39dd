"""Every command in README.md is exercised here, so the README cannot rot.

Each fenced block of the README follows a marker, ``<!-- readme-test: NAME -->``, and
:data:`BLOCKS` says what this file does with each name. A block without a marker, a name
nobody handles, or a handled name the README lost, fails :func:`test_every_block_is_marked`.

The install line runs for real, once per test run (:func:`readme_venv`): in a directory
holding the project's files, with ``python3`` on ``PATH`` being the Python that runs this
suite (its base interpreter, not the virtual environment the suite may run in), so a
fresh virtual environment is made with that Python's own pip, whatever its version (a
fresh Python 3.11 has pip 23, which has no ``--group``); pip's cache is used.

The walkthrough (:func:`test_the_walkthrough_runs_as_written`) runs the README's blocks
for real, in order, in a temporary directory (``demo/`` linked into it), with ``python``
on ``PATH`` being the one the install line made: the custodian and the enclave in the
background (waited on by their readiness log lines, and stopped with SIGINT as Ctrl-C
would), the consumer's four queries (the fourth waits), the ``curl`` supply, usage, block
and unblock, the query after the custodian stopped, and the Python example. The only
edit made to the text is the port numbers: the README writes out the default ports (7000,
6000, 9924) and the test replaces them with free ones, so that it never collides with
anything listening on this machine. A trailing ``# exits N`` comment is the exit status
a command must have (0 otherwise).

The quickstart's first command runs up to the demo (:func:`test_the_quickstart_installs_nox`):
the virtual environment and nox, then ``nox -l`` in place of ``nox -s demo``, on this
Python and on the system's externally managed Python (PEP 668) where there is one, which
is where ``python3 -m pip install nox`` is refused. ``nox -s demo`` itself is run by
``tests/e2e/test_demo.py`` as nox runs it, and ``.ci/run`` runs both commands as written;
``nox -s tests`` would recurse into this very suite. The develop line would too; its
extras are checked to be the dependency groups. The real COVID-Net commands (the model
is not here) are run up to the point where they need the missing file, which proves
every flag parses.
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
    "quickstart": "the first command up to the demo, on this and an externally managed Python",
    "diagram": "a drawing: nothing to run",
    "install": "run for real: a fresh virtual environment for the walkthrough",
    "owner": "walkthrough, terminal 1 (serve in the background)",
    "borrower": "walkthrough, terminal 2 (in the background)",
    "consumer": "walkthrough, terminal 3 (the fourth query waits)",
    "supply": "walkthrough: curl on the admin API",
    "usage": "walkthrough: the ledger",
    "block": "walkthrough: block, a refused query, unblock",
    "custodian-stopped": "walkthrough: the query after Ctrl-C in terminal 1",
    "python": "walkthrough: the Python example",
    "consumer-folder": "walkthrough: a folder of inputs over one connection",
    "gateway": "run by tests/e2e/test_gateway.py, in front of the walkthrough's model",
    "tritonclient": "run by tests/e2e/test_gateway.py against that gateway",
    "gateway-curl": "run by tests/e2e/test_gateway.py against that gateway",
    "real-model": "no COVID-Net here: run until the missing file stops them",
    "nox": "sessions checked in noxfile.py",
    "develop": "would run the suite: its extras are checked against the groups",
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
        if block.name not in ("diagram", "layout", "python", "terms", "tritonclient"):
            assert block.language == "sh", f"line {block.line}: say ```sh"
    assert _block("python").language == "python"
    assert _block("tritonclient").language == "python"


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
    """The quickstart as ``.ci/run`` runs it; every session named exists in noxfile.py."""
    commands = _commands(_block("quickstart"))
    assert [c.split("#")[0].strip() for c in commands] == [
        "python3 -m venv .venv && .venv/bin/pip install nox && .venv/bin/nox -s demo",
        ".venv/bin/nox -s tests",
    ]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci[-2:] == [c.split("#")[0].strip() for c in commands]
    named = set(re.findall(r"nox -s (\w+)", _block("quickstart").text + _block("nox").text))
    assert named == {"tests", "lint", "demo", "bench", "fuzz", "chaos"}
    assert named <= _nox_sessions()
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    assert '"demo/run.py"' in noxfile


def _flattened_groups() -> dict[str, set[str]]:
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    table = groups["dependency-groups"]

    def flat(name: str) -> set[str]:
        found: set[str] = set()
        for item in table[name]:
            found |= flat(item["include-group"]) if isinstance(item, dict) else {item}
        return found

    return {name: flat(name) for name in table}


def test_the_install_lines_extras_are_the_dependency_groups() -> None:
    """pip 23 has no ``--group``: the README installs extras, each its group flattened."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = {name: set(deps) for name, deps in project["optional-dependencies"].items()}
    groups = _flattened_groups()
    named: set[str] = set()
    for block in ("install", "develop"):
        text = _block(block).text
        assert "--group" not in text
        (spec,) = re.findall(r"pip install -e '\.\[([a-z,]+)\]'", text)
        named |= set(spec.split(","))
    assert named == {"demo", "test", "lint"}
    for name in named:
        assert extras[name] == groups[name], name
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


def _environment(bin_dir: Path | None = None) -> dict[str, str]:
    """``python`` on PATH is ``bin_dir``'s (by default this interpreter's)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = Path(sys.executable).parent if bin_dir is None else bin_dir
    env["PATH"] = os.pathsep.join([str(first), env.get("PATH", "")])
    env.pop("PYTHONWARNINGS", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def _base_python() -> Path:
    """The Python that runs this suite, outside any virtual environment it runs in."""
    return Path(getattr(sys, "_base_executable", sys.executable))


def _fresh_python_environment(python: Path, link_dir: Path) -> dict[str, str]:
    """``python3`` on PATH is ``python`` (linked from ``link_dir``); no virtual environment
    is active."""
    env = _environment()
    here = str(Path(sys.executable).parent)
    rest = [entry for entry in env["PATH"].split(os.pathsep) if entry and entry != here]
    link_dir.mkdir(parents=True, exist_ok=True)
    (link_dir / "python3").symlink_to(python)
    env["PATH"] = os.pathsep.join([str(link_dir), *rest])
    return env


def _project_copy(directory: Path) -> Path:
    """What a clone holds that the README's commands use, linked into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md", "noxfile.py", "src", "demo"):
        (directory / name).symlink_to(ROOT / name, target_is_directory=(ROOT / name).is_dir())
    return directory


#: Creating a virtual environment and installing the project with its dependencies: a
#: download at worst (pip's cache is used), so a bound of its own.
INSTALL_TIMEOUT: Final = 600.0


@pytest.fixture(scope="module")
def readme_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's install block, run as written in a copy of the project; the ``bin``
    directory of the virtual environment it made."""
    if shutil.which("bash") is None:
        pytest.skip("the README's commands are shell commands; bash is not installed")
    where = tmp_path_factory.mktemp("readme-install")
    clone = _project_copy(where / "project")
    env = _fresh_python_environment(_base_python(), where / "python")
    script = f"set -e\n{_block('install').text}command -v python\npython -m pip --version\n"
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=clone,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout
    bin_dir = clone / ".venv" / "bin"
    lines = done.stdout.splitlines()
    assert str(bin_dir / "python") in lines, done.stdout  # the activate line took effect
    assert lines[-1].startswith("pip "), done.stdout  # the venv's own pip, as it came
    return bin_dir


#: Pythons that refuse ``pip install`` outside a virtual environment (PEP 668).
SYSTEM_PYTHONS: Final = (Path("/usr/bin/python3"),)


def _externally_managed(python: Path) -> bool:
    if not python.exists():
        return False
    done = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    return done.returncode == 0 and (Path(done.stdout.strip()) / "EXTERNALLY-MANAGED").exists()


def _quickstart_pythons() -> list[object]:
    pythons: list[object] = [pytest.param(_base_python(), id="this-python")]
    for python in SYSTEM_PYTHONS:
        if python.resolve() != _base_python().resolve():
            pythons.append(pytest.param(python, id="system-python"))
    return pythons


@pytest.mark.slow
@pytest.mark.parametrize("python", _quickstart_pythons())
def test_the_quickstart_installs_nox(python: Path, tmp_path: Path) -> None:
    """The first command as written, but ``nox -l`` for ``nox -s demo`` (which
    ``tests/e2e/test_demo.py`` runs): on an externally managed Python too."""
    if shutil.which("bash") is None:
        pytest.skip("the README's commands are shell commands; bash is not installed")
    managed = _externally_managed(python)
    if python in SYSTEM_PYTHONS and not managed:
        pytest.skip(f"{python} is not an externally managed Python here")
    first = _commands(_block("quickstart"))[0].split("#")[0].strip()
    *install, demo = (part.strip() for part in first.split("&&"))
    assert demo == ".venv/bin/nox -s demo"
    clone = _project_copy(tmp_path / "project")
    env = _fresh_python_environment(python, tmp_path / "python")
    if managed:  # the old quickstart is refused there: the case is real
        refused = _sh("python3 -m pip install nox", clone, env)
        assert refused.returncode != 0
        assert "externally-managed-environment" in refused.stdout, refused.stdout
    done = subprocess.run(
        ["bash", "-c", " && ".join([*install, ".venv/bin/nox -l"])],
        cwd=clone, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=INSTALL_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout
    listed = set(re.findall(r"^[*-] (\w+)", done.stdout, re.MULTILINE))
    assert {"tests", "lint", "demo", "bench"} <= listed, done.stdout


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
    """The README's terminals, in a temporary directory, on free ports, with the virtual
    environment the install block made."""

    def __init__(self, workdir: Path, bin_dir: Path) -> None:
        self.workdir = workdir
        self.env = _environment(bin_dir)
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
def walkthrough(tmp_path: Path, readme_venv: Path) -> Iterator[_Walkthrough]:
    (tmp_path / "demo").symlink_to(ROOT / "demo", target_is_directory=True)
    walk = _Walkthrough(tmp_path, readme_venv)
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
    assert "models: covidnet" in output.splitlines(), output

    # A folder of two scans over one connection: a JSON line each, then the summary.
    copy, folder = walk.commands("consumer-folder")
    walk.run(copy)
    output = walk.run(folder)
    documents = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [Path(d["input"]).name for d in documents[:-1]] == ["front.png", "side.png"]
    assert [d["inferences_left"] for d in documents[:-1]] == [2, 1]
    assert "Probability" not in output  # JSON only
    summary = documents[-1]["summary"]
    assert (summary["served"], summary["failed"], summary["inferences_left"]) == (2, 0, 1)

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
