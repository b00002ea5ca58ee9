"""The models the app offers and the pipelines it has loaded: one `Models` object per process, made in main().

Web users pick among configured names only; operators add models by configuration
(`SDVIZ_MODELS="name=folder_or_hub_id,…"` or `python app.py --model name=source`).
Pipelines load lazily, on the first generation that asks for them.
"""

from __future__ import annotations

import contextlib
import threading

from ..loading import PRESETS, TOY_MODEL_DIR, Preset, load_pipeline, pick_device
from ..preview import Previewer, previewer

RANDOM = "tiny-random"
RANDOM_PRESET = Preset(
    "random:sd1", "Tiny SD 1.x with random weights (demo only: images are noise)", 10, 7.5, 64, "DDIM", 50
)
# Defaults for operator-added models, whose family we don't know: SD 1.x/2.x-like settings.
CUSTOM_DEFAULTS = dict(steps=25, guidance=7.5, size=512, scheduler="DPM++ 2M")


def offline_default() -> str:
    """ "toy" once the built-in model is installed; until then the tiny random-weight pipeline."""
    return "toy" if (TOY_MODEL_DIR / "model_index.json").is_file() else RANDOM


def parse_models(spec: str) -> dict[str, str]:
    """ "name=source,name2=source2" → {name: source}; raises ValueError saying what is malformed."""
    models = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise ValueError(f"model entry {item!r} must look like name=folder_or_hub_id")
        models[name.strip()] = source.strip()
    return models


def default_choices(extra: dict[str, str] | None = None) -> dict[str, Preset]:
    """The offline default first, then sdviz's presets, then the operator's models."""
    first = offline_default()
    choices = {first: PRESETS["toy"] if first == "toy" else RANDOM_PRESET}
    choices.update((name, preset) for name, preset in PRESETS.items() if name not in choices)
    for name, source in (extra or {}).items():
        choices[name] = Preset(source, f"{name} ({source})", **CUSTOM_DEFAULTS)
    return choices


def _load(source: str):
    if source.startswith("random:"):
        from ..random_models import build_random_pipeline

        pipe = build_random_pipeline(source.split(":", 1)[1]).to(pick_device())
    else:
        pipe = load_pipeline(source)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Models:
    """Named model choices and a lazy cache of their pipelines, shared by every user of the process.

    `using(name)` hands out a pipeline for one generation or decode. Its per-model lock is held until
    that work has *finished*: Gradio frees a cancelled event's queue slot before the cancelled worker
    thread has stopped, and the next run must not touch the pipeline until the library has restored it.
    """

    def __init__(self, choices: dict[str, Preset], default: str | None = None, loaded: dict | None = None):
        self.choices = dict(choices)
        self.default = default or next(iter(self.choices))
        self._pipes = dict(loaded or {})
        self._previewers: dict = {}
        self._loading = threading.Lock()
        self._busy = {name: threading.Lock() for name in self.choices}

    def preset(self, name: str) -> Preset:
        if name not in self.choices:
            raise ValueError(
                f"unknown model {name!r}; choose one of: {', '.join(self.choices)} "
                f"(the operator can add others with SDVIZ_MODELS)"
            )
        return self.choices[name]

    def label(self, name: str) -> str:
        return self.preset(name).label

    def pipeline(self, name: str):
        """The loaded pipeline for `name`, loading it on first use (ModelUnavailableError when offline)."""
        preset = self.preset(name)
        with self._loading:
            if name not in self._pipes:
                self._pipes[name] = _load(preset.source)
            return self._pipes[name]

    def previewer(self, name: str) -> Previewer:
        """How `name`'s step latents become pictures (its VAE when cheap, a local TAESD, else the linear map).

        A previewer's decoder only reads the VAE, which a trace never hooks, so it needs no `using` lock:
        the step view stays responsive while someone else's run holds the model.
        """
        pipe = self.pipeline(name)
        with self._loading:
            if name not in self._previewers:
                self._previewers[name] = previewer(pipe)
            return self._previewers[name]

    @contextlib.contextmanager
    def using(self, name: str):
        pipe = self.pipeline(name)
        with self._busy[name]:
            yield pipe
