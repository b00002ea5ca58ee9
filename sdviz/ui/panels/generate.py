"""The controls and the run: the form, Generate / Stop, the live preview, the final image, the tokens
the text encoder saw, notes about the run and its downloads. API: /generate, /downloads."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from ... import render, report
from ...loading import TOY_MODEL_DIR
from ...settings import SCHEDULERS
from .. import texts
from ..inputs import max_side, notes_before, settings_from_form
from ..models import Models
from ..session import Session, filters_from_form, heatmap_image, require
from ..streaming import PREVIEW_WIDTH, Done, Stopped, generate_streaming
from ..wiring import PIPELINE, STATE_TTL_S, App, Form, StopRequests, handler, pipeline_errors, zero_gpu

EXPLAIN = """**What Generate does.** The text encoder turns your prompt into 77 token vectors. Starting from
random noise (fixed by the seed), the U-Net predicts the noise in the latent at every step and the
scheduler removes part of it. The VAE turns the final latent into pixels."""

TOKENS_LABEL = "What the text encoder saw (tokens; orange = piece of a longer word, red = cut off past 77 tokens)"


# -- handlers ---------------------------------------------------------------------------------------
def apply_preset(model: str, *, models: Models) -> dict:
    """The form's defaults and limits for `model`, and what to type for it."""
    preset = models.preset(model) if model in models.choices else models.preset(models.default)
    side = max_side(preset.size)
    return {
        "steps": gr.Slider(maximum=preset.max_steps, value=preset.steps),
        "guidance": gr.Slider(value=preset.guidance),
        "width": gr.Slider(maximum=side, value=preset.size),
        "height": gr.Slider(maximum=side, value=preset.size),
        "scheduler": gr.Dropdown(value=preset.scheduler),
        "model_note": model_note(preset),
    }


@zero_gpu
def generate(
    model: str,
    prompt: str,
    negative_prompt: str,
    scheduler: str,
    steps: float,
    guidance: float,
    seed: str,
    random_seed: bool,
    width: float,
    height: float,
    keep_heads: bool,
    session,
    request: gr.Request,
    keep_queries: bool = True,
    self_attention: bool = True,
    *,
    models: Models,
    stops: StopRequests,
):
    """Stream one traced generation: progress and previews, then the image, tokens, notes and the new session.
    `keep_queries` / `self_attention`: the research records (maps of words not in the prompt, where a pixel looks)."""
    settings = settings_from_form(
        models, model, prompt, negative_prompt, scheduler, steps, guidance, seed, random_seed, width, height
    )
    for note in notes_before(settings):
        gr.Info(note)
    hash_ = getattr(request, "session_hash", None)
    flag = stops.start(hash_)
    try:
        with (
            pipeline_errors(model, "Generate"),
            contextlib.closing(
                generate_streaming(
                    models,
                    model,
                    settings,
                    bool(keep_heads),
                    stop=flag,
                    keep_queries=bool(keep_queries),
                    self_attention=bool(self_attention),
                )  # fmt: skip
            ) as events,
        ):
            for event in events:
                if isinstance(event, Done):
                    image = np.asarray(event.image.convert("RGB"))
                    yield finished(
                        Session(event.run, image, model, settings.seed, event.elapsed, settings, models.label(model))
                    )
                elif isinstance(event, Stopped):
                    yield stopped(event, models, model, settings)
                else:
                    html = texts.progress_html(event.step, event.total, event.elapsed, event.message)
                    yield {"progress": html} if event.preview is None else {"progress": html, "preview": event.preview}
    finally:
        stops.finish(hash_, flag)


def finished(session: Session) -> dict:
    """Everything the controls show once a run has finished (or stopped part-way)."""
    run = session.run
    n = run.num_steps
    if session.partial:
        message = f"Stopped at step {n} of {run.info.requested_steps or session.settings.steps}"
    else:
        message = f"Done: {n} steps in {session.elapsed:.1f} s"
    if run.truncated:
        gr.Warning(f"The prompt was longer than 77 tokens; cut: “{run.truncated}”")
    return {
        "progress": texts.progress_html(n, n, session.elapsed, message),
        "preview": render.preview(run, n - 1, "x0", PREVIEW_WIDTH) if n and run.info.latent_rgb else None,
        "image": session.image,
        "seed_used": str(session.seed),
        "tokens": token_chips(run),
        "notes": run_notes(session),
        "session": session,
    }


def stopped(event: Stopped, models: Models, model: str, settings) -> dict:
    """Stop pressed: keep the steps that ran, explorable, with their last x0 as the picture."""
    if event.run is None or event.run.num_steps == 0:
        return {"progress": texts.progress_html(0, 1, event.elapsed, "Stopped before the first step")}
    run = event.run
    with models.using(model) as pipe:  # the VAE, one user at a time
        image = run.decode(run.num_steps - 1, pipe.vae, "x0")
    return finished(Session(run, image, model, settings.seed, event.elapsed, settings, models.label(model)))


def stop(request: gr.Request, *, stops: StopRequests) -> dict:
    """Ask this browser session's run to stop after its current step."""
    if stops.stop(getattr(request, "session_hash", None)):
        return {"progress": texts.progress_html(0, 1, 0, "Stopping after this step…")}
    return {"progress": gr.skip()}


def downloads(
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
    """Files to take away: the final image, the current heatmap, the trace and the HTML report."""
    session = require(session)
    filters = filters_from_form(session.run, from_step, to_step, blocks, resolutions, layers, head)
    heat = heatmap_image(session, word, negative, filters, opacity, colormap) if word else None
    folder = Path(tempfile.mkdtemp(prefix="sdviz-"))
    files = [folder / "image.png"]
    Image.fromarray(session.image).save(files[0])
    if heat is not None:
        files.append(folder / f"heatmap-{report.slug(word)}.png")
        heat.save(files[-1])
    files.append(session.run.save(folder / "trace.safetensors"))
    settings = dict(dataclasses.asdict(session.settings), model=session.label)
    image = Image.fromarray(session.image)
    files.append(report.write_report(folder / "report.html", session.run, image, settings))
    return {"files": [str(f) for f in files]}


# -- what the panel shows ---------------------------------------------------------------------------
def model_note(preset) -> str:
    """What to type for this model: the built-in model knows only its shapes-world grammar."""
    if preset is None or Path(preset.source).resolve() != TOY_MODEL_DIR.resolve():
        return ""
    from ...toy.world import VOCABULARY

    words = " · ".join(f"*{kind}*: " + ", ".join(values) for kind, values in VOCABULARY.items() if kind != "joiner")
    return (
        "**Built-in shapes-world model** — a tiny Stable Diffusion trained here on flat shapes. It knows: "
        f"{words}. Write objects as *a [size] colour shape [position]*, up to three joined by *and*, "
        "e.g. *a small blue square on the left and a yellow triangle*."
    )


def token_chips(run) -> list[tuple[str, str | None]]:
    """What the text encoder saw, for gr.HighlightedText: (text, kind), kind ∈ special/word/piece/cut."""
    chips = []
    for token in run.tokens:
        if token.special:
            kind = "special"
        else:
            word = run.words[token.word]
            kind = "word" if token.index == word.tokens[-1] else "piece"
        chips.append((token.text, kind))
        chips.append((" ", None))
    if run.truncated:
        chips.append((run.truncated, "cut"))
    return chips


def run_notes(session: Session) -> str:
    run, info = session.run, session.run.info
    h, w = run.image_size
    guidance = f"guidance {info.guidance_scale:g}" + ("" if info.cfg else " (off)")
    lines = [
        f"**Seed {session.seed}** · {session.label} · {info.scheduler} · {run.num_steps} steps recorded · "
        f"{guidance} · {w}×{h} px · {session.elapsed:.1f} s"
    ]
    if session.partial:
        lines.append(
            f"**Stopped part-way**: the views below show the {run.num_steps} steps that ran; the picture is "
            f"their last guess of the clean image (x0, decoded by the VAE)."
        )
    if not run.words:
        lines.append("Empty prompt: this image was generated unconditionally, so there are no words to map.")
    if run.truncated:
        lines.append(
            f"The prompt is longer than the text encoder's 77-token window; this part was **cut** and "
            f"never reached the model: “{run.truncated}”"
        )
    return "\n\n".join(lines)


# -- layout and wiring ------------------------------------------------------------------------------
class Panel:
    """Left: the form and Generate / Stop. Right: what the run produced."""

    def __init__(self, app: App):
        models = app.models
        preset = models.preset(models.default)
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=340):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    elem_id="sdviz-prompt",
                    placeholder="a red circle on the left and a blue square on the right",
                )
                with gr.Row():
                    self.run = gr.Button("Generate", variant="primary", elem_id="sdviz-generate")
                    self.stop = gr.Button("Stop", variant="stop", elem_id="sdviz-stop")
                negative = gr.Textbox(label="Negative prompt (what to steer away from)", lines=1)
                model = gr.Dropdown(
                    [(p.label, name) for name, p in models.choices.items()],
                    value=models.default,
                    label="Model",
                    allow_custom_value=True,
                    elem_id="sdviz-model",
                )
                self.model_note = gr.Markdown(
                    model_note(models.choices.get(models.default)), elem_id="sdviz-model-note"
                )
                with gr.Row():
                    scheduler = gr.Dropdown(
                        list(SCHEDULERS), value=preset.scheduler, label="Scheduler", allow_custom_value=True, scale=2
                    )
                    seed = gr.Textbox("42", label="Seed", max_lines=1, scale=2)
                    random_seed = gr.Checkbox(False, label="Random seed", scale=1, min_width=90)
                with gr.Row():
                    steps = gr.Slider(
                        1, preset.max_steps, value=preset.steps, step=1, label="Steps", elem_id="sdviz-steps"
                    )
                    guidance = gr.Slider(0, 20, value=preset.guidance, step=0.5, label="Guidance scale")
                with gr.Row():
                    side = max_side(preset.size)
                    width = gr.Slider(64, side, value=preset.size, step=8, label="Width")
                    height = gr.Slider(64, side, value=preset.size, step=8, label="Height")
                with gr.Accordion("Advanced", open=False):
                    keep_heads = gr.Checkbox(
                        False, label="Keep every attention head's map (more memory; enables the head filter)"
                    )
                    # research records (issue 14): memory measured by `python -m sdviz.bench --research`
                    self.keep_queries = gr.Checkbox(
                        True, label="Keep queries: maps of words not in the prompt (SD 1.5 512², 25 steps: +86 MB)"
                    )
                    self.self_attention = gr.Checkbox(
                        True, label="Record self-attention: where a clicked pixel looks (SD 1.5 512², 25 steps: +17 MB)"
                    )
                gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")
                if app.examples:
                    gr.Examples([[p] for p in app.examples], inputs=[prompt], label="Examples (click to use)")
            with gr.Column(scale=6):
                with gr.Row():
                    self.preview = gr.Image(
                        label="Live preview (predicted x0 of each step, no VAE)",
                        interactive=False,
                        elem_id="sdviz-preview",
                        elem_classes="sdviz-fill",
                        height=300,
                        buttons=["fullscreen"],
                    )
                    self.image = gr.Image(
                        label="Final image",
                        interactive=False,
                        elem_id="sdviz-final",
                        height=300,
                        elem_classes="sdviz-fill",
                        format="png",
                        buttons=["download", "fullscreen"],
                    )
                self.progress = gr.HTML(texts.progress_html(0, 1, 0, "Ready"), elem_id="sdviz-progress")
                with gr.Row():
                    self.seed_used = gr.Textbox(
                        label="Seed used", interactive=False, scale=1, elem_id="sdviz-seed-used"
                    )
                    self.notes = gr.Markdown(texts.BUSY, elem_id="sdviz-notes")
                self.tokens = gr.HighlightedText(
                    label=TOKENS_LABEL,
                    show_inline_category=False,
                    elem_id="sdviz-tokens",
                    color_map={"special": "#d0d0d0", "word": "#a5d8ff", "piece": "#ffd8a8", "cut": "#ff8787"},
                )
                with gr.Row():
                    self.files_button = gr.Button("Prepare downloads: image, heatmap, trace, report", size="sm")
                    self.files = gr.File(label="Downloads", file_count="multiple", interactive=False, height=110)
        app.form = Form(
            model, prompt, negative, scheduler, steps, guidance, seed, random_seed, width, height, keep_heads
        )

    def wire(self, app: App):
        form = app.form
        preset_out = {
            "steps": form.steps,
            "guidance": form.guidance,
            "width": form.width,
            "height": form.height,
            "scheduler": form.scheduler,
            "model_note": self.model_note,
        }
        form.model.change(
            handler(apply_preset, preset_out, models=app.models),
            form.model,
            list(preset_out.values()),
            api_visibility="private",
        )
        run_out = {
            "preview": self.preview,
            "progress": self.progress,
            "image": self.image,
            "seed_used": self.seed_used,
            "tokens": self.tokens,
            "notes": self.notes,
            "session": app.session,
        }
        generation = gr.on(
            [self.run.click, form.prompt.submit],
            handler(generate, run_out, models=app.models, stops=app.stops),
            [*form.inputs(), app.session, self.keep_queries, self.self_attention],
            list(run_out.values()),
            api_name="generate",
            concurrency_id=PIPELINE,
            concurrency_limit=1,
            show_progress="minimal",
            show_progress_on=[self.progress],
        )
        app.new_run.append(generation)
        self.stop.click(
            handler(stop, {"progress": self.progress}, stops=app.stops),
            None,
            self.progress,
            api_visibility="private",
            queue=False,
        )
        files_in = [app.word, *app.view.inputs(), app.session]
        # preprocess=False: the word chips' choices are per session (see words.py)
        self.files_button.click(
            handler(downloads, {"files": self.files}), files_in, self.files, api_name="downloads", preprocess=False
        )


__all__ = ["Panel", "STATE_TTL_S"]
