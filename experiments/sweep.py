"""Shared by the experiment scripts: run `python -m maskjax.main` once per setting, one after another, resuming
an interrupted sweep (a run whose metrics.jsonl holds its final evaluation is not repeated)."""

import json
import os
import subprocess
import sys
import time
from typing import Any, Mapping, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(workdir: str) -> list:
    """All records of `<workdir>/metrics.jsonl` ([] if there is none yet)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(records: list, steps: int) -> bool:
    return any(r.get("step") == steps and any(k.startswith("eval/") for k in r) for r in records)


def run(config: str, workdir: str, overrides: Mapping[str, Any], steps: int,
        cores: Optional[Sequence[int]] = None) -> tuple[list, float]:
    """Runs (or resumes, or skips if done) one training run; returns (metrics records, wall-clock seconds of the
    run that produced them). `cores`: CPU ids the run is pinned to (XLA then sizes its thread pool to them);
    each start appends {'step': the last logged step, 'cores'} to <workdir>/cores.jsonl, so reports can say what
    a run's speed was measured on."""
    timing = os.path.join(workdir, "wall_seconds.txt")
    records = read_metrics(workdir)
    if not finished(records, steps):
        args = [sys.executable, "-m", "maskjax.main", f"--config={config}", f"--workdir={workdir}",
                f"--config.total_steps={steps}", "--config.progress_bar=False"]
        args += [f"--config.{k}={v}" for k, v in overrides.items()]
        pinned = sorted(cores) if cores is not None else sorted(os.sched_getaffinity(0))
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "cores.jsonl"), "a") as f:
            f.write(json.dumps({"step": max((r.get("step", 0) for r in records), default=0), "cores": pinned}) + "\n")
        start = time.time()
        subprocess.run(args, cwd=REPO, check=True,
                       preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, pinned))
        with open(timing, "w") as f:
            f.write(f"{time.time() - start:.1f}\n")
    return read_metrics(workdir), wall_seconds(workdir)


def wall_seconds(workdir: str) -> float:
    """Wall-clock seconds of the `run` call that finished the run in `workdir` (nan if not recorded)."""
    path = os.path.join(workdir, "wall_seconds.txt")
    if not os.path.exists(path):
        return float("nan")
    with open(path) as f:
        return float(f.read())


def core_counts(workdir: str) -> list[int]:
    """The number of CPU cores of each start of a run (sweep.run's cores.jsonl; [] if not recorded)."""
    path = os.path.join(workdir, "cores.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [len(json.loads(line)["cores"]) for line in f if line.strip()]


def final(records: list, steps: int) -> dict:
    """The metrics of the last record at `steps` that has evaluation keys, merged with any probe keys."""
    out = {}
    for r in records:
        if r.get("step") == steps and any(k.startswith(("eval/", "probe/")) for k in r):
            out.update(r)
    return out
