"""The scenario report: numbers computed from hand-built runs, and the files it writes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from services.cli.scenarios.plots import plan_intervals
from services.cli.scenarios.records import (
    EventRecord,
    Placement,
    PolicyRun,
    Replan,
    RequestRecord,
    UtilisationSample,
)
from services.cli.scenarios.report import meets_slo, percentile, policy_metrics, write_report
from services.cli.scenarios.spec import Event, Scenario, Slo, Workload

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLO = Slo(ttft_s=1.5, tpot_s=0.2)


def completed(request_id: str, sent: float, token_times: tuple[float, ...], *,
              mismatched: bool = False) -> RequestRecord:  # fmt: skip
    return RequestRecord(request_id, 0, sent, "completed", first_token_at_s=token_times[0],
                         finished_at_s=token_times[-1], token_times_s=token_times,
                         tokens=tuple(range(len(token_times))), mismatched=mismatched)  # fmt: skip


def generate_run(policy: str = "adaptive", **changes: object) -> PolicyRun:
    """Five requests: r1 meets the SLO; r2 too slow per token; r3 (one token, mismatched)
    too slow to its first token; r4 failed; r5 lost. 10 s, 8 tokens completed."""
    requests = (
        completed("r1", 0.0, (0.5, 0.6, 0.7, 0.8)),  # ttft 500 ms, tpot 100 ms
        completed("r2", 1.0, (1.2, 1.5, 1.8)),  # ttft 200 ms, tpot 300 ms
        completed("r3", 2.0, (4.0,), mismatched=True),  # ttft 2000 ms, no tpot
        RequestRecord("r4", 1, 3.0, "failed", finished_at_s=3.5, error="stage_timed_out"),
        RequestRecord("r5", 1, 4.0, "lost"),
    )
    run = PolicyRun(policy=policy, duration_s=10.0, nodes=("car", "rsu", "mec"), requests=requests)
    return replace(run, **changes)  # type: ignore[arg-type]


def replan(at_s: float, reaction_s: float | None, epoch: int) -> Replan:
    return Replan(at_s=at_s, kind="migrate", trigger="link_degraded", reaction_s=reaction_s,
                  stall_ms=120.5, bytes_moved=4096, epoch=epoch, layout="car[0,2) mec[2,6)",
                  predicted_tpot_s=0.085, realised_tpot_s=0.0904, cause="link car->rsu")  # fmt: skip


def scenario(kind: str = "generate") -> Scenario:
    workload = Workload(kind=kind, arrival="poisson", rate_per_s=0.5, concurrency=None,  # type: ignore[arg-type]
                        prompts=("hello",))  # fmt: skip
    slo = SLO if kind == "generate" else Slo(latency_s=0.5)
    events = (Event(at_s=2.0, kind="link", src="car", dst="rsu", bandwidth_bytes_per_s=2e4),
              Event(at_s=6.0, kind="kill", node="rsu"))  # fmt: skip
    return Scenario(name="unit", path=Path("/tmp/unit.toml"), topology=Path("/tmp/site.toml"),
                    model="tiny-llama", duration_s=10.0, seed=3, workload=workload, slo=slo,
                    events=events)  # fmt: skip


# --- numbers ----------------------------------------------------------------------------


def test_nearest_rank_percentiles() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    ten = [float(v) for v in range(10, 0, -1)]  # unsorted on purpose
    assert (percentile(ten, 50), percentile(ten, 95), percentile(ten, 99)) == (5.0, 10.0, 10.0)
    hundred = [float(v) for v in range(1, 101)]
    assert (percentile(hundred, 50), percentile(hundred, 95), percentile(hundred, 99)) == (
        50.0, 95.0, 99.0)  # fmt: skip


def test_request_counts_and_latency_percentiles() -> None:
    metrics = policy_metrics(generate_run(), SLO, "generate")
    assert metrics["requests"] == {"sent": 5, "completed": 3, "failed": 1, "lost": 1,
                                   "mismatched": 1}  # fmt: skip
    assert metrics["ttft_ms"] == {"p50": 500.0, "p95": 2000.0, "p99": 2000.0}
    assert metrics["tpot_ms"] == {"p50": 100.0, "p95": 300.0, "p99": 300.0}
    assert metrics["latency_ms"] == {"p50": 800.0, "p95": 2000.0, "p99": 2000.0}
    assert metrics["failed_by_error"] == {"stage_timed_out": 1}


def test_throughput_slo_attainment_and_goodput() -> None:
    metrics = policy_metrics(generate_run(), SLO, "generate")
    assert metrics["throughput"] == {"tokens_per_s": 0.8, "requests_per_s": 0.3}
    assert metrics["slo_attainment"] == 0.2  # only r1 of the 5 sent
    assert metrics["goodput_tokens_per_s"] == 0.4  # r1's 4 tokens over 10 s
    assert metrics["goodput_requests_per_s"] == 0.1


def test_failed_and_lost_requests_are_slo_misses_even_without_targets() -> None:
    metrics = policy_metrics(generate_run(), Slo(), "generate")
    assert metrics["slo_attainment"] == 0.6  # 3 completed of 5 sent
    assert metrics["goodput_tokens_per_s"] == 0.8


def test_slo_targets_one_by_one() -> None:
    fast, slow_tokens, late_first = generate_run().requests[:3]
    assert meets_slo(fast, SLO, "generate")
    assert not meets_slo(slow_tokens, SLO, "generate")  # tpot 300 ms > 200 ms
    assert not meets_slo(late_first, SLO, "generate")  # ttft 2 s > 1.5 s
    assert meets_slo(late_first, Slo(tpot_s=0.01), "generate")  # one token: no tpot to miss
    assert not meets_slo(fast, Slo(latency_s=0.5), "generate")  # 800 ms end to end
    for request in generate_run().requests[3:]:
        assert not meets_slo(request, Slo(), "generate")


def test_utilisation_means_every_node_present() -> None:
    samples = (UtilisationSample(1.0, "car", 0.2), UtilisationSample(2.0, "car", 0.4),
               UtilisationSample(1.0, "rsu", 1.0), UtilisationSample(3.0, "joined", 0.5))  # fmt: skip
    utilisation = policy_metrics(generate_run(utilisation=samples), SLO, "generate")["utilisation"]
    assert utilisation == {"car": 0.3, "rsu": 1.0, "mec": 0.0, "joined": 0.5}


def test_replans_listed_in_time_order_with_reaction_summary() -> None:
    run = generate_run(replans=(replan(7.0, None, 3), replan(3.0, 1.25, 2), replan(5.0, 2.5, 4)))
    metrics = policy_metrics(run, SLO, "generate")
    assert [entry["at_s"] for entry in metrics["replans"]] == [3.0, 5.0, 7.0]
    first = metrics["replans"][0]
    assert first == {"at_s": 3.0, "kind": "migrate", "trigger": "link_degraded", "reaction_s": 1.25,
                     "stall_ms": 120.5, "bytes_moved": 4096, "epoch": 2,
                     "layout": "car[0,2) mec[2,6)", "cause": "link car->rsu",
                     "predicted_tpot_ms": 85.0, "realised_tpot_ms": 90.4}  # fmt: skip
    assert metrics["reaction_s"] == {"p50": 1.25, "p95": 2.5, "max": 2.5}
    assert policy_metrics(generate_run(), SLO, "generate")["reaction_s"]["max"] is None


def test_embed_ttft_is_latency_and_there_is_no_tpot() -> None:
    requests = (RequestRecord("e1", 0, 0.0, "completed", first_token_at_s=0.3, finished_at_s=0.3),
                RequestRecord("e2", 0, 1.0, "completed", first_token_at_s=1.9, finished_at_s=1.9),
                RequestRecord("e3", 0, 2.0, "lost"))  # fmt: skip
    run = PolicyRun("static", 4.0, ("car",), requests=requests)
    metrics = policy_metrics(run, Slo(latency_s=0.5), "embed")
    assert metrics["latency_ms"] == {"p50": 300.0, "p95": 900.0, "p99": 900.0}
    assert metrics["ttft_ms"] == metrics["latency_ms"]
    assert metrics["tpot_ms"] == {"p50": None, "p95": None, "p99": None}
    assert metrics["throughput"] == {"tokens_per_s": None, "requests_per_s": 0.5}
    assert metrics["slo_attainment"] == 0.3333 and metrics["goodput_tokens_per_s"] is None


def test_nothing_sent_gives_nulls_not_zeros_or_errors() -> None:
    metrics = policy_metrics(PolicyRun("static", 0.0, ("car",), interrupted=True), SLO, "generate")
    assert metrics["slo_attainment"] is None
    assert metrics["ttft_ms"] == {"p50": None, "p95": None, "p99": None}
    assert metrics["throughput"] == {"tokens_per_s": None, "requests_per_s": None}
    assert metrics["interrupted"] is True and metrics["utilisation"] == {"car": 0.0}


def test_plan_intervals_last_until_the_next_epoch() -> None:
    placements = (Placement(0.0, "car", 0, 2, 1), Placement(0.0, "rsu", 2, 6, 1),
                  Placement(4.0, "car", 0, 2, 2), Placement(4.0, "mec", 2, 6, 2))  # fmt: skip
    intervals = plan_intervals(PolicyRun("adaptive", 10.0, ("car",), placements=placements))
    assert [(start, end, p.node) for start, end, p in intervals] == [
        (0.0, 4.0, "car"), (0.0, 4.0, "rsu"), (4.0, 10.0, "car"), (4.0, 10.0, "mec")]  # fmt: skip


# --- files ------------------------------------------------------------------------------

REQUIRED = {"requests", "ttft_ms", "tpot_ms", "latency_ms", "throughput", "slo_attainment",
            "goodput_tokens_per_s", "replans", "privacy_violations", "utilisation"}  # fmt: skip
REPLAN_KEYS = {"at_s", "kind", "trigger", "reaction_s", "stall_ms", "bytes_moved"}


def check_report_keys(data: dict[str, object], policies: list[str], nodes: set[str]) -> None:
    assert {"scenario", "policies"} <= set(data) and data["scenario"] == "unit"
    assert isinstance(data["policies"], dict) and list(data["policies"]) == policies
    for metrics in data["policies"].values():
        assert REQUIRED <= set(metrics)
        assert set(metrics["requests"]) == {"sent", "completed", "failed", "lost", "mismatched"}
        for key in ("ttft_ms", "tpot_ms", "latency_ms"):
            assert set(metrics[key]) == {"p50", "p95", "p99"}
        assert set(metrics["throughput"]) == {"tokens_per_s", "requests_per_s"}
        assert all(REPLAN_KEYS <= set(entry) for entry in metrics["replans"])
        assert set(metrics["utilisation"]) == nodes


def check_pngs(out: Path, markdown: str) -> None:
    for name in ("tpot.png", "placement.png", "utilisation.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f"({name})" in markdown


def test_write_report_for_three_policies(tmp_path: Path) -> None:
    placements = (Placement(0.0, "car", 0, 2, 1), Placement(0.0, "rsu", 2, 6, 1),
                  Placement(3.0, "car", 0, 2, 2), Placement(3.0, "mec", 2, 6, 2))  # fmt: skip
    runs = [
        generate_run("static", privacy_violations=2, placements=placements[:2],
                     events=(EventRecord(2.0, "link", "link car->rsu: 20 kB/s"),)),
        generate_run("migrate", replans=(replan(3.0, 1.0, 2),), placements=placements),
        generate_run("adaptive", replans=(replan(3.0, 0.5, 2),), placements=placements,
                     utilisation=(UtilisationSample(1.0, "mec", 0.25),), notes=("probe lost",)),
    ]  # fmt: skip
    path = write_report(tmp_path / "out", scenario(), runs, "edgesplit scenario run unit.toml")
    assert path == tmp_path / "out" / "report.md"
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    check_report_keys(data, ["static", "migrate", "adaptive"], {"car", "rsu", "mec"})
    assert data["command"] == "edgesplit scenario run unit.toml"
    assert data["policies"]["static"]["privacy_violations"] == 2
    markdown = path.read_text()
    assert "| | static | migrate | adaptive |" in markdown
    assert "| SLO attainment | 20.0 % | 20.0 % | 20.0 % |" in markdown
    assert "| privacy violations | 2 | 0 | 0 |" in markdown
    assert "| utilisation mec | 0.0 % | 0.0 % | 25.0 % |" in markdown
    assert "link car->rsu: 20 kB/s" in markdown and "trigger link_degraded" in markdown
    assert "TPOT predicted 85.0 ms, realised 90.4 ms" in markdown and "probe lost" in markdown
    check_pngs(tmp_path / "out", markdown)
    assert not list((tmp_path / "out").glob("*.partial"))


@pytest.mark.parametrize("kind", ["generate", "embed"])
def test_write_report_for_partial_runs(tmp_path: Path, kind: str) -> None:
    """An interrupted run with nothing measured, and no runs at all, still give a report."""
    interrupted = PolicyRun("static", 1.5, ("car", "rsu"), interrupted=True)
    path = write_report(tmp_path / "one", scenario(kind), [interrupted], "edgesplit scenario run")
    data = json.loads((tmp_path / "one" / "report.json").read_text())
    check_report_keys(data, ["static"], {"car", "rsu"})
    markdown = path.read_text()
    assert "interrupted after 1.5 s" in markdown and "| | static |" in markdown
    check_pngs(tmp_path / "one", markdown)
    empty = write_report(tmp_path / "none", scenario(kind), [], "edgesplit scenario run")
    assert json.loads((tmp_path / "none" / "report.json").read_text())["policies"] == {}
    check_pngs(tmp_path / "none", empty.read_text())


def test_values_that_are_not_finite_become_null(tmp_path: Path) -> None:
    bad = replace(replan(3.0, float("nan"), 2), stall_ms=float("inf"))
    metrics = policy_metrics(generate_run(replans=(bad,)), SLO, "generate")
    assert metrics["replans"][0]["stall_ms"] is None and metrics["replans"][0]["reaction_s"] is None
    json.dumps(metrics, allow_nan=False)


def test_tpot_counts_the_tokens_a_failed_request_streamed() -> None:
    """A request that streamed at 2 s per token and then timed out is in the TPOT
    percentiles (it suffered that TPOT); it is still a failure, not in latency or TTFT."""
    slow = RequestRecord("slow", 0, 0.0, "failed", first_token_at_s=1.0, finished_at_s=9.0,
                         token_times_s=(1.0, 3.0, 5.0), tokens=(1, 2, 3), error="timeout")  # fmt: skip
    run = PolicyRun("static", 10.0, ("car",), requests=(completed("ok", 0.0, (0.5, 0.6, 0.7)), slow))
    metrics = policy_metrics(run, Slo(), "generate")
    assert metrics["tpot_ms"]["p95"] == pytest.approx(2000.0)
    assert metrics["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert metrics["requests"]["failed"] == 1
    assert metrics["ttft_ms"]["p95"] == pytest.approx(500.0)
