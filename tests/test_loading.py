"""load_pipeline: each family's real architecture saved in diffusers format and loaded back; clear offline errors."""

import time

import numpy as np
import pytest
import torch
from conftest import SIZE, seeded

import sdviz
from sdviz.loading import pick_dtype
from sdviz.random_models import build_random_pipeline

FAMILIES = {
    # family: (pipeline class, cross-attention width, prediction type, scheduler class)
    "sd1": ("StableDiffusionPipeline", 32, "epsilon", "PNDMScheduler"),
    "sd2-v": ("StableDiffusionPipeline", 32, "v_prediction", "DDIMScheduler"),
    "sd-turbo": ("StableDiffusionPipeline", 32, "epsilon", "EulerAncestralDiscreteScheduler"),
    "sdxl": ("StableDiffusionXLPipeline", 64, "epsilon", "EulerDiscreteScheduler"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_saved_pipeline_of_each_family_loads_and_generates_the_same_image(family, tmp_path):
    original = build_random_pipeline(family)
    original.set_progress_bar_config(disable=True)
    original.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.rglob("*.bin"))  # safetensors only
    pipe = sdviz.load_pipeline(str(tmp_path), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    cls, cross, prediction, scheduler = FAMILIES[family]
    assert type(pipe).__name__ == cls
    assert pipe.unet.config.cross_attention_dim == cross
    assert pipe.scheduler.config.prediction_type == prediction
    assert type(pipe.scheduler).__name__ == scheduler
    assert pipe.unet.dtype == torch.float32  # small model on CPU: fp32
    for part in ("unet", "vae", "text_encoder"):  # the weights round-trip exactly
        saved, loaded = getattr(original, part).state_dict(), getattr(pipe, part).state_dict()
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    kw = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="np", guidance_scale=5.0)
    a = original("a red circle", generator=seeded(), **kw).images
    b = pipe("a red circle", generator=seeded(), **kw).images
    with sdviz.trace(pipe) as tracer:
        c = pipe("a red circle", generator=seeded(), **kw).images
    # The same image. Weights loaded from safetensors sit in memory that is not 64-byte aligned, and on
    # some CPUs oneDNN then takes other kernels (measured: ≤ 2e-6 apart on a Xeon, 1.1e-5 on an AMD EPYC;
    # one 8-bit level is 3.9e-3). Copied into fresh memory, the loaded weights give exactly the original's
    # image, so placement is the only difference. Tracing changes nothing at all.
    assert np.abs(a - b).max() < 1e-4
    assert np.array_equal(b, c)
    assert tracer.result.words[1].text == "red"
    for part in ("unet", "vae", "text_encoder"):
        for tensor in (*getattr(pipe, part).parameters(), *getattr(pipe, part).buffers()):
            tensor.data = tensor.data.clone()
    assert np.array_equal(a, pipe("a red circle", generator=seeded(), **kw).images)


def test_a_folder_that_is_not_a_pipeline_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        sdviz.load_pipeline(str(tmp_path))


def test_an_unknown_name_lists_the_presets():
    with pytest.raises(FileNotFoundError, match="not a preset \\(toy, sd15"):
        sdviz.load_pipeline("no-such-model")


@pytest.mark.parametrize("offline_flag", ["1", None])
def test_an_uncached_hub_model_fails_fast_with_what_to_do(offline_flag, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    if offline_flag:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_flag)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable, like no network
    start = time.monotonic()
    with pytest.raises(sdviz.ModelUnavailableError, match="huggingface-cli download stabilityai/sd-turbo"):
        sdviz.load_pipeline("sd-turbo")
    assert time.monotonic() - start < 10


def test_a_non_stable_diffusion_pipeline_is_refused(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=32,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="sdviz traces Stable Diffusion"):
        sdviz.load_pipeline(str(tmp_path))


def test_default_dtypes():
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype(torch.device("cpu"), large=False) == torch.float32
    amx = torch.cpu._is_amx_tile_supported()
    assert pick_dtype(torch.device("cpu"), large=True) == (torch.bfloat16 if amx else torch.float32)


def test_a_local_folder_is_large_by_its_unets_parameters_read_without_loading_them(tmp_path):
    from sdviz.loading import SMALL_UNET, unet_parameters

    pipe = build_random_pipeline("sd1")
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    assert unet_parameters(tmp_path) == sum(p.numel() for p in pipe.unet.parameters()) < SMALL_UNET
    assert unet_parameters(tmp_path / "nowhere") is None
    # So it loads in fp32 on every CPU, AMX or not (the previous rule made every local folder but the
    # built-in one "large", and a small test model bf16 on AMX machines).
    assert sdviz.load_pipeline(str(tmp_path), device="cpu").unet.dtype == torch.float32


def test_presets_point_at_the_real_hub_ids():
    assert sdviz.PRESETS["sd15"].source == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert sdviz.PRESETS["sdxl"].source == "stabilityai/stable-diffusion-xl-base-1.0"
    assert sdviz.PRESETS["sd-turbo"].guidance == 0.0 and sdviz.PRESETS["sd-turbo"].max_steps == 4
