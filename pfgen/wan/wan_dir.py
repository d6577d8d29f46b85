"""Text encoder, tokenizer and VAE from a local Wan2.1 diffusers folder (text_encoder/, tokenizer/, vae/)."""

from __future__ import annotations

from pathlib import Path

import torch

from pfgen.errors import PfgenError
from pfgen.wan.text import PromptEncoder


def component_dir(wan_dir: str | None, name: str) -> Path:
    if wan_dir is None:
        raise PfgenError("real weights need the Wan2.1 folder for the text encoder, tokenizer and VAE",
                         "pass --wan-dir Wan2.1-T2V-1.3B-Diffusers")
    path = Path(wan_dir).expanduser() / name
    if not path.is_dir():
        raise PfgenError(f"Wan folder {wan_dir} has no '{name}/' component",
                         "point --wan-dir at the diffusers layout of Wan2.1-T2V-1.3B")
    return path


def load_vae(wan_dir: str | None, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    path = component_dir(wan_dir, "vae")
    try:
        vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise PfgenError(f"cannot load the VAE from {path}: {str(exc).splitlines()[0]}") from None
    return vae


def load_prompt_encoder(wan_dir: str | None, dtype: torch.dtype, device) -> PromptEncoder:
    from transformers import AutoTokenizer, UMT5EncoderModel

    tok_path, enc_path = component_dir(wan_dir, "tokenizer"), component_dir(wan_dir, "text_encoder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
        encoder = UMT5EncoderModel.from_pretrained(enc_path, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PfgenError(f"cannot load the text encoder from {wan_dir}: {str(exc).splitlines()[0]}") from None
    check_tokenizer(tokenizer, encoder, tok_path)
    return PromptEncoder(tokenizer, encoder.to(device).eval().requires_grad_(False))


def check_tokenizer(tokenizer, encoder, where) -> None:
    """A tokenizer that silently failed to load its vocabulary maps words to <unk>; one built for another
    encoder produces ids past its embedding table. Both would give garbage embeddings without an error."""
    vocab = encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise PfgenError(f"tokenizer in {where} has {len(tokenizer)} tokens, the text encoder only {vocab}",
                         "use the tokenizer/ and text_encoder/ of the same Wan release")
    ids = tokenizer(["a cat on a red sofa"], add_special_tokens=False).input_ids[0]
    if not ids or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        raise PfgenError(f"tokenizer in {where} did not load its vocabulary (words map to <unk>)",
                         "check that tokenizer/ holds the umT5 tokenizer files")
