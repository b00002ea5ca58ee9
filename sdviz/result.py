"""`TraceResult`: everything one traced generation recorded, as plain data on the CPU.

No reference to the model: it deep-copies, sits in `gr.State`, and saves to one safetensors file
(tensors plus a JSON header; no pickle). Aggregation (heatmaps, word shares, region scores) lives here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .attention import LayerInfo
from .preview import latent_to_rgb
from .tokens import Token, Word, from_json, to_json

FORMAT_VERSION = 1


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
    info                           model, scheduler, sizes, guidance, VAE scaling, preview factors
    decoded                        cache of exact VAE decodes, key "x0/7" → uint8 [H, W, 3]
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
    info: dict
    decoded: dict[str, np.ndarray] = field(default_factory=dict)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_recording(cls, tracer, complete: bool) -> "TraceResult":
        from .preview import latent_rgb_factors
        from .tokens import truncated_text

        pipe, steps = tracer.pipe, tracer._steps
        texts = tracer._texts + [([], [])] * (2 - len(tracer._texts))
        layers = list(tracer._layers.values())

        def stack(branch: str) -> dict[str, torch.Tensor]:
            maps = {}
            for layer in layers:
                per_step = [getattr(s, branch).get(layer.name) for s in steps]
                if per_step and all(m is not None for m in per_step):
                    m = torch.stack(per_step).transpose(-1, -2)              # [S, (heads,) T, hw]
                    maps[layer.name] = m.reshape(*m.shape[:-1], layer.height, layer.width).cpu()
            return maps

        def series(attr: str) -> torch.Tensor:
            if not steps:
                return torch.zeros(0)
            values = [getattr(s, attr) for s in steps]
            if isinstance(values[0], torch.Tensor):
                return torch.stack(values).cpu()
            return torch.tensor(values, dtype=torch.float32)

        tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
        truncated = truncated_text(tokenizer, tracer.prompt) if (tracer.prompt and tokenizer) else ""
        h, w = tracer._latent_hw
        scale = getattr(pipe, "vae_scale_factor", 8)
        schedule = tracer._schedule or (torch.zeros(0), torch.zeros(0))
        vae = getattr(pipe, "vae", None)
        info = {
            "model": str(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", "")),
            "pipeline": type(pipe).__name__,
            "scheduler": type(pipe.scheduler).__name__,
            "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
            "guidance_scale": float(getattr(pipe, "_guidance_scale", float("nan"))),
            "prompt": tracer.prompt,
            "negative_prompt": tracer.negative_prompt,
            "latent_size": [h, w],
            "image_size": [h * scale, w * scale],
            "complete": complete,
            "per_head": tracer.per_head,
            "vae_scaling_factor": float(vae.config.scaling_factor) if vae is not None else 1.0,
            "vae_shift_factor": float(vae.config.get("shift_factor") or 0.0) if vae is not None else 0.0,
            "latent_rgb": latent_rgb_factors(pipe).tolist() if vae is not None else None,
        }
        return cls(
            tokens=texts[0][0], words=texts[0][1], negative_tokens=texts[1][0], negative_words=texts[1][1],
            truncated=truncated, layers=layers, attention=stack("attention"),
            attention_negative=stack("attention_negative"),
            latents=series("latent"), model_outputs=series("model_output"), x0=series("x0"),
            final_latent=None if tracer._final_latent is None else tracer._final_latent.cpu(),
            timesteps=series("timestep"), sigmas=series("sigma"), alpha_bars=series("alpha_bar"),
            schedule_timesteps=schedule[0], schedule_sigmas=schedule[1], info=info,
        )

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(self.info["latent_size"])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.info["image_size"])

    @property
    def prompt(self) -> str | None:
        return self.info.get("prompt")

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded tensors (what a trace costs in memory)."""
        tensors = [self.latents, self.model_outputs, self.x0, self.timesteps, self.sigmas, self.alpha_bars]
        tensors += list(self.attention.values()) + list(self.attention_negative.values())
        total = sum(t.numel() * t.element_size() for t in tensors)
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
        if not hits:
            listing = ", ".join(repr(w.text) for w in words) or "(none: the prompt was empty)"
            which = "negative prompt" if negative else "prompt"
            raise KeyError(f"{word!r} is not a word of the {which}; its words are: {listing}")
        return hits

    # -- heatmaps -------------------------------------------------------------------------------
    def select_layers(self, layers: Iterable[str] | None = None, blocks: Iterable[str] | None = None,
                      resolutions: Iterable[int] | None = None) -> list[LayerInfo]:
        """The layers passing every filter given: names, blocks ("down", "mid", "up"), resolutions (h)."""
        chosen = list(self.layers)
        if layers is not None:
            layers = set(layers)
            unknown = layers - {l.name for l in self.layers} - {l.short for l in self.layers}
            if unknown:
                raise KeyError(f"unknown layer {sorted(unknown)[0]!r}; layers are: "
                               + ", ".join(l.name for l in self.layers))
            chosen = [l for l in chosen if l.name in layers or l.short in layers]
        if blocks is not None:
            blocks = {blocks} if isinstance(blocks, str) else set(blocks)
            chosen = [l for l in chosen if l.block in blocks]
        if resolutions is not None:
            resolutions = {resolutions} if isinstance(resolutions, int) else {int(r) for r in resolutions}
            chosen = [l for l in chosen if l.height in resolutions]
        if not chosen:
            available = sorted({(l.block, l.height) for l in self.layers})
            raise ValueError("no cross-attention layer matches these filters; available (block, resolution): "
                             + ", ".join(f"{b} {r}" for b, r in available))
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

    def heatmap(self, word: str | int | Sequence[int], steps=None, layers=None, blocks=None, resolutions=None,
                heads=None, size=None, negative: bool = False, normalize: bool = False) -> np.ndarray:
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
        """
        maps = self.attention_negative if negative else self.attention
        if not maps:
            raise ValueError("this trace has no negative-prompt attention: trace with negative=True "
                             "and a guidance scale > 1" if negative else "this trace recorded no attention")
        idx = self.token_indices(word, negative)
        step_idx = self.step_indices(steps)
        chosen = self.select_layers(layers, blocks, resolutions)
        target = self._target_size(size)
        total = torch.zeros(target)
        for layer in chosen:
            m = maps[layer.name][step_idx].float()         # [s, T, h, w] or [s, heads, T, h, w]
            if m.ndim == 5:
                if heads is not None:
                    m = m[:, [heads] if isinstance(heads, int) else list(heads)]
                m = m.mean(1)
            elif heads is not None:
                raise ValueError("this trace kept only head means: trace with per_head=True to pick heads")
            m = m[:, idx].sum(1).mean(0)                   # [h, w]
            total += F.interpolate(m[None, None], size=target, mode="bilinear", align_corners=False)[0, 0]
        out = (total / len(chosen)).numpy().astype(np.float32)
        if normalize and out.max() > 0:
            out = out / out.max()
        return out

    def word_shares(self, steps=None, layers=None, blocks=None, resolutions=None,
                    negative: bool = False) -> np.ndarray:
        """Each word's share of the attention given to words, per step: float32 [S, n_words].

        Per step: the mean over the selected layers of each word's attention mass averaged over
        pixels, divided by the sum over words (start/end tokens excluded), so each row sums to 1.
        """
        words = self.negative_words if negative else self.words
        if not words:
            raise ValueError("the prompt has no words")
        step_idx = self.step_indices(steps)
        maps = self.attention_negative if negative else self.attention
        chosen = self.select_layers(layers, blocks, resolutions)
        mass = torch.zeros(len(step_idx), len(words))
        for layer in chosen:
            m = maps[layer.name][step_idx].float()
            if m.ndim == 5:
                m = m.mean(1)
            per_token = m.mean(dim=(-2, -1))               # [s, T]
            for j, w in enumerate(words):
                mass[:, j] += per_token[:, list(w.tokens)].sum(1)
        shares = mass / mass.sum(1, keepdim=True).clamp_min(1e-12)
        return shares.numpy().astype(np.float32)

    def region_scores(self, region, steps=None, layers=None, blocks=None, resolutions=None,
                      negative: bool = False) -> dict[str, float]:
        """How much attention a region of the image paid to each word: {word: mean probability}.

        `region`: a boolean mask [H, W] at any size, or a box (x0, y0, x1, y1) in fractions 0–1 of the
        image. Each word's score is its latent-size `heatmap` averaged over the region, so this is
        the reverse question of a heatmap, with the same aggregation. Sorted, highest first.
        """
        words = self.negative_words if negative else self.words
        size = self.latent_size
        if isinstance(region, (tuple, list)) and len(region) == 4:
            x0, y0, x1, y1 = (float(v) for v in region)
            mask = torch.zeros(size, dtype=torch.bool)
            h, w = size
            r0, r1 = int(min(y0, y1) * h), max(int(np.ceil(max(y0, y1) * h)), int(min(y0, y1) * h) + 1)
            c0, c1 = int(min(x0, x1) * w), max(int(np.ceil(max(x0, x1) * w)), int(min(x0, x1) * w) + 1)
            mask[r0:min(r1, h), c0:min(c1, w)] = True
        else:
            m = torch.as_tensor(np.asarray(region, dtype=np.float32))
            mask = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0] >= 0.5
        if not mask.any():
            raise ValueError("the region is empty: click inside the image or drag a larger box")
        scores = {}
        for w in words:
            hm = self.heatmap(list(w.tokens), steps, layers, blocks, resolutions, size=size, negative=negative)
            scores[w.text if w.text not in scores else f"{w.text} ({w.index})"] = float(hm[mask.numpy()].mean())
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
        return latent_to_rgb(self.latent(step, which), torch.tensor(self.info["latent_rgb"])).numpy()

    @torch.no_grad()
    def decode(self, step: int, vae, which: str = "x0") -> np.ndarray:
        """Exact VAE decode of a step's latent: uint8 [H, W, 3]. Cached: a step is decoded once."""
        key = f"{which}/{self.step_indices(step)[0] if which != 'final' else 'last'}"
        if key not in self.decoded:
            param = next(vae.parameters())
            z = self.latent(step, which)[None].to(param.device, param.dtype)      # [1, C, h, w]
            z = z / self.info["vae_scaling_factor"] + self.info["vae_shift_factor"]
            image = vae.decode(z).sample[0].float().cpu()                          # [3, H, W] in [-1, 1]
            self.decoded[key] = ((image.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().byte().numpy()
        return self.decoded[key]

    # -- save / load ------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write one `.safetensors` file: tensors plus a JSON header. No pickle."""
        path = Path(path)
        tensors = {"latents": self.latents, "model_outputs": self.model_outputs, "x0": self.x0,
                   "timesteps": self.timesteps, "sigmas": self.sigmas, "alpha_bars": self.alpha_bars,
                   "schedule_timesteps": self.schedule_timesteps, "schedule_sigmas": self.schedule_sigmas}
        if self.final_latent is not None:
            tensors["final_latent"] = self.final_latent
        for name, t in self.attention.items():
            tensors[f"attention/{name}"] = t
        for name, t in self.attention_negative.items():
            tensors[f"attention_negative/{name}"] = t
        for key, a in self.decoded.items():
            tensors[f"decoded/{key}"] = torch.from_numpy(np.ascontiguousarray(a))
        header = {
            "version": FORMAT_VERSION, "info": self.info, "truncated": self.truncated,
            "prompt": to_json(self.tokens, self.words), "negative": to_json(self.negative_tokens, self.negative_words),
            "layers": [asdict(l) for l in self.layers],
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"sdviz": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path) -> "TraceResult":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "sdviz" not in meta:
            raise ValueError(f"{path} is not an sdviz trace (no 'sdviz' header); save one with run.save(path)")
        header = json.loads(meta["sdviz"])
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has trace format {header.get('version')}; this sdviz reads {FORMAT_VERSION}")
        t = load_file(str(path))
        tokens, words = from_json(header["prompt"])
        neg_tokens, neg_words = from_json(header["negative"])
        layers = [LayerInfo(**l) for l in header["layers"]]
        prefix = lambda p: {k[len(p):]: v for k, v in t.items() if k.startswith(p)}  # noqa: E731
        order = [l.name for l in layers]
        attention, negative = prefix("attention/"), prefix("attention_negative/")
        return cls(
            tokens=tokens, words=words, negative_tokens=neg_tokens, negative_words=neg_words,
            truncated=header["truncated"], layers=layers,
            attention={n: attention[n] for n in order if n in attention},
            attention_negative={n: negative[n] for n in order if n in negative},
            latents=t["latents"], model_outputs=t["model_outputs"], x0=t["x0"], final_latent=t.get("final_latent"),
            timesteps=t["timesteps"], sigmas=t["sigmas"], alpha_bars=t["alpha_bars"],
            schedule_timesteps=t["schedule_timesteps"], schedule_sigmas=t["schedule_sigmas"], info=header["info"],
            decoded={k: v.numpy() for k, v in prefix("decoded/").items()},
        )
