"""Masked image modeling models: MAE (encoder on visible patches only + light decoder) and the mask-token
variant (SimMIM / BEiT style: every patch enters the encoder, masked ones replaced by a learned token).

    mae = MAE(encoder=ViT(patch_size=4, width=192, depth=6, mlp_dim=768, num_heads=3), decoder_depth=2)
    masking = masking_lib.random_masking(key, batch, grid_hw, 0.75)
    pred, aux = mae.apply(variables, images, masking)        # pred [B, N, p*p*C] for every patch
    loss = masked_mse(pred, patch_targets(images, 4, "norm_pixels"), masking.mask)

The encoder is an ordinary `ViT` (its parameters live under 'encoder' and load into a `ViT` for probing or
fine-tuning). Patch order is row-major; inside a patch (row, col, channel), as in the official MAE code.
"""

from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from maskjax.masking import MaskingResult, gather_tokens, restore_tokens
from maskjax.models.layers import DEFAULT_KERNEL_INIT, ZEROS, Encoder, pair, posemb_sincos_2d
from maskjax.models.vit import ViT

MIM_MODES = ("mae", "mask_token")
TARGETS = ("pixels", "norm_pixels", "hog", "teacher")


def patchify(images: jax.Array, patch_size: Any) -> jax.Array:
    """images [B, H, W, C] -> patches [B, (H/ph)·(W/pw), ph·pw·C] (row-major patches; (row, col, channel) inside)."""
    chex.assert_rank(images, 4)
    (ph, pw), (b, h, w, c) = pair(patch_size, "patch_size"), images.shape
    if h % ph or w % pw:
        raise ValueError(f"patchify: image size {(h, w)} is not divisible by patch_size {(ph, pw)}")
    x = images.reshape(b, h // ph, ph, w // pw, pw, c)
    return jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(patches: jax.Array, patch_size: Any, grid_hw: Sequence[int], channels: int) -> jax.Array:
    """Inverse of `patchify`: [B, gh·gw, ph·pw·C] -> [B, gh·ph, gw·pw, C]."""
    chex.assert_rank(patches, 3)
    (ph, pw), (gh, gw) = pair(patch_size, "patch_size"), tuple(grid_hw)
    if patches.shape[1] != gh * gw or patches.shape[2] != ph * pw * channels:
        raise ValueError(f"unpatchify: patches {patches.shape} do not fit grid {(gh, gw)}, patch {(ph, pw)}, "
                         f"{channels} channels")
    x = patches.reshape(patches.shape[0], gh, gw, ph, pw, channels)
    return jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(patches.shape[0], gh * ph, gw * pw, channels)


def normalize_patches(patches: jax.Array, eps: float = 1e-6) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MAE's norm-pix target: each patch minus its mean over pixels, divided by sqrt(unbiased var + eps).

    patches [B, N, D] -> (normalised [B, N, D], mean [B, N, 1], std [B, N, 1]) (float32)."""
    patches = patches.astype(jnp.float32)
    mean = jnp.mean(patches, axis=-1, keepdims=True)
    var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)  # unbiased, as torch .var() in MAE and HF
    std = jnp.sqrt(var + eps)
    return (patches - mean) / std, mean, std


def hog_features(images: jax.Array, patch_size: Any, *, bins: int = 9, cell: Optional[int] = None,
                 eps: float = 1e-6) -> jax.Array:
    """MaskFeat's target: histograms of oriented gradients per patch, per channel.

    Gradients by central differences [-1, 0, 1] (zero outside the image); unsigned orientation in [0, pi) split
    into `bins` equal bins, each pixel voting its gradient magnitude into one bin; votes summed over square
    cells of `cell` pixels (default: the whole patch); each patch's vector L2-normalised.
    images [B, H, W, C] -> [B, N, (ph/cell)·(pw/cell)·C·bins] in the order (cell row, cell col, channel, bin).
    """
    chex.assert_rank(images, 4)
    (ph, pw) = pair(patch_size, "patch_size")
    cell = min(ph, pw) if cell is None else int(cell)
    if bins < 1 or cell < 1 or ph % cell or pw % cell:
        raise ValueError(f"hog_features: bins={bins} must be >= 1 and cell={cell} must divide the patch {(ph, pw)}")
    x = images.astype(jnp.float32)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    gx = padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]
    gy = padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]
    magnitude = jnp.sqrt(gx * gx + gy * gy)
    angle = jnp.mod(jnp.arctan2(gy, gx), jnp.pi)
    index = jnp.minimum((angle / jnp.pi * bins).astype(jnp.int32), bins - 1)
    votes = jax.nn.one_hot(index, bins, dtype=jnp.float32) * magnitude[..., None]  # [B, H, W, C, bins]
    b, h, w, c, _ = votes.shape
    cells = votes.reshape(b, h // cell, cell, w // cell, cell, c, bins).sum(axis=(2, 4))  # [B, h/cell, w/cell, C, bins]
    per_patch = patchify(cells.reshape(b, h // cell, w // cell, c * bins), (ph // cell, pw // cell))
    return per_patch / jnp.sqrt(jnp.sum(per_patch * per_patch, axis=-1, keepdims=True) + eps)


def patch_targets(images: jax.Array, patch_size: Any, target: str = "norm_pixels") -> jax.Array:
    """Reconstruction targets [B, N, D] of images [B, H, W, C]: 'pixels' or 'norm_pixels' (MAE, D = ph·pw·C),
    'hog' (MaskFeat, D = C·9 with one cell per patch; see `hog_features`)."""
    if target not in TARGETS:
        raise ValueError(f"patch_targets: target={target!r} must be one of {TARGETS}")
    if target == "hog":
        return hog_features(images, patch_size)
    patches = patchify(images.astype(jnp.float32), patch_size)
    return normalize_patches(patches)[0] if target == "norm_pixels" else patches


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over masked patches (mask True) of the per-patch mean squared error. pred, target [B, N, D]."""
    chex.assert_equal_shape([pred, target])
    chex.assert_shape(mask, pred.shape[:2])
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    weights = mask.astype(jnp.float32)
    return jnp.sum(per_patch * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def ranking_loss(loss_pred: jax.Array, loss_target: jax.Array, mask: jax.Array) -> jax.Array:
    """Hard Patches Mining's relative loss: over every pair (i, j) of masked patches of a sample whose true losses
    differ, binary cross-entropy between sigmoid(pred_i - pred_j) and [target_i > target_j].

    loss_pred, loss_target float [B, N] (the target is not differentiated); mask bool [B, N] (True = masked).
    Returns the mean over valid pairs (0 if there are none).
    """
    chex.assert_equal_shape([loss_pred, loss_target, mask])
    target = jax.lax.stop_gradient(loss_target.astype(jnp.float32))
    pred = loss_pred.astype(jnp.float32)
    both_masked = mask[:, :, None] & mask[:, None, :]
    greater = (target[:, :, None] > target[:, None, :]) & both_masked
    smaller = (target[:, :, None] < target[:, None, :]) & both_masked
    difference = pred[:, :, None] - pred[:, None, :]
    # -log sigmoid(d) for ordered pairs i > j, -log(1 - sigmoid(d)) = -log sigmoid(-d) for i < j.
    losses = jnp.where(greater, -jax.nn.log_sigmoid(difference), 0.0) + \
        jnp.where(smaller, -jax.nn.log_sigmoid(-difference), 0.0)
    valid = jnp.sum(greater | smaller)
    return jnp.sum(losses) / jnp.maximum(valid, 1).astype(jnp.float32)


def feature_targets(features: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Teacher features as regression targets: each token normalised to zero mean and unit variance over its
    channels (parameter-free LayerNorm, as data2vec / MaskFeat-style feature targets). [B, N, D] -> float32."""
    features = jax.lax.stop_gradient(features.astype(jnp.float32))
    mean = jnp.mean(features, axis=-1, keepdims=True)
    var = jnp.var(features, axis=-1, keepdims=True)
    return (features - mean) * jax.lax.rsqrt(var + eps)


class MAE(nn.Module):
    """Masked autoencoder around a ViT encoder.

    Attributes:
      encoder: the `ViT` (its head is unused; build it with num_classes=None).
      mode: 'mae': the encoder sees only the visible patches (ids_keep), the decoder gets mask tokens at the
        masked positions (ids_restore) — the source of MAE's speed. 'mask_token': every patch enters the
        encoder, masked ones replaced by a learned mask token (SimMIM/BEiT); the decoder may be empty.
      decoder_width, decoder_depth, decoder_heads, decoder_mlp_dim: the decoder transformer (depth 0 = a linear
        prediction head on the encoder output).
      output_dim: values predicted per patch (None: ph·pw·C of the input images).
      loss_predictor: add Hard Patches Mining's loss-prediction head (a linear map of the decoder features to one
        value per patch, aux['loss_pred'] [B, N]; a lighter stand-in for HPM's separate loss decoder).
      dtype: compute dtype.
    `__call__(images [B, H, W, C], masking: MaskingResult, train=False)` -> (pred [B, N, output_dim], aux) with
    aux['encoded'] (encoder output incl. prefix tokens: [B, P + Nv, width] for 'mae', [B, P + N, width] else).
    """

    encoder: ViT
    mode: str = "mae"
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int = 512
    output_dim: Optional[int] = None
    loss_predictor: bool = False
    dtype: Any = jnp.float32

    def _validate(self, images: jax.Array, masking: MaskingResult) -> int:
        if self.mode not in MIM_MODES:
            raise ValueError(f"MAE: mode={self.mode!r} must be one of {MIM_MODES}")
        if self.decoder_depth < 0 or (self.decoder_depth and self.decoder_width % self.decoder_heads):
            raise ValueError(f"MAE: decoder_depth={self.decoder_depth} must be >= 0 and decoder_width="
                             f"{self.decoder_width} divisible by decoder_heads={self.decoder_heads}")
        if images.ndim != 4:
            raise ValueError(f"MAE: images must be [batch, H, W, C], got shape {images.shape}")
        grid = self.encoder.patch_grid(images.shape[1:3])
        num_patches = grid[0] * grid[1]
        if masking.mask.shape != (images.shape[0], num_patches):
            raise ValueError(f"MAE: masking.mask has shape {masking.mask.shape}, expected [batch, patches] = "
                             f"{(images.shape[0], num_patches)} for images {images.shape[1:3]}")
        return num_patches

    @nn.compact
    def __call__(self, images: jax.Array, masking: MaskingResult, *, train: bool = False) -> tuple[jax.Array, dict]:
        self._validate(images, masking)
        enc = self.encoder
        grid = enc.patch_grid(images.shape[1:3])
        ph, pw = pair(enc.patch_size, "patch_size")
        output_dim = self.output_dim or ph * pw * images.shape[-1]
        num_prefix = enc.num_prefix_tokens

        stem = enc.embed_patches(images)  # [B, N, width], position embeddings added
        if self.mode == "mae":
            tokens = gather_tokens(stem, masking.ids_keep)
        else:
            mask_token = self.param("encoder_mask_token", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, enc.width), jnp.float32)
            position = enc.position_embedding(grid).astype(stem.dtype)
            tokens = jnp.where(masking.mask[..., None], mask_token.astype(stem.dtype) + position, stem)
        encoded, _ = enc.encode(enc.add_prefix_tokens(tokens), train=train)

        if self.decoder_depth == 0:
            x = encoded[:, num_prefix:]
            if self.mode == "mae":
                x = restore_tokens(x, jnp.zeros((x.shape[-1],), x.dtype), masking.ids_restore)
        else:
            x = nn.Dense(self.decoder_width, dtype=self.dtype, name="decoder_embed",
                         kernel_init=nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("embed", "mlp")),
                         bias_init=nn.with_logical_partitioning(ZEROS, ("mlp",)))(encoded)
            prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
            if self.mode == "mae":
                mask_token = self.param("mask_token", nn.with_logical_partitioning(
                    nn.initializers.normal(0.02), ("mlp",)), (self.decoder_width,), jnp.float32)
                patches = restore_tokens(patches, mask_token.astype(patches.dtype), masking.ids_restore)
            patches = patches + posemb_sincos_2d(grid[0], grid[1], self.decoder_width).astype(patches.dtype)
            x = jnp.concatenate([prefix, patches], axis=1)
            x, _ = Encoder(depth=self.decoder_depth, mlp_dim=self.decoder_mlp_dim, num_heads=self.decoder_heads,
                           layer_norm_eps=enc.layer_norm_eps, dtype=self.dtype, name="decoder")(x, train=train)
            x = x[:, num_prefix:]
        pred = nn.Dense(output_dim, dtype=self.dtype, name="decoder_pred",
                        kernel_init=nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, (None, "patch")),
                        bias_init=nn.with_logical_partitioning(ZEROS, ("patch",)))(x)
        aux = {"encoded": encoded, "stem": stem}
        if self.loss_predictor:
            loss_pred = nn.Dense(1, dtype=self.dtype, name="decoder_loss_pred",
                                 kernel_init=nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, (None, None)),
                                 bias_init=nn.with_logical_partitioning(ZEROS, (None,)))(x)
            aux["loss_pred"] = loss_pred[..., 0].astype(jnp.float32)
        return pred.astype(jnp.float32), aux
