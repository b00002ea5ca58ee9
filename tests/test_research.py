"""Research records on tiny random pipelines: kept queries and `attend`, contrast across words, self-attention."""

import numpy as np
import pytest
import torch
from conftest import SIZE, seeded

import sdviz
from sdviz.result import contrast_shares

PROMPT = "a red circle above a blue zebra"
KW = dict(num_inference_steps=3, height=SIZE, width=SIZE, guidance_scale=7.5, output_type="np")
ALL_ON = dict(keep_queries=True, self_attention=True, negative=True)


def traced(pipe, prompt=PROMPT, **trace_kw):
    with sdviz.trace(pipe, **trace_kw) as tracer:
        images = pipe(prompt, generator=seeded(0), **KW).images
    return images, tracer.result


@pytest.fixture(scope="module")
def run(sd1_pipe):
    return traced(sd1_pipe, **ALL_ON)[1]


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_every_research_option_leaves_the_image_bit_identical(family, request):
    pipe = request.getfixturevalue({"sd1": "sd1_pipe", "sd2-v": "sd2v_pipe", "sdxl": "sdxl_pipe"}[family])
    plain = pipe(PROMPT, generator=seeded(0), **KW).images
    images, result = traced(pipe, **ALL_ON, per_head=True, query_resolutions=None)
    assert np.array_equal(plain, images)
    assert result.queries and result.self_attention
    hooks = sum(len(m._forward_pre_hooks) for m in pipe.unet.modules())
    assert hooks == 0  # every recorder removed


def count_unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.01), (torch.float32, 1e-5)])
def test_attend_with_the_runs_own_prompt_reproduces_every_words_map_without_the_unet(sd1_pipe, dtype, tolerance):
    _, result = traced(sd1_pipe, keep_queries=True, dtype=dtype)
    calls, handle = count_unet_calls(sd1_pipe)
    try:
        again = result.attend(sd1_pipe, PROMPT)
    finally:
        handle.remove()
    assert calls == []
    assert [w.text for w in again.words] == [w.text for w in result.words]
    assert again.info.maps_from == "queries" and again.latents is result.latents  # the rest of the run is shared
    kept = [layer.name for layer in again.layers]
    for word in result.words:
        recorded = result.heatmap(list(word.tokens), layers=kept)
        recomputed = again.heatmap(list(word.tokens))
        assert np.abs(recorded - recomputed).max() <= tolerance * recorded.max(), word.text
    for step in range(result.num_steps):  # step by step too, not only the mean
        a, b = result.heatmap("zebra", steps=step, layers=kept), again.heatmap("zebra", steps=step)
        assert np.abs(a - b).max() <= tolerance * a.max()


def test_attend_works_for_sdxl_with_its_two_text_encoders(sdxl_pipe):
    _, result = traced(sdxl_pipe, keep_queries=True, dtype=torch.float32)
    again = result.attend(sdxl_pipe, PROMPT)
    kept = [layer.name for layer in again.layers]
    recorded, recomputed = result.heatmap("circle", layers=kept), again.heatmap("circle")
    assert np.abs(recorded - recomputed).max() <= 1e-5 * recorded.max()


def test_a_word_not_in_the_prompt_gets_a_finite_map_of_its_own(run, sd1_pipe):
    other = run.attend(sd1_pipe, "a green triangle")
    assert [w.text for w in other.words] == ["a", "green", "triangle"]
    heat = other.heatmap("triangle", size="image")
    assert heat.shape == (SIZE, SIZE) and np.isfinite(heat).all() and heat.max() > 0
    own = run.heatmap("circle", layers=[layer.name for layer in other.layers], size="image")
    assert not np.allclose(heat, own)
    with pytest.raises(KeyError, match="not a word of the prompt"):
        other.heatmap("circle")
    with pytest.raises(ValueError, match="needs a text"):
        run.attend(sd1_pipe, "  ")


def test_attend_on_a_run_traced_without_queries_says_how_to_keep_them(sd1_pipe):
    _, plain = traced(sd1_pipe)
    assert plain.queries == {}
    with pytest.raises(ValueError, match=r"keep_queries=True"):
        plain.attend(sd1_pipe, "a zebra")


def test_queries_are_kept_at_the_chosen_resolutions(sd1_pipe, run):
    # The tiny SD1's layers are 8×8, 4×4 and 2×2 at 64 px: all within the default ≤ 16×16.
    assert set(run.queries) == {layer.name for layer in run.layers}
    q = run.queries[run.layers[0].name]
    assert q.dtype == torch.float16 and q.shape[:2] == (run.num_steps, run.layers[0].heads)
    _, some = traced(sd1_pipe, keep_queries=True, query_resolutions=[4])
    assert {some.layers[[la.name for la in some.layers].index(n)].height for n in some.queries} == {4}
    assert [layer.height for layer in some.attend(sd1_pipe, "a zebra").layers] == [4] * len(some.queries)
    with pytest.raises(ValueError, match="whole numbers"):
        sdviz.trace(sd1_pipe, keep_queries=True, query_resolutions=["16"])


# -- contrast -----------------------------------------------------------------------------------------
def test_contrast_maps_sum_to_one_across_the_chosen_words_at_every_pixel(run):
    chosen = ["red", "circle", "blue", "zebra"]
    for temperature in (1.0, 0.5):
        maps = [run.heatmap(w, contrast=chosen, temperature=temperature, size="image") for w in chosen]
        assert np.abs(sum(maps) - 1).max() < 1e-5
    everything = [run.heatmap(w.text, contrast=True) for w in run.words if w.text != "a"]
    everything.append(run.heatmap("a", contrast=True))  # "a" occurs twice: one word, both tokens
    assert np.abs(sum(everything) - 1).max() < 1e-5


def test_contrast_at_temperature_one_is_the_plain_share_and_lower_temperatures_sharpen(run):
    layer = run.layers[0]
    m = run.attention[layer.name][:1].float()  # [1, T, h, w]
    red, blue = run.token_indices("red"), run.token_indices("blue")
    share = run.heatmap("red", steps=0, layers=[layer.name], contrast=["blue"])
    plain = (m[0, red].sum(0) / (m[0, red].sum(0) + m[0, blue].sum(0))).numpy()
    assert np.abs(share - plain).max() < 1e-6
    sharp = contrast_shares(m, [red, blue], temperature=0.25)[0, 0].numpy()
    assert (np.abs(sharp - 0.5) >= np.abs(plain - 0.5) - 1e-6).all()  # further from a tie everywhere
    with pytest.raises(ValueError, match="at least two different words"):
        run.heatmap("red", contrast=["red"])
    with pytest.raises(ValueError, match="temperature"):
        run.heatmap("red", contrast=["blue"], temperature=0)


# -- self-attention -----------------------------------------------------------------------------------
@torch.no_grad()
def test_self_attention_rows_equal_an_explicit_softmax_and_sum_to_one(sd1_pipe):
    name = "up_blocks.1.attentions.2.transformer_blocks.0.attn1"
    attn = sd1_pipe.unet.get_submodule(name)
    captured = []
    handle = attn.register_forward_pre_hook(lambda m, args, kwargs: captured.append(args[0]), with_kwargs=True)
    try:
        _, result = traced(sd1_pipe, self_attention=True, dtype=torch.float32)
    finally:
        handle.remove()
    maps = result.self_attention[name]  # [S, hw, hw]
    assert maps.shape[0] == result.num_steps == len(captured)
    for step, hidden in enumerate(captured):
        x = hidden[hidden.shape[0] // 2 :][:1].double()  # the conditional row of the CFG batch
        q = torch.nn.functional.linear(x, attn.to_q.weight.double())
        k = torch.nn.functional.linear(x, attn.to_k.weight.double())
        heads = attn.heads
        q = q.view(1, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(1, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        explicit = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)[0].mean(0)  # [hw, hw]
        assert (maps[step].double() - explicit).abs().max() <= 1e-5
        assert (maps[step].double().sum(-1) - 1).abs().max() <= 1e-5


def test_self_attention_keeps_only_the_chosen_steps_and_resolutions(sd1_pipe, run):
    assert run.self_attention_steps.tolist() == [0, 1, 2] and run.self_attention[run.self_layers[0].name].dtype == (
        torch.float16
    )
    _, some = traced(sd1_pipe, self_attention=True, self_attention_steps=[2], self_attention_resolutions=[8])
    assert some.self_attention_steps.tolist() == [2]
    assert {layer.height for layer in some.self_layers} == {8} and all(
        m.shape[0] == 1 for m in some.self_attention.values()
    )
    assert some.self_attention_map((0.5, 0.5), steps=2).shape == some.latent_size
    with pytest.raises(ValueError, match=r"recorded at steps \[3\]"):
        some.self_attention_map((0.5, 0.5), steps=0)


def test_a_pixels_self_attention_map_reads_its_own_row(run):
    layer = run.self_layers[0]
    x, y = 0.9, 0.1
    row = int(y * layer.height) * layer.width + int(x * layer.width)
    expected = run.self_attention[layer.name][:, row].float().mean(0).reshape(layer.height, layer.width)
    got = run.self_attention_map((x, y), layers=[layer.name], size=(layer.height, layer.width))
    assert np.abs(got - expected.numpy()).max() < 1e-6
    assert run.self_attention_map((x, y), size="image").shape == (SIZE, SIZE)
    with pytest.raises(ValueError, match="fractions 0–1"):
        run.self_attention_map((1.5, 0.2))


def test_a_run_without_self_attention_says_how_to_record_it(sd1_pipe):
    _, plain = traced(sd1_pipe)
    with pytest.raises(ValueError, match="self_attention=True"):
        plain.self_attention_map((0.5, 0.5))


def test_research_records_round_trip_through_a_saved_trace(run, tmp_path):
    loaded = sdviz.TraceResult.load(run.save(tmp_path / "run.safetensors"))
    assert set(loaded.queries) == set(run.queries) and loaded.self_layers == run.self_layers
    for name, q in run.queries.items():
        assert torch.equal(loaded.queries[name], q)
    assert torch.equal(loaded.self_attention_steps, run.self_attention_steps)
    point = (0.3, 0.6)
    assert np.array_equal(loaded.self_attention_map(point), run.self_attention_map(point))


# -- explain a real image -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    pipe = sdviz.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_explain_image_maps_caption_and_other_words_with_one_unet_call_per_timestep(toy):
    from sdviz.toy import world

    scene = world.render([world.Obj("red", "circle", "large", "on the left"), world.Obj("blue", "square")],
                         __import__("random").Random(0))  # fmt: skip
    calls, handle = count_unet_calls(toy)
    try:
        explanation = sdviz.explain_image(toy, scene.image, scene.caption, words=["zebra", "green triangle", "red"],
                                          timesteps=(300, 600))  # fmt: skip
    finally:
        handle.remove()
    assert len(calls) == 2  # one per timestep; the other words come from the kept queries
    assert explanation.run.timesteps.tolist() == [300, 600] and explanation.timesteps == (300, 600)
    assert list(explanation.others) == ["zebra", "green triangle"]  # "red" is the caption's own
    for i, t in enumerate((300, 600)):  # each timestep's maps are noise_image's at that timestep
        alone = sdviz.noise_image(toy, scene.image, scene.caption, t, seed=0)
        assert np.array_equal(explanation.run.heatmap("circle", steps=i), alone.heatmap("circle"))
    for word in ("zebra", "green triangle"):
        heat = explanation.heatmap(word, size="image")
        assert heat.shape == (64, 64) and np.isfinite(heat).all() and heat.max() > 0
    masks = {"red": scene.masks[0], "circle": scene.masks[0], "blue": scene.masks[1], "square": scene.masks[1]}
    scores = explanation.scores(masks)
    assert set(scores) == set(masks) and all(0 <= s["iou"] <= 1 and isinstance(s["pointing"], bool)
                                             for s in scores.values())  # fmt: skip
    red = explanation.heatmap("red", size="image")  # the built-in model's colour maps land on their object
    assert red[scene.masks[0]].mean() > 2 * red[~scene.masks[0]].mean()
    with pytest.raises(ValueError, match="caption"):
        sdviz.explain_image(toy, scene.image, " ")
