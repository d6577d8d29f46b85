"""The tiny decoder (`--decoder tae`): chunk-by-chunk streaming against an independent frame-at-a-time oracle of
the TAEHV graph, the frame count against the Wan VAE's, strict weight loading."""

import pytest
import torch
from safetensors.torch import save_file

from pfgen.errors import PfgenError
from pfgen.frames import video_frames_for
from pfgen.wan.tae import MemBlock, TaeStreamingDecoder, TGrow, TinyDecoder, load_tae


def frame_at_a_time(decoder: TinyDecoder, latents: torch.Tensor) -> torch.Tensor:
    """Oracle: walk the graph one frame at a time in causal order, as a queue of (frame, next layer); each MemBlock
    remembers its previous input frame (zeros before the first); TGrow splits a frame into `stride` frames.
    Returns every frame (untrimmed), (B, 3, 4 T, H, W), in [0, 1]."""
    layers = list(decoder.decoder)
    memory = {}
    out = []
    queue = [(latents[:, :, t], 0) for t in range(latents.shape[2])]
    while queue:
        x, i = queue.pop(0)
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, MemBlock):
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                x = layer(x, past)
            elif isinstance(layer, TGrow):
                parts = layer.conv(x).chunk(layer.stride, 1)
                queue[:0] = [(p, i + 1) for p in parts[1:]]
                x = parts[0]
            else:
                x = layer(x)
            i += 1
        out.append(x.clamp(0, 1))
    return torch.stack(out, 2)


def random_decoder(seed=0):
    torch.manual_seed(seed)
    decoder = TinyDecoder().double().eval()
    with torch.no_grad():
        for p in decoder.parameters():  # scaled so that frames are neither flat nor saturated
            p.normal_(0, 0.7 / p[0].numel() ** 0.5)
        decoder.decoder[-1].bias.fill_(0.5)
    return decoder


@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_decode_equals_frame_at_a_time_oracle(chunk):
    decoder = random_decoder()
    z = torch.randn(1, 16, 7, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = frame_at_a_time(decoder, z)[:, :, 3:] * 2 - 1
        stream = TaeStreamingDecoder(decoder)
        parts = [stream.decode(z[:, :, t:t + chunk]) for t in range(0, 7, chunk)]
    got = torch.cat(parts, 2)
    assert [p.shape[2] for p in parts][:2] == [4 * chunk - 3, 4 * chunk]
    assert got.shape == (1, 3, video_frames_for(7), 24, 32)
    assert 0.05 < ((expected > -1) & (expected < 1)).double().mean() < 0.95  # not saturated: a real check
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_state_round_trip_continues_exactly():
    decoder = random_decoder(1)
    z = torch.randn(1, 16, 5, 2, 3, dtype=torch.float64)
    one = TaeStreamingDecoder(decoder)
    whole = torch.cat([one.decode(z[:, :, :2]), one.decode(z[:, :, 2:])], 2)
    first = TaeStreamingDecoder(decoder)
    head = first.decode(z[:, :, :2])
    tensors, meta = first.state_dict()
    second = TaeStreamingDecoder(decoder)
    second.load_state_dict(tensors, meta)
    torch.testing.assert_close(torch.cat([head, second.decode(z[:, :, 2:])], 2), whole, atol=0, rtol=0)
    with pytest.raises(ValueError, match="wan decoder"):
        second.load_state_dict({}, {"started": True, "feat_map": []})


def test_weights_load_strictly(tmp_path):
    reference = random_decoder(2).float()
    weights = {k: v.clone() for k, v in reference.state_dict().items()}
    tgrow = "decoder.7.conv.weight"  # the first TGrow: the published file stores 2x its channels
    assert isinstance(reference.decoder[7], TGrow)
    weights[tgrow] = torch.cat([torch.randn_like(weights[tgrow]), weights[tgrow]])
    weights["encoder.0.weight"] = torch.randn(64, 3, 3, 3)  # the file's encoder is ignored
    good = tmp_path / "taew2_1.safetensors"
    save_file(weights, str(good))
    loaded = load_tae(good, "cpu", torch.float32)
    z = torch.randn(1, 16, 2, 2, 3)
    torch.testing.assert_close(loaded(z), reference(z), atol=0, rtol=0)

    bad = dict(weights)
    del bad["decoder.1.weight"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(PfgenError, match="lacks decoder.1.weight"):
        load_tae(tmp_path / "missing.safetensors", "cpu", torch.float32)
    bad = dict(weights, **{"decoder.1.weight": torch.randn(256, 48, 3, 3)})
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(PfgenError, match=r"decoder.1.weight has shape \(256, 48, 3, 3\)"):
        load_tae(tmp_path / "shape.safetensors", "cpu", torch.float32)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PfgenError, match="cannot read decoder weights"):
        load_tae(tmp_path / "junk.safetensors", "cpu", torch.float32)


def test_generate_with_tae_streams_the_wan_frame_count(tmp_path, capsys):
    import pfgen
    from clirun import run_cli
    from pfgen.video import decoded_frames

    pipe = pfgen.load_pipeline(decoder="tae")
    out = pipe("a kite", num_frames=21, height=32, width=48, generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (1, video_frames_for(6), 32, 48, 3)
    whole = pipe.tae(out.latents)[:, :, 3:]  # the same decoder on the whole sequence at once
    torch.testing.assert_close(torch.from_numpy(out.frames).permute(0, 4, 1, 2, 3), whole, atol=1e-5, rtol=0)
    code, _, err = run_cli(["generate", "--decoder", "tae", "--frames", 9, "--height", 32, "--width", 48, "-o",
                            tmp_path / "t.mp4"], capsys)
    assert code == 0, err
    assert decoded_frames(tmp_path / "t.mp4") == 9
    code, _, err = run_cli(["generate", "--decoder", "tae", "--decoder-weights", tmp_path / "none.safetensors",
                            "-o", tmp_path / "u.mp4"], capsys)
    assert code == 1 and "none.safetensors" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "u.mp4").exists()
    code, _, err = run_cli(["generate", "--decoder-weights", tmp_path / "t.safetensors", "-o", tmp_path / "v.mp4"],
                           capsys)
    assert code == 1 and "--decoder-weights is for the tae decoder" in err


def test_dry_run_accounts_for_the_decoder():
    from pfgen.config import load_config, with_overrides
    from pfgen.memory import plan_memory

    cfg = load_config("causal-forcing-2step")
    plans = {d: plan_memory(with_overrides(cfg, model=dict(decoder=d)), 81, device=torch.device("cuda"),
                            dtype=torch.bfloat16, offload="none") for d in ("wan", "tae")}
    params = sum(p.numel() for p in TinyDecoder().parameters())
    wan, tae = plans["wan"].memory, plans["tae"].memory
    assert wan["decoder_bytes"] == 0 and tae["decoder_bytes"] == 2 * params
    assert 9_000_000 < params < 11_000_000
    assert tae["vae_decode_bytes"] < wan["vae_decode_bytes"] / 2
    assert plans["tae"].peaks["none"] - tae["decoder_bytes"] <= plans["wan"].peaks["none"]
