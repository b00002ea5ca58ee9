"""Comparisons: one prompt run as up to four variants that differ in one setting, or two prompts a word apart.

    variants = sdviz.compare.run_variants(pipe, sdviz.Settings("a red circle"), "guidance", [1, 3, 7.5, 15])
    fig = sdviz.compare.compare_figure(variants, word="circle", step=10)   # images, x0 at step 10, heatmaps

Variants run one after another on the shared pipeline (through `generate`, which restores it after
each), so they go through the app's queue like a single run and stop when `on_step` raises `Cancelled`.
Figures are pure: they read the variants' TraceResults and return a matplotlib Figure.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from . import render
from . import settings as check
from .generate import Cancelled, Settings, generate
from .result import TraceResult

VARY = ("guidance", "steps", "scheduler", "seed")
MAX_VARIANTS = 4


@dataclass
class Variant:
    label: str  # what the column is titled: "guidance 7.5", "20 steps", "DDIM", "seed 3", a prompt
    settings: Settings
    image: Image.Image
    run: TraceResult
    word: str | None = None  # the word whose map this variant shows by default (the changed word of a prompt pair)


# -- running ----------------------------------------------------------------------------------------
def variant_settings(base: Settings, vary: str, values: Sequence) -> list[tuple[str, Settings]]:
    """(label, settings) for each value of `vary`, checked before anything runs; ValueError says what to fix."""
    if vary not in VARY:
        raise ValueError(f"can't vary {vary!r}; choose one of {', '.join(VARY)}")
    values = list(values)
    if not 1 <= len(values) <= MAX_VARIANTS:
        raise ValueError(f"give 1 to {MAX_VARIANTS} values of {vary} to compare; got {len(values)}")
    out = []
    for value in values:
        if vary == "guidance":
            value = check.guidance(value)
            label = f"guidance {value:g}"
        elif vary == "steps":
            value = check.steps(value)
            label = f"{value} steps"
        elif vary == "seed":
            value = check.seed(value)
            label = f"seed {value}"
        else:
            value = label = check.scheduler_name(value)
        out.append((label, dataclasses.replace(base, **{vary: value}).check()))
    return out


def _run_plan(pipe, plan: list[tuple[str, Settings]], on_step: Callable | None, negative: bool):
    """Generate each (label, settings) in turn, yielding Variants; a `Cancelled` carries the finished ones."""
    done: list[Variant] = []
    for i, (label, settings) in enumerate(plan):
        step = None if on_step is None else (lambda s, n, z, i=i: on_step(i, s, n, z))
        try:
            image, run = generate(pipe, settings, on_step=step, negative=negative)
        except Cancelled as err:
            err.variants = done
            raise
        done.append(Variant(label, settings, image, run))
        yield done[-1]


def iter_variants(
    pipe, base: Settings, vary: str, values: Sequence, on_step: Callable | None = None, negative: bool = True
):
    """An iterator of Variants, each as soon as it is done (for an app that shows them one by one).

    on_step(variant_index, step_index, total_steps, latents) runs after every denoising step of every
    variant (latents: [B, C, h, w]); raise `sdviz.Cancelled` from it to stop. The variants finished
    before the stop are on the exception as `err.variants`.
    """
    plan = variant_settings(base, vary, values)  # checked now, before the first variant is asked for
    return _run_plan(pipe, plan, on_step, negative)


def run_variants(
    pipe, base: Settings, vary: str, values: Sequence, on_step: Callable | None = None, negative: bool = True
) -> list[Variant]:
    """Run `base` once per value of `vary` ("guidance", "steps", "scheduler" or "seed"), one after another.

    Up to four values; every other setting (prompt, seed, size…) stays as in `base`. See `iter_variants`
    for `on_step` and cancelling.
    """
    return list(iter_variants(pipe, base, vary, values, on_step, negative))


_WORD = re.compile(r"[\w']+|[^\w\s]")


def changed_words(a: str | Sequence[str], b: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """The words of `a` and of `b` that the other lacks, in order: "a red circle", "a blue circle" → ["red"], ["blue"].

    `a`, `b`: prompt texts (split into lower-case words and punctuation) or lists of words.
    """
    wa = _WORD.findall(a.lower()) if isinstance(a, str) else [w.lower() for w in a]
    wb = _WORD.findall(b.lower()) if isinstance(b, str) else [w.lower() for w in b]
    only_a, only_b = [], []
    for op, i0, i1, j0, j1 in difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_opcodes():
        if op != "equal":
            only_a += wa[i0:i1]
            only_b += wb[j0:j1]
    return only_a, only_b


def run_prompt_pair(
    pipe, base: Settings, prompt_a: str, prompt_b: str, on_step: Callable | None = None, negative: bool = True
) -> list[Variant]:
    """Two runs of `base` with the same seed and settings, one per prompt ("a red circle" vs "a blue circle").

    Each returned Variant's `word` is its first changed word (None if its prompt only lacks words), so
    `compare_figure(pair)` shows the maps of the changed words side by side. on_step as in `iter_variants`.
    """
    if not prompt_a.strip() or not prompt_b.strip():
        raise ValueError("type two prompts to compare, e.g. 'a red circle' and 'a blue circle'")
    if changed_words(prompt_a, prompt_b) == ([], []):
        raise ValueError(
            f"the two prompts have the same words ({prompt_a!r}); change a word in one of them, "
            f"e.g. 'a red circle' and 'a blue circle'"
        )
    plan = [(prompt, dataclasses.replace(base, prompt=prompt)) for prompt in (prompt_a, prompt_b)]
    for _, settings in plan:
        settings.check()
    variants = list(_run_plan(pipe, plan, on_step, negative))
    # The runs' own words (as the tokenizer split them) name the changed words exactly.
    only_a, only_b = changed_words(*[[w.text for w in v.run.words] for v in variants])
    variants[0].word = only_a[0] if only_a else None
    variants[1].word = only_b[0] if only_b else None
    return variants


# -- figures ----------------------------------------------------------------------------------------
def aligned_steps(variants: Sequence[Variant], step: int | None = None) -> list[int]:
    """Each variant's step at the same point of denoising as `step` of the longest run (None → the last).

    A shared slider runs over the longest run's steps, 0 … N-1; a run of n steps shows step
    round(step · (n-1)/(N-1)), so 10 of 20 steps lines up with 5 of 10.
    """
    longest = max(v.run.num_steps for v in variants)
    if step is None:
        step = longest - 1
    if not 0 <= step < longest:
        raise IndexError(f"step {step} is out of range: the longest run has steps 0–{longest - 1}")
    fraction = step / (longest - 1) if longest > 1 else 1.0
    return [int(np.floor(fraction * (v.run.num_steps - 1) + 0.5)) for v in variants]  # halves round up


def _step_image(run: TraceResult, step: int, which: str, vae, previewer) -> np.ndarray:
    """uint8 [h, w, 3]: the exact VAE decode when a VAE is given, else the previewer's picture, else the linear map."""
    if vae is not None:
        return run.decode(step, vae, which)
    return previewer.picture(run, step, which) if previewer is not None else run.preview(step, which)


def _step_label(vae, previewer) -> str:
    if vae is not None:
        return "exact VAE decode"
    return previewer.label if previewer is not None else "fast linear preview"


def _off(ax):
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def compare_figure(
    variants: Sequence[Variant],
    word: str | Sequence[str | None] | None = None,
    step: int | None = None,
    which: str = "x0",
    vae=None,
    previewer=None,
    **filters,
) -> Figure:
    """One column per variant: the final image, the `which` latent at a shared step, and `word`'s heatmap.

    word: one word for every variant, one per variant (a prompt pair's changed words), or None to use
    each variant's own `word` (no heatmap row if none has one). The heatmaps share one colour scale
    (lowest to highest value over all of them), so stronger attention reads as warmer in every column.
    step: on the longest run's scale (see `aligned_steps`); None → the last step.
    vae: decode the step exactly (slower); else `previewer` (`sdviz.preview.Previewer`) draws it; else the
    fast linear preview. filters: as for `run.heatmap`.
    """
    if not variants:
        raise ValueError("nothing to compare: run some variants first")
    words = list(word) if isinstance(word, (list, tuple)) else [word] * len(variants)
    if len(words) != len(variants):
        raise ValueError(f"give one word per variant ({len(variants)}); got {len(words)}")
    words = [w if w is not None else v.word for w, v in zip(words, variants)]
    steps = aligned_steps(variants, step)
    maps = [None if w is None else v.run.heatmap(w, size="image", **filters) for w, v in zip(words, variants)]
    shown = [m for m in maps if m is not None]
    lo = min((float(m.min()) for m in shown), default=0.0)
    span = max((float(m.max()) for m in shown), default=1.0) - lo or 1.0

    rows = 3 if any(m is not None for m in maps) else 2
    cols = len(variants)
    fig = Figure(figsize=(2.3 * cols + 0.4, 2.3 * rows + 0.3))
    for c, (v, s, w, m) in enumerate(zip(variants, steps, words, maps)):
        final = fig.add_subplot(rows, cols, c + 1)
        final.imshow(v.image)
        final.set_title(textwrap.fill(v.label, 22), fontsize=11)  # a prompt wraps instead of running into the next
        mid = fig.add_subplot(rows, cols, cols + c + 1)
        mid.imshow(Image.fromarray(_step_image(v.run, s, which, vae, previewer)).resize(v.image.size, Image.BILINEAR))
        mid.set_xlabel(f"step {s + 1}/{v.run.num_steps}", fontsize=10)
        panels = [final, mid]
        if rows == 3:
            heat = fig.add_subplot(rows, cols, 2 * cols + c + 1)
            panels.append(heat)
            if m is None:
                heat.text(0.5, 0.5, "no changed word", ha="center", va="center", fontsize=10, color="grey")
            else:
                heat.imshow(render.overlay(v.image, np.clip((m - lo) / span, 0, 1), normalize=False))
                heat.set_xlabel(f"“{w}”  peak {m.max():.3g}", fontsize=10)
        for ax in panels:
            _off(ax)
        if c == 0:
            final.set_ylabel("final image", fontsize=10)
            mid.set_ylabel(f"{which} at shared step\n({_step_label(vae, previewer)})", fontsize=10)
            if rows == 3:
                panels[2].set_ylabel("heatmap (shared scale)", fontsize=10)
    fig.tight_layout()
    return fig


def strip_figure(variants: Sequence[Variant], count: int = 6, which: str = "x0", vae=None, previewer=None) -> Figure:
    """One row per variant: its `which` latent at `count` points of denoising shared by all rows."""
    if not variants:
        raise ValueError("nothing to compare: run some variants first")
    longest = max(v.run.num_steps for v in variants)
    points = sorted(set(np.linspace(0, longest - 1, min(count, longest)).round().astype(int).tolist()))
    fig = Figure(figsize=(1.5 * len(points) + 1.2, 1.6 * len(variants) + 0.3))
    for c, point in enumerate(points):
        for r, (v, s) in enumerate(zip(variants, aligned_steps(variants, point))):
            ax = fig.add_subplot(len(variants), len(points), r * len(points) + c + 1)
            ax.imshow(_step_image(v.run, s, which, vae, previewer))
            ax.set_xlabel(f"step {s + 1}/{v.run.num_steps}", fontsize=9)
            _off(ax)
            if c == 0:
                ax.set_ylabel(textwrap.fill(v.label, 18), fontsize=9)
    fig.tight_layout()
    return fig
