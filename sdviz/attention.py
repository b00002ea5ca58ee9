"""Cross-attention recording: a forward pre-hook on each U-Net cross-attention layer.

The hook only reads the layer's inputs; the layer, its processor and every argument diffusers passes
to it are untouched (so SDPA stays the kernel, `cross_attention_kwargs` reach the processor as they
would, and images are bit-identical). The probabilities softmax(Q·Kᵀ·scale) are recomputed on the
side from the layer's own projections, only for the batch rows being recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import FusedAttnProcessor2_0


@dataclass(frozen=True)
class LayerInfo:
    name: str  # module name in the U-Net, e.g. "down_blocks.0.attentions.1.transformer_blocks.0.attn2"
    block: str  # "down", "mid" or "up"
    height: int  # the layer's own latent resolution
    width: int
    heads: int

    @property
    def short(self) -> str:
        """A compact label for plots: "down0.a1.t0 (64×64)"."""
        m = re.match(r"(down|mid|up)_blocks?\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)", self.name)
        if not m:
            return self.name
        block, idx, a, t = m.groups()
        return f"{block}{idx}.a{a}.t{t} ({self.height}×{self.width})"


def block_of(name: str) -> str:
    for block in ("down", "mid", "up"):
        if name.startswith(block):
            return block
    return "other"


def project_keys(attn, context: torch.Tensor) -> torch.Tensor:
    """The layer's keys, ready to multiply: context [b, 77, d_text] → Kᵀ·scale [b, heads, head_dim, 77], float32."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    if isinstance(attn.processor, FusedAttnProcessor2_0):
        key = attn.to_kv(context)  # [b, 77, 2·inner]: keys, then values, as that processor splits them
        key = key[..., : key.shape[-1] // 2]
    else:
        key = attn.to_k(context)
    key = key.view(key.shape[0], -1, attn.heads, key.shape[-1] // attn.heads).transpose(1, 2)  # [b, heads, 77, d]
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return (key.float() * attn.scale).transpose(-1, -2)


def attention_probs(attn, hidden_states: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale) of one `Attention` layer, in float32.

    hidden_states: [b, hw, c] (or [b, c, h, w]); keys_t: `project_keys` output [b, heads, d, 77]
    → probs [b, heads, hw, 77]. Follows the layer's own pre-processing (group norm, q/k norms).
    """
    return torch.matmul(project_queries(attn, hidden_states).float(), keys_t).softmax(dim=-1)


def project_queries(attn, hidden_states: torch.Tensor) -> torch.Tensor:
    """The layer's queries: hidden_states [b, hw, c] (or [b, c, h, w]) → [b, heads, hw, d], in the model's dtype.

    The layer's own pre-processing (group norm, to_q, q norm): what `attention_probs` multiplies with the keys,
    and what `sdviz.trace(keep_queries=True)` keeps.
    """
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    query = query.view(query.shape[0], -1, attn.heads, query.shape[-1] // attn.heads).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    return query


def untraceable(attn) -> str | None:
    """Why sdviz can't recompute this cross-attention layer's probabilities from its own projections, or None.

    The recomputation is softmax(to_q(x)·to_k(text)ᵀ·scale) (to_kv's key half once fused). A processor
    whose keys come from elsewhere would get maps of an attention that never ran.
    """
    processor = attn.processor
    kind = type(processor).__name__
    if kind.startswith("CustomDiffusion") and getattr(processor, "train_kv", False):
        return f"its processor {kind} computes keys with its own trained projections (Custom Diffusion)"
    if "AddedKV" in kind:
        return f"its processor {kind} attends to the text and the image features together (added key/value projections)"
    return None


def text_context(context):
    """The text part of what a cross-attention layer attends to: [b, 77, d_text].

    With an IP-Adapter loaded the context is a tuple (text, [image-prompt tokens per adapter]); the
    image-prompt tokens go through the adapter's own projections and are not recorded.
    """
    return context[0] if isinstance(context, tuple) else context


class CrossAttentionRecorder:
    """Forward pre-hook of one cross-attention layer: hands its inputs to `sink`, changes nothing.

    `sink(name, attn, hidden_states, encoder_hidden_states)` decides which rows to record. Installed
    with `attn.register_forward_pre_hook(recorder, with_kwargs=True)`; its type is how sdviz
    recognises a layer that is already being traced.
    """

    def __init__(self, name: str, sink):
        self.name = name
        self.sink = sink

    def __call__(self, attn, args: tuple, kwargs: dict) -> None:
        # BasicTransformerBlock calls attn2(hidden_states, encoder_hidden_states=..., attention_mask=..., **kw)
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if context is not None:
            self.sink(self.name, attn, hidden_states, context)
