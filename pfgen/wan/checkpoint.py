"""Load Self Forcing / Causal Forcing / Wan2.1 transformer weights into diffusers' WanTransformer3DModel.

Accepted: a `.pt` training checkpoint (`generator` / `generator_ema`, keys `model.<Wan name>`), a diffusers
transformer folder (config.json + safetensors), or original Wan2.1 weights (safetensors with Wan names).
Every load is strict: each tensor is used once, each parameter filled, shapes checked. The architecture is
read from the tensors, so the same code loads the 1.3B model, 14B-shaped students and tiny test models.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from pfgen.errors import PfgenError
from pfgen.outputs import atomic_output

# Original Wan2.1 name -> diffusers name, applied in order (head.modulation before the generic rule;
# Wan's affine norm3 is diffusers' norm2, through a placeholder so the two do not collide).
WAN_TO_DIFFUSERS = (
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    (".modulation", ".scale_shift_table"),
    (".self_attn.o.", ".attn1.to_out.0."),
    (".self_attn.", ".attn1."),
    (".cross_attn.o.", ".attn2.to_out.0."),
    (".cross_attn.", ".attn2."),
    (".norm3.", ".__affine_norm__."),
    (".ffn.0.", ".ffn.net.0.proj."),
    (".ffn.2.", ".ffn.net.2."),
    (".__affine_norm__.", ".norm2."),
)
_PROJ = re.compile(r"\.(attn[12])\.([qkv])\.")
WRAPPER_PREFIXES = ("model._fsdp_wrapped_module.", "model.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.",
                    "_orig_mod.")


def wan_to_diffusers(state: dict) -> dict:
    out = {}
    for name, tensor in state.items():
        for old, new in WAN_TO_DIFFUSERS:
            name = name.replace(old, new)
        out[_PROJ.sub(r".\1.to_\2.", name)] = tensor
    return out


def strip_prefixes(state: dict) -> dict:
    """Remove training-wrapper prefixes (`model.`, FSDP / checkpoint / compile wrappers) from every key."""
    out = {}
    for name, tensor in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
            name = name.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")
        out[name] = tensor
    return out


def read_training_checkpoint(path: Path, ema: bool) -> dict:
    """State dict (Wan names) of the generator in a Self Forcing / Causal Forcing `.pt` file."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise PfgenError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__})",
                         "give a Self Forcing / Causal Forcing .pt file or a diffusers folder") from None
    if not isinstance(data, dict):
        raise PfgenError(f"{path} does not hold a state dict")
    key = "generator_ema" if ema else "generator"
    if "generator" in data or "generator_ema" in data:
        if key not in data:
            other = "--no-ema" if ema else "--ema"
            raise PfgenError(f"{path} has no '{key}' entry (it has: {', '.join(sorted(data))})", f"use {other}")
        data = data[key]
    if not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise PfgenError(f"{path} does not look like a model checkpoint (no tensors found)")
    return strip_prefixes(data)


def read_weights(path: str | Path, ema: bool) -> tuple[dict, dict | None]:
    """(diffusers-named state dict, diffusers config or None) from any accepted source."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PfgenError(f"checkpoint not found: {path}")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise PfgenError(f"{path} holds no .safetensors weights", "give a diffusers transformer folder")
        state = read_safetensors(files)
        config_file = path / "config.json"
        config = read_config(config_file) if config_file.exists() else None
        is_diffusers = config is not None and config.get("_class_name") == "WanTransformer3DModel"
        return (state, config) if is_diffusers else (wan_to_diffusers(strip_prefixes(state)), None)
    if path.suffix == ".safetensors":
        return wan_to_diffusers(strip_prefixes(read_safetensors([path]))), None
    return wan_to_diffusers(read_training_checkpoint(path, ema)), None


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PfgenError(f"{path} is not valid JSON", "restore the folder's config.json (pfgen convert writes one)") \
            from None
    if not isinstance(config, dict):
        raise PfgenError(f"{path} does not hold a model config (expected a JSON object)")
    return config


def read_safetensors(files, shapes_only: bool = False) -> dict:
    """The tensors of safetensors files (`shapes_only`: meta tensors from the headers, no data read)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    state = {}
    for f in files:
        try:
            if shapes_only:
                with safe_open(str(f), framework="pt") as handle:
                    state.update({name: torch.empty(handle.get_slice(name).get_shape(), device="meta")
                                  for name in handle.keys()})
            else:
                state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PfgenError(f"{f} is not a readable safetensors file ({str(exc).splitlines()[0][:80]})",
                             "re-download or re-convert the weights") from None
    return state


def fp32_pattern(model) -> re.Pattern | None:
    """Parameter names diffusers keeps in float32 under any torch_dtype (`_keep_in_fp32_modules`)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return re.compile("|".join(rf"(^|\.){re.escape(k)}($|\.)" for k in keep)) if keep else None


def infer_architecture(state: dict, num_heads: int | None = None) -> dict:
    """WanTransformer3DModel config from tensor shapes (heads = dim / 128 unless given)."""
    try:
        patch = state["patch_embedding.weight"]
        dim, in_channels = patch.shape[0], patch.shape[1]
        patch_size = tuple(patch.shape[2:])
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        config = dict(
            patch_size=patch_size, in_channels=in_channels, num_layers=layers,
            out_channels=state["proj_out.weight"].shape[0] // math.prod(patch_size),
            ffn_dim=state["blocks.0.ffn.net.0.proj.weight"].shape[0],
            text_dim=state["condition_embedder.text_embedder.linear_1.weight"].shape[1],
            freq_dim=state["condition_embedder.time_embedder.linear_1.weight"].shape[1],
            cross_attn_norm="blocks.0.norm2.weight" in state, eps=1e-6,
            qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in state else None,
        )
    except (KeyError, ValueError, IndexError) as exc:
        raise PfgenError(f"the weights are not a Wan text-to-video transformer (missing {exc})") from None
    if "blocks.0.attn2.add_k_proj.weight" in state:
        raise PfgenError("image-to-video Wan weights are not supported", "use a text-to-video student")
    heads = num_heads or max(1, dim // 128)
    if dim % heads:
        raise PfgenError(f"model width {dim} is not divisible by {heads} heads", "pass a valid --num-heads")
    return {**config, "num_attention_heads": heads, "attention_head_dim": dim // heads}


def build_strict(config: dict, state: dict, dtype: torch.dtype):
    """Instantiate without random init (meta device) and assign every tensor, strictly."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise PfgenError("checkpoint does not match the Wan transformer: " + "; ".join(parts))
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise PfgenError(f"checkpoint tensor {name} has shape {tuple(state[name].shape)}, "
                             f"expected {tuple(tensor.shape)}")
    keep = fp32_pattern(model)
    cast = {k: v.to(torch.float32 if keep and keep.search(k) else dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    cfg = model.config
    model.rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len)
    return model.eval().requires_grad_(False)


def load_transformer(model_cfg, dtype: torch.dtype):
    if model_cfg.random_weights:
        raise PfgenError("no checkpoint given")
    from pfgen.wan.lora import merge_loras

    state, config = read_weights(model_cfg.checkpoint, model_cfg.ema)
    records = merge_loras(state, model_cfg.loras)  # before the cast to dtype
    if config is None:
        config = infer_architecture(state, model_cfg.num_heads)
    else:
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        model = build_strict(config, state, dtype)
    except (TypeError, ValueError) as exc:  # a config.json whose values diffusers cannot build a model from
        raise PfgenError(f"{model_cfg.checkpoint}: its config does not describe a Wan transformer "
                         f"({str(exc).splitlines()[0][:100]})") from None
    model.pfgen_loras = records  # what saved states record (pfgen.state)
    return model


def check_diffusers_output(directory: Path, overwrite: bool) -> None:
    """The folder `save_diffusers` may write: new, empty, or (with `overwrite`) replaced; never a file."""
    if directory.exists() and not directory.is_dir():
        raise PfgenError(f"output {directory} is a file", "give a folder name")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise PfgenError(f"output folder {directory} already exists",
                         "pass --overwrite (-y) to replace it, or choose a new folder")


def save_diffusers(model, directory: str | Path, overwrite: bool = False) -> Path:
    """Write a folder `WanTransformer3DModel.from_pretrained` loads on its own (written to a temp dir, then
    renamed, so an interrupted conversion leaves nothing behind; with `overwrite` it replaces a folder there)."""
    directory = Path(directory)
    check_diffusers_output(directory, overwrite)
    with atomic_output(directory, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return directory
