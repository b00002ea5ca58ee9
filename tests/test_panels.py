"""Each panel's handlers called as plain functions on a stored trace: no server, no browser."""

from __future__ import annotations

import ast
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import SIZE
from PIL import Image

import sdviz
from sdviz import compare as library_compare
from sdviz.ui import Models
from sdviz.ui.models import RANDOM, RANDOM_PRESET
from sdviz.ui.panels import compare, generate, how, over_time, steps, words
from sdviz.ui.session import Session, strongest_word
from sdviz.ui.wiring import StopRequests

STEPS = 4
PROMPT = "a red circle on the left and a blue square"
ALL = dict(from_step=1, to_step=STEPS, blocks=["down", "mid", "up"], resolutions=[], layers=[], head=-1)
DRAW = dict(negative=False, opacity=0.5, colormap="jet")


@pytest.fixture(scope="module")
def models(sd1_pipe):
    return Models({RANDOM: RANDOM_PRESET}, loaded={RANDOM: sd1_pipe})


@pytest.fixture(scope="module")
def stored(sd1_pipe, tmp_path_factory) -> Session:
    """A run saved to disk and loaded back, as a session holds it."""
    settings = sdviz.Settings(PROMPT, negative_prompt="blurry", steps=STEPS, width=SIZE, height=SIZE, seed=3)
    image, run = sdviz.generate(sd1_pipe, settings)
    path = run.save(tmp_path_factory.mktemp("trace") / "run.safetensors")
    loaded = sdviz.TraceResult.load(path)
    return Session(loaded, np.asarray(image), "tiny-random", 3, 1.0, settings, "tiny random")


def request(hash_="user-1"):
    return SimpleNamespace(session_hash=hash_)


# -- generate -------------------------------------------------------------------------------------------
def test_generate_panel_streams_then_shows_the_run_and_its_downloads(models, stored):
    events = list(
        generate.generate(
            "tiny-random",
            PROMPT,
            "",
            "DDIM",
            STEPS,
            7.5,
            "3",
            False,
            SIZE,
            SIZE,
            False,
            None,
            request(),
            models=models,
            stops=StopRequests(),
        )  # fmt: skip
    )
    assert all("progress" in e for e in events)
    last = events[-1]
    assert isinstance(last["session"], Session) and last["seed_used"] == "3"
    assert "Done: 4 steps" in last["progress"] and "Seed 3" in last["notes"]
    assert [text for text, kind in last["tokens"] if kind][1:4] == ["a", "red", "circle"]
    files = generate.downloads("circle", **DRAW, **ALL, session=stored)["files"]
    assert {Path(f).name for f in files} == {"image.png", "heatmap-circle.png", "trace.safetensors", "report.html"}


def test_stop_ends_the_run_with_its_steps_kept_and_marked_partial(models):
    stops = StopRequests()
    run = generate.generate("tiny-random", PROMPT, "", "DDIM", 30, 7.5, "3", False, SIZE, SIZE, False, None,
                            request("stopper"), models=models, stops=stops)  # fmt: skip
    first = next(run)  # "Loading…": the run is registered
    assert "Loading" in first["progress"]
    assert stops.stop("stopper") and not stops.stop("someone-else")
    last = list(run)[-1]
    session = last["session"]
    assert session.partial and 1 <= session.run.num_steps < 30
    assert f"Stopped at step {session.run.num_steps} of 30" in last["progress"]
    assert "Stopped part-way" in last["notes"]
    assert last["image"].shape == (SIZE, SIZE, 3)  # the last x0, decoded
    assert words.heatmap("circle", **DRAW, **{**ALL, "to_step": 30}, session=session)["heatmap"].size == (SIZE, SIZE)


def test_bad_form_input_raises_the_library_message(models):
    with pytest.raises(ValueError, match="whole number"):
        next(generate.generate("tiny-random", PROMPT, "", "DDIM", 2.5, 7.5, "3", False, SIZE, SIZE, False, None,
                               request(), models=models, stops=StopRequests()))  # fmt: skip


def test_the_built_in_model_note_lists_what_it_can_draw():
    note = generate.model_note(sdviz.PRESETS["toy"])
    for word in ("red", "green", "blue", "yellow", "circle", "square", "triangle", "small", "large", "on the left"):
        assert word in note
    assert generate.model_note(sdviz.PRESETS["sd15"]) == ""


# -- words ----------------------------------------------------------------------------------------------
def test_words_panel_shows_chips_maps_grid_and_ranks_a_clicked_region(stored):
    out = words.words(False, 0.5, "jet", stored)
    assert [v for _, v in out["word"].choices] == [
        "a",
        "red",
        "circle",
        "on",
        "the",
        "left",
        "and",
        "blue",
        "square",
    ]
    assert out["word"].value == strongest_word(stored.run)
    red = np.asarray(words.heatmap("red", **DRAW, **ALL, session=stored)["heatmap"])
    blue = np.asarray(words.heatmap("blue", **DRAW, **ALL, session=stored)["heatmap"])
    early = np.asarray(words.heatmap("red", **DRAW, **{**ALL, "to_step": 1}, session=stored)["heatmap"])
    assert red.shape == (SIZE, SIZE, 3) and not np.array_equal(red, blue) and not np.array_equal(red, early)
    assert words.word_grid(**DRAW, **ALL, session=stored)["grid"].width > SIZE
    assert [v for _, v in words.words(True, 0.5, "jet", stored)["word"].choices] == ["blurry"]
    ranked = words.ask(0.2, 0.5, **ALL, session=stored)["ask_plot"]
    assert isinstance(ranked, Image.Image)
    shown = words.show_run(stored, 0.5, "jet")
    assert shown["to_step"].maximum == STEPS and shown["ask_image"].width >= words.ASK_MIN_SIDE


def test_words_panel_errors_teach(stored):
    with pytest.raises(KeyError, match="'zebra' is not a word of the prompt"):
        words.heatmap("zebra", **DRAW, **ALL, session=stored)
    with pytest.raises(ValueError, match="forwards"):
        words.heatmap("red", **DRAW, **{**ALL, "from_step": 3, "to_step": 2}, session=stored)
    with pytest.raises(ValueError, match="per_head"):
        words.heatmap("red", **DRAW, **{**ALL, "head": 0}, session=stored)
    with pytest.raises(ValueError, match="Generate an image first"):
        words.heatmap("red", **DRAW, **ALL, session=None)


# -- steps ----------------------------------------------------------------------------------------------
def test_steps_panel_shows_one_step_follows_the_heatmap_and_plays(stored, models):
    out = steps.show_step(2, True, "red", **DRAW, **ALL, session=stored)
    assert "Step 2 of 4" in out["caption"] and out["xt"] and out["schedule"] and out["step_heat"].visible
    assert out["decoded"] is None  # not decoded yet
    decoded = steps.decode(2, stored, models=models)
    assert decoded["decoded"].size == (SIZE, SIZE) and "x0/1" in decoded["session"].run.decoded
    ticked = steps.tick(4, False, "red", **DRAW, **ALL, session=stored)
    assert ticked["step"].value == 1  # wraps round
    assert steps.tick(1, False, "red", **DRAW, **ALL, session=None)["timer"].active is False
    assert steps.show_run(stored)["step"].value == STEPS
    with pytest.raises(ValueError, match="steps 1–4"):
        steps.show_step(5, False, "red", **DRAW, **ALL, session=stored)


# -- attention over time, how it works ----------------------------------------------------------------
def test_over_time_and_how_it_works_read_the_run(stored):
    assert isinstance(over_time.over_time(False, **ALL, session=stored)["plot"], Image.Image)
    assert over_time.show_run(stored)["plot"].width > 100
    table = how.shapes(stored)
    assert f"[2, 4, {SIZE // 8}, {SIZE // 8}]" in table and "×8 per side" in table
    assert "Generate an image" in how.shapes(None)


# -- compare --------------------------------------------------------------------------------------------
def test_compare_panel_plans_checks_and_redraws_stored_variants(sd1_pipe, models):
    assert compare.plan("vary", "guidance", "1, 7.5", [], "a red circle", "", 50) == ("guidance", [1.0, 7.5])
    assert compare.plan("pair", "guidance", "", [], "a red circle", "a blue circle", 50)[0] == "prompt"
    with pytest.raises(ValueError, match="whole number"):
        compare.plan("vary", "steps", "2, inf", [], "a red circle", "", 50)
    base = sdviz.Settings("a red circle", steps=3, width=SIZE, height=SIZE)
    variants = library_compare.run_variants(sd1_pipe, base, "seed", [0, 1])
    comparison = compare.Comparison(variants, "seed", "tiny-random")
    first = np.asarray(compare.view("circle", 1, False, comparison, models=models)["figure"])
    last = np.asarray(compare.view("circle", 3, False, comparison, models=models)["figure"])
    assert not np.array_equal(first, last)
    with pytest.raises(ValueError, match="Run a comparison first"):
        compare.view("circle", 1, False, None, models=models)


# -- the house rules ------------------------------------------------------------------------------------
def test_every_panel_requires_a_run_with_one_message():
    calls = [
        lambda: words.words(False, 0.5, "jet", None),
        lambda: steps.show_run(None),
        lambda: over_time.show_run(None),
        lambda: generate.downloads("a", **DRAW, **ALL, session=None),
    ]
    for fn in calls:
        with pytest.raises(ValueError, match="Generate an image first"):
            fn()


def test_no_function_in_sdviz_is_longer_than_150_lines():
    root = Path(sdviz.__file__).parent
    long = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 150:
                long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


def test_stop_requests_belong_to_their_session():
    stops = StopRequests()
    mine, theirs = stops.start("mine"), stops.start("theirs")
    assert stops.stop("mine") and mine.is_set() and not theirs.is_set()
    stops.finish("mine", mine)
    assert not stops.stop("mine")  # nothing running any more
    assert isinstance(theirs, threading.Event)


# -- inside the machine: the step's anatomy, words → vectors, noise an image, the lesson ----------------------
def test_anatomy_panel_fills_the_formula_with_the_steps_own_numbers(stored):
    from sdviz import anatomy as take_apart
    from sdviz.ui.panels import anatomy

    out = anatomy.anatomy(2, stored)
    a = take_apart.step_anatomy(stored.run, 1)
    c, r, col = take_apart.telling_element(a)
    number = take_apart.formula_number
    assert "Step 2 of 4" in out["formula"] and f"s = {a.guidance_scale:g}" in out["formula"]
    assert f"{number(a.uncond[c, r, col].item())} + {a.guidance_scale:g} × " in out["formula"]
    assert f"x_next = {a.mix()[0]:.3f}·x_t" in out["formula"]
    assert out["figure"].width > 500 and out["guidance"].visible and not out["no_guidance"].visible
    assert anatomy.show_run(stored)["formula"].startswith("**Step 4 of 4**")
    with pytest.raises(ValueError, match="steps 1–4"):
        anatomy.anatomy(5, stored)


def test_vectors_panel_shows_the_prompts_and_the_negative_prompts_vectors(stored):
    from sdviz.ui.panels import text_encoder

    out = text_encoder.vectors(False, stored)
    d = stored.run.prompt_embeds.shape[1]
    assert f"**77 vectors of {d} numbers**" in out["table"] and "| 3 | `circle` | circle |" in out["table"]
    assert out["embedding"].width > 400 and out["similarity"].width > 300
    assert "| blurry |" in text_encoder.vectors(True, stored)["table"]  # its pieces belong to the word
    assert text_encoder.show_run(stored)["negative"] is False


def test_noise_panel_noises_the_last_image_and_sweeps_the_loss_until_stopped(models, stored, monkeypatch):
    from sdviz.ui.panels import noise

    monkeypatch.setattr(noise, "POINTS", 5)  # a short sweep: the same code as 20 timesteps

    picked = noise.last_image(stored)
    assert picked["caption"] == PROMPT
    out = noise.noise(picked["image"], PROMPT, 700, 0, RANDOM, models=models)
    library = sdviz.noise_image(models.pipeline(RANDOM), picked["image"], PROMPT, 700, seed=0)
    assert "**t = 700**" in out["status"] and f"Training loss = {library.loss:.4f}" in out["status"]
    assert out["xt_decoded"].size == out["fitted"].size and out["noise_figure"].width > 200
    with pytest.raises(ValueError, match="Pick an image first"):
        noise.noise(None, PROMPT, 700, 0, RANDOM, models=models)
    scene = noise.scene()
    assert scene["image"].shape == (64, 64, 3) and scene["caption"] != scene["wrong_caption"]
    stops = StopRequests()
    sweep = noise.loss_curve(picked["image"], PROMPT, "a blue square", 0, 500, RANDOM, request("sweeper"),
                             models=models, stops=stops)  # fmt: skip
    assert "one U-Net call per timestep" in next(sweep)["progress"]
    assert stops.stop("sweeper")
    last = list(sweep)[-1]
    assert "Stopped" in last["progress"] and ("Stopped after" in last["verdict"] or "before" in last["verdict"])
    done = list(noise.loss_curve(picked["image"], PROMPT, "", 0, 500, RANDOM, request(), models=models,
                                 stops=StopRequests()))[-1]  # fmt: skip
    assert "Done: 5 timesteps" in done["progress"] and "the caption: **" in done["verdict"]
    assert "a wrong caption" not in done["verdict"]  # none given: two curves
    assert isinstance(done["loss_plot"], Image.Image)


def test_lesson_pages_tell_the_run_and_open_the_right_panel(stored):
    from sdviz.ui.panels import lesson

    for n in range(1, len(lesson.PAGES) + 1):
        out = lesson.lesson(n, stored)
        assert out["counter"] == f"Page **{n}** of {len(lesson.PAGES)}" and out["text"].startswith("### ")
    assert f"{len(stored.run.tokens)} tokens" in lesson.lesson(1, stored)["text"]
    assert f"{SIZE // 8} × {SIZE // 8}" in lesson.lesson(2, stored)["text"]
    assert lesson.open_panel(7)["tabs"].selected == "words" and lesson.open_panel(9)["tabs"].selected == "noise"
    assert lesson.turn(len(lesson.PAGES), 1)["page"].value == len(lesson.PAGES)
    with pytest.raises(ValueError, match="pages 1–9"):
        lesson.lesson(10, stored)


def test_the_new_panels_require_a_run_with_one_message():
    from sdviz.ui.panels import anatomy, lesson, noise, text_encoder

    for fn in (
        lambda: anatomy.anatomy(1, None),
        lambda: text_encoder.vectors(False, None),
        lambda: noise.last_image(None),
        lambda: lesson.lesson(1, None),
    ):
        with pytest.raises(ValueError, match="Generate an image first"):
            fn()
