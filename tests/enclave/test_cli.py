"""``python -m drm_enclave``: ``measure`` writes a policy; ``serve`` runs and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from drm_enclave.cli import load_license, parse_address
from drm_lab.models import tiny_model
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.measurement import simulated_mr_enclave, simulated_mr_signer
from drm_wire.attestation.policy import Policy
from drm_wire.errors import ConfigError
from drm_wire.messages import EnclaveState, ModelLoaded, UsageReport
from tests.enclave.enclave_fakes import (
    HOST,
    LICENSE,
    TIMEOUT,
    FakeCustodian,
    consumer,
    enclave_policy,
    shared_pki,
    write_license,
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drm_enclave", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_measure_writes_a_policy_that_loads(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(shared_pki().ca_pem)
    out = tmp_path / "policies" / "enclave-policy.toml"
    out.parent.mkdir()
    done = _run(
        "measure",
        "--custodian-ca",
        str(ca),
        "--simulation-dir",
        str(tmp_path / "sim"),
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    expected = simulated_mr_enclave(custodian_ca=ca.read_bytes())
    assert f"MRENCLAVE {expected.hex()}" in done.stdout
    assert f"MRSIGNER  {simulated_mr_signer().hex()}" in done.stdout
    assert "insecure_simulation_mode" in done.stderr  # the loud warning
    policy = Policy.load(out)
    assert policy.mr_enclave == (expected,)
    assert policy.mr_signer == simulated_mr_signer()
    assert policy.allow_debug is False
    assert policy.accept_unknown_tcb_status is False  # the platform staples collateral
    platform = SimulatedPlatform.load(tmp_path / "sim")
    assert policy.simulation_root == platform.root_certificate
    assert policy.simulation_root_path == "../sim/sim-root.pem"  # relative to the policy


def test_measure_depends_on_the_pinned_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(shared_pki().ca_pem)
    first = _run("measure", "--custodian-ca", str(ca))
    ca.write_bytes(shared_pki().ca_pem + b"\n")
    second = _run("measure", "--custodian-ca", str(ca))
    assert first.returncode == second.returncode == 0
    assert first.stdout.splitlines()[0] != second.stdout.splitlines()[0]


def test_measure_out_needs_a_simulation_dir(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(shared_pki().ca_pem)
    done = _run("measure", "--custodian-ca", str(ca), "--out", str(tmp_path / "p.toml"))
    assert done.returncode == 2
    assert not (tmp_path / "p.toml").exists()


def test_a_ca_file_past_64_kib_is_refused(tmp_path: Path) -> None:
    pem = shared_pki().ca_pem
    at_limit, past = tmp_path / "at.pem", tmp_path / "past.pem"
    at_limit.write_bytes(pem + b"\n" * (64 * 1024 - len(pem)))  # trailing blank lines parse
    past.write_bytes(pem + b"\n" * (64 * 1024 - len(pem) + 1))
    assert _run("measure", "--custodian-ca", str(at_limit)).returncode == 0
    done = _run("measure", "--custodian-ca", str(past))
    assert done.returncode == 2
    assert f"the custodian CA is larger than {64 * 1024} bytes" in done.stderr


def test_serve_with_missing_files_exits_2(tmp_path: Path) -> None:
    done = _run(
        "serve",
        "--custodian",
        "127.0.0.1:1",
        "--custodian-ca",
        str(tmp_path / "missing.pem"),
        "--license",
        str(tmp_path / "missing.json"),
    )
    assert done.returncode == 2
    assert "configuration_error" in done.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9924", ("::1", 9924)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["7000", ":7000", "host:", "host:x", "host:70000"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_address(text)


def test_load_license(tmp_path: Path) -> None:
    license = load_license(write_license(tmp_path / "l.json"))
    assert license == LICENSE
    assert license.hello_value() == f"{LICENSE.license_id}:{LICENSE.secret}"
    assert LICENSE.secret not in repr(license)


@pytest.mark.parametrize(
    "doc",
    [
        {"format": "other", "borrower": "a", "license_id": "l", "secret": "s"},
        {"format": "drm-license", "borrower": "a", "license_id": "l"},
        {"format": "drm-license", "borrower": "a", "license_id": "l:x", "secret": "s"},
        ["not", "a", "map"],
    ],
)
def test_load_license_refuses(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "l.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(ConfigError):
        load_license(path)


def test_load_license_refuses_files_that_are_no_license(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes to it: reading it would hang start-up
    huge = tmp_path / "huge.json"
    huge.write_bytes(b" " * (64 * 1024 + 1))
    absent = tmp_path / "absent"
    cases = {
        fifo: f"the license is not a regular file (in {fifo})",
        huge: f"the license is larger than {64 * 1024} bytes (in {huge})",
        absent: f"cannot read the license: No such file or directory (in {absent})",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_license(path)
        assert str(caught.value) == message


class _StderrLines:
    """JSON log lines of a child process, read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.seen: list[dict[str, Any]] = []

    async def until(self, event: str) -> dict[str, Any]:
        with trio.fail_after(TIMEOUT * 2):
            while True:
                for entry in self.seen:
                    if entry.get("event") == event:
                        self.seen.remove(entry)
                        return entry
                chunk = await self._stream.receive_some()
                assert chunk, f"the enclave exited before logging {event}"
                self._buffer += chunk
                *lines, self._buffer = self._buffer.split(b"\n")
                self.seen += [json.loads(line) for line in lines if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_process_links_serves_and_stops_cleanly(
    tmp_path: Path, stop: signal.Signals
) -> None:
    pki = shared_pki()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca_pem)
    sim_dir = tmp_path / "sim"
    platform = SimulatedPlatform.create(sim_dir)
    policy = enclave_policy(pki, platform)
    custodian = FakeCustodian(pki, policy, heartbeat_interval=0.5)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(custodian.serve)
        command = [
            sys.executable, "-m", "drm_enclave", "serve",
            "--custodian", f"{HOST}:{port}",
            "--custodian-ca", str(ca),
            "--license", str(write_license(tmp_path / "license.json")),
            "--listen", f"{HOST}:0",
            "--attestation", "simulated",
            "--simulation-dir", str(sim_dir),
        ]  # fmt: skip
        process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
        try:
            assert process.stderr is not None
            logs = _StderrLines(process.stderr)
            ready = await logs.until("enclave_serving")
            assert ready["simulated"] is True
            assert ready["mr_enclave"] == policy.mr_enclave[0].hex()
            host, _, consumer_port = ready["consumer_address"].rpartition(":")

            session = await custodian.session()
            assert session.hello.license == LICENSE.hello_value()
            await session.send_model("tiny", tiny_model())
            await session.next(ModelLoaded)
            await session.grant(2, 2)
            await logs.until("custodian_link_up")
            async with consumer((host, int(consumer_port)), policy) as client:
                assert (await client.info()).state is EnclaveState.SERVING
                assert (await client.infer()).inferences_left == 1
            report = await session.next(UsageReport)
            await session.ack(report.seq, report.served_total)

            process.send_signal(stop)
            with trio.fail_after(TIMEOUT):
                code = await process.wait()
            assert code == 0
            drained = await logs.until("enclave_drained")
            assert drained["timed_out"] is False
            assert drained["unreported"] == 0
            await logs.until("enclave_stopped")
            assert not any(LICENSE.secret in json.dumps(entry) for entry in logs.seen)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        nursery.cancel_scope.cancel()


def test_help_lists_the_exit_statuses_and_measure_says_what_it_does() -> None:
    for argv in (["--help"], ["serve", "--help"], ["measure", "--help"]):
        done = _run(*argv)
        assert done.returncode == 0
        assert done.stdout.endswith(
            "exit status:\n"
            "  0  success (serve: stopped cleanly on SIGTERM or SIGINT)\n"
            "  1  the daemon failed at run time (a bug: the log says where)\n"
            "  2  bad command line or configuration, or a port serve cannot listen on\n"
        ), done.stdout
    measure = " ".join(_run("measure", "--help").stdout.split())
    assert (
        "print this build's measurements (MRENCLAVE, MRSIGNER); with --out, write the policy "
        "that accepts exactly this build, for the custodian's serve --policy and the "
        "consumers' --policy"
    ) in measure
    assert "--custodian-ca CA.pem the custodian's CA (ca.pem of drm_custodian init)" in measure


def test_serve_on_a_taken_port_exits_2_naming_it(tmp_path: Path) -> None:
    pki = shared_pki()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca_pem)
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run(
            "serve", "--custodian", "127.0.0.1:1", "--custodian-ca", str(ca),
            "--license", str(write_license(tmp_path / "license.json")),
            "--attestation", "simulated", "--simulation-dir", str(tmp_path / "sim"),
            "--listen", f"{HOST}:{port}",
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (failed,) = [json.loads(line) for line in done.stderr.splitlines() if "startup_failed" in line]
    assert failed["error_type"] == "ListenError"
    assert failed["error"] == (
        f"cannot listen for consumers on {HOST}:{port}: another program already listens "
        "there (is this daemon running already?): stop it, or choose another --listen"
    )
