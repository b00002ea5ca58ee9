"""Shared fixtures: tiny random-weight pipelines of each Stable Diffusion family (built once per session)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import DDIMScheduler

from sdviz.random_models import build_random_pipeline

# Tiny models gain nothing from a second thread, and lose a lot when another process is busy.
torch.set_num_threads(1)

SIZE = 64  # pixels; latent 8×8 for the f=8 VAEs


def make_pipe(family: str):
    """A tiny pipeline; SD1's own PNDM (N+1 UNet calls) is swapped for DDIM so N steps record N steps."""
    pipe = build_random_pipeline(family)
    if family == "sd1":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd1_pipe():
    return make_pipe("sd1")


@pytest.fixture(scope="session")
def sd2v_pipe():
    return make_pipe("sd2-v")


@pytest.fixture(scope="session")
def sdxl_pipe():
    return make_pipe("sdxl")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


# -- the web app (tests/test_app_api.py, tests/test_app_browser.py) -------------------------------
class AppServer:
    """An in-process sdviz app on a free port, its injected pipeline and a count of U-Net calls."""

    def __init__(self, url, name, pipe, models, unet_calls):
        self.url, self.name, self.pipe, self.models, self.unet_calls = url, name, pipe, models, unet_calls


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_server():
    """The app serving the offline default (the toy model when installed, else tiny random SD1) at 64×64."""
    import sdviz
    from sdviz.ui import EXAMPLES, Models, build_app, default_choices, example_prompts, launch, offline_default

    name = offline_default()
    pipe = sdviz.load_pipeline("toy") if name == "toy" else make_pipe("sd1")
    pipe.set_progress_bar_config(disable=True)
    unet_calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(1))
    models = Models(default_choices(), loaded={name: pipe})
    demo = build_app(models, examples=example_prompts(EXAMPLES))
    port = free_port()
    launch(demo, prevent_thread_lock=True, server_port=port, quiet=True)
    try:
        yield AppServer(f"http://127.0.0.1:{port}/", name, pipe, models, unet_calls)
    finally:
        demo.close()
        handle.remove()


@pytest.fixture
def client(app_server):
    """A gradio_client Client of the in-process app (one per test: its own session and state)."""
    from gradio_client import Client

    c = Client(app_server.url, verbose=False)
    yield c
    c.close()


def pytest_collection_modifyitems(items):
    """Tests that start the app are `server` tests (the fast core, `-m "not server and not browser and
    not slow"`, leaves them out)."""
    for item in items:
        if "app_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
