"""The building blocks' short forms give the textbook formulas' values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.model.layers import attend, rms_norm
from shared.model.llama import _angles, apply_rotary


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows", [1, 7])
def test_rms_norm_is_the_formula(rows: int) -> None:
    x, weight = _random(rows, 96, seed=1) * 30, _random(96, seed=2)
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), expected, rtol=1e-6, atol=1e-6)


def test_rotary_is_the_rotate_half_formula() -> None:
    x = _random(4, 5, 16, seed=3)  # [heads, T, d]
    positions = torch.tensor([0.0, 3.0, 4.0, 17.0, 250.0])
    half = torch.arange(0, 16, 2, dtype=torch.float32) / 16
    angles = torch.outer(positions, 1.0 / (10000.0**half))
    angles = torch.cat((angles, angles), dim=-1)
    first, second = x.chunk(2, dim=-1)
    expected = x * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()
    cos, signed_sin = _angles(10000.0, 16, positions)
    assert torch.equal(apply_rotary(x, cos, signed_sin), expected)


@pytest.mark.parametrize("cached", [1, 9, 130])
def test_a_decode_steps_grouped_attention_equals_repeated_keys(cached: int) -> None:
    """One new token over grouped keys (9 query heads, 3 kv heads): the short form (the
    heads of a group as one kv head's queries) equals attention over repeated keys."""
    query = _random(9, 1, 64, seed=4)
    key, value = _random(3, cached, 64, seed=5), _random(3, cached, 64, seed=6)
    repeated = F.scaled_dot_product_attention(
        query, key.repeat_interleave(3, dim=0), value.repeat_interleave(3, dim=0))  # fmt: skip
    torch.testing.assert_close(attend(query, key, value, causal=True), repeated, rtol=1e-5, atol=1e-6)
    prompt = _random(9, 4, 64, seed=7)  # several new tokens: the masked path, unchanged
    keys4, values4 = _random(3, cached + 3, 64, seed=8), _random(3, cached + 3, 64, seed=9)
    mask = torch.ones(4, cached + 3, dtype=torch.bool).tril(diagonal=cached - 1)
    expected = F.scaled_dot_product_attention(prompt, keys4.repeat_interleave(3, dim=0),
                                              values4.repeat_interleave(3, dim=0), attn_mask=mask)  # fmt: skip
    torch.testing.assert_close(attend(prompt, keys4, values4, causal=True), expected, rtol=1e-5, atol=1e-6)
