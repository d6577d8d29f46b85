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
from writes import failing_writes
from clirun import run_cli


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
    code, _, err = run_cli(["generate", "--policy", "pyramid", "--heads", str(work / "heads.json"), "--seconds", "1",
                         "--height", "32", "--width", "48", "-o", str(tmp_path / "v.mp4")], capsys)
    assert code == 0, err
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_from_stats_reproduces_exactly(profiled, capsys):
    work, _ = profiled
    code, _, err = run_cli(["profile-heads", "--from-stats", str(work / "stats.safetensors"),
                         "-o", str(work / "again.json")], capsys)
    assert code == 0, err
    assert json.loads((work / "again.json").read_text()) == json.loads((work / "heads.json").read_text())


def test_rerun_resumes_from_saved_prompts(profiled, capsys, monkeypatch):
    work, args = profiled
    import pfgen.profile.calibrate as calibrate

    def fail(*_):
        raise AssertionError("a finished prompt was profiled again")

    monkeypatch.setattr(calibrate, "_profile_one", fail)
    code, _, err = run_cli([*args, "-y"], capsys)  # the same outputs again: replacing them is asked for
    assert code == 0, err


def test_threshold_override_moves_boundary(profiled, capsys):
    """veil_max_middle above every head's middle ratio (and no waves) makes every head veil."""
    work, _ = profiled
    code, _, _ = run_cli(["profile-heads", "--from-stats", str(work / "stats.safetensors"), "-o",
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
    ("other_model", "statistics are for model 'random'"),
    ("binary_prompts", "is not UTF-8 text"),
    ("binary_compare", "not a text file (not UTF-8)"),
    ("no_sink", "its metadata has no valid 'sink' (None)"),
    ("garbage_stats", "is not a pfgen statistics file (safetensors with frame_logits)"),
    ("other_safetensors", "is not a pfgen statistics file (safetensors with frame_logits)"),
    ("too_short_stats", "cannot classify these statistics: no history to profile"),
    ("stats_out_from_stats", "--from-stats has none to write"),
])
def test_profile_heads_bad_input(case, message, profiled, tmp_path, capsys):
    work, _ = profiled
    out = ["-o", str(tmp_path / "h.json")]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    bad = tmp_path / "bad.safetensors"
    meta = {"format": "pfgen.head-stats/1", "layers": 4, "heads": 4, "frames": 9, "window": 21, "sink": 3}
    save_file({"frame_logits": torch.zeros(4, 4, 8, 8)}, str(bad), metadata={"pfgen": json.dumps(meta)})
    no_sink = tmp_path / "no_sink.safetensors"
    save_file({"frame_logits": torch.zeros(4, 4, 9, 9)}, str(no_sink),
              metadata={"pfgen": json.dumps({k: v for k, v in meta.items() if k != "sink"})})
    short = tmp_path / "short.safetensors"
    save_file({"frame_logits": torch.zeros(4, 4, 5, 5)}, str(short),
              metadata={"pfgen": json.dumps({**meta, "frames": 5})})
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    args = {
        "empty_prompts": ["--prompts", str(empty)],
        "missing_prompts": ["--prompts", str(tmp_path / "none.txt")],
        "short": ["--seconds", "0.1"],
        "threshold": ["-t", "nope=1", "--from-stats", str(work / "stats.safetensors")],
        "bad_stats": ["--from-stats", str(bad)],
        "other_model": ["--from-stats", str(work / "stats.safetensors"), "--config", "self-forcing"],
        "binary_prompts": ["--prompts", str(garbage)],
        "binary_compare": ["--from-stats", str(work / "stats.safetensors"), "--compare", str(garbage)],
        "no_sink": ["--from-stats", str(no_sink)],
        "garbage_stats": ["--from-stats", str(garbage)],
        "other_safetensors": ["--from-stats", str(other)],
        "too_short_stats": ["--from-stats", str(short)],
        "stats_out_from_stats": ["--from-stats", str(work / "stats.safetensors"), "--stats-out",
                                 str(tmp_path / "s.safetensors")],
    }[case]
    code, _, err = run_cli(["profile-heads", *args, *out], capsys)
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "h.json").exists()


def fake_profile(calls):
    """Stands in for one prompt's calibration run (no model forward): zeros of the right shape."""
    def run(pipe, prompt, latent_frames, seed, size, on_chunk):
        calls.append((prompt, seed, latent_frames, size))
        return torch.zeros(pipe.layers, pipe.heads, latent_frames, latent_frames)
    return run


def test_parts_are_keyed_on_every_capture_setting(profiled, tmp_path, capsys, monkeypatch):
    """A rerun with another seed, size or length never reuses the saved parts; the original settings still do."""
    work, args = profiled
    import pfgen.profile.calibrate as calibrate

    parts = tmp_path / "parts"
    shutil.copytree(work / "heads.parts", parts)
    saved = sorted(p.name for p in parts.iterdir())
    calls = []
    monkeypatch.setattr(calibrate, "_profile_one", fake_profile(calls))
    base = [a for a in args if a != "--stats-out"]
    base = base[:base.index(str(work / "stats.safetensors"))] + base[base.index("--plot"):]
    base = [*base[:base.index("-o")], "-o", str(tmp_path / "h.json"), "--work-dir", str(parts), "-y",
            *base[base.index("-o") + 2:]]  # each rerun replaces the head file
    for stale, (change, value) in enumerate((("--seed", "5"), ("--height", "64"), ("--seconds", "3")), 1):
        calls.clear()
        code, _, err = run_cli([*base, change, value], capsys)
        assert code == 0, err
        assert len(calls) == 2, change  # both prompts profiled again
        assert f"ignoring {2 * stale} saved parts" in " ".join(err.split()) and "other settings" in err
        capture = json.loads((tmp_path / "h.json").read_text())["calibration"]["capture"]
        assert str(capture[change.lstrip("-")]) in (value, f"{float(value)}")
    calls.clear()
    code, _, err = run_cli(base, capsys)  # the original settings: their parts are still there and reused
    assert code == 0 and calls == [] and "ignoring 6 saved parts" in " ".join(err.split())
    assert set(saved) <= {p.name for p in parts.iterdir()}


def test_parts_are_removed_after_success(tmp_path, capsys, monkeypatch):
    import pfgen.profile.calibrate as calibrate

    calls = []
    monkeypatch.setattr(calibrate, "_profile_one", fake_profile(calls))
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\n")
    code, _, err = run_cli(["profile-heads", "--prompts", str(prompts), "--seconds", "2", "--height", "32",
                         "--width", "48", "-o", str(tmp_path / "h.json")], capsys)
    assert code == 0, err
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["h.json", "p.txt"]


def test_compare_is_checked_before_anything_is_written(profiled, tmp_path, capsys, monkeypatch):
    work, _ = profiled
    reference = tmp_path / "ref.json"
    shutil.copy(work / "heads.json", reference)
    before = reference.read_bytes()
    stats = ["--from-stats", str(work / "stats.safetensors")]
    code, _, err = run_cli(["profile-heads", *stats, "-o", str(reference), "--compare", str(reference)], capsys)
    assert code == 1 and "--output and --compare are the same file" in err and err.count("\n") == 1
    code, _, err = run_cli(["profile-heads", *stats, "-o", str(tmp_path / "." / "ref.json"), "--compare",
                         str(reference)], capsys)
    assert code == 1 and "same file" in err
    assert reference.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ref.json"]
    # a --compare file of another model fails after the model loads, before any calibration run
    import pfgen.profile.calibrate as calibrate

    monkeypatch.setattr(calibrate, "_profile_one", fake_profile(calls := []))
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n")
    code, _, err = run_cli(["profile-heads", "--prompts", str(prompts), "--seconds", "2", "--height", "32",
                         "--width", "48", "-o", str(tmp_path / "h.json"), "--compare",
                         "configs/heads/self-forcing-1.3b.json"], capsys)
    assert code == 1 and "is for a 30x12 model" in err and calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt", "ref.json"]


# safetensors writes --stats-out from Rust, out of the reach of failing_writes: "full" is checked on the others
@pytest.mark.parametrize("option, error", [("-o", "read-only"), ("-o", "full"), ("--stats-out", "read-only"),
                                           ("--plot", "read-only"), ("--plot", "full")])
def test_unwritable_output_folder(option, error, profiled, tmp_path, capsys, monkeypatch):
    work, _ = profiled
    bad = tmp_path / "bad"
    bad.mkdir()
    name = {"-o": "h.json", "--stats-out": "s.safetensors", "--plot": "h.png"}[option]
    paths = {"-o": tmp_path / "h.json", option: bad / name}
    args = ["profile-heads", "--from-stats", str(work / "stats.safetensors")]
    if option == "--stats-out":  # only a calibration run writes statistics
        args = ["profile-heads", "--seconds", "2"]
    failing_writes(monkeypatch, bad, error)
    code, _, err = run_cli([*args, *(a for k, v in paths.items() for a in (k, str(v)))], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    reason = "Read-only file system" if error == "read-only" else "No space left on device"
    assert f"cannot write {bad if error == 'read-only' else bad / name}: {reason}" in err
    assert list(bad.iterdir()) == []


def test_compare_takes_the_reference_file_as_the_truth(profiled, capsys, tmp_path):
    """--compare REF: rows are REF's labels, recall = share of REF's heads of a type the new labels find,
    precision = share of the new labels of a type REF confirms. New labels all veil (thresholds), REF: layer 0
    anchor, the rest veil -> veil recall 100 %, precision 75 %; anchor recall 0 %, no precision."""
    work, _ = profiled
    reference = tmp_path / "published.json"
    HeadTypes.from_rows([["anchor"] * 4] + [["veil"] * 4] * 3, "tiny").save(reference)
    code, _, err = run_cli(["profile-heads", "--from-stats", str(work / "stats.safetensors"), "-o",
                            str(tmp_path / "new.json"), "-t", "veil_max_middle=1e9", "-t", "anchor_min_middle=1e9",
                            "-t", "min_periodic_energy=1", "--compare", str(reference)], capsys)
    assert code == 0, err
    cells = [line.replace("│", " ").split() for line in err.splitlines()]  # the confusion table's rows
    rows = {c[0]: c[1:] for c in cells if c[:1] in (["anchor"], ["wave"], ["veil"])}
    assert rows["anchor"] == ["0", "0", "4", "0%", "-"] and rows["veil"] == ["0", "0", "12", "100%", "75%"]
    assert "agreement with " in err and "75.0% of 16 heads" in err
    assert err.splitlines()[-1] == f"wrote {tmp_path / 'new.json'}: 0 anchor, 0 wave, 16 veil of 16 heads"


def test_profile_outputs_follow_the_overwrite_rule(profiled, capsys, tmp_path):
    work, _ = profiled
    stats = ["profile-heads", "--from-stats", str(work / "stats.safetensors")]
    for option, name in (("-o", "h.json"), ("--plot", "h.png")):
        taken = tmp_path / name
        taken.write_text("mine")
        others = ["-o", str(tmp_path / "other.json")] if option != "-o" else []
        code, _, err = run_cli([*stats, *others, option, str(taken)], capsys)
        assert code == 1 and f"{taken} already exists (pass --overwrite (-y)" in err and taken.read_text() == "mine"
        code, _, err = run_cli([*stats, *others, option, str(taken), "-y"], capsys)
        assert code == 0, err
        assert taken.read_bytes() != b"mine"


def test_profile_heads_takes_threads(capsys, tmp_path):
    code, _, err = run_cli(["profile-heads", "-o", str(tmp_path / "h.json"), "--threads", "0"], capsys)
    assert code == 1 and "--threads must be at least 1" in err


def test_too_short_a_calibration_is_refused_before_it_runs(tmp_path, capsys, monkeypatch):
    """--seconds 1 on the tiny model gives 6 latent frames, 2 chunks: the old check (2 chunks) let it through, the
    whole calibration ran, and only the classifier said "no history to profile" (leaving --stats-out behind). The
    check is now the classifier's own, before the model loads; the length it suggests passes it."""
    import pfgen.pipeline

    def loaded(*_, **__):
        raise pfgen.errors.PfgenError("the model loads now")

    monkeypatch.setattr(pfgen.pipeline, "load_pipeline", loaded)
    (tmp_path / "p.txt").write_text("a red kite\n")
    args = ["profile-heads", "--prompts", tmp_path / "p.txt", "--height", "32", "--width", "48", "-o",
            tmp_path / "h.json", "--stats-out", tmp_path / "s.safetensors"]
    code, _, err = run_cli([*args, "--seconds", "1"], capsys)
    assert code == 1 and err.strip() == ("error: --seconds 1 gives 6 latent frames: no history to profile (the "
                                         "classifier needs 7) (use --seconds 1.75 or more (the published recipe "
                                         "uses 15 s))")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]
    code, _, err = run_cli([*args, "--seconds", "1.75"], capsys)
    assert code == 1 and "the model loads now" in err
