"""Hostile inputs of issue 19 (sections 5 and 6), each in a real `pfgen` process: text that is not UTF-8 (timeline
files, stdin), a stdin that fails, numbers too big for their unit, YAML exponent numbers, malformed Hub
references, an unreachable Hub, files that are not videos, a missing CLIP folder and very long prompts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest

from clirun import RANDOM, run_cli
from hubserver import Hub
from test_reliability import child_env, leftovers, one_line_error

SIZE = ["--height", "32", "--width", "48"]
SMALL = ["--seconds", "1", *SIZE]
P1, P2 = "a red kite over the sea", "a dog on a beach"


def pfgen(args, cwd, stdin=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`pfgen ARGS` in a child process, generate on the random test model; stdout and stderr decoded (with
    replacement) for the assertions."""
    if args[0] == "generate":
        args = ["generate", "--config", RANDOM, *args[1:]]
    run = subprocess.run([sys.executable, "-m", "pfgen", *map(str, args)], cwd=cwd, input=stdin,
                         stdin=None if stdin is not None else subprocess.DEVNULL, capture_output=True,
                         env={**child_env(), **(env or {})}, timeout=timeout)
    run.stdout, run.stderr = run.stdout.decode(errors="replace"), run.stderr.decode(errors="replace")
    return run


def assert_refused(run, folder, *fragments) -> str:
    """Exit 1, one error line holding every fragment, and nothing written into `folder`."""
    line = one_line_error(run.stderr)
    assert run.returncode == 1, run.stderr
    for fragment in fragments:
        assert fragment in line, line
    assert not (folder / "out.mp4").exists() and leftovers(folder) == []
    return line


def write_mp4(path, seconds, fps=16):
    writer = imageio_ffmpeg.write_frames(str(path), (48, 32), fps=fps, macro_block_size=1,
                                         ffmpeg_log_level="error")
    writer.send(None)
    rng = np.random.default_rng(0)
    for _ in range(int(seconds * fps)):
        writer.send(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    writer.close()
    return path


# -- 5. no traceback from any input ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, data", [
    ("latin1.yaml", "- {at: 0, prompt: un café au bord de la mer}\n".encode("latin-1")),
    ("binary.json", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"),
])
def test_timeline_that_is_not_utf8_is_one_line(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    run = pfgen(["generate", "--timeline", name, *SMALL, "-o", "out.mp4"], tmp_path)
    assert_refused(run, tmp_path, f"timeline {name} is not UTF-8 text", "save it as UTF-8")


@pytest.mark.parametrize("locale", [{"LC_ALL": "C.UTF-8"}, {"LC_ALL": "C", "PYTHONUTF8": "0",
                                                            "PYTHONCOERCECLOCALE": "0"}])
def test_interactive_skips_stdin_lines_that_are_not_text(tmp_path, locale):
    """Binary bytes before and after a valid line, under a UTF-8 and a strict locale: both bad lines are skipped
    with a warning, the valid line between them is applied, and the run succeeds."""
    stdin = b"\xff\xfe\x80binary\n" + P2.encode() + b"\n\x00\x01\x02\n"
    run = pfgen(["generate", "--interactive", "--prompt", P1, *SMALL, "-o", "out.mp4"], tmp_path, stdin=stdin,
                env=locale)
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: stdin line 1 is not UTF-8 text (byte 0xff at position 0): skipped",
                        "warning: stdin line 3 holds a control character ('\\x00'): skipped"], run.stderr
    assert f"): {P2!r}" in run.stderr and "Traceback" not in run.stderr  # the switch to the valid line
    assert (tmp_path / "out.mp4").stat().st_size > 0


def test_a_stdin_that_cannot_be_read_ends_the_run(tmp_path):
    """stdin is a file opened write-only: every read fails (EBADF) in the reader thread; the run fails with one
    line and leaves no video (before, the thread died and the run went on, exit 0)."""
    (tmp_path / "sink").write_bytes(b"")
    write_only = os.open(tmp_path / "sink", os.O_WRONLY)
    try:
        run = subprocess.run([sys.executable, "-m", "pfgen", "generate", "--config", RANDOM, "--interactive", *SMALL,
                              "-o", "out.mp4"],
                             cwd=tmp_path, stdin=write_only, capture_output=True, text=True, env=child_env(),
                             timeout=300)
    finally:
        os.close(write_only)
    assert_refused(run, tmp_path, "--interactive: cannot read stdin: Bad file descriptor")


def test_huge_numbers_are_one_line(tmp_path):
    (tmp_path / "far.json").write_text(json.dumps([{"at": 0, "prompt": P1}, {"at": 1e308, "prompt": P2}]))
    write_mp4(tmp_path / "clip.mp4", 1)
    then = pfgen(["generate", "--prompt", P1, "--then", "1e308", P2, *SMALL, "-o", "out.mp4"], tmp_path)
    assert_refused(then, tmp_path, "the prompt at 1e+308 s comes after the end of the 1.31 s video")
    far = pfgen(["generate", "--timeline", "far.json", *SMALL, "-o", "out.mp4"], tmp_path)
    assert_refused(far, tmp_path, "the prompt at 1e+308 s comes after the end")
    seconds = pfgen(["generate", "--seconds", "1e308", "--force", *SIZE, "-o", "out.mp4"], tmp_path)
    assert_refused(seconds, tmp_path, "--seconds 1e+308 is too long to count in frames")
    window = pfgen(["evaluate", "clip.mp4", "--window", "1e308"], tmp_path)
    line = one_line_error(window.stderr)
    assert window.returncode == 1 and "shorter than one 1e+308 s window" in line and window.stdout == ""


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    """`at: 5e-1` is a number in YAML 1.2 (PyYAML's YAML 1.1 reads it as a string): it switches at 0.56 s."""
    (tmp_path / "story.yaml").write_text(f"- {{at: 0e0, prompt: {P1}}}\n- {{at: 5e-1, prompt: {P2}}}\n")
    run = pfgen(["generate", "--timeline", "story.yaml", *SMALL, "-o", "out.mp4"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"prompt switched at 0.56 s (frame 9): {P2!r}" in run.stderr


# -- 6. Hub references and evaluate ----------------------------------------------------------------------------
VALID_FORMS = "org/name (a repo folder) or org/name:path/in/repo.pt (one file), with an optional @revision"


@pytest.mark.parametrize("ref", ["org/", "a/b/c/d", "org/name@", "org/name:", "org/name@main:file.pt"])
def test_malformed_hub_reference_shows_the_valid_forms(tmp_path, capsys, monkeypatch, ref):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["download", "--checkpoint", ref], capsys)
    assert code == 1 and out == "" and f"--checkpoint {ref}: no such file or folder, and not a Hub reference" in \
        one_line_error(err) and VALID_FORMS in err


@pytest.mark.parametrize("command", ["download", "generate"])
def test_malformed_hub_reference_in_a_real_process(tmp_path, command):
    """Before: `download` said "nothing to download" (exit 0), `generate` failed later about a head file."""
    run = pfgen([command, "--config", "self-forcing", "--checkpoint", "gdhe17/Self-Forcing@main:model.pt"],
                tmp_path, env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert_refused(run, tmp_path, "--checkpoint gdhe17/Self-Forcing@main:model.pt: no such file or folder, and not "
                                  "a Hub reference", VALID_FORMS)
    assert run.stdout == ""


@pytest.mark.parametrize("verbose", [False, True])
def test_download_from_an_unavailable_hub_is_one_line(tmp_path, verbose):
    """The Hub answers 503 to everything: the client retries 5 times (Retry-After: 0), quietly unless --verbose,
    then one line names the failure."""
    with Hub() as hub:
        hub.status["org/down"] = (503, None)
        run = pfgen(["download", "--checkpoint", "org/down:model.pt", *(["--verbose"] if verbose else [])],
                    tmp_path, env={"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"})
        tries = len(hub.requests)
    line = one_line_error(run.stderr)
    assert run.returncode == 1 and "the Hub answered HTTP 503 for org/down:model.pt" in line
    assert tries >= 6  # the first try and 5 retries
    retries = [text for text in run.stderr.splitlines() if "Retry" in text]
    assert len(retries) >= 5 if verbose else retries == [], run.stderr
    if not verbose:
        assert run.stderr.splitlines() == [line]


@pytest.mark.parametrize("make, args, message", [
    (lambda d: (d / "still.mp4").write_bytes((d / "still.png").read_bytes()), [], "is not a video (ffmpeg reads "
                                                                                 "one png image, with no duration)"),
    (lambda d: write_mp4(d / "short.mp4", 1), [], "is 1.00 s long, shorter than one 5 s window"),
    (lambda d: write_mp4(d / "short.mp4", 3), ["--window", "4"], "is 3.00 s long, shorter than one 4 s window"),
    (lambda d: write_mp4(d / "ok.mp4", 1), ["--deep", "--clip-model", "./no-such-dir"],
     "--clip-model: no such folder ./no-such-dir"),
    (lambda d: write_mp4(d / "ok.mp4", 1), ["--deep", "--clip-model", "org/"],
     "--clip-model: no such folder org/, and not a Hugging Face id"),
    (lambda d: write_mp4(d / "ok.mp4", 1), ["--deep", "--clip-model", "a/b/c/d"],
     "--clip-model: no such folder a/b/c/d, and not a Hugging Face id"),
])
def test_evaluate_refuses_what_is_not_a_video_of_one_window(tmp_path, make, args, message):
    from PIL import Image

    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "still.png")
    make(tmp_path)
    video = next(p for p in tmp_path.glob("*.mp4"))
    run = pfgen(["evaluate", video.name, *args, "--plot", "plot.png"], tmp_path)
    line = one_line_error(run.stderr)
    assert run.returncode == 1 and message in line and run.stdout == ""
    assert "hf download" not in line and not (tmp_path / "plot.png").exists()


def test_long_prompts_are_shortened_in_status_lines_and_kept_whole_in_the_mp4(tmp_path):
    """A 1 MB prompt, then a 10k-character one, from a timeline: every status line is short; the mp4's title
    and comment hold the whole 1 MB text (which is too long for a command-line argument of ffmpeg)."""
    from pfgen.video import read_metadata

    long_prompt, huge = "a red kite " * 1000, "a dog on a beach " * 62000
    (tmp_path / "story.json").write_text(json.dumps([{"at": 0, "prompt": huge}, {"at": 0.5, "prompt": long_prompt}]))
    run = pfgen(["generate", "--timeline", "story.json", *SMALL, "-o", "out.mp4"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert max(len(line) for line in run.stderr.splitlines()) < 400, run.stderr[-2000:]
    assert f"({len(huge.strip()):,} characters)" in run.stderr
    tags = read_metadata(tmp_path / "out.mp4")
    assert tags["title"] == huge.strip() and json.loads(tags["comment"])["prompt"] == huge.strip()
    assert [p.name for p in tmp_path.iterdir() if p.name != "story.json"] == ["out.mp4"]


@pytest.mark.parametrize("args, rows, message", [
    ([], [{"at": 0, "prompt": "a red kite " * 1000, "seed": 1}],
     "entry 1 must have exactly the keys 'at' and 'prompt', got the keys ['at', 'prompt', 'seed']"),
    ([], [{"at": 0, "prompt": ["a red kite"] * 1000}], "the prompt must be a non-empty string, got ['a red kite'"),
    (["--prompt", P1, "--then", "0.5", "--" + "a red kite " * 1000], None, "looks like an option, not a value"),
])
def test_errors_quoting_a_long_prompt_stay_short(tmp_path, args, rows, message):
    """Before, the error line quoted the whole entry or value: 11,000 and 22,000 characters for a 10k prompt."""
    if rows is not None:
        (tmp_path / "story.json").write_text(json.dumps(rows))
        args = ["--timeline", "story.json"]
    run = pfgen(["generate", *args, *SMALL, "-o", "out.mp4"], tmp_path)
    line = assert_refused(run, tmp_path, message)
    assert len(line) < 400 and ("characters)" in line or "seed" in line), line


# -- states edited by hand, with the metadata's CRC recomputed (as pfgen's writer does) ----------------------------
@pytest.fixture(scope="module")
def small_state(tmp_path_factory):
    d = tmp_path_factory.mktemp("state")
    run = pfgen(["generate", "--prompt", P1, "--seconds", "2", *SIZE, "-o", "a.mp4", "--save-state", "a.state"], d)
    assert run.returncode == 0, run.stderr
    return d / "a.state"


def _set_rng(tensors, meta, rng):
    import pfgen.state

    tensors["rng"] = rng
    meta["crc32"]["rng"] = pfgen.state._crc(rng)


@pytest.mark.parametrize("name, change, message", [
    ("position-huge", lambda t, m: m.update(position=10 ** 30), "is corrupt or truncated"),
    ("seed-negative", lambda t, m: m.update(seed=-5), "is corrupt or truncated"),
    ("prompt-empty", lambda t, m: m.update(prompt=" "), "is corrupt or truncated"),
    ("timeline-numbers", lambda t, m: m.update(timeline=[1, 2]), "is corrupt or truncated"),
    ("timeline-no-prompt", lambda t, m: m["timeline"][0].pop("prompt"), "is corrupt or truncated"),
    ("decoder-text", lambda t, m: m.update(decoder="abc"), "is corrupt or truncated"),
    ("generator-banana", lambda t, m: m.update(generator="banana"), "is corrupt or truncated"),
    ("loras-text", lambda t, m: m["model"].update(loras="x"), "is corrupt or truncated"),
    ("no-rng", lambda t, m: (t.pop("rng"), m["crc32"].pop("rng")), "is corrupt or truncated"),
    ("no-embeds", lambda t, m: (t.pop("embeds"), m["crc32"].pop("embeds")), "is corrupt or truncated"),
    ("rng-short", lambda t, m: _set_rng(t, m, t["rng"][:10].clone()), "does not fit this run: its noise generator state cannot be restored"),
    ("rules-text", lambda t, m: m["rules"].update(anchor="x"), "does not fit this run"),
])
def test_states_edited_by_hand_are_one_line(small_state, tmp_path, capsys, name, change, message):
    """Every field is checked for type and range, the records inside it too, and the tensors every run saves must
    be there: before, these were tracebacks (OverflowError, AttributeError, KeyError, RuntimeError from torch) or
    were taken silently (a negative seed, an empty prompt, a timeline of numbers in the resumed mp4's metadata)."""
    import pfgen.state
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(small_state))
    with safe_open(str(small_state), framework="pt") as f:
        meta = json.loads(f.metadata()["pfgen"])
    change(tensors, meta)
    meta["header_crc32"] = pfgen.state._header_crc(meta)
    edited = tmp_path / f"{name}.state"
    save_file(tensors, str(edited), metadata={"pfgen": json.dumps(meta)})
    code, _, err = run_cli(["generate", "--resume", edited, "--seconds", "1", "-o", tmp_path / "out.mp4"], capsys)
    assert code == 1 and f"{edited} {message}" in one_line_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [edited.name]


@pytest.mark.parametrize("args, named", [
    (["--lora", "a/b/c/d"], "--lora a/b/c/d"),
    (["--lora", "org/"], "--lora org/"),
    (["--lora", "missing.safetensors:0.5"], "--lora missing.safetensors"),
    (["--decoder", "tae", "--decoder-weights", "org/name@"], "--decoder-weights org/name@"),
    (["--decoder", "tae", "--decoder-weights", "org/"], "--decoder-weights org/"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_lora_and_decoder_sources_are_checked_with_the_others(tmp_path, args, named, dry_run):
    """--lora and --decoder-weights are weights sources like --checkpoint: a malformed reference or a missing file is
    one line naming the option, before anything loads and under --dry-run too (before, --dry-run took them, and the
    real run named them `model.lora` / `model.decoder` once the model was loading)."""
    run = pfgen(["generate", *args, *SMALL, *(["--dry-run"] if dry_run else ["-o", "out.mp4"])], tmp_path)
    assert_refused(run, tmp_path, f"{named}: no such file or folder, and not a Hub reference", VALID_FORMS)
    assert run.stdout == "" and list(tmp_path.iterdir()) == []
