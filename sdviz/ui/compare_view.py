"""The Compare tab: its form → a checked plan of variants, and what it shows of one user's last comparison.

A plan is (vary, values) for `sdviz.compare`: vary is one of `compare.VARY`, or "prompt" for a prompt pair.
Pure functions over the library; they raise ValueError / KeyError with messages that say what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

from .. import compare, render
from ..compare import MAX_VARIANTS, Variant
from ..settings import SCHEDULERS, Settings
from ..settings import whole_number as whole
from ..tokens import tokens_from_ids
from .inputs import parse_seed
from .views import strongest_word

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


def require(comparison: Comparison | None) -> Comparison:
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
        values = list(schedulers or [])
        unknown = [v for v in values if v not in SCHEDULERS]
        if unknown:
            raise ValueError(f"unknown scheduler {unknown[0]!r}; choose from {', '.join(SCHEDULERS)}")
        _count(values, "schedulers", "tick 2 to 4 schedulers")
        return values
    if vary not in DEFAULT_VALUES:
        raise ValueError(f"can't vary {vary!r}; choose one of: guidance, steps, scheduler, seed")
    items = [item.strip() for item in re.split(r"[,;]", str(text or "")) if item.strip()]
    _count(items, f"{vary} values", f"type them separated by commas, e.g. {DEFAULT_VALUES[vary]}")
    if vary == "guidance":
        return [_number(item) for item in items]
    if vary == "seed":
        return [parse_seed(item, False) for item in items]
    steps = [whole(item, "steps") for item in items]
    for n in steps:
        if not 1 <= n <= max_steps:
            raise ValueError(f"steps must be whole numbers from 1 to {max_steps} for this model; got {n}")
    return steps


def _count(values: list, what: str, how: str):
    if not values:
        raise ValueError(f"no {what} to compare: {how}")
    if len(values) > MAX_VARIANTS:
        raise ValueError(
            f"at most {MAX_VARIANTS} {what} can be compared side by side; got {len(values)}. "
            f"Remove {len(values) - MAX_VARIANTS}."
        )


def _number(item: str) -> float:
    try:
        return float(item)
    except ValueError:
        raise ValueError(
            f"guidance values must be numbers separated by commas, e.g. {DEFAULT_VALUES['guidance']}; got {item!r}"
        ) from None


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


def figure(comparison: Comparison, word: str | None, step, vae=None) -> Image.Image:
    """compare_figure of the stored variants: final images, x0 at the shared `step` (1-based; decoded
    by `vae` when given, else the fast preview), the word's maps."""
    longest = comparison.longest
    step = whole(step if step is not None else longest, "the shared step")
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
    fig = compare.compare_figure(comparison.variants, word=word, step=step - 1, vae=vae)
    return render.to_image(fig)


def gallery(variants: list[Variant]) -> list[tuple[Image.Image, str]]:
    """The finished variants' final images with their labels, for a gr.Gallery."""
    return [(v.image, v.label) for v in variants]
