"""Latent → RGB for previews: one linear map per VAE (microseconds), or a real decoder when cheap.

Stable Diffusion 1.x/2.x and SDXL use published factors (Keturn's least-squares fit for SD's VAE,
as distributed in ComfyUI's `latent_formats.py`). Any other VAE (the built-in shapes model, test
models) gets a least-squares fit: encode calibration images, regress RGB on the latent. A model folder
can ship its own factors in the VAE config (the built-in model does, fitted on its training images).
`Previewer` picks what the app, the CLI and the report show: the pipeline's own VAE when a decode is
cheap (the built-in model), else TAESD (`AutoencoderTiny`) when its weights are on this machine, else
the linear map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# rows: latent channels 0..3; columns: R, G, B; output in [-1, 1]
_SD_FACTORS = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]
_SDXL_FACTORS = [
    [0.3920, 0.4054, 0.4549],
    [-0.2634, -0.0196, 0.0653],
    [0.0568, 0.1687, -0.0755],
    [-0.3112, -0.2359, -0.2076],
]
_SD_VAE_CHANNELS = [128, 256, 512, 512]
CONFIG_KEY = "_sdviz_latent_rgb"  # kept by diffusers in a VAE's config.json (private keys survive loading)


def preview_map(pipe) -> tuple[torch.Tensor | None, str]:
    """The pipeline's latent → RGB map, [C + 1, 3] float32 (channel weights, then the bias row), and its source.

    In order: factors the model folder ships (`_sdviz_latent_rgb` in the VAE's config.json, as the
    built-in model does) → "shipped"; the published factors for SD's own VAE → "published"; a
    least-squares fit to this VAE → "fitted". Never raises: a VAE that can't be fitted gives
    (None, "none"), and previews then need an exact decode.
    """
    vae, unet = getattr(pipe, "vae", None), getattr(pipe, "unet", None)
    if vae is None:
        return None, "none"
    config = vae.config
    shipped = config.get(CONFIG_KEY)
    if shipped is not None:
        return torch.tensor(shipped, dtype=torch.float32), "shipped"
    channels = config.get("block_out_channels")
    if channels is not None and list(channels) == _SD_VAE_CHANNELS and config.get("latent_channels") == 4:
        sdxl = unet is not None and unet.config.get("addition_embed_type") == "text_time"
        weights = torch.tensor(_SDXL_FACTORS if sdxl else _SD_FACTORS)
        return torch.cat([weights, torch.zeros(1, 3)]), "published"
    try:
        return fit_latent_rgb(vae), "fitted"
    except Exception:  # a VAE of a kind sdviz doesn't know: no preview map, and nothing else breaks
        return None, "none"


def latent_rgb_factors(pipe) -> torch.Tensor:
    """The map of `preview_map`; ValueError when this VAE has none."""
    factors, _ = preview_map(pipe)
    if factors is None:
        raise ValueError(f"sdviz has no latent → RGB preview map for {type(pipe.vae).__name__}: decode exactly instead")
    return factors


def calibration_images(size: int = 32, smooth: int = 8, seed: int = 0) -> torch.Tensor:
    """[27 + smooth, 3, size, size] in [0, 1]: the 27 flat colours of {0, ½, 1}³ and smooth random colour fields."""
    levels = torch.tensor((0.0, 0.5, 1.0))
    flat = torch.cartesian_prod(levels, levels, levels)[:, :, None, None].expand(-1, -1, size, size)
    coarse = torch.rand(smooth, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    fields = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return torch.cat([flat, fields])


@torch.no_grad()
def fit_latent_rgb(vae, images: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares latent → RGB map of `vae`: encode `images` ([N, 3, H, W] in [0, 1]; default
    `calibration_images()`), pool each image to latent size, regress RGB on the latent per position."""
    images = calibration_images() if images is None else images
    param = next(vae.parameters())
    target = images.float() * 2 - 1  # [N, 3, H, W] in [-1, 1]
    encoded = vae.encode(target.to(param.device, param.dtype))
    # AutoencoderKL gives a distribution (its mean is the latent); AutoencoderTiny gives the latents.
    dist = getattr(encoded, "latent_dist", None)
    latents = (dist.mean if dist is not None else encoded.latents).float().cpu()
    shift, scale = vae.config.get("shift_factor") or 0.0, vae.config.get("scaling_factor") or 1.0
    latents = (latents - shift) * scale  # [N, C, h, w], as the U-Net sees them
    target = F.adaptive_avg_pool2d(target, latents.shape[-2:])  # [N, 3, h, w]
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # [N·h·w, C]
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)  # [N·h·w, C + 1]
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)  # [N·h·w, 3]
    return torch.linalg.lstsq(x, y).solution.float()  # [C + 1, 3]


def latent_to_rgb(latent: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """latent [C, h, w] → uint8 image [h, w, 3] through the linear map."""
    rgb = latent.float().permute(1, 2, 0) @ factors[:-1] + factors[-1]  # [h, w, 3] in ~[-1, 1]
    return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


# -- previews that match the image ---------------------------------------------------------------------
EXACT_BUDGET = 1e9  # VAE parameters × latent pixels up to which a decode is cheap (built-in model: 1.7e8, ~10 ms)
TAESD_IDS = {"sd": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}  # read from the local HF cache only
TAESD_ENV = "SDVIZ_TAESD"  # or a local AutoencoderTiny folder named here


@dataclass
class Previewer:
    """How a pipeline's step latents become pictures, as close to the real image as is cheap.

    kind "vae": the pipeline's own VAE (exact; chosen when a decode is cheap, as for the built-in
    model); "taesd": diffusers' AutoencoderTiny, when its weights are on this machine; "linear": the
    latent → RGB map of `preview_map` (microseconds, approximate colours). Decodes are cached in
    the trace (`run.decoded`), so each step is decoded once.
    """

    kind: str
    decoder: object | None = None

    @property
    def label(self) -> str:
        return {"vae": "exact VAE decode", "taesd": "TAESD (tiny VAE) preview"}.get(self.kind, "fast linear preview")

    def picture(self, run, step: int, which: str = "x0") -> np.ndarray:
        """uint8 [H, W, 3] (or [h, w, 3] for "linear"): the step's `which` latent as a picture."""
        if self.kind == "linear":
            return run.preview(step, which)
        return run.decode(step, self.decoder, which, cache="" if self.kind == "vae" else "taesd")

    @torch.no_grad()
    def live(self, latent: torch.Tensor, factors: torch.Tensor | None, scaling: float, shift: float = 0.0):
        """uint8 [H, W, 3] of a latent [C, h, w] during a run (nothing cached), or None without any way."""
        if self.kind == "linear":
            return None if factors is None else latent_to_rgb(latent, factors).numpy()
        param = next(self.decoder.parameters())
        config = self.decoder.config
        scale = config.get("scaling_factor") or scaling
        z = latent[None].to(param.device, param.dtype) / scale + (config.get("shift_factor") or shift)
        image = self.decoder.decode(z).sample[0].float().cpu()  # [3, H, W] in [-1, 1]
        return ((image.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().byte().numpy()


def exact_is_cheap(pipe, latent_hw: tuple[int, int] | None = None) -> bool:
    """Whether decoding a step with the pipeline's own VAE is cheap enough for every preview."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return False
    if latent_hw is None:
        side = int(getattr(getattr(pipe, "unet", None), "config", {}).get("sample_size") or 64)
        latent_hw = (side, side)
    params = sum(p.numel() for p in vae.parameters())
    return params * latent_hw[0] * latent_hw[1] <= EXACT_BUDGET


def local_taesd(pipe):
    """An AutoencoderTiny matching the pipeline's latent space, if its weights are on this machine.

    Looks at $SDVIZ_TAESD (a folder), then the Hugging Face cache for madebyollin/taesd (SD 1.x/2.x)
    or madebyollin/taesdxl (SDXL). Never downloads; None when there is none.
    """
    from diffusers import AutoencoderTiny

    unet = getattr(pipe, "unet", None)
    sdxl = unet is not None and unet.config.get("addition_embed_type") == "text_time"
    folder = os.environ.get(TAESD_ENV)
    try:
        if folder:
            return AutoencoderTiny.from_pretrained(folder, local_files_only=True)
        return AutoencoderTiny.from_pretrained(TAESD_IDS["sdxl" if sdxl else "sd"], local_files_only=True)
    except Exception:  # not on this machine (or unreadable): previews fall back to the linear map
        return None


def previewer(pipe) -> Previewer:
    """The best cheap previewer for `pipe`: its own VAE when cheap, else a local TAESD, else the linear map."""
    if exact_is_cheap(pipe):
        return Previewer("vae", pipe.vae)
    vae = getattr(pipe, "vae", None)
    if vae is not None and vae.config.get("latent_channels", 4) == 4:
        tiny = local_taesd(pipe)
        if tiny is not None:
            param = next(vae.parameters())
            return Previewer("taesd", tiny.to(param.device, param.dtype).eval())
    return Previewer("linear")
