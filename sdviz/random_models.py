"""Stable Diffusion pipelines of the real architectures with random weights.

No weights can be downloaded here, so tests, the benchmark and the app's last-resort fallback build
each family's real layer layout (blocks, attention heads, cross-attention width, prediction type)
at full or tiny width, with a small byte-level CLIP tokenizer built in memory. The add-ons users load
(an IP-Adapter, a LoRA, a tiny VAE) come as random weights of the real formats, for the same tests.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

FAMILIES = ("sd1", "sd2-base", "sd2-v", "sd-turbo", "sdxl")

# Words the in-memory tokenizer knows as single tokens; anything else splits into byte pieces,
# which is what multi-token-word tests need.
COMMON_WORDS = (
    "a an the and of on in at with to above below under over left right top bottom "
    "red green blue yellow black white orange purple pink brown grey gray "
    "circle square triangle star cat dog house tree car photo painting small large big "
    "astronaut riding horse mountain lake sky sun city night forest portrait"
).split()


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2/CLIP's reversible byte → printable-unicode table, as 256 symbols in byte order."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def build_tokenizer(words=COMMON_WORDS, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell each of `words` as one token ("red</w>").

    The vocabulary holds the 256 byte symbols, the same with the end-of-word mark, one entry per
    merge, then <|startoftext|> and <|endoftext|>, like CLIP's own.
    """
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        chars = [symbols[b] for b in word.encode("utf-8")]
        pieces = chars[:-1] + [chars[-1] + "</w>"]
        # Run BPE with the merges so far, then add merges until the word is one token. Earlier words
        # stay whole: each of their steps has a better-ranked merge than any added later.
        while len(pieces) > 1:
            known = [(ranks[pair], i) for i, pair in enumerate(zip(pieces, pieces[1:])) if pair in ranks]
            if known:
                i = min(known)[1]
            else:
                i = 0
                ranks[(pieces[0], pieces[1])] = len(merges)
                merges.append((pieces[0], pieces[1]))
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _width(full: bool, full_value, tiny_value):
    return full_value if full else tiny_value


def _text_encoder(
    tokenizer, hidden: int, layers: int, heads: int, act: str, projection: int | None = None, full_vocab: bool = False
):
    config = CLIPTextConfig(
        vocab_size=49408 if full_vocab else len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection or hidden,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae(full: bool, scaling: float, force_upcast: bool = False) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512) if full else (32, 32, 32, 32),
        layers_per_block=2 if full else 1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512 if full else 64,
        scaling_factor=scaling,
        force_upcast=force_upcast,
    ).eval()


def _sd_scheduler_config(prediction_type: str = "epsilon", spacing: str = "leading") -> dict:
    # The scheduler_config.json that SD 1.x/2.x checkpoints ship.
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
    )


def build_random_pipeline(family: str = "sd1", full: bool = False, seed: int = 0):
    """A `StableDiffusionPipeline` (or XL) of `family`'s architecture with random weights.

    `full=True` gives the real widths (SD1.5: 860 M UNet parameters); `full=False` keeps the layer
    layout, head counts and prediction type but with 32–64 channels, for tests that run in seconds.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    full_vocab = full  # real vocab size at full width, so the embedding matrix has its real cost
    if family == "sdxl":
        return _build_sdxl(tokenizer, full, full_vocab)

    sd1 = family == "sd1"
    ch = (320, 640, 1280, 1280) if full else (32, 32, 64, 64)
    if sd1:
        heads = 8  # SD1's attention_head_dim=8 is really 8 heads
        cross = 768 if full else 32
        te = _text_encoder(tokenizer, cross, 12 if full else 2, 12 if full else 4, "quick_gelu", full_vocab=full_vocab)
    else:
        heads = (5, 10, 20, 20) if full else (2, 2, 4, 4)  # head_dim 64 in SD2 (16 tiny)
        cross = 1024 if full else 32
        te = _text_encoder(tokenizer, cross, 23 if full else 2, 16 if full else 4, "gelu", full_vocab=full_vocab)
    unet = UNet2DConditionModel(
        sample_size=(96 if family == "sd2-v" else 64) if full else 16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=ch,
        layers_per_block=2,
        cross_attention_dim=cross,
        attention_head_dim=heads,
        use_linear_projection=not sd1,
        norm_num_groups=32,
    ).eval()
    vae = _vae(full, 0.18215)
    if family == "sd-turbo":
        scheduler = EulerAncestralDiscreteScheduler(
            **{
                k: v
                for k, v in _sd_scheduler_config(spacing="trailing").items()
                if k not in ("clip_sample", "set_alpha_to_one")
            }
        )
    elif family == "sd2-v":
        scheduler = DDIMScheduler(**_sd_scheduler_config("v_prediction"))
    else:
        scheduler = PNDMScheduler(
            skip_prk_steps=True, **{k: v for k, v in _sd_scheduler_config().items() if k != "clip_sample"}
        )
    # Real checkpoints' scheduler_config.json carries every key, so other schedulers built
    # from it (DDIM, DDPM) keep SD's values instead of their own defaults (clip_sample=True).
    scheduler.register_to_config(
        **_sd_scheduler_config(scheduler.config.prediction_type, scheduler.config.timestep_spacing)
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(tokenizer, full: bool, full_vocab: bool):
    te1 = _text_encoder(
        tokenizer, 768 if full else 32, 12 if full else 2, 12 if full else 4, "quick_gelu", full_vocab=full_vocab
    )
    te2 = _text_encoder(
        tokenizer,
        1280 if full else 32,
        32 if full else 2,
        20 if full else 4,
        "gelu",
        projection=1280 if full else 32,
        full_vocab=full_vocab,
    )
    time_dim = 256 if full else 8
    unet = UNet2DConditionModel(
        sample_size=128 if full else 16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280) if full else (32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20) if full else (2, 4, 4),
        cross_attention_dim=te1.config.hidden_size + te2.config.hidden_size,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=te2.config.projection_dim + 6 * time_dim,
        norm_num_groups=32,
    ).eval()
    vae = _vae(full, 0.13025, force_upcast=True)
    cfg = {k: v for k, v in _sd_scheduler_config().items() if k not in ("clip_sample", "set_alpha_to_one")}
    scheduler = EulerDiscreteScheduler(**cfg)
    scheduler.register_to_config(**_sd_scheduler_config())
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


# -- add-ons of the real formats, random weights (for the compatibility tests) -------------------------
def _random_linear(generator: torch.Generator, out_features: int, in_features: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=generator) / in_features**0.5


def random_ip_adapter(unet: UNet2DConditionModel, seed: int = 0, image_embed_dim: int | None = None) -> dict:
    """An IP-Adapter state dict for `unet` in the format `pipe.load_ip_adapter(state_dict, ...)` reads.

    "image_proj": the plain IP-Adapter's projection of one image embedding (`image_embed_dim`, default
    the cross-attention width) to 4 image-prompt tokens; "ip_adapter": per cross-attention layer, in
    the U-Net's order, the extra key/value projections `{n}.to_k_ip.weight` / `{n}.to_v_ip.weight`
    (n = 1, 3, 5, …: the original checkpoints number attn1 and attn2 together).
    """
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    embed = image_embed_dim or cross
    layers = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        inner = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        layers[f"{key_id}.to_k_ip.weight"] = _random_linear(g, inner, cross)
        layers[f"{key_id}.to_v_ip.weight"] = _random_linear(g, inner, cross)
        key_id += 2
    image_proj = {
        "proj.weight": _random_linear(g, 4 * cross, embed),
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": image_proj, "ip_adapter": layers}


def random_lora(
    unet: UNet2DConditionModel,
    rank: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    strength: float = 0.5,
) -> dict:
    """A LoRA for every attention layer of `unet`, as `pipe.load_lora_weights(state_dict)` reads it.

    PEFT's format with the pipeline's "unet." prefix: `unet.<module>.lora_A.weight` [rank, in] and
    `.lora_B.weight` [out, rank]. No alphas are given, so diffusers scales by 1: W' = W + B·A.
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not hasattr(module, "to_q"):
            continue
        for target in targets:
            linear = module.get_submodule(target)
            key = f"unet.{name}.{target}"
            state[f"{key}.lora_A.weight"] = _random_linear(g, rank, linear.in_features)
            state[f"{key}.lora_B.weight"] = strength * _random_linear(g, linear.out_features, rank)
    return state


def build_tiny_autoencoder(seed: int = 0) -> AutoencoderTiny:
    """A TAESD-layout `AutoencoderTiny` (8× down, 4 latent channels) at tiny width: SD's usual VAE swap."""
    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).eval()
