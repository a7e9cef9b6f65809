"""Time per output token of each weight precision, one thread, one process, side by side.

Loads the model once per precision (``LocalPipeline(..., weights=P)``, unsplit), then
alternates the precisions for ``--repeats`` rounds of the same greedy generation
(bench/local.py: ``measure``), and prints the median time per output token (TPOT), time
to first token, and each precision's speed-up over fp32 (issue #22 asks int8 >= 2.5x).
Alternating spreads machine noise over all variants. ``--unfused-too`` adds
``int8-unfused``: int8 as before its linears that read one input were fused (a
smoothing factor per linear, one kernel each; shared/model/quant_fusion.py), measured
beside the fused int8 in the same run.

    .venv/bin/python -m bench.quant_speed [--model smollm2] [--tokens 32] [--repeats 5] [--unfused-too]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.local import PROMPT, measure, resolve_model
from shared.model import quant
from shared.model.pipeline import LocalPipeline
from shared.model.runtime import FAMILIES


def unfused_int8(model: object) -> LocalPipeline:
    """int8 as before fusion: a smoothing factor per linear (no joint weight range),
    and no group shares a kernel."""
    saved_joint, saved_groups = quant.joint_weight_amax, {a: f.fused_linears for a, f in FAMILIES.items()}
    quant.joint_weight_amax = lambda weights, groups: {}  # type: ignore[assignment]
    for family in FAMILIES.values():
        family.fused_linears = lambda config: ()  # type: ignore[attr-defined]
    try:
        return LocalPipeline(model, weights="int8")  # type: ignore[arg-type]
    finally:
        quant.joint_weight_amax = saved_joint  # type: ignore[assignment]
        for arch, groups in saved_groups.items():
            FAMILIES[arch].fused_linears = groups  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default="fp32,bf16,int8,int4",
                        help="precisions to compare, fp32 first")  # fmt: skip
    parser.add_argument("--unfused-too", action="store_true",
                        help="also int8 with one kernel per linear (as before fusion)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    precisions = args.weights.split(",")
    variants = {p: LocalPipeline(model, weights=p) for p in precisions}
    if args.unfused_too:
        variants["int8-unfused"] = unfused_int8(model)
    prompt_ids = variants[precisions[0]].tokenizer.encode(PROMPT)
    runs = measure(variants, prompt_ids, args.tokens, args.repeats)
    print(f"{model.name}, {args.threads} thread(s), {args.tokens} tokens, median of {args.repeats}")
    print(f"{'weights':12} {'TPOT ms':>9} {'TTFT ms':>9} {'speed-up vs ' + precisions[0]:>18}")
    base = statistics.median(r.tpot_s for r in runs[precisions[0]])
    for precision, results in runs.items():
        tpot = statistics.median(r.tpot_s for r in results)
        ttft = statistics.median(r.ttft_s for r in results)
        print(f"{precision:12} {tpot * 1e3:9.1f} {ttft * 1e3:9.1f} {base / tpot:17.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
