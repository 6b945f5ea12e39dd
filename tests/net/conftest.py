"""Fixtures for the TLS tests: certificates (made once per session) and stream pairs."""

from __future__ import annotations

import pytest

from drm_lab.certs import Identity, make_ca, make_leaf, make_self_signed


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
