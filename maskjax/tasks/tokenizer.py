"""Image tokenizer training (task 'tokenizer', model 'conv_tokenizer'): reconstruction + quantizer losses; PSNR,
codebook usage and perplexity on a split; a reconstructions gallery. The trained run's parameters are what the
MaskGIT task reads (`config.maskgit.tokenizer_workdir`) to turn images into tokens and tokens into images."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskjax.models.tokenizer import LAYOUTS, Tokenizer
from maskjax.tasks.base import ModelSpec, build_model, register_model, register_task

Batch = Mapping[str, jax.Array]
QUANTIZERS = ("fsq", "vq")
RECONSTRUCTION_LOSSES = ("l2", "l1")


def tokenizer_schema() -> ml_collections.ConfigDict:
    """`config.model` keys of the convolutional tokenizer (besides `name`)."""
    m = ml_collections.ConfigDict()
    m.quantizer = "fsq"  # 'fsq' (finite scalar quantization) or 'vq' (codebook, straight-through).
    m.fsq_levels = (8, 5, 5, 5)  # FSQ: levels per latent dimension; codebook = their product (1000).
    m.codebook_size = 1024  # VQ: number of codes.
    m.commitment_cost = 0.25  # VQ: weight of the commitment loss ||z - sg(e)||^2.
    m.l2_normalize = False  # VQ: nearest code by cosine similarity (l2-normalised codes and latents).
    m.dead_code_weight = 0.0  # VQ: pull codes unused in the batch towards random latents (0 = off).
    m.discriminator_filters = 0  # > 0: a PatchGAN discriminator of this width (needed by tokenizer.adversarial_*).
    m.embedding_dim = 64  # Width of the latent grid the quantizer sees.
    m.filters = 64  # Channels of the first resolution level.
    m.channel_multipliers = (1, 2, 2)  # Channels per level; downsampling factor f = 2 ** (levels - 1).
    m.num_res_blocks = 1  # Residual blocks per level.
    m.norm_groups = 16  # GroupNorm groups (must divide every level's channels).
    m.channels = 3  # Image channels (3 for the built-in shapes, 1 for Fashion-MNIST).
    m.layout = "maskjax"  # 'maskgit': the official MaskGIT VQGAN's blocks (to load its checkpoints; see Tokenizer).
    return m


def _fail(key: str, value: Any, why: str):
    raise ValueError(f"config.{key}={value!r}: {why}")


def validate_tokenizer(config: ml_collections.ConfigDict) -> None:
    m = config.model
    if m.quantizer not in QUANTIZERS:
        _fail("model.quantizer", m.quantizer, f"must be one of {QUANTIZERS}")
    if m.quantizer == "fsq" and (len(m.fsq_levels) < 1 or min(m.fsq_levels) < 2):
        _fail("model.fsq_levels", tuple(m.fsq_levels), "needs at least one dimension, each with >= 2 levels")
    if m.quantizer == "vq" and m.codebook_size < 2:
        _fail("model.codebook_size", m.codebook_size, "must be >= 2")
    if not m.channel_multipliers or min(m.channel_multipliers) < 1:
        _fail("model.channel_multipliers", tuple(m.channel_multipliers), "needs positive multipliers")
    if m.layout not in LAYOUTS:
        _fail("model.layout", m.layout, f"must be one of {LAYOUTS}")
    for key in ("embedding_dim", "filters", "num_res_blocks", "norm_groups", "channels"):
        if m[key] < 1:
            _fail(f"model.{key}", m[key], "must be >= 1")
    for multiplier in m.channel_multipliers:
        if (m.filters * multiplier) % m.norm_groups:
            _fail("model.norm_groups", m.norm_groups, f"must divide every level's channels (filters * multiplier = "
                  f"{m.filters * multiplier})")
    f = 2 ** (len(m.channel_multipliers) - 1)
    if config.data.image_size % f:
        _fail("data.image_size", config.data.image_size, f"must be a multiple of the tokenizer's downsampling "
              f"factor {f} (model.channel_multipliers={tuple(m.channel_multipliers)})")
    if m.discriminator_filters < 0 or (m.discriminator_filters and (2 * m.discriminator_filters) % m.norm_groups):
        _fail("model.discriminator_filters", m.discriminator_filters, f"must be 0 (none) or a positive width whose "
              f"double divides by model.norm_groups={m.norm_groups}")
    if m.commitment_cost < 0 or m.dead_code_weight < 0:
        _fail("model.commitment_cost" if m.commitment_cost < 0 else "model.dead_code_weight",
              min(m.commitment_cost, m.dead_code_weight), "must be >= 0")


def tokenizer_from_config(config: ml_collections.ConfigDict) -> Tokenizer:
    m = config.model
    return Tokenizer(quantizer=m.quantizer, codebook_size=m.codebook_size, fsq_levels=tuple(m.fsq_levels),
                     embedding_dim=m.embedding_dim, filters=m.filters, channel_multipliers=tuple(m.channel_multipliers),
                     num_res_blocks=m.num_res_blocks, norm_groups=m.norm_groups, channels=m.channels,
                     commitment_cost=m.commitment_cost, l2_normalize=m.l2_normalize,
                     dead_code_weight=m.dead_code_weight, discriminator_filters=m.discriminator_filters,
                     layout=m.get("layout", "maskjax"))  # runs saved before the key existed: the default


register_model(ModelSpec(name="conv_tokenizer", schema=tokenizer_schema, validate=validate_tokenizer,
                         build=tokenizer_from_config))


def check_image_channels(config: ml_collections.ConfigDict, source: Any) -> None:
    channels = int(np.shape(source[0]["image"])[-1])
    if channels != config.model.channels:
        raise ValueError(f"config.model.channels={config.model.channels} but data set {config.data.name!r} has "
                         f"{channels}-channel images")


def image_grid(rows: list[np.ndarray], upscale: int = 4) -> np.ndarray:
    """uint8 [H', W', 3] from rows of images in [-1, 1], each row [n, H, W, C] laid side by side."""
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    grid = np.clip((np.asarray(grid, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    if grid.shape[-1] == 1:
        grid = np.repeat(grid, 3, axis=-1)
    return np.kron(grid, np.ones((upscale, upscale, 1), np.uint8))


def psnr(images: jax.Array, reconstructions: jax.Array) -> jax.Array:
    """float32 [B]: PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = jnp.mean((images.astype(jnp.float32) - reconstructions.astype(jnp.float32)) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


@register_task
class TokenizerTask:
    """Train an image tokenizer. Fields: 'image'. Metrics: loss, PSNR, codebook usage (share of codes used on the
    split) and perplexity (exp of the entropy of the code frequencies)."""

    name = "tokenizer"
    models = ("conv_tokenizer",)
    feature_kinds = ()
    batch_fields = ("image",)
    free_form = ()

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.reconstruction_loss = "l2"  # 'l2' (mean squared error) or 'l1' (mean absolute error) on pixels.
        c.quantizer_weight = 1.0  # Weight of the quantizer's loss (VQ codebook + commitment; FSQ has none).
        # Perceptual term (off at 0): distance between the token features of a frozen maskjax classifier
        # (a 'classification' run on the same data; VGG weights are not available offline) of image and
        # reconstruction, LPIPS-style: unit-normalised per token, squared, averaged over tokens and blocks.
        c.perceptual_weight = 0.0
        c.perceptual_workdir = ""  # The classifier run (needed when perceptual_weight > 0).
        c.perceptual_step = -1  # Its checkpoint step (-1 = latest).
        # Adversarial term (off at 0): hinge loss of a PatchGAN discriminator (model.discriminator_filters > 0),
        # trained in the same step by the same optimizer: each part of the loss reaches only its own parameters.
        c.adversarial_weight = 0.0
        c.adversarial_start = 0  # Optimizer step from which both adversarial terms count (VQGAN starts late).
        return c

    @classmethod
    def default_evals(cls) -> dict[str, dict]:
        return {"eval": {"type": "metrics", "every": 200},
                "reconstructions": {"type": "gallery", "every": 0, "count": 8}}

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        c = config.tokenizer
        if c.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            _fail("tokenizer.reconstruction_loss", c.reconstruction_loss, f"must be one of {RECONSTRUCTION_LOSSES}")
        if c.quantizer_weight < 0:
            _fail("tokenizer.quantizer_weight", c.quantizer_weight, "must be >= 0")
        if c.perceptual_weight < 0:
            _fail("tokenizer.perceptual_weight", c.perceptual_weight, "must be >= 0 (0 = off)")
        if c.adversarial_weight < 0 or c.adversarial_start < 0:
            _fail("tokenizer.adversarial_weight" if c.adversarial_weight < 0 else "tokenizer.adversarial_start",
                  min(c.adversarial_weight, c.adversarial_start), "must be >= 0")
        if c.adversarial_weight > 0 and config.model.discriminator_filters <= 0:
            _fail("tokenizer.adversarial_weight", c.adversarial_weight, "needs a discriminator: set "
                  "model.discriminator_filters > 0")
        if c.perceptual_weight > 0 and not c.perceptual_workdir:
            _fail("tokenizer.perceptual_workdir", c.perceptual_workdir, "needs a classification run on the same data "
                  "when tokenizer.perceptual_weight > 0")

    def __init__(self, config: ml_collections.ConfigDict, *, load_params: Optional[Callable] = None):
        self.config = config
        self.model: Tokenizer = build_model(config)
        self.classifier = None
        c = config.tokenizer
        if c.perceptual_weight > 0:
            from maskjax.tasks.sample_quality import load_classifier
            self.classifier, self.classifier_params, _ = load_classifier(
                c.perceptual_workdir, c.perceptual_step, load_params, config.data.image_size, "tokenizer.perceptual")
            self.classifier_params = jax.tree.map(jnp.asarray, self.classifier_params)

    def perceptual_distance(self, images: jax.Array, reconstructions: jax.Array) -> jax.Array:
        """float32 []: the mean over the classifier's blocks of the squared distance between unit-normalised token
        features of `images` (held fixed) and `reconstructions` (gradients flow to them), averaged over tokens."""
        def block_features(x):
            _, aux = self.classifier.apply({"params": self.classifier_params}, x, train=False)
            return [aux[f"block_{i}"].astype(jnp.float32) for i in range(self.classifier.depth)]

        def unit(x):
            return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-10)
        targets = jax.lax.stop_gradient(block_features(images))
        distances = [jnp.mean(jnp.sum((unit(a) - unit(b)) ** 2, axis=-1))
                     for a, b in zip(block_features(reconstructions), targets)]
        return jnp.mean(jnp.stack(distances))

    def check_data(self, source: Any) -> None:
        check_image_channels(self.config, source)

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        return self.model.init({"params": rng, "quantizer": rng}, batch["image"], train=False)

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True,
             step: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        images = batch["image"]
        chex.assert_rank(images, 4)
        reconstruction, aux = self.model.apply({"params": params}, images, train=train, rngs={"quantizer": rng})
        error = reconstruction.astype(jnp.float32) - images.astype(jnp.float32)
        rec = jnp.mean(error ** 2) if self.config.tokenizer.reconstruction_loss == "l2" else jnp.mean(jnp.abs(error))
        loss = rec + self.config.tokenizer.quantizer_weight * aux["quantizer_loss"]
        used = jnp.zeros((self.model.vocab_size,), bool).at[aux["ids"].reshape(-1)].set(True)
        metrics = {"reconstruction_loss": rec, "quantizer_loss": aux["quantizer_loss"],
                   "batch_codebook_usage": jnp.mean(used.astype(jnp.float32))}
        if self.classifier is not None:
            metrics["perceptual_loss"] = self.perceptual_distance(images, reconstruction)
            loss = loss + self.config.tokenizer.perceptual_weight * metrics["perceptual_loss"]
        c = self.config.tokenizer
        if c.adversarial_weight > 0 and train:
            generator_loss, discriminator_loss = self.adversarial_losses(params, images, reconstruction)
            on = (jnp.asarray(0 if step is None else step) >= c.adversarial_start).astype(jnp.float32)
            loss = loss + on * (c.adversarial_weight * generator_loss + discriminator_loss)
            metrics.update(generator_loss=generator_loss, discriminator_loss=discriminator_loss)
        return loss, metrics

    def adversarial_losses(self, params: Any, images: jax.Array,
                           reconstructions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(generator loss -mean D(x_hat), discriminator hinge loss mean relu(1 - D(x)) + mean relu(1 + D(x_hat))).
        The generator loss sees the discriminator's parameters through stop_gradient and the discriminator loss
        sees the reconstructions through stop_gradient, so one optimizer step on their sum updates each network
        with its own loss only."""
        frozen = dict(params, discriminator=jax.lax.stop_gradient(params["discriminator"]))
        fake_for_generator = self.model.apply({"params": frozen}, reconstructions, method=Tokenizer.discriminate)
        real = self.model.apply({"params": params}, images, method=Tokenizer.discriminate)
        fake = self.model.apply({"params": params}, jax.lax.stop_gradient(reconstructions),
                                method=Tokenizer.discriminate)
        discriminator_loss = jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
        return -jnp.mean(fake_for_generator), discriminator_loss

    def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Sums over the valid rows, and 'code_counts' float32 [codebook size]: how often each code was chosen."""
        images = batch["image"]
        reconstruction, aux = self.model.apply({"params": params}, images, train=False)
        valid = batch["valid"].astype(jnp.float32)
        mse = jnp.mean((reconstruction.astype(jnp.float32) - images) ** 2, axis=(1, 2, 3))
        ids = aux["ids"].reshape(images.shape[0], -1)
        weights = jnp.broadcast_to(valid[:, None], ids.shape).reshape(-1)
        counts = jnp.zeros((self.model.vocab_size,), jnp.float32).at[ids.reshape(-1)].add(weights)
        return {"count": jnp.sum(valid), "mse": jnp.sum(mse * valid),
                "psnr": jnp.sum(psnr(images, reconstruction) * valid), "code_counts": counts}

    @staticmethod
    def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        counts = np.asarray(sums["code_counts"], np.float64)
        frequencies = counts / max(counts.sum(), 1.0)
        entropy = -np.sum(frequencies[frequencies > 0] * np.log(frequencies[frequencies > 0]))
        return {"mse": float(sums["mse"]) / count, "psnr": float(sums["psnr"]) / count,
                "codebook_usage": float(np.mean(counts > 0)), "perplexity": float(math.exp(entropy)),
                "codebook_size": float(len(counts))}

    def predict(self, params: Any, batch: Batch) -> jax.Array:
        """Reconstructions [B, H, W, C] of the images."""
        return self.model.apply({"params": params}, batch["image"], train=False)[0]

    def visualize(self, batch: Mapping[str, np.ndarray], predictions: np.ndarray,
                  class_names: Any = None) -> np.ndarray:
        """Two rows: the images, their reconstructions through the tokens."""
        return image_grid([np.asarray(batch["image"]), np.asarray(predictions)])

    def features(self, params: Any, batch: Batch, kind: str) -> jax.Array:
        raise ValueError("the tokenizer task has no features for probes")
