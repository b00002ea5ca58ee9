"""Inside one step, below the step slider: the U-Net's two predictions, what the prompt adds, guidance and the
formula of the step filled in with its own numbers, and over all steps how much the text matters. API: /anatomy."""

from __future__ import annotations

import gradio as gr

from ... import anatomy as take_apart
from ... import render
from ... import settings as check
from ..session import require
from ..wiring import App, drawn, handler

TITLE, ID = "Inside the step", "steps"  # lives in the step-by-step tab

EXPLAIN = """### Inside this step: the noise the U-Net predicts, and guidance
The U-Net looks at the noisy latent **x_t** and predicts the **noise** in it. With guidance it does this
twice — once **without** the prompt (ε_uncond) and once **with** it (ε_text) — and the pipeline pushes the
prediction further in the direction the prompt points: **ε = ε_uncond + s·(ε_text − ε_uncond)**, s being the
guidance scale. From ε the scheduler computes the clean guess **x0** and the next, less noisy latent.
The pictures: this step's tensors from x_t (in) to the next latent (out), every one on the same colour scale
(white = 0, red positive, blue negative), so you can see how small the prompt's change is before guidance
multiplies it; then, over all steps, how much the prompt changes the prediction."""

NO_GUIDANCE = """_Guidance was off in this run (scale ≤ 1): the U-Net ran once per step, with the prompt, so there
is no prediction without it to compare. Set the guidance scale above 1 and generate again to see both._"""


def anatomy(step: float, session) -> dict:
    """Step `step` (1-based) taken apart: the formula with this step's numbers, its pictures, and the guidance plot."""
    session = require(session)
    run = session.run
    n = check.whole_number(step, "step")
    if not 1 <= n <= run.num_steps:
        raise ValueError(f"step {n} is out of range: this run has steps 1–{run.num_steps}")
    parts = take_apart.step_anatomy(run, n - 1)
    guidance = render.to_image(render.guidance_plot(run, n - 1)) if parts.cfg else None
    return {
        "formula": take_apart.explain(parts),
        "figure": render.to_image(render.step_anatomy(run, n - 1)),
        "guidance": gr.Image(value=guidance, visible=guidance is not None),
        "no_guidance": gr.Markdown(visible=not parts.cfg),
    }


def show_run(session) -> dict:
    return anatomy(require(session).run.num_steps, session)


class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain", elem_id="sdviz-anatomy-explain")
        self.formula = gr.Markdown(elem_id="sdviz-anatomy-formula")
        self.figure = drawn("sdviz-anatomy", buttons=["download", "fullscreen"])
        self.no_guidance = gr.Markdown(NO_GUIDANCE, visible=False)
        self.guidance = drawn("sdviz-guidance")

    def outputs(self) -> dict:
        return {
            "formula": self.formula,
            "figure": self.figure,
            "guidance": self.guidance,
            "no_guidance": self.no_guidance,
        }

    def wire(self, app: App):
        out = self.outputs()
        # `change`: a drag, Play and a new run all move the slider; the API takes the step as a number.
        app.step.change(
            handler(anatomy, out),
            [app.step, app.session],
            list(out.values()),
            api_name="anatomy",
            trigger_mode="always_last",
            show_progress="hidden",
        )
        app.after_run(handler(show_run, out), [app.session], list(out.values()))
