"""The masking result type and the shared machinery every strategy uses.

Token layout: a grid ``(H, W)`` (or ``(T, H, W)`` for video) is flattened in row-major order, so
token ``n = h * W + w`` (``n = t * H * W + h * W + w``). ``mask[b, n] = True`` means token ``n`` of
sample ``b`` is *masked* (hidden from the encoder / replaced by the mask token).

Every strategy reduces to a per-token *priority* ``[B, N]`` (higher = masked first) and
:func:`mask_from_scores` turns it into an exact split: the ``num_masked`` highest priorities are
masked, the rest are visible. ``num_masked`` is a static Python int, the same for every sample,
so all shapes are static and the strategies are ``jit``-able with the key and scores traced.

Example::

    key = masking_key(seed=0, step=step)                       # or per example: index=example_ids
    res = random_masking(key, batch=8, grid_hw=(14, 14), ratio=0.75)
    visible = gather_tokens(tokens, res.ids_keep)             # [8, 49, D] -> the MAE encoder
    full = restore_tokens(encoded, mask_token, res.ids_restore)  # [8, 196, D] -> the MAE decoder
"""

from __future__ import annotations

import functools
import math
import numbers
import zlib
from typing import Any, Optional, Sequence, Tuple, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# fold_in constant separating masking draws from other purposes (trainer: init 0, train 1; 'mask' in ASCII).
PURPOSE_MASKING = 0x6D61736B

ORDERS = ("sorted", "shuffle")


@flax.struct.dataclass
class MaskingResult:
    """The visible / masked split of ``N`` tokens for a batch of ``B`` samples.

    mask:        bool  [B, N]          True = masked (hidden from the encoder).
    ids_keep:    int32 [B, N_visible]  indices of visible tokens.
    ids_masked:  int32 [B, N_masked]   indices of masked tokens.
    ids_restore: int32 [B, N]          inverse permutation of ``concat([ids_keep, ids_masked], 1)``:
        ``take_along_axis(concat([visible, mask_tokens], 1), ids_restore[..., None], 1)`` puts every
        token back at its original position (see :func:`restore_tokens`).

    Order: with ``order="sorted"`` (the default of every strategy) ``ids_keep`` and ``ids_masked``
    are each in ascending token order; with ``order="shuffle"`` (MAE) they are in the order of
    ascending priority (MAE: ascending noise), exactly as MAE's ``ids_shuffle[:, :len_keep]``.
    """

    mask: jax.Array
    ids_keep: jax.Array
    ids_masked: jax.Array
    ids_restore: jax.Array

    @property
    def num_masked(self) -> int:
        return self.ids_masked.shape[1]

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[1]


# ----------------------------------------------------------------------------------------------
# validation of static arguments (all before any compute)


def _is_static_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) or (
        isinstance(x, (np.ndarray, np.generic)) and np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype, np.number))


def check_batch(batch: Any) -> int:
    if isinstance(batch, bool) or not isinstance(batch, (numbers.Integral, np.integer)) or int(batch) < 1:
        raise ValueError(f"batch must be a positive Python int, got batch={batch!r}")
    return int(batch)


def check_grid(grid: Any, ndim: int, name: str = "grid_hw") -> Tuple[int, ...]:
    """A static grid of ``ndim`` positive ints, e.g. ``(14, 14)``."""
    try:
        dims = tuple(grid)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of {ndim} positive ints, got {name}={grid!r}") from None
    if len(dims) != ndim or any(isinstance(d, bool) or not isinstance(d, (numbers.Integral, np.integer))
                                or int(d) < 1 for d in dims):
        raise ValueError(f"{name} must be a tuple of {ndim} positive ints, got {name}={grid!r}")
    return tuple(int(d) for d in dims)


def num_masked_tokens(num_tokens: int, ratio: float) -> int:
    """``round(ratio * num_tokens)`` (Python rounding), validated: ``0 < ratio < 1`` and at least one
    masked and one visible token. MAE's ``L - int(L * (1 - ratio))`` agrees except when
    ``ratio * L`` is not an integer (e.g. L=196, ratio=0.4: 78 here, 79 in MAE)."""
    if not _is_static_number(ratio):
        raise ValueError(f"ratio must be a static Python number in (0, 1) (it fixes array shapes), got ratio={ratio!r}")
    ratio = float(ratio)
    if not 0.0 < ratio < 1.0 or math.isnan(ratio):
        raise ValueError(f"ratio must be in the open interval (0, 1), got ratio={ratio!r}")
    num_masked = int(round(ratio * num_tokens))
    if not 0 < num_masked < num_tokens:
        raise ValueError(f"ratio={ratio!r} of {num_tokens} tokens gives {num_masked} masked tokens; "
                         f"need at least one masked and one visible token")
    return num_masked


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {name}={value!r}")
    return value


def check_fraction(value: Any, name: str) -> Any:
    """A fraction in [0, 1]; traced values pass unchecked (they may change every step without re-tracing)."""
    if isinstance(value, jax.core.Tracer):
        return value
    if not (_is_static_number(value) or (isinstance(value, jax.Array) and value.ndim == 0)):
        raise ValueError(f"{name} must be a scalar in [0, 1], got {name}={value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {name}={value!r}")
    return value


def check_scores(scores: Any, batch: int, num_tokens: int, name: str = "scores") -> jax.Array:
    if scores is None:
        raise ValueError(f"{name} is required: a float array [batch, num_tokens] = [{batch}, {num_tokens}], got None")
    shape = tuple(np.shape(scores))
    if shape != (batch, num_tokens):
        raise ValueError(f"{name} must have shape [batch, num_tokens] = {(batch, num_tokens)}, got shape {shape}")
    scores = jnp.asarray(scores)
    if not jnp.issubdtype(scores.dtype, jnp.floating) and not jnp.issubdtype(scores.dtype, jnp.integer):
        raise ValueError(f"{name} must be a real-valued array, got dtype {scores.dtype}")
    return scores.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# keys


def _is_typed_key(key: Any) -> bool:
    return hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def masking_key(seed: Union[int, jax.Array], step: Union[int, jax.Array], index: Optional[Any] = None, *,
                purpose: Union[int, str] = PURPOSE_MASKING) -> jax.Array:
    """The key of one masking draw: ``fold_in(fold_in(fold_in(key(seed), purpose), step), index)``.

    seed: int (or a PRNG key to start from, e.g. the trainer's root key); step: int or traced int;
    index: optional global example indices (int array [B]) -> a batch of keys [B], one per example,
    so a sample's mask depends on (seed, step, example index) and not on how the batch is sharded.
    purpose: an int or a string (hashed with CRC32) separating independent draws of the same step.
    Returns a typed key [] (or [B]). Pass it as ``key`` to any strategy.
    """
    if isinstance(purpose, str):
        purpose = zlib.crc32(purpose.encode())
    if isinstance(purpose, bool) or not isinstance(purpose, (numbers.Integral, np.integer)):
        raise ValueError(f"purpose must be an int or a str, got purpose={purpose!r}")
    raw_key = hasattr(seed, "dtype") and jnp.asarray(seed).dtype == jnp.uint32 and np.shape(seed) == (2,)
    if _is_typed_key(seed) or raw_key:
        base = seed
    else:
        base = jax.random.key(seed)
    key = jax.random.fold_in(jax.random.fold_in(base, np.uint32(int(purpose) & 0xFFFFFFFF)), step)
    if index is None:
        return key
    index = jnp.asarray(index)
    if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"index must be an int array [batch] of example indices, "
                         f"got shape {index.shape} dtype {index.dtype}")
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def example_keys(key: jax.Array, batch: int) -> jax.Array:
    """One key per example: a single key gives ``fold_in(key, i)`` for row i; a batch of keys [B]
    (e.g. from ``masking_key(..., index=...)``) is used as is."""
    typed = _is_typed_key(key)
    single_ndim = 0 if typed else 1
    ndim = np.ndim(key)
    if ndim == single_ndim:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch, dtype=jnp.uint32))
    if ndim == single_ndim + 1:
        if np.shape(key)[0] != batch:
            raise ValueError(f"key holds {np.shape(key)[0]} per-example keys but batch={batch}")
        return key
    raise ValueError(f"key must be one PRNG key or a batch of {batch} keys, got shape {np.shape(key)}")


def uniform_noise(keys: jax.Array, num_tokens: int) -> jax.Array:
    """float32 [B, N] uniform in [0, 1), one independent row per example key."""
    return jax.vmap(lambda k: jax.random.uniform(k, (num_tokens,), jnp.float32))(keys)


def split_keys(keys: jax.Array, num: int) -> Tuple[jax.Array, ...]:
    """Split each of B example keys into ``num`` keys -> a tuple of ``num`` key batches [B]."""
    split = jax.vmap(lambda k: jax.random.split(k, num))(keys)
    return tuple(split[:, i] for i in range(num))


# ----------------------------------------------------------------------------------------------
# priorities -> exact split


def mask_from_scores(priority: jax.Array, num_masked: int, *, order: str = "sorted") -> MaskingResult:
    """Mask the ``num_masked`` highest-priority tokens of every row of ``priority`` [B, N].

    Ties go to the lower token index being kept (stable sort). ``order="shuffle"`` reproduces MAE's
    ``random_masking`` given its noise: ``ids_shuffle = argsort(noise)``, keep ``ids_shuffle[:, :len_keep]``
    (so ``mask_from_scores(noise, N - int(N * (1 - r)), order="shuffle")`` equals MAE / Hugging Face
    ``ViTMAE`` with ``noise``). ``order="sorted"`` lists kept and masked indices in ascending order.

    Example::

        res = mask_from_scores(jnp.array([[0.3, 0.9, 0.1, 0.5]]), 2)
        # res.mask = [[F, T, F, T]], res.ids_keep = [[0, 2]], res.ids_masked = [[1, 3]]
    """
    check_choice(order, "order", ORDERS)
    if np.ndim(priority) != 2:
        raise ValueError(f"priority must be [batch, num_tokens], got shape {np.shape(priority)}")
    num_tokens = np.shape(priority)[1]
    if isinstance(num_masked, bool) or not isinstance(num_masked, (numbers.Integral, np.integer)) \
            or not 0 < int(num_masked) < num_tokens:
        raise ValueError(f"num_masked must be a static int in (0, {num_tokens}), got num_masked={num_masked!r}")
    return _split(jnp.asarray(priority), num_masked=int(num_masked), order=order)


def keep_all(batch: int, num_tokens: int) -> MaskingResult:
    """Nothing masked: every token visible, in order (an MAE pass on the whole image, e.g. HPM's loss
    prediction before it picks the mask). ``ids_masked`` is [B, 0]."""
    batch = check_batch(batch)
    order = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
    return MaskingResult(mask=jnp.zeros((batch, num_tokens), bool), ids_keep=order,
                         ids_masked=jnp.zeros((batch, 0), jnp.int32), ids_restore=order)


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """Row-wise inverse of permutations ``perm`` [B, N]: ``inv[b, perm[b, i]] = i`` (a scatter, not a sort)."""
    b, n = perm.shape
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    return jnp.zeros((b, n), jnp.int32).at[rows, perm].set(
        jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), unique_indices=True)


# Compiled once per (shape, num_masked, order): eager callers pay one dispatch instead of one per op.
# One sort per call; the rest are scatters and cumulative sums (cheaper to compile and run than sorts).
@functools.partial(jax.jit, static_argnames=("num_masked", "order"))
def _split(priority: jax.Array, *, num_masked: int, order: str) -> MaskingResult:
    num_visible = priority.shape[1] - num_masked
    ids_shuffle = jnp.argsort(priority, axis=1, stable=True).astype(jnp.int32)
    if order == "sorted":
        mask = inverse_permutation(ids_shuffle) >= num_visible
        # Slot of every token in concat([ids_keep, ids_masked]) with both parts in ascending token order.
        visible_slot = jnp.cumsum(~mask, axis=1, dtype=jnp.int32) - 1
        masked_slot = num_visible + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
        ids_restore = jnp.where(mask, masked_slot, visible_slot)
        ids_shuffle = inverse_permutation(ids_restore)
    else:
        ids_restore = inverse_permutation(ids_shuffle)
    mask = ids_restore >= num_visible
    return MaskingResult(mask=mask, ids_keep=ids_shuffle[:, :num_visible],
                         ids_masked=ids_shuffle[:, num_visible:], ids_restore=ids_restore)


def mask_from_bool(mask: jax.Array, num_masked: int) -> MaskingResult:
    """The result for a boolean mask [B, N] that has exactly ``num_masked`` True entries per row
    (the caller guarantees it; under ``jit`` it cannot be checked)."""
    return mask_from_scores(jnp.asarray(mask).astype(jnp.float32), num_masked)


def upsample_mask(mask: jax.Array, coarse_hw: Sequence[int], factor: Union[int, Sequence[int]]) -> jax.Array:
    """Nearest-neighbour upsampling of a flattened mask [B, h*w] on a ``coarse_hw`` grid by ``factor``
    (int or (fh, fw)) -> [B, h*fh * w*fw], e.g. ConvMAE's stage-3 mask repeated for its conv stages."""
    h, w = check_grid(coarse_hw, 2, "coarse_hw")
    fh, fw = check_grid((factor, factor) if isinstance(factor, (numbers.Integral, np.integer)) else factor, 2, "factor")
    if np.ndim(mask) != 2 or np.shape(mask)[1] != h * w:
        raise ValueError(f"mask must be [batch, {h * w}] for coarse_hw={(h, w)}, got shape {np.shape(mask)}")
    m = jnp.asarray(mask).reshape(-1, h, 1, w, 1)
    m = jnp.broadcast_to(m, (m.shape[0], h, fh, w, fw))
    return m.reshape(m.shape[0], h * fh * w * fw)


# ----------------------------------------------------------------------------------------------
# token helpers


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
    """``x`` [B, N, *F] at ``ids`` [B, n] -> [B, n, *F] (e.g. the visible tokens with ``ids_keep``)."""
    if np.ndim(x) < 2 or np.ndim(ids) != 2 or np.shape(ids)[0] != np.shape(x)[0]:
        raise ValueError(f"gather_tokens needs x [B, N, ...] and ids [B, n] with the same B, "
                         f"got x {np.shape(x)} and ids {np.shape(ids)}")
    ids = jnp.asarray(ids).reshape(ids.shape + (1,) * (np.ndim(x) - 2))
    return jnp.take_along_axis(x, ids, axis=1)


def restore_tokens(visible: jax.Array, mask_token: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """Put ``visible`` [B, Nv, D] back at their positions and ``mask_token`` ([D], or MAE's [1, 1, D])
    everywhere else -> [B, N, D] with ``N = ids_restore.shape[1]`` (MAE's decoder input)."""
    if np.ndim(visible) != 3 or np.ndim(ids_restore) != 2 or np.shape(ids_restore)[0] != np.shape(visible)[0]:
        raise ValueError(f"restore_tokens needs visible [B, Nv, D] and ids_restore [B, N] with the same B, "
                         f"got visible {np.shape(visible)} and ids_restore {np.shape(ids_restore)}")
    b, nv, d = np.shape(visible)
    n = np.shape(ids_restore)[1]
    if nv > n:
        raise ValueError(f"visible has {nv} tokens but ids_restore only {n}")
    if int(np.prod(np.shape(mask_token))) != d:
        raise ValueError(f"mask_token must have {d} features ([D] or [1, 1, D]), got shape {np.shape(mask_token)}")
    fill = jnp.broadcast_to(jnp.reshape(mask_token, (1, 1, d)).astype(visible.dtype), (b, n - nv, d))
    full = jnp.concatenate([visible, fill], axis=1)
    return jnp.take_along_axis(full, jnp.asarray(ids_restore)[..., None], axis=1)
