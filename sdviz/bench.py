"""What tracing costs, and what the app adds: `python -m sdviz.bench --family sd1 --full --size 256 --steps 10`.

Times traced and untraced generations interleaved in one process (median of --repeats each, order
alternating so drift cancels) and reports the memory a trace holds. Memory is measured on a short
run at --memory-size and scaled to --memory-steps: every step stores tensors of the same shapes; what a
trace holds once (the text vectors, the last latent) is counted once.

`--app` instead serves the web app in-process on the built-in model and times, interleaved, the
library's `sdviz.generate` against the app's `/generate` through `gradio_client` (same settings), and
a `/heatmap` re-render: in the handler alone and as an HTTP round trip.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

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

    The app is timed through `gradio_client` twice: until the response has arrived (images as
    URLs; `Client(download_files=False)`), and with the client downloading the images too (the
    default `Client`). A no-op endpoint on a bare Gradio server gives the floor of a round trip.
    """
    import os

    import numpy as np

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
    times = {key: [] for key in ("library", "app", "app_download", "handler", "heatmap", "heatmap_download", "echo")}

    def timed(key, fn):
        start = time.perf_counter()
        out = fn()
        times[key].append(time.perf_counter() - start)
        return out

    try:
        client.predict(**form, api_name="/generate")  # warm-up: first requests pay for imports and caches
        fetching.predict(**form, api_name="/generate")
        for i in range(repeats):
            order = ["library", "app", "app_download"]
            for key in order[i % 3 :] + order[: i % 3]:  # rotate which goes first, so drift cancels
                if key == "library":
                    with models.using("toy"):
                        image, run = timed(key, lambda: generate(pipe, settings))
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
        "library_median_s": med["library"], "app_median_s": med["app"],
        "app_download_median_s": med["app_download"], "app_over_library": med["app"] / med["library"],
        "app_download_over_library": med["app_download"] / med["library"],
        "heatmap_handler_median_ms": 1000 * med["handler"], "heatmap_round_trip_median_ms": 1000 * med["heatmap"],
        "heatmap_download_median_ms": 1000 * med["heatmap_download"], "gradio_floor_median_ms": 1000 * med["echo"],
    }  # fmt: skip


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
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.app:
        fig = measure_app(args.steps, args.repeats, args.prompt)
        print(
            f"built-in model, {fig['steps']} steps, {fig['threads']} threads, {fig['repeats']} interleaved runs each:\n"
            f"  library generate {fig['library_median_s']:.2f} s; app /generate {fig['app_median_s']:.2f} s "
            f"(×{fig['app_over_library']:.2f}), {fig['app_download_median_s']:.2f} s with the client downloading "
            f"the images (×{fig['app_download_over_library']:.2f})\n"
            f"  /heatmap: {fig['heatmap_handler_median_ms']:.1f} ms in the handler, "
            f"{fig['heatmap_round_trip_median_ms']:.0f} ms round trip ({fig['heatmap_download_median_ms']:.0f} ms "
            f"with the download); a bare Gradio no-op round trip: {fig['gradio_floor_median_ms']:.0f} ms"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(fig, f, indent=2)
        return 0
    if args.dtypes:
        fig = measure_dtypes(args.family, args.full, args.size, args.steps, args.repeats, args.prompt)
        print(
            f"{args.family} ({'full' if args.full else 'tiny'} width), {args.size}² × {args.steps} steps, "
            f"{torch.get_num_threads()} threads, AMX {'yes' if fig['amx'] else 'no'}: fp32 median "
            f"{fig['float32_median_s']:.2f} s, bf16 median {fig['bfloat16_median_s']:.2f} s "
            f"(bf16 ×{fig['bf16_speedup']:.2f} faster), mean |fp32 − bf16| pixel difference "
            f"{fig['mean_abs_pixel_diff_0_255']:.1f}/255"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(fig, f, indent=2)
        return 0
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
