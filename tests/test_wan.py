"""The causal Wan path against un-chunked references: one-shot block-causal forward, one-shot VAE decode,
diffusers' own RoPE table."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

import pfgen
from pfgen.attention import get_backend
from pfgen.config import CacheConfig
from pfgen.cache.engine import CacheGeometry, KVCache
from pfgen.rope import FrameOffsetRoPE, apply_rope
from pfgen.video import StreamingDecoder
from pfgen.wan.processors import Float64Timesteps, make_causal
from pfgen.wan.tiny import tiny_transformer, tiny_vae


class BlockCausalProcessor:
    """Reference attn1: diffusers' RoPE on the whole sequence, SDPA with a block-causal (per-chunk) mask."""

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        cos, sin = rotary_emb

        def rot(x):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            out = torch.empty_like(x)
            out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
            out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
            return out

        q, k = rot(q).transpose(1, 2), rot(k).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=self.mask)
        return attn.to_out[0](out.transpose(1, 2).flatten(2))


def block_causal_model(frames, per_chunk, tokens):
    model = tiny_transformer()
    model.condition_embedder.timesteps_proj = Float64Timesteps(model.config.freq_dim)
    chunk = torch.arange(frames * tokens) // (per_chunk * tokens)
    mask = chunk[None, :] <= chunk[:, None]
    for block in model.blocks:
        block.attn1.set_processor(BlockCausalProcessor(mask))
    return model


def causal_model(frames, per_chunk, grid):
    model = tiny_transformer()
    state = make_causal(model)
    cfg = model.config
    geometry = CacheGeometry(cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, grid, 1, frames)
    types = [["full"] * cfg.num_attention_heads for _ in range(cfg.num_layers)]
    state.cache = KVCache(CacheConfig(), types, geometry, per_chunk, torch.float32, "cpu", get_backend("split", "cpu"))
    return model, state


def test_chunked_full_policy_equals_one_shot_block_causal():
    """Clean passes chunk by chunk (each at t=0 over the cache) equal one block-causal forward; a noisy pass of
    the last chunk over the committed cache equals the one-shot forward with per-token timesteps."""
    torch.manual_seed(0)
    frames, per_chunk, h, w = 9, 3, 4, 6
    grid = (h // 2, w // 2)
    tokens = grid[0] * grid[1]
    x = torch.randn(1, 16, frames, h, w)
    text = torch.randn(1, 512, 32)
    model, state = causal_model(frames, per_chunk, grid)
    chunked = []
    with torch.no_grad():
        for t0 in range(0, frames, per_chunk):
            state.cache.begin_chunk(t0, per_chunk)
            model.rope.frame_offset = t0
            if t0 == frames - per_chunk:
                state.cache.set_pass(commit=False)
                noisy = model(x[:, :, t0:], torch.tensor([937.5]), text, return_dict=False)[0]
            state.cache.set_pass(commit=True)
            chunked.append(model(x[:, :, t0:t0 + per_chunk], torch.tensor([0.0]), text, return_dict=False)[0])
        reference = block_causal_model(frames, per_chunk, tokens)
        one_shot = reference(x, torch.tensor([0.0]), text, return_dict=False)[0]
        t = torch.zeros(1, frames * tokens)
        t[:, (frames - per_chunk) * tokens:] = 937.5
        mixed = reference(x, t, text, return_dict=False)[0]
    torch.testing.assert_close(torch.cat(chunked, dim=2), one_shot, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(noisy, mixed[:, :, frames - per_chunk:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("channel_first,images,bias", [(True, True, False), (True, False, True), (False, True, True)])
def test_cpu_rms_norm_equals_diffusers_forward(channel_first, images, bias):
    """pfgen's CPU RMS norm against diffusers' WanRMS_norm.forward (F.normalize) in float64, an all-zero
    position included (max(|x|, eps): the output there is the bias); bfloat16 inputs are normalised in float32."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from pfgen.wan.vae_forward import rms_norm

    torch.manual_seed(0)
    norm = WanRMS_norm(8, channel_first=channel_first, images=images, bias=bias).double()
    with torch.no_grad():
        norm.gamma.normal_()
        if bias:
            norm.bias.normal_()
    shape = (2, 4, 5) if images else (2, 3, 4, 5)  # image norms see (B, C, H, W), the others (B, C, T, H, W)
    shape = (shape[0], 8, *shape[1:]) if channel_first else (*shape, 8)
    x = torch.randn(shape, dtype=torch.float64)
    x[(0, slice(None), 1, 1) if channel_first else (0, 1, 1)] = 0
    torch.testing.assert_close(rms_norm(norm, x), WanRMS_norm.forward(norm, x), atol=1e-12, rtol=1e-12)
    half = x.bfloat16()
    torch.testing.assert_close(rms_norm(norm.bfloat16(), half), WanRMS_norm.forward(norm, half), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "random"])
def test_loaded_vae_decodes_through_the_cpu_rms_norm(name):
    """The pipeline's VAE (the world model's, through the real-weights path, and the random one) runs pfgen's
    RMS norm, and decodes what diffusers' forward decodes."""
    import copy

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from pfgen.config import ModelConfig
    from pfgen.wan.components import load_components
    from pfgen.wan.vae_forward import rms_norm

    _, vae, _ = load_components(ModelConfig(name=name), torch.device("cpu"), torch.float32)
    norms = [m for m in vae.modules() if isinstance(m, WanRMS_norm)]
    assert norms and all(m.forward.__func__ is rms_norm for m in norms)
    if name == "tiny":  # the world model's VAE: its frame-wise convolutions run narrowed
        from diffusers import AutoencoderKLWan
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        def per_frame(model):
            return sum(m.kernel_size[0] == 1 for m in model.modules() if isinstance(m, WanCausalConv3d))

        assert per_frame(vae) > per_frame(AutoencoderKLWan.from_pretrained(ModelConfig().wan_dir, subfolder="vae"))
    plain = copy.deepcopy(vae)
    for m in plain.modules():
        if isinstance(m, WanRMS_norm):
            del m.forward  # the class's forward again
    z = torch.randn(1, 16, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, slow = StreamingDecoder(vae), StreamingDecoder(plain)
        fast.reset(), slow.reset()
        torch.testing.assert_close(fast.decode(z), slow.decode(z), atol=1e-5, rtol=1e-5)


def test_streaming_vae_decode_equals_one_shot():
    torch.manual_seed(0)
    vae = tiny_vae()
    z = torch.randn(1, 16, 7, 4, 6)
    with torch.no_grad():
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        one_shot = vae.decode(z * std + mean).sample
        decoder = StreamingDecoder(vae)
        decoder.reset()
        streamed = torch.cat([decoder.decode(z[:, :, a:a + 3]) for a in (0, 3)] + [decoder.decode(z[:, :, 6:])], 2)
    assert streamed.shape == one_shot.shape == (1, 3, 1 + 4 * 6, 32, 48)
    # the same per-frame decoder calls, but post_quant_conv sees 3- vs 7-frame inputs: other kernel blocking
    torch.testing.assert_close(streamed, one_shot, atol=1e-5, rtol=1e-5)


def test_framewise_vae_convolutions_load_narrowed_and_compute_the_same(tmp_path):
    """A causal convolution with zero taps on earlier frames runs as a per-frame one (kernel 1 in time) once
    loaded; encode and decode, streamed with the VAE's frame cache and through pfgen's RMS norm, equal the
    unchanged model's in float64."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    from pfgen.wan.vae_forward import cheaper_forward
    from pfgen.wan.wan_dir import load_vae

    vae = tiny_vae().double()
    convs = [m for m in vae.modules() if isinstance(m, WanCausalConv3d) and m.kernel_size[0] == 3 and m.stride[0] == 1]
    with torch.no_grad():
        for conv in convs[::2]:  # half of them frame-wise, the rest keep their temporal taps
            conv.weight[:, :, :-1] = 0
    vae.save_pretrained(tmp_path / "vae")
    narrowed = cheaper_forward(load_vae(str(tmp_path), torch.float64))
    kernels = [m.kernel_size[0] for m in narrowed.modules() if isinstance(m, WanCausalConv3d)]
    assert kernels.count(1) - [m.kernel_size[0] for m in vae.modules()
                               if isinstance(m, WanCausalConv3d)].count(1) == len(convs[::2])
    x = torch.rand(1, 3, 9, 32, 48, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, 16, 4, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(narrowed.encode(x).latent_dist.mode(), vae.encode(x).latent_dist.mode(),
                                   atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(narrowed.decode(z).sample, vae.decode(z).sample, atol=1e-10, rtol=1e-10)


def test_rope_frame_offset_equals_slice_of_longer_video():
    head_dim, offset, frames, h, w = 128, 5, 3, 4, 6
    long = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)(torch.zeros(1, 16, offset + frames, 2 * h, 2 * w))
    rope = FrameOffsetRoPE(head_dim, (1, 2, 2))
    rope.frame_offset = offset
    cos, sin = rope(torch.zeros(1, 16, frames, 2 * h, 2 * w))
    tail = slice(offset * h * w, None)
    torch.testing.assert_close(cos, long[0][:, tail].float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, long[1][:, tail].float(), atol=1e-6, rtol=0)


def test_rope_has_no_length_ceiling():
    """Positions past diffusers' 1024-row table work and keep relative structure: a frame at 5000 vs 4998
    rotates like 2 vs 0."""
    rope = FrameOffsetRoPE(32, (1, 2, 2))
    rope.frame_offset = 4998
    far = rope(torch.zeros(1, 16, 3, 2, 2))
    rope.frame_offset = 0
    near = rope(torch.zeros(1, 16, 3, 2, 2))
    q = torch.randn(1, 3, 1, 32)
    k = torch.randn(1, 3, 1, 32)

    def rotate(x, table):
        return apply_rope(x, table.freqs[:3])

    far_score = (rotate(q, far)[0, 2] * rotate(k, far)[0, 0]).sum()
    near_score = (rotate(q, near)[0, 2] * rotate(k, near)[0, 0]).sum()
    torch.testing.assert_close(far_score, near_score, atol=1e-4, rtol=1e-4)


def test_pipeline_policies_run_and_full_equals_rolling_within_window():
    """Inside the 21-frame window with no sink pressure, rolling and full attend to the same frames."""
    pipe = pfgen.load_pipeline()
    common = dict(num_frames=33, output_type="latent", height=32, width=48)
    full = pipe("a kite", policy="full", generator=torch.Generator().manual_seed(1), **common).latents
    rolling = pipe("a kite", policy="rolling", generator=torch.Generator().manual_seed(1), **common).latents
    assert full.shape == (1, 16, 9, 4, 6)
    torch.testing.assert_close(full, rolling, atol=1e-5, rtol=1e-5)


def test_heads_grouped_by_type_give_the_same_video(monkeypatch):
    """The pyramid reorders each layer's heads so types are contiguous; that must not change the result,
    and a baseline run puts the checkpoint order back."""
    import pfgen.pipeline

    pipe = pfgen.load_pipeline()
    common = dict(num_frames=45, output_type="latent", height=32, width=48, policy="pyramid")
    grouped = pipe("a kite", generator=torch.Generator().manual_seed(2), **common).latents
    assert any(order != [0, 1, 2, 3] for order in pipe._head_order)
    monkeypatch.setattr(pfgen.pipeline, "grouped_order", lambda row: list(range(len(row))))
    plain = pipe("a kite", generator=torch.Generator().manual_seed(2), **common).latents
    assert pipe._head_order == [[0, 1, 2, 3]] * 4
    torch.testing.assert_close(grouped, plain, atol=1e-5, rtol=1e-5)
