"""A PCS/PCCS on loopback, written to Intel's Provisioning Certification Service API v4,
serving the real collateral of ``tests/data/sgx/`` (or any bundle) over HTTPS.

It reproduces the differences between Intel's PCS and a PCCS that a client must handle:
the TCB info issuer-chain header in its v4 (``TCB-Info-Issuer-Chain``) or v3
(``SGX-TCB-Info-Issuer-Chain``) spelling, and the CRL body as DER, PEM or hex text. Chains
are URL-encoded PEM, as Intel sends them. Hostile variants (a tampered body, a missing
header, an error status, an oversized body) are switches, so each test names the one
thing that differs.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote

import hypercorn.trio
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypercorn.config import Config

from drm_daemon.asgi import HttpApp
from drm_lab.certs import Pems, make_ca, make_leaf

Encoding = Literal["der", "pem", "hex"]


@dataclass
class PccsBehaviour:
    """What the test service answers; change fields between requests to change it."""

    bundle: dict[str, Any]
    tcb_header: str = "TCB-Info-Issuer-Chain"  # v3: "SGX-TCB-Info-Issuer-Chain"
    crl_encoding: Encoding | None = None  # None: as Intel's PCS (DER if asked, else PEM)
    root_crl_encoding: Encoding = "der"
    tamper_tcb_info: bool = False
    drop_header: str | None = None
    status: int = 200
    oversized: bool = False
    requests: list[tuple[str, dict[str, list[str]]]] = field(default_factory=list)


def _crl(hex_der: str, encoding: Encoding) -> bytes:
    der = bytes.fromhex(hex_der)
    if encoding == "der":
        return der
    if encoding == "hex":
        return hex_der.encode()
    crl = x509.load_der_x509_crl(der)
    return crl.public_bytes(serialization.Encoding.PEM)


class PccsApp(HttpApp):
    """The ASGI app: the four GET endpoints of the v4 API a verifier uses."""

    def __init__(self, behaviour: PccsBehaviour) -> None:
        self.behaviour = behaviour

    def _answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes, dict[str, str]]:
        b = self.behaviour
        bundle = b.bundle
        chain = quote  # URL-encoded PEM, as Intel sends it
        if path == "/sgx/certification/v4/tcb":
            info = json.loads(bundle["tcb_info"])
            wanted = query.get("fmspc", [""])[0]
            if wanted.upper() != info["fmspc"].upper():
                return 404, b"", {}
            body = bundle["tcb_info"]
            if b.tamper_tcb_info:
                body = body.replace('"version":3', '"version": 3', 1)
            text = '{"tcbInfo":' + body + ',"signature":"' + bundle["tcb_info_signature"] + '"}'
            return 200, text.encode(), {b.tcb_header: chain(bundle["tcb_info_issuer_chain"])}
        if path == "/sgx/certification/v4/qe/identity":
            text = (
                '{"enclaveIdentity":' + bundle["qe_identity"]
                + ',"signature":"' + bundle["qe_identity_signature"] + '"}'
            )  # fmt: skip
            header = chain(bundle["qe_identity_issuer_chain"])
            return 200, text.encode(), {"SGX-Enclave-Identity-Issuer-Chain": header}
        if path == "/sgx/certification/v4/pckcrl":
            if query.get("ca", [""])[0] not in ("processor", "platform"):
                return 400, b"", {}
            asked = "der" if query.get("encoding", [""])[0] == "der" else "pem"
            body = _crl(bundle["pck_crl"], b.crl_encoding or asked)  # type: ignore[arg-type]
            return 200, body, {"SGX-PCK-CRL-Issuer-Chain": chain(bundle["pck_crl_issuer_chain"])}
        if path == "/sgx/certification/v4/rootcacrl":
            return 200, _crl(bundle["root_ca_crl"], b.root_crl_encoding), {}
        return 404, b"", {}

    async def http(self, scope: Any, receive: Any, send: Any) -> None:
        query = parse_qs(scope["query_string"].decode())
        self.behaviour.requests.append((scope["path"], query))
        status, body, headers = self._answer(scope["path"], query)
        if self.behaviour.status != 200:
            status, body = self.behaviour.status, b"error"
        if self.behaviour.oversized:
            body = b" " * (300 * 1024)
        headers = {k: v for k, v in headers.items() if k != self.behaviour.drop_header}
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


@dataclass
class RunningPccs:
    url: str
    ca_path: Path
    behaviour: PccsBehaviour


@asynccontextmanager
async def running_pccs(directory: Path, behaviour: PccsBehaviour) -> AsyncIterator[RunningPccs]:
    """Serve ``behaviour`` on 127.0.0.1 (HTTPS, a fresh test CA) until the block exits."""
    ca = make_ca("test PCCS CA")
    pems = Pems.of(ca, make_leaf(ca, "test PCCS"))
    for name, data in (("ca.pem", pems.ca), ("cert.pem", pems.cert), ("key.pem", pems.key)):
        (directory / name).write_bytes(data)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.certfile = str(directory / "cert.pem")
    config.keyfile = str(directory / "key.pem")
    config.alpn_protocols = ["http/1.1"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    done = trio.Event()

    async def shutdown() -> None:
        await done.wait()

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: hypercorn.trio.serve(
                PccsApp(behaviour),
                config,
                shutdown_trigger=shutdown,
                task_status=task_status,
                mode="asgi",
            )
        )
        port = int(binds[0].rsplit(":", 1)[1])
        try:
            yield RunningPccs(f"https://127.0.0.1:{port}", directory / "ca.pem", behaviour)
        finally:
            done.set()


@contextmanager
def pccs_in_background(directory: Path, behaviour: PccsBehaviour) -> Iterator[RunningPccs]:
    """:func:`running_pccs` on a thread of its own (its own trio loop), for tests whose
    daemons are processes: they reach it over HTTPS on loopback like any PCCS."""
    started: queue.Queue[tuple[RunningPccs, trio.lowlevel.TrioToken, trio.Event] | BaseException]
    started = queue.Queue()

    async def main() -> None:
        stop = trio.Event()
        try:
            async with running_pccs(directory, behaviour) as pccs:
                started.put((pccs, trio.lowlevel.current_trio_token(), stop))
                await stop.wait()
        except BaseException as exc:  # reported to the caller, who is waiting
            started.put(exc)
            raise

    thread = threading.Thread(target=trio.run, args=(main,), name="test-pccs", daemon=True)
    thread.start()
    first = started.get(timeout=30)
    if isinstance(first, BaseException):
        raise RuntimeError("the test PCCS did not start") from first
    pccs, token, stop = first
    try:
        yield pccs
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(timeout=30)
