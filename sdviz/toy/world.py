"""The shapes world: flat-coloured shapes on a light background, with captions and exact masks.

Grammar of a caption (every word is one token of the toy model's tokenizer):

    caption  := object ( " and " object ){0,2}
    object   := "a " [size " "] colour " " shape [" " position]
    size     := "small" | "large"
    colour   := "red" | "green" | "blue" | "yellow"
    shape    := "circle" | "square" | "triangle"
    position := "on the left" | "on the right" | "at the top" | "at the bottom"

e.g. "a red circle", "a small blue square on the left and a yellow triangle".
Within one caption the colours are distinct and the positions are distinct, objects never touch,
and an object without a size or position word gets a random one. Some colour+shape pairs and one
pair of colours never appear in training captions: `is_heldout` says which, `heldout_captions`
samples them for evaluation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

GRAMMAR = "\n".join(line[4:] for line in __doc__.splitlines() if line.startswith("    "))

COLOURS = {  # RGB, far from each other and from the background
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 20),
}
BACKGROUND = (238, 236, 230)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (5.5, 7.5), "large": (10.0, 12.5)}  # half-width range in pixels at 64×64
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")
VOCABULARY = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": POSITIONS,
    "joiner": ("a", "and"),
}
# Every word a caption can contain (position phrases split into words), for the tokenizer.
WORDS = tuple(
    dict.fromkeys(
        ["a", "and", "on", "the", "at"]
        + list(COLOURS)
        + list(SHAPES)
        + list(SIZES)
        + [p.split()[-1] for p in POSITIONS]
    )
)

# Held out of training: these colour+shape pairs anywhere, and any caption naming both colours.
HELDOUT_PAIRS = (("green", "triangle"), ("yellow", "circle"))
HELDOUT_COLOUR_SETS = (frozenset({"red", "yellow"}),)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str | None = None  # None: the caption does not say
    position: str | None = None  # one of POSITIONS or None

    def phrase(self) -> str:
        words = ["a"] + ([self.size] if self.size else []) + [self.colour, self.shape]
        return " ".join(words + ([self.position] if self.position else []))


@dataclass
class Scene:
    caption: str
    objects: list[Obj]
    image: np.ndarray  # [H, W, 3] uint8
    masks: np.ndarray  # [n_objects, H, W] bool, pixels whose coverage by the object is > 1/2


def caption_of(objects: list[Obj]) -> str:
    return " and ".join(o.phrase() for o in objects)


def parse_caption(caption: str) -> list[Obj]:
    """The objects a caption asks for; raises ValueError (saying where) on text outside the grammar."""
    objects = []
    for part in caption.strip().split(" and "):
        words = part.split()
        if not words or words[0] != "a":
            raise ValueError(f"object {part!r} must start with 'a'; grammar:\n{GRAMMAR}")
        words = words[1:]
        size = words.pop(0) if words and words[0] in SIZES else None
        if len(words) < 2 or words[0] not in COLOURS or words[1] not in SHAPES:
            raise ValueError(f"object {part!r} needs a colour {tuple(COLOURS)} then a shape {SHAPES}")
        position = " ".join(words[2:]) or None
        if position is not None and position not in POSITIONS:
            raise ValueError(f"unknown position {position!r} in {part!r}; use one of {POSITIONS}")
        objects.append(Obj(words[0], words[1], size, position))
    return objects


def word_objects(caption: str) -> list[int | None]:
    """For each word of `caption`, the index of the object it belongs to (None for "and")."""
    owners, obj = [], 0
    for word in caption.split():
        if word == "and":
            owners.append(None)
            obj += 1
        else:
            owners.append(obj)
    return owners


def is_heldout(objects: list[Obj]) -> bool:
    colours = {o.colour for o in objects}
    return any((o.colour, o.shape) in HELDOUT_PAIRS for o in objects) or any(s <= colours for s in HELDOUT_COLOUR_SETS)


@dataclass(frozen=True)
class Mix:
    """How captions are drawn: the weights of 1-, 2- and 3-object captions, how often an object names its
    position, and the weights of (no size word, "small", "large") — None: each equally likely, drawn as
    the shipped model's training data was. The default is the evaluation's mix (held-out captions and scenes)."""

    counts: tuple[float, float, float] = (3, 4, 3)
    p_position: float = 0.6
    sizes: tuple[float, float, float] | None = None


EVALUATION_MIX = Mix()


def _size_word(rng: random.Random, mix: Mix) -> str | None:
    words = (None, *SIZES)
    return rng.choice(words) if mix.sizes is None else rng.choices(words, weights=mix.sizes)[0]


def sample_objects(rng: random.Random, heldout: bool | None = False, mix: Mix = EVALUATION_MIX) -> list[Obj]:
    """A random list of 1–3 objects; `heldout` True/False keeps only held-out/training ones, None any."""
    while True:
        n = rng.choices((1, 2, 3), weights=mix.counts)[0]
        colours = rng.sample(list(COLOURS), n)
        positions = rng.sample(POSITIONS, n)
        objects = [
            Obj(c, rng.choice(SHAPES), _size_word(rng, mix), p if rng.random() < mix.p_position else None)
            for c, p in zip(colours, positions)
        ]
        if heldout is None or is_heldout(objects) == heldout:
            return objects


def _coverage(obj: Obj, cx: float, cy: float, r: float, size: int, ss: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape, from an ss×ss supersampled grid. [size, size]"""
    g = (np.arange(size * ss) + 0.5) / ss  # subpixel centres in pixel units
    x, y = g[None, :], g[:, None]
    if obj.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif obj.shape == "square":
        h = 0.9 * r  # a little smaller, so the square's area is close to the circle's
        inside = (abs(x - cx) <= h) & (abs(y - cy) <= h)
    else:  # upright isosceles triangle in the box [cx ± r, cy ± r]
        t = (y - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (abs(x - cx) <= t * r)
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3))


def _centre_range(position: str | None, r: float, size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    lo, hi, cut = r + 1, size - r - 1, 0.38 * size  # "on the left" = centre in the left 38 %
    xs, ys = (lo, hi), (lo, hi)
    if position == "on the left":
        xs = (lo, max(lo, cut))
    elif position == "on the right":
        xs = (min(hi, size - cut), hi)
    elif position == "at the top":
        ys = (lo, max(lo, cut))
    elif position == "at the bottom":
        ys = (min(hi, size - cut), hi)
    return xs, ys


def render(objects: list[Obj], rng: random.Random, size: int = 64) -> Scene:
    """Place `objects` without overlap (2 px gap at least) and paint them with anti-aliased edges."""
    scale = size / 64
    for _ in range(200):
        boxes = []
        for o in objects:
            size_word = o.size or rng.choice(tuple(SIZES))
            r = rng.uniform(*SIZES[size_word]) * scale
            (x0, x1), (y0, y1) = _centre_range(o.position, r, size)
            cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
            if any(abs(cx - bx) < r + br + 2 and abs(cy - by) < r + br + 2 for bx, by, br in boxes):
                break
            boxes.append((cx, cy, r))
        else:
            break
    else:
        raise RuntimeError(f"could not place {caption_of(objects)!r} without overlap")
    image = np.empty((size, size, 3), np.float32)
    image[:] = BACKGROUND
    masks = []
    for o, (cx, cy, r) in zip(objects, boxes):
        cov = _coverage(o, cx, cy, r, size)[..., None]  # [H, W, 1]
        image = image * (1 - cov) + np.array(COLOURS[o.colour], np.float32) * cov
        masks.append(cov[..., 0] > 0.5)
    return Scene(caption_of(objects), list(objects), np.rint(image).astype(np.uint8), np.stack(masks))


def sample_scenes(
    n: int, seed: int = 0, heldout: bool | None = False, size: int = 64, mix: Mix = EVALUATION_MIX
) -> list[Scene]:
    """`n` scenes, the same for the same seed and mix; training scenes by default."""
    rng = random.Random(seed)
    return [render(sample_objects(rng, heldout, mix), rng, size) for _ in range(n)]


def sample_captions(n: int, seed: int = 1234, heldout: bool | None = True, mix: Mix = EVALUATION_MIX) -> list[str]:
    """`n` distinct captions (held-out ones by default), the same for the same seed and mix."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        caption = caption_of(sample_objects(rng, heldout, mix))
        if caption not in out:
            out.append(caption)
    return out


def heldout_captions(n: int = 40, seed: int = 1234) -> list[str]:
    """`n` distinct held-out captions, the same for the same seed."""
    return sample_captions(n, seed)
