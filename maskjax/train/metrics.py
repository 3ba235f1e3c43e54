"""Metric writers: JSON lines always, TensorBoard event files (tensorboardX), PNG images."""

import json
import os
from typing import Mapping, Optional

import numpy as np
from PIL import Image


class MetricWriter:
    """Writes scalars and images of the main process; other processes get a no-op writer.

    A resumed run passes `resume_step`: records of later steps (written after that checkpoint by a run that then
    died) are dropped from metrics.jsonl and purged from TensorBoard, since the resumed run writes them again. With
    `redo_final_step` (a run resumed at its last step, whose final evaluation runs again) that step's evaluator
    records (every record that is not a train record) are dropped too.
    """

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0,
                 redo_final_step: Optional[int] = None):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self.image_dir = os.path.join(workdir, "images")
        self._jsonl = None
        self._tb = None
        self.dropped_records = 0  # Records of a run that died after its last checkpoint, removed at resume.
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.jsonl_path):
            self.dropped_records = _drop_records_after(self.jsonl_path, resume_step, redo_final_step)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter  # Only the main process needs it.
            # purge_step: TensorBoard discards this run directory's earlier events at steps >= it.
            self._tb = SummaryWriter(self.tensorboard_dir, flush_secs=10, purge_step=resume_step + 1)

    def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        """One JSON line {'step': step, '<prefix>/<name>': value, ...} and one TensorBoard scalar each."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        for name, value in scalars.items():
            key = f"{prefix}/{name}" if prefix else name
            record[key] = float(value)
            if self._tb is not None:
                self._tb.add_scalar(key, float(value), int(step))
        self._jsonl.write(json.dumps(record) + "\n")

    def write_image(self, step: int, name: str, image: np.ndarray) -> str:
        """Saves a uint8 [H, W, 3] image as PNG (and to TensorBoard); returns the PNG path."""
        if not self.enabled:
            return ""
        os.makedirs(self.image_dir, exist_ok=True)
        path = os.path.join(self.image_dir, f"{name}_step{int(step):06d}.png")
        Image.fromarray(np.asarray(image, np.uint8)).save(path)
        if self._tb is not None:
            self._tb.add_image(name, np.asarray(image, np.uint8), int(step), dataformats="HWC")
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _drop_records_after(path: str, step: int, redo_final_step: Optional[int]) -> int:
    """Rewrites a metrics.jsonl (atomically) without the records a resumed run from `step` writes again; returns
    how many it dropped."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # A line cut by a crash mid-write.
        if record.get("step", 0) > step:
            continue
        if redo_final_step is not None and record.get("step") == redo_final_step and any(
                key != "step" and not key.startswith("train/") for key in record):
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return len(lines) - len(kept)


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
