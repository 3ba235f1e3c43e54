"""Fashion-MNIST from the local IDX files, checked against an independent gzip/struct parse and published statistics.

The data tests skip (saying how to install the files) when the Debian package dataset-fashion-mnist is absent;
`.ci/run` installs it, so in CI they run.
"""

import gzip
import os
import struct

import numpy as np
import pytest

from maskjax.data import fashion_mnist, pipeline

DATA_DIR = os.environ.get(fashion_mnist.ENV_DIR) or fashion_mnist.DEFAULT_DIR
needs_files = pytest.mark.skipif(
    not fashion_mnist.available(),
    reason=f"Fashion-MNIST IDX files not in {DATA_DIR}; install them with `sudo apt-get install dataset-fashion-mnist`")


def parse_idx_independently(path):
    """Straight from the IDX spec: magic 0x00000803 (images) / 0x00000801 (labels), big-endian sizes, raw bytes."""
    with gzip.open(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        if magic == 0x803:
            count, rows, cols = struct.unpack(">III", f.read(12))
            return np.frombuffer(f.read(), np.uint8).reshape(count, rows, cols)
        assert magic == 0x801, hex(magic)
        (count,) = struct.unpack(">I", f.read(4))
        return np.frombuffer(f.read(), np.uint8)


@pytest.fixture(scope="module")
def reference():
    return {part: (parse_idx_independently(os.path.join(DATA_DIR, images)),
                   parse_idx_independently(os.path.join(DATA_DIR, labels)))
            for part, (images, labels) in fashion_mnist.FILES.items()}


def test_missing_files_error_names_directory_and_apt_command(tmp_path):
    with pytest.raises(fashion_mnist.FashionMnistNotFoundError) as info:
        fashion_mnist.FashionMnist("train", data_dir=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message
    assert not fashion_mnist.available(str(tmp_path))


def test_bad_split_and_validation_size():
    with pytest.raises(ValueError, match="'dev'"):
        fashion_mnist.load("dev")
    with pytest.raises(ValueError, match="validation_size"):
        fashion_mnist.load("validation")
    with pytest.raises(ValueError, match="validation_size"):
        fashion_mnist.load("train", validation_size=60_000)


@needs_files
def test_train_and_test_match_the_files(reference):
    train = fashion_mnist.load("train", use_tfds=False)
    test = pipeline.make_source("fashion_mnist", "test", seed=0, image_size=28, use_tfds=False)
    for source, (images, labels), size in ((train, reference["train"], 60_000), (test, reference["test"], 10_000)):
        assert len(source) == size
        arrays = source.as_arrays()
        assert arrays["image"].shape == (size, 28, 28, 1) and arrays["image"].dtype == np.uint8
        assert arrays["label"].dtype == np.int32
        np.testing.assert_array_equal(arrays["image"][..., 0], images)
        np.testing.assert_array_equal(arrays["label"], labels)
        example = source[size - 1]
        assert example["image"].shape == (28, 28, 1) and example["label"].shape == ()
        np.testing.assert_array_equal(np.bincount(arrays["label"], minlength=10), np.full(10, size // 10))
    assert train.class_names[9] == "Ankle boot" and train.num_classes == 10
    # Published training-set statistics of Fashion-MNIST (pixels / 255): mean 0.2860, std 0.3530.
    pixels = train.as_arrays()["image"].astype(np.float64) / 255
    assert abs(pixels.mean() - 0.2860) < 5e-4 and abs(pixels.std() - 0.3530) < 5e-4


@needs_files
def test_validation_is_the_end_of_train(reference):
    images, labels = reference["train"]
    train = fashion_mnist.load("train", validation_size=5000, use_tfds=False)
    validation = fashion_mnist.load("validation", validation_size=5000, use_tfds=False)
    assert (len(train), len(validation)) == (55_000, 5000)
    np.testing.assert_array_equal(validation.as_arrays()["image"][..., 0], images[55_000:])
    np.testing.assert_array_equal(train.as_arrays()["label"], labels[:55_000])


@needs_files
def test_tfds_is_preferred_when_it_works_and_idx_otherwise(monkeypatch, reference):
    import tensorflow_datasets as tfds

    calls = []

    def fake_load(name, split, data_dir, batch_size, download):
        calls.append((name, split, download))
        return {"image": np.zeros((3, 28, 28, 1), np.uint8), "label": np.array([1, 2, 3])}

    monkeypatch.setattr(fashion_mnist, "_tensorflow_available", lambda: True)
    monkeypatch.setattr(tfds, "load", fake_load)
    monkeypatch.setattr(tfds, "as_numpy", lambda tree: tree)
    source = fashion_mnist.load("validation", validation_size=100)
    assert calls == [("fashion_mnist", "train[59900:60000]", False)]
    assert len(source) == 3 and source[0]["label"].dtype == np.int32

    def failing_load(*args, **kwargs):
        raise RuntimeError("no prepared fashion_mnist in data_dir")

    monkeypatch.setattr(tfds, "load", failing_load)
    fallback = fashion_mnist.load("test")
    np.testing.assert_array_equal(fallback.as_arrays()["label"], reference["test"][1])
    with pytest.raises(RuntimeError, match="no prepared"):
        fashion_mnist.load("test", use_tfds=True)


@needs_files
def test_training_batches_are_resized_and_normalised():
    source = fashion_mnist.load("test", use_tfds=False)
    train = pipeline.TrainLoader(source, global_batch_size=16, seed=0, image_size=32, augment=True, num_threads=0)
    batch = train.batch_at(0)
    assert batch["image"].shape == (16, 32, 32, 1) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def _fake_idx_dir(directory, parts=("train", "test"), count=3, label=7):
    """A directory of tiny, valid IDX files (`count` images of value `label`, labels `label`) for `parts`."""
    os.makedirs(directory, exist_ok=True)
    for part in parts:
        images_file, labels_file = fashion_mnist.FILES[part]
        with gzip.open(os.path.join(directory, images_file), "wb") as f:
            f.write(struct.pack(">IIII", 0x803, count, 28, 28) + bytes([label]) * (count * 28 * 28))
        with gzip.open(os.path.join(directory, labels_file), "wb") as f:
            f.write(struct.pack(">II", 0x801, count) + bytes([label]) * count)
    return str(directory)


def test_a_named_data_dir_is_never_replaced_by_the_environment_variable(tmp_path, monkeypatch):
    # Issue 13: an incomplete data_dir used to be swapped silently for $MASKJAX_FASHION_MNIST_DIR.
    complete = _fake_idx_dir(tmp_path / "complete", label=7)
    incomplete = _fake_idx_dir(tmp_path / "incomplete", parts=("test",))
    monkeypatch.setenv(fashion_mnist.ENV_DIR, complete)
    with pytest.raises(fashion_mnist.FashionMnistNotFoundError) as info:
        fashion_mnist.load("test", data_dir=incomplete, use_tfds=False)
    assert repr(incomplete) in str(info.value) and complete not in str(info.value)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    # The variable is the default when no directory is named.
    assert fashion_mnist.load("test", use_tfds=False)[0]["label"] == 7


def test_the_error_names_the_given_data_dir_when_no_variable_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv(fashion_mnist.ENV_DIR, raising=False)
    empty = str(tmp_path / "nothing_here")
    with pytest.raises(fashion_mnist.FashionMnistNotFoundError) as info:
        fashion_mnist.load("train", data_dir=empty)
    assert repr(empty) in str(info.value) and repr(fashion_mnist.DEFAULT_DIR) not in str(info.value)
