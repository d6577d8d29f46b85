"""Saved runs: everything needed to continue a video exactly, in one safetensors file (never pickle).

Tensors: the KV cache (`cache.<layer>.<type>.<name>`), the latents of the chunks the cache still holds
(`kept.<t0>`, for re-cache after a resume), the current prompt embeddings, the noise generator's state and
the streaming VAE decoder's causal feature cache (`vae.<i>`). JSON metadata (key "pfgen"): position, each
rule's bookkeeping, the switches so far, and fingerprints of the model, config, policy and head types that a
resumed run must match, plus a CRC32 per tensor and one of the metadata itself, so that a corrupt or edited
file is refused; every field's type and range are checked on load. Written atomically.

The cache dominates the size: `pfgen generate --save-state` prints it; at the 1.3B shape the rolling-21
cache alone is about 5.6 GiB in bfloat16 (README).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pfgen import __version__
from pfgen.config import MAX_SEED, to_dict
from pfgen.errors import PfgenError
from pfgen.outputs import atomic_output, write_safetensors
from pfgen.wan.fingerprint import model_fingerprint

FORMAT = "pfgen.state/2"  # /2: the metadata carries its own CRC32 ("header_crc32")

# The metadata fields a state must have, with their types (checked on load, after the header's CRC).
FIELDS = {"position": int, "batch": int, "size": list, "policy": str, "config": str, "heads": str, "model": dict,
          "rules": dict, "generator": str, "prompt": str, "timeline": list, "crc32": dict}


def _header_crc(meta: dict) -> int:
    return zlib.crc32(json.dumps({k: v for k, v in meta.items() if k != "header_crc32"}, sort_keys=True).encode())


# Past any video (2^31 latent frames: 17 years at 16 fps) and inside every index type the cache and RoPE use.
MAX_POSITION = 2 ** 31 - 1
GENERATORS = ("cpu", "cuda", "mps")  # the device types a run may draw its noise on
SWITCH = {"seconds": (int, float), "video_frame": int, "latent_frame": int, "prompt": str, "source": str}
LORA = {"sha256": str, "scale": (int, float), "alpha": (int, float, type(None))}


def _typed(value, kind) -> bool:
    """isinstance, where a bool is no number."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _records_ok(records, fields: dict) -> bool:
    return isinstance(records, list) and all(
        isinstance(r, dict) and all(k in r and _typed(r[k], t) for k, t in fields.items()) for r in records)


def _fields_ok(meta: dict) -> bool:
    """Every field present with its type, and the numbers in range (bool is not an int here); the records inside
    (the timeline's switches, the LoRAs) with theirs. A state edited by hand with a recomputed CRC is refused
    here rather than failing later inside torch."""
    if any(not _typed(meta.get(k), t) for k, t in FIELDS.items()):
        return False
    size, seed = meta["size"], meta.get("seed")
    return (0 <= meta["position"] <= MAX_POSITION and meta["batch"] >= 1 and len(size) == 2
            and all(_typed(n, int) and 0 < n <= 2 ** 16 for n in size)
            and isinstance(meta["model"].get("fingerprint"), str)
            and _records_ok(meta["model"].get("loras", []), LORA)
            and meta["generator"] in GENERATORS and meta["prompt"].strip() != ""
            and _records_ok(meta["timeline"], SWITCH)
            and all(s["prompt"].strip() and s["video_frame"] >= 0 and s["latent_frame"] >= 0 for s in meta["timeline"])
            and (meta.get("decoder") is None or isinstance(meta["decoder"], dict))
            and (seed is None or (_typed(seed, int) and 0 <= seed <= MAX_SEED)))


def _sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def config_fingerprint(cfg, dtype, device) -> str:
    """What changes the numbers of a continued run: sampling, cache budgets, fps, dtype and device type.
    The policy, head types and model have their own fingerprints (for a precise refusal)."""
    cache = {k: v for k, v in to_dict(cfg.cache).items() if k not in ("policy", "heads", "all", "backend")}
    return _sha({"sampling": to_dict(cfg.sampling), "cache": cache, "fps": cfg.video.fps, "dtype": str(dtype),
                 "device": torch.device(device).type})


def lora_records(transformer) -> list[dict]:
    """The LoRAs merged into the transformer at load, by content (sha256 of the file), scale and alpha."""
    return [{k: r[k] for k in ("sha256", "scale", "alpha")} for r in getattr(transformer, "pfgen_loras", [])]


def heads_fingerprint(types: list[list[str]]) -> str:
    return _sha(types)


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy()) if t.numel() else 0


def save_state(path: str | Path, pipe, story, cache, seed: int | None = None) -> int:
    """Write the run after its last committed chunk to `path` (atomically); returns the file size in bytes.
    `seed`: the seed whose generator the run draws from (recorded, so that a resumed run's mp4 can name it)."""
    cache_tensors, rules = cache.state_dict()
    tensors = {f"cache.{k}": t for k, t in cache_tensors.items()}
    tensors |= {f"kept.{t0}": x for t0, x in story.kept.items()}
    tensors["embeds"] = story.embeds
    if story.noise.latents is not None:
        raise PfgenError("a run whose initial noise was given as latents cannot be saved")
    generator = story.noise.generator or torch.default_generator  # no generator: noise came from torch's own
    tensors["rng"] = generator.get_state()
    decoder = None
    if story.decoder is not None:
        vae_tensors, decoder = story.decoder.state_dict()
        tensors |= {f"vae.{i}": t for i, t in vae_tensors.items()}
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    meta = {
        "format": FORMAT, "pfgen_version": __version__, "position": story.position,
        "model": {"name": pipe.config.model.name, "fingerprint": model_fingerprint(pipe.transformer, pipe.vae),
                  "loras": lora_records(pipe.transformer)},
        "config": config_fingerprint(pipe.config, pipe.dtype, pipe.device),
        "policy": pipe.policy, "heads": heads_fingerprint(pipe.original_head_types),
        "size": list(story.size), "batch": int(story.embeds.shape[0]),
        "rules": rules, "decoder": decoder, "generator": generator.device.type,
        "prompt": story.prompt, "timeline": story.history + story.switches, "seed": seed,
        "crc32": {k: _crc(t) for k, t in tensors.items()},
    }
    meta["header_crc32"] = _header_crc(meta)
    with atomic_output(path) as tmp:
        write_safetensors(tensors, tmp, {"pfgen": json.dumps(meta)})
    return Path(path).stat().st_size


READ_ATTEMPTS = 3  # reads of a state that keeps being replaced while it is read, before its error stands


def _identity(path: Path) -> tuple | None:
    """Which file `path` names now (None: none): an atomic replacement changes it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a state file, every integrity check passed."""
    from safetensors import safe_open

    if not path.is_file():
        raise PfgenError(f"state file not found: {path}")
    bad = PfgenError(f"{path} is corrupt or truncated", "save the state again")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["pfgen"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except KeyError:
        raise PfgenError(f"{path} is not a pfgen state file") from None
    except Exception:  # safetensors' own error types differ between versions
        raise bad from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise PfgenError(f"{path} is not a pfgen state file of this version (format {found}, expected {FORMAT})",
                         "save the state again with this pfgen")
    if meta.get("header_crc32") != _header_crc(meta) or not _fields_ok(meta):
        raise bad
    crcs = meta["crc32"]
    if set(crcs) != set(tensors) or any(_crc(t) != crcs[k] for k, t in tensors.items()):
        raise bad
    if not {"embeds", "rng"} <= set(tensors) or tensors["rng"].dtype != torch.uint8:
        raise bad  # what every run saves: the prompt embeddings and the noise generator's state
    return meta, tensors


@dataclass
class RunState:
    """A saved run, read and integrity-checked; `check_*` refuse what it cannot continue, `restore` loads it."""

    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, path: str | Path) -> "RunState":
        """Read and check a state. One replaced while it was read (a run saving it in place, atomically) is read
        again: safetensors opens the path twice, for the header and for the tensors' storage, so a replacement
        in between pairs one file's header with the other's tensors, which the CRCs then refuse."""
        path = Path(path).expanduser()
        attempts = READ_ATTEMPTS
        while True:
            seen = _identity(path)
            try:
                return cls(path, *_read(path))
            except PfgenError:
                attempts -= 1
                if attempts == 0 or _identity(path) == seen:
                    raise

    @property
    def position(self) -> int:
        return int(self.meta["position"])

    @property
    def batch(self) -> int:
        return int(self.meta["batch"])

    def size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The saved video size; another one given explicitly is refused."""
        saved = tuple(self.meta["size"])
        if (height or saved[0], width or saved[1]) != saved:
            raise PfgenError(f"{self.path} continues a {saved[1]}x{saved[0]} video, not {width or saved[1]}x"
                             f"{height or saved[0]}", "leave out --height/--width when resuming")
        return saved

    def check_config(self, cfg, policy: str, dtype, device) -> None:
        """Refusals that need no model: another config (sampling, cache budgets, dtype, device) or policy."""
        if self.meta["policy"] != policy:
            raise PfgenError(f"{self.path} was saved with the {self.meta['policy']} policy, this run uses {policy}",
                             f"pass --policy {self.meta['policy']}")
        if self.meta["config"] != config_fingerprint(cfg, dtype, device):
            raise PfgenError(f"{self.path} was saved with another config (sampling, cache budgets, fps, dtype or "
                             "device)", "resume with the config, --dtype and --device of the saved run")

    def check_model(self, pipe, types: list[list[str]]) -> None:
        """Refusals that need the model: other head types, other weights."""
        if self.meta["heads"] != heads_fingerprint(types):
            raise PfgenError(f"{self.path} was saved with other head types", "pass the --heads file of the saved run")
        saved, mine = self.meta["model"].get("loras", []), lora_records(pipe.transformer)
        if saved != mine:
            names = lambda records: ", ".join(f"{r['sha256'][:12]} x{r['scale']:g}" for r in records) or "none"
            raise PfgenError(f"{self.path} was saved with LoRAs {names(saved)}, this run merges {names(mine)}",
                             "resume with the --lora files (and scales) of the saved run")
        if self.meta["model"]["fingerprint"] != model_fingerprint(pipe.transformer, pipe.vae):
            raise PfgenError(f"{self.path} was saved with another model ({self.meta['model']['name']})",
                             "resume with the --checkpoint / --config of the saved run")

    def restore(self, pipe, story, cache) -> None:
        """Load the cache, kept latents, prompt, generator and decoder into a fresh run."""
        self.check_config(pipe.config, pipe.policy, pipe.dtype, pipe.device)
        self.check_model(pipe, pipe.original_head_types)
        device = pipe.device
        part = {k[len("cache."):]: t.to(device) for k, t in self.tensors.items() if k.startswith("cache.")}
        try:
            cache.load_state_dict(part, self.meta["rules"])
            if story.decoder is not None:
                if self.meta["decoder"] is None:
                    raise ValueError("the state has no decoder cache (saved without decoding)")
                vae = {k[len("vae."):]: t for k, t in self.tensors.items() if k.startswith("vae.")}
                story.decoder.load_state_dict(vae, self.meta["decoder"])
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise PfgenError(f"{self.path} does not fit this run: {exc}") from None
        story.kept = {int(k[len("kept."):]): t.to(device) for k, t in self.tensors.items() if k.startswith("kept.")}
        story.embeds = self.tensors["embeds"].to(device)
        story.prompt = story.continued = self.meta["prompt"]
        story.history = list(self.meta["timeline"])
        if story.noise.generator.device.type != self.meta["generator"]:
            raise PfgenError(f"{self.path} holds a {self.meta['generator']} noise generator, this run uses "
                             f"{story.noise.generator.device.type}", "resume on the same kind of device")
        try:
            story.noise.generator.set_state(self.tensors["rng"])
        except RuntimeError as exc:  # a generator state of another size or kind
            raise PfgenError(f"{self.path} does not fit this run: its noise generator state cannot be restored "
                             f"({str(exc).splitlines()[0][:100]})") from None
