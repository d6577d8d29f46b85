"""The world model's architecture (torch-free data): the real Wan classes at toy sizes, 64x96 video.

scripts/train_world.py trains these from scratch on 2 CPU cores and writes a diffusers folder (transformer/,
vae/, text_encoder/, tokenizer/); the trained one ships in WEIGHTS. A ModelConfig named EMBEDDED without a
checkpoint names this folder (pfgen.config.ModelConfig), so it loads through the ordinary real-weights path,
exactly as `--checkpoint WEIGHTS/transformer --wan-dir WEIGHTS` does. docs/world.md has its training and figures.
"""

import json
from pathlib import Path

WEIGHTS = Path(__file__).with_name("weights")
EMBEDDED = "tiny"  # the model name (and bundled config) of the embedded default: these weights
RANDOM = "random"  # the model name of the random-weight tiny model built in code (pfgen.wan.tiny), for tests


def is_embedded(model_cfg) -> bool:
    """Whether a ModelConfig runs the shipped world model's transformer."""
    return model_cfg.checkpoint is not None and Path(model_cfg.checkpoint) == WEIGHTS / "transformer"


def is_world(model_cfg) -> bool:
    """Whether a ModelConfig runs a world model: the shipped one, or a folder that scripts/train_world.py wrote
    (its transformer has one of ARCHITECTURES' configs). Such a model knows only the world's grammar."""
    if is_embedded(model_cfg):
        return True
    if model_cfg.checkpoint is None:
        return False
    config = Path(model_cfg.checkpoint).expanduser() / "config.json"
    try:
        found = json.loads(config.read_text())
    except (OSError, ValueError):  # no local diffusers folder (a .pt, a Hub reference), or one the loader refuses
        return False
    return any(all(found.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in transformer.items())
               for _, transformer in ARCHITECTURES.values())


HEIGHT, WIDTH = 64, 96
WORLD_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=64, ffn_dim=384, num_layers=6, cross_attn_norm=True, eps=1e-6,
)
WORLD_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 8], num_res_blocks=1,
                 temperal_downsample=[False, True, True])
# A variant under test (docs/world-history.md): 4x spatial compression instead of 8x (latents 16x24, four times the latent
# cells an object covers) with a 4x4 DiT patch, so the DiT still sees 24 tokens a frame and costs what it did.
WORLD_VAE_4X = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 8], num_res_blocks=1, temperal_downsample=[True, True],
                    scale_factor_spatial=4)
WORLD_TRANSFORMER_4X = dict(WORLD_TRANSFORMER, patch_size=(1, 4, 4))
ARCHITECTURES = {8: (WORLD_VAE, WORLD_TRANSFORMER), 4: (WORLD_VAE_4X, WORLD_TRANSFORMER_4X)}  # by VAE compression
WORLD_TEXT = dict(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=32, relative_attention_max_distance=64)
