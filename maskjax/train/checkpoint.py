"""Orbax checkpoints: atomic async saves, keep-last-K, exact resume, restore onto any mesh."""

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves the train state (and small JSON metadata) under `<workdir>/checkpoints/<step>`.

    Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run killed mid-save
    leaves the previous checkpoint as the latest one.
    """

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Starts saving `state` (a pytree of jax.Arrays) at `step`; returns False if that step exists."""
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `step` onto the shardings of `abstract_state` (a tree of jax.ShapeDtypeStruct with sharding)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta)

    def restore_params(self, step: int) -> Any:
        """The 'params' subtree of checkpoint `step` as numpy arrays, whatever model and mesh wrote it (for
        initialising another model from it; replicated on every process)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return jax.tree.map(np.asarray, jax.device_get(restored.state["params"]))

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def load_params(workdir: str, step: int = -1, params_key: str = "", *, config_key: str = "init_from") -> tuple:
    """(numpy parameter tree under `params_key` ('a/b' path, '' = all), step) of the checkpoint `step` (-1 = latest)
    of another run's `workdir`. ValueErrors name `config_key` and the missing step or key."""
    source = Checkpointer(workdir, keep=1, async_save=False)
    try:
        step = source.latest_step() if step < 0 else step
        if step is None or step not in source.all_steps():
            raise ValueError(f"config.{config_key}.workdir={workdir!r}: no checkpoint at step "
                             f"{'latest' if step is None else step} (found {source.all_steps()})")
        loaded = source.restore_params(step)
    finally:
        source.close()
    for part in filter(None, params_key.split("/")):
        if part not in loaded:
            raise ValueError(f"config.{config_key}.params_key={params_key!r}: {part!r} is not in the checkpoint's "
                             f"parameters (top-level keys: {sorted(loaded)})")
        loaded = loaded[part]
    return loaded, step


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """A restore target: ShapeDtypeStructs of `tree` carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
