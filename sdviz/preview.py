"""Latent → RGB without the VAE: one linear map per VAE, for previews that cost microseconds.

Stable Diffusion 1.x/2.x and SDXL use published factors (Keturn's least-squares fit for SD's VAE,
as distributed in ComfyUI's `latent_formats.py`). Any other VAE (the built-in shapes model, test
models) gets its own least-squares fit: encode flat colour patches, regress RGB on the mean latent.
"""

from __future__ import annotations

import itertools

import torch

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
def fit_latent_rgb(vae, size: int = 16) -> torch.Tensor:
    """Least-squares latent → RGB map of `vae` from 27 flat colours (a few ms for small VAEs)."""
    levels = (0.0, 0.5, 1.0)
    colours = torch.tensor(list(itertools.product(levels, repeat=3)))                # [27, 3]
    images = colours[:, :, None, None].expand(-1, -1, size, size) * 2 - 1            # [27, 3, s, s] in [-1, 1]
    param = next(vae.parameters())
    latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mean.float().cpu()
    latents = latents * vae.config.scaling_factor                                    # [27, C, h, w]
    x = latents.mean(dim=(2, 3))                                                     # [27, C] (flat: one colour)
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)                                 # [27, C + 1]
    return torch.linalg.lstsq(x, colours * 2 - 1).solution.float()                   # [C + 1, 3]


def latent_to_rgb(latent: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """latent [C, h, w] → uint8 image [h, w, 3] through the linear map."""
    rgb = latent.float().permute(1, 2, 0) @ factors[:-1] + factors[-1]               # [h, w, 3] in ~[-1, 1]
    return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
