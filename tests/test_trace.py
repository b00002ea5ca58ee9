"""sdviz.trace on tiny random-weight pipelines: fidelity, exactness of the maps and x0, restoration, isolation."""

import copy
import functools
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SIZE, make_pipe, seeded

import sdviz
from sdviz.attention import CrossAttentionRecorder
from sdviz.generate import use_scheduler

PROMPT = "a red circle above a blue zebra"
KW = dict(num_inference_steps=4, height=SIZE, width=SIZE, guidance_scale=7.5, output_type="np")


def run_pipe(pipe, prompt=PROMPT, seed=0, **kw):
    return pipe(prompt, generator=seeded(seed), **{**KW, **kw}).images


def traced(pipe, prompt=PROMPT, trace_kw=None, **kw):
    with sdviz.trace(pipe, **(trace_kw or {})) as tracer:
        images = run_pipe(pipe, prompt, **kw)
    return images, tracer.result


def snapshot(pipe):
    """Everything the tracer may touch, by identity."""
    return (
        {k: id(v) for k, v in pipe.unet.attn_processors.items()},
        dict(vars(pipe.scheduler)).keys(),
        sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in pipe.unet.modules()),
        len(pipe.text_encoder._forward_pre_hooks) + len(pipe.text_encoder._forward_hooks),
    )


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_tracing_leaves_the_image_bit_identical(family, request):
    pipe = request.getfixturevalue({"sd1": "sd1_pipe", "sd2-v": "sd2v_pipe", "sdxl": "sdxl_pipe"}[family])
    plain = run_pipe(pipe)
    images, run = traced(pipe, trace_kw=dict(negative=True, per_head=True))
    assert np.array_equal(plain, images)
    assert run.num_steps == 4 and run.attention


@torch.no_grad()
def test_recorded_probabilities_equal_an_explicit_softmax(sd1_pipe):
    """Capture one layer's inputs with a plain forward hook and recompute softmax(QKᵀ·scale) in float64."""
    name = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
    attn = sd1_pipe.unet.get_submodule(name)
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"]))

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _, run = traced(sd1_pipe, trace_kw=dict(dtype=torch.float32))
    finally:
        handle.remove()
    ids = sd1_pipe.tokenizer(PROMPT).input_ids
    red = ids.index(sd1_pipe.tokenizer.convert_tokens_to_ids("red</w>"))
    for step in range(run.num_steps):
        hidden, context = captured[step]
        cond = hidden.shape[0] // 2  # CFG batch is [unconditional, conditional]
        q = attn.to_q(hidden[cond : cond + 1]).double()  # [1, hw, inner]
        k = attn.to_k(context[cond : cond + 1]).double()  # [1, 77, inner]
        heads = attn.heads
        q = q.view(1, -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(1, -1, heads, k.shape[-1] // heads).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)[0].mean(0)  # [hw, 77]
        layer = next(layer for layer in run.layers if layer.name == name)
        expected = probs[:, red].reshape(layer.height, layer.width)
        got = run.heatmap("red", steps=step, layers=[name], size=(layer.height, layer.width))
        assert np.abs(got - expected.numpy()).max() <= 1e-5
        # the whole recorded map, every kept token
        recorded = run.attention[name][step].double()  # [T, h, w]
        full = probs[:, : recorded.shape[0]].T.reshape(recorded.shape)
        assert (recorded - full).abs().max() <= 1e-5


def test_only_cross_attention_is_hooked_and_every_processor_stays_as_it_was(sd1_pipe):
    before = sd1_pipe.unet.attn_processors
    with sdviz.trace(sd1_pipe):
        during = sd1_pipe.unet.attn_processors
        hooked = [
            name
            for name, m in sd1_pipe.unet.named_modules()
            if any(isinstance(h, CrossAttentionRecorder) for h in m._forward_pre_hooks.values())
        ]
    assert all(during[key] is proc for key, proc in before.items())
    assert {type(p).__name__ for p in during.values()} == {"AttnProcessor2_0"}
    assert len(hooked) == 16 and all(name.endswith(".attn2") for name in hooked)


def test_default_float16_maps_are_the_float32_maps_rounded(sd1_pipe):
    _, exact = traced(sd1_pipe, trace_kw=dict(dtype=torch.float32))
    _, half = traced(sd1_pipe)
    for name, maps in exact.attention.items():
        assert half.attention[name].dtype == torch.float16
        assert torch.equal(half.attention[name], maps.half())


def test_heatmap_of_a_word_is_its_own_tokens_not_a_neighbours(sd1_pipe):
    _, run = traced(sd1_pipe)
    words = [w.text for w in run.words]
    assert words == ["a", "red", "circle", "above", "a", "blue", "zebra"]
    zebra = next(w for w in run.words if w.text == "zebra")
    assert len(zebra.tokens) > 1  # not in the toy vocabulary: several BPE pieces
    assert run.token_indices("zebra") == list(zebra.tokens)
    total = sum(run.heatmap(i) for i in zebra.tokens)
    assert np.allclose(run.heatmap("zebra"), total, atol=1e-6)
    blue = run.token_indices("blue")
    assert blue == [zebra.tokens[0] - 1]
    assert not np.allclose(run.heatmap("blue"), run.heatmap(zebra.tokens[0]))
    # "a" occurs twice: the word's map is both occurrences
    assert run.token_indices("a") == [1, 5]
    with pytest.raises(KeyError, match="'dog' is not a word of the prompt; its words are: 'a', 'red'"):
        run.heatmap("dog")


def test_the_test_tokenizer_keeps_every_listed_word_whole_whatever_the_order():
    from sdviz.random_models import COMMON_WORDS, build_tokenizer

    for words in (COMMON_WORDS, sorted(COMMON_WORDS), sorted(COMMON_WORDS, key=len)):
        tokenizer = build_tokenizer(words)
        assert [w for w in COMMON_WORDS if len(tokenizer(w).input_ids) != 3] == []


def test_heatmap_aggregation_matches_its_docstring(sd1_pipe):
    _, run = traced(sd1_pipe)
    idx = run.token_indices("circle")
    layers = run.select_layers(blocks=["up"])
    manual = torch.zeros(SIZE, SIZE)
    for layer in layers:
        m = run.attention[layer.name][1:3].float()[:, idx].sum(1).mean(0)
        manual += F.interpolate(m[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
    manual /= len(layers)
    got = run.heatmap("circle", steps=(1, 3), blocks="up", size="image")
    assert got.shape == (SIZE, SIZE) and got.dtype == np.float32
    assert np.allclose(got, manual.numpy(), atol=1e-6)
    assert run.heatmap("circle", normalize=True).max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no cross-attention layer matches"):
        run.heatmap("circle", resolutions=[3])
    with pytest.raises(IndexError, match="steps 0–3"):
        run.heatmap("circle", steps=9)


X0_FROM_STEP_OUTPUT = ["DDIM", "DDPM", "Euler", "Euler a", "LMS"]


@pytest.mark.parametrize("scheduler", list(sdviz.SCHEDULERS))
def test_x0_is_the_schedulers_own_prediction(scheduler, sd1_pipe):
    """Replay untraced with a test-side wrapper of step() reading the scheduler's own x0."""
    own = []

    def run(record):
        with use_scheduler(sd1_pipe, scheduler) as sched:
            if not record:
                original = sched.step

                @functools.wraps(original)
                def step(model_output, timestep, sample, *args, **kwargs):
                    kwargs.pop("return_dict", None)
                    out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
                    if scheduler in X0_FROM_STEP_OUTPUT:
                        own.append(out.pred_original_sample[0])
                    elif scheduler in ("DPM++ 2M", "UniPC"):
                        own.append(sched.model_outputs[-1][0].clone())  # their converted output is x0
                    else:  # PNDM: from alphas_cumprod at this timestep
                        ab = sched.alphas_cumprod[int(timestep)]
                        own.append((sample[0] - (1 - ab).sqrt() * model_output[0]) / ab.sqrt())
                    return out.to_tuple()

                sched.step = step
                return run_pipe(sd1_pipe)
            images, result = traced(sd1_pipe)
            return images, result

    plain = run(record=False)
    images, result = run(record=True)
    assert np.array_equal(plain, images)
    assert result.info.scheduler == sdviz.SCHEDULERS[scheduler].__name__
    assert len(own) == result.num_steps
    for step, x0 in enumerate(own):
        assert torch.allclose(result.x0[step], x0.float(), atol=1e-5), (scheduler, step)


def test_v_prediction_x0_matches_dpm_solver(sd2v_pipe):
    assert sd2v_pipe.scheduler.config.prediction_type == "v_prediction"
    seen = []
    with use_scheduler(sd2v_pipe, "DPM++ 2M") as sched:
        _, run = traced(
            sd2v_pipe, callback_on_step_end=lambda p, i, t, kw: seen.append(sched.model_outputs[-1][0].clone()) or {}
        )
    assert run.info.prediction_type == "v_prediction"
    for step, x0 in enumerate(seen):
        assert torch.allclose(run.x0[step], x0.float(), atol=1e-5)


def test_step_records_follow_the_scheduler(sd1_pipe):
    with use_scheduler(sd1_pipe, "Euler") as sched:
        _, run = traced(sd1_pipe)
        assert torch.equal(run.timesteps, sched.timesteps.float())
        assert torch.allclose(run.sigmas, sched.sigmas[:-1].float())
    assert torch.allclose(run.alpha_bars, 1 / (1 + run.sigmas**2))
    assert torch.equal(run.schedule_timesteps, run.timesteps)
    with use_scheduler(sd1_pipe, "DDIM") as sched:
        _, run = traced(sd1_pipe)
        assert torch.allclose(run.alpha_bars, sched.alphas_cumprod[sched.timesteps].float())
    assert run.latents.shape == run.x0.shape == run.model_outputs.shape == (4, 4, SIZE // 8, SIZE // 8)
    assert run.latents.shape[1:] == run.final_latent.shape


def test_latent_entering_each_step_is_the_previous_steps_output(sd1_pipe):
    outs = []
    _, run = traced(sd1_pipe, callback_on_step_end=lambda p, i, t, kw: outs.append(kw["latents"][0].clone()) or {})
    for k in range(run.num_steps - 1):
        assert torch.equal(run.latents[k + 1], outs[k].float())
    assert torch.equal(run.final_latent, outs[-1].float())


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_exception_mid_run_restores_the_pipeline(error, sd1_pipe):
    before = snapshot(sd1_pipe)
    fresh = run_pipe(sd1_pipe)

    def explode(pipe, i, t, kw):
        if i == 1:
            raise error("stop")
        return {}

    tracer = sdviz.trace(sd1_pipe)
    with pytest.raises(error), tracer:
        run_pipe(sd1_pipe, callback_on_step_end=explode)
    assert snapshot(sd1_pipe) == before
    assert not any(isinstance(p, CrossAttentionRecorder) for p in sd1_pipe.unet.attn_processors.values())
    assert tracer.result.num_steps == 2 and tracer.result.info.complete is False
    assert np.array_equal(run_pipe(sd1_pipe), fresh)


def test_tracing_a_traced_pipeline_raises_and_leaves_the_first_trace_working(sd1_pipe):
    with sdviz.trace(sd1_pipe) as outer:
        with pytest.raises(RuntimeError, match="already being traced"), sdviz.trace(sd1_pipe):
            pass
        run_pipe(sd1_pipe)
    assert outer.result.num_steps == 4


def test_one_trace_records_one_generation(sd1_pipe):
    before = snapshot(sd1_pipe)
    with pytest.raises(RuntimeError, match="one generation"), sdviz.trace(sd1_pipe):
        run_pipe(sd1_pipe)
        run_pipe(sd1_pipe)
    assert snapshot(sd1_pipe) == before


def test_two_traces_in_two_threads_do_not_mix():
    pipes = [make_pipe("sd1"), make_pipe("sd1")]
    prompts = ["a red circle", "a blue square on the left"]
    alone = [traced(p, q)[1] for p, q in zip(pipes, prompts)]
    results = [None, None]

    def work(i):
        results[i] = traced(pipes[i], prompts[i])[1]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for single, threaded, prompt in zip(alone, results, prompts):
        assert [w.text for w in threaded.words] == prompt.split()
        for name in single.attention:
            assert torch.equal(single.attention[name], threaded.attention[name])


def test_negative_branch_and_per_head_maps(sd1_pipe):
    with sdviz.trace(sd1_pipe, negative=True, per_head=True, dtype=torch.float32) as tracer:
        run_pipe(sd1_pipe, negative_prompt="blurry dog")
    run = tracer.result
    assert [w.text for w in run.negative_words] == ["blurry", "dog"]
    name = run.layers[0].name
    assert run.attention[name].shape == (4, 8, len(run.tokens), 8, 8)  # [S, heads, T, h, w]
    assert run.attention_negative[name].shape == (4, 8, len(run.negative_tokens), 8, 8)
    assert not np.allclose(run.heatmap("dog", negative=True), run.heatmap(2, negative=False))
    one_head = run.heatmap("red", heads=3)
    assert not np.allclose(one_head, run.heatmap("red"))
    _, plain = traced(sd1_pipe, trace_kw=dict(dtype=torch.float32))
    with pytest.raises(ValueError, match="per_head=True"):
        plain.heatmap("red", heads=0)


def test_without_guidance_there_is_one_branch(sd1_pipe):
    _, run = traced(sd1_pipe, trace_kw=dict(negative=True), guidance_scale=1.0)
    assert run.attention and not run.attention_negative
    with pytest.raises(ValueError, match="negative=True"):
        run.heatmap(0, negative=True)


def test_sdxl_and_sd2_layers_are_labelled(sdxl_pipe, sd2v_pipe):
    _, xl = traced(sdxl_pipe)
    assert len(xl.layers) == 70  # 1·2 + 2·2 (down) + 10 (mid) + 3·2 + 3·10 (up)… of SDXL
    assert {layer.block for layer in xl.layers} == {"down", "mid", "up"}
    assert {(layer.height, layer.width) for layer in xl.layers} == {(4, 4), (2, 2)}
    _, sd2 = traced(sd2v_pipe)
    assert len(sd2.layers) == 16
    assert sorted({layer.height for layer in sd2.layers}) == [1, 2, 4, 8]
    assert sd2.layers[0].heads == 2


def test_long_and_empty_prompts(sd1_pipe):
    long_prompt = " ".join(["red circle"] * 50)
    image, run = sdviz.generate(sd1_pipe, sdviz.Settings(long_prompt, steps=2, width=SIZE, height=SIZE))
    assert len(run.tokens) == 77 and run.tokens[-1].special
    assert run.truncated == " ".join(["red circle"] * 50)[len(" ".join(["red circle"] * 37 + ["red"])) + 1 :]
    assert run.heatmap("circle").shape == (8, 8)
    image, empty = sdviz.generate(sd1_pipe, sdviz.Settings("", steps=2, width=SIZE, height=SIZE))
    assert empty.words == [] and [t.special for t in empty.tokens] == [True, True]
    assert empty.heatmap(0).shape == (8, 8)  # <|startoftext|> is still recorded
    with pytest.raises(KeyError, match="prompt was empty"):
        empty.heatmap("cat")


def test_result_is_plain_data_that_round_trips(sd1_pipe, tmp_path):
    _, run = traced(sd1_pipe, trace_kw=dict(negative=True))
    run.decode(2, sd1_pipe.vae)
    stack = [vars(run)]
    while stack:  # no model, module or tokenizer inside
        item = stack.pop()
        values = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else [item]
        for v in values:
            assert not isinstance(v, torch.nn.Module)
            if isinstance(v, (dict, list, tuple)):
                stack.append(v)
            if isinstance(v, torch.Tensor):
                assert v.device.type == "cpu"
    clone = copy.deepcopy(run)
    assert np.array_equal(clone.heatmap("red"), run.heatmap("red"))
    path = run.save(tmp_path / "run.safetensors")
    assert path.stat().st_size > 0 and list(tmp_path.iterdir()) == [path]
    back = sdviz.TraceResult.load(path)
    assert back.tokens == run.tokens and back.words == run.words and back.layers == run.layers
    assert back.negative_words == run.negative_words and back.info == run.info
    for field in ("latents", "x0", "model_outputs", "timesteps", "sigmas", "alpha_bars", "final_latent"):
        assert torch.equal(getattr(back, field), getattr(run, field)), field
    for name in run.attention:
        assert torch.equal(back.attention[name], run.attention[name])
        assert torch.equal(back.attention_negative[name], run.attention_negative[name])
    assert np.array_equal(back.decoded["x0/2"], run.decoded["x0/2"])
    assert np.array_equal(back.heatmap("zebra", size="image"), run.heatmap("zebra", size="image"))


def test_loading_something_else_is_refused(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not an sdviz trace"):
        sdviz.TraceResult.load(tmp_path / "x.safetensors")
