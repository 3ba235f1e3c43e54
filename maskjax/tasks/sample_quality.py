"""Evaluator 'sample_quality': class-conditional samples of a generative task scored in the feature space of a
maskjax classifier trained on the same data (a run of task 'classification', e.g. configs/vit_builtin.py):
Fréchet distance, KID, k-NN precision / recall (k = 3) against real images of a split, the classifier's accuracy
on the samples (is each sample of the class it was asked for?), and a grid of samples per class.

The task provides `generate_images(params, labels, rng, **sampling) -> images [B, H, W, C]` and
`sampling_overrides(options) -> dict`, and keeps the trainer's `load_params` (to read the classifier).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskjax.evaluate import generative
from maskjax.evaluate.evaluators import EvalResult, Evaluator, register_evaluator
from maskjax.tasks.common import vit_from_config


def load_classifier(workdir: str, step: int, load_params, image_size: int, key: str) -> tuple[Any, Any, int]:
    """(ViT, params, num_classes) of a classification run; ValueErrors name `config.<key>.classifier_workdir`."""
    def fail(why):
        raise ValueError(f"config.{key}.classifier_workdir={workdir!r}: {why}")
    if not workdir:
        fail("needs the workdir of a classifier trained on the same data (task 'classification', e.g. "
             "configs/vit_builtin.py)")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        fail("has no config.json (not a maskjax run)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.get("task") != "classification":
        fail(f"is a run of task {config.get('task')!r}, not 'classification'")
    if config.data.image_size != image_size:
        fail(f"was trained on {config.data.image_size}px images, the samples are {image_size}px")
    if load_params is None:
        fail("the task was built without `load_params` (the trainer passes maskjax.train.checkpoint.load_params)")
    params, _ = load_params(workdir, step, "", config_key=key)
    model = vit_from_config(config.model).clone(drop_path_rate=0.0, dropout=0.0)
    return model, jax.tree.map(jnp.asarray, params), int(config.model.num_classes)


@register_evaluator
class SampleQualityEvaluator(Evaluator):
    type = "sample_quality"

    @classmethod
    def options(cls) -> ml_collections.ConfigDict:
        o = ml_collections.ConfigDict()
        o.classifier_workdir = ""  # A classification run on the same data; its pre-logits are the feature space.
        o.classifier_step = -1  # Its checkpoint step (-1 = latest).
        o.num_samples = 1000  # Samples drawn, class-balanced (label i % num_classes).
        o.real_examples = 1000  # Real images of `split` they are compared with (-1 = all).
        o.split = ""  # Split of the real images ('' = config.data.eval_split).
        o.batch_size = 100  # Samples decoded at once.
        o.decode_steps = 0  # Decoding steps (0 = the task's default).
        o.guidance_scale = -1.0  # Classifier-free guidance w (-1 = the task's default).
        o.choice_temperature = -1.0  # Confidence noise temperature (-1 = the task's default).
        o.kid_subsets = 10  # KID: random subsets averaged.
        o.kid_subset_size = 1000  # KID: rows per subset (capped by the sample counts).
        o.knn_k = 3  # Precision / recall: k of the k-NN radii.
        o.grid_per_class = 4  # Samples per class in the grid image (0 = no image).
        # Optional Inception FID: the pytorch-fid weights file (pt_inception-2015-12-05-6726825d.pth, or the same
        # state dict as .safetensors) the user supplies; '' = off (maskjax downloads nothing).
        o.inception_weights = ""
        return o

    @classmethod
    def validate(cls, name, options, config, task_cls) -> None:
        def fail(key, why):
            raise ValueError(f"config.evals.{name}.{key}={options[key]!r}: {why}")
        if not hasattr(task_cls, "generate_images"):
            fail("type", f"task {task_cls.name!r} does not generate images")
        if int(options.every) >= 0 and not options.classifier_workdir:
            fail("classifier_workdir", "needs the workdir of a classifier trained on the same data (task "
                 "'classification', e.g. configs/vit_builtin.py)")
        for key in ("num_samples", "batch_size", "kid_subsets", "kid_subset_size", "knn_k"):
            if options[key] < 1:
                fail(key, "must be >= 1")
        if options.num_samples <= options.knn_k:
            fail("num_samples", f"must exceed knn_k={options.knn_k}")
        if options.real_examples == 0 or options.real_examples < -1:
            fail("real_examples", "must be a positive count or -1 (all)")
        if options.grid_per_class < 0:
            fail("grid_per_class", "must be >= 0")

    def check(self) -> None:
        ctx = self.context
        source = ctx.source(self.opts.split)
        if int(self.opts.real_examples) > len(source):
            raise ValueError(f"config.evals.{self.name}.real_examples={self.opts.real_examples} exceeds the "
                             f"{len(source)} examples of the split")
        self.classifier, self.classifier_params, classes = load_classifier(
            self.opts.classifier_workdir, int(self.opts.classifier_step), getattr(ctx.task, "load_params", None),
            ctx.config.data.image_size, f"evals.{self.name}")
        task_classes = ctx.config.model.num_classes
        if task_classes and classes != task_classes:
            raise ValueError(f"config.evals.{self.name}.classifier_workdir={self.opts.classifier_workdir!r}: its "
                             f"classifier has {classes} classes, the generator {task_classes}")
        self.num_classes = classes
        self.sampling = ctx.task.sampling_overrides(self.opts)
        self.inception = None
        if self.opts.inception_weights:
            from maskjax.evaluate.inception import load_fid_inception
            try:
                self.inception = jax.tree.map(jnp.asarray, load_fid_inception(self.opts.inception_weights))
            except ValueError as error:
                raise ValueError(f"config.evals.{self.name}.inception_weights: {error}") from None

    def _inception(self, images: np.ndarray) -> np.ndarray:
        from maskjax.evaluate.inception import fid_inception_features
        if not hasattr(self, "_inception_fn"):
            self._inception_fn = jax.jit(fid_inception_features)
        return np.asarray(self._inception_fn(self.inception, jnp.asarray(images)), np.float64)

    def _classify(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "_classify_fn"):
            model = self.classifier
            self._classify_fn = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
        logits, aux = self._classify_fn(self.classifier_params, jnp.asarray(images))
        return np.asarray(aux["pre_logits"], np.float64), np.asarray(logits)

    def run(self, params: Any, step: int) -> EvalResult:
        from maskjax.data import pipeline

        ctx, o = self.context, self.opts
        params = ctx.host_params(params)
        if not ctx.is_main:
            return EvalResult()
        source = ctx.source(o.split)
        real_count = len(source) if int(o.real_examples) < 0 else int(o.real_examples)
        real_features, real_inception = [], []
        for batch in pipeline.eval_batches(source, global_batch_size=int(o.batch_size),
                                           image_size=ctx.config.data.image_size, num_examples=real_count,
                                           num_threads=ctx.config.data.num_threads, prefetch=ctx.config.data.prefetch):
            features, _ = self._classify(batch["image"])
            real_features.append(features[np.asarray(batch["valid"])])
            if self.inception is not None:
                real_inception.append(self._inception(batch["image"])[np.asarray(batch["valid"])])
        real = np.concatenate(real_features)[:real_count]

        if not hasattr(self, "_generate"):
            self._generate = jax.jit(lambda p, labels, key: ctx.task.generate_images(p, labels, key, **self.sampling))
        total, size = int(o.num_samples), int(o.batch_size)
        labels = np.arange(total) % self.num_classes
        key = jax.random.fold_in(jax.random.key(ctx.config.seed), step)
        fake, correct, grid_images, fake_inception = [], [], [], []
        for start in range(0, total, size):
            chunk = labels[start:start + size]
            padded = np.concatenate([chunk, np.zeros(size - len(chunk), chunk.dtype)])
            images = np.asarray(self._generate(params, jnp.asarray(padded, jnp.int32),
                                               jax.random.fold_in(key, start)))[:len(chunk)]
            features, logits = self._classify(images)
            fake.append(features)
            correct.append(logits.argmax(-1) == chunk)
            if self.inception is not None:
                fake_inception.append(self._inception(images))
            grid_images.append(images)
        fake = np.concatenate(fake)
        mu_r, sigma_r = generative.gaussian_stats(real)
        mu_f, sigma_f = generative.gaussian_stats(fake)
        kid, kid_std = generative.kernel_inception_distance(
            real, fake, num_subsets=int(o.kid_subsets), subset_size=int(o.kid_subset_size),
            rng=np.random.default_rng(ctx.config.seed))
        precision, recall = generative.precision_recall(real, fake, k=int(o.knn_k))
        scalars = {"frechet_distance": generative.frechet_distance(mu_r, sigma_r, mu_f, sigma_f), "kid": kid,
                   "kid_std": kid_std, "precision": precision, "recall": recall,
                   "class_accuracy": float(np.mean(np.concatenate(correct))), "num_samples": float(total),
                   "num_real": float(len(real))}
        if self.inception is not None:
            real_i, fake_i = np.concatenate(real_inception)[:real_count], np.concatenate(fake_inception)
            scalars["inception_fid"] = generative.frechet_distance(*generative.gaussian_stats(real_i),
                                                                   *generative.gaussian_stats(fake_i))
        images = {}
        per_class = min(int(o.grid_per_class), total // self.num_classes)
        if per_class:
            all_images = np.concatenate(grid_images)
            rows = [all_images[c::self.num_classes][:per_class] for c in range(self.num_classes)]
            from maskjax.tasks.tokenizer import image_grid
            images[f"{self.name}_per_class"] = image_grid(rows, upscale=2)
        return EvalResult(scalars=scalars, images=images)
