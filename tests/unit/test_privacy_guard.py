"""The worker's privacy guard (services/worker/guard.py): the policy in force is the
stricter of the configured and the published `PrivacyPolicy`, and plans that would put
the entry or a protected block on a node trusted too little are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.guard import PlanRefused, PrivacyGuard
from services.worker.settings import WorkerSettings
from shared.messages import PrivacyPolicy, PrivacyPolicySet
from shared.planning.route import Route

ROUTE = Route(epoch=1, entry="car", num_layers=6, segments=(("car", 0, 2), ("mec", 2, 4), ("rsu", 4, 6)))


def guard(node: str, trust: int, **policy: int) -> PrivacyGuard:
    settings = WorkerSettings(node_id=node, shards_dir=Path("."), trust=trust, **policy)  # type: ignore[arg-type]
    return PrivacyGuard(settings)


def test_a_published_policy_tightens_the_configured_one_and_never_relaxes_it() -> None:
    mec = guard("mec", 1, trusted_level=2, private_blocks=3)
    assert mec.in_force() == PrivacyPolicy(trusted_level=2, private_blocks=3)
    with pytest.raises(PlanRefused, match=r"blocks \[0, 3\) need trust >= 2"):
        mec.check(ROUTE, (2, 4))
    mec.published(PrivacyPolicySet(policy=PrivacyPolicy(trusted_level=0, private_blocks=0)))
    assert mec.in_force() == PrivacyPolicy(trusted_level=2, private_blocks=3)  # a forged relaxation
    with pytest.raises(PlanRefused):
        mec.check(ROUTE, (2, 4))


def test_the_entry_and_the_protected_tail_need_the_trusted_level() -> None:
    rsu = guard("rsu", 1, trusted_level=2, private_blocks=2)
    rsu.check(ROUTE, (4, 6))  # outside the first two blocks: allowed
    rsu.published(PrivacyPolicySet(policy=PrivacyPolicy(trusted_level=2, private_last_blocks=1)))
    assert rsu.in_force() == PrivacyPolicy(trusted_level=2, private_blocks=2, private_last_blocks=1)
    with pytest.raises(PlanRefused, match="and the last 1 need trust >= 2"):
        rsu.check(ROUTE, (4, 6))
    entry_route = Route(epoch=2, entry="rsu", num_layers=6, segments=(("rsu", 0, 6),))
    with pytest.raises(PlanRefused, match="cannot be the entry"):
        rsu.check(entry_route, (0, 6))
    car = guard("car", 2, trusted_level=2, private_blocks=2)
    car.check(ROUTE, (0, 2))  # trusted enough: the entry and the private blocks


def test_a_tightened_policy_withholds_a_running_segment_at_once() -> None:
    """The data plane asks `refusal` on every activation: once a published policy makes
    blocks [2, 4) private, mec (trust 1) stops running them under the plan it holds."""
    mec = guard("mec", 1, trusted_level=2, private_blocks=2)
    assert mec.refusal(ROUTE, (2, 4)) is None
    mec.published(PrivacyPolicySet(policy=PrivacyPolicy(trusted_level=2, private_blocks=4)))
    why = mec.refusal(ROUTE, (2, 4))
    assert why is not None and "cannot run blocks (2, 4)" in why
    assert guard("rsu", 2, trusted_level=2, private_blocks=6).refusal(ROUTE, (4, 6)) is None
