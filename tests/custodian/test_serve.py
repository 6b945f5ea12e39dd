"""``serve()``: configuration checks, bound addresses, and the shutdown paths.

Links with enclaves are tested in ``test_enclave_link.py``; the real process in ``test_cli.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from drm_custodian.admin_client import AdminClient
from drm_custodian.ledger import Ledger
from drm_custodian.models import ModelFile
from drm_custodian.serve import BoundAddresses, ServeConfig, initial_supply_key, serve
from drm_custodian.state import CustodianState, LicenseRecord, init_state_dir, load_state_dir
from drm_daemon.listen import ListenError
from drm_lab.models import tiny_model
from drm_wire.attestation.policy import Policy
from drm_wire.errors import ConfigError

POLICY = Policy(mr_enclave=(hashlib.sha256(b"serve tests").digest(),), isv_prod_id=0)
TINY = ModelFile.from_bytes("tiny", tiny_model())


@pytest.fixture
async def state(tmp_path: Path) -> CustodianState:
    made = await init_state_dir(tmp_path / "state")
    return load_state_dir(made.path)


def _config(state: CustodianState, **changes: object) -> ServeConfig:
    values: dict[str, object] = {
        "state": state,
        "models": (TINY,),
        "policy": POLICY,
        "port": 0,
        "admin_port": 0,
    }
    return ServeConfig(**{**values, **changes})  # type: ignore[arg-type]


async def test_config_is_checked(state: CustodianState) -> None:
    with pytest.raises(ConfigError, match="at least one model"):
        _config(state, models=())
    with pytest.raises(ConfigError, match="same name"):
        _config(state, models=(TINY, TINY))
    with pytest.raises(ConfigError, match="port"):
        _config(state, port=70000)
    with pytest.raises(ConfigError, match="initial_inferences"):
        _config(state, initial_inferences=-1)
    with pytest.raises(ConfigError, match="no license"):
        _config(state, borrower="nobody").admin_borrower()


async def test_initial_inferences_with_several_borrowers_need_one_named(
    state: CustodianState,
) -> None:
    other = LicenseRecord("other", "lic_" + "0" * 32, "0" * 64)
    two = dataclasses.replace(state, licenses={**state.licenses, other.license_id: other})
    assert _config(two).admin_borrower() is None  # the admin API serves both
    with pytest.raises(ConfigError, match="several borrowers"):
        _config(two, initial_inferences=5).admin_borrower()
    assert _config(two, borrower="other", initial_inferences=5).admin_borrower() == "other"


async def test_initial_supply_key_is_per_state_directory(state: CustodianState) -> None:
    assert initial_supply_key(state) == initial_supply_key(state)
    assert initial_supply_key(state).startswith("initial-supply-")


async def test_listening_is_logged_and_cancel_takes_everything_down(
    state: CustodianState,
) -> None:
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            bound: BoundAddresses = await nursery.start(serve, _config(state, initial_inferences=4))
            admin = AdminClient.from_state(state, port=bound.admin[1])
            doc = await trio.to_thread.run_sync(admin.usage)
            assert doc["supplied"] == 4
            nursery.cancel_scope.cancel()  # not the trigger: a plain cancellation
    listening = next(e for e in logs if e["event"] == "custodian_listening")
    assert listening["enclave_address"] == f"127.0.0.1:{bound.enclave[1]}"
    assert listening["admin_address"] == f"127.0.0.1:{bound.admin[1]}"
    assert logs[-1]["event"] == "custodian_stopped"
    for port in (bound.enclave[1], bound.admin[1]):
        with pytest.raises(OSError, match="connect"):
            await trio.open_tcp_stream("127.0.0.1", port)
    # The ledger was closed and is intact; the initial supply happened once.
    ledger = await Ledger.open(state.ledger_path)
    try:
        assert (await ledger.balance("borrower")).supplied == 4
    finally:
        await ledger.aclose()


async def test_a_port_in_use_is_an_error_and_the_ledger_is_closed(
    state: CustodianState,
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        with capture_logs() as logs, pytest.raises(BaseExceptionGroup) as caught:
            await serve(_config(state, port=port))
        assert caught.group_contains(ListenError, match=f"127.0.0.1:{port}: another program")
        assert logs[-1]["event"] == "custodian_stopped"
    finally:
        for listener in listeners:
            await listener.aclose()


async def test_initial_inferences_are_supplied_once_whatever_n_says_later(
    state: CustodianState,
) -> None:
    for units in (4, 4, 6):
        with capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, _config(state, initial_inferences=units))
                nursery.cancel_scope.cancel()
    assert any(e["event"] == "initial_supply_skipped" for e in logs)
    ledger = await Ledger.open(state.ledger_path)
    try:
        assert (await ledger.balance("borrower")).supplied == 4
    finally:
        await ledger.aclose()


async def test_the_enclave_link_port_caps_its_connections(state: CustodianState) -> None:
    """I17: past ``max_links`` a connection is closed at once, logged and counted; the
    ones within the cap are served (here: still waiting in their TLS handshake)."""
    with pytest.raises(ConfigError, match="max_links"):
        _config(state, max_links=0)
    with pytest.raises(ConfigError, match="max_link_handshakes"):
        _config(state, max_link_handshakes=0)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            bound: BoundAddresses = await nursery.start(serve, _config(state, max_links=1))
            first = await trio.open_tcp_stream(*bound.enclave)
            second = await trio.open_tcp_stream(*bound.enclave)
            ended: list[trio.SocketStream] = []
            one_ended = trio.Event()

            async def wait_eof(stream: trio.SocketStream) -> None:
                while await stream.receive_some():
                    pass
                ended.append(stream)
                one_ended.set()

            # Which of the two the custodian took first is up to its scheduler; the other
            # is closed at once (the bound only stops a hang: the handshake timeout is 10 s).
            with trio.fail_after(5):
                async with trio.open_nursery() as readers:
                    for stream in (first, second):
                        readers.start_soon(wait_eof, stream)
                    await one_ended.wait()
                    readers.cancel_scope.cancel()
            assert len(ended) == 1  # the other one is still in its handshake
            admin = AdminClient.from_state(state, port=bound.admin[1])
            status, _, body = await trio.to_thread.run_sync(admin.request, "GET", "/metrics")
            assert status == 200
            metrics = body.decode()
            nursery.cancel_scope.cancel()
        for stream in (first, second):
            await stream.aclose()
    refusals = [e for e in logs if e["event"] == "enclave_link_refused_full"]
    assert len(refusals) == 1
    assert refusals[0]["max_links"] == 1
    assert 'drm_custodian_enclave_link_refused_total{limit="links"} 1.0' in metrics
