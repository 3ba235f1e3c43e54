"""Procedural video clips for VideoMAE-style runs: each clip is a `builtin_shapes` image seen by a camera that pans
at a constant per-clip velocity (a circular shift of `velocity * frame` pixels), so frames are related by motion
and the label is the image's. A pure function of (seed, split, index), like the images.

    source = ShapeClips("train", num_frames=8, image_size=32)
    clip = source[0]          # {'image': uint8 [8, 32, 32, 3], 'label': int32 []}
"""

from typing import Sequence

import numpy as np

from maskjax.data.builtin import _SPLIT_IDS, BuiltinShapes

PURPOSE_VELOCITY = 0x7E10  # salt of the per-clip velocity stream (independent of the image generator's)


class ShapeClips:
    """Random-access source of panning clips over a split of the built-in shapes.

    Args:
      split, seed, image_size, **image_options: as `BuiltinShapes`.
      num_frames: frames per clip (>= 1).
      max_speed: largest pan speed in pixels per frame along each axis (velocities uniform in [-max, max]).
    """

    def __init__(self, split: str = "train", *, seed: int = 0, image_size: int = 32, num_frames: int = 8,
                 max_speed: int = 2, **image_options):
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got num_frames={num_frames!r}")
        if isinstance(max_speed, bool) or not isinstance(max_speed, (int, np.integer)) or max_speed < 0:
            raise ValueError(f"max_speed must be a non-negative int, got max_speed={max_speed!r}")
        self.images = BuiltinShapes(split, seed=seed, image_size=image_size, **image_options)
        self.num_frames, self.max_speed = int(num_frames), int(max_speed)
        self.class_names = self.images.class_names
        self.num_classes = self.images.num_classes

    def __len__(self) -> int:
        return len(self.images)

    def velocity(self, index: int) -> tuple[int, int]:
        """(rows, cols) pixels per frame of clip `index`."""
        rng = np.random.default_rng([self.images.seed, PURPOSE_VELOCITY, _SPLIT_IDS[self.images.split], int(index)])
        vy, vx = rng.integers(-self.max_speed, self.max_speed + 1, size=2)
        return int(vy), int(vx)

    def _clip(self, example: dict, index: int) -> dict:
        vy, vx = self.velocity(index)
        frames = np.stack([np.roll(example["image"], (t * vy, t * vx), axis=(0, 1)) for t in range(self.num_frames)])
        return {"image": frames, "label": example["label"]}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._clip(self.images[index], index)

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        batch = self.images.get_batch(indices)
        clips = [self._clip({"image": batch["image"][i], "label": batch["label"][i]}, index)
                 for i, index in enumerate(indices)]
        return {"image": np.stack([c["image"] for c in clips]), "label": np.stack([c["label"] for c in clips])}

    def __repr__(self) -> str:
        return f"ShapeClips({self.images!r}, num_frames={self.num_frames}, max_speed={self.max_speed})"
