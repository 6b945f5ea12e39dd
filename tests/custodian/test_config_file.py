"""``drm_custodian serve|check-config --config FILE.toml``: keys, precedence, errors, a real run.

The shared rules (file limits, types, path resolution) are pinned in
``tests/daemon/test_config_file.py``; here, the custodian's keys and validators, what
``check-config`` reads and reports, the example in ``deploy/config``, and one daemon
started from a configuration file alone.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from drm_custodian.cli import EXIT_CONFIG, EXIT_OK, main
from drm_lab.admin import AdminApi
from drm_lab.models import tiny_model
from drm_lab.processes import python_command, start_daemon
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.limits import MAX_GRANT_UNITS
from tests.daemon.hostile_files import HOSTILE_FILES
from tests.simulation import simulation_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config" / "custodian.toml"
MR_ENCLAVE = hashlib.sha256(b"drm custodian config tests: enclave").digest()
N = MAX_GRANT_UNITS
KEYS = (
    "state_dir, upload, policy, collateral, pccs_url, pccs_ca, address, port, admin_port, "
    "initial_inferences, lease, log_level, max_links, max_link_handshakes, reclaim_margin, "
    "link_budget, link_frame_timeout, models"
)


@dataclass(frozen=True)
class Files:
    root: Path
    state: Path
    model: Path
    policy: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("custodian-config")
    state = root / "state"
    assert (
        main(["init", "--state-dir", str(state), "--borrower", "acme"], stdout=io.StringIO()) == 0
    )
    platform = SimulatedPlatform.create(root / "platform")
    simulation_policy(platform, MR_ENCLAVE).write(root / "policy.toml")
    (root / "tiny.onnx").write_bytes(tiny_model())
    return Files(root, state, root / "tiny.onnx", root / "policy.toml")


def _config(path: Path, files: Files, **extra: object) -> Path:
    """A complete file naming ``files`` (relative to ``path``'s directory where it can)."""
    lines = [
        f'state_dir = "{files.state}"',
        f'upload = ["{files.model}"]',
        f'policy = "{files.policy}"',
    ]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_check_config_reports_every_value_and_where_it_came_from(
    files: Files, tmp_path: Path
) -> None:
    config = _config(tmp_path / "c.toml", files, port=7100, lease=50)
    status, out, err = _run("check-config", "--config", str(config), "--port", "7200")
    assert (status, err) == (EXIT_OK, "")
    sha = hashlib.sha256(tiny_model()).hexdigest()
    assert out.splitlines() == [
        f"configuration OK: {config}",
        f"  state_dir = {files.state}  (config file)",
        f"  upload = {files.model}  (config file)",
        f"  policy = {files.policy}  (config file)",
        "  collateral =   (default)",
        "  pccs_url = (none)  (default)",
        "  pccs_ca = (none)  (default)",
        "  address = 127.0.0.1  (default)",
        "  port = 7200  (command line)",
        "  admin_port = 6000  (default)",
        "  initial_inferences = 0  (default)",
        "  lease = 50  (config file)",
        "  log_level = info  (default)",
        "  max_links = 4096  (default)",
        "  max_link_handshakes = 256  (default)",
        "  reclaim_margin = 60  (default)",
        "  link_budget = 128  (default)",
        "  link_frame_timeout = 30  (default)",
        "  models = (none)  (default)",
        "  borrower managed: acme",
        f"  model tiny: {len(tiny_model())} bytes, sha256 {sha}",
        # No terms given: the defaults, made explicit, max_batch lowered to half the lease.
        "    terms: unit=item max_batch=25 x=[1..25]x4; largest request costs 25",
    ]


def test_relative_paths_are_the_file_directory_s(files: Files) -> None:
    config = files.root / "relative.toml"
    config.write_text(
        'state_dir = "state"\nupload = ["tiny.onnx"]\npolicy = "policy.toml"\n', encoding="utf-8"
    )
    status, out, err = _run("check-config", "--config", str(config))
    assert (status, err) == (EXIT_OK, "")
    assert f"  upload = {files.model}  (config file)" in out.splitlines()


def test_check_config_needs_a_file() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["check-config"], stderr=io.StringIO())
    assert caught.value.code == EXIT_CONFIG


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"bogus": 1}, f"unknown key; allowed: {KEYS} (in {{f}} at 'bogus')"),
        ({"port": '"7000"'}, "must be an integer, not a string (in {f} at 'port')"),
        ({"port": 65536}, "port 65536 is out of range (0-65535) (in {f} at 'port')"),
        ({"admin_port": -1}, "not a port number: '-1' (in {f} at 'admin_port')"),
        ({"lease": 0}, f"lease must be an integer between 1 and {N} (in {{f}} at 'lease')"),
        ({"initial_inferences": N + 1},
         f"must be between 0 and {N}, got {N + 1} (in {{f}} at 'initial_inferences')"),
        ({"address": "[1, 2]"}, "must be a string, not an array (in {f} at 'address')"),
        ({"reclaim_margin": -5}, "must be from 0 to 86400 (seconds), not -5 "
                                 "(in {f} at 'reclaim_margin')"),
        ({"link_budget": 8}, "must be from 66 to 1000000 (MiB), not 8 (in {f} at 'link_budget')"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_bad_values_stop_start_up(
    files: Files, tmp_path: Path, command: str, extra: dict[str, object], message: str
) -> None:
    config = _config(tmp_path / "c.toml", files, **extra)
    assert _run(command, "--config", str(config)) == (
        EXIT_CONFIG,
        "",
        f"error: {message.format(f=config)}\n",
    )


def test_a_required_value_missing_from_both_says_where_to_give_it(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('state_dir = "s"\nupload = ["m.onnx"]\n', encoding="utf-8")
    assert _run("serve", "--config", str(config)) == (
        EXIT_CONFIG,
        "",
        f"error: missing: give --policy, or set policy in {config} (at 'policy')\n",
    )
    assert _run("serve", "--upload", "m.onnx") == (
        EXIT_CONFIG,
        "",
        "error: missing: give --state-dir, or set state_dir in a --config file (at 'state_dir')\n",
    )


def test_check_config_reads_the_files_it_names(files: Files, tmp_path: Path) -> None:
    config = _config(tmp_path / "c.toml", files)
    missing = tmp_path / "missing.onnx"
    _, _, err = _run("check-config", "--config", str(config), "--upload", str(missing))
    assert err == f"error: cannot read model: No such file or directory (in {missing})\n"

    bad_policy = tmp_path / "policy.toml"
    bad_policy.write_text("[enclave]\nbogus = 1\n", encoding="utf-8")
    status, _, err = _run("check-config", "--config", str(config), "--policy", str(bad_policy))
    assert (status, err) == (
        EXIT_CONFIG,
        f"error: unknown key (in {bad_policy} at 'enclave.bogus')\n",
    )

    no_state = tmp_path / "no-state"
    status, _, err = _run("check-config", "--config", str(config), "--state-dir", str(no_state))
    assert (status, err) == (
        EXIT_CONFIG,
        f"error: state directory does not exist (in {no_state})\n",
    )

    twin = tmp_path / "tiny.onnx"
    shutil.copy(files.model, twin)
    config = _config(tmp_path / "twins.toml", files)
    config.write_text(
        config.read_text().replace(f'["{files.model}"]', f'["{files.model}", "{twin}"]')
    )
    status, _, err = _run("check-config", "--config", str(config))
    assert (status, err) == (EXIT_CONFIG, "error: two models have the same name (at 'models')\n")


def test_the_deploy_example_passes_once_its_paths_exist(files: Files, tmp_path: Path) -> None:
    """``deploy/config/custodian.toml`` with its product paths pointed at real files."""
    state = tmp_path / "var-lib-drm-custodian"
    shutil.copytree(files.state, state)
    (state / "models").mkdir()
    shutil.copy(files.model, state / "models" / "model.onnx")
    etc = tmp_path / "etc-drm-custodian"
    etc.mkdir()
    shutil.copy(files.policy, etc / "enclave-policy.toml")
    text = EXAMPLE.read_text(encoding="utf-8")
    assert "/var/lib/drm-custodian" in text
    assert "/etc/drm-custodian/" in text
    text = text.replace("/var/lib/drm-custodian", str(state))
    text = text.replace("/etc/drm-custodian", str(etc))
    config = tmp_path / "custodian.toml"
    config.write_text(text, encoding="utf-8")
    status, out, err = _run("check-config", "--config", str(config))
    assert (status, err) == (EXIT_OK, "")
    assert "  address = 0.0.0.0  (config file)" in out.splitlines()
    assert "  model model: " in out


@pytest.mark.slow
def test_serve_from_a_config_file_alone(files: Files, tmp_path: Path) -> None:
    """No flag but ``--config``: the daemon listens where the file says, with its lease."""
    state = tmp_path / "state"
    shutil.copytree(files.state, state)
    config = tmp_path / "custodian.toml"
    config.write_text(
        f'state_dir = "state"\nupload = ["{files.model}"]\npolicy = "{files.policy}"\n'
        'address = "127.0.0.1"\nport = 0\nadmin_port = 0\ninitial_inferences = 5\nlease = 3\n',
        encoding="utf-8",
    )
    daemon = start_daemon(
        "custodian", python_command("drm_custodian", "serve", "--config", config), cwd=files.root
    )
    try:
        listening = daemon.wait_for("custodian_listening")
        assert listening["lease"] == 3
        assert listening["models"] == ["tiny"]
        assert listening["enclave_address"].startswith("127.0.0.1:")
        admin = AdminApi.from_state_dir(state, listening["admin_address"])
        assert admin.usage()["supplied"] == 5
    finally:
        status = daemon.stop()
    assert status == 0


@pytest.mark.parametrize(("content", "message"), HOSTILE_FILES)
@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_hostile_files_are_usage_errors(
    tmp_path: Path, command: str, content: bytes, message: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(content)
    assert _run(command, "--config", str(config)) == (
        EXIT_CONFIG,
        "",
        f"error: {message} (in {config})\n",
    )
