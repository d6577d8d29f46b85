"""One digest that tells models apart: what saved states and profiling statistics are checked against."""

from __future__ import annotations

import hashlib
import json


def model_fingerprint(*modules) -> str:
    """Architecture plus up to 1024 evenly spaced values of every parameter (cheap, and any other checkpoint
    differs). Self-attention weights are left out: their heads are reordered per policy (`wan.head_order`),
    and every other weight already tells checkpoints apart."""
    h = hashlib.sha256()
    for module in modules:
        arch = {k: v for k, v in module.config.items() if not k.startswith("_")}  # "_..." vary between runs
        h.update(json.dumps(arch, sort_keys=True, default=str).encode())
        for name, param in sorted(module.named_parameters()):
            if ".attn1." in name:
                continue
            flat = param.detach().flatten()
            sample = flat[::max(1, flat.numel() // 1024)].float().cpu()
            h.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
