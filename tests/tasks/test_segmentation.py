"""The segmentation task's pieces against independent references: targets vs a numpy loop, point sampling vs
PyTorch's grid_sample, the Mask2Former loss vs numpy + scipy's assignment, EoMT's annealing and attention mask vs
their written-out rules; the models' masked attention; bad input."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from scipy.optimize import linear_sum_assignment

from maskjax.models.segmentation import EoMT, MaskedAttentionDecoder
from maskjax.tasks import make_task
from maskjax.tasks.segmentation import (annealing_probs, panoptic_targets, point_sample, random_resized_crop,
                                        sample_slot_masks, set_loss_sums)
from maskjax.train.config import base_config, validate
from tests.configs import override


def random_maps(rng, batch=3, size=12, num_classes=7, num_stuff=3, max_instances=3):
    semantic = rng.integers(0, num_classes, (batch, size, size))
    instance = np.where(semantic >= num_stuff, rng.integers(0, max_instances + 2, (batch, size, size)), 0)
    semantic[rng.random((batch, size, size)) < 0.05] = -1  # void
    return semantic.astype(np.int32), instance.astype(np.int32)


def test_panoptic_targets_match_a_loop_over_pixels():
    rng = np.random.default_rng(0)
    num_classes, num_stuff, max_instances = 7, 3, 3
    semantic, instance = random_maps(rng, num_classes=num_classes, num_stuff=num_stuff, max_instances=max_instances)
    ids, classes = (np.asarray(a) for a in panoptic_targets(jnp.asarray(semantic), jnp.asarray(instance),
                                                            num_classes, num_stuff, max_instances))
    for b in range(semantic.shape[0]):
        expected_classes = {}
        for y in range(semantic.shape[1]):
            for x in range(semantic.shape[2]):
                s, i = semantic[b, y, x], instance[b, y, x]
                if s < 0:
                    slot = -1
                elif s < num_stuff:
                    slot = s
                elif 1 <= i <= max_instances:
                    slot = num_stuff + i - 1
                else:
                    slot = -1  # a thing pixel without a usable instance id is void
                assert ids[b, y, x] == slot
                if slot >= 0:
                    expected_classes[slot] = max(expected_classes.get(slot, -1), s)
        want = [expected_classes.get(m, -1) for m in range(num_stuff + max_instances)]
        np.testing.assert_array_equal(classes[b], want)


def test_point_sample_equals_torch_grid_sample():
    from maskjax.convert._torch_compat import import_torch

    torch = import_torch()
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(4, 5, 7)).astype(np.float32)
    points = rng.uniform(-0.1, 1.1, size=(33, 2)).astype(np.float32)  # some outside: zero padding
    ours = np.asarray(point_sample(jnp.asarray(maps), jnp.asarray(points)))
    grid = torch.from_numpy(points[:, ::-1].copy() * 2 - 1)[None, None].expand(4, 1, 33, 2)  # (x, y) in [-1, 1]
    theirs = torch.nn.functional.grid_sample(torch.from_numpy(maps)[:, None], grid, align_corners=False)
    np.testing.assert_allclose(ours, theirs[:, 0, 0].numpy(), atol=1e-5)


def test_slot_masks_sampled_from_the_id_map_equal_torch_grid_sample_of_the_masks():
    from maskjax.convert._torch_compat import import_torch

    torch = import_torch()
    rng = np.random.default_rng(1)
    ids = rng.integers(-1, 4, (5, 7)).astype(np.int32)  # 4 slots and void
    points = rng.uniform(-0.1, 1.1, size=(3, 33, 2)).astype(np.float32)  # per-slot-row points, some outside
    masks = (ids[None] == np.arange(4)[:, None, None]).astype(np.float32)  # [4, 5, 7]
    grid = torch.from_numpy(points[..., ::-1].copy() * 2 - 1)[:, None]  # [3, 1, 33, 2], (x, y) in [-1, 1]
    for slot in range(4):
        ours = np.asarray(sample_slot_masks(jnp.asarray(ids), jnp.asarray(points), jnp.asarray(slot)))  # [3, 33]
        theirs = torch.nn.functional.grid_sample(torch.from_numpy(masks[slot])[None, None].expand(3, 1, 5, 7),
                                                 grid, align_corners=False)[:, 0, 0].numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # Broadcast form of the matching points: every slot at one shared set of points -> [M, P].
    shared = np.asarray(sample_slot_masks(jnp.asarray(ids), jnp.asarray(points[0]), jnp.arange(4)[:, None]))
    theirs = torch.nn.functional.grid_sample(torch.from_numpy(masks)[:, None], grid[:1].expand(4, 1, 33, 2),
                                             align_corners=False)[:, 0, 0].numpy()
    np.testing.assert_allclose(shared, theirs, atol=1e-6)


def _reference_full_mask_loss(class_logits, mask_logits, target_masks, target_classes, weights,
                              semantic_probs=None, semantic_labels=None, eta=0.0):
    """Mask2Former's matcher and loss for one image on full masks, in float64 numpy with scipy's assignment; with
    ReMaX's ReMask (semantic_probs [h, w, K]) and ReClass (eta, semantic_labels [h, w]) as the ReMaX port
    xushilin1/remax_deeplab computes them (kmax_deeplab_head.py, _loss_by_feat_single)."""
    class_w, mask_w, dice_w, no_object_w = weights
    q, kp1 = class_logits.shape
    valid = np.flatnonzero(target_classes >= 0)
    raw = mask_logits.reshape(q, -1).astype(np.float64)
    logits = raw
    if semantic_probs is not None:
        sigmoid_classes = 1 / (1 + np.exp(-class_logits[:, :kp1 - 1].astype(np.float64)))
        relax = sigmoid_classes @ semantic_probs.reshape(-1, kp1 - 1).T.astype(np.float64)  # [q, h*w]
        logits = raw + raw * relax
    targets = target_masks.reshape(len(target_masks), -1).astype(np.float64)[valid]
    probs = np.exp(class_logits - class_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    sig = 1 / (1 + np.exp(-logits))
    softplus = lambda z: np.logaddexp(0, z)
    points = logits.shape[1]
    cost_bce = (softplus(-logits) @ targets.T + softplus(logits) @ (1 - targets).T) / points
    cost_dice = 1 - (2 * sig @ targets.T + 1) / (sig.sum(-1)[:, None] + targets.sum(-1)[None] + 1)
    cost = class_w * -probs[:, target_classes[valid]] + mask_w * cost_bce + dice_w * cost_dice
    rows, cols = linear_sum_assignment(cost)
    target_per_query = np.full(q, kp1 - 1)
    target_per_query[rows] = target_classes[valid][cols]
    w = np.where(target_per_query == kp1 - 1, no_object_w, 1.0)
    log_probs = np.log(probs)
    ce = -log_probs[np.arange(q), target_per_query]
    if eta > 0:
        onehot_sem = (semantic_labels.reshape(-1, 1) == np.arange(kp1 - 1)).astype(np.float64)  # void: no class
        cover = (1 / (1 + np.exp(-raw))) @ onehot_sem / (onehot_sem.sum(0) + 1e-5)  # [q, K]
        cover = np.concatenate([cover, np.zeros((q, 1))], axis=1)
        hard = np.eye(kp1)[target_per_query]
        ce = -np.sum((eta * cover + (1 - eta * cover) * hard) * log_probs, axis=1)
    bce = np.mean(softplus(logits[rows]) - logits[rows] * targets[cols], axis=-1)
    dice = 1 - (2 * (sig[rows] * targets[cols]).sum(-1) + 1) / (sig[rows].sum(-1) + targets[cols].sum(-1) + 1)
    matched = np.full(len(target_classes), -1)
    matched[valid[cols]] = rows
    return {"class_ce": (w * ce).sum(), "class_weight": w.sum(), "mask_bce": bce.sum(), "mask_dice": dice.sum(),
            "num_masks": float(len(valid)), "matched": matched}


@pytest.mark.parametrize("valid_slots", [(0, 1, 2, 3, 4), (1, 4), ()])
def test_full_mask_loss_equals_numpy_and_scipy(valid_slots):
    rng = np.random.default_rng(len(valid_slots))
    q, k, m, size = 6, 4, 5, 8
    class_logits = rng.normal(size=(q, k + 1)).astype(np.float32) * 2
    mask_logits = rng.normal(size=(q, size, size)).astype(np.float32) * 3
    target_classes = np.full(m, -1, np.int32)
    target_classes[list(valid_slots)] = rng.integers(0, k, len(valid_slots))
    target_ids = rng.integers(-1, m, (size, size)).astype(np.int32)
    target_ids[target_classes[np.maximum(target_ids, 0)] < 0] = -1  # pixels of empty slots are void
    target_masks = (target_ids[None] == np.arange(m)[:, None, None]).astype(np.float32)
    weights = (2.0, 5.0, 5.0, 0.1)
    ours = jax.jit(lambda *a: set_loss_sums(*a, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
                                            no_object_weight=0.1, num_points=0, oversample_ratio=3.0,
                                            importance_sample_ratio=0.75))(
        jnp.asarray(class_logits), jnp.asarray(mask_logits), jnp.asarray(target_ids), jnp.asarray(target_classes),
        jax.random.key(0))
    if valid_slots:
        want = _reference_full_mask_loss(class_logits, mask_logits, target_masks, target_classes, weights)
    else:  # nothing to match: every query is "no object"
        log_probs = jax.nn.log_softmax(class_logits.astype(np.float64))
        want = {"class_ce": 0.1 * -np.asarray(log_probs)[:, k].sum(), "class_weight": 0.1 * q, "mask_bce": 0.0,
                "mask_dice": 0.0, "num_masks": 0.0, "matched": np.full(m, -1)}
    for key in ("class_ce", "class_weight", "mask_bce", "mask_dice", "num_masks"):
        np.testing.assert_allclose(float(ours[key]), want[key], rtol=1e-4, atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(np.asarray(ours["matched"]), want["matched"])


def test_remax_relaxations_equal_numpy_reference():
    # ReMask changes the matching (relaxed logits) and the mask terms; ReClass the class term. One random image,
    # full masks, against the float64 reference above.
    rng = np.random.default_rng(7)
    q, k, m, size = 6, 4, 5, 8
    class_logits = rng.normal(size=(q, k + 1)).astype(np.float32) * 2
    mask_logits = rng.normal(size=(q, size, size)).astype(np.float32) * 3
    target_classes = np.asarray([0, 2, -1, 3, 1], np.int32)
    target_ids = rng.integers(-1, m, (size, size)).astype(np.int32)
    target_ids[target_classes[np.maximum(target_ids, 0)] < 0] = -1
    target_masks = (target_ids[None] == np.arange(m)[:, None, None]).astype(np.float32)
    semantic_probs = rng.random((size, size, k)).astype(np.float32)
    semantic_labels = rng.integers(0, k, (size, size)).astype(np.int32)
    semantic_labels[:2, :3] = k  # void pixels (>= K) count for no class
    for remask, eta in ((True, 0.0), (False, 0.1), (True, 0.1)):
        ours = set_loss_sums(jnp.asarray(class_logits), jnp.asarray(mask_logits), jnp.asarray(target_ids),
                             jnp.asarray(target_classes), jax.random.key(0), class_weight=2.0, mask_weight=5.0,
                             dice_weight=5.0, no_object_weight=0.1, num_points=0, oversample_ratio=3.0,
                             importance_sample_ratio=0.75,
                             semantic_probs=jnp.asarray(semantic_probs) if remask else None,
                             semantic_labels=jnp.asarray(semantic_labels), reclass_eta=eta)
        want = _reference_full_mask_loss(class_logits, mask_logits, target_masks, target_classes,
                                         (2.0, 5.0, 5.0, 0.1), semantic_probs if remask else None, semantic_labels,
                                         eta)
        for key in ("class_ce", "class_weight", "mask_bce", "mask_dice", "num_masks"):
            np.testing.assert_allclose(float(ours[key]), want[key], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{key}, remask={remask}, eta={eta}")
        np.testing.assert_array_equal(np.asarray(ours["matched"]), want["matched"])
    plain = set_loss_sums(jnp.asarray(class_logits), jnp.asarray(mask_logits), jnp.asarray(target_ids),
                          jnp.asarray(target_classes), jax.random.key(0), class_weight=2.0, mask_weight=5.0,
                          dice_weight=5.0, no_object_weight=0.1, num_points=0, oversample_ratio=3.0,
                          importance_sample_ratio=0.75)
    assert abs(float(plain["mask_bce"]) - float(ours["mask_bce"])) > 1e-3  # the relaxation changed something


def test_point_loss_approaches_the_full_mask_loss():
    # With many points the sampled BCE/dice converge to the full-mask values (importance sampling off: ratio 0).
    # Blocks of 32x32 pixels keep the band where bilinear sampling mixes two blocks to ~3% of the image.
    rng = np.random.default_rng(3)
    class_logits = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    mask_logits = jnp.asarray(np.repeat(np.repeat(rng.normal(size=(4, 4, 4)) * 2, 32, 1), 32, 2), jnp.float32)
    target_ids = jnp.asarray(np.repeat(np.repeat(rng.integers(-1, 2, (4, 4)), 32, 0), 32, 1), jnp.int32)
    classes = jnp.asarray([0, 1])
    kwargs = dict(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1, oversample_ratio=1.0,
                  importance_sample_ratio=0.0)
    loss = jax.jit(lambda points: set_loss_sums(class_logits, mask_logits, target_ids, classes, jax.random.key(0),
                                                num_points=points, **kwargs), static_argnums=0)
    full, sampled = loss(0), loss(20000)
    np.testing.assert_array_equal(sampled["matched"], full["matched"])
    for key in ("mask_bce", "mask_dice"):
        np.testing.assert_allclose(float(sampled[key]), float(full[key]), rtol=0.05)


def test_annealing_follows_eomts_per_block_poly_schedule():
    total, blocks = 600, 4  # unit = 600 / 6 = 100 steps; block i anneals over [(i+1)*100, (i+2)*100)
    for step in (0, 99, 100, 150, 250, 399, 500, 599):
        probs = np.asarray(annealing_probs(jnp.int32(step), total, blocks, "poly"))
        for i in range(blocks):
            start = (i + 1) * 100
            progress = min(max((step - start) / 100, 0.0), 1.0)
            assert probs[i] == pytest.approx((1 - progress) ** 0.9, abs=1e-6), (step, i)
    np.testing.assert_array_equal(annealing_probs(jnp.int32(5), total, blocks, "always"), np.ones(4))
    np.testing.assert_array_equal(annealing_probs(jnp.int32(5), total, blocks, "never"), np.zeros(4))


def test_eomt_attention_mask_rules():
    model = EoMT(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, num_classes=None, pool="none",
                 num_registers=1, num_queries=3, num_mask_blocks=1, num_seg_classes=2)
    images = jnp.zeros((2, 16, 16, 3))
    variables = jax.jit(lambda k1, k2: model.init({"params": k1, "anneal": k2}, images, mask_probs=jnp.ones(1)))(
        jax.random.key(0), jax.random.key(1))
    rng = np.random.default_rng(0)
    mask_logits = jnp.asarray(rng.normal(size=(2, 3, 8, 8)), jnp.float32)  # stride 2: 2x the 4x4 grid
    tokens = 3 + 2 + 16  # queries, cls + register, patches
    attention_mask = jax.jit(lambda keep: model.apply(variables, mask_logits, (4, 4), keep, tokens,
                                                      method=EoMT._attention_mask, rngs={"anneal": jax.random.key(2)}))
    call = lambda keep: np.asarray(attention_mask(jnp.float32(keep)))
    mask = call(1.0)[:, 0]
    # bilinear 8x8 -> 4x4 with half-pixel centres = the mean of each 2x2 cell
    pooled = np.asarray(mask_logits).reshape(2, 3, 4, 2, 4, 2).mean((3, 5)).reshape(2, 3, 16)
    np.testing.assert_array_equal(mask[:, :3, 5:], pooled > 0)
    assert mask[:, :3, :5].all() and mask[:, 3:].all()  # queries see queries + prefix; other rows see everything
    assert call(0.0).all()  # probability 0: every query's mask is dropped


def test_masked_decoder_empty_mask_rules_against_plain_cross_attention():
    # Mask logits = (mask embedding) . (pixel features). With positive features, a zero last mask layer gives
    # logits 0 = sigmoid 0.5, inside (Mask2Former blocks iff < 0.5): every query sees every pixel. A bias of -1 gives
    # logits < 0 everywhere: every mask is empty, and Mask2Former's rule (attend to all) sees every pixel too. Both
    # must equal plain cross-attention; maskjax's 'attend_none' rule must differ from it and stay finite.
    rng = np.random.default_rng(0)
    levels = [jnp.asarray(np.abs(rng.normal(size=(2, s, s, 8))), jnp.float32) for s in (2, 4)]
    mask_features = jnp.asarray(np.abs(rng.normal(size=(2, 4, 4, 8))) + 0.1, jnp.float32)
    masked = MaskedAttentionDecoder(3, num_queries=4, num_heads=2, mlp_dim=16, num_layers=3)
    params = meta.unbox(jax.jit(masked.init)(jax.random.key(0), levels, mask_features)["params"])
    last = params["mask_head"]["mask_mlp_2"]
    last["kernel"] = jnp.zeros_like(last["kernel"])
    run = {rule: jax.jit(masked.clone(empty_mask_rule=rule).apply) for rule in ("attend_all", "attend_none")}
    plain = jax.jit(masked.clone(masked_attention=False).apply)({"params": params}, levels, mask_features)[0]
    for bias in (0.0, -1.0):
        last["bias"] = jnp.full_like(last["bias"], bias)
        np.testing.assert_allclose(run["attend_all"]({"params": params}, levels, mask_features)[0], plain,
                                   atol=1e-5)
    none = run["attend_none"]({"params": params}, levels, mask_features)[0]  # bias -1: every row empty
    assert np.isfinite(np.asarray(none)).all() and np.abs(np.asarray(none) - np.asarray(plain)).max() > 1e-3


def test_random_resized_crop_moves_image_and_maps_together():
    size = 16
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coord_map = jnp.asarray((yy * size + xx)[None], jnp.int32)
    image = jnp.asarray(np.stack([yy, xx, yy * 0], -1)[None], jnp.float32)
    out_image, (out_map,) = random_resized_crop(jax.random.key(3), image, [coord_map], scale=(0.3, 0.6),
                                                ratio=(0.75, 1.33))
    out_map = np.asarray(out_map[0])
    # the map holds a source pixel index, the image bilinear source coordinates: they agree to half a pixel
    np.testing.assert_allclose(np.asarray(out_image[0, ..., 0]), out_map // size, atol=1.0)
    np.testing.assert_allclose(np.asarray(out_image[0, ..., 1]), out_map % size, atol=1.0)
    assert len(np.unique(out_map)) < size * size  # a real crop, resized up


def small_config(head="eomt", **overrides):
    task = "semantic_segmentation" if head == "perpixel" else "segmentation"
    c = base_config(task, head)
    override(c, model__variant="mu/8", data__image_size=16)
    if head != "perpixel":
        override(c, model__num_queries=10, segmentation__num_points=32)
    if head == "eomt":
        c.model.num_mask_blocks = 1
    if head == "mask2former":
        override(c, model__decoder_dim=16, model__decoder_heads=2, model__decoder_mlp_dim=32, model__decoder_layers=2,
                 model__pyramid_scales=(0.5, 1.0), model__mask_scale=2.0)
    return override(c, **overrides)


# The set loss is shared by both mask heads (one suffices; the Mask2Former-style head trains in the config tests).
@pytest.mark.parametrize("head", ["eomt", "perpixel"])
def test_loss_is_finite_when_a_crop_empties_every_mask(head):
    # EoMT with ReMaX's relaxations on: no known pixel for the semantic head nor for ReClass's class areas.
    c = small_config(head, **({"segmentation__remask": True, "segmentation__reclass_eta": 0.1}
                              if head == "eomt" else {}))
    task = make_task(c)
    batch = {"image": jnp.zeros((2, 16, 16, 3)), "semantic": jnp.full((2, 16, 16), -1, jnp.int32),
             "instance": jnp.zeros((2, 16, 16), jnp.int32)}
    params = meta.unbox(jax.jit(task.init)(jax.random.key(0), batch))["params"]
    loss, grads = jax.jit(jax.value_and_grad(lambda p: task.loss(p, batch, jax.random.key(1), True,
                                                                 jnp.int32(0))[0]))(params)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    if head == "eomt":
        assert "semantic_head" in grads


def test_bad_input_is_named_before_compute():
    with pytest.raises(ValueError, match="reclass_eta=1.5"):
        validate(small_config(segmentation__reclass_eta=1.5), 1)
    with pytest.raises(ValueError, match="deep_supervision"):
        validate(small_config(segmentation__remask=True, segmentation__deep_supervision=False), 1)
    with pytest.raises(ValueError, match="num_queries=6"):
        validate(small_config(model__num_queries=6), 1)  # 5 stuff + 4 instances > 6 queries
    for key in ("object_mask_threshold", "overlap_threshold"):
        with pytest.raises(ValueError, match=f"segmentation.{key}=1.5"):
            validate(small_config(**{f"segmentation__{key}": 1.5}), 1)
    with pytest.raises(ValueError, match="unknown model"):
        base_config("segmentation", "maskformer")
    with pytest.raises(ValueError, match="scan_layers=True: EoMT runs its encoder in two ranges"):
        validate(small_config(model__scan_layers=True), 1)
    task = make_task(small_config())
    batch = {"image": jnp.zeros((1, 16, 16, 3)), "semantic": jnp.zeros((1, 8, 8), jnp.int32),
             "instance": jnp.zeros((1, 16, 16), jnp.int32)}
    with pytest.raises(ValueError, match=r"'semantic' has shape \(1, 8, 8\)"):
        task.loss(None, batch, jax.random.key(0))

    class Source(list):
        pass
    bad = Source([{"image": np.zeros((16, 16, 3), np.uint8), "semantic": np.full((16, 16), 20, np.int32),
                   "instance": np.zeros((16, 16), np.int32)}])
    with pytest.raises(ValueError, match="semantic id 20"):
        task.check_data(bad)
    many = Source([{"image": np.zeros((16, 16, 3), np.uint8), "semantic": np.full((16, 16), 7, np.int32),
                    "instance": np.full((16, 16), 9, np.int32)}])
    with pytest.raises(ValueError, match="max_instances=4.*up to 9 instances"):
        task.check_data(many)


def test_segment_command_writes_overlays_and_predictions(tmp_path):
    import subprocess
    import sys

    from maskjax.train.config import load_config_file
    from maskjax.train.trainer import Trainer

    c = load_config_file("configs/perpixel_builtin.py").get_config("runlocal")
    c = override(c, total_steps=2, checkpoint_every=2, progress_bar=False, async_checkpointing=False,
                 data__num_threads=0, evals__eval__every=-1, evals__predictions__every=-1, optimizer__warmup_steps=1)
    workdir = str(tmp_path / "run")
    Trainer(c, workdir).run()
    from PIL import Image
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    # One run of the command (each costs an import of jax and a compile): an image file and, with --num, nothing
    # else; the eval-split path shares everything after the batch is read.
    for extra, count in (([f"--images={tmp_path / 'a.png'}"], 1),):
        out = tmp_path / f"out{count}"
        done = subprocess.run([sys.executable, "-m", "maskjax.segment", f"--workdir={workdir}", f"--out={out}",
                               *extra], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        predictions = np.load(out / "predictions.npz")
        assert predictions["semantic"].shape == (count, 32, 32)
        assert ((predictions["semantic"] >= 0) & (predictions["semantic"] < 15)).all()
        assert Image.open(out / "overlay.png").size[0] > 0
    bad = subprocess.run([sys.executable, "-m", "maskjax.segment", f"--workdir={workdir}", "--images=nope.png"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--images: no file 'nope.png'" in bad.stderr
