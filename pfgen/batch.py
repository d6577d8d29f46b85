"""Batch mode of `pfgen generate`: a prompt suite -> one mp4 per prompt (and policy) + `out/manifest.jsonl`.

Resumable: a video is complete when its manifest entry and its file both exist; mp4s appear only when whole
(temp + rename), so a rerun redoes exactly the missing ones. Under `torchrun` each rank loads the model once,
takes every world-th unfinished video and appends what it finishes to its own `out/.manifest.rank{r}.jsonl`
(flush + fsync); rank 0 plans the work and merges the parts into `out/manifest.jsonl` (temp + rename), so no
two processes ever write the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pfgen import __version__
from pfgen.config import Config, to_dict, with_overrides
from pfgen.errors import PfgenError

MANIFEST = "manifest.jsonl"
PART_GLOB = ".manifest.rank*.jsonl"
JSONL_KEYS = ("prompt", "seed", "seconds", "name")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# What makes two videos the same video: an entry that differs in one of these is not silently reused.
REQUEST_KEYS = ("prompt", "seed", "policy", "frames", "height", "width", "heads_sha256", "config")
WAIT = timedelta(hours=24)  # ranks wait at the last barrier for the slowest one's last video


@dataclass(frozen=True)
class BatchItem:
    index: int  # position among the prompts (blank and comment lines not counted)
    prompt: str
    seed: int
    num_frames: int
    name: str


@dataclass(frozen=True)
class Job:
    """One video: a prompt under a policy, and the manifest fields that identify it."""
    item: BatchItem
    policy: str
    file: str  # relative to the output folder
    request: dict


@dataclass(frozen=True)
class BatchRequest:
    prompts: Path
    output_dir: Path
    policies: tuple[str, ...] | None  # None: the config's policy, videos directly in output_dir
    seed: int
    num_frames: int
    heads: Path | None = None
    height: int | None = None
    width: int | None = None


def check_options(prompt, prompts, output, output_dir, policies, policy, save_latents) -> bool:
    """True for batch mode; conflicting single-video and batch options are a one-line error."""
    if prompts is None:
        for name, value in (("--output-dir", output_dir), ("--policies", policies)):
            if value is not None:
                raise PfgenError(f"{name} needs --prompts FILE", "or use --prompt and --output for one video")
        return False
    for name, value, hint in (("--prompt", prompt, "put it in the prompts file"),
                              ("--output", output, "batch mode writes into --output-dir"),
                              ("--save-latents", save_latents, "it is for single videos")):
        if value is not None:
            raise PfgenError(f"{name} cannot be combined with --prompts", hint)
    if policy is not None and policies is not None:
        raise PfgenError("give --policy or --policies, not both")
    if output_dir is None:
        raise PfgenError("--prompts needs --output-dir", "the folder for the videos and manifest.jsonl")
    return True


def parse_policies(text: str | None) -> tuple[str, ...] | None:
    from pfgen.pipeline import POLICIES

    if text is None:
        return None
    names = tuple(p.strip() for p in text.split(","))
    for name in names:
        if name not in POLICIES:
            raise PfgenError(f"unknown policy '{name}' in --policies", f"choose from {', '.join(POLICIES)}")
    if len(set(names)) != len(names):
        raise PfgenError(f"--policies {text} names a policy twice")
    return names


def read_prompts(path: Path, base_seed: int, num_frames: int, fps: int) -> list[BatchItem]:
    """Plain text (one prompt per line; blank lines and # comments skipped) or JSONL (one object per line)."""
    from pfgen.generate import frames_for_seconds

    if not path.is_file():
        raise PfgenError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PfgenError(f"prompts file {path} is not UTF-8 text") from None
    first = next((s.strip() for s in lines if s.strip()), "")
    jsonl = path.suffix.lower() == ".jsonl" or first.startswith("{")
    items, names = [], {}
    for number, text in enumerate(lines, 1):
        text = text.strip()
        if not text or (not jsonl and text.startswith("#")):
            continue
        where = f"{path}, line {number}"
        fields = _jsonl_fields(text, where) if jsonl else {"prompt": text}
        index = len(items)
        seconds = fields.get("seconds")
        frames = num_frames if seconds is None else frames_for_seconds(seconds, fps)
        name = fields.get("name") or _default_name(index, fields["prompt"])
        if name.lower() in names:
            raise PfgenError(f"{where}: name '{name}' is already used on line {names[name.lower()]}",
                             "names must be unique (they are the file names)")
        names[name.lower()] = number
        items.append(BatchItem(index, fields["prompt"], fields.get("seed", base_seed + index), frames, name))
    if not items:
        raise PfgenError(f"prompts file {path} holds no prompts", "write one prompt per line")
    return items


def _jsonl_fields(text: str, where: str) -> dict:
    """One JSONL line, checked field by field (unknown keys are errors: a typo must not be ignored)."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PfgenError(f"{where}: not valid JSON ({exc.msg})", "write one JSON object per line") from None
    if not isinstance(fields, dict):
        raise PfgenError(f"{where}: expected a JSON object with a \"prompt\"")
    unknown = sorted(set(fields) - set(JSONL_KEYS))
    if unknown:
        raise PfgenError(f"{where}: unknown key '{unknown[0]}'", f"known keys: {', '.join(JSONL_KEYS)}")
    prompt, seed, seconds, name = (fields.get(k) for k in JSONL_KEYS)
    if not isinstance(prompt, str) or not prompt.strip():
        raise PfgenError(f"{where}: \"prompt\" must be a non-empty string")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2 ** 63):
        raise PfgenError(f"{where}: \"seed\" must be a non-negative integer, got {seed!r}")
    if seconds is not None and (type(seconds) not in (int, float) or not 0 < seconds < float("inf")):
        raise PfgenError(f"{where}: \"seconds\" must be a positive number, got {seconds!r}")
    if name is not None and (not isinstance(name, str) or not NAME.fullmatch(name)):
        raise PfgenError(f"{where}: \"name\" {name!r} is not a safe file name",
                         "use letters, digits, '.', '_' and '-', starting with a letter or digit")
    return {**{k: v for k, v in fields.items() if v is not None}, "prompt": prompt.strip()}


def _default_name(index: int, prompt: str) -> str:
    """`0007-a-red-kite-over-the-sea`: stable across reruns, sorted like the file, safe on every filesystem."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")[:48].strip("-")
    return f"{index:04d}-{slug}" if slug else f"{index:04d}"


def plan_jobs(cfg: Config, req: BatchRequest, items: list[BatchItem]) -> list[Job]:
    """Every (policy, prompt) video, policy-major so that a rank reuses one cache allocation per policy."""
    from pfgen.pipeline import latent_frames_for, video_frames_for

    policies = req.policies or (cfg.cache.policy,)
    jobs = []
    for policy in policies:
        heads = _head_file(cfg, policy, req.heads)
        sha = hashlib.sha256(heads.read_bytes()).hexdigest() if heads is not None else None
        config = json.loads(json.dumps(to_dict(with_overrides(cfg, cache=dict(policy=policy)))))
        for item in items:
            file = f"{policy}/{item.name}.mp4" if req.policies else f"{item.name}.mp4"
            frames = video_frames_for(latent_frames_for(item.num_frames, cfg.sampling.frames_per_chunk))
            request = dict(name=item.name, file=file, index=item.index, prompt=item.prompt, seed=item.seed,
                           policy=policy, frames=frames, height=req.height or cfg.video.height,
                           width=req.width or cfg.video.width, heads=str(heads) if heads else None,
                           heads_sha256=sha, config=config)
            jobs.append(Job(item, policy, file, request))
    return jobs


def _head_file(cfg: Config, policy: str, heads: Path | None) -> Path | None:
    """The head-type JSON a pyramid video reads (as `Pipeline.head_types` resolves it), checked early."""
    from pfgen.heads import HeadTypes

    if policy != "pyramid" or (heads is None and cfg.cache.all is not None):
        return None
    source = heads if heads is not None else cfg.cache.heads
    if source is None:
        return None  # the pipeline names the missing head file before any video is written
    HeadTypes.load(source)
    return Path(source)


def read_entries(path: Path, strict: bool) -> list[dict]:
    """Manifest lines; a part torn by a killed rank (strict=False) loses only its unreadable lines."""
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            entry = False
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            entries.append(entry)
        elif entry is not None and strict:
            raise PfgenError(f"{path}, line {number}: not a manifest entry", "fix or delete that line")
    return entries


def merge_manifest(out_dir: Path) -> dict[str, dict]:
    """Fold the rank parts into manifest.jsonl and delete them; entries whose video is gone are dropped.

    Run by rank 0 only, before (leftovers of a killed run) and after generating."""
    manifest = out_dir / MANIFEST
    old = read_entries(manifest, strict=True)
    parts = sorted(out_dir.glob(PART_GLOB))
    entries: dict[str, dict] = {}
    for entry in old + [e for part in parts for e in read_entries(part, strict=False)]:
        previous = entries.get(entry["file"])
        if previous is None or str(entry.get("finished_at")) >= str(previous.get("finished_at")):
            entries[entry["file"]] = entry
    entries = {f: e for f, e in sorted(entries.items()) if (out_dir / f).is_file()}
    if parts or len(entries) != len(old):
        tmp = out_dir / f".{MANIFEST}.tmp"
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries.values()), encoding="utf-8")
        os.replace(tmp, manifest)
    for part in parts:
        part.unlink()
    return entries


def pending(jobs: list[Job], entries: dict[str, dict], out_dir: Path) -> list[Job]:
    """Jobs without a finished video; a finished one made from a different request is an error, not a skip."""
    todo = []
    for job in jobs:
        entry = entries.get(job.file)
        if entry is None:
            todo.append(job)
            continue
        changed = [k for k in REQUEST_KEYS if entry.get(k) != job.request[k]]
        if changed:
            raise PfgenError(f"{out_dir / job.file} exists but was made with other settings: {', '.join(changed)}",
                             "use another --output-dir, or delete that video to redo it")
    return todo


def prepare(cfg: Config, req: BatchRequest) -> tuple[list[Job], int]:
    """Rank 0's plan: check the inputs, create the folders, recover a killed run; -> (jobs to do, total)."""
    items = read_prompts(req.prompts, req.seed, req.num_frames, cfg.video.fps)
    jobs = plan_jobs(cfg, req, items)
    out_dir = req.output_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise PfgenError(f"--output-dir {out_dir} is a file", "give a folder")
    if not out_dir.parent.is_dir():
        raise PfgenError(f"folder {out_dir.parent} does not exist", "create it first or choose another --output-dir")
    folders = {out_dir / Path(job.file).parent for job in jobs}
    for folder in sorted(folders):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.partial.mp4"):  # left by a killed process
            stale.unlink()
    return pending(jobs, merge_manifest(out_dir), out_dir), len(jobs)


class Ranks:
    """This process's place in a `torchrun` launch (rank 0 of 1 without one)."""

    def __init__(self, rank: int = 0, world: int = 1, local_cuda: int | None = None):
        self.rank, self.world, self.local_cuda = rank, world, local_cuda

    def place(self, cfg: Config) -> Config:
        """One GPU per rank: cuda:LOCAL_RANK unless the user pinned a device."""
        if self.local_cuda is None or cfg.runtime.device not in ("auto", "cuda"):
            return cfg
        return with_overrides(cfg, runtime=dict(device=f"cuda:{self.local_cuda}"))

    def share(self, make):
        """Run `make` on rank 0 and hand its result to every rank; its PfgenError stops all of them."""
        if self.world == 1:
            return make()
        import torch.distributed as dist

        box = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", make())
            except PfgenError as exc:
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "ok":
            return value
        if self.rank == 0:
            raise value
        # Rank 0 alone prints the error and fails the launch: were this rank to fail too, torchrun could stop
        # rank 0 before its message is out.
        raise SystemExit(0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


@contextmanager
def distributed():
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1): nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Ranks()
        return
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda and local >= torch.cuda.device_count():
        raise PfgenError(f"local rank {local} has no GPU of its own ({torch.cuda.device_count()} visible)",
                         "use --nproc_per_node at most the number of GPUs")
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT,
                            device_id=torch.device("cuda", local) if cuda else None)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), local if cuda else None)
    finally:
        dist.destroy_process_group()


@contextmanager
def _terminate_as_interrupt():
    """torchrun stops workers with SIGTERM: make it an interrupt, so the mp4 writer deletes its partial file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_batch(cfg: Config, req: BatchRequest, console) -> None:
    """Plan on rank 0, generate this rank's share of the unfinished videos, merge the manifest on rank 0."""
    with _terminate_as_interrupt(), distributed() as ranks:
        todo, total = ranks.share(lambda: prepare(cfg, req))
        mine = todo[ranks.rank::ranks.world]
        if ranks.rank == 0:
            where = f" on {ranks.world} ranks" if ranks.world > 1 else ""
            console.print(f"{total} videos: {total - len(todo)} already complete, {len(todo)} to generate{where}",
                          highlight=False, soft_wrap=True)
        if mine:
            _generate_jobs(ranks.place(cfg), req, mine, ranks, console)
        ranks.barrier()
        if ranks.rank == 0:
            entries = merge_manifest(req.output_dir)
            console.print(f"wrote {req.output_dir / MANIFEST}: {len(entries)} videos", highlight=False,
                          soft_wrap=True)


def _generate_jobs(cfg: Config, req: BatchRequest, jobs: list[Job], ranks: Ranks, console) -> None:
    """Load the model once, then stream every job; each finished video is appended to this rank's part."""
    from pfgen.generate import generate_video
    from pfgen.pipeline import load_pipeline

    pipe = load_pipeline(cfg)
    for policy in dict.fromkeys(job.policy for job in jobs):
        pipe.head_types(policy, req.heads)  # a wrong head file fails before any output exists
    if cfg.model.checkpoint is None and ranks.rank == 0:
        console.print("[yellow]note:[/] embedded tiny model with random weights: the videos are noise-like")
    part = req.output_dir / f".manifest.rank{ranks.rank}.jsonl"
    prefix = f"rank {ranks.rank} " if ranks.world > 1 else ""
    with _chunk_bar(console, live=ranks.world == 1) as on_chunk:
        for n, job in enumerate(jobs, 1):
            stats = generate_video(pipe, job.item.prompt, req.output_dir / job.file, num_frames=job.item.num_frames,
                                   seed=job.item.seed, policy=job.policy, heads=req.heads, height=req.height,
                                   width=req.width, on_chunk=on_chunk(f"{prefix}{n}/{len(jobs)} {job.file}"))
            _append(part, _entry(job, stats, pipe.device, ranks))
            console.print(f"{prefix}[{n}/{len(jobs)}] {stats.summary()}", highlight=False, markup=False,
                          soft_wrap=True)


def _entry(job: Job, stats, device, ranks: Ranks) -> dict:
    """The request, then how it went: timing, peak memory, where it ran."""
    return {**job.request, "latent_frames": stats.latent_frames, "video_seconds": stats.video_seconds,
            "wall_seconds": stats.wall_seconds, "first_frame_seconds": stats.first_frame_seconds,
            "generation_fps": stats.fps, "peak_memory_bytes": stats.peak_memory_bytes,
            "memory_kind": stats.memory_kind, "device": str(device), "rank": ranks.rank, "world_size": ranks.world,
            "pfgen_version": __version__, "finished_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}


def _append(path: Path, entry: dict) -> None:
    """One line per finished video, on disk before the next video starts (a kill loses at most a torn line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
