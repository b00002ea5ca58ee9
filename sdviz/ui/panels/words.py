"""Which words attend where: a heatmap per word (or token) over the image with its colour scale, a grid of
all words on one scale, the filters every map shares (steps, blocks, resolutions, layers, heads) and
"ask the image". API: /words, /heatmap, /word_grid. Everything re-renders from the stored trace; the
model does not run again."""

from __future__ import annotations

import gradio as gr
from PIL import Image, ImageDraw

from ... import render
from ..session import (
    BLOCKS,
    Session,
    describe,
    filters_from_form,
    heatmap_image,
    require,
    strongest_word,
    words_of,
)
from ..wiring import App, View, drawn, handler
from . import research_words

TITLE, ID = "Words → places", "words"
COLORMAPS = ["jet", "inferno", "viridis", "magma", "turbo", "gray"]
ASK_RADIUS = 0.08  # half-width of the box around a click, as a fraction of the image
ASK_MIN_SIDE = 320  # the clickable image is enlarged server-side: the browser maps clicks in natural pixels

EXPLAIN = """**Cross-attention.** Inside the U-Net, every pixel of the latent asks “which tokens matter to me?”
and spreads its attention over the 77 token vectors (the shares add up to 1). A word's heatmap is the share
of each pixel's attention that went to that word, averaged over the steps and layers you select.
Click a word to see its map; the grid shows all of them at once. Changing a word or a filter
re-renders from the stored trace — the model does not run again."""

ASK = """**Ask the image.** Click a point on this image: the bars rank the words by how much the pixels
around the click (the box drawn) attended to them — the reverse question of a heatmap. A word that occurs
twice is listed twice, the second as “word (#2)”."""

LAYERS_INFO = (
    "e.g. up1.a2.t0 (16×16) = up block 1, its attention module 2, transformer block 0, working at "
    "16×16 latent pixels; only layers in the chosen blocks and resolutions are listed"
)


# -- handlers ---------------------------------------------------------------------------------------
def chips(run, negative: bool = False, special_tokens: bool = False, single_tokens: bool = False) -> list:
    """The choices of the word chips, (label, value): each distinct word, or with `single_tokens` each
    token ("astr (#3)" → "#3"); `special_tokens` adds <|startoftext|> and <|endoftext|>."""
    tokens = run.negative_tokens if negative else run.tokens
    if not single_tokens:
        choices = [(w, w) for w in words_of(run, negative)]
        specials = [(t.text, f"#{t.index}") for t in tokens if t.special] if special_tokens else []
        return specials[:1] + choices + specials[1:]
    return [(f"{t.text} (#{t.index})", f"#{t.index}") for t in tokens if special_tokens or not t.special]


def words(negative: bool, opacity: float, colormap: str, special_tokens: bool, single_tokens: bool, session) -> dict:
    """The last run's words (or its negative prompt's, or tokens) as chips, and the strongest one's map."""
    session = require(session)
    run = session.run
    choices = chips(run, negative, special_tokens, single_tokens)
    if negative and not words_of(run, True):
        raise ValueError("this run had no negative prompt: type one (and keep guidance above 1), then generate again")
    first = strongest_word(run) if not negative else (words_of(run, True) or [None])[0]
    if first is not None and single_tokens:
        first = f"#{run.token_indices(first, negative)[-1]}"
    full = filters_from_form(run, None, None, None, None, None, None)
    return {
        "word": gr.Radio(choices=choices, value=first),
        **(
            heatmap_out(session, first, negative, full, opacity, colormap)
            if first
            else {"heatmap": None, "caption": ""}
        ),
    }


def heatmap_out(
    session: Session, word: str, negative: bool, filters, opacity, colormap, contrast=None, temperature: float = 1.0
) -> dict:
    caption = describe(session.run, word, filters, negative)
    if contrast:
        caption += f" · its share among {', '.join(contrast)} (contrast, τ = {float(temperature):g})"
    return {
        "heatmap": heatmap_image(session, word, negative, filters, opacity, colormap, None, contrast, temperature),
        "caption": caption,
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
    return heatmap_out(session, word, negative, filters, opacity, colormap, contrast, temperature)


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
    one_scale: bool,
    session,
    contrast: list | None = None,
    temperature: float = 1.0,
) -> dict:
    """Every word's map side by side, with the same filters, on one colour scale unless asked otherwise;
    with `contrast`, the chosen words' shares of each pixel."""
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
        shared_scale=bool(one_scale),
        size="image",
        **filters.kwargs(),
        **shares,
    )
    return {"grid": render.to_image(fig)}


def narrow_layers(blocks: list, resolutions: list, layers: list, session) -> dict:
    """The layer choices that pass the chosen blocks and resolutions (chosen layers outside them drop)."""
    if session is None:
        return {"layers": gr.skip()}
    run = session.run
    wanted = {int(r) for r in resolutions or []}
    fits = [layer for layer in run.layers if layer.block in (blocks or []) and (not wanted or layer.height in wanted)]
    names = {layer.name for layer in fits}
    return {
        "layers": gr.Dropdown(
            choices=[(layer.short, layer.name) for layer in fits],
            value=[v for v in layers or [] if v in names],
            multiselect=True,
        )
    }


def ask_canvas(session: Session, point: tuple[float, float] | None = None) -> Image.Image:
    """The final image enlarged pixel for pixel to at least ASK_MIN_SIDE, for clicking on; `point`
    (fractions of the image) is marked with the box the ranking averages over."""
    h, w = session.image.shape[:2]
    scale = max(1, -(-ASK_MIN_SIDE // max(h, w)))
    canvas = Image.fromarray(session.image).resize((w * scale, h * scale), Image.NEAREST)
    if point is not None:
        x, y = point[0] * canvas.width, point[1] * canvas.height
        rx, ry = ASK_RADIUS * canvas.width, ASK_RADIUS * canvas.height
        draw = ImageDraw.Draw(canvas)
        for width, colour in ((5, (255, 255, 255)), (2, (0, 0, 0))):
            draw.rectangle([x - rx, y - ry, x + rx, y + ry], outline=colour, width=width)
            draw.line([(x - 6, y), (x + 6, y)], fill=colour, width=width)
            draw.line([(x, y - 6), (x, y + 6)], fill=colour, width=width)
    return canvas


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
    label = f"mean attention probability\nin the box around ({x:.2f}, {y:.2f})"
    return {
        "ask_plot": render.to_image(render.region_bars(scores, title=None, xlabel=label)),
        "ask_image": ask_canvas(session, (x, y)),
    }


def on_click(evt: gr.SelectData, from_step, to_step, blocks, resolutions, layers, head, session) -> dict:
    """A click on the canvas (pixels of `ask_canvas`) → `ask` at that point."""
    canvas = ask_canvas(require(session))
    x, y = evt.index
    return ask(x / canvas.width, y / canvas.height, from_step, to_step, blocks, resolutions, layers, head, session)


def show_run(
    session, opacity: float, colormap: str, special_tokens: bool, single_tokens: bool, one_scale: bool
) -> dict:
    """After a new run: its words, the filters reset to the whole run, the maps and the clickable image."""
    session = require(session)
    run = session.run
    n = run.num_steps
    sides = sorted({layer.height for layer in run.layers}, reverse=True)
    kept = next(iter(run.attention.values()), None)
    heads = run.layers[0].heads if kept is not None and kept.ndim == 5 else 0
    out = words(False, opacity, colormap, special_tokens, single_tokens, session)
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
        **word_grid(False, opacity, colormap, 1, n, BLOCKS, [], [], -1, one_scale, session),
        "ask_image": ask_canvas(session),
        "ask_plot": None,
    }


# -- layout and wiring ------------------------------------------------------------------------------
class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")
        with gr.Row():
            self.word = gr.Radio([], label="Words (click one)", elem_id="sdviz-words", scale=4)
            with gr.Column(scale=1, min_width=200):
                negative = gr.Checkbox(False, label="Negative prompt's words", elem_id="sdviz-negative")
                self.special_tokens = gr.Checkbox(
                    False, label="Show <|startoftext|> and <|endoftext|>", elem_id="sdviz-specials"
                )
                self.single_tokens = gr.Checkbox(
                    False, label="Pick single tokens (pieces of words)", elem_id="sdviz-single-tokens"
                )
        with gr.Row():
            with gr.Column():
                self.caption = gr.Markdown("Heatmap over the final image", elem_id="sdviz-heatmap-caption")
                self.heatmap = drawn(
                    "sdviz-heatmap", "Heatmap over the final image", height=360, buttons=["download", "fullscreen"]
                )
            with gr.Column():
                self.grid = drawn("sdviz-grid", "All words", height=360, buttons=["download", "fullscreen"])
                self.one_scale = gr.Checkbox(
                    True, label="One colour scale for all words (a faint word looks faint)", elem_id="sdviz-one-scale"
                )
        steps = app.models.preset(app.models.default).steps
        with gr.Accordion("Filters and display", open=True):
            with gr.Row():
                from_step = gr.Slider(1, steps, value=1, step=1, label="From step", elem_id="sdviz-from-step")
                to_step = gr.Slider(1, steps, value=steps, step=1, label="To step", elem_id="sdviz-to-step")
                opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
                colormap = gr.Dropdown(COLORMAPS, value="jet", label="Colormap")
            with gr.Row():
                blocks = gr.CheckboxGroup(BLOCKS, value=BLOCKS, label="U-Net blocks")
                resolutions = gr.Dropdown(
                    [], multiselect=True, allow_custom_value=True, label="Resolutions (empty = all)"
                )
                layers = gr.Dropdown(
                    [], multiselect=True, allow_custom_value=True, label="Layers (empty = all)", info=LAYERS_INFO
                )
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
        chip_options = [self.special_tokens, self.single_tokens]
        words_out = {"word": self.word, "heatmap": self.heatmap, "caption": self.caption}
        heat_out = {"heatmap": self.heatmap, "caption": self.caption}
        gr.on(
            [view.negative.input, self.special_tokens.input, self.single_tokens.input],
            handler(words, words_out),
            [view.negative, view.opacity, view.colormap, *chip_options, app.session],
            list(words_out.values()),
            api_name="words",
        )
        contrast = [self.research.contrast, self.research.temperature]
        contrast_triggers = [self.research.contrast.input, self.research.temperature.input]
        gr.on(
            [self.word.input, *view.filter_triggers(), *contrast_triggers],
            handler(heatmap, heat_out),
            [self.word, *view.inputs(), app.session, *contrast],
            list(heat_out.values()),
            api_name="heatmap",
            preprocess=False,  # the word chips' choices are per session: a fresh session must hear "generate first"
            trigger_mode="always_last",
            show_progress="hidden",
        )
        gr.on(
            [view.negative.input, self.one_scale.input, *view.filter_triggers(), *contrast_triggers],
            handler(word_grid, {"grid": self.grid}),
            [*view.inputs(), self.one_scale, app.session, *contrast],
            self.grid,
            api_name="word_grid",
            preprocess=False,  # slider maxima are per run: a request for a longer run than the page's must pass
            trigger_mode="always_last",
            show_progress="hidden",
        )
        gr.on(
            [view.blocks.input, view.resolutions.input],
            handler(narrow_layers, {"layers": view.layers}),
            [view.blocks, view.resolutions, view.layers, app.session],
            view.layers,
            api_visibility="private",
            show_progress="hidden",
        )
        ask_out = {"ask_plot": self.ask_plot, "ask_image": self.ask_image}
        self.ask_image.select(
            handler(on_click, ask_out), [*filters, app.session], list(ask_out.values()), api_visibility="private"
        )
        run_out = {
            "word": self.word,
            "heatmap": self.heatmap,
            "caption": self.caption,
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
        app.after_run(
            handler(show_run, run_out),
            [app.session, view.opacity, view.colormap, *chip_options, self.one_scale],
            list(run_out.values()),
        )
        self.research.wire(app)
