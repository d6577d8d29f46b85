"""Reorder each layer's self-attention heads in place so that heads of one type sit side by side.

Attention is computed per head, so permuting the heads of `to_q / to_k / to_v` (rows), of the q/k RMSNorm
weights (the norm spans all heads, so its statistic does not change) and of `to_out` (columns) leaves the
layer's function unchanged. With heads grouped by type, the cache reads each type's q, k, v and writes its
output as plain slices instead of gathering and scattering per type on every call.
"""

from __future__ import annotations

import torch

TYPE_ORDER = {"wave": 0, "anchor": 1, "veil": 2}


def grouped_order(types: list[str]) -> list[int]:
    """Original head indices in their new positions: stable, grouped by type."""
    return sorted(range(len(types)), key=lambda h: (TYPE_ORDER.get(types[h], len(TYPE_ORDER)), h))


def _permute_rows(tensor: torch.Tensor, heads: int, index: torch.Tensor) -> torch.Tensor:
    return tensor.view(heads, -1, *tensor.shape[1:])[index].reshape(tensor.shape)


def permute_heads(attn, index: list[int]) -> None:
    """Position i of the layer becomes its current head index[i]."""
    heads = attn.heads
    idx = torch.tensor(index, device=attn.to_q.weight.device)
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_k, attn.to_v):
            linear.weight.data = _permute_rows(linear.weight.data, heads, idx)
            linear.bias.data = _permute_rows(linear.bias.data, heads, idx)
        for norm in (attn.norm_q, attn.norm_k):
            if getattr(norm, "weight", None) is not None:
                norm.weight.data = _permute_rows(norm.weight.data, heads, idx)
        out = attn.to_out[0]
        out.weight.data = _permute_rows(out.weight.data.t(), heads, idx).t().contiguous()


def set_head_order(transformer, current: list[list[int]], target: list[list[int]]) -> list[list[int]]:
    """Move every layer from order `current` to order `target` (lists of original head indices)."""
    for layer, (now, want) in enumerate(zip(current, target)):
        if now != want:
            position = {head: i for i, head in enumerate(now)}
            permute_heads(transformer.blocks[layer].attn1, [position[h] for h in want])
    return [list(order) for order in target]
