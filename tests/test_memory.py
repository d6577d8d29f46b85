"""The memory plan against what is really allocated, and the offload schedule of each mode.

KV bytes: the planner's figure against a KVCache built on the meta device (nothing is allocated), at the tiny
and at the 1.3B shape, for every policy. Weights: against a loaded model. Offload: hooks on every component
record where each one is while each runs."""

import json
import os

import pytest
import torch

import pfgen
from pfgen.cache.engine import CacheGeometry, KVCache
from pfgen.cli import main as cli_main
from pfgen.config import load_config, with_overrides
from pfgen.errors import PfgenError
from pfgen.heads import head_type_rows, head_type_source
from pfgen.memory import GiB, WAN_1_3B, choose_offload, kv_cache_bytes, plan_memory
from pfgen.wan.tiny import TINY_TRANSFORMER
from clirun import RANDOM

DEVICE = torch.device(os.environ.get("PFGEN_TEST_DEVICE", "cpu"))


def allocated_kv(cfg, types, arch, grid, latent, dtype):
    """What the pipeline's cache really holds (its own tensors' bytes), on the meta device."""
    patch = arch["patch_size"]
    geometry = CacheGeometry(len(types), len(types[0]), arch["attention_head_dim"],
                             (grid[0] // patch[1], grid[1] // patch[2]), 1, latent)
    return KVCache(cfg.cache, types, geometry, cfg.sampling.frames_per_chunk, dtype, "meta", None).nbytes()


@pytest.mark.parametrize("policy", ["rolling", "full", "pyramid"])
@pytest.mark.parametrize("shape", ["tiny", "1.3b"])
def test_kv_figure_equals_the_allocated_cache(policy, shape):
    cfg = load_config(RANDOM if shape == "tiny" else "self-forcing")  # tiny: the random test model
    arch = TINY_TRANSFORMER if shape == "tiny" else WAN_1_3B
    grid = (12, 20) if shape == "tiny" else (60, 104)
    types = head_type_rows(head_type_source(cfg.cache, policy), policy, arch["num_layers"], arch["num_attention_heads"])
    for latent, dtype in ((240, torch.bfloat16), (2400, torch.float32)):
        want = allocated_kv(cfg, types, arch, grid, latent, dtype)
        assert kv_cache_bytes(cfg, types, arch, grid, latent, dtype) == want
    if shape == "1.3b" and policy == "rolling":  # docs/design.md section 3: 274 MiB per latent frame, 21 frames
        assert want == 30 * 12 * 21 * 1560 * 128 * 2 * 4
        assert kv_cache_bytes(cfg, types, arch, grid, 240, torch.bfloat16) / 21 / 2 ** 20 == pytest.approx(274, 0.01)


def test_plan_of_the_bundled_config_needs_no_file_and_respects_dtype_and_device(tmp_path, monkeypatch):
    """Offline with an empty cache, a CPU machine plans a bf16 CUDA run of the real model."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = load_config("self-forcing")
    bf16 = plan_memory(cfg, 961, device=torch.device("cuda"), dtype=torch.bfloat16)
    fp32 = plan_memory(cfg, 961, device=torch.device("cuda"), dtype=torch.float32)
    # 961 frames need 241 latent frames, whole chunks make 243: the run decodes 969 frames (the plan says so)
    assert (bf16.frames, bf16.latent_frames, bf16.chunks, bf16.policy) == (969, 243, 81, "pyramid")
    m = bf16.memory
    # umT5-XXL is "about 11 GB in bf16"; the DiT has 1.3-1.5 B parameters, most of them in bf16
    assert 10.5e9 < m["text_encoder_bytes"] < 11.8e9 and 2.6e9 < m["transformer_bytes"] < 3.0e9
    assert fp32.memory["text_encoder_bytes"] == 2 * m["text_encoder_bytes"]
    assert 1.5 < fp32.memory["transformer_bytes"] / m["transformer_bytes"] < 2.0  # fp32-kept modules
    assert 1.99 * m["kv_cache_bytes"] < fp32.memory["kv_cache_bytes"] < 2 * m["kv_cache_bytes"]  # fp32 merge sums
    assert m["peak_bytes"] == bf16.peaks["none"] and bf16.device_total_bytes is None
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):  # the known architecture has the checkpoint's 825 tensors (docs/design.md section 1)
        assert len(WanTransformer3DModel(**WAN_1_3B).state_dict()) == 825


def test_weights_from_checkpoint_metadata_equal_the_loaded_model(tmp_path):
    """A .pt on disk is planned from its tensor shapes; the figures equal the loaded pipeline's bytes."""
    from test_checkpoint import HEADS, _wan_dir, save_pt, wan_state

    from pfgen.wan.tiny import tiny_transformer

    pt = save_pt(tmp_path / "tiny.pt", ema=wan_state(tiny_transformer()))
    cfg = with_overrides(load_config("self-forcing"), model=dict(checkpoint=pt, wan_dir=_wan_dir(tmp_path / "wan"),
                                                                 num_heads=HEADS))
    plan = plan_memory(cfg, 9, device=torch.device("cpu"), dtype=torch.float32, policy="rolling")
    pipe = pfgen.load_pipeline(cfg, device="cpu", dtype="float32")

    def nbytes(module):
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    assert plan.sources["transformer"].startswith("tensor shapes of")
    assert plan.memory["transformer_bytes"] == sum(p.numel() * 4 for p in pipe.transformer.parameters()) + sum(
        b.numel() * b.element_size() for b in tiny_transformer().buffers())
    assert plan.memory["vae_bytes"] == nbytes(pipe.vae)
    assert plan.memory["text_encoder_bytes"] == nbytes(pipe.prompt_encoder.encoder)


@pytest.mark.parametrize("card_gib, mode", [(80, "none"), (24, "none"), (16, "text-encoder"), (12, "model")])
def test_auto_offload_targets_for_60s_self_forcing(card_gib, mode):
    """60 s of self-forcing at 480x832 with pyramid: the least offload that fits each card (free = total - 0.5)."""
    cfg = load_config("self-forcing")
    plan = plan_memory(cfg, 961, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert choose_offload("auto", plan.peaks, int((card_gib - 0.5) * GiB), "cuda") == mode


def test_auto_says_before_loading_when_nothing_fits():
    plan = plan_memory(load_config("self-forcing"), 961, device=torch.device("cpu"), dtype=torch.bfloat16)
    with pytest.raises(PfgenError, match="even with --offload model, 7.50 GiB is free"):
        choose_offload("auto", plan.peaks, int(7.5 * GiB), "cuda")
    with pytest.raises(PfgenError, match="unknown offload 'some'"):
        choose_offload("some", plan.peaks, None, "cpu")


def test_dry_run_json_loads_nothing(capsys, monkeypatch):
    import pfgen.wan.components as components

    monkeypatch.setattr(components, "load_components", lambda *a, **k: pytest.fail("--dry-run loaded weights"))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", "--config", "self-forcing", "--dry-run", "--json", "--seconds", "60", "--device",
                  "cuda", "--dtype", "bfloat16", "--policy", "rolling", "--offload", "model"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    plan = json.loads(out)
    assert (plan["frames"], plan["chunks"], plan["policy"], plan["offload"]) == (957, 80, "rolling", "model")
    assert plan["device_total_bytes"] is None and plan["dtype"] == "bfloat16"
    assert plan["memory"]["kv_cache_bytes"] == 30 * 12 * 21 * 1560 * 128 * 2 * 2
    assert plan["memory"]["peak_bytes"] == plan["peaks"]["model"]
    assert set(plan["memory"]) >= {"transformer_bytes", "text_encoder_bytes", "vae_bytes", "kv_cache_bytes",
                                   "activation_bytes", "peak_bytes"}


# -- offload: where each component is while each one runs -----------------------------------------------------
EXPECTED = {  # component running -> placement of (text encoder, transformer, vae)
    "none": {"text_encoder": ("device",) * 3, "transformer": ("device",) * 3, "vae": ("device",) * 3},
    "text-encoder": {"text_encoder": ("device",) * 3, "transformer": ("home", "device", "device"),
                     "vae": ("home", "device", "device")},
    "model": {"text_encoder": ("device", "home", "home"), "transformer": ("home", "device", "device"),
              "vae": ("home", "device", "device")},
}


@pytest.mark.parametrize("mode", ["none", "text-encoder", "model"])
def test_offload_schedule(mode):
    pipe = pfgen.load_pipeline(device=str(DEVICE), dtype="float32", offload=mode)
    offload = pipe.offload
    names = ("text_encoder", "transformer", "vae")
    seen = {}

    def record(name):
        def hook(module, args):
            placement = offload.placement()
            seen.setdefault(name, set()).add(tuple(placement[n] for n in names))
            for n in names:  # the weights really are where the schedule says (distinct devices on a GPU run)
                assert offload.where(n) == (offload.device if placement[n] == "device" else torch.device("cpu"))
            if name == "text_encoder" and mode != "none":
                assert pipe.state.cache is None  # the visit never overlaps a KV cache
        return hook

    pipe.prompt_encoder.encoder.register_forward_pre_hook(record("text_encoder"))
    pipe.transformer.register_forward_pre_hook(record("transformer"))
    pipe.vae.decoder.register_forward_pre_hook(record("vae"))
    for _ in range(2):  # the second video starts with the first one's cache allocated
        pipe("a red kite", num_frames=9, output_type="np", height=32, width=48)
    assert seen == {name: {EXPECTED[mode][name]} for name in names}
    rest = offload.placement()
    assert all(rest[n] == ("home" if n in offload.moving else "device") for n in names)


def test_text_encoder_on_the_cpu_is_off_the_accelerator_plan():
    cfg = load_config("self-forcing")
    cpu_text = with_overrides(cfg, model=dict(text_encoder_device="cpu"))
    plan = plan_memory(cpu_text, 961, device=torch.device("cuda"), dtype=torch.bfloat16)
    m = plan.memory
    assert m["text_encoder_bytes"] > 10e9  # still reported, but it is not on the GPU
    assert plan.peaks["none"] == (m["transformer_bytes"] + m["vae_bytes"] + m["kv_cache_bytes"]
                                  + max(m["activation_bytes"], m["vae_decode_bytes"]))
