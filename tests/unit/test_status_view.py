"""The `status --watch` view: a snapshot rendered to text, and the snapshot's bookkeeping."""

from __future__ import annotations

import io

from rich.console import Console

from services.cli.status_state import KEPT_DECISIONS, StatusSnapshot
from services.cli.status_view import FREE, HELD, band, render_status
from shared.messages import (
    CapacityProfile,
    DecisionRecorded,
    EmulatedLink,
    EmulationApplied,
    LinkCapacity,
    NodeCapacity,
    NodeStatus,
    Plan,
    PrivacyPolicy,
    PrivacyPolicySet,
    Segment,
    ServiceStatus,
    Telemetry,
)

NOW_S = 1_800_000_000.0


def plan(epoch: int, *segments: tuple[str, int, int]) -> Plan:
    return Plan(epoch=epoch, model_id="tiny-llama", entry_node=segments[0][0],
                segments=tuple(Segment(node=n, start=a, end=b) for n, a, b in segments))  # fmt: skip


def status(node: str, state: str = "online", trust: int = 1, *segments: tuple[int, int]) -> NodeStatus:
    return NodeStatus(node=node, state=state, trust=trust, memory_bytes=2_000_000_000, threads=2,
                      epoch=3, segments=tuple(Segment(node=node, start=a, end=b) for a, b in segments))  # fmt: skip


def capacity() -> CapacityProfile:
    def node(name: str, health: str = "up") -> NodeCapacity:
        return NodeCapacity(node=name, alive=health != "down", trust=1, memory_free_bytes=10**9,
                            flops_per_s=1e9, utilisation=0.25, health=health, memory_bytes=2 * 10**9,
                            memory_used_bytes=300 * 10**6, cpu_utilisation=0.5,
                            kv_cache_bytes=12_500_000, decode_s_per_block=0.0004,
                            last_seen_s=NOW_S - 1.0)  # fmt: skip

    return CapacityProfile(
        as_of_s=NOW_S - 2.0, nodes=(node("car"), node("rsu", "overloaded"), node("mec", "down")),
        links=(
            LinkCapacity(src="car", dst="rsu", bandwidth_bytes_per_s=50e3, latency_s=0.05,
                         rtt_s=0.1, loss=0.0, health="degraded", degraded=("bandwidth",)),
            LinkCapacity(src="rsu", dst="car", bandwidth_bytes_per_s=12.5e6, latency_s=0.002,
                         rtt_s=0.004, health="ok"),
        ),
    )  # fmt: skip


def decision(decision_id: int, **changes: object) -> DecisionRecorded:
    fields: dict[str, object] = dict(
        decision_id=decision_id, trigger="link_degraded", trigger_detail="car->rsu bandwidth",
        action="migrate", predicted_gain_s=1.234, current_latency_s=0.65, predicted_latency_s=0.085,
        outcome="committed", to_epoch=4, at_s=NOW_S - 5,
    )  # fmt: skip
    fields.update(changes)
    return DecisionRecorded.model_validate(fields)


def full_snapshot() -> StatusSnapshot:
    snapshot = StatusSnapshot(broker="mqtt://127.0.0.1:1883", cluster="site")
    for message in (
        status("car", "online", 2, (0, 4)), status("rsu", "online", 1, (4, 8)),
        status("mec", "offline", 0), capacity(), plan(4, ("car", 0, 4), ("rsu", 4, 8)),
        decision(7), decision(8, action="keep", outcome="none", to_epoch=None, trigger="periodic",
                              trigger_detail=""),
        PrivacyPolicySet(policy=PrivacyPolicy(trusted_level=2, private_blocks=2)),
        EmulationApplied(node="car", command_id=1, slowdown=4.0,
                         links=(EmulatedLink(dst="rsu", bandwidth_bytes_per_s=50e3, latency_s=0.05),)),
    ):  # fmt: skip
        assert snapshot.apply(message)
    return snapshot


def text_of(snapshot: StatusSnapshot, width: int = 160) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=False)
    console.print(render_status(snapshot, NOW_S))
    return console.export_text()


def test_the_view_shows_nodes_links_plan_and_decisions() -> None:
    text = text_of(full_snapshot())
    assert "cluster site" in text and "profile age 2.0 s" in text
    assert "privacy: trust >= 2 for blocks [0, 2)" in text
    table = text[text.index("nodes (3)"):text.index("measured links")].splitlines()
    rows = {line.split()[0]: line for line in table[3:] if line.strip()}
    assert set(rows) == {"car", "rsu", "mec", "emulated"}
    assert "online" in rows["car"] and "[0,4)" in rows["car"] and "50%/25%" in rows["car"]
    assert "300/2000" in rows["car"] and "12.5" in rows["car"] and "0.400" in rows["car"]  # MB, KV MB, ms
    assert "overloaded" in rows["rsu"] and "[4,8)" in rows["rsu"]
    assert "offline" in rows["mec"]
    assert "emulated car: slowdown x4, to rsu 50.00 kB/s +50 ms" in text
    degraded = [line for line in text.splitlines() if "car -> rsu" in line]
    assert len(degraded) == 1 and "DEGRADED (bandwidth)" in degraded[0] and "50.00 kB/s" in degraded[0]
    healthy = [line for line in text.splitlines() if "rsu -> car" in line]
    assert "DEGRADED" not in healthy[0] and "12.50 MB/s" in healthy[0] and "ok" in healthy[0]
    assert "plan: epoch 4 · model tiny-llama · entry car · 8 blocks" in text
    bars = {line.split()[0]: line for line in text.splitlines() if HELD in line}
    assert f"{HELD * 28}{FREE * 28}" in bars["car"] and "[0,4) entry" in bars["car"]
    assert f"{FREE * 28}{HELD * 28}" in bars["rsu"]
    assert "▒" * 14 + FREE * 42 in text  # the policy row: blocks [0, 2) private
    assert "link_degraded: car->rsu bandwidth" in text and "650.0->85.0" in text
    assert "1.234" in text and "committed epoch 4" in text
    assert text.index("periodic") < text.index("link_degraded")  # newest first


def test_an_empty_cluster_says_what_is_missing() -> None:
    text = text_of(StatusSnapshot(broker="mqtt://h:1", cluster="c", connected=False))
    assert "reconnecting" in text and "nodes: none seen" in text and "plan: none published" in text
    assert "links: none measured yet" in text and "decisions: none recorded yet" in text


def test_a_narrow_terminal_still_renders_every_node() -> None:
    text = text_of(full_snapshot(), width=60)
    assert all(name in text for name in ("car", "rsu", "mec"))


def test_band_keeps_a_one_block_segment_visible_in_a_long_model() -> None:
    row = band([Segment(node="n", start=100, end=101)], blocks=400, cells=60)
    assert len(row) == 60 and row.count(HELD) == 1 and row.index(HELD) == 15
    assert band([Segment(node="n", start=0, end=3)], blocks=3, cells=3) == HELD * 3


def test_snapshot_counts_changes_and_keeps_the_newest_version_of_a_decision() -> None:
    snapshot = StatusSnapshot(broker="b", cluster="c")
    assert snapshot.apply(decision(1, outcome="pending", to_epoch=None))
    assert not snapshot.apply(decision(1, outcome="pending", to_epoch=None))  # a retained replay
    assert snapshot.apply(decision(1))
    assert snapshot.version == 2 and snapshot.latest_decisions(5)[0].outcome == "committed"
    for decision_id in range(2, KEPT_DECISIONS + 10):
        snapshot.apply(decision(decision_id))
    assert len(snapshot.decisions) == KEPT_DECISIONS and min(snapshot.decisions) == 10
    assert not snapshot.apply(object())


def test_structure_ignores_measured_numbers_but_not_link_health() -> None:
    snapshot = full_snapshot()
    before = snapshot.structure()
    profile = capacity()
    snapshot.apply(profile.model_copy(update={"as_of_s": NOW_S}))
    assert snapshot.structure() == before
    healed = tuple(link.model_copy(update={"health": "ok", "degraded": ()}) for link in profile.links)
    snapshot.apply(profile.model_copy(update={"links": healed}))
    assert snapshot.structure() != before


def test_forged_frames_from_telemetry_show_in_the_view() -> None:
    """Each worker's count of frames that failed authentication (issue #17, item 4)."""

    def telemetry(node: str, forged: int) -> Telemetry:
        return Telemetry(node=node, window_s=1.0, cpu_utilisation=0.1, memory_used_bytes=1,  # type: ignore[arg-type]
                         requests_in_flight=0, frames_forged=forged)  # fmt: skip

    snapshot = full_snapshot()
    assert "forged" not in text_of(snapshot)
    assert not snapshot.apply(telemetry("car", 0))  # nothing forged: nothing changes
    before = snapshot.structure()
    assert snapshot.apply(telemetry("rsu", 7)) and snapshot.apply(telemetry("mec", 2))
    assert not snapshot.apply(telemetry("rsu", 7))  # the next window, same count
    assert snapshot.structure() != before
    assert "forged frames dropped: mec 2, rsu 7" in text_of(snapshot)


def test_the_view_shows_kv_in_use_against_each_nodes_budget() -> None:
    snapshot = full_snapshot()
    budgeted = status("car", "online", 2, (0, 4)).model_copy(update={"kv_budget_bytes": 900_000_000})
    assert snapshot.apply(budgeted)
    assert snapshot.apply(NodeStatus(node="edge", state="online", trust=0, memory_bytes=10**9, threads=1,  # type: ignore[arg-type]
                                     kv_budget_bytes=50_000_000))  # fmt: skip
    text = text_of(snapshot)
    table = text[text.index("nodes (4)"):text.index("measured links")].splitlines()
    rows = {line.split()[0]: line for line in table[3:] if line.strip()}
    assert "12.5/900.0" in rows["car"].split()  # KV MB in use / budget
    assert "12.5" in rows["rsu"].split() and "12.5/" not in rows["rsu"]  # no budget announced
    assert "-/50.0" in rows["edge"].split()  # a budget, no telemetry yet
def test_refused_control_messages_show_in_the_header() -> None:
    snapshot = StatusSnapshot(broker="mqtt://127.0.0.1:1883", cluster="site")
    assert snapshot.refusals() == {}
    snapshot.apply(ServiceStatus(service="broadcaster", at_s=1.0, refused={"RolloutRequested_forged": 2}))
    snapshot.apply(NodeStatus(node="car", state="online", trust=2, memory_bytes=1, threads=1,  # type: ignore[arg-type]
                              refused={"Plan_replayed": 1}))  # fmt: skip
    assert snapshot.refusals() == {"broadcaster": {"RolloutRequested_forged": 2}, "car": {"Plan_replayed": 1}}
    console = Console(width=200, record=True, color_system=None, file=io.StringIO())
    console.print(render_status(snapshot, NOW_S))
    text = console.export_text()
    assert "refused control messages: broadcaster RolloutRequested_forged 2; car Plan_replayed 1" in text


def test_requests_waiting_at_the_entry_show_beside_those_in_flight() -> None:
    snapshot = full_snapshot()
    profile = capacity()
    busy_car = profile.nodes[0].model_copy(update={"requests_in_flight": 8, "requests_queued": 52})
    assert snapshot.apply(profile.model_copy(update={"nodes": (busy_car, *profile.nodes[1:]),
                                                     "as_of_s": NOW_S - 1.0}))  # fmt: skip
    text = text_of(snapshot)
    table = text[text.index("nodes (3)"):text.index("measured links")].splitlines()
    rows = {line.split()[0]: line for line in table[3:] if line.strip()}
    assert "8+52" in rows["car"].split()  # in flight + waiting
    assert "0" in rows["rsu"].split() and "+" not in rows["rsu"]  # nobody waits: the count alone
