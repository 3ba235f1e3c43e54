"""Supervised image classification with a ViT: loss, evaluation sums and a prediction gallery."""

from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskjax import masking as masking_lib
from maskjax.evaluate.metrics import correct_topk, softmax_cross_entropy
from maskjax.models.vit import ViT, decode_variant
from maskjax.tasks.common import attention_from_config, logit_metrics

Batch = Mapping[str, jax.Array]
PURPOSE_MASKSUB = 0x6D73  # folded into the step key for MaskSub's masks and the sub-branch's dropout


def vit_from_config(model_config: ml_collections.ConfigDict) -> ViT:
    """A ViT whose size comes from `model_config.variant` and whose options from the other fields."""
    size = decode_variant(model_config.variant)
    for key in ("depth", "width", "num_heads", "mlp_dim"):
        if model_config[key] > 0:
            size[key] = model_config[key]
    attention, token_mask = attention_from_config(model_config.attention)
    return ViT(
        num_classes=model_config.num_classes,
        tubelet_size=model_config.get("tubelet_size", 0) or None,
        class_token=model_config.class_token,
        num_registers=model_config.num_registers,
        posemb=model_config.posemb,
        pool=model_config.pool,
        dropout=model_config.dropout,
        drop_path_rate=model_config.drop_path_rate,
        layer_scale_init=model_config.layer_scale_init or None,
        dtype=jnp.dtype(model_config.dtype),
        remat=model_config.remat,
        attention=attention,
        token_mask=token_mask,
        **size,
    )


class ClassificationTask:
    """Softmax cross-entropy on integer labels; top-1 accuracy."""

    def __init__(self, config: ml_collections.ConfigDict, *, load_params: Optional[Callable] = None):
        del load_params  # reads no other run (`init_from` is the trainer's business)
        self.config = config
        self.model = vit_from_config(config.model)

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        """Model variables (boxed with logical axis names) for a batch of images [b, H, W, C]."""
        return self.model.init({"params": rng}, batch["image"], train=False)

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True,
             step: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        """Mean loss over the batch and per-batch metrics (means). `step` (unused) is the optimizer step."""
        chex.assert_rank(batch["image"], 4 if self.model.tubelet_size is None else 5)
        chex.assert_rank(batch["label"], 1)
        dropout_rng, drop_path_rng = jax.random.split(rng)
        record = self.model.attention.record_max_logit
        outputs = self.model.apply({"params": params}, batch["image"], train=train,
                                   rngs={"dropout": dropout_rng, "drop_path": drop_path_rng},
                                   mutable=["intermediates"] if record else False)
        (logits, _), state = outputs if record else (outputs, {})
        losses = softmax_cross_entropy(logits, batch["label"], self.config.loss.label_smoothing)
        accuracy = correct_topk(logits, batch["label"])
        metrics = {"accuracy": jnp.mean(accuracy), **logit_metrics(state)}
        loss = jnp.mean(losses)
        if self.config.loss.masksub_ratio > 0 and train:
            sub_loss = self._masksub_loss(params, batch["image"], logits, rng)
            metrics["masksub_loss"] = sub_loss
            loss = loss + self.config.loss.masksub_weight * sub_loss
        return loss, metrics

    def _masksub_loss(self, params: Any, images: jax.Array, main_logits: jax.Array, rng: jax.Array) -> jax.Array:
        """MaskSub (Heo et al. 2023): the same ViT on a random `masksub_ratio` of its patches removed, trained to
        match the main branch's (stop-gradient) predictions: mean KL(softmax(main) || softmax(sub))."""
        mask_key, dropout_rng, drop_path_rng = jax.random.split(jax.random.fold_in(rng, PURPOSE_MASKSUB), 3)
        grid = self.model.patch_grid(images.shape[1:3])
        kept = masking_lib.random_masking(mask_key, images.shape[0], grid, self.config.loss.masksub_ratio).ids_keep
        sub_logits, _ = self.model.apply({"params": params}, images, train=True, ids_keep=kept,
                                         rngs={"dropout": dropout_rng, "drop_path": drop_path_rng})
        teacher = jax.nn.softmax(jax.lax.stop_gradient(main_logits), axis=-1)
        log_teacher = jnp.log(jnp.maximum(teacher, 1e-12))
        return jnp.mean(jnp.sum(teacher * (log_teacher - jax.nn.log_softmax(sub_logits, axis=-1)), axis=-1))

    def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Sums over the valid examples of a (padded) batch; `summarize` turns them into metrics."""
        logits, _ = self.model.apply({"params": params}, batch["image"], train=False)
        valid = batch["valid"].astype(jnp.float32)
        losses = softmax_cross_entropy(logits, batch["label"])
        sums = {"count": jnp.sum(valid), "loss": jnp.sum(losses * valid),
                "accuracy": jnp.sum(correct_topk(logits, batch["label"]) * valid)}
        if logits.shape[-1] >= 5:
            sums["top5_accuracy"] = jnp.sum(correct_topk(logits, batch["label"], 5) * valid)
        return sums

    @staticmethod
    def summarize(sums: Mapping[str, float]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        return {name: float(value) / count for name, value in sums.items() if name != "count"}

    def features(self, params: Any, images: jax.Array) -> jax.Array:
        """Frozen features for probes: the pre-logits [B, width] (float32)."""
        _, aux = self.model.apply({"params": params}, images, train=False)
        return aux["pre_logits"].astype(jnp.float32)

    def predict(self, params: Any, images: jax.Array) -> jax.Array:
        """[b] predicted classes of images [b, H, W, C]."""
        logits, _ = self.model.apply({"params": params}, images, train=False)
        return jnp.argmax(logits, axis=-1)

    def visualize(self, images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                  class_names: Any = None) -> np.ndarray:
        """A uint8 [H, W, 3] gallery: each image with 'true/predicted' labels, green if right, red if wrong."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        count = len(images)
        cols = min(count, 8)
        rows = (count + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows), squeeze=False)
        name = (lambda i: class_names[i]) if class_names is not None else str
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i >= count:
                continue
            image = np.asarray(images[i], np.float32)
            image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
            ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
            right = int(labels[i]) == int(predictions[i])
            ax.set_title(f"{name(int(labels[i]))}/{name(int(predictions[i]))}", fontsize=7,
                         color="green" if right else "red")
        fig.tight_layout()
        fig.canvas.draw()
        gallery = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return gallery
