"""Which words attend where: a heatmap per word over the image, a grid of all words, the filters every
map shares (steps, blocks, resolutions, layers, heads) and "ask the image". API: /words, /heatmap,
/word_grid. Everything re-renders from the stored trace; the model does not run again."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ... import render
from ..session import BLOCKS, Session, filters_from_form, heatmap_image, require, strongest_word, words_of
from ..wiring import App, View, handler
from . import research_words

TITLE, ID = "Which words attend where", "words"
COLORMAPS = ["jet", "inferno", "viridis", "magma", "turbo", "gray"]
ASK_RADIUS = 0.08  # half-width of the box around a click, as a fraction of the image
ASK_MIN_SIDE = 320  # the clickable image is enlarged server-side: the browser maps clicks in natural pixels

EXPLAIN = """**Cross-attention.** Inside the U-Net, every pixel of the latent asks “which tokens matter to me?”
and spreads its attention over the 77 token vectors (the shares add up to 1). A word's heatmap is the share
of each pixel's attention that went to that word, averaged over the steps and layers you select.
Click a word to see its map; the grid shows all of them at once. Changing a word or a filter
re-renders from the stored trace — the model does not run again."""

ASK = """**Ask the image.** Click a point on this image: the bars rank the words by how much the pixels
around the click attended to them (the reverse question of a heatmap)."""


# -- handlers ---------------------------------------------------------------------------------------
def words(negative: bool, opacity: float, colormap: str, session) -> dict:
    """The last run's words (or its negative prompt's) as chips, and the strongest one's map."""
    session = require(session)
    run = session.run
    choices = words_of(run, negative)
    if negative and not choices:
        raise ValueError("this run had no negative prompt: type one (and keep guidance above 1), then generate again")
    first = (strongest_word(run) if not negative else choices[0]) if choices else None
    full = filters_from_form(run, None, None, None, None, None, None)
    return {
        "word": gr.Radio(choices=choices, value=first),
        "heatmap": heatmap_image(session, first, negative, full, opacity, colormap) if first else None,
    }


def heatmap(
    word: str,
    negative: bool,
    opacity: float,
    colormap: str,
    from_step: float,
    to_step: float,
    blocks: list,
    resolutions: list,
    layers: list,
    head,
    session,
    contrast: list | None = None,
    temperature: float = 1.0,
) -> dict:
    """One word's map over the image, averaged over the chosen steps, blocks, resolutions, layers and heads;
    with `contrast` (two or more words), its share of each pixel among them (research_words)."""
    session = require(session)
    filters = filters_from_form(session.run, from_step, to_step, blocks, resolutions, layers, head)
    return {"heatmap": heatmap_image(session, word, negative, filters, opacity, colormap, None, contrast, temperature)}


def word_grid(
    negative: bool,
    opacity: float,
    colormap: str,
    from_step: float,
    to_step: float,
    blocks: list,
    resolutions: list,
    layers: list,
    head,
    session,
    contrast: list | None = None,
    temperature: float = 1.0,
) -> dict:
    """Every word's map side by side, with the same filters; with `contrast`, the chosen words' shares."""
    session = require(session)
    run = session.run
    filters = filters_from_form(run, from_step, to_step, blocks, resolutions, layers, head)
    chosen = words_of(run, negative)
    if not chosen:
        return {"grid": None}
    shares = {}
    if contrast:  # the chosen words only, in the prompt's order, each pixel shared among them
        chosen = [w for w in chosen if w in set(contrast)] or chosen
        shares = dict(contrast=list(contrast), temperature=float(temperature))
    fig = render.word_grid(
        run,
        session.image,
        words=chosen,
        cmap=colormap,
        alpha=float(opacity),
        negative=negative,
        size="image",
        **filters.kwargs(),
        **shares,
    )
    return {"grid": render.to_image(fig)}


def ask_canvas(session: Session) -> Image.Image:
    """The final image enlarged pixel for pixel to at least ASK_MIN_SIDE, for clicking on."""
    h, w = session.image.shape[:2]
    scale = max(1, -(-ASK_MIN_SIDE // max(h, w)))
    return Image.fromarray(session.image).resize((w * scale, h * scale), Image.NEAREST)


def ask(x: float, y: float, from_step, to_step, blocks, resolutions, layers, head, session) -> dict:
    """Words ranked by how much the region around (x, y) (fractions of the image) attended to them."""
    session = require(session)
    run = session.run
    if not run.words:
        raise ValueError("this prompt has no words to rank: type a prompt and generate again")
    filters = filters_from_form(run, from_step, to_step, blocks, resolutions, layers, head)
    box = tuple(min(max(v, 0.0), 1.0) for v in (x - ASK_RADIUS, y - ASK_RADIUS, x + ASK_RADIUS, y + ASK_RADIUS))
    scores = run.region_scores(box, **filters.kwargs())
    # No title: the panel's label and buttons sit over the image's top edge.
    label = f"mean attention probability\naround ({x:.2f}, {y:.2f})"
    return {"ask_plot": render.to_image(render.region_bars(scores, title=None, xlabel=label))}


def on_click(evt: gr.SelectData, from_step, to_step, blocks, resolutions, layers, head, session) -> dict:
    """A click on the canvas (pixels of `ask_canvas`) → `ask` at that point."""
    canvas = ask_canvas(require(session))
    x, y = evt.index
    return ask(x / canvas.width, y / canvas.height, from_step, to_step, blocks, resolutions, layers, head, session)


def show_run(session, opacity: float, colormap: str) -> dict:
    """After a new run: its words, the filters reset to the whole run, the maps and the clickable image."""
    session = require(session)
    run = session.run
    n = run.num_steps
    sides = sorted({layer.height for layer in run.layers}, reverse=True)
    kept = next(iter(run.attention.values()), None)
    heads = run.layers[0].heads if kept is not None and kept.ndim == 5 else 0
    out = words(False, opacity, colormap, session)
    return {
        **out,
        "negative": gr.Checkbox(value=False),
        "from_step": gr.Slider(maximum=n, value=1),
        "to_step": gr.Slider(maximum=n, value=n),
        "blocks": gr.CheckboxGroup(value=BLOCKS),
        "resolutions": gr.Dropdown(choices=[(f"{s}×{s}", s) for s in sides], value=[], multiselect=True),
        "layers": gr.Dropdown(choices=[(layer.short, layer.name) for layer in run.layers], value=[], multiselect=True),
        "head": gr.Dropdown(
            choices=[("mean of all heads", -1)] + [(f"head {i + 1}", i) for i in range(heads)], value=-1
        ),
        **word_grid(False, opacity, colormap, 1, n, BLOCKS, [], [], -1, session),
        "ask_image": ask_canvas(session),
        "ask_plot": None,
    }


# -- layout and wiring ------------------------------------------------------------------------------
class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")
        with gr.Row():
            self.word = gr.Radio([], label="Words (click one)", elem_id="sdviz-words", scale=4)
            negative = gr.Checkbox(False, label="Negative prompt's words", scale=1)
        with gr.Row():
            self.heatmap = gr.Image(
                label="Heatmap over the final image",
                interactive=False,
                format="png",
                elem_id="sdviz-heatmap",
                height=340,
                elem_classes="sdviz-fill",
                buttons=["download", "fullscreen"],
            )
            self.grid = gr.Image(
                label="All words",
                interactive=False,
                format="png",
                elem_id="sdviz-grid",
                height=340,
                buttons=["download", "fullscreen"],
            )
        most = app.most_steps
        with gr.Accordion("Filters and display", open=True):
            with gr.Row():
                from_step = gr.Slider(1, most, value=1, step=1, label="From step", elem_id="sdviz-from-step")
                to_step = gr.Slider(1, most, value=most, step=1, label="To step", elem_id="sdviz-to-step")
                opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
                colormap = gr.Dropdown(COLORMAPS, value="jet", label="Colormap")
            with gr.Row():
                blocks = gr.CheckboxGroup(BLOCKS, value=BLOCKS, label="U-Net blocks")
                resolutions = gr.Dropdown(
                    [], multiselect=True, allow_custom_value=True, label="Resolutions (empty = all)"
                )
                layers = gr.Dropdown([], multiselect=True, allow_custom_value=True, label="Layers (empty = all)")
                head = gr.Dropdown([("mean of all heads", -1)], value=-1, allow_custom_value=True, label="Heads")
        self.research = research_words.Box(app)  # words not in the prompt; contrast
        with gr.Row():
            with gr.Column():
                gr.Markdown(ASK, elem_classes="sdviz-explain")
                self.ask_image = gr.Image(
                    label="Click a point", interactive=False, elem_id="sdviz-ask", height=340, format="png"
                )
            self.ask_plot = gr.Image(
                label="Words ranked for the clicked region", interactive=False, format="png", elem_id="sdviz-ask-plot"
            )
        app.word = self.word
        app.view = View(negative, opacity, colormap, from_step, to_step, blocks, resolutions, layers, head)

    def wire(self, app: App):
        view = app.view
        filters = [view.from_step, view.to_step, view.blocks, view.resolutions, view.layers, view.head]
        words_out = {"word": self.word, "heatmap": self.heatmap}
        view.negative.input(
            handler(words, words_out),
            [view.negative, view.opacity, view.colormap, app.session],
            list(words_out.values()),
            api_name="words",
        )
        contrast = [self.research.contrast, self.research.temperature]
        contrast_triggers = [self.research.contrast.input, self.research.temperature.input]
        gr.on(
            [self.word.input, *view.filter_triggers(), *contrast_triggers],
            handler(heatmap, {"heatmap": self.heatmap}),
            [self.word, *view.inputs(), app.session, *contrast],
            self.heatmap,
            api_name="heatmap",
            preprocess=False,  # the word chips' choices are per session: a fresh session must hear "generate first"
            trigger_mode="always_last",
            show_progress="hidden",
        )
        gr.on(
            [view.negative.input, *view.filter_triggers(), *contrast_triggers],
            handler(word_grid, {"grid": self.grid}),
            [*view.inputs(), app.session, *contrast],
            self.grid,
            api_name="word_grid",
            trigger_mode="always_last",
            show_progress="hidden",
        )
        self.ask_image.select(
            handler(on_click, {"ask_plot": self.ask_plot}),
            [*filters, app.session],
            self.ask_plot,
            api_visibility="private",
        )
        run_out = {
            "word": self.word,
            "heatmap": self.heatmap,
            "grid": self.grid,
            "ask_image": self.ask_image,
            "ask_plot": self.ask_plot,
            "negative": view.negative,
            "from_step": view.from_step,
            "to_step": view.to_step,
            "blocks": view.blocks,
            "resolutions": view.resolutions,
            "layers": view.layers,
            "head": view.head,
        }
        app.after_run(handler(show_run, run_out), [app.session, view.opacity, view.colormap], list(run_out.values()))
        self.research.wire(app)
