"""The command line: `python -m sdviz "a red circle above a blue square" --out DIR` writes a run's handout.

For one prompt or a batch (`--prompts FILE`, one per line): the final image, a heatmap per word and a
grid, the x0 step strip, the latent channels, the schedule and attention-over-time plots, the trace
file and a self-contained report.html. A batch goes on past a failing prompt and reports it at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import loading, preview, report
from . import settings as check
from .batch import Index, Processes, job_key
from .generate import Settings, generate
from .loading import PRESETS, load_pipeline, pick_device
from .random_models import FAMILIES, build_random_pipeline

EXAMPLES = """\
examples:
  python -m sdviz "a red circle above a blue square" --out handout
  python -m sdviz "a red circle" --steps 30 --guidance 3 --seed 7 --words red,circle --out red-circle
  python -m sdviz "an astronaut riding a horse" --model sd15 --size 512 --scheduler "DPM++ 2M" --out astro
  python -m sdviz --prompts prompts.txt --out batch          # one folder per prompt: batch/01-a-red-circle/ …
  accelerate launch -m sdviz --prompts prompts.txt --out batch   # the same, the prompts shared among processes
  python -m sdviz "a cat" --model random-sd1 --size 64 --steps 3 --out /tmp/smoke   # quick test, random weights

prompts file (--prompts): one prompt per line; blank lines and lines starting with # are skipped. A line may
end with its own settings, which override the command line's for that prompt only:
  a red circle above a blue square
  a red circle above a blue square --seed 1
  a blue square --guidance 1 --negative "red"

written for each prompt (into DIR, or DIR/NN-<prompt>/ in a batch):
  image.png                    the final image
  heatmaps.png                 every word's heatmap over the image, in a grid
  heatmap-NN-<word>.png        one word's heatmap over the image (enlarged to at least 256 px)
  steps.png                    the x0 step strip: the predicted final image at evenly spaced steps
  latent-rgb.png               the final latent, channels 0-2 as red, green, blue
  latent-channels.png          every latent channel in grey
  schedule.png                 timestep, sigma and alpha-bar at each step
  attention-over-time.png      each word's share of attention at each step
  step-anatomy.png             one step taken apart: x_t, the U-Net's two predictions, guidance, x0, the next
                               latent (--anatomy-step; default the middle step)
  guidance.png                 how much the prompt changes the predicted noise at each step (guidance runs)
  text-embedding.png           the prompt's 77 token vectors as an image
  trace.safetensors            everything recorded (load with sdviz.TraceResult.load)
  report.html                  one self-contained page with all of the above, explained; opens offline

a batch also writes DIR/index.jsonl, one JSON line per prompt written: prompt, settings, seed, model, the rank
that made it, the paths written and each word's peak and mass; running the same command again skips the prompts
already in it. Under `accelerate launch` each process takes its share of the prompts.

forward diffusion and the training loss on an image of your own (python -m sdviz noise --help):
  python -m sdviz noise photo.png --prompt "a red circle" --timestep 500 --out noised

exit status: 0 when every prompt was written, 1 when some failed (listed at the end), 2 for a usage or model
error, 130 when interrupted.
"""


def _size(text: str) -> tuple[int, int]:
    """ "512" → (512, 512); "768x512" → (width 768, height 512)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×X*]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be N or WxH in pixels, e.g. 512 or 768x512; got {text!r}")
    width = int(m.group(1))
    return width, int(m.group(2) or width)


def _scheduler(text: str) -> str:
    try:
        return check.scheduler_name(text)  # "euler-a" finds "Euler a"
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_settings(parser: argparse.ArgumentParser, default=None):
    """The per-prompt settings, shared by the command line and the settings at the end of a prompts-file line."""
    parser.add_argument(
        "--steps", type=int, default=default, metavar="N", help="denoising steps (default: the model preset's, else 20)"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=default,
        metavar="SCALE",
        help="classifier-free guidance scale; 0-1 turns guidance off (default: the preset's, else 7.5)",
    )
    parser.add_argument(
        "--seed", type=int, default=default, metavar="N", help="random seed of the starting noise (default 0)"
    )
    parser.add_argument(
        "--scheduler",
        type=_scheduler,
        default=default,
        metavar="NAME",
        help="DDIM, DDPM, Euler, 'Euler a', 'DPM++ 2M', PNDM, LMS or UniPC; case and spaces don't "
        "matter (default: the preset's, else the model's own)",
    )
    parser.add_argument(
        "--size",
        type=_size,
        default=default,
        metavar="N|WxH",
        help="image size in pixels, multiples of 8: 512 or 768x512 (default: the model's)",
    )
    parser.add_argument(
        "--negative", default=default, metavar="TEXT", help="negative prompt: what the image should not look like"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdviz",
        description="Trace Stable Diffusion generations and write a handout per prompt: per-word attention\n"
        "heatmaps, the step-by-step x0 previews, the latent, the noise schedule and a self-contained\n"
        "report.html that explains them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", nargs="?", help="the prompt (or give --prompts FILE for a batch)")
    parser.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="a text file with one prompt per line (see below); writes one folder per prompt",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("sdviz-out"),
        metavar="DIR",
        help="folder to write into, created if needed (default: ./sdviz-out)",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="a preset (toy, sd15, sd21-base, sd21, sd-turbo, sdxl), a Hugging Face Hub id, a local "
        "diffusers folder, or random-sd1 / random-sd2-base / random-sd2-v / random-sd-turbo / "
        "random-sdxl: tiny random-weight pipelines for testing (their pictures are noise). "
        "Default: toy, the built-in offline shapes model",
    )
    _add_settings(parser)
    parser.add_argument(
        "--words",
        action="append",
        metavar="W1,W2",
        help="draw only these words' heatmaps (comma-separated, or repeat the option); in a batch, "
        "each prompt draws those it contains (default: every word)",
    )
    parser.add_argument(
        "--anatomy-step",
        type=int,
        metavar="N",
        help="the step (1-based) whose anatomy step-anatomy.png and the report show (default: the middle step)",
    )
    parser.add_argument("--device", metavar="NAME", help="cuda, mps or cpu (default: the best available)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="weights' precision (default: float16 on GPUs; float32 on CPU, or bfloat16 for large "
        "models on CPUs with AMX)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: 1 for small models such as the built-in one, every core for large "
        "ones; also SDVIZ_THREADS). One thread is fastest on a shared CPU",
    )
    return parser


class _LineParser(argparse.ArgumentParser):
    """Parses the settings at the end of a prompts-file line; raises ValueError instead of exiting."""

    def error(self, message):
        raise ValueError(message)


_OWN_SETTINGS = re.compile(r"\s(?=--[a-z])")  # where a line's own settings begin: " --seed 3"


def split_line(line: str) -> tuple[str, dict]:
    """ "a red circle --seed 3" → ("a red circle", {"seed": 3}). ValueError for settings it can't read."""
    parts = _OWN_SETTINGS.split(" " + line.strip(), maxsplit=1)
    prompt = parts[0].strip()
    if len(parts) == 1:
        return prompt, {}
    parser = _LineParser(prog="a prompts-file line", add_help=False)
    _add_settings(parser, default=argparse.SUPPRESS)
    return prompt, vars(parser.parse_args(shlex.split(parts[1])))


def line_prompt(line: str) -> str:
    """The prompt part of a prompts-file line (what comes before its own settings)."""
    return _OWN_SETTINGS.split(" " + line.strip(), maxsplit=1)[0].strip()


@dataclasses.dataclass
class Job:
    number: int  # 1-based position among the prompts
    line: int | None  # line number in the prompts file; None for the prompt given on the command line
    text: str  # the prompt, or the file's line as written (prompt and its own settings)
    out: Path


def read_jobs(args) -> list[Job]:
    if args.prompts is None:
        return [Job(1, None, args.prompt, args.out)]
    try:
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise SystemExit(f"error: can't read the prompts file: {err}") from None
    kept = [(i, line.strip()) for i, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not kept:
        raise SystemExit(f"error: {args.prompts} has no prompts (blank lines and # comments are skipped)")
    width = max(2, len(str(len(kept))))
    return [
        Job(n, i, text, args.out / f"{n:0{width}d}-{report.slug(line_prompt(text))}")
        for n, (i, text) in enumerate(kept, 1)
    ]


def default_settings(args, model: str):
    """The command line's settings, with the model preset's defaults for those not given."""
    preset = PRESETS.get(model)
    size = args.size or ((preset.size, preset.size) if preset else (None, None))
    return Settings(
        prompt="",
        negative_prompt=args.negative or "",
        steps=args.steps if args.steps is not None else (preset.steps if preset else 20),
        guidance=args.guidance if args.guidance is not None else (preset.guidance if preset else 7.5),
        seed=args.seed if args.seed is not None else 0,
        width=size[0],
        height=size[1],
        scheduler=args.scheduler or (preset.scheduler if preset else None),
    )


def job_settings(base, job: Job):
    """`base` with the job's prompt and the settings written at the end of its line; checked (ValueError says
    what to fix). A prompt given on the command line is taken as it is."""
    prompt, own = split_line(job.text) if job.line is not None else (job.text.strip(), {})
    if not prompt:
        raise ValueError("the line has settings but no prompt")
    if "size" in own:
        own["width"], own["height"] = own.pop("size")
    if "negative" in own:
        own["negative_prompt"] = own.pop("negative")
    settings = dataclasses.replace(base, prompt=prompt, **own)
    settings.check()
    return settings


def choose_model(name: str | None) -> str:
    if name:
        return name
    if (loading.TOY_MODEL_DIR / "model_index.json").is_file():
        return "toy"
    raise SystemExit(
        f"error: no --model given and the built-in toy model is not installed "
        f"({loading.TOY_MODEL_DIR} has no model_index.json; train it with `python -m sdviz.toy.train`). "
        f"Pass --model: a preset "
        f"({', '.join(PRESETS)}), a Hub id, a local diffusers folder, or random-sd1 to test with "
        f"random weights."
    )


def open_model(name: str, device: str | None, dtype: str | None):
    torch_dtype = getattr(torch, dtype) if dtype else None
    if name.startswith("random-"):
        family = name[len("random-") :]
        if family not in FAMILIES:
            raise SystemExit(
                f"error: unknown test model {name!r}; choose one of " + ", ".join(f"random-{f}" for f in FAMILIES)
            )
        pipe = build_random_pipeline(family).to(pick_device(device))
        if torch_dtype not in (None, torch.float32):
            pipe = pipe.to(torch_dtype)
    else:
        try:
            pipe = load_pipeline(name, device=device, dtype=torch_dtype)
        except (FileNotFoundError, RuntimeError, TypeError) as err:
            raise SystemExit(f"error: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reproduce(settings, model: str) -> str:
    """The command line that makes this run again."""
    parts = [
        "python -m sdviz",
        shlex.quote(settings.prompt),
        "--model",
        shlex.quote(model),
        "--steps",
        str(settings.steps),
        "--guidance",
        f"{settings.guidance:g}",
        "--seed",
        str(settings.seed),
    ]
    if settings.scheduler:
        parts += ["--scheduler", shlex.quote(settings.scheduler)]
    if settings.width and settings.height:
        parts += ["--size", f"{settings.width}x{settings.height}"]
    if settings.negative_prompt:
        parts += ["--negative", shlex.quote(settings.negative_prompt)]
    return " ".join(parts)


def present_words(run, wanted: list[str] | None) -> list[str] | None:
    """The wanted words this prompt contains (None: all words). ValueError if it contains none of them."""
    if not wanted:
        return None
    found, missing = [], []
    for word in wanted:
        try:
            run.token_indices(word)
            found.append(word)
        except KeyError:
            missing.append(word)
    listing = ", ".join(w.text for w in run.words)
    if not found:
        raise ValueError(f"the prompt contains none of --words {', '.join(wanted)}; its words are: {listing}")
    if missing:
        tqdm.write(
            f"note: {run.prompt!r} has no word {', '.join(missing)}; drawing {', '.join(found)}", file=sys.stderr
        )
    return found


def write_outputs(
    out: Path, run, image, settings, model: str, words, extra: dict, previewer=None, anatomy_step=None
) -> list[Path]:
    """Every file of one prompt's handout, in `out` (step pictures drawn by `previewer`; `anatomy_step`:
    1-based, None for the middle step)."""
    out.mkdir(parents=True, exist_ok=True)
    if anatomy_step is not None and not 1 <= anatomy_step <= run.num_steps:
        raise ValueError(f"--anatomy-step {anatomy_step}: this run has steps 1–{run.num_steps}")
    step = None if anatomy_step is None else anatomy_step - 1
    pictures = report.handout_images(run, image, words, previewer=previewer, anatomy_step=step)
    written = []
    for name, picture in pictures.items():
        picture.save(out / name)
        written.append(out / name)
    written.append(run.save(out / "trace.safetensors"))
    info = dataclasses.asdict(settings) | {"model": model}
    written.append(report.write_report(out / "report.html", run, image, info, extra, words, pictures, previewer, step))
    return written


def run_job(
    pipe,
    job: Job,
    base,
    model: str,
    wanted,
    device_label: str,
    nested: bool,
    previewer=None,
    index=None,
    processes=None,
    anatomy_step=None,
) -> list[Path]:
    """Generate one prompt (a step progress bar below the prompts bar when `nested`) and write its handout
    (step pictures drawn by `previewer`, the anatomy of `anatomy_step`); in a batch, add its record to the
    `index` (sdviz.batch)."""
    settings = job_settings(base, job)
    bar = tqdm(total=settings.steps, desc="steps", unit="step", leave=False, position=int(nested))

    def on_step(step, total, latents):
        bar.total = total
        bar.update(1)

    start = time.perf_counter()
    try:
        image, run = generate(pipe, settings, on_step=on_step)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    words = present_words(run, wanted)
    extra = {
        "Device": device_label,
        "Generation time": f"{seconds:.1f} s",
        "Reproduce with": reproduce(settings, model),
    }
    written = write_outputs(job.out, run, image, settings, model, words, extra, previewer, anatomy_step)
    if index is not None:
        index.add(
            index.record(
                key=job_key(settings, model),
                number=job.number,
                line=job.line,
                settings=settings,
                model=model,
                processes=processes,
                paths=written,
                run=run,
                seconds=seconds,
            )
        )
    return written


def _pending(jobs: list[Job], base, model: str, index: Index) -> list[Job]:
    """The jobs of a batch not yet in its index (a line whose settings don't parse stays, to fail and be reported)."""
    done = index.done()
    todo = []
    for job in jobs:
        try:
            key = job_key(job_settings(base, job), model)
        except ValueError:
            key = None
        if key not in done:
            todo.append(job)
    return todo


def main(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: sys.argv[1:]) and return the exit status.

    Usage errors exit through argparse (SystemExit with status 2), as `--help` does with 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["noise"]:  # `python -m sdviz noise IMAGE …`: forward diffusion of an image (sdviz.noise_cli)
        from .noise_cli import main as noise_main

        return noise_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.prompts is None):
        parser.error("give one prompt, or --prompts FILE for a batch (not both)")
    if args.prompt is not None and not args.prompt.strip():
        parser.error('the prompt is empty: type what the image should show, e.g. "a red circle"')
    try:
        return _run(args, parser)
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            return 2
        raise


def _run(args, parser) -> int:
    model = choose_model(args.model)
    base = default_settings(args, model)
    try:
        dataclasses.replace(base, prompt="check").check()
    except ValueError as err:
        parser.error(str(err))
    wanted = [w.strip() for item in (args.words or []) for w in item.split(",") if w.strip()] or None
    jobs = read_jobs(args)
    batch = args.prompts is not None
    # A batch: leave out what the index says is done, then take this process's share (sdviz.batch).
    processes, index = (Processes.start(), Index(args.out)) if batch else (Processes(), None)
    if batch:
        todo = _pending(jobs, base, model, index)
        processes.wait()  # every rank has read the index before any rank appends to it
        if len(todo) < len(jobs) and processes.rank == 0:
            print(f"skipping {len(jobs) - len(todo)} prompt(s) already in {index.path}", file=sys.stderr)
        jobs = processes.share(todo)

    pipe = open_model(model, args.device or processes.device, args.dtype)
    try:
        threads = loading.pick_threads(pipe, args.threads)
    except ValueError as err:
        parser.error(str(err))
    param = next(pipe.unet.parameters())
    device_label = f"{param.device.type}, {str(param.dtype).replace('torch.', '')}"
    if param.device.type == "cpu":
        device_label += f", {threads} thread{'s' if threads != 1 else ''}"
    pictures = preview.previewer(pipe)  # how step pictures are drawn: the VAE when cheap, TAESD, or the linear map
    failures: list[tuple[Job, str]] = []
    jobs_bar = tqdm(jobs, desc="prompts", unit="prompt", disable=not batch or processes.rank > 0, position=0)
    try:
        for job in jobs_bar:
            try:
                with loading.cpu_threads(threads):
                    run_job(
                        pipe,
                        job,
                        base,
                        model,
                        wanted,
                        device_label,
                        nested=batch,
                        previewer=pictures,
                        index=index,
                        processes=processes,
                        anatomy_step=args.anatomy_step,
                    )
            except Exception as err:  # a batch goes on; the failure is reported at the end
                failures.append((job, f"{type(err).__name__}: {err}"))
                tqdm.write(f"failed: {_where(job)}: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        jobs_bar.close()
        print(f"interrupted; finished prompts are in {args.out}", file=sys.stderr)
        return 130
    jobs_bar.close()

    done = len(jobs) - len(failures)
    who = f"process {processes.rank} of {processes.count}: " if processes.count > 1 else ""
    print(f"{who}wrote {done} of {len(jobs)} prompt{'s' if len(jobs) != 1 else ''} to {args.out}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} failed:", file=sys.stderr)
        for job, message in failures:
            print(f"  {_where(job)}: {message}", file=sys.stderr)
        return 1
    return 0


def _where(job: Job) -> str:
    return f"line {job.line} ({job.text!r})" if job.line is not None else repr(job.text)


if __name__ == "__main__":
    sys.exit(main())
