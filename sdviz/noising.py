"""Forward diffusion and the training loss on any image: what Stable Diffusion is trained on, one example at a time.

    run = sdviz.noise_image(pipe, image, "a red circle", timestep=500, seed=0)   # a one-step TraceResult
    run.clean_latent, run.noise, run.latents[0]   # z, ε and x_t = √ᾱ·z + √(1−ᾱ)·ε   [C, h, w] each
    run.model_outputs[0], run.x0[0], run.loss     # what the U-Net predicted, its clean guess, MSE to the target
    run.heatmap("circle")                         # the cross-attention of that U-Net call, on a real image
    for point in sdviz.noising.loss_sweep(pipe, image, ["a red circle", "a blue square", ""]):
        ...                                       # one U-Net call per timestep; stop iterating to cancel

Training takes an image's latent z, draws noise ε, mixes them at a random timestep t with the training
noise schedule (`scheduler.add_noise`: x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε) and asks the U-Net, given x_t, t and the
caption, for ε (or for v = √ᾱ·ε − √(1−ᾱ)·z with v-prediction); the loss is the mean squared error. This module
does exactly that, under `sdviz.trace`, with the model's own training schedule: a DDPMScheduler built from
the pipeline's scheduler config (its ᾱ_t for every t in 0…999), swapped in for the call and given back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from .result import TraceResult
from .steps import training_target
from .trace import trace

__all__ = ["noise_image", "loss_sweep", "fit_image", "LossPoint", "training_scheduler", "sweep_timesteps"]


def _pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, or an array (uint8 [H, W, 3|4], or floats in 0–1)."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        a = image
        if a.dtype != np.uint8:
            if a.size and (a.min() < 0 or a.max() > 1):
                raise ValueError("an image array of floats must hold values from 0 to 1 (or give uint8 0–255)")
            a = (a * 255).round().astype(np.uint8)
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        if a.ndim != 3 or a.shape[-1] not in (3, 4):
            raise ValueError(f"an image array must be [height, width, 3] (RGB); got shape {list(image.shape)}")
        image = Image.fromarray(a)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, a file path or an RGB array; got {type(image).__name__}")
    if image.mode in ("RGBA", "LA", "P"):  # transparent parts on white, as a viewer shows them
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def pipeline_size(pipe) -> tuple[int, int]:
    """(height, width) in pixels the pipeline generates by default: the U-Net's sample size × the VAE factor."""
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return side, side


def check_size(pipe, size) -> tuple[int, int]:
    """(height, width) in pixels: `size`, or the pipeline's own; ValueError unless both are multiples of 8."""
    height, width = (int(v) for v in (size or pipeline_size(pipe)))
    if height <= 0 or width <= 0 or height % 8 or width % 8:
        raise ValueError(f"the size must be positive multiples of 8 pixels, as pipelines need; got {height}×{width}")
    return height, width


def fit_image(pipe, image, size: tuple[int, int] | None = None) -> Image.Image:
    """The image as `noise_image` uses it: RGB, centre-cropped to the aspect of `size` (height, width) and resized
    to it (default: the pipeline's own size, e.g. 64×64 for the built-in model, 512×512 for SD 1.5)."""
    height, width = check_size(pipe, size)
    image = _pil(image)
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.LANCZOS)  # fmt: skip
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


@contextlib.contextmanager
def training_scheduler(pipe):
    """Swap in the training noise schedule for the call: a DDPMScheduler from the pipeline's scheduler config
    (same betas, ᾱ_t and prediction type; x0 not clipped, so it is the U-Net's own guess), given back after."""
    original = pipe.scheduler
    pipe.scheduler = DDPMScheduler.from_config(original.config, clip_sample=False, thresholding=False)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


def check_timestep(scheduler, timestep) -> int:
    """A whole timestep 0 ≤ t < num_train_timesteps, or ValueError saying the range."""
    last = int(scheduler.config.num_train_timesteps) - 1
    try:
        t = float(timestep)
    except (TypeError, ValueError):
        raise ValueError(f"the timestep must be a whole number from 0 to {last}; got {timestep!r}") from None
    if t != round(t) or not 0 <= t <= last:
        raise ValueError(f"the timestep must be a whole number from 0 (clean) to {last} (pure noise); got {timestep!r}")
    return int(t)


@torch.no_grad()
def _encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """The image's latent z as the U-Net sees it: [1, C, h, w] float32 = (posterior mean − shift) × scaling factor."""
    vae = pipe.vae
    param = next(vae.parameters())
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # [1, 3, H, W]
    encoded = vae.encode(pixels.to(param.device, param.dtype))
    dist = getattr(encoded, "latent_dist", None)  # AutoencoderKL: a distribution; AutoencoderTiny: the latents
    latent = (dist.mean if dist is not None else encoded.latents).float()
    shift, scale = vae.config.get("shift_factor") or 0.0, vae.config.get("scaling_factor") or 1.0
    return (latent - shift) * scale


def _draw_noise(shape, seed: int) -> torch.Tensor:
    """ε ~ N(0, 1) from `seed`, drawn on the CPU so that every device gets the same noise."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(seed)))


def _is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


@torch.no_grad()
def _text_conditioning(pipe, prompts: Sequence[str], size: tuple[int, int]) -> dict:
    """The U-Net's text inputs for `prompts` (no guidance): encoder_hidden_states [n, 77, d] and, for SDXL,
    added_cond_kwargs (pooled text [n, d_pool], time ids [n, 6] = original size, crop (0, 0), target size)."""
    device = pipe.unet.device
    if _is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        time_ids = torch.tensor([[*size, 0, 0, *size]] * len(prompts), device=device, dtype=embeds.dtype)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
    return {"encoder_hidden_states": embeds}


def _unet(pipe, x_t: torch.Tensor, t: int, conditioning: dict) -> torch.Tensor:
    """One U-Net call on x_t [n, C, h, w] at timestep t: its output [n, C, h, w] float32."""
    param = next(pipe.unet.parameters())
    timestep = torch.tensor(t, device=param.device)
    out = pipe.unet(x_t.to(param.device, param.dtype), timestep, return_dict=False, **conditioning)[0]
    return out.float()


@torch.no_grad()
def noise_image(
    pipe, image, prompt: str, timestep: int, seed: int = 0, size: tuple[int, int] | None = None, **trace_options
) -> TraceResult:
    """One training example, traced: `image` noised to `timestep` and the U-Net's prediction for `prompt`.

    Returns a one-step `TraceResult` (on the CPU, like a generation's):
      clean_latent [C, h, w]   the image's latent z (VAE posterior mean × scaling factor), after `fit_image`
      noise [C, h, w]          the ε drawn from `seed` (on the CPU, so the same on every device)
      latents[0]               x_t = scheduler.add_noise(z, ε, t) with the training (DDPM) schedule
      model_outputs[0]         the U-Net's output for `prompt` (ε̂; v̂ for a v-prediction model)
      x0[0]                    its guess of the clean latent; timesteps / alpha_bars [1]: t and ᾱ_t
      attention, tokens        the cross-attention of that call: `run.heatmap(word)` works on the image
      loss, training_target()  the example's training loss: MSE between the output and what training asks for
      schedule_timesteps / schedule_sigmas   the training schedule, every t (ᾱ_t = 1 / (1 + σ_t²))
    `prompt` "" asks for the noise with no caption (what guidance calls the unconditional prediction).
    `trace_options` go to `sdviz.trace` (e.g. keep_queries=True, self_attention=True: see `sdviz.explain`).
    """
    if prompt is None or not isinstance(prompt, str):
        raise TypeError(f'prompt must be text ("" for no caption); got {type(prompt).__name__}')
    size = check_size(pipe, size)
    picture = fit_image(pipe, image, size)
    with training_scheduler(pipe) as scheduler:
        t = check_timestep(scheduler, timestep)
        # 1. The clean latent and the noise, mixed at t by the training schedule.
        clean = _encode_image(pipe, picture).cpu()  # [1, C, h, w]
        noise = _draw_noise(clean.shape, seed)  # [1, C, h, w]
        x_t = scheduler.add_noise(clean, noise, torch.tensor([t]))  # [1, C, h, w]
        # 2. One traced U-Net call and one scheduler step (which gives x0): a one-step trace.
        with trace(pipe, prompt=prompt, **trace_options) as tracer:
            conditioning = _text_conditioning(pipe, [prompt], size)
            output = _unet(pipe, x_t, t, conditioning)  # [1, C, h, w]
            generator = torch.Generator("cpu").manual_seed(int(seed) + 1)  # DDPM's step adds noise toward t−1
            scheduler.step(output.cpu(), t, x_t, generator=generator)
    run = tracer.result
    run.info = replace(run.info, guidance_scale=float("nan"), cfg=False, image_size=size)
    run.clean_latent, run.noise = clean[0], noise[0]
    return run


@dataclass(frozen=True)
class LossPoint:
    """One timestep of a sweep: the training loss of each prompt at t (same image, same noise)."""

    index: int  # 0-based position in the sweep
    total: int  # timesteps in the sweep
    timestep: int
    alpha_bar: float
    losses: tuple[float, ...]  # one per prompt, in the order given


def sweep_timesteps(count: int = 20, last: int = 999) -> list[int]:
    """`count` timesteps spread evenly from 0 (almost clean) to `last` (almost pure noise)."""
    if not 2 <= int(count) <= last + 1:
        raise ValueError(f"a sweep needs 2 to {last + 1} timesteps; got {count}")
    return sorted({int(round(t)) for t in np.linspace(0, last, int(count))})


@torch.no_grad()
def loss_sweep(
    pipe,
    image,
    prompts: Sequence[str],
    timesteps: Sequence[int] | None = None,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> Iterator[LossPoint]:
    """The image's training loss against t for each prompt: yields one `LossPoint` per timestep.

    One noise ε (from `seed`) for every t and prompt, so the curves differ only by the text; one U-Net
    call per timestep, with the prompts as its batch. Lazy: stop iterating to cancel (the pipeline is
    given back as soon as the generator is closed). Not traced (no attention is kept).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError('give at least one prompt ("" for no caption)')
    size = check_size(pipe, size)
    picture = fit_image(pipe, image, size)
    with training_scheduler(pipe) as scheduler:
        steps = list(timesteps) if timesteps is not None else sweep_timesteps()
        steps = [check_timestep(scheduler, t) for t in steps]
        clean = _encode_image(pipe, picture).cpu()  # [1, C, h, w]
        noise = _draw_noise(clean.shape, seed)
        conditioning = _text_conditioning(pipe, prompts, size)
        n = len(prompts)
        for i, t in enumerate(steps):
            x_t = scheduler.add_noise(clean, noise, torch.tensor([t]))  # [1, C, h, w]
            output = _unet(pipe, x_t.expand(n, -1, -1, -1), t, conditioning).cpu()  # [n, C, h, w]
            alpha_bar = float(scheduler.alphas_cumprod[t])
            target = training_target(scheduler.config.prediction_type, clean[0], noise[0], alpha_bar)
            losses = tuple(float(((out - target) ** 2).mean()) for out in output)
            yield LossPoint(i, len(steps), t, alpha_bar, losses)
