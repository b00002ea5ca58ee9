"""Compare: the prompt run up to four times changing one setting (guidance, steps, scheduler, seed), or
two prompts a word apart; final images, x0 at a shared step and the word's maps on one colour scale.
API: /compare, /compare_view. A plan is (vary, values) for `sdviz.compare`: vary is one of
`compare.VARY`, or "prompt" for a prompt pair."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import gradio as gr
from PIL import Image

from ... import compare, render
from ... import settings as check
from ...compare import MAX_VARIANTS, Variant
from ...settings import SCHEDULERS, Settings
from ...tokens import tokens_from_ids
from .. import texts
from ..inputs import settings_from_form
from ..models import Models
from ..session import strongest_word
from ..streaming import Compared, Tick, VariantDone, compare_streaming
from ..wiring import PIPELINE, STATE_TTL_S, App, StopRequests, drawn, handler, pipeline_errors, wire_stop, zero_gpu

TITLE, ID = "Compare", "compare"

EXPLAIN = """**Compare.** Runs the prompt, model and settings of the form above several times, changing one
thing: the guidance scale, the number of steps, the scheduler or the seed (up to four values) — or a second
prompt a word apart (“a red circle” vs “a blue circle”). Each column shows the final image, the guess of the
clean image **x0 at the shared step** (runs with fewer steps show the same point of denoising) and the word's
heatmap on **one colour scale**, so warmer means more attention in every column. The step slider and the word
re-draw the stored runs; the model does not run again. x0 is drawn with the fast linear preview unless you tick
the VAE decode, which shows the exact image the latent stands for."""

CHANGED = "(changed words)"  # the word choice that shows each prompt's own changed word
DEFAULT_VALUES = {"guidance": "1, 3, 7.5, 15", "steps": "5, 10, 20, 40", "seed": "0, 1, 2, 3"}
DEFAULT_SCHEDULERS = ["DDIM", "Euler", "DPM++ 2M", "UniPC"]


@dataclass
class Comparison:
    """One user's last finished comparison, kept in gr.State (deep-copied per session, never shared)."""

    variants: list[Variant]
    vary: str  # "guidance", "steps", "scheduler", "seed" or "prompt"
    model: str  # the model the variants ran on: its VAE decodes x0 exactly on request

    @property
    def longest(self) -> int:
        return max(v.run.num_steps for v in self.variants)


def require_comparison(comparison: Comparison | None) -> Comparison:
    if comparison is None:
        raise ValueError(
            "Run a comparison first: this view re-draws your last comparison, and there is none yet. "
            "Pick what to vary and press “Run comparison”."
        )
    return comparison


# -- the form → a plan ------------------------------------------------------------------------------
def parse_values(vary: str, text, schedulers, max_steps: int) -> list:
    """The values to compare, checked: numbers typed as comma-separated text, or the ticked schedulers."""
    if vary == "scheduler":
        values = [check.scheduler_name(v) for v in schedulers or []]
        _count(values, "schedulers", "tick 2 to 4 schedulers")
        return values
    if vary not in DEFAULT_VALUES:
        raise ValueError(f"can't vary {vary!r}; choose one of: guidance, steps, scheduler, seed")
    items = [item.strip() for item in re.split(r"[,;]", str(text or "")) if item.strip()]
    _count(items, f"{vary} values", f"type them separated by commas, e.g. {DEFAULT_VALUES[vary]}")
    rule = {"guidance": check.guidance, "seed": check.seed, "steps": lambda v: check.steps(v, max_steps)}[vary]
    try:
        return [rule(item) for item in items]
    except ValueError as err:
        raise ValueError(f"{err}. Type the values separated by commas, e.g. {DEFAULT_VALUES[vary]}") from None


def _count(values: list, what: str, how: str):
    if not values:
        raise ValueError(f"no {what} to compare: {how}")
    if len(values) > MAX_VARIANTS:
        raise ValueError(
            f"at most {MAX_VARIANTS} {what} can be compared side by side; got {len(values)}. "
            f"Remove {len(values) - MAX_VARIANTS}."
        )


def plan(mode: str, vary: str, values_text, schedulers, prompt_a: str, prompt_b: str, max_steps: int):
    """The form's comparison → (vary, values) for `compare_streaming`; ValueError says what to fix."""
    if mode == "pair":
        check_pair(prompt_a, prompt_b)
        return "prompt", [prompt_a, prompt_b]
    if mode != "vary":
        raise ValueError(f"unknown comparison mode {mode!r}: choose 'vary' (one setting) or 'pair' (two prompts)")
    return vary, parse_values(vary, values_text, schedulers, max_steps)


def check_pair(prompt_a: str, prompt_b: str):
    if not (prompt_a or "").strip():
        raise ValueError("type the first prompt in the Prompt box above, e.g. 'a red circle'")
    if not (prompt_b or "").strip():
        raise ValueError(
            f"type a second prompt to compare with {prompt_a!r}, e.g. the same prompt with one word changed"
        )
    if compare.changed_words(prompt_a, prompt_b) == ([], []):
        raise ValueError(
            f"the two prompts have the same words ({prompt_a!r}): change a word in the second one, "
            f"e.g. 'a red circle' and 'a blue circle'"
        )


def prompt_words(pipe, prompt: str) -> list[str]:
    """The words of `prompt` as the pipeline's tokenizer groups them (what a trace will call them)."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return [w.text for w in tokens_from_ids(tokenizer, ids)[1]]


def check_word(word: str | None, prompts: list[str], words: list[list[str]]):
    """Refuse a typed word that a comparison could not map. `words`: each prompt's words (`prompt_words`)."""
    if not word or word == CHANGED:
        return
    has = [word.strip().lower() in {w.lower() for w in ws} for ws in words]
    if not any(has):
        listing = ", ".join(dict.fromkeys(w for ws in words for w in ws)) or "(none: the prompt is empty)"
        raise ValueError(f"{word!r} is not a word of the prompt; pick one of: {listing} (or leave the word empty)")
    if not all(has):
        missing = prompts[has.index(False)]
        raise ValueError(f"{word!r} is not in {missing!r}: pick a word both prompts have, or {CHANGED}")


def check_plan(pipe, word: str | None, base: Settings, vary: str, values: list):
    """Refuse, before anything runs, settings the library can't run and a word the prompt(s) lack."""
    if vary != "prompt":
        compare.variant_settings(base, vary, values)
    prompts = values if vary == "prompt" else [base.prompt]
    check_word(word, prompts, [prompt_words(pipe, p) for p in prompts])


def settings_label(base: Settings, vary: str) -> str:
    """What the variants share, for the caption under the figure."""
    shared = {
        "prompt": f"“{base.prompt}”",
        "seed": f"seed {base.seed}",
        "steps": f"{base.steps} steps",
        "guidance": f"guidance {base.guidance:g}",
        "scheduler": base.scheduler or "the model's scheduler",
    }
    shared.pop(vary, None)
    return (
        "**Below, one column per variant:** final image, x0 at the shared step, the word's heatmap "
        "(one colour scale). Same " + ", ".join(shared.values())
    )


# -- what the tab shows -------------------------------------------------------------------------------
def word_choices(comparison: Comparison) -> list[tuple[str, str]]:
    """The words the heatmap row can show: (label, value) for a gr.Dropdown."""
    variants = comparison.variants
    if comparison.vary == "prompt":
        common = [
            w.text
            for w in variants[0].run.words
            if all(w.text.lower() in {x.text.lower() for x in v.run.words} for v in variants[1:])
        ]
        changed = " / ".join(v.word or "—" for v in variants)
        return [(f"changed words: {changed}", CHANGED)] + [(w, w) for w in dict.fromkeys(common)]
    return [(w, w) for w in dict.fromkeys(w.text for w in variants[0].run.words)]


def default_word(comparison: Comparison) -> str | None:
    if comparison.vary == "prompt":
        return CHANGED
    return strongest_word(comparison.variants[0].run)


def figure(comparison: Comparison, word: str | None, step, vae=None, previewer=None) -> Image.Image:
    """compare_figure of the stored variants: final images, x0 at the shared `step` (1-based; decoded
    by `vae` when given, else the fast preview), the word's maps."""
    longest = comparison.longest
    step = check.whole_number(step if step is not None else longest, "the shared step")
    if not 1 <= step <= longest:
        raise ValueError(f"the shared step must be from 1 to {longest} (the longest run's steps); got {step}")
    if not word or word == CHANGED:
        word = None if comparison.vary == "prompt" else default_word(comparison)
    elif comparison.vary == "prompt":
        check_word(
            word,
            [v.settings.prompt for v in comparison.variants],
            [[w.text for w in v.run.words] for v in comparison.variants],
        )
    fig = compare.compare_figure(comparison.variants, word=word, step=step - 1, vae=vae, previewer=previewer)
    return render.to_image(fig)


def gallery(variants: list[Variant]) -> list[tuple[Image.Image, str]]:
    """The finished variants' final images with their labels, for a gr.Gallery. A prompt pair's caption
    starts with its changed word, which a cut-off caption would otherwise lose."""
    return [(v.image, f"“{v.word}” · {v.label}" if v.word else v.label) for v in variants]


# -- handlers ---------------------------------------------------------------------------------------
@zero_gpu
def run(
    mode: str,
    vary: str,
    values: str,
    schedulers: list,
    second_prompt: str,
    word: str,
    exact_decode: bool,
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
    request: gr.Request,
    *,
    models: Models,
    stops: StopRequests,
):
    """Stream a comparison: progress, live preview, each variant's image as it finishes, then the figure."""
    base = settings_from_form(
        models, model, prompt, negative_prompt, scheduler, steps, guidance, seed, random_seed, width, height
    )
    vary, planned = plan(mode, vary, values, schedulers, base.prompt, second_prompt, models.preset(model).max_steps)
    with pipeline_errors(model, "Run comparison"):
        pipe = models.pipeline(model)
    check_plan(pipe, word, base, vary, planned)
    hash_ = getattr(request, "session_hash", None)
    flag = stops.start(hash_)
    done = []
    try:
        with (
            pipeline_errors(model, "Run comparison"),
            contextlib.closing(compare_streaming(models, model, base, vary, planned, stop=flag)) as events,
        ):
            for event in events:
                if isinstance(event, Tick):
                    html = texts.progress_html(event.step, event.total, event.elapsed, event.message)
                    yield {"progress": html} if event.preview is None else {"progress": html, "live": event.preview}
                elif isinstance(event, VariantDone):
                    done.append(event.variant)
                    yield {"gallery": gallery(done)}
                elif isinstance(event, Compared):
                    yield compared(event, Comparison(event.variants, vary, model), base, word, exact_decode, models)
    finally:
        stops.finish(hash_, flag)


def compared(event: Compared, comparison: Comparison, base: Settings, word, exact_decode, models: Models) -> dict:
    count = len(comparison.variants)
    if event.stopped:
        message = f"Stopped after {count} of the variants" if count else "Stopped before the first variant finished"
    else:
        message = f"Done: {count} variants in {event.elapsed:.1f} s"
    out = {"progress": texts.progress_html(1, 1, event.elapsed, message), "gallery": gallery(comparison.variants)}
    if not count:
        return out
    word = word or default_word(comparison)
    n = comparison.longest
    shared = default_step(n)
    return {
        **out,
        "figure": draw(comparison, word, shared, exact_decode, models),
        "word": gr.Dropdown(choices=word_choices(comparison), value=word),
        "step": gr.Slider(maximum=n, value=shared),
        "notes": settings_label(base, comparison.vary),
        "comparison": comparison,
    }


def default_step(longest: int) -> int:
    """The shared step a comparison opens on: 40 % of the way, where runs still differ (at the last step
    most schedulers agree, and the final images show it anyway)."""
    return max(1, round(0.4 * longest))


def prompt_choices(prompt: str, model: str, word: str, *, models: Models) -> dict:
    """The word list before any comparison: the current prompt's words (as the tokenizer groups them when
    the model is loaded; by spaces otherwise, so typing never loads a model)."""
    if models.loaded(model):
        found = prompt_words(models.pipeline(model), prompt or "")
    else:
        found = re.findall(r"[\w'’-]+", prompt or "")
    found = list(dict.fromkeys(found))
    return {"word": gr.Dropdown(choices=[(w, w) for w in found], value=word if word in found else None)}


def draw(comparison: Comparison, word, step, exact_decode: bool, models: Models) -> Image.Image:
    """The comparison figure; x0 by the model's VAE when asked (or when the previewer is that VAE anyway).
    Decoding only reads the VAE, which no trace hooks, so it needs no lock on the model."""
    vae = models.pipeline(comparison.model).vae if exact_decode else None
    return figure(comparison, word, step, vae=vae, previewer=models.previewer(comparison.model))


def view(word: str, step: float, exact_decode: bool, comparison, *, models: Models) -> dict:
    """Re-draw the last comparison at another shared step or word (the model does not run)."""
    return {"figure": draw(require_comparison(comparison), word, step, exact_decode, models)}


def switch_mode(mode: str, vary: str) -> dict:
    pair = mode == "pair"
    # The word picked for the other mode's runs is cleared: a pair shows its changed words first.
    return {
        "vary": gr.Radio(visible=not pair),
        "values": gr.Textbox(visible=not pair and vary != "scheduler"),
        "schedulers": gr.CheckboxGroup(visible=not pair and vary == "scheduler"),
        "second_prompt": gr.Textbox(visible=pair),
        "word": gr.Dropdown(value=None),
    }


def switch_vary(vary: str) -> dict:
    return {
        "values": gr.Textbox(value=DEFAULT_VALUES.get(vary, ""), visible=vary != "scheduler"),
        "schedulers": gr.CheckboxGroup(visible=vary == "scheduler"),
    }


# -- layout and wiring ------------------------------------------------------------------------------
class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Row():
                    self.mode = gr.Radio(
                        [("Vary one setting", "vary"), ("Two prompts", "pair")],
                        value="vary",
                        label="Compare",
                        elem_id="sdviz-cmp-mode",
                    )
                    self.vary = gr.Radio(
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
                self.values = gr.Textbox(
                    DEFAULT_VALUES["guidance"],
                    max_lines=1,
                    label="Values (comma-separated, up to 4)",
                    elem_id="sdviz-cmp-values",
                )
                self.schedulers = gr.CheckboxGroup(
                    list(SCHEDULERS),
                    value=DEFAULT_SCHEDULERS,
                    label="Schedulers (up to 4)",
                    visible=False,
                    elem_id="sdviz-cmp-schedulers",
                )
                self.second_prompt = gr.Textbox(
                    label="Second prompt (the first is the Prompt above)",
                    lines=1,
                    visible=False,
                    placeholder="a blue circle",
                    elem_id="sdviz-cmp-prompt-b",
                )
            with gr.Column(scale=2):
                self.word = gr.Dropdown(
                    list(dict.fromkeys(re.findall(r"[\w'’-]+", app.form.prompt.value or ""))),
                    value=None,
                    allow_custom_value=True,
                    elem_id="sdviz-cmp-word",
                    label="Word for the heatmaps (empty: the strongest / changed words)",
                )
                self.step = gr.Slider(1, app.most_steps, value=1, step=1, label="Shared step", elem_id="sdviz-cmp-step")
                self.exact = gr.Checkbox(
                    False, label="Decode x0 with the VAE (exact; slower on big models)", elem_id="sdviz-cmp-exact"
                )
                with gr.Row():
                    self.run = gr.Button("Run comparison", variant="primary", elem_id="sdviz-cmp-run")
                    self.stop = gr.Button("Stop", variant="stop", elem_id="sdviz-cmp-stop")
        self.progress = gr.HTML(texts.progress_html(0, 1, 0, "Ready"), elem_id="sdviz-cmp-progress")
        with gr.Row(equal_height=False):
            self.live = gr.Image(
                label="Live preview (x0 of the running variant)",
                interactive=False,
                elem_id="sdviz-cmp-live",
                elem_classes="sdviz-fill",
                height=200,
                scale=1,
            )
            self.gallery = gr.Gallery(
                label="Final images, as each variant finishes",
                columns=4,
                height=240,
                elem_id="sdviz-cmp-gallery",
                format="png",
                scale=3,
                object_fit="contain",
                buttons=["download", "fullscreen"],
            )
        self.notes = gr.Markdown(elem_id="sdviz-cmp-notes")
        # No floating label: it would cover the columns' titles (the rows are labelled in the figure).
        self.figure = drawn("sdviz-cmp-figure", "Side by side", buttons=["download", "fullscreen"])
        self.comparison = gr.State(None, time_to_live=STATE_TTL_S)

    def wire(self, app: App):
        mode_out = {
            "vary": self.vary,
            "values": self.values,
            "schedulers": self.schedulers,
            "second_prompt": self.second_prompt,
            "word": self.word,
        }
        self.mode.input(
            handler(switch_mode, mode_out),
            [self.mode, self.vary],
            list(mode_out.values()),
            api_visibility="private",
            queue=False,
        )
        vary_out = {"values": self.values, "schedulers": self.schedulers}
        self.vary.input(
            handler(switch_vary, vary_out), self.vary, list(vary_out.values()), api_visibility="private", queue=False
        )
        run_out = {
            "progress": self.progress,
            "live": self.live,
            "gallery": self.gallery,
            "figure": self.figure,
            "word": self.word,
            "step": self.step,
            "notes": self.notes,
            "comparison": self.comparison,
        }
        self.run.click(
            handler(run, run_out, models=app.models, stops=app.stops),
            [
                self.mode,
                self.vary,
                self.values,
                self.schedulers,
                self.second_prompt,
                self.word,
                self.exact,
                *app.form.inputs(heads=False),
            ],
            list(run_out.values()),
            api_name="compare",
            concurrency_id=PIPELINE,
            concurrency_limit=1,
            show_progress="minimal",
            show_progress_on=[self.progress],
        )
        wire_stop(self.stop, self.progress, app.stops)
        gr.on(
            [app.form.prompt.change, app.form.model.change],
            handler(prompt_choices, {"word": self.word}, models=app.models),
            [app.form.prompt, app.form.model, self.word],
            self.word,
            api_visibility="private",
            trigger_mode="always_last",
            show_progress="hidden",
        )
        gr.on(
            [self.word.input, self.step.input, self.exact.input],
            handler(view, {"figure": self.figure}, models=app.models),
            [self.word, self.step, self.exact, self.comparison],
            self.figure,
            api_name="compare_view",
            trigger_mode="always_last",
            show_progress="hidden",
        )
