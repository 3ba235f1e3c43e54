"""Metric writers: JSON lines always, TensorBoard event files (tensorboardX), PNG images."""

import json
import os
from typing import Mapping

import numpy as np
from PIL import Image


class MetricWriter:
    """Writes scalars and images of the main process; other processes get a no-op writer."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self.image_dir = os.path.join(workdir, "images")
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter  # Only the main process needs it.
            self._tb = SummaryWriter(self.tensorboard_dir, flush_secs=10)

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


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
