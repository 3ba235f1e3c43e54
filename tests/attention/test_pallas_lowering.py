"""Lowering proof without hardware: the Pallas kernels export for TPU (Mosaic) and CUDA (Triton).

`jax.export.export(jax.jit(f), platforms=[...])` runs the Pallas lowering to a Mosaic / Triton kernel embedded in
a custom call, for the forward pass and for `jax.grad` of a loss (forward, dq and dk/dv kernels). This proves
that the kernels *lower* for those platforms (block-shape rules, supported primitives, scalar prefetch / Triton
loads); it does not prove that the device compiler accepts them or that they run fast on a TPU or GPU.
Each platform is exported separately (the compiler params of one platform cannot lower on the other).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention import masks as M
from maskjax.attention import pallas_gpu, pallas_tpu
from maskjax.attention import score_mods as S

SEQ = 200   # padded to 256: exercises the padding path
HEADS, KV_HEADS = 4, 2

PLATFORMS = {
    "tpu": dict(fn=pallas_tpu.flash_attention, blocks=(128, 128), platforms=["tpu"], checks=[],
                custom_call="tpu_custom_call"),
    "cuda": dict(fn=pallas_gpu.flash_attention, blocks=(64, 64), platforms=["cuda"],
                 checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
                 custom_call="__gpu$xla.gpu.triton"),
}


def _mask(name):
    if name == "causal":
        return M.causal()
    if name == "segments":
        return M.segment_ids(np.repeat([[0, 1, 2]], [70, 80, 50], axis=1))
    if name == "dense_random":
        return M.dense(np.random.RandomState(0).rand(1, HEADS, SEQ, SEQ) < 0.3)
    if name == "local_and_padding":
        return M.local_1d(left=64, right=64) & M.lengths(kv_lengths=np.array([150]))
    raise KeyError(name)


def _export(platform, fn, args):
    cfg = PLATFORMS[platform]
    exported = jax.export.export(jax.jit(fn), platforms=cfg["platforms"], disabled_checks=cfg["checks"])(*args)
    text = exported.mlir_module()
    assert len(exported.serialize()) > 0
    return text.count(cfg["custom_call"])


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("mask_name,head_dim,with_score_mod", [
    ("causal", 64, False), ("segments", 128, False), ("dense_random", 64, True), ("local_and_padding", 128, True),
])
def test_forward_and_backward_export(platform, mask_name, head_dim, with_score_mod):
    cfg = PLATFORMS[platform]
    block_q, block_k = cfg["blocks"]
    mask = _mask(mask_name)
    q = jax.ShapeDtypeStruct((1, SEQ, HEADS, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, SEQ, KV_HEADS, head_dim), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, HEADS, SEQ, SEQ), jnp.float32)
    slopes = jax.ShapeDtypeStruct((HEADS,), jnp.float32)

    def attend(q, k, v, bias, slopes):
        mod = S.bias(bias) + S.alibi(slopes) + S.soft_cap(30.0) if with_score_mod else None
        return cfg["fn"](q, k, v, mask, mod, block_q=block_q, block_k=block_k)

    def loss(q, k, v, bias, slopes):
        return jnp.sum(attend(q, k, v, bias, slopes).astype(jnp.float32) ** 2)

    args = (q, kv, kv, bias, slopes)
    assert _export(platform, attend, args) == 1
    # Backward: forward (residuals) + dq + dk/dv kernels.
    argnums = (0, 1, 2, 3, 4) if with_score_mod else (0, 1, 2)
    assert _export(platform, jax.grad(loss, argnums=argnums), args) == 3
