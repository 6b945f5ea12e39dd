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
from drm_lab.deployment import Lab
from drm_lab.models import tiny_model
from drm_lab.processes import LOOPBACK, Daemon

#: What the custodian grants before any top-up (the brief's scenario).
INITIAL_INFERENCES = 2


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
    """One custodian and one enclave of a :class:`~drm_lab.deployment.Lab`, and where to
    reach them.

    Attributes:
        lab: the lab that started them (its workdir holds state, simulated platform,
            policy and model).
        enclave: the running enclave daemon.
        consumer_port: the enclave's consumer listener, on :data:`consumer_host`.
    """

    lab: Lab
    enclave: Daemon
    consumer_port: int
    consumer_host: str = LOOPBACK

    @property
    def workdir(self) -> Path:
        return self.lab.workdir

    @property
    def state_dir(self) -> Path:
        return self.lab.state_dir

    @property
    def policy_path(self) -> Path:
        """The policy ``measure`` wrote; what a consumer loads."""
        return self.lab.policy_path

    @property
    def custodian(self) -> Daemon:
        assert self.lab.custodian is not None
        return self.lab.custodian

    @property
    def admin(self) -> AdminApi:
        """The running custodian's admin API (a restart moves it to a new port)."""
        assert self.lab.admin is not None
        return self.lab.admin

    @property
    def started(self) -> list[Daemon]:
        return self.lab.daemons

    def restart_custodian(self) -> Daemon:
        """Start the (stopped) custodian again, same state and same enclave port.

        The enclave keeps redialling the address it was given, so the new process must
        listen where the old one did; the admin API gets a new port (:attr:`admin`).
        """
        return self.lab.restart_custodian()


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
    lab = Lab(workdir, daemons)
    lab.prepare()
    for path in (lab.ca_path, lab.license_path):
        assert path.is_file(), f"drm_custodian init did not write {path}"
    assert lab.policy_path.is_file(), "drm_enclave measure did not write the policy"
    model = lab.write_model("tiny", tiny_model() if model_bytes is None else model_bytes)
    lab.start_custodian([model], initial=INITIAL_INFERENCES, log_level=log_level)
    enclave = lab.start_enclave(log_level=log_level)
    return Deployment(lab, enclave.daemon, enclave.consumer_port)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A :class:`~drm_lab.deployment.Lab` in the test's directory, prepared (``init`` and
    ``measure`` done); every daemon it started is stopped at the end."""
    missing = daemons_missing()
    if missing is not None:
        pytest.skip(missing)
    lab = Lab(tmp_path)
    try:
        lab.prepare()
        yield lab
    finally:
        lab.stop_all()


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
