"""The Gradio Blocks: layout and wiring. Each handler is a few lines over `views`, `inputs` and `streaming`.

Per-user data (the trace and the final image of the last run) lives only in `gr.State`; the pipelines
live in the `Models` object passed in, shared by everyone, so the events that run them share one
concurrency id with a limit of 1.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import gradio as gr
import numpy as np

from .. import render
from ..loading import ModelUnavailableError
from ..settings import SCHEDULERS
from . import compare_view, texts, views
from .inputs import max_side, notes_before, settings_from_form
from .models import Models
from .streaming import PREVIEW_WIDTH, Done, Tick, VariantDone, compare_streaming, generate_streaming

PIPELINE = "pipeline"  # concurrency id of every event that runs a model
COLORMAPS = ["jet", "inferno", "viridis", "magma", "turbo", "gray"]
BLOCKS = ["down", "mid", "up"]
STATE_TTL_S = 2 * 3600  # a trace is dropped two hours after the user's last run
USER_ERRORS = (ValueError, KeyError, IndexError)


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def friendly(fn):
    """Turn the library's teaching errors into gr.Error (a toast in the page, AppError through the API)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise gr.Error(_message(err)) from err

    return wrapper


@contextlib.contextmanager
def pipeline_errors(model_name: str, button: str):
    """Faults while loading or running a model → gr.Error saying what happened and that nothing was lost."""
    try:
        yield
    except gr.Error:
        raise
    except (ModelUnavailableError, FileNotFoundError, TypeError) as err:
        raise gr.Error(f"Can't use model {model_name!r}: {err}") from err
    except Exception as err:
        raise gr.Error(
            f"The generation failed inside the pipeline ({type(err).__name__}: {err}). "
            f"Nothing was lost; press {button} to try again."
        ) from err


def zero_gpu(fn):
    """`spaces.GPU` on Hugging Face ZeroGPU; elsewhere (or without the package) the function itself."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def example_prompts(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def build_app(models: Models, examples: list[str] | None = None, queue_size: int = 16) -> gr.Blocks:
    preset = models.preset(models.default)
    # Sliders start with room for any run: API clients never receive the per-run maxima the page sets.
    most_steps = max(p.max_steps for p in models.choices.values()) + 1  # PNDM records one extra step
    with gr.Blocks(title="sdviz — see inside Stable Diffusion", analytics_enabled=False) as demo:
        session = gr.State(None, time_to_live=STATE_TTL_S)
        gr.Markdown(texts.HEADER)

        # -- controls (left) and live output (right) ---------------------------------------------
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=340):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    elem_id="sdviz-prompt",
                    placeholder="a red circle on the left and a blue square on the right",
                )
                negative = gr.Textbox(label="Negative prompt (what to steer away from)", lines=1)
                model = gr.Dropdown(
                    [(p.label, name) for name, p in models.choices.items()],
                    value=models.default,
                    label="Model",
                    allow_custom_value=True,
                    elem_id="sdviz-model",
                )
                model_note = gr.Markdown(
                    views.model_note(models.choices.get(models.default)), elem_id="sdviz-model-note"
                )
                with gr.Row():
                    scheduler = gr.Dropdown(
                        list(SCHEDULERS), value=preset.scheduler, label="Scheduler", allow_custom_value=True, scale=2
                    )
                    seed = gr.Textbox("42", label="Seed", max_lines=1, scale=2)
                    randomize = gr.Checkbox(False, label="Random seed", scale=1, min_width=90)
                with gr.Row():
                    steps = gr.Slider(
                        1, preset.max_steps, value=preset.steps, step=1, label="Steps", elem_id="sdviz-steps"
                    )
                    guidance = gr.Slider(0, 20, value=preset.guidance, step=0.5, label="Guidance scale")
                with gr.Row():
                    width = gr.Slider(64, max_side(preset.size), value=preset.size, step=8, label="Width")
                    height = gr.Slider(64, max_side(preset.size), value=preset.size, step=8, label="Height")
                with gr.Accordion("Advanced", open=False):
                    per_head = gr.Checkbox(
                        False, label="Keep every attention head's map (more memory; enables the head filter)"
                    )
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="sdviz-generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="sdviz-stop")
                gr.Markdown(texts.GENERATE, elem_classes="sdviz-explain")
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[prompt], label="Examples (click to use)")
            with gr.Column(scale=6):
                with gr.Row():
                    preview = gr.Image(
                        label="Live preview (predicted x0 of each step, no VAE)",
                        interactive=False,
                        elem_id="sdviz-preview",
                        elem_classes="sdviz-fill",
                        height=300,
                        buttons=["fullscreen"],
                    )
                    final = gr.Image(
                        label="Final image",
                        interactive=False,
                        elem_id="sdviz-final",
                        height=300,
                        elem_classes="sdviz-fill",
                        format="png",
                        buttons=["download", "fullscreen"],
                    )
                progress = gr.HTML(texts.progress_html(0, 1, 0, "Ready"), elem_id="sdviz-progress")
                with gr.Row():
                    seed_used = gr.Textbox(label="Seed used", interactive=False, scale=1, elem_id="sdviz-seed-used")
                    notes = gr.Markdown(texts.BUSY, elem_id="sdviz-notes")
                tokens = gr.HighlightedText(
                    label="What the text encoder saw (tokens; orange = piece of a longer "
                    "word, red = cut off past 77 tokens)",
                    color_map={"special": "#d0d0d0", "word": "#a5d8ff", "piece": "#ffd8a8", "cut": "#ff8787"},
                    show_inline_category=False,
                    elem_id="sdviz-tokens",
                )
                with gr.Row():
                    files_btn = gr.Button("Prepare downloads: image, heatmap, trace, report", size="sm")
                    files = gr.File(label="Downloads", file_count="multiple", interactive=False, height=110)

        # -- exploration tabs -----------------------------------------------------------------------
        with gr.Tabs():
            with gr.Tab("Which words attend where", id="words"):
                gr.Markdown(texts.WORDS, elem_classes="sdviz-explain")
                with gr.Row():
                    word = gr.Radio([], label="Words (click one)", elem_id="sdviz-words", scale=4)
                    use_negative = gr.Checkbox(False, label="Negative prompt's words", scale=1)
                with gr.Row():
                    heat = gr.Image(
                        label="Heatmap over the final image",
                        interactive=False,
                        format="png",
                        elem_id="sdviz-heatmap",
                        height=340,
                        elem_classes="sdviz-fill",
                        buttons=["download", "fullscreen"],
                    )
                    grid = gr.Image(
                        label="All words",
                        interactive=False,
                        format="png",
                        elem_id="sdviz-grid",
                        height=340,
                        buttons=["download", "fullscreen"],
                    )
                with gr.Accordion("Filters and display", open=True):
                    with gr.Row():
                        step_from = gr.Slider(1, most_steps, value=1, step=1, label="From step")
                        step_to = gr.Slider(1, most_steps, value=most_steps, step=1, label="To step")
                        opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
                        cmap = gr.Dropdown(COLORMAPS, value="jet", label="Colormap")
                    with gr.Row():
                        blocks = gr.CheckboxGroup(BLOCKS, value=BLOCKS, label="U-Net blocks")
                        resolutions = gr.Dropdown(
                            [], multiselect=True, allow_custom_value=True, label="Resolutions (empty = all)"
                        )
                        layers = gr.Dropdown(
                            [], multiselect=True, allow_custom_value=True, label="Layers (empty = all)"
                        )
                        head = gr.Dropdown(
                            [("mean of all heads", -1)], value=-1, allow_custom_value=True, label="Heads"
                        )
                with gr.Row():
                    with gr.Column():
                        gr.Markdown(texts.ASK, elem_classes="sdviz-explain")
                        ask_image = gr.Image(
                            label="Click a point", interactive=False, elem_id="sdviz-ask", height=340, format="png"
                        )
                    ask_plot = gr.Image(
                        label="Words ranked for the clicked region",
                        interactive=False,
                        format="png",
                        elem_id="sdviz-ask-plot",
                    )

            with gr.Tab("Step by step", id="steps"):
                gr.Markdown(texts.STEPS, elem_classes="sdviz-explain")
                with gr.Row():
                    step = gr.Slider(1, most_steps, value=1, step=1, label="Step", scale=5, elem_id="sdviz-step")
                    play = gr.Button("▶ Play", size="sm", scale=1, elem_id="sdviz-play")
                    decode_btn = gr.Button("Exact decode (VAE)", size="sm", scale=1, elem_id="sdviz-decode")
                    follow = gr.Checkbox(False, label="Heatmap follows this step", scale=1)
                timer = gr.Timer(0.7, active=False)
                step_caption = gr.Markdown(elem_id="sdviz-step-caption")
                with gr.Row():
                    xt = gr.Image(
                        label="x_t: noisy latent in",
                        interactive=False,
                        elem_id="sdviz-xt",
                        elem_classes="sdviz-fill",
                        height=260,
                    )
                    x0 = gr.Image(
                        label="x0: guess of the clean image",
                        interactive=False,
                        elem_id="sdviz-x0",
                        elem_classes="sdviz-fill",
                        height=260,
                    )
                    decoded = gr.Image(
                        label="x0, exact VAE decode",
                        interactive=False,
                        elem_id="sdviz-decoded",
                        elem_classes="sdviz-fill",
                        height=260,
                    )
                    step_heat = gr.Image(
                        label="Heatmap at this step",
                        interactive=False,
                        elem_id="sdviz-step-heat",
                        elem_classes="sdviz-fill",
                        height=260,
                        visible=False,
                    )
                gr.Markdown(texts.LATENTS, elem_classes="sdviz-explain")
                with gr.Row():
                    z_rgb = gr.Image(
                        label="z[0:3] as RGB",
                        interactive=False,
                        elem_id="sdviz-zrgb",
                        elem_classes="sdviz-fill",
                        height=220,
                        format="png",
                    )
                    z_channels = gr.Image(
                        label="channels z[0] … z[3]",
                        interactive=False,
                        elem_id="sdviz-zchannels",
                        elem_classes="sdviz-fill",
                        height=220,
                        format="png",
                    )
                gr.Markdown(texts.SCHEDULE, elem_classes="sdviz-explain")
                schedule = gr.Image(label="Noise schedule", interactive=False, elem_id="sdviz-schedule", format="png")

            with gr.Tab("Attention over time", id="time"):
                gr.Markdown(texts.OVER_TIME, elem_classes="sdviz-explain")
                over_time = gr.Image(
                    label="Attention over time", interactive=False, format="png", elem_id="sdviz-over-time"
                )

            with gr.Tab("Compare", id="compare"):
                gr.Markdown(texts.COMPARE, elem_classes="sdviz-explain")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        with gr.Row():
                            cmp_mode = gr.Radio(
                                [("Vary one setting", "vary"), ("Two prompts", "pair")],
                                value="vary",
                                label="Compare",
                                elem_id="sdviz-cmp-mode",
                            )
                            cmp_vary = gr.Radio(
                                [
                                    ("Guidance scale", "guidance"),
                                    ("Steps", "steps"),
                                    ("Scheduler", "scheduler"),
                                    ("Seed", "seed"),
                                ],
                                value="guidance",
                                label="Setting to vary",
                                elem_id="sdviz-cmp-vary",
                            )
                        cmp_values = gr.Textbox(
                            compare_view.DEFAULT_VALUES["guidance"],
                            max_lines=1,
                            label="Values (comma-separated, up to 4)",
                            elem_id="sdviz-cmp-values",
                        )
                        cmp_schedulers = gr.CheckboxGroup(
                            list(SCHEDULERS),
                            value=compare_view.DEFAULT_SCHEDULERS,
                            label="Schedulers (up to 4)",
                            visible=False,
                            elem_id="sdviz-cmp-schedulers",
                        )
                        cmp_prompt_b = gr.Textbox(
                            label="Second prompt (the first is the Prompt above)",
                            lines=1,
                            visible=False,
                            placeholder="a blue circle",
                            elem_id="sdviz-cmp-prompt-b",
                        )
                    with gr.Column(scale=2):
                        cmp_word = gr.Dropdown(
                            [],
                            value=None,
                            allow_custom_value=True,
                            elem_id="sdviz-cmp-word",
                            label="Word for the heatmaps (empty: the strongest / changed words)",
                        )
                        cmp_step = gr.Slider(
                            1, most_steps, value=most_steps, step=1, label="Shared step", elem_id="sdviz-cmp-step"
                        )
                        cmp_exact = gr.Checkbox(
                            False,
                            label="Decode x0 with the VAE (exact; slower on big models)",
                            elem_id="sdviz-cmp-exact",
                        )
                        with gr.Row():
                            cmp_run = gr.Button("Run comparison", variant="primary", elem_id="sdviz-cmp-run")
                            cmp_stop = gr.Button("Stop", variant="stop", elem_id="sdviz-cmp-stop")
                cmp_progress = gr.HTML(texts.progress_html(0, 1, 0, "Ready"), elem_id="sdviz-cmp-progress")
                with gr.Row(equal_height=False):
                    cmp_live = gr.Image(
                        label="Live preview (x0 of the running variant)",
                        interactive=False,
                        elem_id="sdviz-cmp-live",
                        elem_classes="sdviz-fill",
                        height=200,
                        scale=1,
                    )
                    cmp_gallery = gr.Gallery(
                        label="Final images, as each variant finishes",
                        columns=4,
                        height=240,
                        elem_id="sdviz-cmp-gallery",
                        format="png",
                        scale=3,
                        object_fit="contain",
                        buttons=["download", "fullscreen"],
                    )
                cmp_notes = gr.Markdown(elem_id="sdviz-cmp-notes")
                # No floating label: it would cover the columns' titles (the rows are labelled in the figure).
                cmp_figure = gr.Image(
                    label="Side by side",
                    show_label=False,
                    interactive=False,
                    format="png",
                    elem_id="sdviz-cmp-figure",
                    buttons=["download", "fullscreen"],
                )
                comparison_state = gr.State(None, time_to_live=STATE_TTL_S)

            with gr.Tab("How it works", id="how"):
                gr.Markdown(texts.HOW)
                shapes = gr.Markdown(views.shapes(None), elem_id="sdviz-shapes")

        # -- handlers -------------------------------------------------------------------------------
        filter_inputs = [step_from, step_to, blocks, resolutions, layers, head]
        step_outputs = [step_caption, xt, x0, decoded, z_rgb, z_channels, schedule, step_heat]

        def filters(state, *form):
            return views.filters_from_form(views.require(state).run, *form)

        def apply_preset(name):
            p = models.preset(name) if name in models.choices else preset
            side = max_side(p.size)
            return (
                gr.Slider(maximum=p.max_steps, value=p.steps),
                gr.Slider(value=p.guidance),
                gr.Slider(maximum=side, value=p.size),
                gr.Slider(maximum=side, value=p.size),
                gr.Dropdown(value=p.scheduler),
                views.model_note(p),
            )

        @zero_gpu
        def on_generate(
            model_name, prompt_text, negative_text, scheduler_name, n_steps, scale, seed_text, rand, w, h, heads, state
        ):
            try:
                settings = settings_from_form(
                    models,
                    model_name,
                    prompt_text,
                    negative_text,
                    scheduler_name,
                    n_steps,
                    scale,
                    seed_text,
                    rand,
                    w,
                    h,
                )
            except ValueError as err:
                raise gr.Error(str(err)) from err
            for note in notes_before(settings):
                gr.Info(note)
            with (
                pipeline_errors(model_name, "Generate"),
                contextlib.closing(generate_streaming(models, model_name, settings, heads)) as events,
            ):
                for event in events:
                    if not isinstance(event, Done):
                        html = texts.progress_html(event.step, event.total, event.elapsed, event.message)
                        yield {progress: html} if event.preview is None else {progress: html, preview: event.preview}
                        continue
                    yield finished(model_name, settings, event)

        def finished(model_name, settings, done: Done):
            state = views.Session(
                done.run,
                np.asarray(done.image.convert("RGB")),
                model_name,
                settings.seed,
                done.text_dim,
                done.elapsed,
                settings,
                models.label(model_name),
            )
            first = views.strongest_word(done.run)
            heat_image = None if first is None else views.heatmap(state, first, False, views.Filters(), 0.5, "jet")
            if done.run.truncated:
                gr.Warning(f"The prompt was longer than 77 tokens; cut: “{done.run.truncated}”")
            return {
                progress: texts.progress_html(
                    done.run.num_steps,
                    done.run.num_steps,
                    done.elapsed,
                    f"Done: {done.run.num_steps} steps in {done.elapsed:.1f} s",
                ),
                preview: render.preview(done.run, done.run.num_steps - 1, "x0", PREVIEW_WIDTH)
                if done.run.num_steps
                else None,
                final: done.image,
                seed_used: str(settings.seed),
                tokens: views.token_chips(done.run),
                word: gr.Radio(choices=views.words_of(done.run), value=first),
                heat: heat_image,
                notes: views.run_notes(state),
                session: state,
            }

        @zero_gpu
        def on_compare(
            mode,
            vary,
            values_text,
            scheduler_list,
            prompt_b,
            word_value,
            exact,
            model_name,
            prompt_text,
            negative_text,
            scheduler_name,
            n_steps,
            scale,
            seed_text,
            rand,
            w,
            h,
        ):
            try:
                base = settings_from_form(
                    models,
                    model_name,
                    prompt_text,
                    negative_text,
                    scheduler_name,
                    n_steps,
                    scale,
                    seed_text,
                    rand,
                    w,
                    h,
                )
                vary, values = compare_view.plan(
                    mode, vary, values_text, scheduler_list, base.prompt, prompt_b, models.preset(model_name).max_steps
                )
                with pipeline_errors(model_name, "Run comparison"):
                    pipe = models.pipeline(model_name)
                compare_view.check_plan(pipe, word_value, base, vary, values)
            except ValueError as err:
                raise gr.Error(str(err)) from err
            done = []
            with (
                pipeline_errors(model_name, "Run comparison"),
                contextlib.closing(compare_streaming(models, model_name, base, vary, values)) as events,
            ):
                for event in events:
                    if isinstance(event, Tick):
                        html = texts.progress_html(event.step, event.total, event.elapsed, event.message)
                        yield (
                            {cmp_progress: html}
                            if event.preview is None
                            else {cmp_progress: html, cmp_live: event.preview}
                        )
                    elif isinstance(event, VariantDone):
                        done.append(event.variant)
                        yield {cmp_gallery: compare_view.gallery(done)}
                    else:
                        comparison = compare_view.Comparison(event.variants, vary, model_name)
                        yield compared(comparison, base, word_value, exact, event.elapsed)

        def compared(comparison, base, word_value, exact, elapsed):
            word_value = word_value or compare_view.default_word(comparison)
            n, count = comparison.longest, len(comparison.variants)
            return {
                cmp_progress: texts.progress_html(1, 1, elapsed, f"Done: {count} variants in {elapsed:.1f} s"),
                cmp_gallery: compare_view.gallery(comparison.variants),
                cmp_figure: comparison_figure(comparison, word_value, n, exact),
                cmp_word: gr.Dropdown(choices=compare_view.word_choices(comparison), value=word_value),
                cmp_step: gr.Slider(maximum=n, value=n),
                cmp_notes: compare_view.settings_label(base, comparison.vary),
                comparison_state: comparison,
            }

        def comparison_figure(comparison, word_value, step_value, exact):
            if not exact:
                return compare_view.figure(comparison, word_value, step_value)
            with models.using(comparison.model) as pipe:  # the VAE, on its device, one user at a time
                return compare_view.figure(comparison, word_value, step_value, vae=pipe.vae)

        @friendly
        def on_compare_view(word_value, step_value, exact, comparison):
            return comparison_figure(compare_view.require(comparison), word_value, step_value, exact)

        def on_compare_mode(mode, vary):
            pair = mode == "pair"
            # The word picked for the other mode's runs is cleared: a pair shows its changed words first.
            return (
                gr.Radio(visible=not pair),
                gr.Textbox(visible=not pair and vary != "scheduler"),
                gr.CheckboxGroup(visible=not pair and vary == "scheduler"),
                gr.Textbox(visible=pair),
                gr.Dropdown(value=None),
            )

        def on_compare_vary(vary):
            return (
                gr.Textbox(value=compare_view.DEFAULT_VALUES.get(vary, ""), visible=vary != "scheduler"),
                gr.CheckboxGroup(visible=vary == "scheduler"),
            )

        @friendly
        def after_run(state, word_value, alpha, colormap):
            run = views.require(state).run
            n = run.num_steps
            sides = sorted({layer.height for layer in run.layers}, reverse=True)
            full = views.Filters()
            panels = views.step_panels(state, n)
            heat_image = views.heatmap(state, word_value, False, full, alpha, colormap) if word_value else None
            return (
                gr.Slider(maximum=n, value=1),
                gr.Slider(maximum=n, value=n),
                gr.CheckboxGroup(value=BLOCKS),
                gr.Dropdown(choices=[(f"{s}×{s}", s) for s in sides], value=[]),
                gr.Dropdown(choices=[(layer.short, layer.name) for layer in run.layers], value=[]),
                gr.Dropdown(choices=head_choices(run), value=-1),
                gr.Checkbox(value=False),
                heat_image,
                views.word_grid(state, False, full, alpha, colormap),
                views.attention_over_time(state, False, full),
                views.ask_canvas(state),
                None,
                views.shapes(state),
                gr.Slider(maximum=n, value=n),
                *step_values(panels, None),
            )

        def head_choices(run):
            kept = next(iter(run.attention.values()), None)
            count = run.layers[0].heads if kept is not None and kept.ndim == 5 else 0
            return [("mean of all heads", -1)] + [(f"head {i + 1}", i) for i in range(count)]

        def step_values(panels, step_heat_image):
            return (
                panels["caption"],
                panels["xt"],
                panels["x0"],
                panels["decoded"],
                panels["z_rgb"],
                panels["z_channels"],
                panels["schedule"],
                gr.Image(value=step_heat_image, visible=step_heat_image is not None),
            )

        @friendly
        def on_heatmap(word_value, neg, alpha, colormap, state, *form):
            return views.heatmap(views.require(state), word_value, neg, filters(state, *form), alpha, colormap)

        @friendly
        def on_grid(neg, alpha, colormap, state, *form):
            f = filters(state, *form)
            return views.word_grid(state, neg, f, alpha, colormap), views.attention_over_time(state, neg, f)

        @friendly
        def on_negative(neg, alpha, colormap, state, *form):
            run = views.require(state).run
            choices = views.words_of(run, neg)
            if neg and not choices:
                raise ValueError(
                    "this run had no negative prompt: type one (and keep guidance above 1), then generate again"
                )
            f = filters(state, *form)
            return (
                gr.Radio(choices=choices, value=choices[0] if choices else None),
                views.heatmap(state, choices[0], neg, f, alpha, colormap) if choices else None,
                views.word_grid(state, neg, f, alpha, colormap),
                views.attention_over_time(state, neg, f),
            )

        @friendly
        def on_step(step_value, follow_on, word_value, neg, alpha, colormap, state, *form):
            panels = views.step_panels(views.require(state), int(step_value))
            follow_image = None
            if follow_on and word_value:
                follow_image = views.heatmap(
                    state, word_value, neg, filters(state, *form), alpha, colormap, step=int(step_value) - 1
                )
            return step_values(panels, follow_image)

        def on_tick(step_value, follow_on, word_value, neg, alpha, colormap, state, *form):
            if state is None:
                return gr.Timer(active=False), gr.Button("▶ Play"), *([gr.skip()] * (len(step_outputs) + 1))
            nxt = int(step_value) % state.run.num_steps + 1
            return (
                gr.skip(),
                gr.skip(),
                gr.Slider(value=nxt),
                *on_step(nxt, follow_on, word_value, neg, alpha, colormap, state, *form),
            )

        def on_play(label, state):
            if state is None:
                raise gr.Error("Generate an image first: there are no steps to play yet.")
            playing = label.startswith("▶")
            return gr.Timer(active=playing), gr.Button("⏸ Pause" if playing else "▶ Play")

        @zero_gpu
        @friendly
        def on_decode(step_value, state):
            state = views.require(state)
            with models.using(state.model) as pipe:
                state.run.decode(int(step_value) - 1, pipe.vae, "x0")
            return views.step_panels(state, int(step_value))["decoded"], state

        @friendly
        def on_ask(evt: gr.SelectData, state, *form):
            state = views.require(state)
            canvas = views.ask_canvas(state)  # what the page shows; evt.index is in its pixels
            x, y = evt.index
            return views.ask(state, x / canvas.width, y / canvas.height, filters(state, *form))

        @friendly
        def on_files(word_value, neg, alpha, colormap, state, *form):
            state = views.require(state)
            heat_image = (
                views.heatmap(state, word_value, neg, filters(state, *form), alpha, colormap) if word_value else None
            )
            return views.downloads(state, heat_image)

        # -- wiring ---------------------------------------------------------------------------------
        model.change(
            apply_preset, model, [steps, guidance, width, height, scheduler, model_note], api_visibility="private"
        )
        generation = gr.on(
            [run_btn.click, prompt.submit],
            on_generate,
            [model, prompt, negative, scheduler, steps, guidance, seed, randomize, width, height, per_head, session],
            [preview, progress, final, seed_used, tokens, word, heat, notes, session],
            api_name="generate",
            concurrency_id=PIPELINE,
            concurrency_limit=1,
            show_progress="minimal",
            show_progress_on=[progress],
        )
        generation.success(
            after_run,
            [session, word, opacity, cmap],
            [
                step_from,
                step_to,
                blocks,
                resolutions,
                layers,
                head,
                use_negative,
                heat,
                grid,
                over_time,
                ask_image,
                ask_plot,
                shapes,
                step,
                *step_outputs,
            ],
            api_visibility="private",
            show_progress="hidden",
        )
        stop_btn.click(
            lambda: texts.progress_html(0, 1, 0, "Stopped. Press Generate to start again."),
            None,
            progress,
            cancels=[generation],
            api_visibility="private",
            queue=False,
        )

        view_style = [use_negative, opacity, cmap, session, *filter_inputs]
        filter_triggers = [
            step_from.release,
            step_to.release,
            blocks.input,
            resolutions.input,
            layers.input,
            head.input,
            opacity.release,
            cmap.input,
        ]
        gr.on(
            [word.input, *filter_triggers],
            on_heatmap,
            [word, *view_style],
            heat,
            api_name="heatmap",
            trigger_mode="always_last",
            show_progress="hidden",
        )
        gr.on(
            filter_triggers,
            on_grid,
            view_style,
            [grid, over_time],
            api_name="word_grid",
            trigger_mode="always_last",
            show_progress="hidden",
        )
        use_negative.input(on_negative, view_style, [word, heat, grid, over_time], api_visibility="private")

        step_inputs = [step, follow, word, *view_style]
        gr.on(
            [step.input, follow.input],
            on_step,
            step_inputs,
            step_outputs,
            api_name="step",
            trigger_mode="always_last",
            show_progress="hidden",
        )
        play.click(on_play, [play, session], [timer, play], api_visibility="private")
        timer.tick(
            on_tick,
            step_inputs,
            [timer, play, step, *step_outputs],
            api_visibility="private",
            show_progress="hidden",
            trigger_mode="always_last",
        )
        decode_btn.click(
            on_decode,
            [step, session],
            [decoded, session],
            api_name="decode",
            concurrency_id=PIPELINE,
            concurrency_limit=1,
        )
        ask_image.select(on_ask, [session, *filter_inputs], ask_plot, api_visibility="private")
        files_btn.click(on_files, [word, *view_style], files, api_name="downloads")

        cmp_mode.input(
            on_compare_mode,
            [cmp_mode, cmp_vary],
            [cmp_vary, cmp_values, cmp_schedulers, cmp_prompt_b, cmp_word],
            api_visibility="private",
            queue=False,
        )
        cmp_vary.input(on_compare_vary, cmp_vary, [cmp_values, cmp_schedulers], api_visibility="private", queue=False)
        comparison = cmp_run.click(
            on_compare,
            [
                cmp_mode,
                cmp_vary,
                cmp_values,
                cmp_schedulers,
                cmp_prompt_b,
                cmp_word,
                cmp_exact,
                model,
                prompt,
                negative,
                scheduler,
                steps,
                guidance,
                seed,
                randomize,
                width,
                height,
            ],
            [cmp_progress, cmp_live, cmp_gallery, cmp_figure, cmp_word, cmp_step, cmp_notes, comparison_state],
            api_name="compare",
            concurrency_id=PIPELINE,
            concurrency_limit=1,
            show_progress="minimal",
            show_progress_on=[cmp_progress],
        )
        cmp_stop.click(
            lambda: texts.progress_html(0, 1, 0, "Stopped. Press Run comparison to start again."),
            None,
            cmp_progress,
            cancels=[comparison],
            api_visibility="private",
            queue=False,
        )
        gr.on(
            [cmp_word.input, cmp_step.input, cmp_exact.input],
            on_compare_view,
            [cmp_word, cmp_step, cmp_exact, comparison_state],
            cmp_figure,
            api_name="compare_view",
            trigger_mode="always_last",
            show_progress="hidden",
        )

    demo.queue(max_size=queue_size, default_concurrency_limit=2)
    return demo
