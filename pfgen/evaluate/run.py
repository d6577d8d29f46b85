"""`pfgen evaluate` end to end: select the videos, decode each once into per-frame features (and CLIP samples
with --deep), fold them into windows and summaries, and take the per-window differences of each comparison.

The result is the plain dict that `--json` prints (docs/evaluate.md describes its keys).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from pfgen.errors import PfgenError
from pfgen.evaluate.deep import DEEP_WORSE, DEFAULT_CLIP, ClipScorer, add_deep_windows
from pfgen.evaluate.metrics import WORSE, FrameFeatures, summarize, window_metrics
from pfgen.evaluate.videos import (Comparison, VideoRef, prompt_from_metadata, read_video, select_videos,
                                   shorter_than_window)
from pfgen.evaluate.world import WORLD_WORSE, add_world_windows, world_scene
from pfgen.world.score import WorldTrack


@dataclass(frozen=True)
class EvaluateRequest:
    paths: tuple[Path, ...]
    window_s: float = 5.0
    deep: bool = False
    prompt: str | None = None
    clip_model: str | None = None  # None: DEFAULT_CLIP


HF_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")  # a Hub model id: name or org/name


def check_request(req: EvaluateRequest) -> None:
    if not (req.window_s > 0 and math.isfinite(req.window_s)):
        raise PfgenError(f"--window must be a positive number of seconds, got {req.window_s}")
    if not req.deep and (req.prompt is not None or req.clip_model is not None):
        raise PfgenError("--prompt and --clip-model are for --deep", "add --deep")
    clip = req.clip_model
    hint = "give a folder written by CLIPModel.save_pretrained, or a Hugging Face id (org/name)"
    if clip is None or Path(clip).expanduser().exists():
        return
    if clip.startswith((".", "/", "~")):
        raise PfgenError(f"--clip-model: no such folder {clip}", hint)
    if not HF_ID.fullmatch(clip):  # `org/`, `a/b/c/d`: no id to look up in the cache (nor to `hf download`)
        raise PfgenError(f"--clip-model: no such folder {clip}, and not a Hugging Face id", hint)


def evaluate(req: EvaluateRequest, on_video=lambda done, total, label: None) -> dict:
    """Every selected video's windows and summary, every comparison's per-window differences, warnings."""
    check_request(req)
    selection = select_videos(list(req.paths))
    scorer = ClipScorer(req.clip_model or DEFAULT_CLIP) if req.deep else None  # imports transformers
    warnings = list(selection.warnings)
    worse = {**WORSE, **(DEEP_WORSE if req.deep else {})}
    videos = list(dict.fromkeys(selection.videos))
    scenes = {ref: world_scene(ref.prompt or prompt_from_metadata(ref.path)) for ref in videos}
    if any(scenes.values()):
        worse.update(WORLD_WORSE)
    results: dict[VideoRef, dict] = {}
    for n, ref in enumerate(videos):
        on_video(n, len(videos), ref.label)
        results[ref] = evaluate_video(ref, req, scorer, worse, warnings, scenes[ref])
    on_video(len(videos), len(videos), "")
    comparisons = [diff for c in selection.comparisons for diff in compare(c, results, list(worse), warnings)]
    return {"window_s": req.window_s, "metrics": list(worse), "videos": list(results.values()),
            "comparisons": comparisons, "warnings": warnings}


def evaluate_video(ref: VideoRef, req: EvaluateRequest, scorer, worse: dict, warnings: list[str],
                   scene=None) -> dict:
    """Decode once; per-frame features -> windows -> summary (plus CLIP scores with --deep, and the world
    metrics when the prompt is a world-grammar sentence)."""
    meta, frames = read_video(ref.path, min_seconds=req.window_s)
    features = FrameFeatures()
    sampler = scorer.sampler(meta.fps) if scorer is not None else None
    track = WorldTrack(scene) if scene is not None else None
    for frame in frames:
        features.add(frame)
        if sampler is not None:
            sampler.add(frame)
        if track is not None:
            track.add(frame)
    if len(features) < round(req.window_s * meta.fps):
        raise shorter_than_window(ref.path, len(features) / meta.fps, req.window_s)
    windows = window_metrics(features, meta.fps, req.window_s)
    result = {"label": ref.label, "path": str(ref.path), "policy": ref.policy, "fps": meta.fps,
              "width": meta.width, "height": meta.height, "frames": len(features),
              "seconds": len(features) / meta.fps}
    if sampler is not None:
        prompt = req.prompt or ref.prompt or prompt_from_metadata(ref.path)
        if prompt is None:
            warnings.append(f"{ref.label}: no prompt (not in a manifest or the mp4's metadata; give --prompt): "
                            "clip_text left out")
        add_deep_windows(windows, sampler.indices, scorer.frame_scores(sampler, prompt), meta.fps)
        result["prompt"] = prompt
    if track is not None and windows:
        result["world"] = add_world_windows(windows, track, meta.fps)
    result["windows"] = windows
    result["summary"] = summarize(windows, worse)
    return result


def _difference(a, b):
    return None if a is None or b is None else b - a


def compare(comparison: Comparison, results: dict[VideoRef, dict], metrics: list[str],
            warnings: list[str]) -> list[dict]:
    """Each later video minus the baseline, window by window, over the span both cover."""
    base = results[comparison.videos[0]]
    out = []
    for ref in comparison.videos[1:]:
        other = results[ref]
        windows = []
        for wa, wb in zip(base["windows"], other["windows"]):
            if abs(wa["end_s"] - wb["end_s"]) > 1e-6:  # a window one video covers only in part
                break
            windows.append({"start_s": wa["start_s"], "end_s": wa["end_s"],
                            **{m: _difference(wa.get(m), wb.get(m)) for m in metrics}})
        common = windows[-1]["end_s"] if windows else 0.0
        if base["frames"] != other["frames"] or base["fps"] != other["fps"]:
            warnings.append(f"{comparison.name}: {base['label']} is {base['seconds']:.2f} s and {other['label']} "
                            f"{other['seconds']:.2f} s long: compared over the first {common:g} s")
        out.append({"name": comparison.name, "baseline": base["label"], "other": other["label"],
                    "common_s": common, "windows": windows})
    return out

