"""``drm_enclave serve|check-config --config FILE.toml``: keys, precedence, errors, a real run.

The shared rules (file limits, types, path resolution) are pinned in
``tests/daemon/test_config_file.py``; here, the enclave's keys and validators, that flags
beat the file (a Gramine manifest's argv beats a host-provided file), what
``check-config`` reads and reports, the example in ``deploy/config``, and one daemon
started from a configuration file alone against a fake custodian.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
import trio

from drm_enclave import cli
from drm_enclave.cli import EXIT_OK, EXIT_USAGE, main
from drm_lab.models import tiny_model
from drm_lab.processes import python_command, start_daemon
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.messages import ModelLoaded
from tests.daemon.hostile_files import HOSTILE_FILES
from tests.enclave.enclave_fakes import (
    HOST,
    LICENSE,
    FakeCustodian,
    enclave_policy,
    shared_pki,
    write_license,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config" / "enclave.toml"
KEYS = (
    "custodian, custodian_ca, license, listen, attestation, simulation_dir, pccs_url, pccs_ca, "
    "intra_op_threads, max_model_mib, return_timeout, log_level, max_connections, max_handshakes, "
    "max_in_flight, max_parked_per_connection, frame_timeout, min_transfer_rate, payload_budget, "
    "connection_share"
)


@dataclass(frozen=True)
class Files:
    root: Path
    ca: Path
    license: Path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(shared_pki().ca_pem)
    return Files(tmp_path, ca, write_license(tmp_path / "borrower.license.json"))


def _config(files: Files, *lines: str, name: str = "enclave.toml") -> Path:
    """The three required keys (unless ``lines`` set them), then ``lines``."""
    required = [f'custodian = "{HOST}:7000"', 'custodian_ca = "ca.pem"']
    required += ['license = "borrower.license.json"']
    given = {line.partition(" ")[0] for line in lines}
    text = [line for line in required if line.partition(" ")[0] not in given] + list(lines)
    path = files.root / name
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def _run(*argv: str) -> tuple[int, str, list[str]]:
    """Exit status, stdout, and the ``error`` of every ``configuration_error`` logged."""
    out = io.StringIO()
    with structlog.testing.capture_logs() as logs:
        status = main(list(argv), out=out)
    errors = [e["error"] for e in logs if e["event"] == "configuration_error"]
    return status, out.getvalue(), errors


def test_check_config_reports_every_value_and_where_it_came_from(files: Files) -> None:
    config = _config(files, 'listen = "0.0.0.0:9924"', 'attestation = "simulated"',
                     'simulation_dir = "sim"', "intra_op_threads = 4",
                     "max_parked_per_connection = 4")  # fmt: skip
    status, out, errors = _run("check-config", "--config", str(config), "--intra-op-threads", "2",
                               "--payload-budget", "512")  # fmt: skip
    assert (status, errors) == (EXIT_OK, [])
    assert out.splitlines() == [
        f"configuration OK: {config}",
        f"  custodian = {HOST}:7000  (config file)",
        f"  custodian_ca = {files.ca}  (config file)",
        f"  license = {files.license}  (config file)",
        "  listen = 0.0.0.0:9924  (config file)",
        "  attestation = simulated  (config file)",
        f"  simulation_dir = {files.root / 'sim'}  (config file)",
        "  pccs_url = None  (default)",
        "  pccs_ca = None  (default)",
        "  intra_op_threads = 2  (command line)",
        "  max_model_mib = 2048  (default)",
        "  return_timeout = 5  (default)",
        "  log_level = info  (default)",
        "  max_connections = 256  (default)",
        "  max_handshakes = 64  (default)",
        "  max_in_flight = 64  (default)",
        "  max_parked_per_connection = 4  (config file)",
        "  frame_timeout = 30  (default)",
        "  min_transfer_rate = 256  (default)",
        "  payload_budget = 512  (command line)",
        "  connection_share = 72  (default)",
        f"  custodian CA: {shared_pki().ca_cert.subject.rfc4514_string()}",
        f"  license: {LICENSE.license_id} (borrower {LICENSE.borrower})",
    ]
    assert LICENSE.secret not in out


@pytest.mark.parametrize(
    ("lines", "flags", "message"),
    [
        (["payload_budget = 70"], [], "per-connection share"),
        (["payload_budget = 0"], [], "payload_budget"),
        (["max_handshakes = 0"], [], "max_handshakes"),
        (["connection_share = 65"], [], "must be from 66"),
        (["connection_share = 80"], ["--payload-budget", "72"], "per-connection share"),
    ],
)
def test_limits_out_of_range_are_configuration_errors(
    files: Files, lines: list[str], flags: list[str], message: str
) -> None:
    """I17: every consumer-port limit is checked before the daemon starts."""
    config = _config(files, *lines)
    status, _, errors = _run("check-config", "--config", str(config), *flags)
    assert status == 2
    assert message in " ".join(errors)


def test_the_command_line_beats_a_host_provided_file(files: Files, tmp_path: Path) -> None:
    """What a Gramine manifest fixes in argv stays fixed, whatever the file says."""
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    shutil.copy(files.ca, pinned / "ca.pem")
    config = _config(files, 'attestation = "simulated"', 'simulation_dir = "sim"')
    status, out, _ = _run(
        "check-config", "--config", str(config),
        "--attestation", "gramine", "--custodian-ca", str(pinned / "ca.pem"),
    )  # fmt: skip
    assert status == EXIT_OK
    lines = out.splitlines()
    assert "  attestation = gramine  (command line)" in lines
    assert f"  custodian_ca = {pinned / 'ca.pem'}  (command line)" in lines
    assert "  listen = 127.0.0.1:9924  (default)" in lines


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("bogus = 1", f"unknown key; allowed: {KEYS} (in {{f}} at 'bogus')"),
        ('custodian = "nohost"', "expected HOST:PORT, got 'nohost' (in {f} at 'custodian')"),
        ("custodian = 7000", "must be a string, not an integer (in {f} at 'custodian')"),
        ('listen = "127.0.0.1:70000"', "port 70000 is out of range (0-65535) (in {f} at 'listen')"),
        ('attestation = "sgx"',
         "must be one of: auto, gramine, simulated; got 'sgx' (in {f} at 'attestation')"),
        ("intra_op_threads = 0", "must be from 1 to 64, not 0 (in {f} at 'intra_op_threads')"),
        ("return_timeout = 0", "must be from 1 to 300, not 0 (in {f} at 'return_timeout')"),
        ("return_timeout = 301",
         "must be from 1 to 300, not 301 (in {f} at 'return_timeout')"),
        ("return_timeout = 2.5",
         "must be an integer, not a float (in {f} at 'return_timeout')"),
        ('log_level = "verbose"',
         "must be one of: debug, info, warning, error; got 'verbose' (in {f} at 'log_level')"),
        ('intra_op_threads = "2"',
         "must be an integer, not a string (in {f} at 'intra_op_threads')"),
        ("simulation_dir = true",
         "must be a path (a string), not a boolean (in {f} at 'simulation_dir')"),
        ('attestation = "simulated"',
         "--attestation simulated needs --simulation-dir (at 'simulation_dir')"),
        ('pccs_url = "http://pccs.example:8081"',
         "PCCS URL must be https://host[:port], not 'http://pccs.example:8081' "
         "(in {f} at 'pccs_url')"),
        ('pccs_ca = "ca.pem"', "--pccs-ca needs --pccs-url (at 'pccs_ca')"),
        ('pccs_url = "https://pccs.example:8081"\npccs_ca = "missing.pem"',
         "cannot read the PCCS CA (in {d}/missing.pem at 'pccs_ca')"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_bad_values_stop_start_up(files: Files, command: str, line: str, message: str) -> None:
    config = _config(files, line)
    assert _run(command, "--config", str(config)) == (
        EXIT_USAGE,
        "",
        [message.format(f=config, d=files.root)],
    )


def test_a_required_value_missing_from_both_says_where_to_give_it(files: Files) -> None:
    config = files.root / "partial.toml"
    config.write_text('custodian_ca = "ca.pem"\nlicense = "l.json"\n', encoding="utf-8")
    assert _run("serve", "--config", str(config)) == (
        EXIT_USAGE,
        "",
        [f"missing: give --custodian, or set custodian in {config} (at 'custodian')"],
    )


def test_check_config_reads_the_files_it_names(files: Files) -> None:
    config = _config(files)
    files.ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    assert _run("check-config", "--config", str(config)) == (
        EXIT_USAGE,
        "",
        [f"the custodian CA is not a PEM certificate (in {files.ca})"],
    )
    files.ca.unlink()
    assert _run("check-config", "--config", str(config))[2] == [
        f"cannot read the custodian CA: No such file or directory (in {files.ca})"
    ]
    other_ca = files.root / "other-ca.pem"
    other_ca.write_bytes(shared_pki().ca_pem)
    files.license.write_text('{"format": "drm-license"}', encoding="utf-8")
    other = _config(files, 'custodian_ca = "other-ca.pem"', name="other.toml")
    assert _run("check-config", "--config", str(other))[2] == [
        f"missing or invalid (in {files.license} at 'borrower')"
    ]


def test_return_timeout_reaches_the_enclave_config(files: Files) -> None:
    """``return_timeout`` from the file, then from a flag that wins over it."""
    config = _config(files, "return_timeout = 12")
    for argv, expected in (([], 12.0), (["--return-timeout", "3"], 3.0)):
        args = cli._parser().parse_args(["serve", "--config", str(config), *argv])
        enclave = cli._enclave_config(args.schema.resolve(args))
        assert enclave.return_timeout == expected


def test_the_deploy_example_passes_once_its_paths_exist(files: Files, tmp_path: Path) -> None:
    """``deploy/config/enclave.toml`` with its product paths pointed at real files."""
    etc = tmp_path / "etc-drm-enclave"
    etc.mkdir()
    shutil.copy(files.ca, etc / "custodian-ca.pem")
    shutil.copy(files.license, etc / "borrower.license.json")
    text = EXAMPLE.read_text(encoding="utf-8")
    assert "/etc/drm-enclave/borrower.license.json" in text
    config = tmp_path / "enclave.toml"
    config.write_text(text.replace("/etc/drm-enclave", str(etc)), encoding="utf-8")
    status, out, errors = _run("check-config", "--config", str(config))
    assert (status, errors) == (EXIT_OK, [])
    assert f"  license = {etc / 'borrower.license.json'}  (config file)" in out.splitlines()


@pytest.mark.slow
async def test_serve_from_a_config_file_alone(files: Files) -> None:
    """No flag but ``--config``: the enclave dials, attests, loads, serves and stops."""
    platform = SimulatedPlatform.create(files.root / "sim")
    custodian = FakeCustodian(shared_pki(), enclave_policy(shared_pki(), platform))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(custodian.serve)
        config = files.root / "enclave.toml"
        config.write_text(
            f'custodian = "{HOST}:{port}"\ncustodian_ca = "ca.pem"\n'
            'license = "borrower.license.json"\nlisten = "127.0.0.1:0"\n'
            'attestation = "simulated"\nsimulation_dir = "sim"\nintra_op_threads = 1\n',
            encoding="utf-8",
        )
        daemon = start_daemon(
            "enclave", python_command("drm_enclave", "serve", "--config", config), cwd=files.root
        )
        try:
            serving = await trio.to_thread.run_sync(daemon.wait_for, "enclave_serving")
            assert serving["consumer_address"].startswith("127.0.0.1:")
            assert serving["custodian"] == f"{HOST}:{port}"
            session = await custodian.session()
            assert session.hello.license == LICENSE.hello_value()
            await session.send_model("tiny", tiny_model())
            await session.next(ModelLoaded)
            await session.grant(2, 2)
            up = await trio.to_thread.run_sync(daemon.wait_for, "custodian_link_up")
            assert up["models"] == ["tiny"]
        finally:
            status = await trio.to_thread.run_sync(daemon.stop)
        assert status == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("content", "message"), HOSTILE_FILES)
@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_hostile_files_are_usage_errors(
    tmp_path: Path, command: str, content: bytes, message: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(content)
    assert _run(command, "--config", str(config)) == (EXIT_USAGE, "", [f"{message} (in {config})"])
