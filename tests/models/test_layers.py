"""Layers against independent references: numpy formulas, scipy and jax.nn.dot_product_attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from maskjax.models import layers


def _numpy_layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


# --- sin-cos position embedding: MAE's numpy code (facebookresearch/mae util/pos_embed.py), generalised to h x w.

def _mae_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_2d(embed_dim, h, w):
    grid_h = np.arange(h, dtype=np.float32)
    grid_w = np.arange(w, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, h, w])
    emb_h = _mae_1d(embed_dim // 2, grid[0])
    emb_w = _mae_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


@pytest.mark.parametrize("h, w, width", [(4, 4, 32), (3, 5, 16), (14, 14, 192)])
def test_posemb_sincos_matches_mae_formula(h, w, width):
    got = np.asarray(layers.posemb_sincos_2d(h, w, width))
    assert got.shape == (1, h * w, width)
    np.testing.assert_allclose(got[0], _mae_2d(width, h, w), atol=1e-6)


def test_posemb_sincos_rejects_width_not_divisible_by_four():
    with pytest.raises(ValueError, match="width=30"):
        layers.posemb_sincos_2d(4, 4, 30)


# --- learned position embedding resizing.

def test_resize_posemb_identity_when_grid_unchanged():
    posemb = jnp.asarray(_normal(0, (1, 2 + 12, 8)))
    out = layers.resize_posemb(posemb, (3, 4), (3, 4), num_prefix_tokens=2)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(posemb))


@pytest.mark.parametrize("old_grid, new_grid", [((4, 4), (8, 8)), ((3, 5), (6, 7)), ((2, 2), (5, 3))])
def test_resize_posemb_bilinear_upsampling_matches_scipy_zoom(old_grid, new_grid):
    prefix, dim = 3, 6
    rng = np.random.default_rng(0)
    posemb = rng.normal(size=(1, prefix + old_grid[0] * old_grid[1], dim)).astype(np.float32)
    out = np.asarray(layers.resize_posemb(jnp.asarray(posemb), old_grid, new_grid, num_prefix_tokens=prefix))
    assert out.shape == (1, prefix + new_grid[0] * new_grid[1], dim)
    np.testing.assert_array_equal(out[0, :prefix], posemb[0, :prefix])  # Prefix embeddings kept as they are.
    # Half-pixel bilinear interpolation with edge clamping = scipy's linear zoom in grid mode with 'nearest' edges.
    grid = posemb[0, prefix:].reshape(*old_grid, dim).astype(np.float64)
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1.0)
    expected = scipy.ndimage.zoom(grid, zoom, order=1, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(out[0, prefix:].reshape(*new_grid, dim), expected, atol=1e-5)


def test_resize_posemb_bicubic_keeps_constant_fields():
    posemb = jnp.full((1, 1 + 9, 4), 0.7)
    out = layers.resize_posemb(posemb, (3, 3), (5, 4), num_prefix_tokens=1, method="bicubic")
    assert out.shape == (1, 1 + 20, 4)
    np.testing.assert_allclose(np.asarray(out), 0.7, atol=1e-6)


def test_resize_posemb_errors_name_the_bad_value():
    posemb = jnp.zeros((1, 10, 4))
    with pytest.raises(ValueError, match="has 10 tokens"):
        layers.resize_posemb(posemb, (4, 4), (8, 8))
    with pytest.raises(ValueError, match="'nearest'"):
        layers.resize_posemb(posemb, (3, 3), (8, 8), num_prefix_tokens=1, method="nearest")


# --- multi-head attention against jax.nn.dot_product_attention on the same projected q/k/v.

def _project(x, p):
    return np.einsum("bld,dhk->blhk", x, np.asarray(p["kernel"], np.float64)) + np.asarray(p["bias"], np.float64)


def _reference_mha(params, x_q, x_kv, mask=None, bias=None, qk_norm_eps=None):
    q, k, v = (_project(x, params[name]) for x, name in ((x_q, "query"), (x_kv, "key"), (x_kv, "value")))
    if qk_norm_eps is not None:
        q = _numpy_layer_norm(q, np.asarray(params["query_norm"]["scale"]), np.asarray(params["query_norm"]["bias"]),
                              qk_norm_eps)
        k = _numpy_layer_norm(k, np.asarray(params["key_norm"]["scale"]), np.asarray(params["key_norm"]["bias"]),
                              qk_norm_eps)
    out = jax.nn.dot_product_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                       jnp.asarray(v, jnp.float32), bias=bias, mask=mask)
    out = np.einsum("blhk,hkd->bld", np.asarray(out, np.float64), np.asarray(params["out"]["kernel"], np.float64))
    return out + np.asarray(params["out"]["bias"], np.float64)


def _normal(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _random_params(module, *inputs, seed=0):
    """Random values for every parameter (zero-initialised biases are exercised too); shapes from eval_shape."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)
    leaves, tree = jax.tree.flatten(nn.meta.unbox(shapes)["params"])
    return jax.tree.unflatten(tree, [_normal(seed + i, leaf.shape, 0.3) for i, leaf in enumerate(leaves)])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_self_attention_matches_dot_product_attention(qk_norm):
    x = _normal(0, (2, 7, 12))
    module = layers.MultiHeadAttention(num_heads=3, qk_norm=qk_norm)
    params = _random_params(module, x)
    assert params["query"]["kernel"].shape == (12, 3, 4)
    assert params["out"]["kernel"].shape == (3, 4, 12)
    got = jax.jit(module.apply)({"params": params}, x)
    x64 = np.asarray(x, np.float64)
    expected = _reference_mha(params, x64, x64, qk_norm_eps=1e-6 if qk_norm else None)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, rtol=2e-5)


def test_cross_attention_with_mask_and_bias_matches_dot_product_attention():
    x_q, x_kv, bias = _normal(0, (2, 5, 8)), _normal(1, (2, 9, 6)), _normal(3, (1, 2, 5, 9))
    mask = np.random.default_rng(2).random((2, 2, 5, 9)) < 0.6
    mask[..., 0] = True  # No empty rows (dot_product_attention returns mean(V) there).
    module = layers.MultiHeadAttention(num_heads=2, qkv_features=8, out_features=10)
    params = _random_params(module, x_q, x_kv)
    assert params["key"]["kernel"].shape == (6, 2, 4)
    got = jax.jit(lambda p, q, kv, m, b: module.apply({"params": p}, q, kv, mask=m, bias=b))(
        params, x_q, x_kv, mask, bias)
    assert got.shape == (2, 5, 10)
    expected = _reference_mha(params, np.asarray(x_q, np.float64), np.asarray(x_kv, np.float64), mask=mask, bias=bias)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, rtol=2e-5)


def test_attention_rejects_qkv_features_not_divisible_by_heads():
    with pytest.raises(ValueError, match="qkv_features=10"):
        layers.MultiHeadAttention(num_heads=3).init(jax.random.key(0), jnp.zeros((1, 2, 10)))


# --- MLP block.

@pytest.mark.parametrize("approximate", [False, True])
def test_mlp_block_matches_numpy(approximate):
    x = _normal(0, (2, 3, 6))
    module = layers.MlpBlock(mlp_dim=10, approximate_gelu=approximate)
    params = _random_params(module, x)
    h = np.asarray(x, np.float64) @ np.asarray(params["fc1"]["kernel"]) + np.asarray(params["fc1"]["bias"])
    if approximate:
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    else:
        h = h * 0.5 * (1 + scipy.special.erf(h / np.sqrt(2)))
    expected = h @ np.asarray(params["fc2"]["kernel"]) + np.asarray(params["fc2"]["bias"])
    np.testing.assert_allclose(np.asarray(jax.jit(module.apply)({"params": params}, x)), expected, atol=1e-5, rtol=1e-5)


# --- stochastic depth.

def test_drop_path_is_identity_in_eval():
    x = _normal(0, (64, 4, 3))
    out = layers.DropPath(rate=0.5).apply({}, x, train=False)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_drop_path_drops_whole_examples_at_the_expected_rate(rate):
    n = 8000
    x = jnp.ones((n, 5, 2))
    out = np.asarray(layers.DropPath(rate=rate).apply({}, x, train=True, rngs={"drop_path": jax.random.key(1)}))
    per_example = out.reshape(n, -1)
    # Each example is either entirely dropped or entirely kept and rescaled by 1 / keep_prob.
    kept = np.all(per_example == np.float32(1 / (1 - rate)), axis=1)
    dropped = np.all(per_example == 0, axis=1)
    assert np.all(kept | dropped)
    keep_rate = kept.mean()
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(keep_rate - (1 - rate)) < 5 * sigma, (keep_rate, 1 - rate)
    # Different keys drop different examples.
    other = np.asarray(layers.DropPath(rate=rate).apply({}, x, train=True, rngs={"drop_path": jax.random.key(2)}))
    assert not np.array_equal(out, other)


def test_drop_path_rates_rise_linearly_to_the_last_block():
    rates = layers.drop_path_rates(0.3, 4)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    np.testing.assert_allclose(np.diff(rates), 0.1, atol=1e-12)
    assert layers.drop_path_rates(0.3, 1) == [0.0]


# --- patch embedding.

def test_patch_embed_matches_numpy_patch_projection():
    images = _normal(0, (2, 8, 12, 3))
    module = layers.PatchEmbed(width=5, patch_size=(4, 2))
    params = _random_params(module, images)
    got = np.asarray(jax.jit(module.apply)({"params": params}, images))
    assert got.shape == (2, 2 * 6, 5)
    x = np.asarray(images, np.float64).reshape(2, 2, 4, 6, 2, 3)  # [b, gh, ph, gw, pw, c]
    kernel = np.asarray(params["conv"]["kernel"], np.float64)  # [ph, pw, c, width]
    expected = np.einsum("bipjqc,pqcd->bijd", x, kernel) + np.asarray(params["conv"]["bias"])
    np.testing.assert_allclose(got, expected.reshape(2, 12, 5), atol=1e-5, rtol=1e-5)


def test_patch_embed_rejects_indivisible_images():
    with pytest.raises(ValueError, match=r"\(10, 12\).*\(4, 4\)"):
        layers.PatchEmbed(width=5, patch_size=4).init(jax.random.key(0), jnp.zeros((1, 10, 12, 3)))


def test_layer_scale_starts_at_its_init_value():
    x = _normal(0, (2, 3, 4))
    module = layers.LayerScale(init_value=0.25)
    variables = module.init(jax.random.key(1), x)
    np.testing.assert_allclose(np.asarray(module.apply(variables, x)), 0.25 * np.asarray(x), rtol=1e-6)
