"""The built-in procedural data set "builtin_shapes": coloured shapes on textured backgrounds, no download.

Every example is a pure function of (seed, split, index) and the generator options, so the data set is
random-access (grain's RandomAccessDataSource protocol: `__len__`, `__getitem__`) and reproducible on any machine.
Each split draws from its own key stream (the split is part of the per-example key), so splits are disjoint by
construction and a smaller split size is a prefix of a larger one.

An example is a dict of numpy arrays:
  'image'       uint8 [H, W, 3]  RGB.
  'label'       int32 []         class of the main object, in [0, num_classes) (index into THING_CLASSES).
  'semantic'    int32 [H, W]     stuff ids 0..S-1 (background textures), thing ids S..S+T-1 (S = NUM_STUFF,
                                 T = num_classes); `semantic_class_names()` lists all names in id order.
  'instance'    int32 [H, W]     0 = stuff (no instance), 1 = the main object, 2..num_objects = visible distractors.
  'num_objects' int32 []         number of visible object instances (1 + visible distractors).

What is drawn: the background is split into two stuff regions by a random smooth (cubic) boundary, each region
filled with a different texture in two random colours. On top: one main object (its class is the label; drawn at a
larger scale than any distractor, always mostly visible) plus 0..max_objects smaller distractors of other classes,
which may occlude each other and, a little, the main object. All shapes have the same area at the same scale and
random colours (any hue; things bright, stuff dark, for every class alike), so the class is carried by shape alone.
Shapes that would look like each other when rotated (square, diamond, cross) are only rotated by a few degrees; the
rest take any rotation.

Pixel tests use only arithmetic, comparisons and floor on float64 (transcendental functions are applied to per-example
parameters only), so rendering a batch gives exactly the pixels of rendering each example alone.

CLI: `python -m maskjax.data.builtin --contact_sheet docs/builtin_shapes.png` writes a sheet of samples with their
semantic and instance masks; `--time N` measures generating N training examples.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Iterable, Mapping, Sequence

import numpy as np

STUFF_CLASSES: tuple[str, ...] = ("stripes", "checker", "dots", "noise", "gradient")
THING_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross",
                                  "ring", "star", "hexagon", "ellipse", "arrow")
NUM_STUFF = len(STUFF_CLASSES)
DEFAULT_SPLIT_SIZES: Mapping[str, int] = {"train": 50_000, "validation": 5_000, "test": 5_000}
# Each split has its own key stream; ids are fixed forever so that the data never changes.
_SPLIT_IDS: Mapping[str, int] = {"train": 1, "validation": 2, "test": 3}
_DATASET_TAG = 0x5A4B  # Separates these key streams from any other use of the same seed.

# Geometry, in units of the image side.
_MAIN_SCALE = (0.22, 0.30)        # Radius of the equal-area disk of the main object.
_DISTRACTOR_SCALE = (0.09, 0.14)  # Same for distractors (strictly smaller than any main object).
_MAIN_CENTER = (0.30, 0.70)
_DISTRACTOR_CENTER = (0.04, 0.96)
_MIN_MAIN_VISIBLE = 0.75          # A distractor goes under the main object if on top it would hide more than this.
# Rotation range (degrees, +-) per class: symmetric-looking classes get a few degrees, the others any angle.
_MAX_ROTATION = {"square": 12.0, "diamond": 12.0, "cross": 12.0}

_TEXTURE_CONTRAST = (50.0, 110.0)  # Per-channel difference of a texture's two colours (0..255).
_NOISE_GRID = 6                   # Value-noise lattice (per side) of the 'noise' texture.
# Colours (0..255 per channel): stuff is dark, things are bright, hues are free. The class-independent brightness
# gap gives the shape silhouette a consistent sign, which makes the set learnable in a few hundred steps.
_STUFF_LEVELS = (0.0, 120.0)
_THING_LEVELS = (140.0, 255.0)


# ----------------------------------------------------------------------------------------------- shapes
def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int, phase: float) -> np.ndarray:
    """Inside a regular polygon of circumradius 1 (one vertex at angle `phase`)."""
    apothem = math.cos(math.pi / sides)
    inside = np.ones(u.shape, bool)
    for k in range(sides):
        normal = phase + math.pi / sides + 2 * math.pi * k / sides
        inside &= u * math.cos(normal) + v * math.sin(normal) <= apothem
    return inside


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Filled five-pointed star of circumradius 1: inside at least 4 of the 5 half-planes of its edges."""
    apothem = math.cos(2 * math.pi / 5)  # Distance from the centre to the chord joining vertices k and k+2.
    count = np.zeros(u.shape, np.int8)
    for k in range(5):
        normal = -math.pi / 2 + math.pi / 5 + 2 * math.pi * k / 5
        count += u * math.cos(normal) + v * math.sin(normal) <= apothem
    return count >= 4


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    shaft = (u >= -1.0) & (u <= 0.05) & (np.abs(v) <= 0.24)
    head = (u >= 0.0) & (u <= 1.0) & (np.abs(v) <= 0.65 * (1.0 - u))
    return shaft | head


# Unit shapes (before equal-area normalisation); u points right, v points down.
_SHAPES = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 1.0,
    "triangle": lambda u, v: _regular_polygon(u, v, 3, -math.pi / 2),
    "diamond": lambda u, v: np.abs(u) / 0.62 + np.abs(v) <= 1.0,
    "cross": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 1.0) & (np.minimum(np.abs(u), np.abs(v)) <= 0.34),
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.36),
    "star": _star,
    "hexagon": lambda u, v: _regular_polygon(u, v, 6, 0.0),
    "ellipse": lambda u, v: u * u + 4.0 * v * v <= 1.0,
    "arrow": _arrow,
}


@functools.lru_cache(maxsize=None)
def _area_normalizer(name: str) -> float:
    """Factor k such that the unit shape scaled by k has the area of the unit disk (pi)."""
    n = 512
    grid = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    u, v = np.meshgrid(grid, grid, indexing="xy")
    area = float(np.count_nonzero(_SHAPES[name](u, v))) * (2.0 / n) ** 2
    return math.sqrt(math.pi / area)


# ---------------------------------------------------------------------------------------------- textures
def _texture(kind: str, x: np.ndarray, y: np.ndarray, p: np.ndarray, size: int) -> np.ndarray:
    """Texture intensity in [0, 1] for examples whose parameters `p` ([n, P] uniforms in [0, 1)) are given.

    x, y: [1, H, W] pixel-centre coordinates. Returns float64 [n, H, W].
    """
    col = lambda i: p[:, i, None, None]  # noqa: E731
    angle = col(0) * math.pi
    cos, sin = np.cos(angle), np.sin(angle)
    u = x * cos + y * sin
    w = -x * sin + y * cos
    if kind == "stripes":
        period = size * (0.10 + 0.10 * col(1))
        return np.floor(u / period + col(2)) % 2.0
    if kind == "checker":
        period = size * (0.09 + 0.07 * col(1))
        return (np.floor(u / period + col(2)) + np.floor(w / period + col(3))) % 2.0
    if kind == "dots":
        period = size * (0.14 + 0.08 * col(1))
        fu = (u / period + col(2)) % 1.0 - 0.5
        fw = (w / period + col(3)) % 1.0 - 0.5
        return (fu * fu + fw * fw <= 0.09).astype(np.float64)
    if kind == "noise":
        # Bilinear value noise on a coarse lattice: smooth blotches.
        g = _NOISE_GRID
        lattice = p[:, 4:4 + g * g].reshape(-1, g, g)
        gx = x[0] / size * (g - 1)
        gy = y[0] / size * (g - 1)
        x0 = np.minimum(np.floor(gx), g - 2).astype(np.int64)
        y0 = np.minimum(np.floor(gy), g - 2).astype(np.int64)
        fx, fy = gx - x0, gy - y0
        top = lattice[:, y0, x0] * (1 - fx) + lattice[:, y0, x0 + 1] * fx
        bottom = lattice[:, y0 + 1, x0] * (1 - fx) + lattice[:, y0 + 1, x0 + 1] * fx
        value = top * (1 - fy) + bottom * fy
        lo = lattice.min(axis=(1, 2))[:, None, None]
        hi = lattice.max(axis=(1, 2))[:, None, None]
        return (value - lo) / np.maximum(hi - lo, 1e-6)
    if kind == "gradient":
        center = size * 0.5 * (cos + sin)  # Projection of the image centre on the gradient direction.
        return np.clip(0.5 + (u - center) / (size * (0.6 + 0.6 * col(1))), 0.0, 1.0)
    raise ValueError(f"unknown texture {kind!r}")


_TEXTURE_PARAMS = 4 + _NOISE_GRID * _NOISE_GRID
# Per object: reserved, centre (2), scale, angle, on-top, reserved, colour (3).
_OBJECT_PARAMS = 7 + 3


# ------------------------------------------------------------------------------------------- the data set
class _Uniforms:
    """Hands out consecutive columns of per-example uniforms, so every parameter has a fixed slot."""

    def __init__(self, u: np.ndarray):
        self.u, self.offset = u, 0

    def take(self, n: int = 1) -> np.ndarray:
        out = self.u[:, self.offset:self.offset + n]
        self.offset += n
        return out[:, 0] if n == 1 else out


def _widen(example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Masks as int32 (the cache stores them as uint8)."""
    return {k: v.astype(np.int32) if k in ("semantic", "instance") else v for k, v in example.items()}


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class BuiltinShapes:
    """Random-access source of one split of the built-in shapes data set.

    Args:
      split: 'train', 'validation' or 'test'.
      seed: non-negative integer; the whole data set is a function of it (and of the options below).
      image_size: side of the square images (>= 16).
      num_classes: number of thing (shape) classes, the first `num_classes` of THING_CLASSES (2..10).
      max_objects: largest number of distractors per image (0 = main object only).
      split_sizes: number of examples per split (defaults: DEFAULT_SPLIT_SIZES).
    """

    def __init__(self, split: str = "train", *, seed: int = 0, image_size: int = 32, num_classes: int = 10,
                 max_objects: int = 3, split_sizes: Mapping[str, int] | None = None):
        sizes = dict(DEFAULT_SPLIT_SIZES)
        if split_sizes is not None:
            unknown = set(split_sizes) - set(_SPLIT_IDS)
            if unknown:
                raise ValueError(f"split_sizes has unknown splits {sorted(unknown)}; valid: {sorted(_SPLIT_IDS)}")
            sizes.update(split_sizes)
        if split not in _SPLIT_IDS:
            raise ValueError(f"split={split!r} is not a split of builtin_shapes; valid: {sorted(_SPLIT_IDS)}")
        _check_positive_int("seed", seed, 0)
        _check_positive_int("image_size", image_size, 16)
        _check_positive_int("num_classes", num_classes, 2)
        if num_classes > len(THING_CLASSES):
            raise ValueError(f"num_classes must be <= {len(THING_CLASSES)}, got {num_classes}")
        _check_positive_int("max_objects", max_objects, 0)
        if max_objects > num_classes - 1:
            raise ValueError(f"max_objects={max_objects} needs distractors of distinct classes: "
                             f"must be <= num_classes - 1 = {num_classes - 1}")
        for name, n in sizes.items():
            _check_positive_int(f"split_sizes[{name!r}]", n, 1)
        self.split, self.seed, self.image_size = split, int(seed), int(image_size)
        self.num_classes, self.max_objects = int(num_classes), int(max_objects)
        self.split_sizes = sizes
        self.class_names: tuple[str, ...] = THING_CLASSES[:num_classes]
        self.num_stuff = NUM_STUFF
        self._length = sizes[split]
        self._cache: dict[str, np.ndarray] | None = None

    # ---- RandomAccessDataSource protocol
    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = self._check_index(index)
        if self._cache is not None:
            return _widen({k: v[index] for k, v in self._cache.items()})
        return {k: v[0] for k, v in self.generate([index]).items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        batch = self.get_batch(indices)
        return [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]

    def __repr__(self) -> str:
        return (f"BuiltinShapes(split={self.split!r}, seed={self.seed}, image_size={self.image_size}, "
                f"num_classes={self.num_classes}, max_objects={self.max_objects}, len={len(self)})")

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {index!r}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples of split {self.split!r}")
        return int(index)

    def semantic_class_names(self) -> tuple[str, ...]:
        """Names of the semantic ids: stuff 0..S-1, then things S..S+T-1."""
        return STUFF_CLASSES + self.class_names

    def panoptic_info(self) -> dict:
        """The panoptic view of 'semantic' / 'instance': category names in semantic-id order, which are things,
        the largest instance id an image can hold, and the void id (crop padding; no pixel is void otherwise).

        A segment is a stuff class's region (instance 0) or one thing instance (instance id >= 1); its category is
        the semantic id of its pixels, its area its pixel count. The data has no crowd regions.
        """
        return {"categories": self.semantic_class_names(),
                "is_thing": (False,) * NUM_STUFF + (True,) * self.num_classes,
                "max_instances": 1 + self.max_objects, "void": -1}

    # ---- batched access
    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Examples `indices` stacked along a new leading axis (from the cache if materialised)."""
        indices = [self._check_index(i) for i in indices]
        if self._cache is not None:
            idx = np.asarray(indices, np.int64)
            return _widen({k: v[idx] for k, v in self._cache.items()})
        return self.generate(indices)

    def as_arrays(self, chunk_size: int = 1000) -> dict[str, np.ndarray]:
        """The whole split as stacked arrays (computed once, then kept in memory and used by __getitem__).

        Masks are kept as uint8 and widened to int32 on access: 5 * H * W bytes per example (250 MB for the
        50k training images at 32x32).
        """
        if self._cache is None:
            parts = [self.generate(range(start, min(start + chunk_size, len(self))), compact=True)
                     for start in range(0, len(self), chunk_size)]
            self._cache = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return _widen(self._cache)

    # ---- generation
    def _uniforms(self, indices: Sequence[int]) -> np.ndarray:
        """[n, K] per-example uniforms in [0, 1): example i draws from the stream (tag, seed, split, index)."""
        split_id = _SPLIT_IDS[self.split]
        count = self._num_uniforms()
        return np.stack([np.random.Generator(np.random.Philox(
            np.random.SeedSequence([_DATASET_TAG, self.seed, split_id, int(i)]))).random(count) for i in indices])

    def _num_uniforms(self) -> int:
        slots = 1 + self.max_objects
        stuff = 3 + 4 + 2 * (6 + _TEXTURE_PARAMS)  # Region classes, boundary, per region: colours + texture.
        layout = 1 + self.num_classes  # Number of distractors, class permutation.
        objects = slots * _OBJECT_PARAMS
        return stuff + layout + objects

    def generate(self, indices: Iterable[int], compact: bool = False) -> dict[str, np.ndarray]:
        """Renders examples `indices` (no cache). Returns stacked arrays with a leading [n] axis.

        With `compact`, the masks are uint8 (used by the in-memory cache); otherwise int32.
        """
        indices = list(indices)
        n, size = len(indices), self.image_size
        if n == 0:
            raise ValueError("indices must not be empty")
        r = _Uniforms(self._uniforms(indices))
        coords = np.arange(size, dtype=np.float64) + 0.5
        x = coords[None, None, :]
        y = coords[None, :, None]

        # Stuff: two regions split by a smooth cubic curve, two distinct textures.
        first = np.floor(r.take() * NUM_STUFF).astype(np.int64)
        second = (first + 1 + np.floor(r.take() * (NUM_STUFF - 1)).astype(np.int64)) % NUM_STUFF
        r.take()  # Reserved.
        b = r.take(4)
        angle = b[:, 0, None, None] * 2 * math.pi
        ox = size * (0.3 + 0.4 * b[:, 1, None, None])
        oy = size * (0.3 + 0.4 * b[:, 2, None, None])
        along = ((x - ox) * np.cos(angle) + (y - oy) * np.sin(angle)) / size
        across = (-(x - ox) * np.sin(angle) + (y - oy) * np.cos(angle)) / size
        bend = 3.0 * (b[:, 3, None, None] - 0.5)
        in_second = across + bend * along * along - 1.5 * bend * along * along * along > 0.0
        stuff_ids = np.where(in_second, second[:, None, None], first[:, None, None])

        # Pixel colour = base + (other - base) * intensity, with one (base, other) pair per region or object.
        intensity = np.zeros((n, size, size))
        region_colours = []
        for ids, mask in ((first, ~in_second), (second, in_second)):
            colours = r.take(6).reshape(n, 2, 3)
            # Two colours of one texture: the second differs enough from the first to show the pattern.
            dark, light = _STUFF_LEVELS
            base = dark + (light - dark) * colours[:, 0]
            low, high = _TEXTURE_CONTRAST
            other = base + np.where(colours[:, 1] < 0.5, -1.0, 1.0) * (low + (high - low) * colours[:, 1])
            other = np.where((other < dark) | (other > light), 2 * base - other, other).clip(dark, light)
            params = r.take(_TEXTURE_PARAMS)
            region_intensity = np.zeros((n, size, size))
            for k, kind in enumerate(STUFF_CLASSES):
                rows = np.flatnonzero(ids == k)
                if rows.size:
                    region_intensity[rows] = _texture(kind, x, y, params[rows], size)
            intensity = np.where(mask, region_intensity, intensity)
            region_colours += [base, other]
        region_colours = np.stack(region_colours, axis=1)  # [n, 4, 3]

        # Objects: slot 0 is the main object, slots 1.. are distractors of other classes.
        slots = 1 + self.max_objects
        classes = np.zeros((n, slots), np.int64)
        present = np.zeros((n, slots), bool)
        present[:, 0] = True
        count = np.floor(r.take() * (self.max_objects + 1)).astype(np.int64)
        # A random permutation of classes per example: the main class first, distinct distractors after.
        order = np.argsort(r.take(self.num_classes), axis=1)
        masks = np.zeros((n, slots, size, size), bool)
        colours = np.zeros((n, slots, 3))
        on_top = np.zeros((n, slots), bool)
        for slot in range(slots):
            o = r.take(_OBJECT_PARAMS)
            classes[:, slot] = order[:, slot]
            if slot:
                present[:, slot] = slot <= count
            lo_c, hi_c = _MAIN_CENTER if slot == 0 else _DISTRACTOR_CENTER
            lo_s, hi_s = _MAIN_SCALE if slot == 0 else _DISTRACTOR_SCALE
            cx = size * (lo_c + (hi_c - lo_c) * o[:, 1])
            cy = size * (lo_c + (hi_c - lo_c) * o[:, 2])
            scale = size * (lo_s + (hi_s - lo_s) * o[:, 3])
            on_top[:, slot] = o[:, 5] < 0.5
            dark, light = _THING_LEVELS
            colours[:, slot] = dark + (light - dark) * o[:, 7:10]
            for k, name in enumerate(self.class_names):
                rows = np.flatnonzero((classes[:, slot] == k) & present[:, slot])
                if not rows.size:
                    continue
                max_rotation = math.radians(_MAX_ROTATION.get(name, 180.0))
                theta = (2 * o[rows, 4] - 1) * max_rotation
                cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
                unit = (scale[rows] * _area_normalizer(name))[:, None, None]
                dx, dy = x - cx[rows, None, None], y - cy[rows, None, None]
                u = (dx * cos + dy * sin) / unit
                v = (-dx * sin + dy * cos) / unit
                masks[rows, slot] = _SHAPES[name](u, v)

        # Layering: distractors under the main object, or on top unless that would hide too much of it.
        main_area = masks[:, 0].sum(axis=(1, 2))
        visible_main = masks[:, 0].copy()
        for slot in range(1, slots):
            hidden = visible_main & masks[:, slot]
            keeps_enough = (visible_main.sum(axis=(1, 2)) - hidden.sum(axis=(1, 2))) >= _MIN_MAIN_VISIBLE * main_area
            on_top[:, slot] &= keeps_enough
            visible_main &= ~(masks[:, slot] & on_top[:, slot, None, None])
        draw_order = [s for s in range(slots - 1, 0, -1)]  # Lower slots over higher ones among the 'under' group.
        slot_map = np.full((n, size, size), -1, np.int64)
        for group_on_top in (False, True):
            for slot in draw_order:
                draw = masks[:, slot] & (on_top[:, slot] == group_on_top)[:, None, None]
                slot_map = np.where(draw, slot, slot_map)
            if not group_on_top:
                slot_map = np.where(masks[:, 0], 0, slot_map)

        # Instance ids 1..num_objects over the visible slots (main object first), 0 for stuff.
        visible = np.stack([(slot_map == s).any(axis=(1, 2)) for s in range(slots)], axis=1)
        ids_of_slot = np.where(visible, np.cumsum(visible, axis=1), 0)  # [n, slots]
        rows = np.arange(n)[:, None, None]
        thing = slot_map >= 0
        safe_slot = np.maximum(slot_map, 0)
        instance = np.where(thing, ids_of_slot[rows, safe_slot], 0)
        semantic = np.where(thing, NUM_STUFF + classes[rows, safe_slot], stuff_ids)
        palette_base = np.concatenate([region_colours[:, 0::2], colours], axis=1).astype(np.float32)
        palette_step = np.concatenate([region_colours[:, 1::2] - region_colours[:, 0::2], np.zeros_like(colours)],
                                      axis=1).astype(np.float32)  # [n, 2 + slots, 3]
        entry = np.where(thing, 2 + slot_map, in_second.astype(np.int64))
        image = palette_base[rows, entry] + palette_step[rows, entry] * intensity[..., None].astype(np.float32)

        if r.offset != r.u.shape[1]:
            raise AssertionError(f"used {r.offset} of {r.u.shape[1]} uniforms per example")
        mask_dtype = np.uint8 if compact and NUM_STUFF + self.num_classes < 256 and slots < 256 else np.int32
        return {
            "image": np.rint(image.clip(0, 255)).astype(np.uint8),
            "label": classes[:, 0].astype(np.int32),
            "semantic": semantic.astype(mask_dtype),
            "instance": instance.astype(mask_dtype),
            "num_objects": visible.sum(axis=1).astype(np.int32),
        }


# ---------------------------------------------------------------------------------------------------- CLI
def _palette(count: int) -> np.ndarray:
    """Distinct colours for mask ids (id 0 of instance masks is dark grey)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return (np.array([cmap(i % 20)[:3] for i in range(count)]) * 255).astype(np.uint8)


def contact_sheet(source: BuiltinShapes, path: str, count: int = 16, scale: int = 4) -> None:
    """Writes a PNG: for each of `count` examples, the image, its semantic mask and its instance mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    batch = source.get_batch(range(count))
    names = source.semantic_class_names()
    palette = _palette(len(names))
    instance_palette = np.concatenate([[[40, 40, 40]], _palette(20)[::2], _palette(20)[1::2]])
    cols = 4
    rows = (count + cols - 1) // cols
    panel = 1.2  # Inches per square panel; each row also carries the panel titles.
    width, height = 3 * cols * panel * 1.08, rows * panel * 1.3 + 1.0
    fig, axes = plt.subplots(rows, 3 * cols, figsize=(width, height), squeeze=False)
    for i in range(count):
        r, c = divmod(i, cols)
        panels = (batch["image"][i], palette[batch["semantic"][i]],
                  instance_palette[batch["instance"][i] % len(instance_palette)])
        titles = (f"{source.class_names[batch['label'][i]]}", "semantic", f"{batch['num_objects'][i]} inst.")
        for j, (panel, title) in enumerate(zip(panels, titles)):
            ax = axes[r, 3 * c + j]
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(color=palette[i] / 255, label=f"{i} {name}") for i, name in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 8), fontsize=7, frameon=False)
    fig.suptitle(f"builtin_shapes ({source.split}, seed {source.seed}, {source.image_size}x{source.image_size}): "
                 "image (main class) | semantic | instance", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.6 / height, top=1 - 0.55 / height, wspace=0.08, hspace=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contact_sheet", help="write a PNG contact sheet of samples to this path")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--time", type=int, default=0, help="time generating this many training examples")
    args = parser.parse_args(argv)
    source = BuiltinShapes(args.split, seed=args.seed, image_size=args.image_size)
    if args.contact_sheet:
        contact_sheet(source, args.contact_sheet, count=args.count)
        print(f"wrote {args.contact_sheet}")
    if args.time:
        timed = BuiltinShapes("train", seed=args.seed, image_size=args.image_size,
                              split_sizes={"train": args.time})
        start = time.perf_counter()
        arrays = timed.as_arrays()
        seconds = time.perf_counter() - start
        print(f"generated {len(arrays['label'])} examples of {args.image_size}x{args.image_size} in {seconds:.1f} s "
              f"({len(arrays['label']) / seconds:.0f} examples/s)")


if __name__ == "__main__":
    main()
