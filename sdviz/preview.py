"""Latent → RGB without the VAE: one linear map per VAE, for previews that cost microseconds.

Stable Diffusion 1.x/2.x and SDXL use published factors (Keturn's least-squares fit for SD's VAE,
as distributed in ComfyUI's `latent_formats.py`). Any other VAE (the built-in shapes model, test
models) gets its own least-squares fit: encode flat colour patches, regress RGB on the latent.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

# rows: latent channels 0..3; columns: R, G, B; output in [-1, 1]
_SD_FACTORS = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
_SDXL_FACTORS = [[0.3920, 0.4054, 0.4549], [-0.2634, -0.0196, 0.0653], [0.0568, 0.1687, -0.0755], [-0.3112, -0.2359, -0.2076]]
_SD_VAE_CHANNELS = [128, 256, 512, 512]


def latent_rgb_factors(pipe) -> torch.Tensor:
    """[C + 1, 3] float32: the weights of each latent channel, then the bias row."""
    vae, unet = pipe.vae, pipe.unet
    real_sd_vae = list(vae.config.block_out_channels) == _SD_VAE_CHANNELS and vae.config.latent_channels == 4
    if real_sd_vae:
        sdxl = unet.config.get("addition_embed_type") == "text_time"
        weights = torch.tensor(_SDXL_FACTORS if sdxl else _SD_FACTORS)
        return torch.cat([weights, torch.zeros(1, 3)])
    return fit_latent_rgb(vae)


@torch.no_grad()
def fit_latent_rgb(vae, size: int = 64) -> torch.Tensor:
    """Least-squares latent → RGB map of `vae`, from 27 flat colours and their 2-colour splits."""
    levels = (0.0, 0.5, 1.0)
    colours = torch.tensor(list(itertools.product(levels, repeat=3)))                # [27, 3]
    flat = colours[:, :, None, None].expand(-1, -1, size, size).clone()              # [27, 3, s, s]
    split = flat.clone()
    split[:, :, :, size // 2:] = colours.flip(0)[:, :, None, None]                   # left/right halves
    images = torch.cat([flat, split])                                                # [54, 3, s, s] in [0, 1]
    param = next(vae.parameters())
    latents = vae.encode((images * 2 - 1).to(param.device, param.dtype)).latent_dist.mean.float().cpu()
    latents = latents * vae.config.scaling_factor                                    # [54, C, h, w]
    target = F.adaptive_avg_pool2d(images * 2 - 1, latents.shape[-2:])               # [54, 3, h, w]
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])                    # [N, C]
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)                                 # [N, C + 1]
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)                                    # [N, 3]
    return torch.linalg.lstsq(x, y).solution.float()                                 # [C + 1, 3]


def latent_to_rgb(latent: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """latent [C, h, w] → uint8 image [h, w, 3] through the linear map."""
    rgb = latent.float().permute(1, 2, 0) @ factors[:-1] + factors[-1]               # [h, w, 3] in ~[-1, 1]
    return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
