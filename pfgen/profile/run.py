"""`pfgen profile-heads` end to end: calibration (or saved statistics) -> classifier -> head-type JSON."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pfgen.errors import PfgenError
from pfgen.heads import HeadTypes
from pfgen.profile.calibrate import STATS_FORMAT, Statistics, calibrate, model_fingerprint, read_prompts
from pfgen.profile.classify import Thresholds, agreement, classify


@dataclass
class ProfileRequest:
    output: Path
    prompts: Path | None = None
    seconds: float = 15.0
    seed: int = 0
    stats_out: Path | None = None
    from_stats: Path | None = None
    work_dir: Path | None = None
    thresholds: tuple[str, ...] = ()
    plot: Path | None = None
    compare: Path | None = None
    height: int | None = None
    width: int | None = None


def parse_thresholds(items) -> Thresholds:
    try:
        return Thresholds.parse_overrides(items)
    except ValueError as exc:
        raise PfgenError(str(exc), "see pfgen profile-heads --help for the threshold names") from None


def collect_statistics(cfg, req: ProfileRequest, progress=None) -> Statistics:
    """Run the calibration prompts through the rolling baseline (resumable), or read saved statistics."""
    if req.from_stats is not None:
        return Statistics.load(req.from_stats)
    from pfgen.frames import frames_for_seconds
    from pfgen.frames import latent_frames_for
    from pfgen.pipeline import load_pipeline

    prompts = read_prompts(req.prompts)
    per_chunk = cfg.sampling.frames_per_chunk
    latent = latent_frames_for(frames_for_seconds(req.seconds, cfg.video.fps), per_chunk)
    if latent // per_chunk < 2:
        raise PfgenError(f"--seconds {req.seconds} gives {latent // per_chunk} chunk(s): no history to profile",
                         "use at least 2 chunks (the published recipe uses 15 s)")
    pipe = load_pipeline(cfg)
    height, width = req.height or cfg.video.height, req.width or cfg.video.width
    pipe.latent_grid(height, width)
    meta = {"format": STATS_FORMAT, "model": cfg.model.name, "fingerprint": model_fingerprint(pipe.transformer),
            "layers": pipe.layers, "heads": pipe.heads, "frames": latent, "seconds": req.seconds,
            "policy": "rolling", "window": cfg.cache.rolling.window, "sink": cfg.cache.rolling.sink,
            "frames_per_chunk": per_chunk, "height": height, "width": width, "seed": req.seed,
            "capture": "mean q . mean k / sqrt(d) per frame pair, RoPE applied, averaged over denoising passes"}
    work = req.work_dir or req.output.with_name(req.output.stem + ".parts")
    stats = calibrate(pipe, prompts, latent, req.seed, work, meta, progress)
    if req.stats_out is not None:
        stats.save(req.stats_out)
    return stats


def classify_statistics(stats: Statistics, thresholds: Thresholds, expected_model: str | None = None):
    meta = stats.meta
    if expected_model is not None and meta.get("model") not in (None, expected_model):
        raise PfgenError(f"statistics are for model '{meta.get('model')}', the config is for '{expected_model}'",
                         "use the statistics of this model or its config")
    result = classify(stats.frame_logits, sink_frames=meta["sink"], window=meta["window"], thresholds=thresholds)
    calibration = {**result.to_calibration(),
                   "capture": {k: meta.get(k) for k in ("fingerprint", "seconds", "policy", "window", "sink",
                                                        "frames_per_chunk", "height", "width", "seed", "capture")},
                   "prompts": meta.get("prompts")}
    heads = HeadTypes.from_rows(result.types, meta.get("model", "unknown"), calibration)
    return heads, result


def compare_with(heads: HeadTypes, other_path: Path) -> dict:
    other = HeadTypes.load(other_path)
    if (other.layers, other.heads) != (heads.layers, heads.heads):
        raise PfgenError(f"{other_path} is {other.layers}x{other.heads}, these labels are "
                         f"{heads.layers}x{heads.heads}", "compare files made for the same model")
    return agreement(heads.types, other.types)

