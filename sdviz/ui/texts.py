"""The words and styling of the app: classroom explanations beside each panel, and the page's CSS."""

HEADER = """# sdviz — see inside Stable Diffusion
Type a prompt and press **Generate**: watch the image emerge from noise, then explore which words each part
of the image listened to, and what the model's latents looked like at every step."""

GENERATE = """**What Generate does.** The text encoder turns your prompt into 77 token vectors. Starting from
random noise (fixed by the seed), the U-Net predicts the noise in the latent at every step and the
scheduler removes part of it. The VAE turns the final latent into pixels."""

WORDS = """**Cross-attention.** Inside the U-Net, every pixel of the latent asks “which tokens matter to me?”
and spreads its attention over the 77 token vectors (the shares add up to 1). A word's heatmap is the share
of each pixel's attention that went to that word, averaged over the steps and layers you select.
Click a word to see its map; the grid shows all of them at once. Changing a word or a filter
re-renders from the stored trace — the model does not run again."""

ASK = """**Ask the image.** Click a point on this image: the bars rank the words by how much the pixels
around the click attended to them (the reverse question of a heatmap)."""

STEPS = """**Step by step.** At each step the U-Net predicts the noise; from that the scheduler computes
**x0**, its current guess of the clean latent, and removes part of the noise from **x_t** to get the next,
less noisy latent. The previews map the latent to colours with a fixed linear map (instant, approximate);
**Exact decode** runs the VAE decoder for this step's x0 (slower, cached)."""

LATENTS = """**The latent.** Stable Diffusion works on a small latent image: 4 channels at 1/8 of the width and
height. Left: channels z[0:3] shown as red, green, blue (each stretched to its own range). Right: all
channels in greyscale, z[0] first."""

SCHEDULE = """**The noise schedule.** The timestep t counts down from 1000 to 0. σ is the noise level (log
scale); ᾱ (“alpha-bar”) is the share of the original signal's variance left in x_t. The dashed line is the
selected step."""

OVER_TIME = """**Attention over time.** Each band is one word's share of the attention paid to words, at every
step. Early steps decide the layout; late steps the details."""

HOW = """### From prompt to pixels
1. **Tokenizer** — the prompt is cut into tokens (words or word pieces) and padded to **77** positions;
   anything past 77 tokens is cut off.
2. **Text encoder** (CLIP) — each of the 77 tokens becomes a vector that knows about the tokens before it.
3. **U-Net** — given the noisy latent x_t, the timestep t and the 77 token vectors (through
   cross-attention), it **predicts the noise** ε in x_t. With guidance, it runs twice — with and without the
   prompt — and pushes the prediction away from the unconditional one by the guidance scale.
4. **Scheduler** — removes a part of the predicted noise to get x_(t−1); repeated for every step, from pure
   noise to a clean latent.
5. **VAE decoder** — turns the **4 × h/8 × w/8** latent into a **3 × h × w** image.

### The shapes in your last run"""

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
/* small images (the 64×64 built-in model, 8×8 latents) fill their panel, pixel for pixel */
.sdviz-fill img {width: 100% !important; height: 100% !important; object-fit: contain; image-rendering: pixelated;}
/* Gradio narrows the grid to the number of images: two variants would each be half the width, cropped */
#sdviz-cmp-gallery .grid-container {--grid-cols: 4 !important;}
"""


def progress_html(step: int, total: int, elapsed: float, message: str = "") -> str:
    share = 0 if total <= 0 else min(100, round(100 * step / total))
    text = message or f"Step {step} / {total} · {elapsed:.1f} s"
    return f'<div class="sdviz-progress"><div class="bar" style="width:{share}%"></div><span>{text}</span></div>'


COMPARE = """**Compare.** Runs the prompt, model and settings of the form above several times, changing one
thing: the guidance scale, the number of steps, the scheduler or the seed (up to four values) — or a second
prompt a word apart (“a red circle” vs “a blue circle”). Each column shows the final image, the guess of the
clean image **x0 at the shared step** (runs with fewer steps show the same point of denoising) and the word's
heatmap on **one colour scale**, so warmer means more attention in every column. The step slider and the word
re-draw the stored runs; the model does not run again. x0 is drawn with the fast linear preview unless you tick
the VAE decode, which shows the exact image the latent stands for."""
