"""Step by step: a step slider with Play, that step's x_t and x0 (fast preview and exact VAE decode),
its latent z as RGB and per channel, the noise schedule with the step marked, and optionally the
heatmap of that step alone. API: /step, /decode."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ... import render
from ... import settings as check
from ..models import Models
from ..session import Session, filters_from_form, heatmap_image, require
from ..wiring import PIPELINE, App, handler, zero_gpu

TITLE, ID = "Step by step", "steps"
PLAY_S = 0.7  # seconds per step while playing

EXPLAIN = """**Step by step.** At each step the U-Net predicts the noise; from that the scheduler computes
**x0**, its current guess of the clean latent, and removes part of the noise from **x_t** to get the next,
less noisy latent. The previews map the latent to colours with a fixed linear map (instant, approximate);
**Exact decode** runs the VAE decoder for this step's x0 (slower, cached)."""

LATENTS = """**The latent.** Stable Diffusion works on a small latent image: 4 channels at 1/8 of the width and
height. Left: channels z[0:3] shown as red, green, blue (each stretched to its own range). Right: all
channels in greyscale, z[0] first."""

SCHEDULE = """**The noise schedule.** The timestep t counts down from 1000 to 0. σ is the noise level (log
scale); ᾱ (“alpha-bar”) is the share of the original signal's variance left in x_t. The dashed line is the
selected step."""


# -- handlers ---------------------------------------------------------------------------------------
def step_view(session: Session, step: int) -> dict:
    """Everything the step scrubber shows for `step` (1-based): previews, decode if cached, latents, schedule."""
    run = session.run
    if not 1 <= step <= run.num_steps:
        raise ValueError(f"step {step} is out of range: this run has steps 1–{run.num_steps}")
    i = step - 1
    width = max(run.image_size[1], 192)
    size = max(run.latent_size[1] * 8, 96)
    decoded = run.decoded.get(f"x0/{i}")
    latent = run.latent(i, "xt").numpy()  # [C, h, w]
    return {
        "caption": caption(run, i),
        "xt": render.preview(run, i, "xt", width),
        "x0": render.preview(run, i, "x0", width),
        "decoded": None if decoded is None else Image.fromarray(decoded),
        "z_rgb": render.latent_rgb(latent, size),
        "z_channels": render.latent_channels(latent, size),
        "schedule": render.to_image(render.schedule_plot(run, i)),
    }


def caption(run, i: int) -> str:
    sigma, alpha_bar = float(run.sigmas[i]), float(run.alpha_bars[i])
    signal = 100 * alpha_bar**0.5 / (alpha_bar**0.5 + (1 - alpha_bar) ** 0.5)
    return (
        f"**Step {i + 1} of {run.num_steps}** · timestep t = {float(run.timesteps[i]):.0f} · "
        f"noise σ = {sigma:.3f} · signal ᾱ = {alpha_bar:.3f} "
        f"(x_t ≈ √ᾱ·x0 + √(1−ᾱ)·noise: {signal:.0f}% signal by amplitude)"
    )


def show_step(
    step: float,
    follow: bool,
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
) -> dict:
    """The panels of one step (1-based); with `follow`, also the word's heatmap of that step alone."""
    session = require(session)
    n = check.whole_number(step, "step")
    out = step_view(session, n)
    image = None
    if follow and word:
        filters = filters_from_form(session.run, from_step, to_step, blocks, resolutions, layers, head)
        image = heatmap_image(session, word, negative, filters, opacity, colormap, step=n - 1)
    return {**out, "step_heat": gr.Image(value=image, visible=image is not None)}


@zero_gpu
def decode(step: float, session, *, models: Models) -> dict:
    """The exact VAE decode of the step's x0 (cached in the trace, so a step is decoded once)."""
    session = require(session)
    with models.using(session.model) as pipe:
        session.run.decode(int(step) - 1, pipe.vae, "x0")
    return {"decoded": step_view(session, int(step))["decoded"], "session": session}


def play(label: str, session) -> dict:
    require(session)
    playing = label.startswith("▶")
    return {"timer": gr.Timer(active=playing), "play": gr.Button("⏸ Pause" if playing else "▶ Play")}


def tick(
    step: float,
    follow: bool,
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
) -> dict:
    """One tick of Play: the next step (wrapping round), or stop playing when there is no run."""
    if session is None:
        return {"timer": gr.Timer(active=False), "play": gr.Button("▶ Play")}
    nxt = check.whole_number(step, "step") % session.run.num_steps + 1
    view = (follow, word, negative, opacity, colormap, from_step, to_step, blocks, resolutions, layers, head)
    return {"step": gr.Slider(value=nxt), **show_step(nxt, *view, session)}


def show_run(session) -> dict:
    session = require(session)
    n = session.run.num_steps
    return {
        "step": gr.Slider(maximum=n, value=n),
        **step_view(session, n),
        "step_heat": gr.Image(value=None, visible=False),
    }


# -- layout and wiring ------------------------------------------------------------------------------
class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")
        with gr.Row():
            self.step = gr.Slider(1, app.most_steps, value=1, step=1, label="Step", scale=5, elem_id="sdviz-step")
            self.play = gr.Button("▶ Play", size="sm", scale=1, elem_id="sdviz-play")
            self.decode = gr.Button("Exact decode (VAE)", size="sm", scale=1, elem_id="sdviz-decode")
            self.follow = gr.Checkbox(False, label="Heatmap follows this step", scale=1)
        self.timer = gr.Timer(PLAY_S, active=False)
        self.caption = gr.Markdown(elem_id="sdviz-step-caption")

        def picture(label, elem_id, **kw):
            return gr.Image(label=label, interactive=False, elem_id=elem_id, elem_classes="sdviz-fill", **kw)

        with gr.Row():
            self.xt = picture("x_t: noisy latent in", "sdviz-xt", height=260)
            self.x0 = picture("x0: guess of the clean image", "sdviz-x0", height=260)
            self.decoded = picture("x0, exact VAE decode", "sdviz-decoded", height=260)
            self.step_heat = picture("Heatmap at this step", "sdviz-step-heat", height=260, visible=False)
        gr.Markdown(LATENTS, elem_classes="sdviz-explain")
        with gr.Row():
            self.z_rgb = picture("z[0:3] as RGB", "sdviz-zrgb", height=220, format="png")
            self.z_channels = picture("channels z[0] … z[3]", "sdviz-zchannels", height=220, format="png")
        gr.Markdown(SCHEDULE, elem_classes="sdviz-explain")
        self.schedule = gr.Image(label="Noise schedule", interactive=False, elem_id="sdviz-schedule", format="png")
        app.step = self.step  # panels placed below this one follow the slider

    def outputs(self) -> dict:
        return {
            "caption": self.caption,
            "xt": self.xt,
            "x0": self.x0,
            "decoded": self.decoded,
            "z_rgb": self.z_rgb,
            "z_channels": self.z_channels,
            "schedule": self.schedule,
            "step_heat": self.step_heat,
        }

    def wire(self, app: App):
        out = self.outputs()
        inputs = [self.step, self.follow, app.word, *app.view.inputs(), app.session]
        gr.on(
            [self.step.input, self.follow.input],
            handler(show_step, out),
            inputs,
            list(out.values()),
            api_name="step",
            preprocess=False,  # the word chips' choices are per session: a fresh session must hear "generate first"
            trigger_mode="always_last",
            show_progress="hidden",
        )
        self.play.click(
            handler(play, {"timer": self.timer, "play": self.play}),
            [self.play, app.session],
            [self.timer, self.play],
            api_visibility="private",
        )
        tick_out = {"timer": self.timer, "play": self.play, "step": self.step, **out}
        self.timer.tick(
            handler(tick, tick_out),
            inputs,
            list(tick_out.values()),
            api_visibility="private",
            preprocess=False,
            show_progress="hidden",
            trigger_mode="always_last",
        )
        decode_out = {"decoded": self.decoded, "session": app.session}
        self.decode.click(
            handler(decode, decode_out, models=app.models),
            [self.step, app.session],
            list(decode_out.values()),
            api_name="decode",
            concurrency_id=PIPELINE,
            concurrency_limit=1,
        )
        run_out = {"step": self.step, **out}
        app.after_run(handler(show_run, run_out), [app.session], list(run_out.values()))
