"""On the words panel: words not in the prompt (maps recomputed from the run's kept queries, `run.attend`)
and the contrast option (each pixel shared among chosen words). API: /attend, /other_words."""

from __future__ import annotations

import gradio as gr

from ... import render
from ..models import Models
from ..session import filters_from_form, require, words_of
from ..wiring import PIPELINE, App, handler

OTHER = """**Words not in the prompt.** Type any words (comma-separated): their maps are recomputed from the
queries this run's cross-attention layers kept (each word's keys through the same layers' `to_k`), without
running the U-Net again — where this image would have attended to them. They use the same filters (the
kept layers are those at 16×16 and coarser; heads are averaged)."""

CONTRAST = """**Contrast.** Pick two or more words: at each pixel their attention is shared among them
(p^(1/τ) / Σ p^(1/τ), a softmax over the chosen words; τ = 1 is the plain share), so the heatmap and the
grid show which of them wins where. Empty: off."""

MAX_OTHER_WORDS = 8


# -- handlers ---------------------------------------------------------------------------------------
def parse_words(text: str) -> list[str]:
    words = list(dict.fromkeys(w.strip() for w in (text or "").split(",") if w.strip()))
    if not words:
        raise ValueError("type one or more words, separated by commas, e.g. “zebra, green triangle”")
    if len(words) > MAX_OTHER_WORDS:
        raise ValueError(f"at most {MAX_OTHER_WORDS} words at a time; got {len(words)}")
    return words


def other_grid(
    opacity: float, colormap: str, from_step, to_step, blocks, resolutions, layers, head, session, others
) -> dict:
    """The maps of the words in `others` ({word: attended TraceResult}) over the image, with the filters."""
    if not others:  # nothing typed yet: quiet (the words panel itself says when there is no run)
        return {"other_grid": None}
    session = require(session)
    filters = filters_from_form(session.run, from_step, to_step, blocks, resolutions, layers, head)
    kwargs = {**filters.kwargs(), "heads": None}  # the recomputed maps are head means
    maps = {}
    for word, run in others.items():
        tokens = [t for w in run.words for t in w.tokens]  # every piece of the typed text
        maps[word] = run.heatmap(tokens, size="image", **kwargs)
    fig = render.heatmap_grid(session.image, maps, cmap=colormap, alpha=float(opacity))
    return {"other_grid": render.to_image(fig)}


def attend(
    other_words: str,
    opacity: float,
    colormap: str,
    from_step,
    to_step,
    blocks,
    resolutions,
    layers,
    head,
    session,
    *,
    models: Models,
) -> dict:
    """Maps of words not in the prompt, each recomputed from the run's kept queries (no U-Net call)."""
    session = require(session)
    words = parse_words(other_words)
    with models.using(session.model) as pipe:  # its text encoder and each layer's to_k
        others = {word: session.run.attend(pipe, word) for word in words}
    shown = other_grid(opacity, colormap, from_step, to_step, blocks, resolutions, layers, head, session, others)
    return {**shown, "others": others}


def show_run(session) -> dict:
    """After a new run: the contrast choices are its words; words typed for the last run are cleared."""
    run = require(session).run
    note = "" if run.queries else "This run kept no queries: tick Advanced → keep queries and generate again."
    return {
        "contrast": gr.Dropdown(choices=words_of(run), value=[], multiselect=True),
        "others": {},
        "other_grid": None,
        "other_note": note,
    }


# -- layout and wiring (built inside the words panel) -----------------------------------------------
class Box:
    def __init__(self, app: App):
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown(CONTRAST, elem_classes="sdviz-explain")
                self.contrast = gr.Dropdown(
                    [], multiselect=True, label="Contrast across these words", elem_id="sdviz-contrast"
                )
                self.temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Contrast temperature τ")
            with gr.Column(scale=3):
                gr.Markdown(OTHER, elem_classes="sdviz-explain")
                with gr.Row():
                    self.words = gr.Textbox(
                        label="Words not in the prompt",
                        placeholder="zebra, green triangle",
                        max_lines=1,
                        elem_id="sdviz-other-words",
                        scale=4,
                    )
                    self.button = gr.Button("Map them", scale=1, elem_id="sdviz-other-go")
                self.note = gr.Markdown("", elem_id="sdviz-other-note")
        self.grid = gr.Image(
            label="Words not in the prompt", interactive=False, format="png", elem_id="sdviz-other-grid"
        )
        self.others = gr.State({})

    def wire(self, app: App):
        view = app.view
        looks = [view.opacity, view.colormap, view.from_step, view.to_step, view.blocks, view.resolutions,
                 view.layers, view.head]  # fmt: skip
        out = {"other_grid": self.grid, "others": self.others}
        gr.on(
            [self.button.click, self.words.submit],
            handler(attend, out, models=app.models),
            [self.words, *looks, app.session],
            list(out.values()),
            api_name="attend",
            concurrency_id=PIPELINE,
            concurrency_limit=1,
        )
        gr.on(
            view.filter_triggers(),
            handler(other_grid, {"other_grid": self.grid}),
            [*looks, app.session, self.others],
            self.grid,
            api_name="other_words",
            trigger_mode="always_last",
            show_progress="hidden",
        )
        run_out = {"contrast": self.contrast, "others": self.others, "other_grid": self.grid, "other_note": self.note}
        app.after_run(handler(show_run, run_out), [app.session], list(run_out.values()))
