"""Hostile pass over stories, saved states, frames folders, previews, --then / --timeline, --dry-run and metadata
(issue 19, sections 1-4): each case runs `pfgen generate` (or `evaluate`) on the embedded tiny model and checks
what a careful user expects. Prints one line per failing case and the counts.

    PYTHONPATH=. python scripts/hostile_pass.py            # this checkout
    PYTHONPATH=/path/to/other/checkout python scripts/hostile_pass.py
    PYTHONPATH=. python scripts/hostile_pass.py --shard 2/3 # every third case from the second: run shards in parallel
    PYTHONPATH=. python scripts/hostile_pass.py then dry    # the cases whose name holds one of these words

Most cases run in this process (`pfgen.cli.main`, one import of torch for all); signals and locks run real
child processes. Every case gets a fresh folder; a case passes when its check holds and nothing unexpected is
left behind. The counts of the two versions are recorded in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

SIZE = ["--height", "32", "--width", "48", "--threads", "1"]
SMALL = ["--seconds", "1", *SIZE]
P1, P2 = "a red kite over the sea", "a dog on a beach"


def pfgen(args, cwd: Path) -> tuple[int, str, str]:
    """`pfgen ARGS` in this process, in `cwd`: (exit code, stdout, stderr)."""
    from pfgen.cli import main

    out, err, old = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception as exc:  # noqa: BLE001 - a traceback is a failed case, not a failed pass
                err.write(f"Traceback (uncaught {type(exc).__name__}: {exc})\n")
                code = 99
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def child(args, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pfgen", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def one_error(err: str, *fragments: str) -> bool:
    lines = [line for line in err.splitlines() if line.startswith("error")]
    return len(lines) == 1 and "Traceback" not in err and all(f in lines[0] for f in fragments)


def refused(code, err, *fragments) -> bool:
    return code in (1, 2) and one_error(err, *fragments)


def files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def frames_of(path: Path) -> int:
    from pfgen.video import decoded_frames

    return decoded_frames(path)


def meta(path: Path) -> dict:
    from pfgen.video import read_metadata

    return json.loads(read_metadata(path).get("comment", "{}"))


def state_position(path: Path) -> int:
    from pfgen.state import RunState

    return RunState.load(path).position


CASES = []


def case(name):
    def register(fn):
        CASES.append((name, fn))
        return fn
    return register


# -- --then / --timeline ----------------------------------------------------------------------------------------
@case("--then 1 --no-recache is refused")
def _(d):
    code, _, err = pfgen(["generate", "-p", P1, "--then", "1", "--no-recache", "--seconds", "2", *SIZE, "-o", "x.mp4"], d)
    return refused(code, err, "looks like an option") and files(d) == []


@case("--then=1 b is one line")
def _(d):
    code, _, err = pfgen(["generate", "-p", P1, "--then=1", "b", *SMALL, "-o", "x.mp4"], d)
    return refused(code, err, "--then SECONDS") and files(d) == []


@case("--then -y x is refused")
def _(d):
    code, _, err = pfgen(["generate", "-p", P1, "--then", "-y", "x", *SMALL, "-o", "x.mp4"], d)
    return refused(code, err) and files(d) == []


@case("--then 1 --prompt x is refused")
def _(d):
    code, _, err = pfgen(["generate", "--then", "1", "--prompt", "x", *SMALL, "-o", "x.mp4"], d)
    return refused(code, err, "looks like an option") and files(d) == []


@case("--then with one value at the end")
def _(d):
    code, _, err = pfgen(["generate", "-p", P1, *SMALL, "-o", "x.mp4", "--then", "0.5"], d)
    return refused(code, err) and files(d) == []


@case("--then past the end")
def _(d):
    code, _, err = pfgen(["generate", "-p", P1, "--then", "30", P2, *SMALL, "-o", "x.mp4"], d)
    return refused(code, err, "after the end") and files(d) == []


@case("--then a negative time")
def _(d):
    code, _, err = pfgen(["generate", "-p", P1, "--then", "-1", P2, *SMALL, "-o", "x.mp4"], d)
    return refused(code, err, ">= 0") and files(d) == []


@case("--then nan")
def _(d):
    code, _, err = pfgen(["generate", "-p", P1, "--then", "nan", P2, *SMALL, "-o", "x.mp4"], d)
    return refused(code, err) and files(d) == []


@case("--then two at one boundary")
def _(d):
    code, _, err = pfgen(["generate", "-p", P1, "--then", "0.5", P2, "--then", "0.52", "c", *SMALL, "-o", "x.mp4"], d)
    return refused(code, err, "both switch") and files(d) == []


@case("--timeline and --prompt")
def _(d):
    (d / "t.yaml").write_text(f"- {{at: 0, prompt: {P1}}}\n")
    code, _, err = pfgen(["generate", "--timeline", "t.yaml", "-p", P2, *SMALL, "-o", "x.mp4"], d)
    return refused(code, err, "both give the first prompt") and files(d) == ["t.yaml"]


@case("--timeline with an empty list")
def _(d):
    (d / "t.json").write_text("[]")
    code, _, err = pfgen(["generate", "--timeline", "t.json", *SMALL, "-o", "x.mp4"], d)
    return refused(code, err, "empty") and files(d) == ["t.json"]


@case("--timeline with a string time")
def _(d):
    (d / "t.json").write_text(json.dumps([{"at": 0, "prompt": P1}, {"at": "1", "prompt": P2}]))
    code, _, err = pfgen(["generate", "--timeline", "t.json", *SMALL, "-o", "x.mp4"], d)
    return refused(code, err, "number of seconds") and files(d) == ["t.json"]


@case("--timeline switch is announced and recorded")
def _(d):
    (d / "t.json").write_text(json.dumps([{"at": 0, "prompt": P1}, {"at": 0.5, "prompt": P2}]))
    code, _, err = pfgen(["generate", "--timeline", "t.json", *SMALL, "-o", "x.mp4"], d)
    m = meta(d / "x.mp4") if code == 0 else {}
    return code == 0 and [s.get("prompt") for s in m.get("timeline", [])] == [P1, P2]


# -- options that must work or be refused ------------------------------------------------------------------------
@case("--seed with --resume is refused")
def _(d):
    code, _, err = pfgen(["generate", "--resume", STATE, "--seed", "5", *SMALL, "-o", "x.mp4"], d)
    return refused(code, err, "--seed") and files(d) == []


@case("--no-recache without a switch warns")
def _(d):
    code, _, err = pfgen(["generate", "--no-recache", *SMALL, "-o", "x.mp4"], d)
    return code == 0 and "warning: --no-recache does nothing" in err


@case("--no-recache with a switch does not warn")
def _(d):
    code, _, err = pfgen(["generate", "-p", P1, "--then", "0.5", P2, "--no-recache", *SMALL, "-o", "x.mp4"], d)
    return code == 0 and "does nothing" not in err


@case("--no-recache with --resume --prompt does not warn")
def _(d):
    code, _, err = pfgen(["generate", "--resume", STATE, "-p", P2, "--no-recache", *SMALL, "-o", "x.mp4"], d)
    return code == 0 and "does nothing" not in err


@case("batch --no-recache applies to a row with a switch")
def _(d):
    from pfgen.sampling import ChunkLoop

    rows = [{"timeline": [{"at": 0, "prompt": P1}, {"at": 0.5, "prompt": P2}], "name": "s", "seconds": 1.5}]
    (d / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    replays, replay = [], ChunkLoop.replay
    ChunkLoop.replay = lambda self, *a, **k: replays.append(1) or replay(self, *a, **k)  # re-cache at a switch
    try:
        code, _, err = pfgen(["generate", "--prompts", "p.jsonl", "--output-dir", "off", "--no-recache", *SIZE], d)
    finally:
        ChunkLoop.replay = replay
    return code == 0 and replays == []


@case("batch --no-recache without a switch warns")
def _(d):
    (d / "p.txt").write_text(P1 + "\n")
    code, _, err = pfgen(["generate", "--prompts", "p.txt", "--output-dir", "o", "--no-recache", *SMALL], d)
    return code == 0 and "does nothing" in err


@case("--save-state-every without --save-state")
def _(d):
    code, _, err = pfgen(["generate", "--save-state-every", "2", *SMALL, "-o", "x.mp4"], d)
    return refused(code, err) and files(d) == []


@case("--save-state-every -1")
def _(d):
    code, _, err = pfgen(["generate", "--save-state", "s.state", "--save-state-every", "-1", *SMALL, "-o", "x.mp4"], d)
    return refused(code, err) and files(d) == []


# -- --dry-run ---------------------------------------------------------------------------------------------------
@case("--dry-run with a missing --resume file")
def _(d):
    code, _, err = pfgen(["generate", "--dry-run", "--resume", "nope.state", *SMALL], d)
    return refused(code, err, "not found")


@case("--dry-run with a state of another policy")
def _(d):
    code, _, err = pfgen(["generate", "--dry-run", "--resume", STATE, "--policy", "rolling", *SMALL], d)
    return refused(code, err, "policy")


@case("--dry-run with a corrupt state")
def _(d):
    (d / "bad.state").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    code, _, err = pfgen(["generate", "--dry-run", "--resume", "bad.state", *SMALL], d)
    return refused(code, err)


@case("--dry-run with --then past the end")
def _(d):
    code, _, err = pfgen(["generate", "--dry-run", "-p", P1, "--then", "30", P2, *SMALL], d)
    return refused(code, err, "after the end")


@case("--dry-run of a resume plans the state's size")
def _(d):
    code, out, _ = pfgen(["generate", "--dry-run", "--json", "--resume", STATE, "--seconds", "2"], d)
    plan = json.loads(out) if code == 0 else {}
    return [plan.get("height"), plan.get("width")] == STATE_SIZE


@case("--dry-run of a resume plans its real frame count")
def _(d):
    code, out, _ = pfgen(["generate", "--dry-run", "--json", "--resume", STATE, "--seconds", "2"], d)
    real = pfgen(["generate", "--resume", STATE, "--seconds", "2", "-o", "x.mp4", "--json"], d)
    if code or real[0]:
        return False
    return json.loads(out)["frames"] == json.loads(real[1])["frames"] == frames_of(d / "x.mp4")


@case("--dry-run frame count of a fresh run is the real one")
def _(d):
    code, out, _ = pfgen(["generate", "--dry-run", "--json", "--seconds", "2", *SIZE], d)
    real = pfgen(["generate", "--seconds", "2", *SIZE, "-o", "x.mp4", "--json"], d)
    return code == 0 and real[0] == 0 and json.loads(out)["frames"] == json.loads(real[1])["frames"]


@case("the memory line of a resumed run predicts the state's cache")
def _(d):
    code, _, err = pfgen(["generate", "--resume", STATE, "--seconds", "1", "-o", "x.mp4"], d)
    line = next((l for l in err.splitlines() if l.startswith("memory: KV cache predicted")), "")
    parts = line.replace(";", ",").split(",")
    return code == 0 and len(parts) > 1 and parts[0].split("predicted")[1].strip() == \
        parts[1].split("allocated")[1].strip()


@case("--dry-run --seconds 1e9 --force --policy full")
def _(d):
    started = time.time()
    code, out, err = pfgen(["generate", "--dry-run", "--seconds", "1e9", "--force", "--policy", "full"], d)
    return code == 0 and "KV cache" in out and time.time() - started < 60


@case("--dry-run refuses --seed with --resume")
def _(d):
    code, _, err = pfgen(["generate", "--dry-run", "--resume", STATE, "--seed", "3", *SMALL], d)
    return refused(code, err, "--seed")


@case("--dry-run refuses an output and frames folder on one path")
def _(d):
    code, _, err = pfgen(["generate", "--dry-run", *SMALL, "-o", "same.mp4", "--frames-dir", "same.mp4"], d)
    return refused(code, err)


# -- preview and frames folder -----------------------------------------------------------------------------------
@case("an existing --preview needs -y")
def _(d):
    (d / "p.png").write_bytes(b"mine")
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--preview", "p.png"], d)
    return refused(code, err, "already exists") and (d / "p.png").read_bytes() == b"mine" and files(d) == ["p.png"]


@case("an existing --preview with -y is replaced")
def _(d):
    (d / "p.png").write_bytes(b"mine")
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--preview", "p.png", "-y"], d)
    return code == 0 and (d / "p.png").read_bytes()[:4] == b"\x89PNG"


@case("a --frames-dir holding frames needs -y")
def _(d):
    (d / "f").mkdir()
    (d / "f" / "frame_000030.png").write_bytes(b"old")
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--frames-dir", "f"], d)
    return refused(code, err) and files(d) == ["f", "f/frame_000030.png"]


@case("a --frames-dir with -y holds this run's frames only")
def _(d):
    (d / "f").mkdir()
    (d / "f" / "frame_000030.png").write_bytes(b"old")
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--frames-dir", "f", "-y"], d)
    return code == 0 and sorted(p.name for p in (d / "f").iterdir()) == [f"frame_{i:06d}.png" for i in range(21)]


@case("a --frames-dir holding other files is refused")
def _(d):
    (d / "f").mkdir()
    (d / "f" / "notes.txt").write_text("mine")
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--frames-dir", "f", "-y"], d)
    return refused(code, err) and files(d) == ["f", "f/notes.txt"]


@case("--frames-dir that is a file")
def _(d):
    (d / "f").write_text("x")
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--frames-dir", "f"], d)
    return refused(code, err, "is a file") and files(d) == ["f"]


@case("--frames-dir in a missing folder")
def _(d):
    code, _, err = pfgen(["generate", *SMALL, "--frames-dir", "no/f"], d)
    return refused(code, err) and files(d) == []


@case("--preview with a wrong suffix")
def _(d):
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--preview", "p.gif"], d)
    return refused(code, err, "must end in") and files(d) == []


@case("--frames-dir only: no mp4")
def _(d):
    code, _, err = pfgen(["generate", *SMALL, "--frames-dir", "f"], d)
    return code == 0 and len(list((d / "f").iterdir())) == 21 and not (d / "pfgen.mp4").exists()


# -- outputs distinct, checked before any work -------------------------------------------------------------------
@case("-o same.mp4 --frames-dir same.mp4")
def _(d):
    code, _, err = pfgen(["generate", *SMALL, "-o", "same.mp4", "--frames-dir", "same.mp4"], d)
    return refused(code, err, "same") and files(d) == []


@case("--preview over --save-state path")
def _(d):
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--preview", "s.png", "--save-state", "s.png"], d)
    return refused(code, err, "same") and files(d) == []


@case("--save-state over --frames-dir")
def _(d):
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--frames-dir", "st", "--save-state", "st"], d)
    return refused(code, err) and files(d) == []


@case("--save-latents over --resume file")
def _(d):
    import shutil

    shutil.copy(STATE, d / "s.safetensors")
    code, _, err = pfgen(["generate", "--resume", "s.safetensors", "--save-latents", "s.safetensors", "-y",
                          "--seconds", "1", "-o", "x.mp4"], d)
    return refused(code, err, "same") and files(d) == ["s.safetensors"]


@case("--save-state into a missing folder")
def _(d):
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--save-state", "no/s.state"], d)
    return refused(code, err) and files(d) == []


@case("an existing --save-state needs -y")
def _(d):
    (d / "s.state").write_bytes(b"mine")
    code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--save-state", "s.state"], d)
    return refused(code, err, "already exists") and (d / "s.state").read_bytes() == b"mine"


# -- saved states ------------------------------------------------------------------------------------------------
@case("--resume a file that is not a state")
def _(d):
    (d / "x.state").write_text("hello")
    code, _, err = pfgen(["generate", "--resume", "x.state", "--seconds", "1", "-o", "x.mp4"], d)
    return refused(code, err) and files(d) == ["x.state"]


@case("--resume with another size")
def _(d):
    code, _, err = pfgen(["generate", "--resume", STATE, "--seconds", "1", "--height", "64", "-o", "x.mp4"], d)
    return refused(code, err, "continues a") and files(d) == []


@case("--resume then save in place advances the state")
def _(d):
    import shutil

    shutil.copy(STATE, d / "s.state")
    before = state_position(d / "s.state")
    code, _, err = pfgen(["generate", "--resume", "s.state", "--save-state", "s.state", "--seconds", "1",
                          "-o", "x.mp4"], d)
    return code == 0 and state_position(d / "s.state") > before and frames_of(d / "x.mp4") == 24


@case("a state records the seed that drew the noise")
def _(d):
    code, _, err = pfgen(["generate", *SMALL, "--seed", "7", "-o", "a.mp4", "--save-state", "a.state"], d)
    if code:
        return False
    code, out, err = pfgen(["generate", "--resume", "a.state", "--seconds", "1", "-o", "b.mp4", "--json"], d)
    return code == 0 and meta(d / "b.mp4").get("seed") == 7 and json.loads(out)["metadata"]["seed"] == 7


@case("a full disk for the state is refused before the work")
def _(d):
    import shutil

    free = shutil.disk_usage(d).free
    if free < 2 ** 30:
        return True  # cannot tell here
    code, _, err = pfgen(["generate", "--seconds", "600", "--height", "2048", "--width", "4096", "--policy", "full",
                          "--dry-run", "--save-state", "s.state", "-o", "x.mp4"], d)
    return refused(code, err, "--save-state") or (code == 0 and free > 10 ** 12)


# -- metadata ----------------------------------------------------------------------------------------------------
@case("metadata of a resume with --then names the continued prompt first")
def _(d):
    code, out, err = pfgen(["generate", "--resume", STATE, "--then", "1", P2, "--seconds", "2", "-o", "x.mp4",
                            "--json"], d)
    if code:
        return False
    m, summary = meta(d / "x.mp4"), json.loads(out)
    return m.get("prompt") == STATE_PROMPT and summary["metadata"]["prompt"] == STATE_PROMPT and \
        [s["prompt"] for s in m.get("timeline", [])] == [STATE_PROMPT, P2]


@case("metadata of a resume names the state")
def _(d):
    code, out, err = pfgen(["generate", "--resume", STATE, "--seconds", "1", "-o", "x.mp4"], d)
    return code == 0 and (meta(d / "x.mp4").get("resumed_from") or {}).get("state") == str(STATE)


@case("metadata of --interactive records the typed prompt")
def _(d):
    proc = child(["generate", "--interactive", "-p", P1, *SMALL, "-o", "x.mp4", "--json"], d, stdin=subprocess.PIPE)
    out, err = proc.communicate(P2 + "\n", timeout=600)
    if proc.returncode:
        return False
    m = meta(d / "x.mp4")
    return [s.get("source") for s in m.get("timeline", [])][-1:] == ["interactive"] and \
        json.loads(out)["switches"] == m["timeline"] and m["prompt"] == m["timeline"][0]["prompt"]


@case("metadata of --then records every switch with time and source")
def _(d):
    code, out, _ = pfgen(["generate", "-p", P1, "--then", "0.5", P2, *SMALL, "-o", "x.mp4", "--json"], d)
    if code:
        return False
    tl = meta(d / "x.mp4").get("timeline", [])
    return [(s["prompt"], s["source"], s["video_frame"]) for s in tl] == [(P1, "timeline", 0), (P2, "timeline", 9)]


@case("final line of a resume with --then")
def _(d):
    code, _, err = pfgen(["generate", "--resume", STATE, "--then", "1", P2, "--seconds", "2", "-o", "x.mp4"], d)
    line = next((l for l in err.splitlines() if l.startswith("wrote x.mp4")), "")
    return code == 0 and f"0.00 s (frame 0) {STATE_PROMPT!r}" in line


@case("--json of a fresh run: seed and prompt")
def _(d):
    code, out, _ = pfgen(["generate", "-p", P1, "--seed", "4", *SMALL, "-o", "x.mp4", "--json"], d)
    return code == 0 and json.loads(out)["metadata"]["seed"] == 4 and meta(d / "x.mp4")["prompt"] == P1


# -- evaluate --plot ---------------------------------------------------------------------------------------------
@case("evaluate --plot over an existing file needs -y")
def _(d):
    code, _, _ = pfgen(["generate", "--seconds", "6", *SIZE, "-o", "v.mp4"], d)
    (d / "p.png").write_bytes(b"mine")
    code2, _, err = pfgen(["evaluate", "v.mp4", "--plot", "p.png"], d)
    return code == 0 and refused(code2, err, "already exists") and (d / "p.png").read_bytes() == b"mine"


# -- locks (two real processes) ----------------------------------------------------------------------------------
HOLD = "import sys,time\nfrom pfgen.outputs import output_lock\nwith output_lock(sys.argv[1]):\n    print('holding', " \
       "flush=True)\n    time.sleep(600)\n"


@contextlib.contextmanager
def held(target, d):
    """Another process holding the output lock of `target` while the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, target], cwd=d, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "holding\n"
        yield proc
    finally:
        proc.kill()
        proc.communicate()


@case("two runs on one --save-state")
def _(d):
    with held("s.state", d):
        code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--save-state", "s.state"], d)
    return refused(code, err, "another pfgen run") and not (d / "x.mp4").exists()


@case("two runs on one --frames-dir")
def _(d):
    with held("f", d):
        code, _, err = pfgen(["generate", *SMALL, "-o", "x.mp4", "--frames-dir", "f"], d)
    return refused(code, err, "another pfgen run") and not (d / "f").exists()


# -- signals (real signals to real child processes) ---------------------------------------------------------------
def run_until(args, d, ready, sig):
    proc = child(args, d)
    deadline = time.time() + 900
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


@case("SIGTERM on a resume saving in place keeps the video up to the state")
def _(d):
    import shutil

    shutil.copy(STATE, d / "ip.state")
    before = state_position(d / "ip.state")
    code, err = run_until(["generate", "--resume", "ip.state", "--save-state", "ip.state", "--save-state-every", "1",
                           "--seconds", "20", "-o", "ip.mp4"], d,
                          lambda: state_position(d / "ip.state") >= before + 6, signal.SIGTERM)
    after = state_position(d / "ip.state")
    kept = frames_of(d / "ip.mp4") if (d / "ip.mp4").exists() else 0
    return code == 143 and after > before and kept == 4 * (after - before)


@case("SIGINT removes the frames folder's files and the preview")
def _(d):
    code, err = run_until(["generate", "--seconds", "20", *SIZE, "--frames-dir", "f", "--preview", "p.png"], d,
                          lambda: (d / "p.png").exists(), signal.SIGINT)
    return code == 130 and not (d / "p.png").exists() and not list((d / "f").glob("*.png")) \
        if (d / "f").exists() else code == 130 and not (d / "p.png").exists()


@case("SIGHUP after a saved state keeps the frames folder up to it")
def _(d):
    code, err = run_until(["generate", "--seconds", "20", *SIZE, "--frames-dir", "f", "--save-state", "s.state",
                           "--save-state-every", "1"], d, lambda: (d / "s.state").exists(), signal.SIGHUP)
    if code != 129 or not (d / "s.state").exists():
        return False
    return len(list((d / "f").glob("*.png"))) == 1 + 4 * (state_position(d / "s.state") - 1)


STATE = STATE_SIZE = STATE_PROMPT = None


def main() -> int:
    global STATE, STATE_SIZE, STATE_PROMPT
    warnings.simplefilter("always")
    import pfgen as package

    args = sys.argv[1:]
    shard, shards = 1, 1
    if args[:1] == ["--shard"]:
        shard, shards = map(int, args[1].split("/"))
        args = args[2:]
    only = args
    chosen = [(i, name, fn) for i, (name, fn) in enumerate(CASES) if (i % shards) == shard - 1
              and (not only or any(word in name for word in only))]
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        STATE, STATE_SIZE, STATE_PROMPT = root / "base.state", [32, 48], P1
        code, _, err = pfgen(["generate", "-p", P1, "--seconds", "2", *SIZE, "-o", "base.mp4", "--save-state",
                              "base.state"], root)
        assert code == 0, err
        failed = []
        for i, name, fn in chosen:
            d = root / f"case{i:03d}"
            d.mkdir()
            try:
                ok = bool(fn(d))
            except Exception as exc:  # noqa: BLE001 - the check itself failing is a failed case
                ok = False
                name += f" ({type(exc).__name__}: {exc})"
            if not ok:
                failed.append(name)
                print(f"FAIL {name}", flush=True)
    ran = len(chosen)
    print(f"pfgen at {Path(package.__file__).parent.parent}: {ran} cases, {ran - len(failed)} pass, {len(failed)} fail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
