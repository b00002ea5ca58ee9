"""Explain a real image: where its caption's words, and any other words, land in an image you give.

    explanation = sdviz.explain_image(pipe, image, "a red circle and a blue square", words=["green", "zebra"])
    explanation.heatmap("circle", size="image")   # float32 [H, W]: mean over the timesteps and the layers
    explanation.heatmap("zebra")                  # a word not in the caption: from the same U-Net calls
    explanation.scores({"circle": mask})          # pointing game and IoU against masks you know

The image is encoded by the VAE and noised to a few timesteps with the model's training schedule
(`sdviz.noise_image`, one U-Net call per timestep, with the caption as the prompt and the same noise
at every timestep); each call's cross-attention is traced with its queries kept. The caption's words
are mapped from those calls; every other word by `run.attend` on the same queries (no further U-Net
call). Maps are averaged over the timesteps (each one is a "step" of the result) and the layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from .noising import fit_image, noise_image
from .result import TraceResult

DEFAULT_TIMESTEPS = (250, 500, 750)  # early, middle and late in the training schedule (0 = clean, 999 = noise)


@dataclasses.dataclass
class ImageExplanation:
    """What `explain_image` found. `run` holds the caption's U-Net calls (step i = timesteps[i])."""

    image: np.ndarray  # uint8 [H, W, 3] the image as the U-Net saw it (cropped and resized to the pipeline's size)
    caption: str
    timesteps: tuple[int, ...]
    run: TraceResult  # the caption's calls, with queries
    others: dict[str, TraceResult]  # each word not in the caption → its maps, attended from `run`'s queries

    @property
    def words(self) -> list[str]:
        """The caption's distinct words, then the other words asked for."""
        return list(dict.fromkeys([w.text for w in self.run.words] + list(self.others)))

    def result_for(self, word: str) -> TraceResult:
        """The trace whose maps hold `word`: the caption's, or the other word's own."""
        if word in self.others:
            return self.others[word]
        self.run.token_indices(word)  # KeyError listing the caption's words
        return self.run

    def heatmap(self, word: str, **kwargs) -> np.ndarray:
        """`word`'s map (see `TraceResult.heatmap` for the filters), averaged over the timesteps by default.
        An other word of several words ("green triangle") maps all of its tokens."""
        result = self.result_for(word)
        if word in self.others:
            return result.heatmap([t for w in result.words for t in w.tokens], **kwargs)
        return result.heatmap(word, **kwargs)

    def scores(self, masks: dict, **filters) -> dict[str, dict]:
        """Per word with a mask ({word: bool [H, W]}): the pointing game (is the map's maximum inside the mask)
        and the IoU of the map, min-max normalised and thresholded at 0.5, with the mask — the measures of
        `python -m sdviz.toy.evaluate`."""
        from .toy.evaluate import score_map

        out = {}
        for word, mask in masks.items():
            mask = np.asarray(mask, dtype=bool)
            hit, iou, _ = score_map(self.heatmap(word, size=mask.shape, **filters), mask)
            out[word] = {"pointing": hit, "iou": iou}
        return out


def _stack(runs: Sequence[TraceResult]) -> TraceResult:
    """One-step traces of the same image and prompt as one trace whose steps are theirs, in order."""
    first = runs[0]

    def cat(name):
        return torch.cat([getattr(r, name) for r in runs])  # [S, …]

    def cat_dict(name):
        return {key: torch.cat([getattr(r, name)[key] for r in runs]) for key in getattr(first, name)}

    return dataclasses.replace(
        first,
        latents=cat("latents"),
        model_outputs=cat("model_outputs"),
        x0=cat("x0"),
        final_latent=runs[-1].final_latent,
        timesteps=cat("timesteps"),
        sigmas=cat("sigmas"),
        alpha_bars=cat("alpha_bars"),
        attention=cat_dict("attention"),
        attention_negative={},
        queries=cat_dict("queries"),
        decoded={},
    )


def explain_image(
    pipe,
    image,
    caption: str,
    words: Sequence[str] | None = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    size: tuple[int, int] | None = None,
) -> ImageExplanation:
    """Maps of `caption`'s words and of `words` (others, optional) over `image` (PIL, path or RGB array).

    One U-Net call per timestep of `timesteps` (training-schedule timesteps 0–999) on the image noised
    with noise drawn from `seed`; see the module docstring. `size` (height, width) defaults to the
    pipeline's own image size.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("describe the image in a caption first, e.g. 'a red circle and a blue square'")
    steps = tuple(dict.fromkeys(int(t) for t in timesteps))
    if not steps:
        raise ValueError("give at least one timestep, e.g. 250, 500, 750 (0 = the clean image, 999 = pure noise)")
    runs = [noise_image(pipe, image, caption, t, seed=seed, size=size, keep_queries=True) for t in steps]
    run = _stack(runs)
    caption_words = {w.text.lower() for w in run.words}
    others = {}
    for word in dict.fromkeys(w.strip() for w in (words or []) if w and w.strip()):
        if word.lower() not in caption_words:
            others[word] = run.attend(pipe, word)
    picture = np.asarray(fit_image(pipe, image, size or run.image_size))
    return ImageExplanation(picture, caption, steps, run, others)
