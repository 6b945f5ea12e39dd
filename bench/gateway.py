"""Gateway benchmark: Triton's client through the HTTP gateway vs the direct client.

Run with ``python bench/gateway.py`` from the repository root (about a minute on 2 cores;
``--quick`` for a smoke run). One deployment of real daemons (custodian, enclave) lends
the tiny model and the COVID-Net-shaped CNN (:mod:`drm_lab.models`), and one
``python -m drm_consumer gateway`` serves them. For each model, in the same run and
alternating (direct, gateway, direct, gateway) so that load from elsewhere on the machine
falls on both:

* ``direct``: ``CLIENTS`` trio tasks in this process, each with its own attested
  ``drm_consumer.Client`` connection, sending batch-1 requests back to back;
* ``gateway``: ``CLIENTS`` tritonclient greenlets (another process, :mod:`drm_lab.triton`),
  each with its own HTTP connection, binary tensor data on inputs and outputs.

It prints p50 and p99 latency and the throughput of each, the gateway's p50 as a multiple
of the direct client's (target for the CNN: at most 1.15x), and the CPU each request cost
the direct client's process, the gateway's process and tritonclient's: on a machine whose
cores the enclave's inference already fills, the gateway's CPU is what it adds to latency.

``--floor`` adds the floor of that CPU: the same tritonclient load on a bare ASGI app
under hypercorn, configured as the gateway's (:func:`floor_app`: it reads each body whole,
as the gateway does, drops it and answers a fixed CNN-shaped response), in a process of
its own (``python bench/gateway.py --serve-floor PORT``). What the gateway spends above
it is the enclave's wire (TLS, framing), which the direct client spends too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Final

import hypercorn.trio
import numpy as np
import trio

from drm_consumer import Client
from drm_consumer.gateway.command import hypercorn_config
from drm_lab.deployment import Lab
from drm_lab.models import covidnet_like_model, tiny_model
from drm_lab.processes import LOOPBACK, python_command, run_command
from drm_wire.attestation.policy import Policy

CLIENTS = 8
TARGET = 1.15
SUPPLY = 1_000_000


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds of this process's children that have ended (the tritonclient runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def direct(
    port: int, policy: Policy, model: str, inputs: dict[str, np.ndarray[Any, Any]], seconds: float
) -> tuple[list[float], float]:
    """``CLIENTS`` connections sending back to back for ``seconds``: latencies, elapsed."""
    latencies: list[float] = []

    async def consumer(ready: trio.Event, go: trio.Event) -> None:
        async with Client.connect(LOOPBACK, port, policy=policy) as client:
            await client.infer(model, inputs)  # warm: connection and session
            ready.set()
            await go.wait()
            deadline = trio.current_time() + seconds
            while trio.current_time() < deadline:
                started = time.perf_counter()
                await client.infer(model, inputs)
                latencies.append(time.perf_counter() - started)

    go = trio.Event()
    async with trio.open_nursery() as nursery:
        readies = []
        for _ in range(CLIENTS):
            ready = trio.Event()
            readies.append(ready)
            nursery.start_soon(consumer, ready, go)
        for ready in readies:
            await ready.wait()
        started = time.perf_counter()
        go.set()
    return latencies, time.perf_counter() - started


def through_gateway(url: str, model: str, seconds: float, cwd: Path) -> tuple[list[float], float]:
    result = run_command(
        python_command("drm_lab.triton", "bench", url, model, str(seconds), str(CLIENTS)),
        cwd=cwd,
        timeout=seconds + 120,
    )
    doc = json.loads(result.stdout)
    return doc["latencies"], doc["elapsed"]


_FLOOR_METADATA: Final = json.dumps(
    {"name": "cnn", "versions": ["1"], "platform": "onnxruntime_onnx",
     "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 480, 480, 3]}],
     "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 2]}]}
).encode()  # fmt: skip
_FLOOR_HEADER: Final = json.dumps(
    {"model_name": "cnn", "model_version": "1",
     "outputs": [{"name": "probs", "datatype": "FP32", "shape": [1, 2],
                  "parameters": {"binary_data_size": 8}}],
     "parameters": {"cost": 1, "inferences_left": 1}}
).encode()  # fmt: skip


async def floor_app(scope: Any, receive: Any, send: Any) -> None:
    """The floor: metadata for the CNN on GET; on POST, the body read whole (chunks
    joined once) and dropped, and a fixed binary answer of the CNN's output shape."""
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].rsplit(".", 1)[1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"application/json")]
    body = _FLOOR_METADATA
    if scope["method"] == "POST":
        chunks = []
        while True:
            event = await receive()
            chunks.append(event.get("body", b""))
            if not event.get("more_body", False):
                break
        received = b"".join(chunks)  # the gateway's one copy of the body
        del received
        body = _FLOOR_HEADER + bytes(8)
        length = str(len(_FLOOR_HEADER)).encode()
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"inference-header-content-length", length),
        ]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def floor(seconds: float, cwd: Path) -> None:
    """Run the tritonclient CNN load against :func:`floor_app` in a process of its own."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve-floor", str(port)])
    try:
        for _ in range(200):  # bounded: the server starts in a second or two
            with socket.socket() as probe:
                if probe.connect_ex((LOOPBACK, port)) == 0:
                    break
            time.sleep(0.05)
        url = f"http://{LOOPBACK}:{port}"
        through_gateway(url, "cnn", 1.0, cwd)  # warm up
        before, before_client = cpu_seconds(server.pid), children_cpu()
        latencies, took = through_gateway(url, "cnn", seconds, cwd)
        used, client = cpu_seconds(server.pid) - before, children_cpu() - before_client
    finally:
        server.terminate()
        server.wait(30)
    print(row("cnn", "floor", latencies, took), flush=True)
    print(
        f"cnn    CPU per request: bare hypercorn {used / len(latencies) * 1000:.2f} ms + "
        f"tritonclient {client / len(latencies) * 1000:.2f} ms (incl. its start)",
        flush=True,
    )


def row(name: str, path: str, latencies: list[float], elapsed: float) -> str:
    return (
        f"{name:6} {path:8} p50 {pct(latencies, 0.5) * 1000:8.2f} ms  "
        f"p99 {pct(latencies, 0.99) * 1000:8.2f} ms  {len(latencies) / elapsed:8.1f} req/s"
        f"  ({len(latencies)} requests)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per run")
    parser.add_argument("--floor", action="store_true",
                        help="also the CNN load on a bare hypercorn app (the floor)")  # fmt: skip
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=2,
                        help="the gateway's attested connections (default 2, its own)")  # fmt: skip
    args = parser.parse_args()
    if args.serve_floor is not None:
        config = hypercorn_config(LOOPBACK, args.serve_floor)
        trio.run(partial(hypercorn.trio.serve, floor_app, config, mode="asgi"))
        return 0
    seconds = {"tiny": 2.0, "cnn": 4.0} if args.quick else {"tiny": 6.0, "cnn": 12.0}
    rng = np.random.default_rng(3)
    inputs = {
        "tiny": {"x": rng.random((1, 4), dtype=np.float32)},
        "cnn": {"input": rng.random((1, 480, 480, 3), dtype=np.float32)},
    }
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        lab = Lab(Path(tmp))
        try:
            lab.prepare()
            models = [
                lab.write_model("tiny", tiny_model()),
                lab.write_model("cnn", covidnet_like_model()),
            ]
            lab.start_custodian(models, initial=SUPPLY, lease=100_000)
            enclave = lab.start_enclave()
            gateway = lab.start_gateway(
                enclave.consumer_port, options=["--connections", str(args.connections)]
            )
            policy = Policy.load(lab.policy_path)
            print(
                f"{CLIENTS} clients each, {args.connections} gateway connections; "
                f"alternating runs of {seconds} s",
                flush=True,
            )
            for name in ("tiny", "cnn"):
                runs: dict[str, tuple[list[float], float]] = {
                    "direct": ([], 0.0),
                    "gateway": ([], 0.0),
                }
                cpu = {"direct": 0.0, "gateway": 0.0, "client": 0.0}
                for _ in range(2):
                    before = time.process_time()
                    lat, took = trio.run(
                        direct, enclave.consumer_port, policy, name, inputs[name], seconds[name]
                    )
                    cpu["direct"] += time.process_time() - before
                    runs["direct"] = (runs["direct"][0] + lat, runs["direct"][1] + took)
                    before, before_client = cpu_seconds(gateway.daemon.process.pid), children_cpu()
                    lat, took = through_gateway(gateway.url, name, seconds[name], lab.workdir)
                    cpu["gateway"] += cpu_seconds(gateway.daemon.process.pid) - before
                    cpu["client"] += children_cpu() - before_client
                    runs["gateway"] = (runs["gateway"][0] + lat, runs["gateway"][1] + took)
                for path, (lat, took) in runs.items():
                    print(row(name, path, lat, took), flush=True)
                ratio = pct(runs["gateway"][0], 0.5) / pct(runs["direct"][0], 0.5)
                rate = (len(runs["gateway"][0]) / runs["gateway"][1]) / (
                    len(runs["direct"][0]) / runs["direct"][1]
                )
                met = "met" if ratio <= TARGET else "MISSED"
                verdict = f" (target <= {TARGET}x: {met})" if name == "cnn" else ""
                print(f"{name:6} gateway/direct: p50 {ratio:.2f}x, throughput {rate:.2f}x{verdict}")
                direct_n, gateway_n = len(runs["direct"][0]), len(runs["gateway"][0])
                print(
                    f"{name:6} CPU per request: direct client "
                    f"{cpu['direct'] / direct_n * 1000:.2f} ms; gateway process "
                    f"{cpu['gateway'] / gateway_n * 1000:.2f} ms + tritonclient "
                    f"{cpu['client'] / gateway_n * 1000:.2f} ms (incl. its start)",
                    flush=True,
                )
            if args.floor:
                floor(seconds["cnn"] * 2, lab.workdir)
        finally:
            lab.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
