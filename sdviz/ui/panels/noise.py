"""Noise an image: forward diffusion and the training loss on any picture (an upload, the last generated image or
a random shapes-world scene). A timestep slider over 0–999 shows x_t, the true and the predicted noise, x0 and
the loss; "Loss against t" sweeps the timesteps for the caption, a wrong caption and no caption (Stop ends
it, keeping the points so far). API: /noise, /loss_curve."""

from __future__ import annotations

import contextlib
import random
import time

import gradio as gr
import numpy as np
from PIL import Image

from ... import noising, render
from ...generate import Cancelled
from ...toy import world
from .. import texts
from ..models import Models
from ..session import require
from ..streaming import Throttle, Worker
from ..wiring import PIPELINE, App, StopRequests, drawn, handler, pipeline_errors, wire_stop, zero_gpu

TITLE, ID = "Noise an image", "noise"
POINTS = 20  # timesteps in a loss sweep: one U-Net call each
PLOTS_PER_S = 1.0  # the loss plot is redrawn at most this often while a sweep runs

EXPLAIN = """**How Stable Diffusion is trained.** Take a picture, turn it into a latent z with the VAE's encoder, draw
random noise ε and mix the two at a timestep t: **x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε**, where ᾱ_t (“alpha-bar”) falls from
1 at t = 0 (all picture) to almost 0 at t = 999 (all noise). The U-Net gets x_t, t and the caption and must say
which noise was added. The **loss** is how far its answer is from the true ε (the mean of the squared
differences); training nudges the weights to make it smaller, over millions of pictures. Here you can do
one training example by hand, on any picture — nothing is trained, the model only answers."""

PICTURES = """From left to right: **the image** as the model gets it (cropped and resized to its size), **its
latent z** (the VAE's encoding; channels 0–2 as red, green, blue), **the noisy latent x_t**, what x_t looks like
**decoded** by the VAE, and the U-Net's **clean guess x0**, decoded. z and x_t share one colour scale."""

NOISE = """**The true noise ε** that was added, **the U-Net's prediction**, and the error between them, on one colour
scale: the loss is the mean of the error's squares. Right: how much of the image is left at each timestep."""

NEED_IMAGE = (
    "Pick an image first: upload one, press “Use the last generated image”, or press “Random shapes-world scene”."
)


def need_image(image) -> np.ndarray:
    if image is None:
        raise ValueError(NEED_IMAGE)
    return np.asarray(image)


def status(run) -> str:
    """What the numbers of this example are, in words."""
    t, a = float(run.timesteps[0]), float(run.alpha_bars[0])
    c, h, w = run.clean_latent.shape
    caption = f"the caption “{run.prompt}”" if run.prompt else "no caption"
    lines = [
        f"**t = {t:.0f}** · ᾱ_t = {a:.3f}, so x_t = √ᾱ·z + √(1−ᾱ)·ε = **{a**0.5:.3f}·z + {(1 - a) ** 0.5:.3f}·ε** · "
        f"signal-to-noise ᾱ/(1−ᾱ) = {a / max(1 - a, 1e-12):.3g}",
        f"**Training loss = {run.loss:.4f}** with {caption}: the mean of the squared differences between the "
        f"U-Net's answer and the truth, over all {c}×{h}×{w} = {c * h * w:,} numbers of the latent (0 would be a "
        f"perfect answer; guessing 0 everywhere would give about {float(run.training_target().square().mean()):.2f}).",
    ]
    if run.info.prediction_type == "v_prediction":
        lines.append(
            "This model predicts **v = √ᾱ·ε − √(1−ᾱ)·z** (v-prediction), so the loss compares its v with the true "
            "v; “predicted noise” is the ε its v stands for."
        )
    elif run.info.prediction_type == "sample":
        lines.append("This model predicts the clean latent z itself; the loss compares its z with the true z.")
    return "\n\n".join(lines)


# -- handlers ---------------------------------------------------------------------------------------
def scene() -> dict:
    """A random scene of the built-in model's shapes world, its caption, and another scene's as a wrong caption."""
    seed = random.SystemRandom().randrange(1_000_000)
    picked, other = world.sample_scenes(2, seed=seed)
    while other.caption == picked.caption:
        other = world.sample_scenes(1, seed=seed + 1)[0]
    return {"image": picked.image, "caption": picked.caption, "wrong_caption": other.caption}


def last_image(session) -> dict:
    """The last generated image and its prompt as the caption."""
    session = require(session)
    return {"image": session.image, "caption": session.settings.prompt}


@zero_gpu
def noise(image, caption: str, timestep: float, seed: float, model: str, *, models: Models) -> dict:
    """One training example: the image noised to `timestep`, the U-Net's prediction for `caption`, the loss."""
    picture = need_image(image)
    noise_seed = int(seed or 0)
    with pipeline_errors(model, "the timestep slider"), models.using(model) as pipe:
        run = noising.noise_image(pipe, picture, caption or "", timestep, seed=noise_seed)
        fitted = noising.fit_image(pipe, picture)
        xt_decoded, x0_decoded = run.decode(0, pipe.vae, "xt"), run.decode(0, pipe.vae, "x0")
    scale = render.signed_scale(run.clean_latent, run.latents[0])
    side = max(run.latent_size[1] * 8, 128)
    return {
        "status": status(run),
        "fitted": fitted,
        "z": render.signed_rgb(run.clean_latent.numpy(), scale, side),
        "xt": render.signed_rgb(run.latents[0].numpy(), scale, side),
        "xt_decoded": Image.fromarray(xt_decoded),
        "x0_decoded": Image.fromarray(x0_decoded),
        "noise_figure": render.to_image(render.noise_comparison(run)),
        "schedule": render.to_image(render.forward_schedule(run, int(run.timesteps[0]))),
    }


def verdict(points: list, labels: list[str], stopped: bool) -> str:
    """The sweep in one sentence per caption: the mean loss over the timesteps swept."""
    if not points:
        return "Stopped before the first timestep."
    means = np.mean([p.losses for p in points], axis=0)
    parts = [f"{label}: **{m:.4f}**" for label, m in zip(labels, means)]
    best = labels[int(np.argmin(means))]
    head = f"Stopped after {len(points)} of {points[0].total} timesteps. " if stopped else ""
    if best == "the caption":
        why = "the text that says what the picture shows helps the U-Net tell picture from noise"
    else:
        why = (
            "the caption did not help here: does it say what this picture shows, in words the model was trained "
            "on? (The built-in model knows only its shapes-world words.)"
        )
    return f"{head}Mean loss over {len(points)} timesteps — " + " · ".join(parts) + f". Lowest: **{best}** ({why})."


@zero_gpu
def loss_curve(
    image,
    caption: str,
    wrong_caption: str,
    seed: float,
    timestep: float,
    model: str,
    request: gr.Request,
    *,
    models: Models,
    stops: StopRequests,
):
    """Stream the image's loss against t for the caption, a wrong caption and no caption (Stop keeps the points)."""
    picture = need_image(image)
    prompts = {"the caption": caption or "", "a wrong caption": wrong_caption or "", "no caption": ""}
    if not prompts["a wrong caption"].strip() or prompts["a wrong caption"] == prompts["the caption"]:
        del prompts["a wrong caption"]
    labels = list(prompts)
    last = int(models.pipeline(model).scheduler.config.num_train_timesteps) - 1
    timesteps = noising.sweep_timesteps(POINTS, last)
    hash_ = getattr(request, "session_hash", None)
    flag = stops.start(hash_)
    points, stopped, start = [], False, time.perf_counter()

    def job(pipe, report):
        sweep = noising.loss_sweep(pipe, picture, list(prompts.values()), timesteps, int(seed or 0))
        with contextlib.closing(sweep):  # a Stop mid-sweep gives the pipeline's scheduler back at once
            for point in sweep:
                report(point)

    def update(message: str) -> dict:
        plot = render.to_image(render.loss_plot(points, labels, int(timestep))) if points else None
        return {"progress": texts.progress_html(len(points), len(timesteps), time.perf_counter() - start, message),
                "loss_plot": plot}  # fmt: skip

    yield update(f"Starting: {len(timesteps)} timesteps × {len(labels)} captions, one U-Net call per timestep…")
    plots = Throttle(PLOTS_PER_S)
    try:
        with pipeline_errors(model, "Loss against t"), Worker(models, model, job, flag) as worker:
            try:
                for item in worker.items(0.5):
                    if item is None:
                        continue
                    points.append(item)
                    if plots.due(time.perf_counter()) and len(points) < len(timesteps):
                        yield update(f"t = {item.timestep} · {len(points)} / {len(timesteps)} timesteps")
            except Cancelled:
                if not worker.stopped_by_user:
                    raise
                stopped = True
    finally:
        stops.finish(hash_, flag)
    done = f"Stopped at {len(points)} / {len(timesteps)}" if stopped else f"Done: {len(points)} timesteps"
    yield {**update(f"{done} in {time.perf_counter() - start:.1f} s"), "verdict": verdict(points, labels, stopped)}


# -- layout and wiring ------------------------------------------------------------------------------
class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")

        def picture(label, elem_id):
            return gr.Image(label=label, interactive=False, elem_id=elem_id, elem_classes="sdviz-fill", format="png",
                            height=170, min_width=110)  # fmt: skip

        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                self.image = gr.Image(
                    label="Your image",
                    type="numpy",
                    image_mode="RGB",
                    sources=["upload", "clipboard"],
                    elem_id="sdviz-noise-image",
                    height=240,
                )
                with gr.Row():
                    self.scene = gr.Button("Random shapes-world scene", size="sm", elem_id="sdviz-noise-scene")
                    self.last = gr.Button("Use the last generated image", size="sm", elem_id="sdviz-noise-last")
                self.caption = gr.Textbox(label="Caption (the text the U-Net gets)", elem_id="sdviz-noise-caption")
                self.wrong = gr.Textbox(
                    label="A wrong caption (for the loss curve)", elem_id="sdviz-noise-wrong", value="a blue square"
                )
                self.timestep = gr.Slider(0, 999, value=500, step=1, label="Timestep t", elem_id="sdviz-noise-t")
                self.seed = gr.Number(0, precision=0, label="Noise seed", minimum=0)
            with gr.Column(scale=5):
                self.status = gr.Markdown("_Pick an image to noise it._", elem_id="sdviz-noise-status")
                gr.Markdown(PICTURES, elem_classes="sdviz-explain")
                with gr.Row():
                    self.fitted = picture("Image", "sdviz-noise-fitted")
                    self.z = picture("Latent z", "sdviz-noise-z")
                    self.xt = picture("Noisy x_t", "sdviz-noise-xt")
                    self.xt_decoded = picture("x_t decoded", "sdviz-noise-xt-decoded")
                    self.x0_decoded = picture("x0 decoded", "sdviz-noise-x0")
                gr.Markdown(NOISE, elem_classes="sdviz-explain")
                with gr.Row():
                    self.noise_figure = drawn("sdviz-noise-cmp", scale=3)
                    self.schedule = drawn("sdviz-noise-schedule", scale=4)
        with gr.Row():
            self.sweep = gr.Button(
                f"Loss against t ({POINTS} timesteps, one U-Net call each)", variant="primary",
                elem_id="sdviz-noise-sweep",
            )  # fmt: skip
            self.stop = gr.Button("Stop", variant="stop", elem_id="sdviz-noise-stop")
        self.progress = gr.HTML(texts.progress_html(0, 1, 0, "Ready"), elem_id="sdviz-noise-progress")
        self.verdict = gr.Markdown(elem_id="sdviz-noise-verdict")
        self.loss_plot = drawn("sdviz-noise-loss")

    def wire(self, app: App):
        out = {
            "status": self.status,
            "fitted": self.fitted,
            "z": self.z,
            "xt": self.xt,
            "xt_decoded": self.xt_decoded,
            "x0_decoded": self.x0_decoded,
            "noise_figure": self.noise_figure,
            "schedule": self.schedule,
        }
        inputs = [self.image, self.caption, self.timestep, self.seed, app.form.model]
        show = handler(noise, out, models=app.models)
        kwargs = dict(concurrency_id=PIPELINE, concurrency_limit=1, show_progress="hidden")
        gr.on(
            [self.image.upload, self.timestep.input, self.caption.submit, self.caption.blur, self.seed.input],
            show,
            inputs,
            list(out.values()),
            api_name="noise",
            trigger_mode="always_last",
            **kwargs,
        )
        # The two buttons put an image in the box, then noise it (a cleared box stays quiet).
        picked = {"image": self.image, "caption": self.caption, "wrong_caption": self.wrong}
        self.scene.click(
            handler(scene, picked), None, list(picked.values()), api_name="noise_scene", api_visibility="private"
        ).success(show, inputs, list(out.values()), api_visibility="private", **kwargs)
        last = {"image": self.image, "caption": self.caption}
        self.last.click(
            handler(last_image, last), [app.session], list(last.values()), api_visibility="private"
        ).success(show, inputs, list(out.values()), api_visibility="private", **kwargs)
        sweep_out = {"progress": self.progress, "loss_plot": self.loss_plot, "verdict": self.verdict}
        self.sweep.click(
            handler(loss_curve, sweep_out, models=app.models, stops=app.stops),
            [self.image, self.caption, self.wrong, self.seed, self.timestep, app.form.model],
            list(sweep_out.values()),
            api_name="loss_curve",
            concurrency_id=PIPELINE,
            concurrency_limit=1,
            show_progress="hidden",
        )
        wire_stop(self.stop, self.progress, app.stops, "Stopping after this timestep…")
