"""What each panel shows, computed from one user's `Session` (the trace and final image of their last run).

Pure functions over the library: a trace in, PIL images and markdown out. They raise ValueError /
KeyError with the library's teaching messages; the Gradio layer turns those into `gr.Error`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .. import render, report
from ..result import TraceResult
from ..settings import Settings

ASK_RADIUS = 0.08  # half-width of the box around a click, as a fraction of the image
ASK_MIN_SIDE = 320  # the clickable image is enlarged server-side: the browser maps clicks in natural pixels


@dataclass
class Session:
    """One user's last successful run, kept in gr.State (deep-copied per session, never shared)."""

    run: TraceResult
    image: np.ndarray  # uint8 [H, W, 3] the final image
    model: str
    seed: int
    text_dim: int | None  # width of the text encoder's token vectors (768 for SD 1.x)
    elapsed: float
    settings: Settings
    label: str  # the model as the page names it


@dataclass
class Filters:
    """Which part of the trace a heatmap averages: steps [start, stop), U-Net blocks, resolutions, layers, heads."""

    steps: tuple[int, int] | None = None
    blocks: list[str] | None = None
    resolutions: list[int] | None = None
    layers: list[str] | None = None
    heads: int | None = None

    def kwargs(self) -> dict:
        return dict(
            steps=self.steps, blocks=self.blocks, resolutions=self.resolutions, layers=self.layers, heads=self.heads
        )


def require(session: Session | None) -> Session:
    if session is None:
        raise ValueError(
            "Generate an image first: this panel shows the trace of your last run, and there is none yet. "
            "Type a prompt and press Generate."
        )
    return session


def filters_from_form(run: TraceResult, step_from, step_to, blocks, resolutions, layers, head) -> Filters:
    """Form values (1-based inclusive steps, empty = all) → Filters for the library."""
    n = run.num_steps
    first, last = int(step_from or 1), int(step_to or n)
    if not 1 <= first <= last <= n:
        raise ValueError(
            f"the step range must run forwards within 1–{n}; got {first}–{last}. Move “from step” below “to step”."
        )
    all_blocks = {layer.block for layer in run.layers}
    return Filters(
        steps=None if (first, last) == (1, n) else (first - 1, last),
        blocks=None if blocks is None or set(blocks) >= all_blocks else list(blocks),
        resolutions=[int(r) for r in resolutions] if resolutions else None,
        layers=list(layers) if layers else None,
        heads=None if head in (None, -1, "-1") else int(head),
    )


def words_of(run: TraceResult, negative: bool = False) -> list[str]:
    """The distinct words of the prompt (or the negative prompt), in order: one chip each."""
    return list(dict.fromkeys(w.text for w in (run.negative_words if negative else run.words)))


def model_note(preset) -> str:
    """What to type for this model: the built-in model knows only its shapes-world grammar."""
    from ..loading import TOY_MODEL_DIR

    if preset is None or Path(preset.source).resolve() != TOY_MODEL_DIR.resolve():
        return ""
    from ..toy.world import VOCABULARY

    words = " · ".join(f"*{kind}*: " + ", ".join(values) for kind, values in VOCABULARY.items() if kind != "joiner")
    return (
        "**Built-in shapes-world model** — a tiny Stable Diffusion trained here on flat shapes. It knows: "
        f"{words}. Write objects as *a [size] colour shape [position]*, up to three joined by *and*, "
        "e.g. *a small blue square on the left and a yellow triangle*."
    )


# Words whose maps rarely say anything on their own; skipped when choosing the first heatmap.
FUNCTION_WORDS = frozenset(
    ["a", "an", "the", "and", "of", "on", "in", "at", "to", "with", "above", "below", "under", "over", ",", "."]
)


def strongest_word(run: TraceResult) -> str | None:
    """The content word that got the largest share of attention over the run: a telling first heatmap."""
    if not run.words:
        return None
    shares = run.word_shares().mean(0)
    content = [i for i, w in enumerate(run.words) if w.text.lower() not in FUNCTION_WORDS] or range(len(run.words))
    return run.words[max(content, key=lambda i: shares[i])].text


def token_chips(run: TraceResult) -> list[tuple[str, str]]:
    """What the text encoder saw, for gr.HighlightedText: (text, kind), kind ∈ special/word/piece/cut."""
    chips = []
    for token in run.tokens:
        if token.special:
            kind = "special"
        else:
            word = run.words[token.word]
            kind = "word" if token.index == word.tokens[-1] else "piece"
        chips.append((token.text, kind))
        chips.append((" ", None))
    if run.truncated:
        chips.append((run.truncated, "cut"))
    return chips


def run_notes(session: Session) -> str:
    run = session.run
    h, w = run.image_size
    lines = [
        f"**Seed {session.seed}** · {session.label} · {run.info.scheduler} · {run.num_steps} steps recorded · "
        f"guidance {run.info.guidance_scale:g} · {w}×{h} px · {session.elapsed:.1f} s"
    ]
    if not run.words:
        lines.append("Empty prompt: this image was generated unconditionally, so there are no words to map.")
    if run.truncated:
        lines.append(
            f"The prompt is longer than the text encoder's 77-token window; this part was **cut** and "
            f"never reached the model: “{run.truncated}”"
        )
    return "\n\n".join(lines)


def heatmap(
    session: Session, word: str, negative: bool, filters: Filters, opacity: float, cmap: str, step: int | None = None
) -> Image.Image:
    """The word's attention over the final image; `step` (0-based) narrows it to one step."""
    run = session.run
    if not word:
        raise ValueError(
            "pick a word first (the chips under “Words”)"
            if words_of(run, negative)
            else "this prompt has no words to map: type a prompt and generate again"
        )
    kwargs = filters.kwargs()
    if step is not None:
        kwargs["steps"] = step
    heat = run.heatmap(word, size="image", negative=negative, **kwargs)
    return render.overlay(session.image, heat, cmap, float(opacity))


def word_grid(session: Session, negative: bool, filters: Filters, opacity: float, cmap: str) -> Image.Image | None:
    if not words_of(session.run, negative):
        return None
    fig = render.word_grid(
        session.run,
        session.image,
        words=words_of(session.run, negative),
        cmap=cmap,
        alpha=float(opacity),
        negative=negative,
        size="image",
        **filters.kwargs(),
    )
    return render.to_image(fig)


def attention_over_time(session: Session, negative: bool, filters: Filters) -> Image.Image | None:
    if not words_of(session.run, negative):
        return None
    kwargs = {k: v for k, v in filters.kwargs().items() if k != "heads"}
    return render.to_image(render.attention_over_time(session.run, negative=negative, **kwargs))


def ask_canvas(session: Session) -> Image.Image:
    """The final image enlarged pixel for pixel to at least ASK_MIN_SIDE, for clicking on."""
    h, w = session.image.shape[:2]
    scale = max(1, -(-ASK_MIN_SIDE // max(h, w)))
    return Image.fromarray(session.image).resize((w * scale, h * scale), Image.NEAREST)


def ask(session: Session, x: float, y: float, filters: Filters) -> Image.Image:
    """Words ranked by how much the region around (x, y) (fractions of the image) attended to them."""
    if not session.run.words:
        raise ValueError("this prompt has no words to rank: type a prompt and generate again")
    box = (x - ASK_RADIUS, y - ASK_RADIUS, x + ASK_RADIUS, y + ASK_RADIUS)
    box = tuple(min(max(v, 0.0), 1.0) for v in box)
    kwargs = {k: v for k, v in filters.kwargs().items() if k != "heads"}
    scores = session.run.region_scores(box, **kwargs)
    # No title: the panel's label and buttons sit over the image's top edge.
    label = f"mean attention probability\naround ({x:.2f}, {y:.2f})"
    return render.to_image(render.region_bars(scores, title=None, xlabel=label))


def step_panels(session: Session, step: int) -> dict:
    """Everything the step scrubber shows for `step` (1-based): previews, decode if cached, latents, schedule."""
    run = session.run
    if not 1 <= step <= run.num_steps:
        raise ValueError(f"step {step} is out of range: this run has steps 1–{run.num_steps}")
    i = step - 1
    width = max(run.image_size[1], 192)
    size = max(run.latent_size[1] * 8, 96)
    decoded = run.decoded.get(f"x0/{i}")
    return {
        "xt": render.preview(run, i, "xt", width),
        "x0": render.preview(run, i, "x0", width),
        "decoded": None if decoded is None else Image.fromarray(decoded),
        "z_rgb": render.latent_rgb(run.latent(i, "xt").numpy(), size),
        "z_channels": render.latent_channels(run.latent(i, "xt").numpy(), size),
        "schedule": render.to_image(render.schedule_plot(run, i)),
        "caption": step_caption(run, i),
    }


def step_caption(run: TraceResult, i: int) -> str:
    sigma, alpha_bar = float(run.sigmas[i]), float(run.alpha_bars[i])
    return (
        f"**Step {i + 1} of {run.num_steps}** · timestep t = {float(run.timesteps[i]):.0f} · "
        f"noise σ = {sigma:.3f} · signal ᾱ = {alpha_bar:.3f} "
        f"(x_t ≈ √ᾱ·x0 + √(1−ᾱ)·noise: {100 * alpha_bar**0.5 / (alpha_bar**0.5 + (1 - alpha_bar) ** 0.5):.0f}% "
        f"signal by amplitude)"
    )


def shapes(session: Session | None) -> str:
    """The live tensor shapes of the last run, for the “How it works” tab."""
    if session is None:
        return "_Generate an image to see the shapes of its tensors here._"
    run = session.run
    c, (h, w), (H, W) = int(run.latents.shape[1]), run.latent_size, run.image_size
    batch = 2 if run.info.guidance_scale > 1 else 1
    halves = " (two halves: with and without the prompt)" if batch == 2 else ""
    sides = sorted({f"{layer.height}×{layer.width}" for layer in run.layers}, key=lambda s: -int(s.split("×")[0]))
    rows = [
        ("tokenizer", "token ids, padded to 77", f"[1, 77] ({len(run.tokens)} used, the rest padding)"),
        ("text encoder", "one vector per token", f"[1, 77, {session.text_dim or 'd'}]"),
        ("U-Net input", f"noisy latent x_t{halves}", f"[{batch}, {c}, {h}, {w}]"),
        ("U-Net output", "predicted noise ε", f"[{batch}, {c}, {h}, {w}]"),
        (
            "cross-attention",
            "each latent pixel's weights over the 77 tokens",
            f"{len(run.layers)} layers at {', '.join(sides)} pixels × 77 tokens",
        ),
        ("scheduler", f"x_t → x_(t−1), {run.num_steps} times", f"[1, {c}, {h}, {w}]"),
        ("VAE decoder", f"latent → pixels, ×{H // max(h, 1)} per side", f"[1, {c}, {h}, {w}] → [1, 3, {H}, {W}]"),
    ]
    return "\n".join(
        ["| stage | tensor | shape in your last run |", "|---|---|---|"]
        + [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
    )


def downloads(session: Session, heat: Image.Image | None) -> list[str]:
    """Files for the user to take away: final image, current heatmap, the trace and the HTML report."""
    folder = Path(tempfile.mkdtemp(prefix="sdviz-"))
    files = [folder / "image.png"]
    Image.fromarray(session.image).save(files[0])
    if heat is not None:
        files.append(folder / "heatmap.png")
        heat.save(files[-1])
    files.append(session.run.save(folder / "trace.safetensors"))
    settings = dict(dataclasses.asdict(session.settings), model=session.label)
    files.append(report.write_report(folder / "report.html", session.run, Image.fromarray(session.image), settings))
    return [str(f) for f in files]
