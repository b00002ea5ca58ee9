"""The sdviz web app: a Gradio Blocks explorer over the library. `python app.py` calls `main()`.

    from sdviz.ui import Models, build_app, launch, default_choices
    demo = build_app(Models(default_choices()))
    launch(demo)

Modules: layout (composes the panels), panels/ (one module per panel), wiring (what panels share,
and `handler`), session (one user's last run), models (which pipelines, loaded lazily), inputs (form →
checked Settings), streaming (generation in a worker thread, streamed), texts (header, CSS).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Before gradio is imported: no version check, no telemetry (the app must work on a closed network).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from .layout import build_app, example_prompts  # noqa: E402
from .models import Models, default_choices, offline_default, parse_models  # noqa: E402
from .texts import CSS  # noqa: E402

__all__ = ["main", "launch", "build_app", "Models", "default_choices", "offline_default", "parse_models"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "prompts.txt"


def launch(demo, **kwargs):
    """Serve `demo` with the app's theme and CSS; kwargs go to `gr.Blocks.launch`."""
    return demo.launch(theme=gr.themes.Soft(), css=CSS, footer_links=["api"], **kwargs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Serve the sdviz explorer (Gradio).")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="offer another model: a local diffusers folder or a Hub id (repeatable; "
        "also SDVIZ_MODELS='name=source,…')",
    )
    parser.add_argument(
        "--default-model",
        default=os.environ.get("SDVIZ_DEFAULT_MODEL"),
        help="model selected when the page opens (default: the built-in offline model)",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME"),
        help="address to listen on (default 127.0.0.1; 0.0.0.0 to serve the network)",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860)
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads torch uses for a run (default: 1 for small models such as the built-in one, every "
        "core for large ones; also SDVIZ_THREADS). One thread is fastest on a shared CPU such as a free Space",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=int(os.environ.get("SDVIZ_QUEUE_SIZE") or 16),
        help="requests that may wait for the model before the page says the app is busy",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    extra = parse_models(os.environ.get("SDVIZ_MODELS", ""))
    extra.update(parse_models(",".join(args.model)))
    choices = default_choices(extra)
    if args.default_model and args.default_model not in choices:
        raise SystemExit(f"--default-model {args.default_model!r} is not one of: {', '.join(choices)}")
    models = Models(choices, default=args.default_model, threads=args.threads)
    demo = build_app(models, examples=example_prompts(EXAMPLES), queue_size=args.queue_size)
    launch(demo, server_name=args.host, server_port=args.port)
