"""LongLive's cache: relative RoPE (keys at their slot in the window) and the window re-cache at a switch.

The engine is checked against an fp64 oracle written here from LongLive's definition: the cache holds the sink
and the newest window - sink frames in storage order (sink first, then oldest to newest), every key is rotated
at its slot index and every query at the slot of its own frame. The window re-cache is checked on the tiny
model against the same definition: one pass over the window frames, each reading the kept sink and all of them.
"""

import dataclasses

import pytest
import torch

from pfgen.cache.policy import RollingRule
from pfgen.config import CacheConfig, load_config, with_overrides
from pfgen.errors import PfgenError
from spec import oracle_attention, rotate_frame
from test_cache import run_engine

WINDOW, SINK = 9, 2


def slots(t0: int, frames: int) -> list[int]:
    """Frames the cache holds for the chunk at t0, in storage order: the slot index is the list index."""
    end = t0 + frames
    return list(range(min(SINK, end))) + list(range(max(SINK, end - (WINDOW - SINK)), end))


def expected_relative(grid, t0, frames, q, frame_kv, head_dim=32):
    n = grid[0] * grid[1]
    held = slots(t0, frames)
    items = [("slot", ("frame", t), i) for i, t in enumerate(held)]
    out = torch.empty(frames * n, q.shape[2], head_dim, dtype=torch.float64)
    for h in range(q.shape[2]):
        kv = {t: (k[:, h:h + 1], v[:, h:h + 1]) for t, (k, v) in frame_kv.items()}
        for f in range(frames):
            qf = rotate_frame(q[0, f * n:(f + 1) * n, h:h + 1], held.index(t0 + f), grid, head_dim)
            out[f * n:(f + 1) * n, h] = oracle_attention(qf, kv, items, grid, head_dim)[:, 0]
    return out


@pytest.mark.parametrize("backend", ["sdpa", "split"])
@pytest.mark.parametrize("frames_per_chunk", [3, 1])
def test_relative_rope_equals_slot_positions(backend, frames_per_chunk):
    cfg = CacheConfig(rope="relative", rolling=dataclasses.replace(CacheConfig().rolling, window=WINDOW, sink=SINK))
    chunks = 24 // frames_per_chunk  # well past the window: the sink is read 15 frames after where it was stored
    _, results = run_engine(cfg, [["rolling"] * 3], (3, 5), chunks, frames_per_chunk, backend)
    for t0, q, out, frame_kv in results:
        want = expected_relative((3, 5), t0, frames_per_chunk, q, frame_kv)
        torch.testing.assert_close(out[0].double(), want, atol=2e-5, rtol=1e-5, msg=f"t0={t0}")
    # and it is not absolute RoPE past the window
    cfg_abs = dataclasses.replace(cfg, rope="absolute")
    _, absolute = run_engine(cfg_abs, [["rolling"] * 3], (3, 5), chunks, frames_per_chunk, backend)
    assert (absolute[-1][2] - results[-1][2]).abs().max() > 1e-3
    assert (absolute[0][2] - results[0][2]).abs().max() == 0  # identical while the window has not rolled


def test_window_recache_rule():
    rule = RollingRule(12, 3, 3)
    assert rule.window_recache(9) == (True, 0) and rule.window_recache(12) == (True, 0)
    assert rule.window_recache(21) == (False, 12) and rule.window_recache(15) == (False, 6)


class Recorder:
    """A transformer stand-in that records what each forward of a re-cache reads and where it sits."""

    def __init__(self, transformer, cache):
        self.transformer, self.cache, self.calls = transformer, cache, []
        self.rope = transformer.rope

    def __call__(self, **kw):
        plan = self.cache.plan
        read = plan.rules["rolling"].reads[0]
        self.calls.append((plan.t0, plan.frames, self.rope.frame_offset, read.segments))
        return self.transformer(**kw)


@pytest.mark.parametrize("switch,restart", [(9, True), (21, False)])
def test_window_recache_keeps_the_sink_and_redoes_the_window(switch, restart):
    """A switch at `switch`: frames first..switch-1 are re-encoded in one pass reading the (kept) sink and all of
    them; the sink's K/V are untouched unless the video still fits the window (then all is redone)."""
    from pfgen.pipeline import load_pipeline
    from pfgen.sampling import ChunkLoop

    cfg = load_config()
    cfg = with_overrides(cfg, cache=dict(policy="rolling", recache="window",
                                         rolling=dataclasses.replace(cfg.cache.rolling, window=12, sink=3)))
    pipe = load_pipeline(cfg)
    a, b = pipe.encode_prompt("a"), pipe.encode_prompt("b")
    chunks = list(pipe.stream(prompt_embeds=a, num_frames=1 + 4 * (switch - 1), decode=False, commit_last=True))
    cache = pipe.state.cache
    store = cache.stores[-1]["rolling"]  # layer 0 K/V depend on its own frame only
    sink_before = store.k_abs[:, :3 * store.frame_tokens].clone()
    loop = ChunkLoop(pipe.transformer, pipe.state, cfg.sampling, "window")
    loop.transformer = Recorder(pipe.transformer, cache)
    kept = [(c.t0, c.latents) for c in chunks if c.t0 + 3 > switch - 9 or c.t0 == 0]
    assert loop.replay(kept, b) == 1
    (t0, frames, offset, segments), = loop.transformer.calls
    first = 0 if restart else switch - 9
    assert (t0, frames, offset) == (first, switch - first, first)
    read = {s.kind: s.frames for s in segments}
    assert read == ({"recent": tuple(range(switch))} if restart else
                    {"sink": (0, 1, 2), "recent": tuple(range(first, switch))})
    sink_after = store.k_abs[:, :3 * store.frame_tokens]
    assert torch.equal(sink_after, sink_before) != restart


def test_config_refusals():
    cfg = load_config("longlive")
    assert (cfg.cache.rolling.window, cfg.cache.rolling.sink, cfg.cache.recache) == (12, 3, "window")
    for key, value in (("recache", "window"), ("rope", "relative")):
        with pytest.raises(PfgenError, match="not pyramid"):
            with_overrides(cfg, cache={"policy": "pyramid", key: value, "heads": None})
    with pytest.raises(PfgenError, match="'sideways' is unknown"):
        with_overrides(cfg, cache=dict(rope="sideways"))
