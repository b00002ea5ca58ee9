"""Inside each step: the U-Net's two predictions before guidance and the text vectors, as a trace records them."""

import numpy as np
import pytest
import torch
from conftest import SIZE, seeded

import sdviz

FAMILIES = {"sd1": "sd1_pipe", "sd2-v": "sd2v_pipe", "sdxl": "sdxl_pipe"}
PROMPT = "a red circle above a blue square"
KW = dict(num_inference_steps=3, height=SIZE, width=SIZE, output_type="np")


def traced(pipe, guidance=7.5, **kw):
    plain = pipe(PROMPT, generator=seeded(0), guidance_scale=guidance, **{**KW, **kw}).images
    with sdviz.trace(pipe, prompt=PROMPT) as tracer:
        images = pipe(PROMPT, generator=seeded(0), guidance_scale=guidance, **{**KW, **kw}).images
    return plain, images, tracer.result


@pytest.mark.parametrize("family", FAMILIES)
def test_the_two_predictions_combine_by_the_guidance_formula_into_the_recorded_output(family, request):
    pipe = request.getfixturevalue(FAMILIES[family])
    plain, images, run = traced(pipe, negative_prompt="blurry")
    assert np.array_equal(plain, images)  # recording them leaves the image bit-identical
    c, (h, w) = run.latents.shape[1], run.latent_size
    assert run.noise_pred_uncond.shape == run.noise_pred_text.shape == (run.num_steps, c, h, w)
    assert run.noise_pred_text.dtype == torch.float32
    s = run.info.guidance_scale
    guided = run.noise_pred_uncond + s * (run.noise_pred_text - run.noise_pred_uncond)
    assert torch.allclose(guided, run.model_outputs, atol=1e-6)
    assert not torch.equal(run.noise_pred_uncond, run.noise_pred_text)


@torch.no_grad()
def test_the_text_half_equals_an_independent_unet_call_on_the_recorded_latent_and_vectors(sd1_pipe):
    _, _, run = traced(sd1_pipe)
    for step in range(run.num_steps):  # DDIM: the U-Net gets x_t as the scheduler saw it
        x_t, t = run.latents[step][None], torch.tensor(float(run.timesteps[step]))
        text = sd1_pipe.unet(x_t, t, encoder_hidden_states=run.prompt_embeds[None]).sample[0]
        uncond = sd1_pipe.unet(x_t, t, encoder_hidden_states=run.negative_prompt_embeds[None]).sample[0]
        assert (text - run.noise_pred_text[step]).abs().max() <= 1e-4
        assert (uncond - run.noise_pred_uncond[step]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@torch.no_grad()
def test_prompt_embeds_equal_the_pipelines_own_encode_prompt(family, request):
    pipe = request.getfixturevalue(FAMILIES[family])
    _, _, run = traced(pipe, negative_prompt="blurry")
    if family == "sdxl":
        embeds, negative, _, _ = pipe.encode_prompt(PROMPT, device="cpu", negative_prompt="blurry")
    else:
        embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="blurry")
    assert run.prompt_embeds.shape == (77, embeds.shape[-1]) == (77, run.info.text_dim)
    assert torch.equal(run.prompt_embeds, embeds[0].float())
    assert torch.equal(run.negative_prompt_embeds, negative[0].float())


def test_the_recorded_image_of_a_batch_is_the_one_kept(sd1_pipe):
    kw = dict(num_inference_steps=2, height=SIZE, width=SIZE, guidance_scale=5.0, output_type="latent")
    with sdviz.trace(sd1_pipe, image=1) as tracer:
        sd1_pipe(["a red circle", "a blue square"], generator=seeded(0), **kw)
    run = tracer.result
    embeds, _ = sd1_pipe.encode_prompt("a blue square", "cpu", 1, False)
    assert torch.equal(run.prompt_embeds, embeds[0])
    guided = run.noise_pred_uncond + 5.0 * (run.noise_pred_text - run.noise_pred_uncond)
    assert torch.allclose(guided, run.model_outputs, atol=1e-6)


def test_without_guidance_the_predictions_are_empty_and_with_rescale_the_formula_is_only_the_start(sd1_pipe):
    _, _, off = traced(sd1_pipe, guidance=1.0)
    assert off.noise_pred_uncond.numel() == 0 and off.noise_pred_text.numel() == 0
    assert off.negative_prompt_embeds.numel() == 0 and off.prompt_embeds.shape[0] == 77
    _, _, rescaled = traced(sd1_pipe, guidance_rescale=0.7)
    s = rescaled.info.guidance_scale
    formula = rescaled.noise_pred_uncond + s * (rescaled.noise_pred_text - rescaled.noise_pred_uncond)
    assert not torch.allclose(formula, rescaled.model_outputs, atol=1e-4)  # guidance_rescale changed it after


def test_the_new_fields_save_and_load(sd1_pipe, tmp_path):
    _, _, run = traced(sd1_pipe, negative_prompt="blurry")
    back = sdviz.TraceResult.load(run.save(tmp_path / "run.safetensors"))
    for name in ("noise_pred_uncond", "noise_pred_text", "prompt_embeds", "negative_prompt_embeds"):
        assert torch.equal(getattr(back, name), getattr(run, name)), name
    _, _, off = traced(sd1_pipe, guidance=1.0)
    back = sdviz.TraceResult.load(off.save(tmp_path / "off.safetensors"))
    assert back.noise_pred_text.numel() == 0  # empty stays empty


def test_the_benchmarks_memory_figure_scales_per_step_tensors_only(sd1_pipe):
    """bench scales a short run's trace to 50 steps: what grows with the steps is scaled, the text vectors are not."""
    from sdviz.bench import trace_bytes

    _, _, short = traced(sd1_pipe, num_inference_steps=2)
    _, _, long = traced(sd1_pipe, num_inference_steps=5)
    per_step, once = trace_bytes(short)
    assert per_step * 5 + once == long.nbytes
    assert once >= short.prompt_embeds.numel() * 4 * 2  # both text vectors, counted once
