"""The generation form → checked `sdviz.Settings`, with messages that say what to do.

Every rule is the library's (`sdviz.settings`); this adds what only a form has: a "Random seed"
box, numbers that arrive as floats or text, and per-model caps on steps and image size.
"""

from __future__ import annotations

from .. import settings as check
from ..settings import MAX_SIDE, Settings
from .models import Models


def max_side(size: int) -> int:
    """Largest width/height offered for a model whose natural size is `size` (twice it, within the library's cap)."""
    return min(MAX_SIDE, 2 * size)


def parse_seed(text, randomize: bool) -> int:
    """A seed from the form: a whole number ≥ 0; -1, "random" or the checkbox pick one at random."""
    return check.random_seed() if randomize else check.seed(text, allow_random=True)


def settings_from_form(
    models: Models,
    model: str,
    prompt,
    negative_prompt,
    scheduler,
    steps,
    guidance,
    seed,
    randomize: bool,
    width,
    height,
) -> Settings:
    """Check every field of the form; raise ValueError naming the field and the fix."""
    preset = models.preset(model)
    settings = Settings(
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        steps=steps,
        guidance=guidance,
        seed=parse_seed(seed, randomize),
        width=width,
        height=height,
        scheduler=scheduler,
    )
    return settings.check(max_steps=preset.max_steps, max_side=max_side(preset.size))


def notes_before(settings: Settings) -> list[str]:
    """What the user should know about a valid request before it runs."""
    notes = []
    if not settings.prompt.strip():
        notes.append(
            "Empty prompt: the model generates unconditionally (from no text), "
            "so there are no words to show heatmaps for."
        )
    return notes
