"""Head types and the head-type JSON file (the one format pfgen reads and writes).

    {"format": "pfgen.head-types/1",
     "model": {"name": "self-forcing-1.3b", "layers": 30, "heads": 12},
     "types": [["wave", "anchor", ...], ...],
     "calibration": {...optional...}}
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pfgen.errors import PfgenError
from pfgen.outputs import atomic_write_text
from pfgen.words import count

FORMAT = "pfgen.head-types/1"
HEAD_TYPES = ("anchor", "wave", "veil")
CSV_LABELS = {-1: "wave", 1: "anchor", 2: "veil"}  # the published label file's encoding


@dataclass(frozen=True)
class HeadTypes:
    model: str
    types: tuple[tuple[str, ...], ...]
    calibration: dict | None = field(default=None, compare=False)

    @property
    def layers(self) -> int:
        return len(self.types)

    @property
    def heads(self) -> int:
        return len(self.types[0])

    def sha256(self) -> str:
        """Content hash of the types (not of the file's bytes or path: the same labels hash the same from any
        install)."""
        return hashlib.sha256(json.dumps([self.model, self.types]).encode()).hexdigest()

    def counts(self) -> dict[str, int]:
        flat = [t for row in self.types for t in row]
        return {kind: flat.count(kind) for kind in HEAD_TYPES}

    @classmethod
    def uniform(cls, kind: str, layers: int, heads: int, model: str = "any") -> "HeadTypes":
        if kind not in HEAD_TYPES:
            raise PfgenError(f"unknown head type '{kind}'", f"choose from {', '.join(HEAD_TYPES)}")
        return cls(model, tuple((kind,) * heads for _ in range(layers)))

    @classmethod
    def from_rows(cls, rows, model: str, calibration: dict | None = None, where: str = "head types") -> "HeadTypes":
        if not rows or not all(isinstance(r, (list, tuple)) and r for r in rows):
            raise PfgenError(f"{where}: 'types' must be a non-empty list of non-empty rows")
        if len({len(r) for r in rows}) != 1:
            raise PfgenError(f"{where}: every layer must list the same number of heads")
        for i, row in enumerate(rows):
            for j, kind in enumerate(row):
                if kind not in HEAD_TYPES:
                    raise PfgenError(f"{where}: layer {i} head {j} has unknown type {kind!r}",
                                     f"use one of {', '.join(HEAD_TYPES)}")
        return cls(model, tuple(tuple(r) for r in rows), calibration)

    @classmethod
    def load(cls, path: str | Path) -> "HeadTypes":
        path = Path(path)
        if not path.is_file():
            raise PfgenError(f"head-type file not found: {path}", "run `pfgen profile-heads` to make one")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PfgenError(f"{path}: not valid JSON (line {exc.lineno})") from None
        except UnicodeDecodeError:
            raise PfgenError(f"{path}: not a text file (not UTF-8)", "give a head-type JSON file") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PfgenError(f"{path}: not a head-type file", f"expected \"format\": \"{FORMAT}\"")
        model = data.get("model")
        if not isinstance(model, dict):
            raise PfgenError(f"{path}: 'model' must be an object with name, layers and heads",
                             'e.g. "model": {"name": "tiny", "layers": 4, "heads": 4}')
        heads = cls.from_rows(data.get("types"), str(model.get("name", "unknown")), data.get("calibration"), str(path))
        if (model.get("layers"), model.get("heads")) != (heads.layers, heads.heads):
            raise PfgenError(f"{path}: 'model' says {model.get('layers')}x{model.get('heads')} "
                             f"but 'types' is {heads.layers}x{heads.heads}")
        return heads

    @classmethod
    def from_label_csv(cls, path: str | Path, model: str) -> "HeadTypes":
        """Published labels: one row per layer, -1 wave / 1 anchor / 2 veil."""
        with open(path, newline="") as f:
            rows = [[CSV_LABELS[int(x)] for x in row] for row in csv.reader(f) if row]
        return cls.from_rows(rows, model, where=str(path))

    def to_json(self) -> dict:
        data = {"format": FORMAT, "model": {"name": self.model, "layers": self.layers, "heads": self.heads},
                "types": [list(r) for r in self.types]}
        if self.calibration is not None:
            data["calibration"] = self.calibration
        return data

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename)."""
        path = Path(path)
        rows = ",\n    ".join(json.dumps(list(r)) for r in self.types)
        atomic_write_text(path, _render(self.to_json(), rows))
        return path

    def check_model(self, layers: int, heads: int, where: str = "head-type file") -> None:
        if (self.layers, self.heads) != (layers, heads):
            raise PfgenError(
                f"{where} is for a {self.layers}x{self.heads} model ({self.model}), this model has "
                f"{count(layers, 'layer')} x {count(heads, 'head')}",
                "use a head file made for this model (pfgen profile-heads)")


def head_type_source(cache_cfg, policy: str, heads: str | Path | HeadTypes | None = None) -> HeadTypes | str | None:
    """Where a run under `policy` takes its head types from; the one place this is decided.

    None for the baselines (every head follows the policy); for pyramid: `heads` (a file, loaded here, or
    loaded types), else `cache.all` (a kind for every head, returned as its name), else the config's
    `cache.heads` file.
    """
    if policy != "pyramid":
        return None
    if heads is None and cache_cfg.all is not None:
        return cache_cfg.all
    source = heads if heads is not None else cache_cfg.heads
    if source is None:
        raise PfgenError("the pyramid policy needs head types",
                         "pass --heads FILE (pfgen profile-heads makes one) or set cache.all in the config")
    return source if isinstance(source, HeadTypes) else HeadTypes.load(source)


def head_type_rows(source: HeadTypes | str | None, policy: str, layers: int, heads: int) -> list[list[str]]:
    """Per-layer, per-head rule names for a model of `layers` x `heads` from `head_type_source`'s answer."""
    if source is None:
        return [[policy] * heads for _ in range(layers)]
    types = HeadTypes.uniform(source, layers, heads) if isinstance(source, str) else source
    types.check_model(layers, heads)
    return [list(row) for row in types.types]


def _render(data: dict, rows: str) -> str:
    """JSON with one line per layer (readable diffs), everything else indented."""
    head = {k: v for k, v in data.items() if k != "types" and k != "calibration"}
    text = json.dumps(head, indent=2)[:-2] + ',\n  "types": [\n    ' + rows + "\n  ]"
    if "calibration" in data:
        text += ',\n  "calibration": ' + json.dumps(data["calibration"], allow_nan=False)
    return text + "\n}\n"
