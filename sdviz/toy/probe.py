"""Probes of why a toy model does or doesn't follow a kind of word (the model card's "why" section).

    python -m sdviz.toy.probe [--model sdviz/toy/model]

Prints, per word kind (colour, shape, size, position): how far apart the text encoder puts the words of
that kind (input embeddings, and the caption's token vectors when only that word changes), how much of
the colour before it a shape word's vector carries, and the share
of cross-attention the words get in traced generations; then how much absolute position (the x
coordinate) a linear read-out recovers from the features each cross-attention layer's queries come from,
on noised held-out scenes: a UNet that can't tell left from right in its own features can't follow
"on the left". Takes about a minute on one thread.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

import sdviz
from sdviz.toy import world
from sdviz.toy.evaluate import load_model

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
    scenes = world.sample_scenes(n_scenes, seed=4321, heldout=True)
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor  # [N, 4, h, w]
    ids = pipe.tokenizer(
        [s.caption for s in scenes], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_model(args.model)
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
        from sdviz.toy.train import build_unet

        torch.manual_seed(0)
        unet = build_unet(pipe.unet.config.sample_size, tuple(args.fresh_unet), pipe.text_encoder.config.hidden_size)
        print(f"the same, freshly initialised UNet with widths {tuple(args.fresh_unet)}:")
        for t, row in position_sense(pipe, unet=unet).items():
            print(f"  t={t}: " + ", ".join(f"{name} {r2:.2f}" for name, r2 in row.items()))


if __name__ == "__main__":
    main()
