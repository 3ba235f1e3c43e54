"""The segmentation models' fast layers equal the Flax layers whose parameters they share."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskjax.models.segmentation import Deconv2x, DepthwiseConv3x3, detr_sine_posemb


def _perturbed(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: a + 0.1 * jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)


def test_deconv2x_equals_flax_conv_transpose():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 5)), jnp.float32)
    reference = nn.ConvTranspose(6, (2, 2), strides=(2, 2))
    params = _perturbed(reference.init(jax.random.key(0), x), 1)  # non-zero bias too
    np.testing.assert_allclose(Deconv2x(6).apply(params, x), reference.apply(params, x), atol=1e-5)


def test_depthwise_conv_equals_flax_grouped_conv():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 4, 6)), jnp.float32)
    reference = nn.Conv(6, (3, 3), padding=1, feature_group_count=6, use_bias=False)
    params = reference.init(jax.random.key(3), x)
    np.testing.assert_allclose(DepthwiseConv3x3().apply(params, x), reference.apply(params, x), atol=1e-5)


def test_detr_sine_posemb_written_out():
    # DETR: y, x in 1..n scaled by 2 pi / n; channel 2k = sin(pos / T^(2k / F)), 2k+1 = cos(pos / T^(2k / F)).
    height, width, dim = 3, 5, 8
    table = np.asarray(detr_sine_posemb(height, width, dim)).reshape(height, width, dim)
    feats = dim // 2
    for i in range(height):
        for j in range(width):
            for half, pos in ((0, (i + 1) / height * 2 * np.pi), (1, (j + 1) / width * 2 * np.pi)):
                for k in range(feats):
                    angle = pos / 10000 ** (2 * (k // 2) / feats)
                    want = np.sin(angle) if k % 2 == 0 else np.cos(angle)
                    assert abs(table[i, j, half * feats + k] - want) < 1e-5
