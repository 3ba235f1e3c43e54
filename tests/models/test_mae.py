"""MAE / mask-token models: patch bookkeeping against numpy loops, loss only on masked patches, visible-only
encoding equal to full encoding with an attention mask, gradients that never reach masked pixels, and a
short overfit."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskjax import masking
from maskjax.models import ViT
from maskjax.models.mae import MAE, masked_mse, normalize_patches, patch_targets, patchify, unpatchify


def encoder(**overrides):
    kwargs = dict(num_classes=None, patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2, posemb="sincos2d",
                  num_registers=1)
    kwargs.update(overrides)
    return ViT(**kwargs)


def mae(mode="mae", depth=1, **overrides):
    return MAE(encoder=encoder(**overrides), mode=mode, decoder_width=32, decoder_depth=depth, decoder_heads=2,
               decoder_mlp_dim=64)


def images(batch=2, size=16, channels=3, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(batch, size, size, channels)).astype(np.float32)


def test_patchify_matches_a_numpy_loop_and_inverts():
    x = images(2, 12, 3)[:, :, :8]  # 12 x 8 image, patch (3, 2): a 4 x 4 grid
    got = np.asarray(patchify(jnp.asarray(x), (3, 2)))
    want = np.zeros((2, 16, 3 * 2 * 3), np.float32)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                want[b, i * 4 + j] = x[b, 3 * i:3 * i + 3, 2 * j:2 * j + 2, :].reshape(-1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(unpatchify(jnp.asarray(got), (3, 2), (4, 4), 3), x)
    with pytest.raises(ValueError, match=re.escape("(12, 8) is not divisible by patch_size (5, 5)")):
        patchify(jnp.asarray(x), 5)


def test_norm_pix_target_and_masked_mse_match_numpy():
    x = images()
    target = np.asarray(patch_targets(jnp.asarray(x), 4, "norm_pixels"))
    p = np.asarray(patchify(jnp.asarray(x), 4), np.float64)
    want = (p - p.mean(-1, keepdims=True)) / np.sqrt(p.var(-1, keepdims=True, ddof=1) + 1e-6)
    np.testing.assert_allclose(target, want, rtol=1e-5, atol=1e-5)
    pred = np.random.default_rng(1).normal(size=target.shape).astype(np.float32)
    mask = np.random.default_rng(2).random(target.shape[:2]) < 0.6
    want_loss = ((pred - want) ** 2).mean(-1)[mask].mean()
    np.testing.assert_allclose(masked_mse(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)), want_loss,
                               rtol=1e-5)
    # visible patches do not count
    pred2 = np.where(mask[..., None], pred, 100.0)
    np.testing.assert_allclose(masked_mse(jnp.asarray(pred2), jnp.asarray(target), jnp.asarray(mask)), want_loss,
                               rtol=1e-5)
    normed, mean, std = normalize_patches(jnp.asarray(p, jnp.float32))
    np.testing.assert_allclose(normed * std + mean, p, rtol=1e-4, atol=1e-5)


def test_visible_only_encoding_equals_masked_attention_over_all_tokens():
    x = jnp.asarray(images(3))
    enc = encoder()
    params = nn.meta.unbox(enc.init(jax.random.key(0), x))["params"]
    result = masking.random_masking(jax.random.key(1), 3, (4, 4), 0.75)
    stem = enc.apply({"params": params}, x, method=ViT.embed_patches)
    prefix = enc.num_prefix_tokens

    def encode(tokens, mask=None):
        full = enc.apply({"params": params}, tokens, method=ViT.add_prefix_tokens)
        return enc.apply({"params": params}, full, mask=mask, method=ViT.encode)[0]

    visible = encode(masking.gather_tokens(stem, result.ids_keep))
    keys = np.concatenate([np.ones((3, prefix), bool), ~np.asarray(result.mask)], axis=1)
    everything = encode(stem, mask=keys[:, None, None, :])
    positions = np.concatenate([np.tile(np.arange(prefix), (3, 1)), prefix + np.asarray(result.ids_keep)], 1)
    np.testing.assert_allclose(visible, np.take_along_axis(np.asarray(everything), positions[..., None], 1),
                               rtol=2e-5, atol=2e-5)
    unmasked = encode(stem)  # without the mask the visible tokens see the hidden ones: different numbers
    assert np.abs(np.take_along_axis(np.asarray(unmasked), positions[..., None], 1) - np.asarray(visible)).max() > 1e-3


@pytest.mark.parametrize("mode, depth", [("mae", 1), ("mae", 0), ("mask_token", 0), ("mask_token", 1)])
def test_predictions_never_depend_on_masked_pixels(mode, depth):
    x = jnp.asarray(images())
    model = mae(mode, depth)
    result = masking.random_masking(jax.random.key(3), 2, (4, 4), 0.5)
    params = nn.meta.unbox(model.init(jax.random.key(0), x, result))["params"]
    pred, aux = model.apply({"params": params}, x, result)
    assert pred.shape == (2, 16, 48)
    expected_tokens = 2 + (8 if mode == "mae" else 16)  # cls + register + encoder tokens
    assert aux["encoded"].shape == (2, expected_tokens, 32)
    grads = jax.grad(lambda im: jnp.sum(model.apply({"params": params}, im, result)[0] ** 2))(x)
    per_patch = np.abs(np.asarray(patchify(grads, 4))).sum(-1)
    mask = np.asarray(result.mask)
    assert per_patch[mask].max() == 0.0
    assert per_patch[~mask].min() > 0.0


def test_encoder_parameters_load_into_a_plain_vit():
    x = jnp.asarray(images())
    model = mae()
    result = masking.random_masking(jax.random.key(3), 2, (4, 4), 0.75)
    params = nn.meta.unbox(model.init(jax.random.key(0), x, result))["params"]
    _, aux = model.apply({"params": params}, x, result)
    enc = encoder()
    stem = enc.apply({"params": params["encoder"]}, x, method=ViT.embed_patches)
    tokens = enc.apply({"params": params["encoder"]}, masking.gather_tokens(stem, result.ids_keep),
                       method=ViT.add_prefix_tokens)
    np.testing.assert_allclose(enc.apply({"params": params["encoder"]}, tokens, method=ViT.encode)[0],
                               aux["encoded"], rtol=1e-6, atol=1e-6)
    logits, vit_aux = enc.apply({"params": params["encoder"]}, x)  # the whole image, as for probing
    assert vit_aux["encoded"].shape == (2, 18, 32)


def test_bad_masking_shape_is_named():
    x = jnp.asarray(images())
    model = mae()
    result = masking.random_masking(jax.random.key(3), 2, (5, 5), 0.75)
    with pytest.raises(ValueError, match=re.escape("masking.mask has shape (2, 25), expected [batch, patches] = (2, 16)")):
        model.init(jax.random.key(0), x, result)
    with pytest.raises(ValueError, match="mode='beit'"):
        MAE(encoder=encoder(), mode="beit").init(jax.random.key(0), x, masking.random_masking(
            jax.random.key(3), 2, (4, 4), 0.75))


def test_mae_learns_a_position_dependent_image():
    # One image under four different masks: every masked patch is predictable from its position alone.
    x = jnp.asarray(np.repeat(images(1), 4, axis=0))
    model = mae()
    target = patch_targets(x, 4, "norm_pixels")
    result = masking.random_masking(jax.random.key(5), 4, (4, 4), 0.75)
    params = nn.meta.unbox(model.init(jax.random.key(0), x, result))["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: masked_mse(model.apply({"params": p}, x, result)[0], target,
                                                              result.mask))(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(120):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    # predicting zeros scores mean(target^2) = 1 on norm-pix targets
    assert losses[-1] < 0.25 * float(jnp.mean(jnp.square(target))), losses[::15]


def np_hog(image, patch, bins, cell):
    """Per-pixel loops: central differences with zero padding, unsigned angle, hard votes, per-patch L2 norm."""
    h, w, c = image.shape
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)))
    out = []
    for pi in range(h // patch):
        for pj in range(w // patch):
            vec = []
            for ci in range(patch // cell):
                for cj in range(patch // cell):
                    hist = np.zeros((c, bins))
                    for y in range(pi * patch + ci * cell, pi * patch + (ci + 1) * cell):
                        for x in range(pj * patch + cj * cell, pj * patch + (cj + 1) * cell):
                            for ch in range(c):
                                gx = padded[y + 1, x + 2, ch] - padded[y + 1, x, ch]
                                gy = padded[y + 2, x + 1, ch] - padded[y, x + 1, ch]
                                angle = np.arctan2(gy, gx) % np.pi
                                hist[ch, min(int(angle / np.pi * bins), bins - 1)] += np.hypot(gx, gy)
                    vec.append(hist.reshape(-1))
            vec = np.concatenate(vec)
            out.append(vec / np.sqrt(np.sum(vec ** 2) + 1e-6))
    return np.stack(out)


@pytest.mark.parametrize("patch, cell", [(4, None), (4, 2)])
def test_hog_target_matches_a_numpy_loop(patch, cell):
    from maskjax.models.mae import hog_features
    x = images(2, 8, 2, seed=4)
    got = np.asarray(hog_features(jnp.asarray(x), patch, cell=cell))
    want = np.stack([np_hog(im, patch, 9, cell or patch) for im in x])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    with pytest.raises(ValueError, match=re.escape("cell=3 must divide the patch (4, 4)")):
        hog_features(jnp.asarray(x), patch, cell=3)


def test_mask_token_mode_applies_the_encoders_token_mask():
    """Issue 14: the encoder's token mask used to be ignored by MAE. With a 1-block encoder, a 3x3 window
    (radius 1) and a linear decoder, patch 0's prediction may only depend on the pixels of its window, which a
    perturbation far away shows; without the mask it depends on them."""
    from maskjax.models.attention_options import TokenMaskSpec

    x = images(1, 16)  # a 4 x 4 patch grid
    result = masking.random_masking(jax.random.key(3), 1, (4, 4), 0.5)
    visible_far = [i for i in range(16) if not result.mask[0, i] and max(i // 4, i % 4) >= 2]
    row, col = divmod(visible_far[0], 4)  # a visible patch outside the window of patch (0, 0)
    far = x.copy()
    far[:, 4 * row:4 * row + 4, 4 * col:4 * col + 4] += 1.0

    def predictions(token_mask):
        model = MAE(encoder=encoder(depth=1, num_registers=0, token_mask=token_mask), mode="mask_token",
                    decoder_depth=0)
        params = model.init(jax.random.key(0), jnp.asarray(x), result)
        return [np.asarray(model.apply(params, jnp.asarray(v), result)[0]) for v in (x, far)]

    windowed, windowed_far = predictions(TokenMaskSpec(kind="window_2d", radius=(1, 1)))
    full, full_far = predictions(TokenMaskSpec())
    np.testing.assert_array_equal(windowed[0, 0], windowed_far[0, 0])  # patch (0, 0) cannot see that patch
    assert np.abs(full[0, 0] - full_far[0, 0]).max() > 1e-4  # without the mask it does
    assert np.abs(windowed - full).max() > 1e-4  # so the mask changes the output
    with pytest.raises(ValueError, match="mode='mae' encodes a different visible subset"):
        MAE(encoder=encoder(token_mask=TokenMaskSpec(kind="window_2d")), mode="mae").init(
            jax.random.key(0), jnp.asarray(x), result)
