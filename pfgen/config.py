"""Frozen configuration dataclasses and a strict YAML loader.

Every knob of a run lives here, so that a YAML file, the CLI and the Python API describe the same thing.
Unknown keys and wrong types are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pfgen.errors import PfgenError
from pfgen.world.model import EMBEDDED, WEIGHTS as WORLD_WEIGHTS, is_world

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"  # the embedded default: the world model
POLICIES = ("rolling", "full", "pyramid")
SOLVERS = ("renoise", "ode")  # how a step goes from x0 to the next noise level (pfgen/sampling.py)
RECACHE_MODES = ("all", "window")  # what a prompt switch re-encodes (docs/story.md)
ROPE_MODES = ("absolute", "relative")  # temporal RoPE of cached keys (docs/story.md)
BACKENDS = ("auto", "split", "sdpa", "triton")
OFFLOAD_MODES = ("auto", "none", "text-encoder", "model")  # what leaves the GPU when idle (pfgen.memory)
DECODERS = ("wan", "tae")  # the Wan VAE's decoder, or the tiny TAEHV decoder (pfgen.wan.tae)
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
MAX_TIMESTEP = 1000.0  # the flow-matching scheduler's range
MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed takes a 64-bit integer


@dataclass(frozen=True)
class LoraConfig:
    path: str  # PEFT or diffusers LoRA state dict (.pt / .safetensors), or a Hub reference org/name:file[@rev]
    scale: float = 1.0  # multiplies alpha / rank
    alpha: float | None = None  # None: the file's own alpha (.alpha keys, metadata), else alpha = rank


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"  # written into head-type files and checked against them
    # Self Forcing / Causal Forcing .pt, or a diffusers folder. None with name `tiny` (the default) is the
    # embedded world model, None with name `random` the random-weight model the tests build in code.
    checkpoint: str | None = None
    wan_dir: str | None = None  # Wan2.1 diffusers folder: text_encoder/, tokenizer/, vae/
    # Both also take a Hub reference (org/name[:path/in/repo][@revision]), downloaded at load time (pfgen.hub).
    ema: bool = True  # use `generator_ema` from a .pt checkpoint
    num_heads: int | None = None  # default: dim / 128 (tiny: from the embedded architecture)
    text_encoder_device: str | None = None  # e.g. "cpu" to keep umT5 off a small GPU
    decoder: str = "wan"  # one of DECODERS: latents -> frames
    decoder_weights: str | None = None  # tae weights (path or Hub reference); None = the published taew2_1
    # (pfgen.hub.decoder_source), or seeded random weights for the embedded tiny model
    loras: tuple[LoraConfig, ...] = ()  # merged into the transformer at load, in order (pfgen.wan.lora)
    lora_required: bool = False  # a LoRA-tuned base (LongLive): refuse to run it without a LoRA

    def __post_init__(self):
        # The embedded default names the world model's folder in the package here, once, so that it loads (and
        # is planned, fingerprinted, profiled) through the ordinary real-weights path like any diffusers folder.
        if self.checkpoint is None and self.name == EMBEDDED:
            object.__setattr__(self, "checkpoint", str(WORLD_WEIGHTS / "transformer"))
            if self.wan_dir is None:
                object.__setattr__(self, "wan_dir", str(WORLD_WEIGHTS))

    @property
    def random_weights(self) -> bool:
        """The random-weight model the tests build in code (pfgen.wan.tiny): the one config with no checkpoint
        once __post_init__ has named the embedded world model's."""
        return self.checkpoint is None


@dataclass(frozen=True)
class SamplingConfig:
    frames_per_chunk: int = 3
    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    first_chunk_timesteps: tuple[float, ...] | None = None  # frame-wise students: a longer first list
    shift: float = 5.0  # flow-matching timestep shift used to warp the list
    warp: bool = True  # map the list through the shifted scheduler table (Self Forcing's warp)
    context_timestep: float = 0.0  # timestep of the clean pass that commits a chunk's K/V
    solver: str = "renoise"  # renoise: fresh noise each step (the distilled students); ode: Euler on the flow


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
    recache: str = "all"  # at a switch: all (replay every held chunk) | window (LongLive: keep the sink)
    rope: str = "absolute"  # absolute (own frame) | relative (rolling: by slot in the window, Infinity-RoPE)
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
    threads: int | None = None  # CPU threads; None = the CPUs this process may use (never oversubscribed)
    offload: str = "auto"  # one of OFFLOAD_MODES


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# Keys that hold file paths: resolved relative to the YAML file that names them (model paths may instead be
# Hub references, kept as they are when no such local path exists).
_PATH_KEYS = {("model", "checkpoint"), ("model", "wan_dir"), ("model", "decoder_weights"), ("cache", "heads")}


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
    """Load a YAML config strictly; None gives the embedded default (DEFAULT_CONFIG, the world model)."""
    path = resolve_config_path(name_or_path if name_or_path is not None else DEFAULT_CONFIG)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or ""
        hint = problem if problem.startswith("duplicate key") else "fix the syntax of the file"
        raise PfgenError(f"{path}: not valid YAML{where}", hint) from None
    except UnicodeDecodeError:
        raise PfgenError(f"{path}: not a text file (not UTF-8)", "give a YAML config") from None
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


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently), and reads
    exponent numbers without a dot (`1e0`, `5E-1`) as numbers, as YAML 1.2 does, not as strings."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_EXPONENT_NUMBER = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_NUMBER, list("-+0123456789"))


def load_yaml(text: str):
    """The one YAML reader for configs and timelines (strict keys, YAML 1.2 exponent numbers)."""
    return yaml.load(text, Loader=_StrictLoader)


def validate(config: Config, where: str = "config", names: dict[str, str] | None = None) -> None:
    """Every value the dataclass types cannot express, checked once, before anything loads.

    `load_config` and `with_overrides` call it, so a YAML file, the command line and the Python API are
    held to the same rules. `names` shows keys as the options that set them (e.g. "--policy")."""
    names = names or {}
    from pfgen.cache.policy import validate_cache_config
    from pfgen.heads import HEAD_TYPES

    def fail(key: str, message: str, hint: str | None = None):
        raise PfgenError(f"{names[key]} {message}" if key in names else f"{where}: {key} {message}", hint)

    model, sampling, cache, video, runtime = (config.model, config.sampling, config.cache, config.video,
                                              config.runtime)
    if model.num_heads is not None and model.num_heads < 1:
        fail("model.num_heads", f"must be a positive number, got {model.num_heads}")
    for key, device in (("model.text_encoder_device", model.text_encoder_device), ("runtime.device", runtime.device)):
        if device is not None and not DEVICE.fullmatch(device):
            fail(key, f"'{device}' is not a device", "use auto, cpu, cuda or cuda:N")
    if model.decoder not in DECODERS:
        fail("model.decoder", f"'{model.decoder}' is unknown", f"choose from {', '.join(DECODERS)}")
    if model.decoder == "tae" and is_world(model):
        fail("model.decoder", "tae decodes the Wan VAE's latents, not a world model's",
             "drop --decoder tae: the world model's own VAE is small")
    if model.decoder_weights is not None and model.decoder != "tae":
        fail("model.decoder_weights", "is for the tae decoder", "add --decoder tae, or leave the weights out")
    if model.text_encoder_device == "auto":  # the text encoder's device is explicit, or the model's
        fail("model.text_encoder_device", "cannot be auto", "use cpu, cuda or cuda:N, or leave it out")
    if runtime.dtype not in DTYPES:
        fail("runtime.dtype", f"'{runtime.dtype}' is unknown", "use auto, float32, bfloat16 or float16")
    if runtime.offload not in OFFLOAD_MODES:
        fail("runtime.offload", f"'{runtime.offload}' is unknown", f"choose from {', '.join(OFFLOAD_MODES)}")
    if runtime.threads is not None and runtime.threads < 1:
        fail("runtime.threads", f"must be at least 1, got {runtime.threads}")
    window = cache.rolling.window
    if not 1 <= sampling.frames_per_chunk <= window:
        fail("sampling.frames_per_chunk", f"must be between 1 and the {window}-frame window, "
             f"got {sampling.frames_per_chunk}", "the students use 3 (chunk-wise) or 1 (frame-wise)")
    for key in ("timesteps", "first_chunk_timesteps"):
        steps = getattr(sampling, key)
        if steps is None:
            continue
        if not all(math.isfinite(t) and 0 < t <= MAX_TIMESTEP for t in steps):
            fail(f"sampling.{key}", f"must lie in (0, {MAX_TIMESTEP:g}], got {list(steps)}")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            fail(f"sampling.{key}", f"must decrease, got {list(steps)}", "e.g. [1000, 750, 500, 250]")
    if sampling.solver not in SOLVERS:
        fail("sampling.solver", f"'{sampling.solver}' is unknown", f"choose from {', '.join(SOLVERS)}")
    if not (math.isfinite(sampling.shift) and sampling.shift > 0):
        fail("sampling.shift", f"must be a positive number, got {sampling.shift}", "the students use 5.0")
    if not (math.isfinite(sampling.context_timestep) and 0 <= sampling.context_timestep <= MAX_TIMESTEP):
        fail("sampling.context_timestep", f"must lie in [0, {MAX_TIMESTEP:g}], got {sampling.context_timestep}")
    if cache.policy not in POLICIES:
        fail("cache.policy", f"'{cache.policy}' is unknown", f"choose from {', '.join(POLICIES)}")
    if cache.backend not in BACKENDS:
        fail("cache.backend", f"'{cache.backend}' is unknown", f"choose from {', '.join(BACKENDS)}")
    for key, value, modes in (("recache", cache.recache, RECACHE_MODES), ("rope", cache.rope, ROPE_MODES)):
        if value not in modes:
            fail(f"cache.{key}", f"'{value}' is unknown", f"choose from {', '.join(modes)}")
        if value != modes[0] and cache.policy == "pyramid":
            fail(f"cache.{key}", f"{value} is for the rolling and full caches, not pyramid (its history keeps its own "
                 "positions and is not one window)", f"use --policy rolling, or --{key} {modes[0]}")
    if model.lora_required and not model.loras:
        fail("model.loras", f"is empty, but model '{model.name}' is a LoRA-tuned base that is wrong without its LoRA",
             "give the LoRA (--lora FILE, or model.loras in the config), or use a config that names it")
    for i, lora in enumerate(model.loras):
        if not (math.isfinite(lora.scale) and (lora.alpha is None or (math.isfinite(lora.alpha) and lora.alpha > 0))):
            fail(f"model.loras[{i}]", f"needs a finite scale and a positive alpha, got scale {lora.scale}, "
                 f"alpha {lora.alpha}")
    if cache.all is not None and cache.all not in HEAD_TYPES:
        fail("cache.all", f"must be one of {', '.join(HEAD_TYPES)}, got '{cache.all}'")
    try:
        validate_cache_config(cache)
    except ValueError as exc:
        raise PfgenError(f"{where}: {exc}") from None
    if not 1 <= video.fps <= 240:
        fail("video.fps", f"must be a whole number of frames per second between 1 and 240, got {video.fps}",
             "Wan models are trained at 16")
    try:
        check_video_size(video.height, video.width)
    except PfgenError as exc:
        raise PfgenError(f"{where}: video.{exc.message}", exc.hint) from None


def check_seed(seed: int, option: str = "--seed") -> int:
    if not 0 <= seed <= MAX_SEED:
        raise PfgenError(f"{option} must be between 0 and 2^63-1, got {seed}")
    return seed


def _resolve_paths(data: dict, base: Path) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for section, key in _PATH_KEYS:
        value = out.get(section, {}).get(key) if isinstance(out.get(section), dict) else None
        if isinstance(value, str):
            out[section][key] = _resolve_path(value, base, hub=section == "model")
    loras = out["model"].get("loras") if isinstance(out.get("model"), dict) else None
    if isinstance(loras, list):
        out["model"]["loras"] = [dict(item, path=_resolve_path(item["path"], base, hub=True))
                                 if isinstance(item, dict) and isinstance(item.get("path"), str) else item
                                 for item in loras]
    return out


def _resolve_path(value: str, base: Path, hub: bool) -> str:
    """A path relative to the YAML file that names it; model files may instead be Hub references, kept as they
    are when no such local path exists."""
    from pfgen.hub import is_reference

    if Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser())
    local = (base / value).resolve()
    return value if hub and not local.exists() and is_reference(value) else str(local)


def build(cls, data, where: str, prefix: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise PfgenError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    for key in data:
        _check_key(cls, key, where, prefix)
    values = {key: _coerce(hints[key], value, where, f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def _check_key(cls, key: str, where: str, prefix: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        raise PfgenError(f"{where}: unknown key '{prefix}{key}'", f"known keys here: {', '.join(names)}")


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


def with_overrides(config: Config, names: dict[str, str] | None = None, **sections: dict) -> Config:
    """Return a copy with some fields replaced, e.g. with_overrides(c, cache={"policy": "full"})."""
    updated = {}
    for section, fields_ in sections.items():
        current = getattr(config, section)
        clean = {k: v for k, v in fields_.items() if v is not None}
        updated[section] = dataclasses.replace(current, **clean)
    config = dataclasses.replace(config, **updated)
    validate(config, "options", names)
    return config


def with_key(config: Config, key: str, value, where: str) -> Config:
    """A copy with one nested key replaced (`cache.pyramid.rope_window`), the value held to the rules a config
    file's value meets (its type, coerced as there, then `validate`)."""
    def replaced(node, names: list[str], prefix: str):
        _check_key(type(node), names[0], where, prefix)
        hint = typing.get_type_hints(type(node))[names[0]]
        if len(names) > 1:
            if not dataclasses.is_dataclass(hint):
                raise PfgenError(f"{where}: '{prefix}{names[0]}' has no keys below it")
            new = replaced(getattr(node, names[0]), names[1:], f"{prefix}{names[0]}.")
        else:
            new = _coerce(hint, value, where, prefix + names[0])
        return dataclasses.replace(node, **{names[0]: new})

    config = replaced(config, key.split("."), "")
    validate(config, where)
    return config


def to_dict(config) -> dict:
    """Plain-data view (for manifests and JSON metadata)."""
    return dataclasses.asdict(config)
