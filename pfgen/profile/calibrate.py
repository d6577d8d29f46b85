"""Calibration runs for `pfgen profile-heads`: rolling baseline per prompt, statistics saved per prompt.

Each prompt's frame logits go to `<work>/prompt-XXXX.safetensors` as soon as it finishes, so an interrupted
run resumes where it stopped. The statistics file holds their mean and what produced it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pfgen.errors import PfgenError
from pfgen.frames import video_frames_for
from pfgen.outputs import atomic_output
from pfgen.profile.capture import LogitRecorder

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "calibration_prompts.txt"
STATS_FORMAT = "pfgen.head-stats/1"


def read_prompts(path: str | Path | None) -> list[str]:
    """One prompt per line (blank lines and lines starting with # are skipped)."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    if not path.is_file():
        raise PfgenError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise PfgenError(f"prompts file {path} holds no prompts", "write one prompt per line")
    return prompts


def model_fingerprint(transformer) -> str:
    """Architecture plus a digest of a few weight tensors: tells statistics of one model from another's."""
    cfg = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name in ("patch_embedding.weight", "blocks.0.attn1.to_q.weight", "proj_out.weight"):
        tensor = dict(transformer.named_parameters())[name].detach().float().flatten()[:4096].cpu()
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


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
        except Exception:
            raise PfgenError(f"{path} is not a pfgen statistics file (safetensors with frame_logits)") from None
        if meta.get("format") != STATS_FORMAT:
            raise PfgenError(f"{path} is not a pfgen statistics file (format {meta.get('format')!r})")
        shape = (meta.get("layers"), meta.get("heads"), meta.get("frames"), meta.get("frames"))
        if logits.ndim != 4 or tuple(logits.shape) != shape:
            raise PfgenError(f"{path}: frame_logits has shape {tuple(logits.shape)}, its metadata says {shape}")
        return cls(logits, meta)


def calibrate(pipe, prompts: list[str], latent_frames: int, seed: int, work_dir: Path, meta: dict,
              progress=None) -> Statistics:
    """Run the rolling baseline on every prompt not done yet in `work_dir`; return the mean statistics.

    `progress` (optional) has start(prompts, chunks), chunk(chunk_output) and prompt(index)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress.start(len(prompts), latent_frames // meta["frames_per_chunk"])
    on_chunk = progress.chunk if progress is not None else None
    parts = []
    for i, prompt in enumerate(prompts):
        part = work_dir / f"prompt-{i:04d}.safetensors"
        if part.exists():
            stats = Statistics.load(part)
            if stats.meta.get("fingerprint") != meta["fingerprint"] or stats.meta.get("prompt") != prompt:
                raise PfgenError(f"{part} was made by another model or prompt list",
                                 "use a new --work-dir or delete that folder")
        else:
            logits = _profile_one(pipe, prompt, latent_frames, seed + i, (meta["height"], meta["width"]), on_chunk)
            stats = Statistics(logits, {**meta, "prompt": prompt})
            stats.save(part)
        parts.append(stats.frame_logits)
        if progress is not None:
            progress.prompt(i)
    mean = torch.stack(parts).mean(dim=0)
    return Statistics(mean, {**meta, "prompts": prompts})


def _profile_one(pipe, prompt: str, latent_frames: int, seed: int, size, on_chunk) -> torch.Tensor:
    recorder = LogitRecorder(pipe.layers, pipe.heads, latent_frames, pipe.device)
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    frames = video_frames_for(latent_frames)
    for chunk in pipe.stream(prompt, num_frames=frames, height=size[0], width=size[1], policy="rolling",
                             generator=generator, decode=False, observer=recorder):
        if on_chunk is not None:
            on_chunk(chunk)
    return recorder.frame_logits()
