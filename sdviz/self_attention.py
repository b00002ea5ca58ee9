"""Self-attention recording (opt-in): where each latent pixel of a U-Net self-attention (attn1) layer looks.

A forward pre-hook on each attn1 layer reads the layer's input, as the cross-attention recorder does, and
the tracer keeps the head-mean softmax(Q·Kᵀ·scale) of the conditional row, only at the resolutions and
steps asked for: a layer at h×w keeps an [hw, hw] map per step, so memory grows with the fourth power of
the side. The default keeps the layers at 16×16 and coarser (SD 1.5 at 512²: 6 layers, 0.66 MB a step in
float16). The layer, its processor and its output are untouched: images stay bit-identical.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import FusedAttnProcessor2_0

DEFAULT_MAX_SIDE = 16  # without `self_attention_resolutions`, layers whose sides are at most this many pixels
ROWS_PER_CHUNK = 1024  # query rows softmaxed at once: bounds the [heads, rows, hw] float32 temporary


def kept(height: int, width: int, resolutions) -> bool:
    """Whether a layer at height × width is recorded: in `resolutions` (layer heights), or by default ≤ 16×16."""
    if resolutions is None:
        return max(height, width) <= DEFAULT_MAX_SIDE
    return height in resolutions


@torch.no_grad()
def self_attention_probs(attn, hidden_states: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax(Q·Kᵀ·scale) of a self-attention layer, float32: [hw, c] (or [c, h, w]) → [hw, hw].

    Row i is where query pixel i attends (it sums to 1). Follows the layer's own pre-processing (group norm,
    fused QKV, q/k norms); computed `ROWS_PER_CHUNK` rows at a time.
    """
    if hidden_states.ndim == 3:  # [c, h, w]
        hidden_states = hidden_states.flatten(1).transpose(0, 1)
    x = hidden_states[None]  # [1, hw, c]
    if attn.group_norm is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    if isinstance(attn.processor, FusedAttnProcessor2_0) and hasattr(attn, "to_qkv"):
        query, key, _ = attn.to_qkv(x).chunk(3, dim=-1)  # as that processor splits them
    else:
        query, key = attn.to_q(x), attn.to_k(x)
    heads = attn.heads
    query = query.view(1, -1, heads, query.shape[-1] // heads).transpose(1, 2)  # [1, heads, hw, d]
    key = key.view(1, -1, heads, key.shape[-1] // heads).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    keys_t = (key[0].float() * attn.scale).transpose(-1, -2)  # [heads, d, hw]
    rows = [
        torch.matmul(q.float(), keys_t).softmax(dim=-1).mean(0)  # [rows, hw]
        for q in query[0].split(ROWS_PER_CHUNK, dim=1)  # [heads, rows, d]
    ]
    return torch.cat(rows)


class SelfAttentionRecorder:
    """Forward pre-hook of one self-attention (attn1) layer: hands its input to `sink`, changes nothing.

    `sink(name, attn, hidden_states)` decides whether to record. Calls that carry an encoder context (an
    attn1 configured as cross-attention) are not self-attention and are skipped.
    """

    def __init__(self, name: str, sink):
        self.name = name
        self.sink = sink

    def __call__(self, attn, args: tuple, kwargs: dict) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if context is None:
            self.sink(self.name, attn, hidden_states)
