"""Train several `sdviz.toy.train` recipes side by side on one machine within a time budget.

    python -m sdviz.toy.sweep --out runs --budget 420 --device cuda \\
        --run shapes "--vae-from sdviz/toy/model --batch 256 --shape-loss 1 --shape-read 1" \\
        --run control "--vae-from sdviz/toy/model --batch 256" --evaluate "" --end 580

Made for a lent GPU machine, where a tiny model's step costs about the same at any batch size and several
processes share the GPU well. First every recipe trains a few steps on a few scenes, all at once, to time a
step as they will run together; then each trains from scratch (`--steps` chosen so that its VAE stage, if it
has one, and its UNet stage fit in `--budget` seconds, a round number of steps; the LR schedule then ends
where the run ends). A run still going at `--deadline` is stopped and keeps its last checkpoint.
`OUT/NAME.tar` holds each result (the pipeline folder with its logs, without training states) and
`OUT/sweep.json` what was chosen and measured. The steps written there, given to `python -m sdviz.toy.train`
with the same options, reproduce a run.

With `--evaluate OPTIONS` every result is then evaluated on the same machine's CPUs, all at once
(`python -m sdviz.toy.evaluate OPTIONS`; `--evaluate ""` for the full evaluation), into `OUT/NAME.eval.json`
and `OUT/NAME.eval.txt`: the figures come back with the weights, however long the machine they come back to
keeps them. An evaluation still running at `--end` is stopped and leaves no figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from sdviz.toy import evaluate, train

PROBE = ["--scenes", "2000", "--steps", "60", "--vae-steps", "60", "--vae-full-steps", "10", "--save-every", "0"]


def _launch(options: list[str], out: Path, common: list[str]) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "stdout.log").open("w")
    command = [sys.executable, "-m", "sdviz.toy.train", *options, *common, "--out", str(out)]
    log.write(shlex.join(command) + "\n")
    log.flush()
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _seconds_per_step(log_path: Path, stage: str) -> float | None:
    """Seconds a step of `stage` took between the log's records of steps 0 and 50 (after the first step's
    warm-up of the kernels), None if the log has no such records."""
    if not log_path.exists():
        return None
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    times = {r["step"]: r["seconds"] for r in records if r.get("stage") == stage}
    return (times[50] - times[0]) / 50 if 0 in times and 50 in times else None


def plan(options: list[str], probe_dir: Path, budget: float, safety: float = 0.75) -> dict:
    """The steps a run gets: what is left of `safety` × `budget` after its VAE stage, over its time per UNet
    step. (On an H200 four runs side by side took 5–35 % longer a step than in their timing run, where some
    finish early and leave the GPU to the others: hence the default safety.)"""
    args = train.parse_args(options)
    unet_step = _seconds_per_step(probe_dir / "train_log.jsonl", "unet")
    if unet_step is None:
        raise SystemExit(f"the timing run in {probe_dir} logged no UNet steps 0 and 50: see its stdout.log")
    vae_seconds = 0.0
    if args.vae_from is None:
        crop = _seconds_per_step(probe_dir / "train_log.jsonl", "vae") or 0.0
        # whole-image steps cost about four times a crop's (a quarter of the pixels)
        vae_seconds = crop * (args.vae_steps - args.vae_full_steps + 4 * args.vae_full_steps)
    steps = max(100, int((safety * budget - vae_seconds) / unet_step) // 100 * 100)
    return {"steps": steps, "unet_seconds_per_step": round(unet_step, 4), "vae_seconds": round(vae_seconds, 1)}


def result(run_dir: Path) -> tuple[Path | None, str]:
    """The run's pipeline folder (or, if it was stopped, its last checkpoint; None before the first) and its
    status."""
    if (run_dir / "train_summary.json").exists():
        return run_dir, "finished"
    steps = sorted(run_dir.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not steps:
        return None, "stopped before its first checkpoint"
    return steps[-1], f"stopped; packed {steps[-1].name}"


def pack(run_dir: Path, tar_path: Path) -> str:
    """Tar the run's `result` folder with its logs; the status."""
    logs = [p for p in ("train_log.jsonl", "stdout.log", "train_summary.json") if (run_dir / p).exists()]
    folder, status = result(run_dir)
    with tarfile.open(tar_path, "w") as tar:
        if folder is not None:
            for part in folder.iterdir():
                if part.name not in ("checkpoints", *logs):
                    tar.add(part, arcname=part.name)
        for name in logs:
            tar.add(run_dir / name, arcname=name)
    return status


def _wait(procs: dict, start: float, deadline: float | None) -> None:
    """Wait for `procs` to end; stop those still running `deadline` seconds after `start`."""
    while any(proc.poll() is None for proc in procs.values()):
        if deadline is not None and time.time() - start > deadline:
            for proc in procs.values():
                proc.terminate()
            break
        time.sleep(2)
    for proc in procs.values():
        proc.wait()


def evaluate_all(folders: dict, out: Path, options: list[str], threads: int, start: float, end: float | None):
    """Run `python -m sdviz.toy.evaluate` on each of `folders` (name → pipeline folder) at once, on the CPU,
    into OUT/NAME.eval.json and OUT/NAME.eval.txt; each name's outcome ("evaluated" or why not)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # figures comparable with those measured on CPU machines
    procs = {}
    for name, folder in folders.items():
        command = [sys.executable, "-m", "sdviz.toy.evaluate", "--model", str(folder), "--threads", str(threads)]
        command += [*options, "--json", str(out / f"{name}.eval.json")]
        with (out / f"{name}.eval.txt").open("w") as log:
            log.write(shlex.join(command) + "\n")
            log.flush()
            procs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    _wait(procs, start, end)
    return {
        name: "evaluated"
        if proc.returncode == 0 and (out / f"{name}.eval.json").exists()
        else f"evaluation failed or was stopped (return code {proc.returncode}): see {name}.eval.txt"
        for name, proc in procs.items()
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m sdviz.toy.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the runs, their tars and sweep.json")
    p.add_argument(
        "--run",
        nargs=2,
        action="append",
        required=True,
        metavar=("NAME", "OPTIONS"),
        help="a recipe: its name and its `python -m sdviz.toy.train` options as one string (repeatable)",
    )
    p.add_argument("--budget", type=float, required=True, help="seconds each run's training stages should take")
    p.add_argument(
        "--deadline", type=float, default=None, help="seconds after the start at which unfinished runs are stopped"
    )
    p.add_argument(
        "--safety", type=float, default=0.75, help="share of --budget the timed steps may fill (default: %(default)s)"
    )
    p.add_argument("--device", default="cuda", help="the device every run trains on (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each run (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint interval of each run (default: %(default)s)")
    p.add_argument(
        "--evaluate",
        default=None,
        metavar="OPTIONS",
        help="then evaluate every result on this machine's CPUs with these `python -m sdviz.toy.evaluate` options "
        "('' for the full evaluation)",
    )
    p.add_argument(
        "--eval-threads",
        type=int,
        default=None,
        help="CPU threads of each evaluation (default: this machine's CPUs shared among the runs)",
    )
    p.add_argument("--end", type=float, default=None, help="seconds after the start at which evaluations are stopped")
    args = p.parse_args(argv)
    eval_options = None if args.evaluate is None else shlex.split(args.evaluate)
    if eval_options is not None:
        evaluate.parse_args(eval_options)  # a typo fails here too
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--device", args.device, "--threads", str(args.threads)]
    runs = {name: shlex.split(options) for name, options in args.run}
    for options in runs.values():
        train.parse_args(options)  # a typo fails here, before any machine time is spent

    # 1. Time one step of every recipe, all running at once as they will.
    probes = {name: _launch([*options, *PROBE], args.out / f"probe-{name}", common) for name, options in runs.items()}
    for proc in probes.values():
        proc.wait()
    probe_seconds = time.time() - start
    plans = {name: plan(opts, args.out / f"probe-{name}", args.budget, args.safety) for name, opts in runs.items()}
    print(f"timed in {probe_seconds:.0f} s: {json.dumps(plans)}", flush=True)

    # 2. Train each for its steps, all at once; stop what is still running at the deadline.
    procs = {
        name: _launch(
            [*options, "--steps", str(plans[name]["steps"]), "--save-every", str(args.save_every)],
            args.out / name,
            common,
        )
        for name, options in runs.items()
    }
    _wait(procs, start, args.deadline)
    summary = {"probe_seconds": round(probe_seconds, 1), "runs": {}}
    for name, proc in procs.items():
        status = pack(args.out / name, args.out / f"{name}.tar")
        summary["runs"][name] = {
            "options": shlex.join(runs[name]),
            **plans[name],
            "returncode": proc.returncode,
            "status": status,
        }
    summary["train_seconds"] = round(time.time() - start, 1)

    # 3. Evaluate the results here, so that their figures come back with them.
    if eval_options is not None:
        folders = {name: folder for name in runs if (folder := result(args.out / name)[0]) is not None}
        threads = args.eval_threads or max(1, (os.cpu_count() or 1) // max(1, len(folders)))
        outcomes = evaluate_all(folders, args.out, eval_options, threads, start, args.end)
        for name in runs:
            summary["runs"][name]["evaluation"] = outcomes.get(name, "nothing to evaluate")
    summary["seconds"] = round(time.time() - start, 1)
    (args.out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
