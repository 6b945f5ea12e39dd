"""The systemd units in ``deploy/systemd``: what systemd says of them, and what they must say.

``systemd-analyze verify`` needs no running systemd (``--man=no --generators=no``, checked
on systemd 252) but does check that every ``Exec*=`` binary exists, so each unit is
rendered into a temporary directory with its commands pointed at stub executables; it
exits 0 even for an unknown key, so the test requires its output to be empty.
``systemd-analyze security --offline=yes`` scores the sandbox without a running systemd.

The structural checks read the units with :func:`parse_unit`, not :mod:`configparser`:
systemd keys repeat (``SystemCallFilter=``, ``Environment=``) and every occurrence counts,
where configparser keeps one or refuses the file.

Two decisions the units record in comments are tested against the machine, so they are
revisited when they stop being true: ``MemoryDenyWriteExecute=`` stays off because
pyOpenSSL's verify callback needs writable and executable memory (checked under the
kernel's own W^X switch, ``PR_SET_MDWE``), and ``drm-enclave-ready`` (the Gramine unit's
readiness check) fails fast and clearly. Its success against a live enclave is part of
``tests/e2e/test_log_hygiene.py``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[2]
UNIT_DIR: Final = ROOT / "deploy" / "systemd"
CUSTODIAN: Final = "drm-custodian.service"
ENCLAVE: Final = "drm-enclave.service"
SIMULATED: Final = "drm-enclave-simulated.service"
UNITS: Final = (CUSTODIAN, ENCLAVE, SIMULATED)
READY_SCRIPT: Final = UNIT_DIR / "drm-enclave-ready"
SYSTEMD_ANALYZE: Final = shutil.which("systemd-analyze")
#: ``systemd-analyze security`` exposure, times ten: 2.0 and below is "OK".
MAX_EXPOSURE: Final = 20
COMMAND_TIMEOUT: Final = 60.0

Unit = dict[str, dict[str, list[str]]]

needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (no systemd here)"
)


def parse_unit(text: str) -> Unit:
    """Sections to keys to every value given, in order (``#`` and ``;`` lines skipped)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not used"
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: not Key=Value: {raw!r}"
        assert section is not None, f"line {number}: {raw!r} is outside any section"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def load(name: str) -> Unit:
    return parse_unit((UNIT_DIR / name).read_text(encoding="utf-8"))


def service(name: str) -> dict[str, list[str]]:
    return load(name)["Service"]


def last(section: dict[str, list[str]], key: str) -> str:
    """The value systemd uses for a single-valued key: the last one given."""
    assert key in section, f"{key}= is missing"
    return section[key][-1]


def seconds(span: str) -> float:
    """A systemd time span such as ``20min``, ``45s`` or ``1min 30s``."""
    units = {"min": 60.0, "s": 1.0, "h": 3600.0, "ms": 0.001}
    parts = re.findall(r"(\d+)\s*(min|ms|s|h)", span)
    assert parts, f"not a time span: {span!r}"
    return sum(int(n) * units[u] for n, u in parts)


def test_parse_unit_keeps_repeated_keys_and_refuses_junk() -> None:
    unit = parse_unit("[Service]\n# c\nA=1\nA=2 3\nB=\n")
    assert unit == {"Service": {"A": ["1", "2 3"], "B": [""]}}
    with pytest.raises(AssertionError, match=r"line 1: 'Orphan=1' is outside any section"):
        parse_unit("Orphan=1\n")
    with pytest.raises(AssertionError, match="line 2: not Key=Value"):
        parse_unit("[Unit]\nnothing\n")


# --- systemd-analyze ------------------------------------------------------------------


def render(name: str, directory: Path) -> Path:
    """The unit with each ``Exec*=`` command replaced by a stub of the same name."""
    stubs = directory / "bin"
    stubs.mkdir(exist_ok=True)
    lines = []
    for line in (UNIT_DIR / name).read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("Exec"):
            command, _, rest = value.partition(" ")
            stub = stubs / Path(command).name
            stub.write_text("#!/bin/sh\nexit 0\n", encoding="ascii")
            stub.chmod(0o755)
            line = f"{key}={stub} {rest}"
        lines.append(line)
    path = directory / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


@needs_analyze
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_is_silent(name: str, tmp_path: Path) -> None:
    done = analyze("verify", "--man=no", "--generators=no", render(name, tmp_path))
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@needs_analyze
def test_verify_does_report_what_the_test_relies_on(tmp_path: Path) -> None:
    """The check above is not vacuous: a bad key and a missing binary are both reported."""
    unit = render(CUSTODIAN, tmp_path)
    text = unit.read_text(encoding="utf-8")
    unit.write_text(text.replace("[Service]", "[Service]\nProtectSystm=strict"), "utf-8")
    done = analyze("verify", "--man=no", "--generators=no", unit)
    assert "Unknown key 'ProtectSystm'" in done.stdout + done.stderr
    (tmp_path / "bin" / "python3").unlink()
    done = analyze("verify", "--man=no", "--generators=no", unit)
    assert done.returncode != 0
    assert "is not executable" in done.stdout + done.stderr


@needs_analyze
@pytest.mark.parametrize("name", UNITS)
def test_sandbox_exposure_is_low(name: str) -> None:
    done = analyze("security", "--offline=yes", f"--threshold={MAX_EXPOSURE}", UNIT_DIR / name)
    if "unrecognized option" in done.stderr:
        pytest.skip(f"this systemd-analyze has no offline security check: {done.stderr}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr


# --- what every unit says -------------------------------------------------------------

SANDBOX: Final = {
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallArchitectures": "native",
    "MemoryDenyWriteExecute": "no",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "UMask": "0077",
}


@pytest.mark.parametrize("name", UNITS)
def test_every_unit_is_sandboxed_and_restarts_with_bounds(name: str) -> None:
    unit = load(name)
    svc = unit["Service"]
    for key, expected in SANDBOX.items():
        assert last(svc, key) == expected, f"{name}: {key}="
    assert "@system-service" in svc["SystemCallFilter"]
    user = last(svc, "User")
    assert user.startswith("drm-")
    assert "DynamicUser" not in svc  # the operator runs init and admin commands as User=
    assert last(svc, "KillSignal") == "SIGTERM"
    assert last(svc, "Restart") == "on-failure"
    assert last(svc, "RestartPreventExitStatus") == "2"  # a config error is not retried
    assert seconds(last(svc, "RestartSec")) >= 5
    assert int(last(unit["Unit"], "StartLimitBurst")) >= 1
    assert seconds(last(unit["Unit"], "StartLimitIntervalSec")) >= 60
    assert seconds(last(svc, "TimeoutStopSec")) >= 30  # the daemons' own drain bound
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_custodian_unit() -> None:
    unit = load(CUSTODIAN)
    svc = unit["Service"]
    assert last(svc, "ExecStart").endswith(
        "python3 -m drm_custodian serve --config /etc/drm-custodian/custodian.toml"
    )
    assert (last(svc, "Type"), last(svc, "NotifyAccess")) == ("notify", "main")
    assert seconds(last(svc, "WatchdogSec")) >= 10
    assert last(svc, "StateDirectory") == "drm-custodian"
    assert last(svc, "StateDirectoryMode") == "0700"
    assert last(svc, "ConfigurationDirectory") == "drm-custodian"
    assert last(svc, "PrivateDevices") == "yes"
    assert last(svc, "WorkingDirectory") == "/var/lib/drm-custodian"
    assert seconds(last(svc, "TimeoutStartSec")) >= 60


def test_gramine_unit_checks_readiness_from_the_host() -> None:
    unit = load(ENCLAVE)
    svc = unit["Service"]
    assert last(svc, "ExecStart") == "/usr/bin/gramine-sgx drm_enclave"
    assert last(svc, "WorkingDirectory") == "/opt/drm-enclave"
    # sd_notify cannot leave the enclave: no notify type, no watchdog to starve.
    assert last(svc, "Type") == "exec"
    assert "WatchdogSec" not in svc
    assert "NotifyAccess" not in svc
    (post,) = svc["ExecStartPost"]
    assert post.startswith("/usr/local/libexec/drm-enclave-ready ")
    assert "--config /etc/drm-enclave/enclave.toml" in post
    assert "--policy /opt/drm-enclave/drm_enclave.policy.toml" in post
    assert seconds(last(svc, "TimeoutStartSec")) >= 15 * 60  # enclave + model download
    assert "simulat" not in last(unit["Unit"], "Description").lower()
    assert "aesmd.service" in unit["Unit"]["After"]
    assert "drm-enclave-simulated.service" in unit["Unit"]["Conflicts"]


def test_gramine_unit_reaches_the_sgx_device() -> None:
    svc = service(ENCLAVE)
    assert svc.get("PrivateDevices", ["no"])[-1] == "no"
    assert last(svc, "DevicePolicy") == "closed"
    assert svc["DeviceAllow"] == ["/dev/sgx_enclave rw"]  # not sgx_provision: aesmd's
    assert "sgx" in last(svc, "SupplementaryGroups").split()
    assert not any("/dev" in v for v in svc.get("NoExecPaths", []))  # enclave pages are X
    assert "StateDirectory" not in svc  # nothing of the enclave is kept on the host


def test_simulation_unit_says_what_it_is() -> None:
    unit = load(SIMULATED)
    svc = unit["Service"]
    description = last(unit["Unit"], "Description")
    assert "SIMULATION" in description
    assert "INSECURE" in description
    assert "test machines only" in description
    assert last(svc, "ExecStart").endswith(
        "python3 -m drm_enclave serve --config /etc/drm-enclave/enclave.toml "
        "--attestation simulated --simulation-dir /var/lib/drm-enclave/simulated-platform"
    )
    assert (last(svc, "Type"), last(svc, "NotifyAccess")) == ("notify", "main")
    assert seconds(last(svc, "WatchdogSec")) >= 10
    assert last(svc, "PrivateDevices") == "yes"
    assert (last(svc, "StateDirectory"), last(svc, "StateDirectoryMode")) == (
        "drm-enclave",
        "0700",
    )
    assert "drm-enclave.service" in unit["Unit"]["Conflicts"]


def test_sysusers_declares_the_units_users() -> None:
    lines = (UNIT_DIR / "drm-sysusers.conf").read_text(encoding="utf-8").splitlines()
    entries = [line.split()[:3] for line in lines if line and not line.startswith("#")]
    assert ["u", "drm-custodian", "-"] in entries
    assert ["u", "drm-enclave", "-"] in entries
    assert ["m", "drm-enclave", "sgx"] in entries
    users = {last(service(name), "User") for name in UNITS}
    assert users == {"drm-custodian", "drm-enclave"}


# --- MemoryDenyWriteExecute= ------------------------------------------------------------

_UNDER_MDWE = """
import ctypes, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE
    print("unsupported"); sys.exit(0)
from OpenSSL import SSL
try:
    SSL.Context(SSL.TLS_METHOD).set_verify(SSL.VERIFY_PEER, lambda *args: True)
except MemoryError as exc:
    print("refused:", exc); sys.exit(0)
print("allowed")
"""


def test_memory_deny_write_execute_would_break_the_tls_verify_callback() -> None:
    """Why every unit has ``MemoryDenyWriteExecute=no``: see the custodian unit's comment.

    ``PR_SET_MDWE`` (Linux 6.3) is the kernel's own version of what systemd enforces with
    seccomp: no mapping both writable and executable.
    """
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_MDWE],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "unsupported":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 or later)")
    assert done.stdout.startswith("refused: Cannot allocate write+execute memory"), (
        f"{done.stdout!r}: pyOpenSSL no longer needs W+X memory; try "
        "MemoryDenyWriteExecute=yes in deploy/systemd and update this test"
    )


# --- drm-enclave-ready ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ready_module() -> ModuleType:
    """The readiness check, imported from its file (it has no ``.py`` suffix)."""
    loader = importlib.machinery.SourceFileLoader("drm_enclave_ready", str(READY_SCRIPT))
    spec = importlib.util.spec_from_loader("drm_enclave_ready", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ('listen = "0.0.0.0:9925"', ("127.0.0.1", 9925)),
        ('listen = "[::]:9926"', ("::1", 9926)),
        ('listen = "10.1.2.3:9924"', ("10.1.2.3", 9924)),
        ("", ("127.0.0.1", 9924)),
    ],
)
def test_ready_finds_the_consumer_port_in_the_config(
    ready_module: ModuleType, tmp_path: Path, listen: str, expected: tuple[str, int]
) -> None:
    config = tmp_path / "enclave.toml"
    config.write_text(f'custodian = "c:7000"\n{listen}\n', encoding="utf-8")
    assert ready_module.consumer_address(config) == expected


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def run_ready(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, READY_SCRIPT, *map(str, args), "--site-packages", ""],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def test_ready_gives_up_at_its_timeout_naming_the_address(
    tmp_path: Path, refusing_port: int
) -> None:
    config = tmp_path / "enclave.toml"
    config.write_text(f'listen = "127.0.0.1:{refusing_port}"\n', encoding="utf-8")
    policy = ROOT / "tests" / "data" / "policy" / "gramine-debug.toml"
    done = run_ready("--config", config, "--policy", policy, "--timeout", "0")
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"the enclave at 127.0.0.1:{refusing_port} is not ready after 0 s" in done.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen = "no-port"\n', "listen must be HOST:PORT, not 'no-port'"),
        ('listen = "127.0.0.1:70000"\n', "listen must be HOST:PORT"),
        ("listen = [\n", "enclave.toml"),
    ],
)
def test_ready_refuses_a_bad_config(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "enclave.toml"
    config.write_text(text, encoding="utf-8")
    done = run_ready("--config", config, "--policy", tmp_path / "policy.toml")
    assert done.returncode == 2
    assert message in done.stderr


def test_ready_stops_at_once_on_a_missing_policy(tmp_path: Path, refusing_port: int) -> None:
    config = tmp_path / "enclave.toml"
    config.write_text(f'listen = "127.0.0.1:{refusing_port}"\n', encoding="utf-8")
    done = run_ready("--config", config, "--policy", tmp_path / "absent.toml", "--timeout", "600")
    assert done.returncode == 2, done.stderr
    assert "absent.toml" in done.stderr
