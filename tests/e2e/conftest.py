"""End-to-end fixtures: a custodian and an enclave as real processes, on loopback.

:func:`deployment` runs the operator's steps in order: ``drm_custodian init`` (CA, admin
token, the borrower's license), ``drm_enclave measure`` (the consumer's and the
custodian's policy, for a simulated enclave), ``drm_custodian serve`` with the tiny model
and an initial quota, ``drm_enclave serve`` dialling it, and waits until the enclave logs
``custodian_link_up`` (attested, model loaded). Teardown stops both daemons (SIGTERM,
then SIGKILL after a bound) whatever the test did to them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drm_lab.admin import AdminApi
from drm_lab.models import tiny_model
from drm_lab.processes import (
    Daemon,
    Deviation,
    parse_address,
    python_command,
    run_command,
    start_daemon,
)
from drm_wire.attestation.policy import Policy

LOOPBACK = "127.0.0.1"
#: What the custodian grants before any top-up (the brief's scenario).
INITIAL_INFERENCES = 2
#: Where ``drm_custodian init`` writes what is handed over (see drm_custodian.state).
LICENSE_FILE = Path("handoff") / "borrower.license.json"
CA_FILE = Path("ca.pem")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs the daemons as real processes (loopback)")


def daemons_missing() -> str | None:
    """Why the end-to-end tests cannot run here, or ``None``."""
    for module in ("drm_custodian.__main__", "drm_enclave.__main__"):
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet"
    return None


@dataclass
class Deployment:
    """One custodian, one enclave, and where to reach them.

    Attributes:
        workdir: the test's directory (state, simulation platform, policy, model).
        state_dir: the custodian's state directory.
        policy_path: the policy ``measure`` wrote; what a consumer loads.
        custodian, enclave: the running daemons.
        consumer_host, consumer_port: the enclave's consumer listener.
        admin: the custodian's admin API.
    """

    workdir: Path
    state_dir: Path
    policy_path: Path
    custodian: Daemon
    enclave: Daemon
    consumer_host: str
    consumer_port: int
    admin: AdminApi
    started: list[Daemon]

    def restart_custodian(self) -> Daemon:
        """Start the (stopped) custodian again, same state and same enclave port.

        The enclave keeps redialling the address it was given, so the new process must
        listen where the old one did; the admin API gets a new port (:attr:`admin`).
        """
        port = self.custodian_port
        argv = list(self.custodian.argv)
        argv[argv.index("--port") + 1] = str(port)
        custodian = start_daemon("custodian", argv, cwd=self.workdir)
        self.started.append(custodian)
        listening = custodian.wait_for("custodian_listening")
        assert parse_address(listening["enclave_address"])[1] == port
        self.custodian = custodian
        self.admin = AdminApi.from_state_dir(self.state_dir, _loopback(listening["admin_address"]))
        return custodian

    @property
    def custodian_port(self) -> int:
        """The custodian's enclave-link port (the first start's, which restarts reuse)."""
        listening = self.custodian.find("custodian_listening")
        assert listening is not None
        return parse_address(listening["enclave_address"])[1]


def _loopback(address: str) -> str:
    """The daemon's ``host:port`` as reached over loopback (it may bind a wildcard)."""
    _, port = parse_address(address)
    return f"{LOOPBACK}:{port}"


def deploy(
    workdir: Path,
    daemons: list[Daemon],
    *,
    model_bytes: bytes | None = None,
    log_level: str = "info",
) -> Deployment:
    """Run init, measure and both daemons in ``workdir``; started daemons go in ``daemons``.

    The custodian lends ``model_bytes`` (the tiny model by default) as ``tiny``; both
    daemons log at ``log_level``.
    """
    state = workdir / "custodian-state"
    simulation = workdir / "simulated-platform"
    policy = workdir / "policy.toml"
    model = workdir / "tiny.onnx"
    model.write_bytes(tiny_model() if model_bytes is None else model_bytes)

    run_command(python_command("drm_custodian", "init", "--state-dir", state), cwd=workdir)
    ca, license_path = state / CA_FILE, state / LICENSE_FILE
    for path in (ca, license_path):
        assert path.is_file(), f"drm_custodian init did not write {path}"
    run_command(
        python_command(
            "drm_enclave", "measure",
            "--custodian-ca", ca, "--simulation-dir", simulation, "--out", policy,
        ),
        cwd=workdir,
    )  # fmt: skip
    assert policy.is_file(), "drm_enclave measure did not write the policy"

    custodian = start_daemon(
        "custodian",
        python_command(
            "drm_custodian", "serve",
            "--state-dir", state, "--upload", model, "--policy", policy,
            "--initial-inferences", str(INITIAL_INFERENCES),
            "--port", "0", "--admin-port", "0", "--log-level", log_level,
        ),
        cwd=workdir,
    )  # fmt: skip
    daemons.append(custodian)
    listening = custodian.wait_for("custodian_listening")
    enclave = start_daemon(
        "enclave",
        python_command(
            "drm_enclave", "serve",
            "--custodian", _loopback(listening["enclave_address"]),
            "--custodian-ca", ca, "--license", license_path,
            "--attestation", "simulated", "--simulation-dir", simulation,
            "--listen", f"{LOOPBACK}:0", "--log-level", log_level,
        ),
        cwd=workdir,
    )  # fmt: skip
    daemons.append(enclave)
    try:
        serving = enclave.wait_for("enclave_serving")
        enclave.wait_for("custodian_link_up")
    except Deviation as exc:  # the custodian's side of a failed link says why
        exc.add_note(
            f"{_measurement_note(enclave, policy)}--- custodian log ---\n{custodian.log_text()}"
        )
        raise
    _, consumer_port = parse_address(serving["consumer_address"])
    return Deployment(
        workdir=workdir,
        state_dir=state,
        policy_path=policy,
        custodian=custodian,
        enclave=enclave,
        consumer_host=LOOPBACK,
        consumer_port=consumer_port,
        admin=AdminApi.from_state_dir(state, _loopback(listening["admin_address"])),
        started=daemons,
    )


def _measurement_note(enclave: Daemon, policy_path: Path) -> str:
    """Say so when the enclave runs with a MRENCLAVE the policy does not list.

    In simulation MRENCLAVE digests the enclave's source files: if they change between
    ``measure`` and ``serve`` (someone editing ``src/`` while the tests run), the custodian
    rightly refuses the enclave, and the TLS alert alone would not say why.
    """
    serving = enclave.find("enclave_serving")
    if serving is None or "mr_enclave" not in serving:
        return ""
    accepted = [m.hex() for m in Policy.load(policy_path).mr_enclave]
    if serving["mr_enclave"] in accepted:
        return ""
    return (
        f"NOTE: the enclave runs as MRENCLAVE {serving['mr_enclave']} but the policy "
        f"accepts {accepted}: its measured sources changed after `measure`.\n"
    )


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    missing = daemons_missing()
    if missing is not None:
        pytest.skip(missing)
    daemons: list[Daemon] = []
    try:
        yield deploy(tmp_path, daemons)
    finally:
        for daemon in reversed(daemons):  # the enclave first, then its custodian
            daemon.stop()
