"""The config-driven training loop: sharded state, jitted step, evaluation, checkpoints, metrics, preemption."""

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from maskjax.data import pipeline
from maskjax.tasks import make_task
from maskjax.train import checkpoint as ckpt_lib
from maskjax.train import sharding as sharding_lib
from maskjax.train.config import validate
from maskjax.train.metrics import MetricWriter
from maskjax.train.optim import make_optimizer

# Purposes folded into the root key, so every random draw has its own stream (DESIGN: seed, step, purpose).
PURPOSE_INIT, PURPOSE_TRAIN = 0, 1


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], optimizer steps taken.
    params: Any
    opt_state: Any


@dataclasses.dataclass
class RunResult:
    """What a finished (or stopped) run reports."""
    step: int
    train_metrics: dict
    eval_metrics: dict
    stopped_early: bool  # Stopped before total_steps (preemption or stop_after_steps); a checkpoint was saved.
    preempted: bool  # A SIGTERM asked the run to stop.
    paths: dict


class _Prefix:
    """The first `length` examples of a random-access source (keeps its other attributes)."""

    def __init__(self, source, length: int):
        self._source, self._length = source, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} examples")
        return self._source[index]

    def __getattr__(self, name: str):
        return getattr(self._source, name)


def _mesh_context(mesh: Mesh, rules):
    """Mesh + logical-axis rules for tracing: activation constraints in the model resolve against them."""
    class _Context:
        def __enter__(self):
            self._mesh = jax.set_mesh(mesh)
            self._mesh.__enter__()
            self._rules = nn.logical_axis_rules(rules)
            self._rules.__enter__()

        def __exit__(self, *exc):
            self._rules.__exit__(*exc)
            self._mesh.__exit__(*exc)
    return _Context()


class Trainer:
    """Builds everything a run needs from a config; `run()` trains, evaluates and checkpoints.

    Resume order: the latest checkpoint in `<workdir>/checkpoints`, else a fresh initialisation.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 devices: Optional[Sequence[jax.Device]] = None):
        devices = jax.devices() if devices is None else list(devices)
        validate(config, len(devices), jax.process_count())
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.task = make_task(config, load_params=ckpt_lib.load_params)
        self.mesh = sharding_lib.make_mesh(config.mesh, devices)
        self.rules = tuple(tuple(rule) for rule in config.sharding_rules)
        self.is_main = jax.process_index() == 0

        data = config.data
        video = {"num_frames": data.num_frames} if data.num_frames > 0 else {}
        self.train_source = pipeline.make_source(
            data.name, data.train_split, seed=data.seed, image_size=data.image_size, data_dir=data.data_dir or None,
            **video)
        if data.train_examples > 0:
            if data.train_examples > len(self.train_source):
                raise ValueError(f"config.data.train_examples={data.train_examples} exceeds the "
                                 f"{len(self.train_source)} examples of split {data.train_split!r}")
            self.train_source = _Prefix(self.train_source, data.train_examples)
        self.eval_source = pipeline.make_source(
            data.name, data.eval_split, seed=data.seed, image_size=data.image_size, data_dir=data.data_dir or None,
            **video)
        self.train_loader = pipeline.TrainLoader(
            self.train_source, global_batch_size=config.batch_size, seed=config.seed,
            image_size=data.image_size, augment=data.augment,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_threads=data.num_threads, prefetch=data.prefetch)
        num_classes = getattr(self.train_source, "num_classes", None)
        if num_classes is not None and num_classes != config.model.num_classes:
            raise ValueError(f"config.model.num_classes={config.model.num_classes} but data set "
                             f"{data.name!r} has {num_classes} classes")

        self.tx, self.schedule = make_optimizer(config.optimizer, config.total_steps)
        self.root_key = jax.random.key(config.seed)
        self._build_state_shardings()
        self.train_step = self._make_train_step()
        self.eval_step = self._make_eval_step()

    # ----------------------------------------------------------------------------------------- state and steps
    def _sample_batch(self) -> dict:
        batch = self.train_loader.batch_at(0)
        return {k: np.zeros((1,) + v.shape[1:], v.dtype) for k, v in batch.items()}

    def _build_state_shardings(self) -> None:
        sample = self._sample_batch()

        def boxed_params(rng):
            return self.task.init(rng, sample)["params"]

        init_key = jax.random.fold_in(self.root_key, PURPOSE_INIT)
        with _mesh_context(self.mesh, self.rules):
            abstract_boxed = jax.eval_shape(boxed_params, init_key)
        param_shardings = sharding_lib.logical_shardings(abstract_boxed, self.mesh, self.rules)
        abstract_params = nn.meta.unbox(abstract_boxed)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        opt_shardings = sharding_lib.shardings_like_params(abstract_opt, abstract_params, param_shardings, self.mesh)
        self.state_shardings = TrainState(step=sharding_lib.replicated(self.mesh), params=param_shardings,
                                          opt_state=opt_shardings)

        def create(rng):
            params = nn.meta.unbox(boxed_params(rng))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

        self._abstract_state = jax.eval_shape(create, init_key)
        self._create_state = lambda: self._jit_create(create, init_key)

    def _jit_create(self, create: Callable, init_key: jax.Array) -> TrainState:
        with _mesh_context(self.mesh, self.rules):
            return jax.jit(create, out_shardings=self.state_shardings)(init_key)

    def batch_shardings(self, batch: dict) -> dict:
        return {k: sharding_lib.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def _make_train_step(self) -> Callable:
        task, tx, schedule = self.task, self.tx, self.schedule
        accum = self.config.optimizer.accum_steps
        root_key = self.root_key

        def grads_of(params, batch, key, step):
            (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, key, True, step)
            return grads, dict(metrics, loss=loss)

        def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
            step_key = jax.random.fold_in(jax.random.fold_in(root_key, PURPOSE_TRAIN), state.step)
            if accum == 1:
                grads, metrics = grads_of(state.params, batch, step_key, state.step)
            else:
                # Micro-batch a takes examples a, a+accum, ...: every micro-batch stays spread over all devices.
                def split(x):
                    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
                    return jax.lax.with_sharding_constraint(x, P(None, sharding_lib.BATCH_AXES))
                micro_batches = jax.tree.map(split, batch)

                def body(carry, inputs):
                    index, micro = inputs
                    grads, metrics = grads_of(state.params, micro, jax.random.fold_in(step_key, index), state.step)
                    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

                zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, state.params, jax.tree.map(
                    lambda x: x[0], micro_batches), step_key, state.step))
                (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro_batches))
                grads, metrics = jax.tree.map(lambda x: x / accum, (grads, metrics))
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = dict(metrics, grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step))
            return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

        sample = self._sample_batch()
        jitted = jax.jit(train_step, in_shardings=(self.state_shardings, self.batch_shardings(sample)),
                         out_shardings=(self.state_shardings, sharding_lib.replicated(self.mesh)),
                         donate_argnums=0)

        def run(state, batch):
            with _mesh_context(self.mesh, self.rules):
                return jitted(state, batch)
        return run

    def _make_eval_step(self) -> Callable:
        task = self.task
        replicated = sharding_lib.replicated(self.mesh)
        jitted = {}

        def run(params, batch):
            key = tuple(sorted(batch))
            if key not in jitted:
                jitted[key] = jax.jit(task.eval_sums, in_shardings=(self.state_shardings.params,
                                                                   self.batch_shardings(batch)),
                                      out_shardings=replicated)
            with _mesh_context(self.mesh, self.rules):
                return jitted[key](params, batch)
        return run

    def to_global(self, local_batch: dict) -> dict:
        """Global jax.Arrays from this process's slice of the batch."""
        return {k: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(self.mesh, np.ndim(v)), v)
                for k, v in local_batch.items()}

    # ---------------------------------------------------------------------------------------------- state I/O
    def initial_state(self, checkpointer: Optional[ckpt_lib.Checkpointer] = None) -> TrainState:
        """The latest checkpoint of the workdir if there is one, else a fresh state."""
        if checkpointer is not None and checkpointer.latest_step() is not None:
            return self.restore(checkpointer, checkpointer.latest_step())
        state = self._create_state()
        if self.config.init_from.workdir:
            state = self._init_from_checkpoint(state)
        return state

    def _init_from_checkpoint(self, state: TrainState) -> TrainState:
        """Fresh state whose parameters under `init_from.params_key` come from another run's checkpoint (e.g. an
        MAE encoder for fine-tuning); parameters it lacks (a new head) keep their initialisation. The optimizer
        state is rebuilt for the new parameters."""
        cfg = self.config.init_from
        loaded, step = ckpt_lib.load_params(cfg.workdir, cfg.step, cfg.params_key)
        fresh = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
        incoming = flax.traverse_util.flatten_dict(loaded, sep="/")
        unknown = sorted(set(incoming) - set(fresh))
        mismatched = [f"{k}: checkpoint {np.shape(incoming[k])} vs model {np.shape(fresh[k])}"
                      for k in sorted(set(incoming) & set(fresh)) if np.shape(incoming[k]) != np.shape(fresh[k])]
        if unknown or mismatched:
            raise ValueError(f"config.init_from: checkpoint parameters do not fit the model: unknown {unknown[:5]}, "
                             f"shape mismatches {mismatched[:5]}")
        merged = flax.traverse_util.unflatten_dict({k: incoming.get(k, v) for k, v in fresh.items()}, sep="/")
        if self.is_main:
            print(f"Initialised {len(incoming)} of {len(fresh)} parameter arrays from {cfg.workdir} step {step}"
                  f"{' (' + cfg.params_key + ')' if cfg.params_key else ''}; kept the initialisation of "
                  f"{sorted(set(fresh) - set(incoming))}", flush=True)
        shardings = self.state_shardings
        params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), merged,
                              shardings.params)
        opt_state = jax.jit(self.tx.init, out_shardings=shardings.opt_state)(params)
        return TrainState(step=state.step, params=params, opt_state=opt_state)

    def restore(self, checkpointer: ckpt_lib.Checkpointer, step: int) -> TrainState:
        """Restores `step` onto this trainer's mesh, whatever mesh wrote it."""
        target = ckpt_lib.abstract_with_shardings(self._abstract_state, self.state_shardings)
        state, _ = checkpointer.restore(step, target)
        return state

    def evaluate(self, params: Any) -> dict:
        """Metrics of one pass over the evaluation split (padded final batch is masked out)."""
        sums = None
        for local in pipeline.eval_batches(
                self.eval_source, global_batch_size=self.config.eval_batch_size, image_size=self.config.data.image_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                num_examples=self.config.eval_examples if self.config.eval_examples > 0 else None,
                num_threads=self.config.data.num_threads, prefetch=self.config.data.prefetch):
            batch_sums = self.eval_step(params, self.to_global(local))
            sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
        return self.task.summarize(jax.device_get(sums))

    # ----------------------------------------------------------------------------------------------- the loop
    def run(self) -> RunResult:
        config = self.config
        os.makedirs(self.workdir, exist_ok=True)
        if self.is_main:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        writer = MetricWriter(self.workdir, enabled=self.is_main)
        checkpointer = ckpt_lib.Checkpointer(self.workdir, keep=config.keep_checkpoints,
                                             async_save=config.async_checkpointing)
        state = self.initial_state(checkpointer)
        start_step = int(jax.device_get(state.step))
        if self.is_main and start_step:
            print(f"Resuming from the checkpoint at step {start_step} in {checkpointer.directory}", flush=True)

        preempted = {"signal": False}
        previous_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: preempted.update(signal=True))

        def save(step, state):
            checkpointer.save(step, state, {"step": step, "seed": config.seed, "data_position": step})

        progress = None
        if self.is_main and config.progress_bar:
            from tqdm.auto import tqdm
            progress = tqdm(total=config.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="train")
        train_metrics, eval_metrics, stopped_early = {}, {}, False
        step = start_step
        window_start, window_steps = time.perf_counter(), 0
        try:
            for step_index, local_batch in self.train_loader.iterate(start_step):
                if step >= config.total_steps:
                    break
                assert step_index == step, (step_index, step)
                state, metrics = self.train_step(state, self.to_global(local_batch))
                metrics = jax.device_get(metrics)
                step += 1
                window_steps += 1
                if not np.isfinite(metrics["loss"]):
                    raise NonFiniteLossError(
                        f"Training loss is {metrics['loss']} at step {step}; stopping. The last good checkpoint "
                        f"is step {checkpointer.latest_step()} in {checkpointer.directory} (nothing newer was saved).")
                if progress is not None:
                    progress.update(1)
                if step % config.log_every == 0 or step == config.total_steps:
                    elapsed = time.perf_counter() - window_start
                    train_metrics = {k: float(v) for k, v in metrics.items()}
                    train_metrics["images_per_second"] = window_steps * config.batch_size / max(elapsed, 1e-9)
                    writer.write_scalars(step, train_metrics, prefix="train")
                    if progress is not None:
                        progress.set_postfix(loss=f"{train_metrics['loss']:.4f}",
                                             img_s=f"{train_metrics['images_per_second']:.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
                    eval_metrics = self.evaluate(state.params)
                    writer.write_scalars(step, eval_metrics, prefix="eval")
                    window_start, window_steps = time.perf_counter(), 0
                if step % config.checkpoint_every == 0 or step == config.total_steps:
                    save(step, state)
                if self._should_stop(preempted["signal"], step - start_step):
                    save(step, state)
                    stopped_early = True
                    break
            if not stopped_early:
                eval_metrics = self.evaluate(state.params)
                writer.write_scalars(step, eval_metrics, prefix="eval")
                self._write_predictions(writer, state.params, step)
                if config.probe.enabled:
                    probe_metrics = self.probe(state.params)
                    writer.write_scalars(step, probe_metrics, prefix="probe")
                    eval_metrics.update({f"probe/{k}": v for k, v in probe_metrics.items()})
        finally:
            checkpointer.close()
            writer.close()
            if progress is not None:
                progress.close()
            signal.signal(signal.SIGTERM, previous_handler)
        self.state = state
        paths = {"workdir": self.workdir, "checkpoints": checkpointer.directory, "metrics": writer.jsonl_path,
                 "tensorboard": writer.tensorboard_dir, "images": writer.image_dir}
        return RunResult(step=step, train_metrics=train_metrics, eval_metrics=eval_metrics,
                         stopped_early=stopped_early, preempted=preempted["signal"], paths=paths)

    def _should_stop(self, signalled: bool, steps_this_run: int) -> bool:
        """SIGTERM on any process (agreed by all) or the configured step budget of this run."""
        stop = signalled or (0 < self.config.stop_after_steps <= steps_this_run)
        if jax.process_count() > 1:
            stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
        return stop

    def probe(self, params: Any) -> dict:
        """Linear probe and k-NN accuracy of the task's frozen features (`task.features`), and, with
        `probe.random_init`, of the same model at this run's initialisation. Every process computes the same
        numbers from replicated parameters (probes are small; this keeps them identical across hosts)."""
        from maskjax.evaluate import probe as probe_lib

        cfg, data = self.config.probe, self.config.data
        replicated = sharding_lib.replicated(self.mesh)
        feature_fn = self.task.features

        def batches(source, limit):
            return pipeline.eval_batches(source, global_batch_size=self.config.eval_batch_size,
                                         image_size=data.image_size,
                                         num_examples=min(limit, len(source)) if limit > 0 else None,
                                         num_threads=data.num_threads, prefetch=data.prefetch)

        def scores(model_params):
            model_params = jax.device_get(jax.jit(lambda p: p, out_shardings=replicated)(model_params))
            train = probe_lib.extract_features(feature_fn, model_params, batches(self.train_source, cfg.train_examples))
            test = probe_lib.extract_features(feature_fn, model_params, batches(self.eval_source, cfg.eval_examples))
            num_classes = self.config.model.num_classes
            linear = probe_lib.linear_probe(*train, *test, num_classes=num_classes, seed=self.config.seed)
            knn = probe_lib.knn_classifier(*train, *test, k=min(cfg.knn_k, len(train[1])), num_classes=num_classes)
            return {"linear_accuracy": float(linear["test_accuracy"]), "knn_accuracy": float(knn["top1_accuracy"])}

        out = scores(params)
        if cfg.random_init:
            sample = self._sample_batch()
            init_key = jax.random.fold_in(self.root_key, PURPOSE_INIT)
            with _mesh_context(self.mesh, self.rules):
                initial = jax.jit(lambda k: nn.meta.unbox(self.task.init(k, sample))["params"])(init_key)
            out.update({f"random_init_{k}": v for k, v in scores(initial).items()})
        return out

    def _write_predictions(self, writer: MetricWriter, params: Any, step: int) -> None:
        count = self.config.num_visualize
        if count <= 0:
            return
        # A replicated copy is readable on every process; only the main one draws.
        params = jax.device_get(jax.jit(lambda p: p, out_shardings=sharding_lib.replicated(self.mesh))(params))
        if not self.is_main:
            return
        batch = pipeline.EvalLoader(self.eval_source, global_batch_size=count, image_size=self.config.data.image_size,
                                    num_examples=min(count, len(self.eval_source))).batch_at(0)
        images, labels = batch["image"][batch["valid"]], batch["label"][batch["valid"]]
        predictions = np.asarray(jax.jit(self.task.predict)(params, images))
        gallery = self.task.visualize(images, labels, predictions, getattr(self.eval_source, "class_names", None))
        writer.write_image(step, getattr(self.task, "gallery_name", "predictions"), gallery)


def summary_lines(result: RunResult) -> list[str]:
    """Human-readable end-of-run report: final metrics and where everything was written."""
    lines = [f"Finished at step {result.step}" + (" (stopped early, checkpoint saved)" if result.stopped_early
                                                   else ".")]
    if result.eval_metrics:
        lines.append("Eval: " + json.dumps({k: round(v, 4) for k, v in result.eval_metrics.items()}))
    for name in ("checkpoints", "metrics", "tensorboard", "images"):
        lines.append(f"{name:>12}: {result.paths[name]}")
    return lines
