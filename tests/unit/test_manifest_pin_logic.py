"""The shard manifest pinned by the plan: the field, the store's check, the broadcaster."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.broadcaster.logic import BroadcastConfig, BroadcastState, Requested, apply
from shared.errors import ManifestMismatch, ShardVerificationError
from shared.messages import Plan, PrepareEpoch, RolloutFinished, RolloutRequested, Segment
from shared.model.shard_files import ShardFiles
from shared.model.shard_write import write_shards
from shared.model.tiny import write_tiny_checkpoint

DIGEST_A, DIGEST_B = "a" * 64, "b" * 64


def _plan(pin: str = "") -> Plan:
    return Plan(epoch=0, model_id="m", entry_node="car", manifest_sha256=pin,  # type: ignore[arg-type]
                segments=(Segment(node="car", start=0, end=2), Segment(node="mec", start=2, end=4)))  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stores")
    first = write_tiny_checkpoint("llama", root / "a", layers=2, seed=1)
    second = write_tiny_checkpoint("llama", root / "b", layers=2, seed=2)
    write_shards(first, root / "sa")
    write_shards(second, root / "sb")
    return root / "sa", root / "sb"


def test_plan_pin_is_hex_sha256_or_empty() -> None:
    assert _plan(DIGEST_A).manifest_sha256 == DIGEST_A
    assert _plan().manifest_sha256 == ""
    for bad in ("A" * 64, "a" * 63, "x" * 64, "../manifest.json"):
        with pytest.raises(ValidationError, match="manifest_sha256"):
            _plan(bad)


def test_the_pin_is_signed_with_the_plan() -> None:
    signed = _plan(DIGEST_A).sign("k")
    assert signed.signature_ok("k")
    assert not signed.model_copy(update={"manifest_sha256": DIGEST_B}).signature_ok("k")


def test_store_accepts_its_own_digest_and_refuses_another_checkpoints(two_stores: tuple[Path, Path]) -> None:
    first, second = ShardFiles(two_stores[0]), ShardFiles(two_stores[1])
    assert first.manifest_sha256 == hashlib.sha256((two_stores[0] / "manifest.json").read_bytes()).hexdigest()
    first.check_manifest_pin(first.manifest_sha256)
    first.check_manifest_pin("")  # an older sender pins nothing
    with pytest.raises(ManifestMismatch, match=f"manifest.json: sha256 {first.manifest_sha256} does not match "
                       f"the plan's {second.manifest_sha256}") as caught:  # fmt: skip
        first.check_manifest_pin(second.manifest_sha256)
    assert isinstance(caught.value, ShardVerificationError)
    with pytest.raises(ManifestMismatch, match="the expected"):
        ShardFiles(two_stores[0], expected_manifest_sha256=second.manifest_sha256)


def _roll(pin: str, served: str) -> list[object]:
    state = BroadcastState(BroadcastConfig(signing_key="k", num_layers=4, manifest_sha256=served))
    request = RolloutRequested(decision_id=1, plan=_plan(pin), ready_timeout_s=5.0)
    _, actions = apply(state, Requested(request, now_s=0.0))
    return [action.message for action in actions]  # type: ignore[attr-defined]


def test_broadcaster_pins_an_unpinned_plan_to_its_store() -> None:
    prepares = [m for m in _roll("", DIGEST_A) if isinstance(m, PrepareEpoch)]
    assert len(prepares) == 1 and prepares[0].plan.manifest_sha256 == DIGEST_A
    assert prepares[0].plan.signature_ok("k")


def test_broadcaster_keeps_a_matching_pin_and_refuses_another() -> None:
    kept = [m for m in _roll(DIGEST_A, DIGEST_A) if isinstance(m, PrepareEpoch)]
    assert kept[0].plan.manifest_sha256 == DIGEST_A
    refused = _roll(DIGEST_B, DIGEST_A)
    assert not [m for m in refused if isinstance(m, PrepareEpoch)]
    finished = [m for m in refused if isinstance(m, RolloutFinished)]
    assert finished[0].outcome == "aborted"
    assert f"pins shard manifest sha256 {DIGEST_B}; the served store's is {DIGEST_A}" in finished[0].reason


def test_broadcaster_without_a_store_passes_the_pin_through() -> None:
    prepares = [m for m in _roll(DIGEST_B, "") if isinstance(m, PrepareEpoch)]
    assert prepares[0].plan.manifest_sha256 == DIGEST_B
