"""The page's header, shared messages, its CSS and the progress bar. Each panel's explanations live in its module."""

HEADER = """# sdviz — see inside Stable Diffusion
Type a prompt and press **Generate**: watch the image emerge from noise, then explore which words each part
of the image listened to, and what the model's latents looked like at every step."""

BUSY = (
    "One image is generated at a time. If the queue is full, the page says the app is busy: "
    "wait a minute and press Generate again."
)

CSS = """
.sdviz-progress {position: relative; height: 26px; border-radius: 6px; background: var(--neutral-200);
  overflow: hidden; font-size: 14px;}
.sdviz-progress .bar {position: absolute; inset: 0 auto 0 0; background: var(--color-accent);
  opacity: 0.75; transition: width 0.2s;}
.sdviz-progress span {position: relative; padding-left: 10px; line-height: 26px; font-weight: 600;}
.sdviz-explain {font-size: 0.92em; opacity: 0.9;}
#sdviz-words .wrap {gap: 6px;}
#sdviz-words label {font-size: 1.05em;}
/* small images (the 64×64 built-in model) fill their panel, pixel for pixel */
.sdviz-fill img {width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated;}
/* captions above pictures (instead of labels floating over their top edge) */
.sdviz-caption {margin-bottom: -10px !important;}
.sdviz-caption p {margin: 0 !important;}
/* ten tabs: tighter than Gradio's default padding, so that all of them fit from about 1200 px wide */
.tab-container button {padding-left: 10px !important; padding-right: 10px !important;}
/* Gradio moves tabs that don't fit into a menu behind "⋯": name it */
.overflow-menu > button::after {content: "More tabs"; margin-left: 6px; font-size: 0.95em; font-weight: 600;}
@media (max-width: 640px) {
  .tab-container button {padding-left: 8px !important; padding-right: 8px !important;}
  h1 {font-size: 1.5em !important;}
}
/* Gradio narrows the grid to the number of images: two variants would each be half the width, cropped */
#sdviz-cmp-gallery .grid-container {--grid-cols: 4 !important;}
"""


def progress_html(step: int, total: int, elapsed: float, message: str = "") -> str:
    share = 0 if total <= 0 else min(100, round(100 * step / total))
    text = message or f"Step {step} / {total} · {elapsed:.1f} s"
    return f'<div class="sdviz-progress"><div class="bar" style="width:{share}%"></div><span>{text}</span></div>'
