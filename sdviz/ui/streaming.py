"""Run the library in a worker thread and stream its progress as a generator of events.

`generate_streaming` yields `Tick`s (step counter, elapsed time and, at most `previews_per_s` times a
second, a small latent → RGB preview of the step's predicted x0) and finally one `Done` with the image and
the trace. `compare_streaming` does the same for a comparison, adding a `VariantDone` as each variant
finishes and ending with `Compared`. Closing the generator (Gradio does so when the user presses Stop)
makes the next step callback raise `sdviz.Cancelled`; the library restores the pipeline in `finally`,
and `Models.using` keeps the next run off the pipeline until then.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch
from PIL import Image

from .. import compare
from ..compare import Variant
from ..generate import Cancelled, Settings, generate
from ..preview import latent_rgb_factors, latent_to_rgb
from ..result import TraceResult
from .models import Models

PREVIEW_WIDTH = 192  # pixels; the browser scales it up, the encode stays cheap
_FINISHED = object()


@dataclass
class Tick:
    step: int  # steps done so far (0 while loading / encoding the prompt)
    total: int
    elapsed: float  # seconds since the request started
    preview: Image.Image | None = None  # fast preview of this step's predicted x0, when due
    message: str = ""


@dataclass
class Done:
    image: Image.Image
    run: TraceResult
    elapsed: float
    text_dim: int | None  # width of the text encoder's token vectors


def live_preview(latent: torch.Tensor, factors: torch.Tensor) -> Image.Image:
    """latent [C, h, w] → small RGB preview through the model's linear latent → RGB map (no VAE)."""
    small = Image.fromarray(latent_to_rgb(latent, factors).numpy())
    width = min(PREVIEW_WIDTH, max(small.width * 8, 64))
    return small.resize((width, width * small.height // small.width), Image.BILINEAR)


class Worker:
    """Run `job(pipe, report)` in a thread that holds the model (`Models.using`) until the job has finished.

    `report(item)` hands an item to the request (`items()` yields it); once the request has gone (the
    `with` block left, e.g. because Gradio closed the generator on Stop), it raises `Cancelled`, which
    stops the job at its next step. The job's return value ends up in `result`.
    """

    def __init__(self, models: Models, model: str, job):
        self.result = None
        self._models, self._model, self._job = models, model, job
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def report(self, item):
        if self._stop.is_set():
            raise Cancelled("stopped by the user")
        self._queue.put(item)

    def idle(self) -> bool:
        """True when no reported item is waiting (so a preview of the latest one is worth drawing)."""
        return self._queue.empty()

    def _work(self):
        try:
            with self._models.using(self._model) as pipe:
                self.result = self._job(pipe, self.report)
        except BaseException as err:  # handed to the request, which re-raises it
            self._error = err
        finally:
            self._queue.put(_FINISHED)

    def __enter__(self):
        threading.Thread(target=self._work, name=f"sdviz-{self._model}", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def items(self, heartbeat_s: float):
        """Yield each reported item, or None after `heartbeat_s` without one; re-raise the job's error at the end."""
        while True:
            try:
                item = self._queue.get(timeout=heartbeat_s)
            except queue.Empty:
                # Yielding often keeps the request closable (Gradio's Stop waits for a yield).
                yield None
                continue
            if item is _FINISHED:
                break
            yield item
        if self._error is not None:
            raise self._error


def _text_dim(pipe) -> int | None:
    encoder = getattr(pipe, "text_encoder", None) or getattr(pipe, "text_encoder_2", None)
    return getattr(getattr(encoder, "config", None), "hidden_size", None)


def generate_streaming(
    models: Models,
    model: str,
    settings: Settings,
    per_head: bool = False,
    previews_per_s: float = 5.0,
    heartbeat_s: float = 0.5,
):
    """Yield Tick… then Done. Errors of the run (ModelUnavailableError, pipeline faults) are re-raised here."""
    start = time.perf_counter()
    yield Tick(0, settings.steps, 0.0, message=f"Loading {models.label(model)}…")
    factors = latent_rgb_factors(models.pipeline(model))  # [C + 1, 3]; cheap for SD's VAEs, one fit otherwise

    def job(pipe, report):
        def on_step(index: int, total: int, x0: torch.Tensor):
            report((index + 1, total, x0[0].detach().float().cpu().clone()))  # x0 of this step, [C, h, w]

        return generate(pipe, settings, on_step=on_step, per_head=per_head), _text_dim(pipe)

    done, total, last_preview = 0, settings.steps, 0.0
    with Worker(models, model, job) as worker:
        for item in worker.items(heartbeat_s):
            now = time.perf_counter()
            if item is None:
                yield Tick(done, total, now - start)
                continue
            done, total, latent = item
            preview = None
            if now - last_preview >= 1.0 / previews_per_s and worker.idle():
                preview, last_preview = live_preview(latent, factors), now
            yield Tick(done, total, now - start, preview)
    (image, run), text_dim = worker.result
    yield Done(image, run, time.perf_counter() - start, text_dim)


@dataclass
class VariantDone:
    variant: Variant
    index: int  # 0-based, in the order the variants run
    count: int


@dataclass
class Compared:
    variants: list[Variant]
    elapsed: float


def compare_streaming(
    models: Models,
    model: str,
    base: Settings,
    vary: str,
    values: list,
    previews_per_s: float = 5.0,
    heartbeat_s: float = 0.5,
):
    """Yield Tick / VariantDone… then Compared for `base` run once per value of `vary`, one after another.

    vary: one of `sdviz.compare.VARY`, or "prompt" for a prompt pair (`values` = the two prompts).
    A Tick's step/total is the share of the whole comparison done; its message names variant and step.
    """
    start, count = time.perf_counter(), len(values)
    yield Tick(0, count, 0.0, message=f"Loading {models.label(model)}…")
    factors = latent_rgb_factors(models.pipeline(model))

    def job(pipe, report):
        def on_step(variant: int, index: int, total: int, x0: torch.Tensor):
            report((variant, index + 1, total, x0[0].detach().float().cpu().clone()))  # [C, h, w]

        if vary == "prompt":
            return compare.run_prompt_pair(pipe, base, *values, on_step=on_step)
        variants = []
        for variant in compare.iter_variants(pipe, base, vary, values, on_step=on_step):
            variants.append(variant)
            report(VariantDone(variant, len(variants) - 1, count))
        return variants

    message, share, last_preview = "Starting…", 0.0, 0.0
    with Worker(models, model, job) as worker:
        for item in worker.items(heartbeat_s):
            now = time.perf_counter()
            if isinstance(item, VariantDone):
                yield item
                continue
            preview = None
            if item is not None:
                variant, done, total, latent = item
                share = (variant + done / total) / count
                message = f"Variant {variant + 1}/{count} · step {done}/{total}"
                if now - last_preview >= 1.0 / previews_per_s and worker.idle():
                    preview, last_preview = live_preview(latent, factors), now
            yield Tick(round(1000 * share), 1000, now - start, preview, f"{message} · {now - start:.1f} s")
    yield Compared(worker.result, time.perf_counter() - start)
