"""One user's last run (`Session`, kept in `gr.State`) and what several panels read from it.

Pure functions over the library: a trace in, PIL images and plain values out. They raise ValueError /
KeyError with the library's teaching messages; `wiring.handler` turns those into `gr.Error`.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .. import render
from ..result import Filters, TraceResult
from ..settings import Settings, whole_number

BLOCKS = ["down", "mid", "up"]


@dataclass
class Session:
    """One user's last run, kept in gr.State (deep-copied per session, never shared)."""

    run: TraceResult
    image: np.ndarray  # uint8 [H, W, 3] the final image (for a stopped run: its last x0, decoded)
    model: str  # the model's key in `Models`
    seed: int
    elapsed: float  # seconds the run took
    settings: Settings
    label: str  # the model as the page names it
    # Pictures drawn once per run and reused by later events (e.g. the schedule chart); never shared.
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    serial: str = field(default_factory=lambda: uuid.uuid4().hex)  # names this run (panels know what they drew)

    @property
    def partial(self) -> bool:
        """True for a run stopped before its last step."""
        return not self.run.info.complete


NO_RUN = (
    "Generate an image first: this panel shows the trace of your last run, and there is none yet. "
    "Type a prompt and press Generate."
)


def require(session: Session | None) -> Session:
    if session is None:
        raise ValueError(NO_RUN)
    return session


def filters_from_form(run: TraceResult, from_step, to_step, blocks, resolutions, layers, head) -> Filters:
    """Form values (1-based inclusive steps, empty = all) → the library's Filters."""
    n = run.num_steps
    first = whole_number(from_step if from_step not in (None, "") else 1, "from step")
    last = whole_number(to_step if to_step not in (None, "") else n, "to step")
    last = min(last, n)  # sliders start with room for any run; "to" at its maximum means the last step
    if not 1 <= first <= last:
        raise ValueError(
            f"the step range must run forwards within 1–{n}; got {first}–{last}. Move “from step” below “to step”."
        )
    all_blocks = {layer.block for layer in run.layers}
    return Filters(
        steps=None if (first, last) == (1, n) else (first - 1, last),
        blocks=None if blocks is None or set(blocks) >= all_blocks else tuple(blocks),
        resolutions=tuple(int(r) for r in resolutions) if resolutions else None,
        layers=tuple(layers) if layers else None,
        heads=None if head in (None, -1, "-1") else (whole_number(head, "head"),),
    )


def words_of(run: TraceResult, negative: bool = False) -> list[str]:
    """The distinct words of the prompt (or the negative prompt), in order: one chip each."""
    return list(dict.fromkeys(w.text for w in (run.negative_words if negative else run.words)))


# Words whose maps rarely say anything on their own; skipped when choosing the first heatmap.
FUNCTION_WORDS = frozenset("a an the and of on in at to with above below under over , .".split())


def strongest_word(run: TraceResult) -> str | None:
    """The content word that got the largest share of attention over the run: a telling first heatmap.

    Words the model doesn't know (see `unknown_words`) are passed over: their maps mean nothing."""
    if not run.words or not run.attention:
        return None
    shares = run.word_shares().mean(0)
    unknown = set(unknown_words(run))
    content = [i for i, w in enumerate(run.words) if w.text.lower() not in FUNCTION_WORDS | unknown]
    return run.words[max(content or range(len(run.words)), key=lambda i: shares[i])].text


def unknown_words(run: TraceResult) -> list[str]:
    """Words of the prompt outside the built-in model's vocabulary (none for other models: real SD reads
    any text, splitting rare words into pieces it knows)."""
    from pathlib import Path

    from ..loading import TOY_MODEL_DIR
    from ..toy.world import WORDS

    model = run.info.model
    if not model or not Path(model).exists() or Path(model).resolve() != TOY_MODEL_DIR.resolve():
        return []
    return list(dict.fromkeys(w.text for w in run.words if w.text.lower() not in WORDS))


def heatmap_image(
    session: Session,
    word: str,
    negative: bool,
    filters: Filters,
    opacity,
    colormap: str,
    step: int | None = None,
    contrast=None,
    temperature: float = 1.0,
) -> Image.Image:
    """The word's attention over the final image; `step` (0-based) narrows it to one step; `contrast` (words)
    shares each pixel among them (TraceResult.heatmap)."""
    run = session.run
    if not word:
        raise ValueError(
            "pick a word first (the chips under “Words”)"
            if words_of(run, negative)
            else "this prompt has no words to map: type a prompt and generate again"
        )
    kwargs = filters.kwargs()
    if step is not None:
        kwargs["steps"] = step
    if contrast:
        kwargs.update(contrast=list(contrast), temperature=float(temperature))
    heat = run.heatmap(word, size="image", negative=negative, **kwargs)
    return render.scaled_overlay(session.image, heat, colormap, float(opacity))


def describe(run: TraceResult, word: str, filters: Filters, negative: bool = False) -> str:
    """What a map shows, for its caption: “red” · steps 1–20 of 20 · 7 of 7 layers (16×16, 8×8) · mean of heads."""
    n = run.num_steps
    steps = f"all {n} steps" if filters.steps is None else f"steps {filters.steps[0] + 1}–{filters.steps[1]} of {n}"
    chosen = run.select_layers(filters.layers, filters.blocks, filters.resolutions)
    sides = ", ".join(f"{s}×{s}" for s in sorted({layer.height for layer in chosen}, reverse=True))
    heads = "mean of all heads" if filters.heads is None else "head " + ", ".join(str(h + 1) for h in filters.heads)
    which = "negative prompt's " if negative else ""
    if re.fullmatch(r"#\d+", str(word).strip()):  # a single token, as the chips name it
        index = int(str(word).strip()[1:])
        tokens = run.negative_tokens if negative else run.tokens
        word = next((f"{t.text} (token #{t.index})" for t in tokens if t.index == index), word)
    return f"Heatmap of the {which}“{word}” · {steps} · {len(chosen)} of {len(run.layers)} layers ({sides}) · {heads}"
