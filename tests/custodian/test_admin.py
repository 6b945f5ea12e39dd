"""The admin API over real TLS on loopback: the operations that should work.

The hostile catalogue is in ``test_admin_hostile.py``; both use the ``server`` fixture from
``admin_server.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
from contextlib import suppress
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from prometheus_client.parser import text_string_to_metric_families

from drm_custodian._admin_serve import PLAIN_HTTP_HINT
from drm_custodian.admin import AdminApp, RecordingHooks, hypercorn_config, serve_admin
from drm_custodian.admin_client import AdminClient, AdminClientError, format_usage
from drm_custodian.ledger import BorrowerBlocked, SupplyResult
from drm_custodian.state import init_state_dir
from drm_lab.pccs import PccsBehaviour, running_pccs
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_cache import CollateralCache
from drm_wire.attestation.pccs import CaType, PccsClient
from drm_wire.errors import ConfigError

from ..attestation.dcap_helpers import REAL_NOW
from ..attestation.test_pccs import FMSPC, REAL
from .admin_server import BORROWER, FORM, JSON, Reply, Server, admin_server
from .admin_server import server as server  # the fixture


def _last_call(server: Server) -> tuple[str, str, object]:
    return server.hooks.calls[-1]


async def _client(server: Server, method: str, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(partial(getattr(server.client, method), *args, **kwargs))


async def test_supply_with_form_adds_and_calls_the_hook(server: Server) -> None:
    reply = await server.call("POST", "/supply_inferences", b"number_inferences=5", [FORM])
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    doc = reply.json()
    assert (doc["added"], doc["supplied"], doc["remaining"], doc["replayed"]) == (5, 5, 5, False)
    doc = await _client(server, "supply", 3)
    assert (doc["supplied"], doc["remaining"]) == (8, 8)
    assert server.hooks.calls == [("supplied", BORROWER, None)] * 2


async def test_supply_with_json(server: Server) -> None:
    body = json.dumps({"number_inferences": 7}).encode()
    reply = await server.call("POST", "/supply_inferences", body, [JSON])
    assert reply.status == 200
    assert reply.json()["supplied"] == 7
    charset = ("Content-Type", "application/json; charset=utf-8")
    assert (await server.call("POST", "/supply_inferences", body, [charset])).status == 200
    assert (await server.balance()).supplied == 14


async def test_idempotency_key_retry_counts_once(server: Server) -> None:
    key = [("Idempotency-Key", "op-2026-11-25:topup.1")]
    first = await server.call("POST", "/supply_inferences", b"number_inferences=5", [FORM, *key])
    again = await server.call("POST", "/supply_inferences", b"number_inferences=5", [FORM, *key])
    assert (first.status, again.status) == (200, 200)
    assert (first.json()["replayed"], again.json()["replayed"]) == (False, True)
    # The replay added nothing, and says so: a script summing "added" counts 5, not 10.
    assert (first.json()["added"], again.json()["added"]) == (5, 0)
    assert again.json()["supplied"] == 5
    other = await server.call("POST", "/supply_inferences", b"number_inferences=6", [FORM, *key])
    assert other.status == 422
    assert other.json()["field"] == "Idempotency-Key"
    assert (await server.balance()).supplied == 5
    doc = await _client(server, "supply", 2, idempotency_key="cli-1")
    doc = await _client(server, "supply", 2, idempotency_key="cli-1")
    assert (doc["supplied"], doc["replayed"], doc["added"]) == (7, True, 0)


async def test_concurrent_supplies_all_count(server: Server) -> None:
    # Threat model D05: 50 concurrent POSTs of 1 grow the ledger by exactly 50.
    limiter = trio.CapacityLimiter(50)
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(
                partial(trio.to_thread.run_sync, server.client.supply, 1, limiter=limiter)
            )
    assert (await server.balance()).supplied == 50
    assert len(server.hooks.calls) == 50


async def test_block_and_unblock(server: Server) -> None:
    await _client(server, "supply", 10)
    reply = await server.call("POST", "/block", b"reason=unpaid+invoice", [FORM])
    assert reply.status == 200
    assert reply.json()["blocked"] is True
    assert _last_call(server) == ("blocked", BORROWER, "unpaid invoice")
    with pytest.raises(BorrowerBlocked):
        await server.ledger.record_grant(BORROWER, "instance-1", 1)
    doc = await _client(server, "unblock")
    assert doc["blocked"] is False
    assert _last_call(server) == ("unblocked", BORROWER, None)
    await server.ledger.record_grant(BORROWER, "instance-1", 1)
    # No body at all is fine for both; JSON works too.
    assert (await server.call("POST", "/block")).json()["blocked"] is True
    body = json.dumps({"reason": "audit"}).encode()
    assert (await server.call("POST", "/unblock", body, [JSON])).json()["blocked"] is False
    assert _last_call(server) == ("unblocked", BORROWER, None)
    assert ("blocked", BORROWER, "") in server.hooks.calls


async def test_a_block_may_wait_for_its_acknowledgements_boundedly(server: Server) -> None:
    """``wait`` (seconds, 0 to 10) is handed to the daemon, which answers once every live
    instance acknowledged the block (I25); the answer counts those that did."""
    reply = await server.call("POST", "/block", b"reason=audit&wait=2.5", [FORM])
    assert reply.status == 200
    assert reply.json()["block_acknowledged"] == 0  # the recording hooks have no instance
    assert ("wait_block_acked", BORROWER, 2.5) in server.hooks.calls
    body = json.dumps({"wait": 10}).encode()
    assert (await server.call("POST", "/block", body, [JSON])).status == 200
    assert ("wait_block_acked", BORROWER, 10.0) in server.hooks.calls
    calls = len(server.hooks.calls)
    for bad, kind in (
        (b"wait=-1", FORM),
        (b"wait=10.5", FORM),
        (b"wait=nan", FORM),
        (b"wait=inf", FORM),
        (b"wait=1e999", FORM),
        (b"wait=soon", FORM),
        (b"wait=" + b"1" * 9, FORM),
        (json.dumps({"wait": True}).encode(), JSON),
        (json.dumps({"wait": "1"}).encode(), JSON),
        (json.dumps({"wait": 11}).encode(), JSON),
    ):
        reply = await server.call("POST", "/block", bad, [kind])
        assert reply.status == 400, bad
        assert reply.json()["field"] == "wait", bad
    assert len(server.hooks.calls) == calls  # nothing was blocked by a refused call
    # ``wait`` is the block's alone.
    reply = await server.call("POST", "/unblock", b"wait=1", [FORM])
    assert reply.status == 400


async def test_usage_reports_every_number(server: Server) -> None:
    await _client(server, "supply", 10)
    await server.ledger.record_grant(BORROWER, "instance-1", 4)
    # 3 inferences in 2 requests (a batch of 2 and a single one).
    await server.ledger.record_usage(BORROWER, "instance-1", 3, 1, requests_total=2)
    server.hooks.connected = 2
    doc = await _client(server, "usage")
    assert doc == {
        "borrower": BORROWER,
        "supplied": 10,
        "granted": 4,
        "served": 3,
        "requests": 2,
        "in_doubt": 1,
        "returned": 0,
        "reclaimed": 0,
        "remaining": 6,
        "blocked": False,
        "instances": 2,
        "by_instance": [
            {
                "instance": "instance-1",
                "state": "in_doubt",
                "granted": 4,
                "served": 3,
                "returned": 0,
                "reclaimed": 0,
                "in_doubt": 1,
            }
        ],
        "by_instance_omitted": 0,
    }
    assert format_usage(doc).splitlines()[1].split() == ["supplied", "10"]


async def test_healthz_needs_no_token(server: Server) -> None:
    reply = await server.call("GET", "/healthz", auth=False)
    assert (reply.status, reply.json()) == (200, {"status": "ok"})


async def test_metrics_parse(server: Server) -> None:
    await _client(server, "supply", 9)
    await server.ledger.record_grant(BORROWER, "instance-1", 2)
    await server.ledger.record_usage(BORROWER, "instance-1", 2, 1, requests_total=1)
    server.hooks.connected = 1
    assert (await server.call("GET", "/usage", auth=False)).status == 401
    reply = await server.call("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.body.decode())
        for sample in family.samples
    }
    label = (("borrower", BORROWER),)
    assert samples[("drm_custodian_supplied", label)] == 9
    assert samples[("drm_custodian_granted", label)] == 2
    assert samples[("drm_custodian_remaining", label)] == 7
    assert samples[("drm_custodian_served", label)] == 2  # inferences (items)...
    assert samples[("drm_custodian_requests", label)] == 1  # ...in one batch request
    assert samples[("drm_custodian_blocked", label)] == 0
    assert samples[("drm_custodian_instances", label)] == 1
    ok = (("endpoint", "/supply_inferences"), ("status", "200"))
    denied = (("endpoint", "/usage"), ("status", "401"))
    assert samples[("drm_custodian_admin_requests_total", ok)] == 1
    assert samples[("drm_custodian_admin_requests_total", denied)] == 1


async def test_metrics_give_the_age_of_each_cached_collateral(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The PCCS cache's age per platform and CA, fetched from a test PCCS over real TLS."""
    wall = [REAL_NOW]
    async with (
        running_pccs(tmp_path, PccsBehaviour(bundle=dict(REAL))) as pccs,
        PccsClient(pccs.url, ca=pccs.ca_path) as client,
    ):

        async def fetch(fmspc: bytes, ca: CaType) -> Collateral:
            return await client.fetch(fmspc, ca=ca)

        cache = CollateralCache(fetch, clock=lambda: wall[0])
        async with admin_server(tmp_path, nursery, collateral_ages=cache.ages) as server:
            assert _collateral_ages(await server.call("GET", "/metrics")) == {}
            async with trio.open_nursery() as cache_nursery:
                await cache_nursery.start(cache.run)
                with trio.fail_after(20):
                    await cache.wait_for(FMSPC)  # the first CA type...
                    while len(cache.ages()) < 2:  # ...then the other, one refresh later
                        await cache.changed()
                wall[0] += timedelta(seconds=90)
                reply = await server.call("GET", "/metrics")
                cache_nursery.cancel_scope.cancel()
    assert _collateral_ages(reply) == {("00A067110000", "processor"): 90.0,
                                       ("00A067110000", "platform"): 90.0}  # fmt: skip


def _collateral_ages(reply: Reply) -> dict[tuple[str, str], float]:
    assert reply.status == 200
    return {
        (sample.labels["fmspc"], sample.labels["ca"]): sample.value
        for family in text_string_to_metric_families(reply.body.decode())
        for sample in family.samples
        if sample.name == "drm_custodian_collateral_age_seconds"
    }


async def test_logs_name_the_client_and_never_the_token(server: Server) -> None:
    token = server.state.admin_token
    with structlog.testing.capture_logs() as logs:
        await _client(server, "supply", 4)
        await server.call("GET", "/usage", auth=False, headers=[("Authorization", "Bearer x")])
        wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
        await server.call(
            "GET", "/usage", auth=False, headers=[("Authorization", f"Bearer {wrong}")]
        )
    events = {entry["event"]: entry for entry in logs}
    assert events["admin_supply"]["units"] == 4
    assert (events["admin_supply"]["supplied_before"], events["admin_supply"]["supplied"]) == (0, 4)
    assert events["admin_supply"]["client"].startswith("127.0.0.1:")
    assert events["admin_auth_failed"]["reason"] == "mismatch"
    assert token[:-1] not in repr(logs)


async def test_hook_failure_answers_500_but_the_supply_stands(server: Server) -> None:
    class Boom(RecordingHooks):
        async def on_supplied(self, borrower: str, result: SupplyResult) -> None:
            await super().on_supplied(borrower, result)
            if len(self.calls) == 1:
                raise RuntimeError("push failed")

    hooks = Boom()
    server.app._hooks = hooks
    key = [FORM, ("Idempotency-Key", "k1")]
    with structlog.testing.capture_logs() as logs:
        reply = await server.call("POST", "/supply_inferences", b"number_inferences=3", key)
    assert reply.status == 500
    assert any(entry["event"] == "admin_request_failed" for entry in logs)
    retry = await server.call("POST", "/supply_inferences", b"number_inferences=3", key)
    assert (retry.status, retry.json()["replayed"], retry.json()["supplied"]) == (200, True, 3)
    assert len(hooks.calls) == 2


async def test_client_reports_server_errors(server: Server) -> None:
    with pytest.raises(AdminClientError) as info:
        await _client(server, "supply", 0)
    assert (info.value.status, info.value.field) == (400, "number_inferences")
    bad = AdminClient(server.client.url, "x" * 43, server.state.ca_cert_path)
    with pytest.raises(AdminClientError) as info:
        await trio.to_thread.run_sync(bad.usage)
    assert (info.value.status, info.value.error) == (401, "unauthorized")


async def test_client_refuses_a_server_it_cannot_verify(server: Server, tmp_path: Path) -> None:
    other = await init_state_dir(tmp_path / "other")
    client = AdminClient(server.client.url, server.state.admin_token, other.ca_cert_path)
    with pytest.raises(AdminClientError, match="TLS failed"):
        await trio.to_thread.run_sync(client.usage)


async def test_plain_http_is_told_to_use_https_and_not_served(server: Server) -> None:
    """``http://`` to the HTTPS port: a plain 400 naming the https:// URL, nothing acted
    on (no token is even looked at), and the port goes on serving HTTPS."""
    before = await server.balance()

    def plain(method: str, path: str, body: bytes | None) -> tuple[int, str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request(method, path, body=body, headers={"Authorization": "Bearer x"})
            response = conn.getresponse()
            return (
                response.status,
                response.getheader("Content-Type") or "",
                response.read().decode(),
            )
        finally:
            conn.close()

    for method, path, body in [
        ("GET", "/healthz", None),
        ("POST", "/supply_inferences", b"number_inferences=5"),
    ]:
        status, content_type, text = await trio.to_thread.run_sync(plain, method, path, body)
        assert status == 400
        assert content_type.startswith("text/plain")
        assert text == PLAIN_HTTP_HINT.format(url=f"https://127.0.0.1:{server.port}/")
    assert await server.balance() == before
    assert (await server.call("GET", "/healthz")).status == 200  # still serving


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_with_http_gets_the_hint(server: Server) -> None:
    result = await trio.run_process(
        ["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{server.port}/usage"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.decode() == f"this port speaks HTTPS: use https://127.0.0.1:{server.port}/\n"
    )


async def test_bytes_that_are_neither_tls_nor_http_are_closed(server: Server) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"\x00\x01garbage\r\n\r\n")
        with trio.fail_after(10), suppress(trio.BrokenResourceError):  # closed or reset
            assert await stream.receive_some() == b""  # no answer
    assert (await server.call("GET", "/healthz")).status == 200


@pytest.mark.parametrize(("size", "statuses"), [(9000, {431}), (200_000, {400, 431})])
async def test_oversized_headers_are_refused(server: Server, size: int, statuses: set[int]) -> None:
    before = await server.balance()
    headers = [FORM, ("X-Padding", "a" * size)]
    try:
        reply = await server.call("POST", "/supply_inferences", b"number_inferences=5", headers)
    except (http.client.HTTPException, OSError):
        assert size > 9000  # h11 may close mid-request without an answer
    else:
        assert reply.status in statuses
    assert await server.balance() == before
    assert (await server.call("GET", "/healthz")).status == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not on PATH")
async def test_curl_works(server: Server) -> None:
    argv = [
        "curl", "--silent", "--show-error", "--fail-with-body",
        "--cacert", os.fspath(server.state.ca_cert_path),
        "-H", f"Authorization: Bearer {server.state.admin_token}",
        "-d", "number_inferences=5",
        f"https://127.0.0.1:{server.port}/supply_inferences",
    ]  # fmt: skip
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["supplied"] == 5
    assert (await server.balance()).supplied == 5


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "localhost", "::"])
async def test_admin_binds_to_loopback_only(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError) as info:
        await serve_admin(
            AdminApp(ledger=None, hooks=RecordingHooks(), token="t", borrower=BORROWER),  # type: ignore[arg-type]
            certfile=tmp_path / "c",
            keyfile=tmp_path / "k",
            host=host,
        )
    assert info.value.key == "host"


def test_hypercorn_config_limits() -> None:
    config = hypercorn_config(certfile="c.pem", keyfile="k.pem", host="::1", port=0)
    assert config.bind == ["[::1]:0"]
    assert config.alpn_protocols == ["http/1.1"]
    assert (config.read_timeout, config.keep_alive_timeout, config.ssl_handshake_timeout) == (
        10,
        5.0,
        10.0,
    )
    assert config.h11_max_incomplete_size == 8 * 1024
    assert config.accesslog is None


async def test_client_from_state(server: Server) -> None:
    client = AdminClient.from_state(server.state, port=server.port)
    assert client.url == f"https://127.0.0.1:{server.port}"
    assert server.state.admin_token not in repr(client)
    doc = await trio.to_thread.run_sync(client.block, "maintenance")
    assert doc["blocked"] is True
    assert _last_call(server) == ("blocked", BORROWER, "maintenance")
    assert AdminClient.from_state(server.state, host="::1", port=1).url == "https://[::1]:1"


async def test_client_reports_an_unreachable_server(server: Server) -> None:
    with trio.socket.socket() as sock:  # a port that was free a moment ago
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = AdminClient(f"https://127.0.0.1:{port}", "t", server.state.ca_cert_path, timeout=2)
    with pytest.raises(AdminClientError, match="cannot reach") as info:
        await trio.to_thread.run_sync(client.usage)
    assert info.value.status is None
    with pytest.raises(AdminClientError, match="https://"):
        await trio.to_thread.run_sync(AdminClient("http://x", "t", "ca.pem").usage)
