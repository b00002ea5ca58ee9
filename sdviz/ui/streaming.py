"""Run `sdviz.generate` in a worker thread and stream its progress as a generator of events.

The generator yields `Tick`s (step counter, elapsed time and, at most `previews_per_s` times a second,
a small latent → RGB preview of the step's predicted x0) and finally one `Done` with the image and the trace. Closing the
generator (Gradio does so when the user presses Stop) makes the next step callback raise
`sdviz.Cancelled`; the library restores the pipeline in `finally`, and `Models.using` keeps the next run
off the pipeline until then.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch
from PIL import Image

from ..generate import Cancelled, Settings, generate
from ..preview import latent_rgb_factors, latent_to_rgb
from ..result import TraceResult
from .models import Models

PREVIEW_WIDTH = 192    # pixels; the browser scales it up, the encode stays cheap
_FINISHED = object()


@dataclass
class Tick:
    step: int               # steps done so far (0 while loading / encoding the prompt)
    total: int
    elapsed: float          # seconds since the request started
    preview: Image.Image | None = None   # fast preview of this step's predicted x0, when due
    message: str = ""


@dataclass
class Done:
    image: Image.Image
    run: TraceResult
    elapsed: float
    text_dim: int | None    # width of the text encoder's token vectors


def live_preview(latent: torch.Tensor, factors: torch.Tensor) -> Image.Image:
    """latent [C, h, w] → small RGB preview through the model's linear latent → RGB map (no VAE)."""
    small = Image.fromarray(latent_to_rgb(latent, factors).numpy())
    width = min(PREVIEW_WIDTH, max(small.width * 8, 64))
    return small.resize((width, width * small.height // small.width), Image.BILINEAR)


def generate_streaming(models: Models, model: str, settings: Settings, per_head: bool = False,
                       previews_per_s: float = 5.0, heartbeat_s: float = 0.5):
    """Yield Tick… then Done. Errors of the run (ModelUnavailableError, pipeline faults) are re-raised here."""
    start = time.perf_counter()
    yield Tick(0, settings.steps, 0.0, message=f"Loading {models.label(model)}…")
    pipe = models.pipeline(model)
    factors = latent_rgb_factors(pipe)                       # [C + 1, 3]; cheap for SD's VAEs, one fit otherwise
    steps: queue.Queue = queue.Queue()
    stop = threading.Event()
    outcome: dict = {}

    def on_step(index: int, total: int, x0: torch.Tensor):
        if stop.is_set():
            raise Cancelled("stopped by the user")
        steps.put((index + 1, total, x0[0].detach().float().cpu().clone()))   # x0 of this step, [C, h, w]

    def work():
        try:
            with models.using(model) as p:
                outcome["result"] = generate(p, settings, on_step=on_step, per_head=per_head)
                encoder = getattr(p, "text_encoder", None) or getattr(p, "text_encoder_2", None)
                outcome["text_dim"] = getattr(getattr(encoder, "config", None), "hidden_size", None)
        except BaseException as err:  # handed to the generator, which re-raises it in the request
            outcome["error"] = err
        finally:
            steps.put(_FINISHED)

    worker = threading.Thread(target=work, name=f"sdviz-generate-{model}", daemon=True)
    worker.start()
    done, total, last_preview = 0, settings.steps, 0.0
    try:
        while True:
            try:
                item = steps.get(timeout=heartbeat_s)
            except queue.Empty:
                # Yielding often keeps the generator closable (Gradio's Stop waits for a yield).
                yield Tick(done, total, time.perf_counter() - start)
                continue
            if item is _FINISHED:
                break
            done, total, latent = item
            now = time.perf_counter()
            preview = None
            if now - last_preview >= 1.0 / previews_per_s and steps.empty():
                preview, last_preview = live_preview(latent, factors), now
            yield Tick(done, total, now - start, preview)
    finally:
        stop.set()
    if "error" in outcome:
        raise outcome["error"]
    image, run = outcome["result"]
    yield Done(image, run, time.perf_counter() - start, outcome.get("text_dim"))
