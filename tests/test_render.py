"""Pictures: overlays, previews without the VAE, cached exact decodes, plots; and the latent → RGB fit."""

from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SIZE, seeded
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

import sdviz
from sdviz import render
from sdviz.preview import fit_latent_rgb, latent_to_rgb


@pytest.fixture(scope="module")
def traced_run(sd1_pipe):
    with sdviz.trace(sd1_pipe) as tracer:
        image = sd1_pipe(
            "a red circle above a blue square", num_inference_steps=4, height=SIZE, width=SIZE, generator=seeded()
        ).images[0]
    return image, tracer.result


def test_overlay_blends_the_colour_mapped_heatmap_at_the_given_opacity(traced_run):
    image, run = traced_run
    heat = run.heatmap("circle", size="image")
    assert np.array_equal(np.asarray(render.overlay(image, heat, alpha=0.0)), np.asarray(image))
    full = np.asarray(render.overlay(image, heat, cmap="viridis", alpha=1.0))
    assert np.array_equal(full, render.colorize(heat, "viridis"))
    norm = (heat - heat.min()) / (heat.max() - heat.min())
    expected = (matplotlib.colormaps["viridis"](norm)[..., :3] * 255).round().astype(np.uint8)
    assert np.array_equal(full, expected)
    with pytest.raises(ValueError, match="between 0 and 1"):
        render.overlay(image, heat, alpha=1.5)


def test_preview_is_the_linear_map_of_the_latent(traced_run):
    _, run = traced_run
    factors = torch.tensor(run.info.latent_rgb)
    z = run.x0[2]
    manual = ((z.permute(1, 2, 0) @ factors[:4] + factors[4] + 1) * 127.5).clamp(0, 255).round().byte()
    assert np.array_equal(run.preview(2), manual.numpy())
    big = render.preview(run, 2)
    assert big.size == (SIZE, SIZE)


def test_the_colour_fit_recovers_a_linear_vae():
    """A fake VAE whose latent is a known linear function of the pooled colour: the fit inverts it."""
    mix = torch.tensor([[0.5, -1.0, 0.2], [0.3, 0.8, -0.4], [-0.7, 0.1, 0.9], [0.2, 0.2, 0.2]])  # [C=4, 3]

    def encode(x):  # x [N, 3, s, s] in [-1, 1]
        pooled = F.avg_pool2d(x, 8)  # [N, 3, s/8, s/8]
        z = torch.einsum("cr,nrhw->nchw", mix, pooled) + 0.1
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=z / 0.5))

    vae = SimpleNamespace(encode=encode, parameters=lambda: iter([torch.zeros(1)]), config={"scaling_factor": 0.5})
    factors = fit_latent_rgb(vae)
    rgb = torch.rand(5, 5, 3) * 2 - 1
    latent = torch.einsum("cr,hwr->chw", mix, rgb) + 0.1
    got = latent_to_rgb(latent, factors).numpy().astype(int)
    assert np.abs(got - ((rgb + 1) * 127.5).round().numpy()).max() <= 1


def test_exact_decode_runs_the_vae_once_per_step(traced_run, sd1_pipe):
    _, run = traced_run
    calls = []
    handle = sd1_pipe.vae.decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = run.decode(1, sd1_pipe.vae)
        again = run.decode(1, sd1_pipe.vae)
        final = run.decode(0, sd1_pipe.vae, which="final")
    finally:
        handle.remove()
    assert len(calls) == 2 and first is again
    assert first.shape == (SIZE, SIZE, 3) and first.dtype == np.uint8
    with torch.no_grad():
        z = run.final_latent[None] / sd1_pipe.vae.config.scaling_factor
        direct = sd1_pipe.vae.decode(z).sample[0]
    expected = ((direct.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().byte().numpy()
    assert np.array_equal(final, expected)


def test_the_final_decode_is_the_pipelines_image(sd1_pipe):
    with sdviz.trace(sd1_pipe) as tracer:
        image = sd1_pipe(
            "a cat", num_inference_steps=3, height=SIZE, width=SIZE, generator=seeded(), output_type="np"
        ).images[0]
    decoded = tracer.result.decode(0, sd1_pipe.vae, which="final")
    assert np.abs(decoded.astype(int) - (image * 255).round().astype(int)).max() <= 1


def test_latent_pictures_put_channels_where_they_say(traced_run):
    z = torch.zeros(4, 8, 8)
    z[0] = torch.linspace(-3, 3, 8)[None, :]  # channel 0 grows left → right
    rgb = np.asarray(render.latent_rgb(z))
    assert rgb.shape == (8, 8, 3)
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255  # red follows channel 0
    strip = np.asarray(render.latent_channels(z, size=16))
    assert strip.shape == (16, 4 * 16 + 3 * 2, 3)
    assert strip[0, 15, 0] > strip[0, 0, 0]  # first tile is channel 0's gradient
    assert render.latent_rgb(z, size=64).size == (64, 64)


def test_schedule_plot_marks_the_current_step(traced_run):
    _, run = traced_run
    fig = render.schedule_plot(run, step=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    for ax in fig.axes:
        marks = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(marks) == 1 and marks[0].get_xdata()[0] == 3
    assert np.allclose(fig.axes[0].get_lines()[0].get_ydata(), run.timesteps.numpy())
    assert isinstance(render.to_image(fig), Image.Image)


def test_word_shares_and_attention_over_time(traced_run):
    image, run = traced_run
    shares = run.word_shares()
    assert shares.shape == (run.num_steps, len(run.words))
    assert np.allclose(shares.sum(1), 1.0, atol=1e-5)
    fig = render.attention_over_time(run)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    distinct = list(dict.fromkeys(w.text for w in run.words))
    assert labels == distinct[::-1]  # one band per distinct word, listed top band first
    bands = fig.axes[0].collections
    red = next(band for band, word in zip(bands, distinct) if word == "red")
    assert np.allclose(red.get_facecolor()[0][:3], (1.0, 0.0, 0.0))  # a colour word in its own colour
    grid = render.word_grid(run, image)
    titles = [ax.get_title().split("\n")[0] for ax in grid.axes if ax.get_title()]
    assert titles == [w.text for w in run.words]
    strip = render.step_strip(run, count=3)
    assert len(strip.axes) == 3


def test_factors_shipped_in_the_vae_config_are_used(sd1_pipe, tmp_path):
    from sdviz.preview import CONFIG_KEY, latent_rgb_factors
    from sdviz.random_models import build_random_pipeline

    pipe = build_random_pipeline("sd1")
    factors = torch.arange(15, dtype=torch.float32).reshape(5, 3) / 10
    pipe.vae.register_to_config(**{CONFIG_KEY: factors.tolist()})
    pipe.save_pretrained(tmp_path)
    loaded = sdviz.load_pipeline(str(tmp_path), device="cpu")
    assert torch.equal(latent_rgb_factors(loaded), factors)
    assert not torch.equal(latent_rgb_factors(sd1_pipe), factors)


@pytest.mark.parametrize("top", [1.6e-4, 0.26, 3.0])
def test_region_bars_tick_labels_never_run_into_each_other(top):
    # The built-in model's background pixels give words ~1e-4 of their attention: plain decimals
    # such as 0.00002 0.00004 … printed side by side overlapped in the app.
    fig = render.region_bars({"left": top, "the": top / 7, "a": top / 100, "blue": top / 50})
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = sorted(
        (t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels() if t.get_text()), key=lambda b: b.x0
    )
    assert len(boxes) >= 3
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))


def test_previews_use_a_local_taesd_when_the_vae_is_costly_and_never_download(sd1_pipe, tmp_path, monkeypatch):
    from sdviz import preview
    from sdviz.random_models import build_tiny_autoencoder

    _, run = sdviz.generate(sd1_pipe, sdviz.Settings("a red circle", steps=2, width=64, height=64))
    assert preview.previewer(sd1_pipe).kind == "vae"  # the tiny test VAE is cheap: exact pictures
    monkeypatch.setattr(preview, "EXACT_BUDGET", 0)  # as for SD's real VAE
    monkeypatch.delenv(preview.TAESD_ENV, raising=False)
    assert preview.previewer(sd1_pipe).kind == "linear"  # no TAESD on this machine, nothing downloaded
    tiny = build_tiny_autoencoder()
    tiny.save_pretrained(tmp_path / "taesd")
    monkeypatch.setenv(preview.TAESD_ENV, str(tmp_path / "taesd"))
    chosen = preview.previewer(sd1_pipe)
    assert chosen.kind == "taesd" and "TAESD" in chosen.label
    picture = chosen.picture(run, 1)
    with torch.no_grad():  # the same as decoding the step's latent with that AutoencoderTiny by hand
        expected = tiny.decode(run.x0[1][None] / tiny.config.scaling_factor).sample[0]
    expected = ((expected.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().byte().numpy()
    assert picture.shape == (64, 64, 3) and np.array_equal(picture, expected)
    assert "taesd/x0/1" in run.decoded and "x0/1" not in run.decoded  # cached apart from exact decodes


def test_a_scaled_overlay_colours_from_zero_to_its_peak_and_shows_the_scale():
    import matplotlib

    image = np.full((8, 8, 3), 255, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[1:7, 1:7] = 0.02  # a faint word: its peak is 0.02
    own = np.asarray(render.scaled_overlay(image, heat, "jet", alpha=1.0, min_side=64))
    shared = np.asarray(render.scaled_overlay(image, heat, "jet", alpha=1.0, vmax=0.04, min_side=64))
    top = (np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255).round()
    middle = (np.array(matplotlib.colormaps["jet"](0.5)[:3]) * 255).round()
    cell = (slice(3 * 8, 5 * 8), slice(3 * 8, 5 * 8))  # inside the peak's region, enlarged ×8
    assert np.abs(own[cell].reshape(-1, 3) - top).max(axis=1).min() <= 2  # own scale: the peak is the top colour
    assert np.abs(shared[cell].reshape(-1, 3) - middle).max(axis=1).min() <= 2  # on a 0–0.04 scale: the middle
    assert own.shape[1] > 64 and own.shape[0] > 64  # a colour bar beside it, "peak · mean" under it


def test_the_word_grid_can_share_one_scale(sd1_pipe):
    image, run = sdviz.generate(sd1_pipe, sdviz.Settings("a red circle", steps=2, width=64, height=64))
    shared = np.asarray(render.to_image(render.word_grid(run, image, shared_scale=True)))
    own = np.asarray(render.to_image(render.word_grid(run, image, shared_scale=False)))
    assert shared.shape != own.shape or not np.array_equal(shared, own)
