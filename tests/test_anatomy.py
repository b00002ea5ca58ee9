"""sdviz.anatomy and its pictures: one step taken apart from a stored trace, its formulas and numbers checked."""

import numpy as np
import pytest
import torch
from conftest import SIZE, seeded
from matplotlib.figure import Figure
from PIL import Image

import sdviz
from sdviz import anatomy, render
from sdviz.generate import use_scheduler


def run_of(pipe, scheduler=None, guidance=6.0, steps=4, **kw):
    with use_scheduler(pipe, scheduler), sdviz.trace(pipe, prompt="a red circle") as tracer:
        pipe("a red circle", num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
             generator=seeded(1), output_type="latent", **kw)  # fmt: skip
    return tracer.result


@pytest.mark.parametrize("scheduler", ["DDIM", "Euler", "Euler a", "DPM++ 2M"])
def test_x0_follows_the_printed_formula_and_ddim_and_euler_steps_are_a_mix_of_x_t_and_x0(sd1_pipe, scheduler):
    run = run_of(sd1_pipe, scheduler)
    assert run.info.sigma_space == (scheduler in ("Euler", "Euler a"))
    for step in range(run.num_steps):
        a = anatomy.step_anatomy(run, step)
        _, x0_of = a.x0_formula()
        assert torch.allclose(x0_of(a.x_t, a.guided), a.x0, atol=1e-4), step
        assert a.formula_error < 1e-6
        keep, pull, explained = a.mix()
        if scheduler in ("DDIM", "Euler"):
            assert explained > 0.9999, (step, explained)
            assert torch.allclose(keep * a.x_t + pull * a.x0, a.x_next, atol=1e-4)
    if scheduler == "Euler a":  # fresh noise at every step: the mix can't be all of it, and the page says so
        assert anatomy.step_anatomy(run, 0).mix()[2] < 0.999
        assert "fresh random noise" in anatomy.explain(anatomy.step_anatomy(run, 0))


def test_v_prediction_x0_uses_v_and_the_page_calls_the_output_v(sd2v_pipe):
    run = run_of(sd2v_pipe)
    a = anatomy.step_anatomy(run, 1)
    text, x0_of = a.x0_formula()
    assert a.prediction_type == "v_prediction" and "v" in text
    assert torch.allclose(x0_of(a.x_t, a.guided), a.x0, atol=1e-4)
    assert "v_uncond + s·(v_text − v_uncond)" in anatomy.explain(a)


def test_the_explanation_works_one_latent_number_through_with_the_steps_numbers(sd1_pipe):
    run = run_of(sd1_pipe, "DDIM", guidance=6.0)
    a = anatomy.step_anatomy(run, 2)
    c, r, col = anatomy.telling_element(a)
    effect = (a.text - a.uncond).abs()
    assert effect[c, r, col] == effect.max()  # the number where the prompt changes the prediction most
    text = anatomy.explain(a)
    n = anatomy.formula_number
    u, t = a.uncond[c, r, col].item(), a.text[c, r, col].item()
    assert f"= {n(u)} + 6 × ({n(t)} − {n(u)}) = **{n(u + 6 * (t - u), bracket=False)}**" in text
    assert f"ᾱ = {a.alpha_bar:.3f}" in text and f"Step 3 of {run.num_steps}" in text
    assert f"the step returned **{n(a.x_next[c, r, col].item(), bracket=False)}**" in text
    share = anatomy.guidance_contribution(run)
    assert share.shape == (run.num_steps,) and share[2] == pytest.approx(a.contribution)


def test_guidance_rescale_is_reported_and_no_guidance_has_one_prediction(sd1_pipe):
    rescaled = anatomy.step_anatomy(run_of(sd1_pipe, guidance_rescale=0.7), 1)
    assert rescaled.formula_error > 1e-4 and "guidance_rescale" in anatomy.explain(rescaled)
    off = run_of(sd1_pipe, guidance=1.0)
    a = anatomy.step_anatomy(off, 0)
    assert not a.cfg and "One prediction" in anatomy.explain(a)
    with pytest.raises(ValueError, match="guidance did not run"):
        anatomy.guidance_contribution(off)
    with pytest.raises(ValueError, match="guidance did not run"):
        render.guidance_plot(off)
    assert isinstance(render.step_anatomy(off, 0), Figure)  # one prediction, no guidance columns


def test_the_pictures_are_figures_with_one_scale_and_teach_when_data_is_missing(sd1_pipe, tmp_path):
    run = sdviz.TraceResult.load(run_of(sd1_pipe, negative_prompt="blurry").save(tmp_path / "run.safetensors"))
    for fig in (render.step_anatomy(run, 1), render.guidance_plot(run, 1), render.embedding_figure(run),
                render.embedding_figure(run, negative=True), render.similarity_figure(run)):  # fmt: skip
        assert isinstance(fig, Figure) and render.to_image(fig).width > 300
    sim = run.token_similarity()
    assert sim.shape == (len(run.tokens),) * 2 and np.allclose(np.diag(sim), 1, atol=1e-5)
    z = run.latents[0].numpy()
    same = render.signed_rgb(z, 2.0)
    assert isinstance(same, Image.Image) and np.asarray(render.signed_rgb(np.zeros_like(z), 2.0)).max() == 128
    off = run_of(sd1_pipe, guidance=1.0)
    with pytest.raises(ValueError, match="no negative branch ran"):
        render.embedding_figure(off, negative=True)
