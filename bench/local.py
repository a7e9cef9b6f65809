"""Cost of splitting in one process: unsplit vs 3 segments, measured side by side.

Loads the model twice (whole, and cut into three segments), then alternates the two
for ``--repeats`` rounds of the same greedy generation, and prints the medians of time
to first token (TTFT) and time per output token (TPOT) and their ratio. Alternating
spreads machine noise over both variants. Usage:

    python -m bench.local [--model smollm2|DIR] [--tokens 32] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from shared.errors import EdgesplitError
from shared.model.pipeline import GenerationResult, LocalPipeline

PROMPT = "The capital of France is Paris. The capital of Germany is"


def three_way_splits(num_layers: int) -> tuple[int, int]:
    """Cut points that give three segments of near-equal block counts."""
    if num_layers < 3:
        raise EdgesplitError(f"a {num_layers}-block model cannot be cut into three segments")
    return num_layers // 3, 2 * num_layers // 3


def resolve_model(name_or_dir: str) -> Path:
    """A checkpoint folder, or a packaged model name prepared (and cached) on first use."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    from shared.model.prepare import prepare_model

    return prepare_model(name_or_dir, progress=lambda line: print(line, file=sys.stderr))


def measure(
    variants: dict[str, LocalPipeline], prompt_ids: list[int], tokens: int, repeats: int
) -> dict[str, list[GenerationResult]]:
    """``repeats`` interleaved greedy runs per variant (after one warm-up each)."""
    for pipeline in variants.values():
        pipeline.generate(prompt_ids, 2, stop_at_eos=False)
    runs: dict[str, list[GenerationResult]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, pipeline in variants.items():
            runs[name].append(pipeline.generate(prompt_ids, tokens, stop_at_eos=False))
    return runs


def report(
    runs: dict[str, list[GenerationResult]], ranges: dict[str, list[tuple[int, int]]]
) -> None:
    """Print medians (ms) per variant and split / unsplit ratios."""
    medians = {}
    for name, results in runs.items():
        ttft_ms = statistics.median(result.ttft_s for result in results) * 1e3
        tpot_ms = statistics.median(result.tpot_s for result in results) * 1e3
        medians[name] = (ttft_ms, tpot_ms)
        print(f"{name:>8}  segments {ranges[name]}  TTFT {ttft_ms:8.1f} ms  TPOT {tpot_ms:7.2f} ms")
    (ttft_whole, tpot_whole), (ttft_split, tpot_split) = medians["unsplit"], medians["split3"]
    print(
        f"   ratio  split3 / unsplit: TTFT {ttft_split / ttft_whole:.3f}  TPOT {tpot_split / tpot_whole:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2", help="packaged model name or checkpoint folder"
    )
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per run (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per variant (default 5)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model_dir = resolve_model(args.model)
        whole = LocalPipeline(model_dir)
        split = LocalPipeline(model_dir, three_way_splits(whole.config.num_layers))
        prompt_ids = whole.tokenizer.encode(PROMPT)
        print(
            f"model {model_dir} ({whole.config.num_layers} blocks), prompt {len(prompt_ids)} tokens, "
            f"{args.tokens} new tokens, {args.repeats} repeats, {torch.get_num_threads()} threads"
        )
        runs = measure({"unsplit": whole, "split3": split}, prompt_ids, args.tokens, args.repeats)
        same = runs["unsplit"][0].token_ids == runs["split3"][0].token_ids
        print(
            f"greedy continuation {'identical' if same else 'DIFFERS'}: "
            f"{whole.tokenizer.decode(runs['unsplit'][0].token_ids)!r}"
        )
        report(runs, {"unsplit": whole.ranges, "split3": split.ranges})
    except EdgesplitError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
