"""The built-in toy model: the shapes world, the shipped weights, evaluation helpers and training."""

import json
import os
import random
import shutil
import tarfile
import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import sdviz  # noqa: E402
from sdviz.toy import evaluate, probe, speed, sweep, train, world  # noqa: E402

MODEL = train.DEFAULT_OUT
# What the shipped model scores on the tests below, less a margin (measured; see each test).
MIN_POSITIONS, MIN_SHAPE_POINTING, MIN_MOVED = 0.75, 0.7, 4


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusionPipeline.from_pretrained(MODEL)
    p.set_progress_bar_config(disable=True)
    return p


# -- the world --------------------------------------------------------------------------------------


def test_world_masks_are_exactly_the_pixels_of_each_object():
    # Edges are anti-aliased: a pixel belongs to an object when it is more object than background.
    bg = np.array(world.BACKGROUND, np.float32)
    for scene in world.sample_scenes(30, seed=5):
        pixels = scene.image.astype(np.float32)
        owned = np.zeros(scene.image.shape[:2], bool)
        for obj, mask in zip(scene.objects, scene.masks):
            colour = np.array(world.COLOURS[obj.colour], np.float32)
            nearer = np.linalg.norm(pixels - colour, axis=-1) < np.linalg.norm(pixels - bg, axis=-1)
            near_obj = np.zeros_like(mask)
            ys, xs = np.nonzero(mask)
            near_obj[max(ys.min() - 3, 0) : ys.max() + 4, max(xs.min() - 3, 0) : xs.max() + 4] = True
            assert mask.sum() > 40
            assert np.array_equal(nearer & near_obj, mask), scene.caption
            assert not (owned & mask).any(), "objects overlap"
            owned |= mask
        assert (pixels[~owned] == bg).all(axis=-1).mean() > 0.95  # the rest is plain background


def test_world_is_deterministic_for_a_seed():
    a, b = world.sample_scenes(5, seed=3), world.sample_scenes(5, seed=3)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [s.caption for s in world.sample_scenes(5, seed=4)] != [s.caption for s in a]


def test_a_mix_can_fix_the_size_word_and_the_default_still_draws_the_shipped_models_data():
    for word, weights in (("large", (0, 0, 1)), ("small", (0, 1, 0))):
        scenes = world.sample_scenes(20, seed=7, mix=world.Mix((1, 1, 1), 0.5, weights))
        for scene in scenes:
            assert all(o.size == word for o in scene.objects), scene.caption
            assert all(evaluate.classify_size(m) == word for m in scene.masks), scene.caption
    unsaid = world.sample_scenes(20, seed=7, mix=world.Mix((1, 1, 1), 0.5, (1, 0, 0)))
    assert all(o.size is None for s in unsaid for o in s.objects)
    # sizes=None draws as before the option existed: these are the first scenes the shipped model trained on.
    shipped = world.sample_scenes(3, seed=0, mix=world.Mix((3, 4, 3), 0.8))
    assert [s.caption for s in shipped] == [
        "a large green circle at the top",
        "a small blue square and a yellow square",
        "a blue circle and a red circle",
    ]


def test_positions_in_captions_are_where_objects_are_drawn():
    for scene in world.sample_scenes(60, seed=6):
        for obj, mask in zip(scene.objects, scene.masks):
            if obj.position:
                assert evaluate.position_ok(mask, obj.position), scene.caption


def test_caption_parse_round_trips_and_rejects_text_outside_the_grammar():
    rng = random.Random(0)
    for _ in range(200):
        objects = world.sample_objects(rng, heldout=None)
        assert world.parse_caption(world.caption_of(objects)) == objects
    assert world.parse_caption("a small blue square on the left and a yellow triangle") == [
        world.Obj("blue", "square", "small", "on the left"),
        world.Obj("yellow", "triangle"),
    ]
    for bad in ("a purple circle", "a red", "red circle", "a red circle in the middle"):
        with pytest.raises(ValueError):
            world.parse_caption(bad)


def test_heldout_captions_never_occur_in_training_scenes():
    train_captions = {s.caption for s in world.sample_scenes(2000, seed=0)}
    held = world.heldout_captions(40)
    assert len(set(held)) == 40 and all(world.is_heldout(world.parse_caption(c)) for c in held)
    assert not train_captions & set(held)
    assert not any(world.is_heldout(world.parse_caption(c)) for c in train_captions)


def test_every_caption_word_is_one_token_of_the_model_tokenizer(pipe):
    caption = "a large yellow circle at the top and a small green triangle on the right and a red square"
    ids = pipe.tokenizer(caption).input_ids
    assert len(ids) == len(caption.split()) + 2  # <|startoftext|> … <|endoftext|>


def test_shape_size_and_position_checks_read_rendered_scenes_right(pipe):
    # The checks the evaluation scores generated images with, on images whose answers are known: the
    # scenes themselves (exact), and their VAE reconstructions, whose soft, eroded edges are what a
    # generated image looks like at best (the fill-of-bounding-box classifier used before read only
    # 93 % of those shapes right; the template classifier reads 99.3 % of 300 scenes' objects).
    scenes = world.sample_scenes(40, seed=7, heldout=None)
    _, reconstructions = evaluate.reconstruct(pipe, scenes)
    exact = evaluate.grammar_ceiling(scenes, [s.image for s in scenes])["scenes"]
    assert exact == {"shape_correct": 1.0, "position_correct": 1.0, "size_correct": 1.0}
    rec = evaluate.grammar_ceiling(scenes, reconstructions)["reconstructed"]
    assert rec["shape_correct"] >= 0.95 and rec["position_correct"] == 1.0 and rec["size_correct"] >= 0.95


def test_position_check_needs_the_outer_part_not_just_the_half():
    mask = np.zeros((64, 64), bool)
    mask[30:36, 26:32] = True  # centroid x = 28.5 / 64 = 0.45: left half, but not the outer 45 %
    assert not evaluate.position_ok(mask, "on the left")
    assert evaluate.position_ok(np.roll(mask, -2, axis=1), "on the left")
    assert not evaluate.position_ok(mask, "on the right") and not evaluate.position_ok(mask, "at the bottom")


def test_one_word_pairs_differ_in_exactly_the_changed_word():
    positions, shapes = evaluate.one_word_pairs(world.heldout_captions(48))
    assert len(shapes) == 48 and len(positions) >= 20
    for a, b, i, old, new in positions + shapes:
        oa, ob = world.parse_caption(a), world.parse_caption(b)
        assert len(oa) == len(ob) and [x for x, y in zip(oa, ob) if x != y] == [oa[i]]
        assert old != new and len(a.split()) == len(b.split())
        assert sum(x != y for x, y in zip(a.split(), b.split())) == 1
    for _, b, i, _, new in positions:
        assert world.parse_caption(b)[i].position == new
        assert len({o.position for o in world.parse_caption(b) if o.position}) == sum(
            o.position is not None for o in world.parse_caption(b)
        )


def test_size_probe_draws_every_pair_once_and_splits_shapes_by_whether_training_saw_the_pair():
    captions = evaluate.size_probe_captions("large")
    objects = [world.parse_caption(c) for c in captions]
    assert len(set(captions)) == 12 and all(len(o) == 1 and o[0].size == "large" and not o[0].position for o in objects)
    assert {(o[0].colour, o[0].shape) for o in objects if world.is_heldout(o)} == set(world.HELDOUT_PAIRS)
    rows = [
        {"caption": "a large red circle", "shapes": [True]},
        {"caption": "a large red square", "shapes": [False]},
        {"caption": "a large blue circle", "shapes": [None]},  # colour missing: not scored
        {"caption": "a large green triangle", "shapes": [True]},
        {"caption": "a large yellow circle", "shapes": [False]},
        {"caption": "a large yellow circle", "shapes": [False]},
    ]
    shares = evaluate.shapes_by_pair(rows)
    assert shares == {"shape_correct_trained_pairs": 0.5, "shape_correct_heldout_pairs": pytest.approx(1 / 3)}


def test_shapes_are_counted_per_named_shape_over_every_object_of_every_image():
    rows = [
        {"caption": "a red circle and a blue square", "shapes": [True, False]},
        {"caption": "a green square on the left", "shapes": [True]},
        {"caption": "a yellow circle", "shapes": [None]},  # colour missing: not scored
        {"caption": "a small blue circle", "shapes": [False]},
    ]
    assert evaluate.shapes_by_name(rows) == {"circle": (1, 2), "square": (1, 2), "triangle": (0, 0)}
    assert evaluate.shapes_line(rows) == "circle 1/2 · square 1/2 · triangle 0/0"


def test_score_map_hits_and_overlaps_only_where_the_map_is():
    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:44] = True
    assert evaluate.score_map(mask.astype(np.float32), mask) == (True, 1.0, 1.0)
    shifted = np.roll(mask, 5, axis=0)  # half the rows overlap: IoU = 5·14 / (15·14)
    hit, iou, area = evaluate.score_map(shifted.astype(np.float32), mask)
    assert hit and iou == pytest.approx(5 / 15) and area == 1.0
    elsewhere = np.roll(mask, 30, axis=1).astype(np.float32)
    assert evaluate.score_map(elsewhere, mask) == (False, 0.0, 1.0)
    peak = np.zeros((64, 64), np.float32)
    peak[10:20, 30:44], peak[14, 36] = 0.1, 1.0  # one hot pixel: the map > 0.5 is 1 of the 140 pixels
    assert evaluate.score_map(peak, mask) == (True, pytest.approx(1 / 140), pytest.approx(1 / 140))


def test_a_perfect_map_at_the_models_attention_grids_can_reach_the_targets(pipe):
    # The mask itself, pooled to 16×16, 8×8 and 4×4 like the attention layers, is the best any map can do:
    # it must clear the targets, or they could not be met by any training.
    ceiling = evaluate.ideal_map_ceiling(pipe, world.sample_scenes(20, seed=99, heldout=True))
    assert sorted(set(ceiling["grids"])) == [4, 8, 16] and len(ceiling["grids"]) == 10
    assert ceiling["pointing"] >= evaluate.TARGETS["pointing_colour"]
    assert evaluate.TARGETS["miou"] <= ceiling["miou"] < 1.0


# -- the shipped model ------------------------------------------------------------------------------


def test_shipped_model_is_a_small_fp16_diffusers_folder_that_loads_offline(pipe):
    files = list(MODEL.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    assert sum(f.stat().st_size for f in files) < 20e6
    assert pipe.safety_checker is None and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32  # fp16 on disk, runs in fp32


def test_load_pipeline_toy_gives_the_shipped_model(pipe):
    toy = sdviz.load_pipeline("toy")
    assert torch.equal(toy.unet.conv_in.weight.float().cpu(), pipe.unet.conv_in.weight)


@pytest.mark.parametrize("caption", ["a green triangle", "a large yellow circle", "a small yellow circle on the left"])
def test_draws_never_seen_colour_shape_pairs_in_the_asked_colour(pipe, caption):
    assert world.is_heldout(world.parse_caption(caption))
    image = pipe(
        caption,
        num_inference_steps=20,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert evaluate.colours_present(evaluate.segment(np.asarray(image))) == {world.parse_caption(caption)[0].colour}


def test_heldout_captions_of_colours_seen_together_get_every_colour_and_no_other(pipe):
    # Captions pairing red with yellow (never together in training) are left out: the model often merges
    # them (the card says so). The shipped model gives 7 of these 12 exactly their colours (81 % of such
    # captions get every colour on the card's 96 images; the previous model: 12 of 12 and 100 %).
    captions = [
        c
        for c in world.heldout_captions(48)
        if not any(s <= {o.colour for o in world.parse_caption(c)} for s in world.HELDOUT_COLOUR_SETS)
    ][:12]
    exact = 0
    for caption in captions:
        image = pipe(
            caption,
            num_inference_steps=20,
            guidance_scale=5.0,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        exact += evaluate.colours_present(evaluate.segment(np.asarray(image))) == {
            o.colour for o in world.parse_caption(caption)
        }
    assert exact >= 6, f"only {exact} of {len(captions)} images have exactly the asked colours"


def test_word_heatmaps_peak_inside_and_cover_their_objects_on_noised_heldout_scenes(pipe):
    # An object covers ~2–8 % of the image, so chance is below 0.1. The shipped model scores 0.76 / 0.53
    # (colour / shape words' pointing game) and 0.45 mIoU on these 20 scenes (0.85 / 0.74 and 0.52 on the
    # card's 100); the previous model 0.92 / 0.92 and 0.58.
    scores = evaluate.evaluate_noised(pipe, world.sample_scenes(20, seed=99, heldout=True))
    assert scores["words"] >= 80
    assert scores["pointing_colour"] >= 0.7 and scores["pointing_shape"] >= 0.45
    assert scores["miou"] >= 0.4


# Held-out captions drawn by a fixed seed (not picked), generated as the evaluation does: 20 DDIM
# steps, guidance 5, seed 0.
SAMPLED = random.Random(13).sample(world.heldout_captions(48), 10)


@pytest.fixture(scope="module")
def sampled(pipe):
    """For each of SAMPLED: (caption, its objects' scores from evaluate.score_objects, its TraceResult)."""
    out = []
    for caption in SAMPLED:
        image, run = evaluate.generate(pipe, caption, seed=0, guidance=5.0, steps=20, size=64)
        out.append((caption, evaluate.score_objects(image, world.parse_caption(caption))[1], run))
    return out


def test_sampled_heldout_captions_get_their_positions(sampled):
    # Chance is about 0.45 (the named outer 45 % of the image). The model card's figure is on 96 images;
    # MIN_POSITIONS is what these 10 captions scored, less a margin.
    places = [o["position"] for _, objects, _ in sampled for o in objects if o["position"] is not None]
    assert len(places) >= 8
    assert np.mean(places) >= MIN_POSITIONS, f"{sum(places)} of {len(places)} positions right"


@pytest.mark.xfail(
    strict=True,
    reason="the shipped model draws every shape as a rounded blob (shape right 30 %, chance 33 %): its text "
    "encoder gives the three shape words almost the same vector (model card, 'Shapes: why they still fail'). "
    "Strict: this fails the suite the day a model gets its shapes, so the marker can go.",
)
def test_sampled_heldout_captions_get_their_shapes(sampled):
    shapes = [o["shape"] for _, objects, _ in sampled for o in objects if o["shape"] is not None]
    assert len(shapes) >= 15
    assert np.mean(shapes) >= 0.9, f"{sum(shapes)} of {len(shapes)} shapes right"


def test_a_shape_words_heatmap_peaks_inside_its_object(sampled):
    # The shipped model: 17 of these 21 shape words (chance is below 0.1).
    hits = []
    for caption, objects, run in sampled:
        seen = {}
        for word, obj in zip(caption.split(), world.word_objects(caption)):
            seen[word] = seen.get(word, -1) + 1
            mask = objects[obj]["mask"] if word in world.SHAPES else None
            if mask is None:
                continue
            heat = run.heatmap(run.token_indices(word)[seen[word]], size=(64, 64))
            hits.append(bool(mask[np.unravel_index(heat.argmax(), heat.shape)]))
    assert len(hits) >= 15 and np.mean(hits) >= MIN_SHAPE_POINTING, f"{sum(hits)} of {len(hits)}"


def test_the_shipped_text_encoders_shape_word_carries_the_colour_before_it_not_the_shape(pipe):
    # The model card's "why shapes fail": 12.5 against 0.66. A model that gets its shapes fails this.
    carried = probe.shape_word_contents(pipe)
    assert carried["colour"] > 5 * carried["shape"] > 0, carried


def test_every_word_kind_stays_visible_in_x_t_until_high_noise_and_size_and_position_longest(pipe):
    # The model card's "where the training signal is": x_t shows which word a scene has until t ≥ 900 for
    # every kind (shipped VAE: colour 950, shape 925, size and position 999), so a UNet can copy the word
    # from the image over most of the schedule, and min-SNR-5 weighs the steps where only the caption can
    # say it at under 1/50 of the low-noise ones. Size and position move whole objects: twice the distance.
    seen = probe.word_visibility(pipe)
    alphas = pipe.scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    for kind, r in seen.items():
        # last_t is the last step where √SNR·|Δz| ≥ 1 (SNR falls with t)
        assert snr[r["last_t"]] * r["distance"] ** 2 >= 1, kind
        assert r["last_t"] == 999 or snr[r["last_t"] + 1] * r["distance"] ** 2 < 1, kind
        assert r["last_t"] >= 800 and r["x0_weight"] < 5 / 50, (kind, r)
    assert min(seen["size"]["distance"], seen["position"]["distance"]) > 1.5 * max(
        seen["colour"]["distance"], seen["shape"]["distance"]
    ), seen


def test_the_right_caption_lowers_the_denoising_loss_and_most_in_x0_terms_at_high_noise(pipe):
    # Shipped model, 64 scenes: the gap in x0 terms grows from 0.0014 at t = 20 to 0.21 at t = 980.
    gain = probe.caption_gain(pipe, timesteps=(100, 500, 900), n_scenes=16)
    for t, r in gain.items():
        assert r["gap"] > 0, (t, r)
        snr = torch.tensor([r["snr"]])
        assert r["weighted"] == pytest.approx(r["gap"] * train.loss_weights(snr).item())  # what training weighs
    assert gain[100]["x0"] < gain[500]["x0"] < gain[900]["x0"], gain


def test_a_swapped_colour_word_wins_over_the_image_at_low_noise_and_a_position_word_only_at_high(pipe):
    # Shipped model, 16 scenes: the new colour wins from strength 0.3 (94 %), the old place is kept at 0.3
    # (100 %) and the new place wins at 1.0 (100 %); shapes follow the new word at no strength (31 % at 1.0).
    timesteps = pipe.scheduler.timesteps.clone()
    seen = probe.caption_override(pipe, strengths=(0.3, 1.0), n=4, kinds=("colour", "position"))
    assert seen["colour"][0.3]["new"] >= 0.75, seen
    assert seen["position"][0.3]["old"] >= 0.75 and seen["position"][1.0]["new"] >= 0.75, seen
    assert torch.equal(pipe.scheduler.timesteps, timesteps)  # the pipeline's scheduler was not used


def test_loss_gradients_leave_the_pipeline_alone_and_without_attention_losses_the_total_is_the_denoising_loss(pipe):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    processors = dict(pipe.unet.attn_processors)
    shipped = probe.loss_gradients(pipe, n_batches=1, batch=8)
    plain = probe.loss_gradients(pipe, n_batches=1, batch=8, attn_loss=0.0, attn_cover=0.0)
    assert plain["total"] == pytest.approx(plain["mse"], rel=1e-6)
    assert shipped["mse"] == pytest.approx(plain["mse"], rel=1e-5)  # the same batch and noise either way
    # the shipped model: the attention losses pull on the text encoder harder than the denoising loss
    assert shipped["attn"]["text"] > shipped["mse"]["text"] > 0, shipped
    assert dict(pipe.unet.attn_processors) == processors
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_changing_left_to_right_with_the_same_seed_moves_the_object(pipe):
    # The first held-out captions with a left/right object (the evaluation's pairs, not picked): with the
    # same seed, the object's centroid must move at least 1/8 of the image the named way. The shipped model
    # moves it in 5 of these 6; the previous model in 0 (it drew the same image for both words).
    pairs = [p for p in evaluate.one_word_pairs(world.heldout_captions(48))[0] if "left" in p[3] + p[4]][:6]
    moved = 0
    for a, b, i, old, _ in pairs:
        xs = []
        for caption in (a, b):
            image, _ = evaluate.generate(pipe, caption, seed=0, guidance=5.0, steps=20, size=64)
            mask = evaluate.score_objects(image, world.parse_caption(caption))[1][i]["mask"]
            xs.append(np.nonzero(mask)[1].mean() if mask is not None else np.nan)
        shift = (xs[1] - xs[0]) * (1 if old == "on the left" else -1)  # > 0: moved towards the new side
        moved += bool(shift > 8)
    assert len(pairs) == 6 and moved >= MIN_MOVED, f"moved {moved} of {len(pairs)}"


# -- training ---------------------------------------------------------------------------------------


def test_quick_training_runs_end_to_end_and_saves_a_loadable_pipeline(tmp_path):
    train.main(["--quick", "--out", str(tmp_path), "--save-every", "2", "--sizes", "0", "0", "1"])
    # --quick trains 3 UNet steps: one checkpoint at step 2 (pipeline + training state), then the final pipeline.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["state.pt", "step-2", "vae.pt"]
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "checkpoints" / "step-2").unet is not None
    p = StableDiffusionPipeline.from_pretrained(tmp_path)
    image = p("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert json.loads((tmp_path / "train_summary.json").read_text())["args"]["sizes"] == [0, 0, 1]
    steps = [r["step"] for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines()) if "step" in r]
    assert steps == [0, 2, 0, 2]  # VAE steps 0 and 2, then UNet steps 0 and 2


def test_loss_weights_are_min_snr_5_by_default_and_a_floor_raises_the_x0_weight_of_high_noise_steps():
    ac = DDIMScheduler(**train.SD_SCHEDULE).alphas_cumprod
    snr = ac / (1 - ac)  # [1000], falling from ~1,200 at t = 0 to 0.0047 at t = 999
    low, high = snr >= 5, snr < 5  # t below ~150 / above
    default = train.loss_weights(snr)
    # min-SNR-5 for ε-prediction: weight 1 once SNR < 5; above, the x0 error weighs 5 (ε weight 5 / SNR)
    assert torch.all(default[high] == 1) and torch.allclose(default[low] * snr[low], torch.tensor(5.0))
    floored = train.loss_weights(snr, floor=1.0)
    x0_weight = floored * snr
    assert torch.allclose(x0_weight.min(), torch.tensor(1.0)) and torch.allclose(x0_weight.max(), torch.tensor(5.0))
    assert torch.equal(floored[snr >= 1], default[snr >= 1])  # only the steps with SNR < 1 (t > ~340) change
    assert floored[999] > 200 * default[999]  # t = 999: its x0 error weighed 1 instead of 0.0047


def test_attention_loss_targets_objects_for_object_words_and_named_halves_for_position_words():
    scenes = world.sample_scenes(30, seed=3)
    kinds, untied = ("colour", "shape", "size", "position"), ("shape", "position")
    _, owner, detach, masks = train.token_targets(scenes, train.world_tokenizer(), 16, kinds, untied)
    targets = train.attention_targets(masks)  # [N, 7, 16, 16]
    checked = 0
    for i, scene in enumerate(scenes):
        for w, (word, obj) in enumerate(zip(scene.caption.split(), world.word_objects(scene.caption))):
            target = int(owner[i, w + 1])  # +1: <|startoftext|>
            if word in ("a", "and", "on", "the", "at"):
                assert target == -1
            elif word in ("left", "right", "top", "bottom"):
                region, mask = targets[i, target], masks[i, obj]
                # A large triangle "at the top" can reach below the middle with its wide base: ≥ 60 % inside.
                assert region.sum() == 128 and (region * mask).sum() > 0.6 * mask.sum(), scene.caption
                assert detach[i, w + 1]
                checked += 1
            else:
                assert target == obj and bool(detach[i, w + 1]) == (word in world.SHAPES)
    assert checked >= 10


@pytest.mark.parametrize("detached", [False, True])
def test_attention_losses_of_detached_words_train_the_unet_but_not_the_text_encoder(detached):
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    probe = train.ProbeProcessor()
    text = torch.randn(1, 77, 8, requires_grad=True)  # the text encoder's output
    probe(attn, torch.randn(1, 16, 16), text)  # a 4×4 grid of 16 channels
    owner = torch.full((1, 77), -1)
    owner[0, 2] = 0  # token 2 names object 0
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :2, :2] = 1
    share, cover = train.attention_loss([probe], owner, torch.full((1, 77), detached), masks)
    (share + cover).backward()
    assert share > 0 and attn.to_q.weight.grad.abs().sum() > 0
    assert (text.grad.abs().sum() > 0) != detached


def test_shape_word_loss_reads_only_shape_words_and_is_low_only_when_their_vectors_lie_apart():
    tokenizer = train.world_tokenizer()
    shape_of = train.word_classes(tokenizer, world.SHAPES)
    tok = tokenizer(
        ["a red circle and a blue triangle", "a large green square on the left", ""],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    labels = shape_of[tok]
    assert [labels[i][labels[i] >= 0].tolist() for i in range(3)] == [[0, 2], [1], []]
    directions = train.class_directions(8, 3, seed=0)
    assert torch.allclose(directions @ directions.T, torch.eye(3), atol=1e-5)
    cond = torch.randn(3, 77, 8) * 0.01  # every word nearly the same vector: chance, ln 3
    assert abs(train.shape_word_loss(cond, tok, shape_of, directions).item() - np.log(3)) < 0.05
    apart = cond.clone()
    apart[labels >= 0] = 6 * directions[labels[labels >= 0]]  # each shape word along its own direction
    apart[labels < 0] = 6 * directions[0]  # what other words are does not count
    assert train.shape_word_loss(apart, tok, shape_of, directions).item() < 0.01
    swapped = apart.clone()
    swapped[labels >= 0] = 6 * directions[(labels[labels >= 0] + 1) % 3]
    assert train.shape_word_loss(swapped, tok, shape_of, directions).item() > 5
    assert train.shape_word_loss(cond[2:], tok[2:], shape_of, directions).item() == 0  # no shape word


def test_quick_training_with_the_shape_loss_logs_it_and_it_trains_the_text_encoder(tmp_path):
    train.main(["--quick", "--out", str(tmp_path), "--shape-loss", "1"])
    unet_steps = [r for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines()) if "shape" in r]
    assert [r["step"] for r in unet_steps] == [0, 2] and all(r["shape"] > 0 for r in unet_steps)
    tokenizer = train.world_tokenizer()
    text_encoder = train.build_text_encoder(tokenizer, 16)
    tok = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    cond = text_encoder(tok).last_hidden_state
    shape_of, directions = train.word_classes(tokenizer, world.SHAPES), train.class_directions(16, 3, 0)
    train.shape_word_loss(cond, tok, shape_of, directions).backward()
    grads = text_encoder.get_input_embeddings().weight.grad.abs().sum(1)  # [vocabulary]
    assert grads[tok[0, 3]] > 0  # "circle"'s own embedding
    assert grads[tok[0, 4:]].sum() == 0  # the tokens after it (causal attention): untouched


def test_colour_swap_redraws_only_colour_words_and_invariance_is_zero_only_if_shape_words_ignore_them():
    tokenizer = train.world_tokenizer()
    shape_of, colour_of = train.word_classes(tokenizer, world.SHAPES), train.word_classes(tokenizer, world.COLOURS)
    captions = ["a red circle and a blue triangle", "a large green square on the left", ""]
    tok = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [train.colour_swapped(tok, colour_of, train.class_ids(colour_of), gen) for _ in range(50)]
    )  # [50, 3, 77]
    is_colour = colour_of[tok] >= 0
    assert is_colour.sum() == 3 and (draws[:, ~is_colour] == tok[~is_colour]).all()
    drawn = {tokenizer.convert_ids_to_tokens(int(i)) for i in draws[:, is_colour].unique()}
    assert drawn == {c + "</w>" for c in world.COLOURS}  # every colour, and only colours

    cond = torch.randn(3, 77, 8)
    other = torch.randn(3, 77, 8)  # every word's vector different...
    at_shape = shape_of[tok] >= 0
    other[at_shape] = cond[at_shape]  # ...except at the shape words
    assert train.shape_invariance_loss(cond, other, tok, shape_of).item() == 0
    other[at_shape] += 2.0
    assert train.shape_invariance_loss(cond, other, tok, shape_of).item() == pytest.approx(4.0)
    assert train.shape_invariance_loss(cond[2:], other[2:], tok[2:], shape_of).item() == 0  # no shape word

    # A causal text encoder: the shape word after a colour depends on it, so the loss is > 0 and trains it.
    text_encoder = train.build_text_encoder(tokenizer, 16)
    one = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    blue = one.clone()
    blue[0, 2] = tokenizer.convert_tokens_to_ids("blue</w>")
    a, b = (text_encoder(t).last_hidden_state for t in (one, blue))
    loss = train.shape_invariance_loss(a, b, one, shape_of)
    loss.backward()
    grads = text_encoder.get_input_embeddings().weight.grad.abs().sum(1)
    assert loss > 0 and grads[one[0, 2]] > 0 and grads[blue[0, 2]] > 0


def test_quick_training_with_the_invariance_and_colour_read_losses_logs_them_on_the_same_batches(tmp_path):
    logs, samplers = [], []
    for name, extra in (("plain", []), ("invariant", ["--shape-invariance", "1", "--colour-read", "1"])):
        train.main(["--quick", "--out", str(tmp_path / name), "--save-every", "2", *extra])
        lines = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
        logs.append([r for r in map(json.loads, lines) if r.get("stage") == "unet"])
        samplers.append(torch.load(tmp_path / name / "checkpoints" / "state.pt", weights_only=False)["generator"])
    plain, invariant = logs
    assert all(r["invariance"] > 0 and r["colour_read"] > 0 for r in invariant)
    assert "invariance" not in plain[0] and "colour_read" not in plain[0]
    # Step 0 is scored before any update: the same batch, noise and timesteps give the same losses.
    same = ("loss", "attn", "cover")
    assert {k: plain[0][k] for k in same} == {k: invariant[0][k] for k in same}
    # The batch sampler is where it would be without the redrawn colours after two steps, so every later
    # batch is the same too (step 0's losses alone would not show it: the colours are redrawn after them).
    assert torch.equal(samplers[0], samplers[1])


def test_shape_read_loss_is_zero_once_an_objects_pixels_give_its_word_the_target_share():
    class Probe:  # a layer whose 4×4 pixels' attention over 77 tokens is given
        def __init__(self, probs):
            self.probs = self.probs_detached = probs

    owner, reads = torch.full((1, 77), -1), torch.zeros(1, 77, dtype=torch.bool)
    owner[0, 3], reads[0, 3] = 0, True  # token 3 names object 0 and is read
    owner[0, 2] = 0  # token 2 names it too but is not scored
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :2, :2] = 1  # object 0: the top-left 2×2 pixels
    inside = masks[0, 0].flatten().bool()

    def loss(share_inside, share_outside=0.0):
        probs = torch.full((2, 16, 77), 0.0)  # 2 heads
        probs[:, :, 0] = 1.0
        probs[:, inside, 3], probs[:, ~inside, 3] = share_inside, share_outside
        return train.word_read_loss([Probe(probs)], reads, owner, masks, target=0.25).item()

    assert loss(0.0) == pytest.approx(1.0)
    assert loss(0.125) == pytest.approx(0.25)  # half the target: (1 - 1/2)²
    assert loss(0.25) == 0 and loss(0.9) == 0
    assert loss(0.0, share_outside=0.9) == pytest.approx(1.0)  # only the object's own pixels count
    assert train.word_read_loss([Probe(torch.zeros(2, 16, 77))], reads & False, owner, masks, 0.25).item() == 0


class _DeviceReads(TorchDispatchMode):
    """Records the ops that read a tensor's value back to the host (on a GPU: make the CPU wait for it).

    Reads of the optimisers' step counters (in `optimisers`) are left out: torch keeps them on the host on
    every device (`capturable=False`), so reading them never waits for a GPU.
    """

    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2"}
    INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}  # (x, indices, ...)

    def __init__(self, events, optimisers):
        super().__init__()
        self.events, self.optimisers = events, optimisers

    def _host_counter(self, t) -> bool:
        return any(t is state.get("step") for opt in self.optimisers for state in opt.state.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        indices = args[1] if name in self.INDEXING else ()
        bool_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if name in self.READS and not self._host_counter(args[0]) or bool_index:
            self.events.append(name)
        return func(*args, **(kwargs or {}))


def test_a_training_step_with_every_loss_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    events, optimisers = [], []
    draw, run = train.draw_batch, train.train_unet

    class RecordedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimisers.append(self)

    def marked_draw(*args, **kwargs):
        events.append("step")
        return draw(*args, **kwargs)

    def recorded_run(*args, **kwargs):
        with _DeviceReads(events, optimisers):
            return run(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordedAdamW)
    monkeypatch.setattr(train, "draw_batch", marked_draw)
    monkeypatch.setattr(train, "train_unet", recorded_run)
    losses = ["--shape-loss", "1", "--shape-read", "1", "--shape-invariance", "1", "--colour-read", "1"]
    train.main(["--quick", "--out", str(tmp_path / "run"), "--save-every", "0", "--object-weight", "1", *losses])
    steps = " ".join(events).split("step")[1:]  # what each of the 3 steps read back
    assert len(steps) == 3
    # Steps 0 and 2 log their losses (.item()), so the recorder sees reads; step 1 logs nothing and reads nothing.
    assert "aten::_local_scalar_dense" in steps[0] and "aten::_local_scalar_dense" in steps[2]
    assert steps[1].split() == []


def test_masked_losses_equal_the_boolean_indexed_ones_and_are_zero_where_no_word_is():
    gen = torch.Generator().manual_seed(0)
    x, mask = torch.randn(4, 77, generator=gen), torch.rand(4, 77, generator=gen) < 0.2
    assert torch.allclose(train.masked_mean(x, mask), x[mask].mean())
    assert train.masked_mean(x, torch.zeros_like(mask)) == 0

    tokenizer = train.world_tokenizer()
    shape_of = train.word_classes(tokenizer, world.SHAPES)
    captions = ["a red circle and a blue triangle", "a large green square on the left", "a small yellow circle"]
    tok = tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    cond, other = torch.randn(3, 77, 8, generator=gen), torch.randn(3, 77, 8, generator=gen)
    directions = train.class_directions(8, 3, 0)
    at = shape_of[tok] >= 0
    expected = torch.nn.functional.cross_entropy(cond[at] @ directions.T, shape_of[tok][at])
    assert torch.allclose(train.shape_word_loss(cond, tok, shape_of, directions), expected)
    assert torch.allclose(train.shape_invariance_loss(cond, other, tok, shape_of), (cond[at] - other[at]).pow(2).mean())


def test_resumed_training_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    # With the invariance loss on, whose redrawn colours come from a generator of their own.
    options = ["--quick", "--save-every", "2", "--shape-invariance", "1"]
    train.main([*options, "--out", str(whole)])
    # A run stopped after its step-2 checkpoint: only its checkpoints folder is left.
    shutil.copytree(whole / "checkpoints", resumed / "checkpoints")
    train.main([*options, "--out", str(resumed), "--resume"])
    for part, name in (
        ("unet", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("vae", "diffusion_pytorch_model"),
    ):
        a, b = (load_file(d / part / f"{name}.safetensors") for d in (whole, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    with pytest.raises(SystemExit, match="p-position"):
        train.main([*options, "--out", str(resumed), "--resume", "--p-position", "0.9"])


def test_evaluate_probe_prints_its_figures_and_the_per_shape_split_of_its_json(tmp_path, capsys):
    out = tmp_path / "probe.json"
    evaluate.main(["--probe", "--captions", "3", "--seeds", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    rows = figures["generated"]["per_image"]
    assert len(rows) == 3 and figures["generated"]["images"] == 3
    assert f"shape right {figures['generated']['shape_correct']:.1%}" in printed
    counts = evaluate.shapes_by_name(rows)
    assert sum(scored for _, scored in counts.values()) == figures["generated"]["objects_scored"]["shape"]
    assert f"shape right by the shape named: {evaluate.shapes_line(rows)}" in printed


def test_f2_variants_of_the_speed_comparison_draw_the_same_scene_size_from_a_twice_as_fine_latent(pipe):
    vae = train.build_vae(64, (16, 32))
    assert vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 32, 32)
    assert train.build_vae(64).encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 16, 16)
    for vae_channels, unet_channels in (spec for spec in speed.VARIANTS.values() if spec is not None):
        f2 = speed.variant(pipe, vae_channels, unet_channels)
        assert f2.unet.config.sample_size == 32 and f2.unet.config.block_out_channels == unet_channels
        image = f2("a red circle", num_inference_steps=1, height=64, width=64, output_type="np").images
        assert image.shape == (1, 64, 64, 3)


def test_speed_prints_one_row_per_variant_relative_to_the_shipped_model(capsys):
    speed.main(["--repeats", "1", "--steps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "×" in line]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == list(speed.VARIANTS)
    assert rows[1].split(" | ")[1:3] == ["16×16", "4.21 M"] and rows[1].endswith(" | 1.00 |")
    assert all(" | 32×32 | " in r for r in rows[2:])


# -- training several recipes side by side (sdviz.toy.sweep) ---------------------------------------------


def _write_log(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_sweep_plans_the_steps_that_fit_the_budget_after_the_vae_stage(tmp_path):
    _write_log(
        tmp_path,
        [
            {"stage": "vae", "step": 0, "seconds": 1.0},
            {"stage": "vae", "step": 50, "seconds": 2.0},  # 0.02 s a crop step
            {"stage": "unet", "step": 0, "seconds": 1.0},
            {"stage": "unet", "step": 50, "seconds": 11.0},  # 0.2 s a step
        ],
    )
    reused = sweep.plan(["--vae-from", "somewhere"], tmp_path, budget=100, safety=1.0)
    assert reused == {"steps": 500, "unet_seconds_per_step": 0.2, "vae_seconds": 0.0}
    assert sweep.plan(["--vae-from", "somewhere"], tmp_path, budget=100, safety=0.5)["steps"] == 200
    # A VAE of its own: 1,500 crop steps and 400 whole-image steps (4 crops each) = 62 s, 38 s left = 190 steps,
    # rounded down to a hundred.
    own = sweep.plan([], tmp_path, budget=100, safety=1.0)
    assert own["vae_seconds"] == pytest.approx(62.0) and own["steps"] == 100
    _write_log(tmp_path, [{"stage": "unet", "step": 0, "seconds": 1.0}])
    with pytest.raises(SystemExit, match="logged no UNet steps 0 and 50"):
        sweep.plan([], tmp_path, budget=100)


def test_sweep_packs_a_finished_run_without_its_checkpoints_and_a_stopped_one_from_its_last(tmp_path):
    done = tmp_path / "done"
    _write_log(done, [{"stage": "unet", "step": 0}])
    (done / "model_index.json").write_text("{}")
    (done / "train_summary.json").write_text("{}")
    (done / "checkpoints" / "step-500").mkdir(parents=True)
    (done / "checkpoints" / "state.pt").write_bytes(b"training state")
    assert sweep.pack(done, tmp_path / "done.tar") == "finished"
    with tarfile.open(tmp_path / "done.tar") as tar:
        assert sorted(tar.getnames()) == ["model_index.json", "train_log.jsonl", "train_summary.json"]

    stopped = tmp_path / "stopped"
    _write_log(stopped, [{"stage": "unet", "step": 0}])
    for step in (500, 1000):  # 1000 is the later one, though it sorts first as text
        (stopped / "checkpoints" / f"step-{step}" / "unet").mkdir(parents=True)
        (stopped / "checkpoints" / f"step-{step}" / "unet" / "weights").write_text(str(step))
    assert sweep.pack(stopped, tmp_path / "stopped.tar") == "stopped; packed step-1000"
    with tarfile.open(tmp_path / "stopped.tar") as tar:
        assert tar.extractfile("unet/weights").read() == b"1000"
        assert "train_log.jsonl" in tar.getnames() and not any("checkpoints" in n for n in tar.getnames())

    empty = tmp_path / "empty"
    _write_log(empty, [])
    assert sweep.pack(empty, tmp_path / "empty.tar") == "stopped before its first checkpoint"
    with tarfile.open(tmp_path / "empty.tar") as tar:
        assert tar.getnames() == ["train_log.jsonl"]


def test_sweep_trains_packs_and_evaluates_a_recipe_so_its_figures_come_back_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "PROBE", ["--scenes", "64", "--steps", "60", "--save-every", "0"])
    options = "--vae-from sdviz/toy/model --channels 16 32 --batch 4 --scenes 64"
    evaluation = "--captions 2 --seeds 1 --scenes 2"
    out = tmp_path / "runs"
    sweep.main(
        ["--out", str(out), "--budget", "1", "--device", "cpu", "--threads", "1", "--save-every", "0"]
        + ["--run", "tiny", options, "--evaluate", evaluation]
    )
    summary = json.loads((out / "sweep.json").read_text())["runs"]["tiny"]
    assert summary["steps"] == 100 and summary["status"] == "finished" and summary["evaluation"] == "evaluated"
    figures = json.loads((out / "tiny.eval.json").read_text())
    assert len(figures["generated"]["per_image"]) == 2
    printed = (out / "tiny.eval.txt").read_text()
    assert f"shape right (objects whose colour is there) | {figures['generated']['shape_correct']:.1%}" in printed
    with tarfile.open(out / "tiny.tar") as tar:
        assert "unet/diffusion_pytorch_model.safetensors" in tar.getnames()
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(out), "--budget", "1", "--run", "tiny", options, "--evaluate", "--captoins 2"])


def test_an_evaluation_still_running_at_the_end_is_stopped_and_says_so(tmp_path):
    start = time.time()
    outcome = sweep.evaluate_all({"shipped": MODEL}, tmp_path, [], threads=1, start=start, end=0)
    assert outcome["shipped"].startswith("evaluation failed or was stopped") and time.time() - start < 30
    assert not (tmp_path / "shipped.eval.json").exists()


def test_a_run_trained_on_one_device_resumes_on_another_but_not_with_other_options(tmp_path):
    saved = {"args": train._jsonable(train.parse_args(["--device", "cuda", "--threads", "2"])), "step": 7}
    torch.save(saved, tmp_path / "state.pt")
    assert train._load_checkpoint(tmp_path / "state.pt", train.parse_args([]))["step"] == 7
    with pytest.raises(SystemExit, match="--steps 4000 \\(now 10\\)"):
        train._load_checkpoint(tmp_path / "state.pt", train.parse_args(["--steps", "10"]))
