"""The manifest of batch mode: what is finished, merging the ranks' parts, deciding what is left to do.

A video is complete when its manifest entry and its file both exist. Each rank appends to its own
`out/.manifest.rank{r}.jsonl` (flush + fsync); rank 0 merges the parts into `out/manifest.jsonl` (temp + rename),
so no two processes ever write the same file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pfgen.batch.suite import BatchRequest, Job, plan_jobs, read_prompts
from pfgen.config import Config
from pfgen.errors import PfgenError
from pfgen.outputs import atomic_write_text, check_folder_writable, output_lock, remove_stale_partials

MANIFEST = "manifest.jsonl"
PART_GLOB = ".manifest.rank*.jsonl"
# What makes two videos the same video: an entry that differs in one of these is not silently reused.
REQUEST_KEYS = ("prompt", "timeline", "recache", "seed", "policy", "frames", "height", "width", "heads_sha256",
                "config", "image_sha256")


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
        atomic_write_text(manifest, "".join(json.dumps(e) + "\n" for e in entries.values()))
    for part in parts:
        part.unlink()
    return entries


def pending(jobs: list[Job], entries: dict[str, dict], out_dir: Path, on_redo=None) -> list[Job]:
    """Jobs without a finished, intact video; a finished one made from a different request is an error.

    What the manifest calls finished is checked again: the file's size, and its decoded frame count. A
    missing or damaged video is redone (`on_redo(file, reason)` is told why)."""
    from pfgen.video import decoded_frames

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
        path = out_dir / job.file
        try:
            size = path.stat().st_size
            damage = (f"its size is {size} bytes, the manifest says {entry['bytes']}"
                      if size != entry.get("bytes", size) else None)
            if damage is None and (found := decoded_frames(path)) != entry["frames"]:
                damage = f"it holds {found} frames, the manifest says {entry['frames']}"
        except (OSError, PfgenError) as exc:
            damage = str(exc)
        if damage is not None:
            if on_redo is not None:
                on_redo(job.file, damage)
            todo.append(job)
    return todo


def prepare(cfg: Config, req: BatchRequest, hold, on_redo=None) -> tuple[list[Job], int]:
    """Rank 0's plan, under the output folder's lock: check the inputs, create the folders, recover a killed
    run; -> (jobs to do, total). `hold(lock)` acquires the lock for the rest of the run (an ExitStack's
    enter_context)."""
    items = read_prompts(req.prompts, req.seed, req.num_frames, cfg.video.fps)
    jobs = plan_jobs(cfg, req, items)
    out_dir = req.output_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise PfgenError(f"--output-dir {out_dir} is a file", "give a folder")
    if not out_dir.parent.is_dir():
        raise PfgenError(f"folder {out_dir.parent} does not exist", "create it first or choose another --output-dir")
    out_dir.mkdir(exist_ok=True)
    check_folder_writable(out_dir)
    hold(output_lock(out_dir))  # a second run on this folder is refused, naming this one's pid
    folders = {out_dir / Path(job.file).parent for job in jobs}
    for folder in sorted(folders):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(folder)  # left by a killed process; a live one's are kept
    return pending(jobs, merge_manifest(out_dir), out_dir, on_redo), len(jobs)


def append_entry(path: Path, entry: dict) -> None:
    """One line per finished video, on disk before the next video starts (a kill loses at most a torn line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
