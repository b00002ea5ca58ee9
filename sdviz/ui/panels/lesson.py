"""A guided lesson for a class: nine short pages that tell the story of the last run in order — tokens → vectors,
pure noise, the U-Net's noise prediction, guidance, the schedule, x0 sharpening, cross-attention, the VAE,
training — each with that run's own tensors and a button that opens the panel to explore it. API: /lesson."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import numpy as np
import torch
from PIL import Image

from ... import anatomy, render
from ...preview import latent_to_rgb
from ..session import Session, require, strongest_word
from ..wiring import App, drawn, handler
from . import noise, steps, text_encoder, words

TITLE, ID = "Lesson", "lesson"

INTRO = """**A lesson in nine pages**, told with your last run: every number and picture on a page is that run's
own. Generate an image (any prompt), then page through with **Next**; each page has a button that opens the
panel where you can explore that part yourself."""


@dataclass(frozen=True)
class Page:
    title: str
    panel: str  # the tab its button opens
    panel_title: str
    build: Callable  # (session) -> (Markdown text, picture or None)


def _tokens(run) -> str:
    return " · ".join(f"`{t.text}`" for t in run.tokens)


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _noise_preview(run, latent: torch.Tensor, size: int) -> Image.Image:
    """A latent [C, h, w] as a picture: through the run's latent → RGB map when it has one, else z[0:3] as RGB."""
    if run.info.latent_rgb is not None:
        small = Image.fromarray(latent_to_rgb(latent, torch.tensor(run.info.latent_rgb)).numpy())
        return small.resize((size, size * small.height // small.width), Image.NEAREST)
    return render.signed_rgb(latent.numpy(), render.signed_scale(latent), size)


# -- the pages, in the order of the story -----------------------------------------------------------------------
def tokens_page(session: Session):
    run, info = session.run, session.run.info
    d = info.text_dim or (run.prompt_embeds.shape[-1] if run.prompt_embeds is not None else "d")
    n = len(run.tokens)
    text = f"""Your prompt “{session.settings.prompt}” was cut into **{n} tokens** — {_tokens(run)} — a start token, the
pieces of your words, an end token. The rest of the **77 positions** is padding. The **text encoder** then turns
every position into a **vector of {d} numbers**, so the U-Net receives a table of **77 × {d} numbers** (the picture:
one row per position, one column per number, red positive, blue negative). It never sees your letters — only
these numbers."""
    has_vectors = run.prompt_embeds is not None and run.prompt_embeds.numel() > 0
    return text, render.to_image(render.embedding_figure(run)) if has_vectors else None


def noise_page(session: Session):
    run, info = session.run, session.run.info
    z = run.latents[0]
    c, h, w = z.shape
    H, W = run.image_size
    f = info.vae_scale_factor
    sigma = float(run.sigmas[0])
    scaled = f" (this scheduler starts from noise scaled up by σ = {sigma:.1f})" if info.sigma_space else ""
    text = f"""The picture starts as **random noise**, fixed by the seed ({session.seed}) — not in pixels, but in a
small **latent**: **{c} channels × {h} × {w}** numbers. Each latent pixel stands for {f}×{f} pixels of the {W}×{H}
image. Its {c * h * w:,} numbers have mean {float(z.mean()):.2f} and spread (standard deviation)
{float(z.std()):.2f}{scaled}: nothing in it yet. Top row: channels 0–2 as red, green, blue; below, each channel."""
    return text, render.to_image(render.tensor_grid({"x_t at step 1": z.numpy()}, label="latent value"))


def unet_page(session: Session):
    run, info = session.run, session.run.info
    a = anatomy.step_anatomy(run, 0)
    o = a.symbol
    predicted = a.text if a.cfg else a.guided
    corr = float(np.corrcoef(a.x_t.flatten().numpy(), predicted.flatten().numpy())[0, 1])
    what = {"epsilon": "the noise ε in it", "v_prediction": "v, a mix of its noise and its picture"}.get(
        info.prediction_type, "the clean latent"
    )
    text = f"""The **U-Net** gets the noisy latent x_t, the timestep (t = {a.timestep:.0f} at step 1) and the 77 text
vectors, and predicts **{what}**: a tensor of the same shape, [{", ".join(map(str, a.x_t.shape))}]. At step 1 x_t
is almost all noise, so the prediction looks almost like x_t itself (correlation {corr:.2f}). Subtract the predicted
noise and what is left is the U-Net's guess of the picture — the clean guess **x0** (right; blurry, because it is only
step 1 of {run.num_steps})."""
    parts = {"x_t (step 1)": a.x_t.numpy(), f"predicted {o}": predicted.numpy(), "x0 (clean guess)": a.x0.numpy()}
    return text, render.to_image(render.tensor_grid(parts, label="latent value"))


def guidance_page(session: Session):
    run = session.run
    middle = run.num_steps // 2
    a = anatomy.step_anatomy(run, middle)
    if not a.cfg:
        text = f"""**Guidance** was off in this run (scale {a.guidance_scale:g} ≤ 1): the U-Net ran once per step,
with the prompt. With a scale above 1 it runs twice per step — without and with the prompt — and pushes the result
further in the direction the prompt points. Set the guidance scale to e.g. 7.5, generate again and come back."""
        return text, None
    c, r, col = anatomy.telling_element(a)
    u, t = a.uncond[c, r, col].item(), a.text[c, r, col].item()
    s, n = a.guidance_scale, anatomy.formula_number
    share = anatomy.guidance_contribution(run)
    text = f"""With **guidance** the U-Net runs twice at every step: **without** the prompt (ε_uncond) and **with** it
(ε_text). The pipeline then takes ε = ε_uncond + s·(ε_text − ε_uncond), with the guidance scale s = **{s:g}**: start
from "no prompt" and go {s:g} times as far towards "prompt". One number at step {middle + 1}: {n(u)} + {s:g} × ({n(t)}
− {n(u)}) = **{n(u + s * (t - u), bracket=False)}**. The prompt on its own changes the prediction only a little —
{100 * share.min():.1f} % to {100 * share.max():.1f} % across the steps (the plot) — and guidance multiplies
that by {s:g}."""
    return text, render.to_image(render.guidance_plot(run, middle))


def schedule_page(session: Session):
    run = session.run
    keep, pull, explained = anatomy.step_anatomy(run, 0).mix()
    exact = "exactly" if explained > 0.999 else f"{100 * explained:.0f} % of it (this scheduler also uses more)"
    text = f"""The **scheduler** ({run.info.scheduler}) decides how much noise to remove at each step: {run.num_steps}
steps, the timestep t counting down from {float(run.timesteps[0]):.0f} to {float(run.timesteps[-1]):.0f}. ᾱ (alpha-bar)
is the share of the picture in the latent: {float(run.alpha_bars[0]):.3f} at the start, {float(run.alpha_bars[-1]):.3f}
at the last step. Each step mixes the noisy latent and the clean guess: at step 1, x_next = {keep:.3f}·x_t +
{pull:.3f}·x0 ({exact})."""
    return text, render.to_image(render.schedule_plot(run, 0))


def x0_page(session: Session):
    run = session.run
    x0 = run.x0.float()
    moves = [float((x0[i + 1] - x0[i]).norm() / x0[i + 1].norm().clamp_min(1e-12)) for i in range(len(x0) - 1)]
    change = (
        f"From step 1 to step 2 the guess changed by {_pct(moves[0])}; in the last step by {_pct(moves[-1])}."
        if moves
        else ""
    )
    text = f"""At every step the U-Net's noise prediction also gives a guess of the finished latent, **x0**. Early
guesses are vague blobs; the layout settles first and the details arrive last. {change} (Previews: the latent
mapped to colours by a fixed linear map, without the VAE.)"""
    picture = render.to_image(render.step_strip(run)) if run.info.latent_rgb is not None else None
    return text, picture


def attention_page(session: Session):
    run = session.run
    if not run.words:
        return "This run had an empty prompt, so no word steered the picture. Type a prompt and generate again.", None
    word = strongest_word(run)
    shares = run.word_shares().mean(0)
    share = float(shares[[w.text for w in run.words].index(word)])
    sides = sorted({f"{layer.height}×{layer.width}" for layer in run.layers}, key=lambda s: -int(s.split("×")[0]))
    text = f"""**Cross-attention** is how words reach places. In each of the U-Net's {len(run.layers)} cross-attention
layers (at {", ".join(sides)} latent pixels), every pixel shares out its attention over the text vectors: *which
words matter for me?* Over the whole run the word **“{word}”** got the largest share: {_pct(share)} of the attention
paid to words. Each map shows where one word was looked at (warm = much)."""
    words = list(dict.fromkeys(w.text for w in run.words))[:8]
    return text, render.to_image(render.word_grid(run, Image.fromarray(session.image), words=words))


def vae_page(session: Session):
    run = session.run
    z = run.final_latent if run.final_latent is not None else run.x0[-1]
    c, h, w = z.shape
    H, W = run.image_size
    ratio = 3 * H * W / (c * h * w)
    text = f"""The final latent — **{c} × {h} × {w} = {c * h * w:,} numbers** — goes through the **VAE decoder**, a
second network that turns it into the **{W} × {H} image with 3 colours = {3 * H * W:,} numbers**, {ratio:.0f} times
more. The U-Net did all its work in the small latent: that is what makes Stable Diffusion fast enough."""
    size = max(W, 128)
    pictures = {
        f"final latent z[0:3] ({h}×{w})": render.signed_rgb(z.numpy(), render.signed_scale(z), size),
        f"decoded image ({W}×{H})": Image.fromarray(session.image).resize((size, size * H // W), Image.NEAREST),
    }
    return text, render.to_image(render.side_by_side(pictures))


def training_page(session: Session):
    run = session.run
    z = (run.final_latent if run.final_latent is not None else run.x0[-1]).float()
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(session.seed))
    picks = sorted({int(i) for i in np.linspace(run.num_steps - 1, 0, min(4, run.num_steps)).round()})[::-1]
    pictures = {"z (your final latent)": _noise_preview(run, z, 128)}
    for i in picks:
        a = float(run.alpha_bars[i])
        x_t = a**0.5 * z + (1 - a) ** 0.5 * eps  # forward diffusion to step i's noise level
        pictures[f"ᾱ = {a:.2f} (t = {float(run.timesteps[i]):.0f})"] = _noise_preview(run, x_t, 128)
    text = f"""**Training** runs the story backwards. Take a real picture's latent z, draw noise ε, and mix them at a
random timestep: **x_t = √ᾱ·z + √(1−ᾱ)·ε**. Here your own final latent is noised to the noise levels of {len(picks)}
steps of this run. The U-Net gets x_t, t and the caption and must predict ε; the **loss** is the mean squared
difference between its answer and the true ε, and training nudges the weights to make it smaller — over millions of
captioned pictures. The **Noise an image** panel does one such example for real, with the loss."""
    title = "forward diffusion: the same latent, more and more noise"
    return text, render.to_image(render.side_by_side(pictures, title))


PAGES = [
    Page("1. Words become vectors", "vectors", text_encoder.TITLE, tokens_page),
    Page("2. A latent of pure noise", "steps", steps.TITLE, noise_page),
    Page("3. The U-Net predicts the noise", "steps", steps.TITLE, unet_page),
    Page("4. Guidance: with and without the prompt", "steps", steps.TITLE, guidance_page),
    Page("5. The scheduler and the schedule", "steps", steps.TITLE, schedule_page),
    Page("6. The clean guess x0 sharpens", "steps", steps.TITLE, x0_page),
    Page("7. Cross-attention: words → places", "words", words.TITLE, attention_page),
    Page("8. The VAE decodes the latent", "steps", steps.TITLE, vae_page),
    Page("9. Training: noise a picture, predict the noise", "noise", noise.TITLE, training_page),
]


# -- handlers ---------------------------------------------------------------------------------------
def _page_number(page) -> int:
    try:
        n = int(page)
    except (TypeError, ValueError):
        raise ValueError(f"page must be a number from 1 to {len(PAGES)}; got {page!r}") from None
    if not 1 <= n <= len(PAGES):
        raise ValueError(f"the lesson has pages 1–{len(PAGES)}; got {n}")
    return n


def lesson(page: float, session) -> dict:
    """Page `page` (1-based) of the lesson, told with the last run: its text, its picture and where to explore."""
    n = _page_number(page)
    session = require(session)
    p = PAGES[n - 1]
    text, picture = p.build(session)
    return {
        "text": f"### {p.title}\n\n{text}",
        "picture": gr.Image(value=picture, visible=picture is not None),
        "open": gr.Button(f"Explore this: open “{p.panel_title}” →"),
        "counter": f"Page **{n}** of {len(PAGES)}",
    }


def turn(page: float, by: int) -> dict:
    """The page number `by` pages on, within the lesson."""
    return {"page": gr.Slider(value=min(len(PAGES), max(1, _page_number(page) + by)))}


def open_panel(page: float) -> dict:
    """Switch to the tab where the page's subject can be explored."""
    panel = PAGES[_page_number(page) - 1].panel
    return {"tabs": gr.Tabs(selected=panel), "visible": panel}


def show_run(page: float, session) -> dict:
    return lesson(page, session)


class Panel:
    def __init__(self, app: App):
        gr.Markdown(INTRO, elem_classes="sdviz-explain")
        with gr.Row():
            self.back = gr.Button("◀ Back", size="sm", elem_id="sdviz-lesson-back", scale=1)
            self.page = gr.Slider(1, len(PAGES), value=1, step=1, label="Page", elem_id="sdviz-lesson-page", scale=4)
            self.next = gr.Button("Next ▶", size="sm", elem_id="sdviz-lesson-next", scale=1, variant="primary")
        self.counter = gr.Markdown(f"Page **1** of {len(PAGES)}", elem_id="sdviz-lesson-counter")
        self.text = gr.Markdown(
            "_Generate an image first: the lesson is told with your run._", elem_id="sdviz-lesson-text"
        )
        self.picture = drawn("sdviz-lesson-picture")
        self.open = gr.Button("Explore this →", elem_id="sdviz-lesson-open")

    def wire(self, app: App):
        out = {"text": self.text, "picture": self.picture, "open": self.open, "counter": self.counter}
        self.page.change(
            handler(lesson, out),
            [self.page, app.session],
            list(out.values()),
            api_name="lesson",
            trigger_mode="always_last",
            show_progress="hidden",
        )
        for button, by in ((self.back, -1), (self.next, 1)):
            button.click(handler(turn, {"page": self.page}, by=by), [self.page], [self.page], api_visibility="private")
        opened = self.open.click(
            handler(open_panel, {"tabs": app.tabs, "visible": app.visible}),
            [self.page],
            [app.tabs, app.visible],
            api_visibility="private",
        )
        app.refresh_on(opened)  # the panel it opens draws the current run if it hasn't yet
        app.after_run(handler(show_run, out), [self.page, app.session], list(out.values()))
