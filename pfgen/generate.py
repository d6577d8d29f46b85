"""One video to one mp4, with timing and peak memory: what `pfgen generate` (and batch mode) runs per prompt."""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pfgen.frames import latent_frames_for, video_frames_for
from pfgen.outputs import PreviousVersion, atomic_output, signals_deferred, write_error, write_safetensors
from pfgen.pipeline import Pipeline
from pfgen.story import Story
from pfgen.timeline import Entry, video_frame
from pfgen.video import Mp4Writer, mp4_tags, to_uint8_frames
from pfgen.words import count, format_bytes, shorten


LATENT_CHANNELS = 16  # the Wan VAE's


@dataclass
class VideoStats:
    path: str
    frames: int
    latent_frames: int
    video_seconds: float
    wall_seconds: float
    first_frame_seconds: float
    fps: float
    peak_memory_bytes: int
    memory_kind: str  # "cuda" (allocated by torch) or "rss" (process, CPU)
    metadata: dict  # how the video was made: prompt, seed, config, policy, pfgen version (also in the mp4)
    switches: list[dict] = field(default_factory=list)  # prompts and when they took over (timeline.switch_record)
    state_bytes: int | None = None  # size of the saved state (--save-state)

    def to_json(self) -> dict:
        """`generate --json`: one object describing the finished video (or frames folder)."""
        path = Path(self.path)
        return {**dataclasses.asdict(self), "bytes": path.stat().st_size if path.is_file() else None}

    def summary(self) -> str:
        text = (f"wrote {self.path}: {self.frames} frames ({self.video_seconds:.1f} s of video) in "
                f"{self.wall_seconds:.1f} s, {self.fps:.1f} fps, peak memory {format_bytes(self.peak_memory_bytes)} "
                f"({self.memory_kind})")
        if len(self.switches) > 1 or any(s["video_frame"] for s in self.switches):
            text += "; prompts from " + ", ".join(f"{s['seconds']:.2f} s (frame {s['video_frame']}) "
                                                  f"{shorten(s['prompt'])}" for s in self.switches)
        return text




def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


def generate_video(pipe: Pipeline, prompt: str | None, output: str | Path | None, *, num_frames: int, seed: int,
                   policy: str | None = None, heads=None, height: int | None = None, width: int | None = None,
                   save_latents: str | Path | None = None, on_chunk=None, story: Story | None = None, resume=None,
                   save_state: str | Path | None = None, save_state_every: int = 0, files=None,
                   image=None) -> VideoStats:
    """Stream one prompt, or a `story` (timeline, interactive prompts), into `output` (mp4, atomic; None when
    only `files`, a `pfgen.sinks.FrameFiles`, takes the frames). `resume` (pfgen.state.RunState) continues a
    saved run (its seed is the saved run's); `save_state` saves this one after its last chunk and every
    `save_state_every` chunks. `image` (path or PIL image) is the first frame (image-to-video).
    `on_chunk(chunk, total_chunks)` reports progress.

    A run that fails or is interrupted after it saved a state keeps its video up to that state (section 1 of
    docs/reliability.md): the mp4 and the frames folder hold exactly the frames before the state, verified,
    and the exception says so (`kept`); otherwise nothing of it is left and the state file holds what it held
    before the run."""
    from pfgen.state import save_state as write_state

    output = Path(output) if output is not None else None
    per_chunk = pipe.config.sampling.frames_per_chunk
    latent = latent_frames_for(num_frames, per_chunk)
    total_chunks = latent // per_chunk
    start = resume.position if resume is not None else 0
    if resume is not None:
        height, width = resume.size(height, width)
        seed = resume.meta.get("seed")  # the saved generator goes on: the seed that drew this noise
    height, width = height or pipe.config.video.height, width or pipe.config.video.width
    story = story or Story([Entry(0.0, prompt)] if prompt is not None else None)
    generator = torch.Generator(device=pipe.device).manual_seed(seed or 0) if resume is None else None
    latent_chunks = []
    reset_peak_memory(pipe.device)
    start_time = time.perf_counter()
    first_frame = [0.0]
    state_bytes = [None]
    saved = [None]  # video frames of this run behind the last saved state
    metadata = lambda frames=None: pipe.video_metadata(story, seed, policy, resume, frames)  # noqa: E731
    writer = previous = None
    try:
        previous = PreviousVersion(save_state) if save_state is not None else None
        if output is not None:
            writer = Mp4Writer(output, width, height, pipe.config.video.fps, cuttable=save_state is not None)

        def chunk_done(chunk):
            if chunk.index == 0:
                first_frame[0] = time.perf_counter() - start_time
            if save_latents is not None:
                latent_chunks.append(chunk.latents.cpu())
            frames = to_uint8_frames(chunk.frames[0])
            if writer is not None:
                writer.write(frames)
            if files is not None:
                files.write(frames)
            done = chunk.index + 1
            if save_state is not None and (done == total_chunks or (save_state_every and done % save_state_every == 0)):
                with signals_deferred():  # the state and the frames it continues are recorded together
                    state_bytes[0] = write_state(save_state, pipe, story, pipe.state.cache, seed)
                    saved[0] = video_frame(story.position, start)
            if on_chunk is not None:
                on_chunk(chunk, total_chunks)

        for chunk in pipe.stream(num_frames=video_frames_for(latent), generator=generator, policy=policy,
                                 heads=heads, height=height, width=width, story=story, resume=resume,
                                 commit_last=save_state is not None, image=image):
            chunk_done(chunk)
        latents_file = None
        if save_latents is not None:
            latents_file = atomic_output(save_latents)
            try:
                _save_latents(torch.cat(latent_chunks, dim=2), latents_file.tmp, story.timeline()[0]["prompt"], seed)
            except OSError as exc:
                latents_file.discard()
                raise write_error(Path(save_latents), exc) from None
        try:
            if writer is not None:
                writer.close(mp4_tags(metadata()))
            if files is not None:
                files.close()
        except BaseException:
            if latents_file is not None:
                latents_file.discard()
            raise
        if latents_file is not None:
            latents_file.commit()
    except BaseException as exc:
        exc.kept = _keep_checkpoint(writer, files, saved[0], metadata, save_state, previous)
        raise
    if previous is not None:
        previous.drop()
    wall = time.perf_counter() - start_time
    frames = video_frame(start + latent, start)
    peak, kind = peak_memory(pipe.device)
    return VideoStats(str(output if output is not None else files.frames_dir), frames, latent,
                      frames / pipe.config.video.fps, wall, first_frame[0], frames / wall, peak, kind, metadata(),
                      story.timeline(), state_bytes[0])


def _keep_checkpoint(writer, files, frames: int | None, metadata, save_state, previous) -> str | None:
    """After a failure or an interrupt: keep the video up to the last saved state (every video output, verified:
    the mp4, the frames folder) and that state; else remove every output and put back what the state file held
    before the run. The preview goes either way. Returns what was kept, for the error line (None: nothing)."""
    videos = []
    if frames is not None:
        if writer is not None:
            videos.append(writer.finished if writer.done else writer.keep(frames, mp4_tags(metadata(frames))))
        if files is not None and files.frames_dir is not None:
            videos.append(files.frames_dir if files.keep(frames) else None)
    if videos and None not in videos:
        if files is not None and files.frames_dir is None:
            files.discard()
        if previous is not None:
            previous.drop()
        where = " and ".join(str(path) for path in videos)
        return f"kept {where} with the first {count(frames, 'frame')}, up to the state saved in {save_state}"
    if writer is not None:
        if not writer.done:
            writer.abort()
        if writer.finished is not None:  # one run, one outcome
            writer.finished.unlink(missing_ok=True)
    if files is not None:
        files.discard()
    if previous is not None:
        previous.restore() if frames is not None else previous.drop()
    return None


def latents_bytes(latent_frames: int, grid: tuple[int, int]) -> int:
    """Upper bound of the `--save-latents` file: 16 channels x latent frames x latent pixels (`grid`) in
    float32, plus the safetensors header."""
    return LATENT_CHANNELS * latent_frames * grid[0] * grid[1] * 4 + 4096


def _save_latents(latents: torch.Tensor, tmp: Path, prompt: str | None, seed: int | None) -> None:
    write_safetensors({"latents": latents.contiguous()}, tmp, {"prompt": str(prompt), "seed": str(seed)})
