"""Explain an image: upload (or pick) an image and its caption, and see where its words — and any other
words — land in it, from U-Net calls on the image noised to a few timesteps (`sdviz.explain_image`). On a
shapes-world scene the maps are scored against its exact masks. API: /explain, /scene."""

from __future__ import annotations

import functools

import gradio as gr
import numpy as np

from ... import render
from ...explain import DEFAULT_TIMESTEPS, explain_image
from ...settings import whole_number
from ..models import Models
from ..wiring import PIPELINE, App, drawn, handler, pipeline_errors, zero_gpu
from .research_words import parse_words

TITLE, ID = "Explain an image", "explain"
SCENES = 12  # held-out shapes-world scenes offered to pick

EXPLAIN = """**Explain a real image.** The image is encoded by the VAE, noised to each timestep you list
(0 = clean, 999 = pure noise) and given to the U-Net once per timestep with your caption; the maps of the
caption's words are that cross-attention, averaged over the timesteps and layers. Other words are
recomputed from the same calls' queries (no further U-Net call). The model is the one chosen in the form.
Shapes-world scenes (pick one, or upload one) come with exact masks: each colour and shape word is scored
— the pointing game (is the map's peak inside its object?) and the IoU of the map above half its range."""


@functools.lru_cache(maxsize=1)
def scenes() -> tuple:
    """Held-out shapes-world scenes (the built-in model never saw these captions), made once."""
    from ...toy import world

    return tuple(world.sample_scenes(SCENES, seed=4321, heldout=True))


def scene_masks(scene) -> dict[str, np.ndarray]:
    """{colour or shape word: bool [H, W] mask}; a word naming several objects gets the union of theirs."""
    from ...toy import world

    masks: dict[str, np.ndarray] = {}
    for word, obj in zip(scene.caption.split(), world.word_objects(scene.caption)):
        if word in world.COLOURS or word in world.SHAPES:
            masks[word] = masks.get(word, np.zeros_like(scene.masks[obj])) | scene.masks[obj]
    return masks


def matching_scene(image: np.ndarray):
    """The offered scene whose pixels `image` is, or None (an uploaded copy of a scene counts)."""
    for scene in scenes():
        if image.shape == scene.image.shape and np.array_equal(image, scene.image):
            return scene
    return None


def parse_timesteps(text) -> tuple[int, ...]:
    parts = [p for p in str(text or "").replace(";", ",").split(",") if p.strip()]
    if not parts:
        raise ValueError("list one or more timesteps from 0 to 999, e.g. “250, 500, 750”")
    return tuple(dict.fromkeys(whole_number(p, "a timestep") for p in parts))


def score_table(scores: dict) -> str:
    rows = ["| word | pointing game | IoU |", "|---|---|---|"]
    rows += [f"| {w} | {'hit' if s['pointing'] else 'miss'} | {s['iou']:.2f} |" for w, s in scores.items()]
    hits = np.mean([s["pointing"] for s in scores.values()])
    rows.append(f"| **all** | **{hits:.0%}** | **{np.mean([s['iou'] for s in scores.values()]):.2f}** |")
    return "\n".join(rows)


# -- handlers ---------------------------------------------------------------------------------------
def scene(scene: int) -> dict:
    """A held-out shapes-world scene (1-based) as the image and caption to explain."""
    n = whole_number(scene, "the scene")
    if not 1 <= n <= SCENES:
        raise ValueError(f"pick a scene from 1 to {SCENES}")
    picked = scenes()[n - 1]
    return {"explain_image": picked.image, "explain_caption": picked.caption}


@zero_gpu
def explain(image, caption: str, other_words: str, timesteps: str, model: str, *, models: Models) -> dict:
    """The caption's words' and the other words' maps over the image, and scores on a shapes-world scene."""
    if image is None:
        raise ValueError("upload an image (or pick a shapes-world scene) first")
    steps = parse_timesteps(timesteps)
    words = parse_words(other_words) if (other_words or "").strip() else []
    picture = np.asarray(image)[..., :3].astype(np.uint8)
    with pipeline_errors(model, "Explain"), models.using(model) as pipe:
        found = explain_image(pipe, picture, caption, words=words, timesteps=steps)
    maps = {w: found.heatmap(w, size="image") for w in found.words}
    grid = render.to_image(render.heatmap_grid(found.image, maps))
    h, w = found.image.shape[:2]
    note = (f"**Where the words land.** Timesteps {', '.join(map(str, found.timesteps))}: one U-Net call each, "
            f"maps averaged over them and the layers; the image was cropped and resized to {w}×{h}.")  # fmt: skip
    known = matching_scene(picture)
    scores = score_table(found.scores(scene_masks(known))) if known is not None else (
        "Not a shapes-world scene: no masks to score against.")  # fmt: skip
    return {"explain_maps": grid, "explain_note": note, "explain_scores": scores}


# -- layout and wiring ------------------------------------------------------------------------------
class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")
        with gr.Row():
            with gr.Column(scale=2):
                self.image = gr.Image(label="Image", type="numpy", format="png", sources=["upload", "clipboard"],
                                      elem_id="sdviz-explain-image", height=260, elem_classes="sdviz-fill")  # fmt: skip
                self.scene = gr.Dropdown(
                    [(f"{i + 1}: {s.caption}", i + 1) for i, s in enumerate(scenes())],
                    value=None,
                    label="…or pick a held-out shapes-world scene",
                    elem_id="sdviz-explain-scene",
                )
            with gr.Column(scale=3):
                self.caption = gr.Textbox(label="Caption", lines=2, elem_id="sdviz-explain-caption",
                                          placeholder="a red circle on the left and a blue square")  # fmt: skip
                self.other = gr.Textbox(label="Other words (optional, comma-separated)", max_lines=1,
                                        placeholder="green, zebra", elem_id="sdviz-explain-other")  # fmt: skip
                self.timesteps = gr.Textbox(", ".join(map(str, DEFAULT_TIMESTEPS)), label="Timesteps (0–999)",
                                            max_lines=1)  # fmt: skip
                self.button = gr.Button("Explain", variant="primary", elem_id="sdviz-explain-go")
        self.note = gr.Markdown("", elem_id="sdviz-explain-note")
        with gr.Row():
            # No label drawn over the picture: it would hide the first map's title.
            self.maps = drawn("sdviz-explain-maps", "Where the words land")
            self.scores = gr.Markdown("", elem_id="sdviz-explain-scores")

    def wire(self, app: App):
        out = {"explain_maps": self.maps, "explain_note": self.note, "explain_scores": self.scores}
        self.button.click(
            handler(explain, out, models=app.models),
            [self.image, self.caption, self.other, self.timesteps, app.form.model],
            list(out.values()),
            api_name="explain",
            concurrency_id=PIPELINE,
            concurrency_limit=1,
        )
        picked = {"explain_image": self.image, "explain_caption": self.caption}
        self.scene.input(handler(scene, picked), self.scene, list(picked.values()), api_name="scene")
