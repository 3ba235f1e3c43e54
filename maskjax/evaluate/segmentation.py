"""Segmentation metrics as jit-able sums of fixed shape, so they add up exactly across batches and hosts, and the
host-side functions that turn the summed totals into metrics.

- mIoU, pixel accuracy (detectron2's `SemSegEvaluator`): `confusion_matrix` per batch, summed, then
  `miou_from_confusion`.
- Panoptic quality (panopticapi's `pq_compute`): `panoptic_sums` per batch, summed, then `pq_from_sums`.
- Mask AP (pycocotools' `COCOeval`, optional dependency): `mask_ap` on the host over a list of images.

Label conventions. Semantic maps hold a class in [0, C); anything else in the target (maskjax's -1, the datasets'
255) is the ignore label. A panoptic image is an id map [H, W] whose pixels index a per-image segment table
(classes [P] / [G], crowd flags [G]); -1 is void (ground truth) or "no prediction" (prediction); table slots whose
class is outside [0, C) (maskjax pads with -1) are unused, and pixels that name one count as void / no prediction.

Example (a task's `eval_sums` / `summarize`)::

    sums = {"confusion": confusion_matrix(pred_sem, batch["semantic"], C, batch["valid"]),
            **panoptic_sums(pred_ids, pred_classes, batch["segment_ids"], batch["segment_classes"],
                            batch["segment_crowd"], C, batch["valid"])}
    ...  # the trainer adds the sums of every batch
    metrics = {**miou_from_confusion(sums["confusion"]), **pq_from_sums(sums, is_thing)}
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

PANOPTIC_SUM_KEYS = ("pq_tp", "pq_fp", "pq_fn", "pq_iou")


def _check_num_classes(num_classes: int) -> int:
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _class_keys(prefix: str, num_classes: int, class_names: Optional[Sequence[str]]) -> list[str]:
    if class_names is None:
        return [f"{prefix}/{c}" for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
    return [f"{prefix}/{name}" for name in class_names]


# --------------------------------------------------------------------------------------------------------------
# mIoU
# --------------------------------------------------------------------------------------------------------------

def confusion_matrix(pred: jax.Array, target: jax.Array, num_classes: int,
                     valid: Optional[jax.Array] = None) -> jax.Array:
    """int32 [C, C] pixel counts of int pred / target [B, H, W]: rows = target class, columns = predicted class.

    Target pixels outside [0, C) (ignore / void: -1, 255) count nowhere, nor do images with valid [B] False.
    Predictions must lie in [0, C) (an argmax does): a pixel whose prediction does not is dropped like an ignored
    one, which would overstate accuracy, so map "no prediction" to a class before calling this.

    int32, not float32: float32 counts stop being exact at 2^24 pixels (~256 images of 256x256), int32 at 2^31 per
    cell.
    """
    num_classes = _check_num_classes(num_classes)
    chex.assert_rank([pred, target], 3)
    chex.assert_equal_shape([pred, target])
    pred, target = jnp.asarray(pred, jnp.int32), jnp.asarray(target, jnp.int32)  # 255 * C overflows uint8
    keep = (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes)
    if valid is not None:
        chex.assert_shape(valid, (pred.shape[0],))
        keep &= jnp.asarray(valid, bool)[:, None, None]
    # A scatter-add of pixel counts: a one-hot matmul would need [B*H*W, C] floats.
    index = jnp.where(keep, target * num_classes + pred, 0).reshape(-1)
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(keep.reshape(-1).astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def miou_from_confusion(confusion: np.ndarray, class_names: Optional[Sequence[str]] = None) -> dict[str, float]:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU ('iou/<name>') from a summed confusion [C, C]
    (rows = target, as `confusion_matrix`); fractions in [0, 1].

    detectron2's rule: IoU_c = tp / (target_c + pred_c - tp), and the means run over the classes with target pixels
    (> 0) only. A class that is predicted but absent from the target is left out (its IoU is NaN); its false
    positives still lower the IoU of the classes whose pixels it took. (mmseg differs: its nanmean keeps every class
    with union > 0, so a class predicted but absent counts as IoU 0.) NaN where no class has target pixels.
    """
    confusion = np.asarray(confusion, np.float64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got shape {confusion.shape}")
    num_classes = confusion.shape[0]
    tp = np.diag(confusion)
    pos_target, pos_pred = confusion.sum(axis=1), confusion.sum(axis=0)
    present = pos_target > 0
    union = pos_target + pos_pred - tp
    iou = np.full(num_classes, np.nan)
    iou[present] = tp[present] / union[present]
    accuracy = np.full(num_classes, np.nan)
    accuracy[present] = tp[present] / pos_target[present]
    total = pos_target.sum()
    results = {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_accuracy": float(accuracy[present].mean()) if present.any() else float("nan"),
    }
    results.update(zip(_class_keys("iou", num_classes, class_names), map(float, iou)))
    return results


# --------------------------------------------------------------------------------------------------------------
# Panoptic quality
# --------------------------------------------------------------------------------------------------------------

def _panoptic_image(pred_ids: jax.Array, pred_classes: jax.Array, gt_ids: jax.Array, gt_classes: jax.Array,
                    gt_crowd: jax.Array, num_classes: int) -> dict[str, jax.Array]:
    """panopticapi's per-image tally for one image: id maps [H, W], tables [P] / [G]; float32 [C] each."""
    num_pred, num_gt = pred_classes.shape[0], gt_classes.shape[0]
    pred_used = (pred_classes >= 0) & (pred_classes < num_classes)
    gt_used = (gt_classes >= 0) & (gt_classes < num_classes)

    def slots(ids, used, size, missing):
        in_range = (ids >= 0) & (ids < size)
        slot = jnp.where(in_range, ids, 0)
        return jnp.where(in_range & used[slot], slot, missing).reshape(-1)

    # Intersections from one-hot products: pred "no prediction" (-1) is an all-zero row; gt void is column G.
    pred_onehot = jax.nn.one_hot(slots(pred_ids, pred_used, num_pred, -1), num_pred, dtype=jnp.bfloat16)
    gt_onehot = jax.nn.one_hot(slots(gt_ids, gt_used, num_gt, num_gt), num_gt + 1, dtype=jnp.bfloat16)
    # 0/1 inputs are exact in bfloat16 and the float32 accumulation is exact below 2^24 pixels per image.
    overlap = jnp.einsum("np,ng->pg", pred_onehot, gt_onehot, preferred_element_type=jnp.float32)
    inter, pred_void = overlap[:, :num_gt], overlap[:, num_gt]
    pred_area = overlap.sum(axis=1)  # every predicted pixel lies on some gt segment or on void
    gt_area = gt_onehot.sum(axis=0, dtype=jnp.float32)[:num_gt]
    # Zero-area slots do not exist (panopticapi only knows segments that are in the PNG).
    pred_exists = pred_used & (pred_area > 0)
    gt_exists = gt_used & (gt_area > 0)
    same_class = pred_classes[:, None] == gt_classes[None, :]

    union = pred_area[:, None] + gt_area[None, :] - inter - pred_void[:, None]
    # IoU > 0.5 compared on the exact integer counts (panopticapi divides in float64: the same test).
    match = (same_class & ~gt_crowd[None, :] & gt_exists[None, :] & pred_exists[:, None] & (2 * inter > union))
    # IoU > 0.5 with segments that do not overlap within a map makes every match one-to-one.
    iou = jnp.where(match, inter / jnp.maximum(union, 1.0), 0.0)
    matched_gt, matched_pred = match.any(axis=0), match.any(axis=1)

    # panopticapi keeps one crowd segment per class (a dict class -> segment, the last in the table wins), so a
    # prediction's crowd overlap is with that segment only, even where an image has several of the class.
    crowd_of_class = same_class & (gt_crowd & gt_exists)[None, :]
    last_crowd = jnp.argmax(jnp.where(crowd_of_class, jnp.arange(num_gt), -1), axis=1)
    crowd_overlap = jnp.where(crowd_of_class.any(axis=1),
                              jnp.take_along_axis(inter, last_crowd[:, None], axis=1)[:, 0], 0.0)
    # An unmatched prediction more than half on void + same-class crowd is not a false positive.
    ignored = 2 * (pred_void + crowd_overlap) > pred_area

    gt_class_onehot = jax.nn.one_hot(gt_classes, num_classes, dtype=jnp.float32)  # unused (-1) -> zeros
    pred_class_onehot = jax.nn.one_hot(pred_classes, num_classes, dtype=jnp.float32)
    # Products and sums, not matmuls: a float32 matmul on TPU rounds its inputs (the IoUs) to bfloat16.
    per_class = lambda x, onehot: jnp.sum(jnp.asarray(x, jnp.float32)[:, None] * onehot, axis=0)
    return {
        "pq_tp": per_class(match.sum(axis=0), gt_class_onehot),
        "pq_fp": per_class(pred_exists & ~matched_pred & ~ignored, pred_class_onehot),
        "pq_fn": per_class(gt_exists & ~gt_crowd & ~matched_gt, gt_class_onehot),
        "pq_iou": per_class(iou.sum(axis=0), gt_class_onehot),
    }


def panoptic_sums(pred_ids: jax.Array, pred_classes: jax.Array, gt_ids: jax.Array, gt_classes: jax.Array,
                  gt_crowd: jax.Array, num_classes: int, valid: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """Per-class float32 [C] sums 'pq_tp', 'pq_fp', 'pq_fn', 'pq_iou' (IoU summed over matches) of a batch.

    pred_ids / gt_ids: int [B, H, W] indices into the per-image tables pred_classes int [B, P] and gt_classes int
    [B, G] / gt_crowd bool [B, G]; -1 = no prediction / void; slots with a class outside [0, C) are unused (their
    pixels count as no prediction / void). Images with valid [B] False count nothing.

    panopticapi's rules: a prediction and a gt segment match iff same class, gt not crowd and IoU > 0.5 (strict),
    with union = |pred| + |gt| - |pred & gt| - |pred & void|; unmatched non-crowd gt segments are false negatives;
    an unmatched prediction is a false positive unless (|pred & void| + |pred & crowd|) / |pred| > 0.5, the crowd
    being the last crowd segment of the prediction's class in the table (panopticapi keeps one per class). Segments
    of zero area do not exist (panopticapi would count a zero-area gt listed in its JSON as a false negative).

    Memory: one-hot maps of B * H * W * (P + G + 1) bfloat16; counts are exact below 2^24 pixels per image, and
    the float32 tp / fp / fn sums below 2^24 segments.
    """
    num_classes = _check_num_classes(num_classes)
    chex.assert_rank([pred_ids, gt_ids], 3)
    chex.assert_equal_shape([pred_ids, gt_ids])
    chex.assert_rank([pred_classes, gt_classes, gt_crowd], 2)
    chex.assert_equal_shape([gt_classes, gt_crowd])
    chex.assert_equal_shape_prefix([pred_ids, pred_classes, gt_classes], 1)
    per_image = jax.vmap(lambda *args: _panoptic_image(*args, num_classes=num_classes))(
        jnp.asarray(pred_ids, jnp.int32), jnp.asarray(pred_classes, jnp.int32), jnp.asarray(gt_ids, jnp.int32),
        jnp.asarray(gt_classes, jnp.int32), jnp.asarray(gt_crowd, bool))
    if valid is not None:
        chex.assert_shape(valid, (pred_ids.shape[0],))
        weight = jnp.asarray(valid, jnp.float32)[:, None]
        return {key: jnp.sum(weight * value, axis=0) for key, value in per_image.items()}
    return {key: value.sum(axis=0) for key, value in per_image.items()}


def pq_from_sums(sums: Mapping[str, np.ndarray], is_thing: np.ndarray,
                 class_names: Optional[Sequence[str]] = None) -> dict[str, float]:
    """PQ, SQ, RQ of all classes ('pq', 'sq', 'rq'), things ('pq_things', ...) and stuff ('pq_stuff', ...), the
    number of classes in each mean ('n', 'n_things', 'n_stuff') and per-class PQ ('pq/<name>'), from summed
    `panoptic_sums` ([C] each) and is_thing bool [C].

    Fractions in [0, 1] (panopticapi prints them x100). As panopticapi's `pq_average`: per class
    PQ = iou / (tp + fp/2 + fn/2), SQ = iou / tp (0 when tp = 0), RQ = tp / (tp + fp/2 + fn/2); a class with
    tp + fp + fn = 0 is left out of the means. Where no class is left, the mean is NaN (panopticapi divides by
    zero), and so is the per-class PQ of a class left out (panopticapi reports 0 for it).
    """
    tp, fp, fn, iou = (np.asarray(sums[key], np.float64) for key in PANOPTIC_SUM_KEYS)
    is_thing = np.asarray(is_thing, bool)
    if is_thing.ndim != 1 or any(x.shape != is_thing.shape for x in (tp, fp, fn, iou)):
        raise ValueError(f"pq_from_sums: sums {[np.shape(sums[k]) for k in PANOPTIC_SUM_KEYS]} and is_thing "
                         f"{is_thing.shape} must all be [C]")
    counted = tp + fp + fn > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = tp + 0.5 * fp + 0.5 * fn
        pq = np.where(counted, iou / denominator, np.nan)
        sq = np.where(counted, np.where(tp > 0, iou / tp, 0.0), np.nan)
        rq = np.where(counted, tp / denominator, np.nan)
    results = {}
    for suffix, group in (("", np.ones_like(is_thing)), ("_things", is_thing), ("_stuff", ~is_thing)):
        keep = group & counted
        for name, values in (("pq", pq), ("sq", sq), ("rq", rq)):
            results[name + suffix] = float(values[keep].mean()) if keep.any() else float("nan")
        results["n" + suffix] = int(keep.sum())
    results.update(zip(_class_keys("pq", len(is_thing), class_names), map(float, pq)))
    return results


# --------------------------------------------------------------------------------------------------------------
# Mask AP (host side, pycocotools)
# --------------------------------------------------------------------------------------------------------------

def mask_ap(pred_masks: Sequence[np.ndarray], pred_classes: Sequence[np.ndarray], pred_scores: Sequence[np.ndarray],
            gt_masks: Sequence[np.ndarray], gt_classes: Sequence[np.ndarray],
            gt_crowd: Optional[Sequence[np.ndarray]] = None, *,
            categories: Optional[Sequence[int]] = None) -> dict[str, float]:
    """COCO mask AP with pycocotools' COCOeval (default parameters: IoU 0.50:0.95, 100 detections per image).

    One entry per image i: pred_masks[i] bool [Q, H, W] (may overlap), pred_classes[i] int [Q], pred_scores[i]
    float [Q]; gt_masks[i] bool [G, H, W], gt_classes[i] int [G], gt_crowd[i] bool [G] (default: none crowd).
    Slots with class -1 or an empty mask are dropped on both sides. `categories` are the classes evaluated (e.g.
    the thing classes); default: every class in the ground truth or the predictions.

    Returns 'ap', 'ap50', 'ap75', 'ap_small', 'ap_medium', 'ap_large' as fractions in [0, 1]; NaN where COCOeval
    has nothing to average (its -1).
    """
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError("mask_ap needs pycocotools (pip install pycocotools)") from error
    lengths = {len(x) for x in (pred_masks, pred_classes, pred_scores, gt_masks, gt_classes)}
    if gt_crowd is not None:
        lengths.add(len(gt_crowd))
    if len(lengths) != 1:
        raise ValueError(f"mask_ap: the per-image sequences differ in length: {sorted(lengths)}")

    def encode(masks: np.ndarray, name: str, image: int, count: int) -> list:
        masks = np.asarray(masks, bool)
        if masks.ndim != 3 or len(masks) != count:
            raise ValueError(f"mask_ap: {name}[{image}] must be [{count}, H, W] (one mask per slot), got "
                             f"{masks.shape}")
        if count == 0:
            return []
        return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))

    images, gt_annotations, detections = [], [], []
    for i in range(len(gt_masks)):
        image_id = i + 1  # COCOeval reads id 0 as "unmatched"
        g_classes = np.asarray(gt_classes[i]).reshape(-1)
        g_crowd = np.zeros(len(g_classes), bool) if gt_crowd is None else np.asarray(gt_crowd[i], bool).reshape(-1)
        if len(g_crowd) != len(g_classes):
            raise ValueError(f"mask_ap: gt_crowd[{i}] has {len(g_crowd)} flags for {len(g_classes)} slots")
        height, width = np.shape(gt_masks[i])[1:]
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        for rle, cls, crowd in zip(encode(gt_masks[i], "gt_masks", i, len(g_classes)), g_classes, g_crowd):
            area = float(mask_utils.area(rle))
            if cls >= 0 and area > 0:
                gt_annotations.append({"id": len(gt_annotations) + 1, "image_id": image_id, "category_id": int(cls),
                                       "segmentation": rle, "area": area, "bbox": list(mask_utils.toBbox(rle)),
                                       "iscrowd": int(crowd)})
        p_classes, scores = np.asarray(pred_classes[i]).reshape(-1), np.asarray(pred_scores[i]).reshape(-1)
        if len(scores) != len(p_classes):
            raise ValueError(f"mask_ap: pred_scores[{i}] has {len(scores)} scores for {len(p_classes)} slots")
        for rle, cls, score in zip(encode(pred_masks[i], "pred_masks", i, len(p_classes)), p_classes, scores):
            area = float(mask_utils.area(rle))
            if cls >= 0 and area > 0:
                detections.append({"id": len(detections) + 1, "image_id": image_id, "category_id": int(cls),
                                   "segmentation": rle, "area": area, "bbox": list(mask_utils.toBbox(rle)),
                                   "score": float(score), "iscrowd": 0})

    keys = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    if categories is None:
        categories = sorted({a["category_id"] for a in gt_annotations} | {d["category_id"] for d in detections})
    if not len(categories):
        return {key: float("nan") for key in keys}
    with contextlib.redirect_stdout(io.StringIO()):  # COCO and COCOeval print progress
        cocos = []
        # Both sides built as COCO.loadRes would build the detections (it cannot take an empty list).
        for annotations in (gt_annotations, detections):
            coco = COCO()
            coco.dataset = {"images": images, "annotations": annotations,
                            "categories": [{"id": int(c)} for c in categories]}
            coco.createIndex()
            cocos.append(coco)
        evaluator = COCOeval(*cocos, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {key: float(value) if value >= 0 else float("nan") for key, value in zip(keys, evaluator.stats)}
