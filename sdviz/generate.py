"""One traced generation with the settings the app and the CLI expose (prompt, scheduler, steps, seed…).

Checks inputs first (errors say what to do), swaps the scheduler for the call only, reports each step
through `callback_on_step_end`, and always leaves the pipeline as it found it.
"""

from __future__ import annotations

import contextlib

import torch

from .result import TraceResult
from .settings import SCHEDULERS, Settings
from .trace import trace

__all__ = ["Cancelled", "Settings", "SCHEDULERS", "generate", "use_scheduler"]


class Cancelled(Exception):
    """Raised from a step callback to stop a generation; the pipeline is restored as after any error.

    `generate` fills `result` with the partial trace of the stopped run, and comparisons fill
    `variants` with the variants that finished before it.
    """

    result: TraceResult | None
    variants: list

    def __init__(self, message: str = "stopped", result: TraceResult | None = None, variants=()):
        super().__init__(message)
        self.result = result
        self.variants = list(variants)


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


def generate(
    pipe,
    settings: Settings,
    on_step=None,
    negative: bool = True,
    per_head: bool = False,
    keep_queries: bool = False,
    self_attention: bool = False,
):
    """Run `settings` on `pipe` under `sdviz.trace`. Returns (PIL image, TraceResult).

    `keep_queries` and `self_attention` turn on those trace options at their defaults (see `sdviz.trace`).

    on_step(step_index, total_steps, x0) is called after every scheduler step with that step's
    predicted clean latent x0 ([1, C, h, w], what live previews show); raise `Cancelled` from it
    to stop. The partial trace of a cancelled run is on the exception: `err.result`.
    """
    settings = settings.check()
    generator = torch.Generator("cpu").manual_seed(settings.seed)

    def callback(pipeline, step_index, timestep, kwargs):
        if on_step is not None:
            on_step(step_index, pipeline.num_timesteps, tracer.latest_x0[None])
        return {}

    with use_scheduler(pipe, settings.scheduler):
        tracer = trace(
            pipe,
            negative=negative,
            per_head=per_head,
            keep_queries=keep_queries,
            self_attention=self_attention,
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt or None,
        )
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
        except Cancelled as err:
            err.result = tracer.result  # what was recorded before the stop
            raise
    return image, tracer.result
