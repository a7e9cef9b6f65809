"""The scenario's ``compressed`` policy (adaptive + the planner's per-hop activation
precision) and the quality loss each policy's report puts beside its latency."""

from __future__ import annotations

import json
import math

import pytest

from services.cli.scenarios.analysis import agreement
from services.cli.scenarios.records import PolicyRun, RequestRecord
from services.cli.scenarios.report import quality
from services.cli.scenarios.report_md import side_by_side
from services.cli.scenarios.runner import policies_from
from services.cli.scenarios.spec import ScenarioError
from services.cli.scenarios.stack import COMPRESSED_PRECISION, orchestrator_policy_args
from services.orchestrator.__main__ import parse_args, settings_from
from shared.planning.precision import PrecisionPolicy


def test_compressed_is_named_not_part_of_all() -> None:
    assert policies_from("all") == ("static", "migrate", "adaptive")
    assert policies_from("compressed,adaptive") == ("adaptive", "compressed")
    with pytest.raises(ScenarioError, match="compressed"):
        policies_from("fastest")


def test_compressed_runs_the_adaptive_orchestrator_with_a_precision_policy() -> None:
    assert orchestrator_policy_args("static") == ["--policy", "static"]
    args = orchestrator_policy_args("compressed")
    settings = settings_from(parse_args(["--shards", "/tmp/none", *args]))
    assert settings.policy == "adaptive"
    assert settings.precision_policy == PrecisionPolicy(**COMPRESSED_PRECISION)
    assert "int8" in settings.precision_policy.usable_activations()


def test_agreement_with_the_reference() -> None:
    assert agreement("generate", [1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert agreement("generate", [1, 2, 9, 4], [1, 2, 3, 4]) == 0.5  # 2 tokens before the first difference
    assert agreement("generate", [1, 2], [1, 2, 3, 4]) == 0.5  # stopped early
    assert agreement("generate", [1], None) is None
    assert agreement("embed", [0.6, 0.8], [0.6, 0.8]) == pytest.approx(1.0)
    assert agreement("embed", [1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.0)
    assert agreement("embed", [1.0], [0.6, 0.8]) == 0.0


def _record(name: str, agreed: float | None, mismatched: bool, outcome: str = "completed") -> RequestRecord:
    return RequestRecord(name, 0, 0.0, outcome, first_token_at_s=0.1, finished_at_s=0.2,  # type: ignore[arg-type]
                         token_times_s=(0.1, 0.2), tokens=(1, 2), mismatched=mismatched, agreement=agreed)  # fmt: skip


def test_quality_sits_beside_the_latency_in_the_report() -> None:
    run = PolicyRun(policy="compressed", duration_s=10.0, nodes=("car",), requests=(
        _record("r1", 1.0, False), _record("r2", 0.25, True), _record("r3", None, False),
        _record("r4", None, False, "failed")))  # fmt: skip
    got = quality(run, "generate")
    assert got == {"compared": 2, "exact_share": 0.5, "agreement_mean": 0.625, "agreement_min": 0.25,
                   "measure": "token prefix"}  # fmt: skip
    empty = quality(PolicyRun(policy="static", duration_s=1.0, nodes=(), requests=()), "embed")
    assert empty["compared"] == 0 and empty["agreement_mean"] is None and empty["measure"] == "cosine"
    from services.cli.scenarios.report import policy_metrics
    from services.cli.scenarios.spec import Slo

    metrics = policy_metrics(run, Slo(), "generate")
    assert metrics["quality"] == got and not math.isnan(json.loads(json.dumps(metrics))["quality"]["agreement_mean"])
    table = "\n".join(side_by_side("generate", {"compressed": metrics}))
    assert "| answers equal to fp32 | 50.0 % |" in table
    assert "| agreement with fp32 mean / min | 0.6250 / 0.2500 |" in table


def test_a_replans_layout_names_its_lossy_hops() -> None:
    from services.cli.scenarios.analysis import _layout
    from shared.messages import LinkPrecision, Plan, Segment

    plan = Plan(epoch=2, model_id="m", entry_node="car",  # type: ignore[arg-type]
                segments=(Segment(node="car", start=0, end=2), Segment(node="rsu", start=2, end=6)),  # type: ignore[arg-type]
                link_precisions=(LinkPrecision(target=2, activations="int8"),
                                 LinkPrecision(target=6, activations="fp16")))  # fmt: skip
    assert _layout(plan) == "car[0,2) rsu[2,6) (int8 into 2, fp16 into 6)"
    assert _layout(plan.model_copy(update={"link_precisions": ()})) == "car[0,2) rsu[2,6)"
