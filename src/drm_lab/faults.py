"""Fault injection for the end-to-end tests: a loopback TCP fault proxy.

:class:`FaultProxy` sits between the enclave and the custodian on 127.0.0.1. Each
direction has a :class:`Gate`: open, it forwards bytes; closed, it stops *reading* (so TCP
back-pressure reaches the sender) without closing anything, which is a silent partition.
A gate may also be given a byte budget: it forwards exactly that many bytes, then closes
itself and sets :attr:`Gate.exhausted`, so a test can stop a model upload at a known
point instead of racing it. A gate may also hold each chunk for :attr:`Gate.delay`
seconds before forwarding it (a slow or congested path that still delivers everything,
in order). When either end of a proxied connection closes, the proxy
closes the other end (once the gates let it see that); :meth:`FaultProxy.cut` closes
every proxied connection at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

import trio

from drm_lab.processes import LOOPBACK

__all__ = ["FaultProxy", "Gate", "fault_proxy"]

#: Bytes read at once by a proxy pump.
CHUNK: Final = 64 * 1024


class Gate:
    """One direction of the proxy: open, closed (silent), or open for a byte budget."""

    def __init__(self) -> None:
        self._open = True
        self._opened = trio.Event()
        self._opened.set()
        self._budget: int | None = None
        #: Set when a byte budget has been used up (the gate then closed itself).
        self.exhausted = trio.Event()
        #: Bytes forwarded in this direction, all connections together.
        self.forwarded = 0
        #: Seconds each chunk is held before it is forwarded (0: none).
        self.delay = 0.0

    @property
    def is_open(self) -> bool:
        return self._open

    def close(self) -> None:
        """Stop forwarding (and reading): the peers see silence, not a close."""
        if self._open:
            self._open = False
            self._opened = trio.Event()

    def open(self) -> None:
        """Forward everything again, with no budget."""
        self._budget = None
        self._open = True
        self._opened.set()

    def limit(self, nbytes: int) -> None:
        """Forward exactly ``nbytes`` more bytes, then close and set :attr:`exhausted`."""
        if nbytes < 1:
            raise ValueError("a budget is at least one byte")
        self._budget = nbytes
        self.exhausted = trio.Event()

    async def wait_open(self) -> None:
        while not self._open:
            await self._opened.wait()

    def allowance(self, want: int) -> int:
        return want if self._budget is None else min(want, self._budget)

    def spend(self, nbytes: int) -> None:
        self.forwarded += nbytes
        if self._budget is not None:
            self._budget -= nbytes
            if self._budget <= 0:
                self._budget = None
                self.close()
                self.exhausted.set()


@dataclass(eq=False)
class FaultProxy:
    """A TCP proxy from :attr:`port` (127.0.0.1) to ``target_port``; see the module doc.

    Attributes:
        upstream: enclave -> custodian.
        downstream: custodian -> enclave.
        accepted: connections accepted so far.
    """

    target_port: int
    port: int = 0
    upstream: Gate = field(default_factory=Gate)
    downstream: Gate = field(default_factory=Gate)
    accepted: int = 0
    _live: set[trio.CancelScope] = field(default_factory=set)

    def partition(self) -> None:
        """A silent partition: nothing passes either way, nothing is closed."""
        self.upstream.close()
        self.downstream.close()

    def heal(self) -> None:
        """Open both gates and take away any delay."""
        self.upstream.open()
        self.downstream.open()
        self.upstream.delay = self.downstream.delay = 0.0

    def slow(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` in both directions (:meth:`heal` ends it)."""
        self.upstream.delay = self.downstream.delay = seconds

    @property
    def connections(self) -> int:
        """Proxied connections open now."""
        return len(self._live)

    def cut(self) -> int:
        """Close every proxied connection now, both ends (a pulled cable, a borrower that
        cuts its link); new connections are proxied as before. Returns how many."""
        live = list(self._live)
        for scope in live:
            scope.cancel()
        return len(live)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        sock = trio.socket.socket()
        live = trio.CancelScope()  # what cut() cancels
        self._live.add(live)
        try:
            try:
                await sock.connect((LOOPBACK, self.target_port))
                server = trio.SocketStream(sock)
            except OSError:  # the custodian is down: the enclave sees a closed connection
                return
            with live:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, client, server, self.upstream, nursery.cancel_scope)
                    nursery.start_soon(_pump, server, client, self.downstream, nursery.cancel_scope)
        finally:
            self._live.discard(live)
            sock.close()
            await trio.aclose_forcefully(client)


async def _pump(
    src: trio.SocketStream, dst: trio.SocketStream, gate: Gate, both: trio.CancelScope
) -> None:
    """Copy ``src`` to ``dst`` while ``gate`` allows; an end or error ends both directions."""
    try:
        while True:
            await gate.wait_open()
            data = await src.receive_some(gate.allowance(CHUNK))
            if not data:
                return
            if gate.delay > 0:  # the injected latency itself, not a wait for anything
                await trio.sleep(gate.delay)
            await gate.wait_open()  # closed while this read was pending: hold the bytes
            await dst.send_all(data)
            gate.spend(len(data))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
    finally:
        both.cancel()


@asynccontextmanager
async def fault_proxy(target_port: int) -> AsyncIterator[FaultProxy]:
    """Run a :class:`FaultProxy` to ``target_port`` for the duration of the block."""
    proxy = FaultProxy(target_port)
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    proxy.port = listeners[0].socket.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, proxy._handle, listeners)
            try:
                yield proxy
            finally:
                nursery.cancel_scope.cancel()
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
