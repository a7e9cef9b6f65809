"""Shared fixtures: a real Mosquitto on a free port with the project's config."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from shared.broker import LocalBroker, start_local_broker

RERUNS_ALLOWED: dict[str, tuple[str, int]] = {
    # node id: (the one failure that may be rerun, a regex on "ExceptionType: message";
    #           how many reruns), with the measured reason beside it.
    #
    # A performance goal, not a correctness check: the TPOT after the re-plan must be
    # within 20 % of the planner's prediction. Measured 2026-12-06, 3 runs without
    # reruns on this 2-core box (load average 4-8 from other work): +133.6 % (CPU
    # reference 1.05: the machine did not slow down measurably, yet the TPOT did), +23.1 %,
    # +18.1 % (passed). 2026-12-07, fresh-clone `make test` with the images building beside
    # it (the test then ran first): +25.7 %, +37.9 %, -38.0 % (CPU reference 1.07-1.10),
    # both ways, so load, not a bias; alone on a quiet machine -11.8 %. It now runs last
    # (pytest_collection_modifyitems). Its token-identity check (check_served) is never rerun.
    "tests/integration/test_adaptive.py::test_bandwidth_drop_replans_within_5_s_and_the_new_plan_meets_its_prediction": (
        r"AssertionError: TPOT [0-9.]+ ms vs predicted", 2),
}
"""The only tests that may run again, each for one named, measured failure.

Every other test fails on its first failure, and a listed test fails on any other
failure: a token-identity assertion is never rerun (a wrong token must fail the run).
Prefer a fix to an entry; an entry needs the measurement (runs, what failed, why)
beside it. A rerun shows in the report (``R``)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the listed tests for their reruns, and run them after every other test: their
    failure is a timing measurement, which the first minutes of `make test` distort (the
    container images build beside the suite then: scripts/test-all.sh). In a fresh-clone
    run on 2026-12-07 the bandwidth-drop test, the suite's first test, failed all 3 tries
    at 20:40-20:42 UTC while the images built, after passing first time in the run before."""
    for item in items:
        allowed = RERUNS_ALLOWED.get(item.nodeid)
        if allowed is not None:
            failure, reruns = allowed
            item.add_marker(pytest.mark.flaky(reruns=reruns, reruns_delay=1, only_rerun=[failure]))
    items.sort(key=lambda item: item.nodeid in RERUNS_ALLOWED)  # stable: the rest keep their order


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """For a listed test, an exception group of one error (a TaskGroup's) is raised as
    that error, so its only_rerun pattern sees the real failure, not the group."""
    try:
        return (yield)
    except BaseExceptionGroup as group:
        if item.nodeid not in RERUNS_ALLOWED:
            raise
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        raise leaves[0] from group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        found.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    """One Mosquitto per test session; tests keep apart by a unique cluster id."""
    local = start_local_broker()
    try:
        yield local
    finally:
        local.close()


@pytest.fixture
def own_broker() -> Iterator[LocalBroker]:
    """A Mosquitto of this test's own, for tests that kill or restart the broker."""
    local = start_local_broker()
    try:
        yield local
    finally:
        local.close()


@pytest.fixture
def cluster() -> str:
    """A cluster id unique to this test, so tests can share one broker."""
    return "t" + secrets.token_hex(6)
