"""Words become vectors: the text encoder's 77 × d output of the last run as an image, the tokens it was made
from, how long each token's vector is, and how alike the tokens' vectors are. API: /vectors."""

from __future__ import annotations

import gradio as gr
import numpy as np

from ... import render
from ..session import require
from ..wiring import App, drawn, handler

TITLE, ID = "Words → vectors", "vectors"

EXPLAIN = """**Words become vectors.** The tokenizer cuts the prompt into tokens and pads them to 77 positions. The
text encoder (CLIP) turns every position into a vector: a list of numbers. Each row of the picture is one
token's vector, each column one of its numbers (red positive, blue negative). The U-Net never sees your words,
only these vectors, through cross-attention. Because the encoder reads left to right, a token's vector also
carries the words before it: compare *red* and *circle* in the similarity chart."""


def code(text: str) -> str:
    """`text` as inline code in a Markdown table cell (its pipes escaped, as GFM tables need)."""
    return "`" + text.replace("|", "\\|") + "`"


def summary(run, negative: bool) -> str:
    """The vectors in numbers: their shape, and per token (# = its position) its text, its word, the length of its
    vector and the token whose vector is most like it."""
    embeds = run.negative_prompt_embeds if negative else run.prompt_embeds
    tokens = run.negative_tokens if negative else run.tokens
    e = embeds.float()  # [77, d]
    sim = run.token_similarity(negative=negative)  # [T, T]
    np.fill_diagonal(sim, -np.inf)
    which = "negative prompt" if negative else "prompt"
    rows = [
        f"**{len(e)} vectors of {e.shape[1]} numbers** ({e.shape[0]} × {e.shape[1]} = {e.numel():,} numbers) for "
        f"the {which}: {len(tokens)} tokens, then {len(e) - len(tokens)} padding positions. # is a token's position; "
        "“most like” is the other token whose vector points the most the same way.",
        "",
        "| # | token | word | vector length | most like |",
        "|---|---|---|---|---|",
    ]
    words = run.negative_words if negative else run.words
    for k, token in enumerate(tokens):
        word = "(special)" if token.word is None else words[token.word].text
        near = tokens[int(np.argmax(sim[k]))].text if len(tokens) > 1 else "—"
        cells = (token.index, code(token.text), word, f"{float(e[token.index].norm()):.2f}", code(near))
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)


def vectors(negative: bool, session) -> dict:
    """The prompt's (or the negative prompt's) text vectors: picture, similarity chart and table."""
    session = require(session)
    run = session.run
    embeds = run.negative_prompt_embeds if negative else run.prompt_embeds
    if negative and (embeds is None or embeds.numel() == 0):
        raise ValueError(
            "this run has no negative branch (guidance was off): set the guidance scale above 1 and generate again"
        )
    return {
        "table": summary(run, negative),
        "embedding": render.to_image(render.embedding_figure(run, negative)),
        "similarity": render.to_image(render.similarity_figure(run, negative)),
    }


def show_run(session) -> dict:
    """After a run: its prompt's vectors (the checkbox back on the prompt)."""
    return {**vectors(False, session), "negative": False}


class Panel:
    def __init__(self, app: App):
        gr.Markdown(EXPLAIN, elem_classes="sdviz-explain")
        self.negative = gr.Checkbox(False, label="Show the negative prompt's vectors (the “without the prompt” half)")
        self.embedding = drawn("sdviz-embedding", buttons=["download", "fullscreen"])
        with gr.Row():
            self.similarity = gr.Image(
                show_label=False, interactive=False, format="png", elem_id="sdviz-similarity", scale=1
            )
            with gr.Column(scale=1):
                self.table = gr.Markdown(elem_id="sdviz-vectors-table")

    def wire(self, app: App):
        out = {"table": self.table, "embedding": self.embedding, "similarity": self.similarity}
        self.negative.input(handler(vectors, out), [self.negative, app.session], list(out.values()), api_name="vectors")
        run_out = {**out, "negative": self.negative}
        app.after_run(handler(show_run, run_out), [app.session], list(run_out.values()))
