"""What pfgen promises under bad input and faults (docs/reliability.md): one line and a non-zero exit instead of
a traceback, nothing left behind, verified outputs, signals handled like Ctrl-C, one run per output.

Fault cases run for real: a small tmpfs for a full disk and a read-only folder (skipped when this machine
cannot mount one), real SIGTERM / SIGHUP to a child process, two real concurrent processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pfgen.outputs import is_partial
from clirun import RANDOM, run_cli

SIZE = ["--height", "32", "--width", "48"]
SMALL = ["--seconds", "1", *SIZE]




def one_line_error(err: str) -> str:
    """The one error line (notes and the progress bar may come before it), and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == lines[0], err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if is_partial(p) or p.name.endswith(".lock"))


def child_env():
    return {**{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
            "OMP_NUM_THREADS": "1"}


@pytest.fixture
def mount(tmp_path):
    """mount(size, read_only) -> a fresh tmpfs folder, unmounted at the end; skipped where mounting is denied."""
    mounted = []

    def make(size="100k", read_only=False):
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def write_config(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BAD_CONFIGS = [
    ("video:\n  fps: 0\n", "video.fps must be a whole number"),
    ("video:\n  fps: -16\n", "video.fps must be a whole number"),
    ("sampling:\n  timesteps: [5000, -3]\n", "sampling.timesteps must lie in (0, 1000]"),
    ("sampling:\n  timesteps: [.inf]\n", "sampling.timesteps must lie in (0, 1000]"),
    ("sampling:\n  timesteps: [250, 500]\n", "sampling.timesteps must decrease"),
    ("sampling:\n  frames_per_chunk: 1000\n", "sampling.frames_per_chunk must be between 1 and the 21-frame"),
    ("sampling:\n  shift: 0\n", "sampling.shift must be a positive number"),
    ("sampling:\n  shift: .nan\n", "sampling.shift must be a positive number"),
    ("cache:\n  backend: banana\n", "cache.backend 'banana' is unknown"),
    ("video:\n  fps: 16\nvideo:\n  fps: 8\n", "duplicate key 'video'"),
    ("sampling:\n  shift: 5\n  shift: 3\n", "duplicate key 'shift'"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS)
def test_bad_config_values_are_refused_before_anything_loads(text, message, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code, _, err = run_cli(["generate", "--config", str(write_config(tmp_path, text)), "-o", str(out)], capsys)
    assert code == 1 and message in one_line_error(err)
    assert not out.exists() and not leftovers(tmp_path)


def _binary(tmp_path) -> Path:
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 8)
    return path


def _heads_with_string_model(tmp_path) -> Path:
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"format": "pfgen.head-types/1", "model": "tiny", "types": [["wave"]]}))
    return path


def _garbage_safetensors(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + os.urandom(64))
    return path


def _broken_config_folder(tmp_path) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text('{"_class_name": "WanTransformer3DModel", "num_layers": ')
    return folder


def _empty_dir(tmp_path) -> Path:
    (tmp_path / "wan").mkdir(exist_ok=True)
    return tmp_path / "wan"


BAD_INPUTS = [  # (id, args builder, code, message)
    ("binary heads", lambda t: ["--heads", str(_binary(t))], 1, "not a text file"),
    ("binary config", lambda t: ["--config", str(_binary(t))], 1, "not a text file"),
    ("head file model string", lambda t: ["--heads", str(_heads_with_string_model(t))], 1,
     "'model' must be an object"),
    ("garbage safetensors", lambda t: ["--checkpoint", str(_garbage_safetensors(t)), "--wan-dir", str(_empty_dir(t))],
     1, "is not a readable safetensors file"),
    ("broken config.json", lambda t: ["--checkpoint", str(_broken_config_folder(t)), "--wan-dir", str(_empty_dir(t))],
     1, "config.json is not valid JSON"),
    ("backend", lambda t: ["--backend", "banana"], 1, "--backend 'banana' is unknown"),
    ("seed float", lambda t: ["--seed", "1e23"], 2, "Invalid value for '--seed'"),
    ("seed too big", lambda t: ["--seed", str(10 ** 23)], 1, "--seed must be between 0 and 2^63-1"),
    ("device meta", lambda t: ["--device", "meta"], 1, "--device 'meta' is not a device"),
    ("text encoder device", lambda t: ["--text-encoder-device", "banana"], 1,
     "--text-encoder-device 'banana' is not a device"),
    ("num heads", lambda t: ["--num-heads", "-4"], 1, "--num-heads must be a positive number"),
    ("threads", lambda t: ["--threads", "0"], 1, "--threads must be at least 1"),
    ("frames float", lambda t: ["--frames", "1e12", "--policy", "full"], 2, "Invalid value for '--frames'"),
    ("frames huge", lambda t: ["--frames", str(10 ** 12), "--policy", "full"], 1, "need --force"),
    ("seconds huge", lambda t: ["--seconds", "1e9"], 1, "need --force"),
    ("frames and seconds", lambda t: ["--frames", "9", "--seconds", "2"], 1, "give --seconds or --frames, not both"),
    ("wan dir alone", lambda t: ["--wan-dir", str(_empty_dir(t))], 1, "--wan-dir needs --checkpoint"),
    ("real model, no weights", lambda t: ["--config", str(write_config(t, "model:\n  name: my-wan\n"))], 1,
     "config 'my-wan' needs real weights"),
    ("real model rolling, no weights", lambda t: ["--config", str(write_config(t, "model:\n  name: my-wan\n")),
                                                  "--policy", "rolling"], 1, "config 'my-wan' needs real weights"),
    ("latents same path", lambda t: ["--save-latents", str(t / "x.mp4")], 1, "must end in .safetensors"),
    ("latents missing folder", lambda t: ["--save-latents", str(t / "no" / "l.safetensors")], 1,
     "output folder"),
]


@pytest.mark.parametrize("name, build, code, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_generate_inputs_are_one_line(name, build, code, message, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    args = build(tmp_path)
    length = SIZE if {"--frames", "--seconds"} & set(args) else SMALL
    got, _, err = run_cli(["generate", *args, *length, "-o", str(out)], capsys)
    assert got == code and message in one_line_error(err)
    assert not out.exists() and not leftovers(tmp_path)


def test_full_cache_that_cannot_fit_is_refused_with_its_size(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code, _, err = run_cli(["generate", "--policy", "full", "--frames", "4000000", "--force", "-o", str(out)], capsys)
    line = one_line_error(err)
    assert code == 1 and "the full KV cache for 1000002 latent frames needs" in line and "GiB" in line
    assert not out.exists() and not leftovers(tmp_path)


def test_cpu_out_of_memory_is_one_line():
    from pfgen.cli import _out_of_memory

    with pytest.raises(RuntimeError) as exc:
        torch.empty(2 ** 60, dtype=torch.uint8)  # a real allocator failure
    line = _out_of_memory(exc.value)
    assert line.startswith("out of CPU memory: 1073741824.0 GiB more were needed")


def test_outputs_sharing_a_path_are_refused(tmp_path, capsys):
    from pfgen.errors import PfgenError
    from pfgen.outputs import check_outputs

    out = tmp_path / "x.mp4"
    code, _, err = run_cli(["generate", *SMALL, "-o", str(out), "--save-latents", str(out)], capsys)
    assert code == 1 and "--save-latents file x.mp4 must end in .safetensors" in one_line_error(err)
    assert not out.exists()
    with pytest.raises(PfgenError, match="--output and --save-latents are the same file"):
        check_outputs(output=tmp_path / "a.mp4", save_latents=tmp_path / "." / "a.mp4")
    check_outputs(output=tmp_path / "a.mp4", save_latents=tmp_path / "a.safetensors", plot=None)


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    out.write_bytes(b"mine")
    code, _, err = run_cli(["generate", *SMALL, "-o", str(out)], capsys)
    assert code == 1 and "already exists (pass --overwrite (-y)" in one_line_error(err)
    assert out.read_bytes() == b"mine"
    code, _, err = run_cli(["generate", *SMALL, "-o", str(out), "-y"], capsys)
    assert code == 0 and out.read_bytes() != b"mine"


def test_full_disk_leaves_nothing_and_says_so(mount, capsys):
    disk = mount("100k")
    out = disk / "x.mp4"
    code, _, err = run_cli(["generate", "--seconds", "5", "-o", str(out)], capsys)
    assert code == 1 and "No space left on device" in one_line_error(err)
    assert list(disk.iterdir()) == []


def test_latents_that_do_not_fit_are_refused_before_generating(mount, tmp_path, capsys):
    disk = mount("64k")
    out = tmp_path / "x.mp4"
    code, _, err = run_cli(["generate", "--seconds", "5", "-o", str(out), "--save-latents",
                            str(disk / "l.safetensors")], capsys)
    line = one_line_error(err)
    assert code == 1 and "needs" in line and "free" in line
    assert not out.exists() and list(disk.iterdir()) == []


@pytest.mark.parametrize("command", ["generate", "latents", "convert", "inspect-plot"])
def test_read_only_folder_is_refused_before_any_work(command, mount, tmp_path, capsys):
    ro = mount("1m", read_only=True)
    args = {
        "generate": ["generate", *SMALL, "-o", str(ro / "x.mp4")],
        "latents": ["generate", *SMALL, "-o", str(tmp_path / "x.mp4"), "--save-latents", str(ro / "l.safetensors")],
        "convert": ["convert", str(_garbage_safetensors(tmp_path)), "-o", str(ro / "conv")],
        "inspect-plot": ["inspect-cache", "--plot", str(ro / "p.png")],
    }[command]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "Read-only file system" in one_line_error(err)
    assert not (tmp_path / "x.mp4").exists()


def test_mp4_says_how_it_was_made_and_json_summary(tmp_path, capsys):
    from pfgen import __version__
    from pfgen.video import decoded_frames, read_metadata

    out = tmp_path / "kite.mp4"
    code, stdout, err = run_cli(["generate", "-p", "a kite; a=b", *SMALL, "--seed", "7", "-o", str(out), "--json",
                                 "--threads", "1"], capsys)
    assert code == 0 and torch.get_num_threads() == 1
    summary = json.loads(stdout)
    assert summary["path"] == str(out) and summary["frames"] == decoded_frames(out) == 21
    assert summary["bytes"] == out.stat().st_size and summary["metadata"]["seed"] == 7
    tags = read_metadata(out)
    made = json.loads(tags["comment"])
    assert tags["title"] == "a kite; a=b"
    from pfgen.evaluate.videos import prompt_from_metadata

    assert prompt_from_metadata(out) == "a kite; a=b"  # what `pfgen evaluate --deep` scores the video against
    assert made == {"prompt": "a kite; a=b", "seed": 7, "config": "random", "policy": "pyramid", "checkpoint": None,
                    "pfgen": __version__, "resumed_from": None,
                    "timeline": [{"seconds": 0.0, "video_frame": 0, "latent_frame": 0, "prompt": "a kite; a=b",
                                  "source": "timeline"}]}


def test_quiet_prints_nothing_and_version(tmp_path, capsys):
    code, stdout, err = run_cli(["generate", *SMALL, "-o", str(tmp_path / "q.mp4"), "--quiet"], capsys)
    assert code == 0 and err == "" and stdout == ""
    code, stdout, _ = run_cli(["--version"], capsys)
    from pfgen import __version__

    assert code == 0 and stdout.strip() == f"pfgen {__version__}"


def test_options_that_do_nothing_warn(tmp_path, capsys):
    heads = Path(__file__).with_name("heads-random.json")
    code, _, err = run_cli(["generate", *SMALL, "-o", str(tmp_path / "w.mp4"), "--policy", "rolling", "--heads",
                            str(heads), "--num-heads", "2"], capsys)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and warnings == ["warning: --num-heads does nothing for the random test model",
                                      "warning: --heads does nothing under --policy rolling (it is for pyramid)"]


def test_long_prompt_is_warned_once(tmp_path, capsys):
    code, _, err = run_cli(["generate", "-p", "a kite " * 100, *SMALL, "-o", str(tmp_path / "p.mp4")], capsys)
    assert code == 0
    assert [line for line in err.splitlines() if "tokens; the model reads the first 512" in line]


def test_summary_line_is_not_wrapped_in_logs(tmp_path):
    out = tmp_path / ("a-long-name-" * 6 + ".mp4")
    result = subprocess.run([sys.executable, "-m", "pfgen", "generate", "--config", RANDOM, *SMALL, "-o", str(out)],
                            capture_output=True, text=True, env={**child_env(), "COLUMNS": "80"}, timeout=240)
    assert result.returncode == 0, result.stderr
    summary = [line for line in result.stderr.splitlines() if line.startswith("wrote ")]
    assert len(summary) == 1 and str(out) in summary[0] and "peak memory" in summary[0]


def _start(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "pfgen", "generate", "--config", RANDOM, *args], cwd=cwd,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_partial(folder: Path, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(is_partial(p) for p in folder.rglob("*")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("no partial output appeared")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_removes_the_partial_and_says_one_line(sig, code, tmp_path):
    proc = _start(["--seconds", "60", "-o", "v.mp4"], tmp_path)
    _wait_for_partial(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert one_line_error("\n".join(l for l in err.splitlines() if l.startswith(("error", "Traceback")))) == \
        f"error: interrupted by {sig.name} (no partial output was kept)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# A process that takes an output's lock the way a run does (pfgen.outputs.output_lock) and leaves a partial file of
# its own there, then holds both until killed: the lock tests need a run in progress, not a long video.
HOLDER = """
import sys, time
from pathlib import Path
from pfgen.outputs import output_lock, temp_path
target, partial = Path(sys.argv[1]), Path(sys.argv[2])
with output_lock(target):
    temp_path(partial).write_bytes(b"half a video")
    print("holding", flush=True)
    time.sleep(600)
"""


def _hold(target: str, partial: str, cwd: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, target, partial], cwd=cwd, env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "holding\n"
    return holder


def test_two_runs_on_one_output(tmp_path):
    """A second run on an output being written is refused with the first one's pid; once the first dies (even by
    SIGKILL, which skips every cleanup), the output is free again."""
    first = _hold("same.mp4", "same.mp4", tmp_path)
    try:
        second = _start([*SMALL, "-o", "same.mp4"], tmp_path)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 1
        assert f"another pfgen run (pid {first.pid}) is writing same.mp4" in one_line_error(err)
        assert not (tmp_path / "same.mp4").exists()
    finally:
        first.kill()
        first.wait()
    third = _start([*SMALL, "-o", "same.mp4"], tmp_path)
    _, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    from pfgen.video import decoded_frames

    assert decoded_frames(tmp_path / "same.mp4") == 21


def test_two_batch_runs_on_one_folder(tmp_path):
    """The second batch run is refused before its start-up cleanup could touch the first one's partial video."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a kite\n")
    (tmp_path / "out").mkdir()
    first = _hold("out", "out/0000-a-kite.mp4", tmp_path)
    try:
        partial = [p for p in (tmp_path / "out").iterdir() if is_partial(p)]
        second = _start(["--prompts", str(prompts), "--output-dir", "out", *SMALL], tmp_path)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 1 and f"another pfgen run (pid {first.pid}) is writing out" in one_line_error(err)
        assert len(partial) == 1 and partial[0].exists()  # the first run's work is left alone
    finally:
        first.kill()
        first.wait()


def test_stale_partials_of_live_processes_are_kept(tmp_path):
    from pfgen.outputs import remove_stale_partials

    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        live = tmp_path / f".a.{sleeper.pid}-aaaaaa.partial.mp4"
        dead = tmp_path / ".b.999999999-bbbbbb.partial.mp4"
        for p in (live, dead):
            p.write_bytes(b"x")
        assert remove_stale_partials(tmp_path) == [dead]
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()


def test_batch_resumes_from_another_install(tmp_path, capsys):
    """The same config and head file at other paths (another venv / checkout) resume, not refuse."""
    here = Path(__file__).resolve().parent
    installs = []
    for name in ("venv-a", "venv-b"):
        folder = tmp_path / name
        (folder / "heads").mkdir(parents=True)
        (folder / "heads-random.json").write_bytes((here / "heads-random.json").read_bytes())
        (folder / "random.yaml").write_text((here / "random.yaml").read_text())
        installs.append(folder / "random.yaml")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a kite\n")
    for i, config in enumerate(installs):
        code, _, err = run_cli(["generate", "--config", str(config), "--prompts", str(prompts), "--output-dir",
                                str(tmp_path / "out"), *SMALL], capsys)
        assert code == 0, err
        assert f"1 video: {i} already complete, {1 - i} to generate" in err
