"""`pfgen evaluate` against synthetic mp4s with planted defects: each metric flags its defect in the window
where it starts and nothing in the stable video; pairing, differences, the CLI's outputs and bad inputs."""

import json
import shutil
import string
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")  # the evaluate extra, installed by the test extra

from pfgen.evaluate.metrics import METRICS, flagged, summarize  # noqa: E402
from pfgen.evaluate.run import EvaluateRequest, evaluate  # noqa: E402
from pfgen.evaluate.videos import select_videos  # noqa: E402
from clirun import run_cli

FPS, W, H = 16, 96, 64
SECONDS = 20  # four 5 s windows
SPEED = 1  # pixels per frame of the translating texture
DEFECTS = ("stable", "ramp", "freeze", "blur", "loop", "flicker")


def texture(seconds, seed=0):
    """A smooth random colour texture wide enough to translate across for the whole video (never repeats)."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.random((H, W + seconds * FPS * SPEED + 1, 3)).astype(np.float32), (0, 0), 1.5)
    return np.clip(125 + 30 * (noise - noise.mean()) / noise.std(), 0, 255).astype(np.float32)


def frames(kind, seconds=SECONDS):
    """The stable scene (texture moving SPEED px/frame) with one planted defect."""
    canvas = texture(seconds)
    for t in range(seconds * FPS):
        s = t / FPS
        src = {"freeze": min(t, 5 * FPS), "loop": t % (5 * FPS)}.get(kind, t)  # frozen after 5 s; a 5 s loop
        frame = canvas[:, src * SPEED:src * SPEED + W].copy()
        if kind == "ramp" and s > 10:
            frame += (s - 10) * 8  # brighter by 8 luma levels per second from 10 s
        if kind == "blur" and s > 10:
            frame = cv2.GaussianBlur(frame, (0, 0), (s - 10) * 0.6)  # blur sigma grows 0.6 px/s from 10 s
        if kind == "flicker" and s >= 10:
            frame += 8 * (-1) ** t  # +-8 luma alternating frame to frame from 10 s
        yield np.clip(frame, 0, 255).round().astype(np.uint8)


def write_mp4(path, video_frames, *extra):
    writer = imageio_ffmpeg.write_frames(str(path), (W, H), fps=FPS, codec="libx264", macro_block_size=1,
                                         quality=None, output_params=["-crf", "10", *extra], pix_fmt_out="yuv420p",
                                         ffmpeg_log_level="error")
    writer.send(None)
    for frame in video_frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    videos = {kind: write_mp4(folder / f"{kind}.mp4", frames(kind)) for kind in DEFECTS}
    videos["short"] = write_mp4(folder / "short.mp4", frames("stable", seconds=5))  # for videos never compared
    return videos


@pytest.fixture(scope="module")
def results(planted):
    result = evaluate(EvaluateRequest(tuple(planted[kind] for kind in DEFECTS)))
    return {kind: video for kind, video in zip(DEFECTS, result["videos"])}


def flags(video, metric):
    windows = video["windows"]
    return [flagged(metric, w[metric], windows[0][metric]) for w in windows]




def test_stable_video_flags_nothing(results):
    stable = results["stable"]
    assert [w["start_s"] for w in stable["windows"]] == [0, 5, 10, 15]
    for metric in METRICS:
        assert not any(flags(stable, metric)), metric
        assert stable["summary"][metric]["flagged_from_s"] is None
    for window in stable["windows"]:  # the planted motion is measured
        assert window["motion"] == pytest.approx(SPEED, abs=0.1)


@pytest.mark.parametrize("kind, metric, first", [
    ("ramp", "brightness", 2),
    ("ramp", "color_drift", 2),
    ("flicker", "flicker", 2),
    ("blur", "sharpness", 2),
    ("freeze", "motion", 1),
    ("loop", "repetition", 2),
])
def test_each_metric_flags_its_defect_from_the_window_where_it_starts(results, kind, metric, first):
    video, stable = results[kind], results["stable"]
    assert flags(video, metric) == [i >= first for i in range(4)]
    assert video["summary"][metric]["flagged_from_s"] == first * 5
    before = video["windows"][first - 1][metric]
    if before is not None:  # repetition has no value before window 2
        assert before == pytest.approx(stable["windows"][first - 1][metric], rel=0.25, abs=0.3)


@pytest.mark.parametrize("kind, metric", [("ramp", "flicker"), ("ramp", "motion"), ("blur", "repetition"),
                                          ("loop", "motion"), ("flicker", "brightness"), ("freeze", "sharpness")])
def test_a_defect_is_not_mistaken_for_another(results, kind, metric):
    """A smooth ramp is not flicker, a loop still moves, a blur is not a loop, flicker keeps the mean luma."""
    assert not any(flags(results[kind], metric))


def test_summary_first_last_slope_and_worst():
    windows = [{"start_s": 0.0, "motion": 3.0}, {"start_s": 5.0, "motion": 2.0}, {"start_s": 10.0, "motion": 1.0},
               {"start_s": 15.0, "motion": 0.01}]
    summary = summarize(windows, {"motion": -1})["motion"]
    assert summary["first"] == 3.0 and summary["last"] == 0.01
    assert summary["slope_per_min"] == pytest.approx(-11.964, abs=1e-9)  # least squares, per minute
    assert summary["worst"] == {"start_s": 15.0, "value": 0.01}
    assert summary["flagged_from_s"] == 15.0


def test_summary_of_the_ramp(results):
    ramp = results["ramp"]["summary"]["brightness"]
    assert ramp["slope_per_min"] > 100  # +8 luma/s for the last 10 s
    assert ramp["worst"]["start_s"] == 15.0 and ramp["last"] > ramp["first"] + 40


def test_identical_videos_give_zero_difference(planted, tmp_path):
    copy = shutil.copy(planted["loop"], tmp_path / "copy.mp4")
    result = evaluate(EvaluateRequest((planted["loop"], copy)))
    (comparison,) = result["comparisons"]
    assert len(comparison["windows"]) == 4 and comparison["common_s"] == 20
    for window in comparison["windows"]:
        for metric in METRICS:
            assert window[metric] is None or abs(window[metric]) < 1e-9
    assert result["warnings"] == []


def batch_folder(root, planted, policies=("rolling", "pyramid")):
    """`pfgen generate --policies rolling,pyramid` layout: shared, first-policy-only and second-policy-only
    videos, and the manifest (sorted by file, as batch mode writes it)."""
    first, second = policies
    for policy, names in ((first, ("kite", f"only-{first}")), (second, ("kite", f"only-{second}"))):
        (root / policy).mkdir(parents=True)
        for name in names:
            source = {"kite": planted["loop" if policy == second else "stable"]}.get(name, planted["short"])
            shutil.copy(source, root / policy / f"{name}.mp4")
    (root / first / ".kite.123-abc.partial.mp4").write_bytes(b"half a video")  # in progress: ignored
    lines = [{"file": f"{p}/kite.mp4", "policy": p, "prompt": "a red kite over the sea"} for p in sorted(policies)]
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_batch_folder_pairs_policies_by_name(planted, tmp_path):
    out = batch_folder(tmp_path / "out", planted)
    selection = select_videos([out])
    assert sorted(v.label for v in selection.videos) == ["pyramid/kite", "pyramid/only-pyramid", "rolling/kite",
                                                         "rolling/only-rolling"]
    (kite,) = selection.comparisons
    assert kite.name == "kite" and [v.label for v in kite.videos] == ["rolling/kite", "pyramid/kite"]
    assert kite.videos[0].prompt == "a red kite over the sea"
    assert len(selection.warnings) == 2
    assert any("only-rolling.mp4 is only in rolling/" in w for w in selection.warnings)
    assert any("only-pyramid.mp4 is only in pyramid/" in w for w in selection.warnings)


@pytest.mark.parametrize("policies, baseline", [(("rolling", "pyramid"), "rolling"), (("full", "pyramid"), "full"),
                                                (("pyramid", "rolling"), "rolling"), (("zeta", "pyramid"), "pyramid")])
def test_the_baseline_is_the_reference_policy(planted, tmp_path, policies, baseline):
    """rolling, else full, else the alphabetically first policy; whatever order the folders were made in."""
    out = batch_folder(tmp_path / "out", planted, policies)
    other = next(p for p in policies if p != baseline)
    assert [v.label for v in select_videos([out]).comparisons[0].videos] == [f"{baseline}/kite", f"{other}/kite"]


def test_cli_json_on_a_batch_folder(planted, tmp_path, capsys):
    out = batch_folder(tmp_path / "out", planted)
    code, stdout, err = run_cli(["evaluate", out, "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert set(result) == {"window_s", "metrics", "videos", "comparisons", "warnings"}
    assert result["metrics"] == list(METRICS) and result["window_s"] == 5
    video = result["videos"][0]
    assert {"label", "path", "policy", "fps", "width", "height", "frames", "seconds", "windows",
            "summary"} <= set(video)
    assert video["frames"] == SECONDS * FPS and (video["width"], video["height"]) == (W, H)
    assert [w["start_s"] for w in video["windows"]] == [0, 5, 10, 15]
    assert set(video["windows"][0]) == {"start_s", "end_s", "frames", *METRICS}
    assert set(video["summary"]) == set(METRICS)
    assert set(video["summary"]["motion"]) == {"first", "last", "slope_per_min", "worst", "flagged_from_s"}
    (kite,) = result["comparisons"]
    assert (kite["baseline"], kite["other"]) == ("rolling/kite", "pyramid/kite")
    repetition = [w["repetition"] for w in kite["windows"]]
    assert repetition[:2] == [None, None] and min(repetition[2:]) > 0.5  # the loop under "pyramid"
    assert err.count("warning: ") == 2 and "only in" in err and "Traceback" not in err


def test_cli_tables_on_stdout(planted, capsys):
    code, stdout, err = run_cli(["evaluate", planted["stable"], planted["freeze"]], capsys)
    assert code == 0, err
    assert "stable.mp4" in stdout and "freeze.mp4 minus" in stdout.replace("\n", " ")
    freeze_table = stdout.split("freeze.mp4: 20.0 s")[1].split("minus")[0]
    assert "!" in freeze_table and "flagged from" in freeze_table
    assert err == ""


def test_different_lengths_compare_the_common_span(planted, tmp_path, capsys):
    short = write_mp4(tmp_path / "short.mp4", frames("stable", seconds=12))
    code, stdout, err = run_cli(["evaluate", planted["stable"], short, "--json"], capsys)
    assert code == 0
    (comparison,) = json.loads(stdout)["comparisons"]
    assert comparison["common_s"] == 10 and len(comparison["windows"]) == 2  # 10-12 s is less than half a window
    assert err.count("\n") == 1 and err.startswith("warning: ") and "compared over the first 10 s" in err


def test_plot_writes_a_png(planted, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "drift.png"
    code, stdout, err = run_cli(["evaluate", planted["stable"], planted["blur"], "--plot", png, "--json"], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:
        assert image.width > 600 and image.height > 300
    assert [p.name for p in tmp_path.iterdir()] == ["drift.png"]  # no temp file left
    assert json.loads(stdout)["videos"]


def truncated(path, tmp_path, faststart):
    """An mp4 cut short: without faststart the index (moov) is lost, with it the last frames are."""
    full = write_mp4(tmp_path / "full.mp4", frames("stable", seconds=6), *(["-movflags", "+faststart"]
                                                                           if faststart else []))
    data = full.read_bytes()
    path.write_bytes(data[:len(data) * 6 // 10])
    return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nope.mp4", "no such file or folder"),
    (lambda tmp: (tmp / "notes.txt").write_text("hi") and tmp / "notes.txt", "is not a video"),
    (lambda tmp: (tmp / "junk.mp4").write_bytes(b"\0" * 4096) and tmp / "junk.mp4", "cannot read video"),
    (lambda tmp: truncated(tmp / "cut.mp4", tmp, faststart=False), "cannot read video"),
    (lambda tmp: truncated(tmp / "cut.mp4", tmp, faststart=True), "frames decoded"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no videos in"),
])
def test_bad_input_is_one_line(make, message, tmp_path, capsys):
    code, stdout, err = run_cli(["evaluate", make(tmp_path)], capsys)
    assert code == 1 and stdout == ""
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--window", "0"], "--window must be a positive number"),
    (["--plot", "drift.jpg"], "--plot file drift.jpg must end in .png"),
    (["--prompt", "a kite"], "--prompt and --clip-model are for --deep"),
])
def test_bad_options_are_one_line(args, message, planted, tmp_path, capsys):
    code, _, err = run_cli(["evaluate", planted["stable"], *args], capsys)
    assert code == 1 and message in err and err.count("\n") == 1


def test_missing_extras_say_what_to_install(planted, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # None in sys.modules: the import fails
    code, _, err = run_cli(["evaluate", planted["stable"], "--plot", "x.png"], capsys)
    assert code == 1 and err == "error: --plot needs matplotlib (pip install 'pfgen[plot]')\n"
    monkeypatch.setitem(sys.modules, "cv2", None)
    code, _, err = run_cli(["evaluate", planted["stable"]], capsys)
    assert code == 1 and err == "error: pfgen evaluate needs OpenCV (pip install 'pfgen[evaluate]')\n"


def test_core_import_and_help_without_opencv():
    """pfgen's CLI (and so generate) imports without the evaluate and plot extras."""
    code = ("import sys; sys.modules['cv2'] = None; sys.modules['matplotlib'] = None\n"
            "from pfgen.cli import main\n"
            "main(['generate', '--help'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--prompt" in result.stdout


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised tiny CLIP with a letters-only BPE tokenizer, saved as a local model folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    import torch

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    return folder


def test_deep_scores_with_a_local_clip(planted, tiny_clip, tmp_path, capsys):
    commented = write_mp4(tmp_path / "commented.mp4", frames("loop"), "-metadata", "comment=a red kite")
    code, stdout, err = run_cli(["evaluate", planted["loop"], commented, "--deep", "--clip-model", tiny_clip, "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["metrics"] == [*METRICS, "clip_text", "subject_consistency"]
    plain, with_prompt = result["videos"]
    assert plain["prompt"] is None and with_prompt["prompt"] == "a red kite"  # from the mp4's metadata
    assert "loop.mp4: no prompt" in err and err.count("\n") == 1
    assert all(w["clip_text"] is None for w in plain["windows"])
    for video in result["videos"]:
        assert all(-1 <= w["subject_consistency"] <= 1 for w in video["windows"])
    assert all(-1 <= w["clip_text"] <= 1 for w in with_prompt["windows"])


def test_clip_scores_compare_every_sampled_frame_with_the_first(tiny_clip):
    """Sampling at 2 frames per second; a frame equal to the first scores 1, others less."""
    from pfgen.evaluate.deep import ClipScorer

    scorer = ClipScorer(str(tiny_clip))
    sampler = scorer.sampler(FPS)
    video = list(frames("stable", seconds=3))
    video[16] = video[0]  # the third sampled frame repeats the first
    for frame in video:
        sampler.add(frame)
    assert sampler.indices == [0, 8, 16, 24, 32, 40] and sampler.frames[0].shape == (32, 32, 3)
    scores = scorer.frame_scores(sampler, "a red kite")
    subject = scores["subject_consistency"]
    assert subject[0] == pytest.approx(1, abs=1e-5) and subject[2] == pytest.approx(1, abs=1e-5)
    assert max(subject[1], *subject[3:]) < 1 - 1e-4
    assert scores["clip_text"][2] == pytest.approx(scores["clip_text"][0], abs=1e-5)
    assert len(set(np.round(scores["clip_text"], 6))) > 2


def test_deep_prompt_comes_from_the_manifest(planted, tiny_clip, tmp_path, capsys):
    out = batch_folder(tmp_path / "out", planted)
    for name in ("only-rolling", "only-pyramid"):
        next(out.glob(f"*/{name}.mp4")).unlink()
    code, stdout, err = run_cli(["evaluate", out, "--deep", "--clip-model", tiny_clip, "--json"], capsys)
    assert code == 0 and err == ""
    videos = {v["label"]: v for v in json.loads(stdout)["videos"]}
    for label in ("rolling/kite", "pyramid/kite"):
        assert videos[label]["prompt"] == "a red kite over the sea"
        assert all(w["clip_text"] is not None for w in videos[label]["windows"])


def test_deep_without_weights_says_what_to_run(planted, capsys):
    code, _, err = run_cli(["evaluate", planted["stable"], "--deep", "--clip-model", "pfgen-test/not-a-cached-clip"], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "no CLIP weights for pfgen-test/not-a-cached-clip" in err and "hf download" in err
