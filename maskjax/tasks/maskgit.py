"""MaskGIT training (task 'maskgit', model 'maskgit_transformer'): a frozen tokenizer run
(`config.maskgit.tokenizer_workdir`, task 'tokenizer') turns images into token grids; the transformer learns to
predict masked tokens. Per example: r ~ U[0, 1), mask ceil(gamma(r) * N) tokens (gamma = `maskgit.schedule`), and
take the label-smoothed cross-entropy on the masked tokens only. Labels are replaced by the null class with
probability `maskgit.label_drop`, which trains the unconditional branch of classifier-free guidance.

Sampling (`sample`, the 'samples' gallery, `python -m maskjax.sample`) decodes with `maskjax.decode.decode`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskjax.decode import Guidance, check_decode_args, decode, structure_guided_decode
from maskjax.decode import autoregressive as ar_decode
from maskjax.decode import m2t as m2t_decode
from maskjax.evaluate.metrics import softmax_cross_entropy
from maskjax.masking.schedules import (SCHEDULES, check_schedule, halton_order, masked_count_for_training,
                                       step_group_sizes, token_groups)
from maskjax.models.attention_options import AttentionOptions
from maskjax.models.layers import ATTENTION_MAPS, NORM_POSITIONS
from maskjax.models.maskgit import MaskGITTransformer, check_tokens
from maskjax.models.tokenizer import Tokenizer
from maskjax.tasks.base import ModelSpec, build_model, register_model, register_task
from maskjax.tasks.tokenizer import check_image_channels, image_grid, tokenizer_from_config

Batch = Mapping[str, jax.Array]
PURPOSE_TOKEN_MASK = 0x6D67  # folded into the step key: which tokens to mask
PURPOSE_LABEL_DROP = 0x6C64


def maskgit_schema() -> ml_collections.ConfigDict:
    """`config.model` keys of the MaskGIT transformer (besides `name`)."""
    m = ml_collections.ConfigDict()
    m.codebook_size = -1  # Image codes; -1 = the tokenizer's (any other value must equal it).
    m.num_classes = 10  # Classes of the class token (0 = unconditional: every example gets the null class).
    m.width = 256  # Token width.
    m.depth = 4  # Transformer blocks.
    m.num_heads = 4  # Attention heads.
    m.mlp_dim = 1024  # MLP hidden width.
    m.dropout = 0.1  # Dropout on embeddings and in blocks (official MaskGIT: 0.1).
    m.norm_position = "pre"  # 'pre' (ViT) or 'post' (BERT, the official MaskGIT transformer; no final norm).
    m.approximate_gelu = False  # tanh GELU (the official code's jax.nn.gelu default) instead of the exact one.
    m.layer_norm_eps = 1e-6  # LayerNorm epsilon (official MaskGIT: 1e-12).
    m.dtype = "float32"  # Compute dtype ('float32' or 'bfloat16'); parameters stay float32.
    m.attention_backend = "auto"  # Backend of maskjax.attention.attention ('auto', 'reference', 'blocked', ...).
    return m


def _fail(key: str, value: Any, why: str):
    raise ValueError(f"config.{key}={value!r}: {why}")


def validate_maskgit_model(config: ml_collections.ConfigDict) -> None:
    m = config.model
    for key in ("width", "depth", "num_heads", "mlp_dim"):
        if m[key] < 1:
            _fail(f"model.{key}", m[key], "must be >= 1")
    if m.width % m.num_heads:
        _fail("model.width", m.width, f"must be divisible by model.num_heads={m.num_heads}")
    if m.num_classes < 0:
        _fail("model.num_classes", m.num_classes, "must be >= 0 (0 = unconditional)")
    if m.codebook_size == 0 or m.codebook_size < -1:
        _fail("model.codebook_size", m.codebook_size, "must be the tokenizer's codebook size or -1 (take it)")
    if not 0.0 <= m.dropout < 1.0:
        _fail("model.dropout", m.dropout, "must be in [0, 1)")
    if m.norm_position not in NORM_POSITIONS:
        _fail("model.norm_position", m.norm_position, f"must be one of {NORM_POSITIONS}")
    if not m.layer_norm_eps > 0:
        _fail("model.layer_norm_eps", m.layer_norm_eps, "must be > 0")
    if m.dtype not in ("float32", "bfloat16"):
        _fail("model.dtype", m.dtype, "must be 'float32' or 'bfloat16'")
    try:
        AttentionOptions(backend=m.attention_backend)
    except ValueError as err:
        _fail("model.attention_backend", m.attention_backend, str(err))


def read_tokenizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of the tokenizer run `config.<task>.tokenizer_workdir` (its config.json), checked to be one."""
    section = config.task
    workdir = config[section].tokenizer_workdir
    key = f"{section}.tokenizer_workdir"
    if not workdir:
        _fail(key, workdir, "needs the workdir of a trained tokenizer run (task 'tokenizer', e.g. "
              "configs/tokenizer_builtin.py)")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        _fail(key, workdir, "has no config.json (not a maskjax run)")
    with open(path) as f:
        tokenizer_config = ml_collections.ConfigDict(json.load(f))
    if tokenizer_config.get("task") != "tokenizer":
        _fail(key, workdir, f"is a run of task {tokenizer_config.get('task')!r}, not 'tokenizer'")
    return tokenizer_config


def transformer_from_config(config: ml_collections.ConfigDict, codebook_size: int,
                            num_tokens: int) -> MaskGITTransformer:
    m = config.model
    if m.codebook_size not in (-1, codebook_size):
        _fail("model.codebook_size", m.codebook_size, f"differs from the tokenizer's codebook size {codebook_size} "
              f"(config.{config.task}.tokenizer_workdir={config[config.task].tokenizer_workdir!r}); use -1 to take "
              "it")
    return MaskGITTransformer(codebook_size=codebook_size, num_classes=m.num_classes, num_tokens=num_tokens,
                              width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                              dropout=m.dropout, layer_norm_eps=m.get("layer_norm_eps", 1e-6),
                              norm_position=m.get("norm_position", "pre"),
                              approximate_gelu=m.get("approximate_gelu", False), dtype=jnp.dtype(m.dtype),
                              attention=AttentionOptions(backend=m.attention_backend))


def _build_transformer(config: ml_collections.ConfigDict) -> MaskGITTransformer:
    tokenizer = tokenizer_from_config(read_tokenizer_config(config))
    grid = config.data.image_size // tokenizer.downsample
    return transformer_from_config(config, tokenizer.vocab_size, grid * grid)


register_model(ModelSpec(name="maskgit_transformer", schema=maskgit_schema, validate=validate_maskgit_model,
                         build=_build_transformer))


def random_token_mask(key: jax.Array, counts: jax.Array, num_tokens: int) -> jax.Array:
    """bool [B, N]: a uniformly random subset of exactly `counts[b]` tokens per example (True = masked)."""
    noise = jax.random.uniform(key, (counts.shape[0], num_tokens))
    ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
    return ranks < counts[:, None]


class TokenGeneratorBase:
    """What MaskGIT and its autoregressive baseline share: the frozen tokenizer of `config.<task>.tokenizer_workdir`
    (tokenize / detokenize), the class labels (the null class when unconditional), data checks and init."""

    name = ""
    models = ("maskgit_transformer",)
    feature_kinds = ()
    batch_fields = ("image", "label")
    free_form = ()

    def __init__(self, config: ml_collections.ConfigDict, *, load_params: Optional[Callable] = None):
        self.config = config
        self.options = config[self.name]
        tokenizer_config = read_tokenizer_config(config)
        self.tokenizer: Tokenizer = tokenizer_from_config(tokenizer_config)
        if tokenizer_config.data.image_size != config.data.image_size:
            _fail("data.image_size", config.data.image_size, f"differs from the tokenizer run's "
                  f"{tokenizer_config.data.image_size} (config.{self.name}.tokenizer_workdir)")
        self.grid = config.data.image_size // self.tokenizer.downsample
        self.num_tokens = self.grid * self.grid
        self.model: MaskGITTransformer = build_model(config)
        if load_params is None:
            raise ValueError(f"{type(self).__name__} needs `load_params` to read the tokenizer's weights (the trainer "
                             "passes maskjax.train.checkpoint.load_params)")
        self.load_params = load_params  # also reads the classifier of the 'sample_quality' evaluator
        params, _ = load_params(self.options.tokenizer_workdir, self.options.tokenizer_step, "",
                                config_key=f"{self.name}.tokenizer")
        self.tokenizer_params = jax.tree.map(jnp.asarray, params)

    @property
    def mask_id(self) -> int:
        return self.model.mask_id

    def check_data(self, source: Any) -> None:
        check_image_channels(ml_collections.ConfigDict({"model": {"channels": self.tokenizer.channels},
                                                        "data": {"name": self.config.data.name}}), source)
        classes = getattr(source, "num_classes", None)
        if self.config.model.num_classes and classes is not None and classes != self.config.model.num_classes:
            raise ValueError(f"config.model.num_classes={self.config.model.num_classes} but data set "
                             f"{self.config.data.name!r} has {classes} classes")

    def tokenize(self, images: jax.Array) -> jax.Array:
        """int32 [B, N] token ids of images [B, H, W, C] (frozen tokenizer)."""
        ids = self.tokenizer.apply({"params": self.tokenizer_params}, images, method=Tokenizer.encode)
        return jax.lax.stop_gradient(ids.reshape(images.shape[0], -1))

    def detokenize(self, ids: jax.Array) -> jax.Array:
        """Images [B, H, W, C] of token ids int32 [B, N] (the model's grid) or [B, h, w] (any grid, e.g. an
        outpainted canvas: the tokenizer's decoder is convolutional)."""
        if ids.ndim == 2:
            ids = ids.reshape(ids.shape[0], self.grid, self.grid)
        return self.tokenizer.apply({"params": self.tokenizer_params}, ids, method=Tokenizer.decode_ids)

    def _labels(self, batch: Batch) -> jax.Array:
        if self.config.model.num_classes == 0:
            return jnp.full((batch["image"].shape[0],), self.model.null_class, jnp.int32)
        return batch["label"].astype(jnp.int32)

    def _drop_labels(self, labels: jax.Array, key: jax.Array, train: bool) -> jax.Array:
        if train and self.options.label_drop > 0:
            dropped = jax.random.bernoulli(key, self.options.label_drop, labels.shape)
            labels = jnp.where(dropped, self.model.null_class, labels)
        return labels

    def init(self, rng: jax.Array, batch: Batch) -> Any:
        b = batch["image"].shape[0]
        return self.model.init({"params": rng}, jnp.zeros((b, self.num_tokens), jnp.int32),
                               jnp.zeros((b,), jnp.int32), train=False)

    def features(self, params: Any, batch: Batch, kind: str) -> jax.Array:
        raise ValueError(f"the {self.name} task has no features for probes")

    def visualize(self, batch: Mapping[str, np.ndarray], predictions: Mapping[str, np.ndarray],
                  class_names: Any = None) -> np.ndarray:
        """Rows: the real images, samples of the same classes, then the decoding steps of the first sample."""
        real, samples = np.asarray(batch["image"]), np.asarray(predictions["samples"])
        rows = [real, samples]
        if "steps" in predictions:
            steps = np.asarray(predictions["steps"])[:, 0].copy()  # [T, H, W, C]
            masks = np.asarray(predictions["step_masks"])[:, 0].reshape(len(steps), self.grid, self.grid)
            cell = real.shape[1] // self.grid
            steps = np.where(np.kron(masks, np.ones((cell, cell)))[..., None].astype(bool), -1.0, steps)
            width = len(real)
            rows.append(np.concatenate([steps, np.full((max(width - len(steps), 0),) + steps.shape[1:], -1.0)])[:width])
        return image_grid(rows)


@register_task
class MaskGITTask(TokenGeneratorBase):
    """Masked token modeling over a frozen tokenizer's grids. Fields: 'image', 'label'."""

    name = "maskgit"

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.tokenizer_workdir = ""  # Workdir of a trained tokenizer run (task 'tokenizer'); its weights stay frozen.
        c.tokenizer_step = -1  # Its checkpoint step (-1 = latest).
        c.schedule = "cosine"  # Mask schedule gamma of training and decoding (maskjax.masking.schedules).
        c.label_smoothing = 0.1  # Label smoothing of the cross-entropy on masked tokens (official: 0.1).
        c.label_drop = 0.1  # Probability of replacing the class by the null class in training (CFG); 0 = off.
        c.decode_steps = 8  # Decoding steps of the samples evaluators draw.
        c.choice_temperature = 4.5  # Gumbel temperature of the confidence, annealed linearly to 0 (official 4.5).
        c.guidance_scale = 0.0  # Classifier-free guidance w of the samples evaluators draw (0 = off).
        return c

    @classmethod
    def default_evals(cls) -> dict[str, dict]:
        return {"eval": {"type": "metrics", "every": 500},
                "samples": {"type": "gallery", "every": 0, "count": 10},
                # Off until a classifier run is named: evals.quality.classifier_workdir and every >= 0.
                "quality": {"type": "sample_quality", "every": -1}}

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        c = config.maskgit
        try:
            check_schedule(c.schedule, "config.maskgit.schedule")
        except ValueError as err:
            raise ValueError(str(err)) from None
        if not 0.0 <= c.label_smoothing < 1.0:
            _fail("maskgit.label_smoothing", c.label_smoothing, "must be in [0, 1)")
        if not 0.0 <= c.label_drop <= 1.0:
            _fail("maskgit.label_drop", c.label_drop, "must be in [0, 1]")
        if c.guidance_scale < 0:
            _fail("maskgit.guidance_scale", c.guidance_scale, "must be >= 0")
        if c.guidance_scale > 0 and (c.label_drop == 0 or config.model.num_classes == 0):
            _fail("maskgit.guidance_scale", c.guidance_scale, "needs a trained null class: maskgit.label_drop > 0 "
                  "and model.num_classes > 0")
        if c.choice_temperature < 0:
            _fail("maskgit.choice_temperature", c.choice_temperature, "must be >= 0")
        read_tokenizer_config(config)

    def __init__(self, config: ml_collections.ConfigDict, *, load_params: Optional[Callable] = None):
        super().__init__(config, load_params=load_params)
        if self.options.decode_steps < 1 or self.options.decode_steps > self.num_tokens:
            _fail("maskgit.decode_steps", self.options.decode_steps, f"must be in [1, {self.num_tokens}] (the "
                  "number of tokens)")

    def _masked_loss(self, params: Any, ids: jax.Array, labels: jax.Array, key: jax.Array, train: bool,
                     dropout_key: Optional[jax.Array] = None, smoothing: float = 0.0) -> tuple:
        count_key, position_key = jax.random.split(key)
        counts = masked_count_for_training(self.config.maskgit.schedule, count_key, ids.shape[0], self.num_tokens)
        masked = random_token_mask(position_key, counts, self.num_tokens)
        inputs = jnp.where(masked, self.mask_id, ids)
        rngs = {"dropout": dropout_key} if dropout_key is not None else {}
        logits = self.model.apply({"params": params}, inputs, labels, train=train, rngs=rngs)
        losses = softmax_cross_entropy(logits, ids, smoothing)  # [B, N]
        correct = (jnp.argmax(logits, -1) == ids).astype(jnp.float32)
        return losses, correct, masked.astype(jnp.float32)

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True,
             step: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        chex.assert_rank(batch["image"], 4)
        ids = self.tokenize(batch["image"])
        labels = self._labels(batch)
        mask_key, drop_key, dropout_key = jax.random.split(jax.random.fold_in(rng, PURPOSE_TOKEN_MASK), 3)
        labels = self._drop_labels(labels, drop_key, train)
        losses, correct, masked = self._masked_loss(params, ids, labels, mask_key, train, dropout_key,
                                                    self.config.maskgit.label_smoothing)
        total = jnp.maximum(jnp.sum(masked), 1.0)
        return jnp.sum(losses * masked) / total, {"masked_accuracy": jnp.sum(correct * masked) / total,
                                                  "masked_fraction": jnp.mean(masked)}

    def confidence_order_nats(self, params: Any, ids: jax.Array, labels: jax.Array) -> jax.Array:
        """float32 [B, N]: -ln p of each true token when tokens are revealed in MaskGIT's order: at step t of
        `decode_steps` the model reveals the masked tokens it is most confident about (highest max-probability,
        no noise), as many as the schedule decodes at that step. The order depends only on revealed tokens, so a
        decoder can follow it: the sum is a code length, comparable with M2T's and the AR baseline's bits."""
        sizes = step_group_sizes(self.options.schedule, self.num_tokens, self.options.decode_steps)
        current = jnp.full(ids.shape, self.mask_id, jnp.int32)
        nats = jnp.zeros(ids.shape, jnp.float32)
        for size in sizes:
            log_p = jax.nn.log_softmax(self.model.apply({"params": params}, current, labels), axis=-1)
            unknown = current == self.mask_id
            confidence = jnp.where(unknown, jnp.max(log_p, axis=-1), -jnp.inf)
            ranks = jnp.argsort(jnp.argsort(-confidence, axis=-1, stable=True), axis=-1, stable=True)
            chosen = ranks < int(size)
            nats = jnp.where(chosen, -jnp.take_along_axis(log_p, ids[..., None], -1)[..., 0], nats)
            current = jnp.where(chosen, ids, current)
        return nats

    def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Cross-entropy (nats, no smoothing) and accuracy on masked tokens, with a fixed draw of the masks; the
        code length of every token in MaskGIT's confidence order (`confidence_order_nats`)."""
        ids = self.tokenize(batch["image"])
        labels = self._labels(batch)
        losses, correct, masked = self._masked_loss(params, ids, labels, jax.random.key(0), False)
        valid = batch["valid"].astype(jnp.float32)[:, None]
        masked = masked * valid
        order_nats = self.confidence_order_nats(params, ids, labels)
        return {"count": jnp.sum(valid), "masked_tokens": jnp.sum(masked),
                "cross_entropy": jnp.sum(losses * masked), "masked_accuracy": jnp.sum(correct * masked),
                "tokens": jnp.sum(valid * jnp.ones_like(order_nats)), "order_nats": jnp.sum(order_nats * valid)}

    @staticmethod
    def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
        tokens = max(float(sums["masked_tokens"]), 1.0)
        nats = float(sums["cross_entropy"]) / tokens
        return {"loss": nats, "bits_per_masked_token": nats / float(np.log(2.0)),
                "masked_accuracy": float(sums["masked_accuracy"]) / tokens,
                "bits_per_token": float(sums["order_nats"]) / max(float(sums["tokens"]), 1.0) / float(np.log(2.0))}

    def attention_maps(self, params: Any, tokens: jax.Array, labels: jax.Array, layer: int = -1) -> jax.Array:
        """float32 [B, N, N]: block `layer`'s head-averaged self-attention among the image tokens (rows
        renormalised after dropping the class token), for fully known `tokens` [B, N]."""
        _, state = self.model.apply({"params": params}, tokens, labels, mutable=[ATTENTION_MAPS])
        block = f"block_{layer % self.model.depth}"
        probs = state[ATTENTION_MAPS]["encoder"][block]["attn"]["probs"][0][:, 1:, 1:]
        return probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-9)

    def sample(self, params: Any, labels: jax.Array, rng: jax.Array, *, num_steps: Optional[int] = None,
               schedule: Optional[str] = None, choice_temperature: Optional[float] = None,
               guidance_scale: Optional[float] = None, guidance_ramp: str = "constant",
               tokens: Optional[jax.Array] = None, temperature: float = 1.0, top_k: int = 0,
               structure_guide: Optional[jax.Array] = None, structure_weight: float = 1.0,
               structure_layer: int = -1) -> tuple[jax.Array, jax.Array]:
        """(final token ids int32 [B, N], every step's ids [T, B, N]) for class `labels` int32 [B] (the null class
        for unconditional samples), decoding from `tokens` (default: all masked). Unset options come from
        `config.maskgit`. `structure_guide`: token ids [B or 1, N] of a guide image whose layout the samples
        follow (MaskSketch, `maskjax.decode.structure_guided_decode`: sampling starts from the guide's tokens and
        re-masks those whose block-`structure_layer` attention maps differ from the guide's, weighted by
        `structure_weight`)."""
        c = self.config.maskgit
        num_steps = c.decode_steps if num_steps is None else num_steps
        schedule = c.schedule if schedule is None else schedule
        choice_temperature = c.choice_temperature if choice_temperature is None else choice_temperature
        guidance_scale = c.guidance_scale if guidance_scale is None else guidance_scale
        if structure_guide is not None and tokens is not None:
            raise ValueError("structure_guide: sampling starts from the guide's tokens; do not pass `tokens`")
        if tokens is None:
            tokens = jnp.full((labels.shape[0], self.num_tokens), self.mask_id, jnp.int32)
        check_decode_args(tuple(tokens.shape), num_steps, schedule, 0, None, temperature, top_k, self.mask_id)
        if guidance_scale > 0 and (self.config.model.num_classes == 0 or c.label_drop == 0):
            raise ValueError(f"guidance_scale={guidance_scale}: this model has no trained null class "
                             f"(config.maskgit.label_drop={c.label_drop}, model.num_classes="
                             f"{self.config.model.num_classes})")

        def logits_fn(current, with_labels=labels):
            return self.model.apply({"params": params}, current, with_labels, train=False)

        guidance = None
        if guidance_scale > 0:
            null = jnp.full_like(labels, self.model.null_class)
            guidance = Guidance(guidance_scale, lambda current: logits_fn(current, null), guidance_ramp)
        if structure_guide is None:
            return decode(tokens, rng, logits_fn, num_steps, schedule, mask_id=self.mask_id,
                          choice_temperature=choice_temperature, guidance=guidance, temperature=temperature,
                          top_k=top_k)
        guide = jnp.asarray(structure_guide, jnp.int32)
        if guide.ndim != 2 or guide.shape[1] != self.num_tokens or guide.shape[0] not in (1, labels.shape[0]):
            raise ValueError(f"structure_guide: expected token ids [1 or {labels.shape[0]}, {self.num_tokens}], "
                             f"got shape {tuple(guide.shape)}")
        if not isinstance(guide, jax.core.Tracer):
            check_tokens(guide, self.mask_id, allow_mask=False, name="structure_guide")
        if top_k or guidance_ramp != "constant":
            raise ValueError("structure_guide: top_k and a guidance ramp are not supported with structure guidance")

        def guided_logits(current):
            if guidance is None:
                return logits_fn(current)
            return (1.0 + guidance_scale) * logits_fn(current) - guidance_scale * guidance.uncond_logits_fn(current)
        guide_maps = self.attention_maps(params, guide, labels[:guide.shape[0]], structure_layer)
        return structure_guided_decode(
            guide, rng, guided_logits, lambda t: self.attention_maps(params, t, labels, structure_layer),
            guide_maps, num_steps, schedule, mask_id=self.mask_id, structure_weight=structure_weight,
            choice_temperature=choice_temperature, temperature=temperature, batch_size=labels.shape[0])

    def inpaint(self, params: Any, tokens: jax.Array, region: jax.Array, labels: jax.Array, rng: jax.Array,
                **sampling) -> jax.Array:
        """Token ids int32 [B, N] with the tokens where `region` (bool [N] or [B, N], e.g. from
        `maskjax.decode.box_to_token_mask`) regenerated for class `labels` [B]; the others come back
        bit-identical. Class-conditional regeneration of a region is the same call with another label."""
        region = jnp.broadcast_to(jnp.asarray(region, bool), tokens.shape)
        return self.sample(params, labels, rng, tokens=jnp.where(region, self.mask_id, tokens), **sampling)[0]

    def outpaint(self, params: Any, tokens: jax.Array, labels: jax.Array, rng: jax.Array, *, extend: int,
                 direction: str = "right", **sampling) -> jax.Array:
        """Extrapolation to a larger canvas: token ids [B, N] of a (gh x gw) grid -> [B, gh, gw + extend] ('right')
        or [B, gh + extend, gw] ('down'). The canvas grows by windows of the model's grid: each window keeps the
        last known columns (rows) and decodes the new ones, so every decoding sees as much context as fits; the
        given tokens come back bit-identical."""
        if direction not in ("right", "down"):
            raise ValueError(f"direction={direction!r}: must be 'right' or 'down'")
        size = self.grid
        if not 1 <= extend:
            raise ValueError(f"extend={extend}: must be >= 1 token column (row)")
        canvas = tokens.reshape(tokens.shape[0], size, size)
        if direction == "down":
            canvas = jnp.swapaxes(canvas, 1, 2)
        step = max(size // 2, 1)  # new columns per window: half a window of context stays known
        added = 0
        while added < extend:
            new = min(step, extend - added)
            window = jnp.concatenate([canvas[:, :, canvas.shape[2] - (size - new):],
                                      jnp.full((canvas.shape[0], size, new), self.mask_id, jnp.int32)], axis=2)
            if direction == "down":
                window = jnp.swapaxes(window, 1, 2)
            filled = self.sample(params, labels, jax.random.fold_in(rng, added),
                                 tokens=window.reshape(window.shape[0], -1), **sampling)[0]
            filled = filled.reshape(window.shape)
            if direction == "down":
                filled = jnp.swapaxes(filled, 1, 2)
            canvas = jnp.concatenate([canvas, filled[:, :, size - new:]], axis=2)
            added += new
        return jnp.swapaxes(canvas, 1, 2) if direction == "down" else canvas

    def generate_images(self, params: Any, labels: jax.Array, rng: jax.Array, **sampling) -> jax.Array:
        """Images [B, H, W, C] sampled for class `labels` int32 [B] (options of `sample`)."""
        return self.detokenize(self.sample(params, labels, rng, **sampling)[0])

    @staticmethod
    def sampling_overrides(options: ml_collections.ConfigDict) -> dict:
        """`sample` keywords from a sample_quality evaluator's options (unset ones keep config.maskgit's)."""
        out = {}
        if options.decode_steps > 0:
            out["num_steps"] = int(options.decode_steps)
        if options.guidance_scale >= 0:
            out["guidance_scale"] = float(options.guidance_scale)
        if options.choice_temperature >= 0:
            out["choice_temperature"] = float(options.choice_temperature)
        return out

    def predict(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Class-conditional samples for the batch's labels, as images, with the images of every decoding step."""
        final, history = self.sample(params, self._labels(batch), jax.random.key(0))
        steps = jax.vmap(self.detokenize)(jnp.where(history == self.mask_id, 0, history))
        return {"samples": self.detokenize(final), "steps": steps, "step_masks": history == self.mask_id}


class CachedTokenGenerator(TokenGeneratorBase):
    """What the autoregressive baseline and M2T share: decoding with the model's key/value cache under a fixed
    attention mask over the N + 1 positions (`decode_mask`), and no MaskGIT sampling options."""

    def decode_mask(self) -> jax.Array:
        """bool [1, 1, N + 1, N + 1]: who may attend to whom while decoding (True = may attend)."""
        raise NotImplementedError

    def empty_cache(self, params: Any, batch_size: int) -> Any:
        """The model's key/value cache for N + 1 positions, zeroed."""
        length = self.num_tokens + 1
        _, state = self.model.apply({"params": params}, jnp.zeros((batch_size, length), jnp.int32),
                                    jnp.arange(length), self.decode_mask(),
                                    method=MaskGITTransformer.at_positions, mutable=["cache"])
        return jax.tree.map(jnp.zeros_like, state["cache"])

    def cached_step_fn(self, params: Any) -> Callable:
        """(cache, ids [B, n], positions [n], mask) -> (logits [B, n, K], cache): the decoders' model step."""
        def step_fn(cache, ids, positions, mask):
            logits, state = self.model.apply({"params": params, "cache": cache}, ids, positions, mask,
                                             method=MaskGITTransformer.at_positions, mutable=["cache"])
            return logits, state["cache"]
        return step_fn

    def generate_images(self, params: Any, labels: jax.Array, rng: jax.Array, **sampling) -> jax.Array:
        """Images [B, H, W, C] sampled for class `labels` int32 [B] (options of `sample`)."""
        return self.detokenize(self.sample(params, labels, rng, **sampling))

    @classmethod
    def sampling_overrides(cls, options: ml_collections.ConfigDict) -> dict:
        """The sample_quality options that apply here: none (decode steps, guidance and choice temperature are
        MaskGIT's); ValueErrors when one is set."""
        for key, unset in (("decode_steps", 0), ("guidance_scale", -1.0), ("choice_temperature", -1.0)):
            if options[key] != unset:
                raise ValueError(f"config.evals.<sample_quality>.{key}={options[key]!r}: the {cls.name} task has no "
                                 f"such setting (its decoding is set in config.{cls.name}); leave it at {unset}")
        return {}

    def predict(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Class-conditional samples for the batch's labels, as images."""
        return {"samples": self.generate_images(params, self._labels(batch), jax.random.key(0))}


@register_task
class AutoregressiveTask(CachedTokenGenerator):
    """The autoregressive baseline: the same transformer, causal in raster order over [class, t_1 .. t_N] (position
    j predicts t_{j+1}), trained with next-token cross-entropy on every token and sampled with a key/value cache
    (`maskjax.decode.autoregressive`). Fields: 'image', 'label'."""

    name = "autoregressive"

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.tokenizer_workdir = ""  # Workdir of a trained tokenizer run (task 'tokenizer'); its weights stay frozen.
        c.tokenizer_step = -1  # Its checkpoint step (-1 = latest).
        c.label_smoothing = 0.0  # Label smoothing of the next-token cross-entropy.
        c.temperature = 1.0  # Sampling temperature.
        c.top_k = 0  # Sample among the k most likely codes (0 = all).
        return c

    @classmethod
    def default_evals(cls) -> dict[str, dict]:
        return {"eval": {"type": "metrics", "every": 500},
                "samples": {"type": "gallery", "every": 0, "count": 10},
                "quality": {"type": "sample_quality", "every": -1}}

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        c = config.autoregressive
        if not 0.0 <= c.label_smoothing < 1.0:
            _fail("autoregressive.label_smoothing", c.label_smoothing, "must be in [0, 1)")
        if c.temperature <= 0:
            _fail("autoregressive.temperature", c.temperature, "must be > 0")
        if c.top_k < 0:
            _fail("autoregressive.top_k", c.top_k, "must be >= 0 (0 = off)")
        read_tokenizer_config(config)

    def _drop_labels(self, labels: jax.Array, key: jax.Array, train: bool) -> jax.Array:
        return labels  # no classifier-free guidance for the baseline

    def _logits(self, params: Any, ids: jax.Array, labels: jax.Array, train: bool = False,
                dropout_key: Optional[jax.Array] = None) -> jax.Array:
        """[B, N, K]: the logits of every image token given the tokens before it."""
        rngs = {"dropout": dropout_key} if dropout_key is not None else {}
        logits = self.model.apply({"params": params}, ids, labels, train=train, rngs=rngs,
                                  mask=ar_decode.causal_mask(self.num_tokens + 1), all_positions=True)
        return logits[:, :-1]

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True,
             step: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        chex.assert_rank(batch["image"], 4)
        ids = self.tokenize(batch["image"])
        logits = self._logits(params, ids, self._labels(batch), train, jax.random.fold_in(rng, PURPOSE_TOKEN_MASK))
        losses = softmax_cross_entropy(logits, ids, self.options.label_smoothing)
        return jnp.mean(losses), {"accuracy": jnp.mean((jnp.argmax(logits, -1) == ids).astype(jnp.float32))}

    def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Cross-entropy (nats, no smoothing) and accuracy of every token given its predecessors."""
        ids = self.tokenize(batch["image"])
        logits = self._logits(params, ids, self._labels(batch))
        valid = batch["valid"].astype(jnp.float32)[:, None]
        losses = softmax_cross_entropy(logits, ids)
        return {"count": jnp.sum(valid), "tokens": jnp.sum(valid * jnp.ones_like(losses)),
                "cross_entropy": jnp.sum(losses * valid),
                "accuracy": jnp.sum((jnp.argmax(logits, -1) == ids) * valid)}

    @staticmethod
    def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
        tokens = max(float(sums["tokens"]), 1.0)
        nats = float(sums["cross_entropy"]) / tokens
        return {"loss": nats, "bits_per_token": nats / float(np.log(2.0)),
                "accuracy": float(sums["accuracy"]) / tokens}

    def decode_mask(self) -> jax.Array:
        return ar_decode.causal_mask(self.num_tokens + 1)

    def sample(self, params: Any, labels: jax.Array, rng: jax.Array, *, cached: bool = True,
               temperature: Optional[float] = None, top_k: Optional[int] = None) -> jax.Array:
        """Token ids int32 [B, N] for class `labels` int32 [B], in raster order, with the key/value cache or (the
        reference) a full causal pass per token; both draw the same samples."""
        temperature = self.options.temperature if temperature is None else temperature
        top_k = self.options.top_k if top_k is None else top_k
        prefix = self.model.class_token_ids(labels)[:, None]
        length = self.num_tokens + 1
        if not cached:
            def forward(sequence):
                return self.model.apply({"params": params}, sequence[:, 1:], labels,
                                        mask=ar_decode.causal_mask(length), all_positions=True)
            return ar_decode.uncached_decode(prefix, rng, forward, length, temperature=temperature, top_k=top_k)
        return ar_decode.decode_cached(prefix, rng, self.cached_step_fn(params),
                                       self.empty_cache(params, labels.shape[0]), length, temperature=temperature,
                                       top_k=top_k)


@register_task
class M2TTask(CachedTokenGenerator):
    """M2T (Mentzer et al. 2023): MaskGIT with a fixed, data-independent decoding order (token groups of a quasi-random
    Halton order, sized by the schedule), trained with masked inputs *and* an attention mask in which a token sees
    only the class token and tokens of earlier groups, so decoding can cache the keys and values of decoded groups
    (`maskjax.decode.m2t`). Per example: a step t ~ U{1..T}; groups >= t are masked; cross-entropy on the masked
    tokens. Quality: bits per token, -log2 p of the true tokens of each group given the earlier ones. Fields:
    'image', 'label'."""

    name = "m2t"

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.tokenizer_workdir = ""  # Workdir of a trained tokenizer run (task 'tokenizer'); its weights stay frozen.
        c.tokenizer_step = -1  # Its checkpoint step (-1 = latest).
        c.schedule = "cosine"  # Mask schedule that sizes the groups (maskjax.masking.schedules).
        c.decode_steps = 8  # Groups T (decoding steps).
        c.order = "halton"  # Token order: 'halton' (quasi-random, spread over the grid) or 'raster'.
        c.label_smoothing = 0.1  # Label smoothing of the cross-entropy on masked tokens.
        c.temperature = 1.0  # Sampling temperature.
        return c

    @classmethod
    def default_evals(cls) -> dict[str, dict]:
        return {"eval": {"type": "metrics", "every": 500},
                "samples": {"type": "gallery", "every": 0, "count": 10},
                "quality": {"type": "sample_quality", "every": -1}}

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        c = config.m2t
        try:
            check_schedule(c.schedule, "config.m2t.schedule")
        except ValueError as err:
            raise ValueError(str(err)) from None
        if c.order not in ("halton", "raster"):
            _fail("m2t.order", c.order, "must be 'halton' or 'raster'")
        if not 0.0 <= c.label_smoothing < 1.0:
            _fail("m2t.label_smoothing", c.label_smoothing, "must be in [0, 1)")
        if c.temperature <= 0:
            _fail("m2t.temperature", c.temperature, "must be > 0")
        if not 1 <= c.decode_steps <= 30:
            _fail("m2t.decode_steps", c.decode_steps, "must be in [1, 30] (group routing holds 31 groups)")
        read_tokenizer_config(config)

    def __init__(self, config: ml_collections.ConfigDict, *, load_params: Optional[Callable] = None):
        super().__init__(config, load_params=load_params)
        o = self.options
        if o.decode_steps > self.num_tokens:
            _fail("m2t.decode_steps", o.decode_steps, f"must be <= {self.num_tokens} (the number of tokens)")
        order = halton_order((self.grid, self.grid)) if o.order == "halton" else np.arange(self.num_tokens)
        self.token_group = token_groups(order, step_group_sizes(o.schedule, self.num_tokens, o.decode_steps))
        self.groups = np.concatenate([[0], self.token_group]).astype(np.int32)  # [N + 1], class token in group 0

    def _routing(self):
        return m2t_decode.attention_mask(self.groups)

    def _masked_inputs(self, ids: jax.Array, first_masked_group: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(inputs int32 [B, N], masked bool [B, N]): groups >= `first_masked_group` [B] replaced by the mask id."""
        masked = jnp.asarray(self.token_group)[None] >= first_masked_group[:, None]
        return jnp.where(masked, self.mask_id, ids), masked

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True,
             step: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        chex.assert_rank(batch["image"], 4)
        ids = self.tokenize(batch["image"])
        step_key, dropout_key = jax.random.split(jax.random.fold_in(rng, PURPOSE_TOKEN_MASK))
        first = jax.random.randint(step_key, (ids.shape[0],), 1, self.options.decode_steps + 1)
        inputs, masked = self._masked_inputs(ids, first)
        logits = self.model.apply({"params": params}, inputs, self._labels(batch), train=train,
                                  rngs={"dropout": dropout_key}, mask=self._routing())
        losses = softmax_cross_entropy(logits, ids, self.options.label_smoothing)
        weights = masked.astype(jnp.float32)
        total = jnp.maximum(jnp.sum(weights), 1.0)
        accuracy = jnp.sum((jnp.argmax(logits, -1) == ids) * weights) / total
        return jnp.sum(losses * weights) / total, {"masked_accuracy": accuracy}

    def group_nats(self, params: Any, ids: jax.Array, labels: jax.Array) -> jax.Array:
        """float32 [B, N]: -ln p of each true token given the tokens of earlier groups (the M2T schedule), one
        forward pass per group."""
        nats = jnp.zeros(ids.shape, jnp.float32)
        for group in range(1, self.options.decode_steps + 1):
            inputs, _ = self._masked_inputs(ids, jnp.full((ids.shape[0],), group))
            logits = self.model.apply({"params": params}, inputs, labels, mask=self._routing())
            this = jnp.asarray(self.token_group == group)[None]
            nats = jnp.where(this, softmax_cross_entropy(logits, ids), nats)
        return nats

    def eval_sums(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        ids = self.tokenize(batch["image"])
        nats = self.group_nats(params, ids, self._labels(batch))
        valid = batch["valid"].astype(jnp.float32)[:, None]
        return {"count": jnp.sum(valid), "tokens": jnp.sum(valid * jnp.ones_like(nats)),
                "cross_entropy": jnp.sum(nats * valid)}

    @staticmethod
    def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
        nats = float(sums["cross_entropy"]) / max(float(sums["tokens"]), 1.0)
        return {"loss": nats, "bits_per_token": nats / float(np.log(2.0))}

    def decode_mask(self) -> jax.Array:
        return self._routing()

    def sample(self, params: Any, labels: jax.Array, rng: jax.Array, *, cached: bool = True,
               temperature: Optional[float] = None) -> jax.Array:
        """Token ids int32 [B, N] for class `labels` [B], decoded group by group with the key/value cache or (the
        reference) a full masked forward pass per group; both draw the same samples."""
        temperature = self.options.temperature if temperature is None else temperature
        prefix = self.model.class_token_ids(labels)[:, None]
        if not cached:
            def forward(sequence, mask):
                logits = self.model.apply({"params": params}, sequence[:, 1:], labels, mask=mask)
                return jnp.concatenate([jnp.zeros_like(logits[:, :1]), logits], axis=1)  # position 0: no logits
            return m2t_decode.decode_uncached(prefix, rng, forward, self.groups, mask_id=self.mask_id,
                                              temperature=temperature)
        return m2t_decode.decode_cached(prefix, rng, self.cached_step_fn(params),
                                        self.empty_cache(params, labels.shape[0]), self.groups, mask_id=self.mask_id,
                                        temperature=temperature)

    def _drop_labels(self, labels: jax.Array, key: jax.Array, train: bool) -> jax.Array:
        return labels


__all__ = ["MaskGITTask", "AutoregressiveTask", "M2TTask", "TokenGeneratorBase", "maskgit_schema",
           "random_token_mask", "SCHEDULES"]
