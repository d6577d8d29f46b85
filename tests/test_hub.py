"""Hub references without internet: a loopback Hub (tests/hubserver.py) reached through HF_ENDPOINT, and a cache
written by hand in the HF layout under HF_HUB_OFFLINE. Stand-in files of the real layout are served under the
real repo names: the embedded tiny transformer as a Self Forcing `.pt`, and a tiny Wan2.1 diffusers folder."""

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

import pfgen
from pfgen.cli import main as cli_main
from pfgen.errors import PfgenError
from pfgen.hub import HubRef, fetch, parse_reference
from pfgen.wan.tiny import tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae
from hubserver import Hub
from test_checkpoint import HEADS, wan_state

SF_REPO, SF_FILE = "gdhe17/Self-Forcing", "checkpoints/self_forcing_dmd.pt"
WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SMALL = ["--num-heads", str(HEADS), "--policy", "rolling", "--seconds", "1", "--height", "32", "--width", "48"]


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """{repo: {path: bytes}} with the layouts of the published repos (Wan with a transformer/ never to fetch)."""
    buf = io.BytesIO()
    torch.save({"generator_ema": wan_state(tiny_transformer()), "critic": {"x": torch.zeros(1)}}, buf)
    root = tmp_path_factory.mktemp("wan")
    tiny_vae().save_pretrained(root / "vae")
    tiny_text_encoder().save_pretrained(root / "text_encoder")
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    wan = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    wan["model_index.json"] = json.dumps({"_class_name": "WanPipeline"}).encode()
    wan["transformer/diffusion_pytorch_model.safetensors"] = b"not for pfgen" * 1000
    return {SF_REPO: {SF_FILE: buf.getvalue(), "README.md": b"# Self Forcing"}, WAN_REPO: wan}


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    """The loopback Hub with the stand-in repos; huggingface_hub pointed at it and at an empty cache."""
    with Hub() as server:
        server.repos.update(repos)
        point_at(monkeypatch, server.url, tmp_path / "hf-cache", offline=False)
        yield server


def point_at(monkeypatch, endpoint, cache, offline):
    """What HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE set when huggingface_hub is imported."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)


def write_cache(cache, repo, files, sha="a" * 40):
    """The HF cache layout, written by hand: models--org--name/{refs/main, snapshots/<sha>/...}."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(sha)
    for path, data in files.items():
        target = folder / "snapshots" / sha / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def embedded_latents(**load):
    pipe = pfgen.load_pipeline(device="cpu", dtype="float32", **load)
    return pipe("a red kite", num_frames=9, output_type="latent", height=32, width=48, policy="rolling",
                generator=torch.Generator().manual_seed(3)).latents


@pytest.mark.parametrize("text, ref", [
    ("org/name", HubRef("org/name")),
    ("org/name@v1.0", HubRef("org/name", None, "v1.0")),
    ("gdhe17/Self-Forcing:checkpoints/self_forcing_dmd.pt", HubRef(SF_REPO, SF_FILE)),
    ("zhuhz22/Causal-Forcing:chunkwise/causal_forcing.pt@abc123", HubRef("zhuhz22/Causal-Forcing",
                                                                         "chunkwise/causal_forcing.pt", "abc123")),
    ("./org/name", None), ("/data/org/name", None), ("~/w/x.pt", None), ("model.pt", None), ("a/b/c", None),
])
def test_parse_reference(text, ref):
    assert parse_reference(text) == ref


def test_existing_local_path_wins_over_a_reference(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_reference("org/name") is None and parse_reference("org/other") == HubRef("org/other")


def test_bundled_config_runs_from_the_hub_and_equals_the_embedded_model(hub):
    """`self-forcing` names its published sources: they are downloaded (only what pfgen loads) and the result is
    the embedded tiny model's, whose weights the stand-in files hold."""
    got = embedded_latents(config="self-forcing", num_heads=HEADS)
    paths = [p for _, p, _ in hub.requests]
    assert any(p.endswith(SF_FILE) for p in paths) and any("text_encoder/" in p for p in paths)
    assert not any("/transformer/" in p for p in paths) and not any("README" in p for p in paths)
    snapshot = next((Path(constants.HF_HUB_CACHE) / "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers").glob("snapshots/*"))
    assert sorted(p.name for p in snapshot.iterdir()) == ["model_index.json", "text_encoder", "tokenizer", "vae"]
    assert torch.equal(got, embedded_latents())


def test_api_references_and_interrupted_download_resumes(hub, monkeypatch):
    """References passed to load_pipeline; the first GET of the checkpoint is cut halfway: the client resumes
    with a Range request and the file arrives whole."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 2 ** 16)  # written in 64 KiB pieces, not 10 MiB
    hub.drop_once.add(SF_FILE)
    got = embedded_latents(checkpoint=f"{SF_REPO}:{SF_FILE}@main", wan_dir=WAN_REPO, num_heads=HEADS)
    gets = [(p, r) for m, p, r in hub.requests if m == "GET" and p.endswith(SF_FILE)]
    assert len(gets) == 2 and gets[0][1] is None and gets[1][1].startswith("bytes=")
    assert int(gets[1][1].split("=")[1].rstrip("-")) > 0
    path = fetch(HubRef(SF_REPO, SF_FILE), "checkpoint").path
    assert path.read_bytes() == hub.repos[SF_REPO][SF_FILE]
    assert torch.equal(got, embedded_latents())


def test_offline_with_a_prepopulated_cache(repos, tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE with the files already in the cache: no network, same result; an uncached reference is one
    line naming it and the fix."""
    cache = tmp_path / "cache"
    write_cache(cache, SF_REPO, repos[SF_REPO])
    write_cache(cache, WAN_REPO, {k: v for k, v in repos[WAN_REPO].items() if not k.startswith("transformer/")})
    point_at(monkeypatch, "http://127.0.0.1:9", cache, offline=True)
    assert torch.equal(embedded_latents(config="self-forcing", num_heads=HEADS), embedded_latents())
    capsys.readouterr()
    code = _cli(["generate", "--config", "causal-forcing", *SMALL, "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "zhuhz22/Causal-Forcing:chunkwise/causal_forcing.pt is not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE" in err and "pfgen download" in err and not (tmp_path / "x.mp4").exists()


def _cli(args):
    with pytest.raises(SystemExit) as exit_:
        cli_main(args)
    return exit_.value.code


@pytest.mark.parametrize("setup, ref, message", [
    (lambda h: None, HubRef("nobody/nothing"), "repository nobody/nothing not found on the Hub (or private)"),
    (lambda h: None, HubRef(SF_REPO, "checkpoints/missing.pt"), "checkpoints/missing.pt not found in " + SF_REPO),
    (lambda h: h.status.update({"org/gated": (403, "GatedRepo")}), HubRef("org/gated", "x.pt"), "org/gated is gated"),
    (lambda h: h.status.update({"org/private": (401, "RepoNotFound")}), HubRef("org/private"),
     "repository org/private not found on the Hub (or private)"),
    (lambda h: h.status.update({"org/locked": (403, None)}), HubRef("org/locked", "x.pt"),
     "not authorised to read org/locked (HTTP 403)"),
    (lambda h: h.short.add(SF_FILE), HubRef(SF_REPO, SF_FILE), "partial download of " + SF_REPO),
])
def test_download_errors_are_one_line_with_the_repo_and_the_fix(hub, setup, ref, message):
    setup(hub)
    with pytest.raises(PfgenError) as exc:
        fetch(ref, "checkpoint")
    assert message in str(exc.value) and exc.value.hint and "\n" not in str(exc.value)


def test_no_network_and_full_disk(hub, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/"
                                                                  "{filename}")
    with pytest.raises(PfgenError, match=r"cannot reach the Hugging Face Hub \(http://127.0.0.1:9\) for gdhe17"):
        fetch(HubRef(SF_REPO, SF_FILE), "checkpoint")
    point_at(monkeypatch, hub.url, constants.HF_HUB_CACHE, offline=False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub.file_download, "http_get", full)
    with pytest.raises(PfgenError, match="disk full while downloading gdhe17/Self-Forcing.*HF_HOME"):
        fetch(HubRef(SF_REPO, SF_FILE), "checkpoint")


def test_download_command_then_offline_generate(hub, tmp_path):
    """The cluster workflow in real processes: `pfgen download`, then HF_HUB_OFFLINE=1 generate, no path given."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "pfgen", "download", "--config", "self-forcing"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"checkpoint: {SF_REPO}:{SF_FILE} -> ") and "(1 files, " in lines[0]
    assert lines[1].startswith(f"wan_dir: {WAN_REPO} -> ") and "MiB)" in lines[1]
    before = len(hub.requests)
    out = tmp_path / "out.mp4"
    run = subprocess.run([sys.executable, "-m", "pfgen", "generate", "--config", "self-forcing", *SMALL,
                          "-o", str(out)], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert len(hub.requests) == before and out.stat().st_size > 0
    assert "memory: KV cache predicted" in run.stderr


def test_yaml_keeps_references_and_resolves_local_paths_next_to_it(tmp_path):
    """A YAML model.checkpoint / model.wan_dir may be a reference (kept as is, resolved only at load time) or a
    path relative to the YAML file."""
    from pfgen.config import load_config

    (tmp_path / "wan").mkdir()
    (tmp_path / "run.yaml").write_text(f"model:\n  name: x\n  checkpoint: {SF_REPO}:{SF_FILE}@v1\n  wan_dir: wan\n")
    model = load_config(tmp_path / "run.yaml").model
    assert model.checkpoint == f"{SF_REPO}:{SF_FILE}@v1" and model.wan_dir == str(tmp_path / "wan")
