"""Consumer-port read path: CPU the receiving process spends per large request.

Run with ``python bench/consumer_read.py`` (a few seconds per run on 2 cores). The
receiver is this process: a real ``TLSStream`` server on 127.0.0.1, port 0, reading
through a :class:`~drm_wire.net.channel.MessageChannel` with the consumer port's
:class:`~drm_wire.net.budget.ReceiveLimits` (default budget), its handler counting the
messages. The sender is a spawned process that sends ``--requests`` inference requests of
one float32 tensor of ``--shape`` (default 1x3x480x480: 2.76 MB, the CNN request of
``bench/e2e.py``) as fast as the receiver reads them.

The figure is this process's CPU time (user + system, ``time.process_time``) from the end
of the warm-up requests to the last request, divided by the requests: CPU, not wall time,
so a loaded machine slows the run down without moving the figure much. Each of
``--runs`` runs is a fresh connection; the median and the range are printed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from contextlib import suppress

import numpy as np
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from drm_lab.certs import Pems, make_pems
from drm_wire.messages import InferenceRequest, Message, PeerRole
from drm_wire.net.budget import MemoryBudget, ReceiveLimits
from drm_wire.net.channel import ChannelClosed, open_channel
from drm_wire.net.tls import TLSStream, client_context, server_context
from drm_wire.protocol import Link, Side
from drm_wire.tensors import Tensor

HOST = "127.0.0.1"
WARM_UP = 5


async def _send(pems: Pems, port: int, requests: int, shape: tuple[int, ...]) -> None:
    ctx = client_context(ca_certificates=[x509.load_pem_x509_certificate(pems.ca)])
    stream = TLSStream(await trio.open_tcp_stream(HOST, port), ctx, server_side=False)
    tensor = Tensor.from_numpy("x", np.ones(shape, dtype=np.float32))
    async with open_channel(stream, Link.CONSUMER, Side.CLIENT) as channel:
        await channel.hello(role=PeerRole.CONSUMER, software="bench-read/1")
        for request_id in range(1, requests + 1):
            await channel.send(InferenceRequest(request_id=request_id, model="m", inputs=(tensor,)))
        with suppress(ChannelClosed):
            await channel.receive()  # the receiver closes once it has them all


def sender_main(pems: Pems, port: int, requests: int, shape: tuple[int, ...]) -> None:
    """Entry point of the spawned sender process."""
    trio.run(_send, pems, port, requests, shape)


async def _receive(pems: Pems, requests: int, shape: tuple[int, ...]) -> float:
    """One run: CPU seconds per request after the warm-up."""
    key = serialization.load_pem_private_key(pems.key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ctx = server_context(certificate=x509.load_pem_x509_certificate(pems.cert), private_key=key)
    listener = (await trio.open_tcp_listeners(0, host=HOST))[0]
    port = listener.socket.getsockname()[1]
    sender = multiprocessing.get_context("spawn").Process(
        target=sender_main, args=(pems, port, requests, shape)
    )
    sender.start()
    try:
        tcp = await listener.accept()
        stream = TLSStream(tcp, ctx, server_side=True)
        limits = ReceiveLimits(budget=MemoryBudget())
        seen = 0
        started = 0.0
        done = trio.Event()

        async def handle(message: Message) -> None:
            nonlocal seen, started
            assert isinstance(message, InferenceRequest)
            seen += 1
            if seen == WARM_UP:
                started = time.process_time()
            if seen == requests:
                done.set()

        async with open_channel(stream, Link.CONSUMER, Side.SERVER, limits=limits) as channel:
            channel.set_handler(handle)
            await channel.accept_hello(software="bench-read/1")
            await done.wait()
            spent = time.process_time() - started
    finally:
        await listener.aclose()
        sender.join(30)
        if sender.is_alive():
            sender.kill()
    return spent / (requests - WARM_UP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shape", default="1x3x480x480")
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split("x"))
    if args.requests <= WARM_UP:
        parser.error(f"--requests must be above the {WARM_UP} warm-up requests")
    pems = make_pems()
    per_request = [trio.run(_receive, pems, args.requests, shape) for _ in range(args.runs)]
    nbytes = int(np.prod(shape)) * 4
    print(
        f"{nbytes / 1e6:.2f} MB requests, {args.requests} per run: receiver CPU per request "
        f"{statistics.median(per_request) * 1e3:.3f} ms "
        f"[{min(per_request) * 1e3:.3f}-{max(per_request) * 1e3:.3f}] over {args.runs} runs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
