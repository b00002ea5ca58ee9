"""The composer: builds the page from its panels and shares the user's state between them.

Each panel is one module of `sdviz.ui.panels` (its components, its handlers, its wiring). To add one,
write the module (TITLE, ID and a `Panel(app)` with `wire(app)`) and add it to `TABS`.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import texts
from .models import Models
from .panels import (
    anatomy,
    compare,
    explain,
    generate,
    how,
    lesson,
    noise,
    over_time,
    self_attention,
    steps,
    text_encoder,
    words,
)
from .wiring import STATE_TTL_S, App, StopRequests

# The tabs under the controls, in order. `words` comes first: it owns the filters other tabs read.
TABS = [words, steps, over_time, compare, text_encoder, noise, lesson, self_attention, explain, how]
# Panels placed below another in its tab, reading its controls: {tab's module: [panel modules]}.
BELOW = {steps: [anatomy]}


def example_prompts(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def build_app(models: Models, examples: list[str] | None = None, queue_size: int = 16) -> gr.Blocks:
    # Sliders start with room for any run: API clients never receive the per-run maxima the page sets.
    most_steps = max(p.max_steps for p in models.choices.values()) + 1  # PNDM records one extra step
    with gr.Blocks(title="sdviz — see inside Stable Diffusion", analytics_enabled=False) as demo:
        app = App(
            models, gr.State(None, time_to_live=STATE_TTL_S), StopRequests(), most_steps, examples=list(examples or [])
        )
        gr.Markdown(texts.HEADER)
        panels = [(None, generate.Panel(app))]
        tabs = {}
        # Tabs wrap onto a second line rather than hide behind a menu (a class on a phone finds them all).
        with gr.Tabs(overflow_behavior="wrap") as app.tabs:
            for module in TABS:
                with gr.Tab(module.TITLE, id=module.ID) as tabs[module.ID]:
                    panels.append((module.ID, module.Panel(app)))
                    panels += [(module.ID, extra.Panel(app)) for extra in BELOW.get(module, [])]
        app.visible = gr.State(TABS[0].ID)
        for tab_id, panel in panels:  # the generate panel first: the others follow its runs
            app.wiring_tab = tab_id
            panel.wire(app)
        app.connect_refreshers(tabs)
    demo.queue(max_size=queue_size, default_concurrency_limit=2)
    return demo
