"""The models the app offers and the pipelines it has loaded: one `Models` object per process, made in main().

Web users pick among configured names only; operators add models by configuration
(`SDVIZ_MODELS="name=folder_or_hub_id,…"` or `python app.py --model name=source`).
Pipelines load lazily, on the first generation that asks for them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from ..loading import PRESETS, TOY_MODEL_DIR, Preset, hub_reachable, load_pipeline, pick_device, pick_threads
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

    def __init__(self, choices: dict[str, Preset], default: str | None = None, loaded: dict | None = None,
                 threads: int | None = None):  # fmt: skip
        self.choices = dict(choices)
        self.requested_threads = threads  # None: `pick_threads` decides per model
        self.default = default or next(iter(self.choices))
        self._pipes = dict(loaded or {})
        self._previewers: dict = {}
        self._online: bool | None = None  # whether the Hugging Face Hub can be reached (asked on first need)
        self._loading = threading.Lock()
        self._busy = {name: threading.Lock() for name in self.choices}

    def available(self, name: str) -> bool:
        """Whether `name` can run here: loaded, a local folder, in the Hugging Face cache, or on a Hub this
        server can reach (then it downloads on first use). The Hub is asked once per process."""
        if name in self._pipes:
            return True
        source = self.preset(name).source
        if source.startswith("random:") or Path(source).expanduser().is_dir():
            return True
        if source.count("/") != 1:
            return False
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(source, "model_index.json"), str):
            return True
        if self._online is None:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            self._online = not offline and hub_reachable()
        return self._online

    def menu(self) -> list[tuple[str, str]]:
        """(label, name) for the model list; models that would need a download say so."""
        return [
            (p.label if self.available(n) else f"{p.label} — not on this server", n) for n, p in self.choices.items()
        ]

    def missing_message(self, name: str) -> str:
        """What a web user is told about a model whose weights aren't on this server."""
        return (
            f"**{self.label(name)} isn't on this server.** Its weights would have to be downloaded first, and this "
            f"server can't reach the Hugging Face Hub. Pick the built-in model (it works offline), or ask "
            f"whoever runs this server to download this one."
        )

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

    def loaded(self, name: str) -> bool:
        """Whether `name`'s pipeline is already in memory (asking never loads it)."""
        return name in self._pipes

    def threads(self, name: str) -> int:
        """CPU threads for a run of `name` (see `sdviz.loading.pick_threads`)."""
        return pick_threads(self.pipeline(name), self.requested_threads)

    def find(self, model: str) -> str | None:
        """The offered model whose source is `model` (a trace's `info.model`: a folder or a Hub id), or None."""
        if not model:
            return None
        for name, preset in self.choices.items():
            same_folder = (
                Path(model).exists()
                and Path(preset.source).exists()
                and (Path(model).resolve() == Path(preset.source).resolve())
            )
            if preset.source == model or same_folder:
                return name
        return None

    def previewer(self, name: str | None) -> Previewer:
        """How `name`'s step latents become pictures (its VAE when cheap, a local TAESD, else the linear map).

        A previewer's decoder only reads the VAE, which a trace never hooks, so it needs no `using` lock:
        the step view stays responsive while someone else's run holds the model.
        """
        if name is None:  # a run from a model this server doesn't offer: the trace's own linear map
            return Previewer("linear")
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
