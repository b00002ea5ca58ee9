"""Step by step: a step slider with Play (at a chosen speed), that step's x_t and x0 as pictures, the
exact VAE decode, its latent z as RGB and per channel, the noise schedule with the step marked, and
optionally the heatmap of that step alone. API: /step, /decode."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ... import render
from ... import settings as check
from ...preview import Previewer
from ..models import Models
from ..session import Session, filters_from_form, heatmap_image, require
from ..wiring import App, drawn, handler, zero_gpu

TITLE, ID = "Steps", "steps"
SPEEDS = [("slow (1.5 s a step)", 1.5), ("normal (0.7 s)", 0.7), ("fast (0.3 s)", 0.3)]

EXPLAIN = """**Step by step.** At each step the U-Net predicts the noise; from that the scheduler computes
**x0**, its current guess of the clean latent, and removes part of the noise from **x_t** to get the next,
less noisy latent. The pictures say how they were drawn: the model's own VAE when that is cheap (the
built-in model), else a fast approximation; **Exact decode** runs the VAE for this step's x0 (cached)."""

SCHEDULE = """**The noise schedule.** The timestep t counts down from 1000 to 0. σ is the noise level (log
scale); ᾱ (“alpha-bar”) is the share of the original signal's variance left in x_t. The dashed line is the
selected step."""


# -- handlers ---------------------------------------------------------------------------------------
def latents_text(run) -> str:
    """What the latent is, with this run's numbers (the built-in model downsamples by 4, SD by 8)."""
    c = int(run.latents.shape[1]) if run.latents.ndim == 4 else 4
    (h, w), f = run.latent_size, run.info.vae_scale_factor
    return (
        f"**The latent.** The model works on a small latent image: **{c} channels of {h}×{w}**, 1/{f} of the "
        f"image's width and height (the VAE turns each latent pixel into {f}×{f} image pixels). Left: channels "
        f"z[0:3] shown as red, green, blue (each stretched to its own range). Right: all {c} channels in grey, "
        "z[0] first."
    )


def step_view(session: Session, step: int, previewer: Previewer | None = None) -> dict:
    """Everything the step scrubber shows for `step` (1-based): pictures, decode if cached, latents, schedule."""
    run = session.run
    if not 1 <= step <= run.num_steps:
        raise ValueError(f"step {step} is out of range: this run has steps 1–{run.num_steps}")
    i = step - 1
    width = max(run.image_size[1], 192)
    size = max(run.latent_size[1] * 8, 96)
    decoded = run.decoded.get(f"x0/{i}")
    latent = run.latent(i, "xt").numpy()  # [C, h, w]
    chart = session.cache.get("schedule")
    how = previewer.label if previewer is not None else "fast linear preview"
    return {
        "caption": caption(run, i),
        "xt": gr.Image(render.preview(run, i, "xt", width, previewer), label=f"x_t: noisy latent in ({how})"),
        "x0": gr.Image(render.preview(run, i, "x0", width, previewer), label=f"x0: guess of the clean image ({how})"),
        "decoded": None if decoded is None else Image.fromarray(decoded),
        "z_rgb": render.latent_rgb(latent, size),
        "z_channels": render.latent_channels(latent, size),
        "schedule": chart.at(i) if chart is not None else render.to_image(render.schedule_plot(run, i)),
        "latents_text": latents_text(run),
    }


def caption(run, i: int) -> str:
    sigma, alpha_bar = float(run.sigmas[i]), float(run.alpha_bars[i])
    signal = 100 * alpha_bar**0.5 / (alpha_bar**0.5 + (1 - alpha_bar) ** 0.5)
    text = (
        f"**Step {i + 1} of {run.num_steps}** · timestep t = {float(run.timesteps[i]):.0f} · "
        f"noise σ = {sigma:.3f} · signal ᾱ = {alpha_bar:.3f} "
        f"(x_t ≈ √ᾱ·x0 + √(1−ᾱ)·noise: {signal:.0f}% signal by amplitude)"
    )
    asked = run.info.requested_steps
    if asked and asked != run.num_steps and run.info.complete:
        text += (
            f"  \n_{run.num_steps} steps were recorded for the {asked} asked: {run.info.scheduler} calls the U-Net "
            f"{run.num_steps - asked} more time(s) than the steps you asked for (PNDM warms up with extra steps)._"
        )
    return text


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
    *,
    models: Models,
) -> dict:
    """The panels of one step (1-based); with `follow`, also the word's heatmap of that step alone."""
    session = require(session)
    n = check.whole_number(step, "step")
    out = step_view(session, n, models.previewer(session.model))
    image = None
    if follow and word:
        filters = filters_from_form(session.run, from_step, to_step, blocks, resolutions, layers, head)
        image = heatmap_image(session, word, negative, filters, opacity, colormap, step=n - 1)
    return {**out, "step_heat": gr.Image(value=image, visible=image is not None)}


@zero_gpu
def decode(step: float, session, *, models: Models) -> dict:
    """The exact VAE decode of the step's x0 (cached in the trace, so a step is decoded once). The VAE
    is only read (no trace hooks it), so this doesn't wait for someone else's run."""
    session = require(session)
    n = check.whole_number(step, "step")
    session.run.step_indices(n - 1)  # a step outside the run says so
    if session.model is None:
        raise ValueError("this trace was opened from a file and its model isn't on this server: it can't be decoded")
    session.run.decode(n - 1, models.pipeline(session.model).vae, "x0")
    return {"decoded": step_view(session, n, models.previewer(session.model))["decoded"], "session": session}


def play(label: str, speed: float, session) -> dict:
    require(session)
    playing = label.startswith("▶")
    return {
        "timer": gr.Timer(value=float(speed), active=playing),
        "play": gr.Button("⏸ Pause" if playing else "▶ Play"),
    }


def set_speed(speed: float) -> dict:
    return {"timer": gr.Timer(value=float(speed))}


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
    *,
    models: Models,
) -> dict:
    """One tick of Play: the next step (wrapping round), or stop playing when there is no run."""
    if session is None:
        return {"timer": gr.Timer(active=False), "play": gr.Button("▶ Play")}
    nxt = check.whole_number(step, "step") % session.run.num_steps + 1
    view = (follow, word, negative, opacity, colormap, from_step, to_step, blocks, resolutions, layers, head)
    return {"step": gr.Slider(value=nxt), **show_step(nxt, *view, session, models=models)}


STRIP = 16  # at most this many steps in the strip of x0 pictures


def strip(session: Session, previewer: Previewer) -> tuple[Image.Image, str]:
    """x0 at up to STRIP evenly spaced steps, drawn by `previewer` (decodes cached in the trace), and a caption."""
    run = session.run
    picture = render.to_image(render.step_strip(run, count=STRIP, size=96, previewer=previewer))
    shown = "every step" if run.num_steps <= STRIP else f"{STRIP} of the {run.num_steps} steps"
    return picture, f"**x0 from noise to picture** — {shown}, {previewer.label}"


def show_run(session, *, models: Models) -> dict:
    """After a new run: the slider spans its steps, the schedule chart is drawn once, the last step shows,
    and the strip of x0 pictures."""
    session = require(session)
    n = session.run.num_steps
    session.cache["schedule"] = render.schedule_chart(session.run)
    draw = models.previewer(session.model)
    picture, caption = strip(session, draw)
    return {
        "step": gr.Slider(maximum=n, value=n),
        **step_view(session, n, draw),
        "step_heat": gr.Image(value=None, visible=False),
        "strip": picture,
        "strip_caption": caption,
        "session": session,
    }


# -- layout and wiring ------------------------------------------------------------------------------
class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")
        steps = app.models.preset(app.models.default).steps
        with gr.Row():
            self.step = gr.Slider(1, steps, value=1, step=1, label="Step", scale=5, elem_id="sdviz-step")
            self.play = gr.Button("▶ Play", size="sm", scale=1, elem_id="sdviz-play")
            self.speed = gr.Dropdown(
                SPEEDS, value=0.7, label="Play speed", scale=1, min_width=120, elem_id="sdviz-speed"
            )
            self.decode = gr.Button("Exact decode (VAE)", size="sm", scale=1, elem_id="sdviz-decode")
            self.follow = gr.Checkbox(False, label="Heatmap follows this step", scale=1)
        self.timer = gr.Timer(0.7, active=False)
        self.caption = gr.Markdown(elem_id="sdviz-step-caption")

        def picture(label, elem_id, **kw):
            return gr.Image(label=label, interactive=False, elem_id=elem_id, elem_classes="sdviz-fill", **kw)

        with gr.Row():
            self.xt = picture("x_t: noisy latent in", "sdviz-xt", height=260)
            self.x0 = picture("x0: guess of the clean image", "sdviz-x0", height=260)
            self.decoded = picture("x0, exact VAE decode", "sdviz-decoded", height=260)
            self.step_heat = picture("Heatmap at this step", "sdviz-step-heat", height=260, visible=False)
        self.latents_text = gr.Markdown(
            "**The latent.** Generate an image to see its latent here.",
            elem_classes="sdviz-explain",
            elem_id="sdviz-latents-text",
        )
        with gr.Row():
            self.z_rgb = picture("z[0:3] as RGB", "sdviz-zrgb", height=220, format="png")
            self.z_channels = picture("every channel of z, in grey", "sdviz-zchannels", height=220, format="png")
        self.strip_caption = gr.Markdown("**x0 from noise to picture**", elem_classes="sdviz-caption")
        self.strip = drawn("sdviz-strip", "x0 at every step", buttons=["download", "fullscreen"])
        gr.Markdown(SCHEDULE, elem_classes="sdviz-explain")
        self.schedule = gr.Image(label="Noise schedule", interactive=False, elem_id="sdviz-schedule", format="png")
        app.step = self.step  # panels placed below this one follow the slider

    def outputs(self) -> dict:
        names = ["caption", "xt", "x0", "decoded", "z_rgb", "z_channels", "schedule", "step_heat", "latents_text"]
        return {name: getattr(self, name) for name in names}

    def wire(self, app: App):
        models, out = app.models, self.outputs()
        inputs = [self.step, self.follow, app.word, *app.view.inputs(), app.session]
        gr.on(
            [self.step.input, self.follow.input],
            handler(show_step, out, models=models),
            inputs,
            list(out.values()),
            api_name="step",
            preprocess=False,  # the word chips' choices are per session: a fresh session must hear "generate first"
            trigger_mode="always_last",
            show_progress="hidden",
        )
        play_out = {"timer": self.timer, "play": self.play}
        self.play.click(
            handler(play, play_out),
            [self.play, self.speed, app.session],
            list(play_out.values()),
            api_visibility="private",
        )
        self.speed.input(handler(set_speed, {"timer": self.timer}), self.speed, self.timer, api_visibility="private")
        tick_out = {"timer": self.timer, "play": self.play, "step": self.step, **out}
        self.timer.tick(
            handler(tick, tick_out, models=models),
            inputs,
            list(tick_out.values()),
            api_visibility="private",
            preprocess=False,
            show_progress="hidden",
            trigger_mode="always_last",
        )
        decode_out = {"decoded": self.decoded, "session": app.session}
        self.decode.click(
            handler(decode, decode_out, models=models),
            [self.step, app.session],
            list(decode_out.values()),
            api_name="decode",
            preprocess=False,
        )
        run_out = {
            "step": self.step,
            **out,
            "strip": self.strip,
            "strip_caption": self.strip_caption,
            "session": app.session,
        }
        app.after_run(handler(show_run, run_out, models=models), [app.session], list(run_out.values()))
