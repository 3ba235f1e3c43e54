"""The single attention entry point used by every model."""

from __future__ import annotations

import importlib
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from maskjax.attention.approx import APPROX_MODES, approx_attention
from maskjax.attention.blocked import blocked_attention
from maskjax.attention.checks import check_floating_qkv
from maskjax.attention.masks import Causal, Mask, as_mask
from maskjax.attention.reference import reference_attention
from maskjax.attention.score_mods import ScoreMod, as_score_mod

BACKENDS = ("auto", "reference", "blocked", "pallas", "approx")
# Below this many score elements per (batch, head) the dense path is cheaper than any tiling.
_SMALL = 256 * 256


def _pallas_module(platform: str):
    name = "maskjax.attention.pallas_gpu" if platform == "gpu" else "maskjax.attention.pallas_tpu"
    try:
        return importlib.import_module(name)
    except ImportError as err:  # the module is optional until the kernels are built
        raise ValueError(f"attention: backend='pallas' is not available ({name}: {err})") from err


def _pallas_unsupported(module, q, k, v, mask, mod, block_q, block_k, interpret) -> str:
    """'' when the kernel module can run this case, else the reason."""
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}"
    return module.unsupported_reason(q.shape, k.shape, q.dtype, mask, mod, block_q=block_q, block_k=block_k,
                                     interpret=bool(interpret))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask=None,
    bias: Optional[jax.Array] = None,
    *,
    scale: Optional[float] = None,
    score_mod: Optional[ScoreMod] = None,
    backend: str = "auto",
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    block_map=None,
    interpret: Optional[bool] = None,
    approx_mode: str = "lowrank",
    approx_degree: int = 2,
    approx_window: Optional[int] = None,
) -> jax.Array:
    """Masked softmax attention with a choice of backend.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim] (heads % kv_heads == 0).
      q, k, v must be real floating point (integer inputs raise a ValueError).
      mask: None, a ``Mask`` from ``maskjax.attention.masks`` (causal(), window_2d(...), ...), or a bool
        array broadcastable to [batch, heads, q_len, k_len] (True = attend; an integer array means
        nonzero = attend). Floating-point mask arrays raise a ValueError: a PyTorch-style additive mask
        (0 = keep, -inf = drop) goes in ``bias=``, e.g. ``bias=jnp.where(keep, 0., -jnp.inf)``, or pass
        the bool keep-mask itself, ``mask=keep``.
      bias: additive logits broadcastable to [batch, heads, q_len, k_len] (differentiable); -inf entries
        exclude keys like a mask does.
      scale: logit scale, default 1/sqrt(head_dim).
      score_mod: a ``ScoreMod`` (score_mods.py) applied after the bias, before the mask.
      backend: 'reference' (dense XLA), 'blocked' (XLA, non-empty tiles only), 'pallas' (flash kernels:
        TPU Mosaic / GPU Triton; interpret mode on CPU) or 'auto' (pallas on TPU/GPU when the kernel
        supports the mask; on CPU dense for small problems or no mask, else blocked).
      block_q, block_k: tile sizes for 'blocked' / 'pallas' (default 128, 128; GPU pallas 64, 64).
      block_map: optional precomputed block map (blocked backend), e.g. static for a traced mask.
      interpret: pallas interpret mode (default: True on CPU).
      approx_mode, approx_degree, approx_window: backend='approx' (polynomial low-rank attention,
        ``approx.approx_attention``): mode 'lowrank' | 'exact_fwd' | 'paper', even Taylor degree, and the
        width of the exactly computed local window (None: none). Its masks: None, ``causal()`` or a boolean
        key-padding array broadcastable to [batch, 1, 1, k_len]; no bias or score_mod.

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype. Query rows with no finite logit (fully masked by
      ``mask``, ``bias=-inf`` or a ``score_mod`` returning -inf) give zeros and zero gradients in every
      backend. NaN inputs are never hidden: NaN in q row i gives NaN in output row i (if the row attends
      any key), NaN in k or v gives NaN in every row that attends that key (NaN in v may also reach rows
      that mask that key: 0 * NaN in the weighted sum). q_len == 0 gives an empty result; k_len == 0
      gives zeros (every row is empty).

    Example::

        out = attention(q, k, v, mask=causal() & local_1d(left=256), backend="blocked")
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([k, v])
    check_floating_qkv("attention", q, k, v)
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention: incompatible shapes q={q.shape}, k={k.shape}; expected "
            "[batch, seq, heads, head_dim] with equal batch and head_dim and heads % kv_heads == 0")
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    mask_obj = as_mask(mask)
    if score_mod is not None and not isinstance(score_mod, ScoreMod):
        raise ValueError(f"attention: score_mod must be a ScoreMod, got {type(score_mod).__name__}")
    platform = jax.default_backend()
    batch, q_len, heads, _ = q.shape
    k_len = k.shape[1]

    mod = as_score_mod(score_mod, bias)
    default_block = 64 if platform == "gpu" else 128
    pallas_kwargs = dict(block_q=block_q or default_block, block_k=block_k or default_block,
                         interpret=(platform == "cpu") if interpret is None else interpret)

    if backend == "approx":
        return _approx(q, k, v, mask, mask_obj, bias, score_mod, scale, approx_mode, approx_degree, approx_window)
    if backend == "auto":
        backend = "reference"
        if platform in ("tpu", "gpu"):
            try:
                module = _pallas_module(platform)
                ok = not _pallas_unsupported(module, q, k, v, mask_obj, mod, **pallas_kwargs)
            except ValueError:
                ok = False
            backend = "pallas" if ok else "blocked"
        elif mask_obj is not None and q_len * k_len > _SMALL:
            backend = "blocked"

    if backend == "reference":
        return reference_attention(q, k, v, mask if not isinstance(mask, Mask) else mask_obj, bias,
                                   scale=scale, score_mod=score_mod)
    if backend == "blocked":
        return blocked_attention(q, k, v, mask_obj, bias, scale=scale, score_mod=score_mod,
                                 block_q=block_q or 128, block_k=block_k or 128, block_map=block_map)
    module = _pallas_module("gpu" if platform == "gpu" else "tpu")
    reason = _pallas_unsupported(module, q, k, v, mask_obj, mod, **pallas_kwargs)
    if reason:
        raise ValueError(f"attention: backend='pallas' cannot run this case: {reason}; use backend='blocked'")
    return module.flash_attention(q, k, v, mask_obj, mod, scale=scale, **pallas_kwargs)


def _approx(q, k, v, mask, mask_obj, bias, score_mod, scale, mode, degree, window) -> jax.Array:
    """backend='approx': maps the mask language onto what the low-rank kernel supports, or says why not."""
    if mode not in APPROX_MODES:
        raise ValueError(f"attention: approx_mode must be one of {APPROX_MODES}, got {mode!r}")
    if score_mod is not None:
        raise ValueError("attention: backend='approx' does not support score_mod (it breaks the low-rank kernel)")
    causal_flag, key_padding = False, None
    if isinstance(mask_obj, Causal) and mask_obj.offset == 0:
        causal_flag = True
    elif mask is not None and not isinstance(mask, Mask):
        # approx_attention checks that it is a [batch, 1, 1, k_len] key-padding mask; it takes bools only,
        # so integer masks get the meaning they have in the other backends (nonzero = attend) here.
        key_padding = jnp.asarray(mask)
        if key_padding.dtype != jnp.bool_:
            key_padding = key_padding != 0
    elif mask_obj is not None:
        raise ValueError(f"attention: backend='approx' supports mask=None, causal() or a boolean key-padding "
                         f"array, got {type(mask_obj).__name__}; use backend='blocked' for other masks")
    return approx_attention(q, k, v, key_padding, bias, scale=scale, approx_mode=mode, degree=degree,
                            causal=causal_flag, window=window)
