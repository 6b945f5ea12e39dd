"""Blocking client benchmark: per-call latency of ``connect()`` vs ``query()``.

Run with ``python bench/sync_client.py`` from the repository root (``--quick`` for a
smoke run). One custodian and one simulated enclave run as real processes on loopback
(:class:`drm_lab.deployment.Lab`, the tiny model); this process is the consumer.

* ``query()``: each call opens a TLS connection, verifies the enclave's RA-TLS
  certificate against the policy, says hello, runs one inference and closes.
* ``connect()``: one attested connection, then the same inferences over it, from one
  thread; and from several threads at once (throughput).

Both columns are the p50 of a call as the caller sees it; the ratio is query / connect,
what keeping the connection saves per call. The two alternate in rounds so that a load
change on the machine hits both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Final

import numpy as np

from drm_consumer import SyncClient, connect, query
from drm_lab.deployment import Lab
from drm_lab.models import tiny_model
from drm_lab.processes import LOOPBACK
from drm_wire.attestation.policy import Policy

#: Calls per round for each client, rounds, and threads for the throughput run.
CALLS: Final = 200
ROUNDS: Final = 3
THREADS: Final = 8


def _x() -> dict[str, np.ndarray[Any, Any]]:
    return {"x": np.full((1, 4), 0.5, dtype=np.float32)}


def _timed(call: Any, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def _throughput(client: SyncClient, calls: int) -> float:
    """Inferences per second with :data:`THREADS` threads sharing the client."""
    per_thread = max(1, calls // THREADS)

    def work() -> None:
        for _ in range(per_thread):
            client.infer("tiny", _x())

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return per_thread * THREADS / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few samples")
    args = parser.parse_args()
    calls, rounds = (20, 1) if args.quick else (CALLS, ROUNDS)
    with tempfile.TemporaryDirectory() as workdir:
        lab = Lab(Path(workdir))
        try:
            lab.prepare()
            model = lab.write_model("tiny", tiny_model())
            lab.start_custodian([model], initial=(2 * rounds + 2) * calls + THREADS)
            enclave = lab.start_enclave()
            policy = Policy.load(lab.policy_path)
            port = enclave.consumer_port
            one_shot: list[float] = []
            kept: list[float] = []
            with connect(LOOPBACK, port, policy=policy) as client:
                for _ in range(rounds):
                    one_shot += _timed(
                        lambda: query(LOOPBACK, port, policy=policy, model="tiny", inputs=_x()),
                        calls,
                    )
                    kept += _timed(lambda: client.infer("tiny", _x()), calls)
                per_second = _throughput(client, calls)
                connections = client.connections
        finally:
            lab.stop_all()
    p50_query = statistics.median(one_shot) * 1e3
    p50_connect = statistics.median(kept) * 1e3
    print("| measure | connect() | query() | ratio |")
    print("| --- | --- | --- | --- |")
    print(
        f"| tiny model, p50 per call, one thread | {p50_connect:.2f} ms | {p50_query:.2f} ms "
        f"| {p50_query / p50_connect:.1f}x |"
    )
    print(f"| tiny model, {THREADS} threads on one connect() | {per_second:.0f}/s | | |")
    print()
    print(f"- {len(kept)} calls each; connect() made {connections} attested connection(s)")


if __name__ == "__main__":
    main()
