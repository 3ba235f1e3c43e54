"""Panoptic / semantic segmentation by mask classification (EoMT, Mask2Former-style) and per-pixel classification.

Batch fields: 'image' [B, H, W, C], 'semantic' int32 [B, H, W] (category ids; -1 or >= K = void), 'instance'
int32 [B, H, W] (0 = no instance). Categories 0..num_stuff_classes-1 are stuff, the rest things (the data set's
`panoptic_info()` must agree; `check_data` compares).

Targets (built on device, fixed shapes): M = num_stuff_classes + max_instances segment slots per image; slot s <
num_stuff_classes is stuff class s's region, slot num_stuff_classes + i - 1 is thing instance i (its category is
the semantic id of its pixels). A slot with no pixel is empty: masks emptied by a crop are never matched.

Loss (Mask2Former): Hungarian matching per image (`maskjax.tasks.hungarian`) on cost = class_weight * (-p[class])
+ mask_weight * sigmoid-BCE + dice_weight * dice, the mask terms on `num_points` uniform points shared by
predictions and targets; then a class cross-entropy (no-object weight `no_object_weight`) and BCE + dice on
importance-sampled points (`oversample_ratio`, `importance_sample_ratio`), normalised by the number of target
masks in the *global* batch (the loss runs on the global batch under jit, so this is the count over every device
and host, what Mask2Former's all-reduce of `num_masks` approximates). Every earlier prediction ('layers') gets the
same loss (deep supervision). `num_points=0`: full-resolution masks instead of points (the memory ablation).

Inference and metrics follow Mask2Former (`maskjax.tasks.mask_inference`) and panopticapi / detectron2
(`maskjax.evaluate.segmentation`): mIoU from a data-set confusion matrix, PQ / SQ / RQ (all, things, stuff).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskjax.evaluate import segmentation as seg_metrics
from maskjax.models.segmentation import EMPTY_MASK_RULES, EoMT, Mask2FormerStyle, PerPixel, resize_bilinear
from maskjax.tasks import hungarian, mask_inference
from maskjax.tasks.base import ModelSpec, register_model, register_task
from maskjax.tasks.common import validate_vit, vit_from_config, vit_schema, vit_size, attention_from_config

Batch = Mapping[str, jax.Array]
HEADS = ("eomt", "mask2former", "perpixel")
ANNEALING = ("poly", "always", "never")
PURPOSE_POINTS, PURPOSE_CROP, PURPOSE_ANNEAL = 0x5E61, 0x5E62, 0x5E63
CANDIDATE_CHUNK = 2 ** 17  # Importance-sampling candidates handled at once per image (bounds the loss's memory).


# ------------------------------------------------------------------------------------------------- models
def _seg_schema(head: str) -> Callable[[], ml_collections.ConfigDict]:
    def schema() -> ml_collections.ConfigDict:
        m = vit_schema(classifier=False)
        m.num_classes = 15  # Categories K (stuff + things), without "no object"; must match the data set.
        if head != "perpixel":
            m.num_queries = 16  # Learned queries Q (>= the segments an image can have).
        if head == "eomt":
            m.num_mask_blocks = 4  # L: the last L blocks process the queries (EoMT: 4).
            m.mask_annealing = "poly"  # Training: 'poly' (EoMT's per-block schedules), 'always' (masks on), 'never'.
        if head == "mask2former":
            m.decoder_dim = 128  # Width of the pixel decoder and transformer decoder (Mask2Former: 256).
            m.decoder_heads = 4  # Heads of the decoder's attention (Mask2Former: 8).
            m.decoder_mlp_dim = 512  # FFN width of the decoder (Mask2Former: 2048).
            m.decoder_layers = 6  # Decoder layers, cycling over the levels (Mask2Former: 9).
            m.pyramid_scales = (0.5, 1.0, 2.0)  # Levels relative to the patch grid, coarse first (powers of 2).
            m.mask_scale = 2.0  # Resolution of the mask features relative to the patch grid.
            m.masked_attention = True  # Masked cross-attention (False: plain cross-attention, the ablation).
            m.empty_mask_rule = "attend_all"  # Empty predicted mask: 'attend_all' (Mask2Former) or 'attend_none'.
        return m
    return schema


def _validate_seg_model(config: ml_collections.ConfigDict) -> None:
    validate_vit(config)
    m = config.model
    if m.tubelet_size or config.data.num_frames:
        raise ValueError(f"config.model.tubelet_size={m.tubelet_size}: segmentation models take images")
    if m.num_classes < 1:
        raise ValueError(f"config.model.num_classes={m.num_classes!r}: must be >= 1")
    if "num_queries" in m and m.num_queries < 1:
        raise ValueError(f"config.model.num_queries={m.num_queries!r}: must be >= 1")
    if m.name == "eomt" and not 1 <= m.num_mask_blocks <= vit_size(m)["depth"]:
        raise ValueError(f"config.model.num_mask_blocks={m.num_mask_blocks!r}: must be in [1, depth="
                         f"{vit_size(m)['depth']}]")
    if m.name == "eomt" and m.scan_layers:
        raise ValueError("config.model.scan_layers=True: EoMT runs its encoder in two ranges (the plain blocks, "
                         "then each query block between mask predictions), which the scanned layout does not "
                         "support; use model.remat to save memory")
    if m.name == "eomt" and m.mask_annealing not in ANNEALING:
        raise ValueError(f"config.model.mask_annealing={m.mask_annealing!r}: must be one of {ANNEALING}")
    if m.name == "mask2former":
        if m.decoder_dim % m.decoder_heads:
            raise ValueError(f"config.model.decoder_dim={m.decoder_dim} is not divisible by "
                             f"config.model.decoder_heads={m.decoder_heads}")
        if m.decoder_layers < 1:
            raise ValueError(f"config.model.decoder_layers={m.decoder_layers!r}: must be >= 1")
        if m.empty_mask_rule not in EMPTY_MASK_RULES:
            raise ValueError(f"config.model.empty_mask_rule={m.empty_mask_rule!r}: must be one of {EMPTY_MASK_RULES}")
        grid = config.data.image_size // vit_size(m)["patch_size"]
        for key in ("pyramid_scales", "mask_scale"):
            values = m[key] if key == "pyramid_scales" else (m[key],)
            for scale in values:
                steps = math.log2(scale) if scale > 0 else 0.5
                if steps != int(steps) or grid * scale < 1 or (grid * scale) != int(grid * scale):
                    raise ValueError(f"config.model.{key}={m[key]!r}: every scale must be a power of two that "
                                     f"keeps the {grid}x{grid} patch grid integral")
        if not m.pyramid_scales:
            raise ValueError("config.model.pyramid_scales=(): needs at least one level")


def _backbone(m: ml_collections.ConfigDict):
    encoder = vit_from_config(m)
    return encoder.clone(num_classes=None, pool="none")


def _build(config: ml_collections.ConfigDict):
    m = config.model
    if m.name == "eomt":
        return EoMT(**_vit_kwargs(m), num_queries=m.num_queries, num_mask_blocks=m.num_mask_blocks,
                    num_seg_classes=m.num_classes, semantic_head=config.segmentation.remask)
    if m.name == "mask2former":
        attention, _ = attention_from_config(m.attention)
        return Mask2FormerStyle(backbone=_backbone(m), num_seg_classes=m.num_classes, num_queries=m.num_queries,
                                dim=m.decoder_dim, num_heads=m.decoder_heads, mlp_dim=m.decoder_mlp_dim,
                                num_layers=m.decoder_layers, scales=tuple(m.pyramid_scales),
                                mask_scale=float(m.mask_scale), masked_attention=m.masked_attention,
                                empty_mask_rule=m.empty_mask_rule, semantic_head=config.segmentation.remask,
                                dtype=jnp.dtype(m.dtype),
                                # The decoder's attention: the backbone's backend (approx layers are backbone blocks).
                                attention=dataclasses.replace(attention, approx_layers=None))
    return PerPixel(backbone=_backbone(m), num_seg_classes=m.num_classes, dtype=jnp.dtype(m.dtype))


def _vit_kwargs(m: ml_collections.ConfigDict) -> dict:
    vit = _backbone(m)
    names = ("patch_size", "width", "depth", "mlp_dim", "num_heads", "class_token", "num_registers", "posemb",
             "dropout", "drop_path_rate", "layer_scale_init", "dtype", "remat", "remat_policy", "scan_layers",
             "attention", "token_mask")
    return {n: getattr(vit, n) for n in names} | {"num_classes": None, "pool": "none"}


for _head in HEADS:
    register_model(ModelSpec(name=_head, schema=_seg_schema(_head), validate=_validate_seg_model, build=_build))


# ------------------------------------------------------------------------------------------------ targets
def panoptic_targets(semantic: jax.Array, instance: jax.Array, num_classes: int, num_stuff: int,
                     max_instances: int) -> tuple[jax.Array, jax.Array]:
    """Segment slots of a batch of label maps.

    semantic, instance: int [B, H, W]. Returns (ids int32 [B, H, W]: the slot of each pixel or -1 = void,
    classes int32 [B, M]: each slot's category or -1 when empty), M = num_stuff + max_instances. Void: semantic
    outside [0, num_classes), thing pixels without an instance id in [1, max_instances].
    """
    chex.assert_equal_shape([semantic, instance])
    semantic, instance = semantic.astype(jnp.int32), instance.astype(jnp.int32)
    known = (semantic >= 0) & (semantic < num_classes)
    is_thing = semantic >= num_stuff
    thing_slot = num_stuff + instance - 1
    ids = jnp.where(is_thing, jnp.where((instance >= 1) & (instance <= max_instances), thing_slot, -1), semantic)
    ids = jnp.where(known, ids, -1)
    num_slots = num_stuff + max_instances
    # Per-slot scatters, not [B, H, W, M] one-hot masks; void pixels go to index M, out of range, dropped.
    flat_ids = jnp.where(ids >= 0, ids, num_slots).reshape(ids.shape[0], -1)
    area = jax.vmap(lambda i: jnp.zeros(num_slots, jnp.int32).at[i].add(1, mode="drop"))(flat_ids)  # [B, M]
    # A slot's category: the largest semantic id among its pixels (one id per segment in well-formed data).
    category = jax.vmap(lambda i, v: jnp.full(num_slots, -1, jnp.int32).at[i].max(v, mode="drop"))(
        flat_ids, semantic.reshape(ids.shape[0], -1))
    classes = jnp.where(area > 0, category, -1)
    return ids, classes


def random_resized_crop(rng: jax.Array, image: jax.Array, maps: Sequence[jax.Array], *,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[jax.Array, list]:
    """One random box per example (area fraction in `scale`, aspect ratio in `ratio`, inside the image), resized
    back to the full size: bilinear for image [B, H, W, C], nearest for the int maps [B, H, W] (same geometry)."""
    batch, height, width = image.shape[:3]
    k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
    area = jax.random.uniform(k_area, (batch,), minval=scale[0], maxval=scale[1])
    log_ratio = jax.random.uniform(k_ratio, (batch,), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    box_h = jnp.clip(jnp.sqrt(area / aspect), 1.0 / height, 1.0)
    box_w = jnp.clip(jnp.sqrt(area * aspect), 1.0 / width, 1.0)
    top = jax.random.uniform(k_y, (batch,)) * (1.0 - box_h)
    left = jax.random.uniform(k_x, (batch,)) * (1.0 - box_w)
    ys = top[:, None] + (jnp.arange(height) + 0.5)[None] / height * box_h[:, None]  # [B, H] in [0, 1]
    xs = left[:, None] + (jnp.arange(width) + 0.5)[None] / width * box_w[:, None]

    def nearest(m, y, x):
        rows = jnp.clip(jnp.floor(y * height).astype(jnp.int32), 0, height - 1)
        cols = jnp.clip(jnp.floor(x * width).astype(jnp.int32), 0, width - 1)
        return m[rows[:, None], cols[None, :]]

    def bilinear(img, y, x):
        py, px = y * height - 0.5, x * width - 0.5
        y0, x0 = jnp.floor(py), jnp.floor(px)
        wy, wx = (py - y0)[:, None, None], (px - x0)[None, :, None]
        y0i = jnp.clip(y0.astype(jnp.int32), 0, height - 1)
        y1i = jnp.clip(y0.astype(jnp.int32) + 1, 0, height - 1)
        x0i = jnp.clip(x0.astype(jnp.int32), 0, width - 1)
        x1i = jnp.clip(x0.astype(jnp.int32) + 1, 0, width - 1)
        top_row = img[y0i[:, None], x0i[None]] * (1 - wx) + img[y0i[:, None], x1i[None]] * wx
        bottom_row = img[y1i[:, None], x0i[None]] * (1 - wx) + img[y1i[:, None], x1i[None]] * wx
        return top_row * (1 - wy) + bottom_row * wy

    out_image = jax.vmap(bilinear)(image, ys, xs)
    return out_image, [jax.vmap(nearest)(m, ys, xs) for m in maps]


# --------------------------------------------------------------------------------------------------- loss
def _bilinear_corners(points: jax.Array, height: int, width: int):
    """The 4 (flat index row * width + col, weight) corners of PyTorch's `grid_sample(align_corners=False)` at
    points [..., 2] ((y, x) in [0, 1]); a corner outside the image has weight 0 (zero padding) and a clipped index.
    Flat indices: one gather index per point (row and column would be two, plus one per vmapped axis)."""
    py, px = points[..., 0] * height - 0.5, points[..., 1] * width - 0.5
    y0, x0 = jnp.floor(py), jnp.floor(px)
    wy, wx = py - y0, px - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    for dy, fy in ((0, 1 - wy), (1, wy)):
        for dx, fx in ((0, 1 - wx), (1, wx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            flat = jnp.clip(yy, 0, height - 1) * width + jnp.clip(xx, 0, width - 1)
            yield flat, jnp.where(inside, fy * fx, 0.0)


def point_sample(maps: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinear values of maps [N, h, w] at points [P, 2] ((y, x) in [0, 1]) -> [N, P], or with points [N, P, 2]
    each map at its own points: PyTorch's `grid_sample(align_corners=False)` with zero padding, as Mask2Former's
    `point_sample`."""
    chex.assert_rank(maps, 3)
    count, height, width = maps.shape
    flat_maps = maps.reshape(-1)
    if points.ndim == 3:
        chex.assert_shape(points, (count, None, 2))
    offsets = jnp.arange(count)[:, None] * (height * width)  # map n starts at n * h * w of the flat maps
    return sum(weight * flat_maps[flat + offsets] for flat, weight in _bilinear_corners(points, height, width))


def sample_slot_masks(ids: jax.Array, points: jax.Array, slots: jax.Array) -> jax.Array:
    """Bilinear values of the binary masks `ids == slot` at points, read from the id map's 4 corners per point
    (the [M, H, W] one-hot masks are never built: M full-resolution maps per image, which on COCO-sized data
    outweigh everything else in the loss).

    ids int [H, W] (-1 = void, in no mask); points [..., P, 2] ((y, x) in [0, 1]); slots int, broadcastable
    against [..., P] (e.g. [M, 1]). Returns float32 [...broadcast..., P] = `point_sample(one_hot(ids), points)`
    of each slot's mask.
    """
    chex.assert_rank(ids, 2)
    flat_ids = ids.reshape(-1)
    return sum(weight * (flat_ids[flat] == slots) for flat, weight in _bilinear_corners(points, *ids.shape))


def _pair_costs(pred_logits: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean sigmoid-BCE and dice costs [Q, M] between every prediction [Q, P] (logits) and target [M, P]."""
    points = pred_logits.shape[-1]
    pos, neg = jax.nn.softplus(-pred_logits), jax.nn.softplus(pred_logits)
    bce = (pos @ target.T + neg @ (1.0 - target).T) / points
    prob = jax.nn.sigmoid(pred_logits)
    dice = 1.0 - (2.0 * prob @ target.T + 1.0) / (prob.sum(-1)[:, None] + target.sum(-1)[None, :] + 1.0)
    return bce, dice


def _mask_terms(pred_logits: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-pair sigmoid-BCE (mean over points) and dice loss [M] for matched predictions [M, P] and targets."""
    bce = jnp.mean(jax.nn.softplus(pred_logits) - pred_logits * target, axis=-1)
    prob = jax.nn.sigmoid(pred_logits)
    dice = 1.0 - (2.0 * jnp.sum(prob * target, -1) + 1.0) / (jnp.sum(prob, -1) + jnp.sum(target, -1) + 1.0)
    return bce, dice


def set_loss_sums(class_logits: jax.Array, mask_logits: jax.Array, target_ids: jax.Array,
                  target_classes: jax.Array, rng: jax.Array, *, class_weight: float, mask_weight: float,
                  dice_weight: float, no_object_weight: float, num_points: int, oversample_ratio: float,
                  importance_sample_ratio: float, semantic_probs: Optional[jax.Array] = None,
                  semantic_labels: Optional[jax.Array] = None, reclass_eta: float = 0.0) -> dict[str, jax.Array]:
    """Matching and loss of one image's prediction (sums; normalised by the caller over the global batch).

    class_logits [Q, K+1]; mask_logits [Q, h, w]; target_ids int [H, W]: the target slot of each pixel (-1 = void),
    so slot m's mask is `target_ids == m`; target_classes int [M] (-1 = empty slot).

    ReMaX's relaxations (training aids; off by default):
      ReMask, `semantic_probs` float [h, w, K] (sigmoid of a semantic head, no gradient): the mask logits become
        M * (1 + R), R[q] = sum_k sigmoid(class_logits[q, k]) * semantic_probs[..., k] (no gradient through R),
        for the matching and the mask terms.
      ReClass, `reclass_eta` > 0 with `semantic_labels` int [h, w] (category per pixel at the mask resolution,
        void outside [0, K)): the class target of query q becomes eta * W[q] + (1 - eta * W[q]) * onehot(target),
        W[q, k] = sum of sigmoid(mask q) over class k's pixels / class k's pixel count (the mask before ReMask, no
        gradient; 0 for "no object"); the cross-entropy is taken against these soft targets. Returns {'class_ce': sum of weighted CE, 'class_weight': sum of weights, 'mask_bce',
    'mask_dice': sums over matched pairs, 'num_masks', 'matched': query index per slot [M] (-1 = none)}.
    """
    chex.assert_rank([class_logits, mask_logits, target_ids, target_classes], [2, 3, 2, 1])
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    num_slots = target_classes.shape[0]
    slots = jnp.arange(num_slots)[:, None]
    valid = target_classes >= 0
    k_match, k_over, k_rand = jax.random.split(rng, 3)
    mask_probs = jax.nn.sigmoid(jax.lax.stop_gradient(mask_logits))  # ReClass reads the masks before ReMask
    if semantic_probs is not None:
        chex.assert_shape(semantic_probs, mask_logits.shape[1:] + (num_classes,))
        class_probs = jax.nn.sigmoid(jax.lax.stop_gradient(class_logits[:, :num_classes]))
        mask_logits = mask_logits * (1.0 + jnp.einsum("qk,hwk->qhw", class_probs,
                                                      jax.lax.stop_gradient(semantic_probs)))
    if num_points > 0:
        points = jax.random.uniform(k_match, (num_points, 2))
        pred_points = point_sample(mask_logits, points)
        target_points = sample_slot_masks(target_ids, points, slots)  # [M, P]
    else:  # full masks at the target resolution
        pred_points = resize_bilinear(mask_logits, target_ids.shape).reshape(num_queries, -1)
        target_points = (target_ids.reshape(1, -1) == slots).astype(jnp.float32)  # [M, H*W]
    probs = jax.nn.softmax(class_logits, axis=-1)
    cost_class = -jnp.take(probs, jnp.maximum(target_classes, 0), axis=1)  # [Q, M]
    cost_bce, cost_dice = _pair_costs(pred_points, target_points)
    cost = class_weight * cost_class + mask_weight * cost_bce + dice_weight * cost_dice
    matched = hungarian.match_padded(jax.lax.stop_gradient(cost), valid).query_for_target  # [M], -1 = none
    matched_valid = matched >= 0

    target_per_query = jnp.full((num_queries,), num_classes, jnp.int32)
    target_per_query = target_per_query.at[jnp.where(matched_valid, matched, num_queries)].set(
        target_classes, mode="drop")
    weights = jnp.where(target_per_query == num_classes, no_object_weight, 1.0)
    log_probs = jax.nn.log_softmax(class_logits, -1)
    if reclass_eta > 0:
        chex.assert_shape(semantic_labels, mask_logits.shape[1:])
        pixels_of = jax.nn.one_hot(semantic_labels, num_classes)  # [h, w, K]; void -> no class
        cover = jnp.einsum("qhw,hwk->qk", mask_probs, pixels_of) / (jnp.sum(pixels_of, (0, 1)) + 1e-5)
        cover = jnp.pad(cover, ((0, 0), (0, 1)))  # "no object" has no pixels
        hard = jax.nn.one_hot(target_per_query, num_classes + 1)
        ce = -jnp.sum((reclass_eta * cover + (1.0 - reclass_eta * cover) * hard) * log_probs, axis=-1)
    else:
        ce = -jnp.take_along_axis(log_probs, target_per_query[:, None], axis=-1)[:, 0]

    pred = mask_logits[jnp.maximum(matched, 0)]  # [M, h, w]
    if num_points > 0:
        candidates = int(num_points * oversample_ratio)
        important = int(num_points * importance_sample_ratio)
        # Slot by slot in chunks of ~CANDIDATE_CHUNK candidate points: the candidates' coordinates, corner indices,
        # weights and values ([M, 3P] each, per image and prediction) would otherwise all be live at once (at
        # Mask2Former's scale, 100 slots and 10 supervised predictions at 128x128, 16.5 GB -> 8.5 GB).
        chunk = max(1, min(num_slots, CANDIDATE_CHUNK // candidates))

        def uncertain_points(args):
            logits, key = args
            cand = jax.random.uniform(key, (candidates, 2))
            _, top = jax.lax.top_k(-jnp.abs(point_sample(logits[None], cand)[0]), important)  # smallest |logit|
            return cand[top]

        chosen = jax.random.uniform(k_rand, (num_slots, num_points - important, 2))
        if important > 0:
            chosen = jnp.concatenate([jax.lax.map(uncertain_points, (jax.lax.stop_gradient(pred),
                                                                     jax.random.split(k_over, num_slots)),
                                                  batch_size=chunk), chosen], axis=1)
        # Rematerialised: the backward pass recomputes the 4 corners' indices and weights [M, P] instead of keeping
        # them for every supervised prediction (PyTorch's grid_sample keeps only the points, too).
        pred_pts = jax.checkpoint(point_sample)(pred, chosen)
        target_pts = sample_slot_masks(target_ids, chosen, slots)  # each slot's mask at its own points
        bce, dice = _mask_terms(pred_pts, target_pts)
    else:
        pred_pts = resize_bilinear(pred, target_ids.shape).reshape(pred.shape[0], -1)
        bce, dice = _mask_terms(pred_pts, target_points)
    use = matched_valid.astype(jnp.float32)
    return {"class_ce": jnp.sum(weights * ce), "class_weight": jnp.sum(weights),
            "mask_bce": jnp.sum(bce * use), "mask_dice": jnp.sum(dice * use),
            "num_masks": jnp.sum(valid.astype(jnp.float32)), "matched": matched}


def labels_at(semantic: jax.Array, size: Sequence[int]) -> jax.Array:
    """Category maps int [B, H, W] read at the pixel centres of an [h, w] grid (nearest) -> [B, h, w]."""
    height, width = semantic.shape[1:]
    rows = jnp.floor((jnp.arange(size[0]) + 0.5) * height / size[0]).astype(jnp.int32)
    cols = jnp.floor((jnp.arange(size[1]) + 0.5) * width / size[1]).astype(jnp.int32)
    return semantic[:, rows][:, :, cols]


def _semantic_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of logits [B, h, w, K] over the non-void pixels of labels int [B, h, w]."""
    num_classes = logits.shape[-1]
    known = (labels >= 0) & (labels < num_classes)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.clip(labels, 0, num_classes - 1)[..., None],
                              axis=-1)[..., 0]
    return jnp.sum(jnp.where(known, ce, 0.0)) / jnp.maximum(jnp.sum(known), 1)


def annealing_probs(step: jax.Array, total_steps: int, num_blocks: int, mode: str) -> jax.Array:
    """EoMT's mask annealing: float32 [num_blocks], the probability that a query's mask is applied in each masked
    block at `step`. 'poly': block i keeps P = 1 until its window [(i+1)u, (i+2)u) of training (u = 1 / (L + 2)
    of total_steps), P = (1 - progress)^0.9 inside it, 0 after (EoMT's staggered per-block schedules); 'always':
    1; 'never': 0."""
    if mode == "always":
        return jnp.ones((num_blocks,), jnp.float32)
    if mode == "never":
        return jnp.zeros((num_blocks,), jnp.float32)
    unit = total_steps / (num_blocks + 2)
    starts = (jnp.arange(num_blocks) + 1) * unit
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - starts) / unit, 0.0, 1.0)
    return (1.0 - progress) ** 0.9


# --------------------------------------------------------------------------------------------------- task
VOID_IDS = (-1, 255)  # Semantic ids that mean void / ignore (maskjax's crop padding, the 255 of many data sets).


def _crop_section(c: ml_collections.ConfigDict) -> None:
    c.crop_scale = (1.0, 1.0)  # Random resized crop of image and maps: area fraction range ((1, 1) = off).
    c.crop_ratio = (0.75, 1.3333)  # Random resized crop: aspect ratio range.


def _validate_crop(c: ml_collections.ConfigDict, section: str) -> None:
    lo, hi = c.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"config.{section}.crop_scale={tuple(c.crop_scale)!r}: need 0 < min <= max <= 1")
    lo, hi = c.crop_ratio
    if not 0.0 < lo <= hi:
        raise ValueError(f"config.{section}.crop_ratio={tuple(c.crop_ratio)!r}: need 0 < min <= max")


class _SegmentationBase:
    """What the panoptic and the semantic task share: the model, augmentation, data checks, mIoU."""

    feature_kinds = ()
    free_form = ()

    def __init__(self, config: ml_collections.ConfigDict, *, load_params: Optional[Callable] = None):
        del load_params  # reads no other run
        self.config = config
        self.head = config.model.name
        self.model = _build(config)
        self.num_classes = config.model.num_classes

    @classmethod
    def default_evals(cls) -> dict[str, dict]:
        return {"eval": {"type": "metrics", "every": 100},
                "predictions": {"type": "gallery", "every": 0, "count": 8}}

    def check_data(self, source: Any, examples: int = 8) -> None:
        """The first `examples` label maps hold only ids in [0, num_classes) or void (-1, 255)."""
        for index in range(min(examples, len(source))):
            semantic = np.asarray(source[index]["semantic"])
            bad = semantic[((semantic < 0) | (semantic >= self.num_classes)) & ~np.isin(semantic, VOID_IDS)]
            if bad.size:
                raise ValueError(f"config.model.num_classes={self.num_classes}: example {index} of data set "
                                 f"{self.config.data.name!r} has semantic id {int(bad[0])} (valid: 0..."
                                 f"{self.num_classes - 1}, void {VOID_IDS})")

    def _check_batch(self, batch: Batch) -> None:
        chex.assert_rank(batch["image"], 4)
        for key in self.batch_fields[1:]:
            if batch[key].shape != batch["image"].shape[:3]:
                raise ValueError(f"{self.name}: label map {key!r} has shape {batch[key].shape}, the images "
                                 f"{batch['image'].shape} need {batch['image'].shape[:3]}")

    def _augment(self, batch: Batch, rng: jax.Array, train: bool) -> tuple[jax.Array, list]:
        section = self.config[self.name]
        image, maps = batch["image"], [batch[k] for k in self.batch_fields[1:]]
        if train and tuple(section.crop_scale) != (1.0, 1.0):
            image, maps = random_resized_crop(jax.random.fold_in(rng, PURPOSE_CROP), image, maps,
                                              scale=tuple(section.crop_scale), ratio=tuple(section.crop_ratio))
        return image, maps

    def _model_rngs(self, rng: Optional[jax.Array]) -> dict:
        if rng is None:
            return {}
        names = ("dropout", "drop_path", "anneal")
        return dict(zip(names, jax.random.split(rng, len(names))))

    def predict(self, params: Any, batch: Batch) -> dict:
        return self._segment(params, batch["image"])

    def features(self, params: Any, batch: Batch, kind: str) -> jax.Array:
        raise ValueError(f"task {self.name!r} gives no features to probe")


@register_task
class SegmentationTask(_SegmentationBase):
    """Panoptic segmentation by mask classification ('eomt', 'mask2former'): PQ / SQ / RQ and mIoU."""

    name = "segmentation"
    models = ("eomt", "mask2former")
    batch_fields = ("image", "semantic", "instance")

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.num_stuff_classes = 5  # Categories 0..S-1 are stuff, the rest things (the data's panoptic_info).
        c.max_instances = 4  # Thing instance ids 1..max_instances per image (target slots: S + this <= queries).
        c.class_weight = 2.0  # Matching cost and loss weight of the class term (Mask2Former: 2).
        c.mask_weight = 5.0  # ... of the sigmoid BCE mask term (Mask2Former: 5).
        c.dice_weight = 5.0  # ... of the dice term (Mask2Former: 5).
        c.no_object_weight = 0.1  # Cross-entropy weight of the "no object" class (Mask2Former: 0.1).
        c.num_points = 1024  # Points per mask for matching and loss (Mask2Former: 12544); 0 = full masks.
        c.oversample_ratio = 3.0  # Importance sampling: candidates per kept point (Mask2Former: 3).
        c.importance_sample_ratio = 0.75  # Share of kept points that are the most uncertain (Mask2Former: 0.75).
        c.deep_supervision = True  # The loss on every earlier prediction too.
        # ReMaX's training relaxations (Sun et al. 2023); inference is unchanged.
        c.remask = False  # ReMask: a semantic head on the pixel features relaxes the earlier predictions' masks.
        c.remask_weight = 1.0  # Weight of that semantic head's cross-entropy (ReMaX: 1).
        c.reclass_eta = 0.0  # ReClass: soft class targets, eta x each class's covered area share (ReMaX: 0.1).
        _crop_section(c)
        c.object_mask_threshold = 0.8  # Panoptic inference: keep a query if its class score > this.
        c.overlap_threshold = 0.8  # Panoptic inference: drop a segment keeping less than this share of its mask.
        return c

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        c, m = config.segmentation, config.model
        if not 0 <= c.num_stuff_classes <= m.num_classes:
            raise ValueError(f"config.segmentation.num_stuff_classes={c.num_stuff_classes!r}: must be in "
                             f"[0, config.model.num_classes={m.num_classes}]")
        if c.max_instances < 0:
            raise ValueError(f"config.segmentation.max_instances={c.max_instances!r}: must be >= 0")
        slots = c.num_stuff_classes + c.max_instances
        if slots > m.num_queries:
            raise ValueError(f"config.model.num_queries={m.num_queries}: an image can hold {slots} segments "
                             f"(segmentation.num_stuff_classes={c.num_stuff_classes} + segmentation.max_instances="
                             f"{c.max_instances}); give at least as many queries")
        for key in ("object_mask_threshold", "overlap_threshold", "importance_sample_ratio"):
            if not 0.0 <= c[key] <= 1.0:
                raise ValueError(f"config.segmentation.{key}={c[key]!r}: must be in [0, 1]")
        for key in ("class_weight", "mask_weight", "dice_weight", "no_object_weight"):
            if c[key] < 0:
                raise ValueError(f"config.segmentation.{key}={c[key]!r}: must be >= 0")
        if c.num_points < 0:
            raise ValueError(f"config.segmentation.num_points={c.num_points!r}: must be >= 0 (0 = full masks)")
        if c.oversample_ratio < 1.0:
            raise ValueError(f"config.segmentation.oversample_ratio={c.oversample_ratio!r}: must be >= 1")
        if not 0.0 <= c.reclass_eta <= 1.0:
            raise ValueError(f"config.segmentation.reclass_eta={c.reclass_eta!r}: must be in [0, 1] (0 = off)")
        if c.remask_weight < 0:
            raise ValueError(f"config.segmentation.remask_weight={c.remask_weight!r}: must be >= 0")
        if c.remask and not c.deep_supervision:
            raise ValueError("config.segmentation.remask=True relaxes the earlier (deeply supervised) predictions: "
                             "it needs config.segmentation.deep_supervision=True")
        _validate_crop(c, "segmentation")

    def __init__(self, config: ml_collections.ConfigDict, *, load_params: Optional[Callable] = None):
        super().__init__(config, load_params=load_params)
        self.num_stuff = config.segmentation.num_stuff_classes
        self.is_thing = np.arange(self.num_classes) >= self.num_stuff
        self.num_slots = self.num_stuff + config.segmentation.max_instances

    def check_data(self, source: Any, examples: int = 8) -> None:
        super().check_data(source, examples)
        info_fn = getattr(source, "panoptic_info", None)
        c = self.config.segmentation
        if info_fn is not None:
            info = info_fn()
            if len(info["categories"]) != self.num_classes:
                raise ValueError(f"config.model.num_classes={self.num_classes} but data set "
                                 f"{self.config.data.name!r} has {len(info['categories'])} categories")
            if tuple(info["is_thing"]) != tuple(bool(t) for t in self.is_thing):
                raise ValueError(f"config.segmentation.num_stuff_classes={self.num_stuff} does not match the data "
                                 f"set's stuff/thing split {tuple(info['is_thing'])}")
            most = info["max_instances"]
        else:
            most = max(int(np.max(source[i]["instance"])) for i in range(min(examples, len(source))))
        if most > c.max_instances:
            raise ValueError(f"config.segmentation.max_instances={c.max_instances}: data set "
                             f"{self.config.data.name!r} has up to {most} instances per image; the segments "
                             "beyond would be dropped as void")

    def _apply(self, params: Any, images: jax.Array, train: bool, rng: Optional[jax.Array] = None,
               step: Optional[jax.Array] = None) -> dict:
        kwargs = {}
        if self.head == "eomt" and train:
            kwargs["mask_probs"] = annealing_probs(jnp.zeros((), jnp.int32) if step is None else step,
                                                   self.config.total_steps, self.model.num_mask_blocks,
                                                   self.config.model.mask_annealing)
        outputs, _ = self.model.apply({"params": params}, images, train=train, rngs=self._model_rngs(rng),
                                      **kwargs)
        return outputs

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        kwargs = {"mask_probs": jnp.ones((self.model.num_mask_blocks,))} if self.head == "eomt" else {}
        params_rng, anneal_rng = jax.random.split(rng)
        return self.model.init({"params": params_rng, "anneal": anneal_rng}, batch["image"], train=False, **kwargs)

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True,
             step: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        self._check_batch(batch)
        c = self.config.segmentation
        crop_rng, model_rng, point_rng = jax.random.split(rng, 3)
        image, (semantic, instance) = self._augment(batch, crop_rng, train)
        outputs = self._apply(params, image, train, model_rng, step)
        ids, classes = panoptic_targets(semantic, instance, self.num_classes, self.num_stuff, c.max_instances)
        predictions = [(outputs["class_logits"], outputs["mask_logits"])]
        if c.deep_supervision:
            predictions += [(p["class_logits"], p["mask_logits"]) for p in outputs["layers"]]
        options = dict(class_weight=c.class_weight, mask_weight=c.mask_weight, dice_weight=c.dice_weight,
                       no_object_weight=c.no_object_weight, num_points=c.num_points,
                       oversample_ratio=c.oversample_ratio, importance_sample_ratio=c.importance_sample_ratio)
        reclass_eta, remask_weight = float(c.reclass_eta), float(c.remask_weight)
        semantic_maps = [outputs.get("semantic_logits")] + [p.get("semantic_logits") for p in outputs["layers"]]
        total, metrics, semantic_ce = 0.0, {}, []
        for index, (class_logits, mask_logits) in enumerate(predictions):
            keys = jax.random.split(jax.random.fold_in(point_rng, index), image.shape[0])
            labels = labels_at(semantic, mask_logits.shape[2:]) if reclass_eta > 0 or c.remask else None
            relax = None
            if c.remask and index > 0:  # ReMask: earlier predictions only; the final one is what inference uses
                relax = jax.nn.sigmoid(semantic_maps[index])
                semantic_ce.append(_semantic_cross_entropy(semantic_maps[index], labels))
            sums = jax.vmap(lambda cl, ml, ti, tc, k, sp, sl: set_loss_sums(
                cl, ml, ti, tc, k, **options, semantic_probs=sp, semantic_labels=sl, reclass_eta=reclass_eta))(
                    class_logits, mask_logits, ids, classes, keys, relax, labels)
            # Sums over the global batch: num_masks counts every device's and host's targets.
            num_masks = jnp.maximum(jnp.sum(sums["num_masks"]), 1.0)
            class_loss = jnp.sum(sums["class_ce"]) / jnp.maximum(jnp.sum(sums["class_weight"]), 1e-6)
            bce = jnp.sum(sums["mask_bce"]) / num_masks
            dice = jnp.sum(sums["mask_dice"]) / num_masks
            layer_loss = c.class_weight * class_loss + c.mask_weight * bce + c.dice_weight * dice
            total = total + layer_loss
            if index == 0:
                metrics.update(class_loss=class_loss, mask_bce=bce, mask_dice=dice, final_loss=layer_loss,
                               masks_per_image=jnp.sum(sums["num_masks"]) / image.shape[0])
        if semantic_ce:
            metrics["remask_semantic_ce"] = sum(semantic_ce) / len(semantic_ce)
            total = total + remask_weight * sum(semantic_ce)
        if self.head == "eomt" and train:
            probs = annealing_probs(step if step is not None else 0, self.config.total_steps,
                                    self.model.num_mask_blocks, self.config.model.mask_annealing)
            metrics["mask_prob_last_block"] = probs[-1]
        return total, metrics

    def _segment(self, params: Any, images: jax.Array) -> dict:
        """Predictions at the image resolution: 'semantic' int32 [B, H, W], 'panoptic_ids' [B, H, W] (segment id =
        query index, -1 = void), 'panoptic_classes' [B, Q], 'mask_probs' [B, Q, H, W]."""
        outputs = self._apply(params, images, train=False)
        c = self.config.segmentation
        class_logits = outputs["class_logits"]
        mask_logits = resize_bilinear(outputs["mask_logits"], images.shape[1:3])
        semantic = mask_inference.semantic_inference(class_logits, mask_logits)
        ids, classes, _ = mask_inference.panoptic_inference_batched(
            class_logits, mask_logits, jnp.asarray(self.is_thing), object_mask_threshold=c.object_mask_threshold,
            overlap_threshold=c.overlap_threshold)
        return {"semantic": semantic, "panoptic_ids": ids, "panoptic_classes": classes,
                "mask_probs": jax.nn.sigmoid(mask_logits)}

    def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        self._check_batch(batch)
        valid = batch["valid"]
        pred = self._segment(params, batch["image"])
        c = self.config.segmentation
        gt_ids, gt_classes = panoptic_targets(batch["semantic"], batch["instance"], self.num_classes,
                                              self.num_stuff, c.max_instances)
        crowd = jnp.zeros(gt_classes.shape, bool)  # the built-in data has no crowd regions
        return {"count": jnp.sum(valid.astype(jnp.float32)),
                "confusion": seg_metrics.confusion_matrix(pred["semantic"], batch["semantic"], self.num_classes,
                                                          valid),
                **seg_metrics.panoptic_sums(pred["panoptic_ids"], pred["panoptic_classes"], gt_ids, gt_classes,
                                            crowd, self.num_classes, valid)}

    def summarize(self, sums: Mapping[str, Any]) -> dict[str, float]:
        miou = seg_metrics.miou_from_confusion(np.asarray(sums["confusion"]))
        pq = seg_metrics.pq_from_sums({k: np.asarray(v) for k, v in sums.items() if k.startswith("pq_")},
                                      self.is_thing)
        out = {"miou": miou["miou"], "pixel_accuracy": miou["pixel_accuracy"]}
        out.update({f"{m}{g}": pq[f"{m}{g}"] for g in ("", "_things", "_stuff") for m in ("pq", "sq", "rq")})
        return out

    def visualize(self, batch: Mapping[str, np.ndarray], predictions: Any,
                  class_names: Optional[Sequence[str]] = None) -> np.ndarray:
        from maskjax.tasks import segmentation_viz

        return segmentation_viz.overlay_grid(batch, predictions, self.num_classes, self.num_stuff,
                                             self.config.segmentation.max_instances)


@register_task
class SemanticSegmentationTask(_SegmentationBase):
    """Per-pixel semantic segmentation ('perpixel'): pixel cross-entropy (void ignored); mIoU."""

    name = "semantic_segmentation"
    models = ("perpixel",)
    batch_fields = ("image", "semantic")

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        _crop_section(c)
        return c

    @classmethod
    def validate_config(cls, config: ml_collections.ConfigDict) -> None:
        _validate_crop(config.semantic_segmentation, "semantic_segmentation")

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        return self.model.init({"params": rng}, batch["image"], train=False)

    def _logits(self, params: Any, images: jax.Array, train: bool, rng: Optional[jax.Array] = None) -> jax.Array:
        """float32 [B, H, W, K]: the patch-grid logits bilinearly upsampled to the image."""
        outputs, _ = self.model.apply({"params": params}, images, train=train, rngs=self._model_rngs(rng))
        logits = outputs["semantic_logits"].transpose(0, 3, 1, 2)
        return resize_bilinear(logits, images.shape[1:3]).transpose(0, 2, 3, 1)

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True,
             step: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        del step
        self._check_batch(batch)
        crop_rng, model_rng = jax.random.split(rng)
        image, (semantic,) = self._augment(batch, crop_rng, train)
        logits = self._logits(params, image, train, model_rng)
        valid = (semantic >= 0) & (semantic < self.num_classes)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(log_probs, jnp.where(valid, semantic, 0)[..., None], axis=-1)[..., 0]
        count = jnp.maximum(jnp.sum(valid), 1)
        accuracy = jnp.sum((jnp.argmax(logits, -1) == semantic) & valid) / count
        return jnp.sum(jnp.where(valid, ce, 0.0)) / count, {"pixel_accuracy": accuracy}

    def _segment(self, params: Any, images: jax.Array) -> dict:
        return {"semantic": jnp.argmax(self._logits(params, images, False), -1).astype(jnp.int32)}

    def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        self._check_batch(batch)
        pred = self._segment(params, batch["image"])
        return {"count": jnp.sum(batch["valid"].astype(jnp.float32)),
                "confusion": seg_metrics.confusion_matrix(pred["semantic"], batch["semantic"], self.num_classes,
                                                          batch["valid"])}

    def summarize(self, sums: Mapping[str, Any]) -> dict[str, float]:
        miou = seg_metrics.miou_from_confusion(np.asarray(sums["confusion"]))
        return {"miou": miou["miou"], "pixel_accuracy": miou["pixel_accuracy"]}

    def visualize(self, batch: Mapping[str, np.ndarray], predictions: Any,
                  class_names: Optional[Sequence[str]] = None) -> np.ndarray:
        from maskjax.tasks import segmentation_viz

        return segmentation_viz.semantic_grid(batch, predictions, self.num_classes)
