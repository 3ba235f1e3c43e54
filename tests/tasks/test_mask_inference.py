"""maskjax.tasks.mask_inference against Hugging Face's Mask2FormerImageProcessor post-processing on the same random
logits, plus hand-made cases for the points where HF departs from the original Mask2Former code (which the module
follows): the own area and the overlap comparison, which pixels a segment paints, segment ids after a merged stuff
segment, and the instance rule's thing filter."""

import types

import jax
import numpy as np
import pytest

from maskjax.convert._torch_compat import import_torch
from maskjax.tasks import mask_inference as mi

torch = import_torch()  # declares the op schemas PyPI torchvision's import needs (see maskjax/convert/_torch_compat.py)
from transformers import Mask2FormerImageProcessor  # noqa: E402  (needs import_torch first)

# HF bilinearly resizes every mask to 384x384 before post-processing; at that size the resize is the identity.
SIZE = 384
IS_THING = np.array([True, True, True, False, False])  # classes 3 and 4 are stuff
NUM_CLASSES = len(IS_THING)

semantic_scores = jax.jit(mi.semantic_scores)
semantic_inference = jax.jit(mi.semantic_inference)
THRESHOLDS = ("object_mask_threshold", "overlap_threshold")
panoptic_batched = jax.jit(mi.panoptic_inference_batched, static_argnames=THRESHOLDS)
instance_batched = jax.jit(mi.instance_inference_batched, static_argnames=("top_k",))
# The hand-made cases run jitted too: one compilation per shape is cheaper than eager op-by-op dispatch.
panoptic = jax.jit(mi.panoptic_inference, static_argnames=THRESHOLDS)
instance = jax.jit(mi.instance_inference, static_argnames=("top_k",))


def random_outputs(seed: int, batch: int = 2, queries: int = 10, grid: int = 12, size: int = SIZE):
    """(class_logits [B, Q, K+1], mask_logits [B, Q, size, size]) float32: each query has a class peak of random
    height (about half pass 0.8, some are no-object) and a noisy blob on a coarse grid, blown up to size (so
    every pixel value is a grid value)."""
    rng = np.random.default_rng(seed)
    cls = rng.normal(size=(batch, queries, NUM_CLASSES + 1))
    target = rng.choice(NUM_CLASSES + 1, size=(batch, queries, 1), p=[0.15, 0.15, 0.15, 0.2, 0.2, 0.15])
    np.put_along_axis(cls, target, np.take_along_axis(cls, target, -1) + rng.uniform(1, 8, target.shape), -1)
    yy, xx = np.mgrid[:grid, :grid] + 0.5
    centre = rng.uniform(0, grid, (batch, queries, 2, 1, 1))
    radius = rng.uniform(1.5, 5, (batch, queries, 1, 1))
    low = 4 * (radius - np.hypot(yy - centre[:, :, 0], xx - centre[:, :, 1])) / radius
    low += rng.normal(size=low.shape)
    # HF tests the own area on score * sigmoid(mask) >= 0.5, the original on sigmoid(mask) >= 0.5. For kept queries
    # (score > 0.8) the two agree unless a logit lies in [0, logit(0.5 / 0.8) = 0.51): keep logits out of there.
    low = np.where((low >= 0) & (low < 0.6), low + 0.6, low)
    masks = np.repeat(np.repeat(low, size // grid, -2), size // grid, -1)
    return cls.astype(np.float32), masks.astype(np.float32)


def hf_outputs(cls: np.ndarray, masks: np.ndarray):
    return types.SimpleNamespace(class_queries_logits=torch.from_numpy(cls),
                                 masks_queries_logits=torch.from_numpy(masks))


def same_partition(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """{our id: their id} after checking the two id maps split the pixels identically (void = -1 on both sides)."""
    pairs = np.unique(np.stack([ours.ravel(), theirs.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] and len(np.unique(pairs[1])) == pairs.shape[1], \
        f"partitions differ: id pairs {pairs.T.tolist()}"
    mapping = dict(zip(pairs[0].tolist(), pairs[1].tolist()))
    assert mapping.get(-1, -1) == -1, f"void is not void on both sides: {mapping}"
    return mapping


def test_semantic_matches_hf():
    cls, masks = random_outputs(0)
    processor = Mask2FormerImageProcessor()
    hf = processor.post_process_semantic_segmentation(hf_outputs(cls, masks), return_segmentation_scores=True)
    theirs = np.stack([r.segmentation_scores.numpy() for r in hf])
    ours = np.asarray(semantic_scores(cls, masks))
    assert ours.shape == (2, NUM_CLASSES, SIZE, SIZE) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    labels = np.asarray(semantic_inference(cls, masks))
    assert labels.dtype == np.int32
    top2 = np.sort(theirs, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 1e-5  # near-ties may flip with the summation order
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(labels[decided], np.stack([r.segmentation.numpy() for r in hf])[decided])


def hf_panoptic_as_original(cls: np.ndarray, masks: np.ndarray, processor, coverage: dict) -> list:
    """HF's panoptic segmentation turned into the original rule: [(id map with -1 void, {id: (class, score)})].

    HF runs without fusion (its fusion can give two segments one id) and the adapter then (1) voids the pixels whose
    winning query has mask probability < 0.5, which HF paints and the original does not, and (2) merges segments
    of the same stuff class, keeping the first one's class and score as the original's segments_info does. Ratios
    exactly at the threshold (strict in HF, not in the original) do not occur with these random logits, nor do mask
    values where HF's own area (score * probability >= 0.5) differs from the original's (see `random_outputs`).
    """
    results = processor.post_process_panoptic_segmentation(
        hf_outputs(cls, masks), threshold=0.8, overlap_mask_area_threshold=0.8, label_ids_to_fuse=set())
    probs = torch.from_numpy(cls).softmax(-1)
    scores, labels = probs.max(-1)
    keep = (labels != NUM_CLASSES) & (scores > 0.8)
    adapted = []
    for i, result in enumerate(results):
        seg = result["segmentation"].numpy().astype(np.int64)
        seg[seg <= 0] = -1  # HF's void is 0, or -1 when no query is kept
        kept_probs = torch.from_numpy(masks[i]).sigmoid()[keep[i]]
        if len(kept_probs):
            winner = (scores[i][keep[i]][:, None, None] * kept_probs).argmax(0)
            winner_prob = kept_probs.gather(0, winner[None])[0].numpy()
            coverage["painted_below_half"] += int(np.sum((seg >= 0) & (winner_prob < 0.5)))
            seg[winner_prob < 0.5] = -1
        info, first_of_stuff = {}, {}
        for s in result["segments_info"]:
            if not np.any(seg == s["id"]):
                continue  # all its pixels had probability < 0.5: the original makes no segment
            label = s["label_id"]
            if not IS_THING[label] and label in first_of_stuff:
                seg[seg == s["id"]] = first_of_stuff[label]
                coverage["merged"] += 1
                continue
            if not IS_THING[label]:
                first_of_stuff[label] = s["id"]
            info[s["id"]] = (label, s["score"])
        coverage["dropped"] += int(keep[i].sum()) - len(result["segments_info"])
        adapted.append((seg, info))
    return adapted


def test_panoptic_matches_hf_on_random_logits():
    processor = Mask2FormerImageProcessor()
    coverage = {"painted_below_half": 0, "merged": 0, "dropped": 0, "segments": 0}
    for seed in range(3):
        cls, masks = random_outputs(seed)
        ours = jax.device_get(panoptic_batched(cls, masks, IS_THING))
        assert ours.segment_ids.shape == (2, SIZE, SIZE) and ours.segment_ids.dtype == np.int32
        assert ours.segment_classes.shape == ours.segment_scores.shape == (2, cls.shape[1])
        for i, (seg, info) in enumerate(hf_panoptic_as_original(cls, masks, processor, coverage)):
            mapping = same_partition(ours.segment_ids[i], seg)
            ids = [q for q in mapping if q >= 0]
            assert sorted(ids) == np.flatnonzero(ours.segment_classes[i] >= 0).tolist()  # table lists exactly these
            assert sorted(info) == sorted(mapping[q] for q in ids)
            for q in ids:
                label, score = info[mapping[q]]
                assert ours.segment_classes[i, q] == label
                assert ours.segment_scores[i, q] == pytest.approx(score, abs=2e-6)  # HF rounds to 6 decimals
            coverage["segments"] += len(ids)
    # The seeds exercise every rule: segments, drops by the overlap rule, stuff merges, pixels voided below 0.5.
    assert coverage["segments"] >= 15 and coverage["dropped"] >= 3 and coverage["merged"] >= 1, coverage
    assert coverage["painted_below_half"] > 0, coverage


def test_instance_matches_hf():
    cls, masks = random_outputs(1)
    queries = cls.shape[1]
    # HF's k is always Q; threshold=0 keeps every score; it drops empty masks, which the original keeps.
    hf = Mask2FormerImageProcessor().post_process_instance_segmentation(
        hf_outputs(cls, masks), threshold=0.0, return_binary_maps=True)
    ours = jax.device_get(instance_batched(cls, masks, top_k=queries))
    assert ours.masks.shape == (2, queries, SIZE, SIZE) and ours.masks.dtype == bool
    for i, result in enumerate(hf):
        assert np.all(np.diff(ours.scores[i]) <= 0)  # sorted by score
        nonempty = ours.masks[i].any(axis=(1, 2))
        assert np.all(ours.scores[i][~nonempty] == 0)
        # Matched by (class, mask) rather than by rank: HF rounds scores to 6 decimals, which can reorder near-ties.
        mine = sorted((int(c), m.tobytes(), float(s)) for c, m, s in
                      zip(ours.classes[i][nonempty], ours.masks[i][nonempty], ours.scores[i][nonempty]))
        theirs = sorted((s["label_id"], m.numpy().astype(bool).tobytes(), s["score"])
                        for s, m in zip(result["segments_info"], result["segmentation"]))
        assert len(mine) == len(theirs) > 5
        for (c1, m1, s1), (c2, m2, s2) in zip(mine, theirs):
            assert (c1, m1) == (c2, m2)
            assert s1 == pytest.approx(s2, abs=2e-6)


# Hand-made cases on small images (the original's rules, where HF differs or where edge cases hide).

def one_hot_logits(labels, num_classes: int = 3, peak: float = 10.0) -> np.ndarray:
    """[Q, K+1] logits whose softmax puts ~1 on each query's label (label == num_classes: no-object)."""
    cls = np.zeros((len(labels), num_classes + 1), np.float32)
    cls[np.arange(len(labels)), labels] = peak
    return cls


def logit(p) -> np.ndarray:
    p = np.asarray(p, np.float32)
    return np.log(p / (1 - p)).astype(np.float32)


def test_panoptic_all_no_object_is_void():
    cls = one_hot_logits([3, 3, 3])
    masks = np.full((3, 4, 5), 5.0, np.float32)
    out = panoptic(cls, masks, np.array([True, False, False]))
    np.testing.assert_array_equal(out.segment_ids, -1)
    np.testing.assert_array_equal(out.segment_classes, -1)
    np.testing.assert_array_equal(out.segment_scores, 0)
    # Real classes whose probability is not above the threshold are dropped as well.
    out = panoptic(one_hot_logits([0, 1, 2], peak=0.5), masks, np.array([True, False, False]))
    np.testing.assert_array_equal(out.segment_ids, -1)


def test_panoptic_object_mask_threshold_is_strict():
    cls = np.array([[2.0, 0.0, 0.0]], np.float32)
    masks = np.full((1, 2, 2), 5.0, np.float32)
    score = np.asarray(jax.nn.softmax(cls[0]))[0]  # float32, as the comparison
    kept = panoptic(cls, masks, np.array([True, True]), object_mask_threshold=np.nextafter(score, np.float32(0)))
    dropped = panoptic(cls, masks, np.array([True, True]), object_mask_threshold=score)
    np.testing.assert_array_equal(kept.segment_ids, 0)
    np.testing.assert_array_equal(dropped.segment_ids, -1)


def test_panoptic_ratio_at_the_threshold_is_kept():
    """Query 1 owns all 4 pixels but wins 3: 3/4 is not < 0.75, so the original keeps it. (HF drops it: it requires
    ratio > threshold. At 0.8 HF's float32 ratio 4/5 rounds above the float64 0.8, so there it keeps it too.)"""
    cls = one_hot_logits([0, 1])
    masks = logit([[0.99, 0.01, 0.01, 0.01], [0.7, 0.7, 0.7, 0.7]])[:, None, :]
    out = panoptic(cls, masks, np.array([True, True, True]), overlap_threshold=0.75)
    np.testing.assert_array_equal(out.segment_ids, [[0, 1, 1, 1]])
    np.testing.assert_array_equal(out.segment_classes, [0, 1])
    out = panoptic(cls, masks, np.array([True, True, True]), overlap_threshold=0.76)
    np.testing.assert_array_equal(out.segment_ids, [[0, -1, -1, -1]])
    np.testing.assert_array_equal(out.segment_classes, [0, -1])


def test_panoptic_paints_only_won_pixels_with_probability_at_least_half():
    """Query 0 (score ~1) wins pixels 2-3 with probability 0.4 but owns pixels 0-1, which query 1 wins: its area ratio
    is 2/2 yet none of its won pixels is its own, so the original makes no segment of it and pixels 2-3 stay void.
    HF would paint pixels 2-3 as a segment of query 0. Query 2 wins pixel 4 with probability 0.3: void too."""
    cls = one_hot_logits([0, 1, 2], peak=8.0)
    cls[1, 1] = 12.0  # query 1's score beats query 0's where both masks are on
    masks = logit([[0.6, 0.6, 0.4, 0.4, 0.01],
                   [0.9, 0.9, 0.1, 0.1, 0.01],
                   [0.01, 0.01, 0.01, 0.01, 0.3]])[:, None, :]
    out = panoptic(cls, masks, np.array([True, True, True]))
    np.testing.assert_array_equal(out.segment_ids, [[1, 1, -1, -1, -1]])
    np.testing.assert_array_equal(out.segment_classes, [-1, 1, -1])


def test_panoptic_weighs_pixels_by_score_but_not_the_own_area():
    """Query 0 has score 0.9, query 1 ~1. (a) Pixel 0 goes to query 1 (0.85 * 1 > 0.9 * 0.9) although query 0's
    probability is higher. (b) Query 0's own area counts probability 0.55 >= 0.5 (score * 0.55 < 0.5 is HF's test),
    so it wins 3 of its 5 own pixels, 0.6 < 0.8, and is dropped; HF would count 2 own pixels and keep it."""
    cls = one_hot_logits([0, 1])
    cls[0, 0] = np.log(27.0)  # softmax 27 / (27 + 3) = 0.9
    is_thing = np.array([True, True, True])
    masks = logit([[0.9, 0.9, 0.9, 0.9, 0.9], [0.85, 0.85, 0.01, 0.01, 0.01]])[:, None, :]
    out = panoptic(cls, masks, is_thing, overlap_threshold=0.5)
    np.testing.assert_array_equal(out.segment_ids, [[1, 1, 0, 0, 0]])
    np.testing.assert_allclose(out.segment_scores[0], 0.9, rtol=1e-6)
    masks = logit([[0.55, 0.55, 0.55, 0.9, 0.9], [0.99, 0.99, 0.01, 0.01, 0.01]])[:, None, :]
    out = panoptic(cls, masks, is_thing)
    np.testing.assert_array_equal(out.segment_ids, [[1, 1, -1, -1, -1]])
    np.testing.assert_array_equal(out.segment_classes, [-1, 1])


def test_panoptic_merges_stuff_and_keeps_later_ids_distinct():
    """Queries (stuff 2, thing 0, stuff 2, thing 1) in four columns: the stuff queries share id 0 and the two things
    keep their own ids. (HF, with label_ids_to_fuse={2}, gives both things id 2: its running id is reset to the
    fused segment's.)"""
    cls = one_hot_logits([2, 0, 2, 1])
    masks = np.full((4, 3, 8), -10.0, np.float32)
    for q in range(4):
        masks[q, :, 2 * q:2 * q + 2] = 10.0
    out = panoptic(cls, masks, np.array([True, True, False]))
    np.testing.assert_array_equal(out.segment_ids[0], [0, 0, 1, 1, 0, 0, 3, 3])
    np.testing.assert_array_equal(out.segment_classes, [2, 0, -1, 1])
    assert out.segment_scores[0] > 0.99 and out.segment_scores[2] == 0
    # A dropped stuff query does not take part: the merged id is the smallest *segment* query of the class.
    masks[0] = -10.0
    out = panoptic(cls, masks, np.array([True, True, False]))
    np.testing.assert_array_equal(out.segment_ids[0], [-1, -1, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(out.segment_classes, [-1, 0, 2, 1])


def test_panoptic_batched_equals_per_image():
    cls, masks = random_outputs(5, batch=2, queries=6, grid=4, size=16)
    batched = panoptic_batched(cls, masks, IS_THING, overlap_threshold=0.5)
    for i in range(2):
        single = panoptic(cls[i], masks[i], IS_THING, overlap_threshold=0.5)
        for a, b in zip(batched, single):
            np.testing.assert_array_equal(a[i], b)


def test_instance_thing_filter_applies_after_top_k():
    """Top-3 pairs by class probability: (q0, stuff 2), (q1, thing 0), (q0, thing 1). The original drops the stuff
    pair after the top-k, leaving 2 instances; filtering before the top-k would bring in a 4th pair."""
    cls = np.array([[0.0, 3.0, 4.0, -9.0],
                    [3.5, 0.0, 0.0, -9.0]], np.float32)
    masks = np.stack([np.where(np.arange(6) < 3, 2.0, -2.0), np.where(np.arange(6) < 2, -2.0, 1.0)])[:, None]
    masks = masks.astype(np.float32)
    out = instance(cls, masks, np.array([True, True, False]), top_k=3)
    np.testing.assert_array_equal(out.classes, [0, 1, -1])
    assert out.scores[2] == 0 and not out.masks[2].any()
    np.testing.assert_array_equal(out.masks[0], masks[1] > 0)
    np.testing.assert_array_equal(out.masks[1], masks[0] > 0)
    probs = np.exp(cls) / np.exp(cls).sum(-1, keepdims=True)
    mean_prob = lambda m: np.sum((m > 0) / (1 + np.exp(-m))) / (np.sum(m > 0) + 1e-6)  # noqa: E731
    np.testing.assert_allclose(out.scores[:2], [probs[1, 0] * mean_prob(masks[1]), probs[0, 1] * mean_prob(masks[0])],
                               rtol=1e-5)
    unfiltered = instance(cls, masks, None, top_k=3)
    assert sorted(unfiltered.classes.tolist()) == [0, 1, 2]


def test_instance_empty_mask_scores_zero():
    cls = one_hot_logits([0, 1])
    masks = np.stack([np.full((2, 2), -3.0), np.full((2, 2), 3.0)]).astype(np.float32)
    out = instance(cls, masks, top_k=2)
    assert np.all(np.isfinite(out.scores))
    np.testing.assert_array_equal(out.classes, [1, 0])
    assert out.scores[1] == 0 and not out.masks[1].any()


@pytest.mark.parametrize("name,value", [("object_mask_threshold", -0.1), ("object_mask_threshold", 1.5),
                                        ("overlap_threshold", float("nan")), ("overlap_threshold", 2)])
def test_threshold_errors_name_the_argument(name, value):
    cls, masks = one_hot_logits([0]), np.zeros((1, 2, 2), np.float32)
    with pytest.raises(ValueError, match=f"{name}.*{value}"):
        mi.panoptic_inference(cls, masks, np.array([True, True, True]), **{name: value})
    with pytest.raises(ValueError, match=name):
        mi.panoptic_inference_batched(cls[None], masks[None], np.array([True, True, True]), **{name: value})


@pytest.mark.parametrize("top_k", [0, 7])
def test_top_k_outside_one_to_q_times_k_is_an_error(top_k):
    cls, masks = one_hot_logits([0, 1]), np.zeros((2, 2, 2), np.float32)  # Q*K = 6
    with pytest.raises(ValueError, match=rf"top_k.*\[1, 6\].*{top_k}"):
        mi.instance_inference(cls, masks, top_k=top_k)


def test_shape_errors_are_named():
    cls, masks = one_hot_logits([0, 1]), np.zeros((3, 2, 2), np.float32)
    with pytest.raises(AssertionError, match="class_logits .* and mask_logits .* must agree on queries"):
        mi.panoptic_inference(cls, masks, np.array([True, True, True]))
    with pytest.raises(AssertionError, match="mask_logits must be"):
        mi.instance_inference(cls, masks[:2, 0], top_k=1)
    with pytest.raises(AssertionError, match="is_thing must be a bool"):
        mi.panoptic_inference(cls, masks[:2], np.array([0, 2]))
    with pytest.raises(AssertionError, match=r"is_thing must be \[K\] = \[3\]"):
        mi.instance_inference(cls, masks[:2], np.array([True, False]), top_k=1)
    with pytest.raises(AssertionError, match="must agree on batch and queries"):
        mi.semantic_inference(cls[None], masks[None])
