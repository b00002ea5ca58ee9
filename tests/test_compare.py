"""sdviz.compare on the tiny random SD1: variants apply their setting, run in order, cancel cleanly; figures;
and asking the image (region ranking) agrees with the word heatmaps averaged over the region."""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import SIZE
from matplotlib.figure import Figure

import sdviz
from sdviz import compare
from sdviz.attention import CrossAttentionRecorder

PROMPT = "a red circle above a blue square"


def base(**kw):
    return sdviz.Settings(
        **{"prompt": PROMPT, "steps": 2, "width": SIZE, "height": SIZE, "seed": 0, "scheduler": "DDIM", **kw}
    )


def pixels(variant):
    return np.asarray(variant.image, dtype=np.int16)


def test_guidance_variants_apply_the_guidance_and_change_the_image(sd1_pipe):
    variants = compare.run_variants(sd1_pipe, base(), "guidance", [1, 7.5])

    assert [v.label for v in variants] == ["guidance 1", "guidance 7.5"]
    assert [v.settings.guidance for v in variants] == [1.0, 7.5]
    assert [v.run.info.guidance_scale for v in variants] == [1.0, 7.5]
    assert all(v.settings.seed == 0 and v.settings.prompt == PROMPT for v in variants)
    assert np.abs(pixels(variants[0]) - pixels(variants[1])).max() > 0


def test_same_settings_give_identical_images(sd1_pipe):
    same = compare.run_variants(sd1_pipe, base(), "seed", [5, 5])
    other = compare.run_variants(sd1_pipe, base(), "seed", [6])

    assert np.array_equal(pixels(same[0]), pixels(same[1]))
    assert not np.array_equal(pixels(same[0]), pixels(other[0]))


def test_steps_and_scheduler_variants_apply_their_setting(sd1_pipe):
    by_steps = compare.run_variants(sd1_pipe, base(), "steps", [2, 3])
    by_scheduler = compare.run_variants(sd1_pipe, base(), "scheduler", ["DDIM", "Euler"])

    assert [v.run.num_steps for v in by_steps] == [2, 3]
    assert [v.label for v in by_steps] == ["2 steps", "3 steps"]
    assert [v.run.info.scheduler for v in by_scheduler] == ["DDIMScheduler", "EulerDiscreteScheduler"]
    assert type(sd1_pipe.scheduler).__name__ == "DDIMScheduler"  # the pipeline's own is back


@pytest.mark.parametrize(
    "vary, values, message",
    [
        ("prompt", ["a", "b"], "can't vary 'prompt'"),
        ("guidance", [1, 2, 3, 4, 5], "1 to 4 values"),
        ("guidance", [], "1 to 4 values"),
        ("steps", [2, 0], "steps must be a whole number from 1"),
        ("steps", [2.5], "whole number"),
        ("scheduler", ["DDIM", "Fast"], "unknown scheduler 'Fast'"),
    ],
)
def test_bad_comparisons_are_refused_before_anything_runs(vary, values, message):
    never_called = object()  # not a pipeline: running anything would fail differently
    with pytest.raises(ValueError, match=message):
        compare.run_variants(never_called, base(), vary, values)
    with pytest.raises(ValueError, match=message):
        compare.iter_variants(never_called, base(), vary, values)  # at once, before the first variant


def test_cancelling_stops_the_variants_keeps_the_finished_ones_and_restores_the_pipeline(sd1_pipe):
    scheduler = sd1_pipe.scheduler
    seen = []

    def on_step(variant, step, total, latents):
        seen.append((variant, step, total))
        if variant == 1 and step == 0:
            raise sdviz.Cancelled()

    with pytest.raises(sdviz.Cancelled) as stop:
        compare.run_variants(sd1_pipe, base(), "guidance", [1, 3, 7.5], on_step=on_step)

    assert seen == [(0, 0, 2), (0, 1, 2), (1, 0, 2)]  # in order, one variant at a time
    assert [v.label for v in stop.value.variants] == ["guidance 1"]
    assert sd1_pipe.scheduler is scheduler
    assert not any(
        isinstance(h, CrossAttentionRecorder) for m in sd1_pipe.unet.modules() for h in m._forward_pre_hooks.values()
    )


def test_changed_words_names_the_differing_words():
    assert compare.changed_words("a red circle", "a blue circle") == (["red"], ["blue"])
    assert compare.changed_words("A red circle.", "a red circle") == (["."], [])
    assert compare.changed_words("a circle", "a big red circle") == ([], ["big", "red"])
    assert compare.changed_words(["a", "Red"], ["a", "red"]) == ([], [])


def test_prompt_pair_runs_both_prompts_with_one_seed_and_shows_the_changed_words(sd1_pipe):
    pair = compare.run_prompt_pair(sd1_pipe, base(seed=3), "a red circle", "a blue circle")

    assert [v.settings.prompt for v in pair] == ["a red circle", "a blue circle"]
    assert [v.settings.seed for v in pair] == [3, 3]
    assert [v.word for v in pair] == ["red", "blue"]
    fig = compare.compare_figure(pair)
    assert isinstance(fig, Figure) and len(fig.axes) == 6  # image, step, changed word's map × 2
    assert [ax.get_xlabel().split()[0] for ax in fig.axes[2::3]] == ["“red”", "“blue”"]
    with pytest.raises(ValueError, match="same words"):
        compare.run_prompt_pair(sd1_pipe, base(), "a red circle", "A red  circle")


def test_comparison_figures_have_one_column_per_variant_on_a_shared_step(sd1_pipe):
    variants = compare.run_variants(sd1_pipe, base(), "steps", [2, 4])

    fig = compare.compare_figure(variants, word="circle", step=3)
    assert len(fig.axes) == 3 * 2
    assert [ax.get_title() for ax in fig.axes[::3]] == ["2 steps", "4 steps"]
    assert [ax.get_xlabel() for ax in fig.axes[1::3]] == ["step 2/2", "step 4/4"]
    strips = compare.strip_figure(variants, count=4)
    assert len(strips.axes) == 2 * 4
    assert sdviz.render.to_image(fig).size[0] > 200
    with pytest.raises(KeyError, match="not a word of the prompt"):
        compare.compare_figure(variants, word="zebra")


def test_aligned_steps_map_the_shared_slider_onto_each_run():
    runs = [SimpleNamespace(run=SimpleNamespace(num_steps=n)) for n in (20, 10, 1)]
    assert compare.aligned_steps(runs, 0) == [0, 0, 0]
    assert compare.aligned_steps(runs, 19) == [19, 9, 0]
    assert compare.aligned_steps(runs, None) == [19, 9, 0]
    assert compare.aligned_steps(runs, 10) == [10, 5, 0]  # 10/19 of the way: step 5 of 0–9
    with pytest.raises(IndexError, match="0–19"):
        compare.aligned_steps(runs, 20)


# -- asking the image --------------------------------------------------------------------------------
def test_region_ranking_equals_the_word_heatmaps_averaged_over_the_region(sd1_pipe):
    _, run = sdviz.generate(sd1_pipe, base(steps=3))
    h, w = run.latent_size  # 8 × 8 for a 64 × 64 image

    def expected(rows, cols, **filters):
        scores, seen = {}, {}
        for word in run.words:  # each occurrence of "a" on its own: "a", then "a (#2)"
            seen[word.text] = seen.get(word.text, 0) + 1
            name = word.text if seen[word.text] == 1 else f"{word.text} (#{seen[word.text]})"
            heat = run.heatmap(list(word.tokens), size="latent", **filters)  # [h, w]
            scores[name] = float(heat[rows, cols].mean())
        return scores

    # a box in fractions of the image: x from 1/4 to 3/4, y from 0 to 1/2 → latent rows 0–3, columns 2–5
    box = (0.25, 0.0, 0.75, 0.5)
    want = expected(slice(0, h // 2), slice(w // 4, 3 * w // 4))
    got = run.region_scores(box)
    assert list(got) == sorted(want, key=lambda k: -want[k])  # the ranking
    assert got == pytest.approx(want, abs=1e-6)  # and the values
    assert len(set(got.values())) > 1  # the ranking is not a tie

    # the same region as a pixel mask at image size, and with steps and layers chosen
    mask = np.zeros(run.image_size, dtype=bool)
    mask[: SIZE // 2, SIZE // 4 : 3 * SIZE // 4] = True
    assert run.region_scores(mask) == pytest.approx(want, abs=1e-6)
    filters = dict(steps=(1, 3), blocks="up")
    assert run.region_scores(box, **filters) == pytest.approx(
        expected(slice(0, h // 2), slice(w // 4, 3 * w // 4), **filters), abs=1e-6
    )

    # a click: a zero-size box is the one latent cell under the point
    click = run.region_scores((0.6, 0.3, 0.6, 0.3))
    assert click == pytest.approx(expected(slice(2, 3), slice(4, 5)), abs=1e-6)
