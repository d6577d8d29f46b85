"""The random-weight tiny model (model name `random`): real Wan architecture at toy sizes, weights from a fixed seed.

The tests run the exact code path of the 1.3B model on it (same diffusers classes, same cache, same VAE
streaming) in seconds on a CPU, against oracles built from the same seeds. Its pictures are noise. The
embedded default is the trained world model instead (pfgen.world.model).
"""

from __future__ import annotations

NOISE_NOTE = ("[yellow]note:[/] model 'random' has random weights: the video is noise (the embedded default, "
              "config tiny, is a trained model)")


def noise_note(model_cfg) -> str | None:
    """NOISE_NOTE where a ModelConfig is this random-weight model, else None."""
    return NOISE_NOTE if model_cfg.random_weights else None


# The architectures are plain data (torch-free), so that inspect-cache and the memory plan read them without
# importing torch.
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=256, num_layers=4, cross_attn_norm=True, eps=1e-6,
)
TINY_VAE = dict(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True])
TINY_TEXT = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=32, relative_attention_max_distance=64)


def _seeded(seed: int, build):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    return _seeded(seed, lambda: WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides})).eval()


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKLWan

    return _seeded(seed, lambda: AutoencoderKLWan(**TINY_VAE)).eval()


def tiny_text_encoder(seed: int = 2):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(**TINY_TEXT, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _seeded(seed, lambda: UMT5EncoderModel(config)).eval()


def tiny_tokenizer():
    """Byte-level tokenizer: needs no vocabulary file, so the demo works offline."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()
