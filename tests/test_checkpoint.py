"""Checkpoint loading and conversion: Self Forcing / Causal Forcing `.pt` files, `pfgen convert`, the Wan folder,
and the one-line errors for everything that can be wrong with them. Tiny random models, CPU, float32."""

import re
import stat

import pytest
import torch

import pfgen
from pfgen.cli import main as cli_main
from pfgen.config import ModelConfig, load_config, with_overrides
from pfgen.errors import PfgenError
from pfgen.wan.checkpoint import load_transformer
from pfgen.wan.tiny import TINY_TEXT, tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae

# diffusers WanTransformer3DModel name -> original Wan2.1 name (what Self Forcing's CausalWanModel calls it),
# written out independently of pfgen.wan.checkpoint. Checked once against CausalWanModel(num_layers=2).
TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
PER_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",  # the affine LayerNorm before cross-attention
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
HEADS = 4  # tiny: 4 heads x 32; the default (width / 128) would give 1 head


def wan_name(name: str) -> str:
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if block:
        index, rest = block.groups()
        table, prefix = PER_BLOCK, f"blocks.{index}."
    else:
        table, prefix, rest = TOP_LEVEL, "", name
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return prefix + old + rest[len(new):]
    raise KeyError(name)


def wan_state(model, prefix="model.") -> dict:
    return {prefix + wan_name(k): v.clone() for k, v in model.state_dict().items()}


def save_pt(path, generator=None, ema=None):
    data = {"critic": {"model.dummy": torch.zeros(1)}}
    if generator is not None:
        data["generator"] = generator
    if ema is not None:
        data["generator_ema"] = ema
    torch.save(data, path)
    return str(path)


def load(path, ema=True):
    return load_transformer(ModelConfig(checkpoint=str(path), ema=ema, num_heads=HEADS), torch.float32)


def assert_same_weights(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def assert_same_forward(model, reference):
    """Bit-identical weights give the same forward up to kernel rounding: tensors that sit differently in
    memory after loading may take other CPU kernel paths (seen: 6e-7 on some CPU kinds)."""
    torch.testing.assert_close(forward(model), forward(reference), atol=1e-5, rtol=1e-5)


def forward(model):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, 3, 4, 6, generator=g)
    text = torch.randn(1, 12, model.config.text_dim, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([937.5]), encoder_hidden_states=text,
                     return_dict=False)[0]


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(num_layers=2)


@pytest.fixture(scope="module")
def pt(tiny, tmp_path_factory):
    """A Self Forcing style checkpoint: generator = other random weights, generator_ema = `tiny`."""
    other = tiny_transformer(seed=5, num_layers=2)
    return save_pt(tmp_path_factory.mktemp("ckpt") / "sf.pt", generator=wan_state(other), ema=wan_state(tiny))


def test_wan_names_cover_every_tensor(tiny):
    names = [wan_name(k) for k in tiny.state_dict()]
    assert len(set(names)) == len(names) == 2 * 27 + 15
    assert "blocks.1.norm3.weight" in names and "head.modulation" in names


def test_pt_loads_bit_exact_and_ema_flag_picks_the_entry(tiny, pt):
    model = load(pt, ema=True)
    assert_same_weights(model, tiny)
    assert model.config.num_attention_heads == HEADS and model.config.attention_head_dim == 32
    assert_same_forward(model, tiny)
    other = load(pt, ema=False)
    assert_same_weights(other, tiny_transformer(seed=5, num_layers=2))


def test_causal_forcing_fsdp_prefix_loads(tiny, tmp_path):
    path = save_pt(tmp_path / "cf.pt", generator=wan_state(tiny, prefix="model._fsdp_wrapped_module."))
    assert_same_weights(load(path, ema=False), tiny)


def test_convert_writes_a_plain_diffusers_folder(tiny, pt, tmp_path):
    out = tmp_path / "converted"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["convert", pt, "-o", str(out), "--num-heads", str(HEADS)])
    assert exit_.value.code == 0
    from diffusers import WanTransformer3DModel

    plain = WanTransformer3DModel.from_pretrained(out)
    assert_same_weights(plain, tiny)
    assert_same_forward(plain, tiny)
    assert_same_weights(load(out), tiny)
    assert not list(tmp_path.glob(".*partial"))


def test_convert_refuses_a_non_empty_folder(pt, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["convert", pt, "-o", str(out)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"


def _error(path, ema=True) -> str:
    with pytest.raises(PfgenError) as exc:
        load(path, ema)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_errors_name_the_problem(tiny, pt, tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint")
    assert "not a readable PyTorch checkpoint" in _error(junk)
    torch.save({"step": 3, "config": {"lr": 1e-5}}, tmp_path / "optimizer.pt")
    assert "does not look like a model checkpoint" in _error(tmp_path / "optimizer.pt")

    no_ema = save_pt(tmp_path / "no_ema.pt", generator=wan_state(tiny))
    message = _error(no_ema, ema=True)
    assert "no 'generator_ema' entry" in message and "--no-ema" in message

    state = wan_state(tiny)
    del state["model.blocks.1.norm3.weight"], state["model.blocks.1.self_attn.o.bias"]
    state["model.blocks.0.adapter.weight"] = torch.zeros(3)
    message = _error(save_pt(tmp_path / "keys.pt", ema=state))
    assert "missing 2 keys" in message and "blocks.1.norm2.weight" in message
    assert "blocks.1.attn1.to_out.0.bias" in message
    assert "unexpected 1 keys" in message and "blocks.0.adapter.weight" in message

    state = wan_state(tiny)
    state["model.blocks.1.self_attn.q.weight"] = torch.zeros(128, 64)
    message = _error(save_pt(tmp_path / "shape.pt", ema=state))
    assert "blocks.1.attn1.to_q.weight has shape (128, 64), expected (128, 128)" in message

    assert "checkpoint not found" in _error(tmp_path / "missing.pt")


def _wan_dir(root, encoder=None):
    tiny_vae().save_pretrained(root / "vae")
    (encoder or tiny_text_encoder()).save_pretrained(root / "text_encoder")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    return str(root)


@pytest.fixture(scope="module")
def embedded_pt(tmp_path_factory):
    """The embedded tiny model's transformer, written as a Self Forcing checkpoint."""
    return save_pt(tmp_path_factory.mktemp("embedded") / "tiny.pt", ema=wan_state(tiny_transformer()))


def test_checkpoint_and_wan_dir_pipeline_equals_embedded_tiny(embedded_pt, tmp_path):
    wan = _wan_dir(tmp_path / "wan")
    args = dict(num_frames=9, output_type="latent", height=32, width=48)
    loaded = pfgen.load_pipeline(checkpoint=embedded_pt, wan_dir=wan, num_heads=HEADS, device="cpu",
                                 dtype="float32")
    embedded = pfgen.load_pipeline(device="cpu", dtype="float32")
    got = loaded("a red kite", generator=torch.Generator().manual_seed(3), **args).latents
    want = embedded("a red kite", generator=torch.Generator().manual_seed(3), **args).latents
    assert got.shape == (1, 16, 3, 4, 6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # same weights, loaded vs built in memory


def test_wan_dir_errors(embedded_pt, tmp_path):
    partial = tmp_path / "no_vae"
    tiny_text_encoder().save_pretrained(partial / "text_encoder")
    tiny_tokenizer().save_pretrained(partial / "tokenizer")
    with pytest.raises(PfgenError, match="has no 'vae/' component"):
        pfgen.load_pipeline(checkpoint=embedded_pt, wan_dir=str(partial), num_heads=HEADS, device="cpu")

    from transformers import UMT5Config, UMT5EncoderModel

    small = UMT5EncoderModel(UMT5Config(**{**TINY_TEXT, "vocab_size": 300}, pad_token_id=0, eos_token_id=1,
                                        decoder_start_token_id=0))
    wan = _wan_dir(tmp_path / "mismatch", encoder=small)
    with pytest.raises(PfgenError) as exc:
        pfgen.load_pipeline(checkpoint=embedded_pt, wan_dir=wan, num_heads=HEADS, device="cpu")
    assert "text encoder only 300" in str(exc.value) and "\n" not in str(exc.value)


def test_one_step_schedule_is_bitwise_deterministic():
    """Causal Forcing++ style: one step per chunk, given noise and embeddings -> identical runs."""
    cfg = with_overrides(load_config(), sampling=dict(timesteps=(1000.0,)), runtime=dict(device="cpu",
                                                                                           dtype="float32"))
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(1, 16, 6, 4, 6, generator=g)
    embeds = torch.randn(1, 512, 32, generator=g)
    embeds[:, 20:] = 0
    pipe = pfgen.load_pipeline(cfg)
    args = dict(prompt_embeds=embeds, latents=latents, output_type="latent", height=32, width=48)
    first = pipe(**args).latents
    second = pipe(**args).latents
    third = pfgen.load_pipeline(cfg)(**args).latents
    assert first.shape == (1, 16, 6, 4, 6)
    assert torch.equal(first, second)  # the same pipeline twice: the same kernels, the same bits
    torch.testing.assert_close(third, first, atol=1e-5, rtol=1e-5)  # a new pipeline may sit elsewhere in memory


def test_cli_generate_with_checkpoint_and_wan_dir(embedded_pt, tmp_path, capsys):
    """The real-weights command line, end to end, at a reduced shape: .pt + Wan folder -> mp4."""
    wan = _wan_dir(tmp_path / "wan")
    out = tmp_path / "real.mp4"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", "--checkpoint", embedded_pt, "--wan-dir", wan, "--num-heads", str(HEADS),
                  "--seconds", "1", "--height", "32", "--width", "48", "--policy", "rolling", "-o", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 0, err
    assert "noise-like" not in err and out.stat().st_size > 0


def test_a_vae_of_factor_4_sets_the_latent_size(tmp_path, capsys):
    """The VAE's spatial factor is the model's (its `scale_factor_spatial`), not a constant: a folder whose VAE
    compresses 4x, with a 4x4-patch transformer, generates 32x48 video from 8x12 latents; the streamed video
    equals the one-shot decode of those latents, and the memory plan and inspect-cache count the same grid."""
    from diffusers import AutoencoderKLWan

    from pfgen.inspect import inspect_geometry
    from pfgen.memory import plan_memory

    folder = tmp_path / "model"
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[True, True], scale_factor_spatial=4).eval()
    vae.save_pretrained(folder / "vae")
    tiny_transformer(patch_size=(1, 4, 4)).save_pretrained(folder / "transformer")
    tiny_text_encoder().save_pretrained(folder / "text_encoder")
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    pipe = pfgen.load_pipeline(checkpoint=str(folder / "transformer"), wan_dir=str(folder), device="cpu",
                               dtype="float32")
    out = pipe("a red kite", num_frames=9, height=32, width=48, generator=torch.Generator().manual_seed(3))
    assert out.latents.shape == (1, 16, 3, 8, 12) and out.frames.shape == (1, 9, 32, 48, 3)
    mean, std = (torch.tensor(vae.config[k]).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
    with torch.no_grad():
        one_shot = vae.decode(out.latents * std + mean).sample.clamp(-1, 1)
    streamed = torch.from_numpy(out.frames).permute(0, 4, 1, 2, 3) * 2 - 1
    torch.testing.assert_close(streamed, one_shot, atol=1e-5, rtol=1e-5)
    assert plan_memory(pipe.config, 9, device=torch.device("cpu"), dtype=torch.float32, height=32, width=48).grid \
        == (8, 12)
    assert inspect_geometry(pipe.config, None, "rolling", 32, 48)[2] == (2, 3)  # tokens: 8 x 12 in 4 x 4 patches
    out = tmp_path / "tae.mp4"  # the tiny decoder decodes the Wan2.1 VAE's 8x latents only
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", "--checkpoint", str(folder / "transformer"), "--wan-dir", str(folder), "--decoder", "tae",
                  "--seconds", "1", "--height", "32", "--width", "48", "-o", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "compresses 4x" in err and "--decoder wan" in err and not out.exists()


def test_original_wan_safetensors_layout_loads(tiny, tmp_path):
    """Original Wan2.1 weights: a folder of safetensors with Wan names (no diffusers config)."""
    from safetensors.torch import save_file

    folder = tmp_path / "wan21"
    folder.mkdir()
    save_file({k[len("model."):]: v.contiguous() for k, v in wan_state(tiny).items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    assert_same_weights(load(str(folder)), tiny)


def test_convert_overwrite_replaces_the_folder_with_umask_permissions(tiny, pt, tmp_path, capsys):
    """`convert -y` replaces a folder from an earlier conversion (nothing of it stays), and every file it writes
    follows the umask like any file pfgen writes (safetensors' own writer makes them 0600)."""
    from pfgen.outputs import DIR_MODE, FILE_MODE

    out = tmp_path / "converted"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"from an older conversion")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["convert", pt, "-o", str(out), "--num-heads", str(HEADS), "-y"])
    assert exit_.value.code == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert "stale.safetensors" not in names and "config.json" in names
    assert_same_weights(load(out), tiny)
    assert stat.S_IMODE(out.stat().st_mode) == DIR_MODE
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {FILE_MODE}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no partial folder, no moved-aside one
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["convert", pt, "-o", str(tmp_path / "notes.txt"), "-y"])
    assert exit_.value.code == 1 and "notes.txt is a file" in capsys.readouterr().err
