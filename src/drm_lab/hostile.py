"""A hostile consumer for the attack tests and the benchmark: raw frames, no verification.

Anyone who can reach the consumer port can do what :class:`RawConsumer` does: a TLS
handshake without checking the enclave (an attacker has no reason to), a hello, then
frames written byte by byte as the attack needs: a header that announces a payload it
never sends, a trickle, a flood of requests, headers built from dicts that no message
class would let through. It keeps no protocol state of its own (an attacker is bound by
none): replies are decoded frame by frame with the codec, so the test sees exactly what
the enclave said. A test that wants the enclave verified first hands it a stream opened
with the project's own client context.

:func:`vm_size` reads a process's virtual size (``VmSize``, or ``VmPeak``), which is
what an SGX enclave must commit: pages allocated but never touched count there and not in
the resident size.
"""

from __future__ import annotations

import itertools
import ssl
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

import trio

from drm_wire.codec import Header, pack_header
from drm_wire.framing import PAYLOAD_KEY, Buffer, FrameDecoder, encode_frame
from drm_wire.messages import Hello, Message, PeerRole, Welcome, from_frame
from drm_wire.protocol import SUPPORTED_VERSIONS

__all__ = ["RawConsumer", "vm_size"]

#: Bound on any one step against the enclave (it only bounds a hang).
STEP: Final = 30.0


def vm_size(pid: int, field: Literal["VmSize", "VmPeak"] = "VmSize") -> int:
    """A process's virtual memory size in bytes (``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no {field} for process {pid}")


def _unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


#: One tensor of :meth:`RawConsumer.infer`: name, dtype, shape (unchecked), raw bytes.
RawTensor = tuple[str, str, Sequence[int], bytes]


class RawConsumer:
    """One connection to the consumer port, driven frame by frame."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.closed = False
        self._ids = itertools.count(1)

    @classmethod
    async def connect(
        cls, host: str, port: int, *, hello: bool = True, local_address: str | None = None
    ) -> RawConsumer:
        """Connect, handshake (not verifying the enclave) and, by default, say hello;
        from ``local_address`` if given (another loopback address is another client)."""
        with trio.fail_after(STEP):
            tcp = await trio.open_tcp_stream(host, port, local_address=local_address)
            stream = trio.SSLStream(tcp, _unverified_context(), server_hostname=host)
            await stream.do_handshake()
            consumer = cls(stream)
            if hello:
                await consumer.hello()
        return consumer

    async def hello(self) -> None:
        """Say hello with this build's versions; the enclave must welcome it."""
        await self.send(
            Hello(versions=SUPPORTED_VERSIONS, role=PeerRole.CONSUMER, software="hostile")
        )
        reply = await self.receive()
        if not isinstance(reply, Welcome):
            raise AssertionError(f"the enclave did not welcome the hello: {reply!r}")

    async def send(self, message: Message) -> None:
        await self.send_frame(*message.to_wire())

    async def send_frame(self, header: Header, payload: Sequence[Buffer] = ()) -> None:
        """Send a frame built from a plain dict: no message class checks it first."""
        for buffer in encode_frame(header, payload):
            await self.stream.send_all(buffer)

    async def infer(self, model: str, tensors: Sequence[RawTensor]) -> Message | None:
        """One ``infer`` frame with ``wait = 0``, and the enclave's reply to it."""
        header = {
            "type": "infer",
            "request_id": next(self._ids),
            "model": model,
            "inputs": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s, _ in tensors],
            "wait": 0.0,
        }
        await self.send_frame(header, [data for *_, data in tensors if data])
        return await self.receive()

    async def announce(self, payload_len: int, *, model: str = "tiny", sent: int = 1) -> None:
        """Send an ``infer`` header announcing ``payload_len`` payload bytes, and the
        first ``sent`` of them."""
        header = {
            "type": "infer",
            "request_id": 1,
            "model": model,
            "inputs": [{"name": "x", "dtype": "float32", "shape": [payload_len // 16, 4]}],
            "wait": None,
            PAYLOAD_KEY: payload_len,
        }
        body = pack_header(header)
        await self.stream.send_all(struct.pack(">I", len(body)) + body + b"\0" * sent)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Message | None:
        """The next message from the enclave, or ``None`` once it closed the connection.

        A connection reset counts as closed too: the enclave may cut a peer whose bytes it
        no longer reads. Bounded by :data:`STEP`.
        """
        with trio.fail_after(STEP):
            while (frame := self.decoder.next_frame()) is None:
                if self.decoder.eof:
                    self.closed = True
                    return None
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                self.decoder.receive_data(data)
        return from_frame(frame)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
