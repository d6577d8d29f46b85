#!/usr/bin/env python
"""pfgen side by side with the public LongLive reference: prompt switches, KV re-cache, LoRA, relative RoPE.

The reference (github NVlabs/LongLive at tag v1.0, a local checkout given with --reference) is imported from that
path and run through its own `InteractiveCausalInferencePipeline.inference` (`global_sink: true`,
`local_attn_size` 12, `sink_size` 3), with its LoRA applied by its own `configure_lora_for_model` (peft) and
`peft.set_peft_model_state_dict`, and, with `--rope relative`, its `CausalWanModelInfinity`
(`use_infinite_attention`). pfgen loads the same base weights as a `.pt` (`generator`) and the same LoRA as a
`{"generator_lora": ...}` file through `model.loras`, which it merges at load, then runs `cache.recache: window`
with the same switches, noise and re-noise draws. Every x0 of every noisy pass is compared, and after each chunk's
clean pass the V cache (and, for absolute RoPE, the K cache, stored rotated by both).

    python scripts/compare_longlive.py --reference /path/to/LongLive              # CPU, fp32, 2 layers
    python scripts/compare_longlive.py --reference /path/to/LongLive --rope relative

The shims of scripts/compare_reference.py apply (SDPA for flash-attn, stub packages, seeded random weights),
plus the few LongLive needs (listed in SHIMS). Nothing of the reference is copied here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare_reference import WAN_1_3B, diff, frame_ranges, randomize_, sdpa_attention  # noqa: E402

STEPS = [1000, 750, 500, 250]
SHIMS = (
    "package stubs for wan, wan.modules, pipeline (their __init__.py import T5/CLIP/VAE and training code), stub "
    "modules wan.modules.{tokenizers,t5,vae}, utils.memory (queries a CUDA device at import), einops if missing",
    "attention/flash_attention -> torch SDPA without masks (all the reference's KV-cache calls are unmasked)",
    "CausalWanModel(.Infinity).from_pretrained -> the model at the chosen shape with seeded random weights",
    "_prepare_blockwise_causal_attn_mask -> None: the re-cache sets it on the model, but the KV-cache attention "
    "path never reads it (flex_attention is only used without a cache)",
    "pipeline.num_transformer_blocks / frame_seq_length set to the shape (hard-coded for 30 layers x 1560 tokens)",
    "text encoder -> the given prompt embeddings per prompt; VAE -> identity (latents are compared)",
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="checkout of NVlabs/LongLive at v1.0")
    ap.add_argument("--rope", choices=("absolute", "relative"), default="absolute")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=416)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--switches", default="9,21", help="latent frames where the next prompt takes over")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight-seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def import_reference(path: Path):
    if not (path / "pipeline" / "interactive_causal_inference.py").exists():
        sys.exit(f"error: {path} is not a LongLive v1.0 checkout (no pipeline/interactive_causal_inference.py)")
    sys.path.insert(0, str(path))

    def module(name, package_dir=None, **attrs):
        mod = types.ModuleType(name)
        if package_dir is not None:
            mod.__path__ = [str(path / package_dir)]
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod

    for name in ("wan", "pipeline", "utils"):
        module(name, name)
    module("wan.modules", "wan/modules")
    module("wan.modules.tokenizers", HuggingfaceTokenizer=None)
    module("wan.modules.t5", umt5_xxl=None)
    module("wan.modules.vae", _video_vae=None)
    module("utils.memory", gpu=torch.device("cpu"), cpu=torch.device("cpu"), get_cuda_free_memory_gb=lambda *_: 1e9,
           DynamicSwapInstaller=None, log_gpu_memory=lambda *a, **k: None,
           move_model_to_device_with_memory_preservation=lambda *a, **k: None)
    try:
        import einops  # noqa: F401
    except ImportError:
        module("einops", repeat=None)
    import wan.modules.attention as attention_mod
    import wan.modules.model as model_mod

    attention_mod.attention = attention_mod.flash_attention = model_mod.flash_attention = sdpa_attention
    import wan.modules.causal_model as causal_model
    import wan.modules.causal_model_infinity as causal_infinity

    for mod in (causal_model, causal_infinity):
        mod.attention = sdpa_attention
        mod.CausalWanModel._prepare_blockwise_causal_attn_mask = staticmethod(lambda *a, **k: None)
    import pipeline.interactive_causal_inference as interactive
    import utils.lora_utils as lora_utils
    import utils.wan_wrapper as wan_wrapper

    return (causal_model, causal_infinity), wan_wrapper, interactive, lora_utils


def build_reference(args, tokens, prompts):
    models, wan_wrapper, interactive, lora_utils = import_reference(Path(args.reference).expanduser())

    def from_pretrained(cls, _path, local_attn_size=-1, sink_size=0, **_):
        init = cls.init_weights
        cls.init_weights = lambda self: None
        try:
            model = cls(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=WAN_1_3B["dim"],
                        ffn_dim=WAN_1_3B["ffn_dim"], freq_dim=WAN_1_3B["freq_dim"], text_dim=WAN_1_3B["text_dim"],
                        out_dim=16, num_heads=WAN_1_3B["heads"], num_layers=args.layers,
                        local_attn_size=local_attn_size, sink_size=sink_size, qk_norm=True, cross_attn_norm=True,
                        eps=1e-6)
        finally:
            cls.init_weights = init
        randomize_(model, args.weight_seed)
        return model

    for mod in models:
        mod.CausalWanModel.from_pretrained = classmethod(from_pretrained)
    kwargs = dict(timestep_shift=5.0, local_attn_size=12, sink_size=3)
    if args.rope == "relative":
        kwargs["use_infinite_attention"] = True
    config = types.SimpleNamespace(denoising_step_list=STEPS, warp_denoising_step=True, num_frame_per_block=3,
                                   context_noise=0, global_sink=True, model_kwargs=types.SimpleNamespace(**kwargs))
    generator = wan_wrapper.WanDiffusionWrapper(**kwargs, is_causal=True)
    base = {k: v.detach().clone() for k, v in generator.state_dict().items()}

    class PromptEmbeds(torch.nn.Module):
        def forward(self, text_prompts):
            return {"prompt_embeds": prompts[int(text_prompts[0])]}

    class IdentityVAE(torch.nn.Module):
        def decode_to_pixel(self, latent, use_cache=False):
            return latent

    with contextlib.redirect_stdout(io.StringIO()):
        pipe = interactive.InteractiveCausalInferencePipeline(config, device=torch.device("cpu"), generator=generator,
                                                              text_encoder=PromptEmbeds(), vae=IdentityVAE())
        adapter = dict(type="lora", rank=args.rank, alpha=args.alpha, dropout=0.0)
        pipe.generator.model = lora_utils.configure_lora_for_model(pipe.generator.model, "generator", adapter)
    lora = random_lora(pipe.generator.model, args.weight_seed + 1)
    import peft

    peft.set_peft_model_state_dict(pipe.generator.model, lora)  # as interactive_inference.py loads lora.pt
    pipe.num_transformer_blocks, pipe.frame_seq_length = args.layers, tokens
    return pipe, base, lora


def random_lora(peft_model, seed: int) -> dict:
    """Seeded LoRA tensors in the file format LongLive saves (`get_peft_model_state_dict`): A ~ N(0, 1/in),
    B ~ N(0, 0.25/rank), so that the LoRA changes each layer by a fraction of its own output."""
    import peft

    g = torch.Generator().manual_seed(seed)
    state = peft.get_peft_model_state_dict(peft_model)
    out = {}
    for name, t in sorted(state.items()):
        scale = t.shape[1] ** -0.5 if ".lora_A." in name else 0.5 * t.shape[1] ** -0.5
        out[name] = torch.randn(t.shape, generator=g) * scale
    return out


class Recorder:
    """Every generator call (start frame, frames, timestep, x0) in order, the re-noise draws, and the K/V cache
    after each clean pass of a generated chunk."""

    def __init__(self, pipe):
        self.calls, self.eps, self.kv = [], [], []
        forward, add_noise = pipe.generator.forward, pipe.scheduler.add_noise
        tokens = pipe.frame_seq_length

        def recorded(*a, **kw):
            flow, x0 = forward(*a, **kw)
            start, frames = kw["current_start"] // tokens, x0.shape[1]
            t = float(kw["timestep"][0, 0])
            self.calls.append((start, frames, t, x0.permute(0, 2, 1, 3, 4).detach().clone()))
            if t == 0 and frames == 3 and len(self.calls) >= 2 and self.calls[-2][2] > 0:
                cache = kw["kv_cache"]
                held = int(cache[0]["local_end_index"]) // tokens
                self.kv.append(dict(chunk=start // 3, held=held, layers={
                    i: (c["k"][:, :held * tokens].clone(), c["v"][:, :held * tokens].clone())
                    for i, c in enumerate(cache)}))
            return flow, x0

        def recorded_noise(samples, noise, timestep):
            self.eps.append(noise.detach().clone())
            return add_noise(samples, noise, timestep)

        pipe.generator.forward = recorded
        pipe.scheduler.add_noise = recorded_noise


def run_pfgen(args, base_path, lora_path, noise, prompts, switches, eps):
    import pfgen.pipeline as pipeline_mod
    from pfgen.config import LoraConfig, ModelConfig, load_config, with_overrides
    from pfgen.sampling import NoiseSource
    from pfgen.wan.checkpoint import load_transformer

    class ReplayNoise(NoiseSource):
        def renoise(self, frames: int) -> torch.Tensor:
            return eps.pop(0).unflatten(0, (-1, frames)).permute(0, 2, 1, 3, 4).to(self.device, self.dtype)

    cfg = with_overrides(load_config("longlive"), cache=dict(rope=args.rope, backend="auto"),
                         model=dict(checkpoint=str(base_path), loras=(LoraConfig(str(lora_path), 1.0, args.alpha),)),
                         runtime=dict(device="cpu", dtype="float32"))
    model_cfg = ModelConfig(checkpoint=str(base_path), ema=False, num_heads=WAN_1_3B["heads"], loras=cfg.model.loras)
    transformer = load_transformer(model_cfg, torch.float32)
    pipe = pipeline_mod.Pipeline(transformer, None, None, cfg, torch.device("cpu"), torch.float32)
    latents = noise.permute(0, 2, 1, 3, 4)
    replay = ReplayNoise((1, 16, *latents.shape[3:]), torch.device("cpu"), torch.float32, None, latents)
    fps = cfg.video.fps
    timeline = [(0.0, prompts[0])] + [((1 + 4 * (t - 1)) / fps, prompts[i + 1]) for i, t in enumerate(switches)]
    x0, kv = {}, {}
    stream = pipe.stream(timeline=timeline, latents=latents, height=args.height, width=args.width, decode=False,
                         noise=replay, on_step=lambda c, s, x: x0.__setitem__((c, s), x.detach().clone()))
    for chunk in stream:
        rule = pipe.state.cache.rules["rolling"]
        kv[chunk.index] = ({t: s for s, t in rule.slots.items()},
                           {i: (layer["rolling"].k_abs.clone(), layer["rolling"].v_abs.clone())
                            for i, layer in enumerate(pipe.state.cache.stores)})
    assert not eps, f"{len(eps)} recorded re-noise draws were not used"
    return x0, kv, pipe.state.cache.stores[0]["rolling"].frame_tokens


def compare_kv(ref_kv, ours, tokens, with_k: bool, chunks: int) -> list[dict]:
    rows = []
    for ref in ref_kv:
        if ref["chunk"] >= chunks - 1:  # pfgen skips the last clean pass (no later chunk reads it)
            continue
        slot_of, stores = ours[ref["chunk"]]
        end = 3 * (ref["chunk"] + 1)
        frames = [p if p < 3 else end - ref["held"] + p for p in range(ref["held"])]
        index = torch.cat([torch.arange(slot_of[t] * tokens, (slot_of[t] + 1) * tokens) for t in frames])
        for layer, (k_ref, v_ref) in ref["layers"].items():
            k, v = stores[layer]
            for name, a, b in (("K", k, k_ref), ("V", v, v_ref))[0 if with_k else 1:]:
                rows.append(dict(chunk=ref["chunk"], layer=layer, tensor=name, frames=frame_ranges(frames),
                                 **diff(a.index_select(1, index), b)))
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    lat_h, lat_w = args.height // 8, args.width // 8
    tokens = (lat_h // 2) * (lat_w // 2)
    switches = [int(x) for x in args.switches.split(",")]
    frames = 3 * args.chunks
    g = torch.Generator().manual_seed(args.seed)
    prompts = []
    for _ in range(len(switches) + 1):
        e = torch.randn(1, 512, WAN_1_3B["text_dim"], generator=g)
        e[:, args.prompt_tokens:] = 0.0
        prompts.append(e)
    noise = torch.randn(1, frames, 16, lat_h, lat_w, generator=g)
    print(f"{args.layers} layers x 12 heads x 128, {args.height}x{args.width} ({tokens} tokens/frame), "
          f"{args.chunks} chunks, switches at latent frames {switches}, LoRA rank {args.rank} alpha {args.alpha:g}, "
          f"rope {args.rope}", flush=True)

    started = time.time()
    pipe, base, lora = build_reference(args, tokens, prompts)
    recorder = Recorder(pipe)
    torch.manual_seed(args.seed + 1)
    with contextlib.redirect_stdout(io.StringIO()):
        latents = pipe.inference(noise=noise, text_prompts_list=[[str(i)] for i in range(len(prompts))],
                                 switch_frame_indices=switches, return_latents=True)[1]
    ref_seconds = time.time() - started
    recache = [(s, f) for s, f, t, _ in recorder.calls if t == 0 and f != 3]
    print(f"reference: {len(recorder.calls)} generator calls, re-cache passes (first frame, frames): {recache}, "
          f"{ref_seconds:.1f} s", flush=True)
    noisy = [(s // 3, x) for s, f, t, x in recorder.calls if t > 0]
    ref_x0 = {(c, i % len(STEPS)): x for i, (c, x) in enumerate(noisy)}

    with tempfile.TemporaryDirectory() as tmp:
        base_path, lora_path = Path(tmp) / "longlive_base.pt", Path(tmp) / "lora.pt"
        torch.save({"generator": base}, base_path)
        torch.save({"generator_lora": lora}, lora_path)
        started = time.time()
        x0, kv, tokens = run_pfgen(args, base_path, lora_path, noise, prompts, switches, list(recorder.eps))
        pf_seconds = time.time() - started
    print(f"pfgen: {pf_seconds:.1f} s", flush=True)
    x0_rows = [dict(chunk=c, step=s, **diff(x0[(c, s)], ref_x0[(c, s)])) for c, s in sorted(ref_x0)]
    kv_rows = compare_kv(recorder.kv, kv, tokens, args.rope == "absolute", args.chunks)
    ours = torch.cat([x0[(c, len(STEPS) - 1)] for c in range(args.chunks)], dim=2)
    final = diff(ours, latents.permute(0, 2, 1, 3, 4))
    result = dict(setup=dict(vars(args), tokens_per_frame=tokens, torch=torch.__version__, recache_passes=recache,
                             reference_seconds=ref_seconds, pfgen_seconds=pf_seconds, shims=SHIMS),
                  x0=x0_rows, kv=kv_rows, final_latents=final)
    for r in x0_rows:
        print(f"x0 chunk {r['chunk']} step {r['step']}: max {r['max_abs']:.3e} mean {r['mean_abs']:.3e} "
              f"rms {r['ref_rms']:.3f}")
    for r in kv_rows:
        print(f"{r['tensor']} chunk {r['chunk']} layer {r['layer']} frames {r['frames']}: max {r['max_abs']:.3e}")
    worst = max(x0_rows, key=lambda r: r["max_abs"])
    worst_kv = max(kv_rows, key=lambda r: r["max_abs"])
    print(f"\nfinal latents max {final['max_abs']:.3e}; worst x0 {worst['max_abs']:.3e} (chunk {worst['chunk']} step "
          f"{worst['step']}); worst K/V {worst_kv['max_abs']:.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
