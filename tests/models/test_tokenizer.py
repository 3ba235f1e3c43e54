"""The image tokenizer: FSQ and VQ against independent numpy computations, straight-through gradients, the
downsampling factor and bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.models.tokenizer import FSQ, Tokenizer, VectorQuantizer, fsq_bound, fsq_codes_to_ids, fsq_ids_to_codes


def test_fsq_rounding_gives_exactly_the_levels_and_a_bijection():
    levels = (8, 5, 5, 3)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(20000, 4)) * 3, jnp.float32)
    codes = np.round(np.asarray(fsq_bound(z, levels)))
    for i, level in enumerate(levels):
        assert set(np.unique(codes[:, i]).astype(int)) == set(range(-(level // 2), level - level // 2))
    all_codes = np.array(list(itertools.product(*[range(-(L // 2), L - L // 2) for L in levels])))
    ids = np.asarray(fsq_codes_to_ids(jnp.asarray(all_codes), levels))
    assert sorted(ids.tolist()) == list(range(int(np.prod(levels))))
    np.testing.assert_array_equal(np.asarray(fsq_ids_to_codes(jnp.asarray(ids), levels)), all_codes)
    # Mixed radix, first dimension least significant (the FSQ paper's `codes_to_indexes`).
    digits = all_codes + np.array(levels) // 2
    want = digits[:, 0] + 8 * digits[:, 1] + 40 * digits[:, 2] + 200 * digits[:, 3]
    np.testing.assert_array_equal(ids, want)


def test_fsq_bound_maps_zero_to_zero_for_odd_levels_and_is_monotone():
    z = jnp.linspace(-6, 6, 101)[:, None] * jnp.ones((1, 2))
    bounded = np.asarray(fsq_bound(z, (7, 5)))
    assert np.all(np.diff(bounded, axis=0) > 0)
    np.testing.assert_allclose(bounded[50], 0.0, atol=1e-6)
    assert np.abs(bounded[:, 0]).max() < 3 and np.abs(bounded[:, 1]).max() < 2


def test_fsq_straight_through_gradient_and_ids():
    fsq = FSQ(levels=(5, 5, 5), embedding_dim=6)
    z = jax.random.normal(jax.random.key(0), (4, 7, 6))
    params = fsq.init(jax.random.key(1), z)
    out, ids, aux = fsq.apply(params, z)
    assert out.shape == (4, 7, 6) and ids.shape == (4, 7) and float(aux["quantizer_loss"]) == 0.0
    np.testing.assert_allclose(fsq.apply(params, ids, method=fsq.embed_ids), out, atol=1e-5)
    grad = jax.grad(lambda z: jnp.sum(fsq.apply(params, z)[0] ** 2))(z)
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).sum() > 0


def test_vq_picks_the_nearest_code_and_its_losses():
    vq = VectorQuantizer(codebook_size=17, commitment_cost=0.25)
    z = jax.random.normal(jax.random.key(2), (3, 5, 8))
    params = vq.init(jax.random.key(3), z)
    codebook = np.asarray(params["params"]["codebook"].unbox())
    quantized, ids, aux = vq.apply(params, z)
    flat = np.asarray(z).reshape(-1, 8)
    want = ((flat[:, None] - codebook[None]) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(np.asarray(ids).reshape(-1), want)
    np.testing.assert_allclose(np.asarray(quantized).reshape(-1, 8), codebook[want], atol=1e-5)
    mse = ((flat - codebook[want]) ** 2).mean()
    np.testing.assert_allclose(float(aux["quantizer_loss"]), 1.25 * mse, rtol=1e-5)
    # Straight-through: d sum(quantized) / dz = 1 everywhere.
    grad = jax.grad(lambda z: jnp.sum(vq.apply(params, z)[0]))(z)
    np.testing.assert_allclose(np.asarray(grad), 1.0)


def test_vq_l2_normalized_uses_cosine_similarity():
    vq = VectorQuantizer(codebook_size=9, l2_normalize=True)
    z = jax.random.normal(jax.random.key(4), (20, 6))
    params = vq.init(jax.random.key(5), z)
    codebook = np.asarray(params["params"]["codebook"].unbox())
    _, ids, _ = vq.apply(params, z)
    cosine = (np.asarray(z) / np.linalg.norm(z, axis=-1, keepdims=True)) @ (
        codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)).T
    np.testing.assert_array_equal(np.asarray(ids), cosine.argmax(-1))


def test_dead_code_pull_moves_unused_codes_only():
    vq = VectorQuantizer(codebook_size=64, dead_code_weight=1.0)
    z = jax.random.normal(jax.random.key(6), (10, 4)) + 5.0  # far from every code: few codes are used
    params = vq.init(jax.random.key(7), z)
    _, ids, _ = vq.apply(params, z)
    grad = jax.grad(lambda p: vq.apply(p, z, train=True, rngs={"quantizer": jax.random.key(8)})[2]["quantizer_loss"])(
        params)["params"]["codebook"].unbox()
    used = np.zeros(64, bool)
    used[np.asarray(ids)] = True
    assert np.all(np.abs(np.asarray(grad))[~used].sum(-1) > 0)


@pytest.mark.parametrize("quantizer,multipliers", [("fsq", (1, 2, 2)), ("vq", (1, 2))])
def test_tokenizer_shapes_and_decode_ids(quantizer, multipliers):
    tok = Tokenizer(quantizer=quantizer, codebook_size=32, fsq_levels=(4, 4), embedding_dim=8, filters=8,
                    channel_multipliers=multipliers, norm_groups=4, channels=1)
    images = jax.random.uniform(jax.random.key(9), (2, 16, 16, 1), minval=-1, maxval=1)
    params = tok.init(jax.random.key(10), images)
    reconstruction, aux = tok.apply(params, images)
    f = 2 ** (len(multipliers) - 1)
    assert reconstruction.shape == images.shape and aux["ids"].shape == (2, 16 // f, 16 // f)
    ids = tok.apply(params, images, method=tok.encode)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(aux["ids"]))
    np.testing.assert_allclose(tok.apply(params, ids, method=tok.decode_ids), reconstruction, atol=1e-4)
    assert int(ids.max()) < tok.vocab_size


def test_tokenizer_refuses_an_image_size_it_cannot_downsample():
    tok = Tokenizer(channel_multipliers=(1, 2, 2), filters=8, norm_groups=4, embedding_dim=4, channels=1)
    with pytest.raises(ValueError, match="image size 18x18 is not a multiple of the downsampling factor 4"):
        tok.init(jax.random.key(0), jnp.zeros((1, 18, 18, 1)))
