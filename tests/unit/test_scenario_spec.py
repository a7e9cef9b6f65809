"""Scenario files: every rule of the format (docs/SCENARIOS.md), each bad file one clear line."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from services.cli.scenarios.spec import ScenarioError, load_scenario
from services.cli.scenarios.spec_fields import packaged_model_names

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = REPO / "deploy" / "topologies" / "adaptive-tiny.toml"  # nodes car, rsu, mec


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return repr(value)


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for these tests: scalars and lists, then tables, then [[events]]."""
    lines = [f"{key} = {toml_value(v)}" for key, v in data.items()
             if not isinstance(v, dict) and key != "events"]  # fmt: skip
    for key, table in data.items():
        if isinstance(table, dict):
            lines += [f"[{key}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for event in data.get("events", []):
        lines += ["[[events]]"] + [f"{k} = {toml_value(v)}" for k, v in event.items()]
    return "\n".join(lines) + "\n"


def base() -> dict[str, Any]:
    return {
        "name": "test",
        "topology": "site.toml",
        "model": "tiny-llama",
        "duration_s": 30,
        "seed": 7,
        "workload": {"kind": "generate", "arrival": "poisson", "rate_per_s": 1.5,
                     "prompts": ["The capital of France is", "Hello"], "max_new_tokens": 8},
        "slo": {"ttft_s": 1.5, "tpot_s": 0.12},
        "events": [],
    }  # fmt: skip


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copy(TOPOLOGY, tmp_path / "site.toml")
    return tmp_path


def write(folder: Path, data: dict[str, Any], name: str = "scenario.toml") -> Path:
    path = folder / name
    path.write_text(to_toml(data))
    return path


def error_of(folder: Path, data: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(write(folder, data))
    message = str(caught.value)
    assert "\n" not in message
    return message


def with_event(**event: Any) -> dict[str, Any]:
    data = base()
    data["events"] = [event]
    return data


# --- a good file ------------------------------------------------------------------------


def test_a_full_file_loads_with_paths_resolved_and_events_sorted(folder: Path) -> None:
    (folder / "traces").mkdir()
    (folder / "traces" / "fade.csv").write_text(
        "t_s,bandwidth_bytes_per_s,latency_s\n0,5e5,0.002\n\n2.5,1e4\n10,2e3,0.05\n")
    data = base()
    data["events"] = [
        {"at_s": 20, "kind": "slowdown", "node": "mec", "factor": 4},
        {"at_s": 5, "kind": "link", "src": "car", "dst": "rsu", "bandwidth_bytes_per_s": 20e3,
         "latency_s": 0.08},
        {"at_s": 5, "kind": "link_trace", "src": "rsu", "dst": "mec", "file": "traces/fade.csv",
         "one_way": True},
        {"at_s": 25, "kind": "privacy", "private_blocks": 3, "trusted_level": 1},
        {"at_s": 26, "kind": "kill", "node": "rsu"},
        {"at_s": 27, "kind": "restart", "node": "rsu"},
        {"at_s": 28, "kind": "leave", "node": "mec"},
        {"at_s": 29, "kind": "join", "node": "mec"},
    ]  # fmt: skip
    scenario = load_scenario(write(folder, data))
    assert scenario.name == "test" and scenario.seed == 7 and scenario.duration_s == 30.0
    assert scenario.topology == (folder / "site.toml").resolve()
    assert scenario.model == "tiny-llama"
    assert scenario.workload.rate_per_s == 1.5 and scenario.workload.concurrency is None
    assert scenario.workload.prompts == ("The capital of France is", "Hello")
    assert scenario.workload.max_new_tokens == 8
    assert (scenario.slo.ttft_s, scenario.slo.tpot_s, scenario.slo.latency_s) == (1.5, 0.12, None)
    assert [e.kind for e in scenario.events] == ["link", "link_trace", "slowdown", "privacy",
                                                 "kill", "restart", "leave", "join"]  # fmt: skip
    link, trace, slowdown, privacy = scenario.events[:4]
    assert (link.src, link.dst, link.bandwidth_bytes_per_s, link.latency_s, link.one_way) == (
        "car", "rsu", 20e3, 0.08, False)
    assert trace.one_way and [(p.t_s, p.bandwidth_bytes_per_s, p.latency_s) for p in trace.trace] == [
        (0.0, 5e5, 0.002), (2.5, 1e4, None), (10.0, 2e3, 0.05)]  # fmt: skip
    assert (slowdown.node, slowdown.factor) == ("mec", 4.0)
    assert (privacy.private_blocks, privacy.trusted_level) == (3, 1)


def test_a_file_name_that_cannot_be_a_name_asks_for_one(folder: Path) -> None:
    data = base()
    del data["name"]
    with pytest.raises(ScenarioError, match=r"^name: 'my city' \(from the file name; set name"):
        load_scenario(write(folder, data, "my city.toml"))


def test_defaults_name_from_file_seed_zero_16_tokens_no_slo(folder: Path) -> None:
    data = base()
    del data["name"], data["seed"], data["slo"], data["events"]
    del data["workload"]["max_new_tokens"]
    scenario = load_scenario(write(folder, data, "city.toml"))
    assert (scenario.name, scenario.seed, scenario.workload.max_new_tokens) == ("city", 0, 16)
    assert scenario.slo.ttft_s is None and scenario.events == ()


def test_closed_embed_workload_with_prompt_ids(folder: Path) -> None:
    data = base()
    data["model"] = "minilm"
    data["workload"] = {"kind": "embed", "arrival": "closed", "concurrency": 4,
                        "prompt_ids": [[1, 40, 41], [0]]}  # fmt: skip
    data["slo"] = {"latency_s": 0.5}
    workload = load_scenario(write(folder, data)).workload
    assert (workload.kind, workload.arrival, workload.concurrency) == ("embed", "closed", 4)
    assert workload.prompt_ids == ((1, 40, 41), (0,)) and workload.prompts == ()


def test_prompts_file_relative_one_prompt_per_non_empty_line(folder: Path) -> None:
    (folder / "prompts.txt").write_text("first prompt\n\n  second one  \n")
    data = base()
    del data["workload"]["prompts"]
    data["workload"]["prompts_file"] = "prompts.txt"
    assert load_scenario(write(folder, data)).workload.prompts == ("first prompt", "second one")


def test_model_folder_relative_to_the_file_becomes_absolute(folder: Path) -> None:
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "config.json").write_text('{"model_type": "llama"}')
    data = base()
    data["model"] = "ckpt"
    assert load_scenario(write(folder, data)).model == str((folder / "ckpt").resolve())


def test_topology_may_be_in_another_folder(folder: Path) -> None:
    (folder / "scenarios").mkdir()
    data = base()
    data["topology"] = "../site.toml"
    assert load_scenario(write(folder / "scenarios", data)).topology == (folder / "site.toml")


def embed_data(model: str) -> dict[str, Any]:
    data = base()
    data["model"] = model
    data["workload"] = {"kind": "embed", "arrival": "closed", "concurrency": 1, "prompts": ["a"]}
    data["slo"] = {"latency_s": 0.5}
    return data


def test_every_packaged_name_is_accepted(folder: Path) -> None:
    for name in packaged_model_names():
        data = base()
        data["model"] = name
        if name in ("minilm", "tiny-bert"):
            data = embed_data(name)
        assert load_scenario(write(folder, data)).model == name


def test_the_workload_kind_must_fit_the_model(folder: Path) -> None:
    assert error_of(folder, embed_data("smollm2")) == (
        'workload.kind: "embed" needs a BERT encoder (minilm, tiny-bert or a BERT folder); '
        "model smollm2 is a llama decoder")
    data = base()
    data["model"] = "minilm"
    assert error_of(folder, data).startswith('workload.kind: "generate" needs a decoder')
    (folder / "gpt").mkdir()
    (folder / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    assert "is a gpt2 decoder" in error_of(folder, embed_data("gpt"))


@pytest.mark.parametrize(("config", "expected"), [
    ("{not json", "is not a readable JSON object"),
    ("[1, 2]", "is not a readable JSON object"),
    ('{"model_type": "t5"}', "model_type 't5'"),
])  # fmt: skip
def test_a_model_folder_with_a_bad_config(folder: Path, config: str, expected: str) -> None:
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "config.json").write_text(config)
    data = base()
    data["model"] = "ckpt"
    message = error_of(folder, data)
    assert message.startswith("model: ") and expected in message


# --- bad files: one line naming the key -------------------------------------------------


def test_missing_file_and_toml_syntax_error_name_the_file(folder: Path) -> None:
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(folder / "nope.toml")
    bad = folder / "bad.toml"
    bad.write_text('name = "x"\nduration_s = = 3\n')
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML: .*line 2"):
        load_scenario(bad)


@pytest.mark.parametrize(("change", "expected"), [
    ({"nmae": "x"}, "nmae: unknown key"),
    ({"duration_s": 0}, "duration_s: must be > 0 (got 0)"),
    ({"duration_s": -5}, "duration_s: must be > 0"),
    ({"duration_s": float("inf")}, "duration_s: must be a finite number"),
    ({"duration_s": float("nan")}, "duration_s: must be a finite number"),
    ({"duration_s": "60"}, "duration_s: must be a number"),
    ({"duration_s": True}, "duration_s: must be a number"),
    ({"seed": 1.5}, "seed: must be an integer"),
    ({"seed": -1}, "seed: must be >= 0"),
    ({"name": ""}, "name: must be a non-empty string"),
    ({"name": "../up"}, "name: '../up' must be 1 to 64 letters, digits"),
    ({"name": "v2x handover"}, "name: 'v2x handover' must be"),
    ({"name": "x" * 65}, "must be 1 to 64 letters"),
    ({"topology": "missing.toml"}, "topology: topology file"),
    ({"model": "gpt-5"}, "model: 'gpt-5' is neither a packaged model"),
    ({"workload": "generate"}, "workload: must be a table"),
    ({"slo": {"ttft_s": 0}}, "slo.ttft_s: must be > 0"),
    ({"slo": {"tpot_s": -0.1}}, "slo.tpot_s: must be > 0"),
    ({"slo": {"latency_s": float("inf")}}, "slo.latency_s: must be a finite number"),
    ({"slo": {"tpot": 0.1}}, "slo.tpot: unknown key"),
])  # fmt: skip
def test_top_level_and_slo_rules(folder: Path, change: dict[str, Any], expected: str) -> None:
    data = base()
    data.update(change)
    assert expected in error_of(folder, data)


def test_required_top_level_keys(folder: Path) -> None:
    for key in ("topology", "model", "duration_s", "workload"):
        data = base()
        del data[key]
        assert error_of(folder, data).startswith(f"{key}: required")


def test_a_topology_that_does_not_load_is_named(folder: Path) -> None:
    (folder / "broken.toml").write_text('name = "b"\n[[nodes]]\nid = "a"\ntrust = 2\n')
    data = base()
    data["topology"] = "broken.toml"
    message = error_of(folder, data)
    assert message.startswith("topology: topology file") and "memory_bytes" in message


def test_a_model_folder_without_config_json(folder: Path) -> None:
    (folder / "empty").mkdir()
    data = base()
    data["model"] = "empty"
    assert "has no config.json" in error_of(folder, data)


@pytest.mark.parametrize(("change", "expected"), [
    ({"kind": "chat"}, "workload.kind: must be one of generate, embed (got 'chat')"),
    ({"arrival": "burst"}, "workload.arrival: must be one of poisson, closed"),
    ({"rate_per_s": 0}, "workload.rate_per_s: must be > 0"),
    ({"rate_per_s": float("nan")}, "workload.rate_per_s: must be a finite number"),
    ({"concurrency": 2}, 'workload.concurrency: not allowed with arrival = "poisson"'),
    ({"max_new_tokens": 0}, "workload.max_new_tokens: must be >= 1"),
    ({"max_new_tokens": 4097}, "workload.max_new_tokens: must be <= 4096"),
    ({"max_new_tokens": 8.0}, "workload.max_new_tokens: must be an integer"),
    ({"prompts": []}, "workload.prompts: must be a non-empty list"),
    ({"prompts": ["ok", ""]}, "workload.prompts[1]: must be a non-empty string"),
    ({"prompts": ["ok", 3]}, "workload.prompts[1]: must be a non-empty string"),
    ({"prompt": ["typo"]}, "workload.prompt: unknown key"),
    ({"prompt_ids": [[1, 2]]}, "workload.prompts: exactly one of prompts, prompt_ids or "
                               "prompts_file is required (give only one, not prompts and prompt_ids)"),
])  # fmt: skip
def test_workload_rules(folder: Path, change: dict[str, Any], expected: str) -> None:
    data = base()
    data["workload"].update(change)
    assert expected in error_of(folder, data)


def test_rate_required_for_poisson_and_concurrency_for_closed(folder: Path) -> None:
    data = base()
    del data["workload"]["rate_per_s"]
    assert error_of(folder, data) == 'workload.rate_per_s: required when arrival = "poisson"'
    data["workload"]["arrival"] = "closed"
    assert error_of(folder, data) == 'workload.concurrency: required when arrival = "closed"'
    data["workload"]["concurrency"] = 0
    assert "workload.concurrency: must be >= 1" in error_of(folder, data)
    data["workload"].update(concurrency=2, rate_per_s=1.0)
    assert 'workload.rate_per_s: not allowed with arrival = "closed"' in error_of(folder, data)


@pytest.mark.parametrize(("ids", "expected"), [
    ([], "workload.prompt_ids: must be a non-empty list"),
    ([[1], []], "workload.prompt_ids[1]: must be a non-empty list of token ids"),
    ([[1, -2]], "workload.prompt_ids[0][1]: must be a token id, an integer >= 0 (got -2)"),
    ([[1, 2.5]], "workload.prompt_ids[0][1]: must be a token id"),
    (["text"], "workload.prompt_ids[0]: must be a non-empty list of token ids"),
])  # fmt: skip
def test_prompt_ids_rules(folder: Path, ids: list[Any], expected: str) -> None:
    data = base()
    del data["workload"]["prompts"]
    data["workload"]["prompt_ids"] = ids
    assert expected in error_of(folder, data)


def test_no_prompts_and_bad_prompts_files(folder: Path) -> None:
    data = base()
    del data["workload"]["prompts"]
    assert "(missing)" in error_of(folder, data)
    data["workload"]["prompts_file"] = "absent.txt"
    assert error_of(folder, data).startswith("workload.prompts_file: prompts file")
    (folder / "blank.txt").write_text("\n   \n")
    data["workload"]["prompts_file"] = "blank.txt"
    assert "workload.prompts_file:" in error_of(folder, data) and "no prompts" in error_of(folder, data)


def test_embed_refuses_generate_only_keys(folder: Path) -> None:
    data = base()
    data["model"] = "tiny-bert"
    data["workload"]["kind"] = "embed"
    assert 'workload.max_new_tokens: not allowed with kind = "embed"' in error_of(folder, data)
    del data["workload"]["max_new_tokens"]
    assert 'slo.ttft_s: not allowed with kind = "embed" (use latency_s)' in error_of(folder, data)


@pytest.mark.parametrize(("event", "expected"), [
    ({"at_s": 5, "kind": "boom", "node": "car"}, "events[0].kind: must be one of link, link_trace"),
    ({"kind": "kill", "node": "car"}, "events[0].at_s: required"),
    ({"at_s": -1, "kind": "kill", "node": "car"}, "events[0].at_s: must be >= 0 (got -1)"),
    ({"at_s": 30, "kind": "kill", "node": "car"}, "events[0].at_s: must be < duration_s = 30 (got 30)"),
    ({"at_s": float("nan"), "kind": "kill", "node": "car"}, "events[0].at_s: must be a finite"),
    ({"at_s": 1, "kind": "kill", "node": "rsu9"},
     "events[0].node: unknown node 'rsu9' (topology has car, rsu, mec)"),
    ({"at_s": 1, "kind": "kill"}, "events[0].node: required"),
    ({"at_s": 1, "kind": "kill", "node": "car", "factor": 2},
     "events[0].factor: unknown key for kind = 'kill'"),
    ({"at_s": 1, "kind": "link", "src": "car", "dst": "rsu"},
     "events[0].bandwidth_bytes_per_s: required"),
    ({"at_s": 1, "kind": "link", "src": "car", "dst": "rsu", "bandwidth_bytes_per_s": 0},
     "events[0].bandwidth_bytes_per_s: must be > 0"),
    ({"at_s": 1, "kind": "link", "src": "car", "dst": "rsu", "bandwidth_bytes_per_s": float("inf")},
     "events[0].bandwidth_bytes_per_s: must be a finite number"),
    ({"at_s": 1, "kind": "link", "src": "car", "dst": "rsu", "bandwidth_bytes_per_s": 1e3,
      "latency_s": -0.1}, "events[0].latency_s: must be >= 0"),
    ({"at_s": 1, "kind": "link", "src": "car", "dst": "rsu", "bandwidth_bytes_per_s": 1e3,
      "one_way": "yes"}, "events[0].one_way: must be true or false"),
    ({"at_s": 1, "kind": "link", "src": "car", "dst": "car", "bandwidth_bytes_per_s": 1e3},
     "events[0].dst: must differ from src"),
    ({"at_s": 1, "kind": "link", "src": "cat", "dst": "rsu", "bandwidth_bytes_per_s": 1e3},
     "events[0].src: unknown node 'cat'"),
    ({"at_s": 1, "kind": "link_trace", "src": "car", "dst": "rsu"}, "events[0].file: required"),
    ({"at_s": 1, "kind": "link_trace", "src": "car", "dst": "rsu", "file": "no.csv"},
     "events[0].file: trace file"),
    ({"at_s": 1, "kind": "slowdown", "node": "mec", "factor": 0.5}, "events[0].factor: must be >= 1"),
    ({"at_s": 1, "kind": "slowdown", "node": "mec", "factor": 1001}, "events[0].factor: must be <= 1000"),
    ({"at_s": 1, "kind": "slowdown", "node": "mec"}, "events[0].factor: required"),
    ({"at_s": 1, "kind": "privacy", "private_blocks": -1, "trusted_level": 1},
     "events[0].private_blocks: must be >= 0"),
    ({"at_s": 1, "kind": "privacy", "private_blocks": 2}, "events[0].trusted_level: required"),
    ({"at_s": 1, "kind": "privacy", "private_blocks": 2, "trusted_level": 1.5},
     "events[0].trusted_level: must be an integer"),
    ({"at_s": 1, "kind": "join", "node": "car", "nodee": "x"}, "events[0].nodee: unknown key"),
])  # fmt: skip
def test_event_rules(folder: Path, event: dict[str, Any], expected: str) -> None:
    assert expected in error_of(folder, with_event(**event))


def test_event_errors_name_the_index_in_file_order(folder: Path) -> None:
    data = base()
    data["events"] = [{"at_s": 9, "kind": "kill", "node": "car"},
                      {"at_s": 1, "kind": "kill", "node": "rsu"},
                      {"at_s": 2, "kind": "leave", "node": "rsu9"}]  # fmt: skip
    assert error_of(folder, data).startswith("events[2].node: unknown node 'rsu9'")


def test_events_with_equal_times_keep_file_order(folder: Path) -> None:
    data = base()
    data["events"] = [{"at_s": 3, "kind": "kill", "node": "rsu"},
                      {"at_s": 1, "kind": "leave", "node": "mec"},
                      {"at_s": 3, "kind": "restart", "node": "rsu"}]  # fmt: skip
    kinds = [event.kind for event in load_scenario(write(folder, data)).events]
    assert kinds == ["leave", "kill", "restart"]


@pytest.mark.parametrize(("csv", "expected"), [
    ("", "has no rows"),
    ("t_s,bandwidth_bytes_per_s\n", "has no rows"),
    ("0,1e3\n1\n", "line 2: expected t_s,bandwidth_bytes_per_s[,latency_s] (got 1 fields)"),
    ("0,1e3,0.1,9\n", "line 1: expected"),
    ("0,abc\n", "line 1: bandwidth_bytes_per_s must be a finite number (got 'abc')"),
    ("0,inf\n", "line 1: bandwidth_bytes_per_s must be a finite number"),
    ("0,1e3,nan\n", "line 1: latency_s must be a finite number"),
    ("-1,1e3\n", "line 1: t_s must be >= 0"),
    ("0,0\n", "line 1: bandwidth_bytes_per_s must be > 0"),
    ("0,1e3,-0.5\n", "line 1: latency_s must be >= 0"),
    ("0,1e3\n5,1e3\n5,2e3\n", "line 3: t_s must be ascending (got 5 after 5)"),
    ("0,1e3\nt_s,bandwidth\n", "line 2: t_s must be a finite number"),
])  # fmt: skip
def test_trace_csv_rules(folder: Path, csv: str, expected: str) -> None:
    (folder / "trace.csv").write_text(csv)
    message = error_of(folder, with_event(at_s=0, kind="link_trace", src="car", dst="mec",
                                          file="trace.csv"))  # fmt: skip
    assert message.startswith("events[0].file: ") and "trace.csv" in message
    assert expected in message


def test_sections_of_the_wrong_shape(folder: Path) -> None:
    data = base()
    data["events"] = [{"at_s": 1, "kind": "kill", "node": "car"}]
    path = write(folder, data)
    path.write_text(path.read_text().replace("[[events]]", "[events]"))
    with pytest.raises(ScenarioError, match=r"^events: must be an array of tables"):
        load_scenario(path)
    data = base()
    data["slo"] = 0.5
    assert error_of(folder, data).startswith("slo: must be a table")


def test_a_file_that_is_not_utf8_is_one_clear_line(folder: Path) -> None:
    path = folder / "binary.toml"
    path.write_bytes(b"name = \"\xff\xfe\"\n")
    with pytest.raises(ScenarioError, match=r"binary\.toml: cannot read the scenario file"):
        load_scenario(path)


def test_a_time_scaled_scenario_keeps_its_story_faster() -> None:
    from services.cli.scenarios.spec import ScenarioError, time_scaled

    folder = Path(__file__).resolve().parents[2] / "deploy" / "scenarios"
    scenario = load_scenario(folder / "v2x-handover.toml")
    half = time_scaled(scenario, 0.5)
    assert half.duration_s == scenario.duration_s / 2
    for original, scaled in zip(scenario.events, half.events, strict=True):
        assert scaled.at_s == original.at_s / 2
        assert [p.t_s for p in scaled.trace] == [p.t_s / 2 for p in original.trace]
        assert [p.bandwidth_bytes_per_s for p in scaled.trace] == [p.bandwidth_bytes_per_s for p in original.trace]
    with pytest.raises(ScenarioError, match="--time-scale"):
        time_scaled(scenario, 0)


@pytest.mark.parametrize("name", ["v2x-handover", "smart-city", "industrial-privacy", "compressed-links"])
def test_the_shipped_scenarios_load(name: str) -> None:
    folder = Path(__file__).resolve().parents[2] / "deploy" / "scenarios"
    scenario = load_scenario(folder / f"{name}.toml")
    assert scenario.name == name and scenario.events
