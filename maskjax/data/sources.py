"""Random-access sources (grain's RandomAccessDataSource protocol: `__len__`, `__getitem__`) over in-memory arrays
and over TFDS data sources, all yielding the same example dicts: 'image' uint8 [H, W, C], 'label' int32 [], ...

Every source here also offers `get_batch(indices) -> dict of stacked arrays` (the pipeline uses it when present),
`class_names` and `num_classes`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


class ArraySource:
    """Examples are rows of equally long arrays, e.g. {'image': uint8 [N, H, W, C], 'label': int32 [N]}."""

    def __init__(self, arrays: Mapping[str, np.ndarray], *, class_names: Sequence[str] | None = None,
                 name: str = "arrays"):
        if "image" not in arrays or "label" not in arrays:
            raise ValueError(f"arrays needs 'image' and 'label', got keys {sorted(arrays)}")
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must have equal lengths, got {lengths}")
        image = arrays["image"]
        if image.dtype != np.uint8 or image.ndim != 4:
            raise ValueError(f"arrays['image'] must be uint8 [N, H, W, C], got {image.dtype} {image.shape}")
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self._arrays["label"] = self._arrays["label"].astype(np.int32)
        self.class_names = tuple(class_names) if class_names is not None else None
        self.name = name

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    def __len__(self) -> int:
        return len(self._arrays["label"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples of {self.name}")
        return {k: v[index] for k, v in self._arrays.items()}

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices out of range [0, {len(self)}) of {self.name}: {idx.min()}..{idx.max()}")
        return {k: v[idx] for k, v in self._arrays.items()}

    def as_arrays(self) -> dict[str, np.ndarray]:
        return dict(self._arrays)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, len={len(self)}, keys={sorted(self._arrays)})"


def _standardize(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """TFDS example -> maskjax convention: uint8 [H, W, C] image, int32 scalar label, int32 dense maps."""
    out = {k: np.asarray(v) for k, v in example.items()}
    if "image" in out:
        image = out["image"]
        if image.ndim == 2:
            image = image[..., None]
        out["image"] = image.astype(np.uint8, copy=False)
    for key in ("label", "semantic", "instance", "num_objects"):
        if key in out:
            out[key] = out[key].astype(np.int32, copy=False)
    return out


class TfdsSource:
    """Wraps a TFDS array_record data source (`tfds.data_source(...)`) in the maskjax example convention."""

    def __init__(self, data_source: Sequence[Any], *, class_names: Sequence[str] | None = None, name: str = "tfds"):
        self._source = data_source
        self.class_names = tuple(class_names) if class_names is not None else None
        self.name = name

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples of {self.name}")
        return _standardize(self._source[int(index)])

    def get_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        indices = [int(i) for i in indices]
        if not all(0 <= i < len(self) for i in indices):
            raise IndexError(f"indices out of range [0, {len(self)}) of {self.name}")
        # Batched reads of array_record files are several times faster than one record at a time.
        reader = getattr(self._source, "__getitems__", None)
        records = reader(indices) if reader is not None else [self._source[i] for i in indices]
        examples = [_standardize(e) for e in records]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}, len={len(self)})"
