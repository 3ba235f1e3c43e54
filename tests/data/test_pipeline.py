"""The input pipeline: source names, deterministic order, per-host sharding, resumption, eval padding, preprocessing."""

import numpy as np
import pytest

from maskjax.data import pipeline, preprocess
from maskjax.data.builtin import BuiltinShapes
from maskjax.data.sources import ArraySource


def counting_source(n=50, size=8):
    """Example i has label i and an image whose pixels encode i (so order and crops can be checked exactly)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return ArraySource({"image": images, "label": np.arange(n, dtype=np.int32)})


def loader(source, **kwargs):
    defaults = dict(global_batch_size=12, seed=5, image_size=8, augment=False, num_threads=0)
    defaults.update(kwargs)
    return pipeline.TrainLoader(source, **defaults)


# ------------------------------------------------------------------------------------------------- sources
def test_make_source_names():
    source = pipeline.make_source("builtin_shapes", "validation", seed=0, image_size=24)
    assert isinstance(source, BuiltinShapes) and source[0]["image"].shape == (24, 24, 3)
    assert source.num_classes == 10
    for bad in ("imagenet", "tfds:", "builtin", ""):
        with pytest.raises(ValueError, match="builtin_shapes.*fashion_mnist.*tfds:") as info:
            pipeline.make_source(bad, "train", seed=0, image_size=32)
        assert repr(bad) in str(info.value)


def test_make_source_cache_materialises():
    source = pipeline.make_source("builtin_shapes", "test", seed=1, image_size=16, cache=True,
                                  split_sizes={"test": 20})
    fresh = BuiltinShapes("test", seed=1, image_size=16, split_sizes={"test": 20})
    np.testing.assert_array_equal(source[19]["image"], fresh.generate([19])["image"][0])


# --------------------------------------------------------------------------------------------------- order
def test_epoch_orders_are_permutations_and_differ():
    train = loader(counting_source(50))
    perms = [train.permutation(e) for e in range(3)]
    for perm in perms:
        np.testing.assert_array_equal(np.sort(perm), np.arange(50))
    assert not np.array_equal(perms[0], perms[1]) and not np.array_equal(perms[1], perms[2])
    np.testing.assert_array_equal(loader(counting_source(50)).permutation(2), perms[2])
    assert not np.array_equal(loader(counting_source(50), seed=6).permutation(0), perms[0])


def test_stream_is_epoch_permutations_concatenated():
    """Global position p holds permutation_{p // N}[p % N], whatever the batch size (batches straddle epochs)."""
    n = 50
    expected = np.concatenate([loader(counting_source(n)).permutation(e) for e in range(4)])
    for batch_size in (12, 7, 50):
        train = loader(counting_source(n), global_batch_size=batch_size)
        steps = (3 * n) // batch_size + 1
        labels = np.concatenate([train.batch_at(s)["label"] for s in range(steps)])
        np.testing.assert_array_equal(labels, expected[:len(labels)])
        # Every epoch covers each example exactly once.
        for e in range(len(labels) // n):
            assert sorted(labels[e * n:(e + 1) * n]) == list(range(n))


@pytest.mark.parametrize("augment", [False, True])
def test_process_shards_concatenate_to_the_global_batch(augment):
    source = BuiltinShapes("train", image_size=16, split_sizes={"train": 30})
    kwargs = dict(global_batch_size=8, image_size=16, augment=augment, keys=("image", "label", "semantic"))
    single = loader(source, **kwargs)
    for step in (0, 3, 4):  # Step 3 straddles the epoch boundary (30 examples, batches of 8).
        whole = single.batch_at(step)
        for count in (2, 4):
            parts = [loader(source, process_index=i, process_count=count, **kwargs).batch_at(step)
                     for i in range(count)]
            for key in whole:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key], err_msg=key)


def test_batch_size_must_divide_by_processes():
    with pytest.raises(ValueError, match="global_batch_size=10.*process_count=4"):
        loader(counting_source(), global_batch_size=10, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2"):
        loader(counting_source(), process_index=2, process_count=2)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_batch_at_equals_iteration_and_resumption(num_threads):
    source = BuiltinShapes("train", image_size=16, split_sizes={"train": 40})
    train = loader(source, global_batch_size=16, image_size=16, augment=True, num_threads=num_threads, prefetch=3)
    from_start = {}
    for step, batch in train.iterate(0):
        from_start[step] = batch
        if step == 6:
            break
    assert sorted(from_start) == list(range(7))
    resumed = dict(train.iterate(4, num_steps=3))
    assert sorted(resumed) == [4, 5, 6]
    for step in range(7):
        direct = train.batch_at(step)
        for key in direct:
            np.testing.assert_array_equal(from_start[step][key], direct[key])
            if step >= 4:
                np.testing.assert_array_equal(resumed[step][key], direct[key])


def test_augmentation_is_a_padded_crop_and_flip_of_the_source_image():
    source = counting_source(20, size=8)
    train = loader(source, global_batch_size=10, augment=True, crop_padding=2)
    batch = train.batch_at(1)
    originals = source.get_batch(train.indices_at(1))["image"]
    seen_flip, seen_shift = False, False
    for out, original in zip(batch["image"], originals):
        padded = np.pad(original, ((2, 2), (2, 2), (0, 0)))
        candidates = {}
        for dy in range(5):
            for dx in range(5):
                crop = padded[dy:dy + 8, dx:dx + 8].astype(np.float32) / 127.5 - 1
                candidates[(dy, dx, False)] = crop
                candidates[(dy, dx, True)] = crop[:, ::-1]
        matches = [k for k, c in candidates.items() if np.allclose(c, out, atol=1e-6)]
        assert matches, "augmented image is no crop/flip of its source"
        seen_flip |= any(m[2] for m in matches)
        seen_shift |= any(m[:2] != (2, 2) for m in matches)
    assert seen_flip and seen_shift
    # Randomness follows the example's global position, so another seed gives other crops.
    other = loader(source, global_batch_size=10, augment=True, crop_padding=2, seed=9)
    assert not np.array_equal(other.batch_at(1)["image"], batch["image"])


def test_batches_are_normalised_float_images_and_int_labels():
    source = BuiltinShapes("train", split_sizes={"train": 16})
    batch = loader(source, global_batch_size=16, image_size=32).batch_at(0)
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (16, 32, 32, 3)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (16,)
    assert set(batch) == {"image", "label"}
    raw = source.get_batch(loader(source, global_batch_size=16).indices_at(0))["image"]
    np.testing.assert_allclose(batch["image"], raw / 127.5 - 1.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("num_examples", [None, 23])
def test_eval_batches_cover_the_split_once_in_order(num_examples):
    source = counting_source(50)
    expected = 50 if num_examples is None else num_examples
    for count in (1, 2):
        per_process = [list(pipeline.eval_batches(source, global_batch_size=8, image_size=8, process_index=i,
                                                  process_count=count, num_examples=num_examples, num_threads=1))
                       for i in range(count)]
        assert len({len(p) for p in per_process}) == 1  # Same number of batches everywhere.
        labels, valid = [], []
        for step in range(len(per_process[0])):
            labels.append(np.concatenate([p[step]["label"] for p in per_process]))
            valid.append(np.concatenate([p[step]["valid"] for p in per_process]))
        labels, valid = np.concatenate(labels), np.concatenate(valid)
        assert len(labels) == 8 * (-(-expected // 8))
        np.testing.assert_array_equal(labels[valid], np.arange(expected))
        assert valid[:expected].all() and not valid[expected:].any()


def test_eval_rejects_too_many_examples():
    with pytest.raises(ValueError, match="num_examples=51"):
        list(pipeline.eval_batches(counting_source(50), global_batch_size=8, image_size=8, num_examples=51))


# ----------------------------------------------------------------------------------------------- preprocessing
def test_normalize_range():
    image = np.array([[[0, 127, 255]]], np.uint8)
    np.testing.assert_allclose(preprocess.normalize(image), [[[-1.0, 127 / 127.5 - 1, 1.0]]], atol=1e-7)
    with pytest.raises(ValueError, match="uint8"):
        preprocess.normalize(image.astype(np.float32))


def test_resize_image_bilinear_and_masks_nearest():
    from PIL import Image

    rng = np.random.default_rng(1)
    example = {"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), "label": np.int32(3),
               "semantic": rng.integers(0, 15, (28, 28)).astype(np.int32)}
    out = preprocess.resize(example, 32)
    reference = np.asarray(Image.fromarray(example["image"][..., 0]).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out["image"][..., 0], reference)
    assert out["image"].shape == (32, 32, 1)
    # Nearest: each target pixel takes the source pixel containing its centre.
    src = np.floor((np.arange(32) + 0.5) * 28 / 32).astype(int)
    np.testing.assert_array_equal(out["semantic"], example["semantic"][np.ix_(src, src)])
    assert preprocess.resize(example, 28)["image"] is example["image"]


def test_crop_padding_fills_dense_maps_with_ignore_values():
    example = {"image": np.full((6, 6, 3), 200, np.uint8), "label": np.int32(0),
               "semantic": np.full((6, 6), 4, np.int32), "instance": np.full((6, 6), 1, np.int32)}
    seen_pad = False
    for seed in range(20):
        out = preprocess.random_crop_flip(example, np.random.default_rng(seed), padding=3)
        padded = out["image"][..., 0] == 0
        np.testing.assert_array_equal(out["semantic"] == preprocess.SEMANTIC_PAD, padded)
        np.testing.assert_array_equal(out["instance"] == 0, padded)
        seen_pad |= padded.any()
    assert seen_pad


def test_preprocess_eval_upsamples_grey_images():
    example = {"image": np.zeros((28, 28, 1), np.uint8), "label": np.uint8(7)}
    out = pipeline.preprocess_eval(example, 32)
    assert out["image"].shape == (32, 32, 1) and out["image"].dtype == np.float32
    assert out["label"].dtype == np.int32 and int(out["label"]) == 7
    with pytest.raises(ValueError, match="semantic"):
        pipeline.preprocess_eval(example, 32, keys=("image", "label", "semantic"))
