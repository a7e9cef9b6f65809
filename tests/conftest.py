"""Shared fixtures: a real Mosquitto on a free port with the project's config."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from shared.broker import LocalBroker, start_local_broker

INTEGRATION_RERUNS = 2
"""End-to-end tests run real processes on a shared 2-core machine, where timing varies a
lot; each may run up to this many more times before it counts as failed. Reruns show in
the report (``R``), so a test that needs them is visible."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("integration") is not None:
            item.add_marker(pytest.mark.flaky(reruns=INTEGRATION_RERUNS, reruns_delay=1))


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
