"""The benchmark scripts at the tiny shape: they run, and their JSON has the fields the docs rely on."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package), without leaving scripts/ on sys.path."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(SCRIPTS))


def run_script(name, *args, tmp_path):
    out = tmp_path / f"{name}.json"
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *args, "--json", str(out),
                             "--markdown", str(tmp_path / "bench.md")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text()), (tmp_path / "bench.md").read_text(), result.stdout


def test_bench_generate_tiny(tmp_path):
    report, markdown, stdout = run_script("bench_generate.py", "--tiny", "--device", "cpu", tmp_path=tmp_path)
    assert set(report["policies"]) == {"rolling", "pyramid"}
    for policy in report["policies"].values():
        assert policy["chunks"] == 12
        assert policy["ms_per_chunk_steady"] > 0 and policy["dit_fps"] > 0
        assert 0 < policy["attention_share"] < 1 and 0 <= policy["plan_share"] < 1
    assert 0.4 < report["key_fraction"] < 0.5
    ideal = 1 / (1 - report["attention_share_rolling"] * (1 - report["key_fraction"]))
    assert abs(report["ideal_speedup"] - ideal) < 1e-9
    assert "pyramid / rolling" in stdout
    assert markdown.count("| tiny |") == 1 and "## bench_generate.py" in markdown


def test_bench_attention_tiny(tmp_path):
    report, markdown, _ = run_script("bench_attention.py", "--shape", "tiny", "--device", "cpu", "--repeat", "2",
                                     tmp_path=tmp_path)
    assert set(report["ms"]) == {"dense_sdpa", "rolling[split]", "pyramid[split]", "pyramid[sdpa]"}
    assert 0.4 < report["key_fraction"] < 0.5
    assert "## bench_attention.py" in markdown


def test_bench_profile_tiny(tmp_path):
    report, _, _ = run_script("bench_profile.py", "--shape", "tiny", "--device", "cpu", "--seconds", "3",
                              tmp_path=tmp_path)
    assert report["latent_frames"] == 12 and report["plain_s"] > 0 and report["capture_s"] > 0


def done_line(out) -> dict:
    return [row for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if row["stage"] == "done"][-1]


@pytest.mark.parametrize("space", [8, 4])
def test_train_world_smoke_runs_every_stage_and_its_folder_generates(tmp_path, space):
    """scripts/train_world.py --smoke: VAE, latents, DiT, export; the folder loads through the real-weights path
    (the shipped architecture, and the variant with a 4x VAE and a 4x4 patch)."""
    out = tmp_path / "run"
    command = [sys.executable, str(SCRIPTS / "train_world.py"), "--out", str(out), "--smoke", "--vae-space", str(space),
               "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    stages = {json.loads(line)["stage"] for line in (out / "log.jsonl").read_text().splitlines()}
    assert stages == {"vae", "dit", "done"}
    if space == 8:  # run again: the finished VAE and latent stages load, and their recorded time is carried over
        first = done_line(out)
        again = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
        second = done_line(out)
        assert {k: second["stage_seconds"][k] for k in ("vae", "latents")} == \
            {k: first["stage_seconds"][k] for k in ("vae", "latents")}
        assert first["stage_seconds"]["vae"] > 0 and second["stage_seconds"]["dit"] > 0
        assert second["minutes"] == round(sum(second["stage_seconds"].values()) / 60, 1)
    folder = out / "world"
    video = tmp_path / "smoke.mp4"
    result = subprocess.run([sys.executable, "-m", "pfgen", "generate", "--checkpoint", str(folder / "transformer"),
                             "--wan-dir", str(folder), "--config", "tiny", "--policy", "rolling", "--frames", "21",
                             "--threads", "1", "-o", str(video)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    from pfgen.video import decoded_frames

    assert decoded_frames(video) == 21


def test_train_world_mask_is_the_rolling_cache():
    """Each query frame of the training sequence sees exactly what the rolling cache (sink 3 + window 21,
    chunks of 3) holds when that chunk runs: its own chunk (clean queries: clean keys; noisy: noisy keys)
    and the clean frames of earlier chunks that are in the cache."""
    import torch

    rolling_mask = load_script("train_world").rolling_mask

    frames, targets = 27, torch.tensor([3, 4, 5, 24, 25, 26])
    mask = rolling_mask(frames, targets, 1)
    queries = list(range(frames)) + targets.tolist()
    for row, t in enumerate(queries):
        noisy = row >= frames
        end = t // 3 * 3 + 2
        cached = {j for j in range(end + 1) if j < 3 or j > end - 18}
        clean = {j for j in cached if (j // 3 < t // 3) or (not noisy and j // 3 == t // 3)}
        noisy_keys = {frames + i for i, f in enumerate(targets.tolist()) if noisy and f // 3 == t // 3}
        assert set(mask[row].nonzero().flatten().tolist()) == clean | noisy_keys, (row, t)


@pytest.mark.parametrize("space", [8, 4])
def test_train_world_framewise_vae_is_diffusers_own_forward(space):
    """The training-time VAE (train_world.make_framewise: one-tap convolutions, whole clips at once) computes
    what diffusers' own AutoencoderKLWan computes chunk by chunk with the same weights (zero taps on earlier
    frames): the exported VAE is the one that was trained. 17 frames: the first frame alone, then the cached
    4-frame steps; the decoder one latent frame at a time."""
    import torch
    from diffusers import AutoencoderKLWan

    from pfgen.world.model import ARCHITECTURES

    train_world = load_script("train_world")
    decode_clip, encode_clip = train_world.decode_clip, train_world.encode_clip
    init_vae, make_framewise = train_world.init_vae, train_world.make_framewise

    config = ARCHITECTURES[space][0]
    torch.manual_seed(0)
    trained = make_framewise(init_vae(AutoencoderKLWan(**config))).double()  # float64: differences are the code's
    plain = AutoencoderKLWan(**config).double()
    plain.load_state_dict(trained.state_dict())
    x = torch.rand(2, 3, 17, 32, 48, dtype=torch.float64) * 2 - 1
    close = dict(atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        z = plain.encode(x).latent_dist.mode()
        torch.testing.assert_close(trained.encode(x).latent_dist.mode(), z, **close)
        torch.testing.assert_close(encode_clip(trained, x).mode(), z, **close)
        y = plain.decode(z).sample
        torch.testing.assert_close(trained.decode(z).sample, y, **close)
        torch.testing.assert_close(decode_clip(trained, z).clamp(-1, 1), y, **close)
    assert z.shape == (2, 16, 5, 32 // space, 48 // space) and z.std() > 0.1  # He init: the latents carry the input
    assert (y - y[:, :, :1]).abs().amax() > 0.1  # the frames differ, so a mixed-up frame order would show


def test_bench_decoders_tiny(tmp_path):
    report, markdown, _ = run_script("bench_decoders.py", "--tiny", "--chunks", "2", tmp_path=tmp_path)
    assert report["video_frames_per_chunk"] == 12 and len(report["runs_ms"]["tae"]) == 2
    assert report["wan_over_tae"] == report["ms_per_chunk"]["wan"] / report["ms_per_chunk"]["tae"] > 0
    assert "## bench_decoders.py" in markdown and "| 32x48 |" in markdown


def test_train_world_decoder_phase_keeps_the_latent_space(tmp_path, monkeypatch):
    """The VAE's last phase trains the decoder alone: the encoder at its end is the one the phase started with
    (so the latent pool and the DiT do not depend on it), and the decoder did train."""
    import types

    import torch

    train_world = load_script("train_world")

    args = types.SimpleNamespace(out=tmp_path, seed=0, smoke=False, vae_steps=1, recolour_steps=1, object_steps=1,
                                 decoder_steps=2, crop_steps=2, pool=1, text_steps=1, dit_steps=1, dit_batch=1,
                                 window_steps=1, window=9, vae_space=8)
    at_freeze = {}

    def freeze(vae):
        at_freeze.update({k: v.clone() for k, v in vae.state_dict().items()})
        freeze_encoder(vae)

    freeze_encoder = train_world.freeze_encoder
    monkeypatch.setattr(train_world, "freeze_encoder", freeze)
    torch.set_num_threads(1)
    final = train_world.train_vae(train_world.Run(args)).state_dict()
    encoder = [k for k in final if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in final if k.startswith("decoder.") and k.endswith("weight")]
    assert encoder and all(torch.equal(final[k], at_freeze[k]) for k in encoder)
    assert any(not torch.equal(final[k], at_freeze[k]) for k in decoder)



def test_train_world_crops_hold_the_objects(tmp_path):
    """The crop phase's clips are 32x32 cuts centred on the objects (whole frames before and after it): nearly
    every crop holds object pixels, and many more of them than a whole frame's 3-7 %."""
    import types

    import torch

    train_world = load_script("train_world")

    args = types.SimpleNamespace(out=tmp_path, seed=0, smoke=False, vae_steps=1, recolour_steps=0, object_steps=0,
                                 crop_steps=10, decoder_steps=1, pool=1, text_steps=1, dit_steps=0, dit_batch=1,
                                 window_steps=1, window=9, vae_space=8)
    run = train_world.Run(args)
    _, _, crops_from, decoder_from = train_world.vae_phase_starts(run)
    for whole in (crops_from - 1, decoder_from):
        assert train_world.vae_batch(run, whole)[0].shape[-2:] == (train_world.HEIGHT, train_world.WIDTH)
    shares = []
    for step in range(crops_from, crops_from + 10):
        clips, weights = train_world.vae_batch(run, step)
        assert clips.shape == (12, 3, 13, 32, 32) and weights.shape == (12, 1, 13, 32, 32)
        objects = weights[:, 0, 6] > 1  # the middle frame, which the crop is centred on
        shares.append(objects.flatten(1).float().mean(1))
    shares = torch.cat(shares)
    assert (shares > 0).float().mean() > 0.9 and shares.median() > 0.12  # random 32x32 cuts: 0.54 and 0.01


def test_train_world_short_prompt_embedding_is_pfgens_padded_one():
    """Training attends to the prompts' tokens plus one zero token standing for the rest of the padding
    (train_world.PaddedCrossAttention); pfgen runs diffusers' own cross-attention over all 512 tokens. Same
    model otherwise, float64: the same prediction, for prompts of different lengths in one batch."""
    import copy

    import torch
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from transformers import ByT5Tokenizer

    train_world = load_script("train_world")
    from pfgen.wan.text import TEXT_TOKENS
    from pfgen.world.model import WORLD_TRANSFORMER

    torch.manual_seed(0)
    trained, text = train_world.build_dit(WORLD_TRANSFORMER)
    train_world.training_attention(trained)
    plain = copy.deepcopy(trained)
    for block in plain.blocks:
        block.attn2.set_processor(WanAttnProcessor())
    for model in (trained, plain, text):
        model.double().eval()
    train_world.MaskedSelfAttention.mask, train_world.TargetRoPE.targets = None, torch.zeros(0, dtype=torch.long)
    prompts = ["a red ball circling on a navy background",
               "a white triangle bouncing and a cyan square sliding left on a striped gray background"]
    with torch.no_grad():
        short = train_world.encode_text(text, ByT5Tokenizer(), prompts)
        padded = torch.nn.functional.pad(short[:, :-1], (0, 0, 0, TEXT_TOKENS - short.shape[1] + 1))
        x, t = torch.randn(2, 16, 3, 4, 6, dtype=torch.float64), torch.tensor([300.0, 800.0], dtype=torch.float64)
        ours = trained(x, timestep=t, encoder_hidden_states=short, return_dict=False)[0]
        theirs = plain(x, timestep=t, encoder_hidden_states=padded, return_dict=False)[0]
    assert short.shape[1] < 100 and theirs.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)


def test_eval_world_rows_count_every_frame():
    """A world render of 100 frames (not a multiple of the scorer's batch of 64): the row counts all of them,
    gives a window per whole second, and finds the planted ball in every frame."""
    video_row = load_script("eval_world").video_row
    from pfgen.world.grammar import parse
    from pfgen.world.render import WorldVideo
    from pfgen.world.score import WorldTrack

    scene = parse("a red ball resting on a navy background")
    track = WorldTrack(scene)
    for frame in WorldVideo(scene, 0, 64, 96).frames(0, 100):
        track.add(frame)
    row = video_row(track, seconds=100 / 16, wall=1.0)
    assert row["frames"] == 100
    assert len(row["per_second"]["world_objects"]) == 6
    assert row["first_10s"]["objects"] == [1.0] and row["first_10s"]["background"] == 1.0


def test_eval_world_period_target_counts_circling_and_bouncing_only():
    """The issue's motion target is the period of circling and bouncing objects. World renders of a bouncing
    ball (on period), a ball sliding right (on period, but not part of the target) and a resting one: the target
    counts the bouncing ball alone, sliding is reported beside it, the resting ball in neither."""
    eval_world = load_script("eval_world")
    summarize_rows, video_row = eval_world.summarize_rows, eval_world.video_row
    from pfgen.world.grammar import parse
    from pfgen.world.render import WorldVideo
    from pfgen.world.score import WorldTrack

    rows = []
    for prompt in ("a red ball bouncing and a white ball sliding right on a navy background",
                   "a red ball resting on a black background"):
        track = WorldTrack(parse(prompt))
        for frame in WorldVideo(parse(prompt), 0, 64, 96).frames(0, 160):
            track.add(frame)
        rows.append(video_row(track, seconds=10, wall=1.0))
    summary = summarize_rows(rows)
    assert summary["period_within_15pct"] == {"share": 1.0, "objects": 1, "tracked": 1}
    assert summary["sliding_period_within_15pct"] == {"share": 1.0, "objects": 1, "tracked": 1}


def test_eval_world_paired_differences_are_per_pair():
    """Planted rows: pyramid is 0.1 above rolling on every pair's background while the pairs themselves spread
    from 0 to 0.9, so the per-pair difference is exactly 0.1 with a zero-width interval; full is below on one
    object and equal elsewhere."""
    import numpy as np

    paired_differences = load_script("eval_world").paired_differences

    def row(background, objects):
        return {"last_10s": {"background": background, "objects": objects, "spurious": 0.01, "stability": 0.9}}

    base = [0.0, 0.3, 0.6, 0.8]
    policies = {"rolling": {"rows": [row(b, [0.5, 0.2]) for b in base]},
                "pyramid": {"rows": [row(b + 0.1, [0.5, 0.2]) for b in base]},
                "full": {"rows": [row(b, [0.5, 0.1 if i == 0 else 0.2]) for i, b in enumerate(base)]}}
    paired = paired_differences(policies)
    assert set(paired) == {"pyramid-rolling", "full-rolling"}
    background = paired["pyramid-rolling"]["background"]
    assert np.isclose(background["mean"], 0.1) and np.isclose(background["low"], 0.1)
    assert np.isclose(background["high"], 0.1)
    assert (background["above"], background["below"], background["equal"]) == (4, 0, 0)
    objects = paired["full-rolling"]["objects"]  # the worse object of each video
    assert np.isclose(objects["mean"], -0.025) and (objects["above"], objects["below"], objects["equal"]) == (0, 1, 3)
    assert paired["pyramid-rolling"]["stability"]["equal"] == 4


def test_eval_world_set_changes_one_config_key_and_checks_it():
    """`--set KEY=VALUE` replaces that key alone (nested keys included), coerced as a config file's value is (an
    int for a float key); an unknown key, a value of the wrong type and a value the config's rules refuse each
    stop with a message naming the item."""
    import pytest

    from pfgen.config import load_config

    with_settings = load_script("eval_world").with_settings
    base = load_config("tiny")
    cfg = with_settings(base, ["cache.pyramid.rope_window=8", "cache.rolling.window=9"])
    assert (cfg.cache.pyramid.rope_window, cfg.cache.rolling.window) == (8, 9)
    assert cfg.cache.pyramid.anchor == base.cache.pyramid.anchor and cfg.video == base.video
    assert with_settings(base, []) == base
    shift = with_settings(base, ["sampling.shift=7"]).sampling.shift
    assert shift == 7.0 and isinstance(shift, float)
    for item, says in (("cache.pyramid.nope=3", "unknown key 'cache.pyramid.nope'"),
                       ("cache.pyramid.rope_window=x", "must be int"), ("cache.pyramid=3", "must be a mapping"),
                       ("cache.rolling.window.x=2", "no keys below"), ("cache.pyramid.rope_window=0", "positive")):
        with pytest.raises(SystemExit, match=says) as stop:
            with_settings(base, [item])
        assert str(stop.value).startswith("error: --set")


def test_eval_world_vae_counts_what_survives_the_round_trip(monkeypatch):
    """eval_world vae against planted VAEs: one that lifts every pixel by 0.01 (1.275 8-bit levels, so 1 after
    rounding: PSNR exactly 20 log10 255 = 48.13 dB, and every object is kept as rendered), and one that paints
    every frame its top-left pixel's colour (no object survives)."""
    import types

    import torch

    eval_world = load_script("eval_world")

    def planted(decode):
        def encode(x):
            return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mode=lambda: x))

        return types.SimpleNamespace(vae=types.SimpleNamespace(
            encode=encode, decode=lambda z: types.SimpleNamespace(sample=decode(z))))

    args = types.SimpleNamespace(pairs=3)
    monkeypatch.setattr(eval_world, "load", lambda _: planted(lambda z: z + 0.01))
    lifted = eval_world.cmd_vae(args)
    assert abs(lifted["vae_psnr_db"]["mean"] - 20 * math.log10(255)) < 1e-9
    for split in ("heldout", "train"):
        kept = lifted[split]
        assert kept["rendered_present"]["mean"] > 0.9
        assert kept["present"]["mean"] == kept["shape"]["mean"] == kept["rendered_present"]["mean"]
    monkeypatch.setattr(eval_world, "load", lambda _: planted(lambda z: z[..., :1, :1].expand_as(z)))
    flat = eval_world.cmd_vae(args)
    assert all(flat[split][k]["mean"] == 0 for split in ("heldout", "train") for k in ("blob", "shape", "present"))
    assert all(flat[split]["rendered_present"]["mean"] > 0.9 for split in ("heldout", "train"))


def test_eval_world_sample_shares_over_frames_and_objects(monkeypatch):
    """eval_world sample on planted videos: the world's render with every odd frame painted flat in its top-left
    pixel's colour (a background colour: no object there). Each share equals the scorer's own per-frame figures
    of those frames, averaged over frames and objects; the flat frames halve the objects, not the background."""
    import types

    import numpy as np

    from pfgen.world.grammar import parse
    from pfgen.world.render import WorldVideo
    from pfgen.world.score import BACKGROUND_OK, WorldTrack, score_frames

    eval_world = load_script("eval_world")
    planted = {}

    def run_video(pipe, prompt, seed, seconds, policy):
        assert policy == "rolling" and seconds == 2.0
        frames = WorldVideo(parse(prompt), seed, 64, 96).frames(0, 33).copy()
        frames[1::2] = frames[1::2, :1, :1]
        planted[prompt] = frames
        track = WorldTrack(parse(prompt))
        for frame in frames:
            track.add(frame)
        return track, 0.5

    monkeypatch.setattr(eval_world, "load", lambda _: None)
    monkeypatch.setattr(eval_world, "run_video", run_video)
    out = eval_world.cmd_sample(types.SimpleNamespace(pairs=4, split="train", seconds=2.0, policy=None))
    assert [r["prompt"] for r in out["rows"]] == [p for p, _ in eval_world.scene_pairs(4, "train")]
    for row in out["rows"]:
        scores = score_frames(planted[row["prompt"]], parse(row["prompt"]))
        assert row["frames"] == 33
        assert row["background"] == np.mean(scores.background_accuracy >= BACKGROUND_OK) == 1.0
        assert row["present"] == np.mean(scores.present) <= 17 / 33
        assert row["blob"] == np.mean(~np.isnan(scores.centres[..., 0])) >= row["present"]
    assert out["present"]["mean"] > 0.4


def test_world_frames_tiles_every_nth_frame_in_rows(tmp_path, monkeypatch):
    """Two planted mp4s of flat grey frames (frame n at level 8 n, and 255 - 8 n): one row each, frames 0, 4
    and 8 (every 0.25 s at 16 fps, three of them) left to right, each scaled 1.5x."""
    import numpy as np
    from PIL import Image

    from pfgen.video import Mp4Writer

    world_frames = load_script("world_frames")
    videos = []
    for name, level in (("up", lambda n: 8 * n), ("down", lambda n: 255 - 8 * n)):
        path = tmp_path / f"{name}.mp4"
        with Mp4Writer(path, 32, 16, 16) as writer:
            writer.write(np.stack([np.full((16, 32, 3), level(n), np.uint8) for n in range(20)]))
        videos.append(path)
    monkeypatch.setattr(sys, "argv", ["world_frames", *map(str, videos), "--every", "0.25", "--count", "3",
                                      "-o", str(tmp_path / "f.png")])
    world_frames.main()
    image = np.asarray(Image.open(tmp_path / "f.png").convert("L"), dtype=np.float64)
    assert image.shape == (48, 144)
    for r, level in enumerate((lambda n: 8 * n, lambda n: 255 - 8 * n)):
        for c, n in enumerate((0, 4, 8)):
            tile = image[24 * r + 4:24 * r + 20, 48 * c + 4:48 * c + 44]
            assert abs(tile.mean() - level(n)) < 4, (r, c, tile.mean())


def test_eval_world_switch_row_times_the_new_colour_and_the_jump():
    """A planted switch at 1 s: a red ball resting, 8 more red frames, then a blue ball resting elsewhere. The new
    colour shows 0.5 s after the switch, and the jump is the distance between the two balls' centres (the
    centroids of their exact palette colours); a video that never shows it has no time and no jump."""
    import numpy as np

    from pfgen.world.grammar import parse
    from pfgen.world.render import WorldVideo
    from pfgen.world.score import WorldTrack

    switch_row = load_script("eval_world").switch_row
    old, new = "a red ball resting on a navy background", "a blue ball resting on a navy background"
    red, blue = (WorldVideo(parse(p), 3, 64, 96).frames(0, 40) for p in (old, new))

    def row(frames):
        tracks = WorldTrack(parse(new)), WorldTrack(parse(old))
        for frame in frames:
            for track in tracks:
                track.add(frame)
        return switch_row(*tracks, at_s=1.0, width=96)

    def centre(frame, colour):
        ys, xs = np.nonzero((frame == colour).all(-1))
        return np.array([xs.mean(), ys.mean()])

    jump = np.hypot(*(centre(blue[24], (40, 90, 230)) - centre(red[15], (230, 40, 40)))) / 96
    switched = row(np.concatenate([red[:24], blue[24:]]))
    assert switched["changed_after_s"] == 0.5 and jump > 0.1
    assert abs(switched["jump_share_of_width"] - jump) < 1 / 96
    assert row(red) == {"changed_after_s": None, "jump_share_of_width": None}


def test_train_world_window_sets_how_much_history_training_shows(tmp_path, monkeypatch):
    """--window W: a window-phase sample is W latent frames of its clip, every chunk a target (so the oldest
    history a chunk reads is W - 3 frames back); a W that is not a whole number of chunks, or longer than the
    clips, is refused before anything runs."""
    import numpy as np
    import pytest
    import torch
    from transformers import ByT5Tokenizer

    train_world = load_script("train_world")
    seen, real = [], train_world.rolling_mask
    monkeypatch.setattr(train_world, "rolling_mask",
                        lambda frames, targets, tokens: seen.append((frames, targets.tolist())) or real(frames, targets, tokens))
    transformer, text = train_world.build_dit(train_world.ARCHITECTURES[8][1])
    train_world.training_attention(transformer)
    latents = torch.randn(1, 16, train_world.CLIP_LATENTS, 8, 12)
    loss = train_world.dit_loss(transformer, text, ByT5Tokenizer(), latents, ["a red ball resting on a navy background"],
                                np.random.default_rng(0), window=15)
    assert torch.isfinite(loss) and seen == [(15, list(range(15)))]
    for bad in ("10", "30", "3"):
        with pytest.raises(SystemExit):
            train_world.main(["--out", str(tmp_path / "run"), "--window", bad])
    assert not (tmp_path / "run").exists()
