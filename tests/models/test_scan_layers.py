"""Blocks under nn.scan (`model.scan_layers`) and remat policies: the scanned encoder is the unrolled one with its
parameters stacked; every remat policy changes memory, never values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.models.layers import (REMAT_POLICIES, DropPath, Encoder, params_layout, scan_layout,
                                   unrolled_layout)
from maskjax.models.vit import ViT

KW = dict(depth=3, mlp_dim=32, num_heads=2, layer_scale_init=0.1)


def _unrolled_params(x, **kw):
    return jax.tree.map(np.asarray, nn.unbox(Encoder(**KW, **kw).init(jax.random.key(1), x)["params"]))


@pytest.mark.parametrize("remat,policy", [(False, "nothing_saveable"), (True, "nothing_saveable"),
                                          (True, "dots_saveable"), (True, "minimal")])
def test_scanned_encoder_equals_unrolled_values_and_gradients(remat, policy):
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    unrolled = _unrolled_params(x)
    scanned = scan_layout(unrolled)
    assert params_layout(unrolled) == "unrolled" and params_layout(scanned) == "scanned"
    assert scanned["blocks"]["mlp"]["fc1"]["kernel"].shape == (3, 16, 32)
    reference = Encoder(**KW)
    model = Encoder(**KW, scan_layers=True, remat=remat, remat_policy=policy)

    def loss(m, p):
        y, aux = m.apply({"params": p}, x)
        return jnp.sum(y ** 2) + jnp.sum(aux["block_1"])

    (want, want_grads), (got, got_grads) = (jax.value_and_grad(lambda p: loss(reference, p))(unrolled),
                                            jax.value_and_grad(lambda p: loss(model, p))(scanned))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Scan and unrolled sum in other orders: float32 rounding is relative to the largest gradient entries (leaves
    # such as the key kernels are near-cancelling sums, ~1e-6 here, whose own relative error is large).
    scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(want_grads))
    for path, g in jax.tree_util.tree_flatten_with_path(unrolled_layout(jax.tree.map(np.asarray, got_grads)))[0]:
        expected = want_grads
        for key in path:
            expected = expected[key.key]
        np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))


def test_layout_conversion_round_trips_and_initialises_the_scanned_shapes():
    x = jnp.zeros((1, 4, 16))
    unrolled = _unrolled_params(x)
    back = unrolled_layout(scan_layout(unrolled))
    assert jax.tree.structure(back) == jax.tree.structure(unrolled)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(unrolled)))
    init = nn.unbox(Encoder(**KW, scan_layers=True).init(jax.random.key(1), x)["params"])
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, scan_layout(unrolled))
    spec = nn.get_partition_spec(Encoder(**KW, scan_layers=True).init(jax.random.key(1), x))
    assert tuple(spec["params"]["blocks"]["mlp"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")


def test_traced_drop_path_rate_equals_the_static_rate():
    x = jax.random.normal(jax.random.key(0), (64, 3, 4))
    rngs = {"drop_path": jax.random.key(5)}
    static = DropPath(0.3).apply({}, x, train=True, rngs=rngs)
    traced = DropPath(0.0).apply({}, x, train=True, rate=jnp.float32(0.3), rngs=rngs)
    np.testing.assert_array_equal(static, traced)
    kept = np.mean(np.any(np.asarray(static) != 0, axis=(1, 2)))
    assert 0.4 < kept < 0.95  # ~0.7 of the 64 examples kept


def test_scanned_blocks_get_their_own_drop_path_rates():
    """Rates rise from 0 at block 0: in training block 0 keeps every example (its output equals evaluation's), the
    last block (rate 0.9) drops most of them."""
    x = jax.random.normal(jax.random.key(0), (32, 4, 16))
    model = Encoder(**KW, drop_path_rate=0.9, scan_layers=True)
    params = model.init(jax.random.key(1), x)["params"]
    _, train_aux = model.apply({"params": params}, x, train=True, rngs={"drop_path": jax.random.key(2)})
    _, eval_aux = model.apply({"params": params}, x)
    np.testing.assert_allclose(train_aux["block_0"], eval_aux["block_0"], rtol=1e-6)
    delta = np.asarray(train_aux["block_2"] - train_aux["block_1"])
    dropped = np.mean(np.all(np.abs(delta) < 1e-7, axis=(1, 2)))
    assert dropped > 0.5  # both branches of the last block dropped for ~0.9 of the examples


def test_vit_scan_layers_equal_unrolled_and_bad_settings_are_named():
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    kw = dict(num_classes=5, patch_size=8, width=16, depth=2, mlp_dim=32, num_heads=2, head_zero_init=False)
    params = jax.tree.map(np.asarray, nn.unbox(ViT(**kw).init(jax.random.key(1), images)["params"]))
    want = ViT(**kw).apply({"params": params}, images)
    got = ViT(**kw, scan_layers=True, remat=True, remat_policy="minimal").apply({"params": scan_layout(params)},
                                                                                 images)
    np.testing.assert_allclose(jax.tree.leaves(got)[0], jax.tree.leaves(want)[0], rtol=1e-5, atol=1e-6)
    x = jnp.zeros((1, 4, 16))
    with pytest.raises(ValueError, match="remat_policy='everything'"):
        Encoder(**KW, remat=True, remat_policy="everything").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="blocks=\\(0, 1\\)"):
        Encoder(**KW, scan_layers=True).init(jax.random.key(0), x, blocks=(0, 1))
    with pytest.raises(ValueError, match="per-block masks"):
        masks = [jnp.ones((4, 4), bool), jnp.ones((4, 4), bool), jnp.eye(4, dtype=bool)]
        Encoder(**KW, scan_layers=True).init(jax.random.key(0), x, mask=masks)
    assert set(REMAT_POLICIES) == {"nothing_saveable", "dots_saveable", "minimal"}
