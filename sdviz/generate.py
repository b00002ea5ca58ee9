"""One traced generation with the settings the app and the CLI expose (prompt, scheduler, steps, seed…).

Checks inputs first (errors say what to do), swaps the scheduler for the call only, reports each step
through `callback_on_step_end`, and always leaves the pipeline as it found it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
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

from .trace import trace

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

MAX_SIDE = 2048


class Cancelled(Exception):
    """Raised from a step callback to stop a generation; the pipeline is restored as after any error."""


@dataclass
class Settings:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None   # a key of SCHEDULERS; None keeps the pipeline's own

    def check(self, max_steps: int = 150, max_side: int = MAX_SIDE):
        """Raise ValueError with what to do for settings the pipeline can't run."""
        if not isinstance(self.steps, int) or not 1 <= self.steps <= max_steps:
            raise ValueError(f"steps must be a whole number from 1 to {max_steps}; got {self.steps}")
        if not -1e-9 <= self.guidance <= 50:
            raise ValueError(f"guidance scale must be between 0 and 50 (7.5 is typical, 0–1 turns guidance off); "
                             f"got {self.guidance}")
        for name, side in (("width", self.width), ("height", self.height)):
            if side is None:
                continue
            if side % 8 or not 8 <= side <= max_side:
                raise ValueError(f"{name} must be a multiple of 8 between 8 and {max_side}; got {side}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a whole number from 0 to 2**63-1; got {self.seed!r}")


@contextlib.contextmanager
def use_scheduler(pipe, name: str | None):
    """Swap `pipe.scheduler` for a `name` scheduler built from the pipeline's own config; restore after."""
    if name is None:
        yield pipe.scheduler
        return
    original = pipe.scheduler
    pipe.scheduler = SCHEDULERS[name].from_config(original.config)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


def generate(pipe, settings: Settings, on_step=None, negative: bool = True, per_head: bool = False):
    """Run `settings` on `pipe` under `sdviz.trace`. Returns (PIL image, TraceResult).

    on_step(step_index, total_steps, x0) is called after every scheduler step with that step's
    predicted clean latent x0 ([1, C, h, w], what live previews show); raise `Cancelled` from it
    to stop. The partial trace of a cancelled run is on the exception: `err.result`.
    """
    settings.check()
    generator = torch.Generator("cpu").manual_seed(settings.seed)

    def callback(pipeline, step_index, timestep, kwargs):
        if on_step is not None:
            on_step(step_index, pipeline.num_timesteps, tracer.latest_x0[None])
        return {}

    with use_scheduler(pipe, settings.scheduler):
        tracer = trace(pipe, negative=negative, per_head=per_head, prompt=settings.prompt,
                       negative_prompt=settings.negative_prompt or None)
        try:
            with tracer:
                image = pipe(
                    settings.prompt,
                    negative_prompt=settings.negative_prompt or None,
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance,
                    width=settings.width,
                    height=settings.height,
                    generator=generator,
                    callback_on_step_end=callback,
                ).images[0]
        except BaseException as err:
            err.result = tracer.result  # what was recorded before the stop
            raise
    return image, tracer.result

