"""Mask2Former's inference rules (semantic, panoptic, instance) for mask-classification outputs, as jit-able functions
with fixed output shapes.

Inputs are one model's outputs: class logits [Q, K+1] whose last class is "no object", and mask logits [Q, H, W]
already resized to the image. Everything is computed in float32. Thresholds and `top_k` are static Python numbers
(validated eagerly; pass them with `static_argnames` when jitting a wrapper).

The rules follow facebookresearch/Mask2Former `mask2former/maskformer_model.py` (`semantic_inference`,
`panoptic_inference`, `instance_inference`, commit 161be51). Hugging Face's `Mask2FormerImageProcessor`
post-processing differs in places; each function's docstring says where, and this module follows the original.
(HF also always resizes the mask logits bilinearly to 384x384 first, and only then to the requested size.)
"""

import numbers
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp


class PanopticPrediction(NamedTuple):
    """One image's panoptic segmentation as tables indexed by query slot (fixed shapes, so it vmaps).

    segment_ids: int32 [H, W], the segment id of each pixel, -1 = void. A segment's id is a query index: the query
        itself for a thing, the smallest query index among the merged queries of a stuff class.
    segment_classes: int32 [Q], the class of segment id q, -1 where q is not a segment id.
    segment_scores: float32 [Q], the class probability of query q where q is a segment id, else 0.
    """
    segment_ids: jax.Array
    segment_classes: jax.Array
    segment_scores: jax.Array


class InstancePrediction(NamedTuple):
    """One image's top-k instances, sorted by descending score; slots dropped by the thing filter come last.

    scores: float32 [top_k], class probability x mean mask probability inside the binary mask (0 in dropped slots).
    classes: int32 [top_k], -1 in dropped slots.
    masks: bool [top_k, H, W], mask logit > 0 (all False in dropped slots).
    """
    scores: jax.Array
    classes: jax.Array
    masks: jax.Array


def _check_fraction(name: str, value) -> float:
    # Static, so it can be checked here (and hashed by jit's static_argnames); a tracer fails the isinstance test.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a static number in [0, 1], got {value!r}")
    return float(value)


def _check_outputs(class_logits: jax.Array, mask_logits: jax.Array, batched: bool) -> tuple[jax.Array, jax.Array]:
    """float32 (class_logits [(B,) Q, K+1], mask_logits [(B,) Q, H, W]) after checking ranks and shared leading dims."""
    lead = 2 if batched else 1
    chex.assert_rank(class_logits, lead + 1, custom_message=f"class_logits must be [{'B, ' * batched}Q, K+1]")
    chex.assert_rank(mask_logits, lead + 2, custom_message=f"mask_logits must be [{'B, ' * batched}Q, H, W]")
    chex.assert_equal_shape_prefix(
        [class_logits, mask_logits], lead,
        custom_message=f"class_logits {class_logits.shape} and mask_logits {mask_logits.shape} must agree on "
                       f"{'batch and ' * batched}queries")
    if class_logits.shape[-1] < 2:
        raise ValueError(f"class_logits needs at least one class plus no-object, got shape {class_logits.shape}")
    return class_logits.astype(jnp.float32), mask_logits.astype(jnp.float32)


def _check_is_thing(is_thing, num_classes: int) -> jax.Array:
    is_thing = jnp.asarray(is_thing)
    # Refuse integer class-id lists (detectron2's thing_dataset_id_to_contiguous_id style): they would be
    # silently reinterpreted as a per-class mask.
    chex.assert_type(is_thing, bool, custom_message="is_thing must be a bool [K] per-class mask")
    chex.assert_shape(is_thing, (num_classes,), custom_message=f"is_thing must be [K] = [{num_classes}]")
    return is_thing


def semantic_scores(class_logits: jax.Array, mask_logits: jax.Array) -> jax.Array:
    """float32 [B, K, H, W] per-class scores sum_q softmax(class)[q, k] * sigmoid(mask)[q] (no-object dropped).

    class_logits [B, Q, K+1], mask_logits [B, Q, H, W]. The scores are not a distribution over classes.
    """
    class_logits, mask_logits = _check_outputs(class_logits, mask_logits, batched=True)
    class_probs = jax.nn.softmax(class_logits, axis=-1)[..., :-1]
    # HIGHEST: the default TPU matmul precision (bf16 passes) would flip near-tied pixels.
    return jnp.einsum("bqk,bqhw->bkhw", class_probs, jax.nn.sigmoid(mask_logits),
                      precision=jax.lax.Precision.HIGHEST)


def semantic_inference(class_logits: jax.Array, mask_logits: jax.Array) -> jax.Array:
    """int32 [B, H, W] class map: argmax over K of `semantic_scores` ([B, Q, K+1], [B, Q, H, W])."""
    return jnp.argmax(semantic_scores(class_logits, mask_logits), axis=1).astype(jnp.int32)


def panoptic_inference(class_logits: jax.Array, mask_logits: jax.Array, is_thing: jax.Array, *,
                       object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8) -> PanopticPrediction:
    """Mask2Former's panoptic rule for one image: class_logits [Q, K+1], mask_logits [Q, H, W], is_thing bool [K].

    1. Query q is kept iff its argmax class (over K+1) is not no-object and its max class probability score_q is
       > object_mask_threshold (strict).
    2. Each pixel goes to the kept query with the largest score_q * sigmoid(mask_q) (ties: lowest index).
    3. Kept query q makes a segment iff its won pixels that are also its own pixels (sigmoid(mask_q) >= 0.5) are not
       empty and area(won by q) / area(sigmoid(mask_q) >= 0.5) >= overlap_threshold (this ratio may exceed 1).
    4. A segment covers only the pixels it won *and* has sigmoid(mask_q) >= 0.5; every other pixel is void (-1).
    5. Segments of the same stuff class (not is_thing) merge into one, whose id is the smallest of their query indices.
    Mask2Former numbers segments 1, 2, ... in query order with 0 = void; here ids are query slots and -1 is void, so
    the table has a fixed shape. The defaults (0.8, 0.8) are those of Mask2Former's COCO panoptic configs.

    Hugging Face's post_process_panoptic_segmentation differs: its own area counts score * sigmoid(mask) >= 0.5
    (the probabilities are scaled in place before the check), it keeps a segment iff its ratio is strictly > the
    threshold (a float32 ratio, so 4/5 still passes 0.8 but 3/4 fails 0.75), paints every pixel a query won (also
    where its mask is < 0.5), keeps segments none of whose won pixels has mask >= 0.5, can give two different segments
    one id after a fused stuff segment (its running id is reset to the stuff segment's), marks void 0 (-1 only when
    no query is kept), and its default threshold is 0.5.
    """
    object_mask_threshold = _check_fraction("object_mask_threshold", object_mask_threshold)
    overlap_threshold = _check_fraction("overlap_threshold", overlap_threshold)
    class_logits, mask_logits = _check_outputs(class_logits, mask_logits, batched=False)
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    is_thing = _check_is_thing(is_thing, num_classes)
    slots = jnp.arange(num_queries)

    class_probs = jax.nn.softmax(class_logits, axis=-1)
    scores, labels = jnp.max(class_probs, axis=-1), jnp.argmax(class_probs, axis=-1).astype(jnp.int32)
    keep = (labels != num_classes) & (scores > object_mask_threshold)

    mask_probs = jax.nn.sigmoid(mask_logits)
    # -inf: dropped queries never win; where none is kept the argmax is 0, which is then not a segment.
    weighted = jnp.where(keep[:, None, None], scores[:, None, None] * mask_probs, -jnp.inf)
    winner = jnp.argmax(weighted, axis=0)  # [H, W]
    won = (winner[None] == slots[:, None, None]) & keep[:, None, None]  # [Q, H, W]
    own = mask_probs >= 0.5
    won_area = jnp.sum(won, axis=(1, 2))
    own_area = jnp.sum(own, axis=(1, 2))
    painted_area = jnp.sum(won & own, axis=(1, 2))
    # painted_area > 0 implies both areas > 0, the other two conditions of the original.
    # float32, where the original divides in float64: they differ only for a ratio within a float32 rounding of the
    # threshold but not equal to it (at 0.8: only with own areas above ~6M pixels).
    ratio = won_area.astype(jnp.float32) / jnp.maximum(own_area, 1).astype(jnp.float32)
    is_segment = keep & (painted_area > 0) & ~(ratio < overlap_threshold)

    stuff = is_segment & ~is_thing[jnp.minimum(labels, num_classes - 1)]  # no-object labels are never segments
    same_stuff_class = stuff[:, None] & stuff[None, :] & (labels[:, None] == labels[None, :])
    first_of_class = jnp.argmax(same_stuff_class, axis=1)  # first True: the smallest merged query (itself if alone)
    segment_of_query = jnp.where(stuff, first_of_class, jnp.where(is_segment, slots, -1)).astype(jnp.int32)

    pixel_own = jnp.take_along_axis(own, winner[None], axis=0)[0]
    segment_ids = jnp.where(pixel_own & is_segment[winner], segment_of_query[winner], -1).astype(jnp.int32)
    is_id = is_segment & (segment_of_query == slots)
    return PanopticPrediction(segment_ids=segment_ids,
                              segment_classes=jnp.where(is_id, labels, -1).astype(jnp.int32),
                              segment_scores=jnp.where(is_id, scores, 0.0).astype(jnp.float32))


def panoptic_inference_batched(class_logits: jax.Array, mask_logits: jax.Array, is_thing: jax.Array, *,
                               object_mask_threshold: float = 0.8,
                               overlap_threshold: float = 0.8) -> PanopticPrediction:
    """`panoptic_inference` over a batch: [B, Q, K+1], [B, Q, H, W], is_thing [K] -> fields with a leading B."""
    _check_outputs(class_logits, mask_logits, batched=True)
    return jax.vmap(lambda c, m: panoptic_inference(
        c, m, is_thing, object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold))(class_logits, mask_logits)


def instance_inference(class_logits: jax.Array, mask_logits: jax.Array, is_thing: Optional[jax.Array] = None, *,
                       top_k: int = 100) -> InstancePrediction:
    """Mask2Former's instance rule for one image: class_logits [Q, K+1], mask_logits [Q, H, W], is_thing bool [K].

    The top_k (query, class) pairs by class probability (softmax over K+1, no-object then dropped) become instances
    with binary mask = logits > 0 and score = class probability * sum(sigmoid(logits) * binary) / (sum(binary) + 1e-6),
    i.e. times the mean mask probability inside the binary mask (0 for an empty mask).
    With is_thing (Mask2Former with panoptic on), pairs of non-thing classes are dropped *after* the top-k, as in
    the original, so fewer than top_k instances remain; the dropped slots get class -1, score 0 and an empty mask.
    Masking them out before the top-k instead would return top_k things and change the detections that
    COCO AP counts. The default top_k is Mask2Former's TEST.DETECTIONS_PER_IMAGE (100); it must be in [1, Q*K].

    Hugging Face's post_process_instance_segmentation differs: its k is always Q, it drops instances whose score is
    < threshold (default 0.5) or whose mask is empty, it has no thing filter, and by default it paints the masks
    into one map, so overlapping instances lose pixels (return_binary_maps=True keeps them).
    """
    class_logits, mask_logits = _check_outputs(class_logits, mask_logits, batched=False)
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    max_k = num_queries * num_classes
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= max_k:
        raise ValueError(f"top_k must be a static integer in [1, Q*K] = [1, {max_k}], got {top_k!r}")
    if is_thing is not None:
        is_thing = _check_is_thing(is_thing, num_classes)

    class_probs = jax.nn.softmax(class_logits, axis=-1)[:, :-1]
    binary = mask_logits > 0
    binary_area = jnp.sum(binary, axis=(1, 2), dtype=jnp.float32)
    # Per query rather than per top-k pair: the same numbers, computed once per mask.
    mask_scores = jnp.sum(jax.nn.sigmoid(mask_logits) * binary, axis=(1, 2)) / (binary_area + 1e-6)

    top_probs, flat = jax.lax.top_k(class_probs.reshape(-1), int(top_k))
    query, classes = flat // num_classes, (flat % num_classes).astype(jnp.int32)
    scores = top_probs * mask_scores[query]
    kept = jnp.ones_like(scores, bool) if is_thing is None else is_thing[classes]

    order = jnp.argsort(jnp.where(kept, -scores, jnp.inf), stable=True)
    query, classes, scores, kept = query[order], classes[order], scores[order], kept[order]
    return InstancePrediction(scores=jnp.where(kept, scores, 0.0),
                              classes=jnp.where(kept, classes, -1),
                              masks=binary[query] & kept[:, None, None])


def instance_inference_batched(class_logits: jax.Array, mask_logits: jax.Array,
                               is_thing: Optional[jax.Array] = None, *, top_k: int = 100) -> InstancePrediction:
    """`instance_inference` over a batch: [B, Q, K+1], [B, Q, H, W], is_thing [K] -> fields with a leading B."""
    _check_outputs(class_logits, mask_logits, batched=True)
    return jax.vmap(lambda c, m: instance_inference(c, m, is_thing, top_k=top_k))(class_logits, mask_logits)
