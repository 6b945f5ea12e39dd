"""Fault injection for the end-to-end tests: a loopback TCP fault proxy and a process lab.

:class:`FaultProxy` sits between the enclave and the custodian on 127.0.0.1. Each
direction has a :class:`Gate`: open, it forwards bytes; closed, it stops *reading* (so TCP
back-pressure reaches the sender) without closing anything, which is a silent partition.
A gate may also be given a byte budget: it forwards exactly that many bytes, then closes
itself and sets :attr:`Gate.exhausted`, so a test can stop a model upload at a known
point instead of racing it. When either end of a proxied connection closes, the proxy
closes the other end (once the gates let it see that).

:class:`Lab` is the operator's steps (``init``, ``measure``) and the daemons started one
at a time with the options the fault tests need (``--lease``, several models, an enclave
dialling the proxy, a custodian restarted on its old port). Its methods block: call them
from ``trio.to_thread.run_sync`` while a proxy runs in the test's event loop.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from drm_lab.admin import AdminApi
from drm_lab.processes import (
    Daemon,
    Deviation,
    parse_address,
    python_command,
    run_command,
    start_daemon,
)

LOOPBACK: Final = "127.0.0.1"
#: Bytes read at once by a proxy pump.
CHUNK: Final = 64 * 1024
#: Bound on any one poll of state that changes in another process.
POLL_TIMEOUT: Final = 30.0
POLL_INTERVAL: Final = 0.05


class Gate:
    """One direction of the proxy: open, closed (silent), or open for a byte budget."""

    def __init__(self) -> None:
        self._open = True
        self._opened = trio.Event()
        self._opened.set()
        self._budget: int | None = None
        #: Set when a byte budget has been used up (the gate then closed itself).
        self.exhausted = trio.Event()
        #: Bytes forwarded in this direction, all connections together.
        self.forwarded = 0

    @property
    def is_open(self) -> bool:
        return self._open

    def close(self) -> None:
        """Stop forwarding (and reading): the peers see silence, not a close."""
        if self._open:
            self._open = False
            self._opened = trio.Event()

    def open(self) -> None:
        """Forward everything again, with no budget."""
        self._budget = None
        self._open = True
        self._opened.set()

    def limit(self, nbytes: int) -> None:
        """Forward exactly ``nbytes`` more bytes, then close and set :attr:`exhausted`."""
        if nbytes < 1:
            raise ValueError("a budget is at least one byte")
        self._budget = nbytes
        self.exhausted = trio.Event()

    async def wait_open(self) -> None:
        while not self._open:
            await self._opened.wait()

    def allowance(self, want: int) -> int:
        return want if self._budget is None else min(want, self._budget)

    def spend(self, nbytes: int) -> None:
        self.forwarded += nbytes
        if self._budget is not None:
            self._budget -= nbytes
            if self._budget <= 0:
                self._budget = None
                self.close()
                self.exhausted.set()


@dataclass(eq=False)
class FaultProxy:
    """A TCP proxy from :attr:`port` (127.0.0.1) to ``target_port``; see the module doc.

    Attributes:
        upstream: enclave -> custodian.
        downstream: custodian -> enclave.
        accepted: connections accepted so far.
    """

    target_port: int
    port: int = 0
    upstream: Gate = field(default_factory=Gate)
    downstream: Gate = field(default_factory=Gate)
    accepted: int = 0

    def partition(self) -> None:
        """A silent partition: nothing passes either way, nothing is closed."""
        self.upstream.close()
        self.downstream.close()

    def heal(self) -> None:
        self.upstream.open()
        self.downstream.open()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        sock = trio.socket.socket()
        try:
            try:
                await sock.connect((LOOPBACK, self.target_port))
                server = trio.SocketStream(sock)
            except OSError:  # the custodian is down: the enclave sees a closed connection
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, server, self.upstream, nursery.cancel_scope)
                nursery.start_soon(_pump, server, client, self.downstream, nursery.cancel_scope)
        finally:
            sock.close()
            await trio.aclose_forcefully(client)


async def _pump(
    src: trio.SocketStream, dst: trio.SocketStream, gate: Gate, both: trio.CancelScope
) -> None:
    """Copy ``src`` to ``dst`` while ``gate`` allows; an end or error ends both directions."""
    try:
        while True:
            await gate.wait_open()
            data = await src.receive_some(gate.allowance(CHUNK))
            if not data:
                return
            await gate.wait_open()  # closed while this read was pending: hold the bytes
            await dst.send_all(data)
            gate.spend(len(data))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
    finally:
        both.cancel()


@asynccontextmanager
async def fault_proxy(target_port: int) -> AsyncIterator[FaultProxy]:
    """Run a :class:`FaultProxy` to ``target_port`` for the duration of the block."""
    proxy = FaultProxy(target_port)
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    proxy.port = listeners[0].socket.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, proxy._handle, listeners)
            try:
                yield proxy
            finally:
                nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, *, bound: float = POLL_TIMEOUT
) -> None:
    """Poll state owned by another process until ``check`` holds, at most ``bound`` s.

    Another process's state offers no event to wait on, so this polls; the bound makes a
    regression a failure instead of a hang.
    """
    with trio.move_on_after(bound):
        for _ in itertools.count():
            if await check():
                return
            await trio.sleep(POLL_INTERVAL)
    raise AssertionError(f"{what} within {bound} s")


@dataclass(frozen=True, slots=True)
class Enclave:
    """A running enclave process: its daemon, consumer port and instance id."""

    daemon: Daemon
    consumer_port: int
    instance_id: str


@dataclass(eq=False)
class Lab:
    """A state directory, a policy and the daemons of one test; methods block."""

    workdir: Path
    daemons: list[Daemon] = field(default_factory=list)
    custodian: Daemon | None = None
    custodian_port: int = 0
    admin: AdminApi | None = None

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
    ) -> Daemon:
        """Start ``drm_custodian serve``; wait until it listens."""
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
        return self._run_custodian(argv)

    def restart_custodian(self) -> Daemon:
        """Start the custodian again with the same arguments, state and enclave port."""
        assert self.custodian is not None
        argv = list(self.custodian.argv)
        argv[argv.index("--port") + 1] = str(self.custodian_port)
        return self._run_custodian(argv)

    def _run_custodian(self, argv: list[str]) -> Daemon:
        custodian = start_daemon("custodian", argv, cwd=self.workdir)
        self.daemons.append(custodian)
        listening = custodian.wait_for("custodian_listening")
        port = parse_address(listening["enclave_address"])[1]
        assert self.custodian_port in (0, port)
        self.custodian, self.custodian_port = custodian, port
        admin_port = parse_address(listening["admin_address"])[1]
        self.admin = AdminApi.from_state_dir(self.state_dir, f"{LOOPBACK}:{admin_port}")
        return custodian

    def start_enclave(self, custodian_port: int, *, link_up: bool = True) -> Enclave:
        """Start ``drm_enclave serve`` dialling ``custodian_port``; by default wait until
        it is linked (attested, models loaded, synced)."""
        daemon = start_daemon(
            "enclave",
            python_command(
                "drm_enclave", "serve",
                "--custodian", f"{LOOPBACK}:{custodian_port}",
                "--custodian-ca", self.ca_path, "--license", self.license_path,
                "--attestation", "simulated", "--simulation-dir", self.simulation_dir,
                "--listen", f"{LOOPBACK}:0",
            ),
            cwd=self.workdir,
        )  # fmt: skip
        self.daemons.append(daemon)
        serving = daemon.wait_for("enclave_serving")
        if link_up:
            try:
                daemon.wait_for("custodian_link_up")
            except Deviation as exc:
                log = self.custodian.log_text() if self.custodian else ""
                exc.add_note(f"--- custodian log ---\n{log}")
                raise
        port = parse_address(serving["consumer_address"])[1]
        return Enclave(daemon, port, str(serving["instance_id"]))

    def usage(self) -> dict[str, int]:
        """``GET /usage``, the counters only."""
        assert self.admin is not None
        doc = self.admin.usage()
        keys = ("supplied", "granted", "served", "in_doubt", "remaining", "instances")
        return {k: int(doc[k]) for k in keys}

    def supply(self, units: int) -> None:
        """``POST /supply_inferences``."""
        assert self.admin is not None
        self.admin.supply(units)

    def stop_all(self) -> None:
        for daemon in reversed(self.daemons):  # enclaves first, then custodians
            daemon.stop()


def kill9(daemon: Daemon) -> int:
    """SIGKILL ``daemon`` (no clean shutdown of any kind) and reap it; its status."""
    return daemon.kill()
