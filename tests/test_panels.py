"""Each panel's handlers called as plain functions on a stored trace: no server, no browser."""

from __future__ import annotations

import ast
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SIZE
from PIL import Image

import sdviz
from sdviz import compare as library_compare
from sdviz.ui import Models
from sdviz.ui.models import RANDOM, RANDOM_PRESET
from sdviz.ui.panels import compare, generate, how, over_time, steps, words
from sdviz.ui.session import Session, strongest_word, unknown_words
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
    assert "Generating" in events[0]["notes"]  # the panels below still show the previous run
    assert all("progress" in e for e in events[1:])
    last = events[-1]
    assert isinstance(last["session"], Session) and last["seed_used"] == "3"
    assert "Done: 4 steps" in last["progress"] and "Seed 3" in last["notes"]
    assert [text for text, kind in last["tokens"] if kind][1:4] == ["a", "red", "circle"]
    files = generate.downloads("circle", **DRAW, **ALL, session=stored, models=models)["files"]
    assert {Path(f).name for f in files} == {
        "image.png",
        "heatmap-circle.png",
        "heatmaps.npz",
        "trace.safetensors",
        "report.html",
    }


def test_stop_ends_the_run_with_its_steps_kept_and_marked_partial(models):
    stops = StopRequests()
    run = generate.generate("tiny-random", PROMPT, "", "DDIM", 30, 7.5, "3", False, SIZE, SIZE, False, None,
                            request("stopper"), models=models, stops=stops)  # fmt: skip
    next(run)  # "Generating…": the run is registered
    assert "Loading" in next(run)["progress"]
    assert stops.stop("stopper") and not stops.stop("someone-else")
    last = list(run)[-1]
    session = last["session"]
    assert session.partial and 1 <= session.run.num_steps < 30
    assert f"Stopped at step {session.run.num_steps} of 30" in last["progress"]
    assert "Stopped part-way" in last["notes"]
    assert last["image"].shape == (SIZE, SIZE, 3)  # the last x0, decoded
    assert words.heatmap("circle", **DRAW, **{**ALL, "to_step": 30}, session=session)["heatmap"].width >= 256


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
    out = words.words(False, 0.5, "jet", False, False, stored)
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
    shown = words.heatmap("red", **DRAW, **ALL, session=stored)
    assert shown["caption"].startswith("Heatmap of the “red” · all 4 steps")
    red = np.asarray(shown["heatmap"])
    blue = np.asarray(words.heatmap("blue", **DRAW, **ALL, session=stored)["heatmap"])
    early = np.asarray(words.heatmap("red", **DRAW, **{**ALL, "to_step": 1}, session=stored)["heatmap"])
    assert (
        red.shape[0] >= 256 and not np.array_equal(red, blue) and not np.array_equal(red, early)
    )  # enlarged, with its scale
    assert words.word_grid(**DRAW, **ALL, one_scale=True, session=stored)["grid"].width > SIZE
    assert [v for _, v in words.words(True, 0.5, "jet", False, False, stored)["word"].choices] == ["blurry"]
    ranked = words.ask(0.2, 0.5, **ALL, session=stored)["ask_plot"]
    assert isinstance(ranked, Image.Image)
    shown = words.show_run(stored, 0.5, "jet", False, False, True)
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
    out = steps.show_step(2, True, "red", **DRAW, **ALL, session=stored, models=models)
    assert "Step 2 of 4" in out["caption"] and out["xt"] and out["schedule"] and out["step_heat"].visible
    # The tiny test VAE is cheap, so the pictures are its exact decodes (cached in the trace as they are drawn).
    assert models.previewer("tiny-random").kind == "vae" and "exact VAE decode" in out["x0"].label
    assert np.array_equal(np.asarray(out["decoded"]), stored.run.decode(1, models.pipeline("tiny-random").vae))
    decoded = steps.decode(2, stored, models=models)
    assert decoded["decoded"].size == (SIZE, SIZE) and "x0/1" in decoded["session"].run.decoded
    ticked = steps.tick(4, False, "red", **DRAW, **ALL, session=stored, models=models)
    assert ticked["step"].value == 1  # wraps round
    assert steps.tick(1, False, "red", **DRAW, **ALL, session=None, models=models)["timer"].active is False
    shown = steps.show_run(stored, models=models)
    assert shown["step"].value == STEPS and "every step, exact VAE decode" in shown["strip_caption"]
    assert shown["strip"].width > 4 * 96 and "schedule" in shown["session"].cache  # drawn once per run
    with pytest.raises(ValueError, match="steps 1–4"):
        steps.show_step(5, False, "red", **DRAW, **ALL, session=stored, models=models)


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
        lambda: words.words(False, 0.5, "jet", False, False, None),
        lambda: steps.show_run(None, models=None),
        lambda: over_time.show_run(None),
        lambda: generate.downloads("a", **DRAW, **ALL, session=None, models=None),
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


def test_built_in_model_pictures_of_x0_match_the_final_image():
    """The live preview, the step view and the finished run's preview show the image's real colours."""
    pipe = sdviz.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    models = Models({"toy": sdviz.PRESETS["toy"]}, loaded={"toy": pipe})
    settings = sdviz.Settings("a red circle on the left and a yellow square", steps=10, guidance=4.0, seed=1,
                              width=64, height=64, scheduler="DDIM")  # fmt: skip
    image, run = sdviz.generate(pipe, settings)
    session = Session(run, np.asarray(image), "toy", 1, 0.0, settings, "toy")
    final = np.asarray(image).astype(float)

    def error(picture) -> float:  # mean |difference| per pixel and channel, 0–255, at the image's size
        return float(np.abs(np.asarray(picture.convert("RGB").resize((64, 64))).astype(float) - final).mean())

    shown = steps.step_view(session, run.num_steps, models.previewer("toy"))["x0"].value
    assert error(Image.open(shown["path"]) if isinstance(shown, dict) else shown) <= 8
    assert error(generate.finished(session, models.previewer("toy"))["preview"]) <= 8
    linear = Image.fromarray(run.preview(run.num_steps - 1, "x0"))
    assert error(linear) > 8  # what the fast linear map alone shows: why the built-in model decodes exactly


def test_models_not_on_this_server_are_marked_and_explained_before_anything_runs(models, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choices = Models({RANDOM: RANDOM_PRESET, "sd15": sdviz.PRESETS["sd15"]}, loaded={RANDOM: models.pipeline(RANDOM)})
    menu = {name: label for label, name in choices.menu()}
    assert menu["sd15"].endswith("— not on this server") and "not on this server" not in menu[RANDOM]
    note = generate.apply_preset("sd15", models=choices)["model_note"]
    assert "isn't on this server" in note and "huggingface-cli" not in note  # plain words for a web user
    with pytest.raises(Exception, match="isn't on this server"):
        next(generate.generate("sd15", PROMPT, "", "DDIM", 2, 7.5, "3", False, 512, 512, False, None, request(),
                               models=choices, stops=StopRequests()))  # fmt: skip


def test_words_the_built_in_model_does_not_know_are_named():
    pipe = sdviz.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    settings = sdviz.Settings("an astronaut riding a red horse", steps=2, width=64, height=64)
    image, run = sdviz.generate(pipe, settings)
    session = Session(run, np.asarray(image), "toy", 0, 0.0, settings, "toy")
    assert unknown_words(run) == ["an", "astronaut", "riding", "horse"]
    assert "doesn't know “an”, “astronaut”, “riding”, “horse”" in generate.run_notes(session)
    assert strongest_word(run) == "red"  # the first map is a word the model knows


def test_texts_about_the_latent_come_from_the_run():
    pipe = sdviz.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    settings = sdviz.Settings("a red circle", steps=2, width=64, height=64)
    image, run = sdviz.generate(pipe, settings)
    session = Session(run, np.asarray(image), "toy", 0, 0.0, settings, "toy")
    # The built-in model's VAE downsamples by 4, not SD's 8: 64×64 pixels → 4 channels of 16×16.
    assert "4 channels of 16×16**, 1/4 of the image" in steps.latents_text(run)
    assert "×4 per side" in how.shapes(session) and "[1, 4, 16, 16] → [1, 3, 64, 64]" in how.shapes(session)


def test_the_number_of_cpu_threads_is_chosen_for_the_model_and_can_be_set(sd1_pipe, monkeypatch):
    from sdviz.loading import pick_threads

    monkeypatch.delenv("SDVIZ_THREADS", raising=False)
    assert pick_threads(sd1_pipe) == 1  # a small model: one thread (two wait for each other on a shared CPU)
    big = SimpleNamespace(unet=SimpleNamespace(parameters=lambda: iter([torch.empty(60_000_000)])))
    cores = len(os.sched_getaffinity(0))
    assert pick_threads(big) == cores
    assert pick_threads(sd1_pipe, 2) == 2
    monkeypatch.setenv("SDVIZ_THREADS", "3")
    assert pick_threads(big) == 3
    with pytest.raises(ValueError, match="1 or more"):
        pick_threads(sd1_pipe, 0)
    assert Models({RANDOM: RANDOM_PRESET}, loaded={RANDOM: sd1_pipe}, threads=2).threads(RANDOM) == 2


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


def test_a_panel_off_screen_or_already_drawn_is_left_as_it_is_without_an_error():
    # The lazy redraw's gate must hand Gradio something it accepts for "change nothing" on every output
    # (an empty dict once raised "didn't return enough output values" on every run, for every hidden tab).
    import asyncio

    import gradio as gr

    from sdviz.ui.wiring import App

    with gr.Blocks() as demo:
        app = App(models=None, session=gr.State(None), stops=None, most_steps=1, visible=gr.State("a"))
        with gr.Tab("A") as tab_a:
            go = gr.Button()
        with gr.Tab("B") as tab_b:
            text, picture = gr.Markdown(), gr.Image()
        app.new_run.append(go.click(lambda: None, None, None))
        app.wiring_tab = "b"
        app.after_run(lambda: {text: "drawn", picture: None}, [], [text, picture])
        app.connect_refreshers({"a": tab_a, "b": tab_b})
    from gradio.state_holder import SessionState

    session, drawn_state = SimpleNamespace(serial=3), app.refreshers[0].drawn
    gates = [fn for fn in demo.fns.values() if fn.fn is not None and fn.fn.__name__ == "gated"]
    assert len(gates) == 3  # after the run, and after each tab is opened
    for k, block_fn in enumerate(gates):  # the first follows the run: it redraws even a drawn panel
        skipped = [("a", None)] if k == 0 else [("a", None), ("b", 3)]  # B hidden; B showing run 3 already
        for visible, drawn in skipped:
            state = SessionState(demo)
            out = asyncio.run(demo.postprocess_data(block_fn, block_fn.fn(visible, drawn, session), state))
            assert out[:2] == [{"__type__": "update"}] * 2 and drawn_state._id not in state, out
        state = SessionState(demo)
        out = asyncio.run(demo.postprocess_data(block_fn, block_fn.fn("b", 2, session), state))
        assert out[0] == "drawn" and state[drawn_state._id] == 3


def test_the_built_in_models_note_says_how_often_it_follows_the_words_from_its_evaluation(tmp_path):
    import json

    assert generate.toy_reliability(tmp_path) == ""  # no evaluation: no claim
    figures = {
        "generated": {
            "all_colours_present_other": 1.0,
            "all_colours_present_unseen_colour_set": 0.25,
            "shape_correct": 0.915,
            "position_correct": 0.5,
            "size_correct": 0.875,
        },
        "one_word_changes": {"position_change_followed": 0.4},
    }
    (tmp_path / "evaluation.json").write_text(json.dumps(figures))
    note = generate.toy_reliability(tmp_path)
    for text in (
        "colours 100%",
        "red with yellow 25%",
        "shapes 92% (chance: 33%)",
        "positions 50%",
        "sizes 88%",
        "40% of the time",
    ):
        assert text in note, (text, note)
    (tmp_path / "evaluation.json").write_text("{")
    assert generate.toy_reliability(tmp_path) == ""  # unreadable: no claim, no crash
