"""TFDS builders that need no TensorFlow (array_record files, `Tensor`/`ClassLabel` features), built fully offline.

- `maskjax_shapes`: the built-in procedural data set (maskjax.data.builtin) with image / label / semantic / instance /
  num_objects. Configs: 'default' (32x32, seed 0, 50000/5000/5000), 'small' (32x32, seed 0, 5000/1000/1000);
  any `MaskjaxShapesConfig(...)` can be passed as `config=`.
- `maskjax_fashion_mnist`: Fashion-MNIST from the local IDX files (see maskjax.data.fashion_mnist); splits train
  (60000) and test (10000); TFDS split slicing gives a validation slice, e.g. 'train[55000:]'.

Build and read (importing this module registers the builders with TFDS):
  import tensorflow_datasets as tfds, maskjax.data.tfds_builders
  source = tfds.data_source("maskjax_shapes/small", split="train", data_dir=DIR)   # builds on first use
  source[0]  # {'image': uint8 [32, 32, 3], 'label': int64, 'semantic': int32 [32, 32], ...}
or `python -m maskjax.data.tfds_builders --data_dir DIR [--name maskjax_shapes/small]`.
The sources feed grain directly (`grain.MapDataset.source(source)`) or maskjax.data.pipeline via 'tfds:<name>'.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from maskjax.data import builtin, fashion_mnist

_ARRAY_RECORD = "array_record"
_GENERATION_CHUNK = 500


@dataclasses.dataclass(eq=False)
class MaskjaxShapesConfig(tfds.core.BuilderConfig):
    """Generator options of maskjax.data.builtin.BuiltinShapes; split_sizes as ((split, size), ...)."""
    image_size: int = 32
    seed: int = 0
    num_classes: int = 10
    max_objects: int = 3
    split_sizes: tuple[tuple[str, int], ...] = tuple(builtin.DEFAULT_SPLIT_SIZES.items())


class MaskjaxShapes(tfds.core.GeneratorBasedBuilder):
    """The built-in procedural shapes data set: things on textured stuff, with semantic and instance masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        MaskjaxShapesConfig(name="default", description="32x32, seed 0, 50000/5000/5000 examples."),
        MaskjaxShapesConfig(name="small", description="32x32, seed 0, 5000/1000/1000 examples.",
                            split_sizes=(("train", 5000), ("validation", 1000), ("test", 1000))),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format or _ARRAY_RECORD, **kwargs)

    def _source(self, split: str) -> builtin.BuiltinShapes:
        config = self.builder_config
        return builtin.BuiltinShapes(split, seed=config.seed, image_size=config.image_size,
                                     num_classes=config.num_classes, max_objects=config.max_objects,
                                     split_sizes=dict(config.split_sizes))

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        size = config.image_size
        names = builtin.THING_CLASSES[:config.num_classes]
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Procedural shapes (maskjax builtin_shapes): one main object (label) and up to "
                f"{config.max_objects} smaller distractors on two textured stuff regions. Semantic ids: stuff "
                f"0..{builtin.NUM_STUFF - 1} = {builtin.STUFF_CLASSES}, things {builtin.NUM_STUFF}.."
                f"{builtin.NUM_STUFF + config.num_classes - 1} = {names}. Instance ids: 0 = stuff, 1 = main object."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=names),
                "semantic": tfds.features.Tensor(shape=(size, size), dtype=np.int32),
                "instance": tfds.features.Tensor(shape=(size, size), dtype=np.int32),
                "num_objects": tfds.features.Tensor(shape=(), dtype=np.int32),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Keep index order equal to the generator's, so record i is example i.
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split, _ in self.builder_config.split_sizes}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        source = self._source(split)
        for start in range(0, len(source), _GENERATION_CHUNK):
            batch = source.generate(range(start, min(start + _GENERATION_CHUNK, len(source))))
            for offset in range(len(batch["label"])):
                yield start + offset, {k: v[offset] for k, v in batch.items()}


class MaskjaxFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST read from the local IDX files (Debian package dataset-fashion-mnist); never downloads.

    The IDX directory: builder kwarg `idx_dir`, else $MASKJAX_FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, idx_dir: str | None = None, file_format: str | None = None, **kwargs: Any):
        self._idx_dir = idx_dir
        super().__init__(file_format=file_format or _ARRAY_RECORD, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao et al. 2017), 28x28 grey images of 10 clothing classes, from IDX files.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=fashion_mnist.CLASS_NAMES),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager
        directory = fashion_mnist.resolve_dir(self._idx_dir)  # Fails early, saying how to install the files.
        return {part: self._generate_examples(part, directory) for part in fashion_mnist.FILES}

    def _generate_examples(self, part: str, directory: str) -> Iterator[tuple[int, dict]]:
        images, labels = fashion_mnist.load_idx_arrays(part, directory)
        for i in range(len(labels)):
            yield i, {"image": images[i, :, :, None], "label": int(labels[i])}


BUILDERS = {"maskjax_shapes": MaskjaxShapes, "maskjax_fashion_mnist": MaskjaxFashionMnist}


def build(name: str, data_dir: str, **builder_kwargs: Any) -> tfds.core.DatasetBuilder:
    """Builds (if not built yet) TFDS data set `name` (e.g. 'maskjax_shapes/small') into `data_dir`, offline."""
    builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build maskjax's TFDS data sets offline (array_record).")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--name", action="append",
                        help="data set to build (repeatable), e.g. maskjax_shapes/small; default: all")
    args = parser.parse_args(argv)
    for name in args.name or ["maskjax_shapes", "maskjax_fashion_mnist"]:
        builder = build(name, args.data_dir)
        splits = {k: v.num_examples for k, v in builder.info.splits.items()}
        print(f"{name}: {builder.data_dir} {splits}")


if __name__ == "__main__":
    main()
