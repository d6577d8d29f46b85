"""Prompt timelines, torch-free: `--prompt` + `--then SECONDS PROMPT`, a `--timeline` YAML/JSON file, JSONL rows.

An entry `(at, prompt)` asks for `prompt` from `at` seconds into the video on. A switch can only happen between
chunks, so it happens at the first chunk boundary at or after `at`; `switch_frame` is that rule, in one place.
Times count from the start of this run's video (for a resumed run: from its first resumed frame).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pfgen.errors import PfgenError
from pfgen.frames import VAE_TIME, chunk_video_frames
from pfgen.words import quote


@dataclass(frozen=True)
class Entry:
    at: float  # seconds into this run's video
    prompt: str | None  # None when `embeds` is given (API)
    embeds: object = None  # optional prompt embeddings (B, 512, text_dim) instead of the text

    @property
    def label(self) -> str:
        return self.prompt if self.prompt is not None else "<prompt_embeds>"


def _entry(at, prompt, where: str, embeds=None) -> Entry:
    if type(at) not in (int, float) or not math.isfinite(at) or at < 0:
        raise PfgenError(f"{where}: the time must be a number of seconds >= 0, got {quote(at)}")
    if embeds is None and (not isinstance(prompt, str) or not prompt.strip()):
        raise PfgenError(f"{where}: the prompt must be a non-empty string, got {quote(prompt)}")
    return Entry(float(at), prompt.strip() if isinstance(prompt, str) else None, embeds)


def check_order(entries: list[Entry], where: str, first_at_zero: bool = True) -> list[Entry]:
    if not entries:
        raise PfgenError(f"{where}: the timeline is empty", "give at least one {at, prompt} entry")
    if first_at_zero and entries[0].at != 0:
        raise PfgenError(f"{where}: the first entry must be at 0 s, got {entries[0].at:g} s")
    for a, b in zip(entries, entries[1:]):
        if b.at <= a.at:
            raise PfgenError(f"{where}: times must increase, {b.at:g} s comes after {a.at:g} s")
    return entries


def from_rows(rows, where: str) -> list[Entry]:
    """A list of {"at": seconds, "prompt": text} (timeline files and JSONL rows), the first at 0."""
    if not isinstance(rows, list):
        raise PfgenError(f"{where}: a timeline is a list of {{at, prompt}} entries")
    entries = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != {"at", "prompt"}:
            got = f"the keys {quote(sorted(map(str, row)))}" if isinstance(row, dict) else quote(row)
            raise PfgenError(f"{where}: entry {i + 1} must have exactly the keys 'at' and 'prompt', got {got}")
        entries.append(_entry(row["at"], row["prompt"], f"{where}, entry {i + 1}"))
    return check_order(entries, where)


def load_timeline(path: str | Path) -> list[Entry]:
    """A YAML or JSON file (UTF-8) holding a list of {at, prompt}."""
    import yaml

    from pfgen.config import load_yaml

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise PfgenError(f"cannot read timeline {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise PfgenError(f"timeline {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start})", "save it as UTF-8: a YAML or JSON list of {at: seconds, prompt: text}"
                         ) from None
    try:
        rows = json.loads(text) if path.suffix.lower() == ".json" else load_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError):
        raise PfgenError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}",
                         "write a list of {at: seconds, prompt: text}") from None
    return from_rows(rows, str(path))


THEN_SEPARATOR = "\x1f"  # the CLI passes `--then SECONDS PROMPT` as one value "SECONDS<sep>PROMPT"


def parse_then(value: str) -> tuple[float, str]:
    seconds, sep, prompt = value.partition(THEN_SEPARATOR)
    try:
        at = float(seconds)
    except ValueError:
        raise PfgenError(f"--then {seconds}: SECONDS must be a number", 'write --then SECONDS "PROMPT"') from None
    if not sep:
        raise PfgenError(f"--then {seconds} has no prompt", 'write --then SECONDS "PROMPT"')
    return at, prompt


def from_options(prompt: str | None, then: list[str], timeline: Path | None, resume: bool) -> list[Entry] | None:
    """`--prompt` / `--then` / `--timeline` -> entries (None: no prompt given; a resumed run keeps its own).

    A fresh run starts with `--prompt` (or the timeline's first entry); a resumed run switches to `--prompt` at
    its first chunk. `--then` adds entries to either."""
    if timeline is not None and prompt is not None:
        raise PfgenError("--timeline and --prompt both give the first prompt", "use one of them")
    entries = load_timeline(timeline) if timeline is not None else []
    if prompt is not None:
        entries = [_entry(0, prompt, "--prompt")]
    if not entries and then and not resume:
        raise PfgenError("--then needs a first prompt", "give --prompt or --timeline")
    entries = entries + [_entry(at, text, f"--then {at:g}") for at, text in map(parse_then, then)]
    return check_order(entries, "--then", first_at_zero=not resume) if entries else None


def from_api(timeline) -> list[Entry]:
    """`pipe.stream(timeline=[(0, "a cat"), (10, "a dog")])`; a tensor instead of the text gives its embeddings."""
    entries = []
    for i, item in enumerate(timeline):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise PfgenError(f"timeline entry {i}: expected (seconds, prompt or prompt_embeds), got {quote(item)}")
        at, what = item
        text, embeds = (what, None) if isinstance(what, str) else (None, what)
        entries.append(_entry(at, text, f"timeline entry {i}", embeds))
    return check_order(entries, "timeline")


def video_frame(t0: int, start: int) -> int:
    """Index, in this run's video, of the first video frame of latent frame `t0` (the run starts at `start`)."""
    return chunk_video_frames(t0) - chunk_video_frames(start)


def switch_frame(at: float, start: int, frames_per_chunk: int, fps: int) -> int:
    """The latent frame of the first chunk boundary at or after `at` seconds (chunks start at `start`)."""
    target = at * fps - 1e-6
    chunks = max(0, math.floor((target - 1) / (VAE_TIME * frames_per_chunk)))  # a lower bound, then walk up
    t0 = start + chunks * frames_per_chunk
    while video_frame(t0, start) < target:
        t0 += frames_per_chunk
    return t0


def resolve(entries: list[Entry], start: int, end: int, frames_per_chunk: int, fps: int) -> list[tuple[int, Entry]]:
    """(switch frame, entry) per entry; refuses entries past the end or two that meet at one boundary."""
    out: list[tuple[int, Entry]] = []
    duration = video_frame(end, start) / fps
    for entry in entries:
        t0 = end if entry.at > duration else switch_frame(entry.at, start, frames_per_chunk, fps)  # 1e308 too
        if t0 >= end:
            raise PfgenError(f"the prompt at {entry.at:g} s comes after the end of the {duration:.2f} s video",
                             "lengthen the video (--seconds) or move the entry")
        if out and out[-1][0] == t0:
            raise PfgenError(f"the prompts at {out[-1][1].at:g} s and {entry.at:g} s both switch at the chunk "
                             f"boundary at {video_frame(t0, start) / fps:.2f} s",
                             f"switches happen every {frames_per_chunk * VAE_TIME / fps:.2f} s; "
                             "space them further apart")
        out.append((t0, entry))
    return out


def switch_record(t0: int, start: int, fps: int, prompt: str, source: str) -> dict:
    """What the progress bar, the final line, the manifest and saved states report for a switch."""
    frame = video_frame(t0, start)
    return {"seconds": round(frame / fps, 4), "video_frame": frame, "latent_frame": t0, "prompt": prompt,
            "source": source}
