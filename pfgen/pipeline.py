"""The Python API, diffusers-style: `pipe = pfgen.load_pipeline(...)`, then `pipe(...)` or `pipe.stream(...)`.

prompt -> embeddings -> chunk loop (plan -> passes -> commit) -> streaming VAE -> frames. The CLI is a thin
layer over this.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pfgen.attention import get_backend
from pfgen.cache.engine import CacheGeometry, KVCache, cache_nbytes
from pfgen.config import POLICIES, Config, check_video_size, load_config, with_overrides
from pfgen.errors import PfgenError
from pfgen.frames import dit_passes, frames_for_seconds, latent_frames_for, latent_grid, vae_space
from pfgen.heads import HeadTypes, head_type_rows, head_type_source
from pfgen.image import check_image_run, encode_image, load_image
from pfgen.memory import free_memory, plan_memory
from pfgen.offload import Offload
from pfgen.sampling import ChunkLoop, NoiseSource
from pfgen.story import Story
from pfgen.timeline import Entry, from_api
from pfgen.video import Mp4Writer, StreamingDecoder, mp4_tags, to_uint8_frames
from pfgen.wan.head_order import grouped_order, set_head_order
from pfgen.wan.processors import make_causal
from pfgen.wan.tae import TaeStreamingDecoder
from pfgen.wan.text import PromptEncoder
from pfgen.world.grammar import vocabulary_warning
from pfgen.world.model import is_world



@dataclass
class ChunkOutput:
    index: int  # chunk of this run, from 0
    t0: int  # first latent frame of the chunk
    latents: torch.Tensor  # (B, C, F, h, w)
    frames: torch.Tensor | None  # (B, 3, frames, H, W) in [-1, 1], when decoding
    start: int = 0  # first latent frame of this run (> 0 when resumed)
    switch: dict | None = None  # the prompt switch made just before this chunk (pfgen.timeline.switch_record)
    passes: int = 0  # DiT passes of this run so far, this chunk's included
    passes_total: int = 0  # DiT passes the run makes (frames.dit_passes)


@dataclass
class PipelineOutput:
    latents: torch.Tensor | None = None
    frames: np.ndarray | None = None  # (B, frames, H, W, 3) float32 in [0, 1]
    path: Path | None = None


SMALL_MODEL_PARAMETERS = 50_000_000  # a DiT below this runs on one CPU thread by default (README, CPU threads)


def set_threads(threads: int | None, parameters: int) -> None:
    """CPU threads for torch: as given; else one for a small DiT (its ops take microseconds, so a second thread
    only adds a barrier per op, and on a shared machine a descheduled thread stalls every op: measured up to
    several times slower), else the CPUs this process may run on (its affinity and cgroup quota), never more."""
    if threads is None:
        threads = 1 if parameters < SMALL_MODEL_PARAMETERS else usable_cpus()
    torch.set_num_threads(threads)


def usable_cpus() -> int:
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def resolve_device(name: str, available: bool = True) -> torch.device:
    """The device `name` means; `available=False` only parses it (to plan a CUDA run on a CPU machine)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PfgenError(f"unknown device '{name}'", "use auto, cpu, cuda or cuda:N") from None
    if available and device.type == "cuda" and not torch.cuda.is_available():
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
    def __init__(self, transformer, vae, prompt_encoder: PromptEncoder, config: Config, device, dtype,
                 offload: Offload | None = None, tae=None):
        self.transformer, self.vae, self.prompt_encoder = transformer, vae, prompt_encoder
        self.tae = tae  # the tiny decoder (pfgen.wan.tae) when the config decodes with it, else None
        self.config, self.device, self.dtype = config, device, dtype
        self.offload = offload or Offload("none", device, {})
        self.state = make_causal(transformer)
        self._cache_key = None
        self._head_order = [list(range(self.heads)) for _ in range(self.layers)]  # original head per slot
        self.policy, self.original_head_types = None, None  # of the current cache
        # A world model knows only its grammar's words: each prompt with others is warned about once.
        self._seen_prompts = set() if is_world(config.model) else None

    # -- geometry -------------------------------------------------------------------------------------------
    @property
    def layers(self) -> int:
        return len(self.transformer.blocks)

    @property
    def heads(self) -> int:
        return self.transformer.config.num_attention_heads

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) for a video size; the size must be a multiple of the VAE's factor times the patch
        (16 for Wan2.1: 8 x 2)."""
        space = vae_space(None if self.vae is None else self.vae.config)
        check_video_size(height, width, space * self.transformer.config.patch_size[1])
        return latent_grid(height, width, space)

    # -- cache ----------------------------------------------------------------------------------------------
    def head_types(self, policy: str, heads: str | HeadTypes | None = None) -> list[list[str]]:
        """Per-head rule names for a policy (pyramid: `heads`, a head file or loaded types, else the config's)."""
        if policy not in POLICIES:
            raise PfgenError(f"unknown policy '{policy}'", f"choose from {', '.join(POLICIES)}")
        return head_type_rows(head_type_source(self.config.cache, policy, heads), policy, self.layers, self.heads)

    def make_cache(self, policy: str, heads, batch: int, grid, max_frames: int) -> KVCache:
        """A KV cache for one video; reused (reset) when the next video has the same shape.

        The model's heads are reordered so that each type is contiguous (`wan.head_order`); the baselines
        keep the original order, so what an observer sees under `rolling` is always in checkpoint order.
        """
        types = self.head_types(policy, heads)
        self.policy, self.original_head_types = policy, types  # what a saved state records (pfgen.state)
        order = [grouped_order(row) for row in types]
        self._head_order = set_head_order(self.transformer, self._head_order, order)
        types = [[row[h] for h in layer_order] for row, layer_order in zip(types, order)]
        key = (policy, str(types), batch, grid, max_frames if policy == "full" else 0)
        if key != self._cache_key:
            cfg = self.transformer.config
            geometry = CacheGeometry(self.layers, self.heads, cfg.attention_head_dim,
                                     (grid[0] // cfg.patch_size[1], grid[1] // cfg.patch_size[2]), batch, max_frames)
            try:
                backend = get_backend(self.config.cache.backend, self.device, geometry.theta)
            except ValueError as exc:
                raise PfgenError(str(exc)) from None
            self.release_cache()  # free the previous cache before allocating
            args = (self.config.cache, types, geometry, self.config.sampling.frames_per_chunk, self.dtype)
            self._check_fits(cache_nbytes(*args[:4], self.dtype.itemsize), policy, max_frames)
            self.state.cache = KVCache(*args, self.device, backend)
            self._cache_key = key
        return self.state.cache

    def release_cache(self) -> None:
        """Drop the KV cache (and its GPU memory); the next video allocates a fresh one."""
        self.state.cache = None
        self._cache_key = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_fits(self, needed: int, policy: str, frames: int) -> None:
        """Refuse a cache that cannot be allocated (the `full` policy grows with the video) before trying."""
        free = free_memory(self.device)
        if free is not None and needed > free:
            hint = ("use --policy pyramid or rolling (bounded memory), or a shorter video" if policy == "full"
                    else "lower --height/--width")
            raise PfgenError(f"the {policy} KV cache for {frames} latent frames needs {needed / 2 ** 30:.1f} GiB, "
                             f"{free / 2 ** 30:.1f} GiB of {self.device.type} memory is free", hint)

    # -- generation -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if self._seen_prompts is not None:
            for text in set(prompts) - self._seen_prompts:
                self._seen_prompts.add(text)
                if (line := vocabulary_warning(text)) is not None:
                    warnings.warn(line)
        if "text_encoder" in self.offload.moving:  # its visit never overlaps a cache (as the memory plan assumes)
            self.release_cache()
        with self.offload.use("text_encoder"):
            return self.prompt_encoder(prompts).to(self.device, self.dtype)

    def stream(self, prompt=None, *, num_frames: int = 81, height: int | None = None, width: int | None = None,
               prompt_embeds=None, latents=None, generator=None, policy: str | None = None, heads=None,
               decode: bool = True, on_step=None, observer=None, noise: NoiseSource | None = None,
               timeline=None, recache: bool = True, story: Story | None = None, resume=None,
               commit_last: bool = False, timer=None, image=None) -> Iterator[ChunkOutput]:
        """Yield each chunk's latents (and decoded frames) as soon as they exist.

        `observer(layer, q_abs, k_abs, plan, committing)` sees every self-attention call (profiling);
        `noise` replaces the noise drawn from `generator` / `latents` (e.g. to replay another run's draws).
        `timeline=[(seconds, prompt or prompt_embeds), ...]` (the first at 0) switches prompts at chunk
        boundaries, re-caching the history under each new prompt unless `recache=False`; a `story`
        (pfgen.story) does the same and records the switches. `resume` (a `pfgen.state.RunState`) continues a
        saved run for `num_frames` more frames; `commit_last` also commits the last chunk, so that the run can
        be saved and continued (`pfgen.state.save_state`). `timer(region)` returns a context manager entered
        around each chunk's "plan" and each self-attention call's "attention" (benchmarks). `image` (a path or
        PIL image; frame-wise students) is the first frame: resized and centre-cropped to the video, encoded by the
        VAE and committed as frame 0 (pfgen.image); the video starts with its decoded picture. A tensor
        (B, C, 1, h, w) is taken as the already encoded (normalised) latent of that frame."""
        if story is None:
            story = Story(self._entries(prompt, prompt_embeds, timeline, resume is not None), recache=recache)
        elif prompt is not None or prompt_embeds is not None or timeline is not None:
            raise PfgenError("give the prompts either in the story or as prompt / prompt_embeds / timeline")
        if resume is not None:
            height, width = resume.size(height, width)
        height = height or self.config.video.height
        width = width or self.config.video.width
        grid = self.latent_grid(height, width)
        per_chunk = self.config.sampling.frames_per_chunk
        start = resume.position if resume is not None else 0
        total = start + latent_frames_for(num_frames, per_chunk)
        if latents is not None:
            if resume is not None:
                raise PfgenError("latents (initial noise) cannot be given when resuming")
            total = self._check_latents(latents, grid)
        pixels = None
        if image is not None:
            check_image_run(per_chunk, resume is not None, "image")
            pixels = None if isinstance(image, torch.Tensor) else load_image(image, height, width)  # checked early
        story.begin(start, total, per_chunk, self.config.video.fps, self.encode_prompt)
        batch = resume.batch if resume is not None else story.first_embeds().shape[0]
        if pixels is not None:
            with self.offload.use("vae"):
                image = encode_image(self.vae, pixels, batch, self.device, self.dtype)
        elif image is not None:  # an encoded first frame
            self._check_latents(image, grid, "image latent", frames=1)
            image = image.to(self.device, self.dtype)
        if latents is not None and latents.shape[0] != batch:
            raise PfgenError(f"latents have batch {latents.shape[0]}, the prompt embeddings {batch}")
        cache = self.make_cache(policy or self.config.cache.policy, heads, batch, grid, total)
        if resume is not None and generator is None:
            generator = torch.Generator(device=resume.meta["generator"])  # gets the saved state
        noise = noise or NoiseSource((batch, self.transformer.config.in_channels, *grid), self.device,
                                     self.dtype, generator, latents)
        decoder = (TaeStreamingDecoder(self.tae) if self.tae is not None else StreamingDecoder(self.vae)) \
            if decode else None
        if decoder:
            decoder.reset()
        story.noise, story.decoder, story.size = noise, decoder, (height, width)
        if resume is not None:
            resume.restore(self, story, cache)
        loop = ChunkLoop(self.transformer, self.state, self.config.sampling, self.config.cache.recache)
        sampling = self.config.sampling
        passes_total = dit_passes(len(sampling.timesteps), len(sampling.first_chunk_timesteps or ()),
                                  (total - start - (image is not None)) // per_chunk, fresh=start == 0,
                                  image=image is not None, commit_last=commit_last)
        cache.observer, cache.timer = observer, timer
        try:
            # the VAE decodes after every chunk: it rides with the DiT rather than moving 2 x chunks times
            with self.offload.use("transformer"), self.offload.use("vae"):
                run = loop.run(story.embeds, total, noise, on_step, start, story, commit_last, image)
                t0 = start
                for index, x0 in enumerate(run):
                    story.position = t0 + x0.shape[2]
                    frames = decoder.decode(x0) if decoder else None
                    switch = story.switches[-1] if story.switches and story.switches[-1]["latent_frame"] == t0 \
                        else None
                    yield ChunkOutput(index, t0, x0, frames, start, switch, loop.passes, passes_total)
                    t0 += x0.shape[2]
        finally:
            cache.observer = cache.timer = None

    def _entries(self, prompt, prompt_embeds, timeline, resuming: bool):
        """Exactly one of prompt, prompt_embeds and timeline (none when resuming: the saved prompt goes on)."""
        given = [x is not None for x in (prompt, prompt_embeds, timeline)]
        if sum(given) > 1 or (sum(given) == 0 and not resuming):
            raise PfgenError("give exactly one of prompt, prompt_embeds and timeline")
        if timeline is not None:
            entries = from_api(timeline)
        elif prompt_embeds is not None:
            entries = [Entry(0.0, None, prompt_embeds)]
        elif isinstance(prompt, str):
            entries = [Entry(0.0, prompt)]
        elif prompt is not None:  # a list of prompts: one video each
            entries = [Entry(0.0, None, self.encode_prompt(prompt))]
        else:
            return None
        return [e if e.embeds is None else replace(e, embeds=e.embeds.to(self.device, self.dtype)) for e in entries]

    def _check_latents(self, latents, grid, what: str = "latents", frames: int | None = None) -> int:
        channels = self.transformer.config.in_channels
        expected = (None, channels, frames, *grid)
        if latents.ndim != 5 or any(e is not None and e != s for e, s in zip(expected, latents.shape)):
            raise PfgenError(f"{what} have shape {tuple(latents.shape)}, expected (B, C={channels}, "
                             f"{frames or 'F'}, {grid[0]}, {grid[1]})")
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

    def video_metadata(self, story: Story, seed: int | None, policy: str | None = None, resume=None,
                       frames: int | None = None) -> dict:
        """What an mp4 says about how it was made, from the CLI and the API alike: the prompt of its first frame
        (the title), the timeline that ran (every switch: time, frame, prompt, source; `frames`: only the
        first so many video frames, for a video kept up to a saved state), the seed whose generator drew the
        noise (a resumed run's: the saved run's) and the state it continued."""
        from pfgen import __version__

        model = self.config.model
        timeline = [s for s in story.timeline() if frames is None or s["video_frame"] < frames]
        resumed = None if resume is None else {"state": str(resume.path), "latent_frame": resume.position}
        return {"prompt": timeline[0]["prompt"] if timeline else None, "seed": seed, "config": model.name,
                "policy": policy or self.config.cache.policy, "checkpoint": model.checkpoint, "pfgen": __version__,
                "timeline": timeline, "resumed_from": resumed}

    def write_mp4(self, prompt, path, fps: int | None = None, on_chunk=None, metadata: dict | None = None,
                  **kwargs) -> Path:
        """Stream a video into an mp4 (batch 1); the file appears only when complete and verified.

        `metadata` (JSON-able) goes into the mp4: its "prompt" as the title, all of it as the comment; by
        default `video_metadata` of what ran (the story's timeline, the generator's seed)."""
        if path is None:
            raise PfgenError("output_type='mp4' needs output_path")
        resume = kwargs.get("resume")
        story = kwargs.pop("story", None)
        if story is None:
            story = Story(self._entries(prompt, kwargs.pop("prompt_embeds", None), kwargs.pop("timeline", None),
                                        resume is not None), recache=kwargs.pop("recache", True))
        elif prompt is not None:
            raise PfgenError("give the prompts either in the story or as prompt / prompt_embeds / timeline")
        height = kwargs.get("height") or self.config.video.height
        width = kwargs.get("width") or self.config.video.width
        if resume is not None:
            height, width = resume.size(kwargs.get("height"), kwargs.get("width"))
        self.latent_grid(height, width)
        with Mp4Writer(path, width, height, fps or self.config.video.fps) as writer:
            for chunk in self.stream(story=story, **kwargs):
                writer.write(to_uint8_frames(chunk.frames[0]))
                if on_chunk is not None:
                    on_chunk(chunk)
            if metadata is None:
                generator = kwargs.get("generator")
                seed = resume.meta.get("seed") if resume is not None else \
                    generator.initial_seed() if generator is not None else None
                metadata = self.video_metadata(story, seed, kwargs.get("policy"), resume)
            writer.close(mp4_tags(metadata))
        return Path(path)


def plan_for_run(cfg: Config, num_frames: int, *, heads=None, height: int | None = None, width: int | None = None,
                 available: bool = True, image: bool = False, start: int = 0, commit_last: bool = False):
    """The memory plan (`pfgen.memory.MemoryPlan`) of a run, with the config's device, dtype and offload; loads
    no weights. `available=False` plans for a device this machine need not have (a CUDA run on a CPU). `start`:
    a resumed run's first latent frame; `commit_last`: the run saves a state (one more clean pass)."""
    dev = resolve_device(cfg.runtime.device, available)
    return plan_memory(cfg, num_frames, device=dev, dtype=resolve_dtype(cfg.runtime.dtype, dev), heads=heads,
                       height=height, width=width, image=image, start=start, commit_last=commit_last)


def load_pipeline(config: str | Path | Config | None = None, checkpoint: str | None = None,
                  wan_dir: str | None = None, device: str | None = None, dtype: str | None = None,
                  offload: str | None = None, **model_overrides) -> Pipeline:
    """Build a pipeline; with no arguments, the embedded world model (trained; seconds on a CPU).

    `checkpoint` / `wan_dir`: local paths or Hub references (`org/name[:file][@revision]`). `offload`: auto,
    none, text-encoder or model (`pfgen.memory`); auto plans a 60 s video of the config's size."""
    cfg = config if isinstance(config, Config) else load_config(config)
    cfg = with_overrides(cfg, model=dict(checkpoint=checkpoint, wan_dir=wan_dir, **model_overrides),
                         runtime=dict(device=device, dtype=dtype, offload=offload))
    dev = resolve_device(cfg.runtime.device)
    dt = resolve_dtype(cfg.runtime.dtype, dev)
    mode = cfg.runtime.offload
    if mode == "auto":  # on a GPU: the least offload that fits a 60 s video; a CPU has nothing to offload to
        mode = plan_memory(cfg, frames_for_seconds(60, cfg.video.fps), device=dev, dtype=dt).offload \
            if dev.type == "cuda" else "none"
    from pfgen.wan.components import load_components, load_decoder

    transformer, vae, encoder = load_components(cfg.model, dev, dt, mode)
    tae = load_decoder(cfg.model, vae, dev, dt)  # 10 M parameters: stays on the device
    set_threads(cfg.runtime.threads, sum(p.numel() for p in transformer.parameters()))
    pinned = ("text_encoder",) if cfg.model.text_encoder_device else ()
    modules = dict(text_encoder=encoder.encoder, transformer=transformer, vae=vae)
    return Pipeline(transformer, vae, encoder, cfg, dev, dt, Offload(mode, dev, modules, pinned), tae)
