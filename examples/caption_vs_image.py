"""Which wins, the image or the words? A one-object scene is noised part of the way (img2img strength) and
redrawn by the built-in model with one word of its caption swapped: its colour, its shape or its place.
A model that reads a word draws the new one once the noise has hidden the old; one that copies it from the
noisy image keeps the old. Saves a labelled grid: per kind, the scene, then the redraws at rising strengths.

python examples/caption_vs_image.py --out docs/override.png

`python -m sdviz.toy.probe --signal` counts the same over 16 scenes (the model card's figures).
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import sdviz  # noqa: E402
from sdviz.toy import probe  # noqa: E402

KINDS = ("colour", "shape", "position")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="caption_vs_image.png", help="where to save the grid (PNG)")
    parser.add_argument("--scene", type=int, default=0, help="which scene of probe.swap_cases (seeded)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = sdviz.load_pipeline("toy")
    redraw = probe.Redrawer(pipe)
    case = probe.swap_cases(args.scene + 1)[args.scene]
    cols = 1 + len(args.strengths)
    fig, axes = plt.subplots(len(KINDS), cols, figsize=(1.6 * cols, 1.95 * len(KINDS)), squeeze=False)
    for row, kind in enumerate(KINDS):
        new = case.swapped[kind]
        axes[row, 0].imshow(case.image)
        axes[row, 0].set_title(f"scene:\n{case.old.phrase()}", fontsize=7)
        for col, strength in enumerate(args.strengths, start=1):
            drawn = redraw(case.image, new.phrase(), strength, seed=args.scene)
            verdict = (
                "new word"
                if probe.follows(drawn, new, kind, case.old)
                else ("old word" if probe.follows(drawn, case.old, kind, new) else "neither")
            )
            axes[row, col].imshow(drawn)
            axes[row, col].set_title(f"strength {strength:g}: {verdict}", fontsize=7)
        axes[row, 0].set_ylabel(f"{kind}:\n{getattr(case.old, kind)} → {getattr(new, kind)}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Redrawn with one word swapped: from which noise level does the new word win?", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=150)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
