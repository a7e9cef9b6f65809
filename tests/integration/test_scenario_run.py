"""`edgesplit scenario run` end to end: real brokers, workers and control services per
policy, a real checkpoint, the report's contract (docs/SCENARIOS.md).

- Every event kind on a topology and a checkpoint folder the runner was not tuned for.
- Ctrl-C: the run stops cleanly and still writes what it measured.
- Every shipped scenario, shortened (slow tier): the report's keys, nothing lost, nothing
  mismatched, and no privacy violation under the adaptive policy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EDGESPLIT = [sys.executable, "-m", "services.cli"]
POLICY_KEYS = {"requests", "ttft_ms", "tpot_ms", "latency_ms", "throughput", "slo_attainment",
               "goodput_tokens_per_s", "replans", "privacy_violations", "utilisation"}  # fmt: skip
REQUEST_KEYS = {"sent", "completed", "failed", "lost", "mismatched"}
REPLAN_KEYS = {"at_s", "kind", "trigger", "reaction_s", "stall_ms", "bytes_moved"}

TOPOLOGY = """
name = "four-nodes"
private_blocks = 1
trusted_level = 1
[[nodes]]
id = "gw"
trust = 2
memory_bytes = 1e9
speed = 0.8
entry = true
[[nodes]]
id = "a"
trust = 1
memory_bytes = 1e9
[[nodes]]
id = "b"
trust = 0
memory_bytes = 1e9
[[nodes]]
id = "late"
trust = 1
memory_bytes = 1e9
[[links]]
src = "gw"
dst = "a"
bandwidth_bytes_per_s = 2e6
[[links]]
src = "gw"
dst = "b"
bandwidth_bytes_per_s = 2e6
"""

SCENARIO = """
name = "every-kind"
topology = "four.toml"
model = "ckpt"
duration_s = 24
seed = 5
[workload]
kind = "generate"
arrival = "closed"
concurrency = 2
max_new_tokens = 8
prompt_ids = [[1, 2, 3], [7, 8, 9, 10]]
[slo]
tpot_s = 0.5
[[events]]
at_s = 2
kind = "link"
src = "gw"
dst = "b"
bandwidth_bytes_per_s = 100e3
latency_s = 0.01
[[events]]
at_s = 3
kind = "link_trace"
src = "gw"
dst = "a"
file = "trace.csv"
[[events]]
at_s = 4
kind = "slowdown"
node = "a"
factor = 2
[[events]]
at_s = 5
kind = "join"
node = "late"
[[events]]
at_s = 8
kind = "privacy"
private_blocks = 2
trusted_level = 1
[[events]]
at_s = 11
kind = "kill"
node = "b"
[[events]]
at_s = 15
kind = "restart"
node = "b"
[[events]]
at_s = 18
kind = "leave"
node = "late"
"""


def _environment(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "EDGESPLIT_MODELS_DIR": str(tmp_path / "models"), "PYTHONUNBUFFERED": "1"}


def _check_report(report: dict[str, object], policies: list[str]) -> None:
    assert set(report["policies"]) == set(policies)  # type: ignore[arg-type]
    for policy, metrics in report["policies"].items():  # type: ignore[attr-defined]
        assert POLICY_KEYS <= set(metrics), policy
        assert REQUEST_KEYS <= set(metrics["requests"])
        for spread in ("ttft_ms", "tpot_ms", "latency_ms"):
            assert metrics[spread] is None or {"p50", "p95", "p99"} <= set(metrics[spread])
        assert {"tokens_per_s", "requests_per_s"} <= set(metrics["throughput"])
        for replan in metrics["replans"]:
            assert REPLAN_KEYS <= set(replan)
        assert metrics["requests"]["lost"] == 0, (policy, metrics["requests"])
        assert metrics["requests"]["mismatched"] == 0, (policy, metrics["requests"])
        assert metrics["requests"]["completed"] > 0, (policy, metrics["requests"])
    if "adaptive" in report["policies"]:  # type: ignore[operator]
        assert report["policies"]["adaptive"]["privacy_violations"] == 0  # type: ignore[index]


@pytest.mark.slow
def test_every_event_kind_on_a_checkpoint_folder_and_topology_it_was_not_tuned_for(tmp_path: Path) -> None:
    env = _environment(tmp_path)
    subprocess.run([*EDGESPLIT, "models", "tiny", "llama", "--out", str(tmp_path / "ckpt"), "--layers", "6"],
                   check=True, env=env, capture_output=True, timeout=120)  # fmt: skip
    (tmp_path / "four.toml").write_text(TOPOLOGY)
    (tmp_path / "trace.csv").write_text("t_s,bandwidth_bytes_per_s,latency_s\n0,1e6,0.005\n2,200e3,0.01\n4,2e6,0.002\n")
    (tmp_path / "every.toml").write_text(SCENARIO)
    out = tmp_path / "report"
    run = subprocess.run([*EDGESPLIT, "scenario", "run", str(tmp_path / "every.toml"), "--policy", "adaptive",
                          "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == f"report: {out / 'report.md'}"
    assert "[adaptive] 5/24 s:" in run.stderr  # a progress line per policy
    report = json.loads((out / "report.json").read_text())
    _check_report(report, ["adaptive"])
    applied = report["policies"]["adaptive"]["events"]
    assert [e["kind"] for e in applied] == ["link", "link_trace", "slowdown", "join", "privacy", "kill",
                                            "restart", "leave"]  # fmt: skip
    assert all(e.get("error") is None for e in applied), applied
    for name in ("report.md", "tpot.png", "placement.png", "utilisation.png"):
        assert (out / name).stat().st_size > 0


def test_ctrl_c_stops_the_run_and_still_writes_what_was_measured(tmp_path: Path) -> None:
    env = _environment(tmp_path)
    scenario = (ROOT / "deploy" / "scenarios" / "demo.toml").read_text()
    scenario = scenario.replace('topology = "../topologies/adaptive-tiny.toml"',
                                f'topology = "{ROOT / "deploy" / "topologies" / "adaptive-tiny.toml"}"')  # fmt: skip
    (tmp_path / "demo.toml").write_text(scenario)
    out = tmp_path / "report"
    process = subprocess.Popen([*EDGESPLIT, "scenario", "run", str(tmp_path / "demo.toml"), "--out", str(out)],
                               env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "err", "wb"), text=True)  # noqa: SIM115
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "[static] 5/30 s" not in (tmp_path / "err").read_text():
        assert process.poll() is None, (tmp_path / "err").read_text()[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=60)
    err = (tmp_path / "err").read_text()
    assert process.returncode == 0, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    assert "[migrate] skipped: interrupted" in err and "[adaptive] skipped: interrupted" in err
    report = json.loads((out / "report.json").read_text())
    static = report["policies"]["static"]
    assert static["interrupted"] is True and static["requests"]["sent"] > 0
    assert static["requests"]["lost"] == 0
    assert stdout.strip().endswith(f"report: {out / 'report.md'}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["v2x-handover", "smart-city", "industrial-privacy"])
def test_a_shipped_scenario_shortened(tmp_path: Path, name: str) -> None:
    out = tmp_path / "report"
    run = subprocess.run([*EDGESPLIT, "scenario", "run", str(ROOT / "deploy" / "scenarios" / f"{name}.toml"),
                          "--time-scale", "0.5", "--out", str(out)],
                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    _check_report(json.loads((out / "report.json").read_text()), ["static", "migrate", "adaptive"])


@pytest.mark.slow
def test_the_compressed_policy_sends_int8_on_the_slow_hops_and_reports_its_quality(tmp_path: Path) -> None:
    """compressed-links: both of the entry's links fall to 20 kB/s at 10 s; the compressed
    policy's orchestrator commits a plan that names int8 for the slow hops, and the report
    puts the answers' agreement with the unsplit fp32 model beside the latency."""
    out = tmp_path / "report"
    run = subprocess.run([*EDGESPLIT, "scenario", "run", str(ROOT / "deploy" / "scenarios" / "compressed-links.toml"),
                          "--policy", "compressed", "--out", str(out)],
                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "report.json").read_text())["policies"]["compressed"]
    layouts = [replan["layout"] for replan in metrics["replans"]]
    assert any("int8 into" in layout for layout in layouts), (layouts, run.stderr[-2000:])
    quality = metrics["quality"]
    assert quality["compared"] == metrics["requests"]["completed"] > 0
    assert quality["measure"] == "token prefix" and 0.0 <= quality["agreement_min"] <= 1.0
    assert "answers equal to fp32" in (out / "report.md").read_text()
