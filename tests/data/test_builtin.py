"""The built-in procedural data set: determinism, disjoint splits, label space, mask consistency, CLI."""

import hashlib
import math

import numpy as np
import pytest

from maskjax.data import builtin
from maskjax.data.builtin import NUM_STUFF, STUFF_CLASSES, THING_CLASSES, BuiltinShapes

SMALL = {"train": 1500, "validation": 500, "test": 500}


@pytest.fixture(scope="module")
def train_batch():
    return BuiltinShapes("train", split_sizes=SMALL).get_batch(range(600))


def test_same_seed_same_bytes_different_seed_different():
    a = BuiltinShapes("train", seed=3).get_batch(range(24))
    b = BuiltinShapes("train", seed=3).get_batch(range(24))
    c = BuiltinShapes("train", seed=4).get_batch(range(24))
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert all(not np.array_equal(a["image"][i], c["image"][i]) for i in range(24))


def test_random_access_equals_batched_generation():
    source = BuiltinShapes("validation", image_size=40)
    batch = source.get_batch([7, 3, 3, 11])
    for row, index in enumerate([7, 3, 3, 11]):
        single = source[index]
        for key in batch:
            np.testing.assert_array_equal(single[key], batch[key][row], err_msg=key)


def test_smaller_split_is_a_prefix_and_cache_matches_generation():
    big = BuiltinShapes("test", split_sizes={"test": 300})
    small = BuiltinShapes("test", split_sizes={"test": 40})
    cached = small.as_arrays()
    fresh = big.get_batch(range(40))
    for key in fresh:
        np.testing.assert_array_equal(cached[key], fresh[key], err_msg=key)
        assert cached[key].dtype == fresh[key].dtype, key
    np.testing.assert_array_equal(small[5]["semantic"], fresh["semantic"][5])


def test_splits_are_disjoint():
    hashes = {}
    for split, size in SMALL.items():
        images = BuiltinShapes(split, split_sizes=SMALL).as_arrays()["image"]
        hashes[split] = {hashlib.sha256(image.tobytes()).hexdigest() for image in images}
        assert len(hashes[split]) == size, f"duplicate images inside split {split}"
    assert not hashes["train"] & hashes["validation"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["validation"] & hashes["test"]


@pytest.mark.parametrize("image_size,num_classes,max_objects", [(32, 10, 3), (48, 6, 5), (16, 2, 0)])
def test_shapes_dtypes_and_ranges(image_size, num_classes, max_objects):
    source = BuiltinShapes("train", image_size=image_size, num_classes=num_classes, max_objects=max_objects)
    assert len(source) == 50_000
    assert source.class_names == THING_CLASSES[:num_classes]
    assert source.semantic_class_names() == STUFF_CLASSES + THING_CLASSES[:num_classes]
    example = source[0]
    assert example["image"].shape == (image_size, image_size, 3) and example["image"].dtype == np.uint8
    assert example["label"].shape == () and example["label"].dtype == np.int32
    for key in ("semantic", "instance"):
        assert example[key].shape == (image_size, image_size) and example[key].dtype == np.int32
    batch = source.get_batch(range(200))
    assert batch["label"].min() >= 0 and batch["label"].max() < num_classes
    assert batch["semantic"].min() >= 0 and batch["semantic"].max() < NUM_STUFF + num_classes
    assert batch["num_objects"].min() >= 1 and batch["num_objects"].max() <= 1 + max_objects
    assert (batch["instance"].max(axis=(1, 2)) == batch["num_objects"]).all()
    if max_objects:
        assert batch["num_objects"].max() > 1, "no distractor was ever drawn"


def test_semantic_and_instance_masks_agree(train_batch):
    semantic, instance, labels = train_batch["semantic"], train_batch["instance"], train_batch["label"]
    # Thing pixels are exactly the instance pixels.
    np.testing.assert_array_equal(instance > 0, semantic >= NUM_STUFF)
    main_extent = math.pi * (builtin._MAIN_SCALE[0] * 32) ** 2
    for i in range(len(labels)):
        ids = np.unique(instance[i])
        assert ids[0] == 0 and list(ids[1:]) == list(range(1, train_batch["num_objects"][i] + 1))
        areas = {}
        classes = set()
        for k in ids[1:]:
            pixel_classes = np.unique(semantic[i][instance[i] == k])
            assert len(pixel_classes) == 1, f"instance {k} of example {i} mixes classes {pixel_classes}"
            classes.add(int(pixel_classes[0]))
            areas[k] = int((instance[i] == k).sum())
        # Instance 1 is the main object: it carries the label, is the largest and mostly visible.
        assert int(np.unique(semantic[i][instance[i] == 1])[0]) == NUM_STUFF + labels[i]
        assert NUM_STUFF + labels[i] in np.unique(semantic[i])
        assert areas[1] == max(areas.values()), (i, areas)
        assert areas[1] >= 0.6 * main_extent, (i, areas[1])
        # Distractors are of other classes than the main object, and of distinct classes.
        assert len(classes) == len(ids) - 1


def test_stuff_regions_and_label_balance(train_batch):
    stuff_per_image = [len(np.unique(s[s < NUM_STUFF])) for s in train_batch["semantic"]]
    assert max(stuff_per_image) == 2 and min(stuff_per_image) >= 1
    assert np.mean(np.equal(stuff_per_image, 2)) > 0.9
    counts = np.bincount(train_batch["label"], minlength=10)
    expected = len(train_batch["label"]) / 10
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected)), counts
    stuff_counts = np.bincount(train_batch["semantic"][train_batch["semantic"] < NUM_STUFF], minlength=NUM_STUFF)
    assert (stuff_counts > 0).all(), stuff_counts


def test_colour_does_not_reveal_the_class(train_batch):
    """Mean colour of the main object per class stays within sampling noise of the overall mean."""
    images, instance, labels = train_batch["image"], train_batch["instance"], train_batch["label"]
    colours = np.stack([images[i][instance[i] == 1].mean(axis=0) for i in range(len(labels))])  # [n, 3]
    overall, spread = colours.mean(axis=0), colours.std(axis=0)
    for k in range(10):
        rows = labels == k
        stderr = spread / math.sqrt(rows.sum())
        assert np.all(np.abs(colours[rows].mean(axis=0) - overall) < 5 * stderr), (k, colours[rows].mean(axis=0))


def test_objects_stand_out_from_the_background(train_batch):
    images, instance = train_batch["image"].astype(float), train_batch["instance"]
    contrast = []
    for i in range(len(images)):
        inside = images[i][instance[i] == 1].mean(axis=0)
        around = images[i][instance[i] == 0].mean(axis=0)
        contrast.append(np.linalg.norm(inside - around))
    assert np.median(contrast) > 100, np.median(contrast)
    # Things are brighter than stuff in every channel (class-independent polarity; hues stay free).
    things = np.concatenate([images[i][instance[i] > 0] for i in range(len(images))])
    stuff = np.concatenate([images[i][instance[i] == 0] for i in range(len(images))])
    assert things.min() > stuff.max(), (things.min(), stuff.max())
    assert (things.max(axis=0) - things.min(axis=0) > 100).all()  # Wide range of object colours.


@pytest.mark.parametrize("kwargs,needle", [
    (dict(split="training"), "training"),
    (dict(split="train", image_size=8), "image_size"),
    (dict(split="train", num_classes=11), "num_classes"),
    (dict(split="train", num_classes=3, max_objects=3), "max_objects=3"),
    (dict(split="train", seed=-1), "seed"),
    (dict(split="train", split_sizes={"val": 5}), "val"),
])
def test_bad_arguments_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        BuiltinShapes(**kwargs)


def test_index_out_of_range():
    source = BuiltinShapes("test", split_sizes={"test": 10})
    with pytest.raises(IndexError, match="10"):
        source[10]
    with pytest.raises(IndexError):
        source.get_batch([0, -1])


def test_contact_sheet_cli(tmp_path):
    from PIL import Image

    path = tmp_path / "sheet.png"
    builtin.main(["--contact_sheet", str(path), "--count", "8"])
    with Image.open(path) as image:
        assert image.size[0] > 600 and image.size[1] > 200
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 20  # Not a blank canvas.
