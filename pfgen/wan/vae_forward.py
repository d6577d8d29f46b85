"""The Wan VAE's forward at less cost, computing the same function: one place for the VAE's speed-ups.

- Causal convolutions whose taps on earlier frames are all zero (the world model's VAE is built so,
  scripts/train_world.py; the Wan2.1 VAE has none) run as the per-frame convolutions they are.
- On the CPU, the RMS norm without F.normalize: diffusers' `WanRMS_norm` normalises over the channels of a 5D
  tensor with F.normalize, a slow strided vector norm there (20 % of the embedded model's `generate` time and
  37 % of its decode at one thread; docs/benchmarks.md). `rms_norm` computes x / max(|x|, 1e-12) * scale *
  gamma + bias as x * rsqrt(max(sum x^2, 1e-24)); other devices keep diffusers' forward. scripts/train_world.py
  trains through it.
"""

from __future__ import annotations

import types

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm


def cheaper_forward(vae):
    """Both speed-ups on a loaded VAE (in place; the state dict's shapes change where convolutions narrow)."""
    return use_fast_rms_norm(narrow_framewise_convs(vae))


def narrow_framewise_convs(vae):
    """Run every causal convolution whose taps on earlier frames are all zero as the per-frame convolution it
    is: kernel 1 in time, no temporal padding, no cached frames. The same function at a third of the work."""
    for conv in vae.modules():
        if isinstance(conv, WanCausalConv3d) and conv.kernel_size[0] > 1 and conv.stride[0] == 1 \
                and not conv.weight[:, :, :-1].any():
            conv.weight = torch.nn.Parameter(conv.weight[:, :, -1:].contiguous(), requires_grad=False)
            conv.kernel_size = (1, *conv.kernel_size[1:])
            conv._padding = (*conv._padding[:4], 0, 0)
    return vae


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
