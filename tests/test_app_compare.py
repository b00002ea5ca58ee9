"""The Compare tab through gradio_client: variants of one setting, prompt pairs, re-drawing, bad input, Stop."""

from __future__ import annotations

import time

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from test_app_api import assert_pipeline_restored, form, generate, pixels

from sdviz.ui.panels.compare import CHANGED, default_step

STEPS = 3
PROMPT = "a red circle on the left"
OUTPUTS = ["progress", "live", "gallery", "figure", "word", "step", "notes"]


def compare_inputs(server, mode="vary", vary="guidance", values="1, 7.5", schedulers=(), prompt_b="", word="",
                   exact=False, **change) -> dict:  # fmt: skip
    """The /compare inputs by name: the Compare tab's controls, then the main form (test defaults)."""
    main = form(server, change.pop("prompt", PROMPT), **{"steps": STEPS, **change})
    main.pop("keep_heads")
    return dict(mode=mode, vary=vary, values=values, schedulers=list(schedulers), second_prompt=prompt_b, word=word,
                exact_decode=exact, **main)  # fmt: skip


def run_compare(client, server, **kw):
    """→ dict of the /compare outputs by name."""
    return dict(zip(OUTPUTS, client.predict(**compare_inputs(server, **kw), api_name="/compare")))


def view(client, word, step, exact=False):
    return pixels(client.predict(word=word, step=step, exact_decode=exact, api_name="/compare_view"))


def variant_images(out) -> list[np.ndarray]:
    return [pixels(item["image"]) for item in out["gallery"]]


def captions(out) -> list[str]:
    return [item["caption"] for item in out["gallery"]]


@pytest.fixture(scope="module")
def reference(app_server):
    """A single run's image before anything in this module was cancelled."""
    c = Client(app_server.url, verbose=False)
    try:
        return pixels(generate(c, app_server, PROMPT, steps=STEPS)["image"])
    finally:
        c.close()


# -- varying one setting ------------------------------------------------------------------------------
def test_guidance_comparison_streams_and_gives_one_different_image_per_value(client, app_server):
    job = client.submit(**compare_inputs(app_server, values="1, 7.5"), api_name="/compare")
    out = dict(zip(OUTPUTS, job.result()))
    assert captions(out) == ["guidance 1", "guidance 7.5"]
    first, second = variant_images(out)
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)
    assert pixels(out["figure"]).shape[1] > 2 * 64  # two columns of panels
    # The shared step opens 40 % of the way (where runs still differ), not on the last step.
    assert out["step"]["maximum"] == STEPS and out["step"]["value"] == default_step(STEPS) == 1
    assert out["word"]["value"] in [value for _, value in out["word"]["choices"]]
    assert "Same “a red circle on the left”, seed 7, 3 steps, DDIM" in out["notes"]
    progress = [update[0] for update in job.outputs() if update[0]]
    assert any("Variant 2/2 · step" in p for p in progress), progress
    assert "Done: 2 variants" in progress[-1]


def test_same_seed_twice_gives_identical_images_equal_to_a_single_run(client, app_server):
    out = run_compare(client, app_server, vary="seed", values="3, 3")
    assert captions(out) == ["seed 3", "seed 3"]
    first, second = variant_images(out)
    assert np.array_equal(first, second)
    single = pixels(generate(client, app_server, PROMPT, steps=STEPS, seed="3")["image"])
    assert np.array_equal(first, single)


def test_steps_and_scheduler_comparisons_apply_their_setting(client, app_server):
    by_steps = run_compare(client, app_server, vary="steps", values="2, 4")
    assert captions(by_steps) == ["2 steps", "4 steps"] and by_steps["step"]["maximum"] == 4
    by_scheduler = run_compare(client, app_server, vary="scheduler", schedulers=["DDIM", "Euler"])
    assert captions(by_scheduler) == ["DDIM", "Euler"]
    assert not np.array_equal(*variant_images(by_scheduler))


# -- two prompts ----------------------------------------------------------------------------------------
def test_prompt_pair_shows_the_changed_words_and_can_switch_to_a_shared_word(client, app_server):
    calls = len(app_server.unet_calls)
    out = run_compare(client, app_server, mode="pair", prompt="a red circle", prompt_b="a blue circle")
    assert len(app_server.unet_calls) - calls == 2 * STEPS * 1  # one batched CFG call per step
    assert captions(out) == ["“red” · a red circle", "“blue” · a blue circle"]  # the changed word first
    assert out["word"]["value"] == CHANGED
    choices = {value: label for label, value in out["word"]["choices"]}
    assert choices[CHANGED] == "changed words: red / blue" and "circle" in choices
    changed = pixels(out["figure"])
    assert np.array_equal(view(client, CHANGED, default_step(STEPS)), changed)  # re-drawing: the same figure
    assert not np.array_equal(view(client, "circle", STEPS), changed)
    with pytest.raises(AppError, match="'red' is not in 'a blue circle'"):
        view(client, "red", STEPS)


# -- re-drawing from the stored variants ------------------------------------------------------------------
def test_step_and_word_changes_redraw_without_running_the_model(client, app_server):
    run_compare(client, app_server, vary="steps", values="2, 4", prompt="a red circle and a blue square")
    calls = len(app_server.unet_calls)
    last, first = view(client, "circle", 4), view(client, "circle", 1)
    assert not np.array_equal(last, first)
    assert not np.array_equal(last, view(client, "square", 4))
    assert len(app_server.unet_calls) == calls
    with pytest.raises(AppError, match="from 1 to 4|greater than maximum value 4"):
        view(client, "circle", 5)
    with pytest.raises(AppError, match="'zebra' is not a word of the prompt"):
        view(client, "zebra", 4)


def test_x0_row_is_the_exact_decode_for_a_cheap_vae_cached_and_never_runs_the_unet(client, app_server):
    run_compare(client, app_server, vary="seed", values="0, 1")
    unet = len(app_server.unet_calls)
    assert app_server.models.previewer(app_server.name).kind == "vae"  # the offline model's VAE is cheap
    decodes = []
    hook = app_server.pipe.vae.decoder.register_forward_pre_hook(lambda module, args: decodes.append(args[0].shape))
    try:
        shown = view(client, "circle", 2)
        assert len(decodes) == 2  # x0 of step 2, once per variant, by the VAE itself
        exact = view(client, "circle", 2, exact=True)
        assert np.array_equal(shown, exact) and len(decodes) == 2  # the same pictures, from the cache
    finally:
        hook.remove()
    assert len(app_server.unet_calls) == unet


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(values="1, 2, 3, 4, 5"), "at most 4 guidance values.*Remove 1"),
        (dict(values="1, strong"), "must be a number.*'strong'.*separated by commas"),
        (dict(values=" , "), "no guidance values"),
        (dict(values="1, 60"), "between 0 and 50"),
        (dict(vary="steps", values="2, 1000"), "steps must be a whole number from 1 to"),
        (dict(vary="steps", values="2, 2.5"), "whole number"),
        (dict(vary="seed", values="1, x"), "seed must be a whole number"),
        (dict(vary="scheduler", schedulers=[]), "tick 2 to 4 schedulers"),
        (dict(vary="scheduler", schedulers=["DDIM", "Heun"]), "'Heun'.*(list of choices|choose from)"),
        (dict(mode="pair", prompt="a red circle", prompt_b="A red  circle"), "same words"),
        (dict(mode="pair", prompt="a red circle", prompt_b=""), "type a second prompt"),
        (dict(word="zebra"), "'zebra' is not a word of the prompt; pick one of: a, red, circle"),
        (dict(mode="pair", prompt="a red circle", prompt_b="a blue circle", word="red"), "'red' is not in 'a blue"),
        (dict(model="my-secret-model"), "unknown model"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_comparison_input_gets_a_message_and_runs_nothing(client, app_server, change, message):
    calls = len(app_server.unet_calls)
    with pytest.raises(AppError, match=message):
        run_compare(client, app_server, **change)
    assert len(app_server.unet_calls) == calls


def test_redrawing_before_any_comparison_says_run_one_first(client):
    with pytest.raises(AppError, match="Run a comparison first"):
        view(client, "circle", 1)


# -- Stop -------------------------------------------------------------------------------------------------
def test_cancelled_comparison_leaves_the_next_single_run_identical_to_a_fresh_one(client, app_server, reference):
    cap = app_server.models.preset(app_server.name).max_steps
    calls = len(app_server.unet_calls)
    job = client.submit(**compare_inputs(app_server, values="3, 7.5, 15", steps=cap), api_name="/compare")
    deadline = time.monotonic() + 60
    while len(app_server.unet_calls) < calls + cap + 3 and time.monotonic() < deadline:  # inside variant 2
        time.sleep(0.05)
    job.cancel()
    time.sleep(1.0)
    stopped_at = len(app_server.unet_calls)
    assert calls + cap + 3 <= stopped_at < calls + 3 * cap  # it ran, and stopped before the end
    time.sleep(1.0)
    assert len(app_server.unet_calls) == stopped_at  # and the worker has stopped
    assert_pipeline_restored(app_server.pipe)
    out = generate(client, app_server, PROMPT, steps=STEPS)
    assert np.array_equal(pixels(out["image"]), reference)
