"""Baselines for ``bench/e2e.py``, each served from its own spawned process.

* :func:`grpc_server_main`: a grpcio server over TLS (self-signed ECDSA P-256, made here
  with ``cryptography``) with a generic handler on raw bytes (no protoc). Its one method
  unpacks a msgpack request ``{model, inputs: [{name, shape, dtype, data}]}``, runs the
  same onnxruntime session the enclave would (``drm_enclave.model_host.session_options``,
  same intra-op threads) and answers the outputs packed the same way.
* :func:`bulk_server_main`: a ``drm_wire.net.tls.TLSStream`` server that, on a command
  ``b"B" + u64 count``, writes ``count`` bytes in 4 MiB ``send_all`` calls (the model
  transfer's chunk size and direction: server to client).
* :func:`layers_server_main`: the layers under the tiny round trip, without the DRM
  (:func:`layer_latencies` times them): a ``TLSStream`` answering 100 bytes with 100
  bytes, and a ``MessageChannel`` answering ``infer`` with its inputs (model ``echo``)
  or with the enclave's own ``HostedModel.run`` on the event loop (model ``tiny``): the
  DRM path but for quota, accounting and the consumer server's dispatch. Also the floor
  under a grant push (:func:`idle_wakes`): a ``TLSStream`` message to the server while
  it sits idle, timed to its arrival.

Each server reports its port through a pipe, then runs until terminated.
"""

from __future__ import annotations

import contextlib
import http.client
import multiprocessing
import os
import ssl
import struct
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from drm_lab.certs import Pems
from drm_wire.limits import MODEL_CHUNK_BYTES
from drm_wire.messages import InferenceRequest, InferenceResult, Message, PeerRole
from drm_wire.net.channel import ChannelClosed, open_channel
from drm_wire.net.request_channel import open_request_channel
from drm_wire.net.tls import TLSStream, client_context, server_context
from drm_wire.protocol import Link, Side
from drm_wire.tensors import Tensor

HOST = "127.0.0.1"
SERVICE = "bench.Inference"
METHOD = "Run"

# --- the msgpack-ish inference request ------------------------------------------------


def pack_request(model: str, inputs: dict[str, np.ndarray[Any, Any]]) -> bytes:
    """The request grpcio carries: model name and tensors as shape, dtype and raw bytes."""
    tensors = [
        {"name": k, "shape": list(v.shape), "dtype": v.dtype.str, "data": v.tobytes()}
        for k, v in inputs.items()
    ]
    data: bytes = msgpack.packb({"op": "infer", "model": model, "inputs": tensors})
    return data


def _arrays(tensors: list[dict[str, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    return {
        t["name"]: np.frombuffer(t["data"], dtype=np.dtype(t["dtype"])).reshape(t["shape"])
        for t in tensors
    }


def unpack_reply(data: bytes) -> dict[str, np.ndarray[Any, Any]]:
    """The outputs of a reply made by the grpcio server."""
    return _arrays(msgpack.unpackb(data)["outputs"])


# --- grpcio server ----------------------------------------------------------------------


def grpc_server_main(model: bytes, threads: int, pems: Pems, pipe: Connection) -> None:
    """Entry point of the spawned grpcio server process."""
    import grpc
    import onnxruntime as ort

    from drm_enclave.model_host import session_options

    session = ort.InferenceSession(
        model, session_options(threads), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]

    def run(request: bytes, context: object) -> bytes:
        message = msgpack.unpackb(request)
        outputs = session.run(names, _arrays(message["inputs"]))
        reply = [
            {"name": n, "shape": list(a.shape), "dtype": a.dtype.str, "data": a.tobytes()}
            for n, a in zip(names, outputs, strict=True)
        ]
        data: bytes = msgpack.packb({"outputs": reply})
        return data

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(run)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 64 << 20)],
    )
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials([(pems.key, pems.cert)])
    port = server.add_secure_port(f"{HOST}:0", credentials)
    server.start()
    pipe.send(port)
    server.wait_for_termination()


class GrpcClient:
    """A grpcio TLS channel to :func:`grpc_server_main` and its one unary method."""

    def __init__(self, port: int, pems: Pems) -> None:
        import grpc

        credentials = grpc.ssl_channel_credentials(root_certificates=pems.ca)
        self.channel = grpc.secure_channel(
            f"{HOST}:{port}",
            credentials,
            options=[
                ("grpc.ssl_target_name_override", "localhost"),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        self.call: Callable[[bytes], bytes] = self.channel.unary_unary(f"/{SERVICE}/{METHOD}")

    def close(self) -> None:
        self.channel.close()


# --- raw bulk over drm_wire's TLSStream ----------------------------------------------------


def _server_context(pems: Pems) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(pems.key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return server_context(certificate=x509.load_pem_x509_certificate(pems.cert), private_key=key)


async def _open_client(port: int, pems: Pems) -> TLSStream:
    context = client_context(ca_certificates=[x509.load_pem_x509_certificate(pems.ca)])
    tcp = await trio.open_tcp_stream(HOST, port)
    stream = TLSStream(tcp, context, server_side=False, server_hostname="localhost")
    await stream.do_handshake()
    return stream


async def _bulk_serve(pems: Pems, pipe: Connection) -> None:
    context = _server_context(pems)
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    pipe.send(listeners[0].socket.getsockname()[1])
    chunk = memoryview(np.random.default_rng(0).bytes(MODEL_CHUNK_BYTES))

    async def handler(tcp: trio.SocketStream) -> None:
        stream = TLSStream(tcp, context, server_side=True)
        await stream.do_handshake()
        buffer = b""
        while True:
            while len(buffer) < 9:
                data = await stream.receive_some()
                if not data:
                    return
                buffer += data
            count = struct.unpack(">Q", buffer[1:9])[0]
            buffer = buffer[9:]
            while count > 0:
                part = chunk[: min(count, len(chunk))]
                await stream.send_all(part)
                count -= len(part)

    await trio.serve_listeners(handler, listeners)


def bulk_server_main(pems: Pems, pipe: Connection) -> None:
    """Entry point of the spawned bulk TLS server process."""
    trio.run(_bulk_serve, pems, pipe)


async def bulk_mbps(port: int, pems: Pems, size: int, runs: int) -> list[float]:
    """MB/s (10**6 B/s) of ``runs`` transfers of ``size`` bytes, server to this client."""
    stream = await _open_client(port, pems)
    rates = []
    try:
        for run in range(runs + 1):  # run 0 warms up (16 MiB, not recorded)
            want = 16 << 20 if run == 0 else size
            start = time.perf_counter()
            await stream.send_all(b"B" + struct.pack(">Q", want))
            got = 0
            while got < want:
                data = await stream.receive_some()
                if not data:
                    raise EOFError("bulk server closed")
                got += len(data)
            if run:
                rates.append(size / (time.perf_counter() - start) / 1e6)
    finally:
        await stream.aclose()
    return rates


# --- the layers under the tiny round trip ------------------------------------------------

#: Bytes each way of the raw TLS round trip (the tiny model's frames are ~100 B).
RAW_ROUND_TRIP_BYTES = 100


async def _receive_exactly(stream: TLSStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = await stream.receive_some(size - len(data))
        if not more:
            raise EOFError("the peer closed")
        data += more
    return data


async def _layers_serve(model: bytes, threads: int, pems: Pems, pipe: Connection) -> None:
    from drm_enclave.model_host import load_model

    hosted = load_model("tiny", model, intra_op_threads=threads)
    context = _server_context(pems)
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    pipe.send(listeners[0].socket.getsockname()[1])

    def answer(request: InferenceRequest) -> InferenceResult:
        # The enclave's own checks and run (HostedModel.run), without quota or accounting.
        outputs = request.inputs if request.model == "echo" else hosted.run(request.inputs)
        return InferenceResult(request_id=request.request_id, outputs=outputs, inferences_left=1)

    async def handler(tcp: trio.SocketStream) -> None:
        stream = TLSStream(tcp, context, server_side=True)
        await stream.do_handshake()
        mode = await _receive_exactly(stream, 1)  # the client waits for our b"k"
        await stream.send_all(b"k")
        if mode == b"W":  # arrival times of messages sent while we sat idle
            async with stream:
                with contextlib.suppress(EOFError):  # the client is done
                    while True:
                        await _receive_exactly(stream, RAW_ROUND_TRIP_BYTES)
                        arrived = time.time()
                        await stream.send_all(struct.pack(">d", arrived))
            return
        if mode == b"R":
            reply = b"r" * RAW_ROUND_TRIP_BYTES
            async with stream:
                with contextlib.suppress(EOFError):  # the client is done
                    while True:
                        await _receive_exactly(stream, RAW_ROUND_TRIP_BYTES)
                        await stream.send_all(reply)
            return
        async with open_channel(stream, Link.CONSUMER, Side.SERVER) as channel:

            async def handle(message: Message) -> None:  # in the reader task, as the enclave
                assert isinstance(message, InferenceRequest)
                await channel.send(answer(message))

            channel.set_handler(handle)
            await channel.accept_hello(software="bench-layers/1")
            with contextlib.suppress(ChannelClosed):  # the client is done
                await channel.wait_ended()

    await trio.serve_listeners(handler, listeners)


def layers_server_main(model: bytes, threads: int, pems: Pems, pipe: Connection) -> None:
    """Entry point of the spawned layers server process (the tiny model's session)."""
    trio.run(_layers_serve, model, threads, pems, pipe)


async def _mode(port: int, pems: Pems, mode: bytes) -> TLSStream:
    stream = await _open_client(port, pems)
    await stream.send_all(mode)
    if await _receive_exactly(stream, 1) != b"k":
        raise RuntimeError("the layers server did not take the mode")
    return stream


async def layer_latencies(
    port: int, pems: Pems, inputs: list[dict[str, np.ndarray[Any, Any]]], samples: int
) -> dict[str, list[float]]:
    """Round-trip seconds of each layer, in alternating blocks after a warm-up.

    ``raw``: 100 bytes each way over ``TLSStream``; ``channel``: an ``infer`` message and
    its result over ``MessageChannel`` (codec, framing; read as the DRM path reads: on
    demand here, by a handler in the server's reader task), answered with its inputs;
    ``model``: the same, answered by the tiny model's ``HostedModel.run``.
    """
    raw = await _mode(port, pems, b"R")
    out = b"q" * RAW_ROUND_TRIP_BYTES
    times: dict[str, list[float]] = {"raw": [], "channel": [], "model": []}
    stream = await _mode(port, pems, b"C")
    async with open_request_channel(
        stream, Link.CONSUMER, Side.CLIENT, read_on_demand=True
    ) as chan:
        await chan.hello(role=PeerRole.CONSUMER, software="bench-layers/1")

        async def infer(model: str, i: int) -> None:
            tensors = tuple(Tensor.from_numpy(k, v) for k, v in inputs[i % len(inputs)].items())
            request = InferenceRequest(
                request_id=chan.next_request_id(), model=model, inputs=tensors
            )
            result = await chan.request(request)
            for tensor in result.outputs:
                tensor.to_numpy()

        async def one(layer: str, i: int) -> None:
            if layer == "raw":
                await raw.send_all(out)
                await _receive_exactly(raw, RAW_ROUND_TRIP_BYTES)
            else:
                await infer("echo" if layer == "channel" else "tiny", i)

        blocks = 4
        for block in range(blocks + 1):  # block 0 warms up
            order = list(times) if block % 2 else list(times)[::-1]
            for layer in order:
                for i in range(200 if block == 0 else samples // blocks):
                    t0 = time.perf_counter()
                    await one(layer, i)
                    if block:
                        times[layer].append(time.perf_counter() - t0)
    await raw.aclose()
    return times


async def idle_wakes(port: int, pems: Pems, samples: int, quiet: float) -> list[float]:
    """One-way seconds of a 100-byte ``TLSStream`` message to the layers server after
    ``quiet`` seconds of silence: the server's task is parked in ``receive_some`` and its
    process idle, as the enclave's link reader is when a grant comes. From our
    ``time.time()`` before ``send_all`` to the server's once the bytes are decrypted."""
    stream = await _mode(port, pems, b"W")
    message = b"w" * RAW_ROUND_TRIP_BYTES
    seconds = []
    async with stream:
        for sample in range(samples + 1):  # sample 0 warms up
            await trio.sleep(quiet)
            sent = time.time()
            await stream.send_all(message)
            (arrived,) = struct.unpack(">d", await _receive_exactly(stream, 8))
            if sample:
                seconds.append(arrived - sent)
    return seconds


# --- processes ----------------------------------------------------------------------------


def spawn_server(target: Callable[..., None], *args: object) -> tuple[BaseProcess, int]:
    """Start ``target(*args, pipe)`` in a spawned process; return it and the port it sent."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(*args, child), daemon=True)
    process.start()
    if not parent.poll(60):
        process.terminate()
        raise RuntimeError(f"{target.__name__} did not report its port")
    port: int = parent.recv()
    return process, port


def admin_worker_main(supply: Callable[[int], object], pipe: Connection) -> None:
    """Entry point of a spawned operator process: on ``n`` from the pipe, ``supply(n)``.

    Answers ``(t0, t1)``: ``time.time()`` just before the call and when it returned. A
    separate process, so the HTTPS call does not hold the consumer process's GIL while
    the parked request it wakes comes back.
    """
    pipe.send("ready")
    while (units := pipe.recv()) is not None:
        t0 = time.time()
        supply(units)
        pipe.send((t0, time.time()))


@dataclass
class KeptAliveSupply:
    """``POST /supply_inferences`` over one HTTPS connection kept open between calls.

    What an operator's automation (a billing system, say) does, unlike ``curl``, which
    opens a connection and does a TLS handshake per call. Picklable until first called,
    so :func:`spawn_worker` can hand it to the operator process.
    """

    host: str
    port: int
    token: str = field(repr=False)
    ca_path: Path
    _conn: http.client.HTTPSConnection | None = field(default=None, repr=False)

    def __call__(self, units: int) -> None:
        if self._conn is None:
            context = ssl.create_default_context(cafile=os.fspath(self.ca_path))
            self._conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=30, context=context
            )
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        body = f"number_inferences={units}".encode("ascii")
        self._conn.request("POST", "/supply_inferences", body=body, headers=headers)
        response = self._conn.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"supply_inferences answered {response.status}: {answer!r}")


def spawn_worker(target: Callable[..., None], *args: object) -> tuple[BaseProcess, Connection]:
    """Start ``target(*args, pipe)`` in a spawned process; return it and our pipe end."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(*args, child), daemon=True)
    process.start()
    if not parent.poll(60):
        process.terminate()
        raise RuntimeError(f"{target.__name__} did not start")
    parent.recv()
    return process, parent


def stop_server(process: BaseProcess) -> None:
    """Terminate a server from :func:`spawn_server` and reap it."""
    process.terminate()
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join(10)
