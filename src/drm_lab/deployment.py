"""The daemons of one deployment on loopback, started one at a time: a process lab.

:class:`Lab` is the operator's steps (``init``, ``measure``) and the daemons started one
at a time with the options the fault tests need (``--lease``, several models, an enclave
dialling the proxy, a custodian restarted on its old port). Its methods block: call them
from ``trio.to_thread.run_sync`` while a proxy runs in the test's event loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drm_lab.admin import AdminApi
from drm_lab.processes import (
    LOOPBACK,
    STARTUP_TIMEOUT,
    Daemon,
    Deviation,
    LogEvent,
    parse_address,
    python_command,
    run_command,
    start_daemon,
)
from drm_wire.attestation.policy import Policy

__all__ = ["Enclave", "Gateway", "Lab"]


@dataclass(frozen=True, slots=True)
class Enclave:
    """A running enclave process: its daemon, consumer port and instance id."""

    daemon: Daemon
    consumer_port: int
    instance_id: str


@dataclass(frozen=True, slots=True)
class Gateway:
    """A running ``drm_consumer gateway``: its process and its base URL."""

    daemon: Daemon
    url: str


@dataclass(eq=False)
class Lab:
    """A state directory, a policy and the daemons of one test; methods block."""

    workdir: Path
    daemons: list[Daemon] = field(default_factory=list)
    custodian: Daemon | None = None
    custodian_port: int = 0
    admin: AdminApi | None = None
    #: More environment for every daemon this lab starts (e.g. a harness-only
    #: ``PYTHONPATH`` that breaks a build on purpose, to show a checker catches it).
    env: dict[str, str] | None = None

    @property
    def state_dir(self) -> Path:
        return self.workdir / "custodian-state"

    @property
    def simulation_dir(self) -> Path:
        return self.workdir / "simulated-platform"

    @property
    def policy_path(self) -> Path:
        return self.workdir / "policy.toml"

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "ca.pem"

    @property
    def license_path(self) -> Path:
        return self.state_dir / "handoff" / "borrower.license.json"

    def prepare(self) -> None:
        """``drm_custodian init`` and ``drm_enclave measure`` (the operator's first steps)."""
        run_command(
            python_command("drm_custodian", "init", "--state-dir", self.state_dir),
            cwd=self.workdir,
        )
        run_command(
            python_command(
                "drm_enclave", "measure",
                "--custodian-ca", self.ca_path, "--simulation-dir", self.simulation_dir,
                "--out", self.policy_path,
            ),
            cwd=self.workdir,
        )  # fmt: skip

    def write_model(self, name: str, data: bytes) -> Path:
        path = self.workdir / f"{name}.onnx"
        path.write_bytes(data)
        return path

    def start_custodian(
        self,
        models: Sequence[Path],
        *,
        initial: int,
        lease: int | None = None,
        port: int = 0,
        log_level: str | None = None,
        options: Sequence[str] = (),
    ) -> Daemon:
        """Start ``drm_custodian serve``; wait until it listens. ``options`` are more flags
        for ``serve``."""
        argv = python_command(
            "drm_custodian", "serve", "--state-dir", self.state_dir, "--policy", self.policy_path,
            "--initial-inferences", str(initial), "--port", str(port), "--admin-port", "0",
        )  # fmt: skip
        for model in models:
            argv += ["--upload", os.fspath(model)]
        if lease is not None:
            argv += ["--lease", str(lease)]
        if log_level is not None:
            argv += ["--log-level", log_level]
        argv += options
        return self._run_custodian(argv)

    def restart_custodian(self, *, without: Sequence[Path] = ()) -> Daemon:
        """Start the custodian again with the same arguments, state and enclave port, but
        for the models in ``without`` (no longer uploaded)."""
        assert self.custodian is not None
        argv = list(self.custodian.argv)
        argv[argv.index("--port") + 1] = str(self.custodian_port)
        for model in without:
            at = argv.index(os.fspath(model))
            assert argv[at - 1] == "--upload"
            del argv[at - 1 : at + 1]
        return self._run_custodian(argv)

    def _run_custodian(self, argv: list[str]) -> Daemon:
        custodian = start_daemon("custodian", argv, cwd=self.workdir, env=self.env)
        self.daemons.append(custodian)
        listening = custodian.wait_for("custodian_listening")
        port = parse_address(listening["enclave_address"])[1]
        assert self.custodian_port in (0, port)
        self.custodian, self.custodian_port = custodian, port
        admin_port = parse_address(listening["admin_address"])[1]
        self.admin = AdminApi.from_state_dir(self.state_dir, f"{LOOPBACK}:{admin_port}")
        return custodian

    def start_enclave(
        self,
        custodian_port: int | None = None,
        *,
        dial: str | None = None,
        link_up: bool = True,
        log_level: str | None = None,
        intra_op_threads: int | None = None,
        on_start: Callable[[int], None] | None = None,
        link_timeout: float = STARTUP_TIMEOUT,
        options: Sequence[str] = (),
        license_path: Path | None = None,
    ) -> Enclave:
        """Start ``drm_enclave serve``; by default wait until it is linked (attested,
        models loaded, synced).

        It dials ``dial`` (``host:port``, e.g. a fault proxy) if given, else
        ``custodian_port`` on loopback, else this lab's custodian. ``on_start`` is called
        with the process id as soon as it runs (to sample its memory from the start);
        ``options`` are more flags for ``serve``; ``license_path`` is the license it
        presents (by default the first borrower's, from ``init``).
        """
        if dial is None:
            dial = f"{LOOPBACK}:{custodian_port or self.custodian_port}"
        argv = python_command(
            "drm_enclave", "serve",
            "--custodian", dial,
            "--custodian-ca", self.ca_path, "--license", license_path or self.license_path,
            "--attestation", "simulated", "--simulation-dir", self.simulation_dir,
            "--listen", f"{LOOPBACK}:0", *options,
        )  # fmt: skip
        if intra_op_threads is not None:
            argv += ["--intra-op-threads", str(intra_op_threads)]
        if log_level is not None:
            argv += ["--log-level", log_level]
        daemon = start_daemon("enclave", argv, cwd=self.workdir, env=self.env)
        self.daemons.append(daemon)
        if on_start is not None:
            on_start(daemon.process.pid)
        serving = daemon.wait_for("enclave_serving")
        if link_up:
            try:
                daemon.wait_for("custodian_link_up", timeout=link_timeout)
            except Deviation as exc:  # the custodian's side of a failed link says why
                log = self.custodian.log_text() if self.custodian else ""
                exc.add_note(
                    f"{_measurement_note(serving, self.policy_path)}--- custodian log ---\n{log}"
                )
                raise
        port = parse_address(serving["consumer_address"])[1]
        return Enclave(daemon, port, str(serving["instance_id"]))

    def start_gateway(
        self,
        consumer_port: int,
        *,
        policy: Path | None = None,
        options: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> Gateway:
        """Start ``drm_consumer gateway`` in front of the enclave at ``consumer_port`` (on
        a free loopback port); wait until it listens."""
        argv = python_command(
            "drm_consumer", "gateway", "--address", LOOPBACK, "--port", str(consumer_port),
            "--policy", policy or self.policy_path, "--listen", f"{LOOPBACK}:0", *options,
        )  # fmt: skip
        daemon = start_daemon("gateway", argv, cwd=self.workdir, env=env)
        self.daemons.append(daemon)
        listening = daemon.wait_for("gateway_listening")
        return Gateway(daemon, f"http://{listening['addresses'][0]}")

    def add_borrower(self, name: str, *, max_instances: int = 1) -> Path:
        """Add a borrower through the running custodian's admin API (``POST
        /borrowers``); the license file its enclaves present."""
        assert self.admin is not None
        added = self.admin.add_borrower(name, max_instances=max_instances)
        return Path(added["license_file"])

    def usage(self, *, borrower: str | None = None) -> dict[str, int]:
        """``GET /usage`` (or ``/borrowers/NAME/usage``), the counters only."""
        assert self.admin is not None
        doc = self.admin.usage(borrower=borrower)
        keys = ("supplied", "granted", "served", "in_doubt", "remaining", "instances")
        return {k: int(doc[k]) for k in keys}

    def supply(self, units: int, *, borrower: str | None = None) -> None:
        """``POST /supply_inferences`` (or ``/borrowers/NAME/supply_inferences``)."""
        assert self.admin is not None
        self.admin.supply(units, borrower=borrower)

    def stop_all(self) -> None:
        for daemon in reversed(self.daemons):  # enclaves first, then custodians
            daemon.stop()


def _measurement_note(serving: LogEvent, policy_path: Path) -> str:
    """Say so when the enclave runs with a MRENCLAVE the policy does not list.

    In simulation MRENCLAVE digests the enclave's source files: if they change between
    ``measure`` and ``serve`` (someone editing ``src/`` while the tests run), the custodian
    rightly refuses the enclave, and the TLS alert alone would not say why.
    """
    if "mr_enclave" not in serving:
        return ""
    accepted = [m.hex() for m in Policy.load(policy_path).mr_enclave]
    if serving["mr_enclave"] in accepted:
        return ""
    return (
        f"NOTE: the enclave runs as MRENCLAVE {serving['mr_enclave']} but the policy "
        f"accepts {accepted}: its measured sources changed after `measure`.\n"
    )
