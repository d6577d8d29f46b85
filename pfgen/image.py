"""Image-to-video: the first frame from an image, for frame-wise students.

The image is resized to cover the video size (aspect kept, Lanczos), centre-cropped to it, and encoded by the
Wan VAE to one latent frame (the posterior mean, normalised like the DiT's latents), which the chunk loop
commits at t = 0 as frame 0 (`sampling.ChunkLoop.run`). Every refusal is one line, before the model loads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pfgen.errors import PfgenError

MODES = ("RGB", "RGBA", "L", "LA", "P")  # 8-bit colour, grey or palette; alpha must be opaque


def check_image_run(frames_per_chunk: int, resuming: bool, option: str = "--image") -> None:
    """An image starts a video of a frame-wise student; a resumed video already has its start."""
    if frames_per_chunk != 1:
        raise PfgenError(f"{option} is for frame-wise students (1 latent frame per chunk), this config has "
                         f"{frames_per_chunk}", "use --config causal-forcing-framewise, -2step or -1step")
    if resuming:
        raise PfgenError(f"{option} cannot be used with --resume: the saved state already has a start",
                         "leave the image out to continue, or start a new video with it")


def load_image(source, height: int, width: int) -> np.ndarray:
    """A path or PIL image -> (height, width, 3) float32 in [-1, 1], resized to cover and centre-cropped.

    Refused: unreadable files, images smaller than the video in either side, modes other than 8-bit RGB,
    grey or palette, and transparent pixels."""
    from PIL import Image, UnidentifiedImageError

    name = source if isinstance(source, (str, Path)) else "image"
    if isinstance(source, (str, Path)):
        try:
            with Image.open(Path(source).expanduser()) as opened:
                opened.load()
                image = opened.copy()
        except FileNotFoundError:
            raise PfgenError(f"image not found: {source}") from None
        except IsADirectoryError:
            raise PfgenError(f"{source} is a folder, not an image") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise PfgenError(f"cannot read image {source}: {str(exc).splitlines()[0] if str(exc) else 'not an image'}",
                             "give a PNG, JPEG or WebP file") from None
    elif isinstance(source, Image.Image):
        image = source
    else:
        raise PfgenError(f"image must be a path or a PIL image, got {type(source).__name__}")
    if image.mode not in MODES:
        raise PfgenError(f"{name}: image mode {image.mode} is not supported",
                         "save it as 8-bit RGB, greyscale or palette, e.g. PNG or JPEG")
    if image.mode in ("RGBA", "LA", "P") and image.convert("RGBA").getextrema()[3][0] < 255:
        raise PfgenError(f"{name}: the image has transparent pixels", "flatten it onto a background first")
    if image.width < width or image.height < height:
        raise PfgenError(f"{name}: {image.width}x{image.height} (width x height) is smaller than the {width}x{height} video",
                         "give a larger image, or lower --height/--width")
    return _cover_crop(image.convert("RGB"), height, width)


def _cover_crop(image, height: int, width: int) -> np.ndarray:
    from PIL import Image

    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    pixels = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32)
    return pixels / 127.5 - 1.0


def encode_image(vae, pixels: np.ndarray, batch: int, device, dtype):
    """(H, W, 3) in [-1, 1] -> (batch, C, 1, h, w) normalised latent: the VAE posterior's mean,
    (mu - latents_mean) / latents_std, as the reference's `encode_to_latent`."""
    import torch

    vae_dtype = next(vae.parameters()).dtype
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None, :, None].to(device, vae_dtype)
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mean
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=device).view(1, -1, 1, 1, 1)
    return ((mu.float() - mean) / std).to(dtype).expand(batch, -1, -1, -1, -1).contiguous()
