"""Fashion-MNIST (28x28 grey, 10 classes, 60k train + 10k test) from local IDX files, or TFDS when available.

Offline files: the Debian package `dataset-fashion-mnist` (`sudo apt-get install dataset-fashion-mnist`) installs
  /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
Any directory holding these four files works (`data_dir=...`, or the environment variable MASKJAX_FASHION_MNIST_DIR).

Splits: 'train' (all 60000, or the first 60000 - validation_size), 'validation' (the last `validation_size` training
examples; needs validation_size > 0), 'test' (10000). Examples: 'image' uint8 [28, 28, 1], 'label' int32 [].
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import struct

import numpy as np

from maskjax.data.sources import ArraySource

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DIR = "MASKJAX_FASHION_MNIST_DIR"
APT_COMMAND = "sudo apt-get install dataset-fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "validation", "test")
_NUM_TRAIN = 60_000
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class FashionMnistNotFoundError(FileNotFoundError):
    """The IDX files are not where they were looked for; the message says how to install them."""


def resolve_dir(data_dir: str | None = None) -> str:
    """The directory with the four IDX files: `data_dir` when given (and only it: a named directory is never
    replaced by another), else $MASKJAX_FASHION_MNIST_DIR, else DEFAULT_DIR."""
    if data_dir:
        directory, origin = data_dir, "data_dir"
    elif os.environ.get(ENV_DIR):
        directory, origin = os.environ[ENV_DIR], f"${ENV_DIR}"
    else:
        directory, origin = DEFAULT_DIR, "the default directory"
    missing = [f for pair in FILES.values() for f in pair if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise FashionMnistNotFoundError(
            f"Fashion-MNIST IDX files not found in {directory!r} ({origin}; missing: {', '.join(missing)}). "
            f"Install them with `{APT_COMMAND}` (files go to {DEFAULT_DIR}/), or point data_dir / ${ENV_DIR} to a "
            f"directory holding {', '.join(f for pair in FILES.values() for f in pair)}.")
    return directory


def available(data_dir: str | None = None) -> bool:
    try:
        resolve_dir(data_dir)
        return True
    except FashionMnistNotFoundError:
        return False


def read_idx(path: str) -> np.ndarray:
    """Reads a (gzip-compressed) IDX file: 2 zero bytes, dtype code, rank, big-endian int32 dims, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (header {data[:4]!r})")
    rank = data[3]
    shape = struct.unpack(f">{rank}i", data[4:4 + 4 * rank])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = np.frombuffer(data, dtype, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {body.size} values")
    return body.reshape(shape).astype(dtype.newbyteorder("="))


def load_idx_arrays(part: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of part 'train' (N=60000) or 'test' (N=10000)."""
    if part not in FILES:
        raise ValueError(f"part must be one of {sorted(FILES)}, got {part!r}")
    return _read_part(part, resolve_dir(data_dir))


@functools.lru_cache(maxsize=2)
def _read_part(part: str, directory: str) -> tuple[np.ndarray, np.ndarray]:
    """Parsed once per process (the gzip parse of train takes about a second); returned read-only."""
    images_file, labels_file = FILES[part]
    images = read_idx(os.path.join(directory, images_file))
    labels = read_idx(os.path.join(directory, labels_file))
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"unexpected Fashion-MNIST arrays in {directory}: {images.shape}, {labels.shape}")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _split_range(split: str, validation_size: int) -> tuple[str, slice]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a Fashion-MNIST split; valid: {SPLITS}")
    if not 0 <= validation_size < _NUM_TRAIN:
        raise ValueError(f"validation_size must be in [0, {_NUM_TRAIN}), got {validation_size}")
    if split == "validation" and validation_size == 0:
        raise ValueError("split='validation' needs validation_size > 0 (the last validation_size training "
                         "examples are held out); or evaluate on split='test'")
    if split == "test":
        return "test", slice(None)
    if split == "validation":
        return "train", slice(_NUM_TRAIN - validation_size, _NUM_TRAIN)
    return "train", slice(0, _NUM_TRAIN - validation_size)


class FashionMnist(ArraySource):
    """Random-access Fashion-MNIST split read from the IDX files (all in memory: 47 MB for train)."""

    def __init__(self, split: str = "train", *, data_dir: str | None = None, validation_size: int = 0):
        part, rows = _split_range(split, validation_size)
        images, labels = load_idx_arrays(part, data_dir)
        super().__init__({"image": images[rows, :, :, None], "label": labels[rows].astype(np.int32)},
                         class_names=CLASS_NAMES, name=f"fashion_mnist/{split}")
        self.split = split


def _tensorflow_available() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def _load_tfds(split: str, validation_size: int, data_dir: str | None) -> ArraySource:
    """Split from TFDS `fashion_mnist` (needs TensorFlow and prepared data in data_dir; never downloads)."""
    import tensorflow_datasets as tfds

    part, rows = _split_range(split, validation_size)
    tfds_split = part if rows == slice(None) else f"{part}[{rows.start}:{rows.stop}]"
    data = tfds.as_numpy(tfds.load("fashion_mnist", split=tfds_split, data_dir=data_dir, batch_size=-1,
                                   download=False))
    images = np.asarray(data["image"], np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    return ArraySource({"image": images, "label": np.asarray(data["label"], np.int32)},
                       class_names=CLASS_NAMES, name=f"fashion_mnist/{split} (tfds)")


def load(split: str = "train", *, data_dir: str | None = None, validation_size: int = 0,
         use_tfds: bool | None = None) -> ArraySource:
    """A Fashion-MNIST split: TFDS `fashion_mnist` if TensorFlow is importable and its data is prepared, else the
    local IDX files.

    Args:
      split: 'train', 'validation' (last `validation_size` of train) or 'test'.
      data_dir: TFDS data directory and/or directory of the IDX files (None = library defaults). A given
        directory is the only place looked at: if neither TFDS nor the IDX files are there, the error names it.
      validation_size: training examples held out at the end of train as 'validation' (0 = none).
      use_tfds: True = TFDS only, False = IDX only, None = TFDS when possible, else IDX.
    Raises:
      FashionMnistNotFoundError naming the directory and the apt command, when no source has the data.
    """
    _split_range(split, validation_size)  # Validate before touching any file.
    if use_tfds or (use_tfds is None and _tensorflow_available()):
        try:
            return _load_tfds(split, validation_size, data_dir)
        except Exception as error:  # noqa: BLE001 - any TFDS failure falls back to the offline files.
            if use_tfds:
                raise
            logging.info("TFDS fashion_mnist unavailable (%s); reading the IDX files instead.", error)
    return FashionMnist(split, data_dir=data_dir, validation_size=validation_size)
