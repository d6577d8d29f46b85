"""Frozen configuration dataclasses and a strict YAML loader.

Every knob of a run lives here, so that a YAML file, the CLI and the Python API describe the same thing.
Unknown keys and wrong types are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pfgen.errors import PfgenError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"  # written into head-type files and checked against them
    checkpoint: str | None = None  # Self Forcing / Causal Forcing .pt, or a diffusers folder; None = tiny
    wan_dir: str | None = None  # Wan2.1 diffusers folder: text_encoder/, tokenizer/, vae/
    ema: bool = True  # use `generator_ema` from a .pt checkpoint
    num_heads: int | None = None  # default: dim / 128 (tiny: from the embedded architecture)
    text_encoder_device: str | None = None  # e.g. "cpu" to keep umT5 off a small GPU


@dataclass(frozen=True)
class SamplingConfig:
    frames_per_chunk: int = 3
    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    first_chunk_timesteps: tuple[float, ...] | None = None  # frame-wise students: a longer first list
    shift: float = 5.0  # flow-matching timestep shift used to warp the list
    warp: bool = True  # map the list through the shifted scheduler table (Self Forcing's warp)
    context_timestep: float = 0.0  # timestep of the clean pass that commits a chunk's K/V


@dataclass(frozen=True)
class RollingConfig:
    window: int = 21  # frames every head sees, current chunk and sink included
    sink: int = 3  # first frames pinned in the window


@dataclass(frozen=True)
class AnchorConfig:
    sink: int = 3
    stride: int = 6  # keep committed frames with t % stride == 0
    capacity: int = 4  # latest strided frames kept


@dataclass(frozen=True)
class WaveConfig:
    sink: int = 1
    period: int = 6  # a query frame reads history frames of its own phase t % period
    capacity: int = 4  # latest frames kept per phase


@dataclass(frozen=True)
class VeilConfig:
    sink: int = 3
    block: int = 4  # frames averaged into one merged block
    patch: int = 2  # spatial patch (patch x patch tokens) averaged into one merged token
    capacity: int = 4  # latest finished blocks kept


@dataclass(frozen=True)
class PyramidConfig:
    recent: int = 4  # frames ending with the current chunk, at their own RoPE positions
    rope_window: int = 21  # history is placed min(t_q, rope_window) frames before the query
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    wave: WaveConfig = field(default_factory=WaveConfig)
    veil: VeilConfig = field(default_factory=VeilConfig)


@dataclass(frozen=True)
class CacheConfig:
    policy: str = "rolling"  # rolling | full | pyramid
    heads: str | None = None  # head-type JSON for pyramid
    all: str | None = None  # give every head this type instead of a head file (ablations)
    backend: str = "auto"  # attention backend: auto | split | sdpa | triton
    rolling: RollingConfig = field(default_factory=RollingConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)


@dataclass(frozen=True)
class VideoConfig:
    height: int = 96
    width: int = 160
    fps: int = 16


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto = cuda when available
    dtype: str = "auto"  # auto = bfloat16 on cuda, float32 on cpu


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# Keys that hold file paths: resolved relative to the YAML file that names them.
_PATH_KEYS = {("model", "checkpoint"), ("model", "wan_dir"), ("cache", "heads")}


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a bundled config (`self-forcing` -> configs/self-forcing.yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise PfgenError(f"config file not found: {name_or_path}", f"give a YAML path or one of: {names}")


def load_config(name_or_path: str | Path | None = None) -> Config:
    """Load a YAML config strictly; None gives the embedded default (configs/tiny.yaml, the tiny model)."""
    path = resolve_config_path(name_or_path if name_or_path is not None else CONFIG_DIR / "tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PfgenError(f"{path}: not valid YAML{where}", "fix the syntax of the file") from None
    except OSError as exc:
        raise PfgenError(f"cannot read config {path}: {exc.strerror}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PfgenError(f"{path}: expected a mapping of sections at the top level")
    data = _resolve_paths(data, path.parent)
    config = build(Config, data, str(path))
    validate(config, str(path))
    return config


def validate(config: Config, where: str = "config") -> None:
    """Values the dataclass types cannot express (positive budgets, known names)."""
    from pfgen.cache.policy import validate_cache_config
    from pfgen.heads import HEAD_TYPES

    try:
        validate_cache_config(config.cache)
    except ValueError as exc:
        raise PfgenError(f"{where}: {exc}") from None
    if config.cache.all is not None and config.cache.all not in HEAD_TYPES:
        raise PfgenError(f"{where}: cache.all must be one of {', '.join(HEAD_TYPES)}, got '{config.cache.all}'")
    if config.sampling.frames_per_chunk < 1:
        raise PfgenError(f"{where}: sampling.frames_per_chunk must be at least 1")


def _resolve_paths(data: dict, base: Path) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for section, key in _PATH_KEYS:
        value = out.get(section, {}).get(key) if isinstance(out.get(section), dict) else None
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            out[section][key] = str((base / value).resolve())
        elif isinstance(value, str):
            out[section][key] = str(Path(value).expanduser())
    return out


def build(cls, data, where: str, prefix: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise PfgenError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise PfgenError(
                f"{where}: unknown key '{prefix}{key}'", f"known keys here: {', '.join(names)}"
            )
    values = {key: _coerce(hints[key], value, where, f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def _coerce(hint, value, where: str, key: str):
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(inner[0], value, where, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise PfgenError(f"{where}: '{key}' must be a non-empty list")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, v, where, f"{key}[{i}]") for i, v in enumerate(value))
    return _scalar(hint, value, where, key)


def _scalar(hint, value, where: str, key: str):
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        raise PfgenError(f"{where}: '{key}' must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def check_video_size(height: int | None, width: int | None, stride: int = 16, option_prefix: str = "") -> None:
    """Wan video sizes are multiples of 16 (VAE 8 x patch 2); None means "not given" and passes."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % stride):
            raise PfgenError(f"{option_prefix}{name} {value} is not a positive multiple of {stride}",
                             f"use e.g. {max(stride, round(value / stride) * stride)}")


def with_overrides(config: Config, **sections: dict) -> Config:
    """Return a copy with some fields replaced, e.g. with_overrides(c, cache={"policy": "full"})."""
    updated = {}
    for section, fields_ in sections.items():
        current = getattr(config, section)
        clean = {k: v for k, v in fields_.items() if v is not None}
        updated[section] = dataclasses.replace(current, **clean)
    return dataclasses.replace(config, **updated)


def to_dict(config) -> dict:
    """Plain-data view (for manifests and JSON metadata)."""
    return dataclasses.asdict(config)
