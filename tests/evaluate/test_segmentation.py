"""Segmentation metrics against answers worked out by hand (in the comments), an np.add.at confusion matrix, a
pure-Python per-image loop of panopticapi's rules, and panopticapi's own `pq_compute_single_core` where the package
is importable (`pip install --no-deps panopticapi-lite==0.2.0`), and pycocotools for mask AP."""

import collections
import functools

import jax
import numpy as np
import pytest

from maskjax.evaluate import segmentation as S

# --------------------------------------------------------------------------------------------------------------
# mIoU
# --------------------------------------------------------------------------------------------------------------


def test_confusion_matrix_by_hand_with_ignore_labels_and_invalid_rows():
    target = np.array([[[0, 0, 1], [1, 255, 2]], [[2, 2, 2], [2, 2, 2]]])
    pred = np.array([[[0, 1, 1], [2, 0, 2]], [[0, 0, 0], [0, 0, 0]]])
    # Image 0 pixel pairs (target, pred): (0,0) (0,1) (1,1) (1,2) (ignored) (2,2); image 1 is not valid.
    expected = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    valid = np.array([True, False])
    got = S.confusion_matrix(pred, target, 3, valid)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(S.confusion_matrix(pred, np.where(target == 255, -1, target), 3, valid), expected)
    m = S.miou_from_confusion(expected, class_names=["a", "b", "c"])
    # IoU = tp / (row + column - tp): 1/(2+1-1) = 1/2, 1/(2+2-1) = 1/3, 1/(1+2-1) = 1/2.
    assert m["iou/a"] == pytest.approx(1 / 2) and m["iou/b"] == pytest.approx(1 / 3)
    assert m["miou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)  # 3 right of 5 non-ignored pixels
    assert m["mean_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_confusion_matrix_matches_np_add_at_on_random_batches():
    rng = np.random.default_rng(0)
    num_classes = 5
    pred = rng.integers(0, num_classes, (3, 7, 9))
    target = rng.integers(-1, num_classes + 1, (3, 7, 9))  # -1 and C: ignored
    target[0, :2] = 255
    valid = np.array([True, False, True])
    expected = np.zeros((num_classes, num_classes), np.int64)
    keep = (target >= 0) & (target < num_classes) & valid[:, None, None]
    np.add.at(expected, (target[keep], pred[keep]), 1)
    got = jax.jit(S.confusion_matrix, static_argnums=2)(pred, target, num_classes, valid)
    np.testing.assert_array_equal(got, expected)


def test_miou_follows_detectron2_on_absent_classes():
    # C = 4: target 0 0 1 1, prediction 0 0 2 2. Class 0: IoU 1. Class 1: tp 0, union 2 -> IoU 0, counted.
    # Class 2: predicted, no target pixels -> left out (detectron2; mmseg would count it as 0 and give 1/3).
    # Class 3: nowhere -> left out. mIoU = (1 + 0) / 2.
    confusion = S.confusion_matrix(np.array([[[0, 0, 2, 2]]]), np.array([[[0, 0, 1, 1]]]), 4)
    m = S.miou_from_confusion(confusion)
    assert m["miou"] == pytest.approx(0.5)
    assert m["iou/1"] == 0.0 and np.isnan(m["iou/2"]) and np.isnan(m["iou/3"])
    assert m["pixel_accuracy"] == pytest.approx(0.5)
    empty = S.miou_from_confusion(np.zeros((3, 3), np.int32))
    assert np.isnan(empty["miou"]) and np.isnan(empty["pixel_accuracy"])


def test_predictions_outside_the_classes_are_dropped_like_ignored_pixels():
    # The documented behaviour: a -1 prediction leaves its pixel out (target 0 pixels: one right, one dropped).
    confusion = S.confusion_matrix(np.array([[[0, -1]]]), np.array([[[0, 0]]]), 2)
    np.testing.assert_array_equal(confusion, [[1, 0], [0, 0]])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        S.confusion_matrix(np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int), 0)
    with pytest.raises(ValueError, match="square"):
        S.miou_from_confusion(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class_names"):
        S.miou_from_confusion(np.eye(2), class_names=["a"])


# --------------------------------------------------------------------------------------------------------------
# Panoptic quality: hand-made one-row images
# --------------------------------------------------------------------------------------------------------------

WIDTH, SLOTS, C = 16, 4, 3
_panoptic = jax.jit(functools.partial(S.panoptic_sums, num_classes=C))


def _row(text: str) -> list:
    """'00..1' -> [0, 0, -1, -1, 1]: a digit is a segment slot, '.' void (gt) / no prediction (pred)."""
    return [-1 if ch == "." else int(ch) for ch in text]


def _image(pred: str, pred_classes, gt: str, gt_classes, gt_crowd=()):
    """A one-row image padded to WIDTH with void / no-prediction pixels (which count nowhere) and to SLOTS unused
    slots, so that every case shares one compiled function."""
    pad = lambda xs, n, fill: list(xs) + [fill] * (n - len(xs))
    return (np.array([pad(_row(pred), WIDTH, -1)]), np.array(pad(pred_classes, SLOTS, -1)),
            np.array([pad(_row(gt), WIDTH, -1)]), np.array(pad(gt_classes, SLOTS, -1)),
            np.array(pad(gt_crowd, SLOTS, False), bool))


def _sums(*images, valid=None):
    batch = [np.stack(field) for field in zip(*images)]
    return {key: np.asarray(value) for key, value in _panoptic(*batch, valid=valid).items()}


def _counts(sums, cls):
    return tuple(int(sums[key][cls]) for key in ("pq_tp", "pq_fp", "pq_fn"))


def test_iou_of_exactly_one_half_does_not_match():
    # gt segment of 4 pixels, prediction of 2 inside it: I = 2, U = 2 + 4 - 2 = 4, IoU = 0.5 -> no match, so the
    # gt is a FN and the prediction (no void under it) a FP.
    sums = _sums(_image("00..", [0], "0000", [0]))
    assert _counts(sums, 0) == (0, 1, 1) and sums["pq_iou"][0] == 0
    # With void in the union: gt 4 pixels, prediction 4 pixels of which 2 on gt and 2 on void:
    # U = 4 + 4 - 2 - 2 (void) = 4, IoU = 2 / 4 = 0.5 -> no match; exactly half on void is not "more than half"
    # -> FP.
    sums = _sums(_image("00..00", [0], "0000..", [0]))
    assert _counts(sums, 0) == (0, 1, 1)


def test_iou_just_above_one_half_matches():
    # gt 9 pixels, prediction 5 inside it: IoU = 5/9 > 0.5 -> one TP with IoU 5/9.
    sums = _sums(_image("00000....", [1], "000000000", [1]))
    assert _counts(sums, 1) == (1, 0, 0)
    assert sums["pq_iou"][1] == pytest.approx(5 / 9, rel=1e-6)


def test_void_pixels_leave_the_union():
    # gt "000..." (3 pixels, then void), prediction ".00000": I = 2, |pred| = 5 of which 3 on void.
    # U = 5 + 3 - 2 - 3 = 3 -> IoU 2/3, a match (2/6 = 1/3 with the void pixels kept).
    sums = _sums(_image(".00000", [2], "000...", [2]))
    assert _counts(sums, 2) == (1, 0, 0)
    assert sums["pq_iou"][2] == pytest.approx(2 / 3, rel=1e-6)


@pytest.mark.parametrize("pred,false_positives", [
    ("...0000", 0),  # 1 pixel on the gt, 3 on void: 3/4 > 0.5 on void -> ignored
    ("..0000.", 1),  # 2 on the gt, 2 on void: 2/4 is not > 0.5 -> FP
    (".0000..", 1),  # 3 on the gt, 1 on void: FP
])
def test_unmatched_prediction_mostly_on_void_is_not_a_false_positive(pred, false_positives):
    # gt "0000..." of class 0, prediction of class 1 (never matches): the gt is a FN in every case.
    sums = _sums(_image(pred, [1], "0000...", [0]))
    assert _counts(sums, 0) == (0, 0, 1)
    assert _counts(sums, 1) == (0, false_positives, 0)


def test_crowd_segments_are_neither_matched_nor_false_negatives():
    # A prediction equal to a crowd segment of its class: IoU 1 but crowd never matches (no TP); the crowd gt is
    # not a FN; the prediction lies wholly on same-class crowd -> not a FP. Nothing counts.
    sums = _sums(_image("000000", [0], "000000", [0], [True]))
    assert all(_counts(sums, c) == (0, 0, 0) for c in range(C))
    # gt: crowd slot 0 of class 0 (6 pixels) and a non-crowd slot 1 of class 0 (3 pixels). Predictions: slot 0 of
    # class 0 on 3 crowd pixels (all on same-class crowd -> not a FP), slot 1 of class 1 on the other 3 crowd
    # pixels (crowd of another class does not excuse it -> FP of class 1). Slot 1 of the gt is unmatched -> FN.
    sums = _sums(_image("000111...", [0, 1], "000000111", [0, 0], [True, False]))
    assert _counts(sums, 0) == (0, 0, 1)
    assert _counts(sums, 1) == (0, 1, 0)


@pytest.mark.parametrize("gt,false_positives", [
    ("0011", 1),  # the last crowd slot (1) holds 1 of the prediction's 3 pixels: 1/3 -> FP
    ("1100", 0),  # the last crowd slot (1) holds 2 of 3: 2/3 > 0.5 -> not a FP
])
def test_only_the_last_crowd_segment_of_a_class_excuses_a_prediction(gt, false_positives):
    # panopticapi keeps one crowd segment per class (a dict filled in table order): two crowd segments of class 0
    # and a prediction "000." of class 0 over both.
    sums = _sums(_image("000.", [0], gt, [0, 0], [True, True]))
    assert _counts(sums, 0) == (0, false_positives, 0)


def test_unused_and_empty_slots_do_not_exist():
    # gt slot 1 has class -1 (unused): its pixels are void. Prediction "0000" of class 0: I = 2, void 2,
    # U = 4 + 2 - 2 - 2 = 2 -> IoU 1, one TP. Prediction slot 1 (class 1) and gt slot 2 (class 2) have no pixels:
    # no FP, no FN. Pixels naming a slot beyond the table are void too (gt '9' with 4 slots).
    sums = _sums(_image("0000", [0, 1], "00119", [0, -1, 2]))
    assert _counts(sums, 0) == (1, 0, 0) and sums["pq_iou"][0] == pytest.approx(1.0)
    assert _counts(sums, 1) == (0, 0, 0) and _counts(sums, 2) == (0, 0, 0)


def test_a_batch_adds_up_and_invalid_rows_count_nothing():
    first = _image(".00000", [2], "000...", [2])  # class 2: one TP, IoU 2/3 (test_void_pixels_leave_the_union)
    second = _image("000111...", [0, 1], "000000111", [0, 0], [True, False])  # class 0 FN, class 1 FP
    both = _sums(first, second)
    np.testing.assert_array_equal(both["pq_tp"], [0, 0, 1])
    np.testing.assert_array_equal(both["pq_fp"], [0, 1, 0])
    np.testing.assert_array_equal(both["pq_fn"], [1, 0, 0])
    np.testing.assert_allclose(both["pq_iou"], [0, 0, 2 / 3], rtol=1e-6)
    only_first = _sums(first, second, valid=np.array([True, False]))
    np.testing.assert_array_equal(only_first["pq_tp"], [0, 0, 1])
    assert only_first["pq_fp"].sum() == 0 and only_first["pq_fn"].sum() == 0


# --------------------------------------------------------------------------------------------------------------
# Panoptic quality: from sums
# --------------------------------------------------------------------------------------------------------------


def test_pq_from_sums_splits_things_and_stuff_and_leaves_out_absent_classes():
    sums = {"pq_tp": np.array([2, 1, 0, 0]), "pq_fp": np.array([0, 1, 1, 0]), "pq_fn": np.array([2, 0, 1, 0]),
            "pq_iou": np.array([1.6, 0.9, 0.0, 0.0])}
    is_thing = np.array([True, False, True, False])
    m = S.pq_from_sums(sums, is_thing, class_names=["car", "road", "dog", "sky"])
    # class 0 (thing): PQ = 1.6 / (2 + 0 + 1) = 8/15, SQ = 1.6 / 2 = 0.8, RQ = 2/3.
    # class 1 (stuff): PQ = 0.9 / (1 + 0.5) = 0.6, SQ = 0.9, RQ = 2/3.
    # class 2 (thing): tp 0 -> PQ = SQ = RQ = 0, still counted (fp + fn > 0).
    # class 3 (stuff): tp + fp + fn = 0 -> left out of every mean.
    assert m["pq/car"] == pytest.approx(8 / 15) and m["pq/road"] == pytest.approx(0.6) and m["pq/dog"] == 0.0
    assert np.isnan(m["pq/sky"])
    assert (m["n"], m["n_things"], m["n_stuff"]) == (3, 2, 1)
    assert m["pq"] == pytest.approx((8 / 15 + 0.6 + 0) / 3)
    assert m["sq"] == pytest.approx((0.8 + 0.9 + 0) / 3)
    assert m["rq"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["pq_things"] == pytest.approx(8 / 15 / 2) and m["sq_things"] == pytest.approx(0.4)
    assert m["rq_things"] == pytest.approx(1 / 3)
    assert (m["pq_stuff"], m["sq_stuff"], m["rq_stuff"]) == pytest.approx((0.6, 0.9, 2 / 3))


def test_pq_from_sums_is_nan_when_no_class_counts():
    zeros = {key: np.zeros(2) for key in S.PANOPTIC_SUM_KEYS}
    m = S.pq_from_sums(zeros, np.array([True, False]))
    assert np.isnan(m["pq"]) and np.isnan(m["pq_things"]) and m["n"] == 0
    with pytest.raises(ValueError, match="is_thing"):
        S.pq_from_sums(zeros, np.array([True]))


# --------------------------------------------------------------------------------------------------------------
# Panoptic quality: random images against independent references
# --------------------------------------------------------------------------------------------------------------

R_CLASSES = 4
R_IS_THING = np.array([True, True, False, False])


def random_panoptic(rng, batch=8, height=12, width=12, slots=10):
    """Voronoi gt segments (some void, some unused slots, some crowd) and predictions from jittered seeds, with
    mostly the same classes and a few dropped pixels, so that IoUs spread around 0.5."""
    ys, xs = np.mgrid[:height, :width]
    out = collections.defaultdict(list)
    for _ in range(batch):
        seeds = rng.uniform(0, [height, width], (slots, 2))
        cells = lambda s: np.argmin((ys[..., None] - s[:, 0]) ** 2 + (xs[..., None] - s[:, 1]) ** 2, axis=-1)
        gt_ids = cells(seeds)
        gt_ids[np.isin(gt_ids, np.flatnonzero(rng.random(slots) < 0.15))] = -1
        gt_classes = np.where(rng.random(slots) < 0.1, -1, rng.integers(0, R_CLASSES, slots))
        pred_ids = cells(seeds + rng.normal(0, 1.2, seeds.shape))
        pred_ids[rng.random(pred_ids.shape) < 0.05] = -1
        pred_classes = np.where(rng.random(slots) < 0.8, np.maximum(gt_classes, 0), rng.integers(0, R_CLASSES, slots))
        pred_classes[rng.random(slots) < 0.1] = -1
        for key, value in (("pred_ids", pred_ids), ("pred_classes", pred_classes), ("gt_ids", gt_ids),
                           ("gt_classes", gt_classes), ("gt_crowd", rng.random(slots) < 0.25)):
            out[key].append(value)
    return {key: np.stack(value) for key, value in out.items()}


def _segment_map(ids, classes):
    """Slot per pixel with void / unused / out-of-range as -1 (the convention of panoptic_sums)."""
    ok = (ids >= 0) & (ids < len(classes))
    ok[ok] &= (classes[ids[ok]] >= 0) & (classes[ids[ok]] < R_CLASSES)
    return np.where(ok, ids, -1)


def loop_reference(pred_ids, pred_classes, gt_ids, gt_classes, gt_crowd):
    """panopticapi's per-image tally written out over pixels with Counters and float64 division: [4, C] rows
    tp, fp, fn, iou."""
    stats = np.zeros((4, R_CLASSES))
    pred_map, gt_map = _segment_map(pred_ids, pred_classes), _segment_map(gt_ids, gt_classes)
    pred_area, gt_area = collections.Counter(pred_map.ravel().tolist()), collections.Counter(gt_map.ravel().tolist())
    pairs = collections.Counter(zip(gt_map.ravel().tolist(), pred_map.ravel().tolist()))  # (gt, pred) -> pixels
    pred_area.pop(-1, None)
    gt_area.pop(-1, None)
    matched_gt, matched_pred = set(), set()
    for (g, p), intersection in pairs.items():
        if g == -1 or p == -1 or gt_crowd[g] or gt_classes[g] != pred_classes[p]:
            continue
        union = pred_area[p] + gt_area[g] - intersection - pairs[(-1, p)]
        if intersection / union > 0.5:
            stats[0, gt_classes[g]] += 1
            stats[3, gt_classes[g]] += intersection / union
            matched_gt.add(g)
            matched_pred.add(p)
    crowd_of_class = {}
    for g in sorted(gt_area):  # table order: a later crowd segment of a class replaces an earlier one
        if gt_crowd[g]:
            crowd_of_class[gt_classes[g]] = g
        elif g not in matched_gt:
            stats[2, gt_classes[g]] += 1
    for p in sorted(pred_area):
        if p in matched_pred:
            continue
        cls = pred_classes[p]
        excused = pairs[(-1, p)] + (pairs[(crowd_of_class[cls], p)] if cls in crowd_of_class else 0)
        if excused / pred_area[p] <= 0.5:
            stats[1, cls] += 1
    return stats


_panoptic_random = jax.jit(functools.partial(S.panoptic_sums, num_classes=R_CLASSES))


def _our_stats(data, valid=None):
    sums = _panoptic_random(**data, valid=valid)
    return np.stack([np.asarray(sums[key]) for key in S.PANOPTIC_SUM_KEYS])


def test_panoptic_sums_match_a_loop_over_pixels_on_random_images():
    rng = np.random.default_rng(1)
    data = random_panoptic(rng)
    ours = _our_stats(data)
    expected = sum(loop_reference(*(data[k][i] for k in ("pred_ids", "pred_classes", "gt_ids", "gt_classes",
                                                         "gt_crowd"))) for i in range(len(data["gt_ids"])))
    assert expected[0].sum() > 5 and expected[1].sum() > 5 and expected[2].sum() > 5  # the data exercise all rules
    np.testing.assert_array_equal(ours[:3], expected[:3])
    np.testing.assert_allclose(ours[3], expected[3], rtol=1e-5)
    # Sums over two halves of the batch add up to the whole (tp / fp / fn exactly).
    halves = [_our_stats({k: v[s] for k, v in data.items()}) for s in (slice(0, 4), slice(4, None))]
    np.testing.assert_array_equal(halves[0][:3] + halves[1][:3], ours[:3])
    np.testing.assert_allclose(halves[0][3] + halves[1][3], ours[3], rtol=1e-5)
    valid = np.arange(8) < 4
    np.testing.assert_array_equal(_our_stats(data, valid)[:3], halves[0][:3])


def _id2rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def test_panoptic_sums_and_pq_match_panopticapi(monkeypatch, capsys):
    """panopticapi's own `pq_compute_single_core` and `PQStat.pq_average` on in-memory PNG arrays (its image
    loader is replaced by a dict lookup)."""
    evaluation = pytest.importorskip("panopticapi.evaluation")
    rng = np.random.default_rng(2)
    data = random_panoptic(rng, batch=12)
    pngs, annotation_set = {}, []
    for i in range(len(data["gt_ids"])):
        annotations = []
        for side in ("gt", "pred"):
            classes = data[f"{side}_classes"][i]
            segments = _segment_map(data[f"{side}_ids"][i], classes)
            pngs[f"{side}/{i}.png"] = _id2rgb(segments + 1)  # panopticapi: segment id 0 = VOID
            info = []
            for slot in range(len(classes)):
                area = int((segments == slot).sum())
                if area:  # panopticapi's JSON lists exactly the segments of its PNG
                    info.append({"id": slot + 1, "category_id": int(classes[slot]), "area": area,
                                 "iscrowd": int(data["gt_crowd"][i][slot]) if side == "gt" else 0})
            annotations.append({"image_id": i, "file_name": f"{i}.png", "segments_info": info})
        annotation_set.append(tuple(annotations))
    monkeypatch.setattr(evaluation, "Image", type("InMemoryImage", (), {"open": staticmethod(pngs.__getitem__)}))
    categories = {c: {"id": c, "isthing": int(R_IS_THING[c])} for c in range(R_CLASSES)}
    pq_stat = evaluation.pq_compute_single_core(0, annotation_set, "gt", "pred", categories)
    capsys.readouterr()  # its progress lines

    ours = _our_stats(data)
    for c in range(R_CLASSES):
        stat = pq_stat[c]
        assert (stat.tp, stat.fp, stat.fn) == tuple(ours[:3, c].astype(int)), f"class {c}"
        assert stat.iou == pytest.approx(ours[3, c], rel=1e-5)
    metrics = S.pq_from_sums(dict(zip(S.PANOPTIC_SUM_KEYS, ours)), R_IS_THING)
    for suffix, isthing in (("", None), ("_things", True), ("_stuff", False)):
        theirs, _ = pq_stat.pq_average(categories, isthing=isthing)
        assert metrics["n" + suffix] == theirs["n"]
        for name in ("pq", "sq", "rq"):
            assert metrics[name + suffix] == pytest.approx(theirs[name], rel=1e-5), name + suffix


# --------------------------------------------------------------------------------------------------------------
# Mask AP
# --------------------------------------------------------------------------------------------------------------


def _square(y, x, size, shape=(16, 16)):
    mask = np.zeros(shape, bool)
    mask[y:y + size, x:x + size] = True
    return mask


def test_mask_ap_on_perfect_and_partial_predictions():
    pytest.importorskip("pycocotools")
    gt = [np.stack([_square(0, 0, 4), _square(8, 8, 6)]), np.stack([_square(2, 2, 5)])]
    gt_classes = [np.array([0, 1]), np.array([1])]
    perfect = S.mask_ap(gt, gt_classes, [np.array([0.9, 0.8]), np.array([0.7])], gt, gt_classes)
    assert (perfect["ap"], perfect["ap50"], perfect["ap75"]) == (1.0, 1.0, 1.0)
    assert np.isnan(perfect["ap_large"])  # no gt of area > 96^2

    # One gt of 16 pixels, a prediction of 10 pixels inside it: IoU 10/16 = 0.625 passes the thresholds 0.50, 0.55,
    # 0.60 of ten -> AP = 3/10, AP50 = 1, AP75 = 0. An empty mask with a higher score and an unused slot (class -1)
    # are dropped; kept, the empty one would be a FP ranked first and halve the precision.
    inside = _square(0, 0, 4)
    inside[3, :] = False
    inside[2, 2:] = False
    assert inside.sum() == 10
    pred = [np.stack([np.zeros((16, 16), bool), inside, _square(8, 8, 3)])]
    got = S.mask_ap(pred, [np.array([0, 0, -1])], [np.array([0.99, 0.5, 0.9])], [_square(0, 0, 4)[None]],
                    [np.array([0])], [np.array([False])])
    assert (got["ap"], got["ap50"], got["ap75"]) == pytest.approx((0.3, 1.0, 0.0))


def test_mask_ap_without_detections_is_zero():
    pytest.importorskip("pycocotools")
    got = S.mask_ap([np.zeros((0, 8, 8), bool)], [np.zeros(0, int)], [np.zeros(0)], [_square(0, 0, 3, (8, 8))[None]],
                    [np.array([2])])
    assert got["ap"] == 0.0 and got["ap50"] == 0.0
