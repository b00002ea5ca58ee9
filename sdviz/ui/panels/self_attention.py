"""Where a pixel looks: click a point on the image and see its self-attention (the U-Net's attn1 layers:
which parts of the image that latent pixel attended to), with the words panel's step range. API: /self_attention."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ... import render
from ..session import Session, filters_from_form, require
from ..wiring import App, handler

TITLE, ID = "Where a pixel looks", "self"
MIN_SIDE = 320  # the clickable image is enlarged server-side: the browser reports clicks in its natural pixels

EXPLAIN = """**Self-attention.** Besides attending to the words, every latent pixel of the U-Net attends to
every other pixel of the image (the self-attention layers, attn1): that is how the parts of an object hold
together. Click a point: the overlay shows where the latent pixel under it looked — the mean over heads,
over the steps of the words panel's step range, and over the recorded layers (by default those at 16×16
and coarser). Generate with *Advanced → Record self-attention* (on by default)."""

NOT_RECORDED = "This run recorded no self-attention: tick Advanced → Record self-attention and generate again."


# -- handlers ---------------------------------------------------------------------------------------
def canvas(session: Session) -> Image.Image:
    """The final image enlarged pixel for pixel to at least MIN_SIDE, for clicking on."""
    h, w = session.image.shape[:2]
    scale = max(1, -(-MIN_SIDE // max(h, w)))
    return Image.fromarray(session.image).resize((w * scale, h * scale), Image.NEAREST)


def self_attention(
    x: float, y: float, from_step, to_step, resolutions: list, opacity: float, colormap: str, session
) -> dict:
    """Where the latent pixel at (x, y) (fractions of the image) looked, over the image, the point marked."""
    session = require(session)
    run = session.run
    filters = filters_from_form(run, from_step, to_step, None, None, None, None)
    sides = [int(r) for r in resolutions] if resolutions else None
    heat = run.self_attention_map((x, y), steps=filters.steps, resolutions=sides, size="image")
    picture = render.overlay(session.image, heat, colormap, float(opacity))
    big = picture.resize(canvas(session).size, Image.NEAREST)
    caption = f"From ({x:.2f}, {y:.2f}): the brightest parts are where that pixel looked most."
    return {"self_map": render.mark_point(big, (x, y)), "self_note": caption}


def on_click(evt: gr.SelectData, from_step, to_step, resolutions, opacity, colormap, session) -> dict:
    """A click on the canvas (its pixels) → `self_attention` at that point."""
    board = canvas(require(session))
    x, y = evt.index
    return self_attention(x / board.width, y / board.height, from_step, to_step, resolutions, opacity, colormap,
                          session)  # fmt: skip


def show_run(session, opacity: float, colormap: str) -> dict:
    """After a new run: the clickable image, the recorded resolutions, and the map from the image's centre."""
    session = require(session)
    run = session.run
    if not run.self_attention:
        return {
            "self_canvas": canvas(session),
            "self_map": None,
            "self_resolutions": gr.Dropdown(choices=[], value=[], multiselect=True),
            "self_note": NOT_RECORDED,
        }
    sides = sorted({layer.height for layer in run.self_layers}, reverse=True)
    out = self_attention(0.5, 0.5, 1, run.num_steps, [], opacity, colormap, session)
    return {
        **out,
        "self_canvas": canvas(session),
        "self_resolutions": gr.Dropdown(choices=[(f"{s}×{s}", s) for s in sides], value=[], multiselect=True),
    }


# -- layout and wiring ------------------------------------------------------------------------------
class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")
        with gr.Row():
            self.canvas = gr.Image(
                label="Click a point", interactive=False, elem_id="sdviz-self-canvas", height=360, format="png"
            )
            self.map = gr.Image(
                label="Where that pixel looked", interactive=False, elem_id="sdviz-self-map", height=360, format="png"
            )
        with gr.Row():
            self.resolutions = gr.Dropdown(
                [], multiselect=True, allow_custom_value=True, label="Layers at (empty = all recorded)", scale=1
            )
            self.note = gr.Markdown("", elem_id="sdviz-self-note")
        self.point = (gr.Number(0.5, visible=False), gr.Number(0.5, visible=False))
        self.api = gr.Button(visible=False)  # carries the API endpoint /self_attention(x, y, …)

    def wire(self, app: App):
        view = app.view
        looks = [view.from_step, view.to_step, self.resolutions, view.opacity, view.colormap, app.session]
        out = {"self_map": self.map, "self_note": self.note}
        self.canvas.select(handler(on_click, out), looks, list(out.values()), api_visibility="private")
        self.api.click(
            handler(self_attention, out), [*self.point, *looks], list(out.values()), api_name="self_attention"
        )
        run_out = {"self_canvas": self.canvas, "self_map": self.map, "self_resolutions": self.resolutions,
                   "self_note": self.note}  # fmt: skip
        app.after_run(handler(show_run, run_out), [app.session, view.opacity, view.colormap], list(run_out.values()))
