#!/usr/bin/env python
"""pfgen's tiny decoder (`--decoder tae`) against the reference taehv.py, at the same random weights.

The reference (github madebyollin/taehv, `taehv.py`, a local copy given with --reference) decodes the whole
latent sequence at once (`TAEHV.decode_video`, parallel); pfgen decodes it chunk by chunk through
`TaeStreamingDecoder` (MemBlock state carried between chunks, the first chunk drops 3 frames). Weights are
seeded random, written as a safetensors file with the reference's own key names, and loaded by both.

    python scripts/compare_tae.py --reference /path/to/taehv [--frames 14] [--chunk 3] [--json tae.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="folder holding the reference taehv.py")
    ap.add_argument("--frames", type=int, default=14, help="latent frames")
    ap.add_argument("--chunk", type=int, default=3, help="latent frames per streamed chunk")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(args.reference).expanduser()))
    import taehv  # the reference

    from safetensors.torch import save_file

    from pfgen.wan.tae import TaeStreamingDecoder, load_tae

    torch.manual_seed(args.seed)
    ref = taehv.TAEHV(checkpoint_path=None).eval()  # Wan 2.1 shape: 16 channels, patch 1
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 1 / max(1, p[0].numel()) ** 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "taew2_1_random.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
        ours = load_tae(path, "cpu", torch.float32)
    latents = torch.randn(1, 16, args.frames, args.height // 8, args.width // 8)
    with torch.no_grad():
        expected = ref.decode_video(latents.transpose(1, 2), parallel=True, show_progress_bar=False)
        expected = expected.transpose(1, 2)  # NTCHW -> (B, 3, F, H, W), in [0, 1] as the reference gives
    stream = TaeStreamingDecoder(ours)
    chunks = [stream.decode(latents[:, :, t:t + args.chunk]) for t in range(0, args.frames, args.chunk)]
    got = (torch.cat(chunks, 2) + 1) / 2  # pfgen's [-1, 1] frames in the reference's [0, 1] units
    diff = (got - expected).abs()
    result = dict(frames=args.frames, chunk=args.chunk, size=[args.height, args.width],
                  video_frames=[got.shape[2], expected.shape[2]], max_abs_diff=diff.max().item(),
                  mean_abs_diff=diff.mean().item(), ref_rms=expected.pow(2).mean().sqrt().item(),
                  unclamped_fraction=((expected > 0) & (expected < 1)).float().mean().item(),
                  per_chunk_frames=[c.shape[2] for c in chunks])
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if got.shape == expected.shape and result["max_abs_diff"] <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
