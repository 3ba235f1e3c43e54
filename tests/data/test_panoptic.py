"""The TFDS segmentation adapters on synthetic examples shaped like coco/2017_panoptic and scene_parse150."""

import numpy as np

from maskjax.data.panoptic import COCO_STUFF, ade20k_example, coco_panoptic_example, panoptic_info, rgb_to_id


def encode(ids):
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], -1).astype(np.uint8)


def test_coco_panoptic_example_to_maps():
    ids = np.array([[0, 7, 7], [300, 300, 70000], [9, 9, 70000]])
    example = {"image": np.zeros((3, 3, 3), np.uint8), "panoptic_image": encode(ids),
               # 7: thing label 2 (car-like), 300: stuff label 85, 70000: thing label 0, 9: crowd thing label 2
               "panoptic_objects": {"id": np.array([7, 300, 70000, 9]), "label": np.array([2, 85, 0, 2]),
                                    "is_crowd": np.array([False, False, False, True])}}
    np.testing.assert_array_equal(rgb_to_id(encode(ids)), ids)
    out = coco_panoptic_example(example)
    # stuff 85 -> 5; things: label 2 -> 53 + 2 = 55 (instance 1), label 0 -> 53 (instance 2); void 0 and crowd -> -1
    np.testing.assert_array_equal(out["semantic"], [[-1, 55, 55], [5, 5, 53], [-1, -1, 53]])
    np.testing.assert_array_equal(out["instance"], [[0, 1, 1], [0, 0, 2], [0, 0, 2]])
    info = panoptic_info("coco/2017_panoptic")
    assert len(info["categories"]) == 133 and info["is_thing"].count(False) == COCO_STUFF


def test_ade20k_example_to_maps():
    out = ade20k_example({"image": np.zeros((2, 2, 3), np.uint8), "annotation": np.array([[[0], [1]], [[150], [3]]])})
    np.testing.assert_array_equal(out["semantic"], [[-1, 0], [149, 2]])
    assert not out["instance"].any()
