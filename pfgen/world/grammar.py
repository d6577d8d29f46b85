"""The world's prompt language (torch-free): palette, shapes, motions, the grammar, and the held-out split.

    a {colour} {shape} {motion}[ and a {colour} {shape} {motion}] on a [striped ]{background} background

Two objects never share a colour, and an object is never the background's colour. The sRGB values below
are part of the contract: the renderer draws them and the scorer measures against them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OBJECT_COLOURS = {
    "red": (230, 40, 40), "green": (40, 190, 70), "blue": (40, 90, 230), "yellow": (240, 220, 40),
    "magenta": (210, 50, 210), "cyan": (40, 210, 220), "orange": (250, 140, 20), "white": (245, 245, 245),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (120, 120, 120), "navy": (20, 30, 90), "brown": (100, 65, 35)}
STRIPE_LIFT = 45  # a striped background alternates its colour with a copy this much brighter per channel
SHAPES = ("ball", "square", "triangle")
# Motion periods in video frames at 16 fps (None: no period).
PERIODS = {"circling": 32, "bouncing": 24, "sliding left": 64, "sliding right": 64, "resting": None}
MOTIONS = tuple(PERIODS)
FPS = 16

# A background "colour" that is also an object colour name would make "on a X background" ambiguous: none is.
_OBJ = r"a (?P<colour{i}>\w+) (?P<shape{i}>\w+) (?P<motion{i}>circling|bouncing|sliding left|sliding right|resting)"
_PATTERN = re.compile(
    "^" + _OBJ.format(i=1) + "(?: and " + _OBJ.format(i=2) + ")?"
    + r" on a (?P<striped>striped )?(?P<background>\w+) background$")


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    motion: str

    @property
    def words(self) -> str:
        return f"a {self.colour} {self.shape} {self.motion}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    striped: bool = False

    @property
    def prompt(self) -> str:
        stripes = "striped " if self.striped else ""
        return " and ".join(t.words for t in self.things) + f" on a {stripes}{self.background} background"

    @property
    def held_out(self) -> bool:
        """Kept out of training, to measure generalisation."""
        pairs = {(t.colour, t.shape) for t in self.things}
        return ("green", "triangle") in pairs or ("orange", "square") in pairs or \
            (self.striped and self.background == "brown")


def parse(prompt: str) -> Scene | None:
    """The scene a prompt names, or None when it is not a sentence of the grammar."""
    match = _PATTERN.match(" ".join(prompt.lower().replace(",", " ").split()))
    if match is None:
        return None
    things = []
    for i in (1, 2):
        if match.group(f"colour{i}") is None:
            continue
        thing = Thing(match.group(f"colour{i}"), match.group(f"shape{i}"), match.group(f"motion{i}"))
        if thing.colour not in OBJECT_COLOURS or thing.shape not in SHAPES:
            return None
        things.append(thing)
    background = match.group("background")
    if background not in BACKGROUNDS or len({t.colour for t in things}) != len(things):
        return None
    return Scene(tuple(things), background, match.group("striped") is not None)


VOCABULARY = tuple(sorted({"a", "and", "on", "background", "striped", "sliding", "left", "right",
                           *OBJECT_COLOURS, *BACKGROUNDS, *SHAPES, "circling", "bouncing", "resting"}))


def unknown_words(prompt: str) -> list[str]:
    """Words of the prompt that the world model never saw, in order, once each."""
    seen: list[str] = []
    for word in re.findall(r"[^\s,.]+", prompt.lower()):
        if word not in VOCABULARY and word not in seen:
            seen.append(word)
    return seen


def vocabulary_warning(prompt: str) -> str | None:
    """One line naming the words the world model never saw and the words it knows, or None."""
    unknown = unknown_words(prompt)
    if not unknown:
        return None
    return (f"the embedded world model does not know {', '.join(repr(w) for w in unknown)}; it knows: "
            f"{' '.join(VOCABULARY)} (e.g. \"a red ball circling on a navy background\")")


def sample_scene(rng, held_out: bool = False) -> Scene:
    """A random scene of the training split (held_out=False) or of the held-out split; rng: numpy Generator."""
    while True:
        count = 1 + int(rng.random() < 0.5)
        background = str(rng.choice(list(BACKGROUNDS)))
        striped = bool(rng.random() < 0.4)
        colours = rng.choice(list(OBJECT_COLOURS), size=count, replace=False)
        things = tuple(Thing(str(c), str(rng.choice(SHAPES)), str(rng.choice(MOTIONS))) for c in colours)
        scene = Scene(things, background, striped)
        if scene.held_out == held_out:
            return scene
