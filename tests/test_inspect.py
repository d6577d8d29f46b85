"""inspect-cache: the closed form against the frame-by-frame rules and the spec, bounded work and plots."""

import dataclasses
import json
import time

import pytest
from PIL import Image

import pfgen.inspect as inspect_mod
from pfgen.cache.policy import make_rule
from pfgen.config import CacheConfig
from pfgen.errors import PfgenError
from pfgen.inspect import MAX_FULL_FRAME, PLOT_SPAN, plan_at
from pfgen.plots import SEGMENT_COLORS, UNKNOWN_COLOR
from spec import key_items
from writes import failing_writes
from test_cache import KINDS, policy_items, spec_params
from clirun import run_cli


def odd_config() -> CacheConfig:
    """Budgets unlike the defaults (no anchor sink, period 5, block 3, short windows) for the closed form."""
    c = CacheConfig()
    p = c.pyramid
    return dataclasses.replace(
        c, rolling=dataclasses.replace(c.rolling, window=10, sink=0),
        pyramid=dataclasses.replace(p, recent=5, rope_window=9,
                                    anchor=dataclasses.replace(p.anchor, stride=4, capacity=2, sink=0),
                                    wave=dataclasses.replace(p.wave, period=5, capacity=3, sink=2),
                                    veil=dataclasses.replace(p.veil, block=3, capacity=5, sink=4)))


@pytest.mark.parametrize("cfg", [CacheConfig(), odd_config()], ids=["default", "odd"])
@pytest.mark.parametrize("frames_per_chunk", [3, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_equals_simulation(kind, frames_per_chunk, cfg):
    """Every query frame in [0, 400]: the bounded plan equals the rule run frame by frame from 0."""
    rule = make_rule(kind, cfg, frames_per_chunk, max_frames=402)
    for t0 in range(0, 401, frames_per_chunk):
        rule.begin_chunk(t0, frames_per_chunk)
        for f, read in enumerate(rule.reads(t0, frames_per_chunk)):
            assert plan_at(kind, cfg, t0 + f, frames_per_chunk)[1] == read.segments, (kind, t0 + f)
        rule.commit(t0, frames_per_chunk)


@pytest.mark.parametrize("kind", KINDS)
def test_far_frames_match_the_spec(kind):
    """Far past the simulated stretch, the moved plan is docs/design.md section 2 read literally (tests/spec.py)."""
    cfg = CacheConfig()
    far = MAX_FULL_FRAME - 5 if kind == "full" else 123_456
    for t_q in range(far, far + 3):
        t0 = t_q - t_q % 3
        read = dataclasses.make_dataclass("Read", ["segments"])(plan_at(kind, cfg, t_q, 3)[1])
        assert policy_items(read) == sorted(key_items(kind, spec_params(kind, cfg), t0, 3, t_q)), t_q


def test_work_does_not_grow_with_the_frame(monkeypatch):
    """Simulated chunks are the same (and few) at frame 1e3, 1e6 and 1e9: the cost is bounded."""
    chunks = []
    real = inspect_mod.make_rule

    def counting(*args, **kwargs):
        rule = real(*args, **kwargs)
        begin = rule.begin_chunk

        def begin_chunk(t0, frames):
            chunks.append(t0)
            return begin(t0, frames)

        rule.begin_chunk = begin_chunk
        return rule

    monkeypatch.setattr(inspect_mod, "make_rule", counting)
    work = {}
    for frame in (1000, 10**6, 10**9 + 1):
        chunks.clear()
        for kind in ("anchor", "wave", "veil", "rolling"):
            plan_at(kind, CacheConfig(), frame, 3)
        work[frame] = len(chunks)
    assert work[1000] == work[10**6] == work[10**9 + 1] < 200, work


def test_full_policy_is_capped():
    plan_at("full", CacheConfig(), MAX_FULL_FRAME, 3)
    with pytest.raises(PfgenError, match="too far for the full policy"):
        plan_at("full", CacheConfig(), MAX_FULL_FRAME + 1, 3)




def test_report_on_stdout_with_the_configs_size(capsys):
    """The tiny config is 96x160: 6 x 10 = 60 tokens per frame; tables and JSON go to stdout."""
    code, out, err = run_cli(["inspect-cache", "--frame", "1e9", "--json"], capsys)
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["frame"] == 10**9 and report["tokens_per_frame"] == 60
    wave = next(h for h in report["heads"] if h["type"] == "wave")
    assert wave["segments"][1]["frames"] == [10**9 - 24 + k * 6 for k in range(4)]  # phase 10**9 % 6, last 4
    code, out, err = run_cli(["inspect-cache", "--frame", "100", "--height", "32", "--width", "48"], capsys)
    assert code == 0 and err == "" and "query frame 100 (chunk 33), 6 tokens per frame" in out


@pytest.mark.parametrize("frame, message", [("2.5", "--frame must be a whole number"),
                                            ("-3", "--frame must be zero or more"),
                                            ("1e5", "too far for the full policy")])
def test_bad_frame(frame, message, capsys):
    code, out, err = run_cli(["inspect-cache", "--frame", frame, "--policy", "full"], capsys)
    assert code == 1 and message in err and err.count("\n") == 1 and out == ""


def test_plot_is_bounded_at_any_frame(tmp_path, capsys):
    """At frame 1e6 the plot shows the sink, a gap and the last PLOT_SPAN frames: a small image."""
    png = tmp_path / "p.png"
    start = time.perf_counter()
    code, _, err = run_cli(["inspect-cache", "--config", "self-forcing", "--frame", "1000000", "--plot", str(png)],
                           capsys)
    assert code == 0, err
    assert time.perf_counter() - start < 30  # generous: it is bounded, not a benchmark (CI is slow)
    with Image.open(png) as img:
        width, height = img.size
        rgb = img.convert("RGB")
        colours = {rgb.getpixel((x, y)) for x in range(0, width, 2) for y in range(0, height, 2)}
    assert width <= 1200 and height <= 1000
    assert {SEGMENT_COLORS[k] for k in ("sink", "recent", "cyclic", "stride", "merge")} <= colours
    assert UNKNOWN_COLOR in colours  # the hatched gap between the sink and the recent span
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    assert inspect_mod.pyramid_columns({"chunk": 333_333, "heads": [
        {"segments": [{"kind": "sink", "frames": [0, 1, 2]}]}]}, 3) == [0, 1, 2, *range(10**6 + 2 - PLOT_SPAN,
                                                                                          10**6 + 2)]


@pytest.mark.parametrize("error", ["read-only", "full"])
def test_plot_into_unwritable_folder(error, tmp_path, capsys, monkeypatch):
    failing_writes(monkeypatch, tmp_path, error)
    code, out, err = run_cli(["inspect-cache", "--frame", "60", "--plot", str(tmp_path / "p.png")], capsys)
    reason = "Read-only file system" if error == "read-only" else "No space left on device"
    assert code == 1 and reason in err and err.count("\n") == 1 and out == ""
    assert list(tmp_path.iterdir()) == []
