"""Masked image modeling (MAE / mask-token): masking from config, reconstruction loss on masked patches only,
reconstruction metrics and a PNG grid (original / masked / reconstruction).

Images arrive in [-1, 1] (maskjax.data.preprocess.normalize); reconstruction PSNR is measured on that range
(data range 2), on masked patches. With 'norm_pixels' the reconstruction uses each masked patch's true mean and
standard deviation (as MAE's visualisation does), so its PSNR measures structure, not absolute intensity.
Targets: 'pixels', 'norm_pixels' (MAE), 'hog' (MaskFeat) and 'teacher' (the normalised patch features of a
frozen maskjax ViT checkpoint, `mim.teacher`); the last two reconstruct no pixels, so they report no PSNR.

Masking: every strategy of `maskjax.masking`. The score-guided ones get their scores each step:
  'attention'  (AttMask) the cls attention of the last block of the encoder being trained (`mim.attention_scores=
               'self'`, parameters without gradient; AttMask uses an EMA teacher, which this trainer does not
               keep) or of the frozen `mim.teacher` ('teacher').
  'hard_patch' (HPM) the MAE's own loss predictor (a head trained with HPM's pairwise ranking loss, weight
               `mim.loss_predictor_weight`) run on the whole image; the hardest fraction rises linearly from 0 to
               `mim.hard_patch_alpha_max` over training.
The masking of step s is drawn from the step key the trainer derives from (seed, s); evaluation uses fixed masks
(key of `seed` and the batch position; random masks of the same ratio for the score-guided strategies) so numbers
compare across runs.
"""

import json
import os

from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskjax import masking as masking_lib
from maskjax.models.mae import (MAE, MIM_MODES, TARGETS, feature_targets, hog_features, masked_mse,
                                normalize_patches, patchify, ranking_loss, unpatchify)
from maskjax.models.vit import ViT, token_attention_scores
from maskjax.tasks.base import ModelSpec, build_model, register_model, register_task
from maskjax.tasks.common import validate_vit, vit_from_config, vit_schema

Batch = Mapping[str, jax.Array]
SCORE_FREE_STRATEGIES = ("random", "block", "grid", "noise", "checkerboard", "tube")
GUIDED_STRATEGIES = ("attention", "hard_patch")  # need per-step scores (attention maps, predicted losses)
MIM_STRATEGIES = SCORE_FREE_STRATEGIES + GUIDED_STRATEGIES
ATTENTION_SCORE_SOURCES = ("self", "teacher")


def mae_schema() -> ml_collections.ConfigDict:
    """`config.model` keys of model 'mae': the ViT encoder's (no classifier) and the decoder's."""
    m = vit_schema(classifier=False)
    m.mode = "mae"  # 'mae' (encoder on visible patches only) or 'mask_token' (SimMIM / BEiT style).
    m.decoder_width = 128  # Decoder transformer width.
    m.decoder_depth = 2  # Decoder blocks (0 = linear head on the encoder output).
    m.decoder_heads = 4  # Decoder attention heads.
    m.decoder_mlp_dim = 512  # Decoder MLP width.
    return m


def validate_mae(config: ml_collections.ConfigDict) -> None:
    """ValueErrors naming the bad `config.model` key of an MAE (encoder keys, then decoder and mode)."""
    validate_vit(config)
    m = config.model

    def fail(key, value, why):
        raise ValueError(f"config.model.{key}={value!r}: {why}")

    if m.mode not in MIM_MODES:
        fail("mode", m.mode, f"must be one of {MIM_MODES}")
    if m.decoder_depth < 0:
        fail("decoder_depth", m.decoder_depth, "must be >= 0")
    if m.decoder_depth and (m.decoder_width < 1 or m.decoder_heads < 1 or m.decoder_width % m.decoder_heads):
        fail("decoder_width", m.decoder_width, f"must be >= 1 and divisible by model.decoder_heads={m.decoder_heads}")
    if m.mode == "mae" and m.attention.mask != "none":
        raise ValueError(f"config.model.attention.mask={m.attention.mask!r}: cannot apply with model.mode='mae', whose "
                         "encoder sees a different visible subset of patches in every image; use "
                         "model.mode='mask_token' (every patch enters the encoder) or attention.mask='none'")


def mae_from_config(config: ml_collections.ConfigDict) -> MAE:
    """The MAE of `config.model` (model 'mae': a ViT encoder without classifier, and its decoder)."""
    encoder = vit_from_config(config.model)
    m = config.model
    return MAE(encoder=encoder, mode=m.mode, decoder_width=m.decoder_width, decoder_depth=m.decoder_depth,
               decoder_heads=m.decoder_heads, decoder_mlp_dim=m.decoder_mlp_dim, dtype=encoder.dtype)


register_model(ModelSpec(name="mae", schema=mae_schema, validate=validate_mae, build=mae_from_config))


def masking_from_config(mim_config: ml_collections.ConfigDict, *, name: Optional[str] = None):
    """`fn(key, batch, grid_hw, **per_call) -> MaskingResult` of `config.mim` (strategy `name` instead of
    `mim.masking` if given, without options); per-call keywords are the scores of the guided strategies. A
    ValueError names the bad key."""
    options = {} if name is not None else mim_config.masking_options.to_dict()
    name = mim_config.masking if name is None else name
    if name not in MIM_STRATEGIES:
        raise ValueError(f"config.mim.masking={name!r}: must be one of {MIM_STRATEGIES}")
    per_step = sorted({"scores", "alpha"} & set(options))
    if per_step:
        raise ValueError(f"config.mim.masking_options.{per_step[0]}: set by the MIM task at every step, not in the "
                         "config (see mim.attention_scores, mim.hard_patch_alpha_max)")
    try:
        fn = masking_lib.make_masking(name, **options)
    except ValueError as err:
        raise ValueError(f"config.mim.masking_options: {err}") from err
    ratio = float(mim_config.mask_ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"config.mim.mask_ratio={ratio}: must be in (0, 1)")
    return lambda key, batch, grid_hw, **per_call: fn(key, batch, tuple(grid_hw), ratio, **per_call)


def needs_teacher(mim_config: ml_collections.ConfigDict) -> bool:
    """Whether `config.mim` asks for the frozen teacher (feature targets, or AttMask on its attention)."""
    m = mim_config
    return m.target == "teacher" or (m.masking == "attention" and m.attention_scores == "teacher")


def check_target_and_scores(mim_config: ml_collections.ConfigDict, *, video: bool = False) -> None:
    """ValueErrors naming the bad `config.mim` key of the target / guided-masking settings (no I/O)."""
    m = mim_config
    if video and m.target in ("hog", "teacher"):
        raise ValueError(f"config.mim.target={m.target!r}: is defined for images; video MIM uses 'pixels' or "
                         "'norm_pixels'")
    if m.attention_scores not in ATTENTION_SCORE_SOURCES:
        raise ValueError(f"config.mim.attention_scores={m.attention_scores!r}: must be one of "
                         f"{ATTENTION_SCORE_SOURCES}")
    if not 0.0 <= m.hard_patch_alpha_max <= 1.0:
        raise ValueError(f"config.mim.hard_patch_alpha_max={m.hard_patch_alpha_max!r}: must be in [0, 1]")
    if needs_teacher(m) and not m.teacher.workdir:
        raise ValueError(f"config.mim.teacher.workdir={m.teacher.workdir!r}: is needed by mim.target={m.target!r} / "
                         f"mim.masking={m.masking!r} with mim.attention_scores={m.attention_scores!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """ValueErrors naming the bad `config.mim` key and value, before any compute (tracing only, no I/O); the model
    keys are checked first by the 'mae' model's spec."""
    m = config.mim

    def fail(key, value, why):
        raise ValueError(f"config.mim.{key}={value!r}: {why}")

    if m.target not in TARGETS:
        fail("target", m.target, f"must be one of {TARGETS}")
    video = config.data.num_frames > 0
    check_target_and_scores(m, video=video)
    mask_fn = masking_from_config(m)
    input_size = (config.data.image_size,) * 2
    grid = vit_from_config(config.model).token_grid((config.data.num_frames,) + input_size if video else input_size)
    per_call = {}
    if m.masking in GUIDED_STRATEGIES:
        per_call["scores"] = jax.ShapeDtypeStruct((2, int(np.prod(grid))), jnp.float32)
    if m.masking == "hard_patch":
        per_call["alpha"] = jax.ShapeDtypeStruct((), jnp.float32)
    try:  # static options are checked while tracing: no compute
        jax.eval_shape(lambda key, kw: mask_fn(key, 2, grid, **kw), jax.random.key(0), per_call)
    except TypeError as err:  # a strategy of another grid rank (block masking on a video grid)
        fail("masking", m.masking, f"does not apply to a {grid} token grid: {err}")
    except ValueError as err:
        fail("masking_options", m.masking_options.to_dict(), f"strategy {m.masking!r} on a {grid} grid: {err}")


def teacher_from_config(config: ml_collections.ConfigDict,
                        load_params: Optional[Callable]) -> Optional[tuple[ViT, Any]]:
    """(ViT, parameters) of the frozen teacher `config.mim.teacher` (a maskjax run's workdir: its config.json
    gives the architecture, `load_params(workdir, step, params_key, config_key=...)` its weights, e.g.
    `maskjax.train.checkpoint.load_params`), or None when no teacher is set."""
    t = config.mim.teacher
    if not t.workdir:
        return None
    if load_params is None:
        raise ValueError(f"config.mim.teacher.workdir={t.workdir!r}: MIMTask needs `load_params` to read the "
                         "teacher's weights (the trainer passes maskjax.train.checkpoint.load_params)")
    path = os.path.join(t.workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"config.mim.teacher.workdir={t.workdir!r}: no config.json there (not a maskjax run)")
    with open(path) as f:
        teacher_config = ml_collections.ConfigDict(json.load(f))
    params_key = t.params_key
    if params_key == "auto":  # MIM runs keep their encoder under 'encoder', classification runs at the top
        params_key = "encoder" if teacher_config.get("task") == "mim" else ""
    params, _ = load_params(t.workdir, t.step, params_key, config_key="mim.teacher")
    model = vit_from_config(teacher_config.model).clone(num_classes=None, drop_path_rate=0.0, dropout=0.0)
    params = {k: v for k, v in params.items() if k != "head"}  # classifier heads are not needed
    image_hw = (config.data.image_size,) * 2
    expected = vit_from_config(config.model).patch_grid(image_hw)
    try:
        grid = model.patch_grid(image_hw)
    except ValueError as err:
        raise ValueError(f"config.mim.teacher.workdir={t.workdir!r}: {err}") from err
    if grid != expected:
        raise ValueError(f"config.mim.teacher.workdir={t.workdir!r}: the teacher's patch grid {grid} differs from "
                         f"the student's {expected} at data.image_size={config.data.image_size}")
    return model, jax.tree.map(jnp.asarray, params)


@register_task
class MIMTask:
    """Reconstruct masked patches: loss = mean over masked patches of the per-patch MSE to the target. Field:
    'image' ([B, H, W, C], or [B, T, H, W, C] for video)."""

    name = "mim"
    models = ("mae",)
    feature_kinds = ("cls", "gap")  # probes: the encoder's cls token (MAE's protocol) or mean patch token
    batch_fields = ("image",)
    free_form = ("masking_options",)  # checked by the masking strategy, not the schema

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.mask_ratio = 0.75  # Fraction of patches masked (exact count per image).
        # Strategy of maskjax.masking: 'random', 'block', 'grid', 'noise', 'checkerboard', 'tube' (video),
        # 'attention' (AttMask), 'hard_patch' (HPM).
        c.masking = "random"
        c.masking_options = ml_collections.ConfigDict()  # Keyword options of the strategy (e.g. min_num_patches).
        # "pixels", "norm_pixels" (per-patch normalised, MAE), "hog" (MaskFeat) or "teacher" (mim.teacher's features).
        c.target = "norm_pixels"
        c.attention_scores = "self"  # AttMask's scores: 'self' (the encoder in training) or 'teacher' (mim.teacher).
        c.hard_patch_alpha_max = 0.5  # HPM: hardest share of the masked patches at the end (from 0, linear).
        c.loss_predictor_weight = 1.0  # HPM: weight of the loss predictor's pairwise ranking loss.
        c.teacher = ml_collections.ConfigDict()  # A frozen maskjax ViT (target 'teacher', AttMask 'teacher').
        c.teacher.workdir = ""  # Workdir of the teacher's run (its config.json and checkpoints).
        c.teacher.step = -1  # Its checkpoint step (-1 = latest).
        c.teacher.params_key = "auto"  # Its encoder's parameter sub-tree ('auto': 'encoder' for MIM runs, else '').
        return c

    @classmethod
    def default_evals(cls) -> dict[str, dict]:
        return {"eval": {"type": "metrics", "every": 100},
                "reconstructions": {"type": "gallery", "every": 0, "count": 8}}

    validate_config = staticmethod(validate_config)

    def __init__(self, config: ml_collections.ConfigDict, *, load_params: Optional[Callable] = None):
        """`load_params(workdir, step, params_key, config_key=...) -> (params, step)` reads the frozen
        `mim.teacher`'s weights (needed only when the config uses one)."""
        self.config = config
        m = config.mim
        self.strategy = m.masking
        self.model = build_model(config).clone(loss_predictor=self.strategy == "hard_patch")
        self.masking = masking_from_config(m)
        guided = self.strategy in GUIDED_STRATEGIES
        self.eval_masking = masking_from_config(m, name="random") if guided else self.masking
        self.target = m.target
        self.patch_size = self.model.encoder.patch_size
        self.tubelet_size = self.model.encoder.tubelet_size
        check_target_and_scores(m, video=self.tubelet_size is not None)
        self.teacher = teacher_from_config(config, load_params) if needs_teacher(m) else None

    def _grid(self, images: jax.Array) -> tuple[int, ...]:
        """(gh, gw) of images [B, H, W, C]; (gt, gh, gw) of videos [B, T, H, W, C]."""
        return self.model.encoder.token_grid(images.shape[1:-1])

    def _patchify(self, images: jax.Array) -> jax.Array:
        return patchify(images.astype(jnp.float32), self.patch_size, self.tubelet_size)

    def _unpatchify(self, patches: jax.Array, images: jax.Array) -> jax.Array:
        return unpatchify(patches, self.patch_size, self._grid(images), images.shape[-1], self.tubelet_size)

    def _targets(self, images: jax.Array) -> jax.Array:
        if self.target == "hog":
            return hog_features(images, self.patch_size)
        if self.target == "teacher":
            teacher, teacher_params = self.teacher
            _, aux = teacher.apply({"params": teacher_params}, images, train=False)
            return feature_targets(aux["encoded"][:, teacher.num_prefix_tokens:])
        patches = self._patchify(images)
        return normalize_patches(patches)[0] if self.target == "norm_pixels" else patches

    def _model(self, images: jax.Array) -> MAE:
        """The MAE with its output sized for the target of these images (HOG: 9 bins per channel per patch;
        teacher: the teacher's width)."""
        if self.target == "hog":
            return self.model.clone(output_dim=9 * images.shape[-1])
        if self.target == "teacher":
            return self.model.clone(output_dim=self.teacher[0].width)
        return self.model

    def _eval_masking(self, images: jax.Array) -> masking_lib.MaskingResult:
        key = masking_lib.masking_key(self.config.seed, 0)
        return self.eval_masking(key, images.shape[0], self._grid(images))

    def hard_fraction(self, step: Optional[jax.Array]) -> jax.Array:
        """HPM's share of hardest patches among the masked ones at `step` (None: the end of training)."""
        total = max(int(self.config.total_steps), 1)
        step = total - 1 if step is None else step
        return masking_lib.hard_patch_alpha(step, total, float(self.config.mim.hard_patch_alpha_max))

    def guidance_scores(self, params: Any, images: jax.Array) -> jax.Array:
        """The per-patch scores [B, N] the guided strategy masks by (no gradient): AttMask's cls attention or HPM's
        predicted reconstruction loss on the whole image."""
        if self.strategy == "attention":
            if self.config.mim.attention_scores == "teacher":
                return token_attention_scores(*self.teacher, images)
            return token_attention_scores(self.model.encoder, params["encoder"], images)
        whole = masking_lib.keep_all(images.shape[0], int(np.prod(self._grid(images))))
        _, aux = self._model(images).apply({"params": jax.lax.stop_gradient(params)}, images, whole, train=False)
        return aux["loss_pred"]

    def train_masking(self, params: Any, images: jax.Array, key: jax.Array,
                      step: Optional[jax.Array] = None) -> masking_lib.MaskingResult:
        """The masks of one training step."""
        batch, grid = images.shape[0], self._grid(images)
        if self.strategy == "attention":
            return self.masking(key, batch, grid, scores=self.guidance_scores(params, images))
        if self.strategy == "hard_patch":
            return self.masking(key, batch, grid, scores=self.guidance_scores(params, images),
                                alpha=self.hard_fraction(step))
        return self.masking(key, batch, grid)

    def check_data(self, source: Any) -> None:
        del source  # any images will do

    @classmethod
    def check_feature_kind(cls, config: ml_collections.ConfigDict, kind: str, key: str) -> None:
        """A ValueError naming `key` when the model cannot give features of `kind`."""
        if kind == "cls" and not config.model.class_token:
            raise ValueError(f"config.{key}={kind!r}: needs model.class_token=True (or use 'gap')")

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        images = batch["image"]
        masks = self._eval_masking(images)
        return self._model(images).init({"params": rng}, images, masks, train=False)

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True,
             step: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        """Masked-patch reconstruction loss (+ HPM's ranking loss) and metrics; `step` drives HPM's schedule."""
        images = batch["image"]
        chex.assert_rank(images, 4 if self.tubelet_size is None else 5)
        mask_rng, dropout_rng, drop_path_rng = jax.random.split(rng, 3)
        masks = self.train_masking(params, images, mask_rng, step)
        pred, aux = self._model(images).apply({"params": params}, images, masks, train=train,
                                              rngs={"dropout": dropout_rng, "drop_path": drop_path_rng})
        targets = self._targets(images)
        loss = masked_mse(pred, targets, masks.mask)
        metrics = {"masked_fraction": jnp.mean(masks.mask.astype(jnp.float32)), "reconstruction_loss": loss}
        if self.strategy == "hard_patch":
            per_patch = jnp.mean(jnp.square(pred - targets), axis=-1)
            ranking = ranking_loss(aux["loss_pred"], per_patch, masks.mask)
            loss = loss + self.config.mim.loss_predictor_weight * ranking
            metrics.update(loss_predictor=ranking, hard_fraction=self.hard_fraction(step))
        return loss, metrics

    def reconstruct(self, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(reconstruction [B, (T,) H, W, C] in image units, visible patches copied from the input; mask [B, N]).
        With the 'hog' and 'teacher' targets nothing is reconstructed: masked patches are 0 (grey)."""
        masks = self._eval_masking(images)
        patches = self._patchify(images)
        if self.target in ("hog", "teacher"):
            merged = jnp.where(masks.mask[..., None], 0.0, patches)
            return self._unpatchify(merged, images), masks.mask
        pred, _ = self._model(images).apply({"params": params}, images, masks, train=False)
        return self._unpatchify(self._merged_patches(pred, patches, masks.mask), images), masks.mask

    def _merged_patches(self, pred: jax.Array, patches: jax.Array, mask: jax.Array) -> jax.Array:
        """Patches [B, N, D] in pixel units: predictions at masked positions, the input elsewhere."""
        if self.target == "norm_pixels":  # undo the per-patch normalisation with the true patch statistics
            _, mean, std = normalize_patches(patches)
            pred = pred * std + mean
        return jnp.where(mask[..., None], pred, patches)

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
        if self.target in ("hog", "teacher"):
            return {"count": jnp.sum(valid), "loss": jnp.sum(loss * valid)}
        patches = self._patchify(images)  # the prediction above, merged: no second forward pass
        pixel_err = jnp.square(self._merged_patches(pred, patches, masks.mask) - patches)
        mse = jnp.sum(jnp.mean(pixel_err, axis=-1) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))
        return {"count": jnp.sum(valid), "loss": jnp.sum(loss * valid), "psnr": jnp.sum(psnr * valid)}

    @staticmethod
    def summarize(sums: Mapping[str, float]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        return {name: float(value) / count for name, value in sums.items() if name != "count"}

    def features(self, params: Any, batch: Batch, kind: str = "cls") -> jax.Array:
        """Frozen features for probes: the encoder on every patch (no masking), after its final norm: the cls
        token (kind 'cls', MAE's linear-probing protocol) or the mean of the patch tokens ('gap').
        -> [B, width] float32."""
        encoder = self.model.encoder
        _, aux = encoder.apply({"params": params["encoder"]}, batch["image"], train=False)
        if kind == "cls":
            return aux["encoded"][:, 0].astype(jnp.float32)
        return jnp.mean(aux["encoded"][:, encoder.num_prefix_tokens:].astype(jnp.float32), axis=1)

    def predict(self, params: Any, batch: Batch) -> jax.Array:
        """Reconstructions [B, H, W, C] (visible patches from the input), the gallery's 'predictions'."""
        return self.reconstruct(params, batch["image"])[0]

    def visualize(self, batch: Mapping[str, np.ndarray], predictions: np.ndarray,
                  class_names: Any = None) -> np.ndarray:
        """uint8 grid: one row per image: original | masked input (grey patches) | reconstruction. Videos: one row
        per frame, a blank row between clips."""
        images = np.asarray(batch["image"], np.float32)
        masks = np.asarray(self._eval_masking(jnp.asarray(images)).mask)
        patches = np.asarray(self._patchify(jnp.asarray(images)))
        grey = np.where(masks[..., None], 0.0, patches)
        masked = np.asarray(self._unpatchify(jnp.asarray(grey), images))
        rows = []
        for im, mk, pr in zip(images, masked, np.asarray(predictions, np.float32)):
            if im.ndim == 4:  # a clip [T, H, W, C]: its frames stacked, then a separator
                im, mk, pr = (np.concatenate(list(x) + [np.full_like(x[0][:2], -1.0)], axis=0) for x in (im, mk, pr))
            rows.append(np.concatenate([im, mk, pr], axis=1))
        grid = np.concatenate(rows, axis=0)
        grid = np.clip((grid + 1.0) * 127.5, 0, 255).astype(np.uint8)
        if grid.shape[-1] == 1:
            grid = np.repeat(grid, 3, axis=-1)
        return np.kron(grid, np.ones((4, 4, 1), np.uint8))  # 4x nearest upscaling: 32 px images are tiny
