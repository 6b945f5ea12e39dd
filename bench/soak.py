"""Soak: the daemons' memory and descriptors under sustained tiny-model load.

Run with ``python bench/soak.py`` from the repository root (``--rounds`` and ``--seconds``
make it longer; the default is about two minutes). Deployment as in ``bench/e2e.py``
(custodian and enclave as subprocesses, the consumers in this process). Each round,
``--consumers`` clients run tiny inferences back to back, each reconnecting after
``--per-connection`` requests, so both per-request and per-connection state are
exercised. After each round it prints the daemons' RSS (``VmRSS``) and open descriptors.

The baseline is the first round: a daemon that keeps memory per request or per
connection grows round after round, while heap fragmentation levels off. Here, 30 rounds
of 12 s (911,000 requests): the enclave's RSS rose 8.9 MB over rounds 0-9, 2.2 MB over
10-19 and 0.8 MB over 20-29; the custodian's 0.6 MB in all (SQLite's page cache).
``malloc_trim`` gave the enclave's growth back, which it would not for a leak.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import trio

from drm_consumer import Client
from drm_lab.models import tiny_model
from drm_lab.processes import LOOPBACK, Daemon
from e2e import MAX_SUPPLY, Deployment, deploy, proc_kib, running, tiny_x


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def load(d: Deployment, seconds: float, consumers: int, per_connection: int) -> int:
    """Requests served in ``seconds`` by ``consumers`` clients that reconnect regularly."""
    deadline = time.monotonic() + seconds
    done = 0

    async def consumer() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            async with Client.connect(LOOPBACK, d.port, policy=d.policy) as client:
                for i in range(per_connection):
                    if time.monotonic() >= deadline:
                        break
                    await client.infer("tiny", tiny_x(i))
                    done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(consumers):
            nursery.start_soon(consumer)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=12.0, help="length of a round")
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--per-connection", type=int, default=200, help="then reconnect")
    args = parser.parse_args()
    print(f"soak: {args.rounds} rounds x {args.seconds:g} s, {args.consumers} consumers "
          f"reconnecting every {args.per_connection} requests")  # fmt: skip
    print("| round | requests | req/s | enclave RSS MiB | vs round 0 | custodian RSS MiB "
          "| vs round 0 | fds enclave / custodian |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    total = 0
    with tempfile.TemporaryDirectory(prefix="soak-bench-") as tmp:
        daemons: list[Daemon] = []
        with running(daemons):
            d = deploy(Path(tmp) / "a", {"tiny": tiny_model()}, MAX_SUPPLY, 1, daemons)
            enclave, custodian = d.enclave.process.pid, d.custodian.process.pid
            first: tuple[int, int] | None = None
            for n in range(args.rounds):
                served = trio.run(load, d, args.seconds, args.consumers, args.per_connection)
                total += served
                rss = (proc_kib(enclave, "VmRSS"), proc_kib(custodian, "VmRSS"))
                first = first or rss
                print(
                    f"| {n} | {served:,} | {served / args.seconds:,.0f} "
                    f"| {rss[0] / 1024:.1f} | {rss[0] / first[0]:.3f}x "
                    f"| {rss[1] / 1024:.1f} | {rss[1] / first[1]:.3f}x "
                    f"| {open_fds(enclave)} / {open_fds(custodian)} |",
                    flush=True,
                )
    print(f"\n{total:,} requests in all; the baseline of each ratio is the daemon's RSS after "
          "round 0 (warm: the model loaded, the first connections made)")  # fmt: skip


if __name__ == "__main__":
    main()
