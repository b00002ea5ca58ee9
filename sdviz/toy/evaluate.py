"""Evaluate the toy model on held-out captions, through sdviz's tracing (the same code as the app).

    python -m sdviz.toy.evaluate [--model sdviz/toy/model] [--json out.json]

Measures VAE reconstruction PSNR; in generated images (colour segmentation), per object, whether its
colour is there, its shape, its position (centroid in the named outer part of the image) and its size
are right, and no unrequested colour; "same seed, one word changed": for caption pairs differing in one
position (or shape) word, how often the object goes to each named place (or takes each named shape);
and cross-attention localisation: the pointing game (argmax of a word's heatmap inside the mask of the
object it names) and the IoU of the heatmap, min-max normalised and thresholded at 0.5, with that mask,
on generated images (masks from segmentation) and on held-out scenes noised to t=501 (exact masks), for
all layers and for the finest ones alone, with how large the thresholded maps are against their objects
and the best a perfect map (the mask itself) could score at the model's attention grids. The shape,
position and size checks are also run on the held-out scenes themselves and on their VAE
reconstructions: the best a generated image could score.
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
TARGETS = {  # issue 13's targets; "max" ones are upper bounds
    "vae_psnr_db": 30.0,
    "all_colours_present_other": 0.95,
    "all_colours_present_unseen_colour_set": 0.80,
    "no_extra_colour": 0.95,
    "shape_correct": 0.90,
    "position_correct": 0.90,
    "size_correct": 0.90,
    "position_change_followed": 0.90,
    "shape_change_followed": 0.90,
    "pointing_colour": 0.95,
    "pointing_shape": 0.95,
    "miou": 0.6,
    "seconds_per_image": 1.0,
    "fp16_megabytes": 20.0,
}
UPPER_BOUNDS = {"seconds_per_image", "fp16_megabytes"}
# The words whose maps are scored, by kind; a position is scored at its last word ("left").
KIND_OF_WORD = {
    **dict.fromkeys(world.COLOURS, "colour"),
    **dict.fromkeys(world.SHAPES, "shape"),
    **dict.fromkeys(world.SIZES, "size"),
    **dict.fromkeys((p.split()[-1] for p in world.POSITIONS), "position"),
}
OPPOSITE = {"on the left": "on the right", "on the right": "on the left", "at the top": "at the bottom"}
OPPOSITE["at the bottom"] = "at the top"


def segment(image: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels of each palette colour (background included). [H, W, 3] uint8 → {name: [H, W] bool}"""
    names = list(PALETTE)
    ref = np.array([PALETTE[n] for n in names], np.float32)  # [C, 3]
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None] - ref, axis=-1)  # [H, W, C]
    nearest, close = dist.argmin(-1), dist.min(-1) < COLOUR_TOLERANCE
    return {n: (nearest == i) & close for i, n in enumerate(names)}


def colours_present(seg: dict[str, np.ndarray]) -> set[str]:
    return {c for c in world.COLOURS if seg[c].sum() >= MIN_PIXELS}


# Ideal shapes in a unit box, as world.render draws them: an inscribed circle, a square filling the box
# (its bounding box is the square itself) and an upright triangle with its apex at the top centre.
SHAPE_TEMPLATES = {
    "circle": lambda x, y: (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
    "square": lambda x, y: np.ones(np.broadcast(x, y).shape, bool),
    "triangle": lambda x, y: np.abs(x - 0.5) <= y / 2,
}
OUTER_PART = 0.45  # "on the left": centroid in the left 45 % of the image (training scenes: left 38–44 %)
LARGE_SIDE = 16.5 / 64  # a large object's bounding box is 18–25 px at 64×64, a small one's 9–15


def classify_shape(mask: np.ndarray) -> str:
    """The shape (circle, square, triangle) whose ideal outline, drawn in the mask's bounding box,
    overlaps the mask best (IoU). Robust to the soft, eroded edges of generated shapes."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]  # [h, w]
    h, w = box.shape
    y, x = (np.arange(h)[:, None] + 0.5) / h, (np.arange(w)[None, :] + 0.5) / w
    ious = {}
    for name, inside in SHAPE_TEMPLATES.items():
        ideal = inside(x, y)
        ious[name] = (ideal & box).sum() / (ideal | box).sum()
    return max(ious, key=ious.get)


def position_ok(mask: np.ndarray, position: str) -> bool:
    """Whether the object's centroid lies in the outer part of the image its position word names."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h  # pixel i covers [i, i + 1)
    return bool(
        {
            "on the left": cx < OUTER_PART,
            "on the right": cx > 1 - OUTER_PART,
            "at the top": cy < OUTER_PART,
            "at the bottom": cy > 1 - OUTER_PART,
        }[position]
    )


def classify_size(mask: np.ndarray) -> str:
    """ "large" or "small" from the longer side of the mask's bounding box."""
    ys, xs = np.nonzero(mask)
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / mask.shape[1]
    return "large" if side > LARGE_SIDE else "small"


def localisation(run, caption: str, masks: list[np.ndarray | None], steps) -> list[dict]:
    """Pointing-game hit and IoU for each colour, shape, size and position word whose object has a mask,
    for the default heatmap (all cross-attention layers) and for the finest-resolution layers alone."""
    out, seen = [], {}
    finest = max(layer.height for layer in run.layers)
    for word, obj in zip(caption.split(), world.word_objects(caption)):
        k = seen.get(word, 0)
        seen[word] = k + 1  # the k-th occurrence of a word is the k-th token of that word
        mask = masks[obj] if word in KIND_OF_WORD else None
        if mask is None or not mask.any():
            continue
        row = {"kind": KIND_OF_WORD[word]}
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
def reconstruct(pipe, scenes) -> tuple[float, np.ndarray]:
    """(PSNR in dB, the reconstructions [N, H, W, 3] uint8) of the scenes through encode (mean) → decode."""
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W]
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean().item()
    images = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return 10 * math.log10(1 / mse), images


def score_objects(image: np.ndarray, objects: list[world.Obj]) -> tuple[set[str], list[dict]]:
    """The colours found in `image` [H, W, 3] uint8, and per object: its mask (its colour's pixels, None
    when the colour is missing) and whether its shape, position and size are right (None where the
    caption names no position or size, or the colour is missing)."""
    seg = segment(image)
    found = colours_present(seg)
    rows = []
    for o in objects:
        mask = seg[o.colour] if o.colour in found else None
        rows.append(
            {
                "mask": mask,
                "shape": None if mask is None else classify_shape(mask) == o.shape,
                "position": None if mask is None or not o.position else position_ok(mask, o.position),
                "size": None if mask is None or not o.size else classify_size(mask) == o.size,
            }
        )
    return found, rows


def _object_rates(rows: list[dict]) -> dict:
    """Shares of right shapes, positions and sizes over the objects where each is scored."""
    return {
        f"{key}_correct": _mean(r[key] for r in rows if r[key] is not None) for key in ("shape", "position", "size")
    }


def grammar_ceiling(scenes, reconstructions) -> dict:
    """The shape / position / size checks on the held-out scenes and on their VAE reconstructions: how
    well the checks read a perfect image, and the best a generated image through this VAE could score."""
    out = {}
    for name, images in (("scenes", [s.image for s in scenes]), ("reconstructed", reconstructions)):
        rows = [r for scene, image in zip(scenes, images) for r in score_objects(image, scene.objects)[1]]
        out[name] = _object_rates(rows)
    return out


def draw(pipe, caption: str, seed: int, guidance: float, steps: int, size: int):
    """One generation of `caption` with the evaluation's settings: the PIL image."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        caption, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, generator=generator
    ).images[0]


def generate(pipe, caption: str, seed: int, guidance: float, steps: int, size: int) -> tuple[np.ndarray, object]:
    """One traced generation: (image [H, W, 3] uint8, its TraceResult)."""
    with sdviz.trace(pipe) as tracer:
        image = draw(pipe, caption, seed, guidance, steps, size)
    return np.asarray(image), tracer.result


def evaluate_generated(pipe, captions, seeds, guidance: float, steps: int, size: int) -> dict:
    rows, objects_scored, loc = [], [], []
    for caption in captions:
        objects = world.parse_caption(caption)
        asked = {o.colour for o in objects}
        unseen_set = any(set(colours) <= asked for colours in world.HELDOUT_COLOUR_SETS)
        for seed in seeds:
            image, run = generate(pipe, caption, seed, guidance, steps, size)
            found, scored = score_objects(image, objects)
            objects_scored += scored
            rows.append(
                {
                    "caption": caption,
                    "seed": seed,
                    "all_colours": asked <= found,
                    "no_extra": found <= asked,
                    "unseen_colour_set": unseen_set,
                    "shapes": [r["shape"] for r in scored],
                    "positions": [r["position"] for r in scored],
                    "sizes": [r["size"] for r in scored],
                }
            )
            loc += localisation(run, caption, [r["mask"] for r in scored], steps=None)
    return {
        "images": len(rows),
        "all_colours_present": _mean(r["all_colours"] for r in rows),
        "no_extra_colour": _mean(r["no_extra"] for r in rows),
        "all_colours_present_one_object": _mean(r["all_colours"] for r in rows if " and " not in r["caption"]),
        "all_colours_present_several_objects": _mean(r["all_colours"] for r in rows if " and " in r["caption"]),
        "all_colours_present_unseen_colour_set": _mean(r["all_colours"] for r in rows if r["unseen_colour_set"]),
        "all_colours_present_other": _mean(r["all_colours"] for r in rows if not r["unseen_colour_set"]),
        **_object_rates(objects_scored),
        "objects_scored": {k: sum(r[k] is not None for r in objects_scored) for k in ("shape", "position", "size")},
        **_loc_summary(loc),
        "per_image": rows,
    }


def one_word_pairs(captions) -> tuple[list, list]:
    """Caption pairs that differ in one word, from `captions`: (position pairs, shape pairs), each a list of
    (caption A, caption B, index of the changed object, its word in A, in B). A position pair swaps the
    first positioned object's place for the opposite one (left ↔ right, top ↔ bottom) where no other object
    names it; a shape pair gives the first object the next shape of world.SHAPES."""
    positions, shapes = [], []
    for caption in captions:
        objects = world.parse_caption(caption)
        taken = {o.position for o in objects}
        for i, o in enumerate(objects):
            if o.position and OPPOSITE[o.position] not in taken:
                changed = [*objects[:i], world.Obj(o.colour, o.shape, o.size, OPPOSITE[o.position]), *objects[i + 1 :]]
                positions.append((caption, world.caption_of(changed), i, o.position, OPPOSITE[o.position]))
                break
        o = objects[0]
        other = world.SHAPES[(world.SHAPES.index(o.shape) + 1) % len(world.SHAPES)]
        changed = [world.Obj(o.colour, other, o.size, o.position), *objects[1:]]
        shapes.append((caption, world.caption_of(changed), 0, o.shape, other))
    return positions, shapes


def one_word_changes(pipe, captions, seed: int, guidance: float, steps: int, size: int) -> dict:
    """Same seed, one word changed: a pair is followed when the changed object is at the place (has the
    shape) its caption names in both images — it moved (changed shape) as the word did."""
    out = {}
    for kind, pairs in zip(("position", "shape"), one_word_pairs(captions)):
        followed = []
        for a, b, i, _, _ in pairs:
            ok = []
            for caption in (a, b):
                image, _ = generate(pipe, caption, seed, guidance, steps, size)
                ok.append(score_objects(image, world.parse_caption(caption))[1][i][kind] is True)
            followed.append(all(ok))
        out[f"{kind}_change_followed"] = _mean(followed)
        out[f"{kind}_pairs"] = len(pairs)
    return out


def _loc_summary(loc: list[dict]) -> dict:
    """Pointing game per word kind; mIoU and map areas over colour and shape words (the targets' words)."""
    named = [x for x in loc if x["kind"] in ("colour", "shape")]
    out = {"words": len(named), "words_size_position": len(loc) - len(named)}
    for suffix in ("", "_finest"):
        for kind in ("colour", "shape", "size", "position"):
            out[f"pointing_{kind}{suffix}"] = _mean(x["hit" + suffix] for x in loc if x["kind"] == kind)
        out["miou" + suffix] = _mean(x["iou" + suffix] for x in named)
        out["area_ratio" + suffix] = float(np.median([x["area" + suffix] for x in named])) if named else float("nan")
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


# -- contrast across words: a separate measurement, its own rows in the table ----------------
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


TIMED_CAPTION = "a small blue square on the left and a yellow triangle"


def timed_generation(pipe, guidance: float, steps: int, size: int, seed: int = 0) -> float:
    """Seconds for one untraced generation of TIMED_CAPTION."""
    start = time.perf_counter()
    draw(pipe, TIMED_CAPTION, seed, guidance, steps, size)
    return time.perf_counter() - start


def time_generation(pipe, guidance: float, steps: int, size: int, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds for one untraced generation (the first call warms up)."""
    pipe("a red circle", num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)
    return min(timed_generation(pipe, guidance, steps, size) for _ in range(repeats))


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
    captions = world.heldout_captions(n_captions)
    psnr, reconstructions = reconstruct(pipe, heldout)
    results = {
        "vae_psnr_db": psnr,
        "generated": evaluate_generated(pipe, captions, seeds, guidance, steps, size),
        "one_word_changes": one_word_changes(pipe, captions, seeds[0], guidance, steps, size),
        "noised": evaluate_noised(pipe, heldout),
        "ceiling": ideal_map_ceiling(pipe, heldout),
        "grammar_ceiling": grammar_ceiling(heldout, reconstructions),
        "seconds_per_image": time_generation(pipe, guidance, steps, size),
        "fp16_megabytes": 2
        * sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
        / 1e6,
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
    results["contrast"] = evaluate_contrast(pipe, heldout)
    return results


def table(r: dict) -> str:
    g, n, c, w = r["generated"], r["noised"], r["grammar_ceiling"], r["one_word_changes"]
    fine = max(r["ceiling"]["grids"])
    fine = f"{fine}×{fine} layers only"
    s = r["settings"]
    pct, two = "{:.1%}", "{:.2f}"

    def pair(a, b, fmt=pct):
        return f"{fmt.format(a)} / {fmt.format(b)}"

    rows = [  # (name, value, target key or None, format)
        ("VAE PSNR (dB), held-out scenes", r["vae_psnr_db"], "vae_psnr_db", "{:.1f}"),
        ("generated: every requested colour present, all held-out captions", g["all_colours_present"], None, pct),
        (
            "generated: every requested colour present, captions whose colours training saw together",
            g["all_colours_present_other"],
            "all_colours_present_other",
            pct,
        ),
        (
            "generated: every requested colour present, captions pairing red with yellow (never together in training)",
            g["all_colours_present_unseen_colour_set"],
            "all_colours_present_unseen_colour_set",
            pct,
        ),
        (
            "generated: every requested colour, 1-object / 2–3-object captions",
            pair(g["all_colours_present_one_object"], g["all_colours_present_several_objects"]),
            None,
            "{}",
        ),
        ("generated: no unrequested colour", g["no_extra_colour"], "no_extra_colour", pct),
        ("generated: shape right (objects whose colour is there)", g["shape_correct"], "shape_correct", pct),
        ("generated: shape right by the shape named (right/scored)", shapes_line(g["per_image"]), None, "{}"),
        ("generated: position right (objects with a position word)", g["position_correct"], "position_correct", pct),
        ("generated: size right (objects with a size word)", g["size_correct"], "size_correct", pct),
        (
            f"same seed, position word changed ({w['position_pairs']} pairs): object at both named places",
            w["position_change_followed"],
            "position_change_followed",
            pct,
        ),
        (
            f"same seed, shape word changed ({w['shape_pairs']} pairs): object has both named shapes",
            w["shape_change_followed"],
            "shape_change_followed",
            pct,
        ),
        (
            "checks on the held-out scenes themselves: shape / position / size right",
            f"{pair(c['scenes']['shape_correct'], c['scenes']['position_correct'])} / "
            f"{c['scenes']['size_correct']:.1%}",
            None,
            "{}",
        ),
        (
            "checks on their VAE reconstructions: shape / position / size right",
            f"{pair(c['reconstructed']['shape_correct'], c['reconstructed']['position_correct'])} / "
            f"{c['reconstructed']['size_correct']:.1%}",
            None,
            "{}",
        ),
        ("generated: pointing game, colour words", g["pointing_colour"], "pointing_colour", pct),
        ("generated: pointing game, shape words", g["pointing_shape"], "pointing_shape", pct),
        ("generated: mIoU (map > 0.5), colour and shape words", g["miou"], "miou", two),
        (f"noised t={NOISED_T}: pointing game, colour words", n["pointing_colour"], "pointing_colour", pct),
        (f"noised t={NOISED_T}: pointing game, shape words", n["pointing_shape"], "pointing_shape", pct),
        (f"noised t={NOISED_T}: mIoU (map > 0.5), colour and shape words", n["miou"], "miou", two),
        (
            "pointing game, size / position words — generated / noised",
            f"{pair(g['pointing_size'], g['pointing_position'])} — {pair(n['pointing_size'], n['pointing_position'])}",
            None,
            "{}",
        ),
        (
            "area of map > 0.5 / object area, median — generated / noised (< 1: too peaked, > 1: too broad)",
            pair(g["area_ratio"], n["area_ratio"], two),
            None,
            "{}",
        ),
        (
            f"generated: pointing game, colour / shape words, {fine}",
            pair(g["pointing_colour_finest"], g["pointing_shape_finest"]),
            None,
            "{}",
        ),
        (f"generated: mIoU, {fine}", g["miou_finest"], None, two),
        (
            f"noised t={NOISED_T}: pointing game, colour / shape words, {fine}",
            pair(n["pointing_colour_finest"], n["pointing_shape_finest"]),
            None,
            "{}",
        ),
        (f"noised t={NOISED_T}: mIoU, {fine}", n["miou_finest"], None, two),
        (
            "ceiling: pointing game / mIoU of a perfect map (the mask) at these layers' resolutions",
            f"{r['ceiling']['pointing']:.1%} / {r['ceiling']['miou']:.2f}",
            None,
            "{}",
        ),
        (
            f"seconds per {s['steps']}-step image with guidance, {s['threads']} thread(s)",
            r["seconds_per_image"],
            "seconds_per_image",
            two,
        ),
        ("fp16 weights (MB)", r["fp16_megabytes"], "fp16_megabytes", "{:.1f}"),
    ]
    lines = ["| metric | value | target | met |", "|---|---|---|---|"]
    for name, value, key, fmt in rows:
        if key is None:
            lines.append(f"| {name} | {fmt.format(value)} | – | – |")
            continue
        target = TARGETS[key]
        upper = key in UPPER_BOUNDS
        met = value <= target if upper else value >= target
        bound = f"{'≤' if upper else '≥'} {fmt.format(target)}"
        lines.append(f"| {name} | {fmt.format(value)} | {bound} | {'yes' if met else 'no'} |")
    if "contrast" in r:  # contrast across words (research tools)
        lines += contrast_table(r["contrast"])
    scored = g["objects_scored"]
    lines.append(
        f"\n{g['images']} generated images ({s['captions']} held-out captions × seeds {s['seeds']}, "
        f"{s['steps']} {s['scheduler']} steps, guidance {s['guidance']}; {scored['shape']} objects scored for shape, "
        f"{scored['position']} for position, {scored['size']} for size; {g['words']} colour and shape words' maps), "
        f"one-word pairs with seed {s['seeds'][0]}; {s['scenes']} noised held-out scenes ({n['words']} words); "
        f"{s['threads']} thread(s)."
    )
    return "\n".join(lines)


PROBE_MIX = world.Mix(counts=(1, 0, 0), p_position=1.0)


def size_probe_captions(size: str) -> list[str]:
    """ "a <size> <colour> <shape>" for every colour and shape (held-out pairs included), no position."""
    return [f"a {size} {c} {s}" for c in world.COLOURS for s in world.SHAPES]


def shapes_by_pair(per_image: list[dict]) -> dict:
    """Share of right shapes among one-object images, for colour+shape pairs training saw and for the
    held-out ones (images whose colour is missing are not scored)."""
    out = {}
    for name, heldout in (("trained_pairs", False), ("heldout_pairs", True)):
        out[f"shape_correct_{name}"] = _mean(
            r["shapes"][0]
            for r in per_image
            if r["shapes"][0] is not None and world.is_heldout(world.parse_caption(r["caption"])) == heldout
        )
    return out


def shapes_by_name(per_image: list[dict]) -> dict[str, tuple[int, int]]:
    """Per shape the caption names: (objects drawn with that shape, objects scored), over every object of
    every image (objects whose colour is missing are not scored)."""
    out = {shape: [0, 0] for shape in world.SHAPES}
    for r in per_image:
        for obj, right in zip(world.parse_caption(r["caption"]), r["shapes"]):
            if right is not None:
                out[obj.shape][0] += right
                out[obj.shape][1] += 1
    return {shape: tuple(counts) for shape, counts in out.items()}


def shapes_line(per_image: list[dict]) -> str:
    """ "circle 8/16 · square 9/14 · triangle 5/6": right / scored per named shape."""
    return " · ".join(f"{shape} {right}/{scored}" for shape, (right, scored) in shapes_by_name(per_image).items())


def probe_table(r: dict) -> str:
    g, w = r["generated"], r["one_word_changes"]
    if "shape_correct_trained_pairs" in g:  # the size probe: no position words
        shapes = (
            f" (pairs training saw {g['shape_correct_trained_pairs']:.1%}, held-out pairs "
            f"{g['shape_correct_heldout_pairs']:.1%})"
        )
        position, changes = "", f"shape changed: followed {w['shape_change_followed']:.1%} of {w['shape_pairs']} pairs"
    else:
        shapes, position = "", f", position right {g['position_correct']:.1%}"
        changes = (
            f"position changed: followed {w['position_change_followed']:.1%} of {w['position_pairs']} pairs, shape "
            f"changed: {w['shape_change_followed']:.1%} of {w['shape_pairs']}"
        )
    return (
        f"colour present {g['all_colours_present']:.1%}, shape right {g['shape_correct']:.1%}{shapes}{position}, "
        f"size right {g['size_correct']:.1%} ({g['images']} images); same seed, {changes}\n"
        f"shape right by the shape named: {shapes_line(g['per_image'])}"
    )


def load_model(folder: str | None):
    """The pipeline in `folder` (a checkpoint, another run), or the shipped model for None."""
    if folder is None:
        return sdviz.load_pipeline("toy")
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder)


def parse_args(argv=None) -> argparse.Namespace:
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
    p.add_argument(
        "--probe",
        action="store_true",
        help="only the generated-image and one-word-change figures, on one-object captions that each name a "
        "position (any colour and shape, training pairs included): what the model card's probes report",
    )
    p.add_argument(
        "--probe-size",
        choices=tuple(world.SIZES),
        default=None,
        help="with --probe: instead, 'a <size> <colour> <shape>' for all 12 colour and shape pairs (no position), "
        "shapes reported for trained and held-out pairs apart (the model card's size probe)",
    )
    p.add_argument(
        "--probe-image-size",
        type=int,
        default=64,
        help="with --probe: image side to generate at, for a model trained with python -m sdviz.toy.train --size "
        "(the checks are relative to the image side)",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_model(args.model)
    if args.probe:
        pipe.set_progress_bar_config(disable=True)
        if args.probe_size:
            captions = size_probe_captions(args.probe_size)
        else:
            captions = world.sample_captions(args.captions, heldout=None, mix=PROBE_MIX)
        results = {
            "generated": evaluate_generated(
                pipe, captions, tuple(range(args.seeds)), args.guidance, 20, args.probe_image_size
            ),
            "one_word_changes": one_word_changes(pipe, captions, 0, args.guidance, 20, args.probe_image_size),
        }
        if args.probe_size:
            results["generated"].update(shapes_by_pair(results["generated"]["per_image"]))
        print(probe_table(results))
    else:
        results = evaluate(pipe, args.captions, tuple(range(args.seeds)), args.scenes, args.guidance)
        print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
