"""Returning units on the enclave link, custodian side (I20): a real ``serve()`` on
loopback, a fake enclave made of the real drm_wire pieces, and the real ledger.

The fixtures and the fake enclave's helpers are those of ``test_enclave_link``.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from drm_custodian.ledger import Balance, GrantPlan, Ledger
from drm_custodian.ledger import Grant as LedgerGrant
from drm_custodian.ledger_records import ReturnResult
from drm_custodian.session import SessionConfig
from drm_wire.errors import ErrorCode, LocalProtocolError, PeerError
from drm_wire.messages import Grant, ModelBegin, ReturnAck, Returned, UsageReport

from .test_enclave_link import (  # noqa: F401 (fixtures)
    TIMEOUT,
    CustodianFactory,
    credentials,
    load_models,
    models,
    platform,
    policy,
    receive,
    report,
    start_custodian,
)


def _final(returned: int, served: int) -> Returned:
    return Returned(
        recall_id=None,
        returned_total=returned,
        served_total=served,
        requests_total=served,
        final=True,
    )


async def test_a_final_return_is_credited_once_acked_and_retires_the_instance(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    custodian = await start_custodian(initial_inferences=10)
    instance = secrets.token_hex(16)
    with capture_logs() as logs:
        async with custodian.link(instance_id=instance) as channel:
            await load_models(channel, 2)
            assert (await receive(channel, Grant)).granted_total == 10
            await report(channel, 1, 2)
            # Served 3 in all (one more since the report), 7 idle: all back.
            await channel.send(_final(7, 3))
            ack = await receive(channel, ReturnAck)
            assert (ack.recall_id, ack.returned_total) == (None, 7)
            # The same return again (a replay): acknowledged, credited nothing more.
            await channel.send(_final(7, 3))
            assert (await receive(channel, ReturnAck)).returned_total == 7
            # Return then keep serving: no report may follow a final return.
            with pytest.raises(LocalProtocolError, match="usage_report"):
                await channel.send(UsageReport(seq=2, served_total=4, requests_total=4))
            balance = await custodian.balance()
            assert (balance.served, balance.returned, balance.in_doubt) == (3, 7, 0)
            assert balance.remaining == 7
            # A supply now grants this stopped instance nothing.
            await custodian.admin_call(lambda admin: admin.supply(5))
            assert (await custodian.balance()).granted == 10
    lines = [e for e in logs if e["event"] == "units_returned"]
    assert [(e["credited"], e["returned_total"], e["final"]) for e in lines] == [
        (7, 7, True),
        (0, 7, True),
    ]
    # The instance id is refused from now on.
    with capture_logs() as logs:
        async with custodian.link(instance_id=instance) as again:
            with pytest.raises(PeerError) as caught:
                await receive(again, ModelBegin)
    assert caught.value.code is ErrorCode.INSTANCE_RETIRED
    assert "restart the enclave process" in caught.value.detail
    assert any(e["event"] == "enclave_instance_retired" for e in logs)


@pytest.mark.parametrize(
    ("returned", "served", "why"),
    [
        (11, 0, "exceeds the 10 granted"),  # more than it was ever granted
        (9, 2, "exceeds the 10 granted"),  # more than granted minus served
        (8, 0, "exceeds the 10 granted"),  # hides the 3 it reported served
    ],
)
async def test_a_hostile_return_is_refused_logged_and_credits_nothing(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
    returned: int,
    served: int,
    why: str,
) -> None:
    custodian = await start_custodian(initial_inferences=10)
    with capture_logs() as logs:
        async with custodian.link() as channel:
            await load_models(channel, 2)
            await receive(channel, Grant)
            await report(channel, 1, 3 if returned == 8 else served)
            await channel.send(_final(returned, served))
            with pytest.raises(PeerError) as caught:
                await receive(channel, ReturnAck)
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR
    refused = [e for e in logs if e["event"] == "enclave_return_refused"]
    assert len(refused) == 1
    assert refused[0]["log_level"] == "error"
    assert why in refused[0]["reason"]
    balance = await custodian.balance()
    assert balance.returned == 0
    assert balance.remaining == 0
    assert balance.in_doubt == 10 - balance.served
    assert balance.served == max(served, 3 if returned == 8 else served)


async def test_a_reclaimed_instance_is_refused_when_it_comes_back(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
) -> None:
    """A frozen enclave that wakes after the owner wrote it off cannot link again, so it
    can never report or be granted anything (I21)."""
    custodian = await start_custodian(initial_inferences=10)
    instance = secrets.token_hex(16)
    async with custodian.link(instance_id=instance) as channel:
        await load_models(channel, 2)
        await receive(channel, Grant)
    written = await custodian.ledger.reclaim("borrower", instance)
    assert written.units == 10
    async with custodian.link(instance_id=instance) as again:
        with pytest.raises(PeerError) as caught:
            await receive(again, ModelBegin)
    assert caught.value.code is ErrorCode.INSTANCE_RETIRED
    assert "reclaimed" in caught.value.detail


async def test_a_grant_committed_as_the_final_return_arrives_is_never_sent_and_stays_in_doubt(
    start_custodian: CustodianFactory,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``grant_unsent_after_stop``, made deterministic: a top-up is committed by the link's
    own ledger transaction, and the enclave's final return (which does not count it) is
    received before the grant goes out. The grant must not be sent (the state machine
    refuses it after a final return), it is logged, and its units stay in doubt for the
    owner to settle (I20, I21): never credited as returned."""
    committed, final_recorded = trio.Event(), trio.Event()
    armed = False
    grant_due, record_return = Ledger.grant_due, Ledger.record_return

    async def grant_due_then_wait(
        self: Ledger, borrower: str, instance_id: str, plan: GrantPlan
    ) -> tuple[Balance, LedgerGrant | None]:
        balance, grant = await grant_due(self, borrower, instance_id, plan)
        if armed and grant is not None:
            committed.set()  # the top-up is durable; hold its send until the stop is read
            await final_recorded.wait()
        return balance, grant

    async def record_return_then_signal(self: Ledger, *args: Any, **kwargs: Any) -> ReturnResult:
        result = await record_return(self, *args, **kwargs)
        if kwargs.get("final"):
            final_recorded.set()
        return result

    monkeypatch.setattr(Ledger, "grant_due", grant_due_then_wait)
    monkeypatch.setattr(Ledger, "record_return", record_return_then_signal)
    custodian = await start_custodian(initial_inferences=100, session=SessionConfig(lease=10))
    with capture_logs() as logs:
        async with custodian.link() as channel:
            await load_models(channel, 2)
            assert (await receive(channel, Grant)).granted_total == 10
            armed = True
            await report(channel, 1, 6)  # 4 outstanding < 5: the link tops up
            with trio.fail_after(TIMEOUT):
                await committed.wait()
            assert (await custodian.balance()).granted == 16
            await channel.send(_final(4, 6))  # all it holds: the top-up never reached it
            ack = await receive(channel, ReturnAck)
            assert ack.returned_total == 4
            with trio.fail_after(TIMEOUT):
                while not any(e["event"] == "grant_unsent_after_stop" for e in logs):
                    await trio.testing.wait_all_tasks_blocked()
    unsent = [e for e in logs if e["event"] == "grant_unsent_after_stop"]
    assert [(e["units"], e["log_level"]) for e in unsent] == [(6, "warning")]
    pushed = [e["granted_total"] for e in logs if e["event"] == "grant_pushed"]
    assert 16 not in pushed
    balance = await custodian.balance()
    assert (balance.granted, balance.served, balance.returned, balance.in_doubt) == (16, 6, 4, 6)
