"""Where each component lives, when: the `--offload` modes of `pfgen.memory` put into effect.

A component the mode offloads lives on the CPU ("home") and visits the accelerator only inside `use(name)`:
the text encoder while it encodes a prompt, the DiT and the VAE while a video's chunk loop runs (the VAE decodes
after every chunk, so moving it per chunk would cost transfers and save no peak). The others stay on the
accelerator. Moves are whole modules (`Module.to`), so dtypes, including the
float32-kept modules, are unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

OFFLOADED = {"none": (), "text-encoder": ("text_encoder",), "model": ("text_encoder", "transformer", "vae")}
HOME = torch.device("cpu")


def home_device(mode: str, name: str, device: torch.device) -> torch.device:
    """Where component `name` is loaded and where it rests between uses."""
    return HOME if name in OFFLOADED[mode] else torch.device(device)


class Offload:
    def __init__(self, mode: str, device: torch.device, modules: dict, pinned: tuple[str, ...] = ()):
        """`modules`: name -> nn.Module; `pinned`: names that never move (e.g. a text encoder placed by
        --text-encoder-device)."""
        self.mode, self.device, self.modules = mode, torch.device(device), modules
        self.moving = tuple(n for n in OFFLOADED[mode] if n in modules and n not in pinned)
        self.visiting: set[str] = set()

    def where(self, name: str) -> torch.device:
        """The device component `name`'s weights are on now."""
        return next(self.modules[name].parameters()).device

    def placement(self) -> dict[str, str]:
        """Per component, "device" or "home" under the schedule (on a CPU-only run both are the CPU)."""
        return {n: "home" if n in self.moving and n not in self.visiting else "device" for n in self.modules}

    @contextmanager
    def use(self, name: str):
        """Component `name` on the accelerator for the duration of the block, back home afterwards."""
        if name not in self.moving:
            yield
            return
        module = self.modules[name]
        module.to(self.device)
        self.visiting.add(name)
        try:
            yield
        finally:
            self.visiting.discard(name)
            module.to(HOME)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the freed blocks back, so the next phase's peak is what it holds
