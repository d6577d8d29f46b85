"""Batch mode of `pfgen generate`: a prompt suite -> one mp4 per prompt (and policy) + `out/manifest.jsonl`.

Resumable: a video is complete when its manifest entry and its file both exist; mp4s appear only when whole
(temp + rename), so a rerun redoes exactly the missing ones. Under `torchrun` each rank loads the model once,
takes every world-th unfinished video and appends what it finishes to its own `out/.manifest.rank{r}.jsonl`
(flush + fsync); rank 0 plans the work and merges the parts into `out/manifest.jsonl` (temp + rename), so no
two processes ever write the same file.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone

from pfgen import __version__
from pfgen.batch.manifest import MANIFEST, REQUEST_KEYS, append_entry, merge_manifest, prepare
from pfgen.batch.ranks import Ranks, distributed
from pfgen.batch.suite import BatchRequest, Job, check_options, parse_policies, plan_jobs, read_prompts
from pfgen.config import Config
from pfgen.words import count

__all__ = ["BatchRequest", "MANIFEST", "REQUEST_KEYS", "check_options", "parse_policies", "plan_jobs", "prepare",
           "read_prompts", "run_batch"]


def run_batch(cfg: Config, req: BatchRequest, console, verbose: bool = False) -> None:
    """Plan on rank 0, generate this rank's share of the unfinished videos, merge the manifest on rank 0."""
    def redo(file, reason):
        console.print(f"redoing {file}: {reason}", highlight=False, markup=False, soft_wrap=True)

    with distributed() as ranks, ExitStack() as held:
        todo, total = ranks.share(lambda: prepare(cfg, req, held.enter_context, redo))
        mine = todo[ranks.rank::ranks.world]
        if ranks.rank == 0:
            where = f" on {ranks.world} ranks" if ranks.world > 1 else ""
            console.print(f"{count(total, 'video')}: {total - len(todo)} already complete, {len(todo)} to "
                          f"generate{where}",
                          highlight=False, soft_wrap=True)
        if mine:
            _generate_jobs(ranks.place(cfg), req, mine, ranks, console, verbose)
        ranks.barrier()
        if ranks.rank == 0:
            entries = merge_manifest(req.output_dir)
            console.print(f"wrote {req.output_dir / MANIFEST}: {count(len(entries), 'video')}", highlight=False,
                          soft_wrap=True)


def _generate_jobs(cfg: Config, req: BatchRequest, jobs: list[Job], ranks: Ranks, console, verbose: bool) -> None:
    """Load the model once, then stream every job; each finished video is appended to this rank's part."""
    from pfgen.generate import generate_video
    from pfgen.pipeline import load_pipeline
    from pfgen.ui import library_output

    with library_output(verbose):
        pipe = load_pipeline(cfg)
    for job in {job.policy: job for job in jobs}.values():
        pipe.head_types(job.policy, job.heads)  # head types that do not fit the model fail before any output
    from pfgen.wan.tiny import noise_note

    if (note := noise_note(cfg.model)) and ranks.rank == 0:
        console.print(note, soft_wrap=True)
    part = req.output_dir / f".manifest.rank{ranks.rank}.jsonl"
    prefix = f"rank {ranks.rank} " if ranks.world > 1 else ""
    with _chunk_bar(console, live=ranks.world == 1) as on_chunk:
        for n, job in enumerate(jobs, 1):
            stats = generate_video(pipe, job.item.prompt, req.output_dir / job.file, num_frames=job.item.num_frames,
                                   seed=job.item.seed, policy=job.policy, heads=job.heads, height=req.height,
                                   width=req.width, on_chunk=on_chunk(f"{prefix}{n}/{len(jobs)} {job.file}"),
                                   story=_story(job.item, req.recache), image=job.item.image)
            append_entry(part, _entry(job, stats, pipe.device, ranks))
            console.print(f"{prefix}[{n}/{len(jobs)}] {stats.summary()}", highlight=False, markup=False,
                          soft_wrap=True)


def _story(item, recache: bool):
    """A JSONL row's timeline as a story (None: a plain prompt); `recache`: False under --no-recache."""
    if not item.timeline:
        return None
    from pfgen.story import Story
    from pfgen.timeline import Entry

    return Story([Entry(at, prompt) for at, prompt in item.timeline], recache=recache)


def _entry(job: Job, stats, device, ranks: Ranks) -> dict:
    """The request, then how it went: timing, peak memory, where it ran."""
    return {**job.request, "bytes": os.path.getsize(stats.path), "latent_frames": stats.latent_frames,
            "video_seconds": stats.video_seconds, "wall_seconds": stats.wall_seconds,
            "first_frame_seconds": stats.first_frame_seconds, "generation_fps": stats.fps,
            "peak_memory_bytes": stats.peak_memory_bytes, "memory_kind": stats.memory_kind, "switches": stats.switches,
            "device": str(device), "rank": ranks.rank, "world_size": ranks.world, "pfgen_version": __version__,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}


@contextmanager
def _chunk_bar(console, live: bool):
    """A transient chunk bar under the finished-video lines; off under torchrun, where ranks share a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not (live and console.is_terminal)) as progress:
        task = progress.add_task("", total=None)

        def for_video(label: str):
            progress.reset(task, description=label, total=None)
            return lambda chunk, total_chunks: progress.update(task, completed=chunk.index + 1, total=total_chunks)

        yield for_video
