"""What tracing costs: `python -m sdviz.bench --family sd1 --full --size 256 --steps 10`.

Times traced and untraced generations interleaved in one process (median of --repeats each, order
alternating so drift cancels) and reports the memory a trace holds. Memory is measured on a short
run at --memory-size and scaled to --memory-steps: every step stores tensors of the same shapes.
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
    per_step = run.nbytes / run.num_steps
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
        "trace_mb": per_step * memory_steps / 2**20,
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
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
        f"{fig['layers']} layers: {fig['trace_mb']:.1f} MB"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
