"""The Wan VAE's RMS norm on the CPU without F.normalize.

diffusers' `WanRMS_norm` normalises over the channels of a 5D tensor with F.normalize, whose vector norm is a
slow strided reduction on the CPU: 20 % of the embedded model's `generate` time and 37 % of its decode at one
thread (docs/benchmarks.md). `rms_norm` is the same function, x / max(|x|, 1e-12) * scale * gamma + bias, as
x * rsqrt(max(sum x^2, 1e-24)); other devices keep diffusers' forward. `scripts/train_world.py` trains through it.
"""

from __future__ import annotations

import types

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm


def rms_norm(norm: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    """WanRMS_norm.forward; half-precision inputs are normalised in float32, as diffusers does."""
    if not x.is_cpu:
        return WanRMS_norm.forward(norm, x)
    dim = 1 if norm.channel_first else -1
    if x.dtype in (torch.float16, torch.bfloat16):
        y = x.float()
        return (y * y.square().sum(dim, keepdim=True).clamp_min(1e-24).rsqrt()).to(x.dtype) * norm.scale * \
            norm.gamma + norm.bias
    inverse = x.square().sum(dim, keepdim=True).clamp_min(1e-24).rsqrt()
    return x * (inverse * norm.scale) * norm.gamma + norm.bias


def use_fast_rms_norm(vae):
    """Every WanRMS_norm of `vae` computes through `rms_norm` (the weights are untouched)."""
    for module in vae.modules():
        if isinstance(module, WanRMS_norm):
            module.forward = types.MethodType(rms_norm, module)
    return vae
