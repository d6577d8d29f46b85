"""What a new user trips over (issue 19, section 7): --help at 80 columns, progress in a log, the overwrite rule
of every command, the API's mp4 metadata, the CPU thread default, plot ticks, and docs that say what happens."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pfgen
from pfgen.frames import frames_for_seconds, latent_frames_for
from clirun import run_cli
from test_reliability import child_env

ROOT = Path(__file__).resolve().parent.parent
SIZE = ["--height", "32", "--width", "48"]
COMMANDS = [[], ["generate"], ["inspect-cache"], ["profile-heads"], ["convert"], ["evaluate"], ["download"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0] if c else "pfgen")
def test_help_is_readable_at_80_columns(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERMINAL_WIDTH", "80")
    code, out, _ = run_cli([*command, "--help"], capsys)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    for noise in ("…", "<bool>", "<list", "<str>", "<path>", "<int>", "<float>"):
        assert noise not in out, (noise, out)
    assert not re.search(r"\{[A-Za-z_.]+\}", out), out  # typer's {argument} in the usage line


def test_generate_help_groups_its_options_in_panels():
    """In a real process at 80 columns: six panels, in order, each option in its panel, names never cut."""
    run = subprocess.run([sys.executable, "-m", "pfgen", "generate", "--help"], capture_output=True, text=True,
                         env={**child_env(), "COLUMNS": "80"}, timeout=120)
    assert run.returncode == 0, run.stderr
    panels = re.findall(r"╭─ (.+?) ─", run.stdout)
    assert panels == ["Options", "Prompt and story", "Length and size", "Model", "Cache", "Outputs (and batch mode)",
                      "Runtime"]
    sections = dict(zip(panels, re.split(r"╭─ .+? ─+╮\n", run.stdout)[1:]))
    for panel, options in {"Model": ["--config", "--checkpoint", "--text-encoder-device"],
                           "Length and size": ["--seconds", "--frames", "--force", "--height"],
                           "Cache": ["--policy", "--heads", "--backend"],
                           "Prompt and story": ["--prompt", "--then", "--timeline", "--interactive", "--resume"],
                           "Outputs (and batch mode)": ["--output", "--overwrite", "--preview", "--prompts"],
                           "Runtime": ["--device", "--threads", "--dry-run", "--verbose"]}.items():
        for option in options:
            assert re.search(rf"│ {option}\s", sections[panel]), (panel, option)
    assert "--no-force" not in run.stdout and "--no-interactive" not in run.stdout


def test_a_log_gets_plain_progress_lines_not_a_cut_bar(tmp_path):
    """stderr is a pipe (a CI log, `| tee`): whole progress lines, the first and the last chunk at least."""
    run = subprocess.run([sys.executable, "-m", "pfgen", "generate", "--seconds", "2", *SIZE, "-o", "v.mp4"],
                         cwd=tmp_path, capture_output=True, text=True, env={**child_env(), "COLUMNS": "40"},
                         timeout=600)
    assert run.returncode == 0, run.stderr
    progress = [line for line in run.stderr.splitlines() if line.startswith("generating")]
    # 2 s -> 8 latent frames -> 3 chunks of 3 -> 33 frames (2.06 s); the first chunk holds 9 frames (0.56 s)
    assert re.fullmatch(r"generating: chunk 1/3, 0\.6/2\.1 s of video, [0-9.]+ fps, \d+ s left", progress[0]), progress
    assert re.fullmatch(r"generating: chunk 3/3, 2\.1/2\.1 s of video, [0-9.]+ fps, 0 s left", progress[-1])
    assert "━" not in run.stderr


def test_inspect_cache_plot_follows_the_overwrite_rule(tmp_path, capsys):
    plot = tmp_path / "pyramid.png"
    plot.write_text("mine")
    code, _, err = run_cli(["inspect-cache", "--plot", plot], capsys)
    assert code == 1 and f"{plot} already exists (pass --overwrite (-y)" in err and plot.read_text() == "mine"
    code, _, err = run_cli(["inspect-cache", "--plot", plot, "-y"], capsys)
    assert code == 0, err
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_api_mp4_carries_the_cli_metadata(tmp_path, capsys):
    from pfgen.video import read_metadata

    code, _, err = run_cli(["generate", "--prompt", "a kite", "--seed", "7", "--seconds", "1", *SIZE, "-o",
                            tmp_path / "cli.mp4"], capsys)
    assert code == 0, err
    assert "model 'random' has random weights: the video is noise" in err
    pipe = pfgen.load_pipeline()
    pipe("a kite", num_frames=21, output_type="mp4", output_path=tmp_path / "api.mp4", height=32, width=48,
         generator=torch.Generator().manual_seed(7))
    cli, api = read_metadata(tmp_path / "cli.mp4"), read_metadata(tmp_path / "api.mp4")
    assert api["title"] == cli["title"] == "a kite"
    assert json.loads(api["comment"]) == json.loads(cli["comment"])


def test_cpu_thread_default_follows_the_model_size(monkeypatch):
    """The embedded model runs on one thread by default (README, CPU threads); --threads still wins, and a
    model the size of the real ones takes the CPUs this process may use."""
    from pfgen.pipeline import SMALL_MODEL_PARAMETERS, set_threads, usable_cpus

    before = torch.get_num_threads()
    try:
        pfgen.load_pipeline()
        assert torch.get_num_threads() == 1
        set_threads(2, 1000)
        assert torch.get_num_threads() == 2
        set_threads(None, SMALL_MODEL_PARAMETERS)
        assert torch.get_num_threads() == usable_cpus()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("lo, hi, ticks, decimals", [
    (-0.0047, 0.013, [0.0, 0.005, 0.01], 3),
    (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], 1),
    (-3.2, 17.9, [0.0, 5.0, 10.0, 15.0], 0),
    (120, 980, [200.0, 400.0, 600.0, 800.0], 0),
])
def test_plot_ticks_are_round_numbers(lo, hi, ticks, decimals):
    from pfgen.plots import nice_ticks

    got, places = nice_ticks(lo, hi)
    assert got == pytest.approx(ticks) and places == decimals
    assert all(lo <= t <= hi for t in got) and len({f"{t:.{places}f}" for t in got}) == len(got)


def test_docs_state_the_length_rule_that_runs():
    """3 s -> 45 frames (2.81 s), 60 s -> 240 latent frames = 957 frames, as frames.py computes them."""
    design = (ROOT / "docs" / "design.md").read_text()
    for seconds, latent, frames in ((3, 12, 45), (60, 240, 957), (5, 21, 81), (1, 6, 21)):
        got = latent_frames_for(frames_for_seconds(seconds, 16), 3)
        assert (got, 1 + 4 * (got - 1)) == (latent, frames)
        assert f"{frames} frames ({frames / 16:.2f} s)" in design
    assert "rounded up to whole chunks" not in (ROOT / "README.md").read_text()


def test_docs_cite_only_what_the_repository_holds():
    texts = {p: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "pfgen").rglob(
        "*.py"), *(ROOT / "tests").glob("*.py")] if p.name != "test_newcomer.py"}
    assert [p.name for p, text in texts.items() if "DESIGN.md" in text] == []
    readme = texts[ROOT / "README.md"]
    story = readme.split("### Stories", 1)[1].split("\n### ", 1)[0]
    outputs = re.findall(r"-o (\S+\.mp4)", story)
    assert len(outputs) == len(set(outputs)) >= 6  # every example can run after the others
    assert "(B, 3, F, H, W) in [-1, 1]" in readme and "pfgen download --config self-forcing" in readme


def test_convert_closing_line_is_one_line_in_a_log(tmp_path):
    """stderr is a pipe 40 columns wide: the `wrote` line stays whole (before, it was wrapped after "FFN")."""
    from pfgen.wan.tiny import tiny_transformer

    tiny_transformer(num_layers=2).save_pretrained(tmp_path / "ck", safe_serialization=True)
    run = subprocess.run([sys.executable, "-m", "pfgen", "convert", "ck", "-o", "out"], cwd=tmp_path,
                         capture_output=True, text=True, env={**child_env(), "COLUMNS": "40"}, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == ["wrote out: 0.6 M parameters, float32, 2 layers, width 128 (4 heads x 32), "
                                       "FFN 256, text dim 32"]


def test_pfgen_alone_prints_the_help(tmp_path):
    """Before: the help, then `error:  (see pfgen --help)` with an empty message and exit 2."""
    run = subprocess.run([sys.executable, "-m", "pfgen"], cwd=tmp_path, capture_output=True, text=True,
                         env={**child_env(), "COLUMNS": "80"}, timeout=120)
    assert run.returncode == 0 and run.stderr == "" and "Usage: pfgen [OPTIONS] COMMAND" in run.stdout
    assert "generate" in run.stdout and "evaluate" in run.stdout
