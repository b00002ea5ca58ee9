"""Cross-attention recording: a processor that wraps a U-Net layer's own processor.

The layer's output always comes from its original processor (SDPA stays the kernel, so images are
bit-identical); the probabilities softmax(Q·Kᵀ·scale) are recomputed on the side, only for the
batch rows being recorded.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch


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
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    query = query.view(query.shape[0], -1, attn.heads, keys_t.shape[-2]).transpose(1, 2)  # [b, heads, hw, d]
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    return torch.matmul(query.float(), keys_t).softmax(dim=-1)


class CrossAttentionRecorder:
    """Attention processor for one attn2 layer: runs `original`, then hands q/k to `sink`.

    `sink(name, attn, hidden_states, encoder_hidden_states)` decides which rows to record.
    """

    def __init__(self, original, name: str, sink):
        self.original = original
        self.name = name
        self.sink = sink
        params = inspect.signature(original.__call__).parameters
        self._pass_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
        self._accepted = set(params)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        if not self._pass_all:
            # Attention.forward filters kwargs by *our* signature; filter again for the original's.
            kwargs = {k: v for k, v in kwargs.items() if k in self._accepted}
        if temb is not None:
            kwargs["temb"] = temb
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if encoder_hidden_states is not None:
            self.sink(self.name, attn, hidden_states, encoder_hidden_states)
        return out
