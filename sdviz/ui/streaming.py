"""Run the library in a worker thread and stream its progress as a generator of events.

`generate_streaming` yields `Tick`s (steps done, elapsed time and now and then a small latent → RGB
preview of the step's predicted x0), at most ten a second, and finally `Done` with the image and the
trace — or `Stopped` with the partial trace when the user pressed Stop. `compare_streaming` does the
same for a comparison, adding a `VariantDone` as each variant finishes and ending with `Compared`.
Stop (a flag) or a closed request makes the next step callback raise `sdviz.Cancelled`; the library
restores the pipeline in `finally`, and `Models.using` keeps the next run off it until then."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .. import compare
from ..compare import Variant
from ..generate import Cancelled, Settings, generate
from ..loading import cpu_threads
from ..preview import preview_map
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


@dataclass
class Stopped:
    """The user pressed Stop: the partial trace of the steps that ran (None if none did)."""

    run: TraceResult | None
    step: int  # steps done
    total: int
    elapsed: float


def live_preview(pixels) -> Image.Image | None:
    """uint8 [H, W, 3] (or [h, w, 3]) → a small RGB preview for the page; None stays None."""
    if pixels is None:
        return None
    small = Image.fromarray(np.asarray(pixels))
    width = min(PREVIEW_WIDTH, max(small.width * 8, 64))
    return small.resize((width, width * small.height // small.width), Image.BILINEAR)


class Worker:
    """Run `job(pipe, report)` in a thread that holds the model (`Models.using`) until the job has finished.

    `report(item)` hands an item to the request (`items()` yields it). It raises `Cancelled`, which
    stops the job at its next step, once the user pressed Stop (the `stop` flag) or the request has
    gone (the `with` block left, e.g. because Gradio closed the generator). The job's return value
    ends up in `result`, its exception is re-raised by `items()`.
    """

    def __init__(self, models: Models, model: str, job, stop: threading.Event | None = None):
        self.result = None
        self._models, self._model, self._job = models, model, job
        self._queue: queue.Queue = queue.Queue()
        self._gone = threading.Event()
        self._stop = stop or threading.Event()
        self._error: BaseException | None = None

    @property
    def stopped_by_user(self) -> bool:
        return self._stop.is_set() and not self._gone.is_set()

    def report(self, item):
        if self._stop.is_set() or self._gone.is_set():
            raise Cancelled("stopped by the user")
        self._queue.put(item)

    def _work(self):
        try:
            with self._models.using(self._model) as pipe, cpu_threads(self._models.threads(self._model)):
                self.result = self._job(pipe, self.report)
        except BaseException as err:  # handed to the request, which re-raises it
            self._error = err
        finally:
            self._queue.put(_FINISHED)

    def __enter__(self):
        threading.Thread(target=self._work, name=f"sdviz-{self._model}", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._gone.set()

    def items(self, heartbeat_s: float):
        """Yield each reported item, or None after `heartbeat_s` without one; re-raise the job's error at the end."""
        while True:
            try:
                item = self._queue.get(timeout=heartbeat_s)
            except queue.Empty:
                # Yielding now and then keeps the request closable (a closed page stops the job).
                yield None
                continue
            if item is _FINISHED:
                break
            yield item
        if self._error is not None:
            raise self._error


class Throttle:
    """At most `per_s` events a second: `due()` says whether one may happen now (and counts it)."""

    def __init__(self, per_s: float):
        self.interval, self.last = 1.0 / per_s, -float("inf")

    def due(self, now: float) -> bool:
        if now - self.last < self.interval:
            return False
        self.last = now
        return True


def _live_pictures(models: Models, model: str):
    """latent [C, h, w] → uint8 picture (or None) for the live preview, drawn in the request's thread.

    The previewer reads only the VAE, which the run doesn't use until its last step (and reading a
    module from two threads is safe), so a preview costs the run nothing but a share of a core.
    """
    pipe = models.pipeline(model)
    factors, _ = preview_map(pipe)  # [C + 1, 3], or None
    draw = models.previewer(model)
    vae = getattr(pipe, "vae", None)
    scaling = float(vae.config.get("scaling_factor") or 1.0) if vae is not None else 1.0
    return lambda latent: draw.live(latent, factors, scaling)


def generate_streaming(
    models: Models,
    model: str,
    settings: Settings,
    per_head: bool = False,
    stop: threading.Event | None = None,
    updates_per_s: float = 10.0,
    previews_per_s: float = 5.0,
    heartbeat_s: float = 0.5,
    keep_queries: bool = False,
    self_attention: bool = False,
):
    """Yield Tick… then Done, or Stopped when `stop` was set. Errors of the run are re-raised here.
    `keep_queries` / `self_attention`: the trace's research options (sdviz.generate).

    Ticks come at most `updates_per_s` a second (a person can't follow more, and each one costs the
    request thread an encode while the model runs), with a preview at most `previews_per_s`.
    """
    start = time.perf_counter()
    yield Tick(0, settings.steps, 0.0, message=f"Loading {models.label(model)}…")
    picture = _live_pictures(models, model)

    def job(pipe, report):
        def on_step(index: int, total: int, x0: torch.Tensor):
            report((index + 1, total, x0[0].float().cpu()))  # x0 of this step, [C, h, w] (never modified)

        return generate(pipe, settings, on_step=on_step, per_head=per_head, keep_queries=keep_queries,
                        self_attention=self_attention)  # fmt: skip

    done, total, latent = 0, settings.steps, None
    updates, previews = Throttle(updates_per_s), Throttle(previews_per_s)
    with Worker(models, model, job, stop) as worker:
        try:
            for item in worker.items(heartbeat_s):
                if item is not None:
                    done, total, latent = item
                now = time.perf_counter()
                if not updates.due(now) and item is not None:
                    continue
                preview = live_preview(picture(latent)) if latent is not None and previews.due(now) else None
                yield Tick(done, total, now - start, preview)
        except Cancelled as err:
            if not worker.stopped_by_user:
                raise
            yield Stopped(err.result, done, total, time.perf_counter() - start)
            return
    image, run = worker.result
    yield Done(image, run, time.perf_counter() - start)


@dataclass
class VariantDone:
    variant: Variant
    index: int  # 0-based, in the order the variants run
    count: int


@dataclass
class Compared:
    variants: list[Variant]
    elapsed: float
    stopped: bool = False  # True when Stop ended it early: `variants` are those that finished


def compare_streaming(
    models: Models,
    model: str,
    base: Settings,
    vary: str,
    values: list,
    stop: threading.Event | None = None,
    updates_per_s: float = 10.0,
    previews_per_s: float = 5.0,
    heartbeat_s: float = 0.5,
):
    """Yield Tick / VariantDone… then Compared for `base` run once per value of `vary`, one after another.

    vary: one of `sdviz.compare.VARY`, or "prompt" for a prompt pair (`values` = the two prompts).
    A Tick's step/total is the share of the whole comparison done; its message names variant and step.
    After Stop, the last event is a Compared with `stopped=True` holding the variants that finished.
    """
    start, count = time.perf_counter(), len(values)
    yield Tick(0, count, 0.0, message=f"Loading {models.label(model)}…")
    picture = _live_pictures(models, model)

    def job(pipe, report):
        def on_step(variant: int, index: int, total: int, x0: torch.Tensor):
            report((variant, index + 1, total, x0[0].float().cpu()))  # [C, h, w]

        if vary == "prompt":
            return compare.run_prompt_pair(pipe, base, *values, on_step=on_step)
        variants = []
        for variant in compare.iter_variants(pipe, base, vary, values, on_step=on_step):
            variants.append(variant)
            report(VariantDone(variant, len(variants) - 1, count))
        return variants

    message, share, latent = "Starting…", 0.0, None
    updates, previews = Throttle(updates_per_s), Throttle(previews_per_s)
    with Worker(models, model, job, stop) as worker:
        try:
            for item in worker.items(heartbeat_s):
                if isinstance(item, VariantDone):
                    yield item
                    continue
                if item is not None:
                    variant, done, total, latent = item
                    share = (variant + done / total) / count
                    message = f"Variant {variant + 1}/{count} · step {done}/{total}"
                now = time.perf_counter()
                if not updates.due(now) and item is not None:
                    continue
                preview = live_preview(picture(latent)) if latent is not None and previews.due(now) else None
                yield Tick(round(1000 * share), 1000, now - start, preview, f"{message} · {now - start:.1f} s")
        except Cancelled as err:
            if not worker.stopped_by_user:
                raise
            yield Compared(list(err.variants), time.perf_counter() - start, stopped=True)
            return
    yield Compared(worker.result, time.perf_counter() - start)
