"""Attention over time: each word's share of the attention paid to words, at every step, with the
words panel's filters (steps, blocks, resolutions, layers, heads)."""

from __future__ import annotations

import gradio as gr

from ... import render
from ..session import BLOCKS, filters_from_form, require, words_of
from ..wiring import App, handler

TITLE, ID = "Over time", "time"

EXPLAIN = """**Attention over time.** Each band is one word's share of the attention paid to words, at every
step. Early steps decide the layout; late steps the details."""


def over_time(negative: bool, from_step, to_step, blocks, resolutions, layers, head, session) -> dict:
    session = require(session)
    run = session.run
    if not words_of(run, negative):
        return {"plot": None}
    filters = filters_from_form(run, from_step, to_step, blocks, resolutions, layers, head)
    return {"plot": render.to_image(render.attention_over_time(run, negative=negative, **filters.kwargs()))}


def show_run(session) -> dict:
    n = require(session).run.num_steps
    return over_time(False, 1, n, BLOCKS, [], [], -1, session)


class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")
        self.plot = gr.Image(label="Attention over time", interactive=False, format="png", elem_id="sdviz-over-time")

    def wire(self, app: App):
        view = app.view
        inputs = [view.negative, view.from_step, view.to_step, view.blocks, view.resolutions, view.layers, view.head]
        gr.on(
            [view.negative.input, *view.filter_triggers()],
            handler(over_time, {"plot": self.plot}),
            [*inputs, app.session],
            self.plot,
            api_name="over_time",
            preprocess=False,  # slider maxima are per run: a request for a longer run than the page's must pass
            trigger_mode="always_last",
            show_progress="hidden",
        )
        app.after_run(handler(show_run, {"plot": self.plot}), [app.session], [self.plot])
