"""Train the world model from scratch on 2 CPU cores: VAE, then latents, then DiT + text encoder.

    python scripts/train_world.py --out runs/world            # the shipped weights, ~180 min (resumable)
    python scripts/train_world.py --out /tmp/w --smoke        # every stage for a few steps (CI)

Stages, each resumable from checkpoints written every few minutes into --out:
1. vae:     AutoencoderKLWan, He-initialised; single frames first, then 13-frame clips, then 13-frame
            clips half of them randomly recoloured (colours beyond the training scenes'), then (--object-steps,
            off by default: the crops below took its place in the shipped recipe) the same with object pixels
            weighted 20x (without any object weight the objects came back as grey-blue smudges that the scorer
            found in 0 % of frames), then the same on 32x32 crops centred on an object (--crop-steps; 12 crops
            of 13 frames a step: the pixels of 2 whole clips, most of them object and edge; whole frames teach
            it to draw every object as a disc), then the decoder alone on unrecoloured whole clips, still
            weighted (the encoder frozen: the latent space is fixed from here); loss L1 + MSE + a small KL.
            Its convolutions are frame-wise (the taps on earlier frames are zero; only the temporal
            resampling mixes frames), which keeps its temporal reach to a few latent frames: a VAE with full
            causal kernels, trained on short clips, breaks down past the clip length it was trained on. That
            also lets training run whole clips in one pass (make_framewise). The latent statistics are
            measured afterwards and stored in the VAE config (latents_mean / latents_std), as the real Wan
            VAE does.
2. latents: a fixed pool of training clips (prompt, seed) encoded once (posterior means, normalised).
3. dit:     WanTransformer3DModel + a umT5 encoder on byte tokens. First the first chunk alone (no history:
            the prompt is all the model has) at batch 16, then chunk-causal flow matching under the
            inference attention pattern: the sequence is [clean context | noisy chunks]; each noisy chunk
            sees its own frames and the clean frames of earlier chunks, each clean chunk the clean frames up to
            itself, all through the rolling cache's mask (sink 3 + window 21, chunk 3) on clips longer than
            the window. Per-chunk noise levels are independent (diffusion forcing), the clean context is
            lightly re-noised (the model learns to live with its own imperfect history), and both copies
            share temporal RoPE positions, exactly as cached frames are read at inference. (No weighting
            by content here: a weight that depends on the target biases the learnt mean. Tried with objects
            at 8x, the first chunk became object colours smeared over the whole frame.) After the prompt
            phase three steps in four are first-chunk steps. Whole clips (--dit-steps) are off by default:
            the shipped run went from the prompt phase to windows. Last, the window phase: 9-latent-frame windows
            (--window) at batch 4, every chunk a target (a third of a whole clip's tokens per sample; after 6000 steps
            on whole clips the model still lost the objects, from the first chunk and from clean history
            alike). dit_probe logs how often the objects come out of pure noise, with and without history,
            every 1000 steps and at the end. The cross-attention runs over the prompts' tokens and one zero
            token that stands for pfgen's padding to 512 (PaddedCrossAttention: the same function, 1.6x faster
            steps).
`--vae-space 4` trains a variant with 4x spatial compression (latents 16x24) and a 4x4 DiT patch, so the DiT
still sees 24 tokens a frame (pfgen.world.model.ARCHITECTURES); the shipped model is the default, 8.
The result is a diffusers folder (transformer/, vae/, text_encoder/, tokenizer/) that loads through the
ordinary real-weights path (`--checkpoint DIR/transformer --wan-dir DIR`). A log of losses and evaluation
figures goes to --out/log.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from pfgen.config import RollingConfig
from pfgen.frames import video_frames_for
from pfgen.rope import apply_rope, complex_table
from pfgen.video import to_uint8_frames
from pfgen.wan.vae_forward import use_fast_rms_norm
from pfgen.world.grammar import parse, sample_scene
from pfgen.world.render import WorldVideo
from pfgen.world.score import score_frames
from pfgen.world.model import ARCHITECTURES, HEIGHT, WIDTH, WORLD_TEXT

FRAMES_PER_CHUNK = 3
CLIP_LATENTS = 27  # 9 chunks: longer than the 21-frame window, so training sees the rolling cache evict
CHECKPOINT_SECONDS = 300
TARGET_CHUNKS = 5  # noisy chunks per clip and step on whole clips (each costs a chunk of tokens)
WINDOW = 9  # latent frames (3 chunks) of the window phase's samples (--window): ~1/3 of a whole clip's tokens
PROBE_LATENTS = 9  # dit_probe's clips
WINDOW_BATCH = 4
# After the prompt phase, FIRST_CHUNK_SHARE[0] of every FIRST_CHUNK_SHARE[1] steps train the first chunk alone
# (batch 16): that chunk is where objects must appear from pure noise, and a first-chunk sample costs ~1/12 of a
# sample with history. At 1 in 2 the first chunk was under-trained: 30 min more at 3 in 4 (after 30 min of first
# chunks alone) took the object's colour blob from 33 % to 65 % of first-chunk frames, continuation unharmed.
FIRST_CHUNK_SHARE = (3, 4)
SIGMA_SHIFT = 3.0  # the warp of sample_sigmas' uniform half
PROBE_EVERY = 1000  # DiT steps between dit_probe's figures in the log
OBJECT_WEIGHT = 20.0  # loss weight of object pixels in the VAE's object phase (objects are ~3 % of pixels)
CROP = 32  # px, the side of the crop phase's object-centred crops
CROP_JITTER = 4  # px, the most a crop's centre strays from its objects'


class Run:
    """Settings of one training run; --smoke shrinks every stage to a few steps."""

    def __init__(self, args):
        self.out, self.seed, self.smoke = Path(args.out), args.seed, args.smoke
        self.vae_steps = 6 if args.smoke else args.vae_steps
        self.recolour_steps = 4 if args.smoke else args.recolour_steps
        self.object_steps = 4 if args.smoke else args.object_steps
        self.crop_steps = 4 if args.smoke else args.crop_steps
        self.decoder_steps = 4 if args.smoke else args.decoder_steps
        self.pool = 4 if args.smoke else args.pool
        self.clip_latents = 9 if args.smoke else CLIP_LATENTS
        self.text_steps = 4 if args.smoke else args.text_steps
        self.text_batch = 2 if args.smoke else 16
        self.dit_steps = 6 if args.smoke else args.dit_steps
        self.dit_batch = 2 if args.smoke else args.dit_batch
        self.window_steps = 4 if args.smoke else args.window_steps
        self.window_batch = 2 if args.smoke else WINDOW_BATCH
        self.window = min(args.window, self.clip_latents)
        self.log_path = self.out / "log.jsonl"
        self.seconds: dict[str, float] = {}  # each stage's time across resumes, for the closing log line
        self.vae_config, self.transformer_config = ARCHITECTURES[args.vae_space]

    def log(self, **row) -> None:
        row["time"] = round(time.time(), 1)
        print(json.dumps(row), flush=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rng(self, *key: int) -> np.random.Generator:
        """A generator for one step of one stage: data is a pure function of (seed, stage, step)."""
        return np.random.default_rng([self.seed, *key])


def world_clip(rng, frames: int, held_out: bool = False) -> tuple[np.ndarray, str, np.ndarray]:
    """A random scene from video frame 0: (3, frames, H, W) float32 in [-1, 1], its prompt, and where its
    objects are ((frames, H, W) bool)."""
    scene = sample_scene(rng, held_out=held_out)
    world = WorldVideo(scene, int(rng.integers(1 << 31)), HEIGHT, WIDTH)
    video = world.frames(0, frames)
    return video.transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1.0, scene.prompt, on_objects(world, video)


def on_objects(world: WorldVideo, video: np.ndarray) -> np.ndarray:
    """(T, H, W) bool: the pixels of a rendered (T, H, W, 3) video that differ from its background."""
    return np.abs(video.astype(np.float32) - world.background).max(-1) > 8.0


class StageClock:
    """A stage's time across resumes: the seconds its checkpoint carried plus this process's."""

    def __init__(self, carried: float = 0.0):
        self.carried, self.since = carried, time.time()

    def __call__(self) -> float:
        return self.carried + time.time() - self.since


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ---- stage 1: VAE -------------------------------------------------------------------------------------------

def vae_phase(run: Run, step: int) -> tuple[int, int, int, int]:
    """(clips, frames, height, width) of a VAE step: single frames first (the spatial code, cheaply), then
    13-frame clips (4 latent frames: the temporal resampling in its steady state); object-centred crops in the
    crop phase."""
    if step / run.vae_steps < 0.3:
        return 12, 1, HEIGHT, WIDTH
    if in_crop_phase(run, step):
        return 12, 13, CROP, CROP
    return 2, 13, HEIGHT, WIDTH


def recolour(rng, clip: np.ndarray) -> np.ndarray:
    """A random affine recolouring of a (3, T, H, W) clip in [-1, 1]: channels permuted, scaled by 0.6-1.2 and
    shifted by up to 0.3. The recolouring phase teaches the VAE colours beyond the training scenes' (the
    held-out striped brown background's lighter stripe is a colour no training scene has)."""
    gain = rng.uniform(0.6, 1.2, (3, 1, 1, 1))
    shift = rng.uniform(-0.3, 0.3, (3, 1, 1, 1))
    return np.clip(clip[rng.permutation(3)] * gain + shift, -1.0, 1.0)


def object_crop(rng, objects: np.ndarray, size: int) -> tuple[int, int]:
    """The top-left corner of a size x size crop centred (within CROP_JITTER px) on the objects of the middle
    frame of a (T, H, W) mask, kept inside the frame; the frame's centre when no object is there."""
    ys, xs = np.nonzero(objects[len(objects) // 2])
    cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (HEIGHT // 2, WIDTH // 2)
    jy, jx = rng.integers(-CROP_JITTER, CROP_JITTER + 1, size=2)
    return int(np.clip(cy - size // 2 + jy, 0, HEIGHT - size)), int(np.clip(cx - size // 2 + jx, 0, WIDTH - size))


def vae_batch(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips (B, 3, T, H, W) and their per-pixel loss weights (B, 1, T, H, W): 1, and OBJECT_WEIGHT on the
    objects from the object phase on."""
    rng = run.rng(1, step)
    count, frames, h, w = vae_phase(run, step)
    recolour_from, objects_from, _, decoder_from = vae_phase_starts(run)
    clips, weights = [], []
    for _ in range(count):
        scene = sample_scene(rng)
        start = int(rng.integers(0, 64))
        world = WorldVideo(scene, int(rng.integers(1 << 31)), HEIGHT, WIDTH)
        video = world.frames(start, frames)
        objects = on_objects(world, video)
        if in_crop_phase(run, step):
            y, x = object_crop(rng, objects, h)
        else:
            y, x = int(rng.integers(0, HEIGHT - h + 1)), int(rng.integers(0, WIDTH - w + 1))
        clip = video[:, y:y + h, x:x + w].transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1.0
        clips.append(recolour(rng, clip) if recolour_from <= step < decoder_from and rng.random() < 0.5 else clip)
        weight = 1.0 + (OBJECT_WEIGHT - 1.0) * objects if step >= objects_from else 1.0
        weights.append(np.broadcast_to(weight, video.shape[:3])[None, :, y:y + h, x:x + w])
    return torch.from_numpy(np.stack(clips).astype(np.float32)), torch.from_numpy(np.stack(weights).astype(np.float32))


def encode_clip(vae, x: torch.Tensor) -> DiagonalGaussianDistribution:
    """`vae.encode(x).latent_dist` of whole clips in one pass (make_framewise's forward; see resample_clip)."""
    return DiagonalGaussianDistribution(vae.quant_conv(vae.encoder(x.contiguous(memory_format=torch.channels_last_3d))))


def decode_clip(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z)` of whole clips in one pass, without its final clamp to [-1, 1], which would zero the
    gradient of every saturated pixel."""
    return vae.decoder(vae.post_quant_conv(z.contiguous(memory_format=torch.channels_last_3d)))


def framewise_forward(conv, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """A causal 3D convolution whose taps on earlier frames are zero, as a 2D convolution of every frame: the
    same output as diffusers' forward (which pads and convolves all three taps), ~3x cheaper to train (and a
    (1, 3, 3) conv3d is another ~5x slower than conv2d on the CPU)."""
    pad_w, _, pad_h, _, _, _ = conv._padding
    return per_frame(lambda frames: F.conv2d(frames, conv.weight[:, :, -1], conv.bias, conv.stride[1:],
                                             padding=(pad_h, pad_w)), x)


def per_frame(image_op, x: torch.Tensor) -> torch.Tensor:
    """A 2D operation (N, C, H, W) -> (N, C', H', W') applied to every frame of (B, C, T, H, W)."""
    b, c, t, h, w = x.shape
    y = image_op(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


def resample_clip(resample, x: torch.Tensor, feat_cache=None, feat_idx=None) -> torch.Tensor:
    """WanResample over a whole clip at once when no feat_cache is given; with one, diffusers' own forward.

    Diffusers runs the encoder on the first frame, then on 4 frames at a time, and the decoder one latent frame
    at a time, with each temporal convolution carrying its last input frames between the calls. In the first
    call the temporal convolution is skipped. After that, downsampling convolves (last frame before, 4 frames)
    with stride 2 and no padding: the windows at frames 0, 2, 4... of the whole clip. Upsampling pads its first
    later call with zeros and carries the 2 frames before in every further one: a causal convolution, zero
    padded, over every frame but the first. So the whole clip at once is: the first frame as it is, then the
    temporal convolution over the clip (down) or over the clip without its first frame (up)."""
    if feat_cache is not None:
        return WanResample.forward(resample, x, feat_cache, feat_idx)
    b, c, t, h, w = x.shape
    if resample.mode == "upsample3d" and t > 1:
        later = resample.time_conv(x[:, :, 1:]).reshape(b, 2, c, t - 1, h, w)
        later = later.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * (t - 1), h, w)  # the two outputs interleaved
        x = torch.cat([x[:, :, :1], later], dim=2)
    x = per_frame(resample.resample, x)
    if resample.mode == "downsample3d" and x.shape[2] > 1:
        x = torch.cat([x[:, :, :1], resample.time_conv(x)], dim=2)
    return x


def init_vae(vae):
    """He-normal convolutions and zero biases. With PyTorch's default initialisation the signal fades through
    the VAE's ~30 convolutions while the biases and the zero padding stay: at the decoder's output, the
    variation across clips is 4 % of the variation within one (measured on 16 world frames), so training
    first sits for hundreds of steps on the mean picture. Initialised like this the signal keeps ~50 %, and
    overfitting 8 frames reaches 32 dB in 300 steps instead of 22 dB."""
    with torch.no_grad():
        for conv in vae.modules():
            if isinstance(conv, torch.nn.Conv3d):
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                if conv.bias is not None:
                    conv.bias.zero_()
    return vae


def make_framewise(vae):
    """Zero the earlier-frame taps of every temporal-kernel convolution but the resampling ones (time_conv),
    and train only the current-frame tap. The exported weights run unchanged in diffusers' own forward. Also
    the training forward's speed-ups, the same functions as diffusers': encode_clip / decode_clip run whole
    clips through resample_clip, and pfgen's CPU rms_norm (pfgen.wan.vae_forward); together with the 2D
    convolutions a VAE step is ~2.5x faster than through diffusers' chunked forward (0.66 -> 0.25 s for 2 clips
    of 13 frames, 2 threads)."""
    for name, module in vae.named_modules():
        if isinstance(module, WanCausalConv3d) and module.kernel_size[0] == 3 and "time_conv" not in name:
            with torch.no_grad():
                module.weight[:, :, :-1] = 0
            module.forward = types.MethodType(framewise_forward, module)
        elif isinstance(module, WanResample):
            module.forward = types.MethodType(resample_clip, module)
    return use_fast_rms_norm(vae)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@torch.no_grad()
def vae_heldout(vae, run: Run, clips: int = 8, frames: int = 33) -> dict:
    """Reconstruction PSNR on held-out clips (held-out scenes, unseen seeds), full size, and the share of
    (frame, object) pairs that the world scorer finds in the reconstructions."""
    rng = run.rng(9, 0)
    scores, present = [], []
    for _ in range(clips):
        clip, prompt, _ = world_clip(rng, frames, held_out=True)
        x = torch.from_numpy(clip)[None]
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        scores.append(psnr(y, x))
        present.append(score_frames(to_uint8_frames(y[0]), parse(prompt)).present.mean())
    return {"heldout_psnr_db": round(float(np.mean(scores)), 2),
            "heldout_objects_found": round(float(np.mean(present)), 3)}


def vae_phase_starts(run: Run) -> tuple[int, int, int, int]:
    """The steps where the recolouring, object, crop and decoder phases begin (each with a fresh optimiser)."""
    objects = run.vae_steps + run.recolour_steps
    crops = objects + run.object_steps
    return run.vae_steps, objects, crops, crops + run.crop_steps


def in_crop_phase(run: Run, step: int) -> bool:
    _, _, crops, decoder = vae_phase_starts(run)
    return crops <= step < decoder


def freeze_encoder(vae) -> None:
    """The decoder phase trains the decoder alone: the latent space (and so the DiT's data) stays as it is."""
    for part in (vae.encoder, vae.quant_conv):
        part.requires_grad_(False)


def vae_lr(run: Run, step: int) -> float:
    """Warm-up and cosine decay, peak 1e-3; the recolouring, object, crop and decoder phases restart at 3e-4."""
    recolour, objects, crops, decoder = vae_phase_starts(run)
    if step < recolour:
        peak, warm, at, length = 1e-3, 50, step, run.vae_steps
    elif step < objects:
        peak, warm, at, length = 3e-4, 20, step - recolour, run.recolour_steps
    elif step < crops:
        peak, warm, at, length = 3e-4, 20, step - objects, run.object_steps
    elif step < decoder:
        peak, warm, at, length = 3e-4, 20, step - crops, run.crop_steps
    else:
        peak, warm, at, length = 3e-4, 20, step - decoder, run.decoder_steps
    return peak * min(1.0, (at + 1) / warm) * 0.5 * (1 + math.cos(math.pi * at / length)) + 2e-5


def train_vae(run: Run):
    from diffusers import AutoencoderKLWan

    final = run.out / "vae.pt"
    torch.manual_seed(run.seed)
    vae = make_framewise(init_vae(AutoencoderKLWan(**run.vae_config)))
    if final.exists():
        data = torch.load(final)
        vae.load_state_dict(data["vae"])
        run.seconds["vae"] = data["seconds"]
        return vae.eval()

    def optimiser():
        trainable = [p for p in vae.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99))

    step, ckpt = 0, run.out / "ckpt-vae.pt"
    decoder_from = vae_phase_starts(run)[3]
    state = torch.load(ckpt) if ckpt.exists() else None
    if state is not None:
        vae.load_state_dict(state["vae"])
        step = state["step"]
    if step >= decoder_from:
        freeze_encoder(vae)
    opt = optimiser()
    if state is not None:
        opt.load_state_dict(state["opt"])
    clock, last = StageClock(state["seconds"] if state else 0.0), time.time()
    while step < decoder_from + run.decoder_steps:
        if step in vae_phase_starts(run):
            if step == decoder_from:
                freeze_encoder(vae)
            opt = optimiser()
        for group in opt.param_groups:
            group["lr"] = vae_lr(run, step)
        x, weight = vae_batch(run, step)
        with torch.set_grad_enabled(step < decoder_from):
            posterior = encode_clip(vae, x)
        # The posterior mean, not a sample: the DiT stage encodes with the mean too, and early sampling noise
        # (unit variance at initialisation) would drown the reconstruction signal. The KL term keeps the
        # latents' scale in check.
        y = decode_clip(vae, posterior.mode())
        error = (y - x).abs() + (y - x) ** 2  # L1 + MSE, weighted (the weights' mean scaled to 1)
        loss = (weight * error).mean() / weight.mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or run.smoke:
            run.log(stage="vae", step=step, loss=round(loss.item(), 5), psnr_db=round(psnr(y.detach(), x), 2),
                    shape=list(x.shape[2:]))
        if step % 500 == 0 and not run.smoke:
            run.log(stage="vae", step=step, **vae_heldout(vae.eval(), run))
            vae.train()
        if time.time() - last > CHECKPOINT_SECONDS:
            save_checkpoint(ckpt, vae=vae.state_dict(), opt=opt.state_dict(), step=step, seconds=clock())
            last = time.time()
    vae.eval()
    run.log(stage="vae", step=step, **vae_heldout(vae, run, 2 if run.smoke else 8))
    run.seconds["vae"] = clock()
    save_checkpoint(final, vae=vae.state_dict(), seconds=run.seconds["vae"])
    ckpt.unlink(missing_ok=True)
    return vae


# ---- stage 2: latents ---------------------------------------------------------------------------------------

@torch.no_grad()
def encode_pool(vae, run: Run) -> tuple[torch.Tensor, list[str]]:
    """A fixed pool of training clips as raw posterior means (N, 16, T, h, w), and their prompts."""
    path = run.out / "latents.pt"
    if path.exists():
        data = torch.load(path)
        run.seconds["latents"] = data["seconds"]
        return data["latents"], data["prompts"]
    clock = StageClock()
    frames = video_frames_for(run.clip_latents)
    latents, prompts = [], []
    for i in range(run.pool):
        clip, prompt, _ = world_clip(run.rng(2, i), frames)
        latents.append(encode_clip(vae, torch.from_numpy(clip)[None]).mode()[0].contiguous())
        prompts.append(prompt)
        if (i + 1) % 100 == 0:
            run.log(stage="latents", clips=i + 1)
    run.seconds["latents"] = clock()
    data = {"latents": torch.stack(latents), "prompts": prompts, "seconds": run.seconds["latents"]}
    save_checkpoint(path, **data)
    return data["latents"], prompts


# ---- stage 3: DiT + text encoder ----------------------------------------------------------------------------

def heads(attn, queries: torch.Tensor, keys: torch.Tensor):
    """q, k, v of a WanAttention, normalised, as (B, L, heads, head_dim)."""
    q = attn.norm_q(attn.to_q(queries)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(keys)).unflatten(2, (attn.heads, -1))
    return q, k, attn.to_v(keys).unflatten(2, (attn.heads, -1))


def attend(attn, q, k, v, mask) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return attn.to_out[0](out.transpose(1, 2).flatten(2))


class MaskedSelfAttention:
    """attn1 with RoPE and a boolean attention mask shared by all layers (set per batch shape)."""

    mask: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = heads(attn, hidden_states, hidden_states)
        table = complex_table(*rotary_emb)  # pfgen's own rotation of diffusers' (cos, sin)
        return attend(attn, apply_rope(q, table), apply_rope(k, table), v, MaskedSelfAttention.mask)


class PaddedCrossAttention:
    """attn2 over the prompts' tokens and one zero token that stands for the rest of pfgen's padding to
    TEXT_TOKENS. The padding tokens are all zero vectors, so their keys and values are all equal, and attending
    to n equal keys is attending to one whose logit is raised by log(n): the function pfgen runs with 512
    tokens, without projecting ~480 padding tokens to keys and values in every layer of every step."""

    bias: torch.Tensor | None = None  # (1, L + 1) logit offsets of the keys, set by encode_text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = heads(attn, hidden_states, encoder_hidden_states)
        return attend(attn, q, k, v, PaddedCrossAttention.bias.to(q.dtype))


class TargetRoPE(torch.nn.Module):
    """RoPE for [clean clip | noisy target frames]: the noisy copies take their own frames' positions."""

    targets: torch.Tensor | None = None  # frame index of each noisy frame, set per batch

    def __init__(self, rope):
        super().__init__()
        self.rope = rope

    def forward(self, hidden_states):
        frames = hidden_states.shape[2] - len(self.targets)
        cos, sin = self.rope(hidden_states[:, :, :frames])
        tokens = cos.shape[1] // frames
        rows = (self.targets[:, None] * tokens + torch.arange(tokens)).flatten()
        return torch.cat([cos, cos[:, rows]], dim=1), torch.cat([sin, sin[:, rows]], dim=1)


def training_attention(transformer) -> None:
    """The training forward: attn1 under MaskedSelfAttention's mask with TargetRoPE's positions, attn2 over
    encode_text's short prompt embedding (PaddedCrossAttention)."""
    for block in transformer.blocks:
        block.attn1.set_processor(MaskedSelfAttention())
        block.attn2.set_processor(PaddedCrossAttention())
    transformer.rope = TargetRoPE(transformer.rope)


def rolling_mask(frames: int, targets: torch.Tensor, tokens: int) -> torch.Tensor:
    """Boolean token mask of [clean clip | noisy target frames] under the rolling cache (sink + window).

    A clean frame sees the clean frames of its chunk and of earlier chunks; a noisy frame sees the clean
    frames of earlier chunks and the noisy frames of its own chunk; both only within the cache."""
    rolling = RollingConfig()
    clean = torch.arange(frames)
    query = torch.cat([clean, targets])
    chunk_q, chunk_k = query // FRAMES_PER_CHUNK, clean // FRAMES_PER_CHUNK
    last = chunk_q * FRAMES_PER_CHUNK + FRAMES_PER_CHUNK - 1
    in_cache = (clean[None, :] < rolling.sink) | (clean[None, :] > last[:, None] - (rolling.window - rolling.sink))
    is_noisy = (torch.arange(len(query)) >= frames)[:, None]
    to_clean = in_cache & ((chunk_k[None, :] < chunk_q[:, None]) | (~is_noisy & (chunk_k[None, :] == chunk_q[:, None])))
    target_chunk = targets // FRAMES_PER_CHUNK
    to_noisy = is_noisy & (target_chunk[None, :] == chunk_q[:, None])
    frame_mask = torch.cat([to_clean, to_noisy], dim=1)
    return frame_mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


def tokens_per_frame(transformer, h: int, w: int) -> int:
    """The DiT's tokens per latent frame of h x w latents."""
    _, ph, pw = transformer.config.patch_size
    return (h // ph) * (w // pw)


def build_dit(config: dict):
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    transformer = WanTransformer3DModel(**config)
    text = UMT5EncoderModel(UMT5Config(**WORLD_TEXT, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return transformer, text


def encode_text(text, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, L + 1, d): pfgen's PromptEncoder output up to the longest prompt's L tokens, then one zero token for
    its remaining TEXT_TOKENS - L zero tokens (PaddedCrossAttention, whose bias this sets, counts it so)."""
    from pfgen.wan.text import TEXT_TOKENS

    ids = tokenizer(prompts, padding="longest", add_special_tokens=True, return_tensors="pt")
    out = text(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    out = out * ids.attention_mask[..., None]
    length = out.shape[1]
    PaddedCrossAttention.bias = F.pad(torch.zeros(1, length, dtype=torch.float64), (0, 1),
                                      value=math.log(TEXT_TOKENS - length))
    return F.pad(out, (0, 0, 0, 1))


def sample_sigmas(rng, batch: int, chunks: int) -> np.ndarray:
    """Per-chunk noise levels (diffusion forcing): half logit-normal around the middle, half uniform warped by
    SIGMA_SHIFT towards high noise, where the picture must come from the history or the prompt (at sigma 0.6
    the model recovers objects it can see; from pure noise it lost them, measured)."""
    u = rng.uniform(0.0, 1.0, (batch, chunks))
    high = SIGMA_SHIFT * u / (1 + (SIGMA_SHIFT - 1) * u)
    logit = 1 / (1 + np.exp(-rng.normal(0.0, 1.0, (batch, chunks))))
    return np.where(rng.random((batch, chunks)) < 0.5, high, logit).clip(1e-3, 1.0)


def dit_loss(transformer, text, tokenizer, latents, prompts, rng, window: int | None = None) -> torch.Tensor:
    """Flow-matching loss on TARGET_CHUNKS chunks of each clip (the first and random others), given the clean
    clip as history; with `window`, on every chunk of a random chunk-aligned window of that many latent frames."""
    if window is not None:
        start = FRAMES_PER_CHUNK * int(rng.integers(0, (latents.shape[2] - window) // FRAMES_PER_CHUNK + 1))
        latents = latents[:, :, start:start + window]
    batch, _, frames, h, w = latents.shape
    # The first chunk is always a target: it is the only one with no history, so the only one whose loss
    # needs the prompt (later chunks can copy the scene from their context). Without it, 900 steps left the
    # prediction for the first chunk the same for every prompt (the mean picture of all scenes).
    count = frames // FRAMES_PER_CHUNK if window is not None else min(TARGET_CHUNKS, frames // FRAMES_PER_CHUNK)
    chunks = np.concatenate([[0], rng.choice(np.arange(1, frames // FRAMES_PER_CHUNK), size=count - 1, replace=False)])
    targets = torch.from_numpy(np.sort(chunks)[:, None] * FRAMES_PER_CHUNK + np.arange(FRAMES_PER_CHUNK)).flatten()
    x0 = latents[:, :, targets]
    sigma = torch.from_numpy(sample_sigmas(rng, batch, count)).float()
    sigma_frames = sigma.repeat_interleave(FRAMES_PER_CHUNK, dim=1)[:, None, :, None, None]
    noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
    noisy = (1 - sigma_frames) * x0 + sigma_frames * noise
    context_sigma = torch.from_numpy(rng.uniform(0.0, 0.08, (batch, 1, 1, 1, 1)).astype(np.float32))
    context_noise = torch.from_numpy(rng.standard_normal(latents.shape).astype(np.float32))
    context = (1 - context_sigma) * latents + context_sigma * context_noise
    tokens = tokens_per_frame(transformer, h, w)
    t_noisy = sigma.repeat_interleave(FRAMES_PER_CHUNK * tokens, dim=1) * 1000.0
    timestep = torch.cat([torch.zeros(batch, frames * tokens), t_noisy], dim=1)
    MaskedSelfAttention.mask = rolling_mask(frames, targets, tokens)
    TargetRoPE.targets = targets
    pred = transformer(torch.cat([context, noisy], dim=2), timestep=timestep,
                       encoder_hidden_states=encode_text(text, tokenizer, prompts), return_dict=False)[0]
    return F.mse_loss(pred[:, :, frames:], noise - x0)


def first_chunk_loss(transformer, text, tokenizer, latents, prompts, rng) -> torch.Tensor:
    """Flow matching on the first chunk alone: no history, the prompt is all the model has. The first DiT steps
    train only this, at batch 16 (a step costs about what a batch-2 step with history does): with history from
    the start, 1900 steps at batch 2 left the model blind to its prompt (the first chunk's prediction the same
    for every prompt), while this learns the prompt in ~250 steps."""
    batch, _, _, h, w = latents.shape
    x0 = latents[:, :, :FRAMES_PER_CHUNK]
    sigma = torch.from_numpy(sample_sigmas(rng, batch, 1)).float()
    noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
    noisy = (1 - sigma.view(batch, 1, 1, 1, 1)) * x0 + sigma.view(batch, 1, 1, 1, 1) * noise
    MaskedSelfAttention.mask, TargetRoPE.targets = None, torch.zeros(0, dtype=torch.long)
    timestep = (sigma * 1000.0).repeat_interleave(FRAMES_PER_CHUNK * tokens_per_frame(transformer, h, w), dim=1)
    pred = transformer(noisy, timestep=timestep, encoder_hidden_states=encode_text(text, tokenizer, prompts),
                       return_dict=False)[0]
    return F.mse_loss(pred, noise - x0)


@torch.no_grad()
def dit_probe(transformer, text, tokenizer, vae, mean, std, run: Run, clips: int = 6, steps: int = 8) -> dict:
    """Does the DiT make objects? On fresh one-object clips of the training split (unseen seeds, 9 latent
    frames), two 8-step Euler ODEs from pure noise: chunk 2 given the clean chunks 0-1 ('continued': the motion
    must come from the history) and chunk 0 alone ('first': it must come from the prompt). Each is the share of
    its decoded frames in which the world scorer finds the object, next to the VAE round trip's share on the
    same frames (the ceiling)."""
    was_training = transformer.training
    transformer.eval(), text.eval()  # the umT5 encoder has dropout
    rng, latents, prompts = run.rng(4, 0), [], []
    while len(prompts) < (2 if run.smoke else clips):
        clip, prompt, _ = world_clip(rng, video_frames_for(PROBE_LATENTS))
        if " and " not in prompt:
            latents.append(vae.encode(torch.from_numpy(clip)[None]).latent_dist.mode()[0])
            prompts.append(prompt)
    x0 = (torch.stack(latents) - mean) / std
    batch, _, frames, h, w = x0.shape
    tokens, embeds, sigmas = tokens_per_frame(transformer, h, w), encode_text(text, tokenizer, prompts), np.linspace(1, 0, steps + 1)

    def sample(history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        MaskedSelfAttention.mask = rolling_mask(history.shape[2], targets, tokens) if history.shape[2] else None
        TargetRoPE.targets = targets
        x = torch.from_numpy(rng.standard_normal((batch, x0.shape[1], FRAMES_PER_CHUNK, h, w)).astype(np.float32))
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            t = torch.cat([torch.zeros(batch, history.shape[2] * tokens),
                           torch.full((batch, x.shape[2] * tokens), a * 1000.0)], 1)
            v = transformer(torch.cat([history, x], 2), timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]
            x = x - float(a - b) * v[:, :, history.shape[2]:]
        return x

    def found(z: torch.Tensor, first: int) -> float:
        video = vae.decode(z * std + mean).sample
        return float(np.mean([score_frames(to_uint8_frames(v)[first:], parse(q)).present.mean()
                              for v, q in zip(video, prompts)]))

    last = torch.arange(frames - FRAMES_PER_CHUNK, frames)
    continued = torch.cat([x0[:, :, :frames - FRAMES_PER_CHUNK], sample(x0, last)], 2)
    first = sample(x0[:, :, :0], torch.zeros(0, dtype=torch.long))
    last_video = video_frames_for(frames - FRAMES_PER_CHUNK)  # the first video frame of the last chunk
    result = {"probe_round_trip": round(found(x0, last_video), 3),
              "probe_continued": round(found(continued, last_video), 3),
              "probe_first_round_trip": round(found(x0[:, :, :FRAMES_PER_CHUNK], 0), 3),
              "probe_first": round(found(first, 0), 3)}
    transformer.train(was_training), text.train(was_training)
    return result


def dit_lr(run: Run, step: int) -> float:
    """Warm-up and cosine from 1e-3 over the prompt and history phases; the window phase restarts at 5e-4 and
    decays to 5e-5."""
    window_from = run.text_steps + run.dit_steps
    if step >= window_from:
        done = (step - window_from) / max(1, run.window_steps)
        return 5e-5 + 0.5 * (5e-4 - 5e-5) * (1 + math.cos(math.pi * done))
    warm = min(1.0, (step + 1) / 50)
    return 1e-3 * warm * (0.5 * (1 + math.cos(math.pi * step / window_from)) * 0.95 + 0.05)


def init_text_path(transformer) -> None:
    """Normal(0, 1/fan_in) weights and zero biases on the text's way in (text projection, cross-attention):
    with PyTorch's default initialisation each of these layers roughly halves the signal, and the prompt's
    share of the residual stream starts near 1e-4 (measured: the prompt is learnt ~1.5x sooner like this)."""
    layers = [transformer.condition_embedder.text_embedder.linear_1, transformer.condition_embedder.text_embedder.linear_2]
    for block in transformer.blocks:
        layers += [block.attn2.to_q, block.attn2.to_k, block.attn2.to_v, block.attn2.to_out[0]]
    with torch.no_grad():
        for layer in layers:
            torch.nn.init.normal_(layer.weight, std=layer.weight.shape[1] ** -0.5)
            layer.bias.zero_()


def train_dit(run: Run, pool: torch.Tensor, prompts: list[str], probe):
    """`probe(transformer, text, tokenizer)` -> figures for the log, every PROBE_EVERY steps and at the end (EMA)."""
    from transformers import ByT5Tokenizer

    torch.manual_seed(run.seed + 1)
    transformer, text = build_dit(run.transformer_config)
    init_text_path(transformer)
    training_attention(transformer)
    tokenizer = ByT5Tokenizer()
    params = list(transformer.parameters()) + list(text.parameters())

    def optimiser():
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))

    opt, ema = optimiser(), [p.detach().clone() for p in params]
    step, ckpt, last, clock = 0, run.out / "ckpt-dit.pt", time.time(), StageClock()
    if ckpt.exists():
        state = torch.load(ckpt)
        transformer.load_state_dict(state["transformer"]), text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        ema, step, clock = state["ema"], state["step"], StageClock(state["seconds"])
    transformer.train(), text.train()
    window_from = run.text_steps + run.dit_steps
    while step < window_from + run.window_steps:
        windowed = step >= window_from
        if step == window_from:  # the window phase starts afresh: optimiser and EMA
            opt, ema = optimiser(), [p.detach().clone() for p in params]
        for group in opt.param_groups:
            group["lr"] = dit_lr(run, step)
        rng = run.rng(3, step)
        first = step < run.text_steps or (step - run.text_steps) % FIRST_CHUNK_SHARE[1] < FIRST_CHUNK_SHARE[0]
        batch = run.text_batch if first else run.window_batch if windowed else run.dit_batch
        pick = rng.choice(len(pool), size=batch, replace=False)
        chosen = pool[pick], [prompts[i] for i in pick], rng
        if first:
            loss = first_chunk_loss(transformer, text, tokenizer, *chosen)
        else:
            loss = dit_loss(transformer, text, tokenizer, *chosen, window=run.window if windowed else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            age = step - window_from if windowed else step
            decay = min(0.995 if windowed else 0.999, (1 + age) / (10 + age))
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        step += 1
        if step % 50 == 0 or run.smoke:
            run.log(stage="dit", step=step, loss=round(loss.item(), 5), lr=round(opt.param_groups[0]["lr"], 6))
        if step % PROBE_EVERY == 0:
            run.log(stage="dit", step=step, **probe(transformer, text, tokenizer))
        if time.time() - last > CHECKPOINT_SECONDS:
            save_checkpoint(ckpt, transformer=transformer.state_dict(), text=text.state_dict(),
                            opt=opt.state_dict(), ema=ema, step=step, seconds=clock())
            last = time.time()
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    run.log(stage="dit", step=step, ema=True, **probe(transformer, text, tokenizer))
    run.seconds["dit"] = clock()
    return transformer.eval(), text.eval(), tokenizer


# ---- the shipped folder -------------------------------------------------------------------------------------

def latent_statistics(pool: torch.Tensor) -> tuple[list[float], list[float]]:
    channels = pool.transpose(0, 1).flatten(1)
    return channels.mean(1).tolist(), channels.std(1).tolist()


def export(run: Run, vae, transformer, text, tokenizer, mean, std) -> Path:
    """The diffusers folder; weights in float16 to halve the size (pfgen casts them to its dtype on load)."""
    import copy

    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    folder = run.out / "world"
    vae.register_to_config(latents_mean=mean, latents_std=std)
    fresh = WanTransformer3DModel(**run.transformer_config)  # default processors and RoPE: a plain diffusers model
    fresh.load_state_dict(transformer.state_dict())
    fresh.half().save_pretrained(folder / "transformer", safe_serialization=True)
    copy.deepcopy(vae).half().save_pretrained(folder / "vae", safe_serialization=True)
    copy.deepcopy(text).half().save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    AutoencoderKLWan.from_pretrained(folder / "vae")  # loads back, or fails here rather than at the user's
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="working folder: checkpoints, log, and the result in OUT/world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="every stage for a few steps")
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--recolour-steps", type=int, default=800, help="VAE steps on recoloured clips, after --vae-steps")
    parser.add_argument("--object-steps", type=int, default=0,
                        help=f"VAE steps with object pixels weighted {OBJECT_WEIGHT:g}x, after --recolour-steps")
    parser.add_argument("--crop-steps", type=int, default=8000,
                        help=f"VAE steps on {CROP}x{CROP} crops centred on an object, after --object-steps")
    parser.add_argument("--decoder-steps", type=int, default=1000,
                        help="VAE steps on the decoder alone (encoder frozen), after --crop-steps")
    parser.add_argument("--pool", type=int, default=500, help="training clips encoded for the DiT stage")
    parser.add_argument("--text-steps", type=int, default=600, help="DiT steps on the first chunk alone, first")
    parser.add_argument("--dit-steps", type=int, default=0,
                        help="DiT steps on whole clips, after --text-steps (the shipped run had none)")
    parser.add_argument("--dit-batch", type=int, default=2)
    parser.add_argument("--window-steps", type=int, default=30000,
                        help=f"DiT steps on --window-latent-frame windows (batch {WINDOW_BATCH}), after --dit-steps")
    parser.add_argument("--window", type=int, default=WINDOW,
                        help=f"latent frames of the window phase's samples, a multiple of {FRAMES_PER_CHUNK} from "
                             f"{2 * FRAMES_PER_CHUNK} to the clips' {CLIP_LATENTS} (training shows no history older than it)")
    parser.add_argument("--vae-space", type=int, choices=sorted(ARCHITECTURES), default=8,
                        help="the VAE's spatial compression: 8 (the shipped model) or 4 (with a 4x4 DiT patch)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.window % FRAMES_PER_CHUNK or not 2 * FRAMES_PER_CHUNK <= args.window <= CLIP_LATENTS:
        parser.error(f"--window {args.window}: give a multiple of {FRAMES_PER_CHUNK} from {2 * FRAMES_PER_CHUNK} to {CLIP_LATENTS}")
    torch.set_num_threads(args.threads)
    run = Run(args)
    run.out.mkdir(parents=True, exist_ok=True)
    vae = train_vae(run).requires_grad_(False)
    raw, prompts = encode_pool(vae, run)
    mean, std = latent_statistics(raw)
    view = (1, -1, 1, 1, 1)
    stats = [torch.tensor(x).view(view) for x in (mean, std)]
    pool = (raw - stats[0]) / stats[1]
    transformer, text, tokenizer = train_dit(run, pool, prompts, lambda *model: dit_probe(*model, vae, *stats, run))
    folder = export(run, vae, transformer, text, tokenizer, mean, std)
    # The stages' time summed across resumes (a resumed run's last process alone would under-report it).
    run.log(stage="done", folder=str(folder), minutes=round(sum(run.seconds.values()) / 60, 1),
            stage_seconds={stage: round(seconds, 1) for stage, seconds in run.seconds.items()})


if __name__ == "__main__":
    main()
