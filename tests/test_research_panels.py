"""The research views' handlers on a stored trace, without a server: words not in the prompt, contrast,
where a pixel looks, explain an image (issue 14)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import SIZE
from PIL import Image

import sdviz
from sdviz.ui import Models
from sdviz.ui.models import RANDOM, RANDOM_PRESET
from sdviz.ui.panels import explain, generate, research_words, self_attention, words
from sdviz.ui.session import Session
from sdviz.ui.wiring import StopRequests

STEPS = 3
PROMPT = "a red circle on the left and a blue square"
ALL = dict(from_step=1, to_step=STEPS, blocks=["down", "mid", "up"], resolutions=[], layers=[], head=-1)
DRAW = dict(negative=False, opacity=0.5, colormap="jet")
LOOK = dict(opacity=0.5, colormap="jet", **ALL)


@pytest.fixture(scope="module")
def models(sd1_pipe):
    return Models({RANDOM: RANDOM_PRESET}, loaded={RANDOM: sd1_pipe})


def stored_session(pipe, tmp_path, **research) -> Session:
    """A run saved to disk and loaded back, as a session holds it."""
    settings = sdviz.Settings(PROMPT, steps=STEPS, width=SIZE, height=SIZE, seed=3)
    image, run = sdviz.generate(pipe, settings, **research)
    loaded = sdviz.TraceResult.load(run.save(tmp_path / "run.safetensors"))
    return Session(loaded, np.asarray(image), RANDOM, 3, 1.0, settings, "tiny random")


@pytest.fixture(scope="module")
def session(sd1_pipe, tmp_path_factory) -> Session:
    return stored_session(sd1_pipe, tmp_path_factory.mktemp("trace"), keep_queries=True, self_attention=True)


def test_generate_keeps_queries_and_self_attention_unless_unticked(models):
    def run(*research):
        form = (RANDOM, PROMPT, "", "DDIM", 2, 7.5, "3", False, SIZE, SIZE, False)
        events = generate.generate(
            *form, None, SimpleNamespace(session_hash="u"), *research, models=models, stops=StopRequests()
        )
        return list(events)[-1]["session"].run

    default = run()
    assert default.queries and default.self_attention
    off = run(False, False)
    assert off.queries == {} and off.self_attention == {}


def test_words_not_in_the_prompt_get_maps_with_the_panels_filters_without_the_unet(session, models, sd1_pipe):
    calls = []
    hook = sd1_pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        out = research_words.attend("zebra, green triangle", **LOOK, session=session, models=models)
    finally:
        hook.remove()
    assert calls == [] and list(out["others"]) == ["zebra", "green triangle"]
    assert isinstance(out["other_grid"], Image.Image) and out["other_grid"].width > SIZE
    early = research_words.other_grid(**{**LOOK, "to_step": 1}, session=session, others=out["others"])
    assert not np.array_equal(np.asarray(early["other_grid"]), np.asarray(out["other_grid"]))
    assert research_words.other_grid(**LOOK, session=None, others={})["other_grid"] is None  # quiet before a run
    with pytest.raises(ValueError, match="type one or more words"):
        research_words.attend(" , ", **LOOK, session=session, models=models)
    shown = research_words.show_run(session)
    assert [v for _, v in shown["contrast"].choices][:3] == ["a", "red", "circle"] and shown["other_note"] == ""


def test_a_run_without_queries_says_how_to_keep_them(sd1_pipe, models, tmp_path):
    plain = stored_session(sd1_pipe, tmp_path)
    with pytest.raises(ValueError, match="keep queries"):
        research_words.attend("zebra", **LOOK, session=plain, models=models)
    assert "keep queries" in research_words.show_run(plain)["other_note"]


def test_contrast_changes_the_heatmap_and_grid_to_the_chosen_words_shares(session):
    plain = np.asarray(words.heatmap("red", **DRAW, **ALL, session=session)["heatmap"])
    shared = np.asarray(words.heatmap("red", **DRAW, **ALL, session=session, contrast=["red", "blue"])["heatmap"])
    side = min(plain.shape[0], shared.shape[0]) - 30  # the map itself, left of its colour bar and above its caption
    assert not np.array_equal(plain[:side, :side], shared[:side, :side])
    full = words.word_grid(**DRAW, **ALL, one_scale=True, session=session)["grid"]
    two = words.word_grid(**DRAW, **ALL, one_scale=True, session=session, contrast=["red", "blue"], temperature=0.5)[
        "grid"
    ]
    assert two.width < full.width  # only the chosen words
    with pytest.raises(ValueError, match="temperature"):
        words.heatmap("red", **DRAW, **ALL, session=session, contrast=["red", "blue"], temperature=0)


def test_clicking_a_pixel_shows_where_it_looked(session, sd1_pipe, tmp_path):
    shown = self_attention.show_run(session, 0.5, "jet")
    assert shown["self_canvas"].width >= self_attention.MIN_SIDE and shown["self_map"].size == shown["self_canvas"].size
    left = self_attention.self_attention(0.1, 0.1, 1, STEPS, [], 0.5, "jet", session)
    right = self_attention.self_attention(0.9, 0.9, 1, STEPS, [], 0.5, "jet", session)
    assert not np.array_equal(np.asarray(left["self_map"]), np.asarray(right["self_map"]))
    assert "(0.10, 0.10)" in left["self_note"]
    plain = stored_session(sd1_pipe, tmp_path)
    assert self_attention.show_run(plain, 0.5, "jet")["self_note"] == self_attention.NOT_RECORDED
    with pytest.raises(ValueError, match="Generate an image first"):
        self_attention.self_attention(0.5, 0.5, 1, 3, [], 0.5, "jet", None)


def test_explain_panel_maps_an_image_and_scores_a_shapes_world_scene():
    toy = sdviz.load_pipeline("toy")
    toy.set_progress_bar_config(disable=True)
    models = Models({"toy": sdviz.PRESETS["toy"]}, loaded={"toy": toy})
    picked = explain.scene(2)
    assert picked["explain_caption"] == explain.scenes()[1].caption
    out = explain.explain(picked["explain_image"], picked["explain_caption"], "zebra", "300, 600", "toy", models=models)
    assert isinstance(out["explain_maps"], Image.Image) and "Timesteps 300, 600" in out["explain_note"]
    masks = explain.scene_masks(explain.scenes()[1])
    assert all(f"| {word} |" in out["explain_scores"] for word in masks) and "**all**" in out["explain_scores"]
    other = np.asarray(picked["explain_image"]).copy()
    other[0, 0] = 0  # no longer a known scene
    again = explain.explain(other, picked["explain_caption"], "", "500", "toy", models=models)
    assert "no masks" in again["explain_scores"]
    with pytest.raises(ValueError, match="upload an image"):
        explain.explain(None, "a red circle", "", "500", "toy", models=models)
    with pytest.raises(ValueError, match="timestep"):
        explain.explain(other, "a red circle", "", "", "toy", models=models)
