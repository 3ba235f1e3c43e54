"""The single attention entry point used by every model, and the choice made by ``backend='auto'``."""

from __future__ import annotations

import importlib
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp

from maskjax.attention import sharded
from maskjax.attention.approx import APPROX_MODES, approx_attention
from maskjax.attention.blocked import blocked_attention
from maskjax.attention.checks import check_floating_qkv
from maskjax.attention.masks import Causal, Mask, as_mask
from maskjax.attention.reference import reference_attention
from maskjax.attention.score_mods import ScoreMod, as_score_mod

BACKENDS = ("auto", "reference", "blocked", "pallas", "splash", "cudnn", "approx")
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


def _platform() -> str:
    """The default device platform ('cpu', 'gpu', 'tpu'); a function so tests can pretend to be elsewhere."""
    return jax.default_backend()


def auto_backend_reason(platform: str, q: Any, k: Any, v: Any, mask=None, bias=None, score_mod=None, *,
                        block_q: Optional[int] = None, block_k: Optional[int] = None,
                        mesh=None) -> tuple[str, str]:
    """(backend, why) for ``attention(backend='auto')`` on ``platform`` ('tpu', 'gpu', 'cpu', ...).

    q, k, v may be arrays or ``jax.ShapeDtypeStruct`` (only shapes and dtypes are read); mask, bias and
    score_mod as in :func:`attention`; mesh: the mesh attention runs under (a ``Mesh`` / ``AbstractMesh``;
    default the mesh in context, ``jax.sharding.get_abstract_mesh()``). Pure: no device is queried. See
    :func:`choose_backend`.
    """
    mask_obj = as_mask(mask)
    mod = as_score_mod(score_mod, bias)
    dtypes = (q.dtype, k.dtype, v.dtype)
    if platform in ("tpu", "gpu"):
        # The kernel runs per shard under a multi-device mesh; that needs the batch to divide (sharded.py).
        _, mesh_why = sharded.mesh_split(mesh, q.shape[0], q.shape[2], k.shape[2])
    if platform == "tpu":
        from maskjax.attention import splash
        why = splash.unsupported_reason(q.shape, k.shape, dtypes, mask_obj, mod, block_q=block_q, block_k=block_k)
        why = why or mesh_why
        return ("blocked", why) if why else ("splash", "splash attention supports this mask and shape")
    if platform == "gpu":
        from maskjax.attention import cudnn
        why = cudnn.unsupported_reason(q.shape, k.shape, dtypes, mask_obj, mod) or mesh_why
        return ("blocked", why) if why else ("cudnn", "cuDNN flash attention supports this case")
    if mask_obj is not None and q.shape[1] * k.shape[1] > _SMALL:
        return "blocked", f"a mask on a large problem ({q.shape[1]} x {k.shape[1]} scores per head) on {platform}"
    return "reference", f"no mask or a small problem on {platform}"


def choose_backend(platform: str, q: Any, k: Any, v: Any, mask=None, bias=None, score_mod=None, *,
                   block_q: Optional[int] = None, block_k: Optional[int] = None, mesh=None) -> str:
    """The backend ``attention(backend='auto')`` runs on ``platform``.

    Until maskjax's own Pallas kernels have run on hardware, accelerators use the most trusted kernels:
    TPU: 'splash' (JAX's splash attention) when the mask maps onto splash masks and segment ids, else 'blocked';
    GPU: 'cudnn' (``jax.nn.dot_product_attention(implementation='cudnn')``) for no mask / causal / left window /
    lengths in float16 or bfloat16, else 'blocked'; CPU (and anything else): 'reference' for no mask or small
    problems, else 'blocked'. ``backend='pallas'`` is never chosen automatically.

    Under a mesh of more than one device (``mesh``, default the mesh in context) splash and cuDNN run inside
    ``jax.shard_map``, batch split over the mesh axes 'data' and 'fsdp' (those it has), heads over 'model' when
    that divides heads and kv_heads (else unsplit); when the batch does not divide over the batch axes, 'blocked'.
    """
    return auto_backend_reason(platform, q, k, v, mask, bias, score_mod, block_q=block_q, block_k=block_k,
                               mesh=mesh)[0]


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
      backend: 'auto' (below), 'reference' (dense XLA), 'blocked' (XLA, non-empty tiles only), 'splash'
        (JAX's TPU splash attention kernel, ``splash.py``), 'cudnn' (cuDNN flash attention through
        ``jax.nn.dot_product_attention``, ``cudnn.py``), 'pallas' (maskjax's own flash kernels, TPU Mosaic /
        GPU Triton: opt-in, run in interpret mode and proven to lower, not yet run on hardware) or 'approx'.
        'auto' (``choose_backend``): on TPU 'splash' when the mask maps onto splash's masks (full, causal,
        local window, static dense / other static per-head masks, segment ids and lengths, static or
        traced), else 'blocked'; on GPU 'cudnn' for float16/bfloat16 with no mask, causal, a causal left
        window or lengths, else 'blocked'; on CPU dense for small problems or no mask, else blocked. bias,
        score_mod, query masks and other traced masks always mean 'blocked' on accelerators.
        Under a mesh of more than one device (``jax.sharding.get_abstract_mesh()``, e.g. ``jax.set_mesh`` as
        maskjax's trainer does) 'splash' and 'cudnn' run inside ``jax.shard_map`` (XLA cannot partition these
        kernels): batch split over the mesh axes 'data' and 'fsdp' (those the mesh has), heads over 'model' when
        its size divides heads and kv_heads (else unsplit), output sharded like q; 'auto' uses 'blocked' when the
        batch does not divide over the batch axes (``sharded.py``). backend='pallas' is not wrapped.
      block_q, block_k: tile sizes for 'blocked' / 'pallas' / 'splash' (default 128, 128; GPU pallas 64, 64;
        splash: multiples of 128 dividing the lengths).
      block_map: optional precomputed block map (blocked backend), e.g. static for a traced mask.
      interpret: pallas / splash interpret mode (default: True on CPU).
      approx_mode, approx_degree, approx_window: backend='approx' (polynomial low-rank attention,
        ``approx.approx_attention``): mode 'lowrank' | 'exact_fwd' | 'paper', even Taylor degree, and the
        width of the exactly computed local window (None: none). Its masks: None, ``causal()`` or a boolean
        key-padding array broadcastable to [batch, 1, 1, k_len]; no bias or score_mod.

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype. Query rows with no finite logit (fully masked by
      ``mask``, ``bias=-inf`` or a ``score_mod`` returning -inf) give zeros and zero gradients in every
      backend. splash and cuDNN leave such rows undefined themselves; maskjax makes them zero: on 'splash'
      with a per-head attention sink of logit -1e30 that takes all the weight of an empty row (and none of
      any other row), on 'cudnn' from the rows' allowed ranges, computed from the mask (band and lengths).
      NaN inputs are never hidden: NaN in q row i gives NaN in output row i (if the row attends any key),
      NaN in k or v gives NaN in every row that attends that key (NaN in v may also reach rows that mask
      that key: 0 * NaN in the weighted sum). q_len == 0 gives an empty result; k_len == 0
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
    platform = _platform()

    mod = as_score_mod(score_mod, bias)
    default_block = 64 if platform == "gpu" else 128
    pallas_kwargs = dict(block_q=block_q or default_block, block_k=block_k or default_block,
                         interpret=(platform == "cpu") if interpret is None else interpret)

    if backend == "approx":
        return _approx(q, k, v, mask, mask_obj, bias, score_mod, scale, approx_mode, approx_degree, approx_window)
    if backend == "auto":
        backend = choose_backend(platform, q, k, v, mask_obj, bias, score_mod, block_q=block_q, block_k=block_k)

    if backend == "splash":
        from maskjax.attention.splash import splash_attention
        if mod is not None:
            raise ValueError("attention: backend='splash' cannot run this case: bias / score_mod; use 'blocked'")
        return splash_attention(q, k, v, mask_obj, scale=scale, block_q=block_q, block_k=block_k,
                                interpret=pallas_kwargs["interpret"])
    if backend == "cudnn":
        from maskjax.attention.cudnn import cudnn_attention
        if mod is not None:
            raise ValueError("attention: backend='cudnn' cannot run this case: bias / score_mod; use 'blocked'")
        return cudnn_attention(q, k, v, mask_obj, scale=scale)
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
