"""How it works: the pipeline from prompt to pixels in plain words, with the tensor shapes of the
user's last run."""

from __future__ import annotations

import gradio as gr

from ..session import Session
from ..wiring import App, handler

TITLE, ID = "How it works", "how"

EXPLAIN = """### From prompt to pixels
1. **Tokenizer** — the prompt is cut into tokens (words or word pieces) and padded to **77** positions;
   anything past 77 tokens is cut off.
2. **Text encoder** (CLIP) — each of the 77 tokens becomes a vector that knows about the tokens before it.
3. **U-Net** — given the noisy latent x_t, the timestep t and the 77 token vectors (through
   cross-attention), it **predicts the noise** ε in x_t. With guidance, it runs twice — with and without the
   prompt — and pushes the prediction away from the unconditional one by the guidance scale.
4. **Scheduler** — removes a part of the predicted noise to get x_(t−1); repeated for every step, from pure
   noise to a clean latent.
5. **VAE decoder** — turns the small latent (see the table) into the image.

### The shapes in your last run"""


def shapes(session: Session | None) -> str:
    """The live tensor shapes of the last run."""
    if session is None:
        return "_Generate an image to see the shapes of its tensors here._"
    run, info = session.run, session.run.info
    c, (h, w), (H, W) = int(run.latents.shape[1]), run.latent_size, run.image_size
    batch = 2 if info.cfg else 1
    halves = " (two halves: with and without the prompt)" if batch == 2 else ""
    sides = sorted({f"{layer.height}×{layer.width}" for layer in run.layers}, key=lambda s: -int(s.split("×")[0]))
    rows = [
        ("tokenizer", "token ids, padded to 77", f"[1, 77] ({len(run.tokens)} used, the rest padding)"),
        ("text encoder", "one vector per token", f"[1, 77, {info.text_dim or 'd'}]"),
        ("U-Net input", f"noisy latent x_t{halves}", f"[{batch}, {c}, {h}, {w}]"),
        ("U-Net output", "predicted noise ε", f"[{batch}, {c}, {h}, {w}]"),
        (
            "cross-attention",
            "each latent pixel's weights over the 77 tokens",
            f"{len(run.layers)} layers at {', '.join(sides)} pixels × 77 tokens",
        ),
        ("scheduler", f"x_t → x_(t−1), {run.num_steps} times", f"[1, {c}, {h}, {w}]"),
        (
            "VAE decoder",
            f"latent → pixels, ×{info.vae_scale_factor} per side",
            f"[1, {c}, {h}, {w}] → [1, 3, {H}, {W}]",
        ),
    ]
    return "\n".join(
        ["| stage | tensor | shape in your last run |", "|---|---|---|"]
        + [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
    )


def show_run(session) -> dict:
    return {"shapes": shapes(session)}


class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN)
        self.shapes = gr.Markdown(shapes(None), elem_id="sdviz-shapes")

    def wire(self, app: App):
        app.after_run(handler(show_run, {"shapes": self.shapes}), [app.session], [self.shapes])
