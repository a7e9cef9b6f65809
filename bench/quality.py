"""Quality of each weight precision, measured against fp32 on fixed inputs.

SmolLM2 (``--generator``): perplexity of the fixed English text bench/data/quality_text.txt
(original text written for this benchmark, about 2,700 tokens) at fp32, bf16, int8 and
int4, scored in consecutive windows of ``--window`` tokens (each window from its second
token; no overlap), and top-1 agreement: the share of positions whose arg-max next token
equals fp32's. MiniLM (``--encoder``): cosine similarity of each precision's sentence
embedding to fp32's over a fixed set of sentences (mean and minimum). The precision is
applied at load (``LocalPipeline(..., weights=P)``), which runs the same numbers as a
shard store written with ``edgesplit shard --weights P`` (tests/unit/test_quant.py).

    .venv/bin/python -m bench.quality [--generator smollm2] [--encoder minilm] [--window 1024]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.local import resolve_model
from shared.model.pipeline import LocalPipeline

TEXT = Path(__file__).parent / "data" / "quality_text.txt"
PRECISIONS = ("fp32", "bf16", "int8", "int4")
SENTENCES = (
    "The ferry leaves the north pier at a quarter past six every morning.",
    "A storm from the Atlantic flooded the market square.",
    "Engineers installed sensors to measure the crack in the harbour wall.",
    "The students counted gulls on the harbour wall in the rain.",
    "Fresh rye bread is baked in a brick oven before dawn.",
    "The beekeeper keeps a notebook of flowering dates for every year.",
    "How do I reset my password?",
    "The road-side unit forwards camera frames to the edge server.",
    "Quantised weights make a model small enough for an edge box.",
    "A cat is sleeping on the warm windowsill.",
    "The train to the airport is delayed by twenty minutes.",
    "Photosynthesis converts light energy into chemical energy.",
    "She plays the violin in the city orchestra.",
    "The council voted to fund a weather station on the school roof.",
    "Latency on the uplink rose sharply during the handover.",
    "He repaired the fishing nets on the bench at the end of the pier.",
)


def score_text(pipeline: LocalPipeline, ids: list[int], window: int) -> tuple[float, list[int]]:
    """(summed negative log-likelihood, arg-max prediction per scored position)."""
    nll, predictions = 0.0, []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        logits = pipeline.logits(chunk[:-1])  # [T, V]
        targets = torch.tensor(chunk[1:])
        nll += float(F.cross_entropy(logits, targets, reduction="sum"))
        predictions.extend(int(i) for i in logits.argmax(dim=-1))
    return nll, predictions


def generator_quality(model: Path, window: int) -> None:
    text = TEXT.read_text(encoding="utf-8")
    results = {}
    ids: list[int] = []
    for precision in PRECISIONS:
        pipeline = LocalPipeline(model, weights=precision)
        ids = pipeline.tokenizer.encode(text)
        results[precision] = score_text(pipeline, ids, window)
        del pipeline
    scored = len(ids) - 1
    _, reference = results["fp32"]
    base_ppl = math.exp(results["fp32"][0] / scored)
    print(f"{model.name}: {TEXT.name}, {len(ids)} tokens, {scored} scored, window {window}")
    print(f"{'weights':8} {'perplexity':>11} {'vs fp32':>9} {'top-1 agreement':>16}")
    for precision, (nll, predictions) in results.items():
        ppl = math.exp(nll / scored)
        agree = sum(a == b for a, b in zip(predictions, reference, strict=True)) / scored
        print(f"{precision:8} {ppl:11.4f} {100 * (ppl / base_ppl - 1):+8.2f}% {100 * agree:15.2f}%")


def encoder_quality(model: Path) -> None:
    embeddings = {}
    for precision in PRECISIONS:
        pipeline = LocalPipeline(model, weights=precision)
        embeddings[precision] = torch.tensor(
            [pipeline.embed(pipeline.tokenizer.encode(s)) for s in SENTENCES]
        )
    print(f"{model.name}: {len(SENTENCES)} sentences, cosine similarity to fp32")
    print(f"{'weights':8} {'mean':>9} {'min':>9}")
    for precision, matrix in embeddings.items():
        cosine = F.cosine_similarity(matrix, embeddings["fp32"], dim=1)
        print(f"{precision:8} {float(cosine.mean()):9.6f} {float(cosine.min()):9.6f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", default="smollm2", help="decoder model ('' to skip)")
    parser.add_argument("--encoder", default="minilm", help="BERT model ('' to skip)")
    parser.add_argument("--window", type=int, default=1024, help="tokens per scored window")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.generator:
        generator_quality(resolve_model(args.generator), args.window)
    if args.encoder:
        encoder_quality(resolve_model(args.encoder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
