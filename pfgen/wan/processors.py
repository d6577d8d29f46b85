"""diffusers attention processors that turn a `WanTransformer3DModel` into a causal, cached model.

Self-attention hands its projections to the KV cache (which owns RoPE and the ragged attention); cross-
attention computes the text K/V once per prompt and reuses them for every pass of every chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfgen.rope import FrameOffsetRoPE, complex_table


class CausalState:
    """What the processors share: the KV cache of the current video and the prompt version."""

    def __init__(self):
        self.cache = None
        self.text_version = 0

    def new_prompt(self) -> None:
        """Invalidate the cross-attention K/V (call whenever the prompt embeddings change)."""
        self.text_version += 1


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1))


class CachedSelfAttention:
    """attn1 of block `layer`: q/k/v projections and RMSNorm here, RoPE and attention in the cache."""

    def __init__(self, layer: int, state: CausalState):
        self.layer = layer
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **_):
        q = _heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)
        k = _heads(attn.norm_k(attn.to_k(hidden_states)), attn.heads)
        v = _heads(attn.to_v(hidden_states), attn.heads)
        freqs = getattr(rotary_emb, "freqs", None)
        if freqs is None:  # tables from diffusers' own RoPE module
            freqs = complex_table(*rotary_emb)
        out = self.state.cache.attend(self.layer, q, k, v, freqs).flatten(2).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


class CachedCrossAttention:
    """attn2: text K/V depend only on the prompt, so they are computed once per prompt version."""

    def __init__(self, state: CausalState):
        self.state = state
        self.version = None
        self.kv = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **_):
        if self.version != self.state.text_version or self.kv is None:
            k = _heads(attn.norm_k(attn.to_k(encoder_hidden_states)), attn.heads)
            v = _heads(attn.to_v(encoder_hidden_states), attn.heads)
            self.kv, self.version = (k.transpose(1, 2), v.transpose(1, 2)), self.state.text_version
        q = _heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, *self.kv).transpose(1, 2).flatten(2).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


class CachedRoPE(FrameOffsetRoPE):
    """`FrameOffsetRoPE` that computes its tables once per (offset, shape, device): once per chunk."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._key = None
        self._value = None

    def forward(self, hidden_states):
        key = (self.frame_offset, tuple(hidden_states.shape[2:]), hidden_states.device)
        if key != self._key:
            self._key, self._value = key, super().forward(hidden_states)
        return self._value


class Float64Timesteps(torch.nn.Module):
    """Sinusoidal timestep features computed in float64, as the original Wan code does.

    diffusers computes them in float32; at t ~ 1000 that alone moves the model output by ~4e-5.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
        angles = timesteps.double()[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def make_causal(transformer, state: CausalState | None = None) -> CausalState:
    """Install the cached processors on every block, the offset RoPE and float64 timestep features;
    returns the shared state."""
    state = state or CausalState()
    for layer, block in enumerate(transformer.blocks):
        if block.attn2.add_k_proj is not None:
            raise ValueError("image-conditioned Wan blocks are not supported (text-to-video models only)")
        block.attn1.set_processor(CachedSelfAttention(layer, state))
        block.attn2.set_processor(CachedCrossAttention(state))
    cfg = transformer.config
    transformer.rope = CachedRoPE(cfg.attention_head_dim, cfg.patch_size)
    transformer.condition_embedder.timesteps_proj = Float64Timesteps(cfg.freq_dim)
    return state
