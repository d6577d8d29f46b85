"""Frame-level pre-softmax logits of every self-attention head, captured while the rolling baseline runs.

L[layer, head, t_q, t_k] = mean over query tokens i of frame t_q and key tokens j of frame t_k of
q_i . k_j / sqrt(d), with q and k as attention uses them (RoPE applied). The mean of a bilinear form is the
form of the means, so L = mean_i(q_i) . mean_j(k_j) / sqrt(d) exactly: capture keeps one mean key per
committed frame and never forms a score matrix, which makes it nearly free next to attention itself.
Values are averaged over the denoising passes of each chunk (the clean pass only supplies the committed
keys); pairs never visible stay NaN.
"""

from __future__ import annotations

import math

import torch


class LogitRecorder:
    """A `KVCache.observer` accumulating frame-level logits for one video (batch items averaged)."""

    def __init__(self, layers: int, heads: int, frames: int, device, kind: str = "rolling"):
        self.kind = kind
        self.sum = torch.zeros(layers, heads, frames, frames, dtype=torch.float32, device=device)
        self.count = torch.zeros(frames, frames, dtype=torch.float32, device=device)
        self.key_means: list[dict[int, torch.Tensor]] = [{} for _ in range(layers)]

    def __call__(self, layer: int, q_abs: torch.Tensor, k_abs: torch.Tensor, plan, committing: bool) -> None:
        frames, t0 = plan.frames, plan.t0
        k_mean = _frame_means(k_abs, frames)  # (F, H, D)
        if committing:
            for f in range(frames):
                self.key_means[layer][t0 + f] = k_mean[f]
            self._forget(layer, plan)
            return
        q_mean = _frame_means(q_abs, frames)
        scale = 1.0 / math.sqrt(q_abs.shape[-1])
        for f, read in enumerate(plan.rules[self.kind].reads):
            visible = sorted({t for seg in read.segments for t in seg.frames})
            keys = torch.stack([k_mean[t - t0] if t >= t0 else self.key_means[layer][t] for t in visible])
            logits = torch.einsum("hd,khd->hk", q_mean[f], keys) * scale
            self.sum[layer, :, t0 + f, visible] += logits
            if layer == 0:
                self.count[t0 + f, visible] += 1

    def _forget(self, layer: int, plan) -> None:
        """Drop mean keys no later chunk can see (memory stays bounded by the window)."""
        keep = {t for read in plan.rules[self.kind].reads for seg in read.segments for t in seg.frames}
        keep |= set(range(plan.t0, plan.t0 + plan.frames))
        for t in [t for t in self.key_means[layer] if t not in keep]:
            del self.key_means[layer][t]

    def nbytes(self) -> int:
        """Memory the recorder holds (accumulators and the mean keys it keeps)."""
        means = sum(t.numel() * t.element_size() for layer in self.key_means for t in layer.values())
        return self.sum.numel() * 4 + self.count.numel() * 4 + means

    def frame_logits(self) -> torch.Tensor:
        """(layers, heads, T, T) float32 on the CPU, NaN where t_k was never visible to t_q."""
        mean = self.sum / self.count.clamp(min=1)
        return torch.where(self.count > 0, mean, torch.full_like(mean, float("nan"))).cpu()


def _frame_means(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, F*N, H, D) -> (F, H, D): mean over batch and the tokens of each frame, in float32."""
    return x.float().unflatten(1, (frames, -1)).mean(dim=(0, 2))
