"""Panoptic and semantic segmentation data sets of TFDS in maskjax's label-map convention.

maskjax's segmentation tasks read 'semantic' int32 [H, W] (category ids with the stuff categories first, -1 =
void) and 'instance' int32 [H, W] (1..n per thing instance, 0 = none). The adapters here turn TFDS examples into
that form; `maskjax.data.pipeline.make_source` applies them to `tfds:coco/2017_panoptic` and `tfds:scene_parse150`.
Both builders need TensorFlow and the data files (config only here: configs/eomt_coco_panoptic.py,
configs/eomt_ade20k.py); the adapters themselves are numpy and are tested on synthetic examples.

COCO panoptic: 'panoptic_image' encodes each pixel's segment id as R + 256 G + 256^2 B (0 = void);
'panoptic_objects' lists the segments ('id', 'label' over the 133 panoptic categories, things first as in
panopticapi's category list, 'is_crowd'). Stuff (labels 80..132) becomes 0..52, things (0..79) become 53..132.
Crowd regions become void: the loss never sees them and PQ treats them as void, not as panopticapi's crowd (whose
only difference: an unmatched prediction's overlap with same-class crowd also excuses it, and crowd is not
subtracted from the union). Instance ids are assigned in the order of 'panoptic_objects'.

ADE20K (scene_parse150): 'annotation' uint8 [H, W, 1], 0 = other (void), 1..150 the classes -> semantic 0..149,
no instances (every category is treated as stuff: mask classification for semantic segmentation, Mask2Former's
ADE20K semantic setting).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

COCO_THINGS, COCO_STUFF = 80, 53
ADE20K_CLASSES = 150


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """panopticapi's id encoding: uint8 [H, W, 3] -> int64 [H, W] = R + 256 G + 256^2 B."""
    rgb = np.asarray(rgb).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def coco_panoptic_example(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A TFDS `coco/2017_panoptic` example -> {'image', 'semantic', 'instance'} in maskjax's convention."""
    ids = rgb_to_id(example["panoptic_image"])
    objects = example["panoptic_objects"]
    semantic = np.full(ids.shape, -1, np.int32)
    instance = np.zeros(ids.shape, np.int32)
    next_instance = 1
    for segment_id, label, crowd in zip(np.asarray(objects["id"]), np.asarray(objects["label"]),
                                        np.asarray(objects["is_crowd"])):
        label = int(label)
        if not 0 <= label < COCO_THINGS + COCO_STUFF:
            raise ValueError(f"coco panoptic: segment {int(segment_id)} has label {label}, outside "
                             f"[0, {COCO_THINGS + COCO_STUFF})")
        pixels = ids == int(segment_id)
        if crowd:
            continue  # void
        if label >= COCO_THINGS:
            semantic[pixels] = label - COCO_THINGS
        else:
            semantic[pixels] = COCO_STUFF + label
            instance[pixels] = next_instance
            next_instance += 1
    return {"image": np.asarray(example["image"], np.uint8), "semantic": semantic, "instance": instance}


def ade20k_example(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A TFDS `scene_parse150` example -> {'image', 'semantic', 'instance' (zeros)}; class 0 ('other') is void."""
    annotation = np.asarray(example["annotation"])
    if annotation.ndim == 3:
        annotation = annotation[..., 0]
    semantic = annotation.astype(np.int32) - 1
    return {"image": np.asarray(example["image"], np.uint8), "semantic": semantic,
            "instance": np.zeros(semantic.shape, np.int32)}


ADAPTERS = {"coco/2017_panoptic": coco_panoptic_example, "scene_parse150": ade20k_example}


class AdaptedSource:
    """A random-access source whose examples go through `adapter` (keeps `len`; adds `panoptic_info`)."""

    def __init__(self, source: Any, adapter: Any, info: Mapping[str, Any]):
        self._source, self._adapter, self._info = source, adapter, dict(info)
        self.class_names = tuple(info["categories"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._adapter(self._source[index])

    def panoptic_info(self) -> dict:
        return dict(self._info)


def panoptic_info(builder: str, category_names: Any = None, max_instances: int = 100) -> dict:
    """The `panoptic_info()` of an adapted TFDS builder (see `maskjax.data.builtin.BuiltinShapes.panoptic_info`)."""
    if builder == "coco/2017_panoptic":
        names = list(category_names) if category_names is not None else [f"coco_{i}" for i in range(133)]
        categories = tuple(names[COCO_THINGS:]) + tuple(names[:COCO_THINGS])
        return {"categories": categories, "is_thing": (False,) * COCO_STUFF + (True,) * COCO_THINGS,
                "max_instances": max_instances, "void": -1}
    names = tuple(category_names[1:]) if category_names is not None else tuple(f"ade_{i}" for i in range(150))
    return {"categories": names, "is_thing": (False,) * ADE20K_CLASSES, "max_instances": 0, "void": -1}
