"""Per-example preprocessing: resize, training augmentation (random crop with padding, horizontal flip), normalisation.

Examples are dicts of numpy arrays: 'image' uint8 [H, W, C], 'label' int32 [], and optionally dense per-pixel maps
('semantic', 'instance': int [H, W]) that follow the image through every geometric step. Outputs keep the same keys;
'image' becomes float32 in [-1, 1] (x / 127.5 - 1: no data-set statistics, so every source is treated alike).
Crop padding fills images with 0 (black, -1 after normalisation), semantic maps with SEMANTIC_PAD (ignored by
segmentation losses) and instance maps with 0 (no instance).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

SEMANTIC_PAD = -1
DENSE_KEYS = ("semantic", "instance")
_PAD_VALUES = {"image": 0, "semantic": SEMANTIC_PAD, "instance": 0}


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [-1, 1]."""
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype}")
    return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def resize(example: Mapping[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Square resize of the image (bilinear, antialiased) and dense maps (nearest); a no-op at the right size."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    out = dict(example)
    height, width = example["image"].shape[-3:-1]
    if (height, width) == (image_size, image_size):
        return out
    from PIL import Image

    def resize_image(image):
        channels = image.shape[-1]
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        resized = np.asarray(pil.resize((image_size, image_size), Image.Resampling.BILINEAR))
        return resized[..., None] if channels == 1 else resized

    image = example["image"]  # [H, W, C] or a clip [T, H, W, C], resized frame by frame
    out["image"] = resize_image(image) if image.ndim == 3 else np.stack([resize_image(f) for f in image])
    for key in DENSE_KEYS:
        if key in example:
            # Nearest neighbour keeps ids valid: sample the source pixel under each target pixel centre.
            rows = ((np.arange(image_size) + 0.5) * height / image_size).astype(np.int64)
            cols = ((np.arange(image_size) + 0.5) * width / image_size).astype(np.int64)
            out[key] = example[key][rows[:, None], cols[None, :]]
    return out


def random_crop_flip(example: Mapping[str, np.ndarray], rng: np.random.Generator, *, padding: int = 4,
                     flip: bool = True) -> dict[str, np.ndarray]:
    """Pads by `padding` on each side, crops back to the original size at a random offset, flips left-right with
    probability 1/2. The same geometry applies to the image and every dense map.

    Always draws three numbers from `rng` (two offsets, one coin), so options never shift later draws.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    offset_y, offset_x = rng.integers(0, 2 * padding + 1, size=2)
    coin = rng.random()
    out = dict(example)
    for key in ("image",) + DENSE_KEYS:
        if key not in example:
            continue
        array = example[key]
        lead = array.ndim - 3 if key == "image" else 0  # a clip [T, H, W, C]: every frame gets the same geometry
        height, width = array.shape[lead:lead + 2]
        if padding:
            pad = [(0, 0)] * lead + [(padding, padding), (padding, padding)] + [(0, 0)] * (array.ndim - lead - 2)
            array = np.pad(array, pad, constant_values=_PAD_VALUES[key])
            window = (slice(offset_y, offset_y + height), slice(offset_x, offset_x + width))
            array = array[(slice(None),) * lead + window]
        if flip and coin < 0.5:
            array = array[(slice(None),) * (lead + 1) + (slice(None, None, -1),)]
        out[key] = np.ascontiguousarray(array)
    return out


def _select(example: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
    missing = [k for k in keys if k not in example]
    if missing:
        raise ValueError(f"keys {missing} requested but the example only has {sorted(example)}")
    return {k: example[k] for k in keys}


def _finish(example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(example)
    out["image"] = normalize(example["image"])
    if "label" in out:
        out["label"] = np.asarray(out["label"], np.int32)
    for key in DENSE_KEYS:
        if key in out:
            out[key] = np.asarray(out[key], np.int32)
    return out


def preprocess_train(example: Mapping[str, np.ndarray], image_size: int, rng: np.random.Generator | None, *,
                     augment: bool = True, crop_padding: int = 4, flip: bool = True,
                     keys: Sequence[str] = ("image", "label")) -> dict[str, np.ndarray]:
    """Resize -> (random crop + flip if `augment`) -> normalise. 'image' float32 [image_size, image_size, C]."""
    example = resize(_select(example, keys), image_size)
    if augment:
        if rng is None:
            raise ValueError("rng is required when augment=True")
        example = random_crop_flip(example, rng, padding=crop_padding, flip=flip)
    return _finish(example)


def preprocess_eval(example: Mapping[str, np.ndarray], image_size: int,
                    keys: Sequence[str] = ("image", "label")) -> dict[str, np.ndarray]:
    """Resize -> normalise. 'image' float32 [image_size, image_size, C]; no randomness."""
    return _finish(resize(_select(example, keys), image_size))
