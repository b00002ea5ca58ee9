"""The generation form → checked `sdviz.Settings`, with messages that say what to do.

The library's `Settings.check` covers ranges; this adds what only a form has: seeds typed as text,
numbers that arrive as floats, per-model caps on steps and image size.
"""

from __future__ import annotations

import random

from ..generate import MAX_SIDE, SCHEDULERS, Settings
from .models import Models

SEED_MAX = 2**32 - 1


def max_side(size: int) -> int:
    """Largest width/height offered for a model whose natural size is `size` (twice it, within the library's cap)."""
    return min(MAX_SIDE, 2 * size)


def parse_seed(text, randomize: bool) -> int:
    """A seed from the form: a whole number ≥ 0; -1, "random" or the checkbox pick one at random."""
    if randomize:
        return random.SystemRandom().randint(0, SEED_MAX)
    text = "" if text is None else str(text).strip()
    if not text:
        raise ValueError("the seed is empty: type a whole number such as 42, or tick “Random seed”")
    if text.lower() in ("random", "-1"):
        return random.SystemRandom().randint(0, SEED_MAX)
    try:
        seed = int(text)
    except ValueError:
        raise ValueError(f"the seed must be a whole number such as 42 (or -1 / “random”); got {text!r}") from None
    if not 0 <= seed < 2**63:
        raise ValueError(f"the seed must be between 0 and 2**63-1 (or -1 for a random one); got {seed}")
    return seed


def whole(value, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number; got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"{name} must be a whole number; got {value}")
    return int(number)


def settings_from_form(models: Models, model: str, prompt, negative_prompt, scheduler, steps, guidance, seed,
                       randomize: bool, width, height) -> Settings:
    """Check every field of the form; raise ValueError naming the field and the fix."""
    preset = models.preset(model)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance scale must be a number such as 7.5; got {guidance!r}") from None
    settings = Settings(
        prompt=prompt or "", negative_prompt=negative_prompt or "", steps=whole(steps, "steps"),
        guidance=guidance, seed=parse_seed(seed, randomize), width=whole(width, "width"),
        height=whole(height, "height"), scheduler=scheduler,
    )
    settings.check(max_steps=preset.max_steps, max_side=max_side(preset.size))
    return settings


def notes_before(settings: Settings) -> list[str]:
    """What the user should know about a valid request before it runs."""
    notes = []
    if not settings.prompt.strip():
        notes.append("Empty prompt: the model generates unconditionally (from no text), "
                     "so there are no words to show heatmaps for.")
    return notes
