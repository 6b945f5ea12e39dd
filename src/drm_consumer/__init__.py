"""The end user's client: verifies the enclave, sends inputs, reads predictions.

``async with Client.connect(host, policy=policy) as client`` for trio programs;
``with connect(host, policy=policy) as enclave`` for a blocking program making many calls
over one attested connection (:class:`SyncClient`); :func:`query` for a blocking one-shot
call. Errors are the classes of
:mod:`drm_consumer.errors`, all under :class:`~drm_wire.errors.DrmError`.
"""

from __future__ import annotations

from drm_consumer.client import (
    CONNECT_TIMEOUT,
    DEFAULT_PORT,
    Client,
    EnclaveInfo,
    InferenceOutcome,
    Inputs,
)
from drm_consumer.errors import (
    AttestationRefused,
    BadRequest,
    Blocked,
    Busy,
    ConnectionFailed,
    ConsumerError,
    CustodianUnreachable,
    InferenceFailed,
    ModelNotFound,
    ModelUnavailable,
    NoInferencesLeft,
    RequestFailed,
)
from drm_consumer.sync import SyncClient, connect, query

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "AttestationRefused",
    "BadRequest",
    "Blocked",
    "Busy",
    "Client",
    "ConnectionFailed",
    "ConsumerError",
    "CustodianUnreachable",
    "EnclaveInfo",
    "InferenceFailed",
    "InferenceOutcome",
    "Inputs",
    "ModelNotFound",
    "ModelUnavailable",
    "NoInferencesLeft",
    "RequestFailed",
    "SyncClient",
    "connect",
    "query",
]
