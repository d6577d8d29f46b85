"""Model components on the right device and dtype: the tiny embedded set, or real weights from local paths."""

from __future__ import annotations

import torch

from pfgen.wan.checkpoint import fp32_pattern
from pfgen.wan.text import PromptEncoder


def place(model, device, dtype):
    """Move to device and cast like `from_pretrained(torch_dtype=...)`: modules diffusers keeps in float32
    (time embedder, modulation tables, norms) stay float32."""
    pattern = fp32_pattern(model)
    model.to(device)
    for name, param in model.named_parameters():
        if param.is_floating_point():
            target = torch.float32 if pattern and pattern.search(name) else dtype
            param.data = param.data.to(target)
    return model.eval().requires_grad_(False)


def load_components(model_cfg, device, dtype):
    """(transformer, vae, prompt encoder) for a ModelConfig; no checkpoint = the embedded tiny model."""
    if model_cfg.checkpoint is None:
        from pfgen.wan.tiny import tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae

        transformer = place(tiny_transformer(), device, dtype)
        vae = place(tiny_vae(), device, dtype)
        encoder = PromptEncoder(tiny_tokenizer(), place(tiny_text_encoder(), device, dtype))
        return transformer, vae, encoder
    from pfgen.wan.checkpoint import load_transformer
    from pfgen.wan.wan_dir import load_prompt_encoder, load_vae

    text_device = torch.device(model_cfg.text_encoder_device) if model_cfg.text_encoder_device else device
    transformer = load_transformer(model_cfg, dtype).to(device)
    vae = load_vae(model_cfg.wan_dir, dtype).to(device)
    return transformer, vae, load_prompt_encoder(model_cfg.wan_dir, dtype, text_device)
