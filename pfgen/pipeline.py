"""The Python API, diffusers-style: `pipe = pfgen.load_pipeline(...)`, then `pipe(...)` or `pipe.stream(...)`.

prompt -> embeddings -> chunk loop (plan -> passes -> commit) -> streaming VAE -> frames. The CLI is a thin
layer over this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pfgen.attention import get_backend
from pfgen.cache.engine import CacheGeometry, KVCache
from pfgen.cache.policy import validate_cache_config
from pfgen.config import Config, check_video_size, load_config, with_overrides
from pfgen.errors import PfgenError
from pfgen.frames import VAE_SPACE, latent_frames_for
from pfgen.heads import HeadTypes
from pfgen.sampling import ChunkLoop, NoiseSource
from pfgen.video import Mp4Writer, StreamingDecoder, to_uint8_frames
from pfgen.wan.head_order import grouped_order, set_head_order
from pfgen.wan.processors import make_causal
from pfgen.wan.text import PromptEncoder

POLICIES = ("rolling", "full", "pyramid")


@dataclass
class ChunkOutput:
    index: int
    t0: int  # first latent frame of the chunk
    latents: torch.Tensor  # (B, C, F, h, w)
    frames: torch.Tensor | None  # (B, 3, frames, H, W) in [-1, 1], when decoding


@dataclass
class PipelineOutput:
    latents: torch.Tensor | None = None
    frames: np.ndarray | None = None  # (B, frames, H, W, 3) float32 in [0, 1]
    path: Path | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PfgenError(f"unknown device '{name}'", "use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PfgenError("CUDA was requested but no GPU is visible", "use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise PfgenError(f"unknown dtype '{name}'", "use auto, float32, bfloat16 or float16")
    return table[name]


class Pipeline:
    def __init__(self, transformer, vae, prompt_encoder: PromptEncoder, config: Config, device, dtype):
        self.transformer, self.vae, self.prompt_encoder = transformer, vae, prompt_encoder
        self.config, self.device, self.dtype = config, device, dtype
        self.state = make_causal(transformer)
        self._cache_key = None
        self._head_order = [list(range(self.heads)) for _ in range(self.layers)]  # original head per slot

    # -- geometry -------------------------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return len(self.transformer.blocks)

    @property
    def heads(self) -> int:
        return self.transformer.config.num_attention_heads

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) for a video size; the size must be a multiple of 16 (VAE 8 x patch 2)."""
        check_video_size(height, width, VAE_SPACE * self.transformer.config.patch_size[1])
        return height // VAE_SPACE, width // VAE_SPACE

    # -- cache ----------------------------------------------------------------------------------------------
    def head_types(self, policy: str, heads: str | HeadTypes | None = None) -> list[list[str]]:
        """Per-head rule names for a policy (pyramid: from a head file, or `cache.all`)."""
        if policy not in POLICIES:
            raise PfgenError(f"unknown policy '{policy}'", f"choose from {', '.join(POLICIES)}")
        if policy != "pyramid":
            return [[policy] * self.heads for _ in range(self.layers)]
        cache = self.config.cache
        if heads is None and cache.all is not None:
            types = HeadTypes.uniform(cache.all, self.layers, self.heads)
        else:
            source = heads if heads is not None else cache.heads
            if source is None:
                raise PfgenError("the pyramid policy needs head types",
                                 "pass --heads FILE (pfgen profile-heads makes one) or set cache.all in the config")
            types = source if isinstance(source, HeadTypes) else HeadTypes.load(source)
        types.check_model(self.layers, self.heads)
        return [list(row) for row in types.types]

    def make_cache(self, policy: str, heads, batch: int, grid, max_frames: int) -> KVCache:
        """A KV cache for one video; reused (reset) when the next video has the same shape.

        The model's heads are reordered so that each type is contiguous (`wan.head_order`); the baselines
        keep the original order, so what an observer sees under `rolling` is always in checkpoint order.
        """
        types = self.head_types(policy, heads)
        order = [grouped_order(row) for row in types]
        self._head_order = set_head_order(self.transformer, self._head_order, order)
        types = [[row[h] for h in layer_order] for row, layer_order in zip(types, order)]
        key = (policy, str(types), batch, grid, max_frames if policy == "full" else 0)
        if key != self._cache_key:
            cfg = self.transformer.config
            geometry = CacheGeometry(self.layers, self.heads, cfg.attention_head_dim,
                                     (grid[0] // cfg.patch_size[1], grid[1] // cfg.patch_size[2]), batch, max_frames)
            try:
                validate_cache_config(self.config.cache)
                backend = get_backend(self.config.cache.backend, self.device, geometry.theta)
            except ValueError as exc:
                raise PfgenError(str(exc)) from None
            self.release_cache()  # free the previous cache before allocating
            self.state.cache = KVCache(self.config.cache, types, geometry, self.config.sampling.frames_per_chunk,
                                       self.dtype, self.device, backend)
            self._cache_key = key
        return self.state.cache

    def release_cache(self) -> None:
        """Drop the KV cache (and its GPU memory); the next video allocates a fresh one."""
        self.state.cache = None
        self._cache_key = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- generation -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self.prompt_encoder(prompts).to(self.device, self.dtype)

    def stream(self, prompt=None, *, num_frames: int = 81, height: int | None = None, width: int | None = None,
               prompt_embeds=None, latents=None, generator=None, policy: str | None = None, heads=None,
               decode: bool = True, on_step=None, observer=None, noise: NoiseSource | None = None,
               timer=None) -> Iterator[ChunkOutput]:
        """Yield each chunk's latents (and decoded frames) as soon as they exist.

        `observer(layer, q_abs, k_abs, plan, committing)` sees every self-attention call (profiling);
        `timer(region)` returns a context manager entered around each chunk's "plan" and each self-attention
        call's "attention" (benchmarks);
        `noise` replaces the noise drawn from `generator` / `latents` (e.g. to replay another run's draws)."""
        if (prompt is None) == (prompt_embeds is None):
            raise PfgenError("give exactly one of prompt and prompt_embeds")
        embeds = self.encode_prompt(prompt) if prompt is not None else prompt_embeds.to(self.device, self.dtype)
        height = height or self.config.video.height
        width = width or self.config.video.width
        grid = self.latent_grid(height, width)
        total = latent_frames_for(num_frames, self.config.sampling.frames_per_chunk)
        if latents is not None:
            total = self._check_latents(latents, embeds.shape[0], grid)
        cache = self.make_cache(policy or self.config.cache.policy, heads, embeds.shape[0], grid, total)
        noise = noise or NoiseSource((embeds.shape[0], self.transformer.config.in_channels, *grid), self.device,
                                     self.dtype, generator, latents)
        decoder = StreamingDecoder(self.vae) if decode else None
        if decoder:
            decoder.reset()
        loop = ChunkLoop(self.transformer, self.state, self.config.sampling)
        cache.observer, cache.timer = observer, timer
        try:
            for index, x0 in enumerate(loop.run(embeds, total, noise, on_step)):
                frames = decoder.decode(x0) if decoder else None
                yield ChunkOutput(index, index * self.config.sampling.frames_per_chunk, x0, frames)
        finally:
            cache.observer = cache.timer = None

    def _check_latents(self, latents, batch, grid) -> int:
        channels = self.transformer.config.in_channels
        expected = (batch, channels, None, *grid)
        if latents.ndim != 5 or any(e is not None and e != s for e, s in zip(expected, latents.shape)):
            raise PfgenError(f"latents have shape {tuple(latents.shape)}, expected (B={batch}, C={channels}, "
                             f"F, {grid[0]}, {grid[1]})")
        per_chunk = self.config.sampling.frames_per_chunk
        if latents.shape[2] % per_chunk:
            raise PfgenError(f"latents have {latents.shape[2]} frames, not a multiple of the chunk ({per_chunk})")
        return latents.shape[2]

    def __call__(self, prompt=None, *, output_type: str = "np", output_path=None, fps: int | None = None,
                 **kwargs) -> PipelineOutput:
        """Generate a whole video: output_type "latent", "np" (frames in [0, 1]) or "mp4" (streamed to a file)."""
        if output_type not in ("latent", "np", "mp4"):
            raise PfgenError(f"unknown output_type '{output_type}'", "use latent, np or mp4")
        if output_type == "mp4":
            return PipelineOutput(path=self.write_mp4(prompt, output_path, fps=fps, **kwargs))
        chunks = list(self.stream(prompt, decode=output_type == "np", **kwargs))
        latents = torch.cat([c.latents for c in chunks], dim=2)
        if output_type == "latent":
            return PipelineOutput(latents=latents)
        frames = torch.cat([c.frames for c in chunks], dim=2)
        return PipelineOutput(latents=latents, frames=((frames.float().permute(0, 2, 3, 4, 1) + 1) / 2).cpu().numpy())

    def write_mp4(self, prompt, path, fps: int | None = None, on_chunk=None, **kwargs) -> Path:
        """Stream a video into an mp4 (batch 1); the file appears only when complete."""
        if path is None:
            raise PfgenError("output_type='mp4' needs output_path")
        height = kwargs.get("height") or self.config.video.height
        width = kwargs.get("width") or self.config.video.width
        self.latent_grid(height, width)
        with Mp4Writer(path, width, height, fps or self.config.video.fps) as writer:
            for chunk in self.stream(prompt, **kwargs):
                writer.write(to_uint8_frames(chunk.frames[0]))
                if on_chunk is not None:
                    on_chunk(chunk)
        return Path(path)


def load_pipeline(config: str | Path | Config | None = None, checkpoint: str | None = None,
                  wan_dir: str | None = None, device: str | None = None, dtype: str | None = None,
                  **model_overrides) -> Pipeline:
    """Build a pipeline; with no arguments, the embedded tiny model (random weights, seconds on a CPU)."""
    cfg = config if isinstance(config, Config) else load_config(config)
    cfg = with_overrides(cfg, model=dict(checkpoint=checkpoint, wan_dir=wan_dir, **model_overrides),
                         runtime=dict(device=device, dtype=dtype))
    dev = resolve_device(cfg.runtime.device)
    dt = resolve_dtype(cfg.runtime.dtype, dev)
    from pfgen.wan.components import load_components

    transformer, vae, encoder = load_components(cfg.model, dev, dt)
    return Pipeline(transformer, vae, encoder, cfg, dev, dt)
