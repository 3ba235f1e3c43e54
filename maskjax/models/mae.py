"""Masked image modeling models: MAE (encoder on visible patches only + light decoder) and the mask-token
variant (SimMIM / BEiT style: every patch enters the encoder, masked ones replaced by a learned token).

    mae = MAE(encoder=ViT(patch_size=4, width=192, depth=6, mlp_dim=768, num_heads=3), decoder_depth=2)
    masking = masking_lib.random_masking(key, batch, grid_hw, 0.75)
    pred, aux = mae.apply(variables, images, masking)        # pred [B, N, p*p*C] for every patch
    loss = masked_mse(pred, patch_targets(images, 4, "norm_pixels"), masking.mask)

The encoder is an ordinary `ViT` (its parameters live under 'encoder' and load into a `ViT` for probing or
fine-tuning). Patch order is row-major; inside a patch (row, col, channel), as in the official MAE code.
"""

import math
from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from maskjax.masking import MaskingResult, gather_tokens, restore_tokens
from maskjax.models.layers import DEFAULT_KERNEL_INIT, ZEROS, Encoder, pair, posemb_sincos_2d, posemb_sincos_3d
from maskjax.models.vit import ViT

MIM_MODES = ("mae", "mask_token")
TARGETS = ("pixels", "norm_pixels", "hog", "teacher")


def patchify(images: jax.Array, patch_size: Any, tubelet_size: Optional[int] = None) -> jax.Array:
    """images [B, H, W, C] -> patches [B, (H/ph)·(W/pw), ph·pw·C] (row-major patches; (row, col, channel) inside).
    With `tubelet_size` t, videos [B, T, H, W, C] -> [B, (T/t)·(H/ph)·(W/pw), t·ph·pw·C] (time-major tokens, as the
    tubelet embedding; (frame, row, col, channel) inside)."""
    (ph, pw) = pair(patch_size, "patch_size")
    t = 1 if tubelet_size is None else int(tubelet_size)
    if images.ndim == 4 and tubelet_size is None:
        images = images[:, None]
    elif images.ndim != 5 or tubelet_size is None:
        raise ValueError(f"patchify: expected images [B, H, W, C] or, with tubelet_size, videos [B, T, H, W, C]; "
                         f"got shape {images.shape} and tubelet_size={tubelet_size}")
    b, frames, h, w, c = images.shape
    if frames % t or h % ph or w % pw:
        what = f"video size {(frames, h, w)} is not divisible by tubelet x patch_size {(t, ph, pw)}" \
            if tubelet_size else f"image size {(h, w)} is not divisible by patch_size {(ph, pw)}"
        raise ValueError(f"patchify: {what}")
    x = images.reshape(b, frames // t, t, h // ph, ph, w // pw, pw, c)
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))
    return x.reshape(b, (frames // t) * (h // ph) * (w // pw), t * ph * pw * c)


def unpatchify(patches: jax.Array, patch_size: Any, grid_hw: Sequence[int], channels: int,
               tubelet_size: Optional[int] = None) -> jax.Array:
    """Inverse of `patchify`: [B, gh·gw, ph·pw·C] -> [B, gh·ph, gw·pw, C]; with `tubelet_size` t and grid
    (gt, gh, gw): [B, gt·gh·gw, t·ph·pw·C] -> [B, gt·t, gh·ph, gw·pw, C]."""
    chex.assert_rank(patches, 3)
    (ph, pw), grid = pair(patch_size, "patch_size"), tuple(grid_hw)
    t = 1 if tubelet_size is None else int(tubelet_size)
    gt, gh, gw = grid if tubelet_size is not None and len(grid) == 3 else (1,) + grid
    if len(grid) != (3 if tubelet_size is not None else 2) or patches.shape[1] != gt * gh * gw \
            or patches.shape[2] != t * ph * pw * channels:
        raise ValueError(f"unpatchify: patches {patches.shape} do not fit grid {grid}, patch {(ph, pw)}, "
                         f"tubelet {tubelet_size}, {channels} channels")
    x = patches.reshape(patches.shape[0], gt, gh, gw, t, ph, pw, channels)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7)).reshape(patches.shape[0], gt * t, gh * ph, gw * pw, channels)
    return x if tubelet_size is not None else x[:, 0]


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
        expected = 4 if self.encoder.tubelet_size is None else 5
        if images.ndim != expected:
            layout = "images must be [batch, H, W, C]" if expected == 4 else "videos must be [batch, T, H, W, C]"
            raise ValueError(f"MAE: {layout}, got shape {images.shape}")
        num_patches = math.prod(self.encoder.token_grid(images.shape[1:-1]))
        if masking.mask.shape != (images.shape[0], num_patches):
            raise ValueError(f"MAE: masking.mask has shape {masking.mask.shape}, expected [batch, patches] = "
                             f"{(images.shape[0], num_patches)} for input size {images.shape[1:-1]}")
        return num_patches

    @nn.compact
    def __call__(self, images: jax.Array, masking: MaskingResult, *, train: bool = False) -> tuple[jax.Array, dict]:
        self._validate(images, masking)
        enc = self.encoder
        grid = enc.token_grid(images.shape[1:-1])
        ph, pw = pair(enc.patch_size, "patch_size")
        output_dim = self.output_dim or (enc.tubelet_size or 1) * ph * pw * images.shape[-1]
        num_prefix = enc.num_prefix_tokens

        stem = enc.embed_patches(images)  # [B, N, width], position embeddings added
        if self.mode == "mae":
            tokens = gather_tokens(stem, masking.ids_keep)
        else:
            mask_token = self.param("encoder_mask_token", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, enc.width), jnp.float32)
            position = enc.position_embedding(grid).astype(stem.dtype)
            tokens = jnp.where(masking.mask[..., None], mask_token.astype(stem.dtype) + position, stem)
        if self.mode == "mae" and enc.token_mask.kind != "none":
            raise ValueError(f"MAE: mode='mae' encodes a different visible subset of every image, so the encoder's "
                             f"token_mask kind={enc.token_mask.kind!r} has no fixed grid to apply to; use "
                             "mode='mask_token'")
        # mask_token mode encodes the whole grid, so the encoder's token mask (windows, ...) applies as in a ViT.
        block_mask = enc.block_masks(grid) if self.mode == "mask_token" else None
        encoded, _ = enc.encode(enc.add_prefix_tokens(tokens), train=train, mask=block_mask)

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
            posemb = posemb_sincos_3d(*grid, self.decoder_width) if len(grid) == 3 else \
                posemb_sincos_2d(*grid, self.decoder_width)
            patches = patches + posemb.astype(patches.dtype)
            x = jnp.concatenate([prefix, patches], axis=1)
            # The decoder follows the encoder's layout and remat, so a checkpoint has one layout throughout.
            x, _ = Encoder(depth=self.decoder_depth, mlp_dim=self.decoder_mlp_dim, num_heads=self.decoder_heads,
                           layer_norm_eps=enc.layer_norm_eps, remat=enc.remat, remat_policy=enc.remat_policy,
                           scan_layers=enc.scan_layers, dtype=self.dtype, name="decoder")(x, train=train)
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
