"""TFDS builders without TensorFlow: built offline into tmp_path (array_record) and read back equal to the source;
the pipeline's 'tfds:' path, also with `tfds.testing.mock_data`."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from maskjax.data import builtin, fashion_mnist, pipeline, tfds_builders  # noqa: E402

TINY = (("train", 40), ("validation", 12), ("test", 12))


def tiny_config(**kwargs):
    return tfds_builders.MaskjaxShapesConfig(name="tiny", split_sizes=TINY, image_size=24, seed=2, **kwargs)


_WITHOUT_TENSORFLOW = r"""
import importlib.util
import sys


class HideTensorFlow:
    # Wraps each import finder so that `tensorflow` / `tensorflow.*` are found nowhere: importing them fails and
    # importlib.util.find_spec("tensorflow") is None, as when TensorFlow is not installed. (Not
    # sys.modules["tensorflow"] = None: tfds reads a "tensorflow" key in sys.modules as "TensorFlow is loaded".)
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.modules.pop("tensorflow", None)
sys.meta_path[:] = [HideTensorFlow(f) for f in sys.meta_path]
try:
    import tensorflow  # noqa: F401
    raise SystemExit("tensorflow could still be imported")
except ImportError:
    pass
import numpy as np
import tensorflow_datasets as tfds
from maskjax.data import builtin, pipeline, tfds_builders

data_dir, tiny = sys.argv[1], (("train", 40), ("validation", 12), ("test", 12))
config = tfds_builders.MaskjaxShapesConfig(name="tiny", split_sizes=tiny, image_size=24, seed=2)
builder = tfds_builders.MaskjaxShapes(config=config, data_dir=data_dir)
builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
reference = builtin.BuiltinShapes("validation", seed=2, image_size=24, split_sizes=dict(tiny)).as_arrays()
source = builder.as_data_source(split="validation")
for key, value in reference.items():
    np.testing.assert_array_equal(np.asarray(source[5][key]), value[5])
via_pipeline = pipeline.make_source("tfds:maskjax_shapes", "validation", seed=0, image_size=24, data_dir=data_dir,
                                    builder_kwargs={"config": config})
np.testing.assert_array_equal(via_pipeline[5]["image"], reference["image"][5])
assert "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is None
print("built and read", len(source), "examples without TensorFlow")
"""


@pytest.mark.slow
def test_tensorflow_is_not_needed(tmp_path):
    """Build and read the builders in a fresh interpreter where importing TensorFlow fails (whether or not it is
    installed here), directly and through the pipeline's 'tfds:' path."""
    root = Path(__file__).resolve().parents[2]
    # A stand-in TensorFlow on the path, so the blocking is exercised even where TensorFlow is not installed.
    fake = tmp_path / "fake_site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("the stand-in TensorFlow was imported")\n')
    paths = [str(root), str(fake.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW, str(tmp_path / "data")], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "built and read 12 examples without TensorFlow" in result.stdout


def test_shapes_builder_builds_offline_and_reads_back_equal(tmp_path):
    builder = tfds_builders.MaskjaxShapes(config=tiny_config(), data_dir=str(tmp_path))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    assert builder.info.file_format.value == "array_record"
    assert list(tmp_path.glob("maskjax_shapes/tiny/1.0.0/*.array_record*"))
    assert builder.info.features["label"].names == list(builtin.THING_CLASSES)
    for split, size in TINY:
        data_source = builder.as_data_source(split=split)
        assert len(data_source) == size
        reference = builtin.BuiltinShapes(split, seed=2, image_size=24, split_sizes=dict(TINY)).as_arrays()
        for i in range(size):
            example = data_source[i]
            assert set(example) == set(reference)
            for key, value in reference.items():
                np.testing.assert_array_equal(np.asarray(example[key]), value[i], err_msg=f"{split}[{i}] {key}")


def test_pipeline_reads_tfds_sources(tmp_path):
    source = pipeline.make_source("tfds:maskjax_shapes", "validation", seed=0, image_size=24, data_dir=str(tmp_path),
                                  builder_kwargs={"config": tiny_config()})
    assert len(source) == 12 and source.num_classes == 10 and source.class_names[0] == "circle"
    example = source[3]
    assert example["image"].dtype == np.uint8 and example["label"].dtype == np.int32
    assert example["semantic"].dtype == np.int32
    reference = builtin.BuiltinShapes("validation", seed=2, image_size=24, split_sizes=dict(TINY))[3]
    for key in reference:
        np.testing.assert_array_equal(example[key], reference[key])
    train = pipeline.TrainLoader(source, global_batch_size=6, seed=0, image_size=24, num_threads=0)
    direct = builtin.BuiltinShapes("validation", seed=2, image_size=24, split_sizes=dict(TINY))
    same = pipeline.TrainLoader(direct, global_batch_size=6, seed=0, image_size=24, num_threads=0)
    for step in (0, 2):
        for key, value in train.batch_at(step).items():
            np.testing.assert_array_equal(value, same.batch_at(step)[key])


def test_unknown_tfds_data_set_does_not_download(tmp_path):
    with pytest.raises(Exception) as info:
        pipeline.make_source("tfds:maskjax_no_such_set", "train", seed=0, image_size=32, data_dir=str(tmp_path))
    assert "maskjax_no_such_set" in str(info.value)


@pytest.mark.skipif(not fashion_mnist.available(),
                    reason="Fashion-MNIST IDX files missing: `sudo apt-get install dataset-fashion-mnist`")
def test_fashion_mnist_builder_builds_offline(tmp_path):
    data_dir = str(tmp_path)
    test = tfds.data_source("maskjax_fashion_mnist", split="test", data_dir=data_dir)
    images, labels = fashion_mnist.load_idx_arrays("test")
    assert len(test) == 10_000
    rows = np.random.default_rng(0).choice(10_000, 300, replace=False)
    for i in rows:
        np.testing.assert_array_equal(test[int(i)]["image"], images[i, :, :, None])
        assert int(test[int(i)]["label"]) == labels[i]
    validation = pipeline.make_source("tfds:maskjax_fashion_mnist", "train[55000:]", seed=0, image_size=28,
                                      data_dir=data_dir)
    train_images, train_labels = fashion_mnist.load_idx_arrays("train")
    assert len(validation) == 5000
    np.testing.assert_array_equal(validation.get_batch([0, 4999])["image"][..., 0], train_images[[55000, 59999]])
    assert validation.class_names == fashion_mnist.CLASS_NAMES


class _DataSourceMock(tfds.testing.PickableDataSourceMock):
    """tfds' mock sets `__getitems__` as a plain attribute (unbound: `self` is missing when called); bind it."""

    def __setattr__(self, name, value):
        if name == "__getitems__" and isinstance(value, functools.partial) and not value.args:
            value = functools.partial(value, self)
        super().__setattr__(name, value)


def test_mock_data_feeds_the_tfds_path():
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE,
                                mock_array_record_data_source=_DataSourceMock()):
        source = pipeline.make_source("tfds:mnist", "train", seed=0, image_size=28)
        assert len(source) == 10
        example = source[4]
        assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
        assert example["label"].dtype == np.int32 and 0 <= int(example["label"]) < 10
        batch = pipeline.TrainLoader(source, global_batch_size=4, seed=0, image_size=32,
                                     num_threads=0).batch_at(2)
        assert batch["image"].shape == (4, 32, 32, 1) and batch["label"].dtype == np.int32
