"""The handout of one run: its pictures (`handout_images`) and one self-contained HTML page (`report_html`).

    sdviz.report.write_report("report.html", run, image, settings)   # opens offline in any browser

Every image is embedded as a data: URI and the CSS is inline: no scripts, no links out, so the file
can be mailed, printed or opened from a USB stick. Each section explains its picture in plain words.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import re
from pathlib import Path

from PIL import Image

from . import render
from .result import TraceResult
from .settings import Settings

# What the step strip's pictures are, by the previewer that drew them (sdviz.preview.Previewer.kind).
_STRIP_HOW = {
    "vae": "Each guess is decoded by the model's own VAE, so it shows exactly the picture that latent stands for.",
    "taesd": "Each guess is decoded by TAESD, a tiny stand-in for the VAE: close to the real colours, a little soft.",
    "linear": "These are quick previews of those guesses: a simple colour mapping of the latent, without the VAE "
    "decoder, so colours are approximate and edges soft.",
}
MIN_SIDE = 256  # small images (the 64×64 toy model) are enlarged to at least this, pixel for pixel


# -- pictures ---------------------------------------------------------------------------------------
def report_words(run: TraceResult, words=None) -> list[str]:
    """The words to draw: `words` checked against the prompt (KeyError lists its words), else each distinct word."""
    if words:
        for word in words:
            run.token_indices(word)  # raises KeyError naming the prompt's words
        return list(dict.fromkeys(words))
    return list(dict.fromkeys(w.text.lower() for w in run.words))


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of `text`: "A red circle!" → "a-red-circle"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "x"


def _enlarged(image: Image.Image) -> Image.Image:
    factor = -(-MIN_SIDE // min(image.size))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def handout_images(
    run: TraceResult, image: Image.Image, words=None, strip: int = 8, previewer=None, anatomy_step: int | None = None
) -> dict[str, Image.Image]:
    """Every picture of the handout, by file name.

    image.png (as generated), heatmaps.png (grid) and heatmap-NN-<word>.png (one per word, overlaid on
    the image), steps.png (x0 at several steps, drawn by `previewer`: see `render.preview`),
    latent-rgb.png and latent-channels.png (the final latent), schedule.png and attention-over-time.png.
    Words: see `report_words`. Inside the machine (traces that recorded them): step-anatomy.png (step
    `anatomy_step`, 0-based, default the middle one), guidance.png (the prompt's contribution at every
    step; guidance runs only) and text-embedding.png (the prompt's vectors).
    """
    image = image.convert("RGB")
    big = _enlarged(image)
    chosen = report_words(run, words) if run.words else []
    pictures = {"image.png": image}
    if chosen:
        pictures["heatmaps.png"] = render.to_image(render.word_grid(run, big, chosen))
        maps = {word: run.heatmap(word) for word in chosen}  # [h, w] each
        top = max(float(m.max()) for m in maps.values())  # the grid's scale: a faint word reads as faint
        for i, word in enumerate(chosen, 1):
            pictures[f"heatmap-{i:02d}-{slug(word)}.png"] = render.scaled_overlay(big, maps[word], vmax=top)
    pictures["steps.png"] = render.to_image(render.step_strip(run, count=strip, previewer=previewer))
    final = run.latent(0, "final").numpy()  # [C, h, w]
    pictures["latent-rgb.png"] = render.latent_rgb(final, size=MIN_SIDE)
    pictures["latent-channels.png"] = render.latent_channels(final, size=MIN_SIDE // 2, gap=4)
    pictures["schedule.png"] = render.to_image(render.schedule_plot(run))
    if chosen:
        pictures["attention-over-time.png"] = render.to_image(render.attention_over_time(run))
    pictures.update(inside_images(run, anatomy_step))
    return pictures


def anatomy_step_of(run: TraceResult, step: int | None) -> int:
    """The handout's step anatomy: `step` (0-based) checked against the run, default its middle step."""
    return run.num_steps // 2 if step is None else run.step_indices(step)[0]


def inside_images(run: TraceResult, anatomy_step: int | None = None) -> dict[str, Image.Image]:
    """The pictures inside the machine that this trace can draw (older traces hold none of them)."""
    pictures = {}
    if run.num_steps and run.final_latent is not None:
        pictures["step-anatomy.png"] = render.to_image(render.step_anatomy(run, anatomy_step_of(run, anatomy_step)))
    if run.noise_pred_text is not None and run.noise_pred_text.numel():
        pictures["guidance.png"] = render.to_image(render.guidance_plot(run, anatomy_step_of(run, anatomy_step)))
    if run.prompt_embeds is not None and run.prompt_embeds.numel():
        pictures["text-embedding.png"] = render.to_image(render.embedding_figure(run))
    return pictures


# -- the page ---------------------------------------------------------------------------------------
def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image: Image.Image, alt: str, cls: str = "") -> str:
    pixelated = ' style="image-rendering: pixelated"' if min(image.size) < MIN_SIDE else ""
    return (
        f'<img class="{cls}" src="{_data_uri(image)}" alt="{html.escape(alt)}" '
        f'width="{image.width}" height="{image.height}"{pixelated}>'
    )


def _peak(run: TraceResult, word: str) -> str:
    heat = run.heatmap(word)  # [h, w] attention probabilities
    return f"peak {heat.max():.2f}, mean {heat.mean():.2f}"


def _settings_rows(run: TraceResult, settings, extra: dict | None) -> list[tuple[str, str]]:
    s = dataclasses.asdict(settings) if isinstance(settings, Settings) else dict(settings or {})
    info = run.info
    h, w = run.image_size
    guidance = s.get("guidance", info.guidance_scale)
    rows = [
        ("Prompt", s.get("prompt") or info.prompt or ""),
        ("Negative prompt", s.get("negative_prompt") or info.negative_prompt or "(none)"),
        ("Model", s.get("model") or info.model or info.pipeline),
        ("Scheduler", s.get("scheduler") or info.scheduler),
        ("Steps", str(run.num_steps)),
        ("Guidance scale", f"{float(guidance):g}" if guidance is not None else "?"),
        ("Seed", str(s.get("seed", "?"))),
        ("Image size", f"{w} × {h} pixels"),
    ]
    if run.truncated:
        rows.append(("Cut off (past 77 tokens)", run.truncated))
    rows += [(str(k), str(v)) for k, v in (extra or {}).items()]
    return rows


CSS = """
body { font: 15px/1.5 Georgia, "DejaVu Serif", serif; color: #222; max-width: 60rem; margin: 2rem auto;
       padding: 0 1.2rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h1 q { font-style: italic; }
h2 { font-size: 1.2rem; border-bottom: 1px solid #bbb; margin-top: 2rem; break-after: avoid; }
.meta { color: #666; font-size: .85rem; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { text-align: left; padding: .2rem .8rem .2rem 0; vertical-align: top; }
th { color: #555; font-weight: normal; white-space: nowrap; }
.explain { background: #f4f4f0; border-left: 4px solid #8a8; padding: .5rem .9rem; margin: .6rem 0; }
.warn { background: #fff4e0; border-left-color: #d90; }
figure { margin: .8rem 0; break-inside: avoid; }
figcaption { font-size: .85rem; color: #555; }
img { max-width: 100%; height: auto; }
.hero { display: flex; gap: 1.5rem; align-items: flex-start; flex-wrap: wrap; }
.hero figure { flex: 0 0 auto; margin: 0; }
.hero .explain { flex: 1 1 22rem; margin: 0; }
.hero img { width: 256px; }
.words { display: grid; grid-template-columns: repeat(auto-fill, minmax(13rem, 1fr)); gap: .8rem; }
.words figure { margin: 0; text-align: center; }
.words img { width: 100%; }
.latents { display: flex; gap: 1.5rem; flex-wrap: wrap; align-items: flex-end; }
ol li { margin-bottom: .3rem; }
footer { margin-top: 2.5rem; font-size: .8rem; color: #777; border-top: 1px solid #ddd; padding-top: .5rem; }
@page { size: A4; margin: 14mm; }
@media print { body { margin: 0; max-width: none; font-size: 11pt; } h2 { margin-top: 1.2rem; }
  section { break-inside: avoid-page; } .explain { background: none; } }
"""


def _inline(markdown: str) -> str:
    """The Markdown that sdviz's explanations use (bold, code) as HTML, everything else escaped."""
    text = html.escape(markdown, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _inside_sections(run: TraceResult, pictures: dict, anatomy_step: int | None) -> str:
    """Inside one step (its anatomy, the formulas with its numbers, the guidance plot) and the text vectors."""
    from . import anatomy

    parts = []
    if "step-anatomy.png" in pictures:
        head, items = anatomy.explain_parts(anatomy.step_anatomy(run, anatomy_step_of(run, anatomy_step)))
        listing = "".join(f"<li>{_inline(item)}</li>" for item in items)
        paragraphs = "".join(f"<p>{_inline(p)}</p>" for p in head.split("\n\n"))
        parts.append(f"""<section id="inside-a-step"><h2>Inside one step: the predicted noise and guidance</h2>
<figure>{_img(pictures["step-anatomy.png"], "the tensors of one step")}<figcaption>This step's tensors, all on one
colour scale (white = 0, red positive, blue negative): x_t going in, the U-Net's predictions, the clean guess x0 and
the latent coming out.</figcaption></figure>
<div class="explain">{paragraphs}<ol>{listing}</ol></div></section>
""")
    if "guidance.png" in pictures:
        parts.append(f"""<section id="guidance"><h2>When does the text matter?</h2>
<figure>{_img(pictures["guidance.png"], "the prompt's share of the prediction at every step")}</figure>
<div class="explain"><p>At every step the U-Net predicted the noise twice, without and with the prompt. The purple
line is how much the prompt changed that prediction, as a share of the prediction without it; guidance multiplies
the change by the guidance scale (orange).</p></div></section>
""")
    if "text-embedding.png" in pictures:
        d = run.prompt_embeds.shape[-1]
        parts.append(f"""<section id="vectors"><h2>Words become vectors</h2>
<figure>{_img(pictures["text-embedding.png"], "the prompt's 77 token vectors")}</figure>
<div class="explain"><p>The text encoder turned each of the 77 token positions into a vector of {d} numbers: one row
each (red positive, blue negative). These {77 * d:,} numbers are all the U-Net knows of the prompt; the positions
after the end token are padding, but they still get vectors.</p></div></section>
""")
    return "".join(parts)


def _word_sections(run: TraceResult, pictures: dict, shown: list[str]) -> str:
    """The report's "Where each word looked" and "Attention over time" sections."""
    e = html.escape
    n_layers = len(run.layers)
    heatmaps = [(name, pic) for name, pic in pictures.items() if name.startswith("heatmap-")]
    cells = "".join(
        f"<figure>{_img(pic, 'heatmap of ' + word)}<figcaption><b>{e(word)}</b>: "
        f"{_peak(run, word)}</figcaption></figure>"
        for (name, pic), word in zip(heatmaps, shown)
    )
    out = [
        f"""<section id="heatmaps"><h2>Where each word looked</h2>
<div class="explain"><p>In each of the U-Net's {n_layers} cross-attention layers, every position of the image shares out
one unit of attention over the 77 token vectors: it asks <i>which words matter for me?</i> A word's heatmap shows
where that word received attention; warm colours (red, yellow) mark the regions the word shaped most, blue the
regions that ignored it.</p>
<p>How a map is made: for each position, the attention probability on the word's tokens, averaged over the
attention heads, over all {run.num_steps} steps and over all {n_layers} layers (each enlarged to the image size),
coloured from 0 to the largest value of all the words, so a faint word looks faint (each map's own peak and
mean are under it).</p></div>
<figure>{_img(pictures["heatmaps.png"], "all word heatmaps")}<figcaption>All words at a glance.</figcaption></figure>
<p>Each word on its own, larger; the numbers are the share of a position's attention the word got (1 = all of it).</p>
<div class="words">{cells}</div></section>
"""
    ]
    if "attention-over-time.png" in pictures:
        out.append(f"""<section id="over-time"><h2>Attention over time</h2>
<figure>{_img(pictures["attention-over-time.png"], "each word's share of attention at each step")}</figure>
<div class="explain"><p>Each word's share of the attention that went to words (the start and end tokens left out),
at every step, averaged over all image positions and layers; the bands of a step add up to 100 %. Early steps
set the layout and the big shapes, late steps the details: watch which words gain or lose share as the noise
clears.</p></div></section>
""")

    return "".join(out)


def report_html(
    run: TraceResult,
    image: Image.Image,
    settings: Settings | dict | None = None,
    extra: dict | None = None,
    words=None,
    pictures: dict[str, Image.Image] | None = None,
    previewer=None,
    anatomy_step: int | None = None,
) -> str:
    """The report as one HTML string: settings, final image, word heatmaps, attention over time, step
    strip, schedule and latent, each with a plain-language explanation.

    settings: the `Settings` of the run or a dict with the same keys (plus "model"); missing values
    come from `run.info`. extra: more (label, value) rows for the settings table. words: the words to
    draw (default: every word). pictures: `handout_images(...)` when already made (the CLI saves them too).
    previewer: what drew the step strip (`sdviz.preview.Previewer`; None: the fast linear map).
    anatomy_step: the step (0-based) whose anatomy the handout shows; default the middle one.
    """
    from . import __version__  # at call time, so that sdviz/__init__.py may import this module

    pictures = pictures or handout_images(run, image, words, previewer=previewer, anatomy_step=anatomy_step)
    e = html.escape
    rows = _settings_rows(run, settings, extra)
    prompt = rows[0][1]
    h, w = run.image_size
    lh, lw = run.latent_size
    channels = run.x0.shape[1] if run.x0.ndim == 4 else 4
    factor = h // lh if lh else 8
    ratio = (h * w * 3) / max(channels * lh * lw, 1)
    n_tokens = len(run.tokens)
    n_words = len(run.words)
    guidance = next(v for k, v in rows if k == "Guidance scale")
    scheduler = next(v for k, v in rows if k == "Scheduler")
    shown = report_words(run, words) if run.words else []
    try:
        cfg = float(guidance) > 1
    except ValueError:
        cfg = True
    if cfg:
        guidance_note = (
            f"Classifier-free guidance (scale {e(guidance)}) runs the U-Net twice per step, with and "
            f"without the prompt, and pushes the result {e(guidance)} times further in the direction "
            f"the prompt points: higher values follow the prompt more literally."
        )
    else:
        guidance_note = f"Guidance was off (scale {e(guidance)}): the U-Net ran once per step, with the prompt only."

    parts = [
        f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sdviz report: {e(prompt)}</title>
<style>{CSS}</style></head><body>
<h1>What Stable Diffusion did with <q>{e(prompt)}</q></h1>
<p class="meta">A report by sdviz {e(__version__)}, {datetime.date.today().isoformat()}. Everything is inside
this one file: it opens offline and prints.</p>
<table>{"".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)}</table>
"""
    ]
    if run.truncated:
        parts.append(
            f'<p class="explain warn">The text encoder reads at most 77 tokens, so the end of this prompt '
            f"was cut off and had no effect: <q>{e(run.truncated)}</q>.</p>"
        )

    parts.append(f"""<section id="picture"><h2>The picture and how it was made</h2>
<div class="hero"><figure>{_img(pictures["image.png"], "the generated image", "final")}
<figcaption>The final image, {w} × {h} pixels.</figcaption></figure>
<div class="explain"><ol>
<li><b>Text encoder.</b> The prompt is cut into tokens ({n_words} words became {n_tokens - 2} tokens here, between a
start and an end token). A text encoder (CLIP) turns them into 77 token vectors: lists of numbers that carry
each word's meaning in its context.</li>
<li><b>Noise.</b> The picture starts as pure random noise (fixed by the seed), not in pixels but in a small
<i>latent</i> grid (see “The latent” below).</li>
<li><b>U-Net.</b> A neural network called a U-Net looks at the noisy latent and predicts the noise in it. Through
<i>cross-attention</i> it reads the token vectors, so each word can steer some regions of the picture
{"(see “Where each word looked”)" if shown else "(this prompt has no words: the run was unconditional)"}.</li>
<li><b>Scheduler.</b> The scheduler ({e(scheduler)}) removes part of the predicted noise, and the U-Net looks again:
{run.num_steps} steps from noise to picture (see “Step by step” and “The noise schedule”).</li>
<li><b>VAE decoder.</b> The final latent is turned into pixels by the decoder of a VAE (variational autoencoder).</li>
</ol>
<p>{guidance_note}</p>
</div></div></section>
""")

    if shown:
        parts.append(_word_sections(run, pictures, shown))
    parts.append(f"""<section id="steps"><h2>Step by step: from noise to picture</h2>
<figure>{_img(pictures["steps.png"], "predicted final image at several steps")}</figure>
<div class="explain"><p>At every step the U-Net's noise prediction also gives a guess of the finished picture,
called <i>x0</i> (x-zero, the predicted clean latent). {_STRIP_HOW[getattr(previewer, "kind", "linear")]} The first
guesses are vague blobs; the layout settles early and the details arrive last.</p></div></section>

<section id="schedule"><h2>The noise schedule</h2>
<figure>{_img(pictures["schedule.png"], "timestep, sigma and alpha-bar at each step")}</figure>
<div class="explain"><p>The scheduler ({e(scheduler)}) decides how much noise is left after each step. The timestep
<i>t</i> counts down from about 1000 (pure noise) towards 0 (clean); σ (sigma) is how much noise there is
compared with the picture, on a log scale; ᾱ (alpha-bar) is the share of the picture in the latent, from near 0
at the start to near 1 at the end. Big early steps remove most noise; the last steps polish.</p></div></section>
""")

    latent_figs = "".join(
        f"<figure>{_img(pictures[name], caption)}<figcaption>{caption}</figcaption></figure>"
        for name, caption in (
            ("latent-rgb.png", "channels 0–2 as red, green, blue"),
            ("latent-channels.png", f"all {channels} channels, each in grey, left to right"),
        )
        if name in pictures
    )
    parts.append(_inside_sections(run, pictures, anatomy_step))
    parts.append(f"""<section id="latent"><h2>The latent: the sketch the U-Net works on</h2>
<div class="latents">{latent_figs}</div>
<div class="explain"><p>The U-Net never sees pixels. It works on a latent of {channels} × {lh} × {lw} numbers
({channels} channels, each 1/{factor} of the image's height and width), {ratio:.0f} times fewer values than the
{w} × {h} × 3 colour pixels. The VAE decoder turns this compact sketch into the picture. Each channel here is
stretched to its own range; the channels are not colours, but together they encode colour, light and shape.</p>
</div></section>
<footer>Made with sdviz {e(__version__)}. Heatmaps are attention, not explanation: they show where the model
looked, which is a good first clue to why it drew what it drew.</footer>
</body></html>
""")
    return "".join(parts)


def write_report(
    path,
    run: TraceResult,
    image: Image.Image,
    settings: Settings | dict | None = None,
    extra: dict | None = None,
    words=None,
    pictures: dict[str, Image.Image] | None = None,
    previewer=None,
    anatomy_step: int | None = None,
) -> Path:
    """Write `report_html(...)` to `path` (UTF-8) and return the path."""
    path = Path(path)
    html_text = report_html(run, image, settings, extra, words, pictures, previewer, anatomy_step)
    path.write_text(html_text, encoding="utf-8")
    return path
