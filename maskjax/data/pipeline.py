"""The input pipeline of the trainer: named sources, a deterministic global-batch train loader, an eval loader.

Order. Training sees an endless stream of examples: epoch e is a permutation of the split drawn from (seed, e), and
the example at global position p = step * global_batch_size + j is `permutation(p // N)[p % N]` (N = split size).
Batches therefore run across epoch boundaries, and `batch_at(step)` is a pure function of (seed, step).

Hosts. Process i of P takes the contiguous slice [i * B / P, (i + 1) * B / P) of every global batch (B % P == 0), so
concatenating all processes' batches in process order gives the global batch, for any P.

Augmentation randomness. Example j of global batch `step` draws from a Philox stream keyed by
(seed, purpose, step, j): it depends on the global position only, never on the host, so 2 hosts x 2 devices see
exactly the batches of 1 host x 4 devices.

Parallelism. Batches are produced by a grain MapDataset over step numbers whose map is `batch_at`, turned into an
IterDataset with `num_threads` threads and a prefetch buffer; with num_threads=0 batches are made synchronously.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Iterator, Protocol, Sequence

import chex
import numpy as np

from maskjax.data.preprocess import preprocess_eval, preprocess_train

__all__ = ["make_source", "TrainLoader", "EvalLoader", "eval_batches", "preprocess_eval", "preprocess_train",
           "SOURCE_NAMES"]

SOURCE_NAMES = ("builtin_shapes", "builtin_clips", "fashion_mnist", "tfds:<builder_name>")
_ORDER_TAG = 0x0D5E  # Key-stream tags: data order and augmentation never share a stream.
_AUGMENT_TAG = 0xA06
PURPOSE_CROP_FLIP = 1
_LARGEST_STEP = 2 ** 62  # "Endless" for a MapDataset over steps.


class Source(Protocol):
    """grain's RandomAccessDataSource protocol (plus optional `get_batch`, `class_names`, `num_classes`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


# ------------------------------------------------------------------------------------------------ sources
def make_source(name: str, split: str, *, seed: int = 0, image_size: int = 32, data_dir: str | None = None,
                **kwargs: Any) -> Source:
    """A random-access source of examples ('image' uint8 [H, W, C], 'label' int32 [], ...).

    Args:
      name: 'builtin_shapes' (generated at `image_size` from `seed`; kwargs: num_classes, max_objects,
        split_sizes, cache=True to materialise the split in memory), 'builtin_clips' (video: panning clips of
        those images, 'image' uint8 [T, H, W, C]; kwargs: num_frames, max_speed and the image options),
        'fashion_mnist' (IDX files or TFDS; kwargs: validation_size, use_tfds; `seed` and `image_size` do not
        change the data) or 'tfds:<builder_name>'
        (a TFDS array_record data source, e.g. 'tfds:maskjax_shapes/small'; builds maskjax's own builders offline on
        first use; kwargs: download, builder_kwargs).
      split: split name of that data set ('train', 'validation', 'test', or a TFDS split such as 'train[:90%]').
      data_dir: TFDS data directory / directory of the Fashion-MNIST IDX files (None = library defaults).
    Images are resized to `image_size` later, in preprocessing.
    """
    if not isinstance(name, str):
        raise ValueError(f"data set name must be a string, got {name!r}; valid names: {', '.join(SOURCE_NAMES)}")
    if name == "builtin_shapes":
        from maskjax.data.builtin import BuiltinShapes

        cache = kwargs.pop("cache", False)
        source = BuiltinShapes(split, seed=seed, image_size=image_size, **kwargs)
        if cache:
            source.as_arrays()
        return source
    if name == "builtin_clips":
        from maskjax.data.clips import ShapeClips

        return ShapeClips(split, seed=seed, image_size=image_size, **kwargs)
    if name == "fashion_mnist":
        from maskjax.data import fashion_mnist

        return fashion_mnist.load(split, data_dir=data_dir, **kwargs)
    if name.startswith("tfds:") and len(name) > len("tfds:"):
        return _tfds_source(name[len("tfds:"):], split, data_dir=data_dir, **kwargs)
    raise ValueError(f"unknown data set name {name!r}; valid names: {', '.join(SOURCE_NAMES)}")


def _tfds_source(builder_name: str, split: str, *, data_dir: str | None, download: bool | None = None,
                 builder_kwargs: dict | None = None) -> Source:
    import tensorflow_datasets as tfds

    from maskjax.data import tfds_builders  # Registers maskjax's builders with TFDS.
    from maskjax.data.sources import TfdsSource

    if download is None:  # Our builders generate locally; never reach for the internet implicitly.
        download = builder_name.split("/")[0] in tfds_builders.BUILDERS
    data_source = tfds.data_source(
        builder_name, split=split, data_dir=data_dir, download=download, builder_kwargs=builder_kwargs,
        download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(try_download_gcs=False)})
    class_names = None
    info = getattr(data_source, "dataset_info", None)
    features = getattr(info, "features", None)
    if features is not None and "label" in features and hasattr(features["label"], "names"):
        class_names = features["label"].names
    source = TfdsSource(data_source, class_names=class_names, name=f"tfds:{builder_name}/{split}")
    from maskjax.data import panoptic

    base = builder_name.split(":")[0]
    if base in panoptic.ADAPTERS:  # segmentation data sets in maskjax's label-map convention
        return panoptic.AdaptedSource(source, panoptic.ADAPTERS[base], panoptic.panoptic_info(base))
    return source


def _read(source: Source, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Examples `indices` of `source`, using its batched reader when it has one."""
    if hasattr(source, "get_batch"):
        batch = source.get_batch(indices)
        return [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]
    return [source[int(i)] for i in indices]


def _stack(examples: Sequence[dict[str, np.ndarray]], image_size: int) -> dict[str, np.ndarray]:
    """Stacks preprocessed examples into a batch: 'image' float32 [b, image_size, image_size, C] (video:
    [b, T, image_size, image_size, C]), 'label' [b]."""
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    frames = (None,) if batch["image"].ndim == 5 else ()
    chex.assert_shape(batch["image"], (len(examples),) + frames + (image_size, image_size, None))
    chex.assert_type(batch["image"], np.float32)
    if "label" in batch:
        chex.assert_shape(batch["label"], (len(examples),))
    return batch


def _check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}")
    return global_batch_size // process_count


def _batches(make_batch: Any, start: int, stop: int, num_threads: int, prefetch: int) -> Iterator[tuple[int, Any]]:
    """(step, make_batch(step)) for step in [start, stop): grain threads + prefetch, or synchronously."""
    if num_threads <= 0:
        for step in range(start, stop):
            yield step, make_batch(step)
        return
    import grain

    dataset = grain.MapDataset.range(start, stop).map(lambda step: (step, make_batch(step)))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, 1))
    yield from dataset.to_iter_dataset(options)


# ------------------------------------------------------------------------------------------------ training
class TrainLoader:
    """Endless shuffled global batches, sharded per process; batch `step` is a pure function of (seed, step).

    Batches are dicts of numpy arrays for this process: 'image' float32 [b, H, W, C] in [-1, 1], 'label' int32 [b],
    plus the other requested `keys` (dense maps int32 [b, H, W]); b = global_batch_size / process_count.
    """

    def __init__(self, source: Source, *, global_batch_size: int, seed: int, image_size: int, augment: bool = True,
                 process_index: int = 0, process_count: int = 1, num_threads: int = 2, prefetch: int = 2,
                 keys: Sequence[str] = ("image", "label"), crop_padding: int = 4, flip: bool = True):
        self.local_batch_size = _check_sharding(global_batch_size, process_index, process_count)
        if len(source) == 0:
            raise ValueError("source is empty")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if "image" not in keys:
            raise ValueError(f"keys must include 'image', got {tuple(keys)}")
        self.source, self.global_batch_size, self.seed = source, global_batch_size, int(seed)
        self.image_size, self.augment, self.keys = image_size, augment, tuple(keys)
        self.process_index, self.process_count = process_index, process_count
        self.num_threads, self.prefetch = num_threads, prefetch
        self.crop_padding, self.flip = crop_padding, flip
        self.num_examples = len(source)
        self._lock = threading.Lock()

    @property
    def steps_per_epoch(self) -> float:
        return self.num_examples / self.global_batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        """int64 [N]: the order of epoch `epoch`, drawn from (seed, epoch) alone."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        with self._lock:  # Grain threads share the small cache of recent epochs.
            return _permutation(self.seed, int(epoch), self.num_examples)

    def global_positions(self, step: int) -> np.ndarray:
        """int64 [b]: positions in the endless example stream of this process's slice of global batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = step * self.global_batch_size + self.process_index * self.local_batch_size
        return np.arange(first, first + self.local_batch_size, dtype=np.int64)

    def indices_at(self, step: int) -> np.ndarray:
        """int64 [b]: source indices of this process's slice of global batch `step`."""
        positions = self.global_positions(step)
        epochs, offsets = np.divmod(positions, self.num_examples)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            indices[rows] = self.permutation(int(epoch))[offsets[rows]]
        return indices

    def augment_rng(self, step: int, position_in_batch: int, purpose: int = PURPOSE_CROP_FLIP) -> np.random.Generator:
        """The generator of example `position_in_batch` (0..global_batch_size-1) of global batch `step`."""
        key = np.random.SeedSequence([_AUGMENT_TAG, self.seed, purpose, step, position_in_batch])
        return np.random.Generator(np.random.Philox(key))

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step` (random access; what `iterate` yields at `step`)."""
        indices = self.indices_at(step)
        first_in_batch = self.process_index * self.local_batch_size
        examples = [
            preprocess_train(example, self.image_size,
                             self.augment_rng(step, first_in_batch + j) if self.augment else None,
                             augment=self.augment, crop_padding=self.crop_padding, flip=self.flip, keys=self.keys)
            for j, example in enumerate(_read(self.source, indices))]
        return _stack(examples, self.image_size)

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[tuple[int, dict]]:
        """(step, batch_at(step)) for step = start_step, start_step + 1, ... (endless unless num_steps is given)."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        stop = _LARGEST_STEP if num_steps is None else start_step + num_steps
        return _batches(self.batch_at, start_step, stop, self.num_threads, self.prefetch)

    def __iter__(self) -> Iterator[dict]:
        return (batch for _, batch in self.iterate(0))


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([_ORDER_TAG, seed, epoch])))
    permutation = generator.permutation(num_examples)
    permutation.flags.writeable = False
    return permutation


# ---------------------------------------------------------------------------------------------- evaluation
class EvalLoader:
    """One in-order pass over (the first `num_examples` of) a split, in global batches sharded per process.

    The final global batch is padded to full size; 'valid' (bool [b]) is False on padding rows, whose content is a
    copy of example 0. Every process yields the same number of batches.
    """

    def __init__(self, source: Source, *, global_batch_size: int, image_size: int, process_index: int = 0,
                 process_count: int = 1, num_examples: int | None = None, keys: Sequence[str] = ("image", "label"),
                 num_threads: int = 2, prefetch: int = 2):
        self.local_batch_size = _check_sharding(global_batch_size, process_index, process_count)
        total = len(source)
        if num_examples is None or num_examples < 0:
            num_examples = total
        if not 0 < num_examples <= total:
            raise ValueError(f"num_examples={num_examples} must be in [1, {total}] (the split size) or -1 for all")
        self.source, self.global_batch_size, self.image_size = source, global_batch_size, image_size
        self.process_index, self.process_count, self.keys = process_index, process_count, tuple(keys)
        self.num_examples, self.num_threads, self.prefetch = num_examples, num_threads, prefetch
        self.num_batches = -(-num_examples // global_batch_size)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        if not 0 <= step < self.num_batches:
            raise ValueError(f"step must be in [0, {self.num_batches}), got {step}")
        first = step * self.global_batch_size + self.process_index * self.local_batch_size
        positions = np.arange(first, first + self.local_batch_size)
        valid = positions < self.num_examples
        examples = [preprocess_eval(e, self.image_size, self.keys)
                    for e in _read(self.source, np.where(valid, positions, 0))]
        batch = _stack(examples, self.image_size)
        batch["valid"] = valid
        return batch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (batch for _, batch in _batches(self.batch_at, 0, self.num_batches, self.num_threads, self.prefetch))


def eval_batches(source: Source, *, global_batch_size: int, image_size: int, process_index: int = 0,
                 process_count: int = 1, num_examples: int | None = None, keys: Sequence[str] = ("image", "label"),
                 num_threads: int = 2, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Iterates `EvalLoader(...)`: local batches with 'image', 'label', ... and 'valid' bool [b]."""
    return iter(EvalLoader(source, global_batch_size=global_batch_size, image_size=image_size,
                           process_index=process_index, process_count=process_count, num_examples=num_examples,
                           keys=keys, num_threads=num_threads, prefetch=prefetch))


