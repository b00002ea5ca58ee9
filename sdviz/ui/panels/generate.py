"""The controls and the run: the form, Generate / Stop, the live preview, the final image, the tokens
the text encoder saw, notes about the run and its downloads. API: /generate, /downloads."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from ... import render, report
from ...loading import TOY_MODEL_DIR
from ...preview import Previewer
from ...result import TraceResult
from ...settings import SCHEDULERS, Settings
from .. import texts
from ..inputs import max_side, notes_before, settings_from_form
from ..models import Models
from ..session import Session, filters_from_form, heatmap_image, require, unknown_words, words_of
from ..streaming import PREVIEW_WIDTH, Done, Stopped, generate_streaming
from ..wiring import PIPELINE, App, Form, StopRequests, handler, pipeline_errors, wire_stop, zero_gpu

EXPLAIN = """**What Generate does.** The text encoder turns your prompt into 77 token vectors. Starting from
random noise (fixed by the seed), the U-Net predicts the noise in the latent at every step and the
scheduler removes part of it. The VAE turns the final latent into pixels."""

TOKENS_LABEL = "What the text encoder saw (tokens; orange = piece of a longer word, red = cut off past 77 tokens)"
PREVIEW_CAPTION = "**Live preview** (each step's x0)"
FALLBACK_EXAMPLE = "a red circle on the left and a blue square on the right"


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
        "scheduler": gr.Dropdown(choices=list(SCHEDULERS), value=preset.scheduler),
        "model_note": model_note(preset) if models.available(model) else models.missing_message(model),
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
    if not models.available(model):  # say so in plain words now, rather than a loader's error later
        raise gr.Error(models.missing_message(model).replace("**", ""), duration=None)
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
            yield {"notes": "_Generating… the panels below still show your previous run until this one finishes._"}
            for event in events:
                if isinstance(event, Done):
                    image = np.asarray(event.image.convert("RGB"))
                    session = Session(
                        event.run, image, model, settings.seed, event.elapsed, settings, models.label(model)
                    )
                    yield finished(session, models.previewer(model))
                elif isinstance(event, Stopped):
                    yield stopped(event, models, model, settings)
                else:
                    html = texts.progress_html(event.step, event.total, event.elapsed, event.message)
                    yield {"progress": html} if event.preview is None else {"progress": html, "preview": event.preview}
    finally:
        stops.finish(hash_, flag)


def finished(session: Session, previewer: Previewer) -> dict:
    """Everything the controls show once a run has finished (or stopped part-way)."""
    run = session.run
    n = run.num_steps
    if session.partial:
        message = f"Stopped at step {n} of {run.info.requested_steps or session.settings.steps}"
    else:
        message = f"Done: {n} steps in {session.elapsed:.1f} s"
    if run.truncated:
        gr.Warning(f"The prompt was longer than 77 tokens; cut: “{run.truncated}”")
    unknown = unknown_words(run)
    if unknown:
        gr.Warning(f"The built-in model doesn't know: {', '.join(unknown)}. See the words it knows under Model.")
    return {
        "progress": texts.progress_html(n, n, session.elapsed, message),
        "preview": render.preview(run, n - 1, "x0", PREVIEW_WIDTH, previewer) if n else None,
        "image": session.image,
        "seed_used": str(session.seed),
        "tokens": token_chips(run),
        "notes": run_notes(session, previewer),
        "session": session,
    }


def stopped(event: Stopped, models: Models, model: str, settings) -> dict:
    """Stop pressed: keep the steps that ran, explorable, with their last x0 as the picture."""
    if event.run is None or event.run.num_steps == 0:
        return {"progress": texts.progress_html(0, 1, event.elapsed, "Stopped before the first step")}
    run, draw = event.run, models.previewer(model)
    pixels = draw.picture(run, run.num_steps - 1, "x0")  # [H, W, 3], or [h, w, 3] for the linear map
    image = np.asarray(Image.fromarray(pixels).resize(run.image_size[::-1], Image.BILINEAR))
    return finished(Session(run, image, model, settings.seed, event.elapsed, settings, models.label(model)), draw)


def busy(request: gr.Request, *, stops: StopRequests):
    """Say so when Generate is pressed while this session's run is still going (the page ignores the click)."""
    if stops.running(getattr(request, "session_hash", None)):
        gr.Warning("A run is in progress: press Stop first, or wait for it to finish.")


def example_for(models: Models, examples: list[str]) -> str:
    """A prompt that works with the default model, so the first Generate makes something."""
    return examples[0] if examples else FALLBACK_EXAMPLE


def open_trace(file, session, *, models: Models) -> dict:
    """A trace saved earlier (Prepare downloads, the CLI or `run.save`) as the session's run, explorable in
    every panel. Its picture is the final latent drawn by the model it came from, when this server has
    it, else by the trace's own linear preview map."""
    if file is None:
        return {"progress": gr.skip()}
    path = file if isinstance(file, str) else getattr(file, "name", file)
    run = TraceResult.load(path)
    if run.num_steps == 0:
        raise ValueError(f"{Path(path).name} holds a trace with no steps: nothing to show")
    name = models.find(run.info.model)
    draw = models.previewer(name) if name else Previewer("linear")
    pixels = draw.picture(run, run.num_steps - 1, "final") if draw.kind != "linear" else run.preview(0, "final")
    image = np.asarray(Image.fromarray(pixels).resize(run.image_size[::-1], Image.BILINEAR))
    label = models.label(name) if name else (run.info.model or "a saved trace")
    guidance = run.info.guidance_scale if math.isfinite(run.info.guidance_scale) else 0.0
    settings = Settings(run.prompt or "", run.info.negative_prompt or "", max(run.num_steps, 1), guidance)
    opened = Session(run, image, name, -1, 0.0, settings, f"{label} (opened from {Path(path).name})")
    out = finished(opened, draw)
    out["seed_used"] = "(saved trace)"
    out["progress"] = texts.progress_html(1, 1, 0, f"Opened {Path(path).name}: {run.num_steps} steps")
    return out


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
    *,
    models: Models,
) -> dict:
    """Files to take away: the final image, the current heatmap, every word's map as arrays (.npz, with
    these filters), the trace and the HTML report."""
    session = require(session)
    run = session.run
    filters = filters_from_form(run, from_step, to_step, blocks, resolutions, layers, head)
    heat = heatmap_image(session, word, negative, filters, opacity, colormap) if word else None
    folder = Path(tempfile.mkdtemp(prefix="sdviz-"))
    files = [folder / "image.png"]
    Image.fromarray(session.image).save(files[0])
    if heat is not None:
        files.append(folder / f"heatmap-{report.slug(word)}.png")
        heat.save(files[-1])
    chosen = words_of(run, negative)
    if chosen:  # float32 [H, W] attention probabilities per word, as `run.heatmap(word, size="image")`
        maps = {w: run.heatmap(w, size="image", negative=negative, **filters.kwargs()) for w in chosen}
        files.append(folder / "heatmaps.npz")
        np.savez_compressed(files[-1], **maps)
    files.append(run.save(folder / "trace.safetensors"))
    settings = dict(dataclasses.asdict(session.settings), model=session.label)
    image = Image.fromarray(session.image)
    files.append(
        report.write_report(folder / "report.html", run, image, settings, previewer=models.previewer(session.model))
    )
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
        "e.g. *a small blue square on the left and a yellow triangle*." + toy_reliability(TOY_MODEL_DIR)
    )


def toy_reliability(folder: Path) -> str:
    """How often the model draws what the words say, from its evaluation (`evaluation.json` in its folder,
    written by `python -m sdviz.toy.evaluate --json`); "" if the folder has none."""
    try:
        figures = json.loads((folder / "evaluation.json").read_text())
        g, w = figures["generated"], figures["one_word_changes"]
        parts = [
            f"colours {g['all_colours_present_other']:.0%}",
            f"red with yellow {g['all_colours_present_unseen_colour_set']:.0%}",
            f"shapes {g['shape_correct']:.0%} (chance: 33%)",
            f"positions {g['position_correct']:.0%}",
            f"sizes {g['size_correct']:.0%}",
        ]
        moved = w["position_change_followed"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return (
        f" How often it draws what the words say, on captions it never saw: {', '.join(parts)} "
        f"(red and yellow were never together in training); the same seed with another position word moves the "
        f"object {moved:.0%} of the time. The model card (`sdviz/toy/model/README.md`) has the full evaluation."
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


def run_notes(session: Session, previewer: Previewer | None = None) -> str:
    run, info = session.run, session.run.info
    h, w = run.image_size
    guidance = f"guidance {info.guidance_scale:g}" + ("" if info.cfg else " (off)")
    seed = f"Seed {session.seed}" if session.seed >= 0 else "Saved trace"
    lines = [
        f"**{seed}** · {session.label} · {info.scheduler} · {run.num_steps} steps recorded · "
        f"{guidance} · {w}×{h} px · {session.elapsed:.1f} s"
    ]
    if session.partial:
        lines.append(
            f"**Stopped part-way**: the views below show the {run.num_steps} steps that ran; the picture is "
            f"their last guess of the clean image (x0, {previewer.label if previewer else 'decoded'})."
        )
    if not run.words:
        lines.append("Empty prompt: this image was generated unconditionally, so there are no words to map.")
    unknown = unknown_words(run)
    if unknown:
        lines.append(
            f"**The built-in model doesn't know {', '.join(f'“{w}”' for w in unknown)}**: it was trained only on "
            "the shapes-world words listed under Model, so it read these as meaningless pieces, and their maps "
            "show nothing real. Try e.g. “a small blue square on the left and a yellow triangle”."
        )
    if run.truncated:
        lines.append(
            f"The prompt is longer than the text encoder's 77-token window; this part was **cut** and "
            f"never reached the model: “{run.truncated}”"
        )
    return "\n\n".join(lines)


# -- layout and wiring ------------------------------------------------------------------------------
class Panel:
    """Left: the prompt with Generate / Stop right under it, then the settings. Right: what the run produced."""

    def __init__(self, app: App):
        models = app.models
        preset = models.preset(models.default)
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=300):
                # One line that grows as you type: Enter generates (a multi-line box would take it as a newline).
                prompt = gr.Textbox(
                    example_for(models, app.examples),
                    label="Prompt (Enter to generate)",
                    lines=1,
                    max_lines=4,
                    elem_id="sdviz-prompt",
                )
                with gr.Row():
                    self.run = gr.Button("Generate", variant="primary", elem_id="sdviz-generate")
                    self.stop = gr.Button("Stop", variant="stop", elem_id="sdviz-stop")
                negative = gr.Textbox(label="Negative prompt (what to steer away from)", lines=1)
                model = gr.Dropdown(
                    models.menu(),
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
                        list(SCHEDULERS),
                        value=preset.scheduler,
                        label="Scheduler",
                        allow_custom_value=True,
                        scale=2,
                        min_width=130,
                    )
                    seed = gr.Textbox("42", label="Seed", max_lines=1, scale=2, min_width=100)
                    random_seed = gr.Checkbox(False, label="Random seed", scale=1, min_width=130)
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
            with gr.Column(scale=6, min_width=300):
                with gr.Row():
                    with gr.Column(min_width=150):
                        self.preview_caption = gr.Markdown(PREVIEW_CAPTION, elem_classes="sdviz-caption")
                        self.preview = gr.Image(
                            label="Live preview",
                            show_label=False,
                            interactive=False,
                            elem_id="sdviz-preview",
                            elem_classes="sdviz-fill",
                            height=280,
                            buttons=["fullscreen"],
                        )
                    with gr.Column(min_width=150):
                        gr.Markdown("**Final image**", elem_classes="sdviz-caption")
                        self.image = gr.Image(
                            label="Final image",
                            show_label=False,
                            interactive=False,
                            elem_id="sdviz-final",
                            height=280,
                            elem_classes="sdviz-fill",
                            format="png",
                            buttons=["download", "fullscreen"],
                        )
                self.progress = gr.HTML(texts.progress_html(0, 1, 0, "Ready"), elem_id="sdviz-progress")
                with gr.Row():
                    self.seed_used = gr.Textbox(
                        label="Seed used", interactive=False, scale=1, min_width=90, elem_id="sdviz-seed-used"
                    )
                    self.notes = gr.Markdown(texts.BUSY, elem_id="sdviz-notes")
                self.tokens = gr.HighlightedText(
                    label=TOKENS_LABEL,
                    show_inline_category=False,
                    elem_id="sdviz-tokens",
                    color_map={"special": "#d0d0d0", "word": "#a5d8ff", "piece": "#ffd8a8", "cut": "#ff8787"},
                )
                with gr.Row():
                    self.files_button = gr.Button("Prepare downloads: image, heatmaps, trace, report", size="sm")
                    self.files = gr.File(label="Downloads", file_count="multiple", interactive=False, height=110)
                with gr.Accordion("Open a saved trace (.safetensors)", open=False):
                    self.upload = gr.File(
                        label="A trace saved by sdviz (Prepare downloads, the CLI or run.save)",
                        file_types=[".safetensors"],
                        elem_id="sdviz-open-trace",
                    )
        app.form = Form(
            model, prompt, negative, scheduler, steps, guidance, seed, random_seed, width, height, keep_heads
        )

    def wire(self, app: App):
        form, models = app.form, app.models
        preset_out = {
            "steps": form.steps,
            "guidance": form.guidance,
            "width": form.width,
            "height": form.height,
            "scheduler": form.scheduler,
            "model_note": self.model_note,
        }
        form.model.change(
            handler(apply_preset, preset_out, models=models),
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
        triggers = [self.run.click, form.prompt.submit]
        # A second Generate while this session's run goes on would be dropped by the page without a word.
        # (Queued, unlimited: a warning reaches the page only through the queue's stream.)
        gr.on(
            triggers,
            handler(busy, stops=app.stops),
            None,
            None,
            concurrency_limit=None,
            api_visibility="private",
            show_progress="hidden",
        )
        generation = gr.on(
            triggers,
            handler(generate, run_out, models=models, stops=app.stops),
            [*form.inputs(), app.session, self.keep_queries, self.self_attention],
            list(run_out.values()),
            api_name="generate",
            concurrency_id=PIPELINE,
            concurrency_limit=1,
            show_progress="minimal",
            show_progress_on=[self.progress],
        )
        app.new_run.append(generation)
        wire_stop(self.stop, self.progress, app.stops)
        files_in = [app.word, *app.view.inputs(), app.session]
        # preprocess=False: the word chips' choices are per session (see words.py)
        self.files_button.click(
            handler(downloads, {"files": self.files}, models=models),
            files_in,
            self.files,
            api_name="downloads",
            preprocess=False,
        )
        opened = self.upload.upload(
            handler(open_trace, run_out, models=models),
            [self.upload, app.session],
            list(run_out.values()),
            api_name="open_trace",
        )
        app.new_run.append(opened)
