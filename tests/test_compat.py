"""What diffusers users run, traced: each case's image is bit-identical to the untraced one and the
pipeline is given back as it was. IP-Adapter, a tiny VAE, cross-attention kwargs, LoRA, textual
inversion, prompt embeddings, patched schedulers, slicing, fused QKV, FreeU, batches; and what is refused.
"""

from unittest import mock

import numpy as np
import pytest
import torch
from conftest import SIZE, make_pipe, seeded
from diffusers.models.attention_processor import AttnProcessor2_0, CustomDiffusionAttnProcessor2_0

import sdviz
from sdviz.attention import CrossAttentionRecorder
from sdviz.random_models import build_tiny_autoencoder, random_ip_adapter, random_lora

PROMPT = "a red circle above a blue square"
KW = dict(num_inference_steps=3, height=SIZE, width=SIZE, guidance_scale=7.5, output_type="np")


def state(pipe):
    """What tracing may touch: processors (by identity), the scheduler's attributes and its `step`, every hook."""
    modules = [*pipe.unet.modules()] + [
        m for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None
        for m in getattr(pipe, name).modules()
    ]  # fmt: skip
    return (
        {k: id(v) for k, v in pipe.unet.attn_processors.items()},
        sorted(vars(pipe.scheduler)),
        id(vars(pipe.scheduler).get("step")),
        sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules),
    )


def untraced_and_traced(pipe, prompt=PROMPT, trace_kw=None, seeds=(0,), **kw):
    """Run `pipe` twice with the same seeds (one per image), plainly and traced; assert bit-identity and restoration."""
    kw = {**KW, **kw}
    generator = lambda: [seeded(s) for s in seeds] if len(seeds) > 1 else seeded(seeds[0])
    plain = pipe(prompt, generator=generator(), **kw).images
    before = state(pipe)  # after one call: transformers adds hooks of its own to the text encoder on its first call
    with sdviz.trace(pipe, **(trace_kw or {})) as tracer:
        images = pipe(prompt, generator=generator(), **kw).images
    assert np.array_equal(plain, images)
    assert state(pipe) == before
    assert tracer.result.info.complete
    return images, tracer.result


def layer_inputs(attn):
    """A forward pre-hook capturing (hidden_states, text context) of every call of `attn`, and its handle."""
    seen = []

    def grab(module, args, kwargs):
        context = kwargs["encoder_hidden_states"]
        seen.append((args[0], context[0] if isinstance(context, tuple) else context))

    return seen, attn.register_forward_pre_hook(grab, with_kwargs=True)


def explicit_probs(hidden, context, w_q, w_k, heads, scale):
    """softmax(Q·Kᵀ·scale) in float64, head mean: hidden [hw, c], context [77, d] → [hw, 77]."""
    q = (hidden.double() @ w_q.double().T).view(hidden.shape[0], heads, -1).transpose(0, 1)
    k = (context.double() @ w_k.double().T).view(context.shape[0], heads, -1).transpose(0, 1)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).mean(0)


# -- IP-Adapter --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ip_pipes():
    """SD1 and SDXL tiny pipelines with a random IP-Adapter loaded through `load_ip_adapter`."""
    pipes = {}
    for family in ("sd1", "sdxl"):
        pipe = make_pipe(family)
        pipe.load_ip_adapter(random_ip_adapter(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)
        pipe.set_ip_adapter_scale(1.0)
        pipes[family] = pipe
    return pipes


def ip_inputs(pipe, cfg: bool, masked: bool) -> dict:
    dim = pipe.unet.config.cross_attention_dim
    embeds = torch.randn(2 if cfg else 1, 1, dim, generator=seeded(1))  # [negative,] image embedding
    kw = dict(ip_adapter_image_embeds=[embeds], guidance_scale=7.5 if cfg else 1.0)
    if masked:
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., : SIZE // 2] = 1  # the image prompt acts on the left half only
        kw["cross_attention_kwargs"] = {"ip_adapter_masks": [mask]}
    return kw


@pytest.mark.parametrize(
    "family, cfg, masked",
    [("sd1", True, True), ("sd1", False, False), pytest.param("sd1", True, False, marks=pytest.mark.slow),
     pytest.param("sd1", False, True, marks=pytest.mark.slow), ("sdxl", True, True),
     pytest.param("sdxl", False, False, marks=pytest.mark.slow)],
)  # fmt: skip
def test_ip_adapter_image_is_bit_identical_and_maps_cover_the_text_only(ip_pipes, family, cfg, masked):
    pipe = ip_pipes[family]
    _, run = untraced_and_traced(pipe, **ip_inputs(pipe, cfg, masked))
    assert [w.text for w in run.words] == PROMPT.split()
    assert run.info.cfg is cfg
    for maps in run.attention.values():
        assert maps.shape[1] == len(run.tokens)  # [S, T, h, w]: text tokens only, not the 4 image-prompt tokens


def test_ip_adapter_masks_reach_the_processor(ip_pipes):
    """The masks change the image, so a trace that dropped them could not be bit-identical."""
    pipe = ip_pipes["sd1"]
    masked = pipe(PROMPT, generator=seeded(0), **{**KW, **ip_inputs(pipe, True, True)}).images
    unmasked = pipe(PROMPT, generator=seeded(0), **{**KW, **ip_inputs(pipe, True, False)}).images
    assert np.abs(masked - unmasked).max() > 1e-2
    with sdviz.trace(pipe):
        traced = pipe(PROMPT, generator=seeded(0), **{**KW, **ip_inputs(pipe, True, True)}).images
    assert np.array_equal(traced, masked)


def test_ip_adapter_map_is_the_text_attention_of_the_layer(ip_pipes):
    pipe = ip_pipes["sd1"]
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn = pipe.unet.get_submodule(name)
    seen, handle = layer_inputs(attn)
    try:
        _, run = untraced_and_traced(pipe, trace_kw=dict(dtype=torch.float32), **ip_inputs(pipe, True, False))
    finally:
        handle.remove()
    hidden, context = seen[0]
    cond = hidden.shape[0] // 2
    probs = explicit_probs(hidden[cond], context[cond], attn.to_q.weight, attn.to_k.weight, attn.heads, attn.scale)
    recorded = run.attention[name][0].double().flatten(1)  # [T, hw]
    assert (recorded - probs[:, : recorded.shape[0]].T).abs().max() <= 1e-5


# -- a tiny VAE, cross-attention kwargs ------------------------------------------------------------
def test_tiny_autoencoder_as_the_vae():
    pipe = make_pipe("sd1")
    pipe.vae = build_tiny_autoencoder()
    _, run = untraced_and_traced(pipe)
    assert run.info.preview_source == "fitted"
    assert np.isfinite(np.array(run.info.latent_rgb)).all() and len(run.info.latent_rgb) == 5
    image = run.decode(run.num_steps - 1, pipe.vae)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8


def test_a_vae_sdviz_cant_fit_leaves_previews_to_an_exact_decode(sd1_pipe):
    with mock.patch.object(sd1_pipe.vae, "encode", side_effect=RuntimeError("no encoder")):
        _, run = untraced_and_traced(sd1_pipe)
    assert run.info.preview_source == "none" and run.info.latent_rgb is None
    assert run.decode(0, sd1_pipe.vae).shape == (SIZE, SIZE, 3)


class GainProcessor(AttnProcessor2_0):
    """A user's processor with an argument of its own: scales the layer's output by `gain`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        return gain * super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_a_custom_processors_own_argument_reaches_it():
    pipe = make_pipe("sd1")
    pipe.unet.set_attn_processor(
        {k: GainProcessor() if ".attn2." in k else v for k, v in pipe.unet.attn_processors.items()}
    )
    default = pipe(PROMPT, generator=seeded(0), **KW).images
    gained, run = untraced_and_traced(pipe, cross_attention_kwargs={"gain": 1.5})
    assert np.abs(gained - default).max() > 1e-2  # dropping `gain` would have changed the image
    assert run.attention


# -- LoRA, textual inversion -------------------------------------------------------------------------
def test_lora_maps_include_the_adapters_query_and_key():
    pipe = make_pipe("sd1")
    name = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
    attn = pipe.unet.get_submodule(name)
    w_q, w_k = attn.to_q.weight.detach().clone(), attn.to_k.weight.detach().clone()
    lora = random_lora(pipe.unet)
    _, plain_run = untraced_and_traced(pipe, trace_kw=dict(dtype=torch.float32))
    pipe.load_lora_weights(lora)
    seen, handle = layer_inputs(attn)
    try:
        _, run = untraced_and_traced(pipe, trace_kw=dict(dtype=torch.float32))
    finally:
        handle.remove()
    # W' = W + B·A, from the state dict itself (diffusers scales by alpha / rank = 1 without alphas)
    lq = lora[f"unet.{name}.to_q.lora_B.weight"] @ lora[f"unet.{name}.to_q.lora_A.weight"]
    lk = lora[f"unet.{name}.to_k.lora_B.weight"] @ lora[f"unet.{name}.to_k.lora_A.weight"]
    hidden, context = seen[0]
    cond = hidden.shape[0] // 2
    with_lora = explicit_probs(hidden[cond], context[cond], w_q + lq, w_k + lk, attn.heads, attn.scale)
    without = explicit_probs(hidden[cond], context[cond], w_q, w_k, attn.heads, attn.scale)
    recorded = run.attention[name][0].double().flatten(1)  # [T, hw]
    T = recorded.shape[0]
    assert (recorded - with_lora[:, :T].T).abs().max() <= 1e-5
    assert (recorded - without[:, :T].T).abs().max() > 1e-3
    assert not torch.allclose(run.attention[name], plain_run.attention[name], atol=1e-3)
    # the LoRA scale of cross_attention_kwargs applies to the recorded projections too: W + 0.5·B·A
    seen, handle = layer_inputs(attn)
    try:
        _, half = untraced_and_traced(pipe, trace_kw=dict(dtype=torch.float32), cross_attention_kwargs={"scale": 0.5})
    finally:
        handle.remove()
    hidden, context = seen[0]
    expected = explicit_probs(hidden[cond], context[cond], w_q + 0.5 * lq, w_k + 0.5 * lk, attn.heads, attn.scale)
    assert (half.attention[name][0].double().flatten(1) - expected[:, :T].T).abs().max() <= 1e-5


def test_textual_inversion_token_is_a_word():
    pipe = make_pipe("sd1")
    pipe.load_textual_inversion({"<sdviz-cat>": torch.randn(2, pipe.text_encoder.config.hidden_size)})
    _, run = untraced_and_traced(pipe, "a photo of <sdviz-cat> on a mat")
    assert [w.text for w in run.words] == ["a", "photo", "of", "<sdviz-cat>", "on", "a", "mat"]
    cat = run.words[3]
    assert len(cat.tokens) == 2  # the embedding has two vectors: "<sdviz-cat>" and "<sdviz-cat>_1"
    assert run.token_indices("<sdviz-cat>") == list(cat.tokens)
    assert run.heatmap("<sdviz-cat>").shape == (8, 8)


# -- prompt embeddings -------------------------------------------------------------------------------
@torch.no_grad()
def embeds(pipe, text):
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]  # [1, 77, d]


def test_prompt_embeds_without_text_are_named_by_position(sd1_pipe):
    pe = embeds(sd1_pipe, PROMPT)
    _, run = untraced_and_traced(sd1_pipe, None, prompt_embeds=pe)
    assert run.info.tokens_from == "index"
    assert [t.text for t in run.tokens[:3]] == ["#0", "#1", "#2"] and len(run.tokens) == 77
    assert run.heatmap(2).shape == run.heatmap("#2").shape == (8, 8)
    with pytest.raises(KeyError, match=r"text was not seen .* sdviz.trace\(pipe, prompt=\.\.\.\)"):
        run.heatmap("red")
    # the negative branch was encoded by the pipeline from "": it is not mistaken for the prompt
    assert run.info.negative_tokens_from == "text_encoder"
    assert [t.special for t in run.negative_tokens] == [True, True]


def test_prompt_embeds_with_the_text_given_to_trace_are_named_by_word(sd1_pipe):
    pe, ne = embeds(sd1_pipe, PROMPT), embeds(sd1_pipe, "blurry")
    by_text = dict(prompt_embeds=pe, negative_prompt_embeds=ne)
    _, run = untraced_and_traced(sd1_pipe, None, trace_kw=dict(prompt=PROMPT, negative_prompt="blurry"), **by_text)
    assert run.info.tokens_from == run.info.negative_tokens_from == "prompt"
    assert [w.text for w in run.words] == PROMPT.split()
    assert [w.text for w in run.negative_words] == ["blurry"]
    # the same maps as when the pipeline encodes the text itself
    _, from_text = untraced_and_traced(sd1_pipe, PROMPT, negative_prompt="blurry")
    assert from_text.info.tokens_from == "text_encoder"
    for name, maps in from_text.attention.items():
        assert torch.equal(run.attention[name], maps)


def test_sdxl_prompt_and_negative_are_told_apart_by_the_context_they_made(sdxl_pipe):
    _, run = untraced_and_traced(sdxl_pipe, trace_kw=dict(negative=True), negative_prompt="blurry dog")
    assert [w.text for w in run.words] == PROMPT.split()
    assert [w.text for w in run.negative_words] == ["blurry", "dog"]
    # without a negative prompt SDXL's negative context is zeros, made by no text: named by position
    _, zeros = untraced_and_traced(sdxl_pipe, trace_kw=dict(negative=True))
    assert zeros.info.negative_tokens_from == "index" and len(zeros.negative_tokens) == 77
    assert [w.text for w in zeros.words] == PROMPT.split()


# -- schedulers patched by someone else ----------------------------------------------------------------
def test_a_step_patched_on_the_instance_is_wrapped_and_given_back(sd1_pipe):
    scheduler = sd1_pipe.scheduler
    with mock.patch.object(scheduler, "step", wraps=scheduler.step) as patched:
        _, run = untraced_and_traced(sd1_pipe)
        assert scheduler.step is patched and patched.call_count == 2 * KW["num_inference_steps"]
        assert run.num_steps == KW["num_inference_steps"]
    assert "step" not in vars(scheduler)


# -- the U-Net's own options -------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["attention slicing", "fused QKV", "FreeU"])
def test_unet_options_are_traced_with_the_same_maps(option):
    pipe = make_pipe("sd1")
    _, reference = untraced_and_traced(pipe, trace_kw=dict(dtype=torch.float32))
    if option == "attention slicing":
        pipe.enable_attention_slicing(1)
    elif option == "fused QKV":
        pipe.fuse_qkv_projections()
    else:
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    _, run = untraced_and_traced(pipe, trace_kw=dict(dtype=torch.float32))
    assert run.attention.keys() == reference.attention.keys()
    if option == "FreeU":  # FreeU changes the U-Net's features, so the attention too
        assert any(not torch.allclose(run.attention[n], reference.attention[n]) for n in run.attention)
    else:  # the same attention, computed another way
        for name, maps in reference.attention.items():
            assert torch.allclose(run.attention[name], maps, atol=1e-5)


# -- batches -----------------------------------------------------------------------------------------
def test_several_images_per_prompt_record_the_chosen_image(sd1_pipe):
    latents = []
    grab = lambda p, i, t, kw: latents.append(kw["latents"].clone()) or {}
    _, run = untraced_and_traced(sd1_pipe, trace_kw=dict(image=1), num_images_per_prompt=2, callback_on_step_end=grab)
    _, first = untraced_and_traced(sd1_pipe, num_images_per_prompt=2)
    assert run.info.image == 1 and first.info.image == 0
    steps = KW["num_inference_steps"]
    assert torch.equal(run.final_latent, latents[2 * steps - 1][1].float())  # image 1 of the traced call
    assert torch.equal(first.final_latent, latents[steps - 1][0].float())
    assert not torch.equal(run.x0, first.x0)
    with pytest.raises(ValueError, match=r"image=2\) but this call makes 2 image\(s\)"), sdviz.trace(sd1_pipe, image=2):
        sd1_pipe(PROMPT, generator=seeded(0), num_images_per_prompt=2, **KW)


def test_a_batch_of_prompts_records_the_chosen_prompts_image(sd1_pipe):
    prompts = ["a red circle", "a blue square on the left"]
    trace_kw = dict(image=1, negative=True)
    _, run = untraced_and_traced(sd1_pipe, prompts, trace_kw, seeds=(0, 1), negative_prompt=["", "dog"])
    assert [w.text for w in run.words] == prompts[1].split()
    assert [w.text for w in run.negative_words] == ["dog"]
    _, alone = untraced_and_traced(sd1_pipe, prompts[1], seeds=(1,), negative_prompt="dog")
    assert (run.x0 - alone.x0).abs().max() < 2e-3  # the same image, batched or not (batch-size rounding aside)
    for name, maps in alone.attention.items():
        assert torch.allclose(run.attention[name].float(), maps.float(), atol=1e-3)


# -- what is refused, and partial traces ---------------------------------------------------------------
def test_a_compiled_unet_is_refused_before_the_call():
    pipe = make_pipe("sd1")
    pipe.unet.compile()  # compiles lazily: nothing runs here
    before = state(pipe)
    with pytest.raises(RuntimeError, match="torch.compile'd U-Net"), sdviz.trace(pipe):
        pytest.fail("the with body must not run")
    assert state(pipe) == before
    original = pipe.unet
    pipe.unet = torch.compile(original)
    with pytest.raises(RuntimeError, match="_orig_mod"), sdviz.trace(pipe):
        pass


def test_processors_whose_keys_sdviz_cant_reproduce_are_refused():
    pipe = make_pipe("sd1")
    processors = pipe.unet.attn_processors
    name = next(k for k in processors if ".attn2." in k)
    attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
    processors[name] = CustomDiffusionAttnProcessor2_0(
        train_kv=True, hidden_size=attn.to_k.out_features, cross_attention_dim=attn.to_k.in_features
    )
    pipe.unet.set_attn_processor(processors)
    with pytest.raises(RuntimeError, match="Custom Diffusion"), sdviz.trace(pipe):
        pass
    assert not any(isinstance(h, CrossAttentionRecorder) for h in attn._forward_pre_hooks.values())


def test_a_run_stopped_by_the_pipelines_interrupt_gives_a_partial_result(sd1_pipe):
    def stop(pipe, i, t, kw):
        pipe._interrupt = i == 1
        return {}

    plain = sd1_pipe(PROMPT, generator=seeded(0), callback_on_step_end=stop, **KW).images
    with sdviz.trace(sd1_pipe) as tracer:
        images = sd1_pipe(PROMPT, generator=seeded(0), callback_on_step_end=stop, **KW).images
    assert np.array_equal(plain, images)
    assert tracer.result.num_steps == 2 and tracer.result.info.complete is False


def test_a_failed_call_still_gives_a_result(sd1_pipe):
    before = state(sd1_pipe)
    tracer = sdviz.trace(sd1_pipe, negative=True)
    with pytest.raises(ValueError), tracer:
        sd1_pipe(PROMPT, height=SIZE + 3, width=SIZE, num_inference_steps=3)  # not divisible by 8: check_inputs
    assert state(sd1_pipe) == before
    run = tracer.result
    assert run.num_steps == 0 and run.info.complete is False and run.attention == {}
