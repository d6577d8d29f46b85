"""LoRA merge at load: equal to peft's own merge_and_unload on the same files, in every accepted format; strict."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pfgen.config import LoraConfig, load_config, with_overrides
from pfgen.errors import PfgenError
from pfgen.wan.lora import file_digest, merge_loras, parse_lora_option
from pfgen.wan.tiny import tiny_transformer
from tests.clirun import run_cli

RANK, ALPHA = 4, 12.0
# diffusers module names -> Wan names (an independent spelling of the map, for the test files)
TO_WAN = (("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"), ("attn1.to_", "self_attn."),
          ("attn2.to_", "cross_attn."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"))


def _targets(model) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and
                  name.startswith("blocks.") and (".attn" in name or ".ffn." in name))


@pytest.fixture(scope="module")
def peft_merged():
    """(base state, peft's LoRA state dict, peft's merged state) for a random LoRA on every block linear layer."""
    import peft
    model = tiny_transformer()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=_targets(model)))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora = {k: v.clone() for k, v in peft.get_peft_model_state_dict(wrapped).items()}
    merged = wrapped.merge_and_unload().state_dict()
    return base, lora, merged


def _wan_name(key: str) -> str:
    for old, new in TO_WAN:
        key = key.replace(old, new)
    return key


def _formats(lora: dict, tmp_path):
    """The same LoRA as each accepted file: PEFT safetensors + adapter_config.json, LongLive's .pt with Wan names
    (alpha given in the entry), diffusers `lora.down/up` with per-module alpha tensors."""
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file(lora, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))
    longlive = tmp_path / "lora.pt"
    torch.save({"generator_lora": {_wan_name(k): v for k, v in lora.items()}}, longlive)
    diffusers = {}
    for key, value in lora.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        part = "lora.down" if ".lora_A." in key else "lora.up"
        diffusers[f"transformer.{module}.{part}.weight"] = value
        diffusers[f"transformer.{module}.alpha"] = torch.tensor(ALPHA)
    save_file(diffusers, str(tmp_path / "diffusers.safetensors"))
    return [LoraConfig(str(peft_dir)), LoraConfig(str(longlive), alpha=ALPHA),
            LoraConfig(str(tmp_path / "diffusers.safetensors"))]


def test_merge_equals_peft_merge_and_unload(peft_merged, tmp_path):
    base, lora, merged = peft_merged
    for entry in _formats(lora, tmp_path):
        state = {k: v.clone() for k, v in base.items()}
        (record,) = merge_loras(state, [entry])
        assert record["modules"] == len(lora) // 2 == 10 * 4  # q k v o twice + 2 ffn, 4 blocks
        assert record["sha256"] == file_digest(entry.path)
        for name, tensor in merged.items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=2e-6, msg=f"{entry.path} {name}")
        changed = [k for k in base if not torch.equal(base[k], state[k])]
        assert len(changed) == 40 and all(k.endswith(".weight") for k in changed)


def test_scale_and_explicit_alpha(peft_merged, tmp_path):
    base, lora, merged = peft_merged
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    key = "blocks.1.attn2.to_v.weight"
    delta = merged[key] - base[key]  # (ALPHA / RANK) B A
    for entry, factor in ((LoraConfig(str(path)), RANK / ALPHA),
                          (LoraConfig(str(path), scale=0.5, alpha=2 * ALPHA), 1.0),
                          (LoraConfig(str(path), scale=-1.0, alpha=ALPHA), -1.0)):
        state = {k: v.clone() for k, v in base.items()}
        merge_loras(state, [entry])
        torch.testing.assert_close(state[key] - base[key], delta * factor, rtol=0, atol=2e-6)


def _broken(lora: dict, case: str) -> dict:
    out = dict(lora)
    a = "base_model.model.blocks.0.attn1.to_q.lora_A.weight"
    b = a.replace("lora_A", "lora_B")
    if case == "unknown":
        out["base_model.model.blocks.0.attn2.add_k_proj.lora_A.weight"] = out[a]  # an image-to-video layer
    elif case == "rank":
        out[b] = torch.zeros(out[b].shape[0], RANK + 1)
    elif case == "shape":
        out[a] = torch.zeros(RANK, out[a].shape[1] * 2)  # a wider model's LoRA
    elif case == "twice":
        out["blocks.0.self_attn.q.lora_A.weight"] = out[a]
    elif case == "half":
        del out[b]
    elif case == "layer":
        out["base_model.model.blocks.9.attn1.to_q.lora_A.weight"] = out[a]  # a deeper model
    return out


@pytest.mark.parametrize("case,words", [("unknown", "not LoRA tensors of this transformer"),
                                        ("rank", "rank 4 down and rank 5 up"), ("shape", "another architecture"),
                                        ("twice", "two down tensors"), ("half", "has no up"),
                                        ("layer", "not LoRA tensors of this transformer")])
def test_refusals(peft_merged, tmp_path, case, words):
    base, lora, _ = peft_merged
    path = tmp_path / f"{case}.safetensors"
    save_file({k: v.clone() for k, v in _broken(lora, case).items()}, str(path))
    state = {k: v.clone() for k, v in base.items()}
    with pytest.raises(PfgenError, match=words):
        merge_loras(state, [LoraConfig(str(path))])


def test_cli_lora_on_the_embedded_model(peft_merged, tmp_path, capsys):
    _, lora, _ = peft_merged
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    out = tmp_path / "a.mp4"
    code, _, err = run_cli(["generate", "--seconds", "1", "-o", out, "--lora", f"{path}:0.5", "--quiet"], capsys)
    assert code == 0 and out.exists(), err
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.clone() for k, v in _broken(lora, "unknown").items()}, str(bad))
    code, _, err = run_cli(["generate", "--seconds", "1", "-o", tmp_path / "b.mp4", "--lora", bad], capsys)
    assert code != 0 and err.count("\n") == 1 and err.startswith("error:") and "add_k_proj" in err
    assert not (tmp_path / "b.mp4").exists()


def test_lora_option_and_required_lora():
    assert parse_lora_option("x.safetensors:0.7") == LoraConfig("x.safetensors", 0.7)
    assert parse_lora_option("org/name:models/lora.pt") == LoraConfig("org/name:models/lora.pt")
    assert parse_lora_option("org/name:lora.pt:2") == LoraConfig("org/name:lora.pt", 2.0)
    cfg = load_config("longlive")
    assert cfg.model.lora_required and len(cfg.model.loras) == 1
    with pytest.raises(PfgenError, match="LoRA-tuned base"):
        with_overrides(cfg, model=dict(loras=()))


def test_saved_state_records_the_loras(peft_merged, tmp_path, capsys):
    """A state remembers its LoRAs by content; resuming with another LoRA (or scale) is refused in one line."""
    _, lora, _ = peft_merged
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    state = tmp_path / "run.state"
    code, _, err = run_cli(["generate", "--seconds", "1", "-o", tmp_path / "a.mp4", "--lora", path,
                            "--save-state", state, "--quiet"], capsys)
    assert code == 0, err
    from pfgen.state import RunState

    (record,) = RunState.load(state).meta["model"]["loras"]
    assert record == {"sha256": file_digest(path), "scale": 1.0, "alpha": None}
    code, _, err = run_cli(["generate", "--resume", state, "--seconds", "1", "-o", tmp_path / "b.mp4", "--lora",
                            f"{path}:0.5"], capsys)
    assert code != 0 and err.count("\n") == 1 and "saved with LoRAs" in err and not (tmp_path / "b.mp4").exists()
