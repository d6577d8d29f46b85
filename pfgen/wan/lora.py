"""LoRA files merged into the transformer's weights at load: W += scale * (alpha / rank) * B A, in float32.

Formats: PEFT (`lora_A` / `lora_B`, `{"generator_lora": ...}` as LongLive saves it, or a raw state dict) and
diffusers (`lora_A` / `lora_B` or `lora.down` / `lora.up` / `lora_down` / `lora_up`), each module named the Wan way
(`blocks.0.self_attn.q`) or the diffusers way (`blocks.0.attn1.to_q`), behind any of the usual prefixes
(`base_model.model.`, `diffusion_model.`, `transformer.`, `model.`). Alpha: the entry's own `alpha`, else the
file's (per-module `.alpha` tensors, or `lora_alpha` of a PEFT `adapter_config.json` beside it), else the rank.

Strict, like the checkpoint load: every tensor of the file is used once, every module it names exists and is a
linear layer of this transformer, down and up ranks agree and the shapes fit; anything else is one line that
names the file and the first offending key.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from pfgen.errors import PfgenError
from pfgen.wan.checkpoint import WRAPPER_PREFIXES, read_safetensors, wan_to_diffusers

_KEY = re.compile(r"(?P<module>.+)\.(?:(?P<down>lora_A(?:\.default)?\.weight|lora_down\.weight|lora\.down\.weight)"
                  r"|(?P<up>lora_B(?:\.default)?\.weight|lora_up\.weight|lora\.up\.weight)|(?P<alpha>alpha))")
PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.") + WRAPPER_PREFIXES
FILE_NAMES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")  # what a LoRA folder holds


def parse_lora_option(text: str):
    """`FILE[:SCALE]` (--lora) -> LoraConfig; a Hub reference keeps its own `:path` (the scale is a number)."""
    from pfgen.config import LoraConfig

    path, _, tail = text.rpartition(":")
    try:
        return LoraConfig(path=path, scale=float(tail)) if path else LoraConfig(path=text)
    except ValueError:
        return LoraConfig(path=text)


def lora_file(path: str | Path) -> Path:
    """The weights file of a LoRA path (a folder holds adapter_model / pytorch_lora_weights .safetensors)."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / n for n in FILE_NAMES if (path / n).exists()] or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise PfgenError(f"LoRA folder {path} holds {len(found)} candidate weight files",
                             f"name the file ({' or '.join(FILE_NAMES)})")
        return found[0]
    if not path.exists():
        raise PfgenError(f"LoRA file not found: {path}", "give a .safetensors / .pt LoRA or a Hub reference")
    return path


def file_digest(path: str | Path) -> str:
    """sha256 of the LoRA's weights file (how saved states and manifests record it)."""
    h = hashlib.sha256()
    with open(lora_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_lora(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        data = read_safetensors([path])
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PfgenError(f"{path} is not a readable LoRA file ({type(exc).__name__})",
                             "give a PEFT or diffusers LoRA (.safetensors or .pt)") from None
    if isinstance(data, dict) and "generator_lora" in data:  # LongLive's training checkpoint
        data = data["generator_lora"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise PfgenError(f"{path} does not hold a LoRA state dict (no tensors found)")
    return data


def _module(name: str, state: dict) -> str | None:
    """The diffusers module name of a LoRA key's module (Wan or diffusers naming), or None."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    for candidate in (name, next(iter(wan_to_diffusers({name + ".weight": None}))).removesuffix(".weight")):
        if candidate + ".weight" in state:
            return candidate
    return None


def _file_alpha(path: Path) -> float | None:
    config = path.parent / "adapter_config.json"
    if not config.exists():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PfgenError(f"{config} is not valid JSON", "restore the adapter's config or give the alpha") from None
    if data.get("alpha_pattern") or data.get("rank_pattern"):
        raise PfgenError(f"{config} sets per-module alpha or rank patterns, which pfgen does not merge",
                         "give alpha in the LoRA entry of the config")
    return float(data["lora_alpha"]) if "lora_alpha" in data else None


def group_lora(path: Path, tensors: dict, state: dict) -> dict[str, dict]:
    """{module: {"down", "up", "alpha"?}} with every key used once and placed, or one line on the first fault."""
    modules: dict[str, dict] = {}
    unknown = []
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        module = _module(match["module"], state) if match else None
        if module is None:
            unknown.append(key)
            continue
        part = "down" if match["down"] else "up" if match["up"] else "alpha"
        if part in modules.setdefault(module, {}):
            raise PfgenError(f"{path}: two {part} tensors for {module} (e.g. {key})",
                             "the file names one module twice (Wan and diffusers names?)")
        modules[module][part] = tensor
    if unknown:
        raise PfgenError(f"{path}: {len(unknown)} keys are not LoRA tensors of this transformer (e.g. {unknown[0]})",
                         "a LoRA for another architecture? pfgen merges LoRAs of Wan2.1 text-to-video linear layers")
    for module, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise PfgenError(f"{path}: {module} has no {'up' if 'down' in parts else 'down'} (B / A) tensor",
                             "the LoRA file is incomplete")
    return modules


def merge_lora(state: dict, lora) -> int:
    """Merge one LoRA (a LoraConfig with a local path) into a diffusers-named state dict in place; returns the
    number of modules changed."""
    path = lora_file(lora.path)
    modules = group_lora(path, read_lora(path), state)
    file_alpha = _file_alpha(path)
    for module, parts in modules.items():
        down, up, weight = parts["down"], parts["up"], state[module + ".weight"]
        rank = down.shape[0]
        if weight.dim() != 2 or down.dim() != 2 or up.dim() != 2:
            raise PfgenError(f"{path}: {module} is not a linear layer with a 2-D LoRA (shapes {tuple(down.shape)}, "
                             f"{tuple(up.shape)})", "pfgen merges LoRAs of linear layers only")
        if up.shape[1] != rank:
            raise PfgenError(f"{path}: {module} has rank {rank} down and rank {up.shape[1]} up", "a broken LoRA file")
        if (up.shape[0], down.shape[1]) != tuple(weight.shape):
            raise PfgenError(f"{path}: {module} LoRA is {up.shape[0]}x{down.shape[1]}, the layer "
                             f"{weight.shape[0]}x{weight.shape[1]}", "a LoRA for another architecture (model size)")
        alpha = lora.alpha if lora.alpha is not None else \
            float(parts["alpha"]) if "alpha" in parts else file_alpha if file_alpha is not None else rank
        delta = (up.double() @ down.double()) * (lora.scale * alpha / rank)
        state[module + ".weight"] = (weight.double() + delta).to(weight.dtype)
    return len(modules)


def merge_loras(state: dict, loras) -> list[dict]:
    """Merge every LoRA in order; the records saved states and manifests keep (content digest, scale, alpha)."""
    records = []
    for lora in loras:
        count = merge_lora(state, lora)
        records.append(dict(sha256=file_digest(lora.path), scale=lora.scale, alpha=lora.alpha, modules=count))
    return records
