"""Blocking convenience for scripts: one connection, one inference, ``trio.run`` inside."""

from __future__ import annotations

import trio

from drm_consumer.client import CONNECT_TIMEOUT, DEFAULT_PORT, Client, InferenceOutcome, Inputs
from drm_wire.attestation.policy import Policy

__all__ = ["query"]


def query(
    host: str,
    port: int = DEFAULT_PORT,
    *,
    policy: Policy,
    model: str,
    inputs: Inputs,
    wait: float | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> InferenceOutcome:
    """Connect to the enclave, verify it, run one inference and disconnect.

    Not for use inside a running trio (or asyncio) event loop: use :class:`Client` there.

    Args:
        host, port, policy, connect_timeout: as for :meth:`Client.connect`.
        model, inputs, wait: as for :meth:`Client.infer`.

    Raises:
        ConsumerError: the subclasses :meth:`Client.connect` and :meth:`Client.infer`
            raise.
    """

    async def run() -> InferenceOutcome:
        async with Client.connect(
            host, port, policy=policy, connect_timeout=connect_timeout
        ) as client:
            return await client.infer(model, inputs, wait=wait)

    return trio.run(run)
