"""The `pfgen` command line: a thin Typer layer over the API, with lazy heavy imports.

Every user-facing failure is one line on stderr and a non-zero exit: usage errors exit 2, problems with
inputs or resources exit 1. Nothing half-written is left behind (writers use temp files + rename).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pfgen.errors import PfgenError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Long video generation with autoregressive video diffusion and a head-aware KV cache.")

DEFAULT_PROMPT = "a red kite over the sea"
POLICY_HELP = "cache policy: rolling (uniform 21-frame window), full (all history), pyramid (head-aware)"

# Options shared by several commands.
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="YAML config, or a bundled name (tiny, "
                                                                   "self-forcing, ...)")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="Self Forcing / Causal Forcing .pt "
                                                                           "or diffusers folder")]
WanDirOpt = Annotated[Optional[Path], typer.Option("--wan-dir", help="Wan2.1-T2V-1.3B diffusers folder (text "
                                                                     "encoder, tokenizer, VAE)")]
EmaOpt = Annotated[Optional[bool], typer.Option("--ema/--no-ema", help="EMA weights of a .pt checkpoint")]
NumHeadsOpt = Annotated[Optional[int], typer.Option("--num-heads", help="attention heads (default: width / 128)")]
HeightOpt = Annotated[Optional[int], typer.Option("--height", help="video height (multiple of 16)")]
WidthOpt = Annotated[Optional[int], typer.Option("--width", help="video width (multiple of 16)")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto, float32, bfloat16, float16")]


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _load_config(config, policy=None, backend=None, device=None, dtype=None, **model):
    """The config file with the command line's overrides (None = keep the file's value)."""
    from pfgen.config import load_config, with_overrides
    from pfgen.pipeline import POLICIES

    if policy is not None and policy not in POLICIES:
        raise PfgenError(f"unknown policy '{policy}'", f"choose from {', '.join(POLICIES)}")
    cfg = load_config(config)
    model = {k: (str(Path(v).expanduser()) if k in ("checkpoint", "wan_dir") and v else v) for k, v in model.items()}
    return with_overrides(cfg, model=model, cache=dict(policy=policy, backend=backend),
                          runtime=dict(device=device, dtype=dtype))


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p",
                                         help=f"what to generate (default: {DEFAULT_PROMPT!r})"),
    seconds: float = typer.Option(5.0, help="video length in seconds (latent frames round up to whole chunks)"),
    frames: Optional[int] = typer.Option(None, help="video length in frames instead of --seconds"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="mp4 to write (default: pfgen.mp4)"),
    seed: int = typer.Option(0, help="random seed of the noise (with --prompts: prompt i uses seed + i)"),
    prompts: Optional[Path] = typer.Option(
        None, help="batch mode: one prompt per line (blank lines and # comments are skipped), or JSONL (.jsonl) "
                   "with prompt and optional seed, seconds, name per line"),
    output_dir: Optional[Path] = typer.Option(
        None, help="batch mode: folder for one mp4 per prompt and manifest.jsonl; rerun to resume"),
    policies: Optional[str] = typer.Option(
        None, help="batch mode: comma-separated policies, each into its own sub-folder (e.g. rolling,pyramid)"),
    config: ConfigOpt = None,
    policy: Optional[str] = typer.Option(None, help=POLICY_HELP),
    heads: Optional[Path] = typer.Option(None, help="head-type JSON for --policy pyramid"),
    height: HeightOpt = None,
    width: WidthOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    checkpoint: CheckpointOpt = None,
    wan_dir: WanDirOpt = None,
    ema: EmaOpt = None,
    num_heads: NumHeadsOpt = None,
    text_encoder_device: Optional[str] = typer.Option(None, help="e.g. cpu, to keep umT5 off a small GPU"),
    backend: Optional[str] = typer.Option(None, help="attention backend: auto, split, sdpa, triton"),
    save_latents: Optional[Path] = typer.Option(None, help="also write the latents (safetensors)"),
):
    """Generate a video, streaming chunks into an mp4 as they are produced.

    Batch mode: --prompts FILE --output-dir DIR writes one mp4 per prompt and DIR/manifest.jsonl.
    Rerun the same command to resume: finished videos are skipped, interrupted ones redone.
    torchrun --nproc_per_node N -m pfgen generate --prompts ... spreads the videos over N GPUs.
    """
    from pfgen.batch import check_options
    from pfgen.config import check_video_size
    from pfgen.frames import frames_for_seconds
    from pfgen.outputs import check_output_path

    batch = check_options(prompt, prompts, output, output_dir, policies, policy, save_latents)
    if not batch:
        output = check_output_path(output or Path("pfgen.mp4"), ".mp4")
    check_video_size(height, width, option_prefix="--")  # before any model is loaded
    if save_latents is not None:
        save_latents = check_output_path(save_latents)
    cfg = _load_config(config, policy, backend, device, dtype, checkpoint=checkpoint, wan_dir=wan_dir, ema=ema,
                       num_heads=num_heads, text_encoder_device=text_encoder_device)
    if frames is not None and frames < 1:
        raise PfgenError(f"--frames must be at least 1, got {frames}")
    num_frames = frames if frames is not None else frames_for_seconds(seconds, cfg.video.fps)
    if batch:
        from pfgen.batch import BatchRequest, parse_policies, run_batch

        request = BatchRequest(prompts.expanduser(), output_dir.expanduser(), parse_policies(policies), seed,
                               num_frames, heads, height, width)
        return run_batch(cfg, request, _console())
    _run_generate(cfg, DEFAULT_PROMPT if prompt is None else prompt, output, num_frames, seed, heads, height, width,
                  save_latents)


def _run_generate(cfg, prompt, output, num_frames, seed, heads, height, width, save_latents):
    from pfgen.generate import generate_video
    from pfgen.pipeline import load_pipeline
    from pfgen.ui import chunk_progress

    console = _console()
    with console.status("loading model"):
        pipe = load_pipeline(cfg)
    pipe.latent_grid(height or cfg.video.height, width or cfg.video.width)
    pipe.head_types(cfg.cache.policy, heads)  # a wrong head file fails before any output exists
    if cfg.model.checkpoint is None:
        console.print("[yellow]note:[/] embedded tiny model with random weights: the video is noise-like "
                      "(give --checkpoint and --wan-dir for real weights)")
    with chunk_progress(console, cfg.video.fps) as on_chunk:
        stats = generate_video(pipe, prompt, output, num_frames=num_frames, seed=seed, heads=heads, height=height,
                               width=width, save_latents=save_latents, on_chunk=on_chunk)
    console.print(stats.summary())


@app.command("inspect-cache")
def inspect_cache(
    config: ConfigOpt = None,
    heads: Optional[Path] = typer.Option(None, help="head-type JSON (default: the config's)"),
    policy: Optional[str] = typer.Option(None, help=POLICY_HELP + " (default: pyramid when head types exist)"),
    frame: int = typer.Option(100, help="query frame (latent) to show"),
    height: int = typer.Option(480, help="video height"),
    width: int = typer.Option(832, help="video width"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    plot: Optional[Path] = typer.Option(None, help="draw the pyramid (heads x history frames) to a PNG"),
):
    """Show what every head attends to at one query frame, token budgets and K/V memory."""
    from pfgen.inspect import cache_report, pyramid_rows
    from pfgen.inspect import inspect_geometry

    cfg = _load_config(config, policy)
    if frame < 0:
        raise PfgenError(f"--frame must be zero or more, got {frame}")
    if plot is not None:
        plot = Path(plot)
        from pfgen.outputs import check_output_path

        check_output_path(plot, ".png")
    types, head_dim, grid = inspect_geometry(cfg, heads, policy, height, width)
    report = cache_report(cfg.cache, types, frame, grid, head_dim, cfg.sampling.frames_per_chunk)
    if plot is not None:
        from pfgen.plots import plot_cache_pyramid

        plot_cache_pyramid(pyramid_rows(report), frame - frame % cfg.sampling.frames_per_chunk
                           + cfg.sampling.frames_per_chunk, plot, f"frame {frame}: what each head reads")
    if as_json:
        typer.echo(json.dumps(report))
    else:
        from pfgen.ui import print_cache_report

        print_cache_report(_console(), report)


@app.command("profile-heads")
def profile_heads(
    output: Path = typer.Option(..., "--output", "-o", help="head-type JSON to write"),
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    wan_dir: WanDirOpt = None,
    ema: EmaOpt = None,
    num_heads: NumHeadsOpt = None,
    prompts: Optional[Path] = typer.Option(None, help="calibration prompts, one per line (default: 32 built in)"),
    seconds: float = typer.Option(15.0, help="video length per calibration prompt"),
    seed: int = typer.Option(0, help="noise seed of the first prompt (prompt i uses seed + i)"),
    height: HeightOpt = None,
    width: WidthOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    stats_out: Optional[Path] = typer.Option(None, help="also save the frame-logit statistics (safetensors)"),
    from_stats: Optional[Path] = typer.Option(None, help="classify saved statistics without loading a model"),
    work_dir: Optional[Path] = typer.Option(None, help="per-prompt statistics, for resuming (default: OUTPUT.parts)"),
    threshold: list[str] = typer.Option([], "--threshold", "-t", help="classifier threshold, NAME=VALUE (repeat)"),
    plot: Optional[Path] = typer.Option(None, help="PNG: head-type map and mean lag profile per type"),
    compare: Optional[Path] = typer.Option(None, help="another head-type JSON to report agreement with"),
):
    """Sort every self-attention head into anchor / wave / veil from calibration runs (or saved statistics)."""
    from pfgen.config import check_video_size
    from pfgen.outputs import check_output_path
    from pfgen.profile.run import ProfileRequest, classify_statistics, collect_statistics, compare_with, \
        parse_thresholds

    thresholds = parse_thresholds(threshold)
    check_output_path(output, ".json")
    for path, suffix in ((stats_out, ".safetensors"), (plot, ".png")):
        if path is not None:
            check_output_path(path, suffix)
    check_video_size(height, width, option_prefix="--")
    cfg = _load_config(config, device=device, dtype=dtype, checkpoint=checkpoint, wan_dir=wan_dir, ema=ema,
                       num_heads=num_heads)
    req = ProfileRequest(output, prompts, seconds, seed, stats_out, from_stats, work_dir, tuple(threshold), plot,
                         compare, height, width)
    from pfgen.ui import calibration_progress, print_agreement, print_head_counts

    console = _console()
    if from_stats is None:
        with calibration_progress(console) as progress:
            stats = collect_statistics(cfg, req, progress)
    else:
        stats = collect_statistics(cfg, req)
    heads, result = classify_statistics(stats, thresholds, cfg.model.name if config else None)
    heads.save(output)
    print_head_counts(console, heads)
    if plot is not None:
        from pfgen.plots import plot_head_types

        plot_head_types(heads.types, result.lag_profiles_by_type(), plot)
    if compare is not None:
        print_agreement(console, compare_with(heads, compare), compare)
    console.print(f"wrote {output}: {heads.counts()}")


@app.command()
def convert(
    checkpoint: Path = typer.Argument(..., help="Self Forcing / Causal Forcing .pt (or Wan2.1 weights)"),
    output: Path = typer.Option(..., "--output", "-o", help="diffusers transformer folder to create"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="EMA weights of a .pt checkpoint"),
    num_heads: NumHeadsOpt = None,
    dtype: str = typer.Option("float32", help="dtype of the written tensors (float32 keeps them bit-exact)"),
):
    """Write a diffusers `WanTransformer3DModel` folder (config.json + safetensors) from a checkpoint."""
    from pfgen.config import ModelConfig
    from pfgen.pipeline import resolve_dtype
    from pfgen.wan.checkpoint import load_transformer, save_diffusers

    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise PfgenError(f"output {output} already exists", "choose a new folder")
    if not output.parent.exists():
        raise PfgenError(f"output folder {output.parent} does not exist")
    import torch

    model_cfg = ModelConfig(name="convert", checkpoint=str(checkpoint), ema=ema, num_heads=num_heads)
    model = load_transformer(model_cfg, resolve_dtype(dtype, torch.device("cpu")))
    save_diffusers(model, output)
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    _console().print(f"wrote {output}: {params / 1e6:.1f} M parameters, {dtype}, {c.num_layers} layers, "
                     f"width {c.num_attention_heads * c.attention_head_dim} ({c.num_attention_heads} heads x "
                     f"{c.attention_head_dim}), FFN {c.ffn_dim}, text dim {c.text_dim}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every expected failure into one line and an exit code."""
    try:
        code = app(args=argv, prog_name="pfgen", standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("error: interrupted (no partial output was kept)", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except PfgenError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        if _is_usage_error(exc):
            ctx = getattr(exc, "ctx", None)
            command = ctx.command.name if ctx is not None and ctx.command is not None else None
            hint = f" (see pfgen {command} --help)" if command and command != "pfgen" else " (see pfgen --help)"
            typer.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(2)
        if _is_oom(exc):
            typer.echo("error: out of GPU memory (lower --height/--width, use --text-encoder-device cpu, "
                       "or a smaller --policy budget)", err=True)
            sys.exit(1)
        raise
    if code == 130:  # Typer turns Ctrl-C into a return code; the writers have removed their partial files
        typer.echo("error: interrupted (no partial output was kept)", err=True)
    sys.exit(code if isinstance(code, int) else 0)


def _is_usage_error(exc: Exception) -> bool:
    """Click's usage errors (bad option, bad value, missing argument), whichever click Typer bundles."""
    return hasattr(exc, "format_message") and any(c.__name__ == "UsageError" for c in type(exc).__mro__)


def _is_oom(exc: Exception) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)
