"""`sdviz.trace(pipe)`: record one generation of an unmodified diffusers Stable Diffusion pipeline.

    with sdviz.trace(pipe) as tracer:
        image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    run = tracer.result                      # sdviz.TraceResult, plain data on the CPU

What it installs, and removes in `finally` whatever happens:
- a forward pre-hook (`CrossAttentionRecorder`) on each cross-attention (attn2) layer: it reads the
  layer's inputs and leaves the layer, its processor and `cross_attention_kwargs` alone;
- a forward pre-hook on the U-Net (latent size, whether this call carries classifier-free guidance, and
  at its first call the text vectors it gets) and a forward hook on its output (the two predictions,
  unconditional and with the text, before the pipeline combines them by guidance);
- a forward hook on the first text encoder (the token ids of each call, and its output, which tells
  which call was the prompt and which the negative: the one the U-Net's context rows are made of);
- opt-in (`self_attention=True`): a forward pre-hook (`SelfAttentionRecorder`) on each self-attention
  (attn1) layer, which reads its input the same way; `keep_queries=True` adds nothing to install (the
  cross-attention recorder keeps the queries it computes anyway);
- a wrapper of `step` on the scheduler instance: each call closes one step (x_t, guided model
  output, x0, timestep, sigma, alpha-bar) and the attention recorded since the last one. Diffusers
  has no hook that sees the scheduler's inputs and its x0 together, so this one method is wrapped,
  with the original's signature, and the instance is given back exactly as it was (an instance-level
  `step` someone else set included).
What may fail, or refuse, runs in `__enter__`, before the user's call (an `image=` the call doesn't
make is refused at the U-Net's first call, before any denoising); after the call only the hooks are
removed and the result assembled. State lives on the Tracer, so two traces of two pipelines in two
threads never mix. The tracer builds its own result (`Tracer.result`), after a failed or stopped call too.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from . import queries as query_store
from . import self_attention as self_store
from .attention import (
    CrossAttentionRecorder,
    LayerInfo,
    block_of,
    project_keys,
    project_queries,
    text_context,
    untraceable,
)
from .preview import preview_map
from .result import RunInfo, TraceResult
from .steps import is_sigma_space, noise_level, predicted_x0, schedule_of
from .tokens import tokens_by_index, tokens_from_ids, truncated_text

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
    queries: dict = field(default_factory=dict)  # layer → [heads, hw, d] (keep_queries)
    self_attention: dict = field(default_factory=dict)  # attn1 layer → [hw, hw] (self_attention, at chosen steps)
    predictions: tuple | None = None  # the U-Net's (unconditional, text) outputs before guidance, [C, h, w] each


def _layer_size(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a layer with `tokens` query positions: the latent halved k times, rounding up."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    side = int(math.isqrt(tokens))
    return side, tokens // max(side, 1)


@dataclass
class _TextCall:
    """One call of the first text encoder: its input ids and every [b, 77, d] output it returned."""

    ids: torch.Tensor  # [b, 77]
    outputs: list  # last_hidden_state and each hidden state: [b, 77, d_te]


def _compiled(module) -> bool:
    """Whether `module` or a part of it runs through torch.compile (its hooks and Python code then don't run)."""
    # torch.compile(m) wraps m in an OptimizedModule holding it as `_orig_mod`; m.compile() sets _compiled_call_impl
    wrapped = (isinstance(getattr(m, "_orig_mod", None), torch.nn.Module) for m in module.modules())
    in_place = (getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())
    return any(wrapped) or any(in_place)


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
      image           – which image of the call to record (0-based, in the order of `.images`: prompt by
                        prompt, `num_images_per_prompt` each); default the first
      negative        – also record the negative/unconditional branch's attention (classifier-free guidance only)
      per_head        – keep every head's map ([heads, T, h, w]) instead of the head mean
      dtype           – storage of the maps: float16 (default; half the memory, error ≤ 5e-4 on a
                        probability) or float32 (exact to the float32 softmax, for analysis)
      prompt          – the recorded image's prompt text, when known: kept in the result, used to report
                        what was cut past the 77-token window, and to name the tokens by word when the
                        pipeline gets `prompt_embeds` instead of text
      negative_prompt – the negative prompt text, when known (kept in the result; names the negative's
                        tokens when the pipeline gets `negative_prompt_embeds`)
    Research options (memory measured by `python -m sdviz.bench --research`):
      keep_queries    – keep each cross-attention layer's queries (conditional branch, in `dtype`), so that
                        `run.attend(pipe, text)` can map any text afterwards (sdviz.queries)
      query_resolutions – which layers keep them, by height (e.g. [32, 16, 8]); default: those at ≤ 16×16
      self_attention  – record the self-attention (attn1) maps, head mean, conditional branch (sdviz.self_attention)
      self_attention_resolutions – which attn1 layers, by height; default: those at ≤ 16×16
      self_attention_steps – which steps (0-based indices); default: every step
    """

    def __init__(
        self,
        pipe,
        *,
        image: int = 0,
        negative: bool = False,
        per_head: bool = False,
        dtype: torch.dtype = torch.float16,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        keep_queries: bool = False,
        query_resolutions=None,
        self_attention: bool = False,
        self_attention_resolutions=None,
        self_attention_steps=None,
    ):
        for part in ("unet", "scheduler"):
            if getattr(pipe, part, None) is None:
                raise TypeError(
                    f"sdviz.trace needs a diffusers Stable Diffusion pipeline with a .{part}; got {type(pipe).__name__}"
                )
        if not isinstance(image, int) or image < 0:
            raise ValueError(f"image must be the index of an image of the call (0, 1, …); got {image!r}")
        self.pipe = pipe
        self.image = image
        self.negative = negative
        self.per_head = per_head
        self.dtype = dtype
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.keep_queries = bool(keep_queries)
        self.query_resolutions = _whole_numbers(query_resolutions, "query_resolutions")
        self.self_attention = bool(self_attention)
        self.self_attention_resolutions = _whole_numbers(self_attention_resolutions, "self_attention_resolutions")
        self.self_attention_steps = _whole_numbers(self_attention_steps, "self_attention_steps")
        self.result: TraceResult | None = None
        self._reset()

    # -- per-generation state -------------------------------------------------------------------
    def _reset(self):
        self._calls: list[_TextCall] = []  # the text encoder's calls, until the U-Net's first call sorts them
        self._texts: list | None = None  # [(tokens, words, source)] of the prompt and the negative, once sorted
        self._layers: dict[str, LayerInfo] = {}
        self._steps: list[_Step] = []
        self._pending: dict = {}  # layer → map, since the last scheduler step
        self._pending_negative: dict = {}
        self._rows: tuple[int, int | None] = (self.image, None)  # batch rows: (conditional, negative)
        self._latent_hw = (0, 0)
        self._cfg = False
        self._guidance = float("nan")
        self._text_dim: int | None = None
        self._requested_steps: int | None = None
        self._schedule = None
        self._final_latent = None
        self._keep = (77, 77)  # tokens kept per branch: up to and including the first <|endoftext|>
        self._keys: dict = {}  # layer → (context, its version, rows, projected keys)
        self._preview = (None, "none")
        self._truncated = ""
        self._pending_queries: dict = {}  # layer → queries, since the last scheduler step
        self._pending_self: dict = {}  # attn1 layer → map, since the last scheduler step
        self._self_layers: dict[str, LayerInfo] = {}
        self._embeds: tuple | None = None  # the U-Net's text vectors (prompt [77, d], negative or None), once
        self._pending_predictions: tuple | None = None  # (unconditional, text) [C, h, w], since the last step

    # -- install / restore ----------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        pipe = self.pipe
        unet, scheduler = pipe.unet, pipe.scheduler
        # 1. Refuse what sdviz can't trace, before anything is installed.
        if _compiled(unet):
            raise RuntimeError(
                "sdviz can't trace a torch.compile'd U-Net: the compiled code runs without sdviz's hooks "
                "(no maps would be recorded), and recompiling it with them would change the image. "
                "Trace the uncompiled U-Net (e.g. `pipe.unet = pipe.unet._orig_mod`, or compile after tracing)."
            )
        layers = [
            (name, m)
            for name, m in unet.named_modules()
            if getattr(m, "is_cross_attention", False) and hasattr(m, "processor")
        ]
        if not layers:
            raise RuntimeError(f"{type(unet).__name__} has no cross-attention layers to trace")
        self_layers = [
            (name, m)
            for name, m in unet.named_modules()
            if hasattr(m, "processor") and getattr(m, "is_cross_attention", True) is False
        ]
        recorders = (CrossAttentionRecorder, self_store.SelfAttentionRecorder)
        if hasattr(scheduler.step, _MARK) or any(
            isinstance(hook, recorders) for _, m in layers + self_layers for hook in m._forward_pre_hooks.values()
        ):
            raise RuntimeError(
                "this pipeline is already being traced: one `sdviz.trace(pipe)` at a time "
                "(finish the other `with` block first)"
            )
        for name, module in layers:
            reason = untraceable(module)
            if reason:
                raise RuntimeError(
                    f"sdviz can't trace cross-attention layer {name}: {reason}, so its maps would not be the "
                    "attention that ran. Trace the pipeline with diffusers' own attention processors."
                )
        # 2. Everything else that needs the model and may fail runs here, before the user's call.
        self._reset()
        self._preview = preview_map(pipe)
        tokenizer = _first(pipe, "tokenizer", "tokenizer_2")
        self._truncated = truncated_text(tokenizer, self.prompt) if (self.prompt and tokenizer) else ""
        # 3. Install: hooks that only read, and the step wrapper.
        self._own_step = vars(scheduler).get("step")  # an instance attribute someone else set, if any
        self._handles = []
        try:
            for name, module in layers:
                recorder = CrossAttentionRecorder(name, self._record_attention)
                self._handles.append(module.register_forward_pre_hook(recorder, with_kwargs=True))
            for name, module in self_layers if self.self_attention else ():
                recorder = self_store.SelfAttentionRecorder(name, self._record_self_attention)
                self._handles.append(module.register_forward_pre_hook(recorder, with_kwargs=True))
            self._handles.append(unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))
            self._handles.append(unet.register_forward_hook(self._on_unet_output, with_kwargs=True))
            encoder = _first(pipe, "text_encoder", "text_encoder_2")
            if encoder is not None:
                self._handles.append(encoder.register_forward_hook(self._on_text_encoder, with_kwargs=True))
            scheduler.step = self._wrap_step(scheduler.step)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self._restore()
        finally:
            stopped = bool(getattr(self.pipe, "_interrupt", False))  # a callback set diffusers' `pipe._interrupt`
            self.result = self._build_result(complete=exc_type is None and not stopped)
            self._keys, self._calls = {}, []  # references to the pipeline's tensors: not kept past the call
        return False

    def _restore(self):
        # Removing a hook and setting an attribute can't fail; nothing here touches the model's weights.
        scheduler = self.pipe.scheduler
        if self._own_step is not None:
            scheduler.step = self._own_step
        else:
            vars(scheduler).pop("step", None)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- hooks ----------------------------------------------------------------------------------
    def _on_text_encoder(self, module, args, kwargs, output):
        if self._steps:
            raise RuntimeError(
                "one sdviz.trace records one generation: open a new `with sdviz.trace(pipe)` for each pipeline call"
            )
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None or self._texts is not None:
            return
        hidden = getattr(output, "hidden_states", None) or ()
        last = getattr(output, "last_hidden_state", None)
        outputs = [t for t in (last, *hidden) if isinstance(t, torch.Tensor) and t.ndim == 3]
        self._calls.append(_TextCall(ids, outputs))

    def _on_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.reshape(-1)[0]  # some pipelines pass one timestep per batch row
        if self._steps and timestep is not None and float(timestep) > self._steps[-1].timestep:
            raise RuntimeError(  # timesteps only fall within a generation: this is the next pipeline call
                "one sdviz.trace records one generation: open a new `with sdviz.trace(pipe)` for each pipeline call"
            )
        self._latent_hw = tuple(sample.shape[-2:])
        batch = sample.shape[0]
        # The pipeline's own flag; its batch order is [negative/unconditional, conditional].
        self._cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and batch % 2 == 0
        images = batch // 2 if self._cfg else batch
        if self.image >= images:
            raise ValueError(
                f"sdviz.trace(image={self.image}) but this call makes {images} image(s) "
                f"(prompts × num_images_per_prompt): choose image 0–{images - 1}"
            )
        self._rows = (images + self.image, self.image) if self._cfg else (self.image, None)
        self._guidance = float(getattr(self.pipe, "guidance_scale", float("nan")))
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if isinstance(context, torch.Tensor):
            self._text_dim = int(context.shape[-1])
            if self._texts is None:
                self._sort_texts(context)
            self._record_embeddings(context)

    # -- around guidance: the text vectors the U-Net gets, its two predictions -------------------------
    def _record_embeddings(self, context: torch.Tensor):
        """The recorded rows of the U-Net's text context [batch, 77, d], at its first call: what the text
        encoder(s) made of the prompt (and of the negative prompt, when guidance runs)."""
        if self._embeds is not None:
            return
        cond, neg = self._rows
        self._embeds = tuple(None if row is None else context[row].detach().float().clone() for row in (cond, neg))

    def _on_unet_output(self, module, args, kwargs, output):
        """With guidance, the U-Net's output [2B, C, h, w] holds [unconditional, text] halves: keep the recorded
        image's row of each, before the pipeline combines them (its step then gets the guided output)."""
        sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        cond, neg = self._rows
        if neg is None or not isinstance(sample, torch.Tensor):
            self._pending_predictions = None
            return
        self._pending_predictions = (sample[neg].detach().float().clone(), sample[cond].detach().float().clone())

    def _predictions(self, which: int) -> torch.Tensor:
        """Every step's unconditional (0) or text (1) prediction: float32 [S, C, h, w]; empty without guidance."""
        kept = [s.predictions for s in self._steps]
        if not kept or any(p is None for p in kept):
            return torch.zeros(0)
        return torch.stack([p[which] for p in kept]).cpu()

    def _embedding(self, which: int) -> torch.Tensor:
        """The prompt's (0) or the negative prompt's (1) text vectors, float32 [77, d]; empty when not seen."""
        kept = None if self._embeds is None else self._embeds[which]
        return torch.zeros(0) if kept is None else kept.cpu()

    def _sort_texts(self, context: torch.Tensor):
        """Name the tokens of the recorded rows of `context` [batch, T, d] (once, at the U-Net's first call).

        A text-encoder call is the prompt's if one of its outputs is the conditional row of the context
        (SD: its last hidden state; SDXL: the first encoder's part of the concatenation), the negative's
        if it is the unconditional row. Embeddings made elsewhere (`prompt_embeds`) match no call: their
        tokens come from the `prompt=` text given to sdviz.trace, or are named by position.
        """
        tokenizer = _first(self.pipe, "tokenizer", "tokenizer_2")
        texts, keep = [], []
        for row, text in zip(self._rows, (self.prompt, self.negative_prompt)):
            if row is None:
                texts.append(([], [], "none"))
                keep.append(0)
                continue
            ids, source = self._ids_of(context[row]), "text_encoder"
            if ids is None and text is not None and tokenizer is not None:
                convert = getattr(self.pipe, "maybe_convert_prompt", None)  # textual-inversion tokens, as pipelines do
                text = convert(text, tokenizer) if convert else text
                ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
                ids, source = ids.input_ids, "prompt"
            if ids is None or tokenizer is None:
                (tokens, words), source = tokens_by_index(context.shape[1]), "index"
            else:
                tokens, words = tokens_from_ids(tokenizer, ids)
            texts.append((tokens, words, source))
            keep.append(min(len(tokens), context.shape[1]))
        self._texts, self._keep, self._calls = texts, tuple(keep), []

    def _ids_of(self, row: torch.Tensor) -> list[int] | None:
        """The input ids of the text-encoder call, and batch row, whose output `row` [T, d] is made of."""
        for call in self._calls:
            for out in call.outputs:  # [b, T, d_te]
                if out.shape[1] != row.shape[0] or out.shape[2] > row.shape[1]:
                    continue
                part = row[:, : out.shape[2]]
                for b in range(out.shape[0]):
                    if torch.equal(out[b].to(part.device, part.dtype), part):
                        return call.ids[b].tolist()
        return None

    def _record_attention(self, name, attn, hidden_states, context):
        context = text_context(context)  # [batch, 77, d_text]; an IP-Adapter's image tokens are left out
        cond, neg = self._rows
        rows = [cond] + ([neg] if (self.negative and neg is not None) else [])
        select = slice(cond, cond + 1) if len(rows) == 1 else rows  # a view when one row
        # The text context is the same tensor at every step: project its keys once per layer. The cache
        # holds the tensor itself, so its identity (and in-place version) can't be confused with another's.
        cached = self._keys.get(name)
        if cached is None or cached[0] is not context or cached[1] != context._version or cached[2] != rows:
            cached = self._keys[name] = (context, context._version, rows, project_keys(attn, context[select]))
        query = project_queries(attn, hidden_states[select])  # [r, heads, hw, d], the model's dtype
        probs = torch.matmul(query.float(), cached[3]).softmax(dim=-1)  # [r, heads, hw, 77]
        if name not in self._layers:
            h, w = _layer_size(probs.shape[2], self._latent_hw)
            self._layers[name] = LayerInfo(name, block_of(name), h, w, attn.heads)
        layer = self._layers[name]
        if self.keep_queries and query_store.kept(layer.height, layer.width, self.query_resolutions):
            self._pending_queries[name] = query[0].to(self.dtype, copy=True)  # [heads, hw, d], conditional row
        for row, (target, keep) in enumerate(zip((self._pending, self._pending_negative), self._keep)):
            if row >= len(rows):
                break
            p = probs[row, :, :, :keep]  # [heads, hw, T]
            # [(heads,) hw, T]; the result lays the stacked steps out as [S, (heads,) T, h, w]
            target[name] = (p if self.per_head else p.mean(0)).to(self.dtype)

    def _record_self_attention(self, name, attn, hidden_states):
        step = len(self._steps)  # the step being computed: steps close at each scheduler.step
        if self.self_attention_steps is not None and step not in self.self_attention_steps:
            return
        hw = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[-2] * hidden_states.shape[-1]
        h, w = _layer_size(hw, self._latent_hw)
        if not self_store.kept(h, w, self.self_attention_resolutions):
            return
        if name not in self._self_layers:
            self._self_layers[name] = LayerInfo(name, block_of(name), h, w, attn.heads)
        probs = self_store.self_attention_probs(attn, hidden_states[self._rows[0]])  # [hw, hw], conditional row
        self._pending_self[name] = probs.to(self.dtype)

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
        x0 = predicted_x0(scheduler, out, model_output, sample, sigma, alpha_bar)  # [images, C, h, w]
        k = self.image
        self._steps.append(
            _Step(
                timestep=float(timestep),
                sigma=sigma,
                alpha_bar=alpha_bar,
                latent=sample[k].detach().float().clone(),
                model_output=model_output[k].detach().float().clone(),
                x0=x0[k].detach().clone(),
                attention=self._pending,
                attention_negative=self._pending_negative,
                queries=self._pending_queries,
                self_attention=self._pending_self,
                predictions=self._pending_predictions,
            )
        )
        self._pending, self._pending_negative = {}, {}
        self._pending_queries, self._pending_self = {}, {}
        self._pending_predictions = None
        self._final_latent = out.prev_sample[k].detach().float().clone()

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

    def _stack_queries(self) -> dict[str, torch.Tensor]:
        """Per layer that kept them at every step, the queries stacked: [S, heads, hw_l, d] on the CPU."""
        out = {}
        for name in self._layers:
            per_step = [s.queries.get(name) for s in self._steps]
            if per_step and all(q is not None for q in per_step):
                out[name] = torch.stack(per_step).cpu()
        return out

    def _stack_self_attention(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per attn1 layer, its maps at the steps that recorded self-attention: ([S_sa, hw, hw] each, steps [S_sa])."""
        steps = [i for i, s in enumerate(self._steps) if s.self_attention]
        maps = {}
        for name in self._self_layers:
            per_step = [self._steps[i].self_attention.get(name) for i in steps]
            if per_step and all(m is not None for m in per_step):
                maps[name] = torch.stack(per_step).cpu()
        return maps, torch.tensor(steps, dtype=torch.int64)

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
            image=self.image,
            tokens_from=self._texts[0][2] if self._texts else "none",
            negative_tokens_from=self._texts[1][2] if self._texts else "none",
            sigma_space=is_sigma_space(pipe.scheduler),
        )

    def _build_result(self, complete: bool) -> TraceResult:
        """The recording as a TraceResult: plain tensors on the CPU, no reference to the pipeline."""
        texts = self._texts or [([], [], "none")] * 2  # None when the U-Net never ran
        schedule = self._schedule or (torch.zeros(0), torch.zeros(0))
        self_maps, self_steps = self._stack_self_attention()
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
            queries=self._stack_queries(),
            self_attention=self_maps,
            self_attention_steps=self_steps,
            self_layers=[self._self_layers[name] for name in self_maps],
            noise_pred_uncond=self._predictions(0),
            noise_pred_text=self._predictions(1),
            prompt_embeds=self._embedding(0),
            negative_prompt_embeds=self._embedding(1),
        )


def _whole_numbers(values, name: str) -> tuple[int, ...] | None:
    """None, or `values` (an int or a list of them) as a tuple of ints ≥ 0; ValueError saying what to pass."""
    if values is None:
        return None
    items = [values] if isinstance(values, int) else list(values)
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
        raise ValueError(f"{name} must be whole numbers ≥ 0 (e.g. [16, 8]), or None for the default; got {values!r}")
    return tuple(items)


def trace(
    pipe,
    *,
    image: int = 0,
    negative: bool = False,
    per_head: bool = False,
    dtype: torch.dtype = torch.float16,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    keep_queries: bool = False,
    query_resolutions=None,
    self_attention: bool = False,
    self_attention_resolutions=None,
    self_attention_steps=None,
) -> Tracer:
    """Trace one generation of `pipe`. See `Tracer` for the options and the module docstring for how."""
    return Tracer(
        pipe,
        image=image,
        negative=negative,
        per_head=per_head,
        dtype=dtype,
        prompt=prompt,
        negative_prompt=negative_prompt,
        keep_queries=keep_queries,
        query_resolutions=query_resolutions,
        self_attention=self_attention,
        self_attention_resolutions=self_attention_resolutions,
        self_attention_steps=self_attention_steps,
    )
