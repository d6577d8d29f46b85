"""A video's prompts over time, and what a prompt switch or a later resume needs.

The chunk loop asks the story before each chunk whether the prompt changes (`before_chunk`) and tells it
after each clean pass what was committed (`committed`). At a switch the cross-attention K/V change (a new
prompt version); with re-cache the cache is rebuilt under the new prompt by replaying the clean pass over the
latents of every chunk that holds a frame the cache still stores (docs/story.md says exactly what that
computes). The story keeps those latents, and only those, so memory stays bounded at any length.

A story also carries what `pfgen.state` saves: the position, the switches so far, the current embeddings,
the kept latents, the noise generator and the streaming decoder.
"""

from __future__ import annotations

import queue
from typing import Callable

import torch

from pfgen.errors import PfgenError
from pfgen.timeline import Entry, resolve, switch_record


class Story:
    def __init__(self, entries: list[Entry] | None = None, *, recache: bool = True, inbox: queue.Queue | None = None,
                 on_switch: Callable[[dict], None] | None = None):
        """entries: the timeline (None: a resumed run keeps its prompt); inbox: prompts typed while running
        (`pfgen.interactive`), each switching at the next chunk boundary; on_switch(record) after a switch."""
        self.entries = entries or []
        self.recache, self.inbox, self.on_switch = recache, inbox, on_switch
        self.start = self.position = 0
        self.fps = 16
        self.embeds: torch.Tensor | None = None  # the current prompt's embeddings
        self.prompt: str | None = None  # its text (None for embeddings given directly)
        self.kept: dict[int, torch.Tensor] = {}  # t0 -> clean latents of a chunk the cache still holds
        self.switches: list[dict] = []  # this run's switches (the first prompt of a fresh run included)
        self.history: list[dict] = []  # switches of the runs before a resume, in their own videos' time
        self.continued: str | None = None  # a resumed run: the prompt it continues (the saved run's last)
        self.recached_chunks = 0  # extra clean passes spent on re-cache
        self.noise = self.decoder = self.size = None  # set by `Pipeline.stream`
        self._schedule: list[tuple[int, Entry]] = []
        self._encode: Callable[[str], torch.Tensor] | None = None

    def begin(self, start: int, end: int, frames_per_chunk: int, fps: int, encode: Callable[[str], torch.Tensor]):
        """Place the timeline on chunk boundaries (errors before any work) and encode its prompts."""
        self.start = self.position = start
        self.fps, self._encode = fps, encode
        self.kept, self.switches, self.history, self.recached_chunks = {}, [], [], 0  # a resume restores these
        placed = resolve(self.entries, start, end, frames_per_chunk, fps)
        self._schedule = [(t0, e if e.embeds is not None else Entry(e.at, e.prompt, encode(e.prompt)))
                          for t0, e in placed]

    def timeline(self) -> list[dict]:
        """The prompts of this run's video as they ran: every switch with its time and source (timeline,
        interactive); a resumed run opens with the prompt it continues (source "resume") unless it switched at
        its first frame."""
        if self.continued is None or (self.switches and self.switches[0]["latent_frame"] == self.start):
            return list(self.switches)
        return [switch_record(self.start, self.start, self.fps, self.continued, "resume"), *self.switches]

    def first_embeds(self) -> torch.Tensor:
        """The embeddings a fresh run starts with (its timeline's entry at 0)."""
        if not self._schedule or self._schedule[0][0] != self.start:
            raise PfgenError("a new video needs a prompt at 0 s", "give prompt, prompt_embeds or a timeline")
        return self._schedule[0][1].embeds

    def before_chunk(self, loop, t0: int, embeds: torch.Tensor | None) -> torch.Tensor:
        """The embeddings for the chunk at `t0`, switching (and re-caching) when the timeline or stdin says so."""
        switch, source = None, "timeline"
        while self._schedule and self._schedule[0][0] <= t0:
            switch = self._schedule.pop(0)[1]
        typed = self._typed()
        if typed is not None:
            switch, source = Entry(0.0, typed, self._encode(typed)), "interactive"
        if switch is None:
            return embeds
        if self.recache and self.kept:
            self.recached_chunks += loop.replay(sorted(self.kept.items()), switch.embeds)
        else:
            loop.state.new_prompt()
        self.embeds, self.prompt = switch.embeds, switch.prompt
        record = switch_record(t0, self.start, self.fps, switch.label, source)
        self.switches.append(record)
        if self.on_switch is not None:
            self.on_switch(record)
        return switch.embeds

    def _typed(self) -> str | None:
        """The newest line typed since the last chunk (earlier ones in the same chunk are superseded); raises
        the stdin reader's error, which ends the run."""
        line = None
        while self.inbox is not None:
            try:
                line = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(line, Exception):
                raise line
        return line

    def finish(self) -> None:
        """After the last chunk: a stdin reader that failed since the last boundary still fails the run."""
        while self.inbox is not None:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Exception):
                raise item

    def committed(self, t0: int, x0: torch.Tensor, cache) -> None:
        """Keep the chunk's latents; drop those of chunks without a frame the cache still holds."""
        self.kept[t0] = x0
        held = cache.held_frames()
        self.kept = {c: x for c, x in self.kept.items() if not held.isdisjoint(range(c, c + x.shape[2]))}
