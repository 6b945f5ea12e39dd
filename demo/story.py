"""The demo's six steps: what each one runs, says, and checks.

:class:`Demo` has one method per step. Each shows the commands it runs (through
:class:`~drm_lab.transcript.Shell`), narrates in a few lines what they do and why, and checks that
what happened is what the narration says: an exit status, a line of output, a daemon's
log event. The first thing that does not match raises :class:`~drm_lab.processes.Deviation`;
``run.py`` reports it and stops everything.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from covidnet import DEFAULT_WEIGHTS_MB, IMAGE_FILE, MODEL_FILE

from drm_lab.processes import CommandResult, Daemon, Deviation, python_command
from drm_lab.transcript import Shell, wrap

__all__ = ["INTRO", "STEPS", "Demo"]

STEPS: Final = 6
INITIAL_INFERENCES: Final = 3
SUPPLIED: Final = 5
LOOPBACK: Final = "127.0.0.1"
#: The consumer's exit status when the enclave cannot reach its custodian.
EXIT_CUSTODIAN: Final = 5

STATE_DIR: Final = "custodian-state"
CA_FILE: Final = f"{STATE_DIR}/ca.pem"
TOKEN_FILE: Final = f"{STATE_DIR}/admin.token"
LICENSE_FILE: Final = f"{STATE_DIR}/handoff/borrower.license.json"
SIMULATION_DIR: Final = "simulated-platform"
POLICY_FILE: Final = "policy.toml"
MODEL_NAME: Final = MODEL_FILE.removesuffix(".onnx")
COVIDNET_SCRIPT: Final = Path(__file__).resolve().with_name("covidnet.py")

_LEFT: Final = re.compile(r"^Inferences left: (\d+)$", re.MULTILINE)
_SERVED: Final = re.compile(r"^served\s+(\d+)$", re.MULTILINE)
_WAITING: Final = "No inferences left: waiting for the custodian"

INTRO: Final = """\
Model DRM demo: a model owner lends a model to an enclave, meters every inference and
cuts access, with the three real programs running on this machine.

SIMULATION MODE: there is no SGX hardware here. The enclave's attestation comes from a
simulated platform made in the work directory, which only this demo's policy trusts. It
shows the protocol at work; it protects nothing. Never trust simulation in production.
"""


def _inferences(count: int) -> str:
    return f"{count} inference" if count == 1 else f"{count} inferences"


def _left(text: str) -> int | None:
    """The ``Inferences left: N`` a query printed, or ``None``."""
    found = _LEFT.search(text)
    return None if found is None else int(found.group(1))


@dataclass
class Demo:
    """The story, one method per step; each checks what it narrates."""

    shell: Shell
    timeout: float
    weights_mb: float
    ports: tuple[int, int, int]  # enclave link, admin API, consumer (0: any free port)
    step: int = 0
    title: str = ""
    mr_enclave: str = ""
    admin_port: int = 0
    consumer_port: int = 0
    custodian: Daemon | None = None
    enclave: Daemon | None = None
    waiting: Daemon | None = None

    # --- narration ------------------------------------------------------------------

    def begin(self, title: str, *narration: str) -> None:
        self.step += 1
        self.title = title
        self.shell.say()
        self.shell.say(f"[{self.step}/{STEPS}] {title}")
        for line in narration:
            self.shell.say(f"  {line}")

    def ok(self, what: str) -> None:
        self.shell.say(f"  ok: {what}")

    def note(self, what: str) -> None:
        self.shell.say(f"  {what}")

    @staticmethod
    def expect(condition: bool, expected: str, happened: str, output: Sequence[str] = ()) -> None:
        if not condition:
            raise Deviation(expected, happened, output)

    def succeeded(self, done: CommandResult, what: str) -> None:
        self.expect(
            done.returncode == 0, what, f"it exited with status {done.returncode}", done.lines()
        )

    # --- the steps ------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        self.make_model()
        self.start_daemons()
        self.use_the_quota()
        self.supply()
        self.cut_access()

    def setup(self) -> None:
        self.begin(
            "The model owner initialises the custodian and measures the enclave build",
            "`init` makes the custodian's state directory: its CA, TLS certificate, admin",
            "token, ledger, and the license file to hand to the borrower. `measure` computes",
            "the enclave build's MRENCLAVE and writes the policy that the custodian and every",
            "consumer use to accept exactly that build.",
        )
        done = self.shell.run(
            python_command("drm_custodian", "init", "--state-dir", STATE_DIR),
            self.timeout,
            show_stderr=False,
        )
        self.succeeded(done, "drm_custodian init to succeed")
        for name in (CA_FILE, TOKEN_FILE, LICENSE_FILE):
            path = self.shell.workdir / name
            self.expect(path.is_file(), f"init to write {name}", "it is missing")
        done = self.shell.run(
            python_command(
                "drm_enclave", "measure", "--custodian-ca", CA_FILE,
                "--simulation-dir", SIMULATION_DIR, "--out", POLICY_FILE,
            ),
            self.timeout,
            show_stderr=False,
        )  # fmt: skip
        self.succeeded(done, "drm_enclave measure to succeed")
        found = re.search(r"^MRENCLAVE ([0-9a-f]{64})", done.stdout, re.MULTILINE)
        self.expect(found is not None, "measure to print the MRENCLAVE", "it did not", done.lines())
        assert found is not None
        self.mr_enclave = found.group(1)
        policy = self.shell.workdir / POLICY_FILE
        self.expect(policy.is_file(), f"measure to write {POLICY_FILE}", "it is missing")
        self.ok(f"custodian initialised; {POLICY_FILE} accepts MRENCLAVE {self.mr_enclave[:16]}...")

    def make_model(self) -> None:
        self.begin(
            "A COVID-Net-shaped model and a synthetic chest X-ray",
            "The model has COVID-Net CXR-2's interface (input float32 1x480x480x3, a two-class",
            "softmax out) but it is UNTRAINED: deterministic random weights, so its",
            '"probability of COVID positivity" means nothing. The image is drawn, not a scan.',
        )
        argv: list[str] = [sys.executable, str(COVIDNET_SCRIPT), "--out-dir", "."]
        if self.weights_mb != DEFAULT_WEIGHTS_MB:
            argv += ["--weights-mb", f"{self.weights_mb:g}"]
        done = self.shell.run(argv, self.timeout)
        self.succeeded(done, "the model and the image to be written")
        for name in (MODEL_FILE, IMAGE_FILE):
            self.expect((self.shell.workdir / name).is_file(), f"{name} to exist", "it does not")
        self.ok(f"{MODEL_FILE} and {IMAGE_FILE} written")

    def start_daemons(self) -> None:
        self.begin(
            f"The custodian starts with {INITIAL_INFERENCES} inferences; the enclave starts, "
            "is attested and receives the model",
            "Both daemons run in the background (each would have its own terminal). Port 0",
            "lets the system pick free ports; without --port, --admin-port and --listen the",
            "programs use 7000 (enclave link), 6000 (admin API) and 9924 (consumers).",
        )
        link_port, admin_port, consumer_port = self.ports
        self.custodian = custodian = self.shell.start(
            "custodian",
            python_command(
                "drm_custodian", "serve", "--state-dir", STATE_DIR, "--upload", MODEL_FILE,
                "--policy", POLICY_FILE, "--initial-inferences", str(INITIAL_INFERENCES),
                "--port", str(link_port), "--admin-port", str(admin_port),
            ),
        )  # fmt: skip
        listening = custodian.wait_for(
            "custodian_listening", expected="the custodian to start listening", timeout=self.timeout
        )
        link, admin = listening["enclave_address"], listening["admin_address"]
        self.admin_port = int(admin.rpartition(":")[2])
        self.note(f"custodian: enclave link on {link}, admin API on {admin}")
        self.enclave = enclave = self.shell.start(
            "enclave",
            python_command(
                "drm_enclave", "serve", "--custodian", link, "--custodian-ca", CA_FILE,
                "--license", LICENSE_FILE, "--attestation", "simulated",
                "--simulation-dir", SIMULATION_DIR, "--listen", f"{LOOPBACK}:{consumer_port}",
            ),
        )  # fmt: skip
        serving = enclave.wait_for(
            "enclave_serving", expected="the enclave to start", timeout=self.timeout
        )
        self.consumer_port = int(str(serving["consumer_address"]).rpartition(":")[2])
        self.note(f"enclave: consumers welcome on {serving['consumer_address']} (SIMULATED)")
        attested = custodian.wait_for(
            "enclave_attested",
            expected="the custodian to verify the enclave's attestation",
            timeout=self.timeout,
        )
        self.expect(
            attested.get("mr_enclave") == self.mr_enclave,
            f"the enclave to run as the measured MRENCLAVE {self.mr_enclave}",
            f"it runs as {attested.get('mr_enclave')}",
        )
        self.note(f"custodian: enclave attested, MRENCLAVE {self.mr_enclave[:16]}... (simulated)")
        delivered = custodian.wait_for(
            "model_delivered", expected="the custodian to send the model", timeout=self.timeout
        )
        self.note(
            f"custodian: model {delivered.get('model')} sent, "
            f"{int(delivered.get('size', 0)) / 1e6:.1f} MB in {delivered.get('seconds')} s"
        )
        up = enclave.wait_for(
            "custodian_link_up", expected="the enclave to load the model", timeout=self.timeout
        )
        self.expect(
            up.get("inferences_left") == INITIAL_INFERENCES and up.get("models") == [MODEL_NAME],
            f"the enclave to serve {MODEL_NAME} with {INITIAL_INFERENCES} inferences",
            f"it serves {up.get('models')} with {up.get('inferences_left')}",
        )
        self.ok(f"the enclave serves {MODEL_NAME} with {INITIAL_INFERENCES} inferences left")

    def _query_argv(self) -> list[str]:
        return python_command(
            "drm_consumer", "query", "--address", LOOPBACK, "--port", str(self.consumer_port),
            "--input", IMAGE_FILE, "--policy", POLICY_FILE,
        )  # fmt: skip

    def use_the_quota(self) -> None:
        self.begin(
            "The consumer queries three times; the fourth query waits",
            "Each query verifies the enclave's attestation against the policy before it",
            "sends the image, then shows the prediction and the inferences left.",
        )
        for expected in range(INITIAL_INFERENCES - 1, -1, -1):
            done = self.shell.run(self._query_argv(), self.timeout)
            self.succeeded(done, "the query to be answered")
            left = _left(done.stdout)
            self.expect(
                left == expected,
                f"{expected} inferences left",
                f"the query printed {left}",
                done.lines(),
            )
            self.ok(f"answered; {_inferences(expected)} left")
        self.waiting = waiting = self.shell.start("fourth query", self._query_argv())
        waiting.wait_for_line(_WAITING, expected="the fourth query to wait", timeout=self.timeout)
        self.shell.show_output(waiting.lines)
        self.expect(waiting.process.poll() is None, "the query to wait", "it exited")
        self.ok("no inferences left: the fourth query waits for the custodian")

    def supply(self) -> None:
        self.begin(
            f"The operator supplies {SUPPLIED} inferences; the waiting query completes",
            "This is the admin API call an operator makes with curl: HTTPS verified with the",
            "custodian's CA, the admin token as a bearer token. (`python -m drm_custodian",
            f"supply --state-dir {STATE_DIR} {SUPPLIED}` does the same.)",
        )
        url = f"https://{LOOPBACK}:{self.admin_port}/supply_inferences"
        tokens = [
            "curl", "--cacert", CA_FILE,
            "-H", f'"Authorization: Bearer $(cat {TOKEN_FILE})"',
            "-d", f"number_inferences={SUPPLIED}", url,
        ]  # fmt: skip
        command = " ".join(tokens)
        curl = shutil.which("curl")
        sh = shutil.which("sh")
        if curl is not None and sh is not None:
            done = self.shell.run(
                [sh, "-c", command], self.timeout, shown=wrap(tokens, "  "), show_stderr=False
            )
        else:
            self.shell.say(wrap(tokens, "  "))
            self.note("(curl is not installed here: the demo sends the same request from Python)")
            done = _supply_frompython_command(self.shell.workdir, self.admin_port, self.timeout)
            self.shell.show_output(done.lines())
        self.succeeded(done, "the supply call to succeed")
        try:
            answer = json.loads(done.stdout)
        except ValueError:
            answer = None
        self.expect(
            isinstance(answer, dict) and answer.get("added") == SUPPLIED,
            f'the admin API to answer "added": {SUPPLIED}',
            "it answered something else",
            done.lines(),
        )
        waiting = self.waiting
        assert waiting is not None
        shown = len(waiting.lines)
        status = waiting.wait_exit(self.timeout, expected="the waiting query to complete")
        self.note("the waiting query:")
        self.shell.show_output(waiting.lines[shown:])
        left = _left("\n".join(waiting.lines))
        self.expect(
            status == 0 and left == SUPPLIED - 1,
            f"the query to succeed with {SUPPLIED - 1} inferences left",
            f"it exited with status {status}, {left} left",
            waiting.lines,
        )
        self.ok(f"the waiting query completed; {SUPPLIED - 1} inferences left")

    def cut_access(self) -> None:
        served = INITIAL_INFERENCES + 1
        self.begin(
            f"The ledger shows {served} served; the custodian stops; the next query fails",
            "The custodian records every inference the enclave reports. When it stops (or",
            "blocks the borrower) the enclave refuses every request at once: the kill switch.",
        )
        custodian, enclave = self.custodian, self.enclave
        assert custodian is not None
        assert enclave is not None
        custodian.wait_for(
            "consumption_report",
            expected=f"the custodian to record {served} inferences",
            timeout=self.timeout,
            check=lambda e: int(e.get("borrower_served", 0)) >= served,
        )
        done = self.shell.run(
            python_command(
                "drm_custodian", "usage", "--state-dir", STATE_DIR,
                "--admin-port", str(self.admin_port),
            ),
            self.timeout,
            show_stderr=False,
        )  # fmt: skip
        self.succeeded(done, "the usage call to succeed")
        found = _SERVED.search(done.stdout)
        count = None if found is None else int(found.group(1))
        self.expect(count == served, f"{served} served", f"usage shows {count}", done.lines())
        self.ok(f"{served} served, as the ledger recorded them")
        self.note("(granted counts what was lent to the enclave; in_doubt, what it still holds")
        self.note("unused: charged to the borrower until it is reported served.)")

        self.shell.say(f"  $ kill -TERM {custodian.process.pid}    # Ctrl-C in its terminal")
        custodian.terminate()
        status = custodian.wait_exit(self.timeout, expected="the custodian to stop")
        self.expect(status == 0, "the custodian to stop cleanly", f"it exited with {status}")
        enclave.wait_for(
            "custodian_link_down",
            expected="the enclave to notice the custodian is gone",
            timeout=self.timeout,
        )
        self.ok("the custodian stopped; the enclave lost its link")
        done = self.shell.run(self._query_argv(), self.timeout)
        self.expect(
            done.returncode == EXIT_CUSTODIAN and "custodian_unreachable" in done.stdout,
            f"the query to fail with custodian_unreachable (exit status {EXIT_CUSTODIAN})",
            f"it exited with status {done.returncode}",
            done.lines(),
        )
        self.ok(
            f"refused: custodian unreachable (exit status {EXIT_CUSTODIAN}); "
            "no custodian, no inference"
        )
        self.shell.say(f"  $ kill -TERM {enclave.process.pid}    # the enclave, likewise")
        enclave.terminate()
        status = enclave.wait_exit(self.timeout, expected="the enclave to stop")
        self.expect(status == 0, "the enclave to stop cleanly", f"it exited with {status}")


def _supply_frompython_command(workdir: Path, port: int, timeout: float) -> CommandResult:
    """The curl call's equivalent: the same HTTPS request, verified with the same CA."""
    token = (workdir / TOKEN_FILE).read_text(encoding="ascii").strip()
    context = ssl.create_default_context(cafile=str(workdir / CA_FILE))
    conn = http.client.HTTPSConnection(LOOPBACK, port, timeout=timeout, context=context)
    try:
        conn.request(
            "POST",
            "/supply_inferences",
            body=f"number_inferences={SUPPLIED}",
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
    except OSError as exc:
        return CommandResult([], 1, "", f"the request failed: {exc}")
    finally:
        conn.close()
    return CommandResult([], 0 if response.status == 200 else 1, body, "")
