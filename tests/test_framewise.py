"""Frame-wise students: Causal Forcing++ first-chunk steps, DiT pass counts, and image-to-video, against an
independent oracle that re-runs the whole history through a one-shot block-causal forward at every step."""

import numpy as np
import pytest
import torch
from PIL import Image

import pfgen
from clirun import run_cli
from pfgen.config import load_config
from pfgen.errors import PfgenError
from pfgen.frames import dit_passes
from pfgen.image import load_image
from pfgen.memory import plan_memory
from test_wan import block_causal_model

FIRST, LATER = (1000.0, 750.0, 500.0, 250.0), (1000.0, 500.0)
H, W = 32, 48  # latent 4 x 6, 2 x 3 tokens per frame
FRAMES = 14  # latent frames


def framewise_config(tmp_path, later=LATER):
    path = tmp_path / "fw.yaml"
    path.write_text(f"model: {{name: random}}\nsampling: {{frames_per_chunk: 1, timesteps: {list(later)}, "
                    f"first_chunk_timesteps: {list(FIRST)}}}\ncache: {{policy: rolling}}\n"
                    f"video: {{height: {H}, width: {W}}}\n")
    return path


def warped_sigma(t: float) -> float:
    """sigma of nominal step t under shift 5 (warp: row 1000 - t of the float32 table, s = t / 1000)."""
    s = torch.tensor(t / 1000, dtype=torch.float32)
    return float(5 * s / (1 + 4 * s))


def oracle(embeds, frames, generator, image=None):
    """Frame by frame, the reference's loop written plainly: every pass runs the one-shot block-causal model
    over the clean frames so far (t = 0) and the current frame (at its timestep); x0 = x - sigma v (float64);
    re-noise with the next sigma. The video's first generated frame takes FIRST, the others LATER. Returns the
    clean latents and the number of forward passes that the cached run needs (steps + commits + image)."""
    tokens = (H // 16) * (W // 16)
    clean = [] if image is None else [image]
    passes = 0 if image is None else 1
    first = len(clean)
    for i in range(first, frames):
        model = block_causal_model(i + 1, 1, tokens)
        steps = FIRST if i == first else LATER
        x = torch.randn((1, 16, 1, H // 8, W // 8), generator=generator)
        for k, t in enumerate(steps):
            sigma = warped_sigma(t)
            timestep = torch.zeros(1, (i + 1) * tokens)
            timestep[:, i * tokens:] = sigma * 1000
            v = model(torch.cat(clean + [x], 2), timestep, embeds, return_dict=False)[0][:, :, i:]
            x0 = (x.double() - sigma * v.double()).float()
            if k + 1 < len(steps):
                nxt = warped_sigma(steps[k + 1])
                x = (1 - nxt) * x0 + nxt * torch.randn(x.shape, generator=generator)
        clean.append(x0)
        passes += len(steps) + (i + 1 < frames)
    return torch.cat(clean, 2), passes


@pytest.fixture(scope="module")
def framewise(tmp_path_factory):
    return pfgen.load_pipeline(str(framewise_config(tmp_path_factory.mktemp("fw"))))


def count_forwards(pipe):
    calls = [0]
    original = pipe.transformer.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    pipe.transformer.forward = counted
    return calls, lambda: setattr(pipe.transformer, "forward", original)


def test_causal_forcing_pp_steps_equal_the_oracle_and_count_their_passes(framewise):
    torch.manual_seed(0)
    embeds = torch.randn(1, 512, 32)
    calls, restore = count_forwards(framewise)
    try:
        chunks = list(framewise.stream(prompt_embeds=embeds, num_frames=1 + 4 * (FRAMES - 1), decode=False,
                                       generator=torch.Generator().manual_seed(5)))
    finally:
        restore()
    with torch.no_grad():
        expected, passes = oracle(embeds, FRAMES, torch.Generator().manual_seed(5))
    got = torch.cat([c.latents for c in chunks], 2)
    assert got.shape == expected.shape == (1, 16, FRAMES, 4, 6)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert passes == calls[0] == chunks[-1].passes == chunks[-1].passes_total == 4 + 13 * 2 + 13
    assert [c.passes for c in chunks[:3]] == [5, 8, 11]
    plan = plan_memory(framewise.config, 1 + 4 * (FRAMES - 1), device=torch.device("cpu"), dtype=torch.float32)
    assert plan.passes == passes


def test_image_to_video_commits_the_image_and_starts_with_it(framewise, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "first.png"
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
    torch.manual_seed(1)
    embeds = torch.randn(1, 512, 32)
    calls, restore = count_forwards(framewise)
    try:
        chunks = list(framewise.stream(prompt_embeds=embeds, num_frames=1 + 4 * (FRAMES - 1), image=path,
                                       generator=torch.Generator().manual_seed(6)))
    finally:
        restore()
    pixels = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    vae = framewise.vae
    with torch.no_grad():
        mu = vae.encode(pixels[None, :, None]).latent_dist.mean
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        latent = (mu - mean) / std
        decoded = vae.decode(mu).sample.clamp(-1, 1)
        generator = torch.Generator().manual_seed(6)
        expected, passes = oracle(embeds, FRAMES, generator, image=latent)
    assert chunks[0].latents.shape == (1, 16, 1, 4, 6) and chunks[0].frames.shape[2] == 1
    torch.testing.assert_close(chunks[0].latents, latent, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunks[0].frames, decoded, atol=1e-5, rtol=1e-5)  # the video starts with it
    torch.testing.assert_close(torch.cat([c.latents for c in chunks], 2), expected, atol=2e-5, rtol=1e-5)
    assert sum(c.frames.shape[2] for c in chunks) == 1 + 4 * (FRAMES - 1)
    assert passes == calls[0] == chunks[-1].passes_total == 1 + 4 + 12 * 2 + 12
    assert dit_passes(2, 4, FRAMES - 1, image=True) == passes


def test_image_is_resized_to_cover_and_centre_cropped():
    image = np.zeros((H, 3 * W, 3), dtype=np.uint8)  # same height, three times as wide: the middle third is kept
    image[:, W:2 * W] = 200
    image[:, W:W + 1] = 10  # the crop's first column
    pixels = load_image(Image.fromarray(image), H, W)
    assert pixels.shape == (H, W, 3)
    np.testing.assert_array_equal(pixels, image[:, W:2 * W].astype(np.float32) / 127.5 - 1)
    big = np.array(Image.fromarray(image).resize((6 * W, 2 * H), Image.Resampling.LANCZOS))
    np.testing.assert_allclose(load_image(Image.fromarray(big), H, W), np.asarray(
        Image.fromarray(big).resize((3 * W, H), Image.Resampling.LANCZOS), dtype=np.float32)[:, W:2 * W] / 127.5 - 1)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not an image"), "cannot read image"),
    (lambda p: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p), "is smaller than the 48x32 video"),
    (lambda p: Image.fromarray(np.zeros((H, W), np.uint16)).save(p), "image mode I;16 is not supported"),
    (lambda p: Image.fromarray(np.zeros((H, W, 4), np.uint8)).save(p), "transparent pixels"),
])
def test_bad_images_are_one_line_errors(make, message, tmp_path, capsys):
    image = tmp_path / "first.png"
    make(image)
    config = framewise_config(tmp_path)
    code, _, err = run_cli(["generate", "--config", config, "--image", image, "-o", tmp_path / "x.mp4"], capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.mp4").exists()


def test_image_is_refused_for_chunk_wise_configs_and_resume(tmp_path, capsys, framewise):
    image = tmp_path / "first.png"
    Image.fromarray(np.zeros((96, 160, 3), np.uint8)).save(image)
    code, _, err = run_cli(["generate", "--image", image, "-o", tmp_path / "x.mp4"], capsys)
    assert code == 1 and "--image is for frame-wise students" in err
    code, _, err = run_cli(["generate", "--config", framewise_config(tmp_path), "--image", image, "--resume",
                            tmp_path / "any.state", "-o", tmp_path / "x.mp4"], capsys)
    assert code == 1 and "cannot be used with --resume" in err
    with pytest.raises(PfgenError, match="image is for frame-wise students"):
        next(pfgen.load_pipeline().stream("a kite", image=image, num_frames=9, height=32, width=48))


def test_causal_forcing_pp_configs():
    for name, later in (("causal-forcing-2step", LATER), ("causal-forcing-1step", (1000.0,))):
        cfg = load_config(name)
        assert cfg.sampling.frames_per_chunk == 1 and cfg.sampling.timesteps == later
        assert cfg.sampling.first_chunk_timesteps == FIRST and cfg.sampling.shift == 5.0 and cfg.model.ema
        assert cfg.model.checkpoint == f"zhuhz22/Causal-Forcing:causal-forcing++/framewise-{name[-5]}step.pt"
