"""sdviz: see inside Stable Diffusion — which words attend where, the latents, x0 and the noise schedule.

    import sdviz, torch
    pipe = sdviz.load_pipeline("toy")                  # or a Hub id / local diffusers folder
    with sdviz.trace(pipe) as tracer:
        image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    run = tracer.result                                # sdviz.TraceResult
    sdviz.render.overlay(image, run.heatmap("circle", size="image"))
    run.noise_pred_text, run.prompt_embeds             # inside each step: the U-Net's predictions, the text vectors
    sdviz.noise_image(pipe, image, "a red circle", timestep=500).loss   # one training example, on any image

Data flows one way: loading → trace (attention + steps + tokens) → result → render → app / CLI.
"""

from . import anatomy, render
from .explain import ImageExplanation, explain_image
from .generate import Cancelled, generate
from .loading import PRESETS, ModelUnavailableError, load_pipeline
from .noising import noise_image
from .result import Filters, RunInfo, TraceResult
from .settings import SCHEDULERS, Settings
from .trace import Tracer, trace

__all__ = [
    "load_pipeline",
    "trace",
    "Tracer",
    "TraceResult",
    "RunInfo",
    "Filters",
    "generate",
    "noise_image",
    "explain_image",
    "ImageExplanation",
    "Settings",
    "SCHEDULERS",
    "Cancelled",
    "render",
    "anatomy",
    "PRESETS",
    "ModelUnavailableError",
]
__version__ = "0.1.0"
