"""Probes of why a toy model does or doesn't follow a kind of word (the model card's "why" section).

    python -m sdviz.toy.probe [--model sdviz/toy/model]

Prints, per word kind (colour, shape, size, position): how far apart the text encoder puts the words of
that kind (input embeddings, and the caption's token vectors when only that word changes), how much of
the colour before it a shape word's vector carries, and the share
of cross-attention the words get in traced generations; then how much absolute position (the x
coordinate) a linear read-out recovers from the features each cross-attention layer's queries come from,
on noised held-out scenes: a UNet that can't tell left from right in its own features can't follow
"on the left". Takes about a minute on one thread. With --signal it also measures where the training signal
that teaches the model to listen is, per noise level and per loss term (the model card's "where the
training signal is").
"""

from __future__ import annotations

import argparse
import copy
import random
from typing import NamedTuple

import numpy as np
import torch

import sdviz
from sdviz.toy import evaluate, train, world

KINDS = {
    "colour": tuple(world.COLOURS),
    "shape": world.SHAPES,
    "size": tuple(world.SIZES),
    "position": tuple(p.split()[-1] for p in world.POSITIONS),
}


@torch.no_grad()
def text_separation(pipe, n: int = 40, seed: int = 0) -> dict:
    """Per kind: the mean distance between that kind's input embeddings, and the mean change of the token
    vectors (last hidden state, [77, d]) at the changed word and at the padding when a caption's word of
    that kind is swapped for another of its kind. The token vectors' norm is given for scale."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    table = encoder.get_input_embeddings().weight  # [vocab, d]
    rng = random.Random(seed)
    out = {}
    for kind, words in KINDS.items():
        ids = [tokenizer(w).input_ids[1] for w in words]
        emb = table[ids].float()  # [k, d]
        pairs = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))]
        at_word, at_pad, norms = [], [], []
        for _ in range(n):
            obj = world.Obj(rng.choice(tuple(world.COLOURS)), rng.choice(world.SHAPES), rng.choice(tuple(world.SIZES)))
            obj = world.Obj(obj.colour, obj.shape, obj.size, rng.choice(world.POSITIONS))
            caption = obj.phrase()
            present = [w for w in caption.split() if w in words][0]
            other = rng.choice([w for w in words if w != present])
            swapped = caption.replace(present, other)
            batch = tokenizer([caption, swapped], padding="max_length", max_length=77, return_tensors="pt").input_ids
            h = encoder(batch).last_hidden_state.float()  # [2, 77, d]
            k = caption.split().index(present) + 1  # +1: <|startoftext|>
            last = len(caption.split()) + 1  # <|endoftext|>
            at_word.append((h[0, k] - h[1, k]).norm().item())
            at_pad.append((h[0, last + 1 :] - h[1, last + 1 :]).norm(dim=-1).mean().item())
            norms.append(h[0, 1:last].norm(dim=-1).mean().item())
        out[kind] = {
            "embedding_distance": float(np.mean([(emb[i] - emb[j]).norm().item() for i, j in pairs])),
            "change_at_word": float(np.mean(at_word)),
            "change_at_padding": float(np.mean(at_pad)),
            "token_norm": float(np.mean(norms)),
        }
    return out


@torch.no_grad()
def shape_word_contents(pipe) -> dict:
    """What the text encoder's vector at the shape word of "a <colour> <shape>" carries: its mean change
    when the colour before it is swapped ("colour") and when the shape itself is ("shape"), over every
    pair. The encoder is causal, so the shape word is where colour and shape first meet."""
    words = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    batch = pipe.tokenizer(
        [f"a {c} {s}" for c, s in words], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    h = dict(zip(words, pipe.text_encoder(batch).last_hidden_state[:, 3].float()))  # 3: after <|startoftext|> a

    def mean_change(pairs):
        return float(np.mean([(h[a] - h[b]).norm().item() for a, b in pairs]))

    return {
        "colour": mean_change(
            [((a, s), (b, s)) for s in world.SHAPES for a in world.COLOURS for b in world.COLOURS if a < b]
        ),
        "shape": mean_change(
            [((c, a), (c, b)) for c in world.COLOURS for a in world.SHAPES for b in world.SHAPES if a < b]
        ),
    }


def attention_shares(pipe, captions, seed: int = 0) -> dict:
    """The mean share of cross-attention (all layers and steps, pixels averaged) each word kind gets, and
    what the start token and the padding after the caption get. Needs a trace of all 77 tokens' maps."""
    totals = {kind: [] for kind in (*KINDS, "start", "padding")}
    for caption in captions:
        with sdviz.trace(pipe) as tracer:
            pipe(
                caption,
                num_inference_steps=20,
                guidance_scale=5.0,
                height=64,
                width=64,
                generator=torch.Generator().manual_seed(seed),
            )
        run = tracer.result
        maps = run.layer_maps()  # [(layer, [steps, T, h, w])]
        mass = sum(m.mean(dim=(0, 2, 3)) for _, m in maps) / len(maps)  # [T]: the recorded tokens
        words = caption.split()
        totals["start"].append(mass[0].item())
        # The trace keeps the caption's tokens and <|endoftext|>; everything else went to the padding.
        totals["padding"].append(1 - mass.sum().item())
        for kind, members in KINDS.items():
            idx = [i + 1 for i, w in enumerate(words) if w in members]
            totals[kind].append(mass[idx].sum().item() if idx else np.nan)
    return {kind: float(np.nanmean(v)) for kind, v in totals.items()}


def _ridge_r2(feats: torch.Tensor, n_train: int) -> float:
    """Held-out R² of each pixel's x coordinate (0–1) from its feature vector. feats [N, C, h, w]."""
    n, c, h, w = feats.shape
    x = feats.permute(0, 2, 3, 1).reshape(n, h * w, c)
    target = (torch.arange(w, dtype=torch.float32) / (w - 1)).repeat(h)[None].expand(n, -1)  # [N, h·w]

    def design(rows):
        return torch.cat([rows.reshape(-1, c), torch.ones(rows.shape[0] * rows.shape[1], 1)], 1)

    a, b = design(x[:n_train]), target[:n_train].reshape(-1)
    weights = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(c + 1), a.T @ b)
    pred, truth = design(x[n_train:]) @ weights, target[n_train:].reshape(-1)
    return 1 - ((pred - truth) ** 2).mean().item() / truth.var().item()


def _short(layer: str) -> str:
    """down_blocks.1.attentions.0.transformer_blocks.0.attn2 → down1.0; mid_block… → mid."""
    parts = layer.split(".")
    if parts[0] == "mid_block":
        return "mid"
    return f"{parts[0].split('_')[0]}{parts[1]}.{parts[3]}"


@torch.no_grad()
def position_sense(pipe, unet=None, n_scenes: int = 64, timesteps=(950, 500)) -> dict:
    """Per timestep, per cross-attention layer (in forward order, named by block and grid): R² of a ridge
    read-out of the x coordinate from the layer's input features, fitted on half the noised held-out
    scenes, scored on the other half. `unet` (default the pipeline's) may be any UNet for the same latents."""
    unet = unet or pipe.unet
    z, ids = _scene_latents(pipe, world.sample_scenes(n_scenes, seed=4321, heldout=True))
    cond = pipe.text_encoder(ids).last_hidden_state  # [N, 77, d]
    feats = {}

    def keep(name):
        def hook(module, args, kwargs):
            feats[name] = kwargs.get("hidden_states", args[0] if args else None)  # [N, h·w, C]

        return hook

    layers = [(name, m) for name, m in unet.named_modules() if name.endswith("attn2")]
    handles = [m.register_forward_pre_hook(keep(name), with_kwargs=True) for name, m in layers]
    out = {}
    try:
        for t in timesteps:
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
            zt = pipe.scheduler.add_noise(z, noise, torch.tensor([t]))
            unet(zt, t, encoder_hidden_states=cond.to(unet.dtype))
            row = {}
            for name, _ in layers:
                f = feats[name].float()
                side = int(round(f.shape[1] ** 0.5))
                row[f"{_short(name)} {side}×{side}"] = _ridge_r2(
                    f.transpose(1, 2).reshape(f.shape[0], -1, side, side), n_scenes // 2
                )
            out[t] = row
    finally:
        for handle in handles:
            handle.remove()
    return out


def _scene_latents(pipe, scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents [N, 4, h, w] (the VAE's mean) and token ids [N, 77] of `scenes`."""
    z = train.encode_all(pipe.vae, train.to_tensor(np.stack([s.image for s in scenes])))
    ids = pipe.tokenizer(
        [s.caption for s in scenes], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    return z * pipe.vae.config.scaling_factor, ids


@torch.no_grad()
def caption_gain(pipe, timesteps=(20, 100, 200, 300, 400, 500, 600, 700, 800, 900, 980), n_scenes: int = 64) -> dict:
    """How much the right caption lowers the denoising loss at each noise level, the training signal that
    teaches the model to listen. Per timestep t: the ε-prediction MSE on noised training scenes with their
    own captions (`right`) and with another scene's caption (the batch rolled by one; `gap` = wrong − right),
    the gap as min-SNR-5 training weighs it (`weighted`), and in x0 terms (gap / SNR: how much closer
    the caption brings the predicted clean latents). One noise draw per t, seeded."""
    unet, encoder = pipe.unet, pipe.text_encoder
    z, ids = _scene_latents(pipe, world.sample_scenes(n_scenes, seed=5))
    right = encoder(ids).last_hidden_state.to(unet.dtype)
    wrong = right.roll(1, 0)
    alphas = pipe.scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in timesteps:
        noise = torch.randn(z.shape, generator=gen)
        tt = torch.full((len(z),), t)
        zt = pipe.scheduler.add_noise(z, noise, tt).to(unet.dtype)
        mse = [
            (unet(zt, tt, encoder_hidden_states=c).sample.float() - noise).pow(2).mean().item() for c in (right, wrong)
        ]
        snr = alphas[t] / (1 - alphas[t])
        gap = mse[1] - mse[0]
        weighted = gap * train.loss_weights(snr).item()
        out[t] = {"snr": snr.item(), "right": mse[0], "gap": gap, "weighted": weighted, "x0": gap / snr.item()}
    return out


@torch.no_grad()
def word_visibility(pipe, n: int = 48, seed: int = 0) -> dict:
    """Up to which noise level x_t itself still shows a word, so that a model can copy it from the image
    instead of reading the caption. Per kind: the median distance ‖Δz‖ between the scaled latents of two
    one-object scenes that differ only in a word of that kind (same place, same size, except for the size
    and position words themselves), and the last timestep where √SNR·‖Δz‖ ≥ 1 (the two noised latents
    are still about one noise standard deviation apart), with min-SNR-5's x0 weight there."""
    rng = random.Random(seed)
    pairs = {"colour": [], "shape": [], "size": [], "position": []}
    for k in range(n):
        c, s, size = rng.choice(tuple(world.COLOURS)), rng.choice(world.SHAPES), rng.choice(tuple(world.SIZES))
        c2 = rng.choice([x for x in world.COLOURS if x != c])
        s2 = rng.choice([x for x in world.SHAPES if x != s])
        pairs["colour"].append((k, world.Obj(c, s, size), world.Obj(c2, s, size)))
        pairs["shape"].append((k, world.Obj(c, s, size), world.Obj(c, s2, size)))
        pairs["size"].append((k, world.Obj(c, s, "small"), world.Obj(c, s, "large")))
        pairs["position"].append((k, world.Obj(c, s, size, "on the left"), world.Obj(c, s, size, "on the right")))
    alphas = pipe.scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    x0_weights = train.loss_weights(snr) * snr  # what training weighs an x0 error by
    out = {}
    for kind, rows in pairs.items():
        # The same seed for both scenes of a pair: the same place wherever the words allow it.
        scenes = [world.render([o], random.Random(k)) for k, a, b in rows for o in (a, b)]
        z, _ = _scene_latents(pipe, scenes)
        dist = float((z[0::2] - z[1::2]).flatten(1).norm(dim=1).median())
        last = int((snr * dist**2 >= 1).nonzero().max())
        out[kind] = {
            "distance": dist,
            "last_t": last,
            "snr": snr[last].item(),
            "x0_weight": x0_weights[last].item(),
        }
    return out


class SwapCase(NamedTuple):
    """A one-object scene (`image`, uint8 [64, 64, 3], of `old`) and, per word kind, the object with one
    word of that kind swapped."""

    image: np.ndarray
    old: world.Obj
    swapped: dict


def swap_cases(n: int, seed: int = 0) -> list[SwapCase]:
    """`n` one-object scenes, large, on the left or right, any colour and shape (seeded), each with its
    colour, shape and position swapped for another of the kind."""
    rng = random.Random(seed)
    cases = []
    for k in range(n):
        c, s = rng.choice(tuple(world.COLOURS)), rng.choice(world.SHAPES)
        old = world.Obj(c, s, "large", rng.choice(("on the left", "on the right")))
        other = "on the right" if old.position == "on the left" else "on the left"
        swapped = {
            "colour": world.Obj(rng.choice([x for x in world.COLOURS if x != c]), s, "large", old.position),
            "shape": world.Obj(c, rng.choice([x for x in world.SHAPES if x != s]), "large", old.position),
            "position": world.Obj(c, s, "large", other),
        }
        cases.append(SwapCase(world.render([old], random.Random(k)).image, old, swapped))
    return cases


class Redrawer:
    """img2img on a text-to-image pipeline's own modules (`StableDiffusionImg2ImgPipeline`, with a scheduler
    of its own so the pipeline's is left as it was): `redrawer(image, caption, strength, seed)` noises
    `image` to `strength` (1.0: t = 951 with 20 DDIM steps) and denoises it with `caption` (20 steps
    scaled by the strength, guidance 5)."""

    def __init__(self, pipe):
        from diffusers import StableDiffusionImg2ImgPipeline

        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.pipe = StableDiffusionImg2ImgPipeline(
            **{**pipe.components, "scheduler": scheduler}, requires_safety_checker=False
        )
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, image: np.ndarray, caption: str, strength: float, seed: int) -> np.ndarray:
        from PIL import Image

        drawn = self.pipe(
            caption,
            image=Image.fromarray(image),
            strength=strength,
            num_inference_steps=20,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        return np.asarray(drawn)


def follows(image: np.ndarray, obj: world.Obj, kind: str, instead: world.Obj) -> bool:
    """Whether `image` shows `obj` as far as `kind` goes: for a colour, its colour and not that of
    `instead`; for a shape or position, its colour with the right shape or place (`evaluate`'s checks)."""
    found, (row,) = evaluate.score_objects(image, [obj])
    if kind == "colour":
        return obj.colour in found and instead.colour not in found
    return obj.colour in found and bool(row[kind])


def caption_override(
    pipe, strengths=(0.3, 0.5, 0.7, 0.85, 1.0), n: int = 16, seed: int = 0, kinds=("colour", "shape", "position")
) -> dict:
    """From which noise level the caption wins over the image, per word kind (colour, shape, position).

    Each of `n` one-object scenes (`swap_cases`) is noised to a strength and redrawn (`Redrawer`) with its
    caption with one word of the kind swapped. Per kind and strength: the share of images where the object
    follows the new word and where it keeps the scene's old one (`follows`). A model that reads a word draws
    the new one once the noise has hidden the old; one that copies it from x_t keeps the old."""
    redraw, cases = Redrawer(pipe), swap_cases(n, seed)
    out = {}
    for kind in kinds:
        for strength in strengths:
            new_hits, old_hits = [], []
            for k, case in enumerate(cases):
                new = case.swapped[kind]
                drawn = redraw(case.image, new.phrase(), strength, seed + k)
                new_hits.append(follows(drawn, new, kind, case.old))
                old_hits.append(follows(drawn, case.old, kind, new))
            out.setdefault(kind, {})[strength] = {"new": float(np.mean(new_hits)), "old": float(np.mean(old_hits))}
    return out


def loss_gradients(pipe, n_batches: int = 4, seed: int = 0, models=None, **options) -> dict:
    """Per term of the training loss (`mse`: the min-SNR-weighted denoising loss; `attn`, `cover`: the
    attention losses; `total`: all of them weighted as in training), its value and the norm of its gradient
    on the UNet's and on the text encoder's parameters, the mean over `n_batches` training batches of the
    shipped recipe (`options`: `train` options to change it, e.g. snr_floor=1). `models`: a (UNet, text
    encoder) pair to measure instead of the pipeline's, e.g. freshly initialised ones. Works on float32
    copies: the pipeline is left as it was."""
    from diffusers import DDIMScheduler

    args = train.parse_args([])
    vars(args).update(options)
    unet, encoder = models or (pipe.unet, pipe.text_encoder)
    unet = copy.deepcopy(unet).float().requires_grad_(True)
    encoder = copy.deepcopy(encoder).float().requires_grad_(True)
    scenes = world.sample_scenes(256, seed=seed, mix=world.Mix(args.counts, args.p_position, args.sizes))
    z, _ = _scene_latents(pipe, scenes)
    args.scaling = 1.0  # `z` is already scaled
    ids, owner, detach, masks = train.token_targets(
        scenes, pipe.tokenizer, z.shape[-1], args.attn_words, args.attn_detach_text, args.position_target
    )
    procs = {
        name: train.ProbeProcessor() if name.endswith("attn2.processor") else proc
        for name, proc in unet.attn_processors.items()
    }
    probes = [proc for proc in procs.values() if isinstance(proc, train.ProbeProcessor)]
    unet.set_attn_processor(procs)
    gen, swap = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 4)
    words = train.Words.of(pipe.tokenizer, encoder.config.hidden_size, seed + 3, swap)
    empty = ids[:1].clone()
    empty[:, 1:] = ids[0, -1]
    sched = DDIMScheduler(**train.SD_SCHEDULE)
    parts = {"unet": list(unet.parameters()), "text": list(encoder.parameters())}
    rows = {}
    for _ in range(n_batches):
        batch = train.draw_batch((z, ids, owner, detach, masks), gen, empty, args)
        mse, total, terms = train.step_loss(unet, encoder, batch, sched, probes, words, args)
        for name, value in {"mse": mse, **terms, "total": total}.items():
            row = [value.item()]
            for params in parts.values():
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                row.append(
                    torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)).item()
                    if value.requires_grad
                    else 0.0
                )
            rows.setdefault(name, []).append(row)
    return {name: dict(zip(("value", "unet", "text"), np.mean(r, axis=0).tolist())) for name, r in rows.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sdviz.toy.probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped toy model)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--fresh-unet",
        type=int,
        nargs="+",
        metavar="WIDTH",
        default=None,
        help="also read position out of a freshly initialised UNet with these block widths (seed 0): what the "
        "architecture gives before training",
    )
    p.add_argument(
        "--signal",
        action="store_true",
        help="also measure where the training signal is (a quarter of an hour on one busy thread): up to which noise "
        "level each word kind is still visible in x_t, how much the right caption lowers the denoising loss per "
        "noise level, from which noise level a swapped word wins over the image, and each loss term's gradient "
        "on the UNet and the text encoder",
    )
    p.add_argument(
        "--at-init",
        action="store_true",
        help="with --signal: also the gradients of a freshly initialised UNet and text encoder",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = evaluate.load_model(args.model)
    pipe.set_progress_bar_config(disable=True)
    print("text encoder: distance between input embeddings / change of the token vector at the swapped word /")
    print("mean change at the padding, when one word of the kind is swapped (token vectors' norm for scale)")
    for kind, r in text_separation(pipe).items():
        print(
            f"  {kind:8s} {r['embedding_distance']:.2f} / {r['change_at_word']:.2f} / {r['change_at_padding']:.2f}"
            f"   (norm {r['token_norm']:.1f})"
        )
    carried = shape_word_contents(pipe)
    print(
        f'the shape word\'s vector in "a <colour> <shape>": change when the colour before it is swapped '
        f"{carried['colour']:.2f}, when the shape is {carried['shape']:.2f}"
    )
    shares = attention_shares(pipe, world.heldout_captions(8))
    print("share of cross-attention, 8 held-out captions: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    print("absolute position: R² of x read linearly from each cross-attention layer's input, noised held-out scenes")
    for t, row in position_sense(pipe).items():
        print(f"  t={t}: " + ", ".join(f"{name} {r2:.2f}" for name, r2 in row.items()))
    if args.fresh_unet:
        torch.manual_seed(0)
        unet = train.build_unet(
            pipe.unet.config.sample_size, tuple(args.fresh_unet), pipe.text_encoder.config.hidden_size
        )
        print(f"the same, freshly initialised UNet with widths {tuple(args.fresh_unet)}:")
        for t, row in position_sense(pipe, unet=unet).items():
            print(f"  t={t}: " + ", ".join(f"{name} {r2:.2f}" for name, r2 in row.items()))
    if args.signal:
        print_signal(pipe, at_init=args.at_init)


def print_signal(pipe, at_init: bool = False) -> None:
    """The `--signal` figures: `word_visibility`, `caption_gain` and `loss_gradients`, as tables."""
    print("how long x_t itself shows a word (one-object scenes differing in one word of the kind):")
    print(
        "  kind      median |Δz|   last t with √SNR·|Δz| ≥ 1   SNR there   min-SNR-5 x0 weight there (5 at low noise)"
    )
    for kind, r in word_visibility(pipe).items():
        print(f"  {kind:8s} {r['distance']:10.2f}   {r['last_t']:10d}   {r['snr']:18.4f}   {r['x0_weight']:10.4f}")
    print("what the right caption is worth per noise level (ε-MSE with another scene's caption minus with its own):")
    print("     t       SNR   MSE right      gap   min-SNR-5 weighted   in x0 (gap/SNR)")
    for t, r in caption_gain(pipe).items():
        print(f"  {t:4d} {r['snr']:9.4f} {r['right']:11.5f} {r['gap']:8.5f} {r['weighted']:20.5f} {r['x0']:17.4f}")
    print("from which noise level the caption wins: one-object scenes noised (img2img strength) and redrawn with")
    print("one word swapped; share following the new word / keeping the old, 16 scenes")
    for kind, row in caption_override(pipe).items():
        print(f"  {kind:8s} " + "   ".join(f"{s:.2f}: {r['new']:.0%} / {r['old']:.0%}" for s, r in row.items()))
    print("gradient of each loss term, shipped recipe, mean of 4 batches of 32: value / |grad| UNet / |grad| text")
    for name, r in loss_gradients(pipe).items():
        print(f"  {name:8s} {r['value']:.4f} / {r['unet']:.4f} / {r['text']:.4f}")
    if at_init:
        torch.manual_seed(0)
        defaults = train.parse_args([])
        size, dim = pipe.unet.config.sample_size, pipe.text_encoder.config.hidden_size
        models = (
            train.build_unet(size, tuple(defaults.channels), dim, defaults.layers_per_block),
            train.build_text_encoder(pipe.tokenizer, dim, defaults.text_layers),
        )
        print("the same at initialisation (a fresh UNet and text encoder of the shipped recipe's sizes, seed 0):")
        for name, r in loss_gradients(pipe, models=models).items():
            print(f"  {name:8s} {r['value']:.4f} / {r['unet']:.4f} / {r['text']:.4f}")


if __name__ == "__main__":
    main()
