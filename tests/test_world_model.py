"""The shipped world model (config `tiny`, pfgen's default) draws what its prompt names: the named background,
and the named object in the named colour, moving. Scored by pfgen.world.score, which knows nothing of the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfgen import load_pipeline
from pfgen.world.grammar import parse
from pfgen.video import decoded_frames
from pfgen.world.score import NAMES, score_frames
from clirun import run_cli

FRAMES = 33  # 2 s at 16 fps: 3 chunks of 3 latent frames


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def frames_of(pipe, prompt: str, seed: int) -> np.ndarray:
    out = pipe(prompt, num_frames=FRAMES, generator=torch.Generator().manual_seed(seed))
    return (out.frames[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize("background", ["black", "gray", "navy", "brown"])
def test_the_background_is_the_named_one(pipe, background):
    scene = parse(f"a white ball bouncing on a {background} background")
    scores = score_frames(frames_of(pipe, scene.prompt, seed=3), scene)
    assert (scores.background_accuracy >= 0.9).mean() >= 0.9, scores.background_accuracy


@pytest.mark.parametrize("seed", [0, 1])
def test_a_red_ball_circles_on_navy(pipe, seed):
    scene = parse("a red ball circling on a navy background")
    scores = score_frames(frames_of(pipe, scene.prompt, seed), scene)
    assert (scores.background_accuracy >= 0.9).mean() >= 0.9, scores.background_accuracy
    assert scores.present[:, 0].mean() >= 0.5, scores.present[:, 0]  # a red disc of the right size, in most frames
    centres = scores.centres[:, 0][scores.present[:, 0]]
    assert np.ptp(centres, axis=0).max() >= 0.2 * 64, centres  # it moves: an orbit of 20-30 % of the height


def test_the_object_takes_the_named_colour(pipe):
    """The same scene in another colour: the named colour is drawn, red (the colour of the test above) is not."""
    colour = "yellow"
    scene = parse(f"a {colour} ball circling on a navy background")
    classes = score_frames(frames_of(pipe, scene.prompt, seed=0), scene).classes
    named = (classes == NAMES.index(colour)).mean(axis=(1, 2))
    red = (classes == NAMES.index("red")).mean(axis=(1, 2))
    assert (named >= 0.01).mean() >= 0.5, named
    assert red.mean() < 0.1 * named.mean(), (red.mean(), named.mean())


def test_words_outside_the_grammar_are_warned_about_and_the_video_is_made(tmp_path, capsys):
    out = tmp_path / "kite.mp4"
    code, stdout, stderr = run_cli(["generate", "--config", "tiny", "--prompt", "a red kite over the sea",
                                    "--seconds", "1", "-o", str(out)], capsys)
    assert code == 0, stderr
    warnings = [line for line in (stdout + stderr).splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "'kite'" in warnings[0] and "circling" in warnings[0], stdout + stderr
    assert decoded_frames(out) == 21


def test_a_world_folder_elsewhere_is_a_world_model(tmp_path, capsys):
    """A folder that train_world.py wrote (here: a copy of the shipped one) gets the world's rules too: the
    out-of-grammar warning, profile-heads' world calibration prompts, no tae decoder. Another transformer does
    not."""
    import json
    import shutil

    from pfgen.config import load_config, with_overrides
    from pfgen.profile.calibrate import WORLD_PROMPTS, read_prompts
    from pfgen.world.model import WEIGHTS, is_world

    folder = tmp_path / "world"
    shutil.copytree(WEIGHTS, folder)
    model = with_overrides(load_config("tiny"), model=dict(checkpoint=str(folder / "transformer"),
                                                           wan_dir=str(folder))).model
    assert is_world(model) and read_prompts(None, world=is_world(model)) == read_prompts(WORLD_PROMPTS)
    out = tmp_path / "kite.mp4"
    code, stdout, stderr = run_cli(["generate", "--config", "tiny", "--checkpoint", str(folder / "transformer"),
                                    "--wan-dir", str(folder), "--prompt", "a red kite over the sea", "--seconds", "1",
                                    "-o", str(out)], capsys)
    assert code == 0, stderr
    warnings = [line for line in (stdout + stderr).splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "'kite'" in warnings[0], stdout + stderr
    code, stdout, stderr = run_cli(["generate", "--config", "tiny", "--checkpoint", str(folder / "transformer"),
                                    "--wan-dir", str(folder), "--decoder", "tae", "-o", str(tmp_path / "tae.mp4")],
                                   capsys)
    assert code != 0 and "tae decodes the Wan VAE's latents" in stderr and not (tmp_path / "tae.mp4").exists()

    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), num_layers=5)))
    assert not is_world(model)
    assert not is_world(load_config(None).model)  # the random test model (the suite's default, conftest.py)
