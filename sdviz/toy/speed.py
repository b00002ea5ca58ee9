"""How long one generation takes with the shipped toy model and with f = 2 alternatives (the model card's
"Shapes: the two shape losses trained longer").

    python -m sdviz.toy.speed [--threads 1] [--repeats 5]

An f = 2 VAE gives 64×64 scenes a 32×32 latent, so circles and squares differ in more latent pixels; the
UNet then works on four times the pixels. This builds f = 2 pipelines with random weights (the shipped
tokenizer, text encoder and scheduler; speed does not depend on the weights' values) and times a 20-step
generation with guidance (`sdviz.toy.evaluate.timed_generation`, the evaluation's timed caption), side by
side with the shipped model, interleaved so that a change in the machine's load falls on all of them alike.
Prints the median of the timed runs (the first is a warm-up).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from diffusers import StableDiffusionPipeline

from sdviz.toy import train
from sdviz.toy.evaluate import load_model, timed_generation

# name → (VAE block widths, UNet block widths); None: the shipped model itself.
VARIANTS = {
    "shipped: f = 4, UNet (32, 64, 128) on 16×16": None,
    "f = 2, the shipped UNet on 32×32": ((16, 32), (32, 64, 128)),
    "f = 2, a fourth level (32, 64, 128, 128): 4×4 again": ((16, 32), (32, 64, 128, 128)),
    "f = 2, four levels at half width (16, 32, 64, 128)": ((16, 32), (16, 32, 64, 128)),
}


def scene_size(pipe: StableDiffusionPipeline) -> int:
    """The image side `pipe` draws by default: its latent side times the VAE's factor."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def variant(shipped: StableDiffusionPipeline, vae_channels, unet_channels) -> StableDiffusionPipeline:
    """A pipeline sharing `shipped`'s text side and scheduler, with a fresh VAE and UNet of these widths."""
    size = scene_size(shipped)
    vae = train.build_vae(size, vae_channels)
    latent = size // 2 ** (len(vae_channels) - 1)
    unet = train.build_unet(latent, unet_channels, shipped.text_encoder.config.hidden_size)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=shipped.text_encoder,
        tokenizer=shipped.tokenizer,
        unet=unet,
        scheduler=shipped.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def measure(model: str | None = None, repeats: int = 5, steps: int = 20, guidance: float = 5.0) -> list[dict]:
    """Per variant: median seconds per generation over `repeats` timed runs, the ratio to the shipped
    model, the latent side and the UNet's parameters."""
    shipped = load_model(model)
    shipped.set_progress_bar_config(disable=True)
    pipes = {name: shipped if spec is None else variant(shipped, *spec) for name, spec in VARIANTS.items()}
    size = scene_size(shipped)
    times = {name: [] for name in pipes}
    for rep in range(repeats + 1):
        for name, pipe in pipes.items():
            seconds = timed_generation(pipe, guidance, steps, size, seed=rep)
            if rep:  # the first round warms up
                times[name].append(seconds)
    base = statistics.median(times[next(iter(pipes))])
    return [
        {
            "variant": name,
            "seconds": statistics.median(t),
            "ratio": statistics.median(t) / base,
            "latent": pipes[name].unet.config.sample_size,
            "unet_parameters": sum(p.numel() for p in pipes[name].unet.parameters()),
        }
        for name, t in times.items()
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sdviz.toy.speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default=None, help="pipeline folder of the f = 4 model to compare with (default: the shipped one)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant, after one warm-up")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.model, args.repeats, args.steps, args.guidance)
    print(
        f"| one {args.steps}-step generation, guidance {args.guidance:g}, {args.threads} thread(s) "
        f"| latent | UNet parameters | seconds (median of {args.repeats}) | × shipped |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['latent']}×{r['latent']} | {r['unet_parameters'] / 1e6:.2f} M "
            f"| {r['seconds']:.2f} | {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
