"""Benchmark: an honest consumer's latency while 64 attackers hold partial frames, and the
enclave's peak memory during the attack against its payload budget (I17, R05).

Run with ``python bench/consumer_port_attack.py`` from the repository root (about 90 s;
``--quick`` for 2 rounds instead of 6). A custodian and an enclave run as processes on
loopback, started as ``tests/e2e`` starts them (:class:`drm_lab.deployment.Lab`), the
enclave with its default limits. The honest consumer is :class:`drm_consumer.Client`
calling the tiny model back to back; the attackers run in another process (this script
with ``--attack PORT``, so they do not share the consumer's event loop) as
:class:`drm_lab.hostile.RawConsumer` connections that each announce a 64 MiB ``infer``
payload, send one byte and go idle, and connect again as soon as the enclave closes them
(at the end of the minimum rate's grace), so 64 partial frames are held for the whole
measurement.

Phases without and with the attackers alternate (6 rounds of 6 s each), so that the load
other programs put on the machine falls on both alike. Printed: the honest p50 and p99
round trip without attackers and under them, and their ratio (target: at most 1.5x); the
enclave's peak ``VmSize`` growth during the attack (polled from ``/proc``: the virtual
size, what SGX commits) against the payload budget; how many attacker connections the
enclave closed meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

from drm_consumer import Client
from drm_lab.deployment import Enclave, Lab
from drm_lab.hostile import RawConsumer, vm_size
from drm_lab.models import tiny_model
from drm_lab.processes import LOOPBACK
from drm_wire.attestation.policy import Policy
from drm_wire.limits import PAYLOAD_BUDGET_BYTES, MiB

ATTACKERS = 64
ANNOUNCED = 64 * MiB
#: Each phase with and without attackers; longer than the 5 s grace of the minimum rate,
#: so every attacker is closed and reconnects at least once per phase.
PHASE_SECONDS = 6.0


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _round_trips(client: Client, seconds: float) -> list[float]:
    x = {"x": np.full((1, 4), 0.5, dtype=np.float32)}
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        await client.infer("tiny", x, wait=0)
        samples.append(time.perf_counter() - start)
    return samples


async def _attacker(port: int, closed: list[int], held: trio.Event) -> None:
    """Hold one partial frame at all times: announce, wait to be closed, again."""
    while True:
        attacker = await RawConsumer.connect(LOOPBACK, port)
        try:
            await attacker.announce(ANNOUNCED, sent=1)
            held.set()
            while await attacker.receive() is not None:
                pass
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            closed[0] += 1
            await attacker.aclose()


async def _attack(port: int) -> None:
    """The attacking process: print ``holding`` once every attacker holds a frame, and
    the count of closed connections each time it changes, until killed."""
    closed = [0]
    async with trio.open_nursery() as nursery:
        holding = []
        for _ in range(ATTACKERS):
            held = trio.Event()
            holding.append(held)
            nursery.start_soon(_attacker, port, closed, held)
        for held in holding:
            await held.wait()
        print("holding", flush=True)
        shown = 0
        while True:
            await trio.sleep(0.5)
            if closed[0] != shown:
                shown = closed[0]
                print(f"closed {shown}", flush=True)


def _spawn_attackers(port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--attack", str(port)], stdout=subprocess.PIPE, text=True
    )


async def _sample_vm_size(pid: int, peak: list[int]) -> None:
    """Poll the enclave's VmSize (another process: nothing to wait on) for its maximum."""
    while True:
        peak[0] = max(peak[0], vm_size(pid))
        await trio.sleep(0.05)


async def _attacked_phase(
    client: Client, port: int, pid: int, seconds: float, peak: list[int]
) -> tuple[list[float], int]:
    """Round trips while the attacking process holds its frames; the closes it counted."""
    attack = _spawn_attackers(port)
    try:
        assert attack.stdout is not None
        line = await trio.to_thread.run_sync(attack.stdout.readline)
        if line.strip() != "holding":
            raise RuntimeError(f"the attackers did not start: {line!r}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sample_vm_size, pid, peak)
            samples = await _round_trips(client, seconds)
            nursery.cancel_scope.cancel()
    finally:
        attack.kill()
        rest, _ = attack.communicate()
    closed = [int(x.split()[1]) for x in rest.splitlines() if x.startswith("closed")]
    return samples, max(closed, default=0)


async def _measure(lab: Lab, enclave: Enclave, rounds: int, seconds: float) -> None:
    """Alternate phases without and with the attackers, so that the load other programs
    put on the machine meanwhile falls on both alike."""
    policy = Policy.load(lab.policy_path)
    pid = enclave.daemon.process.pid
    quiet: list[float] = []
    attacked: list[float] = []
    closed = 0
    async with Client.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
        await _round_trips(client, 1.0)  # warm up
        before = vm_size(pid)
        peak = [before]
        for _ in range(rounds):
            quiet += await _round_trips(client, seconds)
            samples, count = await _attacked_phase(
                client, enclave.consumer_port, pid, seconds, peak
            )
            attacked += samples
            closed += count
    grown = peak[0] - before
    print(f"{'honest tiny round trip':<42}{'p50 ms':>10}{'p99 ms':>10}{'samples':>10}")
    for label, samples in (("without attackers", quiet), (f"{ATTACKERS} idle attackers", attacked)):
        print(
            f"  {label:<40}{statistics.median(samples) * 1e3:>10.3f}"
            f"{_pct(samples, 0.99) * 1e3:>10.3f}{len(samples):>10}"
        )
    ratio = statistics.median(attacked) / statistics.median(quiet)
    print(f"  {'ratio (target <= 1.5x)':<40}{ratio:>9.2f}x")
    print(
        f"enclave VmSize: {before / MiB:.0f} MiB before, peak growth during the attack "
        f"{grown / MiB:.0f} MiB (payload budget {PAYLOAD_BUDGET_BYTES // MiB} MiB; "
        f"{ATTACKERS} x {ANNOUNCED // MiB} MiB announced = {ATTACKERS * ANNOUNCED // MiB} MiB)"
    )
    print(f"attacker connections closed by the enclave (frame deadline): {closed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 6")
    parser.add_argument("--attack", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack is not None:
        trio.run(_attack, args.attack)
        return 0
    rounds = 2 if args.quick else 6
    with tempfile.TemporaryDirectory(prefix="drm-attack-bench-") as workdir:
        lab = Lab(Path(workdir))
        try:
            lab.prepare()
            model = lab.write_model("tiny", tiny_model())
            lab.start_custodian([model], initial=1_000_000)
            enclave = lab.start_enclave(lab.custodian_port)
            trio.run(_measure, lab, enclave, rounds, PHASE_SECONDS)
        finally:
            lab.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
