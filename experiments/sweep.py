"""Shared by the experiment scripts: run `python -m maskjax.main` once per setting, one after another, resuming
an interrupted sweep (a run whose metrics.jsonl holds its final evaluation is not repeated)."""

import json
import os
import subprocess
import sys
import time
from typing import Any, Mapping

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


def run(config: str, workdir: str, overrides: Mapping[str, Any], steps: int) -> tuple[list, float]:
    """Runs (or resumes, or skips if done) one training run; returns (metrics records, wall-clock seconds of the
    run that produced them)."""
    timing = os.path.join(workdir, "wall_seconds.txt")
    if not finished(read_metrics(workdir), steps):
        args = [sys.executable, "-m", "maskjax.main", f"--config={config}", f"--workdir={workdir}",
                f"--config.total_steps={steps}", "--config.progress_bar=False"]
        args += [f"--config.{k}={v}" for k, v in overrides.items()]
        start = time.time()
        subprocess.run(args, cwd=REPO, check=True)
        os.makedirs(workdir, exist_ok=True)
        with open(timing, "w") as f:
            f.write(f"{time.time() - start:.1f}\n")
    seconds = float(open(timing).read()) if os.path.exists(timing) else float("nan")
    return read_metrics(workdir), seconds


def final(records: list, steps: int) -> dict:
    """The metrics of the last record at `steps` that has evaluation keys, merged with any probe keys."""
    out = {}
    for r in records:
        if r.get("step") == steps and any(k.startswith(("eval/", "probe/")) for k in r):
            out.update(r)
    return out
