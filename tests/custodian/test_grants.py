"""The grant planner: tops up below half a lease, never beyond the lease or the supply."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drm_custodian.grants import DEFAULT_LEASE, check_lease, plan_grant
from drm_wire.limits import MAX_GRANT_UNITS


def test_first_grant_is_a_full_lease() -> None:
    assert plan_grant(remaining=5000, granted_total=0, served_total=0) == DEFAULT_LEASE


def test_first_grant_is_cut_to_the_supply() -> None:
    assert plan_grant(remaining=5, granted_total=0, served_total=0) == 5


def test_no_top_up_while_half_a_lease_is_outstanding() -> None:
    assert plan_grant(remaining=5000, granted_total=1000, served_total=500) == 0
    assert plan_grant(remaining=5000, granted_total=1000, served_total=501) == 501


def test_a_head_request_over_half_a_lease_is_topped_up() -> None:
    """Q13: a lease of 100, requests of up to 64 items. Holding 60 (over half a lease)
    would leave a parked batch of 64 waiting forever; the reserve tops it up."""
    assert plan_grant(remaining=5000, granted_total=100, served_total=40, lease=100) == 0
    assert (
        plan_grant(remaining=5000, granted_total=100, served_total=40, lease=100, reserve=64) == 40
    )
    assert (
        plan_grant(remaining=5000, granted_total=100, served_total=36, lease=100, reserve=64) == 0
    )


@pytest.mark.parametrize("reserve", [0, 101, True])
def test_a_reserve_over_the_lease_is_refused(reserve: object) -> None:
    with pytest.raises(ValueError, match="reserve"):
        plan_grant(remaining=1, granted_total=0, served_total=0, lease=100, reserve=reserve)  # type: ignore[arg-type]


def test_nothing_when_blocked_or_empty() -> None:
    assert plan_grant(remaining=5000, granted_total=0, served_total=0, blocked=True) == 0
    assert plan_grant(remaining=0, granted_total=0, served_total=0) == 0
    assert plan_grant(remaining=-3, granted_total=0, served_total=0) == 0


def test_over_served_instance_counts_as_empty() -> None:
    assert plan_grant(remaining=50, granted_total=10, served_total=20, lease=10) == 10


def test_lease_of_one() -> None:
    assert plan_grant(remaining=9, granted_total=3, served_total=3, lease=1) == 1
    assert plan_grant(remaining=9, granted_total=4, served_total=3, lease=1) == 0


@pytest.mark.parametrize("lease", [0, -1, MAX_GRANT_UNITS + 1, True, 1.5])
def test_bad_lease_is_refused(lease: object) -> None:
    with pytest.raises(ValueError, match="lease"):
        check_lease(lease)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease"):
        plan_grant(remaining=1, granted_total=0, served_total=0, lease=lease)  # type: ignore[arg-type]


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        plan_grant(remaining=1, granted_total=-1, served_total=0)
    with pytest.raises(ValueError, match="negative"):
        plan_grant(remaining=1, granted_total=0, served_total=0, need=-1)


def test_a_demand_tops_up_to_the_lease_at_once_and_never_beyond() -> None:
    """I24: holding 600 of a lease of 1,000, no top-up is due; a demand makes it one, to
    the lease; whatever the demand claims, nothing beyond the lease."""
    assert plan_grant(remaining=5000, granted_total=1000, served_total=400) == 0
    assert plan_grant(remaining=5000, granted_total=1000, served_total=400, need=1) == 400
    for need in (1, MAX_GRANT_UNITS):
        assert plan_grant(remaining=5000, granted_total=1000, served_total=0, need=need) == 0
        assert plan_grant(remaining=30, granted_total=1000, served_total=400, need=need) == 30


@given(
    remaining=st.integers(min_value=-10, max_value=3 * MAX_GRANT_UNITS),
    granted=st.integers(min_value=0, max_value=10**7),
    served=st.integers(min_value=0, max_value=10**7),
    lease=st.integers(min_value=1, max_value=MAX_GRANT_UNITS),
    need=st.integers(min_value=0, max_value=MAX_GRANT_UNITS),
)
def test_a_demand_never_draws_beyond_the_lease_or_the_supply(
    remaining: int, granted: int, served: int, lease: int, need: int
) -> None:
    units = plan_grant(
        remaining=remaining, granted_total=granted, served_total=served, lease=lease, need=need
    )
    assert 0 <= units <= max(remaining, 0)
    assert max(granted - served, 0) + units <= max(lease, granted - served)


@given(
    remaining=st.integers(min_value=-10, max_value=3 * MAX_GRANT_UNITS),
    granted=st.integers(min_value=0, max_value=10**7),
    served=st.integers(min_value=0, max_value=10**7),
    lease=st.integers(min_value=1, max_value=MAX_GRANT_UNITS),
    blocked=st.booleans(),
)
def test_never_over_grants(
    remaining: int, granted: int, served: int, lease: int, blocked: bool
) -> None:
    units = plan_grant(
        remaining=remaining, granted_total=granted, served_total=served, lease=lease,
        blocked=blocked, reserve=max(1, lease // 3),
    )  # fmt: skip
    assert 0 <= units <= max(remaining, 0)
    assert units <= MAX_GRANT_UNITS
    if blocked:
        assert units == 0
    if units:
        # After the grant the instance holds at most a lease, and it needed one.
        assert max(granted - served, 0) + units <= lease
        assert 2 * max(granted - served, 0) < lease or granted - served < lease // 3


@given(
    lease=st.integers(min_value=1, max_value=1000),
    cost=st.integers(min_value=1, max_value=1000),
    usage=st.lists(st.integers(min_value=0, max_value=1000), max_size=30),
)
def test_after_any_history_an_idle_instance_can_serve_the_largest_request(
    lease: int, cost: int, usage: list[int]
) -> None:
    """Q13: with ample supply, once nothing is in flight and the planner has been asked,
    the instance holds at least the largest request's cost (its reserve)."""
    reserve = min(cost, lease)
    granted = served = 0
    for wanted in usage:
        granted += plan_grant(
            remaining=10**9, granted_total=granted, served_total=served, lease=lease,
            reserve=reserve,
        )  # fmt: skip
        assert granted - served >= reserve
        served += min(wanted, granted - served)


@given(
    supply=st.integers(min_value=0, max_value=50_000),
    lease=st.integers(min_value=1, max_value=5_000),
    usage=st.lists(st.integers(min_value=0, max_value=5_000), max_size=40),
)
def test_a_session_of_top_ups_never_exceeds_the_supply(
    supply: int, lease: int, usage: list[int]
) -> None:
    """Replay a session: grant, serve some of what is outstanding, grant again..."""
    granted = served = 0
    for wanted in usage:
        units = plan_grant(
            remaining=supply - granted, granted_total=granted, served_total=served, lease=lease
        )
        granted += units
        assert granted <= supply
        assert granted - served <= lease
        served += min(wanted, granted - served)
