"""Evaluators: what runs on the model during and after training, configured as `config.evals.<name>`.

Each entry has a `type` (a registered evaluator), `every` (steps between runs; 0 = at the end only, -1 = never;
every evaluator that runs at all also runs at the end) and the options of its type. An evaluator returns scalars
(written as `<name>/<metric>` to metrics.jsonl and TensorBoard) and images (`images/<name>_step<N>.png`). A family
adds its own types with `register_evaluator` (sampling grids, Fréchet distance, mIoU, PQ) and never touches the
trainer, which lends every evaluator an `EvalContext` (data, the mesh, jit). See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


@dataclasses.dataclass
class EvalResult:
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # name -> uint8 [H, W, 3]


class EvalContext(Protocol):
    """What the trainer lends an evaluator (maskjax.train.trainer._TrainerEvalContext implements it)."""

    config: ml_collections.ConfigDict
    task: Any
    is_main: bool
    batch_shards: int  # devices the batch is split over; global batch sizes must divide by it
    process_count: int

    def source(self, split: str) -> Any:
        """The data source of `split` ('' = config.data.eval_split; 'train' = the training source itself)."""

    def batches(self, source: Any, *, batch_size: int, num_examples: int,
                fields: Sequence[str]) -> Iterator[dict[str, jax.Array]]:
        """One in-order pass over the first `num_examples` (-1 = all) of `source` as global, sharded batches of
        `fields` plus 'valid' (bool [B], False on the padding rows of the last batch)."""

    def jit(self, fn: Callable[[Any, Mapping[str, jax.Array]], Any]) -> Callable:
        """`fn(params, batch)` compiled with the state's parameter shardings, batch-sharded inputs and replicated
        outputs (one compilation per set of batch fields)."""

    def host_params(self, params: Any) -> Any:
        """The parameters as numpy arrays on every process."""

    def initial_params(self) -> Any:
        """The parameters of this run at initialisation (step 0), sharded like the state's."""


class Evaluator:
    """Base class: `options()` is the schema of its options (besides `type` and `every`), `check` validates them
    against the data before any compute, `run` evaluates the parameters of one step. `opts` is the config entry
    itself (`config.evals.<name>`), so what an evaluator reads is visible to the config-key tests."""

    type: ClassVar[str] = ""

    @classmethod
    def options(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict()

    @classmethod
    def validate(cls, name: str, options: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                 task_cls: type) -> None:
        """ValueErrors naming `config.evals.<name>.<key>`, from the config alone."""

    def __init__(self, name: str, options: ml_collections.ConfigDict, context: EvalContext):
        self.name, self.opts, self.context = name, options, context

    def check(self) -> None:
        """ValueErrors naming `config.evals.<name>.<key>` when the options do not fit the data or the mesh."""

    def run(self, params: Any, step: int) -> EvalResult:
        raise NotImplementedError


EVALUATORS: dict[str, type[Evaluator]] = {}


def register_evaluator(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: makes `config.evals.<name>.type = cls.type` select `cls`."""
    if not cls.type:
        raise TypeError(f"{cls.__name__} needs a class attribute `type`")
    EVALUATORS[cls.type] = cls
    return cls


def get_evaluator(type_name: str, key: str) -> type[Evaluator]:
    """The evaluator class of `type_name`; the error names `key` and lists the registered types."""
    if type_name not in EVALUATORS:
        close = difflib.get_close_matches(str(type_name), list(EVALUATORS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"config.{key}={type_name!r}: unknown evaluator type; registered: "
                         f"{', '.join(sorted(EVALUATORS))}.{hint}")
    return EVALUATORS[type_name]


def eval_config(spec: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A `config.evals.<name>` entry: `type`, `every`, then the type's options with defaults, updated by `spec`."""
    cls = get_evaluator(spec["type"], "evals.<name>.type")
    entry = ml_collections.ConfigDict()
    entry.type = spec["type"]  # A registered evaluator type.
    entry.every = 0  # Steps between runs (0 = at the end only, -1 = never); every run also ends with one.
    entry.update(cls.options())
    unknown = sorted(set(spec) - set(entry.keys()))
    if unknown:
        raise ValueError(f"evaluator type {spec['type']!r} has no option {unknown[0]!r}; options: "
                         f"{sorted(cls.options().keys())}")
    entry.update(dict(spec))
    return entry


def due(every: int, step: int, total_steps: int) -> bool:
    """Whether an evaluator with `every` runs at `step` before the end (the end itself is handled apart)."""
    return every > 0 and step % every == 0 and step != total_steps


def _check_split_count(evaluator: Evaluator, key: str, count: int, source: Any, split: str) -> None:
    if count > len(source):
        raise ValueError(f"config.evals.{evaluator.name}.{key}={count} exceeds the {len(source)} examples of split "
                         f"{split or evaluator.context.config.data.eval_split!r} (-1 = all)")


def _check_batch_size(evaluator: Evaluator, key: str = "batch_size") -> None:
    size, ctx = int(evaluator.opts[key]), evaluator.context
    if size < 1 or size % ctx.batch_shards or size % ctx.process_count:
        raise ValueError(f"config.evals.{evaluator.name}.{key}={size}: must be a positive multiple of the "
                         f"{ctx.batch_shards} batch shards and {ctx.process_count} processes")


@register_evaluator
class MetricsEvaluator(Evaluator):
    """The task's own metrics (`eval_sums` summed over a split, then `summarize`): loss, accuracy, PSNR, ..."""

    type = "metrics"

    @classmethod
    def options(cls) -> ml_collections.ConfigDict:
        o = ml_collections.ConfigDict()
        o.split = ""  # Split to evaluate ('' = config.data.eval_split).
        o.examples = -1  # First N examples of the split (-1 = all).
        o.batch_size = 256  # Global batch size.
        return o

    def check(self) -> None:
        _check_batch_size(self)
        _check_split_count(self, "examples", int(self.opts.examples), self.context.source(self.opts.split),
                           self.opts.split)

    def run(self, params: Any, step: int) -> EvalResult:
        ctx = self.context
        if not hasattr(self, "_sums"):
            self._sums = ctx.jit(ctx.task.eval_sums)
        sums = None
        for batch in ctx.batches(ctx.source(self.opts.split), batch_size=int(self.opts.batch_size),
                                 num_examples=int(self.opts.examples), fields=ctx.task.batch_fields):
            batch_sums = self._sums(params, batch)
            sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
        return EvalResult(scalars=ctx.task.summarize(jax.device_get(sums)))


@register_evaluator
class GalleryEvaluator(Evaluator):
    """A picture of the first `count` examples of a split with the task's predictions (`predict` + `visualize`):
    class labels, reconstructions, masks, samples."""

    type = "gallery"

    @classmethod
    def options(cls) -> ml_collections.ConfigDict:
        o = ml_collections.ConfigDict()
        o.split = ""  # Split the examples come from ('' = config.data.eval_split).
        o.count = 16  # Examples drawn.
        return o

    def check(self) -> None:
        if int(self.opts.count) < 1:
            raise ValueError(f"config.evals.{self.name}.count={self.opts.count}: must be >= 1")
        _check_split_count(self, "count", int(self.opts.count), self.context.source(self.opts.split), self.opts.split)

    def run(self, params: Any, step: int) -> EvalResult:
        from maskjax.data import pipeline

        ctx = self.context
        params = ctx.host_params(params)  # every process joins the gather; only the main one draws
        if not ctx.is_main:
            return EvalResult()
        source = ctx.source(self.opts.split)
        count = int(self.opts.count)
        batch = pipeline.EvalLoader(source, global_batch_size=count, image_size=ctx.config.data.image_size,
                                    num_examples=count, keys=ctx.task.batch_fields).batch_at(0)
        predictions = jax.device_get(jax.jit(ctx.task.predict)(params, batch))
        image = ctx.task.visualize(batch, predictions, getattr(source, "class_names", None))
        return EvalResult(images={self.name: image})


@register_evaluator
class ProbeEvaluator(Evaluator):
    """Linear probe and weighted k-NN on the task's frozen features (`features(params, {'image': ...}, kind)`),
    optionally also of the same model at this run's initialisation. Like the gallery, it works on host copies of
    the parameters (`EvalContext.host_params`) rather than the sharded ones: every process computes the same
    numbers (probes and galleries are small), so the results agree across hosts."""

    type = "probe"

    @classmethod
    def options(cls) -> ml_collections.ConfigDict:
        o = ml_collections.ConfigDict()
        o.train_examples = 5000  # Train-split examples the probes fit on (-1 = all; no augmentation).
        o.eval_examples = -1  # Examples of `split` they are scored on (-1 = all).
        o.split = ""  # Split they are scored on ('' = config.data.eval_split).
        o.random_init = True  # Also probe the same model at its initialisation (this run's step 0).
        o.knn_k = 20  # Neighbours of the k-NN classifier.
        o.features = ""  # The task's feature kind ('' = its default, e.g. MIM: 'cls' or 'gap').
        o.batch_size = 256  # Batch size of the feature extraction.
        return o

    @classmethod
    def validate(cls, name, options, config, task_cls) -> None:
        def fail(key, why):
            raise ValueError(f"config.evals.{name}.{key}={options[key]!r}: {why}")
        for key in ("train_examples", "eval_examples"):
            if options[key] == 0 or options[key] < -1:
                fail(key, "must be a positive count or -1 (all)")
        if options.knn_k < 1:
            fail("knn_k", "must be >= 1")
        if options.batch_size < 1:
            fail("batch_size", "must be >= 1")
        kinds = tuple(task_cls.feature_kinds)
        if not kinds:
            fail("features", f"task {task_cls.name!r} gives no features to probe")
        if options.features and options.features not in kinds:
            fail("features", f"must be one of {kinds} ('' = {kinds[0]!r})")
        check = getattr(task_cls, "check_feature_kind", None)
        if check is not None:
            check(config, options.features or kinds[0], f"evals.{name}.features")

    def check(self) -> None:
        ctx = self.context
        _check_split_count(self, "train_examples", int(self.opts.train_examples), ctx.source("train"), "train")
        _check_split_count(self, "eval_examples", int(self.opts.eval_examples), ctx.source(self.opts.split),
                           self.opts.split)

    def run(self, params: Any, step: int) -> EvalResult:
        from maskjax.data import pipeline
        from maskjax.evaluate import probe as probe_lib

        ctx, o = self.context, self.opts
        kind = o.features or ctx.task.feature_kinds[0]
        train_source, eval_source = ctx.source("train"), ctx.source(o.split)
        num_classes = getattr(train_source, "num_classes", None)

        def batches(source, limit):
            return pipeline.eval_batches(source, global_batch_size=int(o.batch_size),
                                         image_size=ctx.config.data.image_size,
                                         num_examples=limit if limit > 0 else None,
                                         num_threads=ctx.config.data.num_threads, prefetch=ctx.config.data.prefetch)

        def feature_fn(p, images):
            return ctx.task.features(p, {"image": images}, kind)

        def scores(model_params):
            model_params = ctx.host_params(model_params)
            train = probe_lib.extract_features(feature_fn, model_params, batches(train_source, int(o.train_examples)))
            test = probe_lib.extract_features(feature_fn, model_params, batches(eval_source, int(o.eval_examples)))
            classes = num_classes or int(max(train[1].max(), test[1].max())) + 1
            linear = probe_lib.linear_probe(*train, *test, num_classes=classes, seed=ctx.config.seed)
            knn = probe_lib.knn_classifier(*train, *test, k=min(int(o.knn_k), len(train[1])), num_classes=classes)
            return {"linear_accuracy": float(linear["test_accuracy"]), "knn_accuracy": float(knn["top1_accuracy"])}

        out = scores(params)
        if o.random_init:
            out.update({f"random_init_{k}": v for k, v in scores(ctx.initial_params()).items()})
        return EvalResult(scalars=out)


def build_evaluators(config: ml_collections.ConfigDict, context: EvalContext) -> dict[str, Evaluator]:
    """The evaluators of `config.evals` that run at all (every >= 0), checked against the data."""
    evaluators = {}
    for name, entry in config.evals.items():
        if int(entry.every) < 0:
            continue
        evaluator = get_evaluator(entry.type, f"evals.{name}.type")(name, entry, context)
        evaluator.check()
        evaluators[name] = evaluator
    return evaluators


def validate_evals(config: ml_collections.ConfigDict, task_cls: type) -> None:
    """ValueErrors naming `config.evals.<name>.<key>`, from the config alone (types, cadence, options)."""
    for name, entry in config.evals.items():
        if not isinstance(entry, ml_collections.ConfigDict) or "type" not in entry:
            raise ValueError(f"config.evals.{name}: must be a ConfigDict with a 'type' (one of "
                             f"{', '.join(sorted(EVALUATORS))}) and 'every'")
        cls = get_evaluator(entry.type, f"evals.{name}.type")
        if int(entry.get("every", 0)) < -1:
            raise ValueError(f"config.evals.{name}.every={entry.every}: must be >= -1 (0 = at the end, -1 = never)")
        cls.validate(name, entry, config, task_cls)


def schema_of_evals(evals: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Reference schema of `config.evals` for the unknown-key check: each entry's type with its options."""
    out = ml_collections.ConfigDict()
    for name, entry in evals.items():
        type_name = entry.get("type") if isinstance(entry, ml_collections.ConfigDict) else None
        out[name] = eval_config({"type": type_name}) if type_name in EVALUATORS else ml_collections.ConfigDict(
            {"type": "", "every": 0})
    return out

