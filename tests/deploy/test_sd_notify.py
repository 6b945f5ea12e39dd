"""systemd ``Type=notify`` with the real daemons: READY only when ready, STATUS, WATCHDOG, STOPPING.

Each daemon runs as a process with ``NOTIFY_SOCKET`` pointing at a test datagram socket
(:mod:`tests.deploy.notify_socket`) and ``WATCHDOG_USEC`` set, as systemd would start it.
The enclave is started *before* its custodian: it listens for consumers and dials in vain,
and must not say READY=1 until the custodian is up, has attested it and streamed the
model. Then the custodian goes away (STATUS says so), and SIGTERM gives STOPPING=1 and a
clean exit.
"""

from __future__ import annotations

import hashlib
import io
import socket
import time
from functools import partial
from pathlib import Path
from typing import cast

import pytest
import trio

from drm_custodian import cli as custodian_cli
from drm_daemon.sd_notify import Notifier
from drm_enclave import cli as enclave_cli
from drm_enclave.identity import License
from drm_enclave.model_host import HostedModel
from drm_enclave.runtime import EnclaveRuntime
from drm_enclave.serve import EnclaveConfig
from drm_lab.models import tiny_model
from drm_lab.processes import Daemon, parse_address, python_command, start_daemon
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.messages import Grant
from tests.deploy.notify_socket import Notification, NotifySocket
from tests.simulation import simulation_policy

LOOPBACK = "127.0.0.1"
#: systemd's WatchdogSec in these tests: pings every half of it.
WATCHDOG_USEC = 1_000_000
HALF_INTERVAL = WATCHDOG_USEC / 2e6

pytestmark = pytest.mark.slow


def _free_port() -> int:
    """A loopback port free now, for a custodian started after the enclave that dials it."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _init_state(workdir: Path) -> Path:
    state = workdir / "state"
    assert custodian_cli.main(["init", "--state-dir", str(state)], stdout=io.StringIO()) == 0
    (workdir / "tiny.onnx").write_bytes(tiny_model())
    return state


def _check_watchdog(notify: NotifySocket, started: float, count: int) -> None:
    """``count`` more pings arrive, and never more often than every half interval."""
    first = len(notify.received)
    for _ in range(count):
        notify.wait_for("WATCHDOG", "1", after=len(notify.received))
    pings = len(notify.values("WATCHDOG"))
    assert len(notify.received) > first
    # One ping at start, then one per half interval at most: a bound no schedule can beat.
    assert pings <= (time.monotonic() - started) / HALF_INTERVAL + 1


def _stop_cleanly(daemon: Daemon, notify: NotifySocket) -> None:
    mark = len(notify.received)
    daemon.terminate()
    stopping = notify.wait_for("STOPPING", "1", after=mark)
    assert stopping.get("STATUS") is not None
    assert daemon.wait_exit() == 0


def test_custodian_is_ready_once_both_ports_listen(tmp_path: Path) -> None:
    state = _init_state(tmp_path)
    platform = SimulatedPlatform.create(tmp_path / "platform")
    mr_enclave = hashlib.sha256(b"sd_notify tests").digest()
    simulation_policy(platform, mr_enclave).write(tmp_path / "policy.toml")
    with NotifySocket() as notify:
        started = time.monotonic()
        daemon = start_daemon(
            "custodian",
            python_command(
                "drm_custodian", "serve", "--state-dir", state, "--upload", "tiny.onnx",
                "--policy", "policy.toml", "--port", "0", "--admin-port", "0",
            ),
            cwd=tmp_path,
            env=notify.environment(WATCHDOG_USEC),
        )  # fmt: skip
        try:
            ready = notify.wait_for("READY", "1")
            # Both ports accept connections the moment READY=1 is read.
            listening = daemon.wait_for("custodian_listening")
            for key in ("enclave_address", "admin_address"):
                socket.create_connection(parse_address(listening[key]), timeout=5).close()
            assert ready.get("STATUS") == (
                f"serving 1 model(s): enclave link on {listening['enclave_address']}, "
                f"admin API on {listening['admin_address']}"
            )
            before = notify.received[: notify.received.index(ready)]
            assert [n.get("STATUS") for n in before if "STATUS" in n] == [
                "starting: opening the ledger"
            ]
            _check_watchdog(notify, started, 2)
            _stop_cleanly(daemon, notify)
        finally:
            daemon.stop()
        assert notify.values("READY") == ["1"]


def test_enclave_is_ready_only_once_attested_with_the_model(tmp_path: Path) -> None:
    state = _init_state(tmp_path)
    ca, license_path = state / "ca.pem", state / "handoff" / "borrower.license.json"
    simulation = tmp_path / "simulated-platform"
    measured = enclave_cli.main(
        ["measure", "--custodian-ca", str(ca), "--simulation-dir", str(simulation),
         "--out", str(tmp_path / "policy.toml")],
        out=io.StringIO(),
    )  # fmt: skip
    assert measured == 0
    port = _free_port()
    with NotifySocket() as notify:
        started = time.monotonic()
        enclave = start_daemon(
            "enclave",
            python_command(
                "drm_enclave", "serve", "--custodian", f"{LOOPBACK}:{port}",
                "--custodian-ca", ca, "--license", license_path,
                "--attestation", "simulated", "--simulation-dir", simulation,
                "--listen", f"{LOOPBACK}:0",
            ),
            cwd=tmp_path,
            env=notify.environment(WATCHDOG_USEC),
        )  # fmt: skip
        custodian: Daemon | None = None
        try:
            # Listening for consumers, dialling in vain, pinging the watchdog: not READY.
            notify.wait_for("STATUS", f"dialing custodian {LOOPBACK}:{port}")
            serving = enclave.wait_for("enclave_serving")
            enclave.wait_for("custodian_link_failed")
            _check_watchdog(notify, started, 2)
            notify.drain()
            assert notify.values("READY") == []

            custodian = start_daemon(
                "custodian",
                python_command(
                    "drm_custodian", "serve", "--state-dir", state, "--upload", "tiny.onnx",
                    "--policy", "policy.toml", "--port", str(port), "--admin-port", "0",
                    "--initial-inferences", "1",
                ),
                cwd=tmp_path,
            )  # fmt: skip
            try:
                ready = notify.wait_for("READY", "1")
            except AssertionError as exc:  # say why: the logs of both sides of the link
                raise AssertionError(
                    f"{exc}\n(the enclave is measured from its sources: were they edited "
                    f"after `measure`?)\n--- enclave ---\n{enclave.log_text()}\n"
                    f"--- custodian ---\n{custodian.log_text()}"
                ) from None
            link_up = enclave.wait_for("custodian_link_up")
            assert link_up["models"] == ["tiny"]
            assert ready.get("STATUS") == f"serving 1 model(s) on {serving['consumer_address']}"
            statuses = [n.get("STATUS") for n in notify.received[: notify.received.index(ready)]]
            assert [s for s in statuses if s] == [
                f"dialing custodian {LOOPBACK}:{port}",
                f"receiving model(s) from custodian {LOOPBACK}:{port}",
            ]

            # The custodian goes away: still running (no second READY), and it says so.
            mark = len(notify.received)
            custodian.terminate()
            assert custodian.wait_exit() == 0
            notify.wait_for(
                "STATUS", f"custodian link lost; retrying {LOOPBACK}:{port}", after=mark
            )
            _stop_cleanly(enclave, notify)
        finally:
            enclave.stop()
            if custodian is not None:
                custodian.stop()
        assert notify.values("READY") == ["1"]


async def test_enclave_status_follows_the_link_and_ready_comes_once(tmp_path: Path) -> None:
    """The phase reporter alone, in process: a blocked enclave with its model is ready too."""
    with NotifySocket() as notify:
        runtime = EnclaveRuntime()
        config = EnclaveConfig(
            custodian_host=LOOPBACK, custodian_port=7000, custodian_ca_pem=b"",
            license=License("acme", "lic_" + "ab" * 16, "secret"),
        )  # fmt: skip
        stopping = trio.Event()

        async def expect(status: str) -> Notification:
            note = await trio.to_thread.run_sync(
                partial(notify.wait_for, "STATUS", status, after=len(notify.received))
            )
            return note

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                enclave_cli._report_phases,
                runtime, Notifier(notify.name), config, (LOOPBACK, 9924), stopping,
            )  # fmt: skip
            await expect("dialing custodian 127.0.0.1:7000")
            runtime.link_connected()
            await expect("receiving model(s) from custodian 127.0.0.1:7000")
            runtime.load_started()
            runtime.on_block()  # blocked while the model still loads: not ready yet
            runtime.models["tiny"] = cast("HostedModel", object())
            runtime.load_finished(None, name="tiny")
            ready = await expect("blocked by the custodian; serving nothing on 127.0.0.1:9924")
            assert ready.get("READY") == "1"
            runtime.link_lost()
            await expect("custodian link lost; retrying 127.0.0.1:7000")
            runtime.link_connected()
            await expect("receiving model(s) from custodian 127.0.0.1:7000")
            runtime.load_started()
            runtime.load_finished(None, name="tiny")  # kept: the custodian still lends it
            runtime.on_grant(Grant(grant_id=1, units=1, granted_total=1))
            serving = await expect("serving 1 model(s) on 127.0.0.1:9924")
            assert "READY" not in serving
            stopping.set()
            runtime.begin_shutdown()  # a state change: the reporter sees stopping and returns
        statuses = notify.values("STATUS")
        assert len(statuses) == len(set(statuses)) + 1  # no repeats but the re-link's
        assert notify.values("READY") == ["1"]
