"""A real admin server on loopback for the admin API tests, and a raw HTTPS caller.

Every call goes through a real socket, hypercorn, TLS verified against the custodian CA,
and a blocking stdlib client in a worker thread.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from drm_custodian.admin import AdminApp, RecordingHooks, serve_admin
from drm_custodian.admin_client import AdminClient
from drm_custodian.borrowers import BorrowerBook
from drm_custodian.ledger import Balance, Ledger
from drm_custodian.state import CustodianState, init_state_dir, load_state_dir
from drm_wire.attestation.pccs import CaType

BORROWER = "borrower"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    port: int
    state: CustodianState
    ledger: Ledger
    hooks: RecordingHooks
    client: AdminClient
    app: AdminApp
    auth: list[tuple[str, str]] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: Iterable[tuple[str, str]] = (),
        *,
        auth: bool = True,
    ) -> Reply:
        """One raw request, headers exactly as given (plus the token unless ``auth=False``)."""
        all_headers = [*(self.auth if auth else []), *headers]
        return await trio.to_thread.run_sync(
            _raw_call, self.port, self.state.ca_cert_path, method, path, body, all_headers
        )

    async def balance(self) -> Balance:
        return await self.ledger.balance(BORROWER)


def _raw_call(
    port: int,
    ca: Path,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None,
    headers: list[tuple[str, str]],
) -> Reply:
    context = ssl.create_default_context(cafile=os.fspath(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20)
    try:
        if body is None or isinstance(body, bytes):
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None and all(n.lower() != "content-length" for n, _ in headers):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        else:  # an iterable: sent chunked, with no Content-Length
            conn.request(method, path, body=body, headers=dict(headers), encode_chunked=True)
        response = conn.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        conn.close()


FORM = ("Content-Type", "application/x-www-form-urlencoded")
JSON = ("Content-Type", "application/json")


@pytest.fixture
async def server(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Server]:
    async with admin_server(tmp_path, nursery) as running:
        yield running


@asynccontextmanager
async def admin_server(
    tmp_path: Path,
    nursery: trio.Nursery,
    collateral_ages: Callable[[], Mapping[tuple[bytes, CaType], float]] | None = None,
    *,
    models: Sequence[str] | None = None,
) -> AsyncIterator[Server]:
    """The ``server`` fixture's server, with the app's optional parts given; with
    ``models``, it manages borrowers (a :class:`BorrowerBook` lending those models)."""
    made = await init_state_dir(tmp_path / "state")
    state = load_state_dir(made.path)
    ledger = await Ledger.open(state.ledger_path)
    hooks = RecordingHooks()
    app = AdminApp(
        ledger=ledger,
        hooks=hooks,
        token=state.admin_token,
        borrower=None if models is not None else BORROWER,
        book=BorrowerBook(state, models) if models is not None else None,
        body_timeout=1.0,
        collateral_ages=collateral_ages,
    )
    stop, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
        try:
            await serve_admin(
                app,
                certfile=state.server_cert_path,
                keyfile=state.server_key_path,
                port=0,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        finally:
            stopped.set()

    bound = await nursery.start(run)
    assert bound[0][0] == "127.0.0.1"
    port = bound[0][1]
    client = AdminClient(f"https://127.0.0.1:{port}", state.admin_token, state.ca_cert_path)
    auth = [("Authorization", f"Bearer {state.admin_token}")]
    try:
        yield Server(port, state, ledger, hooks, client, app, auth)
    finally:
        stop.set()  # the graceful path: the shutdown trigger returns, serve_admin ends
        with trio.fail_after(10):
            await stopped.wait()
        await ledger.aclose()
