"""``drm_consumer.connect`` against a real custodian and a real simulated enclave.

The blocking client keeps one attested connection across calls: thousands of calls from
one thread and from several make one handshake (the enclave logs ``consumer_connected``
once per connection, after the attested handshake and hello); an enclave restarted on
its port is reconnected to, and attested again, by the next call; closing while a call
waits for quota ends that call with ``ConnectionFailed`` and leaves no thread behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Final

import numpy as np
import pytest

import drm_consumer
from drm_consumer import AttestationRefused, ConnectionFailed, SyncClient
from drm_lab.deployment import Enclave, Lab
from drm_lab.models import tiny_model
from drm_lab.processes import LOOPBACK
from drm_wire.attestation.policy import Policy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Calls over the one connection from one thread: model info, and inferences.
INFO_CALLS: Final = 1500
INFER_CALLS: Final = 500
#: Calls from each of several threads at once.
THREADS: Final = 6
PER_THREAD: Final = 40
#: What the custodian supplies at first: exactly what the first enclave serves (one
#: lease lends it all), and then after the restart.
SUPPLY: Final = INFER_CALLS + THREADS * PER_THREAD
AFTER_RESTART: Final = 3
#: Bounds a join in the test (a hang, not a measurement).
JOIN: Final = 60.0


def _x(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), seed % 7 / 7, dtype=np.float32)}


def _client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("drm-consumer ")]


def _start_enclave(lab: Lab, port: int = 0) -> Enclave:
    return lab.start_enclave(options=("--listen", f"{LOOPBACK}:{port}"))


@pytest.fixture
def policy(lab: Lab) -> Policy:
    return Policy.load(lab.policy_path)


@pytest.fixture
def enclave(lab: Lab) -> Enclave:
    lab.start_custodian([lab.write_model("tiny", tiny_model())], initial=SUPPLY)
    return _start_enclave(lab)


def test_thousands_of_calls_threads_a_restart_and_a_close(
    lab: Lab, enclave: Enclave, policy: Policy
) -> None:
    served = 0
    with drm_consumer.connect(LOOPBACK, enclave.consumer_port, policy=policy) as client:
        assert client.attestation.simulated
        for number in range(INFO_CALLS):
            assert list(client.models()) == ["tiny"], number
        for number in range(INFER_CALLS):
            outcome = client.infer("tiny", _x(number))
            assert outcome.outputs["y"].shape == (1, 3)
            served += outcome.cost
        assert client.connections == 1
        assert len(enclave.daemon.find_all("consumer_connected")) == 1

        # Several threads at once, on the same connection.
        errors: list[BaseException] = []
        costs: list[int] = []

        def worker(seed: int) -> None:
            try:
                for number in range(PER_THREAD):
                    costs.append(client.infer("tiny", _x(seed + number)).cost)
                    assert "tiny" in client.models()
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        workers = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(JOIN)
        assert not any(t.is_alive() for t in workers)
        assert errors == []
        assert costs == [1] * (THREADS * PER_THREAD)
        served += sum(costs)
        assert client.connections == 1
        assert len(enclave.daemon.find_all("consumer_connected")) == 1

        # The enclave restarts on its port: the next call connects and attests again.
        assert enclave.daemon.stop() == 0
        with pytest.raises(ConnectionFailed):
            client.models()  # nothing listens meanwhile
        restarted = _start_enclave(lab, enclave.consumer_port)
        assert restarted.instance_id != enclave.instance_id
        assert client.info().state == "serving"
        assert client.connections == 2
        assert len(restarted.daemon.find_all("consumer_connected")) == 1
        lab.supply(AFTER_RESTART)
        for number in range(AFTER_RESTART):
            served += client.infer("tiny", _x(number)).cost  # waits for the supply if need be
        assert client.connections == 2

        # No inferences left: a call waits; closing the client ends it.
        parked = threading.Event()
        outcome_of_waiter: list[BaseException | object] = []

        def waiter() -> None:
            try:
                outcome_of_waiter.append(
                    client.infer("tiny", _x(0), on_waiting=lambda position: parked.set())
                )
            except BaseException as exc:  # checked by the test thread
                outcome_of_waiter.append(exc)

        waiting = threading.Thread(target=waiter)
        waiting.start()
        assert parked.wait(JOIN), "the enclave did not park the request"
    waiting.join(JOIN)
    assert not waiting.is_alive()
    (error,) = outcome_of_waiter
    assert isinstance(error, ConnectionFailed), error
    assert "closed" in str(error)
    assert _client_threads() == []
    with pytest.raises(ConnectionFailed, match="closed"):
        client.models()
    client.close()  # idempotent
    assert restarted.daemon.stop() == 0  # a clean stop reports what it served
    assert lab.usage()["served"] == served == SUPPLY + AFTER_RESTART


def test_a_refused_enclave_leaves_no_thread(lab: Lab, enclave: Enclave, policy: Policy) -> None:
    other = dataclasses.replace(policy, mr_enclave=(hashlib.sha256(b"another build").digest(),))
    with pytest.raises(AttestationRefused):
        drm_consumer.connect(LOOPBACK, enclave.consumer_port, policy=other)
    assert _client_threads() == []
    assert enclave.daemon.find_all("consumer_connected") == []
    client: SyncClient = drm_consumer.connect(LOOPBACK, enclave.consumer_port, policy=policy)
    client.close()
    assert _client_threads() == []


def test_a_call_in_flight_when_the_enclave_dies_fails_and_is_not_sent_again(
    lab: Lab, policy: Policy
) -> None:
    """The inference may have run: it fails with ``ConnectionFailed`` and is not retried;
    the next call connects to the enclave's successor and attests it."""
    lab.start_custodian([lab.write_model("tiny", tiny_model())], initial=0)
    first = _start_enclave(lab)
    parked = threading.Event()
    outcome: list[BaseException | object] = []
    with drm_consumer.connect(LOOPBACK, first.consumer_port, policy=policy) as client:

        def waiter() -> None:
            try:
                outcome.append(client.infer("tiny", _x(1), on_waiting=lambda _: parked.set()))
            except BaseException as exc:  # checked by the test thread
                outcome.append(exc)

        waiting = threading.Thread(target=waiter)
        waiting.start()
        assert parked.wait(JOIN), "the enclave did not park the request"
        first.daemon.kill()
        waiting.join(JOIN)
        assert not waiting.is_alive()
        (error,) = outcome
        assert isinstance(error, ConnectionFailed), error
        second = _start_enclave(lab, first.consumer_port)
        lab.supply(1)
        assert client.infer("tiny", _x(2)).cost == 1  # waits for the supply if need be
        assert client.connections == 2
        assert len(second.daemon.find_all("consumer_connected")) == 1
    assert _client_threads() == []
    assert second.daemon.stop() == 0  # a clean stop reports what it served
    assert lab.admin is not None
    usage = lab.admin.usage()
    assert (usage["served"], usage["requests"]) == (1, 1)  # the failed call was not resent
