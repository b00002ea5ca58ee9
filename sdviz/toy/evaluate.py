"""Evaluate the toy model on held-out captions, through sdviz's tracing (the same code as the app).

    python -m sdviz.toy.evaluate [--model sdviz/toy/model] [--json out.json]

Measures VAE reconstruction PSNR; whether generated images hold every requested colour, no other
colour, the requested shapes and positions (colour segmentation); and cross-attention localisation:
the pointing game (argmax of a word's heatmap inside the mask of the object it names) and the IoU of
the heatmap, min-max normalised and thresholded at 0.5, with that mask. Localisation is measured on
generated images (masks from segmentation) and on held-out scenes noised to t=501 (exact masks), for
all layers and for the finest ones alone, with how large the thresholded maps are against their objects
and the best a perfect map (the mask itself) could score at the model's attention grids.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import sdviz
from sdviz.toy import world

PALETTE = {"background": world.BACKGROUND, **world.COLOURS}
COLOUR_TOLERANCE = 60.0  # RGB distance; edge pixels blended with the background fall outside it
MIN_PIXELS = 12  # a colour counts as present from this many pixels (a small triangle has ~50)
HEATMAP_THRESHOLD = 0.5  # on the min-max normalised heatmap
NOISED_T = 501  # the first timestep of a 2-step DDIM schedule (SD's "leading" spacing + offset 1)
TARGETS = {
    "vae_psnr_db": 30.0,
    "all_colours_present": 0.95,
    "no_extra_colour": 0.90,
    "pointing_colour": 0.95,
    "pointing_shape": 0.95,
    "miou": 0.6,
    "seconds_per_image": 2.0,
}


def segment(image: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels of each palette colour (background included). [H, W, 3] uint8 → {name: [H, W] bool}"""
    names = list(PALETTE)
    ref = np.array([PALETTE[n] for n in names], np.float32)  # [C, 3]
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None] - ref, axis=-1)  # [H, W, C]
    nearest, close = dist.argmin(-1), dist.min(-1) < COLOUR_TOLERANCE
    return {n: (nearest == i) & close for i, n in enumerate(names)}


def colours_present(seg: dict[str, np.ndarray]) -> set[str]:
    return {c for c in world.COLOURS if seg[c].sum() >= MIN_PIXELS}


def classify_shape(mask: np.ndarray) -> str:
    """Circle, square or triangle from how much of its bounding box the shape fills (π/4, 1, 1/2)."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.93 else "circle" if fill > 0.67 else "triangle"


def position_ok(mask: np.ndarray, position: str) -> bool:
    """Whether the object's centroid lies in the half of the image its position word names."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    cx, cy = xs.mean() / w, ys.mean() / h
    return bool(
        {"on the left": cx < 0.5, "on the right": cx > 0.5, "at the top": cy < 0.5, "at the bottom": cy > 0.5}[position]
    )


def localisation(run, caption: str, masks: list[np.ndarray | None], steps) -> list[dict]:
    """Pointing-game hit and IoU for each colour and shape word whose object has a mask, for the
    default heatmap (all cross-attention layers) and for the finest-resolution layers alone."""
    out, seen = [], {}
    finest = max(layer.height for layer in run.layers)
    for word, obj in zip(caption.split(), world.word_objects(caption)):
        k = seen.get(word, 0)
        seen[word] = k + 1  # the k-th occurrence of a word is the k-th token of that word
        if word not in world.COLOURS and word not in world.SHAPES:
            continue
        mask = masks[obj]
        if mask is None or not mask.any():
            continue
        row = {"kind": "colour" if word in world.COLOURS else "shape"}
        for suffix, resolutions in (("", None), ("_finest", finest)):
            heat = run.heatmap(
                run.token_indices(word)[k], steps=steps, size=mask.shape, resolutions=resolutions
            )  # [H, W]
            row["hit" + suffix], row["iou" + suffix], row["area" + suffix] = score_map(heat, mask)
        out.append(row)
    return out


def score_map(heat: np.ndarray, mask: np.ndarray) -> tuple[bool, float, float]:
    """(is the map's argmax inside the mask, IoU of the min-max normalised map > threshold with the mask,
    area of that thresholded map / the mask's area: below 1 a map too peaked, above 1 too broad)."""
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    norm = (heat - heat.min()) / max(heat.max() - heat.min(), 1e-12)
    pred = norm > HEATMAP_THRESHOLD
    return bool(mask[y, x]), float((pred & mask).sum() / (pred | mask).sum()), float(pred.sum() / mask.sum())


def ideal_map_ceiling(pipe, scenes) -> dict:
    """The best these metrics can be at this UNet's attention resolutions: each object's exact mask,
    area-pooled to every cross-attention layer's grid, then aggregated as `TraceResult.heatmap` does
    (bilinear upsampling, mean over layers) and scored like the model's maps."""
    size = scenes[0].image.shape[0]
    with sdviz.trace(pipe) as tracer:  # one tiny traced call, only to learn the layers' grids
        pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, height=size, width=size, output_type="latent")
    grids = [layer.height for layer in tracer.result.layers]
    hits, ious = [], []
    for scene in scenes:
        for mask in scene.masks:
            m = torch.from_numpy(mask).float()[None, None]  # [1, 1, H, W]
            heat = sum(
                F.interpolate(F.adaptive_avg_pool2d(m, g), size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
                for g in grids
            )
            hit, iou, _ = score_map((heat / len(grids)).numpy(), mask)
            hits.append(hit)
            ious.append(iou)
    return {"pointing": _mean(hits), "miou": _mean(ious), "objects": len(ious), "grids": grids}


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def vae_psnr(pipe, scenes) -> float:
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W]
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse)


def evaluate_generated(pipe, captions, seeds, guidance: float, steps: int, size: int) -> dict:
    rows, loc = [], []
    for caption in captions:
        objects = world.parse_caption(caption)
        asked = {o.colour for o in objects}
        for seed in seeds:
            with sdviz.trace(pipe) as tracer:
                image = pipe(
                    caption,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=size,
                    width=size,
                    generator=torch.Generator().manual_seed(seed),
                ).images[0]
            seg = segment(np.asarray(image))
            found = colours_present(seg)
            masks = [seg[o.colour] if o.colour in found else None for o in objects]
            shapes = [bool(classify_shape(m) == o.shape) for o, m in zip(objects, masks) if m is not None]
            places = [position_ok(m, o.position) for o, m in zip(objects, masks) if m is not None and o.position]
            unseen_set = any(set(colours) <= asked for colours in world.HELDOUT_COLOUR_SETS)
            rows.append(
                {
                    "caption": caption,
                    "seed": seed,
                    "all_colours": asked <= found,
                    "no_extra": found <= asked,
                    "unseen_colour_set": unseen_set,
                    "shapes": shapes,
                    "positions": places,
                }
            )
            loc += localisation(tracer.result, caption, masks, steps=None)
    return {
        "images": len(rows),
        "all_colours_present": _mean(r["all_colours"] for r in rows),
        "no_extra_colour": _mean(r["no_extra"] for r in rows),
        "all_colours_present_one_object": _mean(r["all_colours"] for r in rows if " and " not in r["caption"]),
        "all_colours_present_several_objects": _mean(r["all_colours"] for r in rows if " and " in r["caption"]),
        "all_colours_present_unseen_colour_set": _mean(r["all_colours"] for r in rows if r["unseen_colour_set"]),
        "all_colours_present_other": _mean(r["all_colours"] for r in rows if not r["unseen_colour_set"]),
        "shape_correct": _mean(s for r in rows for s in r["shapes"]),
        "position_correct": _mean(p for r in rows for p in r["positions"]),
        **_loc_summary(loc),
        "per_image": rows,
    }


def _loc_summary(loc: list[dict]) -> dict:
    out = {"words": len(loc)}
    for suffix in ("", "_finest"):
        out["pointing_colour" + suffix] = _mean(x["hit" + suffix] for x in loc if x["kind"] == "colour")
        out["pointing_shape" + suffix] = _mean(x["hit" + suffix] for x in loc if x["kind"] == "shape")
        out["miou" + suffix] = _mean(x["iou" + suffix] for x in loc)
        out["area_ratio" + suffix] = float(np.median([x["area" + suffix] for x in loc])) if loc else float("nan")
    return out


@torch.no_grad()
def evaluate_noised(pipe, scenes, seed: int = 0) -> dict:
    """Localisation on real held-out scenes: encode, noise to t=NOISED_T, one traced UNet step."""
    loc = []
    gen = torch.Generator().manual_seed(seed)
    for scene in scenes:
        x = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1  # [1, 3, H, W]
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor  # [1, 4, h, w]
        t = torch.tensor([NOISED_T])
        zt = pipe.scheduler.add_noise(z, torch.randn(z.shape, generator=gen), t)
        # A 2-step DDIM run starts at t=501 from our noised latents: step 0 is the UNet call we read.
        with sdviz.trace(pipe) as tracer:
            pipe(
                scene.caption,
                num_inference_steps=2,
                guidance_scale=1.0,
                latents=zt,
                height=x.shape[-2],
                width=x.shape[-1],
                output_type="latent",
            )
        assert int(pipe.scheduler.timesteps[0]) == NOISED_T, "scheduler no longer starts at NOISED_T"
        loc += localisation(tracer.result, scene.caption, list(scene.masks), steps=[0])
    return _loc_summary(loc)


# -- contrast across words (issue 14): a separate measurement, its own rows in the table ----------------
CONTRASTS = {  # variant → (which tokens share each pixel, temperature); see TraceResult.heatmap(contrast=...)
    "none": (None, 1.0),
    "all caption words, τ=1 (plain share)": ("all", 1.0),
    "all caption words, τ=0.5": ("all", 0.5),
    "colour and shape words only, τ=1": ("content", 1.0),
}


@torch.no_grad()
def evaluate_contrast(pipe, scenes) -> dict:
    """Localisation on held-out scenes noised to t=NOISED_T (`sdviz.noise_image`, noise seed = scene index),
    each colour and shape word scored without and with contrast: every pixel's attention renormalised
    across the caption's words, each occurrence on its own (see CONTRASTS). The same maps in every row."""
    scores = {name: [] for name in CONTRASTS}
    for i, scene in enumerate(scenes):
        run = sdviz.noise_image(pipe, scene.image, scene.caption, NOISED_T, seed=i)
        words = scene.caption.split()
        tokens = [t.index for t in run.tokens if not t.special]  # one token per word in the toy world
        content = [tokens[j] for j, w in enumerate(words) if w in world.COLOURS or w in world.SHAPES]
        for j, (word, obj) in enumerate(zip(words, world.word_objects(scene.caption))):
            if word not in world.COLOURS and word not in world.SHAPES:
                continue
            kind = "colour" if word in world.COLOURS else "shape"
            mask = scene.masks[obj]
            for name, (among, temperature) in CONTRASTS.items():
                groups = None if among is None else [[t] for t in (tokens if among == "all" else content)]
                heat = run.heatmap([tokens[j]], size=mask.shape, contrast=groups, temperature=temperature)
                hit, iou, _ = score_map(heat, mask)
                scores[name].append((kind, hit, iou))
    return {
        name: {
            "pointing_colour": _mean(h for k, h, _ in rows if k == "colour"),
            "pointing_shape": _mean(h for k, h, _ in rows if k == "shape"),
            "miou": _mean(iou for _, _, iou in rows),
            "words": len(rows),
        }
        for name, rows in scores.items()
    }


def contrast_table(contrast: dict) -> list[str]:
    """Rows for the table: each contrast variant's pointing game and mIoU on the noised scenes."""
    lines = []
    for name, c in contrast.items():
        lines.append(
            f"| noised t={NOISED_T}, contrast: {name} — pointing game colour / shape, mIoU | "
            f"{c['pointing_colour']:.1%} / {c['pointing_shape']:.1%}, {c['miou']:.2f} | – | – |"
        )
    return lines


def time_generation(pipe, guidance: float, steps: int, size: int, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds for one untraced generation (the first call warms up)."""
    pipe("a red circle", num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(
            "a small blue square on the left and a yellow triangle",
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(0),
        )
        best = min(best, time.perf_counter() - start)
    return best


def evaluate(
    pipe,
    n_captions: int = 48,
    seeds=(0, 1),
    n_scenes: int = 100,
    guidance: float = 5.0,
    steps: int = 20,
    size: int = 64,
) -> dict:
    pipe.set_progress_bar_config(disable=True)
    heldout = world.sample_scenes(n_scenes, seed=4321, heldout=True, size=size)
    results = {
        "vae_psnr_db": vae_psnr(pipe, heldout),
        "generated": evaluate_generated(pipe, world.heldout_captions(n_captions), seeds, guidance, steps, size),
        "noised": evaluate_noised(pipe, heldout),
        "ceiling": ideal_map_ceiling(pipe, heldout),
        "seconds_per_image": time_generation(pipe, guidance, steps, size),
        "settings": {
            "captions": n_captions,
            "seeds": list(seeds),
            "scenes": n_scenes,
            "guidance": guidance,
            "steps": steps,
            "size": size,
            "threads": torch.get_num_threads(),
            "noised_t": NOISED_T,
            "heatmap_threshold": HEATMAP_THRESHOLD,
            "scheduler": type(pipe.scheduler).__name__,
        },
    }
    results["contrast"] = evaluate_contrast(pipe, heldout)  # issue 14
    return results


def table(r: dict) -> str:
    g, n = r["generated"], r["noised"]
    fine = max(r["ceiling"]["grids"])
    fine = f"{fine}×{fine} layers only"
    rows = [
        ("VAE PSNR (dB), held-out scenes", r["vae_psnr_db"], "vae_psnr_db", "{:.1f}"),
        ("generated: every requested colour present", g["all_colours_present"], "all_colours_present", "{:.1%}"),
        ("generated: no unrequested colour", g["no_extra_colour"], "no_extra_colour", "{:.1%}"),
        ("generated: every requested colour, 1-object captions", g["all_colours_present_one_object"], None, "{:.1%}"),
        (
            "generated: every requested colour, 2–3-object captions",
            g["all_colours_present_several_objects"],
            None,
            "{:.1%}",
        ),
        (
            "generated: every requested colour — captions with colours never seen together / the other held-out "
            "captions",
            f"{g['all_colours_present_unseen_colour_set']:.1%} / {g['all_colours_present_other']:.1%}",
            None,
            "{}",
        ),
        ("generated: shape right (object found)", g["shape_correct"], None, "{:.1%}"),
        ("generated: position right (object found)", g["position_correct"], None, "{:.1%}"),
        ("generated: pointing game, colour words", g["pointing_colour"], "pointing_colour", "{:.1%}"),
        ("generated: pointing game, shape words", g["pointing_shape"], "pointing_shape", "{:.1%}"),
        ("generated: mIoU (map > 0.5)", g["miou"], "miou", "{:.2f}"),
        (f"noised t={NOISED_T}: pointing game, colour words", n["pointing_colour"], "pointing_colour", "{:.1%}"),
        (f"noised t={NOISED_T}: pointing game, shape words", n["pointing_shape"], "pointing_shape", "{:.1%}"),
        (f"noised t={NOISED_T}: mIoU (map > 0.5)", n["miou"], "miou", "{:.2f}"),
        (
            "area of map > 0.5 / object area, median — generated / noised (< 1: too peaked, > 1: too broad)",
            f"{g['area_ratio']:.2f} / {n['area_ratio']:.2f}",
            None,
            "{}",
        ),
        (
            f"generated: pointing game, colour / shape words, {fine}",
            f"{g['pointing_colour_finest']:.1%} / {g['pointing_shape_finest']:.1%}",
            None,
            "{}",
        ),
        (f"generated: mIoU, {fine}", g["miou_finest"], None, "{:.2f}"),
        (
            f"noised t={NOISED_T}: pointing game, colour / shape words, {fine}",
            f"{n['pointing_colour_finest']:.1%} / {n['pointing_shape_finest']:.1%}",
            None,
            "{}",
        ),
        (f"noised t={NOISED_T}: mIoU, {fine}", n["miou_finest"], None, "{:.2f}"),
        (
            "ceiling: pointing game / mIoU of a perfect map (the mask) at these layers' resolutions",
            f"{r['ceiling']['pointing']:.1%} / {r['ceiling']['miou']:.2f}",
            None,
            "{}",
        ),
        ("seconds per 20-step image with guidance", r["seconds_per_image"], "seconds_per_image", "{:.2f}"),
    ]
    lines = ["| metric | value | target | met |", "|---|---|---|---|"]
    for name, value, key, fmt in rows:
        if key is None:
            lines.append(f"| {name} | {fmt.format(value)} | – | – |")
            continue
        target = TARGETS[key]
        met = value <= target if key == "seconds_per_image" else value >= target
        sign = "≤" if key == "seconds_per_image" else "≥"
        lines.append(f"| {name} | {fmt.format(value)} | {sign} {fmt.format(target)} | {'yes' if met else 'no'} |")
    if "contrast" in r:  # issue 14: contrast across words
        lines += contrast_table(r["contrast"])
    s = r["settings"]
    lines.append(
        f"\n{g['images']} generated images ({s['captions']} held-out captions × seeds {s['seeds']}, "
        f"{s['steps']} {s['scheduler']} steps, guidance {s['guidance']}, {g['words']} words scored); "
        f"{s['scenes']} noised held-out scenes ({n['words']} words); {s['threads']} thread(s)."
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sdviz.toy.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped toy model)")
    p.add_argument("--json", type=Path, default=None, help="also write all figures (and per-image rows) here")
    p.add_argument("--captions", type=int, default=48, help="held-out captions to generate")
    p.add_argument("--seeds", type=int, default=2, help="seeds per caption")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes for the noised-image test")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.model)
    else:
        pipe = sdviz.load_pipeline("toy")
    results = evaluate(pipe, args.captions, tuple(range(args.seeds)), args.scenes, args.guidance)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
