"""Does the text help the U-Net predict the noise? The built-in model's training loss on shapes-world scenes with
each scene's own caption, another scene's caption and no caption, averaged over scenes and timesteps.

python examples/caption_loss.py --scenes 32 --timesteps 20 --seed 7
"""

import argparse

import numpy as np
import torch

import sdviz
from sdviz.noising import loss_sweep, sweep_timesteps
from sdviz.toy import world

LABELS = ("own caption", "another scene's caption", "no caption")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=20, help="spread evenly over 0–999")
    parser.add_argument("--seed", type=int, default=7, help="which scenes (sdviz.toy.world.sample_scenes)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = sdviz.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    scenes = world.sample_scenes(args.scenes, seed=args.seed)
    timesteps = sweep_timesteps(args.timesteps)
    losses = []  # [scene][timestep][caption]
    for i, scene in enumerate(scenes):
        wrong = scenes[(i + 1) % len(scenes)].caption  # the next scene's caption: a real caption, the wrong one
        points = loss_sweep(pipe, scene.image, [scene.caption, wrong, ""], timesteps, seed=i)
        losses.append([p.losses for p in points])
    losses = np.array(losses)  # [scenes, timesteps, 3]

    print(f"{len(scenes)} scenes (seed {args.seed}) × {len(timesteps)} timesteps from 0 to 999, one noise per scene:")
    for k, label in enumerate(LABELS):
        without_t0 = losses[:, 1:, k].mean()
        print(f"  mean loss, {label:<24} {losses[:, :, k].mean():.4f}   (without t = 0: {without_t0:.4f})")
    own, other, none = (losses[:, :, k] for k in range(3))
    print(f"  another scene's caption / own caption: ×{other.mean() / own.mean():.2f}")
    better = (own.mean(1) < other.mean(1)).mean()
    print(f"  scenes whose own caption has the lower mean loss than another's: {better:.0%}")
    print(f"  (scene, timestep) pairs where the own caption is lower: {(own < other).mean():.0%}")
    print(f"  pairs where the own caption is lower than no caption: {(own < none).mean():.0%}")
    print(f"  no caption / own caption: ×{none.mean() / own.mean():.2f}")


if __name__ == "__main__":
    main()
