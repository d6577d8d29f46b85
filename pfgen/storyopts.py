"""The generate command's story options, checked before any model loads and then wired into one run:
`--then` / `--timeline` (prompt timeline), `--resume` / `--save-state` / `--save-state-every`,
`--preview` / `--frames-dir`, `--interactive`, `--recache/--no-recache`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from pfgen.errors import PfgenError
from pfgen.outputs import check_free_space, check_output_path, check_outputs


@dataclass
class StoryOptions:
    then: list  # [(seconds, prompt), ...]
    timeline: Path | None = None
    recache: bool = True
    resume: Path | None = None
    save_state: Path | None = None
    save_state_every: int = 0
    preview: Path | None = None
    frames_dir: Path | None = None
    interactive: bool = False

    def used(self) -> list[str]:
        """The options given (batch mode refuses them: they describe one video)."""
        names = {"--then": bool(self.then), "--timeline": self.timeline, "--resume": self.resume,
                 "--save-state": self.save_state, "--preview": self.preview, "--frames-dir": self.frames_dir,
                 "--interactive": self.interactive}
        return [name for name, value in names.items() if value]


def check_story_options(opts: StoryOptions, prompt: str | None, output: Path | None, save_latents: Path | None,
                        overwrite: bool = False, seed: int | None = None):
    """Everything that needs no model: -> (timeline entries or None, RunState or None, mp4 path or None).
    Existing outputs are refused unless `overwrite` (a state saved over the one it resumes from is fine); no two
    outputs share a path; options that cannot be what was asked are refused, those that would do nothing warn."""
    from pfgen.sinks import check_frames_dir, check_preview
    from pfgen.timeline import from_options

    if opts.save_state_every < 0 or (opts.save_state_every and opts.save_state is None):
        raise PfgenError("--save-state-every N needs --save-state FILE and N >= 1")
    if seed is not None and opts.resume is not None:
        raise PfgenError("--seed does nothing with --resume: the saved run's noise generator goes on",
                         "leave out --seed (to branch, give a new --prompt or --then)")
    entries = from_options(prompt, opts.then, opts.timeline, opts.resume is not None)
    switches = opts.interactive or (entries is not None and (len(entries) > 1 or opts.resume is not None))
    if not opts.recache and not switches:
        warnings.warn("--no-recache does nothing without a prompt switch (--then, --timeline, --interactive, or "
                      "--prompt with --resume)")
    state = None
    if opts.resume is not None:
        from pfgen.state import RunState

        state = RunState.load(opts.resume)
    if output is None and opts.frames_dir is None:
        output = Path("pfgen.mp4")
    if output is not None:
        output = check_output_path(output, ".mp4", overwrite=overwrite, option="--output")
    in_place = False
    if opts.save_state is not None:
        in_place = opts.resume is not None and Path(opts.save_state).resolve() == Path(opts.resume).resolve()
        opts.save_state = check_output_path(opts.save_state, overwrite=overwrite or in_place, option="--save-state")
    if opts.preview is not None:
        opts.preview = check_preview(opts.preview, overwrite)
    if opts.frames_dir is not None:
        opts.frames_dir = check_frames_dir(opts.frames_dir, overwrite)
    check_outputs(resume=opts.resume, output=output, save_latents=save_latents,
                  save_state=None if in_place else opts.save_state, preview=opts.preview, frames_dir=opts.frames_dir)
    return entries, state, output


def check_fit(cfg, entries, state, num_frames: int, height: int | None, width: int | None):
    """The timeline fits the video, and a saved state fits the config, before the model loads; -> the video's
    (height, width) and first latent frame (a resumed run's: the state's)."""
    from pfgen.frames import latent_frames_for
    from pfgen.pipeline import resolve_device, resolve_dtype
    from pfgen.timeline import resolve

    per_chunk = cfg.sampling.frames_per_chunk
    start = state.position if state is not None else 0
    if entries:
        resolve(entries, start, start + latent_frames_for(num_frames, per_chunk), per_chunk, cfg.video.fps)
    if state is not None:
        device = resolve_device(cfg.runtime.device, available=False)
        state.check_config(cfg, cfg.cache.policy, resolve_dtype(cfg.runtime.dtype, device), device)
        height, width = state.size(height, width)
    return height or cfg.video.height, width or cfg.video.width, start


def check_outputs_fit(opts: StoryOptions, plan, save_latents: Path | None) -> None:
    """The files of known size fit their folders' free space, before the work: the latents (exactly) and the
    saved state (at least its KV cache, exact; plus kept latents, embeddings and the decoder's cache)."""
    from pfgen.generate import latents_bytes

    if save_latents is not None:
        check_free_space(save_latents, latents_bytes(plan.latent_frames, plan.grid), "--save-latents")
    if opts.save_state is not None:
        check_free_space(opts.save_state, plan.memory["kv_cache_bytes"], "--save-state", at_least=True)


def make_story(opts: StoryOptions, entries, console):
    """The run's Story: its timeline, stdin prompts with --interactive, and a stderr line per switch."""
    from pfgen.story import Story
    from pfgen.words import shorten

    inbox = None
    if opts.interactive:
        from pfgen.interactive import read_prompts

        inbox = read_prompts(on_skip=lambda message: console.print(f"warning: {message}", highlight=False,
                                                                   markup=False, soft_wrap=True))
        console.print("interactive: type a prompt and Enter to switch at the next chunk; Ctrl-D keeps the "
                      "current one", highlight=False)

    def announce(record):
        if record["latent_frame"] or record["source"] != "timeline":
            console.print(f"prompt switched at {record['seconds']:.2f} s (frame {record['video_frame']}): "
                          f"{shorten(record['prompt'])}", highlight=False, markup=False, soft_wrap=True)

    return Story(entries, recache=opts.recache, inbox=inbox, on_switch=announce)
