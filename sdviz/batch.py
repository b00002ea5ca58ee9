"""Batches of prompts, across processes with 🤗 Accelerate, and the index of what a batch wrote.

    accelerate launch -m sdviz --prompts prompts.txt --out batch      # N processes (GPUs, machines)
    python -m sdviz --prompts prompts.txt --out batch                  # one process, the same outputs

Every process (rank) reads `DIR/index.jsonl` first, leaves out the prompts already done there (same
prompt, settings, seed and model, and their files still on disk), takes its share of the rest with
accelerate's `split_between_processes` (contiguous shares, in file order), writes those prompts'
folders, and appends one JSON line per prompt to the index: the prompt, its settings and seed, the
model, the `rank` that made it, the paths written (relative to DIR) and per-word figures. Seeds fix the
starting noise on the CPU, so a prompt gives the same trace whichever process makes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

INDEX_NAME = "index.jsonl"


@dataclasses.dataclass
class Processes:
    """This process's place in the launch: rank 0 of 1 unless started by `accelerate launch`."""

    rank: int = 0
    count: int = 1
    device: str | None = None  # the device accelerate gives this rank (None: the command line's choice)
    state: object = None  # accelerate.PartialState

    @classmethod
    def start(cls) -> Processes:
        import os

        import torch
        from accelerate import PartialState

        # Without a GPU (or with `accelerate launch --cpu`), processes started by torchrun meet over gloo on
        # the CPU: PartialState sees them only when told to use the CPU.
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        if state.num_processes == 1:
            return cls(state=state)
        return cls(state.process_index, state.num_processes, str(state.device), state)

    def share(self, items: list) -> list:
        """This rank's contiguous share of `items` (all of them in a single process)."""
        if self.count == 1:
            return list(items)
        with self.state.split_between_processes(list(items)) as mine:
            return list(mine)

    def wait(self):
        """Every rank reaches this point before any goes on (a no-op in a single process)."""
        if self.count > 1:
            self.state.wait_for_everyone()


def job_key(settings, model: str) -> str:
    """What makes two prompts the same job: the checked settings (prompt and seed included) and the model."""
    return json.dumps({"model": model, **dataclasses.asdict(settings)}, sort_keys=True)


def word_figures(run) -> list[dict]:
    """Per word of the prompt: `peak`, the largest attention probability any latent pixel gave it (the
    maximum of its heatmap over all steps and layers), and `mass`, the mean of that heatmap over the
    image (the share of an average pixel's attention the word got)."""
    figures = []
    for word in run.words:
        heat = run.heatmap(list(word.tokens))  # [h, w]
        figures.append({"word": word.text, "peak": round(float(heat.max()), 6), "mass": round(float(heat.mean()), 6)})
    return figures


class Index:
    """`DIR/index.jsonl`: one record per prompt written, appended by whichever rank wrote it."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / INDEX_NAME

    def records(self) -> list[dict]:
        """Every complete record (a line cut short by a killed process is skipped)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        return records

    def done(self) -> set[str]:
        """Keys of the jobs already written, whose files are all still there."""
        return {
            r["key"]
            for r in self.records()
            if "key" in r and all((self.out / p).exists() for p in r.get("paths", {}).values())
        }

    def add(self, record: dict):
        """Append one record as one line, under an exclusive lock where the system has one (ranks share the file)."""
        self.out.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            try:
                import fcntl
            except ImportError:  # Windows: one short append
                f.write(line)
                return
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(line)
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def record(self, *, key: str, number: int, line, settings, model: str, processes: Processes, paths, run,
               seconds: float) -> dict:  # fmt: skip
        """The index line of one prompt written (see the module docstring)."""
        return {
            "prompt": settings.prompt,
            "number": number,
            "line": line,
            "settings": dataclasses.asdict(settings),
            "seed": settings.seed,
            "model": model,
            "rank": processes.rank,
            "processes": processes.count,
            "paths": {Path(p).name: str(Path(p).relative_to(self.out)) for p in paths},
            "words": word_figures(run),
            "seconds": round(seconds, 3),
            "key": key,
        }
