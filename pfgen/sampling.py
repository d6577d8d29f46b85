"""The few-step chunk loop: per chunk, the denoising passes over the cache, then one clean pass that commits.

Flow matching: the model predicts v; x0 = x_t - sigma * v (float64, as the reference does); the next step
re-noises x0 at the next sigma (float32, as the reference does): with fresh noise (`solver: renoise`, the
distilled students' sampler), or with the noise the model implies, x_t - (1 - sigma) x0 over sigma = x0 + v
(`solver: ode`, an Euler step of the flow: x_next = x_t - (sigma - next) v; for models trained by plain flow
matching, whose x0 is the mean of what the noise allows, so fresh noise would average every sample away). The
last x0 is the chunk's output; the clean pass at `context_timestep` then writes the chunk's own K/V into the
cache for the chunks after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class Schedule:
    timesteps: tuple[float, ...]  # what the model is conditioned on
    sigmas: tuple[float, ...]  # noise level of each step, timestep / 1000


def flow_table(shift: float, size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The shifted flow-matching table of the reference scheduler (float32, as it computes it).

    sigma = shift * s / (1 + (shift - 1) * s) for s = linspace(1, 0, size + 1)[:-1]; timestep = 1000 * sigma.
    """
    s = torch.linspace(1.0, 0.0, size + 1, dtype=torch.float32)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas * 1000, sigmas


def make_schedule(timesteps, shift: float, warp: bool) -> Schedule:
    """Model timesteps and sigmas for a step list.

    warp (Self Forcing's `warp_denoising_step`): entry t of a nominal 1000-step list picks row 1000 - t of the
    table (1000 -> 1000, 750 -> 937.5, 500 -> 833.33, 250 -> 625). Sigmas are looked up by nearest timestep
    in the table, as the reference does, never recomputed from the formula.
    """
    table_t, table_sigma = flow_table(shift)
    if warp:
        extended = torch.cat([table_t, torch.zeros(1)])
        values = [float(extended[len(table_t) - int(round(t))]) for t in timesteps]
    else:
        values = [float(t) for t in timesteps]
    sigmas = [float(table_sigma[(table_t - t).abs().argmin()]) for t in values]
    return Schedule(tuple(values), tuple(sigmas))


class NoiseSource:
    """Initial noise per chunk and fresh re-noise draws, from given latents or a seeded generator.

    Noise is drawn chunk by chunk, so a 10-minute video never holds more than one chunk of it.
    """

    def __init__(self, latent_shape, device, dtype, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None):
        self.shape = latent_shape  # (B, C, h, w): one frame without the frame axis
        self.device, self.dtype = device, dtype
        self.generator = generator
        self.latents = latents

    def _randn(self, frames: int) -> torch.Tensor:
        b, c, h, w = self.shape
        x = torch.randn((b, c, frames, h, w), generator=self.generator, device=self.generator.device
                        if self.generator is not None else "cpu", dtype=torch.float32)
        return x.to(self.device, self.dtype)

    def initial(self, t0: int, frames: int) -> torch.Tensor:
        if self.latents is not None:
            return self.latents[:, :, t0:t0 + frames].to(self.device, self.dtype)
        return self._randn(frames)

    def renoise(self, frames: int) -> torch.Tensor:
        return self._randn(frames)


class ChunkLoop:
    """Drives a causal transformer (processors installed) and its KV cache over a video."""

    def __init__(self, transformer, state, sampling_cfg, recache: str = "all"):
        """`recache` (config cache.recache): what `replay` re-encodes at a prompt switch."""
        self.transformer = transformer
        self.recache = recache
        self.state = state
        self.cfg = sampling_cfg
        self.schedule = make_schedule(sampling_cfg.timesteps, sampling_cfg.shift, sampling_cfg.warp)
        first = sampling_cfg.first_chunk_timesteps
        self.first_schedule = make_schedule(first, sampling_cfg.shift, sampling_cfg.warp) if first else self.schedule
        self.context_t = sampling_cfg.context_timestep

    def _forward(self, x: torch.Tensor, t: float, embeds: torch.Tensor) -> torch.Tensor:
        timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                                return_dict=False)[0]

    def denoise(self, x: torch.Tensor, schedule: Schedule, embeds, noise: NoiseSource,
                on_step: Callable | None = None) -> torch.Tensor:
        """The noisy passes of one chunk: returns x0 of the last step."""
        for i, (t, sigma) in enumerate(zip(schedule.timesteps, schedule.sigmas)):
            v = self._forward(x, t, embeds)
            x0 = (x.double() - sigma * v.double()).to(x.dtype)
            if on_step is not None:
                on_step(i, x0)
            if i + 1 < len(schedule.sigmas):
                nxt = schedule.sigmas[i + 1]
                eps = noise.renoise(x.shape[2]) if self.cfg.solver == "renoise" else x0.float() + v.float()
                x = ((1.0 - nxt) * x0.float() + nxt * eps.float()).to(x.dtype)
        return x0

    @torch.no_grad()
    def replay(self, chunks, embeds: torch.Tensor) -> int:
        """Re-cache under `embeds` from the committed chunks [(t0, x0), ...] the cache still holds.

        all: reset the cache, then the clean pass over every chunk in order, each planned like a chunk of a fresh
        run (so it reads what the replayed chunks before it wrote). window (LongLive): one clean pass over the
        window's frames, each reading all of them and the sink, whose K/V stay from the old prompt once the
        window has left it (`KVCache.window_recache`)."""
        cache = self.state.cache
        self.state.new_prompt()
        if self.recache == "window":
            end = chunks[-1][0] + chunks[-1][1].shape[2]
            restart, first = cache.window_recache(end)
            parts = [x0[:, :, max(0, first - t0):] for t0, x0 in chunks if t0 + x0.shape[2] > first]
            chunks = [(first, torch.cat(parts, dim=2))]
            if chunks[0][1].shape[2] != end - first:  # the story keeps every chunk of a held frame
                raise RuntimeError(f"re-cache needs frames {first}..{end - 1}, the kept chunks do not hold them")
        else:
            restart = True
        if restart:
            cache.reset()
        for t0, x0 in chunks:
            cache.begin_chunk(t0, x0.shape[2])
            self.transformer.rope.frame_offset = t0
            cache.set_pass(commit=True)
            self._forward(x0, self.context_t, embeds)
        return len(chunks)  # clean passes spent

    @torch.no_grad()
    def run(self, embeds: torch.Tensor, num_frames: int, noise: NoiseSource, on_step: Callable | None = None,
            start: int = 0, story=None, commit_last: bool = False,
            image: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield the clean latents of each chunk, (B, C, F, h, w), as soon as they exist.

        `start` > 0 continues a restored cache (resume). `story` (pfgen.story) may switch the prompt before a
        chunk and keeps what re-cache needs after its clean pass; `commit_last` commits the last chunk too
        (so that a saved state can be continued). `image` (B, C, 1, h, w), the latent of a first frame
        (image-to-video, frame-wise students): committed at t = 0 as frame 0 and yielded as the first chunk;
        generation goes on from frame 1, whose chunk takes the first-chunk steps. `self.passes` counts the DiT
        passes (denoising steps and commits; re-cache replays are counted by the story)."""
        cache, rope = self.state.cache, self.transformer.rope
        per_chunk = self.cfg.frames_per_chunk
        if start == 0:
            cache.reset()
        self.state.new_prompt()
        self.passes = 0
        first_t0 = 0 if start == 0 else None  # the video's first generated chunk (none when resumed)
        if image is not None:
            if story is not None:
                embeds = story.before_chunk(self, 0, embeds)
            self._commit(0, image, 0.0, embeds, story)  # t = 0, as the reference commits it
            yield image
            start = first_t0 = image.shape[2]
        for t0 in range(start, num_frames, per_chunk):
            if story is not None:
                embeds = story.before_chunk(self, t0, embeds)
            frames = min(per_chunk, num_frames - t0)
            cache.begin_chunk(t0, frames)
            rope.frame_offset = t0
            cache.set_pass(commit=False)
            x = noise.initial(t0, frames)
            k = t0 // per_chunk
            step = (lambda i, x0, k=k: on_step(k, i, x0)) if on_step else None
            schedule = self.first_schedule if t0 == first_t0 else self.schedule
            x0 = self.denoise(x, schedule, embeds, noise, step)
            self.passes += len(schedule.timesteps)
            if t0 + frames < num_frames or commit_last:
                self._commit(t0, x0, self.context_t, embeds, story, planned=False)
            yield x0
        if story is not None:
            story.finish()

    def _commit(self, t0: int, x0: torch.Tensor, t: float, embeds, story, planned: bool = True) -> None:
        """The clean pass at timestep `t` that writes a chunk's K/V (`planned`: begin its chunk first)."""
        if planned:
            self.state.cache.begin_chunk(t0, x0.shape[2])
            self.transformer.rope.frame_offset = t0
        self.state.cache.set_pass(commit=True)
        self._forward(x0, t, embeds)
        self.passes += 1
        if story is not None:
            story.committed(t0, x0, self.state.cache)
