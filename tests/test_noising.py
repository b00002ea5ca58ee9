"""sdviz.noise_image and the loss sweep: forward diffusion and the training loss on a given image."""

import numpy as np
import pytest
import torch
from conftest import SIZE
from PIL import Image

import sdviz
from sdviz.noising import loss_sweep, sweep_timesteps, training_scheduler
from sdviz.toy import world

FAMILIES = {"sd1": "sd1_pipe", "sd2-v": "sd2v_pipe", "sdxl": "sdxl_pipe"}


@pytest.fixture(scope="module")
def toy():
    pipe = sdviz.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def scene():
    return world.sample_scenes(1, seed=11)[0]


def independent_prediction(pipe, x_t: torch.Tensor, t: int, prompt: str) -> torch.Tensor:
    """The U-Net's output for x_t [C, h, w] at t, conditioned the way the pipeline's own __call__ does it."""
    if hasattr(pipe, "text_encoder_2"):  # SDXL: pooled text and the six time ids, from the pipeline's own helpers
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids(
            (SIZE, SIZE), (0, 0), (SIZE, SIZE), embeds.dtype, pipe.text_encoder_2.config.projection_dim
        )
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    else:
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        extra = {}
    return pipe.unet(x_t[None], torch.tensor(t), encoder_hidden_states=embeds, **extra).sample[0]


@torch.no_grad()
def test_x_t_is_the_schedulers_add_noise_exactly_and_x0_and_the_attention_come_from_that_call(toy, scene):
    run = sdviz.noise_image(toy, scene.image, scene.caption, 400, seed=3)
    assert run.num_steps == 1 and run.clean_latent.shape == (4, 16, 16) and run.info.image_size == (64, 64)
    expected = toy.scheduler.add_noise(run.clean_latent[None], run.noise[None], torch.tensor([400]))[0]
    assert torch.equal(run.latents[0], expected)  # the model's own scheduler, exactly
    assert torch.equal(run.noise, torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3))[0])
    alpha_bar = float(toy.scheduler.alphas_cumprod[400])
    assert run.alpha_bars[0].item() == pytest.approx(alpha_bar) and run.timesteps[0] == 400
    x0 = (run.latents[0] - (1 - alpha_bar) ** 0.5 * run.model_outputs[0]) / alpha_bar**0.5
    assert torch.allclose(run.x0[0], x0, atol=1e-5)
    assert [w.text for w in run.words] == scene.caption.split() and run.heatmap("circle" if "circle" in
            scene.caption else scene.objects[0].shape).shape == (16, 16)  # fmt: skip
    assert toy.scheduler.__class__.__name__ == "DDIMScheduler"  # given back


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_predicted_noise_equals_an_independent_unet_call(family, request):
    pipe = request.getfixturevalue(FAMILIES[family])
    image = np.random.default_rng(0).integers(0, 255, (80, 50, 3), dtype=np.uint8)  # resized and cropped to 64²
    original = pipe.scheduler
    run = sdviz.noise_image(pipe, image, "a red circle", 700, seed=1, size=(SIZE, SIZE))
    assert pipe.scheduler is original and not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks
    expected = independent_prediction(pipe, run.latents[0], 700, "a red circle")
    assert torch.allclose(run.model_outputs[0], expected, atol=1e-5)
    assert run.prompt_embeds.shape[0] == 77 and run.info.prediction_type == pipe.scheduler.config.prediction_type


@torch.no_grad()
def test_v_prediction_compares_v_and_converts_it_to_noise(sd2v_pipe):
    run = sdviz.noise_image(sd2v_pipe, Image.new("RGB", (SIZE, SIZE), (200, 30, 30)), "a red circle", 600,
                            size=(SIZE, SIZE))  # fmt: skip
    a = float(run.alpha_bars[0])
    assert run.info.prediction_type == "v_prediction"
    v = a**0.5 * run.noise - (1 - a) ** 0.5 * run.clean_latent
    assert torch.allclose(run.training_target(), v)
    assert run.loss == pytest.approx(float(((run.model_outputs[0] - v) ** 2).mean()))
    eps = run.predicted_noise()  # ε̂ = √ᾱ·v̂ + √(1−ᾱ)·x_t, consistent with the scheduler's x0
    assert torch.allclose(run.latents[0], a**0.5 * run.x0[0] + (1 - a) ** 0.5 * eps, atol=1e-4)


@torch.no_grad()
def test_the_built_in_model_predicts_the_noise_better_with_the_scenes_own_caption(toy):
    """Averaged over scenes and timesteps, the right caption's loss is below a wrong caption's (the text helps).

    Measured on 32 scenes × 20 timesteps (seed 7): 0.0424 with the caption, 0.0787 with another scene's,
    0.0451 with none; here a smaller sample of the same measurement.
    """
    scenes = world.sample_scenes(8, seed=7)
    timesteps = sweep_timesteps(6)
    right, wrong = [], []
    for i, scene in enumerate(scenes):
        other = scenes[(i + 1) % len(scenes)].caption
        for point in loss_sweep(toy, scene.image, [scene.caption, other], timesteps, seed=i):
            right.append(point.losses[0])
            wrong.append(point.losses[1])
    assert np.mean(right) < np.mean(wrong), (np.mean(right), np.mean(wrong))


def test_a_noised_image_saves_and_loads_with_its_latent_noise_and_loss(toy, scene, tmp_path):
    run = sdviz.noise_image(toy, Image.fromarray(scene.image), scene.caption, 250)
    back = sdviz.TraceResult.load(run.save(tmp_path / "noised.safetensors"))
    for name in ("clean_latent", "noise", "latents", "model_outputs", "x0", "prompt_embeds"):
        assert torch.equal(getattr(back, name), getattr(run, name)), name
    assert back.loss == run.loss and back.heatmap(scene.objects[0].colour).shape == (16, 16)


def test_the_loss_sweep_is_one_call_per_timestep_and_stops_when_closed(toy, scene):
    calls = []
    handle = toy.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    original = toy.scheduler
    try:
        sweep = loss_sweep(toy, scene.image, [scene.caption, "a red square", ""], [0, 500, 999])
        first = next(sweep)
        assert toy.scheduler is not original  # the training schedule, while the sweep runs
        sweep.close()
    finally:
        handle.remove()
    assert toy.scheduler is original and len(calls) == 1
    assert first.timestep == 0 and first.total == 3 and len(first.losses) == 3
    single = sdviz.noise_image(toy, scene.image, scene.caption, 500, seed=0)
    at_500 = next(p for p in loss_sweep(toy, scene.image, [scene.caption], [500]))
    assert at_500.losses[0] == pytest.approx(single.loss, rel=1e-4)  # same noise, same example


def test_bad_inputs_say_what_to_do(toy, scene, sd1_pipe):
    with pytest.raises(ValueError, match="whole number from 0 .* to 999"):
        sdviz.noise_image(toy, scene.image, scene.caption, 1000)
    with pytest.raises(ValueError, match="whole number"):
        sdviz.noise_image(toy, scene.image, scene.caption, 2.5)
    with pytest.raises(ValueError, match=r"\[height, width, 3\]"):
        sdviz.noise_image(toy, np.zeros((4, 4, 2), np.uint8), scene.caption, 10)
    with pytest.raises(ValueError, match="multiples of 8"):
        sdviz.noise_image(toy, scene.image, scene.caption, 10, size=(60, 64))
    with pytest.raises(TypeError, match="prompt must be text"):
        sdviz.noise_image(toy, scene.image, None, 10)
    with training_scheduler(toy):
        pass
    assert toy.scheduler.__class__.__name__ == "DDIMScheduler"
    with sdviz.trace(sd1_pipe) as tracer:
        sd1_pipe("a red circle", num_inference_steps=2, height=SIZE, width=SIZE, output_type="latent")
    with pytest.raises(ValueError, match="not a noised image: make one with sdviz.noise_image"):
        print(tracer.result.loss)
