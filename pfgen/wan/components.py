"""Model components on the right device and dtype: the tiny embedded set, or real weights from local paths."""

from __future__ import annotations

import torch

from pfgen.errors import PfgenError
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


def load_components(model_cfg, device, dtype, offload: str = "none"):
    """(transformer, vae, prompt encoder) for a ModelConfig; no checkpoint = the random test model (pfgen.wan.tiny).

    Hub references in the config are downloaded (or found in the HF cache) here. Each component is loaded to
    its home under the offload mode (`pfgen.offload`): the CPU when the mode offloads it, else `device`."""
    from pfgen.offload import home_device
    from pfgen.wan.vae_forward import cheaper_forward

    text_device = torch.device(model_cfg.text_encoder_device) if model_cfg.text_encoder_device else \
        home_device(offload, "text_encoder", device)
    dit_device, vae_device = home_device(offload, "transformer", device), home_device(offload, "vae", device)
    if model_cfg.random_weights:
        from pfgen.wan.tiny import tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae

        transformer = tiny_transformer()
        if model_cfg.loras:
            from pfgen.hub import resolve_model
            from pfgen.wan.lora import merge_loras

            state = transformer.state_dict()
            transformer.pfgen_loras = merge_loras(state, resolve_model(model_cfg).loras)
            transformer.load_state_dict(state)
        transformer = place(transformer, dit_device, dtype)
        vae = cheaper_forward(place(tiny_vae(), vae_device, dtype))
        encoder = PromptEncoder(tiny_tokenizer(), place(tiny_text_encoder(), text_device, dtype))
        return transformer, vae, encoder
    from pfgen.hub import resolve_model
    from pfgen.wan.checkpoint import load_transformer
    from pfgen.wan.wan_dir import load_prompt_encoder, load_vae

    model_cfg = resolve_model(model_cfg)
    transformer = load_transformer(model_cfg, dtype).to(dit_device)
    vae = cheaper_forward(load_vae(model_cfg.wan_dir, dtype).to(vae_device))
    return transformer, vae, load_prompt_encoder(model_cfg.wan_dir, dtype, text_device)


def load_decoder(model_cfg, vae, device, dtype):
    """The tiny decoder for `model.decoder: tae` (None for `wan`), its weights resolved by `hub.decoder_source`;
    it decodes latents of the Wan2.1 VAE's spatial factor only."""
    if model_cfg.decoder != "tae":
        return None
    from pfgen.frames import WAN_VAE_SPACE, vae_space

    space = vae_space(vae.config)
    if space != WAN_VAE_SPACE:
        raise PfgenError(f"--decoder tae decodes latents of the Wan2.1 VAE ({WAN_VAE_SPACE}x), and this model's VAE "
                         f"compresses {space}x", "use --decoder wan")
    from pfgen.hub import decoder_source, resolve
    from pfgen.wan.tae import load_tae

    return load_tae(resolve(decoder_source(model_cfg), "decoder"), device, dtype)
