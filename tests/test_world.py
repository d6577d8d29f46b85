"""The procedural world (grammar, renderer, scorer) against planted data, and its place in evaluate."""

import json

import numpy as np
import pytest

from pfgen.world.grammar import (BACKGROUNDS, OBJECT_COLOURS, PERIODS, STRIPE_LIFT, Scene, Thing, parse,
                                 sample_scene, unknown_words, vocabulary_warning)
from pfgen.world.render import WorldVideo
from pfgen.world.score import score_frames, score_video

H, W = 64, 96


def render(prompt, seed=3, start=0, count=48):
    return WorldVideo(parse(prompt), seed, H, W).frames(start, count)


def test_grammar_round_trips_and_refuses_what_it_forbids():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        assert parse(scene.prompt) == scene
        assert len({t.colour for t in scene.things}) == len(scene.things)
    assert parse("a red ball circling and a red square resting on a navy background") is None  # shared colour
    assert parse("a red kite circling on a navy background") is None  # unknown shape
    assert parse("a red ball circling on a pink background") is None
    assert parse("A red ball circling, on a navy background") == Scene((Thing("red", "ball", "circling"),), "navy")


def test_held_out_prompts_never_appear_in_the_training_split():
    rng = np.random.default_rng(1)
    train = [sample_scene(rng) for _ in range(500)]
    held = [sample_scene(rng, held_out=True) for _ in range(100)]
    assert not any(s.held_out for s in train)
    assert all(s.held_out for s in held)
    for scene in held:
        pairs = {(t.colour, t.shape) for t in scene.things}
        assert ("green", "triangle") in pairs or ("orange", "square") in pairs or \
            (scene.striped and scene.background == "brown")


def test_unknown_words_are_named_with_the_vocabulary():
    assert unknown_words("a red kite over the sea") == ["kite", "over", "the", "sea"]
    assert vocabulary_warning("a red ball circling on a navy background") is None
    message = vocabulary_warning("a cat on a sofa")
    assert "'cat'" in message and "'sofa'" in message and "circling" in message and "\n" not in message


def test_render_is_deterministic_and_any_range_is_a_slice_of_the_whole():
    prompt = "a red ball circling and a yellow triangle sliding left on a striped navy background"
    whole = render(prompt, count=80)
    assert np.array_equal(whole, render(prompt, count=80))
    assert np.array_equal(whole[37:57], render(prompt, start=37, count=20))
    assert not np.array_equal(whole, render(prompt, seed=4, count=80))  # the seed moves things


@pytest.mark.parametrize("motion", ["circling", "bouncing", "sliding left", "sliding right"])
def test_motions_repeat_with_the_grammar_period(motion):
    period = PERIODS[motion]
    frames = render(f"a white square {motion} on a black background", count=period + 8)
    assert np.array_equal(frames[:8], frames[period:period + 8])
    assert not np.array_equal(frames[0], frames[period // 2])


def test_palette_is_exact_inside_shapes_and_on_the_background():
    frames = render("a blue ball resting on a gray background", count=1)[0]
    colours = {tuple(int(c) for c in p) for p in frames.reshape(-1, 3)}
    assert OBJECT_COLOURS["blue"] in colours and BACKGROUNDS["gray"] in colours
    striped = render("a blue ball resting on a striped brown background", count=1)[0]
    bright = tuple(c + STRIPE_LIFT for c in BACKGROUNDS["brown"])
    counts = {c: int((striped.reshape(-1, 3) == c).all(1).sum()) for c in (BACKGROUNDS["brown"], bright)}
    assert all(n > 0.2 * H * W for n in counts.values())  # both stripe colours cover a good share


def test_scorer_passes_the_world_itself_and_measures_its_periods():
    prompt = "a red ball circling and a orange square bouncing on a striped navy background"
    report = score_video(render(prompt, count=160), parse(prompt))
    assert min(w["world_background"] for w in report["windows"]) == 1.0
    assert np.mean([w["world_objects"] for w in report["windows"]]) > 0.9
    assert max(w["world_spurious"] for w in report["windows"]) < 0.02
    measured = [p["measured_s"] for p in report["periods"]]
    assert measured[0] == pytest.approx(2.0, rel=0.05) and measured[1] == pytest.approx(1.5, rel=0.05)


def test_scorer_sees_a_wrong_background_colour_and_shape():
    scene = parse("a red ball resting on a navy background")
    scores = score_frames(render("a red ball resting on a brown background", count=4), scene)
    assert scores.background_accuracy.max() < 0.05
    assert scores.present.all()
    wrong_colour = score_frames(render("a blue ball resting on a navy background", count=4), scene)
    assert not wrong_colour.present.any() and not wrong_colour.found.any()
    for shape in ("square", "triangle"):  # the red blob is found, but it is not the ball
        wrong_shape = score_frames(render(f"a red {shape} resting on a navy background", count=4), scene)
        assert wrong_shape.found.all() and not wrong_shape.present.any()


def test_scorer_counts_pixels_of_no_named_colour_as_spurious():
    scene = parse("a red ball resting on a navy background")
    frames = render("a red ball resting on a navy background", count=2)
    frames[1, :16] = (128, 255, 0)  # a quarter of the frame in a colour the prompt does not name
    spurious = score_frames(frames, scene).spurious
    assert spurious[0] < 0.01 and spurious[1] == pytest.approx(0.25, abs=0.01)


def test_stability_losses_say_what_each_changed_pixel_was_and_became():
    """Planted class maps on a striped navy background with a red ball. The first second: left half navy,
    right half its stripe colour, a red 8x8 block. Later: the halves swapped (stripes that moved: 48 + 48
    columns), the red block gone to navy, and a 4x4 patch of the left half turned gray. Each change lands in
    its own part; the parts add up to 1 - stability."""
    from pfgen.world.score import WorldTrack

    navy, stripe = BACKGROUNDS["navy"], tuple(min(255, c + STRIPE_LIFT) for c in BACKGROUNDS["navy"])
    first = np.zeros((H, W, 3), np.uint8)
    first[:, :48], first[:, 48:] = navy, stripe
    first[0:8, 0:8] = OBJECT_COLOURS["red"]
    later = np.zeros((H, W, 3), np.uint8)
    later[:, :48], later[:, 48:] = stripe, navy
    later[0:8, 0:8] = stripe  # where the red block was, the left half's new colour
    later[20:24, 20:24] = BACKGROUNDS["gray"]
    track = WorldTrack(parse("a red ball resting on a striped navy background"))
    for frame in [first] * 16 + [later] * 16:
        track.add(frame)
    window = track.window(16, 32, 16, losses=True)
    losses = window["world_stability_losses"]
    pixels = H * W
    assert losses["object_moved"] == pytest.approx(64 / pixels)
    assert losses["background_lost"] == pytest.approx(16 / pixels)
    assert losses["background_swapped"] == pytest.approx((pixels - 64 - 16) / pixels)
    assert losses["other"] == 0
    assert sum(losses.values()) == pytest.approx(1 - window["world_stability"])


def test_evaluate_adds_world_metrics_for_a_world_prompt(tmp_path, capsys):
    from tests.clirun import run_cli
    from pfgen.video import Mp4Writer

    prompt = "a yellow ball circling on a black background"
    path = tmp_path / "world.mp4"
    with Mp4Writer(path, W, H, 16, metadata={"title": prompt, "comment": json.dumps({"prompt": prompt})}) as w:
        w.write(render(prompt, count=64))
    code, out, err = run_cli(["evaluate", str(path), "--window", "1", "--json"], capsys)
    assert code == 0, err
    video = json.loads(out)["videos"][0]
    assert video["world"]["prompt"] == prompt
    assert all(w["world_background"] > 0.95 and w["world_objects"] > 0.9 for w in video["windows"])
