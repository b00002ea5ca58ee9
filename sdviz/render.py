"""Pure pictures from a TraceResult or plain arrays: PIL images for pixels, matplotlib Figures for plots.

No pyplot: every Figure is built with `matplotlib.figure.Figure`, so request handlers in threads never
share global figure state. `to_image(fig)` turns a Figure into a PIL image.
"""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from .result import TraceResult


def to_image(fig: Figure, dpi: int = 100) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def colorize(heatmap: np.ndarray, cmap: str = "jet", normalize: bool = True) -> np.ndarray:
    """[H, W] → uint8 [H, W, 3] through a matplotlib colormap (normalised to its max when asked)."""
    h = np.asarray(heatmap, dtype=np.float32)
    if normalize:
        h = h - h.min()
        h = h / h.max() if h.max() > 0 else h
    rgba = matplotlib.colormaps[cmap](np.clip(h, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image, heatmap: np.ndarray, cmap: str = "jet", alpha: float = 0.5, normalize: bool = True) -> Image.Image:
    """The heatmap, coloured and upsampled (bilinear) to the image, blended over it at `alpha`."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha (opacity) must be between 0 and 1, got {alpha}")
    base = _pil(image)
    heat = Image.fromarray(colorize(heatmap, cmap, normalize)).resize(base.size, Image.BILINEAR)
    return Image.blend(base, heat, alpha)


def word_grid(
    run: TraceResult,
    image,
    words=None,
    cols: int = 4,
    cmap: str = "jet",
    alpha: float = 0.5,
    negative: bool = False,
    **filters,
) -> Figure:
    """One overlay per word (all words by default), titled with the word, in a grid."""
    words = words or [w.text for w in (run.negative_words if negative else run.words)]
    if not words:
        raise ValueError("the prompt has no words to show")
    cols = min(cols, len(words))
    rows = math.ceil(len(words) / cols)
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows))
    for i, word in enumerate(words):
        ax = fig.add_subplot(rows, cols, i + 1)
        heat = run.heatmap(word, negative=negative, **filters)
        ax.imshow(overlay(image, heat, cmap, alpha))
        ax.set_title(word, fontsize=11)
        ax.axis("off")
    fig.tight_layout()
    return fig


def _normalise(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, 1), np.percentile(x, 99)
    return np.clip((x - lo) / (hi - lo + 1e-8), 0, 1)


def latent_rgb(latent, size: int | None = None) -> Image.Image:
    """z[0:3] as R, G, B, each channel stretched between its 1st and 99th percentile."""
    z = np.asarray(latent, dtype=np.float32)  # [C, h, w]
    rgb = np.stack([_normalise(z[c]) for c in range(min(3, len(z)))], -1)
    img = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return img.resize((size, size * img.height // img.width), Image.NEAREST) if size else img


def latent_channels(latent, size: int | None = None, gap: int = 2) -> Image.Image:
    """Each latent channel in greyscale (stretched per channel), side by side, left to right z[0]…z[C-1]."""
    z = np.asarray(latent, dtype=np.float32)
    tiles = [Image.fromarray((_normalise(c) * 255).round().astype(np.uint8)) for c in z]
    if size:
        tiles = [t.resize((size, size * t.height // t.width), Image.NEAREST) for t in tiles]
    w, h = tiles[0].size
    strip = Image.new("L", (len(tiles) * w + (len(tiles) - 1) * gap, h), 255)
    for i, t in enumerate(tiles):
        strip.paste(t, (i * (w + gap), 0))
    return strip.convert("RGB")


def preview(run: TraceResult, step: int, which: str = "x0", size: int | None = None) -> Image.Image:
    """Fast latent → RGB preview of a step (no VAE), upscaled to `size` pixels wide (default: image size)."""
    img = Image.fromarray(run.preview(step, which))
    width = size or run.image_size[1]
    return img.resize((width, width * img.height // img.width), Image.BILINEAR)


def step_strip(run: TraceResult, count: int = 8, which: str = "x0", size: int = 96) -> Figure:
    """Previews of `count` evenly spaced steps, labelled with step and timestep."""
    picks = sorted(set(np.linspace(0, run.num_steps - 1, min(count, run.num_steps)).round().astype(int)))
    fig = Figure(figsize=(1.6 * len(picks), 2.0))
    for i, s in enumerate(picks):
        ax = fig.add_subplot(1, len(picks), i + 1)
        ax.imshow(preview(run, int(s), which, size))
        ax.set_title(f"step {s + 1}\nt={run.timesteps[s]:.0f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def schedule_plot(run: TraceResult, step: int | None = None) -> Figure:
    """Timestep, sigma (log scale) and alpha-bar against step, the current step marked."""
    steps = np.arange(1, run.num_steps + 1)
    fig = Figure(figsize=(6.4, 3.6))
    axes = [fig.add_subplot(3, 1, i + 1) for i in range(3)]
    series = [
        (run.timesteps, "timestep t", "tab:blue", False),
        (run.sigmas, "sigma σ (log)", "tab:red", True),
        (run.alpha_bars, "alpha-bar ᾱ", "tab:green", False),
    ]
    for ax, (values, label, colour, log) in zip(axes, series):
        ax.plot(steps, np.asarray(values), marker="o", markersize=3, color=colour)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        if log:
            ax.set_yscale("log")
        if step is not None:
            ax.axvline(step + 1, color="black", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("denoising step", fontsize=8)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"{run.info.scheduler}: noise schedule"
    if step is not None:
        title += f" (step {step + 1}/{run.num_steps}, t={run.timesteps[step]:.0f})"
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def attention_over_time(run: TraceResult, negative: bool = False, **filters) -> Figure:
    """Each word's share of the attention paid to words, per step (stacked; see `word_shares`)."""
    shares = run.word_shares(negative=negative, **filters)  # [S, n_words]
    words = run.negative_words if negative else run.words
    steps = np.arange(1, len(shares) + 1)
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    colours = matplotlib.colormaps["tab20"](np.arange(len(words)) % 20)
    ax.stackplot(steps, shares.T, labels=[w.text for w in words], colors=colours, alpha=0.9)
    ax.set_xlim(1, max(len(shares), 2))
    ax.set_ylim(0, 1)
    ax.set_xlabel("denoising step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("share of word attention")
    ax.set_title("Attention over time: which words the image listens to at each step", fontsize=9)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def region_bars(
    scores: dict[str, float],
    title: str | None = "Which words this region attended to",
    xlabel: str = "mean attention probability in the region",
) -> Figure:
    """Horizontal bar chart of {word: score}, highest on top; `title=None` draws none (e.g. under a panel label)."""
    items = list(scores.items())[:20]
    fig = Figure(figsize=(5.0, 0.35 * len(items) + 1.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="tab:orange")
    # Few ticks, and powers of ten for small values: long decimals would run into each other.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# -- research views (issue 14): maps from several traces, a marked point -------------------------------
def heatmap_grid(image, heatmaps: dict, cols: int = 4, cmap: str = "jet", alpha: float = 0.5) -> Figure:
    """One overlay per entry of {title: heatmap [h, w]}, titled, in a grid (e.g. words not in the prompt)."""
    if not heatmaps:
        raise ValueError("no maps to show")
    cols = min(cols, len(heatmaps))
    rows = math.ceil(len(heatmaps) / cols)
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows))
    for i, (title, heat) in enumerate(heatmaps.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(overlay(image, heat, cmap, alpha))
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    fig.tight_layout()
    return fig


def mark_point(image, point, colour=(255, 255, 255)) -> Image.Image:
    """The image with a small crosshair (in `colour`, outlined in black) at `point` = (x, y) in fractions 0–1."""
    from PIL import ImageDraw

    picture = _pil(image).copy()
    draw = ImageDraw.Draw(picture)
    x, y = point[0] * (picture.width - 1), point[1] * (picture.height - 1)
    arm = max(3, min(picture.size) // 25)
    for width, fill in ((max(3, arm // 2), (0, 0, 0)), (max(1, arm // 4), colour)):
        draw.line([(x - arm, y), (x + arm, y)], fill=fill, width=width)
        draw.line([(x, y - arm), (x, y + arm)], fill=fill, width=width)
    return picture
