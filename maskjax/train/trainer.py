"""The config-driven training loop: sharded state, jitted step, evaluation, checkpoints, metrics, preemption."""

import contextlib
import dataclasses
import glob
import json
import os
import signal
import sys
import threading
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
from maskjax.evaluate.evaluators import build_evaluators, due
from maskjax.models.layers import params_layout, scan_layout, unrolled_layout
from maskjax.tasks import make_task
from maskjax.train import checkpoint as ckpt_lib
from maskjax.train import devices as devices_lib
from maskjax.train import sharding as sharding_lib
from maskjax.train import workdir as workdir_lib
from maskjax.train.config import flat_config, resume_changes, validate
from maskjax.train.flops import model_flops_per_step
from maskjax.train.metrics import MetricWriter
from maskjax.train.optim import make_optimizer

# Purposes folded into the root key, so every random draw has its own stream (docs/architecture.md, "Conventions").
PURPOSE_INIT, PURPOSE_TRAIN = 0, 1


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf."""


class ResumeError(ValueError):
    """The workdir's checkpoints cannot be resumed with this config (changed keys, other shapes, none intact)."""


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
    preempted: bool  # A SIGTERM or SIGINT stopped the run before total_steps.
    paths: dict
    eval_step: Optional[int] = None  # Step of `eval_metrics` (the final evaluation, or the last periodic one).
    stop_signal: Optional[str] = None  # 'SIGTERM' / 'SIGINT' when a signal arrived (even at the last step).


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


def _accumulate(acc: dict, metrics: dict, step: jax.Array) -> dict:
    """Adds one step's metrics to the window's sums, on device; counts non-finite losses and keeps the first step
    that had one."""
    bad = ~jnp.isfinite(metrics["loss"])
    return {"sums": jax.tree.map(lambda a, m: a + m.astype(a.dtype), acc["sums"], metrics),
            "steps": acc["steps"] + 1,
            "nonfinite": acc["nonfinite"] + bad.astype(jnp.int32),
            "first_bad": jnp.where(bad & (acc["first_bad"] < 0), step.astype(jnp.int32), acc["first_bad"])}


@jax.jit
def _zero_accumulator(metrics: dict) -> dict:
    return {"sums": jax.tree.map(lambda m: jnp.zeros((), jnp.float32), metrics), "steps": jnp.zeros((), jnp.int32),
            "nonfinite": jnp.zeros((), jnp.int32), "first_bad": jnp.full((), -1, jnp.int32)}


class _TrainerEvalContext:
    """The `maskjax.evaluate.evaluators.EvalContext` a Trainer lends its evaluators."""

    def __init__(self, trainer: "Trainer"):
        self._trainer = trainer
        self.config, self.task, self.is_main = trainer.config, trainer.task, trainer.is_main
        self.batch_shards = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
        self.process_count = jax.process_count()
        self._initial = None

    def source(self, split: str):
        return self._trainer.source(split)

    def batches(self, source, *, batch_size: int, num_examples: int, fields):
        data = self.config.data
        for local in pipeline.eval_batches(
                source, global_batch_size=batch_size, image_size=data.image_size,
                process_index=jax.process_index(), process_count=jax.process_count(),
                num_examples=num_examples if num_examples > 0 else None, keys=tuple(fields),
                num_threads=data.num_threads, prefetch=data.prefetch):
            yield self._trainer.to_global(local)

    def jit(self, fn):
        trainer, compiled = self._trainer, {}
        replicated = sharding_lib.replicated(trainer.mesh)

        def run(params, batch):
            key = tuple(sorted(batch))
            if key not in compiled:
                compiled[key] = jax.jit(fn, in_shardings=(trainer.state_shardings.params,
                                                          trainer.batch_shardings(batch)),
                                        out_shardings=replicated)
            with _mesh_context(trainer.mesh, trainer.rules):
                return compiled[key](params, batch)
        return run

    def host_params(self, params):
        replicated = sharding_lib.replicated(self._trainer.mesh)
        return jax.device_get(jax.jit(lambda p: p, out_shardings=replicated)(params))

    def initial_params(self):
        if self._initial is None:
            self._initial = self._trainer.initial_params()
        return self._initial


class Trainer:
    """Builds everything a run needs from a config; `run()` trains, evaluates and checkpoints.

    Resume order: the newest intact checkpoint in `<workdir>/checkpoints` (see `resume`), else a fresh
    initialisation, with the parameters of `config.init_from` when it names a run.
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
        self.fields = tuple(self.task.batch_fields)

        data = config.data
        self._sources = {}
        self.train_source = self._make_source(data.train_split)
        if data.train_examples > 0:
            if data.train_examples > len(self.train_source):
                raise ValueError(f"config.data.train_examples={data.train_examples} exceeds the "
                                 f"{len(self.train_source)} examples of split {data.train_split!r}")
            self.train_source = _Prefix(self.train_source, data.train_examples)
        self._check_fields(self.train_source, data.train_split)
        self.task.check_data(self.train_source)
        self.train_loader = pipeline.TrainLoader(
            self.train_source, global_batch_size=config.batch_size, seed=config.seed,
            image_size=data.image_size, augment=data.augment, keys=self.fields,
            process_index=jax.process_index(), process_count=jax.process_count(),
            num_threads=data.num_threads, prefetch=data.prefetch)

        self.tx, self.schedule = make_optimizer(config.optimizer, config.total_steps)
        self.root_key = jax.random.key(config.seed)
        self._build_state_shardings()
        self.train_step = self._make_train_step()
        self._accumulate = jax.jit(_accumulate, donate_argnums=0)
        # Evaluators check their options against the data and the mesh here, before any compute.
        self.evaluators = build_evaluators(config, _TrainerEvalContext(self))
        # Around every step that is not a log step; tests set jax.transfer_guard_device_to_host("disallow").
        self.step_guard: Callable[[], Any] = contextlib.nullcontext

    def _make_source(self, split: str):
        """The data source of `split` (cached), errors naming config.data keys."""
        data = self.config.data
        if split not in self._sources:
            video = {"num_frames": data.num_frames} if data.num_frames > 0 else {}
            try:
                source = pipeline.make_source(data.name, split, seed=data.seed, image_size=data.image_size,
                                              data_dir=data.data_dir or None, **video)
            except FileNotFoundError as error:
                raise ValueError(f"config.data.data_dir={data.data_dir!r} (data.name={data.name!r}): {error}") \
                    from error
            if len(source) == 0:
                raise ValueError(f"data set {data.name!r}: split {split!r} is empty")
            self._sources[split] = source
        return self._sources[split]

    def source(self, split: str):
        """The source of `split` for evaluators: '' = config.data.eval_split, 'train' = the training source."""
        if split == "train":
            return self.train_source
        source = self._make_source(split or self.config.data.eval_split)
        self._check_fields(source, split or self.config.data.eval_split)
        return source

    def _check_fields(self, source, split: str) -> None:
        """The task's batch fields are in the source's examples (named with what it has), before any compute."""
        have = set(source[0])
        missing = [f for f in self.fields if f not in have]
        if missing:
            raise ValueError(f"task {self.config.task!r} needs batch fields {list(self.fields)}, but split {split!r} "
                             f"of data set {self.config.data.name!r} gives {sorted(have)} (missing {missing})")

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

    def initial_params(self) -> Any:
        """This run's parameters at initialisation (step 0, before any `init_from`), sharded like the state's."""
        sample = self._sample_batch()
        init_key = jax.random.fold_in(self.root_key, PURPOSE_INIT)
        with _mesh_context(self.mesh, self.rules):
            return jax.jit(lambda k: nn.meta.unbox(self.task.init(k, sample))["params"],
                           out_shardings=self.state_shardings.params)(init_key)

    def _jit_create(self, create: Callable, init_key: jax.Array) -> TrainState:
        with _mesh_context(self.mesh, self.rules):
            return jax.jit(create, out_shardings=self.state_shardings)(init_key)

    def batch_shardings(self, batch: dict) -> dict:
        return {k: sharding_lib.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def throughput_basis(self) -> dict:
        """{'model_flops': model FLOPs of one step on the global batch (`flops.model_flops_per_step`: the
        forward and backward matmuls without remat), 'devices', 'device_kind', 'peak_flops' (per device, None when the kind has no entry in
        `devices.DEVICE_KINDS` or no peak, e.g. CPU: no MFU then)}. Traced once, nothing compiled."""
        if getattr(self, "_throughput", None) is None:
            sample = self._sample_batch()
            batch = {k: jax.ShapeDtypeStruct((self.config.batch_size,) + v.shape[1:], v.dtype)
                     for k, v in sample.items()}
            key, step = jax.random.key(0), jnp.zeros((), jnp.int32)
            with _mesh_context(self.mesh, self.rules):
                flops, whiles = model_flops_per_step(lambda p, b: self.task.loss(p, b, key, True, step)[0],
                                                     self._abstract_state.params, batch)
            kind = devices_lib.detect_device_kind(self.mesh.devices.flat[0])
            peak = devices_lib.device_spec(kind).peak_flops if kind else None
            self._throughput = {"model_flops": flops, "devices": int(self.mesh.devices.size), "device_kind": kind,
                                "peak_flops": peak, "unbounded_loops": whiles}
        return self._throughput

    def _make_train_step(self) -> Callable:
        task, tx, schedule = self.task, self.tx, self.schedule
        accum = self.config.optimizer.accum_steps

        def grads_of(params, batch, key, step):
            (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, key, True, step)
            return grads, dict(metrics, loss=loss)

        # The root key is an argument, not a constant of the program: a captured device array would be read back to
        # the host when the step is traced, in the middle of the loop.
        def train_step(state: TrainState, batch: dict, root_key_data: jax.Array) -> tuple[TrainState, dict]:
            root_key = jax.random.wrap_key_data(root_key_data)
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
        replicated = sharding_lib.replicated(self.mesh)
        jitted = jax.jit(train_step, in_shardings=(self.state_shardings, self.batch_shardings(sample), replicated),
                         out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        key_data = np.asarray(jax.random.key_data(self.root_key))  # the same on every process
        root_key_data = jax.make_array_from_callback(key_data.shape, replicated, lambda index: key_data[index])

        def run(state, batch):
            with _mesh_context(self.mesh, self.rules):
                return jitted(state, batch, root_key_data)
        return run

    def to_global(self, local_batch: dict) -> dict:
        """Global jax.Arrays from this process's slice of the batch."""
        return {k: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(self.mesh, np.ndim(v)), v)
                for k, v in local_batch.items()}

    # ---------------------------------------------------------------------------------------------- state I/O
    def initial_state(self, checkpointer: Optional[ckpt_lib.Checkpointer] = None) -> TrainState:
        """The newest intact checkpoint of the workdir if there is one (see `resume`), else a fresh state."""
        if checkpointer is not None:
            resumed = self.resume(checkpointer)
            if resumed is not None:
                return resumed["state"]
        state = self._create_state()
        if self.config.init_from.workdir:
            state = self._init_from_checkpoint(state)
        return state

    def _init_from_checkpoint(self, state: TrainState) -> TrainState:
        """Fresh state whose parameters under `init_from.target_key` ('' = all) come from the sub-tree
        `init_from.params_key` of another run's checkpoint (e.g. an MAE encoder into a Mask2Former backbone);
        parameters it lacks (a new head) keep their initialisation. The optimizer state is rebuilt for the new
        parameters."""
        cfg = self.config.init_from
        loaded, step = ckpt_lib.load_params(cfg.workdir, cfg.step, cfg.params_key)
        fresh_tree = jax.device_get(state.params)
        target = [part for part in cfg.get("target_key", "").split("/") if part]
        node = fresh_tree
        for i, part in enumerate(target):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"config.init_from.target_key={cfg.target_key!r}: {part!r} is not in this model's "
                                 f"parameters{' under ' + '/'.join(target[:i]) if i else ''} (keys there: "
                                 f"{sorted(node) if isinstance(node, dict) else 'none, a leaf'})")
            node = node[part]
        have, want = params_layout(loaded), params_layout(fresh_tree)
        if have and want and have != want:  # model.scan_layers differs: the same weights, stacked or not
            loaded = scan_layout(loaded) if want == "scanned" else unrolled_layout(loaded)
            if self.is_main:
                print(f"config.init_from: converted the checkpoint's {have} blocks to the model's {want} layout",
                      flush=True)
        for part in reversed(target):
            loaded = {part: loaded}
        fresh = flax.traverse_util.flatten_dict(fresh_tree, sep="/")
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
                  f"{' (' + cfg.params_key + ')' if cfg.params_key else ''}"
                  f"{' into ' + cfg.target_key if target else ''}; kept the initialisation of "
                  f"{sorted(set(fresh) - set(incoming))}", flush=True)
        shardings = self.state_shardings
        params = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), merged,
                              shardings.params)
        opt_state = jax.jit(self.tx.init, out_shardings=shardings.opt_state)(params)
        return TrainState(step=state.step, params=params, opt_state=opt_state)

    def restore(self, checkpointer: ckpt_lib.Checkpointer, step: int) -> TrainState:
        """Restores `step` onto this trainer's mesh, whatever mesh wrote it, verified against its digest."""
        target = ckpt_lib.abstract_with_shardings(self._abstract_state, self.state_shardings)
        state, _ = checkpointer.restore_verified(step, target)
        return state

    def resume(self, checkpointer: ckpt_lib.Checkpointer) -> Optional[dict]:
        """The newest intact checkpoint of the workdir, or None when it has none.

        Steps are tried newest first. One whose metadata or arrays cannot be read, whose arrays differ from the
        digest recorded at save time, or that holds NaN/Inf is damaged: it is moved to
        `<workdir>/damaged_checkpoints/` (never deleted) with a warning and the next older step is tried. Before
        any array is read, the config saved with the step is compared with this one: a change that breaks exact
        resumption stops the run (ResumeError listing every changed key) unless `config.resume_policy='force'`;
        arrays whose shapes differ from this config's model always stop it, naming them. With checkpoints on disk
        but none intact the run stops; it never starts from scratch silently.

        Returns {'state', 'step', 'safe_changes', 'forced_changes', 'damaged': [(step, reason, moved_to)]}.
        """
        steps = checkpointer.all_steps()
        earlier = os.path.join(self.workdir, ckpt_lib.DAMAGED_DIR)
        if not steps and os.path.isdir(earlier) and os.listdir(earlier):
            raise ResumeError(
                f"{checkpointer.directory} holds no checkpoint and the earlier ones of this workdir were damaged "
                f"(moved to {earlier}; see history.jsonl). Starting from scratch here would silently replace that "
                f"run: move {earlier} elsewhere to do so on purpose, or use another --workdir.")
        damaged = []
        target = ckpt_lib.abstract_with_shardings(self._abstract_state, self.state_shardings)
        for step in reversed(steps):
            try:
                meta = checkpointer.read_meta(step)
                meta_error = ""
            except Exception as error:  # noqa: BLE001 - any unreadable metadata is damage
                meta, meta_error = None, f"metadata unreadable ({ckpt_lib._short(error)})"
            if not self._agree(not meta_error):
                damaged.append(self._quarantine(checkpointer, step, meta_error or "metadata unreadable on a peer"))
                continue
            safe, forced = self._check_resume_config(meta, step, checkpointer)
            try:
                saved_arrays = checkpointer.array_metadata(step)
                read_error = ckpt_lib.metadata_disagreement(saved_arrays, meta.get("digest"))
            except Exception as error:  # noqa: BLE001
                saved_arrays, read_error = None, (f"array metadata {checkpointer.step_dir(step)}/state/_METADATA "
                                                  f"unreadable ({ckpt_lib._short(error)})")
            if not self._agree(not read_error):
                damaged.append(self._quarantine(checkpointer, step, read_error or "array metadata unreadable on a peer"))
                continue
            mismatch = ckpt_lib.structure_mismatch(saved_arrays, self._abstract_state)
            if mismatch:
                raise ResumeError(
                    f"checkpoint {checkpointer.step_dir(step)} does not fit the model of this config "
                    f"({len(mismatch)} arrays differ): " + "; ".join(mismatch[:8])
                    + (" ..." if len(mismatch) > 8 else "")
                    + ". Resume with the config it was saved with (see its config.json), or use another --workdir.")
            try:
                state, _ = checkpointer.restore_verified(step, target)
                restore_error = ""
            except ckpt_lib.CheckpointDamagedError as error:
                state, restore_error = None, error.reason
            if not self._agree(not restore_error):
                damaged.append(self._quarantine(checkpointer, step, restore_error or "unreadable on a peer"))
                continue
            return {"state": state, "step": step, "safe_changes": safe, "forced_changes": forced,
                    "damaged": damaged}
        if damaged:
            raise ResumeError(
                f"no intact checkpoint in {checkpointer.directory}: every step was damaged and moved aside ("
                + "; ".join(f"step {s} -> {moved}: {why}" for s, why, moved in damaged)
                + "). Nothing was deleted. To start from scratch anyway, use another --workdir.")
        return None

    def _agree(self, ok: bool) -> bool:
        """True when `ok` holds on every process (each reads its own shards of a checkpoint)."""
        if jax.process_count() == 1:
            return ok
        return bool(np.all(multihost_utils.process_allgather(np.array(ok))))

    def _quarantine(self, checkpointer: ckpt_lib.Checkpointer, step: int, reason: str) -> tuple:
        moved = checkpointer.step_dir(step)
        if self.is_main:
            moved = checkpointer.quarantine(step, reason)
            print(f"WARNING: checkpoint step {step} in {checkpointer.directory} is damaged ({reason}); moved it to "
                  f"{moved} and trying the previous step.", file=sys.stderr, flush=True)
            workdir_lib.append_history(self.workdir, "damaged_checkpoint", step=step, reason=reason, moved_to=moved)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"maskjax_quarantine_{step}")
            checkpointer.reload()
        return step, reason, moved

    def _check_resume_config(self, meta: dict, step: int, checkpointer: ckpt_lib.Checkpointer) -> tuple[dict, dict]:
        """(safe, forced) changes of this config against the one saved with `step`; raises ResumeError for
        changes that break exact resumption unless resume_policy='force'."""
        saved = meta.get("config")
        if not isinstance(saved, dict):
            if self.is_main:
                print(f"WARNING: checkpoint step {step} records no config (written by an older maskjax); the "
                      "config is not compared.", file=sys.stderr, flush=True)
            return {}, {}
        safe, unsafe = resume_changes(saved, flat_config(self.config))
        if "model.scan_layers" in unsafe:  # another parameter layout: not even resume_policy='force' can load it
            old, new = unsafe["model.scan_layers"]
            raise ResumeError(
                f"checkpoint step {step} in {checkpointer.directory} holds the {'scanned' if old else 'unrolled'} "
                f"block layout (model.scan_layers={old}), the config asks for model.scan_layers={new}. Convert the "
                f"run first: python -m maskjax.convert.scan_layout --workdir={self.workdir} --out=<new workdir>, "
                "then resume there (or keep the saved value).")
        if unsafe and self.config.resume_policy != "force":
            listing = "\n".join(f"  {key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in unsafe.items())
            raise ResumeError(
                f"the config differs from the one checkpoint step {step} in {checkpointer.directory} was saved with, "
                f"in keys that break exact resumption:\n{listing}\nResume with the saved values, use another "
                "--workdir, or pass --config.resume_policy=force to resume anyway (recorded in history.jsonl).")
        return safe, unsafe

    def _schedule_note(self, saved_total_steps: int, step: int) -> str:
        """How a changed total_steps moves the learning rate at the resume step ('' when it does not)."""
        _, old_schedule = make_optimizer(self.config.optimizer, saved_total_steps)
        old, new = float(old_schedule(step)), float(self.schedule(step))
        if np.isclose(old, new, rtol=1e-6, atol=0.0):
            return ""
        return (f"the learning rate at step {step} is now {new:.3g} (the schedule for total_steps="
                f"{saved_total_steps} was at {old:.3g}); it follows the new schedule from here")

    def evaluate(self, params: Any, step: int, writer: Optional[MetricWriter] = None, *,
                 final: bool = False) -> dict:
        """Runs the evaluators due at `step` (all that run at all when `final`); writes their scalars as
        '<name>/<metric>' and their images; returns the scalars."""
        scalars = {}
        for name, evaluator in self.evaluators.items():
            every = int(self.config.evals[name].every)
            if not (final or due(every, step, self.config.total_steps)):
                continue
            result = evaluator.run(params, step)
            named = {f"{name}/{k}": v for k, v in result.scalars.items()}
            scalars.update(named)
            if writer is not None:
                if named:
                    writer.write_scalars(step, named)
                for image_name, image in result.images.items():
                    writer.write_image(step, image_name, image)
        return scalars

    # ----------------------------------------------------------------------------------------------- the loop
    def _acquire_lock(self) -> workdir_lib.WorkdirLock:
        """Process 0 takes the workdir's lock; every process learns whether it got it (so all stop together)."""
        lock = workdir_lib.WorkdirLock(self.workdir, stale_seconds=self.config.lock_stale_seconds)
        error = ""
        if self.is_main:
            try:
                warning = lock.acquire()
                if warning:
                    print(f"WARNING: {warning}", file=sys.stderr, flush=True)
            except workdir_lib.WorkdirBusyError as busy:
                error = str(busy)
        if not self._agree(not error):
            lock.release()
            raise workdir_lib.WorkdirBusyError(error or f"process 0 could not lock the workdir {self.workdir}")
        return lock

    def run(self) -> RunResult:
        """Trains from the newest intact checkpoint (or from scratch), evaluates, checkpoints; holds the workdir's
        lock throughout."""
        os.makedirs(self.workdir, exist_ok=True)
        lock = self._acquire_lock()
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> RunResult:
        config = self.config
        leftovers = sorted(glob.glob(os.path.join(self.workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))
        if leftovers and self.is_main:
            print(f"Removing {len(leftovers)} unfinished save(s) of an earlier run (never complete, never resumed "
                  f"from): {', '.join(os.path.basename(p) for p in leftovers)}", file=sys.stderr, flush=True)
        checkpointer = ckpt_lib.Checkpointer(self.workdir, keep=config.keep_checkpoints,
                                             async_save=config.async_checkpointing, cleanup_tmp=True)
        try:
            resumed = self.resume(checkpointer)
        except BaseException:
            checkpointer.close()
            raise
        if resumed is None:
            if self.is_main and os.path.exists(os.path.join(self.workdir, workdir_lib.HISTORY_NAME)):
                print(f"No checkpoint in {checkpointer.directory}: starting from scratch (earlier attempts are "
                      "recorded in history.jsonl).", file=sys.stderr, flush=True)
            state = self.initial_state()
        else:
            state = resumed["state"]
        start_step = int(jax.device_get(state.step))

        # Nothing in the workdir is rewritten before the checkpoint and the config were accepted.
        if self.is_main:
            self._record_start(resumed, start_step, checkpointer)
        writer = MetricWriter(self.workdir, enabled=self.is_main, resume_step=start_step,
                              redo_final_step=config.total_steps if start_step >= config.total_steps else None)
        if writer.dropped_records:
            print(f"Dropped {writer.dropped_records} records of steps after {start_step} from {writer.jsonl_path}: "
                  "this run computes them again.", file=sys.stderr, flush=True)

        stop = {"signal": None}
        previous_handlers = self._install_signal_handlers(stop)

        def save(step, state):
            checkpointer.save(step, state, {"step": step, "seed": config.seed, "data_position": step,
                                            "config": flat_config(config)})

        progress = None
        if self.is_main and config.progress_bar:
            from tqdm.auto import tqdm
            progress = tqdm(total=config.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="train")
        train_metrics, eval_metrics, stopped_early, eval_step = {}, {}, False, None
        step = start_step
        # Throughput counts the steps dispatched since `start` (host side): the first step's compile, evaluations
        # and saves restart the clock and are never counted.
        window = {"start": time.perf_counter(), "first": step + 1, "acc": None, "timed": 0}
        basis = self.throughput_basis()
        if self.is_main and basis["peak_flops"] is None:
            print(f"Throughput: {basis['model_flops'] / 1e9:.2f} model GFLOP per step; no MFU on "
                  f"{self.mesh.devices.flat[0].device_kind!r} (no peak FLOP/s in maskjax.train.devices).", flush=True)
        profile = tuple(self.config.profile_steps)
        profile_dir = os.path.join(self.workdir, "profile")

        def restart_clock():
            window.update(start=time.perf_counter(), timed=0)

        def check_window(log: bool) -> dict:
            """The loop's device-to-host reads, at sync steps only: at log steps the window's metric means (one
            fetch), at the other sync points (evaluation, checkpoint, stop) just whether a loss was non-finite."""
            if window["acc"] is None:
                return {}
            acc = window["acc"]
            host = jax.device_get(acc if log else {"nonfinite": acc["nonfinite"], "first_bad": acc["first_bad"]})
            if int(host["nonfinite"]):
                raise NonFiniteLossError(
                    f"Training loss became NaN/Inf at step {int(host['first_bad'])} ({int(host['nonfinite'])} "
                    f"non-finite of the steps {window['first']}-{step} since the last log step); stopping. "
                    + self._last_good_message(checkpointer))
            if not log:
                return {}
            count = max(int(host["steps"]), 1)
            means = {k: float(v) / count for k, v in host["sums"].items()}
            elapsed = time.perf_counter() - window["start"]
            if window["timed"]:  # the step rate of this window (host reads above waited for its steps)
                steps_per_second = window["timed"] / max(elapsed, 1e-9)
                means["images_per_second"] = steps_per_second * config.batch_size
                means["model_tflops_per_device"] = steps_per_second * basis["model_flops"] / basis["devices"] / 1e12
                if basis["peak_flops"]:
                    means["mfu"] = means["model_tflops_per_device"] * 1e12 / basis["peak_flops"]
            window.update(first=step + 1, acc=None)
            restart_clock()
            return means

        try:
            for step_index, local_batch in self.train_loader.iterate(start_step):
                if step >= config.total_steps:
                    break
                assert step_index == step, (step_index, step)
                next_step = step + 1
                log = next_step % config.log_every == 0 or next_step == config.total_steps
                evals_due = any(due(int(config.evals[name].every), next_step, config.total_steps)
                                for name in self.evaluators)
                save_due = next_step % config.checkpoint_every == 0 or next_step == config.total_steps
                sync = log or evals_due or save_due
                # A step that is not a sync point must not read anything back from the devices (asynchronous
                # dispatch); `step_guard` lets a test forbid it for the whole iteration.
                if profile and next_step == profile[0]:
                    jax.block_until_ready(state)
                    jax.profiler.start_trace(profile_dir)
                    window["profiling"] = True
                with contextlib.nullcontext() if sync else self.step_guard():
                    state, metrics = self.train_step(state, self.to_global(local_batch))
                    if step == start_step:  # this call compiled the step: time from its end
                        jax.block_until_ready(state.step)
                        restart_clock()
                    else:
                        window["timed"] += 1
                    if window.get("profiling") and next_step == profile[1]:
                        jax.block_until_ready(state)
                        jax.profiler.stop_trace()
                        window["profiling"] = False
                        if self.is_main:
                            print(f"Wrote a profile of steps {profile[0]}-{profile[1]} to {profile_dir}", flush=True)
                    if window["acc"] is None:
                        window["acc"] = _zero_accumulator(metrics)
                    window["acc"] = self._accumulate(window["acc"], metrics, state.step)
                    step = next_step
                    if progress is not None:
                        progress.update(1)
                    if sync:
                        means = check_window(log)
                        if means:
                            train_metrics = means
                            writer.write_scalars(step, means, prefix="train")
                            if progress is not None:
                                progress.set_postfix(loss=f"{means['loss']:.4f}",
                                                     img_s=f"{means.get('images_per_second', float('nan')):.0f}")
                    if evals_due:
                        eval_metrics, eval_step = self.evaluate(state.params, step, writer), step
                        restart_clock()
                    if save_due:
                        self._save_or_stop(save, step, state, checkpointer)
                        restart_clock()  # images/s measures training, not saving
                    # At the last step training is complete and saved: a signal there lets the final evaluation
                    # run. Several processes agree on stopping at sync steps only (the agreement is a collective).
                    if step < config.total_steps and (sync or jax.process_count() == 1) \
                            and self._should_stop(stop["signal"] is not None, step - start_step):
                        check_window(log=False)
                        self._save_or_stop(save, step, state, checkpointer)
                        stopped_early = True
                        break
            if not stopped_early:
                eval_metrics, eval_step = self.evaluate(state.params, step, writer, final=True), step
        finally:
            if window.get("profiling"):  # stopped inside the profiled steps
                jax.profiler.stop_trace()
            checkpointer.close()
            writer.close()
            if progress is not None:
                progress.close()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        self.state = state
        paths = {"workdir": self.workdir, "checkpoints": checkpointer.directory, "metrics": writer.jsonl_path,
                 "tensorboard": writer.tensorboard_dir, "images": writer.image_dir}
        return RunResult(step=step, train_metrics=train_metrics, eval_metrics=eval_metrics,
                         stopped_early=stopped_early, preempted=stopped_early and stop["signal"] is not None,
                         paths=paths, eval_step=eval_step, stop_signal=stop["signal"])

    def _save_or_stop(self, save: Callable, step: int, state: TrainState, checkpointer: ckpt_lib.Checkpointer):
        try:
            save(step, state)
        except ckpt_lib.NonFiniteStateError as error:
            raise NonFiniteLossError(f"{error}. " + self._last_good_message(checkpointer)) from error

    @staticmethod
    def _last_good_message(checkpointer: ckpt_lib.Checkpointer) -> str:
        good = checkpointer.last_good_step()
        if good is None:
            return (f"No checkpoint was saved or verified before it in {checkpointer.directory}; a restart "
                    "begins from scratch (lower config.checkpoint_every to keep more of a run).")
        return (f"The last good checkpoint is step {good} in {checkpointer.directory} (verified or saved by this "
                "run; nothing newer was saved).")

    def _install_signal_handlers(self, stop: dict) -> dict:
        """SIGTERM and the first Ctrl-C (SIGINT) ask the loop to save a checkpoint and stop; a second Ctrl-C aborts
        at once. Returns the previous handlers (none when not on the main thread, where handlers cannot be set)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum, _frame):
            name = signal.Signals(signum).name
            if signum == signal.SIGINT and stop["signal"] == "SIGINT":
                raise KeyboardInterrupt
            stop["signal"] = name
            if self.is_main:
                print(f"\n{name}: stopping after this step with a checkpoint"
                      + (" (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""),
                      file=sys.stderr, flush=True)
        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
        for signum in previous:
            signal.signal(signum, on_signal)
        return previous

    def _record_start(self, resumed: Optional[dict], start_step: int, checkpointer: ckpt_lib.Checkpointer) -> None:
        """config.json (atomically) and a history.jsonl line saying how this run started and what it changed."""
        config = self.config
        workdir_lib.atomic_write(os.path.join(self.workdir, "config.json"), config.to_json_best_effort(indent=2))
        if resumed is None:
            workdir_lib.append_history(self.workdir, "start", step=0, argv=list(sys.orig_argv),
                                       init_from=config.init_from.workdir or None)
            return
        changes = {**resumed["safe_changes"], **resumed["forced_changes"]}
        notes = []
        if "total_steps" in changes:
            note = self._schedule_note(int(changes["total_steps"][0]), start_step)
            if note:
                notes.append(f"total_steps {changes['total_steps'][0]} -> {changes['total_steps'][1]}: {note}")
        if resumed["forced_changes"]:
            notes.append("resume_policy='force': resuming despite changes that break exact resumption: "
                         + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in resumed["forced_changes"].items()))
        print(f"Resuming from the checkpoint at step {start_step} in {checkpointer.directory}"
              + (f" with config changes: {', '.join(sorted(changes))}" if changes else ""), flush=True)
        for note in notes:
            print(f"WARNING: {note}", file=sys.stderr, flush=True)
        workdir_lib.append_history(self.workdir, "resume", step=start_step, argv=list(sys.orig_argv),
                                   changes={k: list(v) for k, v in changes.items()},
                                   forced=sorted(resumed["forced_changes"]), notes=notes,
                                   damaged_steps=[s for s, _, _ in resumed["damaged"]])

    def _should_stop(self, signalled: bool, steps_this_run: int) -> bool:
        """A signal on any process (agreed by all) or the configured step budget of this run."""
        stop = signalled or (0 < self.config.stop_after_steps <= steps_this_run)
        if jax.process_count() > 1:
            stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
        return stop


def summary_lines(result: RunResult) -> list[str]:
    """Human-readable end-of-run report: final metrics and where everything was written."""
    if result.stopped_early:
        why = f" by {result.stop_signal}" if result.preempted else ""
        lines = [f"Stopped{why} at step {result.step}, checkpoint saved; run the same command to resume."]
    else:
        lines = [f"Finished at step {result.step}."]
        if result.stop_signal:
            lines[0] += f" ({result.stop_signal} arrived at the last step; the final evaluation ran.)"
    if result.eval_metrics:
        label = "Eval" if result.eval_step == result.step else f"Last evaluation (step {result.eval_step})"
        lines.append(f"{label}: " + json.dumps({k: round(v, 4) for k, v in result.eval_metrics.items()}))
    for name in ("checkpoints", "metrics", "tensorboard", "images"):
        lines.append(f"{name:>12}: {result.paths[name]}")
    return lines
