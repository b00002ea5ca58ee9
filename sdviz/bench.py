"""What tracing costs, and what the app adds: `python -m sdviz.bench --family sd1 --full --size 256 --steps 10`.

Times traced and untraced generations interleaved in one process (median of --repeats each, order
alternating so drift cancels) and reports the memory a trace holds. Memory is measured on a short
run at --memory-size and scaled to --memory-steps: every step stores tensors of the same shapes; what a
trace holds once (the text vectors, the last latent) is counted once.

`--research` instead measures the research records of issue 14 (kept queries, self-attention) and
`run.attend`.

`--app` instead serves the web app in-process on the built-in model and times, interleaved, the
library's `sdviz.generate` against the app's `/generate` through `gradio_client` (same settings), and
a `/heatmap` re-render: in the handler alone and as an HTTP round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image

from .random_models import FAMILIES, build_random_pipeline
from .trace import trace

TEN_WORDS = "a red circle above a blue square on the left side"


def _time(pipe, traced: bool, size: int, steps: int, prompt: str) -> tuple[float, object]:
    kwargs = dict(
        num_inference_steps=steps,
        height=size,
        width=size,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="latent",
    )
    start = time.perf_counter()
    if traced:
        with trace(pipe) as tracer:
            pipe(prompt, **kwargs)
        return time.perf_counter() - start, tracer.result
    pipe(prompt, **kwargs)
    return time.perf_counter() - start, None


# Tensors a trace holds one row of per step ([S, …]); the attention maps are per step too. The rest (the
# text vectors [77, d], the final latent) it holds once, whatever the number of steps.
PER_STEP = ("latents", "model_outputs", "x0", "timesteps", "sigmas", "alpha_bars", "schedule_timesteps",
            "schedule_sigmas", "noise_pred_uncond", "noise_pred_text")  # fmt: skip


def trace_bytes(run) -> tuple[float, int]:
    """(bytes per step, bytes held once) of a trace's tensors."""
    nbytes = {name: t.numel() * t.element_size() for name in run.TENSORS if (t := getattr(run, name)) is not None}
    maps = sum(t.numel() * t.element_size() for name in run.TENSOR_DICTS for t in getattr(run, name).values())
    per_step = sum(nbytes.get(name, 0) for name in PER_STEP) + maps
    return per_step / run.num_steps, sum(nbytes.values()) + maps - per_step


def trace_bytes_inside(run) -> float:
    """Bytes per step of the U-Net's two predictions before guidance (part of `trace_bytes`' per step)."""
    kept = [t for t in (run.noise_pred_uncond, run.noise_pred_text) if t is not None]
    return sum(t.numel() * t.element_size() for t in kept) / run.num_steps


def measure(
    family: str,
    full: bool,
    size: int,
    steps: int,
    repeats: int,
    prompt: str,
    memory_size: int,
    memory_steps: int,
    dtype: torch.dtype,
) -> dict:
    pipe = build_random_pipeline(family, full=full)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    _time(pipe, False, size, steps, prompt)  # warm-up: allocator, kernels
    _time(pipe, True, size, steps, prompt)
    plain, traced = [], []
    for r in range(repeats):
        for is_traced in (False, True) if r % 2 == 0 else (True, False):
            seconds, _ = _time(pipe, is_traced, size, steps, prompt)
            (traced if is_traced else plain).append(seconds)
    probe_steps = 2
    _, run = _time(pipe, True, memory_size, probe_steps, prompt)
    per_step, once = trace_bytes(run)
    ratios = [t / p for t, p in zip(traced, plain)]
    return {
        "family": family,
        "width": "full" if full else "tiny",
        "dtype": str(dtype).replace("torch.", ""),
        "size": size,
        "steps": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "untraced_median_s": statistics.median(plain),
        "traced_median_s": statistics.median(traced),
        "ratio_of_medians": statistics.median(traced) / statistics.median(plain),
        "median_of_paired_ratios": statistics.median(ratios),
        "tokens_kept": len(run.tokens),
        "layers": len(run.layers),
        "memory_size": memory_size,
        "memory_steps": memory_steps,
        "trace_mb": (per_step * memory_steps + once) / 2**20,
        "trace_mb_inside_steps": trace_bytes_inside(run) * memory_steps / 2**20,
    }


def measure_dtypes(family: str, full: bool, size: int, steps: int, repeats: int, prompt: str) -> dict:
    """fp32 against bf16 on this machine, interleaved: median seconds and the image difference."""
    import copy

    pipes = {"float32": build_random_pipeline(family, full=full)}
    pipes["bfloat16"] = copy.deepcopy(pipes["float32"]).to(dtype=torch.bfloat16)
    times: dict[str, list[float]] = {k: [] for k in pipes}
    images = {}
    for r in range(repeats + 1):  # the first round warms up and is not counted
        for name, pipe in pipes.items() if r % 2 == 0 else reversed(pipes.items()):
            pipe.set_progress_bar_config(disable=True)
            start = time.perf_counter()
            images[name] = pipe(
                prompt,
                num_inference_steps=steps,
                height=size,
                width=size,
                output_type="np",
                generator=torch.Generator("cpu").manual_seed(0),
            ).images[0]
            if r:
                times[name].append(time.perf_counter() - start)
    fp32, bf16 = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
    return {
        "float32_median_s": fp32,
        "bfloat16_median_s": bf16,
        "bf16_speedup": fp32 / bf16,
        "mean_abs_pixel_diff_0_255": float(abs(images["float32"] - images["bfloat16"]).mean() * 255),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
    }


def measure_app(steps: int, repeats: int, prompt: str) -> dict:
    """Library vs app round trip for one generation of the built-in model, and the cost of a re-render.

    The library run records what the app's run records by default (the research records `keep_queries`
    and `self_attention` included), so the ratio is what the page adds; `library_plain` is the library's
    own default, without them.

    The app is timed through `gradio_client` twice: until the response has arrived (images as
    URLs; `Client(download_files=False)`), and with the client downloading the images too (the
    default `Client`). A no-op endpoint on a bare Gradio server gives the floor of a round trip.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from gradio_client import Client

    from . import generate, load_pipeline
    from .settings import Settings
    from .ui import Models, build_app, default_choices, launch
    from .ui.panels import words
    from .ui.session import Session

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    models = Models(default_choices(), loaded={"toy": pipe})
    demo = build_app(models)
    _, url, _ = launch(demo, prevent_thread_lock=True, quiet=True)
    with gr.Blocks(analytics_enabled=False) as bare:
        text = gr.Textbox()
        gr.Button().click(lambda x: x, text, text, api_name="echo")
    _, bare_url, _ = bare.launch(prevent_thread_lock=True, quiet=True)
    client, fetching, echo = (Client(url, verbose=False, download_files=False), Client(url, verbose=False),
                              Client(bare_url, verbose=False))  # fmt: skip
    settings = Settings(prompt, steps=steps, guidance=4.0, seed=0, width=64, height=64, scheduler="DDIM")
    form = dict(model="toy", prompt=prompt, negative_prompt="", scheduler="DDIM", steps=steps, guidance=4.0, seed="0",
                random_seed=False, width=64, height=64, keep_heads=False)  # fmt: skip
    view = dict(negative=False, opacity=0.5, colormap="jet", from_step=1, to_step=steps, blocks=["down", "mid", "up"],
                resolutions=[], layers=[], head=-1)  # fmt: skip
    times = {key: [] for key in ("library", "library_plain", "app", "app_download", "handler", "heatmap",
                                 "heatmap_download", "echo")}  # fmt: skip

    def timed(key, fn):
        start = time.perf_counter()
        out = fn()
        times[key].append(time.perf_counter() - start)
        return out

    try:
        client.predict(**form, api_name="/generate")  # warm-up: first requests pay for imports and caches
        fetching.predict(**form, api_name="/generate")
        for i in range(repeats):
            order = ["library", "library_plain", "app", "app_download"]
            for key in order[i % 4 :] + order[: i % 4]:  # rotate which goes first, so drift cancels
                if key == "library":
                    with models.using("toy"):
                        image, run = timed(
                            key, lambda: generate(pipe, settings, keep_queries=True, self_attention=True)
                        )
                elif key == "library_plain":
                    with models.using("toy"):
                        timed(key, lambda: generate(pipe, settings))
                else:
                    caller = client if key == "app" else fetching
                    timed(key, lambda caller=caller: caller.predict(**form, api_name="/generate"))
        session = Session(run, np.asarray(image), "toy", 0, 0.0, settings, "toy")
        word = run.words[1].text
        for _ in range(repeats * 4):
            timed("handler", lambda: words.heatmap(word, **view, session=session))
            timed("heatmap", lambda: client.predict(word=word, **view, api_name="/heatmap"))
            timed("heatmap_download", lambda: fetching.predict(word=word, **view, api_name="/heatmap"))
            timed("echo", lambda: echo.predict("x", api_name="/echo"))
    finally:
        for c in (client, fetching, echo):
            c.close()
        demo.close()
        bare.close()
    med = {key: statistics.median(values) for key, values in times.items()}
    return {
        "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(), "prompt": prompt,
        "library_median_s": med["library"], "library_plain_median_s": med["library_plain"], "app_median_s": med["app"],
        "app_download_median_s": med["app_download"], "app_over_library": med["app"] / med["library"],
        "app_download_over_library": med["app_download"] / med["library"],
        "heatmap_handler_median_ms": 1000 * med["handler"], "heatmap_round_trip_median_ms": 1000 * med["heatmap"],
        "heatmap_download_median_ms": 1000 * med["heatmap_download"], "gradio_floor_median_ms": 1000 * med["echo"],
    }  # fmt: skip


def measure_previews(prompts: list[str], steps: int) -> dict:
    """How far the built-in model's fast linear preview is from the exact VAE decode of the same latent,
    per pixel and channel (0–255), over every step's x0 of one run per prompt; and what a decode costs."""
    from . import generate, load_pipeline
    from .preview import previewer
    from .settings import Settings

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    chosen = previewer(pipe)
    means, worst, last, decode_s = [], [], [], []
    for i, prompt in enumerate(prompts):
        image, run = generate(pipe, Settings(prompt, steps=steps, guidance=4.0, seed=i, width=64, height=64,
                                             scheduler="DDIM"))  # fmt: skip
        for step in range(run.num_steps):
            start = time.perf_counter()
            exact = run.decode(step, pipe.vae).astype(float)  # [H, W, 3]
            decode_s.append(time.perf_counter() - start)
            size = exact.shape[1], exact.shape[0]
            linear = np.asarray(Image.fromarray(run.preview(step)).resize(size, Image.BILINEAR)).astype(float)
            err = np.abs(exact - linear)
            means.append(err.mean())
            worst.append(err.mean(axis=2).max())
        last.append(means[-1])
    return {
        "prompts": len(prompts), "steps": steps, "previewer": chosen.kind,
        "linear_mean_error": float(np.mean(means)), "linear_worst_image_mean_error": float(np.max(means)),
        "linear_last_step_mean_error": float(np.mean(last)), "linear_worst_pixel_error": float(np.median(worst)),
        "exact_decode_ms": 1000 * statistics.median(decode_s),
    }  # fmt: skip


def _busy(stop):  # a competing process: one core kept busy in pure Python, like a web server under load
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def measure_threads(repeats: int) -> dict:
    """Median seconds of the built-in model's 20-step generation (guidance on) and of one SD1.5-size U-Net
    step (random weights, 32×32 latent, batch 2), with 1 and 2 torch threads, on a quiet machine and with
    one other busy process — interleaved, so the conditions alternate."""
    import multiprocessing

    from . import generate, load_pipeline
    from .settings import Settings

    toy = load_pipeline("toy")
    toy.set_progress_bar_config(disable=True)
    settings = Settings("a red circle on the left and a blue square", steps=20, guidance=4.0, width=64, height=64,
                        scheduler="DDIM")  # fmt: skip
    unet = build_random_pipeline("sd1", full=True).unet.eval()
    sample, context = torch.randn(2, 4, 32, 32), torch.randn(2, 77, unet.config.cross_attention_dim)

    def sd_step():
        with torch.no_grad():
            unet(sample, 500, encoder_hidden_states=context)

    jobs = {"toy 20 steps": lambda: generate(toy, settings), "SD1.5 U-Net step": sd_step}
    times: dict[tuple, list] = {}
    for load in ("quiet", "busy"):
        stop = multiprocessing.Event()
        rival = multiprocessing.Process(target=_busy, args=(stop,), daemon=True) if load == "busy" else None
        if rival:
            rival.start()
        try:
            for _ in range(repeats):
                for name, job in jobs.items():
                    for threads in (1, 2):
                        torch.set_num_threads(threads)
                        if (name, threads, load) not in times:  # warm-up, once per condition
                            job()
                        start = time.perf_counter()
                        job()
                        times.setdefault((name, threads, load), []).append(time.perf_counter() - start)
        finally:
            stop.set()
            if rival:
                rival.join()
    return {f"{name} | {threads} thread{'s' * (threads > 1)} | {load}": statistics.median(values)
            for (name, threads, load), values in times.items()}  # fmt: skip


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_research(full: bool, memory_size: int, memory_steps: int, prompt: str, repeats: int) -> dict:
    """What the research records cost (issue 14): the memory of `keep_queries=True` and `self_attention=True`
    at their defaults for SD 1.5 at `memory_size`², scaled from a 2-step run to `memory_steps` (every step
    keeps tensors of the same shapes), and the time of `run.attend` — on that run (per step) and on the
    built-in model (20 steps, median of `repeats`)."""
    from . import load_pipeline

    pipe = build_random_pipeline("sd1", full=full)
    pipe.set_progress_bar_config(disable=True)
    probe = 2
    kwargs = dict(num_inference_steps=probe, height=memory_size, width=memory_size, guidance_scale=7.5,
                  output_type="latent")  # fmt: skip
    with trace(pipe, keep_queries=True, self_attention=True) as tracer:
        pipe(prompt, generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    run = tracer.result
    recorded = run.num_steps  # PNDM, the SD 1.5 scheduler, records one step more than asked
    queries = _bytes(run.queries.values()) / recorded * memory_steps
    self_attention = _bytes(run.self_attention.values()) / recorded * memory_steps
    from .queries import encode_text

    text = "a zebra under a green tree"
    encode_text(pipe, text)  # warm-up
    start = time.perf_counter()
    encode_text(pipe, text)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    run.attend(pipe, text)
    attend_sd_per_step = max(0.0, time.perf_counter() - start - encode_s) / recorded  # the text is encoded once
    sd_error = _own_prompt_error(run, pipe, prompt)
    toy = load_pipeline("toy")
    toy.set_progress_bar_config(disable=True)
    with trace(toy, keep_queries=True) as tracer:
        toy(prompt, num_inference_steps=20, guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(0))
    toy_run = tracer.result
    toy_error = _own_prompt_error(toy_run, toy, prompt)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        toy_run.attend(toy, "a green triangle")
        times.append(time.perf_counter() - start)
    return {
        "width": "full" if full else "tiny", "memory_size": memory_size, "memory_steps": memory_steps,
        "threads": torch.get_num_threads(),
        "query_layers": len(run.queries), "layers": len(run.layers),
        "query_sides": sorted({la.height for la in run.layers if la.name in run.queries}),
        "queries_mb": queries / 1e6, "queries_mib": queries / 2**20,
        "self_attention_layers": len(run.self_layers),
        "self_attention_sides": sorted({la.height for la in run.self_layers}),
        "self_attention_mb": self_attention / 1e6, "self_attention_mib": self_attention / 2**20,
        "attend_sd15_encode_s": encode_s, "attend_sd15_per_step_s": attend_sd_per_step,
        "attend_sd15_50_steps_s": encode_s + attend_sd_per_step * memory_steps,
        "attend_toy_20_steps_median_ms": 1000 * statistics.median(times),
        "own_prompt_error_of_peak_sd15": sd_error, "own_prompt_error_of_peak_toy": toy_error,
    }  # fmt: skip


def _own_prompt_error(run, pipe, prompt: str) -> float:
    """The largest |attend(own prompt) − recorded| over every word's heatmap, as a share of that word's peak."""
    again = run.attend(pipe, prompt)
    kept = [layer.name for layer in again.layers]
    worst = 0.0
    for word in run.words:
        recorded = run.heatmap(list(word.tokens), layers=kept)
        worst = max(worst, float(abs(again.heatmap(list(word.tokens)) - recorded).max() / recorded.max()))
    return worst


def _save(fig: dict, path: str | None) -> int:
    """Also write the figures to `path` (--json), when given."""
    if path:
        with open(path, "w") as f:
            json.dump(fig, f, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdviz.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=FAMILIES, default="sd1")
    parser.add_argument("--full", action="store_true", help="real widths (SD1.5: 860 M UNet parameters)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels for the timing runs")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each kind (interleaved)")
    parser.add_argument("--prompt", default=TEN_WORDS, help="default: a 10-word prompt")
    parser.add_argument("--memory-size", type=int, default=512)
    parser.add_argument("--memory-steps", type=int, default=50)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--dtypes",
        action="store_true",
        help="instead: time fp32 against bf16 generations (interleaved) and compare their images",
    )
    parser.add_argument(
        "--app",
        action="store_true",
        help="instead: the app's /generate against the library's generate (built-in model), and /heatmap",
    )
    parser.add_argument(
        "--previews",
        action="store_true",
        help="instead: the built-in model's linear preview against the exact VAE decode, over held-out captions",
    )
    parser.add_argument(
        "--thread-counts",
        action="store_true",
        help="instead: 1 vs 2 threads, quiet vs one other busy process, built-in model and an SD1.5-size U-Net",
    )
    parser.add_argument(
        "--research",
        action="store_true",
        help="instead: the memory of keep_queries and self_attention at their defaults (SD 1.5 architecture at "
        "--memory-size, scaled to --memory-steps; with --full at real width) and the time of run.attend",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.research:
        fig = measure_research(args.full, args.memory_size, args.memory_steps, args.prompt, args.repeats)
        print(
            f"SD1.5 architecture ({fig['width']} width) at {fig['memory_size']}², {fig['memory_steps']} steps, "
            f"{fig['threads']} threads:\n"
            f"  keep_queries: {fig['query_layers']} of {fig['layers']} cross-attention layers (sides "
            f"{fig['query_sides']}): {fig['queries_mb']:.1f} MB ({fig['queries_mib']:.1f} MiB)\n"
            f"  self_attention: {fig['self_attention_layers']} layers (sides {fig['self_attention_sides']}): "
            f"{fig['self_attention_mb']:.1f} MB ({fig['self_attention_mib']:.1f} MiB)\n"
            f"  run.attend: {fig['attend_sd15_encode_s'] * 1000:.0f} ms to encode the text + "
            f"{fig['attend_sd15_per_step_s'] * 1000:.1f} ms a step ({fig['attend_sd15_50_steps_s']:.2f} s for "
            f"{fig['memory_steps']} steps); built-in model, 20 steps: "
            f"{fig['attend_toy_20_steps_median_ms']:.1f} ms (median of {args.repeats})\n"
            f"  attend with the run's own prompt: every word's heatmap within "
            f"{fig['own_prompt_error_of_peak_sd15']:.1e} (SD 1.5 architecture) / "
            f"{fig['own_prompt_error_of_peak_toy']:.1e} (built-in model) of its peak"
        )
        return _save(fig, args.json)
    if args.thread_counts:
        fig = measure_threads(args.repeats)
        print(f"medians of {args.repeats} runs each (load average before: {os.getloadavg()[0]:.1f}):")
        for key, seconds in fig.items():
            print(f"  {key}: {seconds:.3f} s")
        return _save(fig, args.json)
    if args.previews:
        from .toy.world import heldout_captions

        fig = measure_previews(heldout_captions(args.repeats), args.steps)
        print(
            f"built-in model, {fig['prompts']} held-out captions × {fig['steps']} steps, every step's x0: the fast "
            f"linear map differs from the exact VAE decode by {fig['linear_mean_error']:.1f}/255 on average "
            f"(worst image {fig['linear_worst_image_mean_error']:.1f}/255, "
            f"last step {fig['linear_last_step_mean_error']:.1f}/255; "
            f"median of each image's worst pixel {fig['linear_worst_pixel_error']:.0f}/255). An exact decode costs "
            f"{fig['exact_decode_ms']:.1f} ms, so the app, CLI and report show '{fig['previewer']}' pictures (0/255)."
        )
        return _save(fig, args.json)
    if args.app:
        fig = measure_app(args.steps, args.repeats, args.prompt)
        print(
            f"built-in model, {fig['steps']} steps, {fig['threads']} threads, {fig['repeats']} interleaved runs each:\n"
            f"  library generate {fig['library_median_s']:.2f} s; app /generate {fig['app_median_s']:.2f} s "
            f"(×{fig['app_over_library']:.2f}), {fig['app_download_median_s']:.2f} s with the client downloading "
            f"the images (×{fig['app_download_over_library']:.2f}); the library without the research records "
            f"(its default): {fig['library_plain_median_s']:.2f} s\n"
            f"  /heatmap: {fig['heatmap_handler_median_ms']:.1f} ms in the handler, "
            f"{fig['heatmap_round_trip_median_ms']:.0f} ms round trip ({fig['heatmap_download_median_ms']:.0f} ms "
            f"with the download); a bare Gradio no-op round trip: {fig['gradio_floor_median_ms']:.0f} ms"
        )
        return _save(fig, args.json)
    if args.dtypes:
        fig = measure_dtypes(args.family, args.full, args.size, args.steps, args.repeats, args.prompt)
        print(
            f"{args.family} ({'full' if args.full else 'tiny'} width), {args.size}² × {args.steps} steps, "
            f"{torch.get_num_threads()} threads, AMX {'yes' if fig['amx'] else 'no'}: fp32 median "
            f"{fig['float32_median_s']:.2f} s, bf16 median {fig['bfloat16_median_s']:.2f} s "
            f"(bf16 ×{fig['bf16_speedup']:.2f} faster), mean |fp32 − bf16| pixel difference "
            f"{fig['mean_abs_pixel_diff_0_255']:.1f}/255"
        )
        return _save(fig, args.json)
    fig = measure(
        args.family,
        args.full,
        args.size,
        args.steps,
        args.repeats,
        args.prompt,
        args.memory_size,
        args.memory_steps,
        getattr(torch, args.dtype),
    )
    print(
        f"{fig['family']} ({fig['width']} width, {fig['dtype']}, {fig['threads']} threads), "
        f"{fig['size']}² × {fig['steps']} steps, {fig['repeats']} interleaved runs each:"
    )
    print(
        f"  untraced median {fig['untraced_median_s']:.3f} s   traced median {fig['traced_median_s']:.3f} s   "
        f"ratio {fig['ratio_of_medians']:.3f} (median of paired ratios {fig['median_of_paired_ratios']:.3f})"
    )
    print(
        f"  trace memory at {fig['memory_size']}², {fig['memory_steps']} steps, {fig['tokens_kept']} tokens kept, "
        f"{fig['layers']} layers: {fig['trace_mb']:.1f} MB (of which the U-Net's two predictions before "
        f"guidance: {fig['trace_mb_inside_steps']:.1f} MB)"
    )
    return _save(fig, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
