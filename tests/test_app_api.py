"""The web app through gradio_client: an in-process server (fixture `app_server`) on the offline model, 64×64."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

import sdviz
from sdviz import TraceResult
from sdviz.attention import CrossAttentionRecorder

STEPS = 6
VIEW = dict(negative=False, opacity=0.5, colormap="jet", from_step=1, to_step=STEPS, blocks=["down", "mid", "up"],
            resolutions=[], layers=[], head=-1)  # fmt: skip
GENERATE_OUT = ["preview", "progress", "image", "seed", "tokens", "notes"]
WORDS = dict(negative=False, opacity=0.5, colormap="jet", special_tokens=False, single_tokens=False)


def form(server, prompt, **change) -> dict:
    """The /generate inputs by name, with the test defaults."""
    values = dict(model=server.name, prompt=prompt, negative_prompt="", scheduler="DDIM", steps=STEPS, guidance=7.5,
                  seed="7", random_seed=False, width=64, height=64, keep_heads=False)  # fmt: skip
    values.update(change)
    return values


def generate(client, server, prompt, **change):
    """/generate, then /words as the page does after a run → dict of the outputs by name."""
    out = dict(zip(GENERATE_OUT, client.predict(**form(server, prompt, **change), api_name="/generate")))
    words, heat, caption = client.predict(**WORDS, api_name="/words")
    return {**out, "words": words, "heatmap": heat, "caption": caption}


def heatmap(client, word, **view):
    """The /heatmap picture (its caption is the second output)."""
    return client.predict(word=word, **{**VIEW, **view}, api_name="/heatmap")[0]


def step(client, number, word="red", follow=False, **view):
    return client.predict(step=number, follow=follow, word=word, **{**VIEW, **view}, api_name="/step")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def word_choices(update) -> list[str]:
    return [value for _, value in update["choices"]]


@pytest.fixture(scope="module")
def reference(app_server):
    """A fresh start's image for the standard request (nothing has been cancelled or failed yet)."""
    c = Client(app_server.url, verbose=False)
    try:
        return pixels(generate(c, app_server, "a red circle on the left")["image"])
    finally:
        c.close()


def assert_pipeline_restored(pipe):
    recorders = [h for m in pipe.unet.modules() for h in m._forward_pre_hooks.values()
                 if isinstance(h, CrossAttentionRecorder)]  # fmt: skip
    assert not recorders
    assert "step" not in vars(pipe.scheduler)


# -- generation ---------------------------------------------------------------------------------------
def test_generate_returns_final_image_tokens_words_and_heatmap(client, app_server, reference):
    out = generate(client, app_server, "a red circle on the left")
    assert pixels(out["image"]).shape == (64, 64, 3)
    assert np.array_equal(pixels(out["image"]), reference)  # same seed, same image
    assert out["seed"] == "7" and "Seed 7" in out["notes"]
    words = word_choices(out["words"])
    assert words == ["a", "red", "circle", "on", "the", "left"]
    assert out["words"]["value"] in words
    chips = [t["token"] for t in out["tokens"] if t["class_or_confidence"]]
    assert chips[0] == "<|startoftext|>" and chips[-1] == "<|endoftext|>" and "circle" in chips
    assert pixels(out["heatmap"]).shape[0] >= 256 and "Heatmap of the “" in out["caption"]  # enlarged, with its scale
    assert f"{STEPS} steps" in out["notes"]


def test_generation_streams_progress_and_live_previews(client, app_server):
    job = client.submit(**form(app_server, "a blue square", steps=12), api_name="/generate")
    job.result()
    updates = job.outputs()
    progress = [u[1] for u in updates if u[1]]
    assert any("Step 1 / 12" in p or "Step 2 / 12" in p for p in progress), progress
    assert "Done: 12 steps" in progress[-1]
    previews = {u[0] for u in updates if isinstance(u[0], str)}  # {"__type__": "update"} = unchanged
    assert len(previews) >= 2  # at least one live preview and the last


def test_random_seed_is_shown_and_reproduces_the_image(client, app_server):
    first = generate(client, app_server, "a green triangle", random_seed=True, seed="")
    seed = int(first["seed"])
    assert f"Seed {seed}" in first["notes"]
    again = generate(client, app_server, "a green triangle", seed=str(seed))
    assert np.array_equal(pixels(first["image"]), pixels(again["image"]))
    minus_one = generate(client, app_server, "a green triangle", seed="-1")
    assert int(minus_one["seed"]) >= 0


# -- re-rendering from the stored trace ---------------------------------------------------------------
def test_word_and_filter_changes_rerender_without_running_the_model(client, app_server):
    generate(client, app_server, "a red circle and a blue square")
    calls = len(app_server.unet_calls)
    red, square = pixels(heatmap(client, "red")), pixels(heatmap(client, "square"))
    assert not np.array_equal(red, square)
    early = pixels(heatmap(client, "red", from_step=1, to_step=2))
    up_only = pixels(heatmap(client, "red", blocks=["up"]))
    assert not np.array_equal(red, early) and not np.array_equal(red, up_only)
    faint = pixels(heatmap(client, "red", opacity=0.1, colormap="gray"))
    assert not np.array_equal(red, faint)
    grid = client.predict(**VIEW, one_scale=True, api_name="/word_grid")
    over_time = client.predict(**{k: v for k, v in VIEW.items() if k not in ("opacity", "colormap")},
                               api_name="/over_time")  # fmt: skip
    assert pixels(grid).shape[1] > 64 and pixels(over_time).size > 0
    panels = step(client, 3, "red", follow=True)
    assert "Step 3 of" in panels[0]
    assert all(panels[i] for i in (1, 2, 4, 5, 6))  # x_t, x0, z rgb, channels, schedule
    assert panels[7]["visible"] is True and panels[7]["value"]  # heatmap follows the step
    assert len(app_server.unet_calls) == calls  # the model never ran again


def test_exact_decode_is_cached_in_the_trace_and_shown_on_the_step(client, app_server):
    generate(client, app_server, "a yellow square")
    decoded = client.predict(step=2, api_name="/decode")
    assert pixels(decoded).shape == (64, 64, 3)
    assert step(client, 2, "yellow")[3] is not None  # the cached decode comes back
    assert step(client, 3, "yellow")[3] is None


def test_downloads_give_image_heatmap_trace_and_report(client, app_server):
    generate(client, app_server, "a red circle on the left")
    files = client.predict(word="circle", **VIEW, api_name="/downloads")
    names = {f.rsplit("/", 1)[-1]: f for f in files}
    assert set(names) == {"image.png", "heatmap-circle.png", "heatmaps.npz", "trace.safetensors", "report.html"}
    maps = np.load(names["heatmaps.npz"])
    assert set(maps.files) == {"a", "red", "circle", "on", "the", "left"} and maps["circle"].shape == (64, 64)
    run = TraceResult.load(names["trace.safetensors"])
    assert [w.text for w in run.words] == ["a", "red", "circle", "on", "the", "left"]
    assert "circle" in Path(names["report.html"]).read_text(encoding="utf-8")


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(steps=0), "minimum"),
        (dict(steps=2.5), "whole number"),
        (dict(guidance=-1), "minimum"),
        (dict(guidance=1000), "maximum"),
        (dict(width=100), "multiple of 8"),
        (dict(height=4096), "maximum"),
        (dict(seed=""), "seed is empty"),
        (dict(seed="abc"), "whole number"),
        (dict(seed="-5"), "whole number from 0 to 2"),
        (dict(model="my-secret-model"), "unknown model 'my-secret-model'"),
        (dict(model="stabilityai/some-hub-id"), "unknown model"),
        (dict(scheduler="Heun"), "unknown scheduler 'Heun'"),
    ],
)
def test_bad_generation_input_gets_a_message_and_runs_nothing(client, app_server, change, message):
    calls = len(app_server.unet_calls)
    with pytest.raises(AppError, match=message):
        generate(client, app_server, "a red circle", **change)
    assert len(app_server.unet_calls) == calls


def test_steps_above_the_model_cap_are_refused(client, app_server):
    cap = app_server.models.preset(app_server.name).max_steps
    with pytest.raises(AppError, match=f"1 to {cap}|maximum"):
        generate(client, app_server, "a red circle", steps=cap + 1)


def test_empty_prompt_runs_unconditionally_and_says_so(client, app_server):
    out = generate(client, app_server, "")
    assert "unconditionally" in out["notes"]
    assert word_choices(out["words"]) == [] and out["heatmap"] is None
    assert pixels(out["image"]).shape == (64, 64, 3)
    with pytest.raises(AppError, match="no words"):
        heatmap(client, None)


def test_prompt_over_77_tokens_shows_what_was_cut(client, app_server):
    prompt = " ".join(["a red circle"] * 30) + " zebra at the end"
    out = generate(client, app_server, prompt)
    assert "cut" in out["notes"] and "zebra" in out["notes"]
    cut = [t["token"] for t in out["tokens"] if t["class_or_confidence"] == "cut"]
    assert cut and "zebra" in cut[0]


def test_emoji_and_non_latin_prompts_work(client, app_server):
    out = generate(client, app_server, "a 🐱 on the left and 東京 タワー")
    words = word_choices(out["words"])
    assert "🐱" in words and "東京" in words
    assert pixels(heatmap(client, "🐱")).shape[0] >= 256


def test_word_not_in_the_prompt_is_refused_with_the_prompt_words(client, app_server):
    generate(client, app_server, "a red circle")
    with pytest.raises(AppError, match="zebra.*red"):
        heatmap(client, "zebra")


def test_step_outside_the_run_is_refused(client, app_server):
    generate(client, app_server, "a red circle")
    with pytest.raises(AppError, match=f"steps 1–{STEPS}"):
        step(client, STEPS + 1)
    with pytest.raises(AppError, match="forwards"):
        heatmap(client, "red", from_step=4, to_step=2)
    with pytest.raises(AppError, match="no cross-attention layer matches"):
        heatmap(client, "red", blocks=[])
    with pytest.raises(AppError, match="per_head|head"):
        heatmap(client, "red", head=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: heatmap(c, "circle"),
        lambda c: step(c, 1, "circle"),
        lambda c: c.predict(step=1, api_name="/decode"),
        lambda c: c.predict(word="circle", **VIEW, api_name="/downloads"),
        lambda c: c.predict(**VIEW, one_scale=True, api_name="/word_grid"),
        lambda c: c.predict(**WORDS, api_name="/words"),
        lambda c: c.predict(
            negative=False,
            from_step=1,
            to_step=3,
            blocks=["up"],
            resolutions=[],
            layers=[],
            head=-1,
            api_name="/over_time",
        ),
    ],
    ids=["heatmap", "step", "decode", "downloads", "word_grid", "words", "over_time"],
)
def test_panel_used_before_any_run_says_generate_first(client, call):
    with pytest.raises(AppError, match="Generate an image first"):
        call(client)


def test_unavailable_model_shows_the_loading_message_and_the_app_keeps_serving(client, app_server, reference):
    start = time.perf_counter()
    with pytest.raises(AppError, match="Stable Diffusion 1.5 isn't on this server.*Pick the built-in model"):
        generate(client, app_server, "a red circle", model="sd15")
    assert time.perf_counter() - start < 30  # no network timeout
    out = generate(client, app_server, "a red circle on the left")
    assert np.array_equal(pixels(out["image"]), reference)


# -- faults ---------------------------------------------------------------------------------------------
def test_cancelled_run_leaves_the_next_run_identical_to_a_fresh_start(client, app_server, reference):
    calls, steps = len(app_server.unet_calls), app_server.models.preset(app_server.name).max_steps
    job = client.submit(**form(app_server, "a red circle on the left", steps=steps), api_name="/generate")
    deadline = time.monotonic() + 60
    while len(app_server.unet_calls) < calls + 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    time.sleep(1.0)
    stopped_at = len(app_server.unet_calls)
    assert calls + 6 <= stopped_at < calls + steps  # it ran, and stopped before the end
    time.sleep(1.0)
    assert len(app_server.unet_calls) == stopped_at  # and the worker has stopped
    assert_pipeline_restored(app_server.pipe)
    out = generate(client, app_server, "a red circle on the left")
    assert np.array_equal(pixels(out["image"]), reference)


def test_exception_inside_the_pipeline_is_reported_and_the_next_run_matches_a_fresh_start(
    client, app_server, reference
):
    seen = []

    def fail_once(module, args):
        seen.append(1)
        if len(seen) == 3:
            raise RuntimeError("injected fault in the U-Net")

    handle = app_server.pipe.unet.register_forward_pre_hook(fail_once)
    try:
        with pytest.raises(AppError, match="failed inside the pipeline.*injected fault"):
            generate(client, app_server, "a red circle on the left")
    finally:
        handle.remove()
    assert_pipeline_restored(app_server.pipe)
    out = generate(client, app_server, "a red circle on the left")
    assert np.array_equal(pixels(out["image"]), reference)


# -- users ----------------------------------------------------------------------------------------------
def test_two_clients_at_once_each_get_only_their_own_words_and_maps(app_server):
    prompts = {"one": "a red circle on the left", "two": "a yellow triangle at the top"}
    results, errors = {}, []

    def user(key):
        try:
            c = Client(app_server.url, verbose=False)
            try:
                out = generate(c, app_server, prompts[key])
                own = prompts[key].split()[2]
                other = prompts["two" if key == "one" else "one"].split()[2]
                results[key] = (word_choices(out["words"]), pixels(heatmap(c, own)))
                try:
                    heatmap(c, other)
                    errors.append(f"{key} could map the other user's word {other!r}")
                except AppError:
                    pass
            finally:
                c.close()
        except Exception as err:  # reported below, with the thread's name
            errors.append(f"{key}: {err!r}")

    threads = [threading.Thread(target=user, args=(k,)) for k in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert results["one"][0] == ["a", "red", "circle", "on", "the", "left"]
    assert results["two"][0] == ["a", "yellow", "triangle", "at", "the", "top"]


def test_live_previews_show_the_same_picture_as_the_step_view(app_server):
    """What the page streams during a run is the model's picture of that step's x0 (for the built-in
    model its exact VAE decode), not another image. What previews cost is in the benchmark."""
    from sdviz.ui.streaming import _live_pictures

    pipe, models = app_server.pipe, app_server.models
    with models.using(app_server.name):
        _, run = sdviz.generate(pipe, sdviz.Settings("a red circle", steps=4, width=64, height=64, seed=0,
                                                     scheduler="DDIM"))  # fmt: skip
    live = _live_pictures(models, app_server.name)(run.x0[2])
    assert np.array_equal(live, models.previewer(app_server.name).picture(run, 2))


# -- the HTTP API speaks the page's words ---------------------------------------------------------------
VIEW_NAMES = ["negative", "opacity", "colormap", "from_step", "to_step", "blocks", "resolutions", "layers", "head"]
API = {
    "/generate": ["model", "prompt", "negative_prompt", "scheduler", "steps", "guidance", "seed", "random_seed",
                  "width", "height", "keep_heads", "keep_queries", "self_attention"],
    "/heatmap": ["word", *VIEW_NAMES, "contrast", "temperature"],
    "/word_grid": [*VIEW_NAMES, "one_scale", "contrast", "temperature"],
    "/words": ["negative", "opacity", "colormap", "special_tokens", "single_tokens"],
    "/attend": ["other_words", *VIEW_NAMES[1:]],
    "/self_attention": ["x", "y", "from_step", "to_step", "resolutions", "opacity", "colormap"],
    "/explain": ["image", "caption", "other_words", "timesteps", "model"],
    "/scene": ["scene"],
    "/step": ["step", "follow", "word", *VIEW_NAMES],
    "/downloads": ["word", *VIEW_NAMES],
    "/decode": ["step"],
    "/compare_view": ["word", "step", "exact_decode"],
}  # fmt: skip


def test_every_endpoint_takes_the_page_words_as_keywords_and_none_is_param_n(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = {api: [p["parameter_name"] for p in ep["parameters"]] for api, ep in endpoints.items()}
    unnamed = {api: params for api, params in names.items() if any(re.fullmatch(r"param_\d+", p) for p in params)}
    assert not unnamed, unnamed
    for api, params in API.items():
        assert names[api] == params, api
    assert {"/generate", "/words", "/heatmap", "/word_grid", "/step", "/decode", "/downloads", "/over_time",
            "/compare", "/compare_view"} <= set(names)  # fmt: skip
