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


# -- inside the machine: predicted noise and guidance, the text vectors, forward diffusion -----------------
# Signed tensors (noise, latents, vectors) are drawn on one symmetric scale per picture: 0 is white (or mid
# grey in RGB), blue is negative, red positive, with a colour bar; pictures that share a scale can be compared.
SIGNED = "RdBu_r"


def signed_scale(*tensors) -> float:
    """One symmetric colour scale for `tensors`: the 99th percentile of their absolute values (robust to outliers)."""
    values = np.concatenate([np.abs(np.asarray(t, dtype=np.float32)).ravel() for t in tensors if t is not None])
    return float(max(np.percentile(values, 99), 1e-6)) if values.size else 1.0


def signed_rgb(latent, scale: float, size: int | None = None) -> Image.Image:
    """z[0:3] as R, G, B on a fixed scale: 0 → mid grey, +scale → full, −scale → none (unlike `latent_rgb`,
    which stretches each picture to its own range, so two pictures on one scale show which is larger)."""
    z = np.asarray(latent, dtype=np.float32)[:3]  # [3, h, w]
    rgb = np.clip(0.5 + 0.5 * z / scale, 0, 1).transpose(1, 2, 0)
    img = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return img.resize((size, size * img.height // img.width), Image.NEAREST) if size else img


def _mosaic(tiles: list[np.ndarray], gap: int = 1) -> np.ndarray:
    """[rows][cols] of [h, w] (or [h, w, 3]) tiles → one array with `gap` NaN (or white) between them."""
    h, w = tiles[0][0].shape[:2]
    extra = tiles[0][0].shape[2:]
    out = np.full((len(tiles) * (h + gap) - gap, len(tiles[0]) * (w + gap) - gap, *extra), np.nan, np.float32)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


def tensor_grid(tensors: dict[str, np.ndarray], title: str = "", scale: float | None = None, label: str = "value"):
    """Latent-shaped tensors ({name: [C, h, w]}) side by side on one scale: a row of z[0:3] as RGB, then one row
    per channel (blue < 0 < red) with a colour bar. Returns a Figure."""
    names = list(tensors)
    arrays = [np.asarray(tensors[n], dtype=np.float32) for n in names]
    scale = scale or signed_scale(*arrays)
    channels, h, w = arrays[0].shape
    gap = max(1, w // 8)
    cmap = matplotlib.colormaps[SIGNED]
    norm = matplotlib.colors.Normalize(-scale, scale)
    rows = [[np.clip(0.5 + 0.5 * a[:3].transpose(1, 2, 0) / scale, 0, 1) for a in arrays]]  # [h, w, 3] each
    rows += [[cmap(norm(a[c]))[..., :3] for a in arrays] for c in range(channels)]
    picture = _mosaic(rows, gap)  # one RGB picture: every tile lines up
    picture = np.where(np.isnan(picture), 1.0, picture)
    fig = Figure(figsize=(1.2 * len(names) + 1.6, 1.2 * (channels + 1) + 0.9))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(picture, interpolation="nearest")
    ax.set_xticks([i * (w + gap) + (w - 1) / 2 for i in range(len(names))], names, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([r * (h + gap) + (h - 1) / 2 for r in range(channels + 1)],
                  ["z[0:3]\nas RGB"] + [f"channel {c}" for c in range(channels)], fontsize=7)  # fmt: skip
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm, cmap), ax=ax, fraction=0.035, pad=0.02)
    bar.set_label(f"{label} (0 = white / grey; ±{scale:.2g} and beyond: full colour)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=9, pad=28)
    fig.tight_layout()
    return fig


def step_anatomy(run: TraceResult, step: int) -> Figure:
    """One step taken apart (`sdviz.anatomy`): the latent x_t, the U-Net's two predictions, what the prompt adds,
    the guided prediction, x0 and the next latent, all on the scale of the latent (one colour bar)."""
    from .anatomy import step_anatomy as take_apart

    a = take_apart(run, step)
    o = a.symbol
    parts = {"x_t (in)": a.x_t}
    if a.cfg:
        parts.update({
            f"{o}_uncond": a.uncond,
            f"{o}_text": a.text,
            f"{o}_text − {o}_uncond\n(what the prompt adds)": a.prompt_effect,
            f"× s = {a.guidance_scale:g}": a.guidance_scale * a.prompt_effect,
            f"guided {o}": a.guided,
        })  # fmt: skip
        scale = signed_scale(a.x_t, a.guided, a.x0)
        stretch = max(1, round(scale / signed_scale(a.prompt_effect)))
        if stretch > 1:  # the prompt's change is small: the same picture enlarged, to see where it acts
            parts[f"{o}_text − {o}_uncond\nstretched ×{stretch}"] = stretch * a.prompt_effect
    else:
        parts[f"{o} (no guidance)"] = a.guided
    parts.update({"x0 (clean guess)": a.x0, "x_next (out)": a.x_next})
    arrays = {k: v.numpy() for k, v in parts.items()}
    title = f"Step {a.step + 1} of {a.total}: t = {a.timestep:.0f}, " + (
        f"σ = {a.sigma:.3g}" if a.sigma_space else f"ᾱ = {a.alpha_bar:.3f}"
    )
    return tensor_grid(arrays, title, scale=signed_scale(a.x_t, a.guided, a.x0), label="latent value")


def guidance_plot(run: TraceResult, step: int | None = None) -> Figure:
    """When does the text matter: per step, ‖ε_text − ε_uncond‖ as a share of ‖ε_uncond‖ (the current step marked)."""
    from .anatomy import guidance_contribution

    share = 100 * guidance_contribution(run)  # [S] in %
    steps = np.arange(1, len(share) + 1)
    s = run.info.guidance_scale
    fig = Figure(figsize=(6.4, 3.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, share, marker="o", markersize=3, color="tab:purple", label="what the prompt changes")
    ax.plot(steps, s * share, linestyle="--", color="tab:orange", label=f"× s = {s:g}: what guidance adds")
    if step is not None:
        ax.axvline(step + 1, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel("denoising step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("% of ‖ε_uncond‖")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title("When does the text matter? ‖ε_text − ε_uncond‖ / ‖ε_uncond‖ at each step", fontsize=9)
    fig.tight_layout()
    return fig


def embedding_figure(run: TraceResult, negative: bool = False) -> Figure:
    """The text encoder's output as an image, tokens × dimensions: above, the prompt's own tokens, named; below,
    all 77 positions with the padding after the prompt shaded. One colour scale, one colour bar."""
    embeds = run.negative_prompt_embeds if negative else run.prompt_embeds
    which = "negative prompt" if negative else "prompt"
    if embeds is None or embeds.numel() == 0:
        raise ValueError(
            f"this trace holds no text vectors for the {which}"
            + (" (guidance was off, so no negative branch ran)" if negative else " (saved by an older sdviz)")
            + ": generate again to record them"
        )
    e = embeds.float().numpy()  # [77, d]
    tokens = run.negative_tokens if negative else run.tokens
    kept = max(1, min(len(tokens), len(e)))
    scale = signed_scale(e[1:kept] if kept > 2 else e)  # the start token's vector is much larger: not the scale
    fig = Figure(figsize=(9.0, min(12.0, 2.6 + 0.17 * kept)))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [max(kept, 4), 11]})
    style = dict(cmap=SIGNED, vmin=-scale, vmax=scale, aspect="auto", interpolation="nearest")
    shown = top.imshow(e[:kept], **style)
    top.set_yticks(range(kept), [f"{t.index}: {t.text}" for t in tokens[:kept]], fontsize=7)
    top.set_xticks([])
    top.set_title(f"The {which} as the U-Net reads it: {len(e)} vectors of {e.shape[1]} numbers; "
                  f"its {kept} tokens:", fontsize=9)  # fmt: skip
    bottom.imshow(e, **style)
    if kept < len(e):
        bottom.axhspan(kept - 0.5, len(e) - 0.5, color="grey", alpha=0.4)
        bottom.text(e.shape[1] / 2, (kept + len(e)) / 2, f"padding: positions {kept}–{len(e) - 1} (no words, "
                    "but the encoder still turns them into vectors)", ha="center", va="center", fontsize=8)  # fmt: skip
    bottom.set_yticks([0, kept - 1, len(e) - 1])
    bottom.set_ylabel("position", fontsize=8)
    bottom.set_xlabel(f"dimension (0–{e.shape[1] - 1})", fontsize=8)
    bottom.tick_params(labelsize=7)
    bar = fig.colorbar(shown, ax=[top, bottom], fraction=0.03, pad=0.02)
    bar.set_label(f"value (±{scale:.2g} and beyond: full colour)", fontsize=8)
    return fig


def similarity_figure(run: TraceResult, negative: bool = False) -> Figure:
    """Cosine similarity between the prompt's token vectors (start and end tokens included), annotated."""
    sim = run.token_similarity(negative=negative)  # [T, T]
    tokens = run.negative_tokens if negative else run.tokens
    labels = [t.text for t in tokens]
    side = min(9.0, 2.0 + 0.45 * len(labels))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    if len(labels) <= 16:
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if sim[i, j] > 0.6 else "white")  # fmt: skip
    fig.colorbar(shown, ax=ax, fraction=0.04, pad=0.02).set_label("cosine similarity (1 = same direction)", fontsize=8)
    ax.set_title("How alike are the token vectors?", fontsize=9)
    fig.tight_layout()
    return fig


def forward_schedule(run: TraceResult, timestep: int | None = None) -> Figure:
    """The training noise schedule of a noised image (`sdviz.noise_image`): ᾱ_t and the signal-to-noise ratio
    ᾱ/(1−ᾱ) for every t, the chosen t marked."""
    t = np.asarray(run.schedule_timesteps, dtype=np.float64)
    alpha_bar = 1.0 / (1.0 + np.asarray(run.schedule_sigmas, dtype=np.float64) ** 2)
    order = np.argsort(t)
    t, alpha_bar = t[order], alpha_bar[order]
    fig = Figure(figsize=(6.4, 2.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(t, alpha_bar, color="tab:green", label="ᾱ_t: share of the image's variance left")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("ᾱ_t", color="tab:green")
    ax.set_ylim(0, 1)
    snr = ax.twinx()
    snr.semilogy(t, alpha_bar / np.clip(1 - alpha_bar, 1e-12, None), color="tab:red", label="signal-to-noise")
    snr.set_ylabel("signal-to-noise ᾱ/(1−ᾱ), log", color="tab:red")
    if timestep is not None:
        ax.axvline(timestep, color="black", linestyle="--", linewidth=1)
    ax.grid(alpha=0.3)
    ax.set_title("Forward diffusion: how much image is left at each timestep", fontsize=9)
    fig.tight_layout()
    return fig


def noise_comparison(run: TraceResult) -> Figure:
    """A noised image's true noise ε beside the U-Net's prediction, on one scale (and, for a v-prediction model,
    the target v beside the predicted v: what the loss compares)."""
    true, predicted = run.noise.numpy(), run.predicted_noise().numpy()
    parts = {"true noise ε": true, "predicted noise ε̂": predicted, "error ε̂ − ε": predicted - true}
    if run.info.prediction_type != "epsilon":
        target, output = run.training_target().numpy(), run.model_outputs[0].numpy()
        parts.update({"target (what training\nasks for)": target, "U-Net output": output})
    t, a = float(run.timesteps[0]), float(run.alpha_bars[0])
    title = f"t = {t:.0f}, ᾱ = {a:.3f}\ntraining loss = {run.loss:.4f} (mean squared error)"
    return tensor_grid(parts, title, scale=signed_scale(true), label="value")


def loss_plot(points, labels: list[str], timestep: int | None = None) -> Figure:
    """The training loss against t, one curve per caption: `points` of a sweep (`sdviz.noising.LossPoint`: a
    `timestep` and one of `losses` per label), log scale, the chosen t marked."""
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ts = [p.timestep for p in points]
    for k, (label, colour) in enumerate(zip(labels, ("tab:green", "tab:red", "tab:gray", "tab:blue"))):
        if ts:
            ax.plot(ts, [p.losses[k] for p in points], marker="o", markersize=3, label=label, color=colour)
    ax.set_yscale("log")
    ax.set_xlim(0, 1000)
    ax.set_xlabel("timestep t (0 = clean, 999 = pure noise)")
    ax.set_ylabel("loss (mean squared error), log")
    if timestep is not None:
        ax.axvline(timestep, color="black", linestyle="--", linewidth=1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title("How well the U-Net predicts this image's noise, with and without the right text", fontsize=9)
    fig.tight_layout()
    return fig


def side_by_side(pictures: dict, title: str = "") -> Figure:
    """Pictures ({caption: PIL image or uint8 [H, W, 3]}) in one row, each shown pixel for pixel, captioned."""
    fig = Figure(figsize=(2.3 * len(pictures), 2.7))
    for i, (caption, picture) in enumerate(pictures.items()):
        ax = fig.add_subplot(1, len(pictures), i + 1)
        ax.imshow(np.asarray(_pil(picture)), interpolation="nearest")
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
