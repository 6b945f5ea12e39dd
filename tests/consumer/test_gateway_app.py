"""The gateway's HTTP statuses for every answer an enclave can give, in one process.

The gateway app runs under hypercorn on a loopback port, its pool connects (RA-TLS,
attested) to :class:`~tests.consumer.fake_enclave.FakeEnclave` (the product's consumer-link
server stack with scripted answers), and httpx speaks HTTP to it: every error code, a
connection the enclave ends with ``busy``, and a model that is not loaded yet.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator
from functools import partial

import httpx
import hypercorn.trio
import pytest
import trio

from drm_consumer.client import Client
from drm_consumer.gateway.app import GatewayApp
from drm_consumer.gateway.command import hypercorn_config
from drm_consumer.gateway.pool import EnclavePool
from drm_wire.attestation.policy import Policy
from drm_wire.errors import ErrorCode
from drm_wire.messages import EnclaveState, Error, InferenceRequest
from drm_wire.net.channel import MessageChannel
from tests.consumer.fake_enclave import HOST, FakeEnclave, answer, fail_with

BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
).encode()


@pytest.fixture
async def gateway(
    nursery: trio.Nursery, fake_enclave: FakeEnclave, policy: Policy
) -> AsyncIterator[httpx.AsyncClient]:
    pool = EnclavePool(partial(Client.connect, HOST, fake_enclave.port, policy=policy), size=1)
    app = GatewayApp(pool, default_wait=0)
    nursery.start_soon(pool.run)
    binds = await nursery.start(
        partial(hypercorn.trio.serve, app, hypercorn_config(HOST, 0), mode="asgi")
    )
    async with httpx.AsyncClient(base_url=binds[0], timeout=30) as client:
        yield client


async def test_a_result_carries_cost_and_inferences_left(
    gateway: httpx.AsyncClient, fake_enclave: FakeEnclave
) -> None:
    reply = await gateway.post("/v2/models/tiny/infer", content=BODY)
    assert reply.status_code == 200
    document = reply.json()
    assert document["parameters"] == {"cost": 1, "inferences_left": 99}
    assert document["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [2.0, 4.0, 6.0, 8.0]}
    ]


@pytest.mark.parametrize(
    ("code", "status", "retry_after"),
    [
        (ErrorCode.BAD_REQUEST, 400, None),
        (ErrorCode.LIMIT_EXCEEDED, 400, None),
        (ErrorCode.MODEL_NOT_FOUND, 404, None),
        (ErrorCode.NO_INFERENCES, 429, "1"),
        (ErrorCode.BUSY, 429, "1"),
        (ErrorCode.BLOCKED, 403, None),
        (ErrorCode.CUSTODIAN_UNREACHABLE, 503, "5"),
        (ErrorCode.MODEL_UNAVAILABLE, 503, "30"),
        (ErrorCode.INFERENCE_FAILED, 500, None),
        (ErrorCode.TIMEOUT, 502, None),  # a code no request should get: not ours to name
    ],
)
async def test_every_error_code_has_its_status(
    gateway: httpx.AsyncClient,
    fake_enclave: FakeEnclave,
    code: ErrorCode,
    status: int,
    retry_after: str | None,
) -> None:
    fake_enclave.behaviour = fail_with(code, "the enclave's own words")
    reply = await gateway.post("/v2/models/tiny/infer", content=BODY)
    assert reply.status_code == status
    assert reply.headers.get("retry-after") == retry_after
    assert "the enclave's own words" in reply.json()["error"]


async def test_a_connection_the_enclave_ends_busy_is_503_and_replaced(
    gateway: httpx.AsyncClient, fake_enclave: FakeEnclave
) -> None:
    async def end_busy(fake: FakeEnclave, channel: MessageChannel, _: InferenceRequest) -> None:
        await channel.send(Error(code=ErrorCode.BUSY, message="too many connections"))
        await channel.aclose()

    fake_enclave.behaviour = end_busy
    reply = await gateway.post("/v2/models/tiny/infer", content=BODY)
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "1"
    assert fake_enclave.handshakes_completed == 1

    fake_enclave.behaviour = fail_with(ErrorCode.BLOCKED)
    with trio.fail_after(10):
        reply = await gateway.post("/v2/models/tiny/infer", content=BODY)
    assert reply.status_code == 403  # answered over a new, attested connection
    assert fake_enclave.handshakes_completed == 2


async def test_a_model_not_loaded_yet_is_503_not_404(
    gateway: httpx.AsyncClient, fake_enclave: FakeEnclave
) -> None:
    fake_enclave.state = EnclaveState.LOADING
    reply = await gateway.get("/v2/models/other")
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "5"
    assert (await gateway.get("/v2/health/ready")).status_code == 400
    fake_enclave.state = EnclaveState.SERVING
    assert (await gateway.get("/v2/models/other")).status_code == 404
    assert (await gateway.get("/v2/health/ready")).status_code == 200


# --- stopping ------------------------------------------------------------------------------


@pytest.fixture
async def held(
    nursery: trio.Nursery, fake_enclave: FakeEnclave, policy: Policy
) -> AsyncIterator[tuple[httpx.AsyncClient, GatewayApp, trio.Event, trio.Event]]:
    """A gateway whose enclave holds every inference until the second event is set; the
    first is set when one arrives."""
    arrived, release = trio.Event(), trio.Event()

    async def hold(fake: FakeEnclave, channel: MessageChannel, request: InferenceRequest) -> None:
        arrived.set()
        await release.wait()
        await answer(fake, channel, request)

    fake_enclave.behaviour = hold
    pool = EnclavePool(partial(Client.connect, HOST, fake_enclave.port, policy=policy), size=1)
    app = GatewayApp(pool, default_wait=0)
    nursery.start_soon(pool.run)
    binds = await nursery.start(
        partial(hypercorn.trio.serve, app, hypercorn_config(HOST, 0), mode="asgi")
    )
    async with httpx.AsyncClient(base_url=binds[0], timeout=30) as client:
        yield client, app, arrived, release


async def test_draining_refuses_new_work_and_lets_the_running_request_finish(
    held: tuple[httpx.AsyncClient, GatewayApp, trio.Event, trio.Event],
) -> None:
    client, app, arrived, release = held
    replies: list[httpx.Response] = []

    async def infer() -> None:
        replies.append(await client.post("/v2/models/tiny/infer", content=BODY))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(infer)
        await arrived.wait()
        assert app.in_flight == 1
        app.start_draining()
        ready = await client.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (
            503,
            {"ready": False, "reason": "the gateway is stopping"},
        )
        assert ready.headers["connection"] == "close"
        assert (await client.get("/v2/models/tiny/ready")).status_code == 503
        assert (await client.get("/v2/health/live")).status_code == 200
        refused = await client.post("/v2/models/tiny/infer", content=BODY)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json() == {"error": "the gateway is stopping"}
        release.set()
        with trio.fail_after(10):
            await app.drained()
    (reply,) = replies
    assert reply.status_code == 200
    assert reply.json()["parameters"]["cost"] == 1
    assert app.in_flight == 0


async def test_abandon_answers_the_running_request_503(
    held: tuple[httpx.AsyncClient, GatewayApp, trio.Event, trio.Event],
) -> None:
    client, app, arrived, _release = held
    replies: list[httpx.Response] = []

    async def infer() -> None:
        replies.append(await client.post("/v2/models/tiny/infer", content=BODY))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(infer)
        await arrived.wait()
        app.start_draining()
        assert app.abandon() == 1
        with trio.fail_after(10):
            await app.drained()
    (reply,) = replies
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "1"
    assert "stopped before this request was answered" in reply.json()["error"]
    assert app.abandon() == 0


def test_hypercorn_reads_the_body_in_the_gateway_s_read_size() -> None:
    """hypercorn has no setting for it: the gateway sets the module's read size, and an
    upgrade that renames it must fail here rather than silently fall back to 64 KiB."""
    import hypercorn.trio.tcp_server

    from drm_consumer.gateway.command import RECV_BYTES

    hypercorn_config(HOST, 0)
    assert hypercorn.trio.tcp_server.MAX_RECV == RECV_BYTES == 256 * 1024
    # ... and hypercorn still reads with it (a module global is set whether used or not).
    source = inspect.getsource(hypercorn.trio.tcp_server)
    assert "receive_some(MAX_RECV)" in source
