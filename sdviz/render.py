"""Pure pictures from a TraceResult or plain arrays: PIL images for pixels, matplotlib Figures for plots.

No pyplot: every Figure is built with `matplotlib.figure.Figure`, so request handlers in threads never
share global figure state. `to_image(fig)` turns a Figure into a PIL image.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, is_color_like, to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from .result import TraceResult

FONT, TICKS = 11, 10  # points: plots are read on projectors and laptops


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


def _font(size: int):
    return ImageFont.load_default(size=size)


def scaled_overlay(
    image, heatmap: np.ndarray, cmap: str = "jet", alpha: float = 0.5, vmax: float | None = None, min_side: int = 256
) -> Image.Image:
    """The overlay with its scale: colours from 0 to `vmax` (default: the map's own peak), a colour bar
    with its values, and "peak · mean" under the picture, so a faint map reads as faint.

    image: PIL or uint8 [H, W, 3]; heatmap: [h, w] values (e.g. attention probabilities). Small
    images are enlarged pixel for pixel to at least `min_side`.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    peak, mean = float(heat.max()), float(heat.mean())
    top = float(vmax) if vmax is not None and vmax > 0 else (peak if peak > 0 else 1.0)
    base = _pil(image)
    factor = max(1, -(-min_side // max(base.size)))
    base = base.resize((base.width * factor, base.height * factor), Image.NEAREST)
    picture = overlay(base, np.clip(heat / top, 0, 1), cmap, alpha, normalize=False)
    font, small = _font(15), _font(13)
    bar_w, pad, caption_h = 16, 8, 24
    labels = [f"{v:.3g}" for v in (top, top / 2, 0.0)]
    text_w = max(int(ImageDraw.Draw(picture).textlength(t, font=small)) for t in labels) + 6
    canvas = Image.new("RGB", (picture.width + pad + bar_w + text_w, picture.height + caption_h), "white")
    canvas.paste(picture, (0, 0))
    ramp = matplotlib.colormaps[cmap](np.linspace(1, 0, picture.height))[:, :3]  # top = vmax
    strip = Image.fromarray((np.repeat(ramp[:, None], bar_w, axis=1) * 255).round().astype(np.uint8))
    x0 = picture.width + pad
    canvas.paste(strip, (x0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([x0, 0, x0 + bar_w - 1, picture.height - 1], outline=(90, 90, 90))
    for text, y in zip(labels, (0, picture.height // 2, picture.height - 1)):
        draw.line([(x0 + bar_w, y), (x0 + bar_w + 3, y)], fill=(60, 60, 60))
        draw.text((x0 + bar_w + 5, min(max(y - 7, 0), picture.height - 15)), text, fill=(30, 30, 30), font=small)
    draw.text((2, picture.height + 4), f"peak {peak:.3g} · mean {mean:.3g}", fill=(30, 30, 30), font=font)
    return canvas


def word_grid(
    run: TraceResult,
    image,
    words=None,
    cols: int = 4,
    cmap: str = "jet",
    alpha: float = 0.5,
    negative: bool = False,
    shared_scale: bool = True,
    **filters,
) -> Figure:
    """One overlay per word (all words by default), titled with the word and its peak, in a grid.

    shared_scale: every tile coloured from 0 to the largest peak of all (one colour bar), so "a"
    looks as faint as its attention is; False: each tile from 0 to its own peak (said in its title).
    """
    words = words or [w.text for w in (run.negative_words if negative else run.words)]
    if not words:
        raise ValueError("the prompt has no words to show")
    maps = [run.heatmap(word, negative=negative, **filters) for word in words]
    top = max(float(m.max()) for m in maps) or 1.0
    cols = min(cols, len(words))
    rows = math.ceil(len(words) / cols)
    fig = Figure(figsize=(2.4 * cols + (0.8 if shared_scale else 0), 2.6 * rows))
    for i, (word, heat) in enumerate(zip(words, maps)):
        ax = fig.add_subplot(rows, cols, i + 1)
        scale = top if shared_scale else (float(heat.max()) or 1.0)
        ax.imshow(overlay(image, np.clip(heat / scale, 0, 1), cmap, alpha, normalize=False))
        ax.set_title(f"{word}\npeak {heat.max():.2g}" + ("" if shared_scale else " (own scale)"), fontsize=FONT)
        ax.axis("off")
    if shared_scale:
        mappable = ScalarMappable(norm=Normalize(0, top), cmap=cmap)
        bar = fig.colorbar(mappable, ax=fig.axes, fraction=0.03, pad=0.02)
        bar.set_label("attention probability (one scale for all)", fontsize=TICKS)
        bar.ax.tick_params(labelsize=TICKS)
    else:
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


def preview(run: TraceResult, step: int, which: str = "x0", size: int | None = None, previewer=None) -> Image.Image:
    """A step's latent as a picture, `size` pixels wide (default: image size).

    `previewer` (`sdviz.preview.Previewer`) decides how: the exact VAE decode, TAESD or the fast linear
    map; without one, an exact decode already cached in the trace, else the linear map (no VAE).
    """
    if previewer is not None:
        pixels = previewer.picture(run, step, which)
    else:
        index = run.step_indices(step)[0]
        pixels = run.decoded.get(f"{which}/{index}")
        pixels = run.preview(step, which) if pixels is None else pixels
    img = Image.fromarray(pixels)
    width = size or run.image_size[1]
    return img.resize((width, width * img.height // img.width), Image.BILINEAR)


def step_strip(
    run: TraceResult, count: int = 8, which: str = "x0", size: int = 96, previewer=None, cols: int = 8
) -> Figure:
    """Pictures of `count` evenly spaced steps (see `preview`), labelled with step and timestep, `cols` a row."""
    picks = sorted(set(np.linspace(0, run.num_steps - 1, min(count, run.num_steps)).round().astype(int)))
    cols = min(cols, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig = Figure(figsize=(1.6 * cols, 2.0 * rows))
    for i, s in enumerate(picks):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(preview(run, int(s), which, size, previewer))
        ax.set_title(f"step {s + 1}\nt={run.timesteps[s]:.0f}", fontsize=TICKS)
        ax.axis("off")
    fig.tight_layout()
    return fig


def schedule_plot(run: TraceResult, step: int | None = None) -> Figure:
    """Timestep, sigma (log scale) and alpha-bar against step, the current step marked."""
    steps = np.arange(1, run.num_steps + 1)
    fig = Figure(figsize=(7.0, 4.2))
    axes = [fig.add_subplot(3, 1, i + 1) for i in range(3)]
    series = [
        (run.timesteps, "timestep t", "tab:blue", False),
        (run.sigmas, "noise σ (log)", "tab:red", True),
        (run.alpha_bars, "signal ᾱ", "tab:green", False),
    ]
    for ax, (values, label, colour, log) in zip(axes, series):
        ax.plot(steps, np.asarray(values), marker="o", markersize=3, color=colour)
        ax.set_ylabel(label, fontsize=FONT)
        ax.tick_params(labelsize=TICKS)
        if log:
            ax.set_yscale("log")
        if step is not None:
            ax.axvline(step + 1, color="black", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
        ax.set_xlim(0.5, max(run.num_steps, 1) + 0.5)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("denoising step", fontsize=FONT)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"{run.info.scheduler}: noise schedule"
    if step is not None:
        title += f" (step {step + 1}/{run.num_steps}, t={run.timesteps[step]:.0f})"
    axes[0].set_title(title, fontsize=FONT)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class ScheduleChart:
    """The schedule plot drawn once per run, and where each step lies on it: marking a step is then a
    line drawn on a copy (about a millisecond) instead of a new plot (about 300 ms)."""

    image: Image.Image
    xs: tuple[int, ...]  # pixel column of each step (0-based steps)
    top: int  # pixel rows the plots span
    bottom: int

    def at(self, step: int) -> Image.Image:
        """The chart with `step` (0-based) marked by a dashed line through all three plots."""
        marked = self.image.copy()
        draw = ImageDraw.Draw(marked)
        x = self.xs[step]
        for y in range(self.top, self.bottom, 8):
            draw.line([(x, y), (x, min(y + 4, self.bottom))], fill=(0, 0, 0), width=2)
        return marked


def schedule_chart(run: TraceResult, dpi: int = 100) -> ScheduleChart:
    """`schedule_plot(run)` as a `ScheduleChart`."""
    fig = schedule_plot(run)
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    width, height = canvas.get_width_height()
    image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba()).convert("RGB")
    first, last = fig.axes[0], fig.axes[-1]
    xs = tuple(int(round(first.transData.transform((s + 1, 1.0))[0])) for s in range(run.num_steps))
    top = int(round(height - first.get_window_extent().y1))
    bottom = int(round(height - last.get_window_extent().y0))
    return ScheduleChart(image, xs, top, bottom)


def word_colours(words: list[str]) -> list:
    """A colour per word: a colour word in its own colour ("red" red), the others from a qualitative
    palette, skipping shades too close to the colour words already used."""
    named = {w: to_rgb(w) for w in words if w.isalpha() and is_color_like(w) and w.lower() not in ("c", "k", "w")}
    palette = [c[:3] for c in matplotlib.colormaps["tab20"](np.arange(20))]
    free = [c for c in palette if all(np.abs(np.subtract(c, v)).sum() > 0.45 for v in named.values())] or palette
    out, k = [], 0
    for w in words:
        if w in named:
            out.append(named[w])
        else:
            out.append(free[k % len(free)])
            k += 1
    return out


def attention_over_time(run: TraceResult, negative: bool = False, **filters) -> Figure:
    """Each word's share of the attention paid to words, per step (stacked; see `word_shares`).

    A word that occurs twice ("a … and a …") is one band holding both occurrences; colour words are
    drawn in their own colour.
    """
    shares = run.word_shares(negative=negative, **filters)  # [S, n_words]
    texts = [w.text for w in (run.negative_words if negative else run.words)]
    distinct = list(dict.fromkeys(texts))
    merged = np.stack([shares[:, [i for i, t in enumerate(texts) if t == w]].sum(1) for w in distinct])  # [n, S]
    steps = np.arange(1, len(shares) + 1)
    fig = Figure(figsize=(8.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.stackplot(
        steps, merged, labels=distinct, colors=word_colours(distinct), alpha=0.9, edgecolor="white", linewidth=0.5
    )
    ax.set_xlim(1, max(len(shares), 2))
    ax.set_ylim(0, 1)
    ax.set_xlabel("denoising step", fontsize=FONT)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("share of word attention", fontsize=FONT)
    ax.tick_params(labelsize=TICKS)
    ax.set_title("Attention over time: which words the image listens to at each step", fontsize=FONT)
    handles, labels = ax.get_legend_handles_labels()  # top band first, as stacked
    ax.legend(handles[::-1], labels[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=FONT, frameon=False)
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
