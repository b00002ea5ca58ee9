"""Maps of any text after the run (open-vocabulary attention maps, as in OVAM): `run.attend(pipe, text)`.

    with sdviz.trace(pipe, keep_queries=True) as tracer:
        image = pipe("a red circle on the left", ...).images[0]
    zebra = tracer.result.attend(pipe, "a zebra")      # a TraceResult: its words are "a", "zebra"
    zebra.heatmap("zebra", size="image")

A cross-attention layer's map is softmax(Q·Kᵀ·scale): Q comes from the image (the layer's input, through
`to_q`), K from the text (through `to_k`). With `keep_queries=True` the tracer keeps every step's Q of
the conditional branch; `attend` encodes another text with the pipeline's own text encoder, projects it
through each layer's `to_k` exactly as the recorder does, and recomputes the maps — no U-Net call. The
latents, x0 and schedule are the run's own (shared, not copied). What `attend` shows is where the image
*as it was generated* would have attended, had the prompt been `text` at that layer; the U-Net's later
layers still saw the real prompt.

Memory: a layer at h×w keeps [heads, hw, head_dim] per step. By default only the layers at 16×16 and
coarser keep queries, in the trace's `dtype` (float16): SD 1.5 at 512² keeps 6 of its 16 layers,
3.4 MB a step, 172 MB for 50 steps. `query_resolutions=[32, 16, 8]` keeps more (SD 1.5: +6.5 MB a step).
"""

from __future__ import annotations

import dataclasses

import torch

from .attention import project_keys
from .tokens import tokens_from_ids, truncated_text

DEFAULT_MAX_SIDE = 16  # without `query_resolutions`, layers whose sides are at most this many pixels keep queries
STEPS_PER_CHUNK = 8  # steps recomputed at once by `attend` (SD 1.5, 16×16 layer: a 5 MB float32 temporary)

NO_QUERIES = (
    "run.attend needs the queries of the run's cross-attention layers, and this run was traced without them: "
    "trace with sdviz.trace(pipe, keep_queries=True) (in the app: Advanced → keep queries, on by default) "
    "and generate again"
)


def kept(height: int, width: int, resolutions) -> bool:
    """Whether a layer at height × width keeps its queries: in `resolutions` (layer heights), or by default ≤ 16×16."""
    if resolutions is None:
        return max(height, width) <= DEFAULT_MAX_SIDE
    return height in resolutions


def _tokenizer(pipe):
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            return getattr(pipe, name)
    raise TypeError(f"{type(pipe).__name__} has no tokenizer: attend needs the pipeline's own text encoder")


def text_tokens(pipe, text: str):
    """`text` as the pipeline's tokenizer cuts it: (tokens, words) up to the first <|endoftext|>, named as the
    tracer names them."""
    tokenizer = _tokenizer(pipe)
    convert = getattr(pipe, "maybe_convert_prompt", None)  # textual-inversion tokens, as pipelines do
    converted = convert(text, tokenizer) if convert else text
    ids = tokenizer(converted, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return tokens_from_ids(tokenizer, ids.input_ids)


def encode_text(pipe, text: str) -> torch.Tensor:
    """The context the U-Net would get for `text` with the pipeline's own `encode_prompt`: [1, 77, d_text]."""
    device = getattr(pipe, "_execution_device", None) or next(pipe.unet.parameters()).device
    embeds = pipe.encode_prompt(prompt=text, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return embeds[0]


@torch.no_grad()
def attend(run, pipe, text: str):
    """`run`'s cross-attention maps recomputed for `text` from its stored queries: a TraceResult (see module doc).

    Its tokens and words are `text`'s; its layers are the run's layers that kept queries; its maps are
    [S, T, h, w] head means, for every recorded step. The U-Net does not run.
    """
    if not run.queries:
        raise ValueError(NO_QUERIES)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("attend needs a text: a word or a prompt, e.g. 'a zebra'")
    tokens, words = text_tokens(pipe, text)
    context = encode_text(pipe, text)  # [1, 77, d_text]
    if run.info.text_dim is not None and context.shape[-1] != run.info.text_dim:
        raise ValueError(
            f"this pipeline's text encoder gives {context.shape[-1]}-wide token vectors but the run's U-Net got "
            f"{run.info.text_dim}-wide ones: attend with the pipeline that made the run"
        )
    stored = next(iter(run.attention.values()), None)
    dtype = stored.dtype if stored is not None else torch.float16
    keep = len(tokens)
    layers, maps = [], {}
    for layer in run.layers:
        queries = run.queries.get(layer.name)  # [S, heads, hw, d]
        if queries is None:
            continue
        try:
            attn = pipe.unet.get_submodule(layer.name)
        except AttributeError:
            raise ValueError(
                f"this pipeline's U-Net has no layer {layer.name}: attend with the pipeline that made the run"
            ) from None
        param = next(attn.parameters())
        keys_t = project_keys(attn, context.to(param.device))[0]  # [heads, d, 77], float32
        chunks = []
        for q in queries.split(STEPS_PER_CHUNK):  # [s, heads, hw, d]: a few steps at a time bound the temporary
            probs = torch.matmul(q.to(param.device).float(), keys_t).softmax(dim=-1).mean(1)  # [s, hw, 77]
            probs = probs[..., :keep].transpose(1, 2)  # [s, T, hw]
            chunks.append(probs.reshape(len(q), keep, layer.height, layer.width).to(dtype).cpu())
        layers.append(layer)
        maps[layer.name] = torch.cat(chunks)  # [S, T, h, w]
    info = dataclasses.replace(
        run.info,
        prompt=text,
        negative_prompt=None,
        per_head=False,
        tokens_from="prompt",
        negative_tokens_from="none",
        maps_from="queries",
    )
    return dataclasses.replace(
        run,
        tokens=tokens,
        words=words,
        negative_tokens=[],
        negative_words=[],
        truncated=truncated_text(_tokenizer(pipe), text),
        layers=layers,
        attention=maps,
        attention_negative={},
        info=info,
        prompt_embeds=context[0].detach().float().cpu(),  # [77, d_text]: `text`'s vectors
        negative_prompt_embeds=torch.zeros(0),
    )
