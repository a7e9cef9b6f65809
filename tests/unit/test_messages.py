"""Message models: one hand-built instance per kind, strictness, validators, plan signing."""

from __future__ import annotations

import msgpack
import pydantic
import pytest

from shared import codec, topics
from shared.errors import DecodeError
from shared.messages import (
    MESSAGE_KINDS,
    AbortEpoch,
    BlockTimes,
    Candidate,
    CapacityProfile,
    CommitEpoch,
    DecisionRecorded,
    EmbeddingReady,
    EmbedRequest,
    EmulatedLink,
    EmulationApplied,
    EmulationCommand,
    EpochLedger,
    EpochReady,
    EpochRejected,
    Evidence,
    GenerateRequest,
    LayerCost,
    LinkCapacity,
    LinkDegraded,
    LinkObservation,
    LinkRecovered,
    Message,
    NodeCapacity,
    NodeDown,
    NodeJoined,
    NodeOverloadCleared,
    NodeOverloaded,
    NodeStatus,
    Plan,
    PlanOption,
    PlanProposed,
    PlanRequested,
    PlanWeights,
    PrepareEpoch,
    PrivacyPolicy,
    PrivacyPolicySet,
    ProfileEvent,
    RequestFailed,
    RequestFinished,
    RolloutFinished,
    RolloutRequested,
    Segment,
    ServiceStatus,
    Telemetry,
    TokenGenerated,
)

PLAN = Plan(
    epoch=3,
    model_id="smollm2-135m",
    entry_node="car-1",
    segments=(Segment(node="car-1", start=0, end=4), Segment(node="rsu-1", start=4, end=30)),
).sign("edgesplit-dev-key")

EXAMPLES_BEST = PlanOption(segments=(Segment(node="w1", start=0, end=30),), latency_s=0.09,
                           bottleneck_s=0.09, migration_cost_s=0.0, weighted_cost_s=0.09)  # fmt: skip

EXAMPLES: list[Message] = [
    NodeStatus(
        node="w1",
        state="online",
        trust=2,
        memory_bytes=2 * 10**8,
        threads=1,
        capabilities=("llama", "bert"),
    ),  # fmt: skip
    Telemetry(
        node="w1",
        window_s=1.0,
        cpu_utilisation=0.4,
        memory_used_bytes=10**8,
        requests_in_flight=2,
        ms_per_layer=2.1,
        link_rtt_ms={"w2": 0.8},
        epoch=3,
    ),  # fmt: skip
    PLAN,
    PrepareEpoch(epoch=4, plan=PLAN.model_copy(update={"epoch": 4}).sign("k")),
    EpochReady(epoch=4, node="w1"),
    EpochRejected(epoch=4, node="w2", reason="not enough memory for layers 4-30"),
    CommitEpoch(epoch=4),
    AbortEpoch(epoch=4, reason="w2 rejected"),
    GenerateRequest(
        request_id="r1",
        reply_to="cli-1",
        prompt="The capital of France is",
        max_new_tokens=8,
        temperature=0.7,
        top_p=0.9,
        seed=42,
        timeout_s=30.0,
    ),  # fmt: skip
    GenerateRequest(request_id="r1", reply_to="cli-1", token_ids=(5, 6), resume_token_ids=(7042,)),
    EmbedRequest(request_id="r2", reply_to="cli-1", text="hello"),
    TokenGenerated(request_id="r1", index=0, token_id=7042, text=" Paris"),
    RequestFinished(
        request_id="r1",
        token_ids=(7042, 30),
        text=" Paris.",
        finish_reason="eos",
        ttft_s=0.35,
        tpot_s=0.07,
    ),  # fmt: skip
    RequestFinished(request_id="r1", token_ids=(), ttft_s=0.35, tpot_s=0.07, token_count=2),  # requests/finished
    EmbeddingReady(request_id="r2", embedding=(0.1, -0.2, 0.3), elapsed_s=0.03),
    RequestFailed(request_id="r3", error="busy", message="8 requests in flight; retry later"),
    CapacityProfile(
        as_of_s=1.7e9,
        nodes=(
            NodeCapacity(
                node="w1",
                alive=True,
                trust=2,
                memory_free_bytes=10**8,
                flops_per_s=2e9,
                utilisation=0.1,
            ),
        ),  # fmt: skip
        links=(LinkCapacity(src="w1", dst="w2", bandwidth_bytes_per_s=1.25e6, latency_s=0.004),),
    ),
    ProfileEvent(event="node_lost", node="w2", detail="Last Will", emergency=True),
    DecisionRecorded(
        decision_id=1,
        trigger="node_lost w2",
        action="resplit",
        candidates=(Candidate(summary="w1[0,30)", predicted_latency_s=0.09),),
        predicted_gain_s=0.01,
        from_epoch=3,
        to_epoch=4,
    ),  # fmt: skip
    DecisionRecorded(
        decision_id=17, trigger="link_degraded car->rsu", action="migrate", at_s=1.7e9,
        candidates=(
            Candidate(summary="car[0,2) rsu[2,6)", predicted_latency_s=0.02, kind="current",
                      origin="running", segments=(Segment(node="car", start=0, end=2),
                                                  Segment(node="rsu", start=2, end=6))),
            Candidate(summary="car[0,2) mec[2,6)", predicted_latency_s=0.012, kind="migrate",
                      origin="migration", segments=(Segment(node="car", start=0, end=2),
                                                    Segment(node="mec", start=2, end=6)),
                      migration_cost_s=0.05, bottleneck_s=0.008, predicted_gain_s=0.5,
                      note="saves 40.0% per token, net 0.45 s"),
        ),
        evidence=(Evidence(metric="bandwidth_bytes_per_s", old_value=1.2e7, new_value=1.2e6,
                           threshold=8.4e6, window_s=3.0, samples=5),),
        trigger_detail="bandwidth", emergency=False, reason="migrate: saves 40.0% per token",
        chosen=1, current_latency_s=0.02, predicted_latency_s=0.012, predicted_cost_s=0.25,
        horizon_tokens=64.0, nodes=("car", "mec"), outcome="committed", from_epoch=2, to_epoch=3,
        baseline_tpot_s=0.021, realised_tpot_s=0.013, realised_requests=4, realised_gain_s=0.5,
    ),  # fmt: skip
    PrivacyPolicySet(policy=PrivacyPolicy(private_blocks=3, trusted_level=2, private_last_blocks=1),
                     set_at_s=1.7e9, reason="cabin audio"),  # fmt: skip
    PlanRequested(
        request_id="p1",
        reply_to="orchestrator",
        model_id="smollm2",
        source="w1",
        profile=CapacityProfile(
            as_of_s=1.7e9,
            nodes=(
                NodeCapacity(node="w1", alive=True, trust=2, memory_free_bytes=10**8,
                             flops_per_s=2e9, utilisation=0.1),
            ),
        ),  # fmt: skip
        privacy=PrivacyPolicy(private_blocks=2, trusted_level=2),
        objective="throughput",
        weights=PlanWeights(balance=0.5, migration=0.001),
        current_segments=(Segment(node="w1", start=0, end=30),),
        alternatives=3,
        context_tokens=512,
    ),  # fmt: skip
    PlanProposed(
        request_id="p1",
        feasible=True,
        objective="throughput",
        best=EXAMPLES_BEST,
        method="exact",
        optimal=True,
        solve_s=0.004,
        profile_as_of_s=1.7e9,
    ),  # fmt: skip
    PlanProposed(request_id="p2", feasible=False, reason="source: 'w9' is down",
                 error="invalid_request"),  # fmt: skip
    # monitoring (services/monitor, services/worker/telemetry.py, probes.py, emulation.py)
    Telemetry(
        node="w2", window_s=1.0, cpu_utilisation=0.3, memory_used_bytes=3 * 10**8,
        requests_in_flight=1, memory_available_bytes=10**9, compute_busy=0.5, queue_depth=2,
        kv_cache_bytes=65536, segments_held=1, blocks_held=4,
        block_times=BlockTimes(decode_s_per_block=0.002, prefill_s_per_block_token=0.0004,
                               decode_samples=12, source="forwards"),
        links=(LinkObservation(peer="w1", rtt_s=0.051, bandwidth_bytes_per_s=1.01e6,
                               probes_sent=2, probe_bytes=20_700,
                               inbound_bandwidth_bytes_per_s=9.5e5, inbound_samples=6),),
    ),  # fmt: skip
    CapacityProfile(
        as_of_s=1.7e9, model_id="tiny-llama", heartbeat_timeout_s=3.0,
        nodes=(NodeCapacity(node="w2", alive=False, trust=0, memory_free_bytes=0, flops_per_s=0.0,
                            utilisation=0.0, health="down", down_reason="heartbeat_timeout",
                            decode_s_per_block=0.002, compute_source="benchmark",
                            layer_s_per_token=(0.0004, 0.0004), last_seen_s=1.7e9 - 4),),
        links=(LinkCapacity(src="w1", dst="w2", bandwidth_bytes_per_s=1e6, latency_s=0.025,
                            rtt_s=0.05, loss=0.0, health="degraded", degraded=("bandwidth",),
                            bandwidth_source="probe", probe_bytes_per_s=20_000.0),),
        layers=(LayerCost(index=0, flops_per_token=2.7e5, activation_bytes_per_token=256,
                          kv_bytes_per_token=128, weight_bytes=540_000),),
    ),  # fmt: skip
    NodeJoined(node="w1", at_s=1.7e9, reason="status"),
    NodeDown(node="w2", at_s=1.7e9, reason="heartbeat_timeout",
             evidence=(Evidence(metric="heartbeat_age_s", old_value=1.0, new_value=3.2,
                                threshold=3.0, window_s=3.2),)),  # fmt: skip
    NodeOverloaded(node="w2", at_s=1.7e9,
                   evidence=(Evidence(metric="compute_busy", old_value=0.2, new_value=0.97,
                                      threshold=0.9, window_s=3.0, samples=3),)),  # fmt: skip
    NodeOverloadCleared(node="w2", at_s=1.7e9 + 9, evidence=(Evidence(metric="compute_busy"),)),
    LinkDegraded(src="w1", dst="w2", at_s=1.7e9, metric="bandwidth",
                 evidence=(Evidence(metric="bandwidth_bytes_per_s", old_value=4e6, new_value=1e6,
                                    threshold=2.8e6, window_s=3.0, samples=3),)),  # fmt: skip
    LinkRecovered(src="w1", dst="w2", at_s=1.7e9 + 20, metric="rtt"),
    EmulationCommand(command_id=7, slowdown=4.0, reset_links=True, noise=0.1,
                     links=(EmulatedLink(dst="w2", bandwidth_bytes_per_s=1e6, latency_s=0.05),
                            EmulatedLink(dst="w3"))),  # fmt: skip
    EmulationApplied(node="w1", command_id=7, slowdown=4.0,
                     links=(EmulatedLink(dst="w2", bandwidth_bytes_per_s=1e6, latency_s=0.05),)),
    RolloutRequested(decision_id=3, plan=PLAN, reason="link car->rsu degraded"),
    RolloutFinished(decision_id=3, epoch=8, previous_epoch=7, outcome="aborted",
                    reason="rsu: shard sha256 mismatch", prepare_s=0.4),  # fmt: skip
    EpochLedger(highest_epoch=9, in_progress=9, decision_id=4, previous_epoch=7),
    ServiceStatus(service="broadcaster", at_s=1.7e9, refused={"RolloutRequested_forged": 2}),
]


def test_every_kind_has_a_hand_built_example() -> None:
    assert {type(example).kind for example in EXAMPLES} == set(MESSAGE_KINDS)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.kind)
def test_hand_built_examples_round_trip(message: Message) -> None:
    decoded = codec.decode(codec.encode(message, origin="svc-1", seq=5)).message
    assert decoded == message and type(decoded) is type(message)


def test_every_kind_travels_on_some_topic() -> None:
    carried = {kind for topic in topics.REGISTRY.values() for kind in topic.kinds}
    assert carried == set(MESSAGE_KINDS.values())


def test_messages_are_frozen_strict_and_closed() -> None:
    status = EXAMPLES[0]
    with pytest.raises(pydantic.ValidationError):
        status.trust = 3  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        CommitEpoch(epoch="4")  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError):
        CommitEpoch(epoch=4, note="x")  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        EmbeddingReady(request_id="r", embedding=(float("nan"),), elapsed_s=0.0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Segment(node="w1", start=4, end=4),
        lambda: Segment(node="w/1", start=0, end=1),
        lambda: GenerateRequest(request_id="r", reply_to="c"),
        lambda: GenerateRequest(request_id="r", reply_to="c", prompt="a", token_ids=(1,)),
        lambda: GenerateRequest(request_id="r", reply_to="c+", prompt="a"),
        lambda: GenerateRequest(request_id="r", reply_to="c", prompt="a", top_p=0.0),
        lambda: Plan(epoch=1, model_id="m", entry_node="w1", segments=()),
        lambda: NodeStatus(node="w1", state="online", trust=-1, memory_bytes=0, threads=1),
        lambda: RequestFailed(request_id="r", error="oops", message="x"),
        lambda: PlanProposed(request_id="p", feasible=True),
        lambda: PlanProposed(request_id="p", feasible=False, error="timeout",
                             best=EXAMPLES_BEST),  # fmt: skip
        lambda: PlanRequested(request_id="p", reply_to="c", model_id="m", source="w1",
                              profile=CapacityProfile(as_of_s=0.0, nodes=()), alternatives=17),  # fmt: skip
        lambda: PrivacyPolicy(trusted_level=-1),
        lambda: PrivacyPolicy(private_blocks=70_000),
        lambda: PrivacyPolicySet(policy=PrivacyPolicy(), trusted_level=2),  # the old flat form
    ],
)
def test_validators_reject_bad_values(build: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        build()  # type: ignore[operator]


def test_plan_signature_covers_every_field() -> None:
    assert PLAN.signature_ok("edgesplit-dev-key")
    assert not PLAN.signature_ok("another-key")
    moved = PLAN.model_copy(update={"entry_node": "rsu-1"})
    assert not moved.signature_ok("edgesplit-dev-key")
    assert not PLAN.model_copy(update={"signature": ""}).signature_ok("edgesplit-dev-key")


def test_declaring_a_kind_twice_fails() -> None:
    with pytest.raises(TypeError, match="declared twice"):
        type("CommitEpoch", (Message,), {"__annotations__": {"epoch": int}})


def test_the_privacy_policy_protects_first_and_last_blocks_and_only_tightens() -> None:
    policy = PrivacyPolicy(trusted_level=2, private_blocks=2, private_last_blocks=1)
    assert policy.block_trust(6) == (2, 2, 0, 0, 0, 2)
    assert policy.protects_any(1, 3, 6) and policy.protects_any(4, 6, 6)
    assert not policy.protects_any(2, 5, 6) and PrivacyPolicy().block_trust(3) == (0, 0, 0)
    looser = PrivacyPolicy(trusted_level=3, private_blocks=1)
    both = policy.stricter(looser)
    assert both == PrivacyPolicy(trusted_level=3, private_blocks=2, private_last_blocks=1)
    assert both == looser.stricter(policy) and policy.stricter(PrivacyPolicy()) == policy


def _float_paths(value: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """The paths (keys and indices) of every float inside a dumped message."""
    if isinstance(value, float):
        return [path]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _float_paths(item, (*path, key))]
    if isinstance(value, tuple | list):
        return [p for index, item in enumerate(value) for p in _float_paths(item, (*path, index))]
    return []


def _replaced(value: object, path: tuple[object, ...], new: float) -> object:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {key: _replaced(item, rest, new) if key == head else item for key, item in value.items()}
    assert isinstance(value, tuple | list)
    return type(value)(_replaced(item, rest, new) if index == head else item
                       for index, item in enumerate(value))  # fmt: skip


WITH_FLOATS = [example for example in EXAMPLES if _float_paths(example.model_dump())]


def test_most_kinds_carry_a_float_to_check() -> None:
    # Timestamps, durations, rates and sizes: the check below must see many kinds.
    assert len(WITH_FLOATS) >= 10


@pytest.mark.parametrize("message", WITH_FLOATS, ids=lambda m: m.kind)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_every_float_field_refuses_nan_and_infinity(message: Message, bad: float) -> None:
    """Each float of each kind (timestamps, durations, nested ones too), set to NaN or
    +-Inf, is refused: by the model, and by the codec as a DecodeError."""
    dumped = message.model_dump()
    type(message).model_validate(dumped)  # the untouched dump is valid
    for path in _float_paths(dumped):
        body = _replaced(dumped, path, bad)
        with pytest.raises(pydantic.ValidationError):
            type(message).model_validate(body)
        raw = msgpack.unpackb(codec.encode(message, origin="n", seq=1))
        raw["body"] = body
        with pytest.raises(DecodeError, match=f"invalid {message.kind}"):
            codec.decode(msgpack.packb(raw))


def test_plan_link_precisions_round_trip_and_old_plans_decode() -> None:
    from shared.messages import LinkPrecision
    from shared.planning.route import route_of

    lossy = PLAN.model_copy(update={"link_precisions": (
        LinkPrecision(target=4, activations="int8"), LinkPrecision(target=30, activations="fp16"))})
    lossy = Plan.model_validate(lossy.model_dump()).sign("edgesplit-dev-key")
    decoded = codec.decode(codec.encode(lossy, origin="svc-1", seq=6)).message
    assert decoded == lossy and decoded.signature_ok("edgesplit-dev-key")
    assert (decoded.activations_for(4), decoded.activations_for(30), decoded.activations_for(0)) == ("int8", "fp16", None)
    route = route_of(decoded, 30)
    assert (route.activations_for(4), route.activations_for(30), route.activations_for(0)) == ("int8", "fp16", None)
    old = PLAN.model_dump()
    del old["link_precisions"]  # a plan from a sender that predates the field
    assert Plan.model_validate(old).link_precisions == ()
    for bad in ([{"target": 5, "activations": "int8"}],  # starts no segment
                [{"target": 4, "activations": "int8"}, {"target": 4, "activations": "fp16"}],
                [{"target": 4, "activations": "int4"}]):
        with pytest.raises(pydantic.ValidationError):
            Plan.model_validate({**old, "link_precisions": bad})
