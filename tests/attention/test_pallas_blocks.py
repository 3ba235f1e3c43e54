"""Structural proof of block skipping in the Pallas kernels (interpret mode).

Each kernel (forward, dq, dk/dv) increments counters inside the branch that does a block's math: how many blocks
it computed and how many of those evaluated the mask function. They must equal, for every mask, the number of
non-empty blocks and of partial blocks counted independently (numpy) from the dense mask: empty blocks are
skipped (grid steps past a row's count do nothing) and full blocks never evaluate the mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention import masks as M
from maskjax.attention import pallas_gpu, pallas_tpu
from tests.attention.pallas_testing import block_census, causal_dense, local_dense, segments_dense

COUNTERS = {"tpu": pallas_tpu.block_counts_tpu, "gpu": pallas_gpu.block_counts_gpu}


def _mask_case(name, batch, heads, q_len, kv_len):
    rng = np.random.RandomState(1)
    if name == "none":
        return None, np.ones((1, 1, q_len, kv_len), bool)
    if name == "causal":
        return M.causal(), causal_dense(q_len, kv_len)[None, None]
    if name == "local":
        return M.local_1d(left=9, right=2), local_dense(q_len, kv_len, 9, 2)[None, None]
    if name == "segments":
        seg = np.stack([np.repeat([0, 1, 2], [20, 30, q_len - 50]), np.repeat([0, 1], [40, q_len - 40])])
        return M.segment_ids(seg), segments_dense(seg, seg)
    if name == "sparse_per_head":
        # Random block-sparse pattern with a different density per head, plus fully masked rows.
        coarse = rng.rand(batch, heads, -(-q_len // 8), -(-kv_len // 8)) < np.array([0.15, 0.5])[None, :, None, None]
        dense = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)[:, :, :q_len, :kv_len].copy()
        dense &= rng.rand(*dense.shape) < 0.8
        dense[:, :, 3] = False
        return M.dense(dense), dense
    raise KeyError(name)


@pytest.mark.parametrize("backend,mask_name", [
    ("tpu", "none"), ("gpu", "causal"), ("tpu", "local"), ("gpu", "local"), ("tpu", "segments"),
    ("tpu", "sparse_per_head"), ("gpu", "sparse_per_head"),
])
def test_blocks_computed_equal_nonempty_blocks(backend, mask_name):
    batch, heads, kv_heads, q_len, kv_len, block_q, block_k = 2, 2, 1, 70, 83, 16, 16
    if mask_name == "segments":
        kv_len = q_len   # segment ids are shared by queries and keys
    mask, dense = _mask_case(mask_name, batch, heads, q_len, kv_len)
    q = jnp.ones((batch, q_len, heads, 16), jnp.float32)
    k = v = jnp.ones((batch, kv_len, kv_heads, 16), jnp.float32)

    counts = COUNTERS[backend](q, k, v, mask, block_q=block_q, block_k=block_k, interpret=True)
    nonempty, partial = block_census(dense, q_len, kv_len, block_q, block_k, batch, heads)
    total = batch * heads * -(-q_len // block_q) * -(-kv_len // block_k)
    if mask_name != "none":
        assert nonempty < total, "the case must have empty blocks to prove anything"
    for kernel in ("fwd", "dq", "dkv"):
        assert counts[kernel] == nonempty, (kernel, counts)
        assert counts[kernel + "_masked"] == partial, (kernel, counts)


def test_static_block_lists_shrink_the_grid():
    """With a static mask the list width is the largest per-row count, not the number of kv blocks."""
    from maskjax.attention import pallas_common as pc
    q = jnp.ones((1, 128, 1, 16), jnp.float32)
    _, _, _, ops, _ = pc.prepare(q, q, q, M.local_1d(left=8, right=8), None, block_q=16, block_k=16)
    assert ops.fwd_lists.index.shape[-1] == 3       # a 17-wide band touches at most 3 blocks of 16
    assert ops.bwd_lists.index.shape[-1] == 3

    @jax.jit
    def traced(dense):
        _, _, _, ops, _ = pc.prepare(q, q, q, M.dense(dense), None, block_q=16, block_k=16)
        return ops.fwd_lists.index
    assert traced(jnp.ones((1, 1, 128, 128), bool)).shape[-1] == 8   # traced: full width, skipping by count


def _pallas_output_shapes(fn, *args):
    """Output shapes of every pallas_call in the jaxpr of fn(*args) (no execution)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append([tuple(v.aval.shape) for v in eqn.outvars])
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bias_gradient_kernel_output_only_when_differentiated(backend):
    """A constant bias costs no [B, H, q, kv] gradient output (custom VJP with symbolic zeros)."""
    from maskjax.attention import score_mods as S
    fn = {"tpu": pallas_tpu.flash_attention, "gpu": pallas_gpu.flash_attention}[backend]
    q = jnp.ones((1, 32, 2, 16), jnp.float32)
    bias = jnp.zeros((1, 2, 32, 32), jnp.float32)
    attend = lambda q, b: fn(q, q, q, M.causal(), S.bias(b), block_q=16, block_k=16, interpret=True).sum()
    only_q = _pallas_output_shapes(jax.grad(attend), q, bias)
    with_bias = _pallas_output_shapes(jax.grad(attend, argnums=(0, 1)), q, bias)
    assert len(only_q) == len(with_bias) == 3                     # forward, dq, dk/dv
    assert sum(len(o) for o in with_bias) == sum(len(o) for o in only_q) + 1
    assert any(len(shape) == 5 and shape[-1] == 32 for o in with_bias for shape in o)   # [B, H, nq, bq, kv]
