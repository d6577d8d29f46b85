#!/usr/bin/env python
"""pfgen's frame-wise students against the Causal Forcing reference: Causal Forcing++ step lists and I2V.

The reference (github thu-ml/Causal-Forcing, a local checkout given with --reference) runs through its own
`CausalInferencePipeline.inference` with `num_frame_per_block: 1`, `denoising_step_list` [1000, 500] (2-step)
or [1000] (1-step) and `denoising_step_list_first_chunk` [1000, 750, 500, 250], warped with shift 5, as its
`configs/causal_forcing_dmd_framewise_{2,1}step.yaml`. With --i2v it gets an `initial_latent` (one frame),
which it commits at t = 0 before generating frames 1...; pfgen gets the same latent as `image=`. The model,
weights, shims and noise replay are those of `compare_reference.py` (imported from it): same seeded weights
loaded into pfgen through its `.pt` path, the reference's re-noise draws replayed. Compared: x0 of every noisy
pass, in order, and the final latents.

    python scripts/compare_causal_forcing.py --reference /path/to/Causal-Forcing --steps 2 [--i2v] [--json f.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compare_reference as cr  # noqa: E402

FIRST = [1000, 750, 500, 250]
LATER = {2: [1000, 500], 1: [1000]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="checkout of the Causal Forcing repository")
    ap.add_argument("--steps", type=int, choices=(1, 2), default=2)
    ap.add_argument("--frames", type=int, default=24, help="latent frames (> 21 runs past the rolling window)")
    ap.add_argument("--i2v", action="store_true", help="frame 0 is a given latent (image-to-video)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--window", type=int, default=21)
    ap.add_argument("--sink", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-seed", type=int, default=1234)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def run_reference(args, shape, embeds, noise, image):
    """(x0 of every noisy pass in order, re-noise draws, returned latents, fp32 weights, noisy/clean pass counts)."""
    pipe, checkpoint = cr.build_reference(args, shape, embeds, torch.device("cpu"), torch.float32,
                                          denoising_step_list=LATER[args.steps],
                                          denoising_step_list_first_chunk=FIRST, num_frame_per_block=1)
    x0s, eps, clean = [], [], [0]
    forward, add_noise = pipe.generator.forward, pipe.scheduler.add_noise

    def recorded_forward(*a, **kw):
        flow, x0 = forward(*a, **kw)
        if bool((kw["timestep"] == 0).all()):
            clean[0] += 1
        else:
            x0s.append(x0.permute(0, 2, 1, 3, 4).detach().clone())
        return flow, x0

    def recorded_add_noise(samples, noise_, timestep):
        eps.append(noise_.detach().clone())
        return add_noise(samples, noise_, timestep)

    pipe.generator.forward, pipe.scheduler.add_noise = recorded_forward, recorded_add_noise
    torch.manual_seed(args.seed + 1)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _, latents = pipe.inference(noise=noise, text_prompts=["<embeddings given>"], return_latents=True,
                                    initial_latent=None if image is None else image.permute(0, 2, 1, 3, 4))
    return x0s, eps, latents.permute(0, 2, 1, 3, 4), checkpoint, (len(x0s), clean[0])


def run_pfgen(args, shape, path, noise, embeds, eps, image):
    import pfgen.pipeline as pipeline_mod
    from pfgen.config import ModelConfig, RollingConfig, load_config, with_overrides
    from pfgen.sampling import NoiseSource
    from pfgen.wan.checkpoint import load_transformer

    class ReplayNoise(NoiseSource):
        def renoise(self, frames: int) -> torch.Tensor:
            return eps.pop(0).unflatten(0, (-1, frames)).permute(0, 2, 1, 3, 4)

    cfg = with_overrides(load_config(), sampling=dict(
        frames_per_chunk=1, timesteps=tuple(map(float, LATER[args.steps])), first_chunk_timesteps=tuple(
            map(float, FIRST)), shift=5.0, warp=True, context_timestep=0.0),
        cache=dict(policy="rolling", backend=args.backend, rolling=RollingConfig(window=args.window, sink=args.sink)))
    transformer = load_transformer(ModelConfig(checkpoint=str(path), ema=True, num_heads=cr.WAN_1_3B["heads"]),
                                   torch.float32)
    pipe = pipeline_mod.Pipeline(transformer, None, None, cfg, torch.device("cpu"), torch.float32)
    latents = noise.permute(0, 2, 1, 3, 4)  # (B, C, F, h, w); I2V: frame 0 is a placeholder for the image
    if image is not None:
        latents = torch.cat([torch.zeros_like(latents[:, :, :1]), latents], 2)
    replay = ReplayNoise((1, 16, *latents.shape[3:]), torch.device("cpu"), torch.float32, None, latents)
    x0s = []
    calls = [0]
    forward = transformer.forward

    def counted(*a, **kw):
        calls[0] += 1
        return forward(*a, **kw)

    transformer.forward = counted
    chunks = list(pipe.stream(prompt_embeds=embeds, latents=latents, height=shape["height"], width=shape["width"],
                              decode=False, noise=replay, image=image, commit_last=True,
                              on_step=lambda c, s, x: x0s.append(x.detach().clone())))
    assert not eps, f"{len(eps)} recorded re-noise draws were not used"
    return x0s, torch.cat([c.latents for c in chunks], 2), calls[0], chunks[-1].passes_total


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    lat_h, lat_w = args.height // 8, args.width // 8
    shape = dict(layers=args.layers, height=args.height, width=args.width, tokens=(lat_h // 2) * (lat_w // 2))
    g = torch.Generator().manual_seed(args.seed)
    embeds = torch.randn(1, 512, cr.WAN_1_3B["text_dim"], generator=g)
    embeds[:, args.prompt_tokens:] = 0.0
    generated = args.frames - 1 if args.i2v else args.frames
    noise = torch.randn(1, generated, 16, lat_h, lat_w, generator=g)  # the reference's layout (B, F, C, h, w)
    image = torch.randn(1, 16, 1, lat_h, lat_w, generator=g) if args.i2v else None
    started = time.time()
    ref_x0, eps, ref_latents, checkpoint, ref_passes = run_reference(args, shape, embeds, noise, image)
    ref_seconds = time.time() - started
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "causal_forcing_random.pt"
        torch.save({"generator_ema": checkpoint}, path)
        started = time.time()
        x0, latents, calls, planned = run_pfgen(args, shape, path, noise, embeds, list(eps), image)
        pf_seconds = time.time() - started
    assert len(x0) == len(ref_x0), (len(x0), len(ref_x0))
    rows = [dict(pass_=i, **cr.diff(a, b)) for i, (a, b) in enumerate(zip(x0, ref_x0))]
    final = cr.diff(latents, ref_latents)
    worst = max(rows, key=lambda r: r["max_abs"])
    result = dict(setup=dict(vars(args), tokens_per_frame=shape["tokens"], torch=torch.__version__,
                             reference_seconds=ref_seconds, pfgen_seconds=pf_seconds),
                  noisy_passes=len(rows), reference_passes=dict(noisy=ref_passes[0], clean=ref_passes[1]),
                  pfgen_passes=dict(counted=calls, planned=planned), x0=rows, final_latents=final,
                  worst_x0=worst)
    print(f"{'I2V' if args.i2v else 'T2V'} {args.steps}-step, {args.frames} latent frames, {args.layers} layers, "
          f"{args.height}x{args.width}: {len(rows)} noisy passes; reference {ref_passes[0]} noisy + {ref_passes[1]} "
          f"clean, pfgen {calls} ({planned} planned); x0 worst max {worst['max_abs']:.3e} (pass {worst['pass_']}), "
          f"mean {sum(r['mean_abs'] for r in rows) / len(rows):.3e}; final latents max {final['max_abs']:.3e}; "
          f"reference {ref_seconds:.0f} s, pfgen {pf_seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
