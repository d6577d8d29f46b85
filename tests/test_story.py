"""Long videos that tell a story: prompt timelines and re-cache, resume / extend / branch, live preview and
interactive prompts, on the embedded tiny model."""

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import pfgen
import pfgen.sinks
from pfgen.cli import main
from pfgen.errors import PfgenError
from pfgen.frames import video_frames_for
from pfgen.sampling import ChunkLoop, NoiseSource
from pfgen.state import RunState
from pfgen.story import Story
from pfgen.timeline import Entry, from_options, load_timeline, resolve, switch_frame, video_frame
from clirun import RANDOM, run_cli

SIZE = dict(height=64, width=96)
CLI_SIZE = ["--height", "64", "--width", "96"]
P1, P2, P3 = "a cat walks on a wall", "the cat jumps down", "a dog barks"


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: torch's threads and ffmpeg fight (4x slower)
    yield pfgen.load_pipeline()
    torch.set_num_threads(threads)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)




# -- timelines, torch-free -------------------------------------------------------------------------------------
def test_switch_happens_at_the_first_chunk_boundary_at_or_after_its_time():
    # chunks of 3 latent frames start at video frames 0, 9, 21, 33, 45, ... (1 + 4 (t - 1) for t = 3, 6, ...)
    boundaries = [video_frame(t0, 0) for t0 in range(0, 30, 3)]
    assert boundaries == [0, 9, 21, 33, 45, 57, 69, 81, 93, 105]
    for at in (0.0, 0.1, 0.5625, 0.57, 2.0, 2.0625, 4.0, 5.9):
        t0 = switch_frame(at, 0, 3, 16)
        assert video_frame(t0, 0) >= at * 16 - 1e-6 and (t0 == 0 or video_frame(t0 - 3, 0) < at * 16)
    assert switch_frame(2.0, 0, 3, 16) == 9 and switch_frame(0.5625, 0, 3, 16) == 3
    # a resumed run counts from its own first frame: latent frame 24 is its frame 0, each later one 4 frames
    assert switch_frame(0, 24, 3, 16) == 24 and switch_frame(0.75, 24, 3, 16) == 27 and video_frame(27, 24) == 12


@pytest.mark.parametrize("args, message", [
    ((None, ["2\x1fx"], None, False), "--then needs a first prompt"),
    (("a", ["abc\x1fx"], None, False), "SECONDS must be a number"),
    (("a", ["3"], None, False), "--then 3 has no prompt"),
    (("a", ["3\x1fx", "2\x1fy"], None, False), "times must increase"),
    (("a", ["-1\x1fx"], None, False), "must be a number of seconds >= 0"),
    (("a", ["1\x1f  "], None, False), "non-empty string"),
])
def test_bad_then_options(args, message):
    with pytest.raises(PfgenError, match=message):
        from_options(*args)


def test_resolve_refuses_late_and_colliding_entries():
    entries = [Entry(0, "a"), Entry(2.0, "b"), Entry(2.05, "c")]
    with pytest.raises(PfgenError, match="both switch at the chunk boundary at 2.06 s"):
        resolve(entries, 0, 24, 3, 16)
    with pytest.raises(PfgenError, match="comes after the end of the 5.81 s video"):
        resolve([Entry(0, "a"), Entry(6, "b")], 0, 24, 3, 16)


def test_timeline_files_yaml_and_json(tmp_path):
    (tmp_path / "s.yaml").write_text("- at: 0\n  prompt: a cat\n- {at: 10.5, prompt: the cat jumps}\n")
    (tmp_path / "s.json").write_text('[{"at": 0, "prompt": "a cat"}, {"at": 10.5, "prompt": "the cat jumps"}]')
    for name in ("s.yaml", "s.json"):
        assert load_timeline(tmp_path / name) == [Entry(0.0, "a cat"), Entry(10.5, "the cat jumps")]


@pytest.mark.parametrize("text, message", [
    ("- {at: 1, prompt: a}\n", "the first entry must be at 0 s"),
    ("- {at: 0, prompt: a}\n- {at: 3}\n", "entry 2 must have exactly the keys 'at' and 'prompt'"),
    ("{at: 0}\n", "a timeline is a list"),
    ("- [\n", "not valid YAML"),
])
def test_bad_timeline_files(text, message, tmp_path, capsys):
    story = tmp_path / "story.yaml"
    story.write_text(text)
    code, _, err = run_cli(["generate", "--timeline", str(story), "-o", str(tmp_path / "x.mp4")], capsys)
    assert code == 1 and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["story.yaml"]


# -- timelines and re-cache on the model -----------------------------------------------------------------------
def test_two_switches_keep_the_chunks_before_the_first_one(pipe):
    frames = video_frames_for(24)
    single = list(pipe.stream(P1, num_frames=frames, generator=seeded(), decode=False, **SIZE))
    story = Story([Entry(0, P1), Entry(2.0, P2), Entry(4.0, P3)])
    chunks = list(pipe.stream(story=story, num_frames=frames, generator=seeded(), decode=False, **SIZE))
    assert [(s["latent_frame"], s["video_frame"], s["seconds"]) for s in story.switches] == \
        [(0, 0, 0.0), (9, 33, 2.0625), (18, 69, 4.3125)]
    assert [c.switch["prompt"] for c in chunks if c.switch] == [P1, P2, P3]
    for a, b in zip(single[:3], chunks[:3]):  # same code path before the first switch: bit for bit
        assert torch.equal(a.latents, b.latents)
    assert all(not torch.equal(a.latents, b.latents) for a, b in zip(single[3:], chunks[3:]))
    embedded = [(0, P1), (2.0, pipe.encode_prompt(P2)), (4.0, pipe.encode_prompt(P3))]  # API: embeddings
    again = list(pipe.stream(timeline=embedded, num_frames=frames, generator=seeded(), decode=False, **SIZE))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(chunks, again))
    # each switch replays the clean pass over the chunks the cache holds: sinks 0..2 and frames 0..8, then
    # every frame so far (the tiny video is shorter than the wave history) -> 3 + 6 extra forward passes
    assert story.recached_chunks == 3 + 6


def test_rolling_recache_equals_a_fresh_run_given_the_frames_as_prefix(pipe):
    """docs/story.md: after a switch at t0, rolling re-cache = a fresh run under the new prompt whose first
    chunks are the kept latents (clean passes only), continued with the same noise. Reference: the `full`
    cache (another rule and store), prefix written by hand, continuation from the restored position."""
    frames, t0 = video_frames_for(18), 9  # 18 frames fit the 21-frame window: the cache holds every frame
    kw = dict(num_frames=frames, decode=False, policy="rolling", **SIZE)
    switched = list(pipe.stream(timeline=[(0, P1), (2.0, P2)], generator=seeded(), **kw))
    no_recache = list(pipe.stream(timeline=[(0, P1), (2.0, P2)], generator=seeded(), recache=False, **kw))

    generator = seeded()
    list(pipe.stream(P1, num_frames=video_frames_for(t0), generator=generator, decode=False, **SIZE))  # draws
    embeds = pipe.encode_prompt(P2)
    cache = pipe.make_cache("full", None, 1, (8, 12), 18)
    cache.reset()
    pipe.state.new_prompt()
    with torch.no_grad():
        for chunk in switched[:3]:
            cache.begin_chunk(chunk.t0, 3)
            pipe.transformer.rope.frame_offset = chunk.t0
            cache.set_pass(commit=True)
            pipe.transformer(hidden_states=chunk.latents, timestep=torch.zeros(1), encoder_hidden_states=embeds,
                             return_dict=False)
    noise = NoiseSource((1, 16, 8, 12), pipe.device, pipe.dtype, generator)
    loop = ChunkLoop(pipe.transformer, pipe.state, pipe.config.sampling)
    reference = list(loop.run(embeds, 18, noise, start=t0))
    for got, ref, plain in zip(switched[3:], reference, no_recache[3:]):
        torch.testing.assert_close(got.latents, ref, rtol=0, atol=1e-6)
        assert (plain.latents - ref).abs().max() > 1e-4  # without re-cache the history keeps the old prompt


def test_pyramid_recache_rebuilds_the_same_bookkeeping_from_bounded_latents(pipe):
    """Replaying the kept chunks restores every rule's state (sinks, strided, cyclic, recent, merged blocks,
    the unfinished block's accumulator), and the kept latents stay bounded however long the video."""
    story = Story([Entry(0, P1)])
    sizes = []
    for _ in pipe.stream(story=story, num_frames=video_frames_for(60), generator=seeded(), decode=False,
                         commit_last=True, **SIZE):
        sizes.append(len(story.kept))
    cache = pipe.state.cache
    kept_frames = {t for t0, x in story.kept.items() for t in range(t0, t0 + x.shape[2])}
    assert cache.held_frames() <= kept_frames
    assert max(sizes[12:]) == max(sizes[-3:]) <= 12  # flat in steady state: 3 sink frames + 28 recent-most
    before = {kind: rule.state_dict() for kind, rule in cache.rules.items()}
    ChunkLoop(pipe.transformer, pipe.state, pipe.config.sampling).replay(sorted(story.kept.items()), story.embeds)
    assert {kind: rule.state_dict() for kind, rule in cache.rules.items()} == before


# -- resume, extend, branch ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, pipe):
    """6 s with --save-state, 6 more from the state, and 12 s in one go, through the command line."""
    d = tmp_path_factory.mktemp("resume")
    base = ["generate", "--prompt", P1, *CLI_SIZE, "--seed", "7"]
    for args in ([*base, "--seconds", "6", "-o", str(d / "a.mp4"), "--save-state", str(d / "a.state"),
                  "--save-latents", str(d / "a.safetensors")],
                 ["generate", "--resume", str(d / "a.state"), "--seconds", "6", "-o", str(d / "b.mp4"),
                  "--save-latents", str(d / "b.safetensors"), "--frames-dir", str(d / "b")],
                 [*base, "--seconds", "12", "-o", str(d / "one.mp4"), "--save-latents", str(d / "one.safetensors"),
                  "--frames-dir", str(d / "one")]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0
    return d


def test_resume_continues_bit_for_bit(saved):
    a, b, one = (load_file(saved / f"{n}.safetensors")["latents"] for n in ("a", "b", "one"))
    assert a.shape[2] == b.shape[2] == 24 and one.shape[2] == 48  # --save-latents of a resume: new chunks only
    assert torch.equal(torch.cat([a, b], dim=2), one)
    resumed = sorted((saved / "b").iterdir())
    assert len(resumed) == 96 and resumed[0].name == "frame_000000.png"
    for i in (0, 1, 50, 95):  # the streaming decoder's state came back too: lossless PNGs are identical
        assert np.array_equal(np.asarray(Image.open(saved / "b" / f"frame_{i:06d}.png")),
                              np.asarray(Image.open(saved / "one" / f"frame_{93 + i:06d}.png")))
    from test_cli import read_mp4

    _, mp4 = read_mp4(saved / "b.mp4")
    _, whole = read_mp4(saved / "one.mp4")
    assert len(mp4) == 96 and len(whole) == 189
    diff = np.abs(np.stack(mp4).astype(int) - np.stack(whole[93:]).astype(int))
    assert diff.mean() < 2.0  # H.264 is lossy and the resumed file starts a new group of pictures


def test_state_holds_its_metadata(saved):
    state = RunState.load(saved / "a.state")
    meta = state.meta
    assert meta["position"] == 24 and meta["policy"] == "pyramid" and meta["size"] == [64, 96]
    assert meta["timeline"] == [{"seconds": 0.0, "video_frame": 0, "latent_frame": 0, "prompt": P1,
                                 "source": "timeline"}]
    assert sorted({k.split(".")[0] for k in state.tensors}) == ["cache", "embeds", "kept", "rng", "vae"]
    rules = meta["rules"]
    assert rules["anchor"]["sunk"] == [0, 1, 2] and rules["wave"]["sunk"] == [0]
    assert rules["veil"]["merged"] == [2, 3, 4, 5]  # blocks of 4 frames, latest 4 (frames 8..23)


def test_branches_share_the_past_and_differ_after(saved, pipe):
    state = RunState.load(saved / "a.state")
    one = load_file(saved / "one.safetensors")["latents"]
    branches = {}
    for prompt in (None, P2, P3, P2):
        story = Story([Entry(0, prompt)] if prompt else None)
        chunks = list(pipe.stream(story=story, resume=state, num_frames=video_frames_for(6), decode=False))
        latents = torch.cat([c.latents for c in chunks], dim=2)
        assert story.history == state.meta["timeline"]  # the shared past
        if prompt in branches:
            assert torch.equal(branches[prompt], latents)  # a branch is reproducible
        branches[prompt] = latents
    assert torch.equal(branches[None], one[:, :, 24:30])  # no new prompt: the one-go video goes on
    for a, b in ((P2, P3), (None, P2), (None, P3)):
        assert (branches[a] - branches[b]).abs().max() > 1e-3


@pytest.mark.parametrize("policy", ["full", "rolling"])
def test_state_saved_every_n_chunks_resumes_exactly(policy, pipe, tmp_path, monkeypatch):
    """--save-state-every 3 over 8 chunks saves after chunks 3, 6 and 8; the state saved mid-run continues
    the run bit for bit (the `full` cache grows into a larger store on resume)."""
    import pfgen.state
    from pfgen.generate import generate_video

    saves, save = [], pfgen.state.save_state

    def recording(path, pipe_, story, cache, seed):
        size = save(path, pipe_, story, cache, seed)
        saves.append(story.position)
        if len(saves) == 1:
            (tmp_path / "first.state").write_bytes(path.read_bytes())
        return size

    monkeypatch.setattr(pfgen.state, "save_state", recording)
    kw = dict(seed=3, policy=policy, height=64, width=96)
    generate_video(pipe, P1, None, num_frames=video_frames_for(24), save_state=tmp_path / "s.state",
                   save_state_every=3, save_latents=tmp_path / "one.safetensors",
                   files=pfgen.sinks.FrameFiles(tmp_path / "frames"), **kw)
    assert saves == [9, 18, 24]
    state = RunState.load(tmp_path / "first.state")
    rest = list(pipe.stream(resume=state, num_frames=video_frames_for(15), policy=policy, decode=False))
    one = load_file(tmp_path / "one.safetensors")["latents"]
    assert torch.equal(torch.cat([c.latents for c in rest], dim=2), one[:, :, 9:])


def _rewrite(path, out, change, sign: bool = True):
    """A copy of a state with its tensors and metadata changed; `sign` recomputes the metadata's CRC (an edit
    made through pfgen's own writer), else the edit is a corruption."""
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["pfgen"])
    change(tensors, meta)
    if sign:
        meta["header_crc32"] = pfgen.state._header_crc(meta)
    save_file(tensors, str(out), metadata={"pfgen": json.dumps(meta)})


def test_states_that_do_not_fit_are_refused(saved, tmp_path, capsys):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"format": "pfgen.head-types/1", "model": {"name": "random", "layers": 4, "heads": 4},
                                 "types": [["anchor"] * 4] * 4}))
    config = tmp_path / "shift.yaml"
    config.write_text("model:\n  name: random\nsampling:\n  shift: 3.0\ncache:\n  policy: pyramid\n  heads: "
                      f"{Path(__file__).with_name('heads-random.json')}\n")
    truncated = tmp_path / "truncated.state"
    truncated.write_bytes((saved / "a.state").read_bytes()[:100_000])
    flipped = bytearray((saved / "a.state").read_bytes())
    flipped[-1000] ^= 0xFF
    corrupt = tmp_path / "corrupt.state"
    corrupt.write_bytes(bytes(flipped))
    other_model = tmp_path / "model.state"
    _rewrite(saved / "a.state", other_model, lambda t, m: m["model"].update(fingerprint="0" * 16))
    edited = {"edited": ({"position": 27}, False), "position-abc": ({"position": "abc"}, True),
              "size-0": ({"size": [0]}, True), "seed-str": ({"seed": "1"}, True), "no-prompt": ({"prompt": None}, True)}
    for name, (fields, sign) in edited.items():  # a one-field edit of the metadata; valid CRC or not
        _rewrite(saved / "a.state", tmp_path / f"{name}.state", lambda t, m: m.update(fields), sign=sign)
    state = str(saved / "a.state")
    cases = [*[(["--resume", str(tmp_path / f"{name}.state")], "is corrupt or truncated") for name in edited],
        (["--resume", state, "--policy", "rolling"], "was saved with the pyramid policy, this run uses rolling"),
        (["--resume", state, "--config", str(config)], "was saved with another config"),
        (["--resume", state, "--heads", str(heads)], "was saved with other head types"),
        (["--resume", str(other_model)], "was saved with another model (random)"),
        (["--resume", str(truncated)], "is corrupt or truncated"),
        (["--resume", str(corrupt)], "is corrupt or truncated"),
        (["--resume", state, "--height", "96"], "continues a 96x64 video"),
        (["--resume", str(tmp_path / "nope.state")], "state file not found"),
        (["--save-state-every", "2"], "--save-state-every N needs --save-state"),
    ]
    for args, message in cases:
        out = tmp_path / "x.mp4"
        code, _, err = run_cli(["generate", *args, "-o", str(out), "--seconds", "1"], capsys)
        assert code == 1 and message in err and err.count("\n") == 1, (args, err)
        assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_model_fingerprint_tells_weights_apart(pipe, saved):
    state = RunState.load(saved / "a.state")
    types = pipe.head_types("pyramid")
    state.check_model(pipe, types)
    with torch.no_grad():
        pipe.transformer.proj_out.bias.add_(1e-3)
        try:
            with pytest.raises(PfgenError, match="another model"):
                state.check_model(pipe, types)
        finally:
            pipe.transformer.proj_out.bias.sub_(1e-3)


def test_batch_rows_may_carry_a_timeline(tmp_path, capsys, monkeypatch, pipe):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    prompts, out = tmp_path / "suite.jsonl", tmp_path / "out"
    rows = [{"timeline": [{"at": 0, "prompt": P1}, {"at": 1.0, "prompt": P2}], "name": "story", "seconds": 2}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(["generate", "--prompts", str(prompts), "--output-dir", str(out), *CLI_SIZE], capsys)
    assert code == 0, err
    entry = json.loads((out / "manifest.jsonl").read_text())
    assert entry["prompt"] == P1 and entry["timeline"] == [[0.0, P1], [1.0, P2]]
    assert [(s["seconds"], s["video_frame"], s["prompt"]) for s in entry["switches"]] == [(0.0, 0, P1),
                                                                                          (1.3125, 21, P2)]
    for row, message in ((dict(rows[0], prompt="x"), 'give "prompt" or "timeline", not both'),
                         ({"timeline": [{"at": 0, "prompt": P1}, {"at": 3, "prompt": P2}]},
                          "0000-a-cat-walks-on-a-wall: the prompt at 3 s comes after the end of the 1.31 s video"),
                         ({"timeline": [{"at": 1, "prompt": P1}]}, "the first entry must be at 0 s")):
        prompts.write_text(json.dumps(row) + "\n")
        code, _, err = run_cli(["generate", "--prompts", str(prompts), "--output-dir", str(tmp_path / "o2"),
                             "--seconds", "1.5"], capsys)
        assert code == 1 and message in err and err.count("\n") == 1, err


# -- seeing it while it runs -----------------------------------------------------------------------------------
def test_preview_and_frames_dir_without_mp4(tmp_path, capsys, pipe):
    frames, preview = tmp_path / "frames", tmp_path / "preview.jpg"
    code, _, err = run_cli(["generate", "--prompt", P1, "--then", "0.5", P2, "--seconds", "1", *CLI_SIZE,
                         "--frames-dir", str(frames), "--preview", str(preview)], capsys)
    assert code == 0, err
    assert f"prompt switched at 0.56 s (frame 9): {P2!r}" in err
    assert f"prompts from 0.00 s (frame 0) {P1!r}, 0.56 s (frame 9) {P2!r}" in err
    names = sorted(p.name for p in frames.iterdir())
    assert names == [f"frame_{i:06d}.png" for i in range(21)]  # 1 s -> 6 latent frames -> 21 video frames
    last = np.asarray(Image.open(frames / names[-1])).astype(int)
    shown = np.asarray(Image.open(preview)).astype(int)
    assert shown.shape == (64, 96, 3) and np.abs(shown - last).mean() < 8  # JPEG of the newest frame
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "preview.jpg"]  # no mp4, no temp files


def test_interactive_prompts_from_a_real_pipe(tmp_path):
    state = tmp_path / "run.state"
    preview = tmp_path / "p.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pfgen", "generate", "--config", RANDOM, "--interactive", "--prompt", P1,
                             "--seconds", "12", *CLI_SIZE, "-o", str(tmp_path / "x.mp4"), "--preview", str(preview),
                             "--save-state", str(state)], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()

    def wait_for(text, timeout=120):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if text in line:
                return line
        raise AssertionError(f"no {text!r} on stderr")

    deadline = time.monotonic() + 120
    while not preview.exists():  # the first chunk is done
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.stdin.write(P2 + "\n")
    proc.stdin.flush()
    first = wait_for(repr(P2))
    proc.stdin.write("\n" + P3 + "\n")
    proc.stdin.flush()
    second = wait_for(repr(P3))
    proc.stdin.close()  # the current prompt stays
    assert proc.wait(timeout=120) == 0
    timeline = RunState.load(state).meta["timeline"]
    assert [s["prompt"] for s in timeline] == [P1, P2, P3]
    assert [s["source"] for s in timeline] == ["timeline", "interactive", "interactive"]
    assert 0 < timeline[1]["latent_frame"] < timeline[2]["latent_frame"] < 48
    assert f"frame {timeline[1]['video_frame']}" in first and f"frame {timeline[2]['video_frame']}" in second
