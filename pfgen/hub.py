"""Hugging Face Hub references for weights: parse them, download what pfgen loads, name every failure in one line.

A reference is `org/name` (a repo folder) or `org/name:path/in/repo.pt` (one file), each with an optional
`@revision`. Anything that exists on disk, is absolute, or starts with `.` or `~` is a local path and wins.
Downloads go through `huggingface_hub` into the standard cache, so `HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN`
and `HF_ENDPOINT` apply, with its progress bars and resuming. References are resolved only at load time
(and by `pfgen download`), never while a config is parsed, so validation and `--dry-run` stay offline.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from pathlib import Path

from pfgen.errors import PfgenError

_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<file>[^@:]+))?(?:@(?P<rev>[\w./-]+))?")

# What pfgen loads from a Wan2.1 diffusers repo: never its transformer/ (pfgen's students replace it).
WAN_PATTERNS = ("model_index.json", "text_encoder/*", "tokenizer/*", "vae/*")
TAE_REFERENCE = "madebyollin/taehv:safetensors/taew2_1.safetensors"  # the tiny decoder's published weights
# A diffusers transformer folder given as the checkpoint.
TRANSFORMER_PATTERNS = ("*.json", "*.safetensors")
ROLE_PATTERNS = {"checkpoint": TRANSFORMER_PATTERNS, "wan_dir": WAN_PATTERNS, "decoder": ("*.safetensors",),
                 "lora": TRANSFORMER_PATTERNS}
OPTIONS = {"checkpoint": "--checkpoint", "wan_dir": "--wan-dir", "decoder": "--decoder-weights", "lora": "--lora"}


@dataclass(frozen=True)
class HubRef:
    repo: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        file = f":{self.filename}" if self.filename else ""
        return self.repo + file + (f"@{self.revision}" if self.revision else "")


def parse_reference(value: str | Path | None) -> HubRef | None:
    """The Hub reference in `value`, or None when it is a local path (or nothing)."""
    if value is None:
        return None
    text = str(value)
    if text.startswith((".", "~", "/")) or Path(text).expanduser().exists():
        return None
    match = _REF.fullmatch(text)
    if match is None:
        return None
    return HubRef(match["repo"], match["file"], match["rev"])


def is_reference(value) -> bool:
    return parse_reference(value) is not None


FORMS = "an existing path, org/name (a repo folder) or org/name:path/in/repo.pt (one file), with an optional @revision"


def check_source(value: str | Path | None, option: str) -> None:
    """A weights source is an existing local path or a well-formed reference; anything else (`org/`,
    `a/b/c/d`, `org/name@`, `org/name@main:file.pt`, a missing file) is one line showing the valid forms."""
    if value is None or is_reference(value) or Path(value).expanduser().exists():
        return
    raise PfgenError(f"{option} {value}: no such file or folder, and not a Hub reference", f"give {FORMS}")


@dataclass(frozen=True)
class Fetched:
    """One downloaded (or already cached) reference: the local path and its files."""

    ref: HubRef
    path: Path
    files: tuple[Path, ...]

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def resolve(value: str | None, role: str) -> str | None:
    """A local path for `value` (model.checkpoint or model.wan_dir): Hub references are downloaded or taken from
    the cache; local paths are returned unchanged."""
    check_source(value, f"model.{role}")
    ref = parse_reference(value)
    return value if ref is None else str(fetch(ref, role).path)


def resolve_model(model_cfg):
    """The ModelConfig with its checkpoint and Wan folder as local paths (downloading references)."""
    import dataclasses

    loras = tuple(dataclasses.replace(lora, path=resolve(lora.path, "lora")) for lora in model_cfg.loras)
    return dataclasses.replace(model_cfg, checkpoint=resolve(model_cfg.checkpoint, "checkpoint"),
                               wan_dir=resolve(model_cfg.wan_dir, "wan_dir"), loras=loras)


def decoder_source(model_cfg) -> str | None:
    """The tae weights a config decodes with: `decoder_weights`, else the published file; None for the wan
    decoder, and for the embedded tiny model without weights (its tae is built in code, like the model)."""
    if model_cfg.decoder != "tae":
        return None
    return model_cfg.decoder_weights or (TAE_REFERENCE if model_cfg.checkpoint is not None else None)


def download_model(model_cfg) -> list[tuple[str, str, Fetched | None]]:
    """Fetch everything a model config names: (role, value, Fetched or None for a local path) per source."""
    out = []
    sources = [("checkpoint", model_cfg.checkpoint), ("wan_dir", model_cfg.wan_dir), ("decoder", decoder_source(model_cfg))]
    for role, value in sources + [("lora", lora.path) for lora in model_cfg.loras]:
        check_source(value, OPTIONS[role])
        if value is not None:
            ref = parse_reference(value)
            out.append((role, value, fetch(ref, role) if ref is not None else None))
    return out


def fetch(ref: HubRef, role: str) -> Fetched:
    """Download one reference (a file, or the files of a repo that `role` needs) into the HF cache."""
    import huggingface_hub as hf

    try:
        if ref.filename:
            path = Path(hf.hf_hub_download(ref.repo, ref.filename, revision=ref.revision))
            return Fetched(ref, path, (path,))
        path = Path(hf.snapshot_download(ref.repo, revision=ref.revision, allow_patterns=list(ROLE_PATTERNS[role])))
    except Exception as exc:  # every huggingface_hub / httpx / OS failure becomes one line
        raise hub_error(exc, ref) from None
    files = tuple(sorted(f for f in path.rglob("*") if f.is_file()))
    if not files:
        raise PfgenError(f"{ref.repo} has no files pfgen loads ({', '.join(ROLE_PATTERNS[role])})",
                         "check that the reference names the right repository")
    return Fetched(ref, path, files)


def hub_error(exc: Exception, ref: HubRef) -> PfgenError:
    """One line naming the repo and the fix, for each way a download fails."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(exc, LocalEntryNotFoundError) and isinstance(exc.__cause__, HfHubHTTPError):
        exc = exc.__cause__  # the Hub answered, with an error, and nothing was cached: report the answer
    what = str(ref)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return PfgenError(f"disk full while downloading {what} into {constants.HF_HUB_CACHE}",
                          "free space, or set HF_HOME to a bigger disk")
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or _is_connection_error(exc):
        if constants.HF_HUB_OFFLINE:
            return PfgenError(f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                              "is set", "run `pfgen download --config NAME` with network first, or unset "
                                        "HF_HUB_OFFLINE")
        return PfgenError(f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) for {what}, and it is not "
                          "cached", "check the network (or HF_ENDPOINT), or download on a connected machine with "
                                    "`pfgen download` and copy HF_HOME")
    if isinstance(exc, GatedRepoError):
        return PfgenError(f"{ref.repo} is gated", f"accept its terms on huggingface.co/{ref.repo} and set HF_TOKEN")
    if isinstance(exc, RevisionNotFoundError):
        return PfgenError(f"revision '{ref.revision}' not found in {ref.repo}", "check the @revision")
    if isinstance(exc, RepositoryNotFoundError):
        return PfgenError(f"repository {ref.repo} not found on the Hub (or private)",
                          "check the name, or set HF_TOKEN for a private repository")
    if isinstance(exc, EntryNotFoundError):
        return PfgenError(f"{ref.filename} not found in {ref.repo}", "check the file's path in the repository")
    if status in (401, 403):
        return PfgenError(f"not authorised to read {ref.repo} (HTTP {status})",
                          "set HF_TOKEN to a token with access to it")
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return PfgenError(f"partial download of {what} (the file arrived incomplete)",
                          "run the command again: the download resumes")
    if isinstance(exc, HfHubHTTPError):
        return PfgenError(f"the Hub answered HTTP {status} for {what}", "try again later")
    if isinstance(exc, OSError):
        return PfgenError(f"cannot download {what}: {exc.strerror or exc}", "check HF_HOME and the disk")
    return PfgenError(f"cannot download {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _is_connection_error(exc: Exception) -> bool:
    return any(c.__name__ in ("ConnectError", "ConnectTimeout", "TimeoutException", "ReadTimeout")
               for c in type(exc).__mro__)
