"""The command line as a user meets it: the embedded generate, and every bad input named in the issues."""

import json
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
from clirun import run_cli





def read_mp4(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    frames = [np.frombuffer(f, dtype=np.uint8) for f in reader]
    return meta, frames


def test_embedded_generate_writes_mp4(tmp_path):
    """The README's first command, through the installed entry point: the embedded world model, no note."""
    out = tmp_path / "ball.mp4"
    result = subprocess.run([sys.executable, "-m", "pfgen", "generate", "--prompt",
                             "a red ball circling on a navy background", "--seconds", "2", "-o", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and "noise" not in result.stderr and "warning" not in result.stderr
    meta, frames = read_mp4(out)
    # 2 s at 16 fps = 32 frames -> 9 latent frames (whole 3-frame chunks) -> 1 + 4 * 8 = 33 video frames
    assert meta["size"] == (96, 64)
    assert len(frames) == 33
    assert all(f.size == 96 * 64 * 3 for f in frames)
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("args, message", [
    (["--seconds", "0"], "--seconds must be a positive number"),
    (["--seconds", "-3"], "--seconds must be a positive number"),
    (["--seconds", "abc"], "Invalid value for '--seconds'"),
    (["--frames", "0"], "--frames must be at least 1"),
    (["--height", "100"], "--height 100 is not a positive multiple of 16"),
    (["--policy", "banana"], "--policy 'banana' is unknown"),
    (["--config", "does/not/exist.yaml"], "config file not found"),
    (["--bogus", "1"], "No such option: --bogus"),
])
def test_generate_bad_input(args, message, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code, stdout, err = run_cli(["generate", *args, "-o", str(out)], capsys)
    assert code != 0
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_generate_output_in_missing_folder(tmp_path, capsys):
    code, _, err = run_cli(["generate", "-o", str(tmp_path / "missing" / "x.mp4")], capsys)
    assert code == 1 and "output folder" in err and "does not exist" in err


@pytest.mark.parametrize("text, message", [
    ("cache:\n  polcy: full\n", "unknown key 'cache.polcy'"),
    ("cache: [\n", "not valid YAML"),
    ("sampling:\n  frames_per_chunk: three\n", "'sampling.frames_per_chunk' must be int"),
    ("cache:\n  pyramid:\n    wave: {period: 99}\n  policy: pyramid\n  all: wave\n", "exceeds the supported maximum"),
    ("cache:\n  policy: pyramid\n  all: wave\n  pyramid: {recent: 0}\n", "cache.pyramid.recent must be positive"),
])
def test_generate_bad_config(text, message, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, _, err = run_cli(["generate", "--config", str(config), "-o", str(tmp_path / "x.mp4"),
                            "--seconds", "1"], capsys)
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.mp4").exists()


def test_heads_file_for_another_model(tmp_path, capsys):
    code, _, err = run_cli(["generate", "--policy", "pyramid", "--heads", "configs/heads/self-forcing-1.3b.json",
                            "-o", str(tmp_path / "x.mp4"), "--seconds", "1"], capsys)
    assert code == 1 and "is for a 30x12 model" in err


def test_inspect_cache_json_matches_design_budgets(capsys):
    code, out, _ = run_cli(["inspect-cache", "--config", "self-forcing", "--frame", "100", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["chunk"] == 33 and report["tokens_per_frame"] == 1560
    tokens = {h["type"]: h["tokens"] for h in report["heads"]}
    assert tokens == {"wave": 14040, "anchor": 17160, "veil": 12480}
    assert report["summary"]["baseline_tokens_per_head"] == 32760
    assert abs(report["summary"]["tokens_per_head_mean"] / 32760 - 0.47) < 0.01
    wave = next(h for h in report["heads"] if h["type"] == "wave")
    assert wave["segments"][1] == {"kind": "cyclic", "frames": [76, 82, 88, 94], "rope_t": [79] * 4,
                                   "tokens": 6240}


@pytest.mark.parametrize("args, message", [
    (["--frame", "-1"], "--frame must be zero or more"),
    (["--heads", "nope.json"], "head-type file not found"),
])
def test_inspect_cache_bad_input(args, message, capsys):
    code, _, err = run_cli(["inspect-cache", "--config", "self-forcing", *args], capsys)
    assert code == 1 and message in err


def test_inspect_cache_plot(tmp_path, capsys):
    png = tmp_path / "pyramid.png"
    code, _, _ = run_cli(["inspect-cache", "--config", "self-forcing", "--frame", "60", "--plot", str(png)], capsys)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
