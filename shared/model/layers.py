"""Building blocks shared by the model families: norms, activations, attention.

Tensors carry no batch dimension: a hidden state is ``[T, H]`` (tokens, hidden size),
attention tensors are ``[heads, T, head_dim]``. A batched decode step stacks one new
token of each of B requests as the rows of ``[B, H]``: norms, linear layers and the MLP
run on the stacked rows at once, attention runs per request (`attend_each`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from shared.errors import CheckpointError, UnsupportedArchitecture
from shared.model.kv_cache import BlockCache
from shared.model.quant import Weight
from shared.model.quant_fusion import fused_parts

Activation = Callable[[torch.Tensor], torch.Tensor]

_ACTIVATIONS: dict[str, Activation] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def activation_fn(name: str) -> Activation:
    """The element-wise non-linearity called ``name`` in config.json.

    Raises UnsupportedArchitecture for names edgesplit does not implement.
    """
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedArchitecture(f"activation {name!r} is not supported") from None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich, 2019): ``x / sqrt(mean(x^2) + eps) * weight``; [T, H].
    torch's own op: one call instead of six (the same values: tests/unit/test_layers.py)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm over the hidden dimension; [T, H] -> [T, H]."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention of new queries over all cached keys.

    query [heads, T, head_dim]; key, value [kv_heads, S, head_dim] with S >= T, where
    the last T keys belong to the queries (the first S - T are the cache). Grouped-query
    attention when kv_heads < heads. Returns [heads, T, head_dim].
    """
    new_tokens, total_tokens = query.shape[1], key.shape[1]
    mask = None
    if causal and new_tokens > 1:
        # query i sits at absolute position (S - T + i) and sees keys 0 ..= S - T + i
        mask = torch.ones(new_tokens, total_tokens, dtype=torch.bool, device=query.device)
        mask = mask.tril(diagonal=total_tokens - new_tokens)
    heads, kv_heads, head_dim = query.shape[0], key.shape[0], query.shape[2]
    if new_tokens == 1:
        # a decode step: the heads sharing a kv head are its queries, unmasked, so no key
        # or value is copied per head (enable_gqa's math path repeats them); three plain
        # ops, half the time of the library call on these sizes (one thread)
        grouped = query.reshape(kv_heads, heads // kv_heads, head_dim)
        scores = torch.bmm(grouped, key.transpose(1, 2)).mul_(head_dim**-0.5)
        return torch.softmax(scores, dim=-1).bmm(value).view(heads, 1, head_dim)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=kv_heads != heads)


def attend_each(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    caches: Sequence[BlockCache],
) -> torch.Tensor:
    """Attention of a batched decode step: row i is request i's one new token, which
    attends to its own cache ``caches[i]`` (lengths differ; nothing is padded).

    query [heads, B, head_dim]; key, value [kv_heads, B, head_dim]: row i's K, V are
    appended to ``caches[i]`` first. Returns [heads, B, head_dim].
    """
    contexts = []
    for row, cache in enumerate(caches):
        cached_key, cached_value = cache.append(key[:, row : row + 1], value[:, row : row + 1])
        contexts.append(attend(query[:, row : row + 1], cached_key, cached_value, causal=True))
    return torch.cat(contexts, dim=1)


SKINNY_ROWS = 3
"""Up to this many rows, an fp32 CPU linear runs as ``W x^T`` (one row padded to two):
torch's CPU ``F.linear`` (``x W^T``) takes a matrix-vector path for one row and a slow
one for two or three that read SmolLM2's weights at about half the speed of the
transposed product. ``python -m bench.linear_rows`` (AMD EPYC, one thread, torch 2.13,
a 30-block decode step with its head): ``F.linear`` 1.29x / 1.31x / 1.42x slower at 1 /
2 / 3 rows, equal at 4 and 8 (docs/PERFORMANCE.md, "fp32 linears on few rows")."""


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` for a weight ``[out, in]``: a tensor, or a packed quantised kernel
    that the load-time transform put in its place (shared/model/quant.py); [T, in] -> [T, out]."""
    if isinstance(weight, torch.Tensor):
        rows = x.shape[0]
        if rows <= SKINNY_ROWS and x.dim() == 2 and x.device.type == "cpu" and weight.dtype == torch.float32:
            columns = x if rows > 1 else torch.cat((x, torch.zeros_like(x)))
            y = torch.mm(weight, columns.T).T[:rows]
            return y if bias is None else y + bias
        return F.linear(x, weight, bias)
    y = weight(x)
    return y if bias is None else y + bias


def linear_group(
    x: torch.Tensor, weights: Sequence[Weight], biases: Sequence[torch.Tensor | None]
) -> list[torch.Tensor]:
    """``linear(x, w, b)`` for each weight of a group that reads the same ``x``; when the
    weights are parts of one fused int8 kernel (shared/model/quant_fusion.py) it runs
    once and each gets its columns of the result."""
    parts = fused_parts(weights)
    if parts is None:
        return [linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    y = parts[0].kernel(x)
    columns = [y[:, part.start : part.stop] for part in parts]
    return [c if b is None else c + b for c, b in zip(columns, biases, strict=True)]


def conv1d(x: torch.Tensor, weight: Weight, bias: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D ``x W + b`` for a weight stored ``[in, out]`` (or a packed kernel)."""
    if isinstance(weight, torch.Tensor):
        return x @ weight + bias
    return weight(x) + bias


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[T, heads * head_dim] -> [heads, T, head_dim]."""
    return x.view(x.shape[0], heads, -1).transpose(0, 1)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[heads, T, head_dim] -> [T, heads * head_dim]."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def check_tensors(
    where: str,
    tensors: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor.

    ``where`` says whose tensors these are ("block 3", "entry") for the message. Values
    are tensors or packed kernels (both have the logical ``shape``).
    """
    for name in sorted(shapes):
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor {name!r} is missing from the checkpoint")
        if tuple(tensors[name].shape) != shapes[name]:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"expected {shapes[name]}"
            )
    for name in sorted(tensors):
        if name not in shapes:
            raise CheckpointError(f"{where}: unexpected tensor {name!r} in the checkpoint")


def check_finite(where: str, name: str, tensor: torch.Tensor) -> None:
    """Raise CheckpointError when ``tensor`` holds a NaN or an infinity.

    ``where`` names the file it came from, ``name`` the tensor. Costs one pass over the
    tensor (tens of ms for a block of a 100M-parameter model): loading only, never per
    request.
    """
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = int(finite.numel() - int(finite.sum()))
    first = int((~finite).flatten().nonzero()[0])
    raise CheckpointError(
        f"{where}: tensor {name!r} holds {bad} NaN or infinite values (first at flat index "
        f"{first}): the weights are corrupt or overflowed in conversion; re-download or "
        "re-convert the checkpoint"
    )
