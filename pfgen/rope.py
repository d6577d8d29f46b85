"""3D RoPE of Wan, computed for arbitrary (t, y, x) positions.

Wan splits a head's channels into temporal / height / width blocks (44/42/42 for 128) and rotates interleaved
(even, odd) channel pairs, exactly like diffusers' `WanRotaryPosEmbed` + `WanAttnProcessor`. Angles are
computed in float64 from integer positions on demand, so there is no table and no length ceiling. Tables
are complex64 (cos + i sin per channel pair), so a rotation is one complex multiply in float32, cast back to
the input dtype (the float32 math diffusers does, in fewer kernels).
"""

from __future__ import annotations

import torch
from torch import nn


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channel split (t, h, w) used by Wan: h = w = 2 * (head_dim // 6), t gets the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _inv_freqs(head_dim: int, theta: float) -> list[torch.Tensor]:
    return [
        1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
        for dim in axis_dims(head_dim)
    ]


def rope_table(
    t: torch.Tensor, y: torch.Tensor, x: torch.Tensor, head_dim: int, theta: float = 10000.0, device=None
) -> torch.Tensor:
    """Complex64 rotations of shape (L, 1, head_dim // 2) for L tokens at positions (t, y, x)."""
    angles = [
        pos.to(torch.float64)[:, None] * freqs[None, :]
        for pos, freqs in zip((t, y, x), _inv_freqs(head_dim, theta))
    ]
    angle = torch.cat(angles, dim=1)[:, None, :]
    return torch.complex(angle.cos().float(), angle.sin().float()).to(device)


def grid_positions(frames, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions of the tokens of whole frames in raster order: each frame's temporal index given."""
    frames = torch.as_tensor(list(frames), dtype=torch.int64)
    ys = torch.arange(height).repeat_interleave(width)
    xs = torch.arange(width).repeat(height)
    n = height * width
    return frames.repeat_interleave(n), ys.repeat(len(frames)), xs.repeat(len(frames))


def frame_table(frames, height: int, width: int, head_dim: int, theta: float = 10000.0, device=None):
    """Rotations for whole frames whose temporal positions are `frames` (one entry per frame)."""
    return rope_table(*grid_positions(frames, height, width), head_dim, theta, device)


def temporal_table(shifts, tokens_per_item, head_dim: int, theta: float = 10000.0, device=None):
    """Rotations of the temporal channels only: by shifts[i] for the i-th run of tokens."""
    t = torch.as_tensor(list(shifts), dtype=torch.int64).repeat_interleave(tokens_per_item)
    zeros = torch.zeros_like(t)
    return rope_table(t, zeros, zeros, head_dim, theta, device)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate (..., L, heads, D) by a complex table (L, 1, D/2); float32 math, result in x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)


def complex_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' interleaved (1, L, 1, D) cos/sin pair -> complex (L, 1, D/2)."""
    return torch.complex(cos[0, :, :, 0::2].float(), sin[0, :, :, 1::2].float())


class RoPETables(tuple):
    """The (cos, sin) pair diffusers passes to attention processors, also carrying the complex table."""

    freqs: torch.Tensor


class FrameOffsetRoPE(nn.Module):
    """Drop-in for diffusers' `WanRotaryPosEmbed` whose temporal positions start at `frame_offset`.

    It returns the (cos, sin) pair diffusers expects, shape (1, tokens, 1, head_dim), for the frames of the
    current call placed at frame_offset, frame_offset + 1, ... It has no table, hence no 1024-frame limit.
    """

    def __init__(self, head_dim: int, patch_size, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.patch_size = tuple(patch_size)
        self.theta = theta
        self.frame_offset = 0

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        positions = range(self.frame_offset, self.frame_offset + frames // p_t)
        freqs = frame_table(positions, height // p_h, width // p_w, self.head_dim, self.theta, hidden_states.device)
        tables = RoPETables(t.repeat_interleave(2, dim=-1)[None] for t in (freqs.real, freqs.imag))
        tables.freqs = freqs
        return tables
