"""SmolLM2 int8 quality under variants of the calibration settings, against fp32.

Each variant patches constants of shared/model/quant.py for one load (``NAME=VALUE``
pairs, comma-separated; ``NOSMOOTH=1`` makes every SmoothQuant factor 1), quantises at
load with calibration as ``LocalPipeline(..., weights="int8")`` does, and scores
bench/data/quality_text.txt as bench/quality.py does: perplexity against fp32 and top-1
agreement, also per half of the scored positions (to see how much of a difference is
the text's near-ties rather than the variant).

    .venv/bin/python -m bench.int8_variants "SMOOTH_ALPHA=0.5" "NOSMOOTH=1,MAX_OUTLIER_SHARE=0.0625"
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from bench.local import resolve_model
from bench.quality import TEXT, score_text
from shared.model import quant
from shared.model.pipeline import LocalPipeline

SETTABLE = ("SMOOTH_ALPHA", "OUTLIER_RATIO", "MAX_OUTLIER_SHARE")


def _no_smoothing(
    weight: torch.Tensor, input_amax: torch.Tensor, outliers: torch.Tensor | None = None,
    weight_amax: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """SmoothQuant factors of 1 (outliers are picked by quant.outlier_channels as usual)."""
    return torch.ones(weight.shape[1])


@contextmanager
def patched(spec: str) -> Iterator[None]:
    """Apply ``spec`` to shared.model.quant for the duration (SystemExit on a bad one)."""
    saved: dict[str, object] = {"smoothing": quant.smoothing}
    try:
        for pair in filter(None, spec.split(",")):
            name, _, value = pair.partition("=")
            if name == "NOSMOOTH":
                quant.smoothing = _no_smoothing
            elif name in SETTABLE:
                saved[name] = getattr(quant, name)
                setattr(quant, name, float(value))
            else:
                raise SystemExit(f"int8_variants: unknown setting {name!r} (one of {', '.join(SETTABLE)}, NOSMOOTH)")
        yield
    finally:
        for name, kept in saved.items():
            setattr(quant, name, kept)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="NAME=VALUE[,NAME=VALUE...] per variant")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    reference = LocalPipeline(model, weights="fp32")
    ids = reference.tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    base_nll, base = score_text(reference, ids, args.window)
    del reference
    scored, half = len(ids) - 1, (len(ids) - 1) // 2
    print(f"{model.name}: {scored} scored positions, fp32 perplexity {math.exp(base_nll / scored):.4f}")
    print(f"{'variant':56} {'ppl vs fp32':>11} {'top-1':>7} {'1st half':>8} {'2nd half':>8}")
    for spec in args.variants:
        began = time.monotonic()
        with patched(spec):
            pipeline = LocalPipeline(model, weights="int8")
            nll, predictions = score_text(pipeline, ids, args.window)
            del pipeline
        same = [a == b for a, b in zip(predictions, base, strict=True)]
        print(f"{spec:56} {100 * (math.exp((nll - base_nll) / scored) - 1):+10.2f}% "
              f"{100 * sum(same) / scored:6.2f}% {100 * sum(same[:half]) / half:7.2f}% "
              f"{100 * sum(same[half:]) / (scored - half):7.2f}%  ({time.monotonic() - began:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
