#!/usr/bin/env python
"""pfgen side by side with the public Self Forcing reference: same random weights, same noise, same prompt.

The reference (github guandeh17/Self-Forcing, a local checkout given with --reference) is imported from that
path and run through its own `CausalInferencePipeline.inference`, `WanDiffusionWrapper` and `CausalWanModel`
with a rolling KV cache (`local_attn_size`, `sink_size`). Nothing of it is copied here; the few things that
cannot run without its multi-GB downloads or flash-attn are replaced at import time (listed in SHIMS). pfgen loads
the very same weights through its `.pt` checkpoint path, replays the reference's initial noise and re-noise
draws, and the script compares every step's x0 and, after each chunk's clean pass, the K and V caches of
every compared layer, frame by frame.

    python scripts/compare_reference.py --reference /path/to/Self-Forcing                 # CPU, fp32, 2 layers
    python scripts/compare_reference.py --reference ... --shape full --device cuda --dtype bfloat16

Shapes: both use the 1.3B width (dim 1536, 12 heads x 128, FFN 8960, text 512 x 4096). `cpu`: --layers
(default 2) at 240x416 (latent 30x52, 390 tokens per frame); `full`: 30 layers at 480x832 (1560 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing pfgen

SHAPES = {"cpu": dict(layers=2, height=240, width=416), "full": dict(layers=30, height=480, width=832)}
WAN_1_3B = dict(dim=1536, heads=12, ffn_dim=8960, text_dim=4096, freq_dim=256)
STEPS = [1000, 750, 500, 250]  # Self Forcing's denoising_step_list (warped, shift 5)
SHIMS = (
    "package stubs for wan, wan.modules, pipeline, demo_utils: their __init__.py import T5/CLIP/VAE/CUDA code",
    "stub modules wan.modules.{tokenizers,t5,vae} and demo_utils.memory (names imported but unused here)",
    "einops stub when einops is missing (wan/modules/model.py imports `repeat`, unused at inference)",
    "attention/flash_attention -> torch SDPA, no dtype cast, no masks (flash-attn is CUDA-only and optional)",
    "CausalWanModel.from_pretrained -> CausalWanModel at the chosen shape with seeded random weights",
    "pipeline.num_transformer_blocks / frame_seq_length and each self_attn.max_attention_size set to the "
    "shape (hard-coded for 30 layers x 1560 tokens per frame)",
    "text encoder -> the given prompt embeddings; VAE -> identity (latents are compared)",
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="checkout of the Self Forcing repository")
    ap.add_argument("--shape", choices=SHAPES, default="cpu")
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (default: 2 cpu, 30 full)")
    ap.add_argument("--chunks", type=int, default=10, help="3-frame chunks (>= 8 to pass the 21-frame window)")
    ap.add_argument("--window", type=int, default=21, help="reference local_attn_size = pfgen rolling.window")
    ap.add_argument("--sink", type=int, default=3, help="reference sink_size = pfgen rolling.sink")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--backend", default="auto", help="pfgen attention backend (auto, split, sdpa)")
    ap.add_argument("--kv-layers", default=None,
                    help="comma list of layers whose K/V are compared (default: all on cpu, 0,mid,last on full)")
    ap.add_argument("--prompt-tokens", type=int, default=24, help="non-zero rows of the 512 prompt embeddings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--exact-baseline", action="store_true",
                    help="with bfloat16: also run the reference in float32 on the same (rounded) inputs and "
                         "re-noise draws, and report how far each bfloat16 run is from it")
    ap.add_argument("--json", default=None, help="write every number to this file")
    return ap.parse_args(argv)


# -- the reference, imported from its checkout ------------------------------------------------------------------
def import_reference(path: Path):
    """Import the reference's causal model, wrapper and pipeline without running its package __init__ files."""
    if "pipeline.causal_inference" in sys.modules:
        return tuple(sys.modules[m] for m in ("wan.modules.causal_model", "utils.wan_wrapper",
                                               "pipeline.causal_inference"))
    if not (path / "pipeline" / "causal_inference.py").exists():
        sys.exit(f"error: {path} is not a Self Forcing checkout (no pipeline/causal_inference.py)")
    sys.path.insert(0, str(path))

    def module(name, package_dir=None, **attrs):
        mod = types.ModuleType(name)
        if package_dir is not None:
            mod.__path__ = [str(path / package_dir)]
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    for name in ("wan", "pipeline", "demo_utils"):
        module(name, name)
    module("wan.modules", "wan/modules")
    module("wan.modules.tokenizers", HuggingfaceTokenizer=None)
    module("wan.modules.t5", umt5_xxl=None)
    module("wan.modules.vae", _video_vae=None)
    module("demo_utils.memory", gpu=None, cpu=torch.device("cpu"), get_cuda_free_memory_gb=lambda *_: 1e9,
           DynamicSwapInstaller=None, move_model_to_device_with_memory_preservation=lambda *a, **k: None)
    try:
        import einops  # noqa: F401
    except ImportError:
        module("einops", repeat=None)

    import wan.modules.attention as attention_mod
    import wan.modules.causal_model as causal_model
    import wan.modules.model as model_mod

    attention_mod.attention = attention_mod.flash_attention = sdpa_attention
    causal_model.attention = model_mod.flash_attention = sdpa_attention
    import pipeline.causal_inference as causal_inference
    import utils.wan_wrapper as wan_wrapper

    return causal_model, wan_wrapper, causal_inference


def sdpa_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                   causal=False, window_size=(-1, -1), deterministic=False, dtype=None, version=None, **_):
    """flash_attn_varlen_func without lengths or masks (all the reference's inference calls) as torch SDPA."""
    if q_lens is not None or k_lens is not None or causal or tuple(window_size) != (-1, -1) or dropout_p:
        raise NotImplementedError("the SDPA shim only covers unmasked attention")
    if q_scale is not None:
        q = q * q_scale
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=softmax_scale)
    return out.transpose(1, 2).contiguous().type_as(q)


def randomize_(model, seed: int) -> None:
    """Seeded weights drawn on the CPU (so every device gets the same ones), in named-parameter order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                w = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
            elif p.ndim == 1 and "norm" in name:
                w = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g)
            elif p.ndim == 1:
                w = 0.02 * torch.randn(p.shape, generator=g)
            else:
                w = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
            p.copy_(w)


def build_reference(args, shape, embeds, device, dtype, **sampling):
    """The reference pipeline at the shape with seeded weights, and those weights as a float32 state dict.
    `sampling` replaces entries of its config (e.g. Causal Forcing's frame-wise step lists)."""
    causal_model, wan_wrapper, causal_inference = import_reference(Path(args.reference).expanduser())
    layers, tokens = shape["layers"], shape["tokens"]

    def from_pretrained(cls, _path, local_attn_size=-1, sink_size=0, **_):
        init = cls.init_weights
        cls.init_weights = lambda self: None  # every weight is overwritten below
        try:
            with torch.device(device):
                model = cls(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=WAN_1_3B["dim"],
                            ffn_dim=WAN_1_3B["ffn_dim"], freq_dim=WAN_1_3B["freq_dim"],
                            text_dim=WAN_1_3B["text_dim"], out_dim=16, num_heads=WAN_1_3B["heads"],
                            num_layers=layers, local_attn_size=local_attn_size, sink_size=sink_size,
                            qk_norm=True, cross_attn_norm=True, eps=1e-6)
        finally:
            cls.init_weights = init
        randomize_(model, args.weight_seed)
        return model

    causal_model.CausalWanModel.from_pretrained = classmethod(from_pretrained)
    config = types.SimpleNamespace(**{
        **dict(denoising_step_list=STEPS, warp_denoising_step=True, num_frame_per_block=3,
               independent_first_frame=False, context_noise=0), **sampling,
        "model_kwargs": dict(timestep_shift=5.0, local_attn_size=args.window, sink_size=args.sink)})
    generator = wan_wrapper.WanDiffusionWrapper(**config.model_kwargs, is_causal=True)
    checkpoint = {k: v.detach().to("cpu", torch.float32).clone() for k, v in generator.state_dict().items()}

    class PromptEmbeds(torch.nn.Module):
        def forward(self, text_prompts):
            return {"prompt_embeds": embeds.to(device, dtype)}

    class IdentityVAE(torch.nn.Module):
        def decode_to_pixel(self, latent, use_cache=False):
            return latent

    with contextlib.redirect_stdout(io.StringIO()):
        pipe = causal_inference.CausalInferencePipeline(config, device=device, generator=generator,
                                                        text_encoder=PromptEmbeds(), vae=IdentityVAE())
    pipe.generator.to(device=device, dtype=dtype)  # inference.py: pipeline.to(dtype=torch.bfloat16)
    pipe.num_transformer_blocks, pipe.frame_seq_length = layers, tokens
    for block in generator.model.blocks:
        block.self_attn.max_attention_size = args.window * tokens
    return pipe, checkpoint


class ReferenceRecorder:
    """Wraps the reference's generator and scheduler: x0 of every noisy pass, every re-noise eps, and the K/V
    cache (per compared layer, with the frame each cache row holds) after every clean pass."""

    def __init__(self, pipe, steps: int, frames_per_chunk: int, sink: int, kv_layers, replay=None):
        self.pipe, self.per_chunk, self.sink, self.kv_layers = pipe, frames_per_chunk, sink, kv_layers
        self.x0, self.eps, self.kv = [], [], []
        self.calls = 0
        forward, add_noise = pipe.generator.forward, pipe.scheduler.add_noise

        def recorded_forward(*a, **kw):
            flow, x0 = forward(*a, **kw)
            chunk, step = divmod(self.calls, steps + 1)
            self.calls += 1
            if step < steps:
                self.x0.append(((chunk, step), x0.permute(0, 2, 1, 3, 4).detach().cpu()))
            else:
                self.kv.append(self.snapshot(kw["kv_cache"], chunk))
            return flow, x0

        def recorded_add_noise(samples, noise, timestep):
            if replay is not None:  # use another run's draws instead of this run's randn_like
                noise = replay.pop(0).to(noise)
            self.eps.append(noise.detach().clone())
            return add_noise(samples, noise, timestep)

        pipe.generator.forward = recorded_forward  # nn.Module.__call__ looks the instance attribute up first
        pipe.scheduler.add_noise = recorded_add_noise

    def snapshot(self, kv_cache, chunk: int) -> dict:
        tokens = self.pipe.frame_seq_length
        held = int(kv_cache[0]["local_end_index"]) // tokens
        total = (chunk + 1) * self.per_chunk
        frames = [p if p < self.sink else total - held + p for p in range(held)]
        keep = {layer: (kv_cache[layer]["k"][:, :held * tokens].cpu().clone(),
                        kv_cache[layer]["v"][:, :held * tokens].cpu().clone()) for layer in self.kv_layers}
        return dict(chunk=chunk, frames=frames, layers=keep)


def run_reference(args, shape, embeds, noise, device, dtype, kv_layers, replay=None):
    """One reference inference: (recorder, returned latents, fp32 checkpoint, seconds)."""
    started = time.time()
    pipe, checkpoint = build_reference(args, shape, embeds, device, dtype)
    recorder = ReferenceRecorder(pipe, len(STEPS), 3, args.sink, kv_layers, replay)
    torch.manual_seed(args.seed + 1)  # the reference draws its re-noise eps from the global RNG
    if device.type == "cuda":
        torch.cuda.manual_seed_all(args.seed + 1)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every timestep
        _, latents = pipe.inference(noise=noise.to(device, dtype), text_prompts=["<embeddings given>"],
                                    return_latents=True)
    seconds = time.time() - started
    recorder.pipe = pipe = None  # free the reference model and its cache before the next model loads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return recorder, latents, checkpoint, seconds


# -- pfgen ------------------------------------------------------------------------------------------------------
def run_pfgen(args, shape, checkpoint_path, noise, embeds, eps, device, dtype, ref_kv):
    import pfgen.pipeline as pipeline_mod
    from pfgen.config import ModelConfig, RollingConfig, load_config, with_overrides
    from pfgen.sampling import NoiseSource
    from pfgen.wan.checkpoint import load_transformer

    class ReplayNoise(NoiseSource):
        """Initial noise from the given latents (inherited), re-noise eps replayed in the reference's order."""

        def renoise(self, frames: int) -> torch.Tensor:
            e = eps.pop(0)  # (B*F, C, h, w), as the reference drew it
            return e.unflatten(0, (-1, frames)).permute(0, 2, 1, 3, 4).to(self.device, self.dtype)

    cfg = with_overrides(load_config(), sampling=dict(timesteps=tuple(float(s) for s in STEPS), shift=5.0, warp=True,
                                                      frames_per_chunk=3, context_timestep=0.0),
                         cache=dict(policy="rolling", backend=args.backend,
                                    rolling=RollingConfig(window=args.window, sink=args.sink)))
    model_cfg = ModelConfig(checkpoint=str(checkpoint_path), ema=True, num_heads=WAN_1_3B["heads"])
    transformer = load_transformer(model_cfg, dtype).to(device)
    pipe = pipeline_mod.Pipeline(transformer, None, None, cfg, torch.device(device), dtype)
    x0 = {}
    kv_rows = []
    latents = noise.permute(0, 2, 1, 3, 4)
    replay = ReplayNoise((1, latents.shape[1], *latents.shape[3:]), torch.device(device), dtype, None, latents)
    stream = pipe.stream(prompt_embeds=embeds, latents=latents, height=shape["height"], width=shape["width"],
                         decode=False, policy="rolling", noise=replay,
                         on_step=lambda c, s, x: x0.__setitem__((c, s), x.detach().cpu()))
    for chunk in stream:
        if chunk.index < len(ref_kv) and chunk.index < args.chunks - 1:  # pfgen skips the last clean pass
            kv_rows += compare_kv(pipe.state.cache, ref_kv[chunk.index], shape["tokens"])
    assert not eps, f"{len(eps)} recorded re-noise draws were not used"
    return x0, kv_rows


def compare_kv(cache, ref: dict, tokens: int) -> list[dict]:
    rule = cache.rules["rolling"]
    rows = []
    for layer, (k_ref, v_ref) in ref["layers"].items():
        store = cache.stores[layer]["rolling"]
        slots = [rule._slot(t) for t in ref["frames"]]
        assert all(rule.slots.get(s) == t for s, t in zip(slots, ref["frames"])), "pfgen holds other frames"
        index = torch.cat([torch.arange(s * tokens, (s + 1) * tokens) for s in slots]).to(store.k_abs.device)
        for name, ours, theirs in (("K", store.k_abs, k_ref), ("V", store.v_abs, v_ref)):
            rows.append(dict(chunk=ref["chunk"], layer=layer, tensor=name, frames=frame_ranges(ref["frames"]),
                             **diff(ours.index_select(1, index), theirs)))
    return rows


def frame_ranges(frames) -> str:
    """[0, 1, 2, 6, 7, 8] -> '0-2,6-8'."""
    runs, start = [], frames[0]
    for prev, cur in zip(frames, frames[1:] + [None]):
        if cur is None or cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = cur
    return ",".join(runs)


def diff(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    a, b = ours.detach().cpu().double(), theirs.detach().cpu().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    d = (a - b).abs()
    return dict(max_abs=float(d.max()), mean_abs=float(d.mean()), ref_rms=float(b.pow(2).mean().sqrt()))


# -- driver -----------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":  # float32 runs (and the exact baseline) mean float32 matmuls, not TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    shape = dict(SHAPES[args.shape])
    shape["layers"] = args.layers or shape["layers"]
    lat_h, lat_w = shape["height"] // 8, shape["width"] // 8
    shape["tokens"] = (lat_h // 2) * (lat_w // 2)
    layers = shape["layers"]
    if args.kv_layers:
        kv_layers = sorted({int(x) for x in args.kv_layers.split(",")})
    else:
        kv_layers = list(range(layers)) if args.shape == "cpu" else sorted({0, layers // 2, layers - 1})
    frames = 3 * args.chunks

    g = torch.Generator().manual_seed(args.seed)
    embeds = torch.randn(1, 512, WAN_1_3B["text_dim"], generator=g)
    embeds[:, args.prompt_tokens:] = 0.0
    noise = torch.randn(1, frames, 16, lat_h, lat_w, generator=g).to(device, dtype)  # reference layout (B,F,C,h,w)
    print(f"shape {args.shape}: {layers} layers x 12 heads x 128, {shape['height']}x{shape['width']} "
          f"({shape['tokens']} tokens/frame), {args.chunks} chunks = {frames} frames, rolling window "
          f"{args.window} sink {args.sink}, {args.device} {args.dtype}", flush=True)

    recorder, ref_latents, checkpoint, ref_seconds = run_reference(args, shape, embeds, noise, device, dtype,
                                                                   kv_layers)
    print(f"reference: {len(recorder.x0)} noisy passes, {len(recorder.kv)} clean passes, "
          f"{len(recorder.eps)} re-noise draws, {ref_seconds:.1f} s", flush=True)
    exact = None
    if args.exact_baseline and dtype != torch.float32:
        # the same inputs as the low-precision runs saw (noise, embeddings and eps rounded to dtype), in float32
        base, _, _, seconds = run_reference(args, shape, embeds.to(dtype).float(), noise.float(), device,
                                            torch.float32, [], replay=[e.float() for e in recorder.eps])
        exact = dict(base.x0)
        print(f"reference in float32 (exact baseline): {seconds:.1f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "self_forcing_random.pt"
        torch.save({"generator_ema": checkpoint}, path)  # the Self Forcing format: keys model.<Wan name>
        del checkpoint
        started = time.time()
        x0, kv_rows = run_pfgen(args, shape, path, noise, embeds, list(recorder.eps), device, dtype, recorder.kv)
        pf_seconds = time.time() - started
    print(f"pfgen: {pf_seconds:.1f} s", flush=True)

    ref_x0 = dict(recorder.x0)
    x0_rows = [dict(chunk=c, step=s, **diff(x0[(c, s)], ref_x0[(c, s)])) for c, s in sorted(ref_x0)]
    exact_rows = [dict(chunk=c, step=s, reference=diff(ref_x0[(c, s)], exact[(c, s)]),
                       pfgen=diff(x0[(c, s)], exact[(c, s)])) for c, s in sorted(exact)] if exact else []
    final = diff(torch.cat([x0[(c, len(STEPS) - 1)] for c in range(args.chunks)], dim=2),
                 ref_latents.permute(0, 2, 1, 3, 4))
    result = dict(setup=dict(vars(args), layers=layers, tokens_per_frame=shape["tokens"], height=shape["height"],
                             width=shape["width"], kv_layers=kv_layers, torch=torch.__version__,
                             reference_seconds=ref_seconds, pfgen_seconds=pf_seconds, shims=SHIMS),
                  x0=x0_rows, kv=kv_rows, final_latents=final, x0_vs_float32_reference=exact_rows)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result


def print_report(result: dict) -> None:
    print("\nx0 per chunk and step (pfgen - reference)")
    print(f"{'chunk':>5} {'step':>4} {'max |d|':>10} {'mean |d|':>10} {'ref rms':>8}")
    for r in result["x0"]:
        print(f"{r['chunk']:>5} {r['step']:>4} {r['max_abs']:>10.3e} {r['mean_abs']:>10.3e} {r['ref_rms']:>8.3f}")
    print("\nK/V cache after each clean pass (rows in the reference's order, frames they hold)")
    print(f"{'chunk':>5} {'layer':>5} {'':>2} {'frames':>14} {'max |d|':>10} {'mean |d|':>10} {'ref rms':>8}")
    for r in result["kv"]:
        print(f"{r['chunk']:>5} {r['layer']:>5} {r['tensor']:>2} {r['frames']:>14} {r['max_abs']:>10.3e} "
              f"{r['mean_abs']:>10.3e} {r['ref_rms']:>8.3f}")
    if result["x0_vs_float32_reference"]:
        print("\nx0 against the reference run in float32 on the same inputs (the exact answer)")
        print(f"{'chunk':>5} {'step':>4} {'reference max':>14} {'mean':>10} {'pfgen max':>10} {'mean':>10}")
        for r in result["x0_vs_float32_reference"]:
            a, b = r["reference"], r["pfgen"]
            print(f"{r['chunk']:>5} {r['step']:>4} {a['max_abs']:>14.3e} {a['mean_abs']:>10.3e} "
                  f"{b['max_abs']:>10.3e} {b['mean_abs']:>10.3e}")
    f = result["final_latents"]
    worst = max(result["x0"], key=lambda r: r["max_abs"])
    worst_kv = max(result["kv"], key=lambda r: r["max_abs"]) if result["kv"] else None
    print(f"\nfinal latents: max {f['max_abs']:.3e}, mean {f['mean_abs']:.3e}; worst x0 step: chunk "
          f"{worst['chunk']} step {worst['step']} max {worst['max_abs']:.3e}"
          + (f"; worst K/V: {worst_kv['max_abs']:.3e} (chunk {worst_kv['chunk']} layer {worst_kv['layer']} "
             f"{worst_kv['tensor']})" if worst_kv else ""))


if __name__ == "__main__":
    main()
