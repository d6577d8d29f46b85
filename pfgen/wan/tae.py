"""A tiny fast decoder for Wan2.1 latents: the TAEHV architecture (madebyollin/taehv, `taew2_1`), decoder only.

The decoder is a stack of 3x3 convolutions; three groups of MemBlocks each see their input frame and the input
frame before it (zeros before the first), and two temporal upsamplers (TGrow) turn one frame into two, so a
latent frame becomes 4 video frames. The first 3 frames of a video are dropped, which gives 1 + 4 (T - 1)
frames for T latent frames, the Wan VAE's count. It decodes the normalised latents the DiT produces (no
latent mean / std), to RGB in [0, 1].

Module indices follow the published weights (`decoder.<i>...`), so the safetensors file loads as it is.
`TaeStreamingDecoder` decodes chunk by chunk: each MemBlock keeps the last input frame of the previous chunk,
which equals decoding the whole sequence at once.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from pfgen.errors import PfgenError
from pfgen.hub import TAE_REFERENCE
LATENT_CHANNELS = 16
WIDTHS = (256, 128, 64, 64)  # channels of the three MemBlock groups and of the output convolution
TIME_UPSCALE = (1, 2, 2)  # TGrow stride after each group: 4 video frames per latent frame
TRIM = 3  # leading frames dropped (the Wan VAE's first latent frame is one video frame)
# Transient bytes of decoding one latent frame (4 video frames) per output pixel, float32, measured on the CPU
# (process RSS high-water mark over the decode minus the RSS before it): 1077 at 240x416, 954 per video frame at
# 480x832, i.e. about 3,800 per pixel for the four frames. Chunks decode a latent frame at a time, so this
# does not grow with the chunk; other dtypes scale with their item size.
DECODE_BYTES_PER_PIXEL = 4 * 1000


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class SoftClamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(conv3(relu(conv2(relu(conv1([x, past]))))) + x): `past` is the block's input one frame earlier."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))
        self.skip = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x, past):
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """A 1x1 convolution to `stride` times the channels, read as `stride` consecutive frames."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)


def build_decoder() -> nn.Sequential:
    layers: list[nn.Module] = [SoftClamp(), _conv(LATENT_CHANNELS, WIDTHS[0]), nn.ReLU()]
    for group, stride in enumerate(TIME_UPSCALE):
        width, nxt = WIDTHS[group], WIDTHS[group + 1]
        layers += [MemBlock(width), MemBlock(width), MemBlock(width), nn.Upsample(scale_factor=2),
                   TGrow(width, stride), _conv(width, nxt, bias=False)]
    layers += [nn.ReLU(), _conv(WIDTHS[-1], 3)]
    return nn.Sequential(*layers)


class TinyDecoder(nn.Module):
    """The decoder; its state dict keys are the published file's `decoder.*` keys."""

    def __init__(self):
        super().__init__()
        self.decoder = build_decoder()

    @torch.no_grad()
    def forward(self, latents: torch.Tensor, memory: list | None = None) -> torch.Tensor:
        """(B, C, T, h, w) latents -> (B, 3, 4 T, 8 h, 8 w) untrimmed frames in [0, 1].

        `memory` (one entry per MemBlock, None = zeros) holds each MemBlock's input of the frame before this
        sequence; it is updated in place with this sequence's last frame."""
        b, _, t = latents.shape[:3]
        x = latents.permute(0, 2, 1, 3, 4).reshape(b * t, *latents.shape[1:2], *latents.shape[3:])
        slot = 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                frames = x.view(b, -1, *x.shape[1:])
                before = memory[slot] if memory is not None and memory[slot] is not None else \
                    torch.zeros_like(frames[:, 0])
                past = torch.cat([before[:, None], frames[:, :-1]], 1).reshape(x.shape)
                if memory is not None:
                    memory[slot] = frames[:, -1].clone()
                slot += 1
                x = layer(x, past)
            elif isinstance(layer, TGrow):
                x = layer.conv(x)
                x = x.reshape(-1, x.shape[1] // layer.stride, *x.shape[2:])
            else:
                x = layer(x)
        frames = x.view(b, -1, *x.shape[1:]).clamp(0, 1)
        return frames.permute(0, 2, 1, 3, 4)

    def mem_blocks(self) -> int:
        return sum(isinstance(m, MemBlock) for m in self.decoder)


def load_tae(path: str | Path | None, device, dtype) -> TinyDecoder:
    """The decoder with weights from a `taew2_1` safetensors file; `path=None` gives seeded random weights (the
    embedded tiny model's decoder). Strict: every `decoder.*` tensor is used once, shapes are checked; the
    file's encoder is ignored. A first TGrow stored with 2x the channels keeps its last frame's (as the
    reference does for decoders with that upsampler switched off)."""
    model = TinyDecoder()
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            model = TinyDecoder()
    else:
        model.load_state_dict(_read_decoder(Path(path), model.state_dict()))
    return model.to(device, dtype).eval().requires_grad_(False)


def _read_decoder(path: Path, expected: dict) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PfgenError(f"cannot read decoder weights {path}: {str(exc).splitlines()[0]}",
                         f"give a TAEHV taew2_1 .safetensors file (default {TAE_REFERENCE})") from None
    found = {k: v for k, v in tensors.items() if k.startswith("decoder.")}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has an unknown tensor {extra[0]}"
        raise PfgenError(f"{path} is not a taew2_1 decoder: it {what}", f"use {TAE_REFERENCE}")
    for key, want in expected.items():
        got = found[key]
        if got.shape != want.shape and key.endswith(".conv.weight") and got.shape[0] == 2 * want.shape[0] \
                and got.shape[1:] == want.shape[1:]:
            found[key] = got[-want.shape[0]:]
        elif got.shape != want.shape:
            raise PfgenError(f"{path}: {key} has shape {tuple(got.shape)}, the taew2_1 decoder {tuple(want.shape)}",
                             f"use {TAE_REFERENCE} (Wan2.1 latents, 16 channels)")
    return found


class TaeStreamingDecoder:
    """Latent chunks in, pixel frames out, like `video.StreamingDecoder`: 1 frame for the first latent frame
    (3 of its 4 are dropped), 4 for each later one; frames in [-1, 1]."""

    kind = "tae"

    def __init__(self, tae: TinyDecoder):
        self.tae = tae
        self.reset()

    def reset(self) -> None:
        self.memory: list = [None] * self.tae.mem_blocks()
        self.started = False

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, h, w) -> (B, 3, frames, H, W) in [-1, 1], one latent frame at a time (a quarter of a
        3-frame chunk's transient memory; the MemBlock state makes it equal to decoding the chunk at once)."""
        dtype = next(self.tae.parameters()).dtype
        frames = torch.cat([self.tae(latents[:, :, i:i + 1].to(dtype), self.memory)
                            for i in range(latents.shape[2])], 2)
        if not self.started:
            frames, self.started = frames[:, :, TRIM:], True
        return frames * 2 - 1

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {str(i): m for i, m in enumerate(self.memory) if m is not None}
        return tensors, {"kind": self.kind, "started": self.started, "blocks": len(self.memory)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("kind") != self.kind:
            raise ValueError("it was saved with the wan decoder; resume with --decoder wan")
        if meta["blocks"] != len(self.memory):
            raise ValueError(f"saved decoder state has {meta['blocks']} blocks, this decoder {len(self.memory)}")
        device = next(self.tae.parameters()).device
        self.memory = [tensors[str(i)].to(device) if str(i) in tensors else None for i in range(meta["blocks"])]
        self.started = bool(meta["started"])


def tae_decode_bytes(height: int, width: int, itemsize: int, batch: int = 1) -> int:
    """Estimate of the streaming decode's transient memory (measured coefficient)."""
    return batch * DECODE_BYTES_PER_PIXEL * height * width * itemsize // 4


def tae_parameters() -> int:
    """Parameters of the decoder (for the memory plan; counted on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in TinyDecoder().parameters())
