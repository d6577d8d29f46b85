"""Head classifier on planted synthetic frame logits (CPU, fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pfgen.errors import PfgenError
from pfgen.heads import HeadTypes
from pfgen.outputs import FILE_MODE

from pfgen.profile.classify import (
    TYPES,
    Thresholds,
    agreement,
    classify,
    decide,
    head_statistics,
    lag_profile,
    periodicity,
)
from pfgen.plots import TYPE_COLORS, grid_geometry, plot_head_types

W, S, CHUNK = 21, 3, 3


def visible(t: int, window: int = W, sink: int = S, chunk: int = CHUNK) -> np.ndarray:
    """Rolling window: sink frames plus the latest window-sink frames up to the end of t_q's chunk."""
    tq = np.arange(t)[:, None]
    tk = np.arange(t)[None, :]
    end = (tq // chunk) * chunk + chunk - 1
    return (tk < sink) | ((tk > end - (window - sink)) & (tk <= end))


def planted(n_layers=4, n_heads=6, t=60, noise=0.3, seed=0):
    """frame_logits with head (l, h) of type TYPES[(l + h) % 3], per-head offsets and noise."""
    rng = np.random.default_rng(seed)
    tq, tk = np.arange(t)[:, None], np.arange(t)[None, :]
    d = (tq - tk).astype(float)
    out = np.empty((n_layers, n_heads, t, t))
    types = []
    for l in range(n_layers):
        row = []
        for h in range(n_heads):
            kind = TYPES[(l + h) % 3]
            row.append(kind)
            b = rng.uniform(-2, 2)
            if kind == "wave":  # period-6 oscillation in lag, on a slight decay
                prof = b + rng.uniform(0.5, 1.0) * np.cos(2 * np.pi * d / 6 + rng.uniform(0, 2 * np.pi))
                prof = prof - rng.uniform(0, 0.04) * d
                sink = b + 1.0
            elif kind == "anchor":  # broad: slow decay over all history
                prof = b + 1.0 - rng.uniform(0.01, 0.04) * d
                sink = b + rng.uniform(0.5, 1.5)
            else:  # veil: high on sink and lags 0-2, low in the middle
                prof = np.where(d <= 2, b + 2.0 - 0.15 * d, b + rng.uniform(-0.2, 0.2))
                sink = b + 2.0
            logits = np.where(tk < S, sink, prof)
            logits = np.where(d < 0, b + 3.0, logits)  # future frames of the chunk: must be ignored
            logits = logits + rng.normal(0, noise, size=logits.shape)
            out[l, h] = np.where(visible(t), logits, np.nan)
        types.append(row)
    return out.astype(np.float32), types


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.fixture(scope="module")
def result(data):
    return classify(data[0], sink_frames=S, window=W)


def first(types, kind):
    return next((l, h) for l, row in enumerate(types) for h, t in enumerate(row) if t == kind)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_planted_heads_are_classified_exactly(seed):
    logits, truth = planted(seed=seed)
    got = classify(logits, sink_frames=S, window=W)
    assert got.types == truth
    assert HeadTypes.from_rows(got.types, "planted").counts() == {"anchor": 8, "wave": 8, "veil": 8}


def test_reasons_and_statistics_explain_the_type(result, data):
    truth = data[1]
    for l, row in enumerate(result.stats):
        for h, s in enumerate(row):
            assert result.reasons[l][h] == truth[l][h]  # every planted head decided by its own rule
            assert s["n_lags"] == W - S - 1
            if truth[l][h] == "wave":
                assert 5.0 <= s["period"] <= 7.0 and s["periodic_energy"] > 0.8
            if truth[l][h] == "veil":
                assert s["middle_ratio"] < 0.3
            if truth[l][h] == "anchor":
                assert s["middle_ratio"] > 0.7 and s["wave_amplitude"] < 0.1


def test_lag_profile_ignores_future_sink_and_invisible_entries():
    t = 30
    tq, tk = np.arange(t)[:, None], np.arange(t)[None, :]
    d = tq - tk
    logits = np.where(d >= 0, d.astype(float), 100.0)  # future entries would show up as 100
    logits = np.where(tk < S, -50.0, logits)  # sink keys would drag the profile to -50
    logits = np.where(visible(t), logits, np.nan)
    profile, n = lag_profile(logits, S, 17)
    np.testing.assert_allclose(profile, np.arange(1, 18))
    assert n[0] == t - 1 - S and n[-1] > 0
    stats = head_statistics(logits, sink=S, max_lag=17, recent_lags=2)
    assert stats["sink_mean"] == -50.0 and stats["current_mean"] == 0.0
    assert stats["recent_mean"] == 1.5 and stats["middle_mean"] == pytest.approx(10.0)
    rows = logits[S:][(tk <= tq)[S:]]  # query frames past the sink, keys not in the future
    assert stats["mean_score"] == pytest.approx(float(np.nanmean(rows)))
    assert stats["mean_score"] != pytest.approx(float(np.nanmean(np.where(tk <= tq, logits, np.nan))))


def test_periodicity_finds_period_six():
    lags = np.arange(1, 18)
    p = periodicity(0.7 * np.cos(2 * np.pi * lags / 6) - 0.05 * lags)
    assert p["period"] == pytest.approx(6.0, abs=0.3)
    assert p["periodic_energy"] > 0.99 and p["wave_amplitude"] == pytest.approx(0.7, abs=0.02)
    assert 0.25 <= p["flip_rate"] <= 0.4
    flat = periodicity(np.full(17, 2.0))
    assert flat["periodic_energy"] == 0.0 and flat["period"] is None


def test_statistics_are_json_plain(result):
    text = json.dumps(result.to_calibration(), allow_nan=False)
    back = json.loads(text)
    assert set(back) >= {"thresholds", "heads", "rule", "types"}
    assert len(back["heads"]) == 4 and len(back["heads"][0]) == 6
    for key in ("flip_rate", "period", "periodic_energy", "sink_mean", "recent_mean", "middle_mean", "mean_score"):
        assert isinstance(back["heads"][0][0][key], float)
    assert back["thresholds"] == Thresholds().to_dict()


def test_missing_values_become_none():
    stats = head_statistics(np.full((10, 10), np.nan), sink=S, max_lag=5)
    json.dumps(stats, allow_nan=False)
    assert stats["sink_mean"] is None and stats["period"] is None and stats["n_lags"] == 0
    assert decide(stats) == ("anchor", "no-statistics")


def test_classification_is_deterministic_and_accepts_torch(data, result):
    again = classify(data[0], sink_frames=S, window=W)
    assert again.types == result.types and again.stats == result.stats
    from_torch = classify(torch.from_numpy(data[0]).to(torch.bfloat16), sink_frames=S, window=W)
    assert from_torch.types == result.types


def test_saved_statistics_explain_every_type(result, data):
    """The saved record is enough to see why: `decide` on a head's saved statistics gives its type, and
    classifying again with other thresholds (what --from-stats -t does) equals deciding on those statistics."""
    saved = json.loads(json.dumps(result.to_calibration()))
    thresholds = Thresholds.from_overrides(saved["thresholds"])
    assert [[decide(s, thresholds)[0] for s in row] for row in saved["heads"]] == saved["types"] == result.types
    assert saved["counts"] == {"anchor": 8, "wave": 8, "veil": 8}
    strict = Thresholds.from_overrides({"min_periodic_energy": 0.999})
    again = classify(data[0], S, W, strict)
    assert again.types == [[decide(s, strict)[0] for s in row] for row in saved["heads"]]
    assert sum(row.count("wave") for row in again.types) == 0


def test_raising_min_periodic_energy_turns_a_wave_head_non_wave(result):
    l, h = first(result.types, "wave")
    energy = result.stats[l][h]["periodic_energy"]
    just_below = Thresholds.from_overrides({"min_periodic_energy": energy - 1e-6})
    just_above = Thresholds.from_overrides({"min_periodic_energy": min(1.0, energy + 1e-6)})
    assert decide(result.stats[l][h], just_below)[0] == "wave"
    assert decide(result.stats[l][h], just_above)[0] != "wave"


def test_period_range_and_amplitude_gate_waves(result):
    l, h = first(result.types, "wave")
    s = result.stats[l][h]
    assert decide(s, Thresholds.from_overrides({"period_min": s["period"] + 0.01, "period_max": 9.0}))[0] != "wave"
    assert decide(s, Thresholds.from_overrides({"period_max": s["period"] - 0.01}))[0] != "wave"
    assert decide(s, Thresholds.from_overrides({"min_wave_amplitude": s["wave_amplitude"] + 0.01}))[0] != "wave"
    assert decide(s, Thresholds.from_overrides({"min_flip_rate": s["flip_rate"] + 0.01}))[0] != "wave"


def test_veil_and_anchor_boundaries_move_with_their_thresholds(result):
    l, h = first(result.types, "anchor")
    ratio = result.stats[l][h]["middle_ratio"]
    veil_wider = Thresholds.from_overrides({"veil_max_middle": ratio, "anchor_min_middle": ratio + 0.1})
    assert decide(result.stats[l][h], veil_wider) == ("veil", "veil")
    l, h = first(result.types, "veil")
    ratio = result.stats[l][h]["middle_ratio"]
    anchor_wider = Thresholds.from_overrides({"veil_max_middle": ratio / 2, "anchor_min_middle": ratio})
    assert decide(result.stats[l][h], anchor_wider) == ("anchor", "anchor")


def test_fallback_settles_the_undecided_zone(result):
    l, h = first(result.types, "veil")
    s = result.stats[l][h]
    zone = {"veil_max_middle": s["middle_ratio"] / 2, "anchor_min_middle": s["middle_ratio"] * 2}
    margin = s["middle_mean"] - s["mean_score"]  # negative for a veil head
    assert margin < 0
    assert decide(s, Thresholds.from_overrides(zone)) == ("veil", "fallback")
    lenient = Thresholds.from_overrides({**zone, "fallback_min_margin": 0.0})
    assert decide({**s, "middle_mean": s["mean_score"]}, lenient) == ("anchor", "fallback")


def test_threshold_overrides_are_checked():
    with pytest.raises(ValueError, match="unknown threshold 'x'; known: min_flip_rate"):
        Thresholds.from_overrides({"x": 1.0})
    with pytest.raises(ValueError, match="min_flip_rate"):
        Thresholds.from_overrides({"min_flip_rate": "0.3"})
    with pytest.raises(ValueError, match="min_wave_lags"):
        Thresholds.from_overrides({"min_wave_lags": 8.5})
    with pytest.raises(ValueError):
        Thresholds.from_overrides({"period_min": True})
    with pytest.raises(ValueError, match="veil_max_middle"):
        Thresholds.from_overrides({"veil_max_middle": 0.9})
    th = Thresholds.from_overrides({"period_min": 5, "min_wave_lags": 10})
    assert th.period_min == 5.0 and isinstance(th.period_min, float) and th.min_wave_lags == 10
    parsed = Thresholds.parse_overrides(["period_max=7.5", "min_wave_lags=9"])
    assert parsed == Thresholds(period_max=7.5, min_wave_lags=9)
    with pytest.raises(ValueError, match="unknown threshold 'nope'"):
        Thresholds.parse_overrides(["nope=1"])


def test_agreement_confusion_matrix():
    a = [["anchor", "wave", "veil"], ["anchor", "anchor", "veil"]]
    b = [["anchor", "veil", "veil"], ["wave", "anchor", "veil"]]
    got = agreement(a, b)
    assert got["confusion"] == [[2, 1, 0], [0, 0, 1], [0, 0, 2]]
    assert got["agreement"] == pytest.approx(4 / 6) and got["n"] == 6
    assert got["per_type"]["anchor"] == {"count_a": 3, "count_b": 2, "recall": pytest.approx(2 / 3), "precision": 1.0}
    assert got["per_type"]["wave"]["recall"] == 0.0 and got["per_type"]["wave"]["precision"] == 0.0
    assert got["per_type"]["veil"]["precision"] == pytest.approx(2 / 3)
    assert agreement(a, a)["agreement"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        agreement(a, [row[:2] for row in b])
    with pytest.raises(ValueError, match="unknown head type"):
        agreement(a, [["anchor", "wave", "sink"], ["anchor", "anchor", "veil"]])


def test_plot_writes_png_atomically(tmp_path, result):
    out = tmp_path / "heads.png"
    profiles = result.lag_profiles_by_type()
    assert set(profiles) == set(TYPES) and profiles["wave"].shape == (W - S - 1,)
    assert plot_head_types(result.types, profiles, out) == out
    with Image.open(out) as img:
        assert img.format == "PNG"
        width, height = img.size
        x0, y0, cell = grid_geometry(4, 6)
        assert width > x0 + 6 * cell + 400 and height > y0 + 4 * cell
        rgb = img.convert("RGB")
        for l, row in enumerate(result.types):
            for h, t in enumerate(row):
                centre = (x0 + h * cell + cell // 2, y0 + l * cell + cell // 2)
                assert rgb.getpixel(centre) == TYPE_COLORS[t]
    assert [p.name for p in out.parent.iterdir()] == ["heads.png"]
    assert out.stat().st_mode & 0o777 == FILE_MODE  # what open() gives, not mkstemp's 0600


def test_plot_accepts_stacked_profiles_with_nan(tmp_path):
    stack = np.array([[1.0, 2.0, np.nan], [3.0, np.nan, np.nan]])
    out = plot_head_types([["veil", "anchor"]], {"veil": stack, "anchor": np.array([0.5, 0.4, 0.3])},
                          tmp_path / "p.png")
    with Image.open(out) as img:
        img.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_classify_rejects_bad_shapes():
    with pytest.raises(ValueError, match="layers, heads, T, T"):
        classify(np.zeros((2, 5, 5)))
    with pytest.raises(ValueError, match="no history"):
        classify(np.zeros((1, 1, 4, 4)), sink_frames=3, window=21)


def test_middle_ratio_is_relative_to_weaker_edge():
    s = head_statistics(np.where(visible(40), 0.0, np.nan), sink=S, max_lag=17)
    assert s["middle_ratio"] == pytest.approx(1.0) and math.isclose(s["mean_score"], 0.0)


def test_head_counts_are_plural_only_when_they_should_be():
    one = HeadTypes.uniform("wave", 1, 1, model="one")
    with pytest.raises(PfgenError, match=r"is for a 1x1 model \(one\), this model has 2 layers x 1 head \("):
        one.check_model(2, 1)
    from rich.console import Console

    from pfgen.ui import print_agreement, print_head_counts

    console = Console(record=True, width=200)
    print_head_counts(console, one)
    print_agreement(console, agreement(one.types, one.types), "other.json")
    text = console.export_text()
    assert "head types (1 layer x 1 head)" in text and "100.0% of 1 head\n" in text
