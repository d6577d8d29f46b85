"""`pfgen profile-heads` end to end: calibration (or saved statistics) -> classifier -> head-type JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pfgen.errors import PfgenError
from pfgen.heads import HeadTypes
from pfgen.outputs import check_folder_writable, check_output_path, check_outputs
from pfgen.profile.calibrate import STATS_FORMAT, Statistics, calibrate, read_prompts, remove_parts
from pfgen.profile.classify import Thresholds, agreement, classify, min_profile_frames
from pfgen.wan.fingerprint import model_fingerprint
from pfgen.world.model import is_world


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
    keep_parts: bool = False
    reference: HeadTypes | None = None  # the --compare file, read before any work
    overwrite: bool = False  # replace existing --output / --stats-out / --plot files

    @property
    def parts(self) -> Path:
        """Folder of the per-prompt statistics (resume state)."""
        return self.work_dir.expanduser() if self.work_dir else self.output.with_name(self.output.stem + ".parts")


def check_request(req: ProfileRequest) -> ProfileRequest:
    """Every output location and the --compare file, checked before a model loads or anything is written."""
    if req.from_stats is not None and req.stats_out is not None:
        raise PfgenError("--stats-out writes the statistics of a calibration run; --from-stats has none to write",
                         "drop --stats-out")
    if req.compare is not None and req.compare.expanduser().resolve() == req.output.expanduser().resolve():
        raise PfgenError(f"--output and --compare are the same file ({req.output})",
                         "write the new labels to another file and compare them with this one")
    replace_ok = req.overwrite
    output = check_output_path(req.output, ".json", option="--output", overwrite=replace_ok)
    stats_out = check_output_path(req.stats_out, ".safetensors", option="--stats-out", overwrite=replace_ok) \
        if req.stats_out else None
    plot = check_output_path(req.plot, ".png", option="--plot", overwrite=replace_ok) if req.plot else None
    check_outputs(output=output, stats_out=stats_out, plot=plot)
    reference = None
    if req.compare is not None:
        reference = HeadTypes.load(req.compare.expanduser())
    req = replace(req, output=output, stats_out=stats_out, plot=plot, reference=reference)
    if req.from_stats is None:
        parts = req.parts
        if parts.exists() and not parts.is_dir():
            raise PfgenError(f"--work-dir {parts} is a file", "give a folder")
        check_folder_writable(parts if parts.exists() else parts.parent)
    return req


def parse_thresholds(items) -> Thresholds:
    try:
        return Thresholds.parse_overrides(items)
    except ValueError as exc:
        raise PfgenError(str(exc), "see pfgen profile-heads --help for the threshold names") from None


def collect_statistics(cfg, req: ProfileRequest, progress=None) -> Statistics:
    """Run the calibration prompts through the rolling baseline (resumable), or read saved statistics."""
    if req.from_stats is not None:
        stats = Statistics.load(req.from_stats)
        _check_reference(req, stats.meta["layers"], stats.meta["heads"])
        return stats
    from pfgen.frames import VAE_TIME, frames_for_seconds, latent_frames_for
    from pfgen.pipeline import load_pipeline

    prompts = read_prompts(req.prompts, world=is_world(cfg.model))
    per_chunk = cfg.sampling.frames_per_chunk
    latent = latent_frames_for(frames_for_seconds(req.seconds, cfg.video.fps), per_chunk)
    need = max(min_profile_frames(cfg.cache.rolling.sink), 2 * per_chunk)  # and a chunk that reads a cache
    if latent < need:  # the classifier's own condition, checked before the calibration runs, not after
        shortest = next(k * VAE_TIME / cfg.video.fps for k in range(1, need + 1)
                        if latent_frames_for(frames_for_seconds(k * VAE_TIME / cfg.video.fps, cfg.video.fps),
                                             per_chunk) >= need)
        raise PfgenError(f"--seconds {req.seconds:g} gives {latent} latent frames: no history to profile (the "
                         f"classifier needs {need})", f"use --seconds {shortest:g} or more (the published recipe "
                                                      "uses 15 s)")
    pipe = load_pipeline(cfg)
    _check_reference(req, pipe.layers, pipe.heads)
    height, width = req.height or cfg.video.height, req.width or cfg.video.width
    pipe.latent_grid(height, width)
    meta = {"format": STATS_FORMAT, "model": cfg.model.name, "fingerprint": model_fingerprint(pipe.transformer),
            "dtype": str(pipe.dtype).removeprefix("torch."), "text_encoder": cfg.model.wan_dir or "embedded",
            "sampling": asdict(cfg.sampling), "layers": pipe.layers, "heads": pipe.heads, "frames": latent,
            "seconds": req.seconds,
            "policy": "rolling", "window": cfg.cache.rolling.window, "sink": cfg.cache.rolling.sink,
            "frames_per_chunk": per_chunk, "height": height, "width": width, "seed": req.seed,
            "capture": "mean q . mean k / sqrt(d) per frame pair, RoPE applied, averaged over denoising passes"}
    stats = calibrate(pipe, prompts, latent, req.seed, req.parts, meta, progress)
    if req.stats_out is not None:
        stats.save(req.stats_out)
    return stats


def _check_reference(req: ProfileRequest, layers: int, heads: int) -> None:
    """A --compare file for another model fails now, not after the calibration runs."""
    if req.reference is not None:
        req.reference.check_model(layers, heads, where=f"--compare {req.compare}")


def finish(req: ProfileRequest) -> None:
    """After a successful run: the per-prompt parts go, unless --keep-parts."""
    if req.from_stats is None and not req.keep_parts:
        remove_parts(req.parts)


def classify_statistics(stats: Statistics, thresholds: Thresholds, expected_model: str | None = None):
    meta = stats.meta
    if expected_model is not None and meta.get("model") not in (None, expected_model):
        raise PfgenError(f"statistics are for model '{meta.get('model')}', the config is for '{expected_model}'",
                         "use the statistics of this model or its config")
    try:
        result = classify(stats.frame_logits, sink_frames=meta["sink"], window=meta["window"],
                          thresholds=thresholds)
    except ValueError as exc:
        raise PfgenError(f"cannot classify these statistics: {exc}", "profile longer videos (--seconds)") from None
    calibration = {**result.to_calibration(),
                   "capture": {k: meta.get(k) for k in ("fingerprint", "seconds", "policy", "window", "sink",
                                                        "frames_per_chunk", "height", "width", "seed", "capture")},
                   "prompts": meta.get("prompts")}
    heads = HeadTypes.from_rows(result.types, meta.get("model", "unknown"), calibration)
    return heads, result


def compare_with(heads: HeadTypes, req: ProfileRequest) -> dict:
    """Agreement of the new labels with the --compare file (already read and checked), which is the reference:
    recall = share of its heads of a type the new labels find, precision = share of the new labels' heads of
    a type it confirms."""
    return agreement(req.reference.types, heads.types)

