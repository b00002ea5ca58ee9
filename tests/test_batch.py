"""Batches: DIR/index.jsonl, skipping what is done, and prompts shared between processes by `accelerate launch`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdviz
from sdviz.__main__ import _pending, build_parser, default_settings, main, read_jobs
from sdviz.batch import Index

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "random-sd1", "--size", "64", "--steps", "2", "--scheduler", "ddim"]
PROMPTS = "a red circle\n# a comment\na blue square --seed 3\n"


def index_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text(encoding="utf-8").splitlines()]


def same_trace(a: Path, b: Path):
    one, two = sdviz.TraceResult.load(a), sdviz.TraceResult.load(b)
    for name in one.TENSORS:
        x, y = getattr(one, name), getattr(two, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    for name in one.TENSOR_DICTS:
        x, y = getattr(one, name), getattr(two, name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_a_batch_indexes_every_prompt_and_a_second_run_skips_them(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    out = tmp_path / "batch"
    assert main(["--prompts", str(prompts), "--out", str(out), *FAST]) == 0
    records = index_of(out)
    assert [r["prompt"] for r in records] == ["a red circle", "a blue square"]
    second = records[1]
    assert second["seed"] == 3 and second["settings"]["steps"] == 2 and second["rank"] == 0 and second["line"] == 3
    assert second["model"] == "random-sd1" and second["processes"] == 1
    assert second["paths"]["trace.safetensors"] == "02-a-blue-square/trace.safetensors"
    assert all((out / p).is_file() for r in records for p in r["paths"].values())
    run = sdviz.TraceResult.load(out / second["paths"]["trace.safetensors"])
    square = run.heatmap("square")
    figures = {f["word"]: f for f in second["words"]}
    assert list(figures) == ["a", "blue", "square"]
    assert figures["square"]["peak"] == pytest.approx(float(square.max()), abs=1e-6)
    assert figures["square"]["mass"] == pytest.approx(float(square.mean()), abs=1e-6)

    capsys.readouterr()
    (out / "02-a-blue-square" / "trace.safetensors").unlink()  # a prompt whose files went missing is made again
    assert main(["--prompts", str(prompts), "--out", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert "skipping 1 prompt(s) already in" in err and "wrote 1 of 1 prompt" in err
    assert [r["prompt"] for r in index_of(out)][2:] == ["a blue square"]
    args = build_parser().parse_args(["--prompts", str(prompts), "--out", str(out), *FAST, "--steps", "3"])
    jobs = read_jobs(args)  # other settings: other jobs, none of them done
    assert _pending(jobs, default_settings(args, "random-sd1"), "random-sd1", Index(out)) == jobs


@pytest.mark.slow
def test_accelerate_launch_shares_the_prompts_between_two_processes_as_one_process_would_make_them(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    single, shared = tmp_path / "single", tmp_path / "shared"
    assert main(["--prompts", str(prompts), "--out", str(single), *FAST]) == 0
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15 (its --cpu launcher
    # runs several only through mpirun); torchrun's launcher (--multi_gpu) starts two, which meet over gloo
    # on the CPU when no GPU is visible.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    done = subprocess.run([*launch, "-m", "sdviz", "--prompts", str(prompts), "--out", str(shared), *FAST],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0 of 2" in done.stderr and "process 1 of 2" in done.stderr
    records = index_of(shared)
    assert sorted(r["prompt"] for r in records) == sorted(r["prompt"] for r in index_of(single))  # each once
    assert {r["rank"] for r in records} == {0, 1} and {r["processes"] for r in records} == {2}
    by_prompt = {r["prompt"]: r for r in index_of(single)}
    for record in records:
        mine = by_prompt[record["prompt"]]
        assert record["paths"] == mine["paths"] and record["words"] == mine["words"]
        same_trace(shared / record["paths"]["trace.safetensors"], single / mine["paths"]["trace.safetensors"])
