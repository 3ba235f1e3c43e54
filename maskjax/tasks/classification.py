"""Supervised image classification with a ViT: loss, evaluation sums and a prediction gallery."""

from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskjax import masking as masking_lib
from maskjax.evaluate.metrics import correct_topk, softmax_cross_entropy
from maskjax.tasks.base import ModelSpec, build_model, register_model, register_task
from maskjax.tasks.common import logit_metrics, validate_vit, vit_from_config, vit_schema

Batch = Mapping[str, jax.Array]
PURPOSE_MASKSUB = 0x6D73  # folded into the step key for MaskSub's masks and the sub-branch's dropout


register_model(ModelSpec(name="vit", schema=vit_schema, validate=validate_vit,
                         build=lambda config: vit_from_config(config.model)))


def validate_config(config: ml_collections.ConfigDict) -> None:
    """ValueErrors naming the bad `config.classification` key (MaskSub settings)."""
    c = config.classification
    if not 0.0 <= c.label_smoothing < 1.0:
        raise ValueError(f"config.classification.label_smoothing={c.label_smoothing!r}: must be in [0, 1)")
    if not 0.0 <= c.masksub_ratio < 1.0:
        raise ValueError(f"config.classification.masksub_ratio={c.masksub_ratio!r}: must be in [0, 1) (0 = off)")
    if c.masksub_ratio > 0 and config.model.attention.mask != "none":
        raise ValueError(f"config.classification.masksub_ratio={c.masksub_ratio!r}: cannot be combined with a token "
                         f"mask (model.attention.mask={config.model.attention.mask!r}): the sub-branch drops patches")


@register_task
class ClassificationTask:
    """Softmax cross-entropy on integer labels; top-1 (and top-5) accuracy. Fields: 'image', 'label'."""

    name = "classification"
    models = ("vit",)
    feature_kinds = ("pre_logits",)
    batch_fields = ("image", "label")
    free_form = ()

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.label_smoothing = 0.0  # Label smoothing of the softmax cross-entropy.
        c.masksub_ratio = 0.0  # MaskSub: fraction of patches dropped in a self-distilled sub-branch (0 = off).
        c.masksub_weight = 1.0  # MaskSub: weight of the sub-branch's KL loss.
        return c

    @classmethod
    def default_evals(cls) -> dict[str, dict]:
        return {"eval": {"type": "metrics", "every": 100},
                "predictions": {"type": "gallery", "every": 0, "count": 16}}

    validate_config = staticmethod(validate_config)

    def __init__(self, config: ml_collections.ConfigDict, *, load_params: Optional[Callable] = None):
        del load_params  # reads no other run (`init_from` is the trainer's business)
        self.config = config
        self.model = build_model(config)

    def check_data(self, source: Any) -> None:
        classes = getattr(source, "num_classes", None)
        if classes is not None and classes != self.config.model.num_classes:
            raise ValueError(f"config.model.num_classes={self.config.model.num_classes} but data set "
                             f"{self.config.data.name!r} has {classes} classes")

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
        losses = softmax_cross_entropy(logits, batch["label"], self.config.classification.label_smoothing)
        accuracy = correct_topk(logits, batch["label"])
        metrics = {"accuracy": jnp.mean(accuracy), **logit_metrics(state)}
        loss = jnp.mean(losses)
        if self.config.classification.masksub_ratio > 0 and train:
            sub_loss = self._masksub_loss(params, batch["image"], logits, rng)
            metrics["masksub_loss"] = sub_loss
            loss = loss + self.config.classification.masksub_weight * sub_loss
        return loss, metrics

    def _masksub_loss(self, params: Any, images: jax.Array, main_logits: jax.Array, rng: jax.Array) -> jax.Array:
        """MaskSub (Heo et al. 2023): the same ViT on a random `masksub_ratio` of its patches removed, trained to
        match the main branch's (stop-gradient) predictions: mean KL(softmax(main) || softmax(sub))."""
        mask_key, dropout_rng, drop_path_rng = jax.random.split(jax.random.fold_in(rng, PURPOSE_MASKSUB), 3)
        grid = self.model.patch_grid(images.shape[1:3])
        kept = masking_lib.random_masking(mask_key, images.shape[0], grid, self.config.classification.masksub_ratio).ids_keep
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

    def features(self, params: Any, batch: Batch, kind: str = "pre_logits") -> jax.Array:
        """Frozen features for probes: the pre-logits [B, width] (float32)."""
        del kind  # one kind
        _, aux = self.model.apply({"params": params}, batch["image"], train=False)
        return aux["pre_logits"].astype(jnp.float32)

    def predict(self, params: Any, batch: Batch) -> jax.Array:
        """[B] predicted classes of the images [B, H, W, C]."""
        logits, _ = self.model.apply({"params": params}, batch["image"], train=False)
        return jnp.argmax(logits, axis=-1)

    def visualize(self, batch: Mapping[str, np.ndarray], predictions: np.ndarray,
                  class_names: Any = None) -> np.ndarray:
        """A uint8 [H, W, 3] gallery: each image with 'true/predicted' labels, green if right, red if wrong."""
        images, labels = batch["image"], batch["label"]
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
