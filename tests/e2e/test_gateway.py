"""The Open Inference Protocol gateway against real daemons: standard clients, the DRM's
states as HTTP statuses, hostile HTTP, and re-attestation after the enclave restarts.

Every test here runs ``python -m drm_consumer gateway`` as a process in front of a real
enclave process linked to a real custodian (:mod:`drm_lab.deployment`), and speaks to it
with urllib, curl and Triton's own ``tritonclient`` (in a process of its own:
:mod:`drm_lab.triton`).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drm_consumer.gateway.app import MAX_BODY_BYTES
from drm_consumer.gateway.command import TOKEN_ENV
from drm_lab.deployment import Gateway, Lab
from drm_lab.models import failing_model, two_by_two_model
from drm_lab.processes import LOOPBACK, environment, python_command, run_command, start_daemon
from drm_wire.attestation.policy import Policy
from tests.e2e.conftest import daemons_missing
from tests.test_readme import ROOT, Block, _block, _commands

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

A = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.array([2, -3], dtype=np.int64)
#: What the pair model answers for A and B.
Y = A * B[:, None]
K = np.argmax(A, axis=1) + B
#: The enclave's default ``max_parked_per_connection`` (docs/production.md).
PARKED_PER_CONNECTION = 16
#: Bounds every poll of a state the daemons reach on their own.
SETTLE = 30.0


@dataclass
class Served:
    lab: Lab
    gateway: Gateway
    consumer_port: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One custodian lending ``pair`` and ``failing`` with plenty of inferences, one
    enclave, one gateway; shared by the tests that change no state of theirs."""
    missing = daemons_missing()
    if missing is not None:
        pytest.skip(missing)
    lab = Lab(tmp_path_factory.mktemp("gateway"))
    try:
        lab.prepare()
        models = [
            lab.write_model("pair", two_by_two_model()),
            lab.write_model("failing", failing_model()),
        ]
        lab.start_custodian(models, initial=1000)
        enclave = lab.start_enclave()
        yield Served(lab, lab.start_gateway(enclave.consumer_port), enclave.consumer_port)
    finally:
        lab.stop_all()


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _lower(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


def call(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Reply(response.status, _lower(response.headers.items()), response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, _lower(exc.headers.items()), exc.read())


def pair_request(**extra: Any) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": A.ravel().tolist()},
                {"name": "b", "shape": [2], "datatype": "INT64", "data": B.tolist()},
            ],
            **extra,
        }
    ).encode()


def binary_pair_request(
    a_size: int = A.nbytes, blob: bytes | None = None
) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [2, 4], "datatype": "FP32",
                 "parameters": {"binary_data_size": a_size}},
                {"name": "b", "shape": [2], "datatype": "INT64",
                 "parameters": {"binary_data_size": B.nbytes}},
            ],
            "outputs": [{"name": "k", "parameters": {"binary_data": True}}, {"name": "y"}],
        }
    ).encode()  # fmt: skip
    data = blob if blob is not None else A.tobytes() + B.tobytes()
    return header + data, {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


# --- standard clients ------------------------------------------------------------------


def test_json_and_binary_requests_with_urllib(served: Served) -> None:
    url = served.gateway.url
    assert call(f"{url}/v2/health/live").status == 200
    assert call(f"{url}/v2/health/ready").json() == {"ready": True, "reason": ""}
    assert call(f"{url}/v2/models/pair/ready").status == 200
    metadata = call(f"{url}/v2/models/pair").json()
    assert metadata["inputs"] == [
        {"name": "a", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "b", "datatype": "INT64", "shape": [-1]},
    ]
    assert metadata["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "k", "datatype": "INT64", "shape": [-1]},
    ]

    reply = call(f"{url}/v2/models/pair/infer", "POST", pair_request(id="j1"))
    assert reply.status == 200, reply.body
    document = reply.json()
    assert document["id"] == "j1"
    assert document["parameters"]["cost"] == 2
    y, k = document["outputs"]
    np.testing.assert_array_equal(np.array(y["data"], np.float32).reshape(2, 4), Y)
    assert (k["datatype"], k["shape"], k["data"]) == ("INT64", [2], K.tolist())

    body, headers = binary_pair_request()
    reply = call(f"{url}/v2/models/pair/versions/1/infer", "POST", body, headers)
    assert reply.status == 200, reply.body
    length = int(reply.headers["inference-header-content-length"])
    document = json.loads(reply.body[:length])
    k_entry, y_entry = document["outputs"]
    assert k_entry["parameters"] == {"binary_data_size": K.nbytes}
    assert np.frombuffer(reply.body[length:], np.int64).tolist() == K.tolist()
    assert y_entry["data"] == Y.ravel().tolist()
    left = document["parameters"]["inferences_left"]
    assert isinstance(left, int)
    assert left >= 0


@pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None,
    reason="tritonclient[http] is not installed (the test dependency group has it)",
)
def test_tritonclient_binary_and_json(served: Served) -> None:
    result = run_command(
        python_command("drm_lab.triton", "roundtrip", served.gateway.url), cwd=served.lab.workdir
    )
    doc = json.loads(result.stdout)
    assert doc["live"]
    assert doc["ready"]
    assert doc["model_ready"]
    assert [i["datatype"] for i in doc["metadata"]["inputs"]] == ["FP32", "INT64"]
    assert "binary_tensor_data" in doc["server"]["extensions"]
    for mode in ("binary", "json", "default", "scheduling"):
        answer = doc[mode]
        assert answer["id"] == mode
        assert answer["dtypes"] == ["float32", "int64"]
        np.testing.assert_array_equal(np.array(answer["outputs"]["y"], np.float32), Y)
        assert answer["outputs"]["k"] == K.tolist()
        assert answer["parameters"]["cost"] == 2
    assert doc["unknown_model"]["status"] == "404"
    assert "no model 'nope'" in doc["unknown_model"]["message"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed here")
def test_curl_json_request(served: Served) -> None:
    completed = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-H", "Content-Type: application/json",
         "--data-binary", "@-", f"{served.gateway.url}/v2/models/pair/infer"],
        input=pair_request(), capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    outputs = {o["name"]: o["data"] for o in json.loads(completed.stdout)["outputs"]}
    assert outputs["k"] == K.tolist()


# --- every outcome as a status ---------------------------------------------------------


def test_bad_input_unknown_model_and_failed_inference(served: Served) -> None:
    url = served.gateway.url
    wrong = json.dumps(
        {"inputs": [{"name": "a", "shape": [2, 5], "datatype": "FP32", "data": [0.0] * 10},
                    {"name": "b", "shape": [2], "datatype": "INT64", "data": [1, 1]}]}
    ).encode()  # fmt: skip
    reply = call(f"{url}/v2/models/pair/infer", "POST", wrong)
    assert reply.status == 400
    assert "'a'" in reply.json()["error"]  # the enclave's message names the input

    strings = json.dumps(
        {"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    ).encode()
    reply = call(f"{url}/v2/models/pair/infer", "POST", strings)
    assert reply.status == 400
    assert "BYTES tensors are not supported" in reply.json()["error"]

    reply = call(f"{url}/v2/models/nope/infer", "POST", pair_request())
    assert reply.status == 404
    assert call(f"{url}/v2/models/nope").status == 404
    assert call(f"{url}/v2/models/nope/ready").status == 400
    assert call(f"{url}/v2/models/pair/versions/2").status == 404

    reply = call(f"{url}/v2/models/pair/infer", "POST", pair_request(outputs=[{"name": "z"}]))
    assert reply.status == 400
    assert "no output 'z'" in reply.json()["error"]

    x = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                "data": [1.0] * 4}]}).encode()  # fmt: skip
    reply = call(f"{url}/v2/models/failing/infer", "POST", x)
    assert reply.status == 500
    assert reply.json()["error"]


def test_hostile_http_gets_exact_statuses(served: Served) -> None:
    url = f"{served.gateway.url}/v2/models/pair/infer"
    host, port = served.gateway.url.removeprefix("http://").rsplit(":", 1)

    # Content-Length over the limit: refused before the body is read.
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v2/models/pair/infer")
    connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    connection.close()

    body, headers = binary_pair_request()
    lying = dict(headers, **{"Inference-Header-Content-Length": str(len(body) + 10)})
    assert call(url, "POST", body, lying).status == 400
    short = dict(headers, **{"Inference-Header-Content-Length": "12"})
    reply = call(url, "POST", body, short)
    assert reply.status == 400
    assert "invalid JSON" in reply.json()["error"]
    not_a_number = dict(headers, **{"Inference-Header-Content-Length": "-5"})
    assert call(url, "POST", body, not_a_number).status == 400

    body, headers = binary_pair_request(a_size=A.nbytes - 4)
    reply = call(url, "POST", body, headers)
    assert reply.status == 400
    assert "binary_data_size is 28" in reply.json()["error"]
    body, headers = binary_pair_request(blob=A.tobytes() + B.tobytes() + b"\0" * 8)
    assert "no input's binary_data_size" in call(url, "POST", body, headers).json()["error"]

    assert call(url, "POST", b"{nope").status == 400
    assert call(url, "POST", b"[" * 50_000).status == 400
    assert call(url, "POST", pair_request(), {"Content-Encoding": "gzip"}).status == 415
    assert call(url, "POST", pair_request(), {"Drm-Wait": "forever"}).status == 400
    assert call(url).status == 405
    assert call(f"{served.gateway.url}/v2/repository/index", "POST", b"{}").status == 404
    big = {f"X-Pad-{n}": "p" * 1000 for n in range(20)}
    assert call(f"{served.gateway.url}/v2", headers=big).status in (400, 431)
    # After all that the gateway still serves.
    assert call(url, "POST", pair_request()).status == 200


def test_an_enclave_the_policy_refuses_is_502_and_never_ready(served: Served) -> None:
    lab = served.lab
    policy = lab.workdir / "other-policy.toml"
    text = lab.policy_path.read_text()
    for mr in Policy.load(lab.policy_path).mr_enclave:
        text = text.replace(mr.hex(), "ab" * 32)
    policy.write_text(text)
    gateway = lab.start_gateway(served.consumer_port, policy=policy)
    try:
        ready = call(f"{gateway.url}/v2/health/ready")
        assert ready.status == 400
        assert "AttestationRefused" in ready.json()["reason"]
        reply = call(f"{gateway.url}/v2/models/pair/infer", "POST", pair_request())
        assert reply.status == 502
        assert "attestation was refused" in reply.json()["error"]
        metrics = call(f"{gateway.url}/metrics").body.decode()
        assert 'drm_gateway_attestations_total{outcome="refused"}' in metrics
    finally:
        gateway.daemon.stop()


def test_a_token_is_required_when_given_and_off_loopback(served: Served, tmp_path: Path) -> None:
    lab = served.lab
    without_token = environment()
    without_token.pop(TOKEN_ENV, None)
    refused = subprocess.run(
        python_command("drm_consumer", "gateway", "--address", LOOPBACK, "--policy",
                       lab.policy_path, "--listen", "0.0.0.0:0"),
        capture_output=True, text=True, timeout=60, env=without_token,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "is not loopback: give a bearer token" in refused.stderr
    short = tmp_path / "short-token"
    short.write_text("secret\n")
    refused = subprocess.run(
        python_command("drm_consumer", "gateway", "--address", LOOPBACK, "--policy",
                       lab.policy_path, "--token-file", short),
        capture_output=True, text=True, timeout=60, env=without_token,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "the token must be at least 32 printable ASCII characters" in refused.stderr

    token = "t" * 40
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    gateway = lab.start_gateway(served.consumer_port, options=["--token-file", str(token_file)])
    try:
        url = f"{gateway.url}/v2/models/pair/infer"
        assert call(url, "POST", pair_request()).status == 401
        wrong = {"Authorization": "Bearer " + "u" * 40}
        assert call(url, "POST", pair_request(), wrong).status == 401
        assert call(f"{gateway.url}/metrics").status == 401
        assert call(f"{gateway.url}/v2/health/live").status == 200  # probes need no token
        right = {"Authorization": f"Bearer {token}"}
        assert call(url, "POST", pair_request(), right).status == 200
    finally:
        gateway.daemon.stop()


def _until(url: str, wanted: Callable[[int], bool], what: str) -> Reply:
    """Send the pair request until the status is ``wanted`` (bounded by :data:`SETTLE`):
    for states the daemons reach on their own (a block propagating, a link dropping)."""
    deadline = time.monotonic() + SETTLE
    while True:
        reply = call(url, "POST", pair_request())
        if wanted(reply.status):
            return reply
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {SETTLE} s: {what}; last {reply}")
        time.sleep(0.2)


def test_the_drm_states_become_http_statuses(lab: Lab) -> None:
    model = lab.write_model("pair", two_by_two_model())
    lab.start_custodian([model], initial=2)
    enclave = lab.start_enclave()
    gateway = lab.start_gateway(enclave.consumer_port, options=["--connections", "1"])
    url = f"{gateway.url}/v2/models/pair/infer"

    assert call(url, "POST", pair_request()).status == 200  # costs both inferences
    reply = call(url, "POST", pair_request(), {"Drm-Wait": "0"})
    assert reply.status == 429
    assert reply.headers["retry-after"] == "1"
    started = time.monotonic()
    reply = call(url, "POST", pair_request(parameters={"wait": 2}))
    assert reply.status == 429
    assert time.monotonic() - started >= 2
    assert reply.headers["retry-after"] == "2"

    # One request more than the enclave parks per connection: that one is busy at once.
    replies: list[Reply] = []
    with ThreadPoolExecutor(PARKED_PER_CONNECTION + 1) as pool:
        for reply in pool.map(
            lambda _: call(url, "POST", pair_request(parameters={"wait": 3})),
            range(PARKED_PER_CONNECTION + 1),
        ):
            replies.append(reply)
    busy = [r for r in replies if "busy" in r.json()["error"]]
    assert len(busy) == 1, [r.json() for r in replies]
    assert busy[0].status == 429
    assert busy[0].headers["retry-after"] == "1"
    assert all(
        r.status == 429 and r.headers["retry-after"] == "3" for r in replies if r not in busy
    )

    lab.supply(10)
    reply = call(url, "POST", pair_request(parameters={"wait": 20}))
    assert reply.status == 200
    assert reply.json()["parameters"]["cost"] == 2

    assert lab.admin is not None
    lab.admin.block("test")
    reply = _until(url, lambda status: status == 403, "403 once blocked")
    assert "blocked" in reply.json()["error"]
    lab.admin.unblock()
    _until(url, lambda status: status == 200, "200 once unblocked")

    assert lab.custodian is not None
    lab.custodian.stop()
    reply = _until(url, lambda status: status == 503, "503 once the custodian is gone")
    assert reply.headers["retry-after"] == "5"
    assert call(f"{gateway.url}/v2/health/ready").status == 400


def test_the_gateway_attests_again_after_the_enclave_restarts(lab: Lab) -> None:
    model = lab.write_model("pair", two_by_two_model())
    lab.start_custodian([model], initial=100, lease=4)  # the old instance keeps its lease
    enclave = lab.start_enclave()
    gateway = lab.start_gateway(enclave.consumer_port, options=["--connections", "1"])
    url = f"{gateway.url}/v2/models/pair/infer"
    assert call(url, "POST", pair_request()).status == 200
    attested = len(gateway.daemon.find_all("gateway_attested"))
    assert attested == 1

    enclave.daemon.stop()
    assert call(f"{gateway.url}/v2/health/ready").status == 400
    again = lab.start_enclave(options=["--listen", f"{LOOPBACK}:{enclave.consumer_port}"])
    assert again.consumer_port == enclave.consumer_port

    # The first request after the restart is served: the dead connection is found by the
    # idle probe, replaced, and the new enclave attested before anything is sent.
    reply = call(url, "POST", pair_request())
    assert reply.status == 200, reply.body
    assert len(gateway.daemon.find_all("gateway_attested")) > attested
    metrics = call(f"{gateway.url}/metrics").body.decode()
    assert 'drm_gateway_attestations_total{outcome="attested"}' in metrics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None or shutil.which("curl") is None,
    reason="the README's blocks need tritonclient[http] and curl",
)
def test_the_readme_standard_clients_run_as_written(lab: Lab) -> None:
    """The README's gateway command, tritonclient example and curl lines, in front of the
    walkthrough's model (``demo/covidnet.py``), with the README's ports made free ones."""
    run_command(
        [sys.executable, str(ROOT / "demo" / "covidnet.py"), "--out-dir", str(lab.workdir)],
        cwd=lab.workdir,
    )
    lab.start_custodian([lab.workdir / "covidnet.onnx"], initial=10)
    enclave = lab.start_enclave()
    ports = {"9924": str(enclave.consumer_port), "8000": str(_free_port())}

    def text(name: str) -> str:
        found = _block(name).text
        for readme_port, port in ports.items():
            found = re.sub(rf"\b{readme_port}\b", port, found)
        return found

    (command,) = _commands(Block("gateway", "sh", text("gateway"), 0))
    # ``python`` on PATH is this interpreter, as in the README's activated environment.
    path = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    gateway = start_daemon("gateway", ["bash", "-c", f"exec {command}"], cwd=lab.workdir, env=path)
    lab.daemons.append(gateway)
    gateway.wait_for("gateway_listening")

    example = lab.workdir / "triton_example.py"
    example.write_text(text("tritonclient"), encoding="utf-8")
    output = run_command([sys.executable, example.name], cwd=lab.workdir).stdout
    assert "'cost': 1" in output, output
    assert "'inferences_left': " in output, output

    metadata, make_body, infer = _commands(Block("gateway-curl", "sh", text("gateway-curl"), 0))
    shell = partial(run_command, cwd=lab.workdir, env=path)
    assert json.loads(shell(["bash", "-c", metadata]).stdout)["inputs"]
    shell(["bash", "-c", make_body])
    answer = json.loads(shell(["bash", "-c", infer]).stdout)
    (probs,) = answer["outputs"]
    assert (probs["name"], probs["shape"]) == ("probs", [1, 2])
    assert answer["parameters"]["cost"] == 1


# --- stopping ----------------------------------------------------------------------------


def _one_inference_waiting(lab: Lab, stop_timeout: float) -> tuple[Gateway, str]:
    """A gateway whose enclave has no inferences left; its URL for the pair model."""
    model = lab.write_model("pair", two_by_two_model())
    lab.start_custodian([model], initial=2)
    enclave = lab.start_enclave()
    options = ["--connections", "1", "--stop-timeout", str(stop_timeout)]
    gateway = lab.start_gateway(enclave.consumer_port, options=options)
    url = f"{gateway.url}/v2/models/pair/infer"
    assert call(url, "POST", pair_request()).status == 200  # costs both inferences
    return gateway, url


def _until_in_flight(gateway: Gateway, count: int) -> None:
    """Poll ``/metrics`` until ``count`` inferences are in progress (bounded)."""
    deadline = time.monotonic() + SETTLE
    wanted = f"drm_gateway_inferences_in_flight {count:.1f}"
    while wanted not in call(f"{gateway.url}/metrics").body.decode():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {SETTLE} s: {count} inference(s) in flight")
        time.sleep(0.1)


def test_sigterm_drains_the_requests_in_progress_then_exits_0(lab: Lab) -> None:
    gateway, url = _one_inference_waiting(lab, stop_timeout=60)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(call, url, "POST", pair_request(parameters={"wait": 60}))
        _until_in_flight(gateway, 1)
        gateway.daemon.terminate()
        draining = gateway.daemon.wait_for("gateway_draining")
        assert (draining["signal"], draining["inferences"]) == ("SIGTERM", 1)

        ready = call(f"{gateway.url}/v2/health/ready")
        assert ready.status == 503
        assert ready.json() == {"ready": False, "reason": "the gateway is stopping"}
        assert ready.headers["connection"] == "close"
        assert call(f"{gateway.url}/v2/health/live").status == 200
        refused = call(url, "POST", pair_request())
        assert (refused.status, refused.headers["retry-after"]) == (503, "1")
        assert gateway.daemon.process.poll() is None  # still draining

        lab.supply(10)
        reply = waiting.result(timeout=SETTLE)
    assert reply.status == 200, reply.body
    assert reply.json()["parameters"]["cost"] == 2
    assert gateway.daemon.wait_exit() == 0
    assert gateway.daemon.find("gateway_stopped", abandoned=0) is not None
    assert gateway.daemon.find("gateway_requests_abandoned") is None


def test_a_request_past_the_stop_timeout_is_answered_503_and_the_gateway_exits_0(
    lab: Lab,
) -> None:
    gateway, url = _one_inference_waiting(lab, stop_timeout=1)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(call, url, "POST", pair_request(parameters={"wait": 60}))
        _until_in_flight(gateway, 1)
        started = time.monotonic()
        gateway.daemon.terminate()
        reply = waiting.result(timeout=SETTLE)
    assert reply.status == 503
    assert "stopped before this request was answered" in reply.json()["error"]
    assert gateway.daemon.wait_exit() == 0
    assert time.monotonic() - started < SETTLE  # 1 s of drain, not the request's 60 s wait
    assert gateway.daemon.find("gateway_requests_abandoned", count=1) is not None
    assert gateway.daemon.find("gateway_stopped", abandoned=1) is not None


def test_ctrl_c_stops_the_gateway_with_status_130(lab: Lab) -> None:
    gateway, url = _one_inference_waiting(lab, stop_timeout=30)
    gateway.daemon.process.send_signal(signal.SIGINT)
    assert gateway.daemon.wait_exit() == 130
    draining = gateway.daemon.find("gateway_draining")
    assert draining is not None
    assert (draining["signal"], draining["inferences"]) == ("SIGINT", 0)
    assert gateway.daemon.find("gateway_stopped", abandoned=0) is not None
    with pytest.raises(urllib.error.URLError):  # nothing listens there any more
        call(url, "POST", pair_request())
