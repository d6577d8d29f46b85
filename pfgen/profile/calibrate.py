"""Calibration runs for `pfgen profile-heads`: rolling baseline per prompt, statistics saved per prompt.

Each prompt's frame logits go to `<work>/prompt-XXXX-<key>.safetensors` as soon as it finishes, so an
interrupted run resumes where it stopped. The key is a digest of every setting that shapes the statistics
(`part_key`): a part made with another seed, length, size, model, dtype or sampler is never reused. The
statistics file holds the mean over prompts and what produced it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pfgen.errors import PfgenError
from pfgen.frames import video_frames_for
from pfgen.outputs import atomic_output, remove_stale_partials
from pfgen.profile.capture import LogitRecorder
from pfgen.words import count

DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_PROMPTS = DATA / "calibration_prompts.txt"
WORLD_PROMPTS = DATA / "world_calibration_prompts.txt"  # the embedded world model knows only its grammar
STATS_FORMAT = "pfgen.head-stats/1"
PART_GLOB = "prompt-*.safetensors"
# What shapes one prompt's statistics besides the prompt and its seed (`seconds` only through `frames`).
CAPTURE_SETTINGS = ("format", "model", "fingerprint", "text_encoder", "dtype", "sampling", "layers", "heads",
                    "frames", "height", "width", "policy", "window", "sink", "frames_per_chunk", "capture")
REQUIRED_META = ("layers", "heads", "frames", "window", "sink")


def read_prompts(path: str | Path | None, world: bool = False) -> list[str]:
    """One prompt per line (blank lines and lines starting with # are skipped); no path: the built-in
    prompts, world prompts for a world model."""
    path = Path(path).expanduser() if path is not None else WORLD_PROMPTS if world else DEFAULT_PROMPTS
    if not path.is_file():
        raise PfgenError(f"prompts file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise PfgenError(f"prompts file {path} is not UTF-8 text", "write one prompt per line in a text file")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise PfgenError(f"prompts file {path} holds no prompts", "write one prompt per line")
    return prompts


@dataclass
class Statistics:
    frame_logits: torch.Tensor  # (layers, heads, T, T) float32, NaN where not visible
    meta: dict

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_output(path) as tmp:
            save_file({"frame_logits": self.frame_logits.contiguous()}, str(tmp),
                      metadata={"pfgen": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise PfgenError(f"statistics file not found: {path}")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("pfgen", "{}"))
                logits = f.get_tensor("frame_logits")
            if not isinstance(meta, dict):
                raise ValueError("metadata is not an object")
        except Exception:
            raise PfgenError(f"{path} is not a pfgen statistics file (safetensors with frame_logits)") from None
        if meta.get("format") != STATS_FORMAT:
            raise PfgenError(f"{path} is not a pfgen statistics file (format {meta.get('format')!r})")
        for key in REQUIRED_META:
            if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 0:
                raise PfgenError(f"{path}: its metadata has no valid '{key}' ({meta.get(key)!r})",
                                 "use a file written by pfgen profile-heads --stats-out")
        shape = (meta.get("layers"), meta.get("heads"), meta.get("frames"), meta.get("frames"))
        if logits.ndim != 4 or tuple(logits.shape) != shape:
            raise PfgenError(f"{path}: frame_logits has shape {tuple(logits.shape)}, its metadata says {shape}")
        return cls(logits, meta)


def part_key(meta: dict, prompt: str, seed: int) -> str:
    """Digest of every capture setting of one prompt's run: equal keys, equal statistics."""
    settings = {**{k: meta.get(k) for k in CAPTURE_SETTINGS}, "prompt": prompt, "seed": seed}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_part(path: Path, key: str) -> torch.Tensor | None:
    """A saved part's logits if it is readable and made with these exact settings, else None."""
    if not path.is_file():
        return None
    try:
        stats = Statistics.load(path)
    except PfgenError:
        return None
    return stats.frame_logits if stats.meta.get("part") == key else None


def calibrate(pipe, prompts: list[str], latent_frames: int, seed: int, work_dir: Path, meta: dict,
              progress=None) -> Statistics:
    """Run the rolling baseline on every prompt not done yet in `work_dir`; return the mean statistics.

    `progress` (optional) has start(prompts, chunks), chunk(chunk_output), prompt(index) and note(text)."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PfgenError(f"cannot create {work_dir}: {exc.strerror}", "choose another --work-dir") from None
    keys = [part_key(meta, prompt, seed + i) for i, prompt in enumerate(prompts)]
    names = [f"prompt-{i:04d}-{key}.safetensors" for i, key in enumerate(keys)]
    stale = sorted(p.name for p in work_dir.glob(PART_GLOB) if p.name not in names)
    if progress is not None:
        if stale:
            progress.note(f"ignoring {count(len(stale), 'saved part')} in {work_dir} made with "
                          f"other settings (prompt, seed, length, size, model or dtype)")
        progress.start(len(prompts), latent_frames // meta["frames_per_chunk"])
    on_chunk = progress.chunk if progress is not None else None
    parts = []
    for i, (prompt, key, name) in enumerate(zip(prompts, keys, names)):
        logits = _load_part(work_dir / name, key)
        if logits is None:
            logits = _profile_one(pipe, prompt, latent_frames, seed + i, (meta["height"], meta["width"]), on_chunk)
            Statistics(logits, {**meta, "prompt": prompt, "seed": seed + i, "part": key}).save(work_dir / name)
        parts.append(logits)
        if progress is not None:
            progress.prompt(i)
    mean = torch.stack(parts).mean(dim=0)
    return Statistics(mean, {**meta, "prompts": prompts})


def remove_parts(work_dir: Path) -> None:
    """Delete the per-prompt parts (and temp files of dead runs); the folder too once it is empty."""
    if not work_dir.is_dir():
        return
    for part in work_dir.glob(PART_GLOB):
        part.unlink(missing_ok=True)
    remove_stale_partials(work_dir)
    try:
        work_dir.rmdir()
    except OSError:
        pass  # something else lives there: keep it


def _profile_one(pipe, prompt: str, latent_frames: int, seed: int, size, on_chunk) -> torch.Tensor:
    recorder = LogitRecorder(pipe.layers, pipe.heads, latent_frames, pipe.device)
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    frames = video_frames_for(latent_frames)
    for chunk in pipe.stream(prompt, num_frames=frames, height=size[0], width=size[1], policy="rolling",
                             generator=generator, decode=False, observer=recorder):
        if on_chunk is not None:
            on_chunk(chunk)
    return recorder.frame_logits()
