"""The Python API end to end, offline: trace one generation and save every picture sdviz makes.

python examples/trace_and_save.py "a red circle on the left and a blue square on the right" --out out/example
"""

import argparse
from pathlib import Path

import torch

import sdviz
from sdviz import render


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="a red circle on the left and a blue square on the right")
    parser.add_argument("--model", default="toy", help="preset, Hub id or local folder (default: built-in model)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("out/example"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    pipe = sdviz.load_pipeline(args.model)
    with sdviz.trace(pipe, prompt=args.prompt) as tracer:
        image = pipe(
            args.prompt, num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(0)
        ).images[0]
    run = tracer.result

    image.save(args.out / "image.png")
    print("words:", [w.text for w in run.words])
    for word in run.words:
        heat = run.heatmap(word.text, size="image")  # mean attention probability, [H, W]
        render.overlay(image, heat, alpha=0.6).save(args.out / f"heatmap-{word.index}-{word.text}.png")
    render.to_image(render.word_grid(run, image)).save(args.out / "words.png")
    render.to_image(render.schedule_plot(run, step=run.num_steps // 2)).save(args.out / "schedule.png")
    render.to_image(render.attention_over_time(run)).save(args.out / "attention_over_time.png")
    render.to_image(render.step_strip(run)).save(args.out / "steps.png")
    render.latent_rgb(run.final_latent, size=256).save(args.out / "latent_rgb.png")
    render.latent_channels(run.final_latent, size=128).save(args.out / "latent_channels.png")
    render.preview(run, step=run.num_steps // 2).save(args.out / "x0_preview_mid.png")
    from PIL import Image

    Image.fromarray(run.decode(run.num_steps // 2, pipe.vae)).save(args.out / "x0_decoded_mid.png")
    run.save(args.out / "trace.safetensors")
    print(
        f"wrote {len(list(args.out.iterdir()))} files to {args.out}; "
        f"the trace holds {run.nbytes / 2**20:.1f} MB over {run.num_steps} steps"
    )


if __name__ == "__main__":
    main()
