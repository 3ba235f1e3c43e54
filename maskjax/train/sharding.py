"""Device mesh from config and logical-axis sharding of parameters, optimizer state and batches."""

import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maskjax.train.config import MESH_AXES, resolve_mesh_shape

BATCH_AXES = ("data", "fsdp")  # Mesh axes the global batch is split over.


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ('data', 'fsdp', 'model') over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(mesh_config, len(devices))
    sizes = tuple(shape[axis] for axis in MESH_AXES)
    try:
        device_grid = mesh_utils.create_device_mesh(sizes, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        device_grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(device_grid, MESH_AXES)


def batch_sharding(mesh: Mesh, rank: int = 1) -> NamedSharding:
    """Leading (batch) axis split over the data and fsdp mesh axes."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (rank - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, name: str) -> P:
    """Drops mesh axes from dimensions they do not divide, so any model size runs on any mesh."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        axes_tuple = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in axes_tuple]))
        if dim % size:
            logging.warning("Replicating dim %d of %s %s: not divisible by mesh axes %s (%d).",
                            dim, name, tuple(shape), axes_tuple, size)
            fitted.append(None)
        else:
            fitted.append(axes)
    return P(*fitted)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a tree of (abstract) values boxed with `nn.with_logical_partitioning`.

    Unboxed leaves are replicated. Returns an unboxed tree of the same structure.
    """
    logical_specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    values = nn.meta.unbox(abstract_boxed)
    paths_and_values = jax.tree_util.tree_flatten_with_path(values)[0]
    specs = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P) or x is None)
    shardings = []
    for (path, value), spec in zip(paths_and_values, specs):
        spec = P() if spec is None else spec
        shardings.append(NamedSharding(mesh, _fit_spec(spec, value.shape, mesh, jax.tree_util.keystr(path))))
    return jax.tree.unflatten(jax.tree.structure(values), shardings)


def shardings_like_params(tree: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: subtrees shaped like `params` follow the params, the rest is replicated."""
    params_def = jax.tree.structure(params)
    params_shapes = [p.shape for p in jax.tree.leaves(params)]

    def is_params_like(node):
        if jax.tree.structure(node) != params_def:
            return False
        return [getattr(x, "shape", None) for x in jax.tree.leaves(node)] == params_shapes

    def assign(node):
        if is_params_like(node) and not isinstance(node, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
            return params_shardings
        return replicated(mesh)

    return jax.tree.map(assign, tree, is_leaf=is_params_like)
