"""Attention settings of the ViT from config: token masks on the patch grid, approx layers, bounded logits, the
max-|logit| record. References are numpy masks, the exact (reference-backend) model and jax.grad."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.models import ViT, decode_variant
from maskjax.models.attention_options import AttentionOptions, TokenMaskSpec
from maskjax.tasks.classification import ClassificationTask, vit_from_config
from maskjax.train.config import base_config, validate

GRID = 4  # 16x16 images, patch 4


def vit(**overrides) -> ViT:
    kwargs = dict(decode_variant("mu/4"), num_classes=5, head_zero_init=False)
    kwargs.update(overrides)
    return ViT(**kwargs)


def images(batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, 16, 16, 3)).astype(np.float32)


def params_of(model, x, seed=1):
    return nn.meta.unbox(model.init(jax.random.key(seed), x))["params"]


def coords(num_prefix):
    """Row/col of every token (-1 for prefix tokens), row order."""
    rows = np.concatenate([-np.ones(num_prefix, int), np.repeat(np.arange(GRID), GRID)])
    cols = np.concatenate([-np.ones(num_prefix, int), np.tile(np.arange(GRID), GRID)])
    return rows, cols


def np_with_prefix(grid_part, num_prefix, prefix_sees_grid=True, grid_sees_prefix=True):
    rows, _ = coords(num_prefix)
    pre = rows < 0
    out = grid_part & ~pre[:, None] & ~pre[None, :]
    out |= pre[:, None] & pre[None, :]
    if prefix_sees_grid:
        out |= pre[:, None] & ~pre[None, :]
    if grid_sees_prefix:
        out |= ~pre[:, None] & pre[None, :]
    return out


def np_window(radius, num_prefix, **prefix):
    rows, cols = coords(num_prefix)
    part = (np.abs(rows[:, None] - rows[None, :]) <= radius) & (np.abs(cols[:, None] - cols[None, :]) <= radius)
    return np_with_prefix(part, num_prefix, **prefix)


def np_partition(window, shift, num_prefix):
    rows, cols = coords(num_prefix)
    r, c = (rows + shift) // window, (cols + shift) // window
    return np_with_prefix((r[:, None] == r[None, :]) & (c[:, None] == c[None, :]), num_prefix)


@pytest.mark.parametrize("prefix", [dict(), dict(prefix_sees_grid=False), dict(grid_sees_prefix=False)])
def test_window_2d_token_mask_equals_the_numpy_mask(prefix):
    x = images()
    masked = vit(token_mask=TokenMaskSpec(kind="window_2d", radius=(1, 1), **prefix), num_registers=1)
    plain = vit(num_registers=1)
    params = params_of(plain, x)
    dense = np_window(1, num_prefix=2, **prefix)
    got, _ = masked.apply({"params": params}, x)
    want, _ = plain.apply({"params": params}, x, mask=dense[None, None])
    unmasked, _ = plain.apply({"params": params}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(unmasked)).max() > 1e-4  # the mask changes the result


def test_shifted_swin_masks_alternate_per_block():
    x = images()
    model = vit(token_mask=TokenMaskSpec(kind="swin", window=(2, 2), shifted=True))
    plain = vit()
    params = params_of(plain, x)
    per_block = [np_partition(2, 0, 1)[None, None], np_partition(2, 1, 1)[None, None]]
    got = model.apply({"params": params}, x)[1]["encoded"]  # patch tokens: the cls output cannot tell
    want = plain.apply({"params": params}, x, mask=per_block)[1]["encoded"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    unshifted = plain.apply({"params": params}, x, mask=[per_block[0]] * 2)[1]["encoded"]
    assert np.abs(np.asarray(got) - np.asarray(unshifted)).max() > 1e-4


def test_token_mask_is_combined_with_a_mask_argument():
    x = images()
    model = vit(token_mask=TokenMaskSpec(kind="window_2d", radius=(2, 2)))
    plain = vit()
    params = params_of(plain, x)
    keys_hidden = np.ones((1, 1, 1, 17), bool)
    keys_hidden[..., 5:9] = False
    got, _ = model.apply({"params": params}, x, mask=keys_hidden)
    want, _ = plain.apply({"params": params}, x, mask=np_window(2, 1)[None, None] & keys_hidden)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def loss_fn(model, x, labels):
    def loss(params):
        logits, _ = model.apply({"params": params}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
    return loss


def cosine(a, b):
    a, b = np.concatenate([np.ravel(t) for t in jax.tree.leaves(a)]), np.concatenate([np.ravel(t) for t in jax.tree.leaves(b)])
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_exact_fwd_layer_keeps_the_forward_and_approximates_the_gradient():
    x, labels = images(4), jnp.arange(4) % 5
    exact = vit(attention=AttentionOptions(backend="reference", logit_bound=1.0))
    approx = vit(attention=AttentionOptions(backend="reference", approx_layers=(1,), approx_mode="exact_fwd",
                                            logit_bound=1.0))
    params = params_of(exact, x)
    np.testing.assert_allclose(approx.apply({"params": params}, x)[0], exact.apply({"params": params}, x)[0],
                               rtol=1e-5, atol=1e-6)
    g_exact = jax.grad(loss_fn(exact, x, labels))(params)
    g_approx = jax.grad(loss_fn(approx, x, labels))(params)
    assert cosine(g_exact, g_approx) > 0.999
    # the first block's query kernel only gets gradient through the approximate second block
    assert not np.allclose(g_exact["encoder"]["block_0"]["attn"]["query"]["kernel"],
                           g_approx["encoder"]["block_0"]["attn"]["query"]["kernel"], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("bound, max_err", [(1.0, 2e-2), (4.0, None)])
def test_lowrank_model_is_close_to_exact_when_logits_are_bounded(bound, max_err):
    x = images(4)
    exact = vit(attention=AttentionOptions(backend="reference", logit_bound=bound))
    approx = vit(attention=AttentionOptions(backend="approx", logit_bound=bound))
    params = params_of(exact, x)
    err = float(np.abs(np.asarray(approx.apply({"params": params}, x)[1]["encoded"])
                       - np.asarray(exact.apply({"params": params}, x)[1]["encoded"])).max())
    if max_err is not None:
        assert err < max_err
    else:
        assert err > 0  # at bound 4 the degree-2 kernel is visibly different; it must stay finite
        assert np.isfinite(err)


def test_record_max_logit_matches_the_captured_queries_and_keys():
    x = images(3)
    for options, scale in ((AttentionOptions(record_max_logit=True), 16 ** -0.5),
                           (AttentionOptions(record_max_logit=True, logit_bound=2.0), 1.0)):
        model = vit(attention=options)
        params = params_of(model, x)
        (_, _), state = model.apply({"params": params}, x, mutable=["intermediates"],
                                    capture_intermediates=True)
        inter = state["intermediates"]["encoder"]
        for block in ("block_0", "block_1"):
            attn = inter[block]["attn"]
            if options.logit_bound:
                q, k = attn["logit_scale"]["__call__"][0]
            else:
                q, k = attn["query"]["__call__"][0], attn["key"]["__call__"][0]
            want = np.abs(np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))).max()
            np.testing.assert_allclose(attn["max_abs_logit"][0], want * scale, rtol=1e-5)
            if options.logit_bound:
                assert attn["max_abs_logit"][0] <= options.logit_bound


def test_config_builds_the_model_settings_and_the_loss_reports_logits():
    c = base_config()
    c.model.variant, c.data.image_size = "mu/4", 16
    c.model.attention.update(backend="blocked", approx_layers=(1,), approx_mode="paper", logit_bound=2.5,
                             record_max_logit=True)
    validate(c, num_devices=8)
    model = vit_from_config(c.model)
    assert model.attention == AttentionOptions(backend="blocked", approx_layers=(1,), approx_mode="paper",
                                               logit_bound=2.5, record_max_logit=True)
    assert model.attention.for_layer(1, 2).backend == "approx" and model.attention.for_layer(0, 2).backend == "blocked"
    task = ClassificationTask(c)
    batch = {"image": jnp.asarray(images(2)), "label": jnp.array([0, 1])}
    params = nn.meta.unbox(task.init(jax.random.key(0), batch))["params"]
    _, metrics = task.loss(params, batch, jax.random.key(1), train=False)
    assert set(metrics) == {"accuracy", "max_abs_logit", "max_abs_logit/block_0", "max_abs_logit/block_1"}
    assert float(metrics["max_abs_logit"]) == max(float(metrics["max_abs_logit/block_0"]),
                                                  float(metrics["max_abs_logit/block_1"])) <= 2.5

    c.model.attention.update(backend="auto", approx_layers=(), mask="window_2d", radius=(2, 1), shifted=False)
    assert vit_from_config(c.model).token_mask == TokenMaskSpec(kind="window_2d", radius=(2, 1), shifted=False)


@pytest.mark.parametrize("key, value, message", [
    ("backend", "flash", "backend='flash'"),
    ("approx_degree", 3, "approx_degree=3"),
    ("mask", "diagonal", "kind='diagonal'"),
    ("approx_layers", (2,), "model.attention.approx_layers=(2,)"),
    ("directions", (0.0,), "model.attention.directions=(0.0,)"),
    ("logit_bound", -1.0, "logit_bound=-1.0"),
])
def test_bad_attention_config_is_named_before_compute(key, value, message):
    c = base_config()
    c.model.variant = "mu/4"
    if key == "approx_layers":
        c.model.attention.backend = "blocked"
    if key == "directions":
        c.model.attention.mask = "directional_2d"
    c.model.attention[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(c, num_devices=8)


def test_spatial_mask_with_approx_layers_is_rejected():
    c = base_config()
    c.model.attention.update(backend="approx", mask="window_2d")
    with pytest.raises(ValueError, match=re.escape("model.attention.mask='window_2d'")):
        validate(c, num_devices=8)
    with pytest.raises(ValueError, match="cannot be used with approx"):
        vit(attention=AttentionOptions(backend="approx"), token_mask=TokenMaskSpec(kind="swin")).init(
            jax.random.key(0), images())
