"""The scheduler side of a step: noise level, alpha-bar and the predicted clean latent x0.

Schedulers that return `pred_original_sample` (DDIM, DDPM, Euler, Euler a, LMS) are taken at their
word. For the others (DPM++ 2M, UniPC, PNDM) x0 is computed from the scheduler's own sigma or
alphas_cumprod at this step, honouring its prediction type (epsilon, v_prediction, sample).
"""

from __future__ import annotations

import math

import torch


def noise_level(scheduler, timestep) -> tuple[float, float]:
    """(sigma, alpha_bar) of the step `scheduler.step` has *just* taken at `timestep`.

    Sigma-based schedulers advance `step_index` by one per step, so the step just taken is
    `step_index - 1`; the others index `alphas_cumprod` by the integer timestep.
    sigma = sqrt((1 - ᾱ) / ᾱ) in both conventions, so ᾱ = 1 / (1 + σ²).
    """
    sigmas = getattr(scheduler, "sigmas", None)
    index = getattr(scheduler, "step_index", None)
    if sigmas is not None and index is not None:
        sigma = float(sigmas[index - 1])
        return sigma, 1.0 / (1.0 + sigma * sigma)
    t = int(round(float(timestep)))
    alpha_bar = float(scheduler.alphas_cumprod[t])
    return math.sqrt((1.0 - alpha_bar) / alpha_bar), alpha_bar


def is_sigma_space(scheduler) -> bool:
    """True for the Euler family, whose latents are x0 + σ·ε (init_noise_sigma > 1), not √ᾱ·x0 + √(1-ᾱ)·ε."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0


def predicted_x0(
    scheduler, step_output, model_output: torch.Tensor, sample: torch.Tensor, sigma: float, alpha_bar: float
) -> torch.Tensor:
    """x0 for this step, float32, same shape as `sample` ([b, C, h, w])."""
    x0 = getattr(step_output, "pred_original_sample", None)
    if x0 is not None:
        return x0.float()
    eps, x = model_output.float(), sample.float()
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction == "sample":
        return eps
    if is_sigma_space(scheduler):
        if prediction == "epsilon":
            return x - sigma * eps
        if prediction == "v_prediction":
            return eps * (-sigma / math.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    else:
        a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
        if prediction == "epsilon":
            return (x - s * eps) / a
        if prediction == "v_prediction":
            return a * x - s * eps
    raise ValueError(f"sdviz cannot compute x0 for prediction_type={prediction!r} of {type(scheduler).__name__}")


def schedule_of(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole planned schedule: timesteps [N] and the sigma of each [N], float32 on the CPU."""
    timesteps = scheduler.timesteps.detach().float().cpu()
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) >= len(timesteps):
        return timesteps, sigmas[: len(timesteps)].detach().float().cpu()
    alpha_bar = scheduler.alphas_cumprod.float().cpu()[timesteps.round().long()]
    return timesteps, ((1 - alpha_bar) / alpha_bar).sqrt()


# -- training: what the U-Net is asked to output -------------------------------------------------------
def training_target(prediction_type: str, clean: torch.Tensor, noise: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """What training asks the U-Net to output for x_t = √ᾱ·z + √(1−ᾱ)·ε (same shape as `noise`, e.g. [C, h, w]):
    ε ("epsilon"), v = √ᾱ·ε − √(1−ᾱ)·z ("v_prediction"), or z itself ("sample")."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * clean
    if prediction_type == "sample":
        return clean
    raise ValueError(f"sdviz doesn't know the training target of prediction_type={prediction_type!r}")


def implied_noise(prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """The noise ε̂ a U-Net output stands for, for x_t = √ᾱ·z + √(1−ᾱ)·ε (not the Euler family's σ-space latents):
    the output itself (epsilon), √ᾱ·v + √(1−ᾱ)·x_t (v_prediction), or (x_t − √ᾱ·z)/√(1−ᾱ) (sample)."""
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a * output + s * x_t
    if prediction_type == "sample":
        return (x_t - a * output) / max(s, 1e-8)
    raise ValueError(f"sdviz doesn't know what prediction_type={prediction_type!r} predicts")
