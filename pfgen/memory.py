"""The memory plan of a run, before anything loads: bytes per component, the exact KV cache, and the offload.

Weights are counted on the meta device from the architecture, which comes from the checkpoint's metadata when
it is on disk (a `.pt` loaded with mmap, safetensors headers, config.json files, the HF cache) and otherwise
from the known architectures of the Wan2.1 1.3B DiT, umT5-XXL and the Wan VAE, so a bundled config plans with
nothing downloaded. The KV figure is the cache's own shape arithmetic (`cache.engine.cache_nbytes`); the
activation and VAE figures are estimates, labelled as such.

Offload modes (where each component lives, when: `pfgen.offload`):
  none          everything on the accelerator all the time
  text-encoder  umT5 lives on the CPU and visits the accelerator only to encode a prompt
  model         also the DiT and the VAE: on the accelerator only while a video's chunk loop runs, so the
                text encoder is there alone
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pfgen.config import OFFLOAD_MODES
from pfgen.errors import PfgenError
from pfgen.frames import dit_passes, latent_frames_for, latent_grid, vae_space, video_frames_for
from pfgen.heads import head_type_rows, head_type_source
from pfgen.wan.text import TEXT_TOKENS

GiB = 1024 ** 3
MARGIN_FRACTION, MARGIN_MIN = 0.05, GiB // 2  # `auto` keeps this much of the free memory unused

# Wan2.1-T2V-1.3B (docs/design.md section 1), in diffusers' WanTransformer3DModel terms.
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                eps=1e-6, qk_norm="rms_norm_across_heads")
# umT5-XXL encoder, as in Wan2.1-T2V-1.3B-Diffusers/text_encoder/config.json.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)
WAN_VAE: dict = {}  # AutoencoderKLWan's defaults are the Wan2.1 VAE

# Streaming VAE decode of one 3-latent-frame chunk: transient bytes per output pixel in float32, measured on the
# CPU with the Wan2.1 VAE architecture (process RSS high-water mark over the decode minus the RSS before it):
# 11,060 at 128x224 and 11,579 at 240x416. Other dtypes scale with their item size.
VAE_DECODE_BYTES_PER_PIXEL = 11600


@dataclass(frozen=True)
class MemoryPlan:
    frames: int  # video frames
    latent_frames: int
    chunks: int
    passes: int  # DiT forward passes (frames.dit_passes)
    policy: str
    height: int
    width: int
    grid: tuple[int, int]  # latent (h, w)
    device: str
    dtype: str
    offload: str  # the chosen mode
    device_total_bytes: int | None
    device_free_bytes: int | None
    memory: dict  # component bytes and the peak of the chosen mode
    peaks: dict  # peak bytes per offload mode
    sources: dict  # where each architecture came from

    def to_json(self) -> dict:
        return asdict(self)


# -- architectures ---------------------------------------------------------------------------------------------
def architectures(model_cfg) -> tuple[dict, dict, dict, dict]:
    """(transformer, text encoder, VAE) configs and where each came from; reads metadata only."""
    if model_cfg.random_weights:
        from pfgen.wan.tiny import TINY_TEXT, TINY_TRANSFORMER, TINY_VAE

        return TINY_TRANSFORMER, TINY_TEXT, TINY_VAE, dict(transformer="random test model",
                                                           text_encoder="random test model",
                                                           vae="random test model")
    transformer, t_src = _transformer_arch(model_cfg)
    text, x_src = _wan_config(model_cfg.wan_dir, "text_encoder", UMT5_XXL, "known umT5-XXL architecture")
    vae, v_src = _wan_config(model_cfg.wan_dir, "vae", WAN_VAE, "known Wan2.1 VAE architecture")
    return transformer, text, vae, dict(transformer=t_src, text_encoder=x_src, vae=v_src)


def _local(value: str | None, inner: str | None = None) -> Path | None:
    """A local file for `value` (+ `inner` for a folder): the path itself, or the HF cache for a reference."""
    from pfgen.hub import parse_reference

    if value is None:
        return None
    ref = parse_reference(value)
    if ref is None:
        path = Path(value).expanduser() / inner if inner else Path(value).expanduser()
        return path if path.exists() else None
    from huggingface_hub import try_to_load_from_cache

    filename = ref.filename if inner is None else inner
    if filename is None:
        filename = "config.json"
    found = try_to_load_from_cache(ref.repo, filename, revision=ref.revision)
    return Path(found) if isinstance(found, str) else None


def _transformer_arch(model_cfg) -> tuple[dict, str]:
    from pfgen.wan.checkpoint import (infer_architecture, read_config, read_safetensors, read_training_checkpoint,
                                      strip_prefixes, wan_to_diffusers)

    path = _local(model_cfg.checkpoint)
    if path is None:
        return WAN_1_3B, "known Wan2.1-1.3B architecture (checkpoint not on disk)"
    if path.name == "config.json":  # a cached folder reference: the folder around it
        path = path.parent
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.exists():
            config = read_config(config_file)
            if config.get("_class_name") == "WanTransformer3DModel":
                return {k: v for k, v in config.items() if not k.startswith("_")}, f"{config_file}"
        files = sorted(path.glob("*.safetensors"))
        state = wan_to_diffusers(strip_prefixes(read_safetensors(files, shapes_only=True)))
    elif path.suffix == ".safetensors":
        state = wan_to_diffusers(strip_prefixes(read_safetensors([path], shapes_only=True)))
    else:
        state = wan_to_diffusers(read_training_checkpoint(path, model_cfg.ema))  # mmap: shapes, no data read
    return infer_architecture(state, model_cfg.num_heads), f"tensor shapes of {path}"


def _wan_config(wan_dir: str | None, component: str, known: dict, label: str) -> tuple[dict, str]:
    path = _local(wan_dir, f"{component}/config.json")
    if path is None:
        return known, label
    from pfgen.wan.checkpoint import read_config

    return {k: v for k, v in read_config(path).items() if not k.startswith("_")}, str(path)


# -- bytes -----------------------------------------------------------------------------------------------------
def _module_bytes(model, itemsize: int, fp32) -> int:
    total = sum(p.numel() * (4 if fp32 and fp32.search(n) else itemsize) for n, p in model.named_parameters())
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def transformer_bytes(config: dict, dtype: torch.dtype) -> int:
    from diffusers import WanTransformer3DModel

    from pfgen.wan.components import fp32_pattern

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    return _module_bytes(model, _itemsize(dtype), fp32_pattern(model))


def text_encoder_bytes(config: dict, dtype: torch.dtype) -> int:
    import re

    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**config))
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) if dtype in (torch.float16,
                                                                                          torch.bfloat16) else set()
    keep |= set(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else set()
    fp32 = re.compile("|".join(rf"(^|\.){re.escape(k)}($|\.)" for k in keep)) if keep else None
    return _module_bytes(model, _itemsize(dtype), fp32)


def vae_bytes(config: dict, dtype: torch.dtype) -> int:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan(**config)
    return _module_bytes(model, _itemsize(dtype), None)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(cfg, head_types, transformer: dict, grid: tuple[int, int], latent_frames: int,
                   dtype: torch.dtype, batch: int = 1) -> int:
    """Exactly what the pipeline's KVCache allocates for this video (same shape arithmetic)."""
    from pfgen.cache.engine import CacheGeometry, cache_nbytes

    patch = transformer["patch_size"]
    geometry = CacheGeometry(len(head_types), len(head_types[0]), transformer["attention_head_dim"],
                             (grid[0] // patch[1], grid[1] // patch[2]), batch, latent_frames)
    return cache_nbytes(cfg.cache, head_types, geometry, cfg.sampling.frames_per_chunk, _itemsize(dtype))


def activation_bytes(transformer: dict, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Estimate of one chunk's forward: hidden states, q/k/v/output and fp32 norm/modulation copies (dim-wide),
    the FFN's inner activations (in and out of the GELU), plus every layer's cached cross-attention K/V."""
    item = _itemsize(dtype)
    dim = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    per_token = dim * (6 * item + 4 * 4) + 2 * transformer["ffn_dim"] * item
    cross = transformer["num_layers"] * 2 * TEXT_TOKENS * dim * item
    return batch * (tokens * per_token + cross + TEXT_TOKENS * transformer["text_dim"] * item)


def encode_bytes(text: dict, dtype: torch.dtype, batch: int = 1) -> int:
    """Estimate of umT5's forward on 512 tokens: hidden states, the gated FFN, one layer's attention scores."""
    item = _itemsize(dtype)
    per_token = text["d_model"] * 8 * item + text["d_ff"] * 3 * item
    return batch * (TEXT_TOKENS * per_token + text["num_heads"] * TEXT_TOKENS ** 2 * 4)


def vae_decode_bytes(height: int, width: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Estimate of the streaming decode's transient memory for one chunk (measured coefficient)."""
    return batch * VAE_DECODE_BYTES_PER_PIXEL * height * width * _itemsize(dtype) // 4


def mode_peaks(weights: dict, kv: int, act: int, encode: int, decode: int, text_on_device: bool = True) -> dict:
    """Peak accelerator bytes per offload mode: the larger of the prompt-encoding phase and generation.
    `text_on_device=False`: umT5 runs elsewhere (--text-encoder-device cpu) and never uses the accelerator."""
    te, dit, vae = weights["text_encoder"], weights["transformer"], weights["vae"]
    resident = weights.get("decoder", 0)  # the tae decoder never leaves the device
    if not text_on_device:
        te = encode = 0
    generate = kv + max(act, decode)
    return {mode: resident + peak for mode, peak in {
        "none": te + dit + vae + max(encode, generate),
        "text-encoder": max(te + dit + vae + encode, dit + vae + generate),
        "model": max(te + encode, dit + vae + generate),
    }.items()}


def choose_offload(mode: str, peaks: dict, free: int | None, device_type: str) -> str:
    """`auto`: the least offload whose peak fits the free accelerator memory with a margin; else the mode asked."""
    if mode not in OFFLOAD_MODES:
        raise PfgenError(f"unknown offload '{mode}'", f"choose from {', '.join(OFFLOAD_MODES)}")
    if mode != "auto":
        return mode
    if device_type != "cuda" or free is None:
        return "none"
    budget = free - max(MARGIN_MIN, int(free * MARGIN_FRACTION))
    for candidate in ("none", "text-encoder", "model"):
        if peaks[candidate] <= budget:
            return candidate
    raise PfgenError(f"the run needs {format_gib(peaks['model'])} of accelerator memory even with --offload model, "
                     f"{format_gib(free)} is free", "lower --height/--width, use --policy pyramid or rolling, or a "
                                                    "larger GPU")


def format_gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 4 else f"{n / 2 ** 20:.1f} MiB"


# -- the plan --------------------------------------------------------------------------------------------------
def device_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(total, free) bytes of a CUDA device; (None, None) elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None, None
    free, total = torch.cuda.mem_get_info(device)
    return total, free


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None where that cannot be told)."""
    if device.type == "cuda":
        return device_memory(device)[1]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def plan_memory(cfg, num_frames: int, *, device: torch.device, dtype: torch.dtype, policy: str | None = None,
                heads=None, height: int | None = None, width: int | None = None, offload: str | None = None,
                batch: int = 1, image: bool = False, start: int = 0, commit_last: bool = False) -> MemoryPlan:
    """The memory plan of generating `num_frames` video frames with `cfg` on `device` in `dtype` (`image`: the
    first frame is an image, image-to-video; `start`: a resumed run's first latent frame, whose video frames
    count from there and whose `full` cache holds the saved frames too; `commit_last`: the run is saved)."""
    policy = policy or cfg.cache.policy
    height, width = height or cfg.video.height, width or cfg.video.width
    per_chunk = cfg.sampling.frames_per_chunk
    latent = latent_frames_for(num_frames, per_chunk)
    transformer, text, vae, sources = architectures(cfg.model)
    grid = latent_grid(height, width, vae_space(vae))
    types = head_type_rows(head_type_source(cfg.cache, policy, heads), policy, transformer["num_layers"],
                           transformer["num_attention_heads"])
    patch = transformer["patch_size"]
    pass_frames = per_chunk  # the largest forward: a chunk, or a `recache: window` pass over the whole window
    if cfg.cache.recache == "window":
        pass_frames = max(per_chunk, cfg.cache.rolling.window if policy == "rolling" else latent)
    tokens = pass_frames * (grid[0] // patch[1]) * (grid[1] // patch[2])
    weights = dict(transformer=transformer_bytes(transformer, dtype), text_encoder=text_encoder_bytes(text, dtype),
                   vae=vae_bytes(vae, dtype))
    kv = kv_cache_bytes(cfg, types, transformer, grid, start + latent, dtype, batch)
    act = activation_bytes(transformer, tokens, dtype, batch)
    enc = encode_bytes(text, dtype, batch)
    if cfg.model.decoder == "tae":  # the Wan VAE stays loaded (image-to-video encodes with it)
        from pfgen.wan.tae import tae_decode_bytes, tae_parameters

        weights["decoder"] = tae_parameters() * _itemsize(dtype)
        dec = tae_decode_bytes(height, width, _itemsize(dtype), batch)
    else:
        weights["decoder"] = 0
        dec = vae_decode_bytes(height, width, dtype, batch)
    text_device = cfg.model.text_encoder_device
    peaks = mode_peaks(weights, kv, act, enc, dec, text_device is None or torch.device(text_device).type == device.type)
    total, free = device_memory(device)
    chosen = choose_offload(offload or getattr(cfg.runtime, "offload", "auto"), peaks, free, device.type)
    memory = dict(transformer_bytes=weights["transformer"], text_encoder_bytes=weights["text_encoder"],
                  vae_bytes=weights["vae"], decoder_bytes=weights["decoder"], kv_cache_bytes=kv, activation_bytes=act,
                  text_encode_bytes=enc,
                  vae_decode_bytes=dec, peak_bytes=peaks[chosen])
    sampling = cfg.sampling
    passes = dit_passes(len(sampling.timesteps), len(sampling.first_chunk_timesteps or ()),
                        (latent - image) // per_chunk, fresh=start == 0, image=image, commit_last=commit_last)
    frames = video_frames_for(start + latent) - (video_frames_for(start) if start else 0)  # what the run decodes
    return MemoryPlan(frames, latent, latent // per_chunk, passes, policy, height, width, grid, str(device),
                      str(dtype).removeprefix("torch."), chosen, total, free, memory, peaks, sources)


def plan_lines(plan: MemoryPlan) -> list[str]:
    """The plan as text, for `--dry-run` and the end of a run."""
    m = plan.memory
    rows = [
        f"{plan.frames} frames ({plan.latent_frames} latent, {plan.chunks} chunks, {plan.passes} DiT passes) at "
        f"{plan.height}x{plan.width}, "
        f"policy {plan.policy}, {plan.device} {plan.dtype}",
        f"  transformer weights   {format_gib(m['transformer_bytes']):>12}   ({plan.sources['transformer']})",
        f"  text encoder          {format_gib(m['text_encoder_bytes']):>12}   ({plan.sources['text_encoder']})",
        f"  VAE                   {format_gib(m['vae_bytes']):>12}   ({plan.sources['vae']})",
        f"  KV cache (exact)      {format_gib(m['kv_cache_bytes']):>12}",
        f"  activations, 1 pass   {format_gib(m['activation_bytes']):>12}   (estimate: a chunk, or a window re-cache)",
        f"  prompt encoding       {format_gib(m['text_encode_bytes']):>12}   (estimate)",
        *([f"  tae decoder           {format_gib(m['decoder_bytes']):>12}   (taew2_1 architecture)"]
          if m["decoder_bytes"] else []),
        f"  {'tae' if m['decoder_bytes'] else 'VAE'} decode transient  {format_gib(m['vae_decode_bytes']):>12}   "
        "(estimate)",
        "  peak by offload: " + ", ".join(f"{k} {format_gib(v)}" for k, v in plan.peaks.items()),
    ]
    if plan.device_total_bytes is not None:
        rows.append(f"  device: {format_gib(plan.device_total_bytes)} total, {format_gib(plan.device_free_bytes)} "
                    "free")
    rows.append(f"offload {plan.offload}: predicted peak {format_gib(m['peak_bytes'])}")
    return rows


def compare_line(plan: MemoryPlan, measured: int, kind: str, kv_bytes: int) -> str:
    """Predicted against measured, for the end of a run (CUDA: max allocated; CPU: the cache and the RSS)."""
    if kind == "cuda":
        return (f"memory: predicted peak {format_gib(plan.memory['peak_bytes'])} (offload {plan.offload}), "
                f"measured {format_gib(measured)} (CUDA max allocated)")
    return (f"memory: KV cache predicted {format_gib(plan.memory['kv_cache_bytes'])}, allocated "
            f"{format_gib(kv_bytes)}; process RSS peak {format_gib(measured)}")
