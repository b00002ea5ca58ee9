"""`sdviz.trace(pipe)`: record one generation of an unmodified diffusers Stable Diffusion pipeline.

    with sdviz.trace(pipe) as tracer:
        image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    run = tracer.result                      # sdviz.TraceResult, plain data on the CPU

What it installs, and removes in `finally` whatever happens:
- a `CrossAttentionRecorder` around each cross-attention (attn2) processor, via `Attention.set_processor`;
- a forward pre-hook on the U-Net (latent size, whether this call carries classifier-free guidance);
- a forward pre-hook on the first text encoder (the token ids of the prompt, then of the negative);
- a wrapper of `step` on the scheduler instance: each call closes one step (x_t, guided model
  output, x0, timestep, sigma, alpha-bar) and the attention recorded since the last one. Diffusers
  has no hook that sees the scheduler's inputs and its x0 together, so this one method is wrapped,
  with the original's signature, and the instance is given back exactly as it was.
State lives on the Tracer, so two traces of two pipelines in two threads never mix. The tracer
builds its own result (`Tracer.result`); nothing that can fail runs after the user's call.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .attention import CrossAttentionRecorder, LayerInfo, attention_probs, block_of, project_keys
from .preview import preview_map
from .result import RunInfo, TraceResult
from .steps import noise_level, predicted_x0, schedule_of
from .tokens import tokens_from_ids, truncated_text

_MARK = "__sdviz_tracer__"  # set on the step wrapper: how sdviz knows a scheduler is already traced


@dataclass
class _Step:
    timestep: float
    sigma: float
    alpha_bar: float
    latent: torch.Tensor  # [C, h, w]
    model_output: torch.Tensor  # [C, h, w]
    x0: torch.Tensor  # [C, h, w]
    attention: dict = field(default_factory=dict)  # layer → [hw, T] (or [heads, hw, T])
    attention_negative: dict = field(default_factory=dict)


def _layer_size(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a layer with `tokens` query positions: the latent halved k times, rounding up."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    side = int(math.isqrt(tokens))
    return side, tokens // max(side, 1)


def _first(pipe, *names):
    """The first of the pipeline's components `names` that it has (e.g. tokenizer, then tokenizer_2)."""
    for name in names:
        part = getattr(pipe, name, None)
        if part is not None:
            return part
    return None


class Tracer:
    """Context manager returned by `sdviz.trace`; `tracer.result` holds the `TraceResult` after exit.

    Options:
      negative        – also record the negative/unconditional branch's attention (classifier-free guidance only)
      per_head        – keep every head's map ([heads, T, h, w]) instead of the head mean
      dtype           – storage of the maps: float16 (default; half the memory, error ≤ 5e-4 on a
                        probability) or float32 (exact to the float32 softmax, for analysis)
      prompt          – the prompt text, when known: kept in the result, and used to report what
                        was cut past the 77-token window
      negative_prompt – the negative prompt text, when known (kept in the result)
    Records the first image of the batch.
    """

    def __init__(
        self,
        pipe,
        *,
        negative: bool = False,
        per_head: bool = False,
        dtype: torch.dtype = torch.float16,
        prompt: str | None = None,
        negative_prompt: str | None = None,
    ):
        for part in ("unet", "scheduler"):
            if getattr(pipe, part, None) is None:
                raise TypeError(
                    f"sdviz.trace needs a diffusers Stable Diffusion pipeline with a .{part}; got {type(pipe).__name__}"
                )
        self.pipe = pipe
        self.negative = negative
        self.per_head = per_head
        self.dtype = dtype
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.result: TraceResult | None = None
        self._reset()

    # -- per-generation state -------------------------------------------------------------------
    def _reset(self):
        self._texts: list = []  # (tokens, words) seen by the text encoder: prompt, then negative
        self._layers: dict[str, LayerInfo] = {}
        self._steps: list[_Step] = []
        self._pending: dict = {}  # layer → map, since the last scheduler step
        self._pending_negative: dict = {}
        self._rows: tuple[int, int | None] = (0, None)  # batch rows: (conditional, negative)
        self._latent_hw = (0, 0)
        self._cfg = False
        self._guidance = float("nan")
        self._text_dim: int | None = None
        self._requested_steps: int | None = None
        self._schedule = None
        self._final_latent = None
        self._keep = (77, 77)  # tokens kept: up to and including the first <|endoftext|>
        self._keys: dict = {}  # projected text keys per (layer, context)
        self._preview = (None, "none")
        self._truncated = ""

    # -- install / restore ----------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        pipe = self.pipe
        unet, scheduler = pipe.unet, pipe.scheduler
        # (name, Attention module, its own processor) of every cross-attention layer
        layers = [
            (name, m, m.processor)
            for name, m in unet.named_modules()
            if getattr(m, "is_cross_attention", False) and hasattr(m, "set_processor")
        ]
        if any(isinstance(p, CrossAttentionRecorder) for _, _, p in layers) or hasattr(scheduler.step, _MARK):
            raise RuntimeError(
                "this pipeline is already being traced: one `sdviz.trace(pipe)` at a time "
                "(finish the other `with` block first)"
            )
        if not layers:
            raise RuntimeError(f"{type(unet).__name__} has no cross-attention layers to trace")
        self._reset()
        # Everything that needs the model and may fail runs here, before the user's call.
        self._preview = preview_map(pipe)
        tokenizer = _first(pipe, "tokenizer", "tokenizer_2")
        self._truncated = truncated_text(tokenizer, self.prompt) if (self.prompt and tokenizer) else ""
        self._originals = layers
        self._own_step = vars(scheduler).get("step")  # an instance attribute someone else set, if any
        self._handles = []
        try:
            for name, module, original in layers:
                module.set_processor(CrossAttentionRecorder(original, name, self._record_attention))
            self._handles.append(unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))
            encoder = _first(pipe, "text_encoder", "text_encoder_2")
            if encoder is not None:
                self._handles.append(encoder.register_forward_pre_hook(self._on_text_encoder, with_kwargs=True))
            scheduler.step = self._wrap_step(scheduler.step)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self._restore()
        finally:
            self.result = self._build_result(complete=exc_type is None)
        return False

    def _restore(self):
        try:
            for _, module, original in self._originals:
                module.set_processor(original)
        finally:
            scheduler = self.pipe.scheduler
            if self._own_step is not None:
                scheduler.step = self._own_step
            else:
                vars(scheduler).pop("step", None)
            for handle in self._handles:
                handle.remove()
            self._handles = []

    # -- hooks ----------------------------------------------------------------------------------
    def _on_text_encoder(self, module, args, kwargs):
        if self._steps:
            raise RuntimeError(
                "one sdviz.trace records one generation: open a new `with sdviz.trace(pipe)` for each pipeline call"
            )
        ids = args[0] if args else kwargs.get("input_ids")
        tokenizer = _first(self.pipe, "tokenizer", "tokenizer_2")
        if ids is None or tokenizer is None or len(self._texts) >= 2:
            return
        tokens, words = tokens_from_ids(tokenizer, ids[0].tolist())
        keep = list(self._keep)
        keep[len(self._texts)] = len(tokens)
        self._keep = tuple(keep)
        self._texts.append((tokens, words))

    def _on_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self._latent_hw = tuple(sample.shape[-2:])
        batch = sample.shape[0]
        # The pipeline's own flag; its batch order is [negative/unconditional, conditional].
        self._cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and batch % 2 == 0
        self._rows = (batch // 2, 0) if self._cfg else (0, None)
        self._guidance = float(getattr(self.pipe, "guidance_scale", float("nan")))
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if isinstance(context, torch.Tensor):
            self._text_dim = int(context.shape[-1])

    def _record_attention(self, name, attn, hidden_states, context):
        cond, neg = self._rows
        rows = [cond] + ([neg] if (self.negative and neg is not None) else [])
        select = slice(cond, cond + 1) if len(rows) == 1 else rows  # a view when one row
        # The text context is the same tensor at every step: project its keys once per layer.
        cache_key = (name, context.data_ptr(), context._version, tuple(context.shape), tuple(rows))
        key = self._keys.get(cache_key)
        if key is None:
            key = self._keys[cache_key] = project_keys(attn, context[select])
        probs = attention_probs(attn, hidden_states[select], key)  # [r, heads, hw, 77]
        if name not in self._layers:
            h, w = _layer_size(probs.shape[2], self._latent_hw)
            self._layers[name] = LayerInfo(name, block_of(name), h, w, attn.heads)
        for row, (target, keep) in enumerate(zip((self._pending, self._pending_negative), self._keep)):
            if row >= len(rows):
                break
            p = probs[row, :, :, :keep]  # [heads, hw, T]
            # [(heads,) hw, T]; the result lays the stacked steps out as [S, (heads,) T, h, w]
            target[name] = (p if self.per_head else p.mean(0)).to(self.dtype)

    def _wrap_step(self, original_step):
        # wraps() keeps step's signature visible: pipelines pass `generator` and `eta` only to a
        # step() that declares them (prepare_extra_step_kwargs inspects it).
        @functools.wraps(original_step)
        def step(model_output, timestep, sample, *args, **kwargs):
            return_dict = kwargs.pop("return_dict", True)
            out = original_step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            self._on_step(model_output, timestep, sample, out)
            return out if return_dict else out.to_tuple()

        setattr(step, _MARK, self)
        return step

    def _on_step(self, model_output, timestep, sample, out):
        scheduler = self.pipe.scheduler
        if self._schedule is None:
            self._schedule = schedule_of(scheduler)
            self._requested_steps = getattr(scheduler, "num_inference_steps", None)
        sigma, alpha_bar = noise_level(scheduler, timestep)
        x0 = predicted_x0(scheduler, out, model_output, sample, sigma, alpha_bar)
        self._steps.append(
            _Step(
                timestep=float(timestep),
                sigma=sigma,
                alpha_bar=alpha_bar,
                latent=sample[0].detach().float().clone(),
                model_output=model_output[0].detach().float().clone(),
                x0=x0[0].detach().clone(),
                attention=self._pending,
                attention_negative=self._pending_negative,
            )
        )
        self._pending, self._pending_negative = {}, {}
        self._final_latent = out.prev_sample[0].detach().float().clone()

    @property
    def latest_x0(self) -> torch.Tensor | None:
        """[C, h, w] predicted clean latent of the last recorded step (for live previews)."""
        return self._steps[-1].x0 if self._steps else None

    # -- result ---------------------------------------------------------------------------------
    def _stack(self, branch: str) -> dict[str, torch.Tensor]:
        """Per layer, every step's map of `branch` stacked: [S, (heads,) T, h_l, w_l] on the CPU."""
        maps = {}
        for layer in self._layers.values():
            per_step = [getattr(s, branch).get(layer.name) for s in self._steps]
            if per_step and all(m is not None for m in per_step):
                m = torch.stack(per_step).transpose(-1, -2)  # [S, (heads,) T, hw]
                maps[layer.name] = m.reshape(*m.shape[:-1], layer.height, layer.width).cpu()
        return maps

    def _series(self, attr: str) -> torch.Tensor:
        """Per step, one value or tensor of each step: [S] float32 or [S, C, h, w]."""
        if not self._steps:
            return torch.zeros(0)
        values = [getattr(s, attr) for s in self._steps]
        if isinstance(values[0], torch.Tensor):
            return torch.stack(values).cpu()
        return torch.tensor(values, dtype=torch.float32)

    def _info(self, complete: bool) -> RunInfo:
        pipe = self.pipe
        h, w = self._latent_hw
        scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        vae = getattr(pipe, "vae", None)
        vae_config = getattr(vae, "config", {}) or {}
        factors, source = self._preview
        return RunInfo(
            model=str(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", "")),
            pipeline=type(pipe).__name__,
            scheduler=type(pipe.scheduler).__name__,
            prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
            guidance_scale=self._guidance,
            cfg=self._cfg,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            latent_size=(h, w),
            image_size=(h * scale, w * scale),
            complete=complete,
            per_head=self.per_head,
            text_dim=self._text_dim,
            requested_steps=self._requested_steps,
            vae_scaling_factor=float(vae_config.get("scaling_factor", 1.0) or 1.0),
            vae_shift_factor=float(vae_config.get("shift_factor") or 0.0),
            latent_rgb=None if factors is None else tuple(tuple(row) for row in factors.tolist()),
            preview_source=source,
        )

    def _build_result(self, complete: bool) -> TraceResult:
        """The recording as a TraceResult: plain tensors on the CPU, no reference to the pipeline."""
        texts = self._texts + [([], [])] * (2 - len(self._texts))
        schedule = self._schedule or (torch.zeros(0), torch.zeros(0))
        return TraceResult(
            tokens=texts[0][0],
            words=texts[0][1],
            negative_tokens=texts[1][0],
            negative_words=texts[1][1],
            truncated=self._truncated,
            layers=list(self._layers.values()),
            attention=self._stack("attention"),
            attention_negative=self._stack("attention_negative"),
            latents=self._series("latent"),
            model_outputs=self._series("model_output"),
            x0=self._series("x0"),
            final_latent=None if self._final_latent is None else self._final_latent.cpu(),
            timesteps=self._series("timestep"),
            sigmas=self._series("sigma"),
            alpha_bars=self._series("alpha_bar"),
            schedule_timesteps=schedule[0],
            schedule_sigmas=schedule[1],
            info=self._info(complete),
        )


def trace(
    pipe,
    *,
    negative: bool = False,
    per_head: bool = False,
    dtype: torch.dtype = torch.float16,
    prompt: str | None = None,
    negative_prompt: str | None = None,
) -> Tracer:
    """Trace one generation of `pipe`. See `Tracer` for the options and the module docstring for how."""
    return Tracer(
        pipe, negative=negative, per_head=per_head, dtype=dtype, prompt=prompt, negative_prompt=negative_prompt
    )
