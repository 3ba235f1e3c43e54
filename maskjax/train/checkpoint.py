"""Orbax checkpoints: atomic async saves, keep-last-K, exact resume, restore onto any mesh, verified contents.

Orbax (0.12) makes a save atomic (a temporary directory renamed when complete) but does not check what it reads
back: a flipped bit in an array file restores without complaint. So every save records a digest of each array,
computed on device from the state being saved, and every restore recomputes it from the arrays it read. The digest
is two wrap-around uint32 sums per array (of the raw bits, and of the bits weighted by an odd multiplier of their
flat index), exact under any sharding or reduction order, so a checkpoint written on one mesh verifies on another.
"""

import json
import os
import shutil
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

DAMAGED_DIR = "damaged_checkpoints"  # Where damaged steps are moved (never deleted), beside `checkpoints/`.
_GOLDEN = 0x9E3779B1  # Odd multiplier: index weights differ for every position modulo 2**32.


class CheckpointDamagedError(RuntimeError):
    """A checkpoint step cannot be read back intact (unreadable files, digest mismatch, non-finite values)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {path} is damaged: {reason}")
        self.path, self.reason = path, reason


class NonFiniteStateError(FloatingPointError):
    """The state about to be saved holds NaN or Inf; saving it would push a good checkpoint out."""


def path_name(path) -> str:
    """'params/encoder/block_0/...' for a jax tree path (dict keys, attributes and indices alike)."""
    parts = []
    for entry in path:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _as_uint32(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32, same shape (plus a trailing axis for 8-byte dtypes)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: [..., 2]


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(uint32 sum of bits, uint32 index-weighted sum, bool finite) of one array, all scalars (so replicated on
    every process); the flat index comes from iotas, so no reshape reshards."""
    bits = _as_uint32(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    weights = index * jnp.uint32(_GOLDEN) + jnp.uint32(1)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
    return jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32), finite


@jax.jit
def _tree_digest(tree: Any) -> list:
    return [_leaf_digest(leaf) for leaf in jax.tree.leaves(tree)]


def state_digest(tree: Any) -> dict:
    """{'arrays': {path: 16 hex digits}, 'nonfinite': [paths holding NaN/Inf]} of a tree of arrays."""
    paths = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    digests = jax.device_get(_tree_digest(tree))
    return {"arrays": {p: f"{int(plain):08x}{int(weighted):08x}" for p, (plain, weighted, _) in zip(paths, digests)},
            "nonfinite": [p for p, (_, _, finite) in zip(paths, digests) if not finite]}


def verify(tree: Any, recorded: Optional[dict], prefix: str = "") -> list[str]:
    """Problems of a restored `tree` against the digest `recorded` at save time ([] = intact). `prefix` is the
    path of `tree` inside the saved state (e.g. 'params' when only the parameters were restored)."""
    actual = state_digest(tree)
    problems = [f"{prefix + '/' if prefix else ''}{p} holds NaN/Inf" for p in actual["nonfinite"]]
    if recorded is None:
        return problems
    expected = recorded.get("arrays", {})
    for path, digest in actual["arrays"].items():
        full = f"{prefix}/{path}" if prefix else path
        if full not in expected:
            problems.append(f"{full} has no recorded digest")
        elif expected[full] != digest:
            problems.append(f"{full}: digest {digest} differs from the {expected[full]} recorded at save time")
    return problems


def flat_array_metadata(state_dir: str) -> dict[str, tuple[tuple, str]]:
    """{path: (shape, dtype)} of the arrays saved in a step's `state` item, read from orbax metadata only (the
    item's handler: the step-level checkpointer would warn about the step's own metadata file)."""
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    return {path_name(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def metadata_disagreement(saved: dict[str, tuple[tuple, str]], digest: Optional[dict]) -> str:
    """Why orbax's array metadata of a step cannot be trusted ('' = it can): it lists no array, or other arrays
    than the digest recorded beside it at save time."""
    if not saved:
        return "its array metadata (state/_METADATA) lists no array: the file is damaged or missing"
    if digest is None:
        return ""
    recorded = set(digest.get("arrays", {}))
    if recorded and set(saved) != recorded:
        missing, extra = sorted(recorded - set(saved)), sorted(set(saved) - recorded)
        return f"the array metadata disagrees with the recorded digest (missing {missing[:3]}, extra {extra[:3]})"
    return ""


def structure_mismatch(saved: dict[str, tuple[tuple, str]], abstract_state: Any) -> list[str]:
    """Arrays whose presence, shape or dtype differ between a checkpoint and the state a config builds."""
    wanted = {path_name(p): (tuple(x.shape), str(np.dtype(x.dtype)))
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    def order(paths):  # parameters first: the optimizer state repeats their shapes
        return sorted(paths, key=lambda p: (not p.startswith("params/"), p))
    problems = [f"{p}: only in the checkpoint {saved[p][0]}" for p in order(set(saved) - set(wanted))]
    problems += [f"{p}: only in the model {wanted[p][0]}" for p in order(set(wanted) - set(saved))]
    problems += [f"{p}: checkpoint {saved[p][0]} {saved[p][1]} vs model {wanted[p][0]} {wanted[p][1]}"
                 for p in order(set(saved) & set(wanted)) if saved[p] != wanted[p]]
    return problems


class Checkpointer:
    """Saves the train state (and small JSON metadata) under `<workdir>/checkpoints/<step>`.

    Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run killed mid-save
    leaves the previous checkpoint as the latest one. Every save records the digest of its arrays in the metadata
    (`meta['digest']`); a state holding NaN/Inf is refused. `cleanup_tmp=True` (the run that owns the workdir)
    removes the temporary directories of saves that never completed.
    """

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, cleanup_tmp: bool = False):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=cleanup_tmp))
        self._good: set[int] = set()  # Steps verified at restore or saved (finite) by this checkpointer.

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Starts saving `state` (a pytree of jax.Arrays) at `step` with `meta` plus the arrays' digest; returns
        False if that step exists. Raises NonFiniteStateError (naming the arrays) instead of saving NaN/Inf."""
        if step in self._manager.all_steps():
            return False
        digest = state_digest(state)
        if digest["nonfinite"]:
            raise NonFiniteStateError(f"the state at step {step} holds NaN/Inf in {digest['nonfinite'][:5]}; "
                                      "not saved")
        saved = self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(dict(meta, digest=digest))),
            force=True)
        if saved:
            self._good.add(step)
        return saved

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of `step` (raises, naming the file, on unreadable or missing metadata)."""
        path = os.path.join(self.step_dir(step), "meta", "metadata")
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ValueError(f"{path}: {type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path} holds {type(meta).__name__}, not a JSON object")
        return meta

    def array_metadata(self, step: int) -> dict[str, tuple[tuple, str]]:
        """{path: (shape, dtype)} of the arrays of `step`, without reading them."""
        return flat_array_metadata(os.path.join(self.step_dir(step), "state"))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `step` onto the shardings of `abstract_state` (a tree of jax.ShapeDtypeStruct with sharding)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta)

    def restore_verified(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """`restore`, then the digest and finiteness check; raises CheckpointDamagedError naming the step."""
        path = self.step_dir(step)
        try:
            meta = self.read_meta(step)
            state, _ = self.restore(step, abstract_state)
        except Exception as error:  # orbax/TensorStore raise many types for unreadable files
            raise CheckpointDamagedError(path, _short(error)) from error
        problems = verify(state, meta.get("digest"))
        if problems:
            raise CheckpointDamagedError(path, f"{len(problems)} problem(s): " + "; ".join(problems[:3]))
        self._good.add(step)
        return state, meta

    def restore_params(self, step: int) -> Any:
        """The 'params' subtree of checkpoint `step` as numpy arrays, whatever model and mesh wrote it (for
        initialising another model from it; replicated on every process), checked against its digest. Reads the
        parameters only, not the optimizer state."""
        return self.restore_numpy(step, "params")

    def restore_numpy(self, step: int, subtree: Optional[str] = None) -> Any:
        """Checkpoint `step` (or its top-level `subtree`) as numpy arrays in the saved structure (dicts and lists),
        whatever model and mesh wrote it, checked against its digest; reads nothing else from disk."""
        path = self.step_dir(step)
        try:
            meta = self.read_meta(step)
            state_dir = os.path.join(path, "state")
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
            saved = {key: saved[key] for key in ([subtree] if subtree else saved.keys())}
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=subtree is not None))
        except Exception as error:
            raise CheckpointDamagedError(path, _short(error)) from error
        tree = restored[subtree] if subtree else restored
        problems = verify(tree, meta.get("digest"), prefix=subtree or "")
        if problems:
            raise CheckpointDamagedError(path, f"{len(problems)} problem(s): " + "; ".join(problems[:3]))
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def last_good_step(self) -> Optional[int]:
        """The newest step this checkpointer verified or saved (after pending saves finish), else None."""
        self.wait()
        on_disk = set(self._manager.all_steps())
        good = sorted(self._good & on_disk)
        return good[-1] if good else None

    def quarantine(self, step: int, reason: str) -> str:
        """Moves the step's directory to `<workdir>/damaged_checkpoints/` (never deletes it) with a REASON file;
        returns the new path."""
        target_root = os.path.join(self.workdir, DAMAGED_DIR)
        os.makedirs(target_root, exist_ok=True)
        target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
        suffix = 0
        while os.path.exists(target + (f"-{suffix}" if suffix else "")):
            suffix += 1
        target += f"-{suffix}" if suffix else ""
        shutil.move(self.step_dir(step), target)
        with open(os.path.join(target, "REASON.txt"), "w") as f:
            f.write(reason + "\n")
        self._good.discard(step)
        self._manager.reload()
        return target

    def reload(self) -> None:
        """Re-reads the list of steps (after another process moved one aside)."""
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _short(error: BaseException, limit: int = 300) -> str:
    """The first line of the innermost exception of a chain, cut to `limit` characters: orbax wraps TensorStore's
    precise reason (which array, which file, which byte range) in a generic error that embeds a whole spec."""
    def inner(e):
        return e.__cause__ or (None if e.__suppress_context__ else e.__context__)

    root = error
    while inner(root) is not None:
        root = inner(root)
    lines = str(root).strip().splitlines()
    text = f"{type(root).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit] + "..."


def load_params(workdir: str, step: int = -1, params_key: str = "", *, config_key: str = "init_from") -> tuple:
    """(numpy parameter tree under `params_key` ('a/b' path, '' = all), step) of the checkpoint `step` (-1 = latest)
    of another run's `workdir`, verified against its digest. ValueErrors name `config_key` and the missing or
    damaged step or key."""
    source = Checkpointer(workdir, keep=1, async_save=False)
    try:
        step = source.latest_step() if step < 0 else step
        if step is None or step not in source.all_steps():
            raise ValueError(f"config.{config_key}.workdir={workdir!r}: no checkpoint at step "
                             f"{'latest' if step is None else step} (found {source.all_steps()})")
        try:
            loaded = source.restore_params(step)
        except CheckpointDamagedError as error:
            raise ValueError(f"config.{config_key}.workdir={workdir!r}: {error}; pass config.{config_key}.step "
                             f"to pick another of {source.all_steps()}") from error
    finally:
        source.close()
    for part in filter(None, params_key.split("/")):
        if part not in loaded:
            raise ValueError(f"config.{config_key}.params_key={params_key!r}: {part!r} is not in the checkpoint's "
                             f"parameters (top-level keys: {sorted(loaded)})")
        loaded = loaded[part]
    return loaded, step


def load_run_config(workdir: str) -> Any:
    """The ConfigDict a run in `workdir` was trained with (its config.json), with every key the current schema of
    its task and model has but the file lacks set to that key's default: runs saved before a key existed load as
    they ran (new keys default to the old behaviour)."""
    import ml_collections

    from maskjax.evaluate.evaluators import schema_of_evals
    from maskjax.train.config import base_config

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"--workdir={workdir!r} has no config.json (not a maskjax run)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))

    def fill(node, reference):
        for key, value in reference.items():
            if key not in node:
                node[key] = value
            elif isinstance(value, ml_collections.ConfigDict) and isinstance(node[key], ml_collections.ConfigDict):
                fill(node[key], value)

    model = config.get("model")
    reference = base_config(config.task, model.get("name") if model is not None else None)
    reference.evals = schema_of_evals(config.get("evals") or {})
    fill(config, reference)
    return config


def load_run(workdir: str, step: int, tasks: Sequence[str], command: str) -> tuple:
    """(config, task, numpy params, step) of the trained run in `workdir` at checkpoint `step` (-1 = latest), for a
    command that works on runs of `tasks` only. ValueErrors name the workdir: not a run, another task, no or a
    damaged checkpoint."""
    from maskjax.tasks import make_task

    config = load_run_config(workdir)
    if config.task not in tasks:
        raise ValueError(f"--workdir={workdir!r} is a run of task {config.task!r}; maskjax.{command} works on "
                         f"runs of {tuple(tasks)}")
    task = make_task(config, load_params=load_params)
    params, step = load_params(workdir, step, "", config_key=command)
    return config, task, params, step


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """A restore target: ShapeDtypeStructs of `tree` carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
