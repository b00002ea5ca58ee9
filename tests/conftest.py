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
