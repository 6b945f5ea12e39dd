"""Model host benchmark: what the host adds to onnxruntime, and what the upload costs.

Run with ``python bench/inference.py`` from the repository root (about a minute on
2 cores; ``--quick`` for a smoke run). Models come from :mod:`drm_lab.models` (the same
deterministic builders the tests use), all with 1 intra-op thread.

Inference, for the tiny model (Gemm 3x4 + Softmax, batch 1) and the covidnet-like CNN
(NHWC 1x480x480x3, ~32 MB of weights), each path timed per call:

* ``raw``: ``session.run`` on a session with the host's own options (the floor);
* ``run``: :meth:`HostedModel.run` (input checks, zero-copy wrapping both ways);
* ``async inline`` / ``async thread``: :meth:`HostedModel.run_async` forced to one path,
  timed from inside ``trio.run`` (the thread path includes the ``to_thread`` hop);
* ``async policy``: ``run_async`` left to decide.

Figures are the median over ``RUNS`` runs of each run's p50 / p99, and the ratio of the
p50 to raw's p50.

Upload: a ``--upload-mb`` MB model (default 200) fed to :class:`ModelReceiver` in 4 MiB
chunks, in a fresh subprocess so its peak RSS (``VmHWM``) means something: MB/s of
``add`` + ``finish`` (SHA-256 included), per attempt (the first touches fresh pages),
then ``load_model`` on the assembled buffer, with the peak RSS above the baseline (the
process with the source bytes already built) as a multiple of the model size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import trio

from drm_enclave.model_host import HostedModel, load_model, session_options
from drm_enclave.model_receiver import ModelReceiver
from drm_lab import models
from drm_wire.limits import MODEL_CHUNK_BYTES
from drm_wire.messages import ModelBegin, ModelChunk, ModelEnd
from drm_wire.tensors import Tensor

RUNS = 3


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:8.2f} ms"


def time_sync(fn: Callable[[], object], calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def time_async(
    hosted: HostedModel, tensors: tuple[Tensor, ...], inline: bool | None, calls: int
) -> list[float]:
    async def main() -> list[float]:
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            await hosted.run_async(tensors, inline=inline)
            samples.append(time.perf_counter() - start)
        return samples

    return trio.run(main)


def bench_model(label: str, data: bytes, feeds: dict[str, np.ndarray], calls: int) -> None:
    session = ort.InferenceSession(data, session_options(1), providers=["CPUExecutionProvider"])
    hosted = load_model(label, data)
    tensors = tuple(Tensor.from_numpy(name, array) for name, array in feeds.items())
    paths: dict[str, Callable[[], list[float]]] = {
        "raw session.run": lambda: time_sync(lambda: session.run(None, feeds), calls),
        "HostedModel.run": lambda: time_sync(lambda: hosted.run(tensors), calls),
        "run_async inline": lambda: time_async(hosted, tensors, True, calls),
        "run_async to_thread": lambda: time_async(hosted, tensors, False, calls),
        "run_async policy": lambda: time_async(hosted, tensors, None, calls),
    }
    for measure in paths.values():  # warm-up: first runs allocate
        measure()
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in paths}
    for _ in range(RUNS):
        for name, measure in paths.items():  # interleaved, so drift hits every path alike
            samples = measure()
            results[name][0].append(pct(samples, 0.5))
            results[name][1].append(pct(samples, 0.99))
    raw_p50 = statistics.median(results["raw session.run"][0])
    print(f"\n{label}: {len(data) / 1e6:.2f} MB, {calls} calls x {RUNS} runs")
    print(f"  {'path':<22}{'p50':>12}{'p99':>12}  p50/raw")
    for name, (p50s, p99s) in results.items():
        p50 = statistics.median(p50s)
        print(
            f"  {name:<22}{fmt(p50):>12}{fmt(statistics.median(p99s)):>12}  {p50 / raw_p50:6.2f}x"
        )
    print(f"  policy state: {hosted!r}")


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def upload_child(mb: float) -> None:
    """Runs in a fresh interpreter; prints one JSON line."""
    data = models.big_model(mb)
    view = memoryview(data)
    begin = ModelBegin(name="big", size=len(data), sha256=hashlib.sha256(data).digest())
    chunks = [
        ModelChunk(offset=o, data=view[o : o + MODEL_CHUNK_BYTES])
        for o in range(0, len(data), MODEL_CHUNK_BYTES)
    ]
    base_rss = vm_kib("VmRSS")
    rates, peaks = [], []
    model = None
    for _ in range(3):
        model = None  # free the previous attempt's buffer first
        start = time.perf_counter()
        receiver = ModelReceiver(begin)
        for chunk in chunks:
            receiver.add(chunk)
        model = receiver.finish(ModelEnd(name="big"))
        rates.append(len(data) / 1e6 / (time.perf_counter() - start))
        peaks.append(vm_kib("VmHWM"))
    assert model is not None
    start = time.perf_counter()
    hosted = load_model("big", model)
    load_s = time.perf_counter() - start
    out = {
        "size": len(data),
        "rates": rates,
        "assemble_peak_kib": peaks[0] - base_rss,
        "load_s": load_s,
        "load_peak_kib": vm_kib("VmHWM") - base_rss,
        "after_load_rss_kib": vm_kib("VmRSS") - base_rss,
        "inputs": len(hosted.description.inputs),
    }
    print(json.dumps(out))


def bench_upload(mb: float) -> None:
    child = subprocess.run(
        [sys.executable, __file__, "--upload-child", str(mb)],
        check=True,
        capture_output=True,
        text=True,
    )
    r = json.loads(child.stdout.strip().splitlines()[-1])
    size_kib = r["size"] / 1024
    rates = ", ".join(f"{x:.0f}" for x in r["rates"])
    print(
        f"\nupload: {r['size'] / 1e6:.2f} MB in {MODEL_CHUNK_BYTES // 2**20} MiB chunks"
        " (subprocess)"
    )
    print(f"  ModelReceiver add+finish (sha256 incl.): {rates} MB/s (attempts 1..3)")
    print(f"  peak RSS during assembly: +{r['assemble_peak_kib'] / size_kib:.2f}x model size")
    print(
        f"  load_model: {r['load_s'] * 1e3:.0f} ms; "
        f"peak RSS: +{r['load_peak_kib'] / size_kib:.2f}x model size; "
        f"after load (buffer still held): +{r['after_load_rss_kib'] / size_kib:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few calls, small upload")
    parser.add_argument("--upload-mb", type=float, default=200.0)
    parser.add_argument("--upload-child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upload_child is not None:
        upload_child(args.upload_child)
        return
    print(
        f"onnxruntime {ort.__version__}, numpy {np.__version__}, trio {trio.__version__}, "
        f"python {sys.version.split()[0]}"
    )
    rng = np.random.default_rng(0)
    tiny_calls, cnn_calls = (300, 5) if args.quick else (3000, 30)
    bench_model(
        "tiny", models.tiny_model(), {"x": rng.random((1, 4), dtype=np.float32)}, tiny_calls
    )
    bench_model(
        "covidnet-like",
        models.covidnet_like_model(),
        {"input": rng.random((1, 480, 480, 3), dtype=np.float32)},
        cnn_calls,
    )
    bench_upload(16.0 if args.quick else args.upload_mb)


if __name__ == "__main__":
    main()
