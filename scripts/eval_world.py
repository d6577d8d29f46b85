"""Measure a trained world model (scripts/train_world.py's OUT/world) against docs/world.md's targets.

    python scripts/eval_world.py targets --out runs/eval     # VAE PSNR, 0-10 s, 50-60 s, motion
    python scripts/eval_world.py policies --seconds 300 --pairs 8 --out runs/eval
    python scripts/eval_world.py switch --out runs/eval      # --then 5, re-cache or not
    python scripts/eval_world.py speed                        # fps, first-frame latency
    python scripts/eval_world.py vae --out runs/eval         # PSNR; objects kept by the VAE's round trip
    python scripts/eval_world.py sample --split train --pairs 8   # 2 s videos: does a new model draw its objects?

The shipped weights by default; `--model OUT/world --heads HEADS.json` measures another trained folder.
`--set KEY=VALUE` changes one config value, e.g. where pyramid places its history:
    python scripts/eval_world.py policies --policy rolling,pyramid --set cache.pyramid.rope_window=8

Every video comes from held-out (prompt, seed) pairs: prompts of the held-out split (a green triangle, an
orange square or a striped brown background; pfgen/world/grammar.py), never seen in training, with noise
seeds 1000+; `--split train` draws the training split's prompts the same way, to see what the model does
where it was trained. Each video is scored on the fly with the world scorer (pfgen/world/score.py), so memory
stays bounded at any length. Results are JSON files in --out; figures are means over videos with 95 % bootstrap
confidence intervals (2000 resamples of the videos).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

FPS = 16


def scene_pairs(count: int, split: str = "heldout") -> list[tuple[str, int]]:
    """`count` (prompt, seed) pairs of the split, deterministic; every fourth forced to two objects on stripes.
    pfgen's noise seeds are 1000 + the pair's index."""
    from pfgen.world.grammar import sample_scene

    rng = np.random.default_rng(2026)
    pairs = []
    while len(pairs) < count:
        scene = sample_scene(rng, held_out=split == "heldout")
        if len(pairs) % 4 == 3 and (len(scene.things) < 2 or not scene.striped):
            continue
        pairs.append((scene.prompt, 1000 + len(pairs)))
    return pairs


def load(args):
    """The embedded default (config `tiny`: the shipped weights and their head file), or the world model of
    folder args.model with head file args.heads (rolling without one), through the real-weights path."""
    from dataclasses import replace

    import torch

    from pfgen.config import load_config
    from pfgen.pipeline import load_pipeline

    cfg = with_settings(load_config("tiny"), args.set)
    folder = {}
    if args.model is not None:
        heads = str(args.heads) if args.heads else None  # pfgen profile-heads on the folder makes one
        cfg = replace(cfg, cache=replace(cfg.cache, heads=heads, policy="pyramid" if heads else "rolling"))
        folder = dict(checkpoint=str(args.model / "transformer"), wan_dir=str(args.model))
    pipe = load_pipeline(cfg, device="cpu", dtype="float32", **folder)
    torch.set_num_threads(args.threads)
    return pipe


def with_settings(cfg, settings: list[str]):
    """The config with `--set KEY=VALUE` items applied (`cache.pyramid.rope_window=8`; VALUE read as YAML),
    each held to the rules of a config file's value (pfgen.config.with_key)."""
    import yaml

    from pfgen.config import with_key
    from pfgen.errors import PfgenError

    for item in settings:
        key, _, value = item.partition("=")
        try:
            cfg = with_key(cfg, key, yaml.safe_load(value), f"--set {item}")
        except PfgenError as exc:
            raise SystemExit(f"error: {exc}") from None
    return cfg


def run_video(pipe, prompt: str, seed: int, seconds: float, policy: str, timeline=None, recache=True,
              also=None, mp4=None):
    """(WorldTrack of the video, wall seconds); frames are scored as they stream, against `prompt` and, when
    given, also against the prompt `also` (its track is the third item). `mp4`: also write the video there."""
    import torch

    from pfgen.frames import frames_for_seconds
    from pfgen.video import Mp4Writer, to_uint8_frames
    from pfgen.world.grammar import parse
    from pfgen.world.score import WorldTrack

    track = WorldTrack(parse(prompt))
    other = WorldTrack(parse(also)) if also else None
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    kwargs = dict(timeline=timeline, recache=recache) if timeline else dict(prompt=prompt)
    video = pipe.config.video
    with Mp4Writer(mp4, video.width, video.height, FPS) if mp4 else contextlib.nullcontext() as writer:
        for chunk in pipe.stream(num_frames=frames_for_seconds(seconds, FPS), generator=generator, policy=policy,
                                 **kwargs):
            frames = to_uint8_frames(chunk.frames[0])
            if writer is not None:
                writer.write(frames)
            for frame in frames:
                track.add(frame)
                if other is not None:
                    other.add(frame)
    if other is not None:
        return track, time.perf_counter() - started, other
    return track, time.perf_counter() - started


def bootstrap(values, resamples: int = 2000) -> dict:
    """Mean and 95 % percentile-bootstrap interval over videos."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(values) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return {"mean": float(values.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5)), "n": int(len(values))}


def span(track, start_s: float, end_s: float) -> dict:
    """Shares of frames in [start_s, end_s) with the background right / each object present, the spurious
    area, the stability against the first second and where it was lost."""
    window = track.window(int(start_s * FPS), int(end_s * FPS), FPS, losses=True)
    return {"background": window["world_background"], "objects": window["world_objects_each"],
            "spurious": window["world_spurious"], "stability": window["world_stability"],
            "stability_losses": window["world_stability_losses"]}


def video_row(track, seconds: float, wall: float) -> dict:
    from pfgen.world.score import period_ok

    track.flush()
    total = len(track.right)
    windows = [track.window(s, s + FPS, FPS) for s in range(0, total - FPS + 1, FPS)]
    return {"prompt": track.scene.prompt, "seconds": seconds, "wall_s": wall, "frames": total,
            "first_10s": span(track, 0, 10), "last_10s": span(track, seconds - 10, seconds),
            "periods": [{**p, "ok": period_ok(p)} for p in track.periods()],
            "per_second": {k: [w[k] for w in windows] for k in ("world_background", "world_objects",
                                                                   "world_spurious", "world_stability")}}


PERIOD_TARGET_MOTIONS = ("circling", "bouncing")  # the motion target; sliding is reported beside it


def span_value(row: dict, part: str, metric: str) -> float:
    """One figure of a video row's span; "objects" is the worse object (a video with one missing scores 0)."""
    value = row[part][metric]
    return min(value) if metric == "objects" else value


def summarize_rows(rows: list[dict]) -> dict:
    def period_share(motions):
        periods = [p for row in rows for p in row["periods"] if p["motion"] in motions]
        return {"share": float(np.mean([p["ok"] for p in periods])) if periods else None, "objects": len(periods),
                "tracked": sum(p["measured_s"] is not None for p in periods)}

    def over_videos(part, metric):
        return bootstrap([span_value(r, part, metric) for r in rows])

    return {
        "videos": len(rows),
        "background_first_10s": over_videos("first_10s", "background"),
        "objects_first_10s": over_videos("first_10s", "objects"),
        "background_last_10s": over_videos("last_10s", "background"),
        "objects_last_10s": over_videos("last_10s", "objects"),
        "spurious_last_10s": over_videos("last_10s", "spurious"),
        "stability_last_10s": over_videos("last_10s", "stability"),
        "stability_losses_last_10s": {part: bootstrap([r["last_10s"]["stability_losses"][part] for r in rows])
                                      for part in rows[0]["last_10s"]["stability_losses"]},
        "period_within_15pct": period_share(PERIOD_TARGET_MOTIONS),
        "sliding_period_within_15pct": period_share(("sliding left", "sliding right")),
        "per_second_mean": {k: np.mean([r["per_second"][k] for r in rows], axis=0).round(4).tolist()
                            for k in rows[0]["per_second"]},
    }


def round_trips(pipe, split: str = "heldout", clips: int = 24, frames: int = 33):
    """(prompt, rendered clip, the VAE's round trip of it), both (frames, H, W, 3) uint8, for `clips` pairs."""
    import torch

    from pfgen.video import to_uint8_frames
    from pfgen.world.grammar import parse
    from pfgen.world.model import HEIGHT, WIDTH
    from pfgen.world.render import WorldVideo

    with torch.no_grad():
        for prompt, seed in scene_pairs(clips, split):
            video = WorldVideo(parse(prompt), seed, HEIGHT, WIDTH).frames(0, frames)
            x = torch.from_numpy(video.transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1.0)[None]
            y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
            yield prompt, video, to_uint8_frames(y[0])


def vae_psnr(pipe, clips: int = 24) -> dict:
    """Reconstruction PSNR (dB) of the VAE on held-out clips rendered by the world (on the 8-bit frames)."""
    scores = []
    for _, video, back in round_trips(pipe, clips=clips):
        mse = float(((back.astype(np.float64) - video) ** 2).mean())
        scores.append(10 * np.log10(255.0 ** 2 / mse))
    return bootstrap(scores)


def cmd_vae(args) -> dict:
    """The VAE alone: PSNR, and what of the objects survives its round trip (the ceiling of every DiT figure),
    per split: the share of (frame, object) pairs with a blob of the object's colour, with the right shape
    class, and present (colour, area and shape: the scorer's test). The rendered clips themselves are scored
    beside (the scorer's own ceiling)."""
    from pfgen.world.grammar import parse
    from pfgen.world.score import score_frames

    pipe = load(args)
    out = {"vae_psnr_db": vae_psnr(pipe, args.pairs)}
    for split in ("heldout", "train"):
        counts = {k: [] for k in ("rendered_present", "blob", "shape", "present")}
        for prompt, video, back in round_trips(pipe, split, args.pairs):
            scene = parse(prompt)
            truth, got = score_frames(video, scene), score_frames(back, scene)
            wanted = np.array([[t.shape for t in scene.things]] * len(back))
            shapes = np.array(got.shapes, dtype=object)
            counts["rendered_present"].append(truth.present.mean())
            counts["blob"].append(got.found.mean())
            counts["shape"].append(np.mean(shapes == wanted))
            counts["present"].append(got.present.mean())
        out[split] = {k: bootstrap(v) for k, v in counts.items()}
    return out


PAIRED_METRICS = ("background", "objects", "spurious", "stability")


def paired_differences(policies: dict, baseline: str = "rolling") -> dict:
    """Per policy, its 50-60 s metrics minus the baseline's on the same (prompt, seed) pair: the mean difference
    with a bootstrap interval over pairs, and how many pairs came out above / below / equal. The policies share
    their pairs, so these resolve differences that the per-policy intervals over videos blur."""
    def column(rows, metric):
        return np.array([span_value(r, "last_10s", metric) for r in rows])

    out = {}
    for policy, entry in policies.items():
        if policy == baseline:
            continue
        out[f"{policy}-{baseline}"] = {}
        for metric in PAIRED_METRICS:
            diff = column(entry["rows"], metric) - column(policies[baseline]["rows"], metric)
            out[f"{policy}-{baseline}"][metric] = {**bootstrap(diff), "above": int(np.sum(diff > 1e-9)),
                                                   "below": int(np.sum(diff < -1e-9)),
                                                   "equal": int(np.sum(np.abs(diff) <= 1e-9))}
    return out


def cmd_targets(args) -> dict:
    pipe = load(args)
    out = {"vae_psnr_db": vae_psnr(pipe)}
    rows = []
    for n, (prompt, seed) in enumerate(scene_pairs(args.pairs, args.split)):
        track, wall = run_video(pipe, prompt, seed, args.seconds, args.policy or pipe.config.cache.policy)
        rows.append(video_row(track, args.seconds, wall))
        print(f"{n + 1}/{args.pairs} {wall:.1f}s {prompt}", file=sys.stderr, flush=True)
    out.update(policy=args.policy or pipe.config.cache.policy, summary=summarize_rows(rows), rows=rows)
    return out


def cmd_policies(args) -> dict:
    if args.model is not None and args.heads is None:
        raise SystemExit("error: policies needs --heads with --model (the model's head-type file, from pfgen profile-heads)")
    policies = (args.policy or "rolling,pyramid,full").split(",")
    if not set(policies) <= {"rolling", "pyramid", "full"}:
        raise SystemExit(f"error: --policy {args.policy}: expected a comma list of rolling, pyramid and full")
    pipe = load(args)
    out = {"seconds": args.seconds, "policies": {}}
    manifest = []
    for policy in policies:
        rows = []
        for n, (prompt, seed) in enumerate(scene_pairs(args.pairs, args.split)):
            mp4 = None
            if args.videos:  # DIR/POLICY/N.mp4 and DIR/manifest.jsonl, for `pfgen evaluate DIR --plot`
                (args.videos / policy).mkdir(parents=True, exist_ok=True)
                mp4 = args.videos / policy / f"{n:02d}.mp4"
                manifest.append({"file": f"{policy}/{n:02d}.mp4", "policy": policy, "prompt": prompt})
            track, wall = run_video(pipe, prompt, seed, args.seconds, policy, mp4=mp4)
            rows.append(video_row(track, args.seconds, wall))
            print(f"{policy} {n + 1}/{args.pairs} {wall:.1f}s", file=sys.stderr, flush=True)
        out["policies"][policy] = {"summary": summarize_rows(rows), "rows": rows}
    if "rolling" in out["policies"]:
        out["paired_last_10s"] = paired_differences(out["policies"])
    if args.videos:
        (args.videos / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    return out


def switch_pairs(count: int, split: str) -> list[tuple[str, str, int]]:
    """(prompt, the same scene with the first object in another colour, seed), prompts of the split."""
    from dataclasses import replace

    from pfgen.world.grammar import OBJECT_COLOURS, Scene, parse

    out = []
    for prompt, seed in scene_pairs(count, split):
        scene = parse(prompt)
        used = {t.colour for t in scene.things}
        colour = next(c for c in OBJECT_COLOURS if c not in used)
        things = (replace(scene.things[0], colour=colour),) + scene.things[1:]
        out.append((prompt, Scene(things, scene.background, scene.striped).prompt, seed))
    return out


def switch_row(track_new, track_old, at_s: float, width: int) -> dict:
    """When the first object shows the new colour after the switch, and how far its centre jumped from the
    old-colour object's centre in the last frame before the switch."""
    track_new.flush(), track_old.flush()
    start = int(at_s * FPS)
    present = np.array(track_new.present)[:, 0]
    centres_new = np.stack(track_new.centres)[:, 0]
    centres_old = np.stack(track_old.centres)[:, 0]
    after = np.nonzero(present[start:])[0]
    if len(after) == 0:
        return {"changed_after_s": None, "jump_share_of_width": None}
    first = start + int(after[0])
    before = centres_old[start - 1]
    jump = float(np.hypot(*(centres_new[first] - before))) if not np.isnan(before).any() else None
    return {"changed_after_s": (first - start) / FPS,
            "jump_share_of_width": None if jump is None else jump / width}


def cmd_switch(args) -> dict:
    from pfgen.world.model import WIDTH

    pipe = load(args)
    out = {"at_s": args.at, "seconds": args.seconds}
    for recache in (True, False):
        rows = []
        for old, new, seed in switch_pairs(args.pairs, args.split):
            track, _, old_track = run_video(pipe, new, seed, args.seconds, pipe.config.cache.policy,
                                            timeline=[(0.0, old), (args.at, new)], recache=recache, also=old)
            rows.append({"from": old, "to": new, **switch_row(track, old_track, args.at, WIDTH)})
        changed = [r["changed_after_s"] for r in rows]
        out["recache" if recache else "no_recache"] = {
            "within_1s": float(np.mean([c is not None and c <= 1.0 for c in changed])),
            "changed_after_s": bootstrap(changed),
            "jump_share_of_width": bootstrap([r["jump_share_of_width"] for r in rows]),
            "jump_under_10pct": float(np.mean([j is not None and j < 0.10 for j in
                                               (r["jump_share_of_width"] for r in rows)])),
            "rows": rows}
    return out


def cmd_sample(args) -> dict:
    """The quick check a newly trained model passes before the long measurements: short videos (2 s, 33 frames)
    under --policy (default rolling), and per video the shares of frames with the background right and of
    (frame, object) pairs with a blob of the object's colour and with the object present (colour, area, shape)."""
    from pfgen.world.score import blobs_found

    pipe = load(args)
    policy = args.policy or "rolling"
    rows = []
    for prompt, seed in scene_pairs(args.pairs, args.split):
        track, wall = run_video(pipe, prompt, seed, args.seconds, policy)
        track.flush()
        rows.append({"prompt": prompt, "seed": seed, "frames": len(track.right), "wall_s": wall,
                     "background": float(np.mean(track.right)),
                     "blob": float(np.mean(blobs_found(np.stack(track.centres)))),
                     "present": float(np.mean(np.stack(track.present)))})
        print(f"{rows[-1]['background']:.2f} {rows[-1]['blob']:.2f} {rows[-1]['present']:.2f} {prompt}",
              file=sys.stderr, flush=True)
    return {"policy": policy, "seconds": args.seconds,
            **{k: bootstrap([r[k] for r in rows]) for k in ("background", "blob", "present")}, "rows": rows}


def cmd_speed(args) -> dict:
    """fps of generate on the default config (decode and mp4 included) and the first frame's latency."""
    import tempfile

    import torch

    from pfgen.frames import frames_for_seconds
    from pfgen.video import Mp4Writer, to_uint8_frames

    started = time.perf_counter()
    pipe = load(args)
    loaded = time.perf_counter() - started
    prompt = "a red ball circling and a yellow square bouncing on a striped navy background"
    num_frames = frames_for_seconds(args.seconds, FPS)
    with tempfile.TemporaryDirectory() as tmp:
        begin = time.perf_counter()
        first = None
        count = 0
        cfg = pipe.config.video
        with Mp4Writer(Path(tmp) / "speed.mp4", cfg.width, cfg.height, cfg.fps) as writer:
            for chunk in pipe.stream(prompt, num_frames=num_frames, generator=torch.Generator().manual_seed(0)):
                frames = to_uint8_frames(chunk.frames[0])
                first = first or time.perf_counter() - begin
                count += len(frames)
                writer.write(frames)
        wall = time.perf_counter() - begin
    return {"threads": args.threads, "load_s": loaded, "first_frame_s": first, "frames": count, "wall_s": wall,
            "fps": count / wall, "policy": pipe.config.cache.policy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("targets", "policies", "switch", "speed", "vae", "sample"))
    parser.add_argument("--model", type=Path, default=None,
                        help="train_world.py's OUT/world folder (default: the shipped weights)")
    parser.add_argument("--heads", type=Path, default=None, help="with --model: its head-type file (pyramid)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="the prompts' split (targets, policies, switch, sample)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="video length (default: 60 for targets and policies, 10 for switch and speed, 2 for sample)")
    parser.add_argument("--policy", default=None,
                        help="targets, sample: the cache policy (default: the config's; rolling for sample); policies: "
                             "a comma list of those to compare (default rolling,pyramid,full)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config value, e.g. cache.pyramid.rope_window=8 (repeatable)")
    parser.add_argument("--at", type=float, default=5.0, help="switch: the switch time (s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the result file name (one that starts with - as --tag=-x)")
    parser.add_argument("--videos", type=Path, default=None, help="policies: also write the mp4s and a manifest here")
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = {"switch": 10.0, "speed": 10.0, "sample": 2.0}.get(args.command, 60.0)
    result = {"targets": cmd_targets, "policies": cmd_policies, "switch": cmd_switch, "speed": cmd_speed,
              "vae": cmd_vae, "sample": cmd_sample}[
        args.command](args)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.command}{args.tag}.json").write_text(text)
    summary = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(summary, indent=1)[:4000])


if __name__ == "__main__":
    main()
