"""Block acknowledgement on the enclave link, custodian side (version 4, I25): fake
enclaves of one license on a real ``serve()`` over loopback TLS, with the real ledger.

Every ``block`` carries an id; the enclave answers ``block_ack`` with it once nothing
can start there. The custodian logs it per instance, shows it in ``/usage`` and counts
it in the block's answer, which may wait for it (``wait``).

The fixtures and the fake enclave's helpers are those of ``test_enclave_link``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from drm_custodian.session import SessionConfig
from drm_wire.errors import ErrorCode, PeerError
from drm_wire.framing import encode_frame
from drm_wire.messages import Block, BlockAck, Grant, Unblock

from .test_enclave_link import (  # noqa: F401 (fixtures)
    CustodianFactory,
    credentials,
    load_models,
    models,
    platform,
    policy,
    receive,
    receive_until_quiet,
    report,
    start_custodian,
)


def _rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["instance"]: row for row in doc["by_instance"]}


async def test_each_instance_acknowledges_the_block_and_usage_shows_it(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=4), max_instances=2
    )
    first_id, second_id = "a" * 32, "b" * 32
    async with (
        custodian.link(instance_id=first_id) as first,
        custodian.link(instance_id=second_id) as second,
    ):
        for channel in (first, second):
            await load_models(channel, 2)
            await receive(channel, Grant)
        with capture_logs() as logs:
            doc = await custodian.admin_call(lambda admin: admin.block("audit"))
            blocks = [await receive(channel, Block) for channel in (first, second)]
            assert [b.block_id for b in blocks] == [1, 1]  # ids are per link
            usage = await custodian.admin_call(lambda admin: admin.usage())
            rows = _rows(usage)
            assert rows[first_id]["block_acknowledged"] is False
            assert rows[second_id]["block_acknowledged"] is False
            await first.send(BlockAck(block_id=1))
            await first.send(BlockAck(block_id=1))  # a duplicate is harmless
            await report(first, 1, 0)  # answered after the acks before it were read
            usage = await custodian.admin_call(lambda admin: admin.usage())
            assert _rows(usage)[first_id]["block_acknowledged"] is True
            assert _rows(usage)[second_id]["block_acknowledged"] is False
            # A block waiting for the acknowledgements: the second one acks meanwhile.
            async with trio.open_nursery() as nursery:
                answer: list[dict[str, Any]] = []

                async def block_and_wait() -> None:
                    answer.append(
                        await custodian.admin_call(lambda admin: admin.block("audit", wait=5))
                    )

                nursery.start_soon(block_and_wait)
                await second.send(BlockAck(block_id=1))
            assert answer[0]["block_acknowledged"] == 2
            assert answer[0]["instances"] == 2
            assert await receive_until_quiet(first, 0.1) == []  # blocked already: no resend
        acked = [e for e in logs if e["event"] == "block_acknowledged"]
        assert sorted(e["instance"] for e in acked) == [first_id, second_id]
        assert {e["borrower"] for e in acked} == {"borrower"}
        assert doc["blocked"] is True
        # Unblocked, the question is moot; blocked again, a new id, unacknowledged.
        await custodian.admin_call(lambda admin: admin.unblock())
        for channel in (first, second):
            await receive(channel, Unblock)
        usage = await custodian.admin_call(lambda admin: admin.usage())
        assert "block_acknowledged" not in _rows(usage)[first_id]
        await custodian.admin_call(lambda admin: admin.block("again"))
        assert (await receive(first, Block)).block_id == 2
        await first.send(BlockAck(block_id=1))  # stale: for the block that was lifted
        await report(first, 2, 0)
        usage = await custodian.admin_call(lambda admin: admin.usage())
        assert _rows(usage)[first_id]["block_acknowledged"] is False
    assert doc["by_instance"]


async def test_an_acknowledgement_of_a_block_never_sent_ends_the_link(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    custodian = await start_custodian(initial_inferences=4)
    async with custodian.link(heartbeat=False) as channel:
        await load_models(channel, 2)
        await receive(channel, Grant)
        # Nothing was blocked: our own state machine would refuse to send it, so the
        # frame goes raw (no heartbeat task shares the stream).
        await channel.stream.send_all(b"".join(encode_frame(*BlockAck(block_id=1).to_wire())))
        with pytest.raises(PeerError) as caught:
            await receive(channel, Grant)
        assert caught.value.code is ErrorCode.PROTOCOL_ERROR
        assert "answers no block sent" in caught.value.detail
