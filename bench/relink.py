"""Benchmark: what a cut custodian link costs to re-establish, with and without the
transfer skip (protocol version 3, docs/links.md "Model transfer skip").

Run with ``python bench/relink.py`` from the repository root (``--mb N`` sets the model's
size, default 200; ``--cuts N`` the cuts, default 3). A custodian and an enclave run as
processes on loopback, started as ``tests/e2e`` starts them
(:class:`drm_lab.deployment.Lab`), the enclave dialling the custodian through the fault
proxy (:mod:`drm_lab.faults`), which counts the bytes each way. The custodian lends one
model of ``--mb`` MB (:func:`drm_lab.models.big_model`).

Printed: the first link (the model streamed) and each re-established link after
:meth:`~drm_lab.faults.FaultProxy.cut`: the custodian -> enclave bytes through the proxy
and the seconds from the cut (from the enclave's start for the first) until the enclave
logs ``custodian_link_up`` again (attested, models answered, re-synced).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

from drm_lab.deployment import Enclave, Lab
from drm_lab.faults import fault_proxy
from drm_lab.models import big_model


async def _measure(workdir: Path, mb: float, cuts: int) -> list[tuple[str, int, float]]:
    lab = Lab(workdir)
    rows: list[tuple[str, int, float]] = []
    try:
        await trio.to_thread.run_sync(lab.prepare)
        model = lab.write_model("big", big_model(mb))
        await trio.to_thread.run_sync(partial(lab.start_custodian, [model], initial=10))
        async with fault_proxy(lab.custodian_port) as proxy:
            started = time.perf_counter()
            enclave: Enclave = await trio.to_thread.run_sync(
                partial(lab.start_enclave, proxy.port, link_timeout=600.0)
            )
            rows.append(("first link", proxy.downstream.forwarded, time.perf_counter() - started))
            for cut in range(1, cuts + 1):
                seen = len(enclave.daemon.events)
                before = proxy.downstream.forwarded
                started = time.perf_counter()
                proxy.cut()
                await trio.to_thread.run_sync(
                    partial(enclave.daemon.wait_for, "custodian_link_up", after=seen, timeout=600)
                )
                elapsed = time.perf_counter() - started
                rows.append((f"after cut {cut}", proxy.downstream.forwarded - before, elapsed))
    finally:
        await trio.to_thread.run_sync(lab.stop_all)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="model size in MB")
    parser.add_argument("--cuts", type=int, default=3, help="link cuts to measure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="drm-relink-") as workdir:
        rows = trio.run(_measure, Path(workdir), args.mb, args.cuts)
    print(f"{'link':<14} {'custodian->enclave bytes':>26} {'seconds to link up':>20}")
    for name, sent, seconds in rows:
        print(f"{name:<14} {sent:>26,} {seconds:>20.2f}")


if __name__ == "__main__":
    main()
