"""Shared fixtures: a real Mosquitto on a free port with the project's config."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from shared.broker import LocalBroker, start_local_broker


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
