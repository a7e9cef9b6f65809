"""Shared fixtures: a real Mosquitto on a free port with the project's config."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from shared.broker import LocalBroker, start_local_broker

RERUNS_ALLOWED: dict[str, tuple[str, str]] = {
    # node id: (the failure that may be rerun, as a regex on "ExceptionType: message";
    #           the measured reason it happens)
}
"""The only tests that may run a second time, each for one named, measured failure.

Every other test fails on its first failure. A test that asserts token identity (the
fault and distributed tests) is never listed: a wrong token must fail the run. Prefer a
fix to an entry; an entry needs the measurement (runs, what failed, why) beside it.
A rerun shows in the report (``R``)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        allowed = RERUNS_ALLOWED.get(item.nodeid)
        if allowed is not None:
            item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=1, only_rerun=[allowed[0]]))


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
