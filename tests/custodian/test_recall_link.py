"""Recall on the enclave link, custodian side (I20, I23): two fake enclaves of one license
on a real ``serve()`` over loopback TLS, with the real ledger.

When one instance has served all it holds and the borrower has no supply left, the
custodian recalls half the idle units of the instance holding most, credits only what
that instance's ``returned`` confirms, and grants them to the one that ran out.

The fixtures and the fake enclave's helpers are those of ``test_enclave_link``.
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from drm_custodian.session import SessionConfig
from drm_wire.errors import ErrorCode, PeerError
from drm_wire.messages import Grant, Recall, ReturnAck, Returned
from drm_wire.net.channel import ChannelError

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


def _answer(recall: Recall, returned_total: int, served_total: int = 0) -> Returned:
    return Returned(
        recall_id=recall.recall_id,
        returned_total=returned_total,
        served_total=served_total,
        requests_total=served_total,
        final=False,
    )


async def test_idle_units_are_recalled_to_the_instance_that_ran_out(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=4), max_instances=2
    )
    async with custodian.link() as busy, custodian.link() as idle:
        await load_models(busy, 2)
        assert (await receive(busy, Grant)).granted_total == 4
        await load_models(idle, 2)
        assert (await receive(idle, Grant)).granted_total == 4
        with capture_logs() as logs:
            await report(busy, 1, 4)  # it served all it held; the supply is gone
            recall = await receive(idle, Recall)
            assert recall.units == 2  # half of what it holds
            # Nothing is credited or granted before the enclave confirms.
            assert (await custodian.balance()).remaining == 0
            assert await receive_until_quiet(busy, 0.2) == []
            await idle.send(_answer(recall, 2))
            ack = await receive(idle, ReturnAck)
            assert (ack.recall_id, ack.returned_total) == (recall.recall_id, 2)
            grant = await receive(busy, Grant)
            assert (grant.units, grant.granted_total) == (2, 6)
            assert await receive_until_quiet(idle) == []  # not taken back by the giver
        balance = await custodian.balance()
        assert (balance.supplied, balance.granted, balance.returned, balance.served) == (
            8,
            10,
            2,
            4,
        )
        assert balance.served <= balance.granted - balance.returned <= balance.supplied
        assert [e["units"] for e in logs if e["event"] == "recall_sent"] == [2]
        credited = [e["credited"] for e in logs if e["event"] == "units_returned"]
        assert credited == [2]


async def test_a_recall_answered_with_nothing_credits_nothing_and_grants_nothing(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    """The holder's units are all taken by running or parked requests: it returns none."""
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=4), max_instances=2
    )
    async with custodian.link() as busy, custodian.link() as holder:
        await load_models(busy, 2)
        await receive(busy, Grant)
        await load_models(holder, 2)
        await receive(holder, Grant)
        await report(busy, 1, 4)
        recall = await receive(holder, Recall)
        await holder.send(_answer(recall, 0, served_total=1))
        assert (await receive(holder, ReturnAck)).returned_total == 0
        assert await receive_until_quiet(busy) == []
        balance = await custodian.balance()
        assert (balance.granted, balance.returned, balance.served, balance.remaining) == (
            8,
            0,
            5,
            0,
        )
        # It serves on; when it too runs out, nobody holds anything to recall.
        await report(holder, 1, 4)
        assert await receive_until_quiet(busy) == []
        assert await receive_until_quiet(holder) == []


async def test_a_recall_answer_returning_more_than_it_holds_is_refused(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    """A hostile enclave tries to mint supply: it 'returns' more than it was granted and
    did not serve. Nothing is credited, nothing granted, and its link ends."""
    custodian = await start_custodian(
        initial_inferences=8, session=SessionConfig(lease=4), max_instances=2
    )
    async with custodian.link() as busy, custodian.link() as liar:
        await load_models(busy, 2)
        await receive(busy, Grant)
        await load_models(liar, 2)
        await receive(liar, Grant)
        with capture_logs() as logs:
            await report(busy, 1, 4)
            recall = await receive(liar, Recall)
            await liar.send(_answer(recall, 4, served_total=1))  # 1 + 4 > 4 granted
            with pytest.raises(PeerError) as caught:
                await receive(liar, ReturnAck)
            assert caught.value.code is ErrorCode.PROTOCOL_ERROR
            assert await receive_until_quiet(busy) == []
        assert any(e["event"] == "enclave_return_refused" for e in logs)
        balance = await custodian.balance()
        assert (balance.granted, balance.returned, balance.remaining) == (8, 0, 0)
        with pytest.raises((ChannelError, PeerError)):
            await receive(liar, Grant)
