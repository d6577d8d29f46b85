"""Config loading: every bundled file loads, strictness, and the documented numbers match the defaults."""

from pathlib import Path

import pytest

import pfgen.config
from pfgen.config import CONFIG_DIR, CacheConfig, PyramidConfig, load_config, with_overrides
from pfgen.errors import PfgenError
from pfgen.heads import HeadTypes
from pfgen.world.model import HEIGHT, WEIGHTS, WIDTH, is_embedded


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_bundled_configs_load(path):
    cfg = load_config(path.stem)
    if cfg.cache.heads:
        assert Path(cfg.cache.heads).is_file()
        HeadTypes.load(cfg.cache.heads)


def test_default_is_the_embedded_world_model(monkeypatch):
    monkeypatch.setattr(pfgen.config, "DEFAULT_CONFIG", pfgen.config.CONFIG_DIR / "tiny.yaml")  # undo conftest's
    cfg = load_config(None)
    assert cfg.model.name == "tiny" and is_embedded(cfg.model)
    assert Path(cfg.model.wan_dir) == WEIGHTS and (WEIGHTS / "vae" / "config.json").is_file()
    assert cfg.cache.policy == "pyramid" and cfg.cache.heads.endswith("heads/tiny.json")
    assert (cfg.video.height, cfg.video.width) == (HEIGHT, WIDTH)


def test_pyramid_forcing_yaml_spells_out_the_defaults():
    cfg = load_config("pyramid-forcing")
    assert cfg.cache.pyramid == PyramidConfig()
    assert cfg.cache.rolling == CacheConfig().rolling


def test_paths_resolve_relative_to_the_yaml(tmp_path):
    (tmp_path / "sub").mkdir()
    config = tmp_path / "sub" / "c.yaml"
    config.write_text("cache:\n  heads: ../h.json\nmodel:\n  wan_dir: wan\n")
    cfg = load_config(config)
    assert cfg.cache.heads == str(tmp_path / "h.json")
    assert cfg.model.wan_dir == str(tmp_path / "sub" / "wan")


@pytest.mark.parametrize("text, message", [
    ("video: {height: '480'}\n", "'video.height' must be int"),
    ("sampling: {timesteps: []}\n", "'sampling.timesteps' must be a non-empty list"),
    ("- a\n- b\n", "expected a mapping"),
    ("cache: {all: banana}\n", "cache.all must be one of"),
    ("cache: {rolling: {window: 3, sink: 3}}\n", "sink must be smaller"),
])
def test_strict_errors(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(PfgenError, match=message):
        load_config(config)


def test_overrides_replace_only_given_fields():
    cfg = with_overrides(load_config("self-forcing"), cache=dict(policy="rolling", heads=None))
    assert cfg.cache.policy == "rolling" and cfg.cache.heads.endswith("self-forcing-1.3b.json")
