"""Train the toy Stable Diffusion on the shapes world (on CPU or a GPU) and save it as a diffusers folder.

    python -m sdviz.toy.train                 # from scratch, the shipped model's recipe (the model card has the
                                              # command that made it and how long it took)
    python -m sdviz.toy.train --quick --out /tmp/toy   # the whole recipe in seconds, for tests
    python -m sdviz.toy.train --device cuda ...         # on a GPU (python -m sdviz.toy.sweep: several at once)

Stage 1 trains the VAE on rendered scenes; the scenes are then encoded once, and stage 2 trains the
text encoder (from scratch) and the UNet together on those latents, with caption dropout for
classifier-free guidance, min-SNR loss weights, EMA weights and an optional loss that pulls each
object word's cross-attention into its object's mask.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from sdviz.preview import CONFIG_KEY as PREVIEW_KEY
from sdviz.preview import fit_latent_rgb
from sdviz.random_models import build_tokenizer
from sdviz.toy import world

DEFAULT_OUT = Path(__file__).parent / "model"
# Stable Diffusion 1.x's scheduler_config.json: the noise schedule the UNet is trained on.
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def build_vae(size: int, channels: tuple[int, ...] = (16, 32, 64)) -> AutoencoderKL:
    # n blocks = n - 1 downsamplings: the default three give f=4, so a 64×64 image becomes 4×16×16 latents
    # (see the model card; `python -m sdviz.toy.speed` times f=2).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=size,
        # No attention in the mid block: the VAE is then purely convolutional, so it can train on crops.
        mid_block_add_attention=False,
    )


def world_tokenizer():
    """A CLIP tokenizer that spells every word of the shapes world as one token."""
    # build_tokenizer keeps every word whole in any order; longest-first is the order the shipped
    # model's vocabulary was built in, so a retrain gets the same token ids.
    tokenizer = build_tokenizer(sorted(world.WORDS, key=len, reverse=True))
    split = [w for w in world.WORDS if len(tokenizer(w).input_ids) != 3]
    if split:
        raise RuntimeError(f"the tokenizer splits {split} into several tokens")
    return tokenizer


def build_text_encoder(tokenizer, hidden: int, layers: int = 2) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=hidden,
        )
    )


def build_unet(latent_size: int, channels: tuple[int, ...], text_dim: int, layers: int = 1) -> UNet2DConditionModel:
    # One level per width, each halving the grid (16² → 8² → 4² for three), cross-attention at every
    # level and in the mid block.
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        cross_attention_dim=text_dim,
        attention_head_dim=4,
        norm_num_groups=16,
    )


class ProbeProcessor:
    """Cross-attention that keeps its probabilities for the attention losses: `self.probs` and, computed
    from the text vectors detached, `self.probs_detached` (both [batch·heads, h·w, 77]; the same values,
    but the second passes no gradient to the text encoder). The layer's output uses the first."""

    def __init__(self):
        self.probs = self.probs_detached = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [b·heads, hw, d]
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # [b·heads, 77, d]
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        self.probs = attn.get_attention_scores(q, k, None)  # [b·heads, hw, 77]
        k_detached = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states.detach()))
        self.probs_detached = attn.get_attention_scores(q, k_detached, None)
        out = attn.batch_to_head_dim(torch.bmm(self.probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] uint8 → [N, 3, H, W] float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def train_vae(vae, images: torch.Tensor, args, log) -> None:
    vae.to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    vae.train()
    bar = tqdm(range(args.vae_steps), desc="VAE", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 100)
        # Random crops (on the latent grid) cost a quarter of whole images and hold the same edges;
        # the last steps see whole images (same batch, four times the cost), because GroupNorm
        # statistics and the image border differ between a crop and the whole image.
        c = args.vae_crop if step < args.vae_steps - args.vae_full_steps else images.shape[-1]
        x = images[torch.randint(len(images), (args.vae_batch,), generator=gen)].to(args.device)  # [b, 3, H, W]
        if c < x.shape[-1]:
            i, j = (4 * torch.randint((x.shape[-1] - c) // 4 + 1, (2,), generator=gen)).tolist()
            x = x[:, :, i : i + c, j : j + c]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        # L1 keeps edges sharp; a tiny KL keeps the latents a well-behaved Gaussian-ish space.
        loss_rec = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = loss_rec + args.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            record = {"stage": "vae", "step": step, "loss": round(loss.item(), 5), "psnr": round(psnr(rec, x), 2)}
            log({**record, "seconds": round(bar.format_dict["elapsed"], 1)})
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr(rec, x):.1f}")
    vae.cpu().eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256, device: str = "cpu") -> torch.Tensor:
    """Latent means of all images, unscaled, on the CPU (encoded on `device`). [N, 4, h, w]"""
    vae.to(device)
    latents = [vae.encode(x.to(device)).latent_dist.mean.cpu() for x in images.split(batch)]
    vae.cpu()
    return torch.cat(latents)


# The words an attention loss can pull into their object's mask, by kind (position: the phrase's last word,
# the first that tells "on the left" from "on the right" in a causal text encoder).
LOSS_WORDS = {
    "colour": tuple(world.COLOURS),
    "shape": world.SHAPES,
    "size": tuple(world.SIZES),
    "position": tuple(p.split()[-1] for p in world.POSITIONS),
}


def region_masks(size: int) -> torch.Tensor:
    """The half of the image each position names, in world.POSITIONS order: [4, size, size] of 0/1."""
    half = torch.arange(size) < size / 2  # [size]
    left = half[None, :].expand(size, size)
    top = half[:, None].expand(size, size)
    return torch.stack([left, ~left, top, ~top]).float()


def token_targets(
    scenes, tokenizer, latent_size: int, kinds=("colour", "shape", "size"), detached=(), position_target="region"
):
    """Token ids [N, 77]; the target each token's map is pulled to [N, 77]: the index of its object's mask,
    or for a position word with `position_target` "region" 3 + the index of the half of the image it names
    (see `attention_targets`), -1 for none or a word of a kind not in `kinds`; whether its attention
    losses leave the text encoder alone [N, 77] (words of the kinds in `detached`); object masks
    [N, 3, h, w]."""
    ids = tokenizer(
        [s.caption for s in scenes], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    owner = torch.full((len(scenes), 77), -1, dtype=torch.long)
    masks = torch.zeros(len(scenes), 3, latent_size, latent_size)
    detach = torch.zeros(len(scenes), 77, dtype=torch.bool)
    naming = {w for kind in kinds for w in LOSS_WORDS[kind]}
    untied = {w for kind in detached for w in LOSS_WORDS[kind]}
    for i, s in enumerate(scenes):
        for w, (word, obj) in enumerate(zip(s.caption.split(), world.word_objects(s.caption))):
            if word in naming:
                # +1: <|startoftext|> comes first, then one token per word
                owner[i, w + 1] = obj
                if word in LOSS_WORDS["position"] and position_target == "region":
                    owner[i, w + 1] = 3 + LOSS_WORDS["position"].index(word)
                detach[i, w + 1] = word in untied
        m = torch.from_numpy(s.masks).float()[:, None]  # [n, 1, H, W]
        masks[i, : len(s.masks)] = F.adaptive_avg_pool2d(m, latent_size)[:, 0]
    return ids, owner, detach, masks


def attention_targets(object_masks: torch.Tensor) -> torch.Tensor:
    """[b, 3, h, w] object masks → [b, 7, h, w]: then the four halves of the image (region_masks)."""
    regions = region_masks(object_masks.shape[-1]).to(object_masks)
    return torch.cat([object_masks, regions[None].expand(len(object_masks), -1, -1, -1)], 1)


def word_maps(probes, owner: torch.Tensor, detach: torch.Tensor, masks: torch.Tensor):
    """Per cross-attention layer in `probes`: each token's head-mean map [b, hw, 77] and the mask of the
    target it names (`owner` [b, 77], an index into `masks` [b, k, h, w]; zeros for -1), pooled to that
    layer's grid [b, hw, 77]. Tokens where `detach` [b, 77] is set get maps that pass no gradient to the
    text encoder."""
    b = owner.shape[0]
    tok_masks = torch.gather(masks, 1, owner.clamp(min=0)[:, :, None, None].expand(-1, -1, *masks.shape[2:]))
    for p in probes:
        probs = torch.where(
            detach[:, None, None],
            p.probs_detached.view(b, -1, *p.probs.shape[1:]),
            p.probs.view(b, -1, *p.probs.shape[1:]),
        ).mean(1)  # [b, hw, 77]: the head mean
        res = int(math.isqrt(probs.shape[1]))
        yield probs, F.adaptive_avg_pool2d(tok_masks, res).flatten(2).transpose(1, 2)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `x` where `mask` (same shape, bool) is set; 0 where it is set nowhere.

    The same value as `x[mask].mean()` (up to the order of the sum) without asking the device how many
    elements are set: boolean indexing, `.any()` and `.item()` make the CPU wait for a GPU, and a training
    step of a model this small is bound by such waits and launches, not by arithmetic.
    """
    return torch.where(mask, x, 0).sum() / mask.sum().clamp(min=1)


def attention_loss(probes, owner: torch.Tensor, detach: torch.Tensor, masks: torch.Tensor):
    """(share, cover) losses of the object words' cross-attention, each averaged over words and layers.

    share: (1 − share of the word's attention mass inside its object's mask)² — where the mass goes.
    cover: 1 − soft Dice between the word's map divided by its maximum and the mask — whether the map
    fills the object rather than peaking on one latent pixel of it (the maps' shape, which mIoU scores).
    Tokens where `detach` [b, 77] is set are scored on maps that pass no gradient to the text encoder.
    """
    valid = owner >= 0  # [b, 77]
    shares, covers = [], []
    for probs, m in word_maps(probes, owner, detach, masks):
        share = (probs * m).sum(1) / probs.sum(1).clamp(min=1e-8)  # [b, 77]
        shares.append(masked_mean((1 - share) ** 2, valid))
        q = probs / probs.amax(1, keepdim=True).clamp(min=1e-8)  # [b, hw, 77], peak 1
        dice = (2 * (q * m).sum(1) + 1e-3) / (q.sum(1) + m.sum(1) + 1e-3)  # [b, 77]
        covers.append(masked_mean(1 - dice, valid))
    return torch.stack(shares).mean(), torch.stack(covers).mean()


def word_classes(tokenizer, words) -> torch.Tensor:
    """[vocabulary size]: for each token id, the index of its word in `words`, -1 for every other token."""
    lookup = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for k, word in enumerate(words):
        lookup[tokenizer.convert_tokens_to_ids(word + "</w>")] = k
    return lookup


def class_directions(dim: int, n: int, seed: int) -> torch.Tensor:
    """[n, dim]: n orthonormal directions, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, n, generator=gen))
    return q.T.contiguous()


def shape_word_loss(cond: torch.Tensor, tok: torch.Tensor, shape_of: torch.Tensor, directions: torch.Tensor):
    """Cross-entropy of telling each shape word's shape from the text encoder's output at that word.

    The logits are the output's projections on fixed orthonormal directions (`class_directions`), one per
    shape, with no trained head in between: the loss is only low when the vectors the UNet reads for
    "circle", "square" and "triangle" lie apart, by several units along those directions.
    """
    labels = shape_of[tok]  # [b, 77]
    ce = F.cross_entropy((cond @ directions.T).transpose(1, 2), labels.clamp(min=0), reduction="none")  # [b, 77]
    return masked_mean(ce, labels >= 0)


def class_ids(classes: torch.Tensor) -> torch.Tensor:
    """The token ids of the words of `word_classes`, in the order of their words."""
    return (classes >= 0).nonzero()[:, 0][classes[classes >= 0].argsort()]


def colour_swapped(tok: torch.Tensor, colour_of: torch.Tensor, colour_ids: torch.Tensor, gen: torch.Generator):
    """`tok` [b, 77] with every colour word replaced by a colour drawn at random (`colour_of`: `word_classes`
    of the colours, `colour_ids`: its `class_ids`), everything else as it was."""
    drawn = colour_ids[torch.randint(len(colour_ids), tok.shape, generator=gen).to(tok.device)]
    return torch.where(colour_of[tok] >= 0, drawn, tok)


def shape_invariance_loss(cond: torch.Tensor, swapped: torch.Tensor, tok: torch.Tensor, shape_of: torch.Tensor):
    """Mean squared difference (per channel) of the text encoder's output at each shape word between a caption
    (`cond`) and the same caption with its colours redrawn (`swapped`, from `colour_swapped`): zero when what
    the UNet reads at "circle" does not depend on the colour before it."""
    return masked_mean((cond - swapped).pow(2).mean(-1), shape_of[tok] >= 0)


def word_read_loss(probes, reads: torch.Tensor, owner: torch.Tensor, masks: torch.Tensor, target: float):
    """How far the pixels of each object fall short of reading its shape word, averaged over words and layers.

    For each token where `reads` [b, 77] is set, r is the share of cross-attention (head mean) that the
    pixels of its object (`owner`, `masks` as in `attention_loss`) give to it; the loss is
    (1 − min(1, r / target))². The share-of-mass loss says where a word's map goes; this says whether the
    object reads the word at all. Scored on the maps that pass no gradient to the text encoder.
    """
    losses = []
    for probs, m in word_maps(probes, owner, torch.ones_like(reads), masks):
        inside = m.sum(1)  # [b, 77]
        r = (probs * m).sum(1) / inside.clamp(min=1e-6)
        valid = reads & (inside > 0)
        losses.append(masked_mean((1 - (r / target).clamp(max=1)) ** 2, valid))
    return torch.stack(losses).mean()


def add_caption_losses(loss, args, text_encoder, probes, cond, tok, own, detach, masks, words):
    """`loss` plus the weighted losses on what the caption's words do, and those losses by log name.

    The attention losses (`attn`, `cover`; zero without probes) are always there, then those of
    `shape`, `invariance`, `read` and `colour_read` that `args` switches on. `tok`, `own`, `detach`,
    `masks`: the batch's; `words`: a `Words`.
    """
    shape_of, colour_of, colour_ids, directions, swap_gen = words
    terms = {"attn": torch.zeros(()), "cover": torch.zeros(())}
    if args.shape_loss:
        terms["shape"] = shape_word_loss(cond, tok, shape_of, directions)
        loss = loss + args.shape_loss * terms["shape"]
    if args.shape_invariance:
        swapped = text_encoder(colour_swapped(tok, colour_of, colour_ids, swap_gen)).last_hidden_state
        terms["invariance"] = shape_invariance_loss(cond, swapped, tok, shape_of)
        loss = loss + args.shape_invariance * terms["invariance"]
    if probes:
        targets = attention_targets(masks)
        terms["attn"], terms["cover"] = attention_loss(probes, own, detach, targets)
        loss = loss + args.attn_loss * terms["attn"] + args.attn_cover * terms["cover"]
        for name, weight, of in (("read", args.shape_read, shape_of), ("colour_read", args.colour_read, colour_of)):
            if weight:
                reads = (of[tok] >= 0) & (own >= 0)
                terms[name] = word_read_loss(probes, reads, own, targets, args.shape_read_target)
                loss = loss + weight * terms[name]
    return loss, terms


class Words(NamedTuple):
    """What the caption losses need to find and score the words: `word_classes` of the shapes and the colours
    (on the device), the colours' `class_ids`, the shapes' `class_directions` and the colour-redrawing generator."""

    shape_of: torch.Tensor
    colour_of: torch.Tensor
    colour_ids: torch.Tensor
    directions: torch.Tensor
    swap_gen: torch.Generator

    @classmethod
    def of(cls, tokenizer, dim: int, seed: int, swap_gen: torch.Generator, device="cpu") -> Words:
        shape_of, colour_of = (word_classes(tokenizer, w) for w in (world.SHAPES, world.COLOURS))
        directions = class_directions(dim, len(world.SHAPES), seed)
        on = (x.to(device) for x in (shape_of, colour_of, class_ids(colour_of), directions))
        return cls(*on, swap_gen)


class Batch(NamedTuple):
    """One training batch: latents x0 (scaled), their noise and timesteps, token ids (`tok`), each token's object
    (`own`, -1 for none), the tokens whose maps pass no gradient to the text encoder (`detach`), object masks."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    tok: torch.Tensor
    own: torch.Tensor
    detach: torch.Tensor
    masks: torch.Tensor


def draw_batch(data, gen: torch.Generator, empty_ids: torch.Tensor, args) -> Batch:
    """A `Batch` of `args.batch` scenes from `data` (latents, ids, owner, detach, masks, all on one device),
    a share `args.caption_dropout` of them with the empty caption (unconditional, for CFG). The draws come
    from `gen`, a CPU generator, so a run draws the same batches, noise and timesteps on any device."""
    latents, ids, owner, detach, masks = data
    device = latents.device
    idx = torch.randint(len(latents), (args.batch,), generator=gen).to(device)
    drop = (torch.rand(args.batch, generator=gen) < args.caption_dropout).to(device)[:, None]
    noise = torch.randn((args.batch, *latents.shape[1:]), generator=gen).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    tok = torch.where(drop, empty_ids, ids[idx])
    own = torch.where(drop, -1, owner[idx])
    return Batch(latents[idx] * args.scaling, noise, t, tok, own, detach[idx], masks[idx])


def loss_weights(snr: torch.Tensor, floor: float = 0.0, gamma: float = 5.0) -> torch.Tensor:
    """Weights of the ε-prediction loss at signal-to-noise ratios `snr` [b].

    An error e in x0 is an error √SNR·e in ε, so a weight w on the ε loss weighs the x0 error by w·SNR. These
    weights make that x0 weight clamp(SNR, floor, gamma): min-SNR-γ (Hang et al. 2023) caps it at γ so the
    easy low-noise steps don't dominate; with floor 0 it is SNR below γ, 0.006–0.4 over the upper half of SD's
    schedule (t > 500), where what the caption asks for (which colours, shapes and places) is decided.
    A floor raises those steps' x0 weight to `floor`.
    """
    return snr.clamp(min=floor, max=gamma) / snr


def step_loss(unet, text_encoder, batch: Batch, sched, probes, words: Words, args):
    """(denoising loss, total loss, caption loss terms by log name) of one training step on `batch`.

    No value is read back from the device here (see `masked_mean`): on a GPU the step's kernels queue up
    without the CPU waiting for them.
    """
    xt = sched.add_noise(batch.x0, batch.noise, batch.t)
    cond = text_encoder(batch.tok).last_hidden_state  # [b, 77, d]
    pred = unet(xt, batch.t, encoder_hidden_states=cond).sample
    alphas = sched.alphas_cumprod.to(xt.device)[batch.t]
    w = loss_weights(alphas / (1 - alphas), args.snr_floor)  # [b]
    err = (pred - batch.noise).pow(2).mean(1)  # [b, h, w]
    if args.object_weight:
        # Objects (and a latent pixel around them, where their outline is) weigh 1 + object_weight
        # times the background, which fills ~90 % of a scene: the shape is in those pixels.
        near = F.max_pool2d(batch.masks.amax(1, keepdim=True), 3, stride=1, padding=1)[:, 0]  # [b, h, w]
        pix = 1 + args.object_weight * near
        err = err * pix / pix.mean((1, 2), keepdim=True)
    loss_mse = (w * err.mean((1, 2))).mean()
    loss, terms = add_caption_losses(
        loss_mse, args, text_encoder, probes, cond, batch.tok, batch.own, batch.detach, batch.masks, words
    )
    return loss_mse, loss, terms


def train_unet(
    unet, text_encoder, tokenizer, latents, ids, owner, detach, masks, args, log, checkpoint=None, resume=None
):
    """Returns EMA copies of (unet, text_encoder).

    Every `args.save_every` steps `checkpoint(step, ema_unet, ema_text, state)` gets EMA copies and the
    training state (weights, EMA, optimiser, step, sampler RNG); `resume`, such a state, continues a run
    exactly where it was saved. `tokenizer` made `ids`; the shape and colour losses find their words with it.
    """
    device = args.device
    unet.to(device), text_encoder.to(device)
    # The data lives on the device; the random draws stay on CPU generators, so a run draws the same
    # batches, noise and timesteps on any device.
    data = tuple(x.to(device) for x in (latents, ids, owner, detach, masks))
    sched = DDIMScheduler(**SD_SCHEDULE)
    empty_ids = ids[:1].clone().to(device)
    empty_ids[:, 1:] = ids[0, -1]  # "" = <|startoftext|> then padding, as the pipeline tokenizes it
    probes = {}
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn2.processor") and (
            args.attn_loss > 0 or args.attn_cover > 0 or args.shape_read > 0 or args.colour_read > 0
        ):
            probes[name] = procs[name] = ProbeProcessor()
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    gen = torch.Generator().manual_seed(args.seed + 1)
    # The redrawn colours have a generator of their own, so the batches are the same with and without it.
    swap_gen = torch.Generator().manual_seed(args.seed + 4)
    words = Words.of(tokenizer, text_encoder.config.hidden_size, args.seed + 3, swap_gen, device)
    start = 0
    if resume is not None:
        unet.load_state_dict(resume["unet"])
        text_encoder.load_state_dict(resume["text_encoder"])
        ema_unet.load_state_dict(resume["ema_unet"])
        ema_text.load_state_dict(resume["ema_text"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        if "swap_generator" in resume:
            swap_gen.set_state(resume["swap_generator"])
        start = resume["step"]
    unet.train(), text_encoder.train()
    bar = tqdm(range(start, args.steps), desc="UNet+text", mininterval=5, initial=start, total=args.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = draw_batch(data, gen, empty_ids, args)
        loss_mse, loss, terms = step_loss(unet, text_encoder, batch, sched, list(probes.values()), words, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 50 == 0 or step == args.steps - 1:
            log(
                {
                    "stage": "unet",
                    "step": step,
                    "loss": round(loss_mse.item(), 5),
                    **{name: round(value.item(), 4) for name, value in terms.items()},
                    "seconds": round(bar.format_dict["elapsed"], 1),
                }
            )
            bar.set_postfix(
                loss=f"{loss_mse.item():.4f}", attn=f"{terms['attn'].item():.3f}", cover=f"{terms['cover'].item():.3f}"
            )
        if checkpoint and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            state = {
                "step": step + 1,
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "swap_generator": swap_gen.get_state(),
            }
            snapshot = copy.deepcopy(ema_unet)
            snapshot.set_attn_processor(AttnProcessor2_0())
            checkpoint(step + 1, snapshot.eval(), copy.deepcopy(ema_text).eval(), state)
    ema_unet.set_attn_processor(AttnProcessor2_0())
    return ema_unet.eval(), ema_text.eval()


def preview_factors(vae, n: int = 256, seed: int = 0) -> list:
    """The latent → RGB map the app's fast previews use, fitted on shapes-world scenes (see sdviz.preview)."""
    images = (to_tensor(np.stack([s.image for s in world.sample_scenes(n, seed=seed)])) + 1) / 2  # [0, 1]
    return fit_latent_rgb(vae, images).tolist()


def save(out: Path, vae, text_encoder, tokenizer, unet) -> None:
    pipe = StableDiffusionPipeline(
        vae=vae.cpu().half(),
        text_encoder=text_encoder.cpu().half(),
        tokenizer=tokenizer,
        unet=unet.cpu().half(),
        scheduler=DDIMScheduler(**SD_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # Weights stay fp16 on disk, but transformers would load them as fp16 while diffusers loads the
    # UNet in fp32: ask for fp32 so a plain `from_pretrained(folder)` runs without a dtype mismatch.
    config_path = out / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _add_caption_loss_options(p) -> None:
    """The options of the losses on what the caption's words do (`add_caption_losses`), as one group."""
    g = p.add_argument_group(
        "losses on the caption's words", "added to the noise-prediction loss (the model card has their ablations)"
    )
    g.add_argument(
        "--attn-loss",
        type=float,
        default=1.0,
        help="weight of the loss pulling object words' cross-attention into their masks (0: off)",
    )
    g.add_argument(
        "--attn-cover",
        type=float,
        default=1.0,
        help="weight of the loss making each object word's map (divided by its peak) fill its mask (0: off)",
    )
    g.add_argument(
        "--snr-floor",
        type=float,
        default=0.0,
        help="least weight of the x0 error at any noise level (see loss_weights; 0: min-SNR-5, the shipped model's "
        "until this option; the model card measures how little the caption weighs at high noise without it)",
    )
    g.add_argument(
        "--object-weight",
        type=float,
        default=0.0,
        help="extra weight of the noise-prediction loss on object pixels and their outline (0: uniform)",
    )
    g.add_argument(
        "--shape-loss",
        type=float,
        default=0.0,
        help="weight of a loss that makes the text encoder's output at a shape word tell which shape it names "
        "(0: off; the model card: without it circle, square and triangle got almost the same vector)",
    )
    g.add_argument(
        "--shape-read",
        type=float,
        default=0.0,
        help="weight of a loss making each object's pixels give its shape word at least --shape-read-target of "
        "their cross-attention, trained in the UNet only (0: off; the model card: shape words get 1.4 %% of the "
        "shipped model's cross-attention, 0.2 %% after --shape-loss alone)",
    )
    g.add_argument(
        "--shape-read-target",
        type=float,
        default=0.25,
        help="share of an object's cross-attention its shape word should get (default: %(default)s)",
    )
    g.add_argument(
        "--colour-read",
        type=float,
        default=0.0,
        help="weight of the --shape-read loss for colour words (same target): each object's pixels read its "
        "colour word, whose vector (the text encoder is causal) does not depend on the shape after it (0: off)",
    )
    g.add_argument(
        "--shape-invariance",
        type=float,
        default=0.0,
        help="weight of a loss making the text encoder's output at a shape word the same whatever colour comes "
        "before it (0: off; the model card: in the shipped model that vector is mostly the colour's)",
    )
    g.add_argument(
        "--attn-words",
        nargs="+",
        choices=tuple(LOSS_WORDS),
        default=("colour", "shape", "size", "position"),
        help="kinds of words the attention losses pull into their target: their object's mask, for position "
        "words see --position-target (default: %(default)s)",
    )
    g.add_argument(
        "--position-target",
        choices=("region", "object"),
        default="region",
        help="what a position word's map is pulled to: the half of the image it names, or its object's mask "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--attn-detach-text",
        nargs="*",
        choices=tuple(LOSS_WORDS),
        default=("shape", "position"),
        metavar="KIND",
        help="kinds of words whose attention losses train the UNet only, not the text encoder (default: "
        "%(default)s; the model card: through the text encoder they made it drop the shape words; give "
        "none for the previous model's recipe)",
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m sdviz.toy.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for the diffusers pipeline (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and sampling")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the VAE, text encoder and UNet train, e.g. cuda (default: %(default)s; the batches are drawn "
        "the same on any device, the arithmetic differs in the last bits)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny data and a few steps of each stage: checks the code end to end"
    )
    p.add_argument("--size", type=int, default=64, help="image side in pixels (latents: size/4 with the default VAE)")
    p.add_argument("--scenes", type=int, default=20000, help="training scenes rendered (and encoded once)")
    p.add_argument("--vae-steps", type=int, default=1900, help="VAE optimisation steps")
    p.add_argument("--vae-batch", type=int, default=32, help="VAE crops per batch")
    p.add_argument("--vae-crop", type=int, default=32, help="side of the random crops the VAE trains on")
    p.add_argument(
        "--vae-full-steps",
        type=int,
        default=400,
        help="the last VAE steps train on whole images (same batch size as the crops)",
    )
    p.add_argument(
        "--vae-channels",
        type=int,
        nargs="+",
        default=(16, 32, 64),
        help="VAE block widths; each block after the first halves the image: the default three give 4×16×16 "
        "latents for 64×64 images, two give 4×32×32 (f = 2)",
    )
    p.add_argument("--vae-lr", type=float, default=2e-3, help="VAE peak learning rate (AdamW)")
    p.add_argument("--vae-kl", type=float, default=1e-6, help="KL weight of the VAE loss")
    p.add_argument(
        "--vae-from", type=Path, default=None, help="reuse the VAE of this pipeline folder, skipping stage 1"
    )
    p.add_argument(
        "--unet-from",
        type=Path,
        default=None,
        help="start the text encoder and UNet from this pipeline folder instead of from scratch",
    )
    p.add_argument("--steps", type=int, default=4000, help="UNet + text encoder steps")
    p.add_argument("--batch", type=int, default=32, help="latents per UNet batch")
    p.add_argument("--lr", type=float, default=1e-3, help="UNet + text encoder peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps, then cosine to 10 %%")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions (for guidance)")
    _add_caption_loss_options(p)
    p.add_argument(
        "--save-every",
        type=int,
        default=1000,
        help="every N UNet steps save the EMA pipeline to OUT/checkpoints/step-N and the training state "
        "to OUT/checkpoints/state.pt (0: only the final pipeline, no resuming)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from OUT/checkpoints (same options): its VAE once stage 1 finished, "
        "its last training state in stage 2",
    )
    p.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=(32, 64, 128),
        help="UNet block widths, one level (halving the grid) each",
    )
    p.add_argument("--layers-per-block", type=int, default=1, help="UNet ResNet+attention layers per down block")
    p.add_argument("--text-dim", type=int, default=64, help="text encoder width = cross-attention width")
    p.add_argument("--text-layers", type=int, default=2, help="text encoder transformer layers")
    p.add_argument(
        "--counts",
        type=float,
        nargs=3,
        default=world.EVALUATION_MIX.counts,
        help="relative weights of 1-, 2- and 3-object training captions (default: %(default)s)",
    )
    p.add_argument(
        "--p-position",
        type=float,
        default=0.8,
        help="how often a training object names its position (default: %(default)s; the held-out captions of the "
        f"evaluation: {world.EVALUATION_MIX.p_position})",
    )
    p.add_argument(
        "--sizes",
        type=float,
        nargs=3,
        default=None,
        metavar=("NONE", "SMALL", "LARGE"),
        help="relative weights of a training object having no size word, 'small' or 'large' (default: equal, "
        "drawn as the shipped model's data was; the model card's size probe trains on one size only)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.scenes, args.vae_steps, args.vae_full_steps, args.steps, args.vae_batch, args.batch = 64, 3, 1, 3, 4, 4
        args.channels, args.warmup = (16, 32), 2
    args.channels, args.counts, args.vae_channels = tuple(args.channels), tuple(args.counts), tuple(args.vae_channels)
    args.sizes = None if args.sizes is None else tuple(args.sizes)
    args.attn_words, args.attn_detach_text = tuple(args.attn_words), tuple(args.attn_detach_text)
    return args


# What may differ between a run and its resumption: options that do not change what is trained, and the
# latent scaling, which is measured (again) after the options are checked.
NOT_COMPARED = {"out", "threads", "device", "resume", "scaling"}


def _jsonable(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}


def _load_checkpoint(path: Path, args):
    """The saved dict at `path` (None if absent), after checking it was saved by a run with the same options."""
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=False, map_location="cpu")
    ours = _jsonable(args)
    changed = {k: (v, ours.get(k)) for k, v in saved["args"].items() if k not in NOT_COMPARED and ours.get(k) != v}
    if changed:
        listed = ", ".join(f"--{k.replace('_', '-')} {a} (now {b})" for k, (a, b) in changed.items())
        raise SystemExit(f"--resume: {path} was saved by a run with {listed}; resume with the options it started with")
    return saved


def _save_atomically(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a run killed while saving leaves the previous file whole


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt_dir = args.out / "checkpoints"
    vae_ckpt = _load_checkpoint(ckpt_dir / "vae.pt", args) if args.resume else None
    state = _load_checkpoint(ckpt_dir / "state.pt", args) if args.resume else None
    if args.resume and vae_ckpt is None:
        print(f"--resume: no {ckpt_dir / 'vae.pt'} yet, starting from scratch")
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.jsonl"
    kept = []  # on resume, the log up to the saved step (later lines are trained again)
    if vae_ckpt is not None and log_path.exists():
        upto = state["step"] if state else 0
        kept = [
            line
            for line in log_path.read_text().splitlines()
            if (r := json.loads(line)).get("stage") == "vae" or r.get("stage") == "unet" and r["step"] < upto
        ]
    log_file = log_path.open("w")
    log_file.writelines(line + "\n" for line in kept)

    def log(record):
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    # 1. Data: the scenes (the same for the same seed and mix) and their pixels.
    start = time.time()
    elapsed_before = state["elapsed"] if state else vae_ckpt["elapsed"] if vae_ckpt else 0.0
    torch.manual_seed(args.seed)
    mix = world.Mix(args.counts, args.p_position, args.sizes)
    scenes = world.sample_scenes(args.scenes, seed=args.seed, size=args.size, mix=mix)
    images = to_tensor(np.stack([s.image for s in scenes]))  # [N, 3, H, W]

    # 2. Stage 1: the VAE (trained, reused from another pipeline, or restored from this run's checkpoint).
    if vae_ckpt is not None:
        vae = build_vae(args.size, args.vae_channels)
        vae.load_state_dict(vae_ckpt["vae"])
        vae.eval()
        vae_time = vae_ckpt["vae_seconds"]
    else:
        if args.vae_from:
            vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").float().eval()
        else:
            vae = build_vae(args.size, args.vae_channels)
            train_vae(vae, images, args, log)
        vae_time = time.time() - start
        if args.save_every:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            # The fp32 weights (the pipeline folder holds fp16): a resumed run encodes the same latents.
            _save_atomically(
                {"args": _jsonable(args), "vae": vae.state_dict(), "vae_seconds": vae_time, "elapsed": vae_time},
                ckpt_dir / "vae.pt",
            )

    # 3. Encode every scene once; scale latents to unit variance for the diffusion schedule (SD's 0.18215).
    latents = encode_all(vae, images, device=args.device)  # [N, 4, size/4, size/4]
    args.scaling = float(1 / latents.std())
    # The preview factors go in the VAE's config, where sdviz.preview looks first; the VAE is final here,
    # so they are fitted once for the final pipeline and every checkpoint.
    vae.register_to_config(scaling_factor=args.scaling, **{PREVIEW_KEY: preview_factors(vae)})

    # 4. Stage 2: text encoder and UNet, from scratch (seeded here, so a resumed run builds the same ones),
    # from another pipeline, or continued from this run's training state.
    tokenizer = world_tokenizer()
    torch.manual_seed(args.seed + 2)
    if args.unet_from:  # continue training (warm restart of the LR schedule, fresh optimiser)
        text_encoder = CLIPTextModel.from_pretrained(args.unet_from / "text_encoder", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(args.unet_from, subfolder="unet").float()
    else:
        text_encoder = build_text_encoder(tokenizer, args.text_dim, args.text_layers)
        unet = build_unet(latents.shape[-1], args.channels, args.text_dim, args.layers_per_block)
    ids, owner, detach, masks = token_targets(
        scenes, tokenizer, latents.shape[-1], args.attn_words, args.attn_detach_text, args.position_target
    )

    def checkpoint(step, unet_copy, text_copy, train_state):
        save(ckpt_dir / f"step-{step}", copy.deepcopy(vae), text_copy, tokenizer, unet_copy)
        elapsed = elapsed_before + time.time() - start
        _save_atomically(
            {**train_state, "args": _jsonable(args), "elapsed": elapsed, "vae_seconds": vae_time},
            ckpt_dir / "state.pt",
        )

    if state is not None:
        print(f"resuming {args.out} at UNet step {state['step']} of {args.steps}")
    unet, text_encoder = train_unet(
        unet, text_encoder, tokenizer, latents, ids, owner, detach, masks, args, log, checkpoint, state
    )

    # 5. Save the EMA weights as a diffusers pipeline, with the options and times.
    save(args.out, vae, text_encoder, tokenizer, unet)
    elapsed = elapsed_before + time.time() - start
    summary = {"args": _jsonable(args), "vae_seconds": round(vae_time), "total_seconds": round(elapsed)}
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    log(summary)
    print(f"saved {args.out} in {summary['total_seconds']} s")


if __name__ == "__main__":
    main()
