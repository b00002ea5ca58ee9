"""The settings of one generation, and the one place each of their rules is checked.

Every caller — the library's `generate`, comparisons, the app's form, the command line — checks a
scheduler name, a whole number, a seed or a step count with the functions here, so a rule and its
message exist once. Each raises ValueError saying what was wrong and what to type instead.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SCHEDULERS = {
    "DDIM": DDIMScheduler,
    "DDPM": DDPMScheduler,
    "Euler": EulerDiscreteScheduler,
    "Euler a": EulerAncestralDiscreteScheduler,
    "DPM++ 2M": DPMSolverMultistepScheduler,
    "PNDM": PNDMScheduler,
    "LMS": LMSDiscreteScheduler,
    "UniPC": UniPCMultistepScheduler,
}

MAX_STEPS = 150
MAX_SIDE = 2048
MAX_GUIDANCE = 50.0
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 0 … 2**63 - 1
RANDOM_SEED_MAX = 2**32 - 1  # what a "random seed" draws from: short enough to read out and retype


def whole_number(value, name: str) -> int:
    """`value` (an int, a float such as 20.0 from a slider, or text such as " 20 ") as an int."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number; got {value!r}")
    if isinstance(value, int):
        return value
    text = value.strip() if isinstance(value, str) else value
    try:
        number = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number; got {value!r}") from None
    if not math.isfinite(number) or not number.is_integer():
        raise ValueError(f"{name} must be a whole number; got {value!r}")
    return int(number)


def steps(value, max_steps: int = MAX_STEPS) -> int:
    n = whole_number(value, "steps")
    if not 1 <= n <= max_steps:
        raise ValueError(f"steps must be a whole number from 1 to {max_steps}; got {n}")
    return n


def guidance(value) -> float:
    try:
        scale = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"the guidance scale must be a number such as 7.5; got {value!r}") from None
    if not 0 <= scale <= MAX_GUIDANCE:  # also refuses nan and inf
        raise ValueError(
            f"the guidance scale must be between 0 and {MAX_GUIDANCE:g} (7.5 is typical, 0–1 turns guidance off); "
            f"got {value!r}"
        )
    return scale


def seed(value, allow_random: bool = False) -> int:
    """A seed: a whole number 0 … 2**63-1. With `allow_random` (a form), "-1" or "random" draws one."""
    if allow_random and str(value).strip().lower() in ("random", "-1"):
        return random_seed()
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("the seed is empty: type a whole number such as 42, or ask for a random one")
    how = " (or -1 / “random”)" if allow_random else ""
    try:
        n = whole_number(value, "the seed")
    except ValueError:
        raise ValueError(f"the seed must be a whole number such as 42{how}; got {value!r}") from None
    if not 0 <= n < SEED_LIMIT:
        raise ValueError(f"the seed must be a whole number from 0 to 2**63-1{how}; got {n}")
    return n


def random_seed() -> int:
    return random.SystemRandom().randint(0, RANDOM_SEED_MAX)


def side(value, name: str, max_side: int = MAX_SIDE) -> int:
    n = whole_number(value, name)
    if n % 8 or not 8 <= n <= max_side:
        raise ValueError(f"{name} must be a multiple of 8 between 8 and {max_side}; got {n}")
    return n


def scheduler_name(name) -> str:
    """One of `SCHEDULERS`; case, spaces, dashes and underscores don't matter ("euler-a" is "Euler a")."""

    def squash(text: str) -> str:
        return "".join(ch for ch in str(text).lower() if ch not in " _-")

    for known in SCHEDULERS:
        if squash(known) == squash(name):
            return known
    raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")


@dataclass
class Settings:
    """What one generation asks for; `check()` returns a copy with every field checked and normalised."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None  # a key of SCHEDULERS; None keeps the pipeline's own

    def check(self, max_steps: int = MAX_STEPS, max_side: int = MAX_SIDE) -> Settings:
        """Raise ValueError saying what to do for settings the pipeline can't run; else the checked settings."""
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise ValueError("the prompt and the negative prompt must be text")
        return Settings(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=steps(self.steps, max_steps),
            guidance=guidance(self.guidance),
            seed=seed(self.seed),
            width=None if self.width is None else side(self.width, "width", max_side),
            height=None if self.height is None else side(self.height, "height", max_side),
            scheduler=None if self.scheduler is None else scheduler_name(self.scheduler),
        )
