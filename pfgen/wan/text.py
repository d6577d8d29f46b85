"""Prompt -> umT5 embeddings: always 512 tokens, zero beyond the prompt (what the Wan students saw)."""

from __future__ import annotations

import warnings

import torch

TEXT_TOKENS = 512


class PromptEncoder:
    def __init__(self, tokenizer, encoder):
        self.tokenizer = tokenizer
        self.encoder = encoder

    @property
    def device(self) -> torch.device:
        """Where the encoder is now (offloading moves it between prompts)."""
        return next(self.encoder.parameters()).device

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(B, 512, d_model) embeddings on the encoder's device, in its dtype; a longer prompt is cut (warned)."""
        for prompt in prompts:
            count = len(self.tokenizer(prompt, add_special_tokens=True).input_ids)
            if count > TEXT_TOKENS:
                warnings.warn(f"the prompt {prompt[:40]!r}... has {count} tokens; the model reads the first "
                              f"{TEXT_TOKENS}")
        ids = self.tokenizer(prompts, padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = ids.attention_mask.to(self.device)
        out = self.encoder(input_ids=ids.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        return out * mask[..., None].to(out.dtype)
