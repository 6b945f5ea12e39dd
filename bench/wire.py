"""Wire benchmark: our pyOpenSSL ``TLSStream`` against ``trio.SSLStream`` on loopback.

Run with ``python bench/wire.py`` (about a minute on 2 cores). The server runs in its
own (spawned) process on 127.0.0.1, port 0; the client runs here, so each side gets a
core. Both stacks use the same ECDSA P-256
certificate and TLS 1.3 only. Every figure is the median of ``RUNS`` runs, with
[min-max]; rr latencies are per-run p50/p99.

* bulk: ``BULK_MIB`` MiB written as 1 MiB ``send_all`` calls; the server counts the
  bytes and acks with one byte; MB/s = 10**6 bytes per second, timed to the ack.
* rr100: ``RR_ROUNDS`` round trips of a 4-byte length prefix + 100 bytes out, 100 back.

The codec table (:func:`codec_rows`) runs in this process, on one core.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from drm_lab.certs import Pems, make_pems
from drm_wire.net.tls import TLSStream, client_context, server_context

Stack = Literal["ssl", "drm"]
STACK_NAMES: dict[Stack, str] = {"ssl": "trio.SSLStream (stdlib ssl)", "drm": "drm TLSStream"}

HOST = "127.0.0.1"
RUNS = 5
BULK_MIB = 200
BULK_CHUNK = 1024 * 1024
BULK_RECEIVE = 256 * 1024
RR_ROUNDS = 5000
RR_PAYLOAD = 100
TARGET_BULK_RATIO = 1.3
TARGET_RR_P50_RATIO = 1.1


# --- the two stacks -------------------------------------------------------------------


def _stdlib_context(pems: Pems, *, server: bool) -> ssl.SSLContext:
    if not server:
        ctx = ssl.create_default_context(cadata=pems.ca.decode())
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory() as tmp:  # the stdlib loads keys from files only
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(pems.cert)
        with open(key_path, "wb") as f:
            f.write(pems.key)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def _drm_context(pems: Pems, *, server: bool) -> SSL.Context:
    if not server:
        return client_context(ca_certificates=[x509.load_pem_x509_certificate(pems.ca)])
    key = serialization.load_pem_private_key(pems.key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return server_context(certificate=x509.load_pem_x509_certificate(pems.cert), private_key=key)


Wrapper = Callable[[trio.SocketStream], Awaitable[trio.abc.Stream]]


def make_wrapper(stack: Stack, pems: Pems, *, server: bool) -> Wrapper:
    """Return a coroutine function that turns a TCP stream into a handshaken TLS stream."""
    if stack == "ssl":
        ssl_ctx = _stdlib_context(pems, server=server)

        async def wrap_ssl(tcp: trio.SocketStream) -> trio.abc.Stream:
            hostname = None if server else "localhost"
            stream = trio.SSLStream(tcp, ssl_ctx, server_side=server, server_hostname=hostname)
            await stream.do_handshake()
            return stream

        return wrap_ssl
    drm_ctx = _drm_context(pems, server=server)

    async def wrap_drm(tcp: trio.SocketStream) -> trio.abc.Stream:
        stream = TLSStream(tcp, drm_ctx, server_side=server)
        await stream.do_handshake()
        return stream

    return wrap_drm


def cipher_of(stream: trio.abc.Stream) -> str:
    """Negotiated version and suite, to show both stacks run the same crypto."""
    if isinstance(stream, trio.SSLStream):
        info = stream.cipher()
        return f"{info[1]} {info[0]}" if info else "?"
    if isinstance(stream, TLSStream):
        return f"{stream.tls_version} {stream.cipher}"
    return "?"


class Reader:
    """Exact-size reads over a stream, keeping what arrives beyond the request."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = await self.stream.receive_some(BULK_RECEIVE)
            if not chunk:
                raise EOFError("peer closed")
            self.buffer += chunk
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out


# --- server process -------------------------------------------------------------------


async def _handle(stream: trio.abc.Stream) -> None:
    reader = Reader(stream)
    reply = b"r" * RR_PAYLOAD
    while True:
        try:
            command = await reader.exactly(9)
        except EOFError:
            return
        kind, count = command[:1], struct.unpack(">Q", command[1:])[0]
        if kind == b"B":  # bulk: count bytes, then ack
            remaining = count - len(reader.buffer)
            reader.buffer.clear()
            while remaining > 0:
                chunk = await stream.receive_some(BULK_RECEIVE)
                if not chunk:
                    return
                remaining -= len(chunk)
            await stream.send_all(b"A")
        elif kind == b"R":  # count request/response rounds
            for _ in range(count):
                header = await reader.exactly(4)
                await reader.exactly(struct.unpack(">I", header)[0])
                await stream.send_all(reply)


async def _serve(stack: Stack, pems: Pems, pipe: Connection) -> None:
    wrap = make_wrapper(stack, pems, server=True)
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    pipe.send(listeners[0].socket.getsockname()[1])

    async def handler(tcp: trio.SocketStream) -> None:
        stream = await wrap(tcp)
        async with stream:
            await _handle(stream)

    await trio.serve_listeners(handler, listeners)


def server_main(stack: Stack, pems: Pems, pipe: Connection) -> None:
    """Entry point of the spawned server process."""
    trio.run(_serve, stack, pems, pipe)


# --- client side ----------------------------------------------------------------------


@dataclass
class Result:
    """Per-run figures for one stack."""

    bulk_mbps: list[float]
    rr_p50_us: list[float]
    rr_p99_us: list[float]
    cipher: str


class Client:
    """One benchmark connection of one stack, and the figures of its runs."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = Reader(stream)
        self.result = Result([], [], [], cipher_of(stream))
        self.chunk = os.urandom(BULK_CHUNK)
        self.request = struct.pack(">I", RR_PAYLOAD) + os.urandom(RR_PAYLOAD)

    async def bulk(self, mib: int) -> float:
        """Send ``mib`` MiB as 1 MiB writes; return MB/s up to the server's ack."""
        await self.stream.send_all(b"B" + struct.pack(">Q", mib * BULK_CHUNK))
        start = time.perf_counter()
        for _ in range(mib):
            await self.stream.send_all(self.chunk)
        if await self.reader.exactly(1) != b"A":
            raise RuntimeError("bad ack")
        return mib * BULK_CHUNK / (time.perf_counter() - start) / 1e6

    async def rr(self, rounds: int) -> list[int]:
        """Run ``rounds`` request/response round trips; return each one's nanoseconds."""
        await self.stream.send_all(b"R" + struct.pack(">Q", rounds))
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            await self.stream.send_all(self.request)
            await self.reader.exactly(RR_PAYLOAD)
            samples.append(time.perf_counter_ns() - t0)
        return samples

    async def run(self, *, warm_up: bool) -> None:
        """One bulk run then one rr run; a warm-up run is short and not recorded."""
        mbps = await self.bulk(16 if warm_up else BULK_MIB)
        samples = await self.rr(500 if warm_up else RR_ROUNDS)
        if not warm_up:
            self.result.bulk_mbps.append(mbps)
            self.result.rr_p50_us.append(statistics.median(samples) / 1000)
            self.result.rr_p99_us.append(statistics.quantiles(samples, n=100)[98] / 1000)


async def run_clients(pems: Pems, ports: dict[Stack, int]) -> dict[Stack, Result]:
    """Connect to every server, then alternate the stacks run by run.

    Alternating (and flipping the order each run) spreads any drift in machine load
    over both stacks, so the ratios stay fair on a busy machine.
    """
    clients: dict[Stack, Client] = {}
    try:
        for stack, port in ports.items():
            wrap = make_wrapper(stack, pems, server=False)
            clients[stack] = Client(await wrap(await trio.open_tcp_stream(HOST, port)))
        for run in range(RUNS + 1):  # run 0 warms up caches and the allocator
            order = list(clients.values())
            for client in order if run % 2 else order[::-1]:
                await client.run(warm_up=run == 0)
    finally:
        for client in clients.values():
            await client.stream.aclose()
    return {stack: client.result for stack, client in clients.items()}


def measure(pems: Pems, stacks: tuple[Stack, ...]) -> dict[Stack, Result]:
    """Start one server process per stack, run the clients here, stop the servers."""
    ctx = multiprocessing.get_context("spawn")
    servers = []
    ports: dict[Stack, int] = {}
    try:
        for stack in stacks:
            parent, child = ctx.Pipe()
            server = ctx.Process(target=server_main, args=(stack, pems, child), daemon=True)
            server.start()
            servers.append(server)
            if not parent.poll(30):
                raise RuntimeError(f"{stack} server process did not report its port")
            ports[stack] = parent.recv()
        return trio.run(run_clients, pems, ports)
    finally:
        for server in servers:
            server.terminate()
            server.join(10)


# === frame codec benchmarks: to be added =================================================
# The codec API is not ready yet. Whoever adds it: measure encode+decode of a 480x480x3
# float32 inference request (MB/s and µs per message) and small frames per second, and
# return one Row per figure; main() prints them under the transport table.


@dataclass(frozen=True)
class Row:
    """One line of the codec table: ours, the baseline, their unit, and the target."""

    what: str
    value: float
    baseline: float
    baseline_name: str
    unit: str
    target: str


def _best_rate(work: Callable[[], object], items: int, *, repeat: int = 5, inner: int = 1) -> float:
    """Items per second of the fastest of ``repeat`` timed batches of ``inner`` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(inner):
            work()
        best = min(best, time.perf_counter() - start)
    return items * inner / best


def codec_rows() -> list[Row]:
    """Frame codec figures: ours against plain msgpack doing the same job in one process.

    * tensor request: encode + decode of an inference request carrying one 480x480x3
      float32 tensor (2,764,800 bytes) through :mod:`drm_wire` (header + raw payload, the
      decoder copying once into the buffer numpy wraps), against the obvious alternative:
      the same request as one msgpack map with the tensor as ``bin``, length-prefixed,
      then unpacked and wrapped with ``numpy.frombuffer``.
    * small frames: a ``usage_report`` encoded and decoded, at the frame level
      (:func:`encode_frame` + :class:`FrameDecoder`) and as a typed message (plus
      ``to_wire`` / ``from_frame``), against bare ``msgpack.packb`` + ``unpackb``.
    """
    import msgpack
    import numpy as np

    from drm_wire import messages as m
    from drm_wire.framing import FrameDecoder, encode_frame
    from drm_wire.tensors import Tensor

    array = np.random.default_rng(0).random((1, 480, 480, 3), dtype=np.float32)
    request = m.InferenceRequest(request_id=1, model="m", inputs=(Tensor.from_numpy("x", array),))
    decoder = FrameDecoder(m.payload_limit)

    def ours_tensor() -> object:
        header, payload = request.to_wire()
        for part in encode_frame(header, payload):
            decoder.receive_data(part)
        frame = decoder.next_frame()
        assert frame is not None
        decoded = m.from_frame(frame)
        assert isinstance(decoded, m.InferenceRequest)
        return decoded.inputs[0].to_numpy()

    def msgpack_tensor() -> object:
        body = msgpack.packb(
            {
                "type": "infer",
                "request_id": 1,
                "model": "m",
                "dtype": "float32",
                "shape": [1, 480, 480, 3],
                "data": array.tobytes(),
            },
            use_bin_type=True,
        )
        frame = struct.pack(">I", len(body)) + body
        obj = msgpack.unpackb(frame[4:], raw=False)
        return np.frombuffer(obj["data"], dtype=np.float32).reshape(obj["shape"])

    mb = array.nbytes / 1e6
    tensor = Row(
        "tensor request 2.76 MB: encode + decode",
        _best_rate(ours_tensor, 1, inner=20) * mb,
        _best_rate(msgpack_tensor, 1, inner=20) * mb,
        "msgpack bin in a map",
        "MB/s",
        ">= 3,000 MB/s",
    )

    report = m.UsageReport(seq=5, served_total=1234)
    header0, _ = report.to_wire()

    def frame_level() -> None:
        for _ in range(1000):
            (data,) = encode_frame(header0)
            decoder.receive_data(data)
            decoder.next_frame()

    def message_level() -> None:
        for _ in range(1000):
            header, payload = report.to_wire()
            for part in encode_frame(header, payload):
                decoder.receive_data(part)
            frame = decoder.next_frame()
            assert frame is not None
            m.from_frame(frame)

    def bare_msgpack() -> None:
        for _ in range(1000):
            msgpack.unpackb(msgpack.packb(header0))

    baseline = _best_rate(bare_msgpack, 1000, inner=20)
    return [
        tensor,
        Row(
            "small frames: encode + decode (frame level)",
            _best_rate(frame_level, 1000, inner=20),
            baseline,
            "bare packb + unpackb",
            "frames/s",
            ">= 300,000/s",
        ),
        Row(
            "small messages: typed encode + decode",
            _best_rate(message_level, 1000, inner=20),
            baseline,
            "bare packb + unpackb",
            "msgs/s",
            "(none)",
        ),
    ]


# =========================================================================================


def _fmt(values: list[float], digits: int = 0) -> str:
    low, mid, high = (
        f"{v:,.{digits}f}" for v in (min(values), statistics.median(values), max(values))
    )
    return f"{mid} [{low}-{high}]"


def main() -> None:
    """Measure both stacks and print the table with ratios to trio.SSLStream."""
    import OpenSSL

    print(
        f"Python {platform.python_version()}, trio {trio.__version__}, "
        f"pyOpenSSL {OpenSSL.__version__} ({SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}), "
        f"stdlib {ssl.OPENSSL_VERSION}, {os.cpu_count()} CPUs"
    )
    print(
        f"bulk: {BULK_MIB} MiB as 1 MiB send_all; rr100: {RR_ROUNDS} round trips; "
        f"{RUNS} runs, median [min-max]"
    )
    pems = make_pems()
    started = time.perf_counter()
    stacks: tuple[Stack, ...] = ("ssl", "drm")
    results = measure(pems, stacks)
    base = results["ssl"]
    header = (
        f"{'stack':<28} {'bulk MB/s':>22} {'x':>6} {'rr100 p50 µs':>22} {'x':>6} "
        f"{'rr100 p99 µs':>22} {'x':>6}  cipher"
    )
    print(header)
    print("-" * len(header))
    for stack, res in results.items():
        bulk = statistics.median(res.bulk_mbps) / statistics.median(base.bulk_mbps)
        p50 = statistics.median(res.rr_p50_us) / statistics.median(base.rr_p50_us)
        p99 = statistics.median(res.rr_p99_us) / statistics.median(base.rr_p99_us)
        print(
            f"{STACK_NAMES[stack]:<28} {_fmt(res.bulk_mbps):>22} {bulk:>5.2f}x "
            f"{_fmt(res.rr_p50_us, 1):>22} {p50:>5.2f}x {_fmt(res.rr_p99_us, 1):>22} {p99:>5.2f}x"
            f"  {res.cipher}"
        )
    drm = results["drm"]
    bulk_ratio = statistics.median(drm.bulk_mbps) / statistics.median(base.bulk_mbps)
    p50_ratio = statistics.median(drm.rr_p50_us) / statistics.median(base.rr_p50_us)
    bulk_ok = "met" if bulk_ratio >= TARGET_BULK_RATIO else "NOT met"
    p50_ok = "met" if p50_ratio <= TARGET_RR_P50_RATIO else "NOT met"
    print(
        f"targets: bulk >= {TARGET_BULK_RATIO}x: {bulk_ok} ({bulk_ratio:.2f}x); "
        f"rr p50 <= {TARGET_RR_P50_RATIO}x: {p50_ok} ({p50_ratio:.2f}x)"
    )
    print()
    print(f"{'codec (one core, in process)':<44} {'ours':>14} {'baseline':>14} {'x':>6}  unit")
    for row in codec_rows():
        print(
            f"{row.what:<44} {row.value:>14,.0f} {row.baseline:>14,.0f} "
            f"{row.value / row.baseline:>5.2f}x  {row.unit} (baseline: {row.baseline_name}; "
            f"target {row.target})"
        )
    print(f"total time {time.perf_counter() - started:.1f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
