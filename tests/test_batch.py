"""Batch mode of `pfgen generate`: a prompt suite on 2 gloo ranks, resuming after a kill, one sub-folder per
policy, and every malformed prompts file named by its line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pfgen.batch import MANIFEST, REQUEST_KEYS
from pfgen.errors import PfgenError
from pfgen.heads import HeadTypes
from clirun import RANDOM, run_cli

SIZE = ["--seconds", "1", "--height", "64", "--width", "96"]
PROMPTS = "a red kite over the sea\n\na cat on a sofa\n# not a prompt\nwaves at night\n\nsnow on a city\n"
NAMES = ["0000-a-red-kite-over-the-sea", "0001-a-cat-on-a-sofa", "0002-waves-at-night", "0003-snow-on-a-city"]
FIELDS = {*REQUEST_KEYS, "name", "file", "index", "bytes", "latent_frames", "video_seconds", "wall_seconds",
          "switches", "first_frame_seconds", "generation_fps", "peak_memory_bytes", "memory_kind", "device", "rank",
          "world_size", "pfgen_version", "finished_at"}
TINY_HEADS = Path(__file__).with_name("heads-random.json")  # the head file of tests/random.yaml, the default here




def command(prompts, out, *extra, ranks=None):
    """`python -m pfgen generate ...`, under torchrun when `ranks` is given."""
    launcher = [sys.executable, "-m", "pfgen"]
    if ranks:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                    "--master_port", str(port), "-m", "pfgen"]
    return [*launcher, "generate", "--config", str(RANDOM), "--prompts", str(prompts), "--output-dir", str(out), *SIZE,
            *extra]


def environment():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1"}


def run(args):
    result = subprocess.run(args, capture_output=True, text=True, timeout=240, env=environment())
    assert result.returncode == 0, result.stderr
    return result.stderr


def manifest(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def stamps(out):
    return {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.mp4")}


def no_leftovers(out):
    return not list(out.rglob(".*partial*")) and not list(out.glob(".manifest.rank*")) and \
        not list(out.glob(".*.tmp"))


def test_two_ranks_write_every_video_and_one_manifest(tmp_path):
    """Prompt i goes to rank i % 2; blank and # lines are skipped; rank 0 merges the parts."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text(PROMPTS)
    err = run(command(prompts, out, ranks=2))
    assert "4 videos: 0 already complete, 4 to generate on 2 ranks" in err
    assert err.count("model 'random' has random weights") == 1  # rank 0 alone says so
    assert sorted(stamps(out)) == [f"{name}.mp4" for name in NAMES]
    entries = manifest(out)
    assert [e["name"] for e in entries] == NAMES
    for i, entry in enumerate(entries):
        assert set(entry) == FIELDS
        assert (entry["index"], entry["seed"], entry["rank"], entry["world_size"]) == (i, i, i % 2, 2)
        assert (entry["policy"], entry["frames"], entry["height"], entry["width"]) == ("pyramid", 21, 64, 96)
        assert entry["heads_sha256"] == entry["config"]["cache"]["heads"] == HeadTypes.load(TINY_HEADS).sha256()
        assert entry["wall_seconds"] > 0 and entry["peak_memory_bytes"] > 0
    assert no_leftovers(out)


def test_killed_batch_resumes_on_two_ranks_without_redoing_videos(tmp_path, capsys):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text(PROMPTS)
    part = out / ".manifest.rank0.jsonl"
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(command(prompts, out), stdout=log, stderr=log, env=environment(),
                                start_new_session=True)
        deadline = time.monotonic() + 180
        while not (part.is_file() and part.read_text().count("\n")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {json.loads(line)["file"] for line in part.read_text().splitlines()}
    assert 1 <= len(finished) < 4 and not (out / MANIFEST).exists()
    before = {f: s for f, s in stamps(out).items() if f in finished}
    err = run(command(prompts, out, ranks=2))
    assert f"{len(finished)} already complete, {4 - len(finished)} to generate on 2 ranks" in err
    after = stamps(out)
    assert sorted(after) == [f"{name}.mp4" for name in NAMES]
    assert {f: after[f] for f in finished} == before  # same inode and mtime: not regenerated
    entries = manifest(out)
    assert [e["name"] for e in entries] == NAMES
    assert {e["file"] for e in entries if e["world_size"] == 1} == finished
    assert no_leftovers(out)
    # a third run finds everything done and loads no model
    code, _, err = run_cli(["generate", "--prompts", str(prompts), "--output-dir", str(out), *SIZE], capsys)
    assert code == 0 and "4 already complete, 0 to generate" in err
    assert stamps(out) == after and manifest(out) == entries


@pytest.fixture
def one_thread():
    """In-process runs: torch's 2 threads and ffmpeg's encoder fight over 2 cores (4x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_policies_into_sub_folders_from_jsonl(tmp_path, capsys, monkeypatch, one_thread):
    """Single process, no torchrun: each prompt under each policy; a deleted video (entry but no file) is redone."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    prompts, out = tmp_path / "suite.jsonl", tmp_path / "out"
    prompts.write_text('{"prompt": "a red kite", "name": "kite", "seed": 7, "seconds": 0.5}\n\n'
                       '{"prompt": "a cat"}\n')
    args = ["generate", "--prompts", str(prompts), "--output-dir", str(out), *SIZE, "--policies", "rolling,pyramid"]
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "model 'random' has random weights: the video is noise" in err, err
    files = ["pyramid/0001-a-cat.mp4", "pyramid/kite.mp4", "rolling/0001-a-cat.mp4", "rolling/kite.mp4"]
    assert sorted(stamps(out)) == files
    entries = {e["file"]: e for e in manifest(out)}
    assert sorted(entries) == files
    sha = HeadTypes.load(TINY_HEADS).sha256()
    for policy in ("rolling", "pyramid"):
        kite, cat = entries[f"{policy}/kite.mp4"], entries[f"{policy}/0001-a-cat.mp4"]
        assert (kite["seed"], kite["frames"], cat["seed"], cat["frames"]) == (7, 9, 1, 21)
        assert kite["policy"] == cat["policy"] == kite["config"]["cache"]["policy"] == policy
        assert kite["heads_sha256"] == (sha if policy == "pyramid" else None)
    before = stamps(out)
    (out / "rolling" / "kite.mp4").unlink()
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "3 already complete, 1 to generate" in err
    after = stamps(out)
    assert sorted(after) == files and {f: after[f] for f in files if f != "rolling/kite.mp4"} == \
        {f: before[f] for f in files if f != "rolling/kite.mp4"}
    assert len(manifest(out)) == 4 and no_leftovers(out)
    # another seed would silently mix two experiments in one folder: refused, nothing touched
    code, _, err = run_cli([*args, "--seed", "5"], capsys)
    assert code == 1 and "0001-a-cat.mp4 exists but was made with other settings: seed" in err
    assert stamps(out) == after


def test_prepare_recovers_what_a_killed_run_left(tmp_path):
    """Rank 0's plan: merge leftover parts (a torn last line is skipped), drop entries whose video is gone, keep
    entries of earlier runs, delete stale partial mp4s, re-check finished videos (size, decoded frames); only
    unfinished or damaged videos are left to do."""
    from contextlib import ExitStack

    import numpy as np

    from pfgen.batch import BatchRequest, plan_jobs, prepare, read_prompts
    from pfgen.config import load_config
    from pfgen.video import Mp4Writer

    cfg, out = load_config(None), tmp_path / "out"
    (tmp_path / "p.txt").write_text(PROMPTS)
    req = BatchRequest(tmp_path / "p.txt", out, None, 0, 17, height=64, width=96)
    jobs = plan_jobs(cfg, req, read_prompts(req.prompts, 0, 17, 16))
    out.mkdir()
    entries = []
    for job in jobs[:4]:
        with Mp4Writer(out / job.file, 96, 64) as writer:
            writer.write(np.zeros((job.request["frames"], 64, 96, 3), np.uint8))
        entries.append({**job.request, "bytes": (out / job.file).stat().st_size})
    (out / jobs[2].file).unlink()  # a killed run: no entry, no file
    data = (out / jobs[3].file).read_bytes()
    (out / jobs[3].file).write_bytes(data[:len(data) // 2])  # finished, then damaged: redone
    earlier = {"file": "other-run.mp4", "finished_at": "2020"}
    (out / "other-run.mp4").write_bytes(b"mp4")
    (out / MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in (entries[0], entries[3], earlier)))
    (out / ".manifest.rank1.jsonl").write_text(json.dumps(entries[1]) + '\n{"file": "0002-wav')
    (out / f".{NAMES[2]}.12345678-ab12cd.partial.mp4").write_bytes(b"half")  # its pid is gone
    redone = []
    with ExitStack() as held:
        todo, total = prepare(cfg, req, held.enter_context, lambda file, why: redone.append((file, why)))
        assert (out / ".pfgen.lock").exists()
    assert total == 4 and [job.file for job in todo] == [f"{NAMES[2]}.mp4", f"{NAMES[3]}.mp4"]
    assert [file for file, _ in redone] == [f"{NAMES[3]}.mp4"] and "size" in redone[0][1]
    assert [e["file"] for e in manifest(out)] == [f"{NAMES[0]}.mp4", f"{NAMES[1]}.mp4", f"{NAMES[3]}.mp4",
                                                  "other-run.mp4"]
    assert no_leftovers(out) and not (out / ".pfgen.lock").exists()
    (out / MANIFEST).write_text('{"file": "a.mp4"}\nnot json\n')
    with pytest.raises(PfgenError, match="manifest.jsonl, line 2: not a manifest entry"), ExitStack() as held:
        prepare(cfg, req, held.enter_context)


def test_prompts_file_kind_comes_from_the_extension_and_a_bom_is_dropped(tmp_path):
    from pfgen.batch import read_prompts

    text = tmp_path / "p.txt"
    text.write_bytes('\ufeff{braces} start this prompt\nplain\n'.encode("utf-8"))
    assert [i.prompt for i in read_prompts(text, 0, 9, 16)] == ["{braces} start this prompt", "plain"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes('\ufeff{"prompt": "a kite"}\n'.encode("utf-8"))
    assert [i.prompt for i in read_prompts(jsonl, 0, 9, 16)] == ["a kite"]


@pytest.mark.parametrize("name, text, message", [
    ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n', 'line 3: not valid JSON'),
    ("p.jsonl", '{"seed": 1}\n', 'line 1: "prompt" must be a non-empty string'),
    ("p.jsonl", '["a"]\n', 'line 1: expected a JSON object'),
    ("p.jsonl", '{"prompt": "a", "sed": 1}\n', "line 1: unknown key 'sed'"),
    ("p.jsonl", '{"prompt": "a", "seed": -1}\n', 'line 1: "seed" must be a non-negative integer'),
    ("p.jsonl", '{"prompt": "a", "seconds": 0}\n', 'line 1: "seconds" must be a positive number'),
    ("p.jsonl", '{"prompt": "a", "name": "../x"}\n', 'line 1: "name" \'../x\' is not a safe file name'),
    ("p.jsonl", '{"prompt": "a", "name": "x"}\n{"prompt": "b"}\n{"prompt": "c", "name": "X"}\n',
     "line 3: name 'X' is already used on line 1"),
    ("p.txt", "\n  \n# only a comment\n", "holds no prompts"),
])
def test_malformed_prompts_file(name, text, message, tmp_path, capsys):
    prompts = tmp_path / name
    prompts.write_text(text)
    code, _, err = run_cli(["generate", "--prompts", str(prompts), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 1 and message in err and str(prompts) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("args, message", [
    (["--prompts", "P", "--prompt", "x", "--output-dir", "out"], "--prompt cannot be combined with --prompts"),
    (["--prompts", "P", "-o", "x.mp4", "--output-dir", "out"], "--output cannot be combined with --prompts"),
    (["--prompts", "P", "--output-dir", "out", "--save-latents", "l.st"], "--save-latents cannot be combined"),
    (["--prompts", "P", "--output-dir", "out", "--policies", "rolling", "--policy", "full"],
     "give --policy or --policies, not both"),
    (["--prompts", "P"], "--prompts needs --output-dir"),
    (["--output-dir", "out"], "--output-dir needs --prompts FILE"),
    (["--policies", "rolling"], "--policies needs --prompts FILE"),
    (["--prompts", "P", "--output-dir", "out", "--policies", "rolling,banana"],
     "unknown policy 'banana' in --policies"),
    (["--prompts", "P", "--output-dir", "out", "--policies", "full,full"], "names a policy twice"),
    (["--prompts", "missing.txt", "--output-dir", "out"], "prompts file not found"),
])
def test_batch_option_errors(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("P").write_text("a kite\n")
    code, _, err = run_cli(["generate", *args], capsys)
    assert code == 1 and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["P"]


def test_jsonl_rows_take_an_image_recorded_by_content(tmp_path, capsys, monkeypatch, one_thread):
    """A frame-wise config: a row's "image" starts its video (relative to the JSONL file), the manifest holds the
    image's hash, and another image under the same path is another video (refused, nothing touched)."""
    import numpy as np
    from PIL import Image

    from pfgen.video import decoded_frames

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = tmp_path / "fw.yaml"
    config.write_text("model: {name: random}\nsampling: {frames_per_chunk: 1, timesteps: [1000]}\n"
                      "cache: {policy: rolling}\n")
    (tmp_path / "img").mkdir()
    Image.fromarray(np.full((64, 96, 3), 90, np.uint8)).save(tmp_path / "img" / "first.png")
    prompts, out = tmp_path / "suite.jsonl", tmp_path / "out"
    prompts.write_text('{"prompt": "a kite", "name": "kite", "image": "img/first.png", "seconds": 0.5}\n'
                       '{"prompt": "a cat", "name": "cat", "seconds": 0.5}\n')
    args = ["generate", "--config", config, "--prompts", prompts, "--output-dir", out, "--height", 64, "--width", 96]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    entries = {e["name"]: e for e in manifest(out)}
    import hashlib
    assert entries["kite"]["image_sha256"] == hashlib.sha256((tmp_path / "img" / "first.png").read_bytes()).hexdigest()
    assert entries["cat"]["image_sha256"] is None
    assert decoded_frames(out / "kite.mp4") == entries["kite"]["frames"] == 5  # 0.5 s: 2 latent frames
    before = stamps(out)
    Image.fromarray(np.full((64, 96, 3), 200, np.uint8)).save(tmp_path / "img" / "first.png")
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "kite.mp4 exists but was made with other settings: image_sha256" in err
    assert stamps(out) == before
    prompts.write_text('{"prompt": "a kite", "image": "img/missing.png"}\n')
    code, _, err = run_cli(args, capsys)
    assert code == 1 and "image not found" in err and len(err.strip().splitlines()) == 1
