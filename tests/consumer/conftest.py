"""Fixtures for the client tests: one simulated platform and enclave identity per session,
and a fresh :class:`~tests.consumer.fake_enclave.FakeEnclave` per test."""

from __future__ import annotations

import hashlib

import pytest
import trio

from drm_wire.attestation.gramine import SimulatedEnclave, make_enclave_identity
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.ratls_cert import RatlsCredentials
from tests.consumer.fake_enclave import FakeEnclave
from tests.simulation import simulation_policy

MR_ENCLAVE = hashlib.sha256(b"drm consumer test enclave").digest()
MR_SIGNER = hashlib.sha256(b"drm consumer test signer").digest()


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("consumer") / "platform")


@pytest.fixture(scope="session")
def credentials(platform: SimulatedPlatform) -> RatlsCredentials:
    simulation = SimulatedEnclave(platform, mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER)
    return make_enclave_identity("simulated", simulation=simulation)


def make_policy(platform: SimulatedPlatform, *, mr_enclave: bytes = MR_ENCLAVE) -> Policy:
    return simulation_policy(platform, mr_enclave)


@pytest.fixture(scope="session")
def policy(platform: SimulatedPlatform) -> Policy:
    return make_policy(platform)


@pytest.fixture
async def fake_enclave(nursery: trio.Nursery, credentials: RatlsCredentials) -> FakeEnclave:
    fake = FakeEnclave(credentials)
    await nursery.start(fake.serve)
    return fake
