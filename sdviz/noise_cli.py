"""`python -m sdviz noise IMAGE --prompt TEXT --timestep T`: one training example on an image of your own.

Writes the forward-diffusion pictures (the image as the model gets it, its latent, x_t as latent and decoded,
the U-Net's clean guess), the true and the predicted noise, the training schedule with t marked, the loss
against t for the caption / a wrong caption / no caption (`--points` timesteps, one U-Net call each), the
loss figures as CSV and the one-step trace. Prints the example's loss.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from PIL import Image

from . import noising, render

EXAMPLES = """\
examples:
  python -m sdviz noise photo.png --prompt "a red circle" --timestep 500 --out noised
  python -m sdviz noise scene.png --prompt "a small blue square" --wrong "a yellow triangle" --timestep 800
  python -m sdviz noise cat.jpg --model sd15 --prompt "a photo of a cat" --timestep 300 --points 10

written into --out:
  image.png            the image as the model gets it (centre-cropped and resized to its size)
  noising.png          image → latent z → noisy latent x_t → x_t decoded → the U-Net's clean guess x0, decoded
  noise.png            the true noise ε beside the U-Net's prediction and their difference, on one colour scale
  schedule.png         ᾱ_t and the signal-to-noise ratio for every t, the chosen t marked
  loss-vs-t.png        the training loss against t for the caption, the wrong caption and no caption
  loss-vs-t.csv        the same numbers: timestep, ᾱ_t, one loss column per caption
  trace.safetensors    the one-step trace (sdviz.TraceResult.load): latents, noise, prediction, attention
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdviz noise",
        description="Noise an image to timestep t as training does, ask the U-Net for the noise, and write the\n"
        "pictures and the training loss (against t, for the right, a wrong and no caption).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", type=Path, help="the picture (PNG, JPEG…)")
    parser.add_argument("--prompt", default="", help='its caption, the text the U-Net gets (default: "", no caption)')
    parser.add_argument("--wrong", default="", metavar="TEXT", help="a wrong caption for the loss curve")
    parser.add_argument("--timestep", type=int, default=500, metavar="T", help="0 (clean) … 999 (noise); default 500")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise ε (default 0)")
    parser.add_argument("--points", type=int, default=20, help="timesteps in the loss curve (default 20; 0: none)")
    parser.add_argument("--model", default=None, metavar="NAME", help="as for `python -m sdviz` (default: toy)")
    parser.add_argument("--out", type=Path, default=Path("sdviz-noise"), metavar="DIR", help="default ./sdviz-noise")
    parser.add_argument("--device", metavar="NAME", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="weights' precision")
    return parser


def write(pipe, args) -> tuple[float, list[Path]]:
    """Every file for `args` in `args.out`; returns the example's loss and the files."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    picture = Image.open(args.image)
    run = noising.noise_image(pipe, picture, args.prompt, args.timestep, seed=args.seed)
    fitted = noising.fit_image(pipe, picture)
    scale = render.signed_scale(run.clean_latent, run.latents[0])
    side = fitted.width
    t = int(run.timesteps[0])
    strip = {
        "the image": fitted,
        "latent z": render.signed_rgb(run.clean_latent.numpy(), scale, side),
        f"x_t (t = {t})": render.signed_rgb(run.latents[0].numpy(), scale, side),
        "x_t decoded": run.decode(0, pipe.vae, "xt"),
        "x0 guessed, decoded": run.decode(0, pipe.vae, "x0"),
    }
    a = float(run.alpha_bars[0])
    title = f"x_t = {a**0.5:.3f}·z + {(1 - a) ** 0.5:.3f}·ε · caption: “{args.prompt}” · loss {run.loss:.4f}"
    files = {
        "image.png": fitted,
        "noising.png": render.to_image(render.side_by_side(strip, title)),
        "noise.png": render.to_image(render.noise_comparison(run)),
        "schedule.png": render.to_image(render.forward_schedule(run, t)),
    }
    if args.points:
        prompts = {"the caption": args.prompt, "a wrong caption": args.wrong, "no caption": ""}
        if not args.wrong.strip() or args.wrong == args.prompt:
            del prompts["a wrong caption"]
        last = int(pipe.scheduler.config.num_train_timesteps) - 1
        points = list(noising.loss_sweep(pipe, picture, list(prompts.values()),
                                         noising.sweep_timesteps(args.points, last), seed=args.seed))  # fmt: skip
        labels = list(prompts)
        files["loss-vs-t.png"] = render.to_image(render.loss_plot(points, labels, t))
        with open(out / "loss-vs-t.csv", "w", newline="", encoding="utf-8") as f:
            rows = csv.writer(f)
            rows.writerow(["timestep", "alpha_bar", *(f"loss, {label}: {prompts[label]!r}" for label in labels)])
            rows.writerows([p.timestep, f"{p.alpha_bar:.6f}", *(f"{v:.6f}" for v in p.losses)] for p in points)
    written = []
    for name, image in files.items():
        image.save(out / name)
        written.append(out / name)
    if args.points:
        written.append(out / "loss-vs-t.csv")
    written.append(run.save(out / "trace.safetensors"))
    return run.loss, written


def main(argv: list[str] | None = None) -> int:
    from .__main__ import choose_model, open_model  # the same model choice as the main command

    args = build_parser().parse_args(argv)
    if not args.image.is_file():
        print(f"error: {args.image} is not a file: give the path of a picture (PNG, JPEG…)", file=sys.stderr)
        return 2
    if not 0 <= args.points <= 1000 or args.points == 1:
        print("error: --points must be 0 (no curve) or 2 to 1000", file=sys.stderr)
        return 2
    try:
        model = choose_model(args.model)
        pipe = open_model(model, args.device, args.dtype)
        loss, written = write(pipe, args)
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            return 2
        raise
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"t = {args.timestep}: training loss {loss:.4f}; wrote {len(written)} files to {args.out}", file=sys.stderr)
    return 0
