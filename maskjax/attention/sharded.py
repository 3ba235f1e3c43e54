"""Running the splash and cuDNN kernels under a device mesh.

JAX's splash attention is a Mosaic custom call: inside ``jax.jit`` with operands sharded over a mesh, XLA cannot
partition it ("Mosaic kernels cannot be automatically partitioned; wrap in shard_map"). So when the mesh in
context (``jax.sharding.get_abstract_mesh()``, e.g. set by ``jax.set_mesh`` as maskjax's trainer does while
tracing) spans more than one device, ``splash.splash_attention`` and ``cudnn.cudnn_attention`` run their kernel
inside ``jax.shard_map`` over that mesh, one independent call per shard:

* the batch is split over the mesh axes among ``BATCH_AXES`` = ('data', 'fsdp') that the mesh has, in that order
  (q, k, v and every per-example operand: splash segment ids, cuDNN lengths);
* heads are split over ``HEADS_AXIS`` = 'model' when the mesh has it and its size divides both heads and kv_heads
  (GQA groups then stay within a shard); otherwise heads are not split;
* every other mesh axis (and 'model' when heads are not split) holds a replica; the output has q's spec.

Attention needs no communication between shards: each (example, head) is independent, so the shard_map body is
the single-device call on the local block, and gradients flow through the shard_map's transpose. When the batch is
not divisible by the product of the batch axes' sizes the kernel cannot run sharded this way:
``attention(backend='auto')`` then uses 'blocked' (``auto_backend_reason`` gives this reason) and an explicit
``backend='splash'`` / ``'cudnn'`` raises a ValueError with it. Axes that are already manual (inside the caller's
own ``shard_map``) are left alone: the operands are local along them; such a caller's shard_map needs
``check_vma=False``, since splash's pallas_call does not declare how its outputs vary over mesh axes (this module's
shard_map uses check_vma=False for the same reason). With explicit mesh axes (``AxisType.Explicit``) the operands
are first resharded to the specs above (``jax.reshard``); with auto axes (maskjax's trainer) shard_map does that.
backend='pallas' (maskjax's own kernels, opt-in) is not wrapped.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
from jax.sharding import PartitionSpec as P

# Mesh axis names are a convention of maskjax.train (its mesh has axes ('data', 'fsdp', 'model'); the logical
# 'batch' axis maps to ('data', 'fsdp'), 'heads' to 'model'). These constants mirror maskjax/train/config.py
# MESH_AXES (and DEFAULT_SHARDING_RULES) so that attention does not import maskjax.train;
# tests/attention/test_sharded.py checks that they agree.
BATCH_AXES = ("data", "fsdp")
HEADS_AXIS = "model"
MESH_AXES = BATCH_AXES + (HEADS_AXIS,)


class MeshSplit(NamedTuple):
    """How q, k, v are split over a mesh: batch over ``batch_axes``, heads over ``heads_axis`` (None: unsplit)."""

    mesh: jax.sharding.AbstractMesh
    batch_axes: tuple
    heads_axis: Optional[str]

    @property
    def batch(self):
        """The spec entry of the batch dimension."""
        return self.batch_axes or None

    @property
    def head_shards(self) -> int:
        return 1 if self.heads_axis is None else self.mesh.shape[self.heads_axis]

    @property
    def free_axes(self) -> frozenset:
        """The mesh axes the shard_map makes manual (all but those already manual)."""
        return frozenset(a for a in self.mesh.axis_names if a not in self.mesh.manual_axes)

    def qkv_spec(self) -> P:
        """[batch, seq, heads, head_dim]."""
        return P(self.batch, None, self.heads_axis, None)

    def batch_spec(self, rank: int) -> P:
        """[batch, ...] split over the batch only."""
        return P(self.batch, *([None] * (rank - 1)))

    def shard_map(self, f, in_specs, out_specs):
        """``jax.shard_map`` over every free mesh axis. check_vma=False: splash's pallas_call does not declare how
        its outputs vary over mesh axes; the out_specs are right by construction (the output varies along the
        batch and head axes exactly as q does and is replicated over the others, since every replica computes the
        same thing)."""
        mapped = jax.shard_map(f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                               axis_names=self.free_axes, check_vma=False)
        if not self.mesh.explicit_axes:
            return mapped   # Auto axes: shard_map reshards its operands itself

        def resharded(*args):   # Explicit axes: shard_map wants operands already sharded as in_specs say
            return mapped(*jax.reshard(args, in_specs))
        return resharded


def context_mesh(mesh=None) -> Optional[jax.sharding.AbstractMesh]:
    """The mesh to shard over (``mesh``, default the mesh in context), or None when it spans at most one device
    (counting only axes not already manual)."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    elif isinstance(mesh, jax.sharding.Mesh):
        mesh = mesh.abstract_mesh
    if mesh.empty:
        return None
    free = math.prod(size for name, size in mesh.shape.items() if name not in mesh.manual_axes)
    return mesh if free > 1 else None


def mesh_split(mesh, batch: int, heads: int, kv_heads: int) -> tuple[Optional[MeshSplit], str]:
    """(split, '') to run sharded, (None, '') when no multi-device mesh is in context (or given), or
    (None, reason) when the batch does not divide over the batch axes."""
    mesh = context_mesh(mesh)
    if mesh is None:
        return None, ""
    free = [a for a in mesh.axis_names if a not in mesh.manual_axes]
    batch_axes = tuple(a for a in BATCH_AXES if a in free)
    size = math.prod(mesh.shape[a] for a in batch_axes)
    if batch % size:
        sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes)
        return None, (f"batch={batch} is not divisible by the mesh axes it is split over ({sizes}); the kernel "
                      "runs per shard under shard_map")
    heads_axis = None
    if HEADS_AXIS in free:
        m = mesh.shape[HEADS_AXIS]
        if heads % m == 0 and kv_heads % m == 0:
            heads_axis = HEADS_AXIS
    return MeshSplit(mesh, batch_axes, heads_axis), ""


__all__ = ["BATCH_AXES", "HEADS_AXIS", "MESH_AXES", "MeshSplit", "context_mesh", "mesh_split"]
