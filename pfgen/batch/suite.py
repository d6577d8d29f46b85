"""The prompt suite of batch mode: reading prompts files, naming videos, planning (policy, prompt) jobs."""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

from pfgen.config import Config, to_dict, with_overrides
from pfgen.errors import PfgenError
from pfgen.words import quote

JSONL_KEYS = ("prompt", "seed", "seconds", "name", "timeline", "image")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class BatchItem:
    index: int  # position among the prompts (blank and comment lines not counted)
    prompt: str
    seed: int
    num_frames: int
    name: str
    timeline: tuple[tuple[float, str], ...] = ()  # (seconds, prompt) from a JSONL "timeline", the first at 0
    image: str | None = None  # a JSONL "image": the first frame (image-to-video), relative to the JSONL file


@dataclass(frozen=True)
class Job:
    """One video: a prompt under a policy, and the manifest fields that identify it."""
    item: BatchItem
    policy: str
    file: str  # relative to the output folder
    request: dict
    heads: object = None  # the loaded HeadTypes of a pyramid video (None: the config decides, e.g. cache.all)


@dataclass(frozen=True)
class BatchRequest:
    prompts: Path
    output_dir: Path
    policies: tuple[str, ...] | None  # None: the config's policy, videos directly in output_dir
    seed: int
    num_frames: int
    heads: Path | None = None
    height: int | None = None
    width: int | None = None
    recache: bool = True  # --no-recache: rows with a timeline switch without re-caching


def check_options(prompt, prompts, output, output_dir, policies, policy, save_latents) -> bool:
    """True for batch mode; conflicting single-video and batch options are a one-line error."""
    if prompts is None:
        for name, value in (("--output-dir", output_dir), ("--policies", policies)):
            if value is not None:
                raise PfgenError(f"{name} needs --prompts FILE", "or use --prompt and --output for one video")
        return False
    for name, value, hint in (("--prompt", prompt, "put it in the prompts file"),
                              ("--output", output, "batch mode writes into --output-dir"),
                              ("--save-latents", save_latents, "it is for single videos")):
        if value is not None:
            raise PfgenError(f"{name} cannot be combined with --prompts", hint)
    if policy is not None and policies is not None:
        raise PfgenError("give --policy or --policies, not both")
    if output_dir is None:
        raise PfgenError("--prompts needs --output-dir", "the folder for the videos and manifest.jsonl")
    return True


def parse_policies(text: str | None) -> tuple[str, ...] | None:
    from pfgen.pipeline import POLICIES

    if text is None:
        return None
    names = tuple(p.strip() for p in text.split(","))
    for name in names:
        if name not in POLICIES:
            raise PfgenError(f"unknown policy '{name}' in --policies", f"choose from {', '.join(POLICIES)}")
    if len(set(names)) != len(names):
        raise PfgenError(f"--policies {text} names a policy twice")
    return names


def read_prompts(path: Path, base_seed: int, num_frames: int, fps: int) -> list[BatchItem]:
    """Plain text (one prompt per line; blank lines and # comments skipped) or, for a `.jsonl` file, JSONL (one
    object per line). A UTF-8 byte-order mark is dropped."""
    from pfgen.frames import frames_for_seconds

    if not path.is_file():
        raise PfgenError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise PfgenError(f"prompts file {path} is not UTF-8 text") from None
    jsonl = path.suffix.lower() == ".jsonl"
    items, names = [], {}
    for number, text in enumerate(lines, 1):
        text = text.strip()
        if not text or (not jsonl and text.startswith("#")):
            continue
        where = f"{path}, line {number}"
        fields = _jsonl_fields(text, where) if jsonl else {"prompt": text}
        index = len(items)
        seconds = fields.get("seconds")
        frames = num_frames if seconds is None else frames_for_seconds(seconds, fps)
        name = fields.get("name") or _default_name(index, fields["prompt"])
        if name.lower() in names:
            raise PfgenError(f"{where}: name '{name}' is already used on line {names[name.lower()]}",
                             "names must be unique (they are the file names)")
        names[name.lower()] = number
        image = str(path.parent / Path(fields["image"]).expanduser()) if "image" in fields else None
        items.append(BatchItem(index, fields["prompt"], fields.get("seed", base_seed + index), frames, name,
                               fields.get("timeline", ()), image))
    if not items:
        raise PfgenError(f"prompts file {path} holds no prompts", "write one prompt per line")
    return items


def _jsonl_fields(text: str, where: str) -> dict:
    """One JSONL line, checked field by field (unknown keys are errors: a typo must not be ignored)."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PfgenError(f"{where}: not valid JSON ({exc.msg})", "write one JSON object per line") from None
    if not isinstance(fields, dict):
        raise PfgenError(f"{where}: expected a JSON object with a \"prompt\"")
    unknown = sorted(set(fields) - set(JSONL_KEYS))
    if unknown:
        raise PfgenError(f"{where}: unknown key '{unknown[0]}'", f"known keys: {', '.join(JSONL_KEYS)}")
    prompt, seed, seconds, name, timeline, image = (fields.get(k) for k in JSONL_KEYS)
    if prompt is not None and timeline is not None:
        raise PfgenError(f"{where}: give \"prompt\" or \"timeline\", not both")
    if timeline is not None:
        from pfgen.timeline import from_rows

        entries = from_rows(timeline, f"{where}: timeline")
        fields["timeline"] = tuple((e.at, e.prompt) for e in entries)
        prompt = entries[0].prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise PfgenError(f"{where}: \"prompt\" must be a non-empty string")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2 ** 63):
        raise PfgenError(f"{where}: \"seed\" must be a non-negative integer, got {quote(seed)}")
    if seconds is not None and (type(seconds) not in (int, float) or not 0 < seconds < float("inf")):
        raise PfgenError(f"{where}: \"seconds\" must be a positive number, got {quote(seconds)}")
    if name is not None and (not isinstance(name, str) or not NAME.fullmatch(name)):
        raise PfgenError(f"{where}: \"name\" {quote(name)} is not a safe file name",
                         "use letters, digits, '.', '_' and '-', starting with a letter or digit")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise PfgenError(f"{where}: \"image\" must be a path to an image file, got {quote(image)}")
    return {**{k: v for k, v in fields.items() if v is not None}, "prompt": prompt.strip()}


def _default_name(index: int, prompt: str) -> str:
    """`0007-a-red-kite-over-the-sea`: stable across reruns, sorted like the file, safe on every filesystem."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")[:48].strip("-")
    return f"{index:04d}-{slug}" if slug else f"{index:04d}"


def plan_jobs(cfg: Config, req: BatchRequest, items: list[BatchItem]) -> list[Job]:
    """Every (policy, prompt) video, policy-major so that a rank reuses one cache allocation per policy."""
    from pfgen.frames import latent_frames_for, video_frames_for

    from pfgen.heads import HeadTypes, head_type_source

    policies = req.policies or (cfg.cache.policy,)
    if not req.recache and not any(len(item.timeline) > 1 for item in items):
        warnings.warn("--no-recache does nothing: no row has a timeline with a prompt switch")
    jobs = []
    for policy in policies:
        source = head_type_source(cfg.cache, policy, req.heads)  # loaded once; the videos get these types
        sha = source.sha256() if isinstance(source, HeadTypes) else None
        config = to_dict(with_overrides(cfg, cache=dict(policy=policy)))
        # Identify the head file by its content, not by where this install keeps it, so a run resumes from
        # another virtualenv or checkout.
        config["cache"]["heads"] = sha
        config["model"]["loras"] = [lora_content(lora) for lora in cfg.model.loras]  # by content, like the heads
        config = json.loads(json.dumps(config))
        for item in items:
            file = f"{policy}/{item.name}.mp4" if req.policies else f"{item.name}.mp4"
            frames = video_frames_for(latent_frames_for(item.num_frames, cfg.sampling.frames_per_chunk))
            if item.timeline:
                _check_timeline(item, cfg)
            image = _image_sha256(item, cfg, req) if item.image else None
            request = dict(name=item.name, file=file, index=item.index, prompt=item.prompt, seed=item.seed,
                           timeline=[list(e) for e in item.timeline] or None,
                           recache=False if len(item.timeline) > 1 and not req.recache else None,  # None: on
                           policy=policy, frames=frames, height=req.height or cfg.video.height,
                           width=req.width or cfg.video.width, heads_sha256=sha, config=config,
                           image_sha256=image)  # by content: another image under the same path is a new video
            jobs.append(Job(item, policy, file, request, source if isinstance(source, HeadTypes) else None))
    return jobs


def _image_sha256(item: BatchItem, cfg: Config, req: BatchRequest) -> str:
    """A row's image is checked like --image (frame-wise config, readable, large enough), then hashed."""
    import hashlib

    from pfgen.image import check_image_run, load_image

    try:
        check_image_run(cfg.sampling.frames_per_chunk, False, '"image"')
        load_image(item.image, req.height or cfg.video.height, req.width or cfg.video.width)
    except PfgenError as exc:
        raise PfgenError(f"{item.name}: {exc.message}", exc.hint) from None
    return hashlib.sha256(Path(item.image).read_bytes()).hexdigest()


def lora_content(lora) -> dict:
    """A LoRA entry as the manifest records it: the file's sha256 (a Hub reference, not downloaded while jobs are
    planned, is recorded as the reference itself), scale and alpha."""
    from pfgen.hub import is_reference
    from pfgen.wan.lora import file_digest

    source = {"ref": lora.path} if is_reference(lora.path) else {"sha256": file_digest(lora.path)}
    return {**source, "scale": lora.scale, "alpha": lora.alpha}


def _check_timeline(item: BatchItem, cfg: Config) -> None:
    """Every switch of a JSONL timeline falls inside its video."""
    from pfgen.frames import latent_frames_for
    from pfgen.timeline import Entry, resolve

    per_chunk = cfg.sampling.frames_per_chunk
    try:
        resolve([Entry(at, p) for at, p in item.timeline], 0, latent_frames_for(item.num_frames, per_chunk),
                per_chunk, cfg.video.fps)
    except PfgenError as exc:
        raise PfgenError(f"{item.name}: {exc.message}", exc.hint) from None

