"""Fixtures for the net tests: certificates (made once per session) and stream pairs."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from drm_lab.certs import Identity, make_ca, make_leaf, make_self_signed
from tests.net.channel_fakes import StreamPair


@pytest.fixture(scope="session")
def ca() -> Identity:
    return make_ca("drm-test-ca")


@pytest.fixture(scope="session")
def other_ca() -> Identity:
    return make_ca("some-other-ca")


@pytest.fixture(scope="session")
def server_id(ca: Identity) -> Identity:
    return make_leaf(ca, "drm-test-server")


@pytest.fixture(scope="session")
def client_id(ca: Identity) -> Identity:
    return make_leaf(ca, "drm-test-client")


@pytest.fixture(scope="session")
def enclave_id() -> Identity:
    return make_self_signed("drm-test-enclave")


@pytest.fixture(
    params=[trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair],
    ids=["memory", "lockstep"],
)
def stream_pair(request: pytest.FixtureRequest) -> StreamPair:
    """Makes a plain connected stream pair for the channel tests: a buffered one, and a
    lockstep one (every write waits for the peer's read, so missing concurrency deadlocks)."""
    make: StreamPair = request.param
    return make
