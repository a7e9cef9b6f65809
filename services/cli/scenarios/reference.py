"""The unsplit model in this process: the answer every policy's requests are compared with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.cli.scenarios.spec import Workload


def references(model_dir: Path, workload: Workload, progress: Callable[[str], None]) -> dict[int, tuple[Any, ...]]:
    """Per prompt index: the greedy tokens (generate) or the embedding (embed), computed
    once with the whole model in one process. Blocking CPU work: call it on a thread."""
    import torch

    from shared.model.pipeline import LocalPipeline

    torch.set_num_threads(1)
    pipeline = LocalPipeline(model_dir, [])
    out: dict[int, tuple[Any, ...]] = {}
    prompts: list[list[int]] = (
        [pipeline.tokenizer.encode(text) for text in workload.prompts]
        if workload.prompts else [list(ids) for ids in workload.prompt_ids]
    )  # fmt: skip
    with torch.inference_mode():
        for index, ids in enumerate(prompts):
            if workload.kind == "embed":
                out[index] = tuple(pipeline.embed(ids))
            else:
                out[index] = pipeline.generate(ids, workload.max_new_tokens).token_ids
            progress(f"reference {index + 1}/{len(prompts)} computed in-process (unsplit)")
    return out
