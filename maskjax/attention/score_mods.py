"""Score modifiers: ``(score, b, h, q_idx, kv_idx) -> score`` with a differentiable parameter pytree.

A score modifier is applied to the scaled logits ``scale * q.k`` of every computed block, before the
mask. Its array leaves (parameters such as ALiBi slopes, a relative-position table, a soft-cap value,
an additive bias) follow the same leaf layout as masks (``[Bl, Hl, *extra, Ql, Kl]``, see masks.py),
so kernels fetch per-block pieces the same way; gradients flow to every floating-point leaf.

Example::

    mod = alibi(slopes) + soft_cap(30.0)          # applied left to right
    out = attention(q, k, v, mask=causal(), score_mod=mod)
    grads = jax.grad(lambda s: attention(q, k, v, score_mod=alibi(s)).sum())(slopes)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maskjax.attention.masks import ArrayLike, LayoutNode, TokenGrid, _from_axes, _from_broadcastable


class ScoreMod(LayoutNode):
    """Base class. Subclasses implement ``_apply(score, b, h, q_idx, kv_idx)`` on the block form:
    score float32 [bq, bk], q_idx int32 [bq, 1], kv_idx int32 [1, bk], b / h int32 scalars."""

    def __add__(self, other: "ScoreMod") -> "ScoreMod":
        return Chain(self, other)

    def apply(self, score, b, h, q_idx, kv_idx):
        """Modified score, float32, same shape as score."""
        return jnp.broadcast_to(self._apply(score, b, h, q_idx, kv_idx), score.shape).astype(jnp.float32)

    def _apply(self, score, b, h, q_idx, kv_idx):
        raise TypeError(f"{type(self).__name__} does not define a score function")


class Chain(ScoreMod):
    """Apply modifiers left to right: ``alibi(s) + soft_cap(50.)`` == ``Chain(alibi(s), soft_cap(50.))``."""

    def __init__(self, *mods: ScoreMod):
        kids = []
        for m in mods:
            if not isinstance(m, ScoreMod):
                raise ValueError(f"Chain: expected ScoreMod objects, got {type(m).__name__}")
            kids.extend(m.children if type(m) is Chain else (m,))
        self.children = tuple(kids)

    def _apply(self, score, b, h, q_idx, kv_idx):
        for c in self.children:
            score = c.apply(score, b, h, q_idx, kv_idx)
        return score


class Bias(ScoreMod):
    """Additive bias broadcastable to [batch, heads, q_len, k_len] (numpy rules), e.g. a relative
    position bias or a soft (Gaussian) mask. ``bias(np.zeros((1, heads, n, n)))``."""

    def __init__(self, value: ArrayLike):
        arr, lay = _from_broadcastable(value, None, 0.0, "bias")
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            arr = arr.astype(np.float32)
        self.arrays, self.layouts = (arr,), (lay,)

    def _apply(self, score, b, h, q_idx, kv_idx):
        return score + self.arrays[0].astype(jnp.float32)


def bias(value: ArrayLike) -> Bias:
    """Additive bias (see :class:`Bias`)."""
    return Bias(value)


class Alibi(ScoreMod):
    """ALiBi: ``score - slope[h] * |q_idx - kv_idx|`` (``causal=True``: ``- slope[h] * (q_idx - kv_idx)``,
    the original decoder form, to be combined with a causal mask). slopes: float [heads].
    ``alibi(alibi_slopes(8))`` gives the paper's geometric slopes."""

    _static_fields = ("causal",)

    def __init__(self, slopes: ArrayLike, causal: bool = False):
        arr, lay = _from_axes(slopes, "h", None)
        self.arrays, self.layouts = (arr,), (lay,)
        self.causal = bool(causal)

    def _apply(self, score, b, h, q_idx, kv_idx):
        dist = (q_idx - kv_idx).astype(jnp.float32)
        if not self.causal:
            dist = jnp.abs(dist)
        return score - self.arrays[0].astype(jnp.float32) * dist


def alibi_slopes(heads: int) -> np.ndarray:
    """The ALiBi paper's slopes 2^(-8 i / heads), i = 1..heads (float32 [heads])."""
    return (2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)).astype(np.float32)


def alibi(slopes: ArrayLike, causal: bool = False) -> Alibi:
    """ALiBi linear distance penalty (see :class:`Alibi`)."""
    return Alibi(slopes, causal)


class SoftCap(ScoreMod):
    """Soft-capping (Gemma 2): ``cap * tanh(score / cap)``. cap: python float or float array [] (learnable)."""

    def __init__(self, cap):
        arr, lay = _from_axes(jnp.asarray(cap, jnp.float32) if isinstance(cap, jax.Array) else
                              np.asarray(cap, np.float32), "", None)
        self.arrays, self.layouts = (arr,), (lay,)

    def _apply(self, score, b, h, q_idx, kv_idx):
        cap = self.arrays[0].astype(jnp.float32)
        return cap * jnp.tanh(score / cap)


def soft_cap(cap) -> SoftCap:
    """Soft-capping (see :class:`SoftCap`)."""
    return SoftCap(cap)


class RelativePosition1D(ScoreMod):
    """Learned 1-D relative position bias (T5/Swin style): ``score + table[h, clip(kv - q, -R, R) + R]``.
    table: float [heads, 2R + 1]. Uses a gather inside the block (fine in XLA; a Pallas kernel may
    decline it). ``relative_position_1d(jnp.zeros((heads, 2 * 16 + 1)))``."""

    def __init__(self, table: ArrayLike):
        arr, lay = _from_axes(table, "hx", None)
        if arr.shape[2] % 2 != 1:
            raise ValueError(f"relative_position_1d: table must be [heads, 2R+1], got {table.shape}")
        self.arrays, self.layouts = (arr,), (lay,)

    def _apply(self, score, b, h, q_idx, kv_idx):
        table = self.arrays[0].reshape(-1).astype(jnp.float32)
        radius = (table.shape[0] - 1) // 2
        rel = jnp.clip(kv_idx - q_idx, -radius, radius) + radius
        return score + jnp.take(table, rel, mode="clip")


def relative_position_1d(table: ArrayLike) -> RelativePosition1D:
    """1-D relative position bias (see :class:`RelativePosition1D`)."""
    return RelativePosition1D(table)


class Gaussian2D(ScoreMod):
    """Gaussian soft locality on a token grid: ``score - d^2 / (2 sigma[h]^2)``, d the grid distance
    between query and key tokens (prefix tokens: d = 0). sigma: float [heads] (learnable) or a scalar.
    ``gaussian_2d(TokenGrid(14, 14, num_prefix=1), sigma=np.full(heads, 3.0))``."""

    _static_fields = ("grid",)

    def __init__(self, grid: TokenGrid, sigma: ArrayLike):
        self.grid = grid
        sig = sigma if isinstance(sigma, jax.Array) else np.asarray(sigma, np.float32)
        s_arr, s_lay = _from_axes(sig, "h" if sig.ndim == 1 else "", None)
        r, c = grid.coords()
        leaves = [(s_arr, s_lay)] + [_from_axes(x, ax, np.int32, -1) for ax in ("q", "k") for x in (r, c)]
        self.arrays = tuple(x[0] for x in leaves)
        self.layouts = tuple(x[1] for x in leaves)

    def _check_node(self, batch, heads, q_len, k_len):
        if q_len != self.grid.num_tokens or k_len != self.grid.num_tokens:
            raise ValueError(f"gaussian_2d: q_len={q_len}, k_len={k_len} must equal grid tokens "
                             f"{self.grid.num_tokens}")

    def _apply(self, score, b, h, q_idx, kv_idx):
        sigma, qr, qc, kr, kc = self.arrays
        prefix = (qr < 0) | (kr < 0)
        d2 = ((qr - kr) ** 2 + (qc - kc) ** 2).astype(jnp.float32)
        d2 = jnp.where(prefix, 0.0, d2)
        sigma = sigma.astype(jnp.float32)
        return score - d2 / (2.0 * sigma * sigma)


def gaussian_2d(grid: TokenGrid, sigma: ArrayLike) -> Gaussian2D:
    """Gaussian distance penalty (see :class:`Gaussian2D`)."""
    return Gaussian2D(grid, sigma)


class FunctionScoreMod(ScoreMod):
    """A user score function ``fn(score, b, h, q_idx, kv_idx, *blocks) -> score`` with array parameters
    named by ``axes`` strings (letters 'b', 'h', 'x', 'q', 'k', see ``function_mask``). Use elementwise
    jnp ops so it also runs inside kernels. Example, a learnable per-head temperature::

        mod = score_function(lambda s, b, h, q, k, t: s * t, temps, axes=("h",))
    """

    _static_fields = ("fn",)

    def __init__(self, fn: Callable, *arrays: ArrayLike, axes: Sequence[str] = ()):
        if not callable(fn):
            raise ValueError(f"score_function: fn must be callable, got {type(fn).__name__}")
        if len(axes) != len(arrays):
            raise ValueError(f"score_function: got {len(arrays)} arrays but {len(axes)} axes strings")
        self.fn = fn
        stored = [_from_axes(a, ax, None) for a, ax in zip(arrays, axes)]
        self.arrays = tuple(s[0] for s in stored)
        self.layouts = tuple(s[1] for s in stored)
        # Conservative: a user function may read b / h, so block-level structure is per (b, h) only if
        # its leaves say so; the score function itself never changes the block map.

    def _apply(self, score, b, h, q_idx, kv_idx):
        return self.fn(score, b, h, q_idx, kv_idx, *self.arrays)


def score_function(fn: Callable, *arrays: ArrayLike, axes: Sequence[str] = ()) -> FunctionScoreMod:
    """User score modifier (see :class:`FunctionScoreMod`)."""
    return FunctionScoreMod(fn, *arrays, axes=axes)


def as_score_mod(mod: Optional[ScoreMod], bias_value: Optional[ArrayLike] = None) -> Optional[ScoreMod]:
    """Combine the ``bias=`` array (applied first) and ``score_mod=`` into one modifier (or None)."""
    if mod is not None and not isinstance(mod, ScoreMod):
        raise ValueError(f"score_mod must be a ScoreMod, got {type(mod).__name__}")
    if bias_value is None:
        return mod
    b = Bias(bias_value)
    return b if mod is None else Chain(b, mod)


__all__ = ["ScoreMod", "Chain", "Bias", "Alibi", "SoftCap", "RelativePosition1D", "Gaussian2D",
           "FunctionScoreMod", "bias", "alibi", "alibi_slopes", "soft_cap", "relative_position_1d",
           "gaussian_2d", "score_function", "as_score_mod"]
