"""profile-heads: logit capture against materialised scores, end to end on the tiny model, bad inputs."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

import pfgen
from pfgen.cli import main
from pfgen.heads import HeadTypes
from pfgen.profile.capture import LogitRecorder


class NaiveScores:
    """Materialises every score q_i . k_j / sqrt(d) of the noisy passes and averages per frame pair."""

    def __init__(self, cache, layers, heads, frames):
        self.cache = cache
        self.sum = torch.zeros(layers, heads, frames, frames, dtype=torch.float64)
        self.count = torch.zeros(frames, frames)

    def __call__(self, layer, q_abs, k_abs, plan, committing):
        if committing:
            return
        store = self.cache.stores[layer]["rolling"]
        rule = self.cache.rules["rolling"]
        n = store.frame_tokens
        for f, read in enumerate(plan.rules["rolling"].reads):
            q = q_abs[0, f * n:(f + 1) * n].double()  # (N, H, D)
            for t in sorted({t for seg in read.segments for t in seg.frames}):
                if t >= plan.t0:
                    k = k_abs[0, (t - plan.t0) * n:(t - plan.t0 + 1) * n].double()
                else:
                    slot = rule._slot(t)
                    k = store.k_abs[0, slot * n:(slot + 1) * n].double()
                scores = torch.einsum("ihd,jhd->hij", q, k) / q.shape[-1] ** 0.5
                self.sum[layer, :, plan.t0 + f, t] += scores.mean(dim=(1, 2))
                if layer == 0:
                    self.count[plan.t0 + f, t] += 1


def test_capture_equals_naive_scores():
    pipe = pfgen.load_pipeline()
    frames = 27  # past the 21-frame window, so eviction and the sink are exercised
    recorder = LogitRecorder(pipe.layers, pipe.heads, frames, "cpu")
    naive = NaiveScores(pipe.make_cache("rolling", None, 1, (4, 6), frames), pipe.layers, pipe.heads, frames)

    def observer(*args):
        recorder(*args)
        naive(*args)

    list(pipe.stream("a kite", num_frames=1 + 4 * (frames - 1), policy="rolling", height=32, width=48,
                     generator=torch.Generator().manual_seed(0), decode=False, observer=observer))
    assert naive.cache is pipe.state.cache
    got = recorder.frame_logits().double()
    want = torch.where(naive.count > 0, naive.sum / naive.count.clamp(min=1), torch.nan)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert (~torch.isnan(got[0, 0, 26])).sum() == 21  # rolling-21: 3 sink + 18 latest frames
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=1e-5, rtol=1e-5)


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return info.value.code, captured.err


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    work = tmp_path_factory.mktemp("profile")
    prompts = work / "prompts.txt"
    prompts.write_text("a red kite\n\n# a comment\na cat on a sofa\n")
    args = ["profile-heads", "--prompts", str(prompts), "--seconds", "2", "--height", "32", "--width", "48",
            "-o", str(work / "heads.json"), "--stats-out", str(work / "stats.safetensors"),
            "--plot", str(work / "heads.png"), "--keep-parts"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 0
    return work, args


def test_profile_heads_end_to_end(profiled, capsys, tmp_path):
    work, _ = profiled
    heads = HeadTypes.load(work / "heads.json")
    assert (heads.layers, heads.heads) == (4, 4)
    calibration = json.loads((work / "heads.json").read_text())["calibration"]
    assert calibration["prompts"] == ["a red kite", "a cat on a sofa"]
    assert set(calibration["thresholds"]) >= {"min_flip_rate", "min_periodic_energy"}
    assert len(calibration["heads"]) == 4 and "flip_rate" in calibration["heads"][0][0]
    assert (work / "heads.png").read_bytes()[:4] == b"\x89PNG"
    names = sorted(p.name for p in (work / "heads.parts").iterdir())
    assert [re.fullmatch(r"prompt-000[01]-[0-9a-f]{16}\.safetensors", n) is not None for n in names] == [True] * 2
    code, err = run_cli(["generate", "--policy", "pyramid", "--heads", str(work / "heads.json"), "--seconds", "1",
                         "--height", "32", "--width", "48", "-o", str(tmp_path / "v.mp4")], capsys)
    assert code == 0, err
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_from_stats_reproduces_exactly(profiled, capsys):
    work, _ = profiled
    code, err = run_cli(["profile-heads", "--from-stats", str(work / "stats.safetensors"),
                         "-o", str(work / "again.json")], capsys)
    assert code == 0, err
    assert json.loads((work / "again.json").read_text()) == json.loads((work / "heads.json").read_text())


def test_rerun_resumes_from_saved_prompts(profiled, capsys, monkeypatch):
    work, args = profiled
    import pfgen.profile.calibrate as calibrate

    def fail(*_):
        raise AssertionError("a finished prompt was profiled again")

    monkeypatch.setattr(calibrate, "_profile_one", fail)
    code, err = run_cli(args, capsys)
    assert code == 0, err


def test_threshold_override_moves_boundary(profiled, capsys):
    """veil_max_middle above every head's middle ratio (and no waves) makes every head veil."""
    work, _ = profiled
    code, _ = run_cli(["profile-heads", "--from-stats", str(work / "stats.safetensors"), "-o",
                       str(work / "veil.json"), "-t", "veil_max_middle=1e9", "-t", "anchor_min_middle=1e9",
                       "-t", "min_periodic_energy=1"], capsys)
    assert code == 0
    assert HeadTypes.load(work / "veil.json").counts()["veil"] == 16


@pytest.mark.parametrize("case, message", [
    ("empty_prompts", "holds no prompts"),
    ("missing_prompts", "prompts file not found"),
    ("short", "no history to profile"),
    ("threshold", "unknown threshold 'nope'"),
    ("bad_stats", "frame_logits has shape"),
    ("other_model", "statistics are for model 'tiny'"),
])
def test_profile_heads_bad_input(case, message, profiled, tmp_path, capsys):
    work, _ = profiled
    out = ["-o", str(tmp_path / "h.json")]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    bad = tmp_path / "bad.safetensors"
    meta = {"format": "pfgen.head-stats/1", "layers": 4, "heads": 4, "frames": 9, "window": 21, "sink": 3}
    save_file({"frame_logits": torch.zeros(4, 4, 8, 8)}, str(bad), metadata={"pfgen": json.dumps(meta)})
    args = {
        "empty_prompts": ["--prompts", str(empty)],
        "missing_prompts": ["--prompts", str(tmp_path / "none.txt")],
        "short": ["--seconds", "0.1"],
        "threshold": ["-t", "nope=1", "--from-stats", str(work / "stats.safetensors")],
        "bad_stats": ["--from-stats", str(bad)],
        "other_model": ["--from-stats", str(work / "stats.safetensors"), "--config", "self-forcing"],
    }[case]
    code, err = run_cli(["profile-heads", *args, *out], capsys)
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "h.json").exists()
