"""Sort self-attention heads into anchor / wave / veil from frame-level logits.

Input: ``frame_logits[layer, head, t_q, t_k]``, the mean pre-softmax logit
(q.k/sqrt(d)) between the tokens of query frame ``t_q`` and key frame ``t_k``,
captured under the rolling-window baseline (window W latent frames, the first
S pinned as a sink), NaN where ``t_k`` was not visible to ``t_q``.

Statistics per head (``head_statistics``), all from query frames ``t_q >= S``:

* lag profile ``P(d)`` = mean of ``L[t_q, t_q - d]`` over query frames, for
  history lags ``d = 1 .. max_lag`` (default ``W - S - 1``) whose key is not a
  sink frame; entries of the current chunk after ``t_q`` are ignored and
  ``d = 0`` is kept apart as ``current_mean``;
* ``sink_mean`` (keys ``< S``), ``recent_mean`` (``P`` over ``d <= recent_lags``),
  ``middle_mean`` (``P`` over ``d > recent_lags``), ``mean_score`` (every
  visible non-future entry);
* ``middle_ratio = exp(middle_mean - min(sink_mean, recent_mean))``: softmax
  weight a middle-history frame gets per frame relative to the weaker of the
  sink and the recent frames (1 = as much, 0.1 = a tenth);
* the residual of ``P`` (de-meaned, and de-trended by a straight line when
  ``detrend``, so a decaying envelope cannot hide an oscillation) gives
  ``flip_rate`` (sign changes per step), and a zero-padded (8x) sinusoid
  periodogram of it gives the dominant non-DC ``period``, its share of the
  residual energy ``periodic_energy`` and its amplitude ``wave_amplitude``.

Decision order (``decide``; first match wins):

1. wave:   n_lags >= min_wave_lags, flip_rate >= min_flip_rate, periodic_energy
           >= min_periodic_energy, wave_amplitude >= min_wave_amplitude and
           period_min <= period <= period_max.
2. veil:   middle_ratio <= veil_max_middle (middle history far below BOTH sink and recent).
3. anchor: middle_ratio >= anchor_min_middle (middle history about as strong: broad context).
4. fallback (undecided): anchor if middle_mean - mean_score >= fallback_min_margin, else veil.
5. no usable statistics: anchor (the conservative type: it keeps the full context).

The decision reads only the per-head statistics, which the head-type file keeps
(``Classification.to_calibration``) so a user can see why each head got its type;
re-classifying with other thresholds goes through the saved frame logits
(``pfgen profile-heads --from-stats -t NAME=VALUE``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pfgen.heads import HEAD_TYPES as TYPES
from pfgen.heads import HeadTypes

RULE = (
    "1 wave if n_lags>=min_wave_lags, flip_rate>=min_flip_rate, periodic_energy>=min_periodic_energy, "
    "wave_amplitude>=min_wave_amplitude and period_min<=period<=period_max; "
    "2 veil if middle_ratio<=veil_max_middle; 3 anchor if middle_ratio>=anchor_min_middle; "
    "4 fallback: anchor if middle_mean-mean_score>=fallback_min_margin else veil; "
    "5 no statistics: anchor"
)


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds; every field only moves a boundary, none changes the statistics."""

    min_flip_rate: float = 0.2
    """Wave: least sign changes per lag step of the residual profile. A period-6
    oscillation flips ~0.33, a smooth decay ~0.1, pure noise ~0.5. Raise it to
    call fewer heads wave."""

    min_periodic_energy: float = 0.5
    """Wave: least share of the residual profile energy in the dominant non-DC
    sinusoid (0..1). Raise it to call fewer heads wave."""

    min_wave_amplitude: float = 0.1
    """Wave: least amplitude (logits) of that sinusoid; 0.1 modulates the softmax
    weight by about +-10 %. Guards against noise-only periodicity in flat
    profiles. Raise it to call fewer heads wave."""

    period_min: float = 4.0
    """Wave: shortest accepted dominant period in frames. Raise it to call fewer heads wave."""

    period_max: float = 8.0
    """Wave: longest accepted dominant period in frames. Lower it to call fewer heads wave."""

    veil_max_middle: float = 0.4
    """Veil: a head is veil when middle_ratio <= this (middle lags at least
    ln(1/0.4) = 0.92 logits below both sink and recent lags). Raise it to call
    more heads veil. Must not exceed anchor_min_middle."""

    anchor_min_middle: float = 0.6
    """Anchor: a non-veil head is anchor when middle_ratio >= this (middle lags
    within ln(1/0.6) = 0.51 logits of the weaker of sink/recent). Lower it to
    call more heads anchor; between the two lies the fallback zone."""

    fallback_min_margin: float = 0.0
    """Fallback: an undecided head is anchor when middle_mean - mean_score >= this
    (logits), else veil. Raise it to send more undecided heads to veil."""

    min_wave_lags: int = 8
    """Wave: least finite history lags needed to trust the periodicity at all.
    Raise it to call fewer heads wave on short profiles."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"threshold '{f.name}' must be a finite number >= 0, got {value!r}")
        for name in ("min_flip_rate", "min_periodic_energy"):
            if getattr(self, name) > 1:
                raise ValueError(f"threshold '{name}' is a fraction in [0, 1], got {getattr(self, name)!r}")
        if not 2.0 <= self.period_min <= self.period_max:
            raise ValueError(f"need 2 <= period_min <= period_max, got {self.period_min!r}..{self.period_max!r}")
        if self.veil_max_middle > self.anchor_min_middle:
            raise ValueError("veil_max_middle must not exceed anchor_min_middle "
                             f"({self.veil_max_middle!r} > {self.anchor_min_middle!r})")

    @classmethod
    def from_overrides(cls, mapping: Mapping[str, Any] | None = None) -> "Thresholds":
        """Defaults with some fields replaced; unknown names or wrong types raise ValueError."""
        defaults = cls()
        known = [f.name for f in fields(cls)]
        values = asdict(defaults)
        for name, value in dict(mapping or {}).items():
            if name not in values:
                raise ValueError(f"unknown threshold {name!r}; known: {', '.join(known)}")
            want = type(getattr(defaults, name))
            ok = (isinstance(value, int) if want is int else isinstance(value, (int, float)))
            if not ok or isinstance(value, bool):
                raise ValueError(f"threshold {name!r} needs a {want.__name__}, got {type(value).__name__} {value!r}")
            values[name] = want(value)
        return cls(**values)

    @classmethod
    def parse_overrides(cls, items: Iterable[str]) -> "Thresholds":
        """Build from command-line style ``name=value`` strings (values parsed as numbers)."""
        mapping: dict[str, Any] = {}
        for item in items:
            name, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"threshold override {item!r} is not name=value")
            try:
                mapping[name.strip()] = int(text) if text.strip().lstrip("+-").isdigit() else float(text)
            except ValueError:
                raise ValueError(f"threshold {name.strip()!r}: {text!r} is not a number") from None
        return cls.from_overrides(mapping)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


# ----------------------------------------------------------------------------- statistics


def as_array(x: Any) -> np.ndarray:
    """float64 numpy view of a numpy array or (any-dtype, any-device) torch tensor."""
    if hasattr(x, "detach"):  # torch: bf16 has no numpy dtype, so go through float32 on CPU
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float64)


def _masked_mean(x: np.ndarray, axis=None) -> tuple[np.ndarray, np.ndarray]:
    """NaN-ignoring mean and count without numpy's all-NaN warnings."""
    ok = np.isfinite(x)
    count = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean, count


def _json_float(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def lag_profile(head_logits: Any, sink: int, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean logit per history lag d = 1..max_lag, and how many entries each mean used.

    Works on ``[..., T, T]`` (one head or all of them). Keys inside the sink are
    left out (they are ``sink_mean``), and so are future keys (negative lags):
    what is left is how the head weighs its rolling history by distance.
    """
    arr = as_array(head_logits)
    t = arr.shape[-1]
    profile = np.full(arr.shape[:-2] + (max_lag,), np.nan)
    counts = np.zeros(arr.shape[:-2] + (max_lag,), dtype=np.int64)
    for d in range(1, min(max_lag, t - 1 - sink) + 1):
        diag = np.diagonal(arr, offset=-d, axis1=-2, axis2=-1)[..., sink:]  # L[i + d, i], i >= sink
        profile[..., d - 1], counts[..., d - 1] = _masked_mean(diag, axis=-1)
    return profile, counts


def region_means(head_logits: Any, sink: int, max_lag: int, recent_lags: int) -> dict[str, float]:
    """Mean logit on the sink, the current frame, recent and middle lags, and overall.

    Only query frames past the sink count: their sink keys are the pinned
    frames, not ordinary history.
    """
    arr = as_array(head_logits)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"expected one head's [T, T] frame logits, got shape {arr.shape}")
    t = arr.shape[0]
    profile, _ = lag_profile(arr, sink, max_lag)
    past = np.tril(np.ones((t, t), dtype=bool))  # t_k <= t_q
    past[:sink] = False
    return {
        "sink_mean": _masked_mean(arr[sink:, :sink])[0] if sink > 0 else np.nan,
        "current_mean": _masked_mean(np.diagonal(arr)[sink:])[0],
        "recent_mean": _masked_mean(profile[:recent_lags])[0],
        "middle_mean": _masked_mean(profile[recent_lags:])[0],
        "history_mean": _masked_mean(profile)[0],
        "mean_score": _masked_mean(np.where(past, arr, np.nan))[0],
    }


def _residual(lags: np.ndarray, values: np.ndarray, detrend: bool) -> np.ndarray:
    """Profile minus its mean (and its least-squares straight line when detrend)."""
    if not detrend:
        return values - values.mean()
    design = np.stack([np.ones_like(lags), lags - lags.mean()], axis=1)
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    return values - design @ coef


def periodicity(profile: np.ndarray, detrend: bool = True, oversample: int = 8) -> dict[str, float | None]:
    """flip_rate, dominant period, its energy share and amplitude for one lag profile.

    A least-squares sinusoid periodogram (Lomb-Scargle style) on an oversampled
    frequency grid from one cycle per profile to Nyquist: a plain FFT of ~17
    lags has bins at periods 17, 8.5, 5.7, ... and cannot resolve "about 6".
    Lags missing from the profile (NaN) are skipped, not interpolated.
    """
    profile = np.asarray(profile, dtype=np.float64)
    lags = np.arange(1, profile.size + 1, dtype=np.float64)
    ok = np.isfinite(profile)
    empty = {"flip_rate": None, "period": None, "periodic_energy": None, "wave_amplitude": None}
    if ok.sum() < 4:
        return empty
    d, r = lags[ok], _residual(lags[ok], profile[ok], detrend)
    positive = r > 0
    flip_rate = float(np.count_nonzero(positive[1:] != positive[:-1]) / (r.size - 1))
    energy = float(np.sum(r * r))
    if energy <= 1e-18:
        return {**empty, "flip_rate": flip_rate, "periodic_energy": 0.0, "wave_amplitude": 0.0}
    span = d[-1] - d[0] + 1
    freqs = np.arange(oversample, oversample * span / 2 + 1e-9) / (oversample * span)
    phase = 2 * np.pi * freqs[:, None] * d[None, :]
    design = np.stack([np.cos(phase), np.sin(phase), np.ones_like(phase)], axis=2)  # [F, n, 3]
    coef = np.linalg.pinv(design) @ r  # [F, 3]
    share = 1.0 - np.sum((r[None, :] - np.einsum("fnk,fk->fn", design, coef)) ** 2, axis=1) / energy
    best = int(np.argmax(share))
    return {
        "flip_rate": flip_rate,
        "period": float(1.0 / freqs[best]),
        "periodic_energy": float(np.clip(share[best], 0.0, 1.0)),
        "wave_amplitude": float(np.hypot(coef[best, 0], coef[best, 1])),
    }


def head_statistics(head_logits: Any, sink: int = 3, max_lag: int = 17, recent_lags: int = 2,
                    detrend: bool = True) -> dict[str, Any]:
    """Every number ``decide`` looks at for one head, as JSON-ready plain values (NaN -> None)."""
    arr = as_array(head_logits)
    profile, _ = lag_profile(arr, sink, max_lag)
    regions = region_means(arr, sink, max_lag, recent_lags)
    edges = [v for v in (regions["sink_mean"], regions["recent_mean"]) if math.isfinite(v)]
    middle = regions["middle_mean"]
    ratio = math.exp(float(np.clip(middle - min(edges), -50, 50))) if edges and math.isfinite(middle) else math.nan
    stats: dict[str, Any] = {k: _json_float(v) for k, v in regions.items()}
    stats["middle_ratio"] = _json_float(ratio)
    stats["n_lags"] = int(np.isfinite(profile).sum())
    stats.update(periodicity(profile, detrend=detrend))
    stats["lag_profile"] = [_json_float(v) for v in profile]
    return stats


# ----------------------------------------------------------------------------- decision


def _is_wave(s: Mapping[str, Any], th: Thresholds) -> bool:
    needed = ("flip_rate", "periodic_energy", "wave_amplitude", "period")
    if any(s.get(k) is None for k in needed) or int(s.get("n_lags") or 0) < th.min_wave_lags:
        return False
    return (s["flip_rate"] >= th.min_flip_rate and s["periodic_energy"] >= th.min_periodic_energy
            and s["wave_amplitude"] >= th.min_wave_amplitude and th.period_min <= s["period"] <= th.period_max)


def decide(stats: Mapping[str, Any], thresholds: Thresholds = Thresholds()) -> tuple[str, str]:
    """(type, rule that fired) for one head's statistics; see the module docstring for the order."""
    if _is_wave(stats, thresholds):
        return "wave", "wave"
    ratio = stats.get("middle_ratio")
    if ratio is not None:
        if ratio <= thresholds.veil_max_middle:
            return "veil", "veil"
        if ratio >= thresholds.anchor_min_middle:
            return "anchor", "anchor"
    middle, mean = stats.get("middle_mean"), stats.get("mean_score")
    if middle is None or mean is None:
        return "anchor", "no-statistics"
    return ("anchor" if middle - mean >= thresholds.fallback_min_margin else "veil"), "fallback"


@dataclass
class Classification:
    """Head types with the statistics and thresholds that produced them."""

    types: list[list[str]]
    stats: list[list[dict]]
    thresholds: Thresholds
    reasons: list[list[str]] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_calibration(self) -> dict[str, Any]:
        """JSON-ready record: `decide` on each head's statistics with these thresholds gives its type."""
        return {
            "version": 1,
            "thresholds": self.thresholds.to_dict(),
            "rule": RULE,
            "statistics": dict(self.settings),
            "types": [list(row) for row in self.types],
            "reasons": [list(row) for row in self.reasons],
            "counts": HeadTypes.from_rows(self.types, "").counts(),
            "heads": [[dict(s) for s in row] for row in self.stats],
        }

    def lag_profiles_by_type(self) -> dict[str, np.ndarray]:
        """Mean lag profile (index i = lag i+1) of each type present, for plotting."""
        grouped: dict[str, list[list[float]]] = {}
        for trow, srow in zip(self.types, self.stats):
            for t, s in zip(trow, srow):
                grouped.setdefault(t, []).append([np.nan if v is None else v for v in s.get("lag_profile", [])])
        return {t: _masked_mean(np.array(rows, dtype=np.float64), axis=0)[0]
                for t, rows in grouped.items() if rows and len(rows[0])}


def min_profile_frames(sink_frames: int, recent_lags: int = 2) -> int:
    """The fewest latent frames (T) `classify` can profile: the sink, the recent lags, the current frame and at
    least one frame of history beyond them (`profile-heads` checks its --seconds against this before it runs)."""
    return sink_frames + recent_lags + 2


def classify(frame_logits: Any, sink_frames: int = 3, window: int | None = 21,
             thresholds: Thresholds = Thresholds(), *, recent_lags: int = 2,
             max_lag: int | None = None, detrend: bool = True) -> Classification:
    """Classify every head of ``frame_logits[layers, heads, T, T]``.

    ``max_lag`` defaults to ``window - sink_frames - 1``, the longest history lag
    the rolling window ever shows (``T - 1 - sink_frames`` without a window).
    """
    arr = as_array(frame_logits)
    if arr.ndim != 4 or arr.shape[-1] != arr.shape[-2]:
        raise ValueError(f"frame_logits must be [layers, heads, T, T], got shape {arr.shape}")
    t = arr.shape[-1]
    if max_lag is None:
        max_lag = (window - sink_frames - 1) if window else t - 1 - sink_frames
    if sink_frames < 0 or recent_lags < 1 or max_lag <= recent_lags or t < min_profile_frames(sink_frames, recent_lags):
        raise ValueError(f"no history to profile: T={t}, sink_frames={sink_frames}, "
                         f"recent_lags={recent_lags}, max_lag={max_lag}")
    stats = [[head_statistics(arr[l, h], sink_frames, max_lag, recent_lags, detrend)
              for h in range(arr.shape[1])] for l in range(arr.shape[0])]
    decided = [[decide(s, thresholds) for s in row] for row in stats]
    types, reasons = [[t for t, _ in row] for row in decided], [[r for _, r in row] for row in decided]
    settings = {"sink_frames": sink_frames, "window": window, "max_lag": max_lag,
                "recent_lags": recent_lags, "detrend": detrend, "frames": t}
    return Classification(types, stats, thresholds, reasons, settings)


# ----------------------------------------------------------------------------- summaries


def _check_types(types: Sequence[Sequence[str]], name: str) -> None:
    for row in types:
        for t in row:
            if t not in TYPES:
                raise ValueError(f"{name}: unknown head type {t!r}; known: {', '.join(TYPES)}")


def agreement(types_a: Sequence[Sequence[str]], types_b: Sequence[Sequence[str]]) -> dict[str, Any]:
    """How far two classifications agree, with ``a`` as the reference.

    confusion[i][j] counts heads that are TYPES[i] in ``a`` and TYPES[j] in
    ``b``; per type, recall = diagonal / row sum and precision = diagonal /
    column sum (None when the sum is 0).
    """
    shape_a = [len(row) for row in types_a]
    shape_b = [len(row) for row in types_b]
    if shape_a != shape_b:
        raise ValueError(f"classifications differ in shape: {len(shape_a)} layers {shape_a} vs "
                         f"{len(shape_b)} layers {shape_b}")
    _check_types(types_a, "types_a")
    _check_types(types_b, "types_b")
    index = {t: i for i, t in enumerate(TYPES)}
    confusion = np.zeros((3, 3), dtype=np.int64)
    for row_a, row_b in zip(types_a, types_b):
        for a, b in zip(row_a, row_b):
            confusion[index[a], index[b]] += 1
    total = int(confusion.sum())
    per_type = {}
    for i, t in enumerate(TYPES):
        rows, cols = int(confusion[i].sum()), int(confusion[:, i].sum())
        per_type[t] = {"count_a": rows, "count_b": cols,
                       "recall": confusion[i, i] / rows if rows else None,
                       "precision": confusion[i, i] / cols if cols else None}
        per_type[t] = {k: (float(v) if isinstance(v, np.floating) else v) for k, v in per_type[t].items()}
    return {"agreement": float(np.trace(confusion) / total) if total else None, "n": total,
            "order": list(TYPES), "confusion": confusion.tolist(), "per_type": per_type}
