"""`TraceResult`: everything one traced generation recorded, as plain data on the CPU.

No reference to the model: it deep-copies, sits in `gr.State`, and saves to one safetensors file
(tensors plus a JSON header; no pickle). `RunInfo` is the run's typed metadata. Aggregation
(heatmaps, word shares, region scores) lives here; the tracer (trace.py) builds the result.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .attention import LayerInfo
from .preview import latent_to_rgb
from .steps import implied_noise, training_target
from .tokens import Token, Word, from_json, to_json

FORMAT_VERSION = 2  # 2: typed RunInfo; 1 (sdviz 0.1): `info` as a plain dict, still read


@dataclass(frozen=True)
class RunInfo:
    """What was run, as the tracer saw it (saved in the trace's header)."""

    model: str  # the pipeline's name_or_path ("" when built in memory)
    pipeline: str  # its class, e.g. "StableDiffusionPipeline"
    scheduler: str  # the scheduler class that ran, e.g. "DDIMScheduler"
    prediction_type: str  # "epsilon", "v_prediction" or "sample"
    guidance_scale: float  # the pipeline's own `guidance_scale` (nan if it had none)
    cfg: bool  # whether classifier-free guidance ran (a batch with an unconditional half)
    prompt: str | None
    negative_prompt: str | None
    latent_size: tuple[int, int]  # (h, w) of the latent
    image_size: tuple[int, int]  # (H, W) of the image
    complete: bool  # False when the call raised or was stopped part-way
    per_head: bool  # whether every head's map was kept
    text_dim: int | None  # width of the text encoder's token vectors (768 for SD 1.x)
    requested_steps: int | None  # num_inference_steps as asked (PNDM records one more)
    vae_scaling_factor: float = 1.0
    vae_shift_factor: float = 0.0
    latent_rgb: tuple | None = None  # [C + 1][3] the preview's linear latent → RGB map (sdviz.preview)
    preview_source: str = "none"  # where that map came from: "shipped", "published", "fitted", "none"
    image: int = 0  # which image of the call was recorded (0-based, in the order of the pipeline's `.images`)
    # How the recorded tokens were named: "text_encoder" (the ids the pipeline's text encoder got),
    # "prompt" (the `prompt=` text given to sdviz.trace, tokenized: the pipeline got `prompt_embeds`),
    # "index" (neither: tokens and words are "#0" … "#76"), "none" (nothing recorded, or no negative branch).
    tokens_from: str = "text_encoder"
    negative_tokens_from: str = "text_encoder"
    # Where the cross-attention maps come from: "recorded" (the U-Net's own, during the call) or "queries"
    # (recomputed for another text from the run's stored queries by `run.attend`).
    maps_from: str = "recorded"
    # The Euler family's latents are x0 + σ·ε (the U-Net gets them divided by √(σ² + 1)); others' are √ᾱ·x0 + √(1−ᾱ)·ε.
    sigma_space: bool = False

    @property
    def vae_scale_factor(self) -> int:
        """How many image pixels one latent pixel stands for, per side (8 for SD, 4 for the built-in model)."""
        return max(1, self.image_size[1] // max(1, self.latent_size[1]))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, version: int = FORMAT_VERSION) -> RunInfo:
        data = dict(data)
        if version == 1:  # sdviz 0.1 wrote a dict without these keys
            data.setdefault("cfg", float(data.get("guidance_scale", 0.0)) > 1.0)
            data.setdefault("text_dim", None)
            data.setdefault("requested_steps", None)
            data.setdefault("preview_source", "fitted" if data.get("latent_rgb") else "none")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("latent_size", "image_size"):
            data[key] = tuple(int(v) for v in data[key])
        if data.get("latent_rgb") is not None:
            data["latent_rgb"] = tuple(tuple(float(v) for v in row) for row in data["latent_rgb"])
        return cls(**data)


@dataclass(frozen=True)
class Filters:
    """Which part of a trace a map averages; every aggregation takes the same ones.

    steps        None (all), an int, (start, stop), a range or slice, or a list of step indices (0-based)
    layers       layer names or short labels ("up1.a2.t0 (16×16)"); None: all
    blocks       "down", "mid", "up"; None: all
    resolutions  layer heights, e.g. [16, 32]; None: all
    heads        a head index or list (traces kept with per_head=True); None: the mean of all heads
    """

    steps: object = None
    layers: tuple[str, ...] | None = None
    blocks: tuple[str, ...] | None = None
    resolutions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class TraceResult:
    """One generation. S = recorded steps, C = latent channels, (h, w) = latent size, T = tokens kept.

    tokens / words                 what the text encoder saw (`<|startoftext|>` … first `<|endoftext|>`)
    negative_tokens / _words       the same for the negative prompt (empty when it had none)
    truncated                      the prompt text cut past the 77-token window ("" if none or unknown)
    layers                         one LayerInfo per cross-attention layer, in U-Net order
    attention[layer]               float16 [S, T, h_l, w_l] head-mean probabilities (per_head: [S, heads, T, h_l, w_l])
    attention_negative[layer]      the same for the negative branch (only when traced with negative=True)
    latents                        float32 [S, C, h, w]  x_t entering each step (as the scheduler saw it)
    model_outputs                  float32 [S, C, h, w]  guided model output given to scheduler.step
    x0                             float32 [S, C, h, w]  predicted clean latent of each step
    final_latent                   float32 [C, h, w]     what the last step returned
    timesteps / sigmas / alpha_bars  float32 [S]
    schedule_timesteps / schedule_sigmas  float32 [N]  the whole planned schedule
    info                           RunInfo: model, scheduler, sizes, guidance, VAE scaling, preview map
    decoded                        cache of exact VAE decodes, key "x0/7" → uint8 [H, W, 3]

    Opt-in research records (empty unless traced with the option):
    queries[layer]                 float16 [S, heads, hw_l, d] each cross-attention layer's queries, conditional
                                   branch (keep_queries=True; by default the layers at ≤ 16×16): what `attend` reads
    self_attention[layer]          float16 [S_sa, hw_l, hw_l] head-mean self-attention (attn1) probabilities, row =
                                   query pixel (self_attention=True), at the steps `self_attention_steps`
    self_attention_steps           int64 [S_sa] the step indices those maps were recorded at
    self_layers                    one LayerInfo per recorded self-attention layer
    Inside each step and the text encoder (empty tensors when not recorded; None in traces saved before):
    noise_pred_uncond / _text      float32 [S, C, h, w]  the U-Net's two outputs before guidance combined
                                   them (without, with the prompt); empty when guidance did not run
    prompt_embeds                  float32 [77, d]  the text vectors the U-Net got for the prompt
    negative_prompt_embeds         float32 [77, d]  … for the negative prompt (empty without guidance)
    Forward diffusion of a given image (`sdviz.noise_image`; None for a generation):
    clean_latent                   float32 [C, h, w]  the image's latent (VAE posterior mean × scaling factor)
    noise                          float32 [C, h, w]  the noise ε added to it (latents[0] is the noisy x_t)
    """

    tokens: list[Token]
    words: list[Word]
    negative_tokens: list[Token]
    negative_words: list[Word]
    truncated: str
    layers: list[LayerInfo]
    attention: dict[str, torch.Tensor]
    attention_negative: dict[str, torch.Tensor]
    latents: torch.Tensor
    model_outputs: torch.Tensor
    x0: torch.Tensor
    final_latent: torch.Tensor | None
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    alpha_bars: torch.Tensor
    schedule_timesteps: torch.Tensor
    schedule_sigmas: torch.Tensor
    info: RunInfo
    decoded: dict[str, np.ndarray] = field(default_factory=dict)
    # -- research records (issue 14): opt-in, empty by default --
    queries: dict[str, torch.Tensor] = field(default_factory=dict)
    self_attention: dict[str, torch.Tensor] = field(default_factory=dict)
    self_attention_steps: torch.Tensor | None = None
    self_layers: list[LayerInfo] = field(default_factory=list)
    noise_pred_uncond: torch.Tensor | None = None
    noise_pred_text: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    clean_latent: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    # Tensor fields saved as they are, and dicts of tensors saved as "<field>/<key>".
    TENSORS = (
        "latents",
        "model_outputs",
        "x0",
        "final_latent",
        "timesteps",
        "sigmas",
        "alpha_bars",
        "schedule_timesteps",
        "schedule_sigmas",
        "self_attention_steps",
        "noise_pred_uncond",
        "noise_pred_text",
        "prompt_embeds",
        "negative_prompt_embeds",
        "clean_latent",
        "noise",
    )
    TENSOR_DICTS = ("attention", "attention_negative", "queries", "self_attention")

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(self.info.latent_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.info.image_size)

    @property
    def prompt(self) -> str | None:
        return self.info.prompt

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded tensors (what a trace costs in memory)."""
        tensors = [getattr(self, name) for name in self.TENSORS]
        tensors += [t for name in self.TENSOR_DICTS for t in getattr(self, name).values()]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total + sum(a.nbytes for a in self.decoded.values())

    # -- words ----------------------------------------------------------------------------------
    def token_indices(self, word: str | int | Sequence[int], negative: bool = False) -> list[int]:
        """Token positions of `word` (every occurrence, case-insensitive), or of token index(es) given."""
        tokens = self.negative_tokens if negative else self.tokens
        words = self.negative_words if negative else self.words
        if isinstance(word, (int, np.integer)):
            word = [int(word)]
        if not isinstance(word, str):
            known = {t.index for t in tokens}
            bad = [i for i in word if i not in known]
            if bad:
                raise IndexError(f"token index {bad[0]} was not recorded; recorded tokens are 0–{len(tokens) - 1}")
            return list(word)
        wanted = word.strip().lower()
        hits = [i for w in words if w.text.lower() == wanted for i in w.tokens]
        if not hits:
            hits = [t.index for t in tokens if t.text.lower() == wanted]
        if not hits and re.fullmatch(r"#\d+", wanted):  # "#5": the token at position 5, as the app's chips name it
            return self.token_indices(int(wanted[1:]), negative)
        which = "negative prompt" if negative else "prompt"
        if not hits and (self.info.negative_tokens_from if negative else self.info.tokens_from) == "index":
            raise KeyError(
                f"{word!r}: the {which}'s text was not seen (the pipeline got embeddings), so its tokens are named "
                f"by position, '#0'–'#{len(tokens) - 1}'; pass the text to sdviz.trace(pipe, prompt=...) to use words"
            )
        if not hits:
            listing = ", ".join(repr(w.text) for w in words) or "(none: the prompt was empty)"
            raise KeyError(f"{word!r} is not a word of the {which}; its words are: {listing}")
        return hits

    # -- selection ------------------------------------------------------------------------------
    def select_layers(
        self,
        layers: Iterable[str] | None = None,
        blocks: Iterable[str] | None = None,
        resolutions: Iterable[int] | None = None,
    ) -> list[LayerInfo]:
        """The layers passing every filter given: names, blocks ("down", "mid", "up"), resolutions (h)."""
        chosen = list(self.layers)
        if layers is not None:
            layers = {layers} if isinstance(layers, str) else set(layers)
            unknown = layers - {layer.name for layer in self.layers} - {layer.short for layer in self.layers}
            if unknown:
                names = ", ".join(layer.name for layer in self.layers)
                raise KeyError(f"unknown layer {sorted(unknown)[0]!r}; layers are: {names}")
            chosen = [layer for layer in chosen if layer.name in layers or layer.short in layers]
        if blocks is not None:
            blocks = {blocks} if isinstance(blocks, str) else set(blocks)
            chosen = [layer for layer in chosen if layer.block in blocks]
        if resolutions is not None:
            resolutions = {int(resolutions)} if isinstance(resolutions, int) else {int(r) for r in resolutions}
            chosen = [layer for layer in chosen if layer.height in resolutions]
        if not chosen:
            available = sorted({(layer.block, layer.height) for layer in self.layers})
            raise ValueError(
                "no cross-attention layer matches these filters; available (block, resolution): "
                + ", ".join(f"{b} {r}" for b, r in available)
            )
        return chosen

    def step_indices(self, steps=None) -> list[int]:
        """None → all; int → that step; (start, stop) or range/slice → start ≤ i < stop; or a list."""
        n = self.num_steps
        if n == 0:
            raise ValueError("this trace recorded no denoising step")
        if steps is None:
            return list(range(n))
        if isinstance(steps, (int, np.integer)):
            steps = [int(steps)]
        elif isinstance(steps, tuple) and len(steps) == 2:
            steps = range(*steps)
        elif isinstance(steps, slice):
            steps = range(n)[steps]
        idx = [i + n if i < 0 else i for i in steps]
        bad = [i for i in idx if not 0 <= i < n]
        if bad or not idx:
            raise IndexError(f"step {bad[0] if bad else '(none)'} is out of range: this run has steps 0–{n - 1}")
        return idx

    def _target_size(self, size) -> tuple[int, int]:
        if size is None or size == "latent":
            return self.latent_size
        if size == "image":
            return self.image_size
        if isinstance(size, int):
            return size, size
        return int(size[0]), int(size[1])

    def layer_maps(
        self, steps=None, layers=None, blocks=None, resolutions=None, heads=None, negative: bool = False
    ) -> list[tuple[LayerInfo, torch.Tensor]]:
        """The selected layers' maps, float32 [s, T, h_l, w_l] each: the chosen steps, heads averaged.

        The one place the filters are applied; heatmaps, word shares and region scores all read it.
        """
        maps = self.attention_negative if negative else self.attention
        if not maps:
            if negative:
                raise ValueError(
                    "this trace has no negative-prompt attention: trace with negative=True and a guidance scale > 1"
                )
            raise ValueError("this trace recorded no attention")
        step_idx = self.step_indices(steps)
        out = []
        for layer in self.select_layers(layers, blocks, resolutions):
            m = maps[layer.name][step_idx].float()  # [s, T, h, w] or [s, heads, T, h, w]
            if m.ndim == 5:
                if heads is not None:
                    picked = [int(heads)] if isinstance(heads, (int, np.integer)) else [int(h) for h in heads]
                    bad = [h for h in picked if not 0 <= h < m.shape[1]]
                    if bad or not picked:
                        raise IndexError(
                            f"head {bad[0] if bad else '(none)'} does not exist: this layer has heads "
                            f"0–{m.shape[1] - 1}"
                        )
                    m = m[:, picked]
                m = m.mean(1)
            elif heads is not None:
                raise ValueError("this trace kept only head means: trace with per_head=True to pick heads")
            out.append((layer, m))
        return out

    # -- heatmaps -------------------------------------------------------------------------------
    def heatmap(
        self,
        word: str | int | Sequence[int],
        steps=None,
        layers=None,
        blocks=None,
        resolutions=None,
        heads=None,
        size=None,
        negative: bool = False,
        normalize: bool = False,
        contrast=None,
        temperature: float = 1.0,
    ) -> np.ndarray:
        """Where `word` was attended: float32 [H, W] at `size` (None → latent, "image", int or (H, W)).

        Aggregation, in this order:
        1. per layer and step, the head-mean softmax probability of each query pixel for the word's
           tokens, summed over those tokens (a multi-token word is the mass on all its pieces;
           a word that occurs twice counts both occurrences; ask by token index to separate them);
        2. the mean over the selected steps, then bilinear upsampling of each layer to `size`;
        3. the unweighted mean over the selected layers (each layer counts the same at any resolution).
        The values stay attention probabilities (0–1, the share of the pixel's attention the word
        got). `normalize=True` divides by the maximum so the map spans 0–1, for display.
        `heads` picks heads (int or list) when the trace kept them (`per_head=True`).

        `contrast`: which word wins where. A list of words (or True: every word of the prompt) among which
        each pixel's attention is renormalised, per layer and step, before step 2: the word's share
        p_w^(1/τ) / Σ_v p_v^(1/τ) over the chosen words v (`word` itself is always among them), with
        τ = `temperature`. That is a softmax over the chosen words of log p / τ; τ = 1 (the default) is the
        plain share, and for a single head exactly a softmax of the attention logits over the chosen
        words' tokens; τ < 1 sharpens it towards the winner. The chosen words' maps then sum to 1 at every pixel.
        """
        chosen = self.layer_maps(steps, layers, blocks, resolutions, heads, negative)
        idx = self.token_indices(word, negative)
        groups = self.contrast_groups(word, contrast, negative) if contrast else None
        target = self._target_size(size)
        total = torch.zeros(target)
        for _, m in chosen:
            if groups is None:
                m = m[:, idx].sum(1).mean(0)  # [h, w]
            else:
                m = contrast_shares(m, groups, temperature)[:, 0].mean(0)  # [h, w]: `word` is group 0
            total += F.interpolate(m[None, None], size=target, mode="bilinear", align_corners=False)[0, 0]
        out = (total / len(chosen)).numpy().astype(np.float32)
        if normalize and out.max() > 0:
            out = out / out.max()
        return out

    def word_shares(
        self, steps=None, layers=None, blocks=None, resolutions=None, heads=None, negative: bool = False
    ) -> np.ndarray:
        """Each word's share of the attention given to words, per step: float32 [S, n_words].

        Per step: the mean over the selected layers of each word's attention mass averaged over
        pixels, divided by the sum over words (start/end tokens excluded), so each row sums to 1.
        """
        words = self.negative_words if negative else self.words
        if not words:
            raise ValueError("the prompt has no words")
        chosen = self.layer_maps(steps, layers, blocks, resolutions, heads, negative)
        mass = torch.zeros(chosen[0][1].shape[0], len(words))
        for _, m in chosen:
            per_token = m.mean(dim=(-2, -1))  # [s, T]
            for j, w in enumerate(words):
                mass[:, j] += per_token[:, list(w.tokens)].sum(1)
        shares = mass / mass.sum(1, keepdim=True).clamp_min(1e-12)
        return shares.numpy().astype(np.float32)

    def region_mask(self, region) -> np.ndarray:
        """bool [h, w] at latent size: a box (x0, y0, x1, y1) in fractions 0–1, or a mask [H, W] at any size."""
        size = self.latent_size
        if isinstance(region, (tuple, list)) and len(region) == 4:
            x0, y0, x1, y1 = (float(v) for v in region)
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                raise ValueError(f"the region's corners must be numbers from 0 to 1; got {region}")
            mask = torch.zeros(size, dtype=torch.bool)
            h, w = size
            r0, r1 = int(min(y0, y1) * h), max(int(np.ceil(max(y0, y1) * h)), int(min(y0, y1) * h) + 1)
            c0, c1 = int(min(x0, x1) * w), max(int(np.ceil(max(x0, x1) * w)), int(min(x0, x1) * w) + 1)
            mask[max(r0, 0) : min(r1, h), max(c0, 0) : min(c1, w)] = True
        else:
            m = torch.as_tensor(np.asarray(region, dtype=np.float32))
            mask = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0] >= 0.5
        if not mask.any():
            raise ValueError("the region is empty: click inside the image or drag a larger box")
        return mask.numpy()

    def region_scores(
        self, region, steps=None, layers=None, blocks=None, resolutions=None, heads=None, negative: bool = False
    ) -> dict[str, float]:
        """How much attention a region of the image paid to each word: {word: mean probability}.

        `region`: see `region_mask`. Each word's score is its latent-size `heatmap` averaged over the
        region, so this is the reverse question of a heatmap, with the same aggregation. Sorted,
        highest first; a word that occurs twice is listed as "word" and "word (#2)".
        """
        words = self.negative_words if negative else self.words
        mask = self.region_mask(region)
        scores, seen = {}, {}
        for w in words:
            hm = self.heatmap(list(w.tokens), steps, layers, blocks, resolutions, heads, negative=negative)
            seen[w.text] = seen.get(w.text, 0) + 1
            label = w.text if seen[w.text] == 1 else f"{w.text} (#{seen[w.text]})"
            scores[label] = float(hm[mask].mean())
        return dict(sorted(scores.items(), key=lambda kv: -kv[1]))

    # -- latents → pictures ----------------------------------------------------------------------
    def latent(self, step: int, which: str = "x0") -> torch.Tensor:
        """[C, h, w]: "x0" (predicted clean latent), "xt" (entering the step), "final" (after the last step)."""
        if which == "final":
            if self.final_latent is None:
                raise ValueError("this trace recorded no step")
            return self.final_latent
        tensors = {"x0": self.x0, "xt": self.latents, "model_output": self.model_outputs}
        if which not in tensors:
            raise ValueError(f"which must be one of x0, xt, model_output, final; got {which!r}")
        return tensors[which][self.step_indices(step)[0]]

    def preview(self, step: int, which: str = "x0") -> np.ndarray:
        """Fast RGB preview, no VAE: uint8 [h, w, 3] through the linear latent → RGB map."""
        if self.info.latent_rgb is None:
            raise ValueError("this trace has no latent → RGB map for previews: decode with run.decode(step, vae)")
        return latent_to_rgb(self.latent(step, which), torch.tensor(self.info.latent_rgb)).numpy()

    @torch.no_grad()
    def decode(self, step: int, vae, which: str = "x0", cache: str = "") -> np.ndarray:
        """VAE decode of a step's latent: uint8 [H, W, 3]. Cached in `decoded`: a step is decoded once.

        `vae` is the pipeline's own VAE (the exact picture, cached as "x0/7") or a stand-in decoder
        such as TAESD (`cache="taesd"`, cached as "taesd/x0/7"); each is given latents scaled by its
        own config's `scaling_factor` and `shift_factor`.
        """
        index = self.step_indices(step)[0] if which != "final" else "last"
        key = f"{cache}/{which}/{index}" if cache else f"{which}/{index}"
        if key not in self.decoded:
            param = next(vae.parameters())
            config = getattr(vae, "config", {}) or {}
            scale = config.get("scaling_factor") or self.info.vae_scaling_factor
            shift = config.get("shift_factor") or (0.0 if cache else self.info.vae_shift_factor)
            z = self.latent(step, which)[None].to(param.device, param.dtype)  # [1, C, h, w]
            image = vae.decode(z / scale + shift).sample[0].float().cpu()  # [3, H, W] in [-1, 1]
            self.decoded[key] = ((image.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().byte().numpy()
        return self.decoded[key]

    # -- research: any text after the run, contrast across words, self-attention -----------------
    def attend(self, pipe, text: str) -> TraceResult:
        """This run's cross-attention maps recomputed for any `text` from its stored queries, without
        running the U-Net: a TraceResult whose words are `text`'s (see `sdviz.queries`). Needs a trace
        made with `keep_queries=True`, and the pipeline that made it (its text encoder and `to_k`)."""
        from .queries import attend

        return attend(self, pipe, text)

    def contrast_groups(self, word, contrast, negative: bool = False) -> list[list[int]]:
        """Token positions of `word`, then of each other word of `contrast` (a list, or True: every word)."""
        words = self.negative_words if negative else self.words
        others = [w.text for w in words] if contrast is True else list(contrast)
        groups: list[list[int]] = []
        for item in [word, *others]:
            idx = sorted(set(self.token_indices(item, negative)))
            if idx not in groups:
                groups.append(idx)
        if len(groups) < 2:
            raise ValueError(
                f"contrast needs at least two different words to share each pixel between; got {[word, *others]}"
            )
        return groups

    def self_attention_map(
        self, point, steps=None, layers=None, resolutions=None, size=None, normalize: bool = False
    ) -> np.ndarray:
        """Where the latent pixel under `point` looked: float32 [H, W] at `size` (as for `heatmap`).

        point: (x, y) as fractions 0–1 of the image's width and height. Per recorded self-attention layer,
        the row of the query pixel under the point (its head-mean attention over every pixel, summing to 1),
        the mean over the chosen steps (among those recorded), bilinear upsampling, the mean over layers.
        """
        if not self.self_attention:
            raise ValueError(
                "this trace has no self-attention: trace with sdviz.trace(pipe, self_attention=True) "
                "(in the app: Advanced → record self-attention) and generate again"
            )
        x, y = (float(v) for v in point)
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise ValueError(f"the point must be (x, y) in fractions 0–1 of the image; got {point}")
        recorded = [int(i) for i in self.self_attention_steps]
        wanted = set(self.step_indices(steps))
        pick = [j for j, step in enumerate(recorded) if step in wanted]
        if not pick:
            raise ValueError(
                f"self-attention was recorded at steps {[i + 1 for i in recorded]} (1-based) only: include one of them"
            )
        names = None if layers is None else ({layers} if isinstance(layers, str) else set(layers))
        if isinstance(resolutions, int):
            resolutions = [resolutions]
        sides = None if resolutions is None else {int(r) for r in resolutions}
        chosen = [
            layer
            for layer in self.self_layers
            if (names is None or layer.name in names or layer.short in names)
            and (sides is None or layer.height in sides)
        ]
        if not chosen:
            available = ", ".join(f"{layer.short}" for layer in self.self_layers)
            raise ValueError(f"no recorded self-attention layer matches these filters; recorded: {available}")
        target = self._target_size(size)
        total = torch.zeros(target)
        for layer in chosen:
            r, c = min(int(y * layer.height), layer.height - 1), min(int(x * layer.width), layer.width - 1)
            row = r * layer.width + c  # the query pixel under the point, in the layer's own grid
            m = self.self_attention[layer.name][pick, row].float().mean(0).reshape(layer.height, layer.width)
            total += F.interpolate(m[None, None], size=target, mode="bilinear", align_corners=False)[0, 0]
        out = (total / len(chosen)).numpy().astype(np.float32)
        if normalize and out.max() > 0:
            out = out / out.max()
        return out

    # -- the text encoder's vectors ------------------------------------------------------------------
    def token_similarity(self, negative: bool = False) -> np.ndarray:
        """float32 [T, T]: cosine similarity between the kept tokens' text vectors (`prompt_embeds` rows)."""
        embeds = self.negative_prompt_embeds if negative else self.prompt_embeds
        tokens = self.negative_tokens if negative else self.tokens
        if embeds is None or embeds.numel() == 0 or not tokens:
            raise ValueError("this trace holds no text vectors for that prompt: generate again to record them")
        v = F.normalize(embeds[[t.index for t in tokens]].float(), dim=-1)  # [T, d]
        return (v @ v.T).numpy().astype(np.float32)

    # -- forward diffusion and the training loss (a run made by sdviz.noise_image) -----------------------
    def _noised(self):
        if self.clean_latent is None or self.noise is None or self.num_steps != 1:
            raise ValueError(
                "this trace is a generation, not a noised image: make one with "
                "sdviz.noise_image(pipe, image, prompt, timestep)"
            )

    def training_target(self) -> torch.Tensor:
        """[C, h, w] what training asks the U-Net to output for latents[0]: ε, v or z (by prediction type)."""
        self._noised()
        return training_target(self.info.prediction_type, self.clean_latent, self.noise, float(self.alpha_bars[0]))

    @property
    def loss(self) -> float:
        """This example's training loss: the mean squared error between model_outputs[0] and `training_target()`."""
        return float(((self.model_outputs[0] - self.training_target()) ** 2).mean())

    def predicted_noise(self) -> torch.Tensor:
        """[C, h, w] the noise ε̂ the U-Net's output stands for (the output itself for an epsilon model)."""
        self._noised()
        alpha_bar = float(self.alpha_bars[0])
        return implied_noise(self.info.prediction_type, self.model_outputs[0], self.latents[0], alpha_bar)

    # -- save / load ------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write one `.safetensors` file: tensors plus a JSON header. No pickle."""
        path = Path(path)
        tensors = {name: getattr(self, name) for name in self.TENSORS if getattr(self, name) is not None}
        for name in self.TENSOR_DICTS:
            tensors.update({f"{name}/{key}": t for key, t in getattr(self, name).items()})
        tensors.update({f"decoded/{key}": torch.from_numpy(np.ascontiguousarray(a)) for key, a in self.decoded.items()})
        header = {
            "version": FORMAT_VERSION,
            "info": self.info.to_json(),
            "truncated": self.truncated,
            "prompt": to_json(self.tokens, self.words),
            "negative": to_json(self.negative_tokens, self.negative_words),
            "layers": [asdict(layer) for layer in self.layers],
            "self_layers": [asdict(layer) for layer in self.self_layers],
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"sdviz": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path) -> TraceResult:
        """Read a trace written by `save` (this version's format, or sdviz 0.1's)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not an sdviz trace (not a readable safetensors file: {err})") from None
        if "sdviz" not in meta:
            raise ValueError(f"{path} is not an sdviz trace (no 'sdviz' header); save one with run.save(path)")
        header = json.loads(meta["sdviz"])
        version = header.get("version")
        if version not in (1, FORMAT_VERSION):
            raise ValueError(f"{path} has trace format {version}; this sdviz reads formats 1 and {FORMAT_VERSION}")
        t = load_file(str(path))
        tokens, words = from_json(header["prompt"])
        neg_tokens, neg_words = from_json(header["negative"])
        layers = [LayerInfo(**layer) for layer in header["layers"]]
        self_layers = [LayerInfo(**layer) for layer in header.get("self_layers", [])]
        order = [layer.name for layer in layers] + [layer.name for layer in self_layers]

        def prefixed(p: str) -> dict:
            return {k[len(p) :]: v for k, v in t.items() if k.startswith(p)}

        dicts = {name: prefixed(f"{name}/") for name in cls.TENSOR_DICTS}
        return cls(
            tokens=tokens,
            words=words,
            negative_tokens=neg_tokens,
            negative_words=neg_words,
            truncated=header["truncated"],
            layers=layers,
            **{name: {n: d[n] for n in order if n in d} for name, d in dicts.items()},
            **{name: t.get(name) for name in cls.TENSORS},
            info=RunInfo.from_json(header["info"], version),
            decoded={k: v.numpy() for k, v in prefixed("decoded/").items()},
            self_layers=self_layers,
        )


def contrast_shares(maps: torch.Tensor, groups: list[list[int]], temperature: float = 1.0) -> torch.Tensor:
    """Each pixel's attention shared among word groups: maps [s, T, h, w], groups of token positions → [s, G, h, w].

    softmax over the groups of log(mass) / temperature, i.e. mass^(1/τ) / Σ mass^(1/τ); sums to 1 over G.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"the contrast temperature must be a number above 0 (1 = the plain share); got {temperature!r}"
        )
    mass = torch.stack([maps[:, g].sum(1) for g in groups], 1)  # [s, G, h, w]
    return torch.softmax(mass.clamp_min(1e-30).log() / temperature, dim=1)
