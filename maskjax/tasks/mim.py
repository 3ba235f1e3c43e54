"""Masked image modeling (MAE / mask-token): masking from config, reconstruction loss on masked patches only,
reconstruction metrics and a PNG grid (original / masked / reconstruction).

Images arrive in [-1, 1] (maskjax.data.preprocess.normalize); reconstruction PSNR is measured on that range
(data range 2), on masked patches. With 'norm_pixels' the reconstruction uses each masked patch's true mean and
standard deviation (as MAE's visualisation does), so its PSNR measures structure, not absolute intensity.
Targets: 'pixels', 'norm_pixels' (MAE), 'hog' (MaskFeat; no pixel reconstruction, so no PSNR). The masking of step s is drawn from the step key the trainer derives from
(seed, s); evaluation uses fixed masks (key of `seed` and the batch position) so numbers compare across runs.
"""

from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskjax import masking as masking_lib
from maskjax.models.mae import MAE, hog_features, masked_mse, normalize_patches, patchify, unpatchify
from maskjax.tasks.classification import vit_from_config

Batch = Mapping[str, jax.Array]
# Strategies that need per-step scores (teacher attention, predicted difficulty) are not wired into this task.
SCORE_FREE_STRATEGIES = ("random", "block", "grid", "noise", "checkerboard")


def mae_from_config(config: ml_collections.ConfigDict) -> MAE:
    """The MAE of `config.mim` around the ViT encoder of `config.model` (its classifier head unused)."""
    encoder = vit_from_config(config.model).clone(num_classes=None)
    m = config.mim
    return MAE(encoder=encoder, mode=m.mode, decoder_width=m.decoder_width, decoder_depth=m.decoder_depth,
               decoder_heads=m.decoder_heads, decoder_mlp_dim=m.decoder_mlp_dim, dtype=encoder.dtype)


def masking_from_config(mim_config: ml_collections.ConfigDict):
    """`fn(key, batch, grid_hw) -> MaskingResult` of `config.mim`; a ValueError names the bad key."""
    name = mim_config.masking
    if name not in SCORE_FREE_STRATEGIES:
        raise ValueError(f"config.mim.masking={name!r}: must be one of {SCORE_FREE_STRATEGIES} (strategies "
                         "that need teacher or difficulty scores are not wired into the MIM task)")
    try:
        fn = masking_lib.make_masking(name, **mim_config.masking_options.to_dict())
    except ValueError as err:
        raise ValueError(f"config.mim.masking_options: {err}") from err
    ratio = float(mim_config.mask_ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"config.mim.mask_ratio={ratio}: must be in (0, 1)")
    return lambda key, batch, grid_hw: fn(key, batch, tuple(grid_hw), ratio)


class MIMTask:
    """Reconstruct masked patches: loss = mean over masked patches of the per-patch MSE to the target."""

    gallery_name = "reconstructions"  # images/reconstructions_step<N>.png: original | masked | reconstruction

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = mae_from_config(config)
        self.masking = masking_from_config(config.mim)
        self.target = config.mim.target
        self.patch_size = self.model.encoder.patch_size

    def _grid(self, images: jax.Array) -> tuple[int, int]:
        return self.model.encoder.patch_grid(images.shape[1:3])

    def _targets(self, images: jax.Array) -> jax.Array:
        if self.target == "hog":
            return hog_features(images, self.patch_size)
        patches = patchify(images.astype(jnp.float32), self.patch_size)
        return normalize_patches(patches)[0] if self.target == "norm_pixels" else patches

    def _model(self, images: jax.Array) -> MAE:
        """The MAE with its output sized for the target of these images (HOG: 9 bins per channel per patch)."""
        if self.target != "hog":
            return self.model
        return self.model.clone(output_dim=9 * images.shape[-1])

    def _eval_masking(self, images: jax.Array) -> masking_lib.MaskingResult:
        key = masking_lib.masking_key(self.config.seed, 0)
        return self.masking(key, images.shape[0], self._grid(images))

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        images = batch["image"]
        masks = self._eval_masking(images)
        return self._model(images).init({"params": rng}, images, masks, train=False)

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True) -> tuple[jax.Array, dict]:
        images = batch["image"]
        chex.assert_rank(images, 4)
        mask_rng, dropout_rng, drop_path_rng = jax.random.split(rng, 3)
        masks = self.masking(mask_rng, images.shape[0], self._grid(images))
        pred, _ = self._model(images).apply({"params": params}, images, masks, train=train,
                                            rngs={"dropout": dropout_rng, "drop_path": drop_path_rng})
        loss = masked_mse(pred, self._targets(images), masks.mask)
        return loss, {"masked_fraction": jnp.mean(masks.mask.astype(jnp.float32))}

    def reconstruct(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(reconstruction [B, H, W, C] in image units, with visible patches copied from the input; mask [B, N]).
        With the 'hog' target nothing is reconstructed: masked patches are 0 (grey)."""
        masks = self._eval_masking(images)
        patches = patchify(images.astype(jnp.float32), self.patch_size)
        if self.target == "hog":
            merged = jnp.where(masks.mask[..., None], 0.0, patches)
            return unpatchify(merged, self.patch_size, self._grid(images), images.shape[-1]), masks.mask
        pred, _ = self.model.apply({"params": params}, images, masks, train=False)
        if self.target == "norm_pixels":  # undo the per-patch normalisation with the true patch statistics
            _, mean, std = normalize_patches(patches)
            pred = pred * std + mean
        merged = jnp.where(masks.mask[..., None], pred, patches)
        return unpatchify(merged, self.patch_size, self._grid(images), images.shape[-1]), masks.mask

    def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Sums over valid examples: reconstruction loss and PSNR (masked patches, data range 2)."""
        images = batch["image"]
        masks = self._eval_masking(images)
        pred, _ = self._model(images).apply({"params": params}, images, masks, train=False)
        targets = self._targets(images)
        weights = masks.mask.astype(jnp.float32)
        per_patch = jnp.mean(jnp.square(pred - targets), axis=-1)
        loss = jnp.sum(per_patch * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        valid = batch["valid"].astype(jnp.float32)
        if self.target == "hog":
            return {"count": jnp.sum(valid), "loss": jnp.sum(loss * valid)}
        recon, _ = self.reconstruct(params, images)
        pixel_err = jnp.square(patchify(recon, self.patch_size) - patchify(images.astype(jnp.float32),
                                                                           self.patch_size))
        mse = jnp.sum(jnp.mean(pixel_err, axis=-1) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))
        return {"count": jnp.sum(valid), "loss": jnp.sum(loss * valid), "psnr": jnp.sum(psnr * valid)}

    @staticmethod
    def summarize(sums: Mapping[str, float]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        return {name: float(value) / count for name, value in sums.items() if name != "count"}

    def features(self, params: Any, images: jax.Array) -> jax.Array:
        """Frozen features for probes: the encoder on every patch (no masking), after its final norm: the cls
        token (`probe.features='cls'`, MAE's linear-probing protocol) or the mean of the patch tokens ('gap').
        -> [B, width] float32."""
        encoder = self.model.encoder
        _, aux = encoder.apply({"params": params["encoder"]}, images, train=False)
        if self.config.probe.features == "cls":
            return aux["encoded"][:, 0].astype(jnp.float32)
        return jnp.mean(aux["encoded"][:, encoder.num_prefix_tokens:].astype(jnp.float32), axis=1)

    def predict(self, params: Any, images: jax.Array) -> jax.Array:
        """Reconstructions [B, H, W, C] (visible patches from the input), the gallery's 'predictions'."""
        return self.reconstruct(params, images)[0]

    def visualize(self, images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                  class_names: Any = None) -> np.ndarray:
        """uint8 grid: one row per image: original | masked input (grey patches) | reconstruction."""
        images = np.asarray(images, np.float32)
        masks = np.asarray(self._eval_masking(jnp.asarray(images)).mask)
        patches = np.asarray(patchify(jnp.asarray(images), self.patch_size))
        grey = np.where(masks[..., None], 0.0, patches)
        masked = np.asarray(unpatchify(jnp.asarray(grey), self.patch_size, self._grid(images), images.shape[-1]))
        rows = [np.concatenate([im, mk, np.asarray(pr, np.float32)], axis=1)
                for im, mk, pr in zip(images, masked, predictions)]
        grid = np.concatenate(rows, axis=0)
        grid = np.clip((grid + 1.0) * 127.5, 0, 255).astype(np.uint8)
        if grid.shape[-1] == 1:
            grid = np.repeat(grid, 3, axis=-1)
        return np.kron(grid, np.ones((4, 4, 1), np.uint8))  # 4x nearest upscaling: 32 px images are tiny
