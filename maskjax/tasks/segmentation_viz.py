"""Overlay pictures of segmentation predictions: image | ground truth | prediction (| per-query masks).

Colours: each category has a fixed colour; in panoptic panels each segment gets its category's colour shaded by
instance, with white boundaries between segments; void is black.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np


def palette(count: int) -> np.ndarray:
    """uint8 [count, 3] distinct colours (golden-angle hues)."""
    import colorsys

    hues = (np.arange(count) * 0.61803398875) % 1.0
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)] for h in hues], np.uint8)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.clip((image + 1.0) * 127.5, 0, 255).astype(np.uint8)


def colorize(ids: np.ndarray, classes: np.ndarray, colours: np.ndarray, image: Optional[np.ndarray] = None,
             alpha: float = 0.6) -> np.ndarray:
    """Segment map ids [H, W] (index into classes [S], -1 = void) -> uint8 [H, W, 3], blended over `image`,
    instances of one category shaded apart, boundaries white."""
    classes = np.asarray(classes)
    valid = (ids >= 0) & (classes[np.maximum(ids, 0)] >= 0)
    category = np.where(valid, classes[np.maximum(ids, 0)], 0)
    shade = 0.65 + 0.35 * ((np.maximum(ids, 0) * 7) % 5) / 4.0
    rgb = np.where(valid[..., None], colours[category] * shade[..., None], 0.0)
    if image is not None:
        rgb = np.where(valid[..., None], alpha * rgb + (1 - alpha) * image, 0.3 * image)
    edge = np.zeros(ids.shape, bool)
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    rgb[edge] = 255
    return rgb.astype(np.uint8)


def overlay_grid(batch: Mapping[str, np.ndarray], predictions: Mapping[str, Any], num_classes: int, num_stuff: int,
                 max_instances: int, *, scale: int = 3, max_queries: int = 8) -> np.ndarray:
    """One row per example: image, ground truth, prediction (panoptic if predicted, else semantic), and the
    `max_queries` largest per-query mask probabilities (mask models). uint8 [rows * H * scale, cols * W * scale, 3]."""
    from maskjax.tasks.segmentation import panoptic_targets  # numpy in, numpy out (jnp under the hood)

    colours = palette(num_classes)
    images = batch["image"]
    gt_ids, gt_classes = (np.asarray(a) for a in panoptic_targets(batch["semantic"], batch["instance"], num_classes,
                                                                   num_stuff, max_instances))
    rows = []
    for i in range(len(images)):
        image = _to_uint8(images[i]).astype(np.float32)
        panels = [image.astype(np.uint8), colorize(gt_ids[i], gt_classes[i], colours, image)]
        if "panoptic_ids" in predictions:
            panels.append(colorize(np.asarray(predictions["panoptic_ids"][i]),
                                   np.asarray(predictions["panoptic_classes"][i]), colours, image))
        if "mask_probs" in predictions:
            probs = np.asarray(predictions["mask_probs"][i])  # [Q, H, W]
            order = np.argsort(-probs.reshape(len(probs), -1).mean(-1))[:max_queries]
            for q in order:
                panels.append(np.repeat((probs[q] * 255).astype(np.uint8)[..., None], 3, axis=-1))
        rows.append(np.concatenate([np.pad(p, ((1, 1), (1, 1), (0, 0)), constant_values=40) for p in panels], 1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], 0)
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def semantic_grid(batch: Mapping[str, np.ndarray], predictions: Mapping[str, Any], num_classes: int, *,
                  scale: int = 3) -> np.ndarray:
    """One row per example: image, ground-truth and predicted semantic maps. uint8 [.., .., 3]."""
    colours = palette(num_classes)
    classes = np.arange(num_classes)
    rows = []
    for i in range(len(batch["image"])):
        image = _to_uint8(batch["image"][i]).astype(np.float32)
        target = np.where((batch["semantic"][i] >= 0) & (batch["semantic"][i] < num_classes), batch["semantic"][i], -1)
        panels = [image.astype(np.uint8), colorize(target, classes, colours, image),
                  colorize(np.asarray(predictions["semantic"][i]), classes, colours, image)]
        rows.append(np.concatenate([np.pad(p, ((1, 1), (1, 1), (0, 0)), constant_values=40) for p in panels], 1))
    grid = np.concatenate(rows, 0)
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
