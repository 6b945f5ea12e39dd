"""One custodian per state directory (I16), between real processes.

A second ``drm_custodian serve`` on a state directory another custodian serves (with
ports of its own, so that only the lock can stop it) exits 2 at once, names the holder's
PID, and has touched nothing: the first serves on, and its enclave with it. Once the first
has stopped, the lock is free again: nothing stale is left to clean up.
"""

from __future__ import annotations

from drm_lab.deployment import Lab
from drm_lab.models import tiny_model
from drm_lab.processes import python_command, run_command


def test_a_second_custodian_on_one_state_directory_exits_2_naming_the_first(lab: Lab) -> None:
    tiny = lab.write_model("tiny", tiny_model())
    first = lab.start_custodian([tiny], initial=4, lease=2)
    enclave = lab.start_enclave(lab.custodian_port)
    second_argv = list(first.argv)
    second_argv[second_argv.index("--port") + 1] = "0"  # other ports: only the lock stops it

    refused = run_command(second_argv, cwd=lab.workdir, check=False)

    assert refused.returncode == 2, refused.lines()
    assert refused.stderr.strip() == (
        f"error: process {first.process.pid} already runs a custodian on this state "
        "directory; stop it first (two custodians on one ledger would lend one license "
        f"twice) (in {lab.state_dir})"
    )
    assert "custodian_listening" not in refused.stderr
    assert first.process.poll() is None
    assert enclave.daemon.find("custodian_link_down") is None
    assert lab.usage()["instances"] == 1

    lab.stop_all()
    again = lab.restart_custodian()  # the lock went with the process: nothing stale
    assert again.process.poll() is None


def test_init_on_a_served_state_directory_changes_nothing(lab: Lab) -> None:
    tiny = lab.write_model("tiny", tiny_model())
    lab.start_custodian([tiny], initial=1)
    init = python_command("drm_custodian", "init", "--state-dir", lab.state_dir)

    refused = run_command(init, cwd=lab.workdir, check=False)

    assert refused.returncode == 2, refused.lines()
    assert refused.stderr.startswith("error: state directory already initialised ("), refused
