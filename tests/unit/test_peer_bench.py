"""The pure parts of bench/peer.py and bench/llamacpp.py: reading llama-bench's JSON lines,
per-hop costs, edgesplit / llama.cpp ratios and the issue #22 goals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.llamacpp import PeerError, build, cmake_options, parse_llama_bench
from bench.peer import SPLIT, Variant, compare, goals, per_hop_ms, ratio, variants


def record(n_prompt: int, n_gen: int, samples_ns: list[object]) -> str:
    """One line as llama-bench -o jsonl prints it (the fields the parser reads, and others)."""
    fields = {"build_commit": "0c1e5709", "build_number": 1, "cpu_info": "Intel", "backends": "RPC",
              "model_filename": "m.gguf", "model_type": "llama ?B Q4_1", "model_size": 98362432,
              "n_threads": 1, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": 12,
              "devices": "auto",
              "samples_ns": samples_ns, "samples_ts": []}  # fmt: skip
    return json.dumps(fields)


def test_llama_bench_generation_tests_are_read_and_prompt_tests_skipped() -> None:
    text = "\n".join([record(512, 0, [90_000_000]),
                      record(0, 32, [480_000_000, 500_000_000, 640_000_000]), ""])  # fmt: skip
    (result,) = parse_llama_bench(text)
    assert (result.model_type, result.n_threads, result.n_gen, result.n_depth) == (
        "llama ?B Q4_1",
        1,
        32,
        12,
    )
    assert result.backends == "RPC"
    # median repetition (500 ms) over 32 tokens, not the mean (540 ms)
    assert result.ms_per_token == pytest.approx(15.625)


@pytest.mark.parametrize("line", ["llama-bench: loading model", '{"model_type": "x"}',
                                  record(0, 32, ["many"])])  # fmt: skip
def test_llama_bench_lines_that_are_not_test_records_raise(line: str) -> None:
    with pytest.raises(PeerError, match="line 1"):
        parse_llama_bench(line)


def test_per_hop_cost_divides_the_split_overhead_by_the_hops() -> None:
    assert per_hop_ms(15.0, 24.0) == pytest.approx(9.0 / SPLIT)
    assert per_hop_ms(50.0, 49.0, hops=2) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        per_hop_ms(1.0, 2.0, hops=0)


def test_ratio_is_none_without_a_positive_denominator() -> None:
    assert ratio(30.0, 15.0) == pytest.approx(2.0)
    assert ratio(1.0, 0.0) is None
    assert ratio(1.0, -0.3) is None


def medians(table: dict[str, float]) -> dict[Variant, float]:
    """Variant medians from keys like "es int8 local", "ll Q4_1 split"."""
    sides = {"es": "edgesplit", "ll": "llama.cpp"}
    out = {}
    for key, value in table.items():
        side, precision, where = key.split()
        out[Variant(sides[side], precision, where == "split")] = value
    return out


PEER = {"ll Q4_1 local": 15.0, "ll Q4_1 split": 21.0, "ll Q8_0 local": 20.0, "ll Q8_0 split": 26.0,
        "ll F32 local": 48.0, "ll F32 split": 54.0}  # fmt: skip


def ours(
    int8_local: float, int8_split: float, fp32_local: float, fp32_split: float
) -> dict[str, float]:
    return {"es int8 local": int8_local, "es int8 split": int8_split,
            "es fp32 local": fp32_local, "es fp32 split": fp32_split}  # fmt: skip


def test_compare_pairs_edgesplit_with_the_llama_cpp_precisions() -> None:
    table = medians(PEER | ours(18.0, 21.0, 52.0, 61.0))
    assert set(table) == set(variants())
    by_pair = {(c.ours, c.theirs): c for c in compare(table)}
    assert set(by_pair) == {("int8", "Q4_1"), ("int8", "Q8_0"), ("fp32", "F32")}
    q4 = by_pair[("int8", "Q4_1")]
    assert q4.local == (18.0, 15.0) and q4.split == (21.0, 21.0)
    assert q4.hop == pytest.approx((1.0, 2.0))
    assert by_pair[("fp32", "F32")].hop == pytest.approx((3.0, 2.0))


def test_goals_met_only_within_1_3x_of_q4_1_and_at_most_llama_cpp_per_hop(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fast = medians(PEER | ours(19.5, 22.5, 50.0, 53.0))
    assert goals(compare(fast))  # 1.30x, hops 1.0 <= 2.0
    slow = medians(PEER | ours(19.6, 22.6, 50.0, 53.0))
    assert not goals(compare(slow))  # 1.31x
    costly_hop = medians(PEER | ours(18.0, 21.0, 50.0, 57.0))
    assert not goals(compare(costly_hop))  # fp32 2.33 ms per hop > F32's 2.0
    assert "NOT met" in capsys.readouterr().out


def test_a_per_hop_cost_lost_in_llama_cpp_noise_is_a_bar_of_zero() -> None:
    noisy = PEER | {"ll F32 split": 47.0}  # llama.cpp split faster than local: hop < 0
    assert goals(compare(medians(noisy | ours(18.0, 18.0, 50.0, 50.0))))
    assert not goals(compare(medians(noisy | ours(18.0, 18.0, 50.0, 50.3))))


def test_a_missing_toolchain_is_named_before_any_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: no cmake, no compilers
    with pytest.raises(PeerError, match="cmake, a C compiler, a C\\+\\+ compiler not found"):
        build(tmp_path / "cache", progress=lambda _: None)
    assert not (tmp_path / "cache" / "sdist").exists()


def test_cmake_options_enable_only_the_features_the_cpu_lists() -> None:
    epyc = {"avx", "avx2", "bmi2", "fma", "f16c", "avx512f", "avx512vbmi", "avx512_vnni", "avx512_bf16"}
    options = cmake_options(epyc)
    assert "-DGGML_AVX_VNNI=OFF" in options  # listed by none of these flags: SIGILL if compiled in
    assert "-DGGML_AVX512_VNNI=ON" in options and "-DGGML_NATIVE=OFF" in options
    assert "-DGGML_AVX_VNNI=ON" in cmake_options(epyc | {"avx_vnni"})
    assert all(option.endswith("=OFF") for option in cmake_options(set()) if "AVX" in option)
