"""The `pfgen` command line: a thin Typer layer over the API, with lazy heavy imports.

Every user-facing failure is one line on stderr and a non-zero exit: usage errors exit 2, problems with
inputs or resources exit 1. Nothing half-written is left behind (writers use temp files + rename).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from pfgen.errors import Interrupted, PfgenError
from pfgen.frames import MAX_SECONDS

_VALUE_NAMES = {"str": "TEXT", "int": "N", "float": "NUMBER", "path": "PATH"}


def _plain_types(display):
    """typer prints a type after every option: `--json <bool>`, `--help <bool>`, `-t <list[str]>`. A flag takes
    no value, so it shows none; an option without its own metavar shows its value's kind (TEXT, N, PATH)."""
    def display_type_rich(self, ctx):
        if self.metavar is not None:
            return self.metavar
        if self.is_flag:
            return ""
        kind = display(self, ctx).strip("<>").removeprefix("list[").removesuffix("]").removesuffix("...")
        return _VALUE_NAMES.get(kind.lower(), kind.upper())

    return display_type_rich


def _plain_usage_name(self) -> str:
    """An argument in the usage line as click writes it, `CHECKPOINT` or `VIDEO...`, not `{CHECKPOINT}`."""
    name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
    return name + ("..." if self.nargs != 1 else "")


typer.core.TyperOption.display_type_rich = _plain_types(typer.core.TyperOption.display_type_rich)
typer.core.TyperArgument.display_type_rich = lambda self, ctx: ""  # its name column already says what it is
typer.core.TyperArgument._usage_display_name = _plain_usage_name

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Long video generation with autoregressive video diffusion and a head-aware KV cache.")

DEFAULT_PROMPT = "a red ball circling on a navy background"  # a world prompt: the embedded model knows it
POLICY_HELP = "cache policy: rolling (uniform 21-frame window), full (all history), pyramid (head-aware)"

# Panels of `--help` (generate uses all of them; the shared options below bring theirs to other commands).
MODEL, LENGTH, CACHE, STORY, OUTPUTS, RUNTIME = ("Model", "Length and size", "Cache", "Prompt and story",
                                                 "Outputs (and batch mode)", "Runtime")

# Options shared by several commands.
ConfigOpt = Annotated[Optional[str], typer.Option("--config", metavar="NAME|FILE", rich_help_panel=MODEL,
                                                  help="bundled config (tiny, self-forcing, ...) or YAML file")]
CheckpointOpt = Annotated[Optional[str], typer.Option("--checkpoint", metavar="PATH|REF", rich_help_panel=MODEL,
                                                      help="Self Forcing / Causal Forcing .pt or diffusers folder, "
                                                           "or Hub reference org/name or org/name:file, each with "
                                                           "an optional @revision")]
WanDirOpt = Annotated[Optional[str], typer.Option("--wan-dir", metavar="DIR|REF", rich_help_panel=MODEL,
                                                  help="Wan2.1-T2V-1.3B diffusers folder (text encoder, tokenizer, "
                                                       "VAE), or Hub reference org/name (optional @revision)")]
EmaOpt = Annotated[Optional[bool], typer.Option("--ema/--no-ema", rich_help_panel=MODEL,
                                                help="EMA weights of a .pt checkpoint")]
NumHeadsOpt = Annotated[Optional[int], typer.Option("--num-heads", metavar="N", rich_help_panel=MODEL,
                                                    help="attention heads (default: width / 128)")]
HeightOpt = Annotated[Optional[int], typer.Option("--height", metavar="PX", rich_help_panel=LENGTH,
                                                  help="video height (multiple of 16)")]
WidthOpt = Annotated[Optional[int], typer.Option("--width", metavar="PX", rich_help_panel=LENGTH,
                                                 help="video width (multiple of 16)")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", metavar="NAME", rich_help_panel=RUNTIME,
                                                  help="auto, cpu, cuda, cuda:N")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", metavar="NAME", rich_help_panel=RUNTIME,
                                                 help="auto, float32, bfloat16, float16")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", metavar="N", rich_help_panel=RUNTIME,
                                                   help="CPU threads (default: see README, CPU threads)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=RUNTIME,
                                        help="print only errors (and --json)")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", rich_help_panel=RUNTIME,
                                          help="also show the libraries' loading bars and logs")]


# Config keys the command line sets, named as the user typed them in errors.
OPTION_NAMES = {"cache.policy": "--policy", "cache.backend": "--backend", "runtime.device": "--device",
                "runtime.dtype": "--dtype", "runtime.threads": "--threads", "model.num_heads": "--num-heads",
                "model.text_encoder_device": "--text-encoder-device", "runtime.offload": "--offload",
                "model.decoder": "--decoder", "model.decoder_weights": "--decoder-weights",
                "cache.recache": "--recache-mode", "cache.rope": "--rope"}
LoraOpt = Annotated[Optional[list[str]], typer.Option(
    "--lora", metavar="FILE[:SCALE]", rich_help_panel=MODEL,
    help="merge a PEFT or diffusers LoRA (file, folder or Hub reference); repeatable, added to the config's "
         "model.loras")]


def _console(quiet: bool = False):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def _load_config(config, policy=None, backend=None, device=None, dtype=None, threads=None, offload=None, *,
                 lora=None, recache_mode=None, rope=None, **model):
    """The config file with the command line's overrides (None = keep the file's value), validated."""
    from pfgen.config import load_config, with_overrides
    from pfgen.hub import OPTIONS, check_source, is_reference
    from pfgen.wan.lora import parse_lora_option

    for key in ("checkpoint", "wan_dir"):  # as typed (`org/` is no path to normalise)
        check_source(model.get(key), OPTIONS[key])
    typed_weights = model.get("decoder_weights")  # checked below, after the config's rules, as typed
    cfg = load_config(config)
    paths = ("checkpoint", "wan_dir", "decoder_weights")
    model = {k: (str(Path(v).expanduser()) if k in paths and v and not is_reference(v) else v)
             for k, v in model.items()}
    if lora:
        model["loras"] = cfg.model.loras + tuple(parse_lora_option(item) for item in lora)
    cfg = with_overrides(cfg, OPTION_NAMES, model=model,
                         cache=dict(policy=policy, backend=backend, recache=recache_mode, rope=rope),
                         runtime=dict(device=device, dtype=dtype, threads=threads, offload=offload))
    # Every weights source is an existing path or a well-formed reference, checked here (so --dry-run too), named
    # as the user gave it; references are fetched only at load.
    given = len(lora or ())
    for i, item in enumerate(cfg.model.loras):
        check_source(item.path, "--lora" if i >= len(cfg.model.loras) - given else "model.loras")
    if typed_weights is not None:  # (weights without --decoder tae are refused by the config's rules, first)
        check_source(typed_weights, "--decoder-weights")
    else:
        check_source(cfg.model.decoder_weights, "model.decoder_weights")
    return cfg


def _version(value: bool) -> None:
    if value:
        from pfgen import __version__

        typer.echo(f"pfgen {__version__}")
        raise typer.Exit()


@app.callback()
def _app(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """Long video generation with autoregressive video diffusion and a head-aware KV cache."""


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", metavar="TEXT", rich_help_panel=STORY,
                                         help=f"what to generate (default: {DEFAULT_PROMPT!r})"),
    then: list[str] = typer.Option([], "--then", metavar="S TEXT", rich_help_panel=STORY,
                                   help="switch to TEXT at the first chunk boundary at or after S seconds (repeat)"),
    timeline: Optional[Path] = typer.Option(None, metavar="FILE", rich_help_panel=STORY,
                                            help="YAML/JSON list of {at: seconds, prompt: text}, the first at 0"),
    recache: bool = typer.Option(True, "--recache/--no-recache", rich_help_panel=STORY,
                                 help="at a switch, re-encode the cached history under the new prompt"),
    interactive: bool = typer.Option(False, "--interactive", rich_help_panel=STORY,
                                     help="read new prompts from stdin while generating"),
    resume: Optional[Path] = typer.Option(None, metavar="FILE", rich_help_panel=STORY,
                                          help="continue a run saved with --save-state (--seconds more)"),
    save_state: Optional[Path] = typer.Option(None, metavar="FILE", rich_help_panel=STORY,
                                              help="save the run to continue it later (--resume)"),
    save_state_every: int = typer.Option(0, metavar="N", rich_help_panel=STORY,
                                         help="also save the state every N chunks"),
    seed: Optional[int] = typer.Option(None, metavar="N", rich_help_panel=STORY,
                                       help="noise seed, default 0 (with --prompts: prompt i uses seed + i; a "
                                            "resumed run goes on with the saved run's)"),
    seconds: Optional[float] = typer.Option(None, metavar="S", rich_help_panel=LENGTH,
                                            help="video length in seconds (default 5; see README for the rounding)"),
    frames: Optional[int] = typer.Option(None, metavar="N", rich_help_panel=LENGTH,
                                         help="video length in frames instead of --seconds"),
    force: bool = typer.Option(False, "--force", rich_help_panel=LENGTH,
                               help=f"allow videos longer than {MAX_SECONDS // 60} minutes"),
    height: HeightOpt = None,
    width: WidthOpt = None,
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    wan_dir: WanDirOpt = None,
    ema: EmaOpt = None,
    num_heads: NumHeadsOpt = None,
    text_encoder_device: Optional[str] = typer.Option(None, metavar="NAME", rich_help_panel=MODEL,
                                                      help="e.g. cpu, to keep umT5 off a small GPU"),
    policy: Optional[str] = typer.Option(None, metavar="NAME", rich_help_panel=CACHE, help=POLICY_HELP),
    heads: Optional[Path] = typer.Option(None, metavar="FILE", rich_help_panel=CACHE,
                                         help="head-type JSON for --policy pyramid"),
    backend: Optional[str] = typer.Option(None, metavar="NAME", rich_help_panel=CACHE,
                                          help="attention backend: auto, split, sdpa, triton"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE", rich_help_panel=OUTPUTS,
                                          help="mp4 to write (default: pfgen.mp4)"),
    overwrite: bool = typer.Option(False, "--overwrite", "-y", rich_help_panel=OUTPUTS,
                                   help="replace existing output files"),
    save_latents: Optional[Path] = typer.Option(None, metavar="FILE", rich_help_panel=OUTPUTS,
                                                help="also write the latents (.safetensors)"),
    preview: Optional[Path] = typer.Option(None, metavar="FILE", rich_help_panel=OUTPUTS,
                                           help="the newest frame (.jpg/.png), replaced after every chunk"),
    frames_dir: Optional[Path] = typer.Option(None, metavar="DIR", rich_help_panel=OUTPUTS,
                                              help="every frame as a PNG in this folder (-o then optional)"),
    as_json: bool = typer.Option(False, "--json", rich_help_panel=OUTPUTS,
                                 help="one JSON object on stdout: the video's summary, or with --dry-run the plan"),
    prompts: Optional[Path] = typer.Option(None, metavar="FILE", rich_help_panel=OUTPUTS,
                                           help="batch mode: one prompt per line (# comments), or JSONL (.jsonl) "
                                                "with prompt and optional seed, seconds, name"),
    output_dir: Optional[Path] = typer.Option(None, metavar="DIR", rich_help_panel=OUTPUTS,
                                              help="batch mode: one mp4 per prompt and manifest.jsonl; rerun to "
                                                   "resume"),
    policies: Optional[str] = typer.Option(None, metavar="A,B", rich_help_panel=OUTPUTS,
                                           help="batch mode: policies, each into its own sub-folder (e.g. "
                                                "rolling,pyramid)"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    offload: Optional[str] = typer.Option(None, metavar="MODE", rich_help_panel=RUNTIME,
                                          help="auto (least that fits the GPU), none, text-encoder (umT5 visits "
                                               "the GPU only to encode), model (every component)"),
    dry_run: bool = typer.Option(False, "--dry-run", rich_help_panel=RUNTIME,
                                 help="print the memory plan and exit; loads no weights"),
    decoder: Optional[str] = typer.Option(None, metavar="NAME", rich_help_panel=MODEL,
                                          help="wan (the Wan VAE) or tae (the tiny TAEHV decoder, fast)"),
    decoder_weights: Optional[str] = typer.Option(None, metavar="PATH|REF", rich_help_panel=MODEL,
                                                  help="tae weights, a path or Hub reference (default: "
                                                       "taew2_1 of madebyollin/taehv)"),
    lora: LoraOpt = None,
    image: Optional[Path] = typer.Option(None, metavar="FILE", rich_help_panel=STORY,
                                         help="image-to-video: the first frame (frame-wise students)"),
    recache_mode: Optional[str] = typer.Option(None, metavar="MODE", rich_help_panel=CACHE,
                                               help="what a switch re-encodes: all (every held chunk) or window "
                                                    "(LongLive: the window, the sink keeps its K/V)"),
    rope: Optional[str] = typer.Option(None, metavar="MODE", rich_help_panel=CACHE,
                                       help="temporal RoPE of cached keys: absolute or relative (slot in the "
                                            "window, LongLive's infinite attention)"),
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
):
    """Generate a video, streaming chunks into an mp4 as they are produced.

    Batch mode: --prompts FILE --output-dir DIR writes one mp4 per prompt and
    DIR/manifest.jsonl. Rerun the same command to resume: finished videos are
    checked and skipped, interrupted or damaged ones redone. torchrun
    --nproc_per_node N -m pfgen generate --prompts ... spreads the videos over
    N GPUs.
    """
    from pfgen.batch import check_options
    from pfgen.config import check_seed, check_video_size
    from pfgen.frames import length_in_frames
    from pfgen.heads import HeadTypes, head_type_source
    from pfgen.memory import plan_lines
    from pfgen.outputs import check_output_path, output_locks
    from pfgen.pipeline import plan_for_run
    from pfgen.storyopts import StoryOptions, check_fit, check_outputs_fit, check_story_options, make_story
    from pfgen.timeline import Entry

    story = StoryOptions(then, timeline, recache, resume, save_state, save_state_every, preview, frames_dir,
                         interactive)
    batch = check_options(prompt, prompts, output, output_dir, policies, policy, save_latents)
    if batch and story.used():
        raise PfgenError(f"{story.used()[0]} is for a single video", "leave it out in batch mode")
    if batch and as_json and not dry_run:
        raise PfgenError("--json is for single videos", "batch mode records every video in manifest.jsonl")
    if seed is not None:
        check_seed(seed)
    check_video_size(height, width, option_prefix="--")
    cfg = _load_config(config, policy, backend, device, dtype, threads, offload, checkpoint=checkpoint,
                       wan_dir=wan_dir, ema=ema, num_heads=num_heads, text_encoder_device=text_encoder_device,
                       decoder=decoder, decoder_weights=decoder_weights, lora=lora, recache_mode=recache_mode,
                       rope=rope)
    _check_model_options(cfg, heads=heads, wan_dir=wan_dir, num_heads=num_heads,
                         text_encoder_device=text_encoder_device, policies=policies)
    num_frames = length_in_frames(seconds, frames, cfg.video.fps, force)
    if image is not None:
        _check_image(cfg, image, batch, resume, height, width)
    if batch:
        if dry_run:  # the plan of each video, for the device asked, whether here or not
            plan = plan_for_run(cfg, num_frames, heads=heads, height=height, width=width, available=False,
                                image=image is not None)
            return typer.echo(json.dumps(plan.to_json()) if as_json else "\n".join(plan_lines(plan)))
        from pfgen.batch import BatchRequest, parse_policies, run_batch

        request = BatchRequest(prompts.expanduser(), output_dir.expanduser(), parse_policies(policies), seed or 0,
                               num_frames, heads, height, width, recache)
        return run_batch(cfg, request, _console(quiet), verbose)
    # One video: every check of the real run, --dry-run included, before any weight loads.
    source = head_type_source(cfg.cache, cfg.cache.policy, heads)  # the head file is read once, and now
    heads = source if isinstance(source, HeadTypes) else None
    if save_latents is not None:
        save_latents = check_output_path(save_latents, ".safetensors", overwrite=overwrite, option="--save-latents")
    entries, state, output = check_story_options(story, prompt, output, save_latents, overwrite, seed)
    if entries is None and state is None:
        entries = [Entry(0.0, DEFAULT_PROMPT)]
    height, width, start = check_fit(cfg, entries, state, num_frames, height, width)
    plan = plan_for_run(cfg, num_frames, heads=heads, height=height, width=width, available=not dry_run,
                        image=image is not None, start=start, commit_last=story.save_state is not None)
    check_outputs_fit(story, plan, save_latents)
    if dry_run:  # the plan of this video, for the device asked, whether here or not
        return typer.echo(json.dumps(plan.to_json()) if as_json else "\n".join(plan_lines(plan)))
    console = _console(quiet)
    # a second run writing any of these is refused with this one's pid
    with output_locks(files=(output, save_latents, story.save_state, story.preview), folders=(story.frames_dir,)):
        _run_generate(cfg, output, num_frames, seed or 0, heads, height, width, save_latents, plan, console, as_json,
                      verbose, (story.frames_dir, story.preview), story=make_story(story, entries, console),
                      resume=state, save_state=story.save_state, save_state_every=story.save_state_every,
                      image=image)


def _run_generate(cfg, output, num_frames, seed, heads, height, width, save_latents, plan, console, as_json, verbose,
                  files, **story):
    from pfgen.config import with_overrides
    from pfgen.generate import generate_video
    from pfgen.memory import compare_line
    from pfgen.pipeline import load_pipeline
    from pfgen.sinks import FrameFiles
    from pfgen.ui import chunk_progress, library_output
    from pfgen.words import format_bytes

    with console.status("loading model"), library_output(verbose):
        pipe = load_pipeline(with_overrides(cfg, runtime=dict(offload=plan.offload)))
    pipe.latent_grid(height or cfg.video.height, width or cfg.video.width)
    types = pipe.head_types(cfg.cache.policy, heads)  # head types for another model fail before any output exists
    if story["resume"] is not None:
        story["resume"].check_model(pipe, types)
    from pfgen.wan.tiny import noise_note

    if note := noise_note(cfg.model):
        console.print(note, soft_wrap=True)
    files = FrameFiles(*files) if any(f is not None for f in files) else None
    try:
        with chunk_progress(console, cfg.video.fps) as on_chunk:
            stats = generate_video(pipe, None, output, num_frames=num_frames, seed=seed, heads=heads, height=height,
                                   width=width, save_latents=save_latents, on_chunk=on_chunk, files=files, **story)
    except KeyboardInterrupt as exc:
        raise Interrupted(getattr(exc, "kept", None)) from None
    console.print(stats.summary(), highlight=False, markup=False, soft_wrap=True)
    if stats.state_bytes is not None:
        console.print(f"saved state {story['save_state']}: {format_bytes(stats.state_bytes)}", highlight=False,
                      soft_wrap=True)
    console.print(compare_line(plan, stats.peak_memory_bytes, stats.memory_kind, pipe.state.cache.nbytes()),
                  highlight=False, markup=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(stats.to_json()))


def _check_image(cfg, image: Path, batch: bool, resume, height, width) -> None:
    """--image: one video of a frame-wise student, not resumed, and a readable image at least the video's size."""
    from pfgen.image import check_image_run, load_image

    if batch:
        raise PfgenError("--image is for a single video", 'give each JSONL row its own "image"')
    check_image_run(cfg.sampling.frames_per_chunk, resume is not None)
    load_image(image, height or cfg.video.height, width or cfg.video.width)


def _check_model_options(cfg, *, heads, wan_dir, num_heads, text_encoder_device, policies) -> None:
    """Options that would do nothing: refused when the run cannot be what was asked, else one warning line."""
    from pfgen.world.model import RANDOM, is_embedded

    built_in = cfg.model.random_weights
    if built_in and cfg.model.name != RANDOM:
        raise PfgenError(f"config '{cfg.model.name}' needs real weights",
                         "pass --checkpoint and --wan-dir (see README, Real weights), or drop --config for the "
                         "embedded model")
    if wan_dir is not None and (built_in or is_embedded(cfg.model)):
        raise PfgenError("--wan-dir needs --checkpoint", "give the student's weights too, or drop --wan-dir")
    if not built_in and cfg.model.wan_dir is None:
        raise PfgenError("--checkpoint needs --wan-dir", "the Wan2.1 folder with text_encoder/, tokenizer/, vae/")
    if built_in:
        for option, value in (("--num-heads", num_heads), ("--text-encoder-device", text_encoder_device)):
            if value is not None:
                warnings.warn(f"{option} does nothing for the random test model")
    pyramid = cfg.cache.policy == "pyramid" or (policies is not None and "pyramid" in policies)
    if heads is not None and not pyramid:
        warnings.warn(f"--heads does nothing under --policy {cfg.cache.policy} (it is for pyramid)")


@app.command("inspect-cache")
def inspect_cache(
    config: ConfigOpt = None,
    heads: Optional[Path] = typer.Option(None, help="head-type JSON (default: the config's)"),
    policy: Optional[str] = typer.Option(None, help=POLICY_HELP + " (default: pyramid when head types exist)"),
    frame: float = typer.Option(100, metavar="N", help="query frame (latent) to show, any size (e.g. 1e9)"),
    height: Optional[int] = typer.Option(None, help="video height (default: the config's)"),
    width: Optional[int] = typer.Option(None, help="video width (default: the config's)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    plot: Optional[Path] = typer.Option(None, help="draw the pyramid (heads x the sink and the last 100 "
                                                   "frames) to a PNG"),
    overwrite: bool = typer.Option(False, "--overwrite", "-y", help="replace an existing --plot file"),
):
    """Show what every head attends to at one query frame, token budgets and K/V memory (on stdout)."""
    from pfgen.inspect import cache_report, check_frame, inspect_geometry, pyramid_columns, pyramid_rows

    frame = check_frame(frame)
    cfg = _load_config(config, policy)
    if plot is not None:
        from pfgen.outputs import check_output_path

        plot = check_output_path(plot, ".png", overwrite=overwrite, option="--plot")
    types, head_dim, grid = inspect_geometry(cfg, heads, policy, cfg.video.height if height is None else height,
                                             cfg.video.width if width is None else width)
    per_chunk = cfg.sampling.frames_per_chunk
    report = cache_report(cfg.cache, types, frame, grid, head_dim, per_chunk)
    if plot is not None:
        from pfgen.plots import plot_cache_pyramid

        plot_cache_pyramid(pyramid_rows(report), pyramid_columns(report, per_chunk), plot,
                           f"frame {frame}: what each head reads")
    if as_json:
        typer.echo(json.dumps(report))
    else:
        from rich.console import Console

        from pfgen.ui import print_cache_report

        print_cache_report(Console(), report)


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
    keep_parts: bool = typer.Option(False, "--keep-parts", help="keep the per-prompt statistics after success"),
    threshold: list[str] = typer.Option([], "--threshold", "-t", help="classifier threshold, NAME=VALUE (repeat)"),
    plot: Optional[Path] = typer.Option(None, help="PNG: head-type map and mean lag profile per type"),
    compare: Optional[Path] = typer.Option(None, help="a reference head-type JSON (e.g. the published labels): "
                                                      "agreement, and per type the recall and precision of the "
                                                      "new labels against it"),
    overwrite: bool = typer.Option(False, "--overwrite", "-y", help="replace existing output files"),
    threads: ThreadsOpt = None,
):
    """Sort every self-attention head into anchor / wave / veil from calibration runs (or saved statistics)."""
    from pfgen.config import check_video_size
    from pfgen.profile.run import ProfileRequest, check_request, classify_statistics, collect_statistics, \
        compare_with, finish, parse_thresholds

    thresholds = parse_thresholds(threshold)
    req = check_request(ProfileRequest(output, prompts, seconds, seed, stats_out, from_stats, work_dir,
                                       tuple(threshold), plot, compare, height, width, keep_parts,
                                       overwrite=overwrite))
    check_video_size(height, width, option_prefix="--")
    cfg = _load_config(config, device=device, dtype=dtype, threads=threads, checkpoint=checkpoint, wan_dir=wan_dir,
                       ema=ema, num_heads=num_heads)
    from pfgen.ui import calibration_progress, print_agreement, print_head_counts
    from pfgen.words import count

    console = _console()
    if from_stats is None:
        with calibration_progress(console) as progress:
            stats = collect_statistics(cfg, req, progress)
    else:
        stats = collect_statistics(cfg, req)
    heads, result = classify_statistics(stats, thresholds, cfg.model.name if config else None)
    if req.plot is not None:
        from pfgen.plots import plot_head_types

        plot_head_types(heads.types, result.lag_profiles_by_type(), req.plot)
    heads.save(req.output)  # last: a run that fails leaves no head-type file
    print_head_counts(console, heads)
    if req.reference is not None:
        print_agreement(console, compare_with(heads, req), compare)
    finish(req)
    totals = heads.counts()
    kinds = ", ".join(f"{totals[kind]} {kind}" for kind in ("anchor", "wave", "veil"))
    console.print(f"wrote {req.output}: {kinds} of {count(heads.layers * heads.heads, 'head')}", highlight=False,
                  soft_wrap=True)


@app.command()
def convert(
    checkpoint: str = typer.Argument(..., metavar="CHECKPOINT", help="Self Forcing / Causal Forcing .pt (or Wan2.1 "
                                                                     "weights), or a Hub reference org/name:file "
                                                                     "(optional @revision)"),
    output: Path = typer.Option(..., "--output", "-o", help="diffusers transformer folder to create"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="EMA weights of a .pt checkpoint"),
    num_heads: NumHeadsOpt = None,
    dtype: str = typer.Option("float32", help="dtype of the written tensors (float32 keeps them bit-exact)"),
    overwrite: bool = typer.Option(False, "--overwrite", "-y", help="replace an existing output folder"),
):
    """Write a diffusers `WanTransformer3DModel` folder (config.json + safetensors) from a checkpoint."""
    import torch

    from pfgen.config import ModelConfig
    from pfgen.hub import check_source, resolve_model
    from pfgen.outputs import check_folder_writable
    from pfgen.pipeline import resolve_dtype
    from pfgen.wan.checkpoint import check_diffusers_output, load_transformer, save_diffusers

    output = output.expanduser()
    check_diffusers_output(output, overwrite)
    check_folder_writable(output.parent)
    check_source(checkpoint, "CHECKPOINT")
    model_cfg = resolve_model(ModelConfig(name="convert", checkpoint=str(checkpoint), ema=ema, num_heads=num_heads))
    model = load_transformer(model_cfg, resolve_dtype(dtype, torch.device("cpu")))
    save_diffusers(model, output, overwrite)
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    from pfgen.words import count

    _console().print(f"wrote {output}: {params / 1e6:.1f} M parameters, {dtype}, {count(c.num_layers, 'layer')}, "
                     f"width {c.num_attention_heads * c.attention_head_dim} ({count(c.num_attention_heads, 'head')} x "
                     f"{c.attention_head_dim}), FFN {c.ffn_dim}, text dim {c.text_dim}", highlight=False,
                     soft_wrap=True)  # one line, whatever the terminal or log width


@app.command()
def evaluate(
    videos: list[Path] = typer.Argument(..., metavar="VIDEO", help="mp4 files, or batch output folders "
                                                                      "(policy sub-folders are paired by video name)",
                                        show_default=False),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
    plot: Optional[Path] = typer.Option(None, help="PNG with one curve per metric over time, one line per video"),
    window: float = typer.Option(5.0, help="window length in seconds"),
    deep: bool = typer.Option(False, help="also CLIP scores (prompt similarity, subject consistency) from "
                                          "locally cached weights"),
    prompt: Optional[str] = typer.Option(None, help="--deep: the prompt (default: manifest.jsonl or the mp4's "
                                                    "metadata)"),
    clip_model: Optional[str] = typer.Option(None, help="--deep: Hugging Face id or local folder (default: "
                                                        "openai/clip-vit-base-patch32)"),
    overwrite: bool = typer.Option(False, "--overwrite", "-y", help="replace an existing --plot file"),
):
    """Metrics per time window (brightness, colour drift, flicker, sharpness, motion, repetition) and policy
    differences; see docs/evaluate.md."""
    from pfgen.evaluate import require_opencv

    require_opencv()
    if plot is not None:
        from pfgen.evaluate.plot import require_matplotlib
        from pfgen.outputs import check_output_path

        require_matplotlib()
        plot = check_output_path(plot, ".png", overwrite=overwrite, option="--plot")
    from pfgen.evaluate.report import evaluation_progress, print_report, to_json
    from pfgen.evaluate.run import EvaluateRequest, evaluate as run_evaluate

    console = _console()
    with evaluation_progress(console) as on_video:
        result = run_evaluate(EvaluateRequest(tuple(videos), window, deep, prompt, clip_model), on_video)
    for line in result["warnings"]:
        console.print(f"warning: {line}", highlight=False, markup=False, soft_wrap=True)
    if plot is not None:
        from pfgen.evaluate.plot import plot_metrics

        plot_metrics(result, plot)
        console.print(f"wrote {plot}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(to_json(result))
    else:
        print_report(result)


@app.command()
def download(
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    wan_dir: WanDirOpt = None,
    decoder: Optional[str] = typer.Option(None, help="tae: also fetch the tiny decoder's weights"),
    verbose: Annotated[bool, typer.Option("--verbose", help="also show the Hub client's retries and logs")] = False,
):
    """Download the weights a config names into the Hugging Face cache (then run with HF_HUB_OFFLINE=1)."""
    from pfgen.hub import download_model
    from pfgen.memory import format_gib
    from pfgen.ui import hub_output

    cfg = _load_config(config, checkpoint=checkpoint, wan_dir=wan_dir, decoder=decoder)
    from pfgen.world.model import is_embedded

    if cfg.model.random_weights or is_embedded(cfg.model):
        raise PfgenError("this config uses the embedded model: nothing to download",
                         "give --config self-forcing (or another real-weight config)")
    with hub_output(verbose):
        fetched_all = download_model(cfg.model)
    for role, value, fetched in fetched_all:
        if fetched is None:
            typer.echo(f"{role}: {value} (local path, nothing to download)")
        else:
            typer.echo(f"{role}: {value} -> {fetched.path} ({len(fetched.files)} files, "
                       f"{format_gib(fetched.nbytes)})")


THEN_FORM = 'write --then SECONDS "PROMPT" (two values; a prompt that starts with - goes in a --timeline file)'


def _pair_then(argv: list[str]) -> list[str]:
    """Typer has no repeatable two-value option: `--then SECONDS PROMPT` travels as one value (see timeline).
    `--then=...` and a value that looks like an option (`--then 1 --no-recache`) are refused, never taken."""
    from pfgen.timeline import THEN_SEPARATOR

    out, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--then="):
            raise PfgenError(f"{argv[i]}: --then takes two values, not one after '='", THEN_FORM)
        if argv[i] == "--then":
            from pfgen.words import quote

            values = argv[i + 1:i + 3]
            given = " ".join(["--then", *(v if len(v) <= 30 else quote(v, 30) for v in values)])
            looks = next((v for v in values if re.fullmatch(r"--?[A-Za-z].*", v, flags=re.DOTALL)), None)
            if looks is not None:
                raise PfgenError(f"{given}: {quote(looks)} looks like an option, not a value", THEN_FORM)
            if len(values) < 2:
                raise PfgenError(f"{given}: SECONDS and PROMPT are both needed", THEN_FORM)
            out += ["--then", THEN_SEPARATOR.join(values)]
            i += 3
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every expected failure into one line and an exit code.

    SIGTERM (timeout, Slurm, docker stop, systemd, torchrun) and SIGHUP are handled like Ctrl-C: the writers
    remove their partial files, one line is printed, and the exit code is 128 + the signal's number."""
    warnings.showwarning = _show_warning
    kept = None
    with _signals_as_interrupts() as received:
        try:
            code = app(args=_pair_then(sys.argv[1:] if argv is None else list(argv)), prog_name="pfgen",
                       standalone_mode=False)
        except (typer.Abort, KeyboardInterrupt):
            code = 130
        except Interrupted as exc:
            code, kept = 130, exc.kept
        except typer.Exit as exc:
            code = getattr(exc, "exit_code", 0)
        except PfgenError as exc:
            _fail(_with_kept(str(exc), exc), 1)
        except Exception as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `pfgen` alone: the help, as `pfgen --help` shows it
                if exc.format_message():  # (Typer's rich help is printed already, and its message is empty)
                    typer.echo(exc.format_message())
                sys.exit(0)
            if _is_usage_error(exc):
                ctx = getattr(exc, "ctx", None)
                command = ctx.command.name if ctx is not None and ctx.command is not None else None
                hint = f" (see pfgen {command} --help)" if command and command != "pfgen" else " (see pfgen --help)"
                _fail(f"{exc.format_message()}{hint}", 2)
            oom = _out_of_memory(exc)
            if oom is not None:
                _fail(_with_kept(oom, exc), 1)
            raise
    if code == 130:  # Typer turns Ctrl-C into a return code; the writers have removed their partial files
        signum = received[0] if received else signal.SIGINT
        _fail(f"interrupted by {signal.Signals(signum).name} ({kept or 'no partial output was kept'})", 128 + signum)
    sys.exit(code if isinstance(code, int) else 0)


def _with_kept(message: str, exc: BaseException) -> str:
    """A failed run's error line, with what it kept (section 1 of docs/reliability.md: its video up to its last
    saved state), as `generate.generate_video` noted it on the exception."""
    kept = getattr(exc, "kept", None)
    return f"{message}; {kept}" if kept else message


def _fail(message: str, code: int):
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (options that do nothing, a prompt cut at 512 tokens) as one line, without source location."""
    typer.echo(f"warning: {message}", err=True)


@contextmanager
def _signals_as_interrupts():
    """SIGTERM, SIGHUP and SIGINT raise KeyboardInterrupt in the main thread (so every `finally` and atomic
    writer cleans up, or keeps a video up to its saved state); a second signal does not interrupt that cleanup.
    Yields the list of signals received."""
    received: list[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        if len(received) == 1:  # a second signal must not interrupt the cleanup of the first
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _is_usage_error(exc: Exception) -> bool:
    """Click's usage errors (bad option, bad value, missing argument), whichever click Typer bundles."""
    return hasattr(exc, "format_message") and any(c.__name__ == "UsageError" for c in type(exc).__mro__)


def _out_of_memory(exc: Exception) -> str | None:
    """One line for running out of GPU or CPU memory, with what was asked for and what to lower."""
    torch = sys.modules.get("torch")
    lower = "lower --height/--width or the length, use --policy pyramid or rolling (bounded memory)"
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"out of GPU memory ({lower}, or --text-encoder-device cpu)"
    text = str(exc)
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in text):
        asked = re.search(r"allocate (\d+) bytes", text)
        size = f": {int(asked.group(1)) / 2 ** 30:.1f} GiB more were needed" if asked else ""
        return f"out of CPU memory{size} ({lower})"
    return None
