"""The mask language: attention masks as composable pytrees evaluated block by block.

Every mask is a *mask function* ``(batch, head, q_idx, kv_idx) -> bool`` (True = may attend) plus
array data. The array data are pytree leaves (so masks built from traced arrays work under ``jit``);
everything else (kind, sizes, flags) is hashable static structure (pytree aux data).

Leaf layout (the protocol kernels rely on)
------------------------------------------
Every array leaf of every mask node is stored as ``[Bl, Hl, *extra, Ql, Kl]`` where
``Bl in {1, batch}`` and ``Hl in {1, heads}`` (size 1 = shared), ``extra`` are small unblocked axes,
and ``Ql`` is the query length if the leaf's :class:`LeafLayout` has ``q=True`` (else 1), ``Kl`` the
key length if ``kv=True`` (else 1). A kernel therefore fetches, for grid cell (b, h, q block i,
kv block j), the block ``leaf[b or 0, h or 0, ..., i*bq:(i+1)*bq or 0, j*bk:(j+1)*bk or 0]`` of shape
``[*extra, bq or 1, bk or 1]``, rebuilds the mask with ``jax.tree.unflatten(treedef, blocks)``
(the *block form*) and calls ``mask.evaluate(b, h, q_idx, kv_idx)`` with absolute positions
``q_idx: int32 [bq, 1]`` and ``kv_idx: int32 [1, bk]``; the result is bool ``[bq, bk]``.

Example::

    m = causal() & local_1d(left=64)                 # a mask object
    m = m | segment_ids(seg)                          # seg: int32 [batch, n]
    dense = m.materialize(n, n, batch=b, heads=h)     # bool [Bm, Hm, n, n], Bm in {1, b}, Hm in {1, h}
    bm = m.block_map(n, n, 128, 128, batch=b, heads=h)  # see block_map.py
    out = attention(q, k, v, mask=m)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = Union[np.ndarray, jax.Array]


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """Static description of one array leaf ``[Bl, Hl, *extra, Ql, Kl]``.

    n_extra: number of unblocked middle axes. q / kv: whether the last-but-one / last axis runs over
    query / key positions (else it has size 1). pad_value: value used when the q/kv axes are padded
    to block multiples (results at padded positions are never used).
    """

    n_extra: int = 0
    q: bool = False
    kv: bool = False
    pad_value: Any = 0


def is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _np_or_jnp(x: ArrayLike):
    return np if isinstance(x, np.ndarray) else jnp


def _pick(arr: ArrayLike, idx) -> ArrayLike:
    """arr[idx] along axis 0 if that axis is not shared (size 1), else arr[0]."""
    if arr.shape[0] == 1:
        return arr[0]
    if isinstance(idx, (int, np.integer)):
        return arr[int(idx)]
    return jnp.asarray(arr)[idx]


class LayoutNode:
    """A pytree node whose array leaves follow the leaf layout (shared by masks and score modifiers).
    Subclasses set ``arrays``, ``layouts``, ``children`` and the attributes named in ``_static_fields``."""

    _static_fields: tuple = ()
    # Whether the mask function reads the batch / head index (beyond what its leaves' shapes say).
    _uses_batch: bool = False
    _uses_head: bool = False

    arrays: tuple = ()
    layouts: tuple = ()
    children: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node(cls, cls._tree_flatten, cls._tree_unflatten)

    # ----- pytree -----
    def _tree_flatten(self):
        static = tuple(getattr(self, name) for name in self._static_fields)
        return (tuple(self.arrays), tuple(self.children)), (tuple(self.layouts), static)

    @classmethod
    def _tree_unflatten(cls, aux, kids):
        obj = object.__new__(cls)
        obj.arrays, obj.children = tuple(kids[0]), tuple(kids[1])
        obj.layouts, static = aux
        for name, value in zip(cls._static_fields, static):
            object.__setattr__(obj, name, value)
        return obj

    def _replace_arrays(self, fn: Callable[[ArrayLike, LeafLayout], ArrayLike]) -> "Mask":
        """Copy with fn applied to every array leaf of this node and all descendants."""
        obj = object.__new__(type(self))
        obj.__dict__.update(self.__dict__)
        obj.arrays = tuple(fn(a, l) for a, l in zip(self.arrays, self.layouts))
        obj.children = tuple(c._replace_arrays(fn) for c in self.children)
        return obj

    def leaf_layouts(self) -> tuple:
        """LeafLayout of every array leaf, in ``jax.tree.leaves(self)`` order."""
        out = tuple(self.layouts)
        for child in self.children:
            out = out + child.leaf_layouts()
        return out

    # ----- hashing: static structure + leaf bytes (traced masks are not hashable) -----
    def cache_key(self) -> tuple:
        """Hashable identity of a static mask (raises TypeError for a traced mask)."""
        leaves, treedef = jax.tree.flatten(self)
        digests = []
        for leaf in leaves:
            if is_traced(leaf):
                raise TypeError("a mask with traced array leaves has no static cache key")
            arr = np.asarray(leaf)
            digests.append((arr.shape, str(arr.dtype), hashlib.sha1(arr.tobytes()).hexdigest()))
        return (treedef, tuple(digests))

    def __hash__(self) -> int:
        return hash(self.cache_key())

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, LayoutNode):
            return NotImplemented
        try:
            return self.cache_key() == other.cache_key()
        except TypeError:
            return False

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._static_fields)
        kids = ", ".join(repr(c) for c in self.children)
        inner = ", ".join(x for x in (kids, fields) if x)
        shapes = ", ".join(str(tuple(a.shape)) for a in self.arrays)
        return f"{type(self).__name__}({inner}{'; arrays ' + shapes if shapes else ''})"

    # ----- static properties -----
    def is_static(self) -> bool:
        """True when no leaf is a tracer: block maps are then computed with numpy at trace time."""
        return not any(is_traced(x) for x in jax.tree.leaves(self))

    def depends_on(self) -> tuple[bool, bool]:
        """(varies with batch, varies with head): decides the leading dims of materialize/block_map."""
        batch = self._uses_batch or any(a.shape[0] > 1 for a in self.arrays)
        head = self._uses_head or any(a.shape[1] > 1 for a in self.arrays)
        for child in self.children:
            cb, ch = child.depends_on()
            batch, head = batch or cb, head or ch
        return batch, head

    def check(self, batch: int, heads: int, q_len: int, k_len: int) -> None:
        """Raise ValueError if this mask cannot be applied to the given sizes."""
        for arr, lay in zip(self.arrays, self.layouts):
            name = type(self).__name__
            if arr.shape[0] not in (1, batch):
                raise ValueError(f"{name}: array leaf batch dim {arr.shape[0]} != 1 or batch={batch}")
            if arr.shape[1] not in (1, heads):
                raise ValueError(f"{name}: array leaf head dim {arr.shape[1]} != 1 or heads={heads}")
            if lay.q and arr.shape[-2] != q_len:
                raise ValueError(f"{name}: array leaf query dim {arr.shape[-2]} != q_len={q_len}")
            if lay.kv and arr.shape[-1] != k_len:
                raise ValueError(f"{name}: array leaf key dim {arr.shape[-1]} != k_len={k_len}")
        self._check_node(batch, heads, q_len, k_len)
        for child in self.children:
            child.check(batch, heads, q_len, k_len)

    def _check_node(self, batch: int, heads: int, q_len: int, k_len: int) -> None:
        pass

    # ----- the three forms -----
    def padded(self, q_pad: int, k_pad: int) -> "Mask":
        """Canonical form for kernels: q/kv axes of leaves padded to q_pad / k_pad (same treedef)."""

        def pad(arr, lay):
            widths = [(0, 0)] * arr.ndim
            if lay.q and arr.shape[-2] < q_pad:
                widths[-2] = (0, q_pad - arr.shape[-2])
            if lay.kv and arr.shape[-1] < k_pad:
                widths[-1] = (0, k_pad - arr.shape[-1])
            if all(w == (0, 0) for w in widths):
                return arr
            xp = _np_or_jnp(arr)
            return xp.pad(arr, widths, constant_values=np.asarray(lay.pad_value, dtype=arr.dtype))

        return self._replace_arrays(pad)

    def select(self, b, h) -> "Mask":
        """Block form over the full q/kv range for one (batch, head): leaves [*extra, Ql, Kl]."""
        # jnp, not numpy: inside a trace, numpy leaves would make every mask op run eagerly in numpy
        # and bake an n x n result into the program as a constant.
        return self._replace_arrays(lambda a, _: jnp.asarray(_pick(_pick(a, b), h)))

    def slice_blocks(self, q_start, block_q: int, kv_start, block_k: int) -> "Mask":
        """From a selected mask, the block form for rows [q_start, q_start+block_q) and keys
        [kv_start, kv_start+block_k) (starts may be traced)."""

        def cut(arr, lay):
            if lay.q:
                arr = jax.lax.dynamic_slice_in_dim(jnp.asarray(arr), q_start, block_q, axis=arr.ndim - 2)
            if lay.kv:
                arr = jax.lax.dynamic_slice_in_dim(jnp.asarray(arr), kv_start, block_k, axis=arr.ndim - 1)
            return arr

        return self._replace_arrays(cut)


class Mask(LayoutNode):
    """Base class of all masks; subclasses implement ``_eval`` on the block form."""

    # ----- composition -----
    def __and__(self, other: "Mask") -> "Mask":
        return And(self, other)

    def __or__(self, other: "Mask") -> "Mask":
        return Or(self, other)

    def __invert__(self) -> "Mask":
        return Not(self)

    def evaluate(self, b, h, q_idx, kv_idx) -> jax.Array:
        """Evaluate on the block form. q_idx: int32 [bq, 1], kv_idx: int32 [1, bk] absolute positions;
        b, h: int32 scalars. Returns bool [bq, bk]. Values at padded positions are unspecified."""
        out = self._eval(b, h, q_idx, kv_idx)
        return jnp.broadcast_to(jnp.asarray(out) != 0, (q_idx.shape[0], kv_idx.shape[1]))

    def _eval(self, b, h, q_idx, kv_idx):
        raise TypeError(f"{type(self).__name__} does not define a mask function")

    # ----- dense and block views -----
    def materialize(self, q_len: int, k_len: int, *, batch: int = 1, heads: int = 1,
                    as_jax: bool = False) -> ArrayLike:
        """Dense bool [Bm, Hm, q_len, k_len] (Bm = batch if the mask varies with batch else 1, same
        for Hm). numpy for a static mask, jax array for a traced one or when ``as_jax`` (then computed
        inside the current trace instead of baked in as a constant). O(q_len * k_len) memory."""
        self.check(batch, heads, q_len, k_len)
        dep_b, dep_h = self.depends_on()
        n_b, n_h = (batch if dep_b else 1), (heads if dep_h else 1)

        def one(b, h):
            sel = self.select(b, h)
            qi = jnp.arange(q_len, dtype=jnp.int32)[:, None]
            ki = jnp.arange(k_len, dtype=jnp.int32)[None, :]
            return sel.evaluate(b, h, qi, ki)

        def run():
            f = jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None))
            return f(jnp.arange(n_b, dtype=jnp.int32), jnp.arange(n_h, dtype=jnp.int32))

        if self.is_static() and not as_jax:
            with jax.ensure_compile_time_eval():
                return np.asarray(jax.jit(run)())
        return run()

    def block_map(self, q_len: int, k_len: int, block_q: int, block_k: int, *, batch: int = 1,
                  heads: int = 1):
        """Block map for block sizes (block_q, block_k): see ``maskjax.attention.block_map.BlockMap``."""
        from maskjax.attention.block_map import compute_block_map

        return compute_block_map(self, q_len, k_len, block_q, block_k, batch=batch, heads=heads)


def leaf_block_shape(shape: Sequence[int], layout: LeafLayout, block_q: int, block_k: int) -> tuple:
    """Block shape of a leaf of ``shape`` [Bl, Hl, *extra, Ql, Kl] for one grid cell (batch and head
    axes of size 1; the kernel squeezes them): ``(1, 1, *extra, block_q or 1, block_k or 1)``."""
    return (1, 1, *shape[2:2 + layout.n_extra], block_q if layout.q else 1, block_k if layout.kv else 1)


def leaf_block_index(shape: Sequence[int], layout: LeafLayout, b, h, i, j) -> tuple:
    """Block index (in units of leaf_block_shape) of that leaf for grid cell (batch b, head h,
    q block i, kv block j); usable directly as a Pallas BlockSpec index_map result."""
    return ((b if shape[0] > 1 else 0), (h if shape[1] > 1 else 0), *([0] * layout.n_extra),
            (i if layout.q else 0), (j if layout.kv else 0))


# ---------------------------------------------------------------------------------------------
# Helpers to store arrays in the leaf layout.
# ---------------------------------------------------------------------------------------------

def refuse_float_mask(x, name: str = "mask") -> None:
    """Raise if x is a floating-point (or complex) array: as a mask it would be cast to bool, so a
    PyTorch-style additive mask (0 = keep, -inf = drop) would be silently inverted."""
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    if jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(
            f"{name}: got a {dtype} array of shape {tuple(np.shape(x))}; masks must be boolean keep-masks "
            "(True = attend; integer arrays mean nonzero = attend). Floating-point masks are refused because "
            "their meaning is ambiguous (PyTorch's additive float masks use 0 = keep, -inf = drop). Pass "
            "additive logits as bias=..., e.g. attention(q, k, v, bias=jnp.where(keep, 0., -jnp.inf)), or a "
            "bool keep-mask, e.g. mask=keep (for a 0/-inf additive mask m: mask=(m == 0)).")


def _as_array(x, dtype):
    if is_traced(x) or isinstance(x, jax.Array):
        return jnp.asarray(x, dtype)
    return np.asarray(x, dtype)


def _from_axes(x, axes: str, dtype, pad_value=0) -> tuple[ArrayLike, LeafLayout]:
    """Store array x whose axes are named by ``axes`` (letters b, h, x (extra), q, k; in this order,
    each optional, x repeatable) in the leaf layout [Bl, Hl, *extra, Ql, Kl]."""
    x = _as_array(x, dtype)
    if x.ndim != len(axes):
        raise ValueError(f"array with axes {axes!r} must have rank {len(axes)}, got shape {x.shape}")
    order = "bhxqk"
    pos = [order.index(c) if c in order else -1 for c in axes]
    if -1 in pos or pos != sorted(pos) or axes.count("b") > 1 or axes.count("h") > 1 \
            or axes.count("q") > 1 or axes.count("k") > 1:
        raise ValueError(f"axes must be an ordered subset of 'b', 'h', 'x...', 'q', 'k', got {axes!r}")
    xp = _np_or_jnp(x)
    shape = list(x.shape)
    new_shape = ([shape[axes.index("b")]] if "b" in axes else [1]) + \
                ([shape[axes.index("h")]] if "h" in axes else [1]) + \
                [s for s, c in zip(shape, axes) if c == "x"] + \
                ([shape[axes.index("q")]] if "q" in axes else [1]) + \
                ([shape[axes.index("k")]] if "k" in axes else [1])
    return xp.reshape(x, new_shape), LeafLayout(axes.count("x"), "q" in axes, "k" in axes, pad_value)


def _from_broadcastable(x, dtype, pad_value=0, name="mask") -> tuple[ArrayLike, LeafLayout]:
    """Store an array broadcastable to [batch, heads, q_len, k_len] (numpy rules) in leaf layout;
    size-1 q/k axes become shared."""
    x = _as_array(x, dtype)
    if x.ndim > 4 or x.ndim < 2:
        raise ValueError(f"{name} must be broadcastable to [batch, heads, q_len, k_len], got shape {x.shape}")
    xp = _np_or_jnp(x)
    x = xp.reshape(x, (1,) * (4 - x.ndim) + tuple(x.shape))
    return x, LeafLayout(0, x.shape[2] > 1, x.shape[3] > 1, pad_value)


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------

class And(Mask):
    """Elementwise AND. ``causal() & local_1d(left=128)`` == ``And(causal(), local_1d(left=128))``."""

    def __init__(self, *masks: Mask):
        kids = []
        for m in masks:
            if not isinstance(m, Mask):
                raise ValueError(f"And: expected Mask objects, got {type(m).__name__}")
            kids.extend(m.children if type(m) is And else (m,))
        self.children = tuple(kids)

    def _eval(self, b, h, q_idx, kv_idx):
        out = self.children[0].evaluate(b, h, q_idx, kv_idx)
        for c in self.children[1:]:
            out = out & c.evaluate(b, h, q_idx, kv_idx)
        return out


class Or(Mask):
    """Elementwise OR. ``segment_ids(s) | prefix_lm(4)``."""

    def __init__(self, *masks: Mask):
        kids = []
        for m in masks:
            if not isinstance(m, Mask):
                raise ValueError(f"Or: expected Mask objects, got {type(m).__name__}")
            kids.extend(m.children if type(m) is Or else (m,))
        self.children = tuple(kids)

    def _eval(self, b, h, q_idx, kv_idx):
        out = self.children[0].evaluate(b, h, q_idx, kv_idx)
        for c in self.children[1:]:
            out = out | c.evaluate(b, h, q_idx, kv_idx)
        return out


class Not(Mask):
    """Complement. ``~causal()`` allows exactly the strictly-future keys."""

    def __init__(self, mask: Mask):
        if not isinstance(mask, Mask):
            raise ValueError(f"Not: expected a Mask, got {type(mask).__name__}")
        self.children = (mask,)

    def _eval(self, b, h, q_idx, kv_idx):
        return ~self.children[0].evaluate(b, h, q_idx, kv_idx)


class PerHead(Mask):
    """One mask per attention head: head h uses ``masks[h]``.

    Example: half the heads causal, half local::

        m = per_head([causal()] * 4 + [local_1d(left=32, right=32)] * 4)   # for 8 heads
    """

    _uses_head = True

    def __init__(self, masks: Sequence[Mask]):
        masks = tuple(masks)
        if not masks or not all(isinstance(m, Mask) for m in masks):
            raise ValueError("per_head: expected a non-empty sequence of Mask objects")
        for m in masks:
            if any(a.shape[1] > 1 for a in jax.tree.leaves(m)):
                raise ValueError("per_head: member masks must not themselves vary per head")
        self.children = masks

    def _check_node(self, batch, heads, q_len, k_len):
        if len(self.children) != heads:
            raise ValueError(f"per_head: {len(self.children)} masks for heads={heads}")

    def _eval(self, b, h, q_idx, kv_idx):
        # A chain of selects, not a gather: it lowers inside Pallas kernels too.
        out = self.children[0].evaluate(b, h, q_idx, kv_idx)
        for i, c in enumerate(self.children[1:], start=1):
            out = jnp.where(h == i, c.evaluate(b, h, q_idx, kv_idx), out)
        return out


def per_head(masks: Sequence[Mask]) -> PerHead:
    """Stack masks along heads (see :class:`PerHead`)."""
    return PerHead(masks)


# ---------------------------------------------------------------------------------------------
# Index-only kinds (no array leaves)
# ---------------------------------------------------------------------------------------------

class Full(Mask):
    """Every query sees every key. ``full().materialize(2, 3)[0, 0]`` is all True."""

    def __init__(self):
        pass

    def _eval(self, b, h, q_idx, kv_idx):
        return jnp.ones((q_idx.shape[0], kv_idx.shape[1]), jnp.bool_)


def full() -> Full:
    """All keys visible (see :class:`Full`)."""
    return Full()


class Causal(Mask):
    """Key j visible from query i iff ``j <= i + offset``.

    offset=0 is the usual top-left aligned causal mask; for cross-attention with a cache of
    ``k_len - q_len`` past keys use ``offset=k_len - q_len`` (bottom-right aligned).
    ``causal().materialize(3, 3)[0, 0]`` == ``[[1,0,0],[1,1,0],[1,1,1]]``.
    """

    _static_fields = ("offset",)

    def __init__(self, offset: int = 0):
        self.offset = int(offset)

    def _eval(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset


def causal(offset: int = 0) -> Causal:
    """Causal mask (see :class:`Causal`)."""
    return Causal(offset)


class PrefixLM(Mask):
    """Bidirectional prefix + causal rest: key j visible from i iff ``j < prefix or j <= i``.

    prefix: a static int, or int array [batch] (per-example prefix length, may be traced).
    ``prefix_lm(2).materialize(4, 4)[0, 0]`` rows: 1100, 1100, 1110, 1111.
    """

    _static_fields = ("prefix",)

    def __init__(self, prefix):
        if isinstance(prefix, (int, np.integer)):
            if prefix < 0:
                raise ValueError(f"prefix_lm: prefix must be >= 0, got {prefix}")
            self.prefix = int(prefix)
        else:
            self.prefix = None
            arr, lay = _from_axes(prefix, "b", np.int32)
            self.arrays, self.layouts = (arr,), (lay,)

    def _eval(self, b, h, q_idx, kv_idx):
        prefix = self.prefix if self.prefix is not None else self.arrays[0][..., 0, 0]
        return (kv_idx < prefix) | (kv_idx <= q_idx)


def prefix_lm(prefix) -> PrefixLM:
    """Prefix-LM mask (see :class:`PrefixLM`)."""
    return PrefixLM(prefix)


class Local1D(Mask):
    """Sliding window: key j visible from query i iff ``i - left <= j <= i + right`` (None = unbounded).

    ``local_1d(left=1, right=0)`` sees itself and the previous token; combine with ``causal()`` freely.
    """

    _static_fields = ("left", "right")

    def __init__(self, left: Optional[int] = None, right: Optional[int] = None):
        for name, val in (("left", left), ("right", right)):
            if val is not None and int(val) < 0:
                raise ValueError(f"local_1d: {name} must be >= 0 or None, got {val}")
        self.left = None if left is None else int(left)
        self.right = None if right is None else int(right)

    def _eval(self, b, h, q_idx, kv_idx):
        out = jnp.ones((q_idx.shape[0], kv_idx.shape[1]), jnp.bool_)
        if self.left is not None:
            out = out & (kv_idx >= q_idx - self.left)
        if self.right is not None:
            out = out & (kv_idx <= q_idx + self.right)
        return out


def local_1d(left: Optional[int] = None, right: Optional[int] = None) -> Local1D:
    """1-D local window (see :class:`Local1D`)."""
    return Local1D(left, right)


# ---------------------------------------------------------------------------------------------
# Array kinds
# ---------------------------------------------------------------------------------------------

class Dense(Mask):
    """An explicit boolean mask, broadcastable to [batch, heads, q_len, k_len] (numpy rules).

    True = may attend; integer arrays mean nonzero = attend; floating-point arrays are refused (an
    additive float mask belongs in ``bias=``). Static (numpy) or traced, per batch and/or head.
    ``dense(np.tri(4, dtype=bool))`` equals ``causal()`` for length 4; ``dense(m[:, None])`` with
    m [batch, q, k] is per-example.
    """

    def __init__(self, mask: ArrayLike):
        refuse_float_mask(mask, "mask")
        arr, lay = _from_broadcastable(mask, np.bool_, False, "dense mask")
        self.arrays, self.layouts = (arr,), (lay,)

    def _eval(self, b, h, q_idx, kv_idx):
        return self.arrays[0]


def dense(mask: ArrayLike) -> Dense:
    """Dense boolean mask (see :class:`Dense`)."""
    return Dense(mask)


class QueryMasks(Mask):
    """Query-dependent dynamic mask (Mask2Former masked cross-attention).

    masks: bool [batch, q_len, k_len] or [batch, heads, q_len, k_len] (usually traced: each query's
    predicted foreground over the key pixels). With ``fallback_to_all=True`` a query whose row is
    empty attends to every key instead of none (as Mask2Former does). Example::

        m = query_masks(jax.nn.sigmoid(mask_logits) >= 0.5, fallback_to_all=True)
    """

    _static_fields = ("fallback_to_all",)

    def __init__(self, masks: ArrayLike, fallback_to_all: bool = True):
        refuse_float_mask(masks, "query_masks: masks")  # e.g. sigmoid probabilities: threshold them first
        masks = _as_array(masks, np.bool_)
        if masks.ndim == 3:
            masks = masks[:, None]
        if masks.ndim != 4:
            raise ValueError(f"query_masks: masks must be [batch, (heads,) q_len, k_len], got {masks.shape}")
        self.fallback_to_all = bool(fallback_to_all)
        arrays = [masks]
        layouts = [LeafLayout(0, True, True, False)]
        if self.fallback_to_all:
            xp = _np_or_jnp(masks)
            # Row emptiness needs the whole row, so it is reduced here once, not inside a block.
            arrays.append(xp.any(masks, axis=-1, keepdims=True))
            layouts.append(LeafLayout(0, True, False, True))
        self.arrays, self.layouts = tuple(arrays), tuple(layouts)

    def _eval(self, b, h, q_idx, kv_idx):
        out = self.arrays[0] != 0
        if self.fallback_to_all:
            out = out | (self.arrays[1] == 0)
        return out


def query_masks(masks: ArrayLike, fallback_to_all: bool = True) -> QueryMasks:
    """Per-query dynamic masks (see :class:`QueryMasks`)."""
    return QueryMasks(masks, fallback_to_all)


class SegmentIds(Mask):
    """Sequence packing: query i sees key j iff their segment ids are equal (and >= 0 when
    ``negative_is_padding``).

    q_segments: int [batch, q_len]; kv_segments: int [batch, k_len] (default: q_segments).
    ``segment_ids(np.array([[0, 0, 1, 1]]))`` gives two 2x2 diagonal blocks.
    """

    _static_fields = ("negative_is_padding",)

    def __init__(self, q_segments: ArrayLike, kv_segments: Optional[ArrayLike] = None,
                 negative_is_padding: bool = True):
        kv_segments = q_segments if kv_segments is None else kv_segments
        q_arr, q_lay = _from_axes(q_segments, "bq", np.int32, -1)
        k_arr, k_lay = _from_axes(kv_segments, "bk", np.int32, -1)
        if q_arr.shape[0] != k_arr.shape[0] and 1 not in (q_arr.shape[0], k_arr.shape[0]):
            raise ValueError(f"segment_ids: batch sizes differ: {q_arr.shape[0]} vs {k_arr.shape[0]}")
        self.arrays, self.layouts = (q_arr, k_arr), (q_lay, k_lay)
        self.negative_is_padding = bool(negative_is_padding)

    def _eval(self, b, h, q_idx, kv_idx):
        q_seg, k_seg = self.arrays
        out = q_seg == k_seg
        if self.negative_is_padding:
            out = out & (q_seg >= 0) & (k_seg >= 0)
        return out


def segment_ids(q_segments: ArrayLike, kv_segments: Optional[ArrayLike] = None,
                negative_is_padding: bool = True) -> SegmentIds:
    """Packing mask (see :class:`SegmentIds`)."""
    return SegmentIds(q_segments, kv_segments, negative_is_padding)


class GroupRouting(Mask):
    """Modality routing (Zorro): token groups and a matrix of which group may attend to which.

    q_groups: int [batch, q_len]; kv_groups: int [batch, k_len] (default q_groups), values in
    [0, num_groups), num_groups <= 31; allowed: bool [num_groups, num_groups], allowed[g, g'] = queries
    of group g may see keys of group g'. Zorro with audio=0, video=1, fusion=2::

        allowed = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]], bool)
        m = group_routing(groups, allowed=allowed)

    Stored as per-token bit sets (query: allowed groups, key: its own group bit), so the mask function
    is one AND of two blocks, no table lookup inside a kernel.
    """

    def __init__(self, q_groups: ArrayLike, kv_groups: Optional[ArrayLike] = None, *,
                 allowed: ArrayLike):
        kv_groups = q_groups if kv_groups is None else kv_groups
        refuse_float_mask(allowed, "group_routing: allowed")
        allowed = _as_array(allowed, np.bool_)
        if allowed.ndim != 2 or allowed.shape[0] != allowed.shape[1] or allowed.shape[0] > 31:
            raise ValueError(f"group_routing: allowed must be a square bool matrix of <= 31 groups, "
                             f"got shape {allowed.shape}")
        on_device = any(is_traced(x) or isinstance(x, jax.Array) for x in (q_groups, kv_groups, allowed))
        xp = jnp if on_device else np
        q_groups = xp.asarray(q_groups, xp.int32)
        kv_groups = xp.asarray(kv_groups, xp.int32)
        weights = xp.asarray(1 << np.arange(allowed.shape[0]), xp.int32)
        row_bits = xp.sum(xp.where(xp.asarray(allowed), weights[None, :], 0), axis=1).astype(xp.int32)
        q_bits = row_bits[q_groups]
        k_bits = xp.left_shift(xp.int32(1), kv_groups).astype(xp.int32)
        q_arr, q_lay = _from_axes(q_bits, "bq", np.int32, 0)
        k_arr, k_lay = _from_axes(k_bits, "bk", np.int32, 0)
        self.arrays, self.layouts = (q_arr, k_arr), (q_lay, k_lay)

    def _eval(self, b, h, q_idx, kv_idx):
        return (self.arrays[0] & self.arrays[1]) != 0


def group_routing(q_groups: ArrayLike, kv_groups: Optional[ArrayLike] = None, *,
                  allowed: ArrayLike) -> GroupRouting:
    """Group-to-group routing (see :class:`GroupRouting`)."""
    return GroupRouting(q_groups, kv_groups, allowed=allowed)


class Lengths(Mask):
    """Padding: query i / key j are real iff ``i < q_lengths[b]`` / ``j < kv_lengths[b]``.

    Either may be None (no padding on that side). ``lengths(kv_lengths=np.array([3, 5]))`` hides keys
    3.. of example 0 and 5.. of example 1. Padded query rows are fully masked (zero output).
    """

    _static_fields = ("has_q", "has_kv")

    def __init__(self, q_lengths: Optional[ArrayLike] = None, kv_lengths: Optional[ArrayLike] = None):
        if q_lengths is None and kv_lengths is None:
            raise ValueError("lengths: give q_lengths and/or kv_lengths")
        arrays, layouts = [], []
        for x in (q_lengths, kv_lengths):
            if x is not None:
                arr, lay = _from_axes(x, "b", np.int32)
                arrays.append(arr)
                layouts.append(lay)
        self.has_q, self.has_kv = q_lengths is not None, kv_lengths is not None
        self.arrays, self.layouts = tuple(arrays), tuple(layouts)

    def _eval(self, b, h, q_idx, kv_idx):
        out = jnp.ones((q_idx.shape[0], kv_idx.shape[1]), jnp.bool_)
        i = 0
        if self.has_q:
            out = out & (q_idx < self.arrays[0][..., 0, 0])
            i = 1
        if self.has_kv:
            out = out & (kv_idx < self.arrays[i][..., 0, 0])
        return out


def lengths(q_lengths: Optional[ArrayLike] = None, kv_lengths: Optional[ArrayLike] = None) -> Lengths:
    """Padding by lengths (see :class:`Lengths`)."""
    return Lengths(q_lengths, kv_lengths)


class FunctionMask(Mask):
    """An arbitrary mask function, FlexAttention style.

    ``fn(b, h, q_idx, kv_idx, *blocks) -> bool`` with q_idx int32 [bq, 1], kv_idx int32 [1, bk] and,
    for each array in ``arrays``, its block in the leaf layout: ``[*extra, bq or 1, bk or 1]``.
    ``axes`` names each array's axes with letters from 'b', 'h', 'x' (extra), 'q', 'k', in that order.
    Use jnp elementwise ops and comparisons only (no gathers, no captured arrays) so that the
    function also runs inside Pallas kernels. Examples::

        checkerboard = function_mask(lambda b, h, q, k: (q + k) % 2 == 0)
        per_token = function_mask(lambda b, h, q, k, keep: keep != 0, keep_kv, axes=("bk",))

    Whether fn reads b / h is detected from its jaxpr (an unused index means the block map is shared).
    """

    _static_fields = ("fn",)

    def __init__(self, fn: Callable, *arrays: ArrayLike, axes: Sequence[str] = ()):
        if not callable(fn):
            raise ValueError(f"function_mask: fn must be callable, got {type(fn).__name__}")
        if len(axes) != len(arrays):
            raise ValueError(f"function_mask: got {len(arrays)} arrays but {len(axes)} axes strings")
        self.fn = fn
        stored = [_from_axes(a, ax, None if is_traced(a) or isinstance(a, jax.Array) else np.asarray(a).dtype)
                  for a, ax in zip(arrays, axes)]
        self.arrays = tuple(s[0] for s in stored)
        self.layouts = tuple(s[1] for s in stored)
        self._uses_batch, self._uses_head = _index_usage(fn, self.arrays, self.layouts)

    def _tree_flatten(self):
        kids, (layouts, static) = super()._tree_flatten()
        return kids, (layouts, static + (self._uses_batch, self._uses_head))

    @classmethod
    def _tree_unflatten(cls, aux, kids):
        layouts, static = aux
        obj = super()._tree_unflatten((layouts, static[:-2]), kids)
        obj._uses_batch, obj._uses_head = static[-2:]
        return obj

    def _eval(self, b, h, q_idx, kv_idx):
        return self.fn(b, h, q_idx, kv_idx, *self.arrays)


def _index_usage(fn, arrays, layouts) -> tuple[bool, bool]:
    """Does fn read its batch / head argument? Decided from the jaxpr on tiny abstract blocks."""
    blocks = [jax.ShapeDtypeStruct(tuple(a.shape[2:2 + l.n_extra]) + (8 if l.q else 1, 8 if l.kv else 1),
                                   a.dtype) for a, l in zip(arrays, layouts)]
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    qi = jax.ShapeDtypeStruct((8, 1), jnp.int32)
    ki = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    closed = jax.make_jaxpr(fn)(scalar, scalar, qi, ki, *blocks)
    jaxpr = closed.jaxpr
    used = set()

    def visit(jp):
        for eqn in jp.eqns:
            for v in eqn.invars:
                if type(v).__name__ != "Literal":
                    used.add(v)
        for v in jp.outvars:
            if type(v).__name__ != "Literal":
                used.add(v)

    visit(jaxpr)
    return jaxpr.invars[0] in used, jaxpr.invars[1] in used


def function_mask(fn: Callable, *arrays: ArrayLike, axes: Sequence[str] = ()) -> FunctionMask:
    """User mask function (see :class:`FunctionMask`)."""
    return FunctionMask(fn, *arrays, axes=axes)


# ---------------------------------------------------------------------------------------------
# 2-D token grids: local windows and directional (LookHere) masks
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenGrid:
    """Where each token sits: ``num_prefix`` extra tokens (cls/registers/memory) first, then an
    ``height x width`` grid in row order (``tile=None``) or tile order (``tile=(th, tw)``: tiles of
    th x tw tokens, tiles in row order, tokens within a tile in row order).

    Tile order makes a 2-D window's *block* density close to its element density (row order gives
    ~sqrt of it). Use ``grid.permutation()`` to reorder row-ordered tokens: ``x[:, grid.permutation()]``
    and ``grid.inverse_permutation()`` to undo it.
    """

    height: int
    width: int
    num_prefix: int = 0
    tile: Optional[tuple] = None

    def __post_init__(self):
        if self.height <= 0 or self.width <= 0 or self.num_prefix < 0:
            raise ValueError(f"TokenGrid: bad sizes height={self.height}, width={self.width}, "
                             f"num_prefix={self.num_prefix}")
        if self.tile is not None:
            th, tw = self.tile
            if th <= 0 or tw <= 0 or self.height % th or self.width % tw:
                raise ValueError(f"TokenGrid: tile={self.tile} must divide the grid "
                                 f"({self.height}, {self.width})")
            object.__setattr__(self, "tile", (int(th), int(tw)))

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.height * self.width

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) int32 [num_tokens] per sequence position; -1 for prefix tokens."""
        g = np.arange(self.height * self.width)
        if self.tile is None:
            r, c = g // self.width, g % self.width
        else:
            th, tw = self.tile
            tile_id, within = g // (th * tw), g % (th * tw)
            tiles_per_row = self.width // tw
            r = (tile_id // tiles_per_row) * th + within // tw
            c = (tile_id % tiles_per_row) * tw + within % tw
        pre = np.full(self.num_prefix, -1)
        return (np.concatenate([pre, r]).astype(np.int32), np.concatenate([pre, c]).astype(np.int32))

    def permutation(self) -> np.ndarray:
        """Indices p such that ``tokens_row_order[:, p]`` is in this grid's order (prefix kept first)."""
        r, c = self.coords()
        grid = r[self.num_prefix:] * self.width + c[self.num_prefix:]
        return np.concatenate([np.arange(self.num_prefix), self.num_prefix + grid]).astype(np.int32)

    def inverse_permutation(self) -> np.ndarray:
        return np.argsort(self.permutation()).astype(np.int32)


def _prefix_rule(q_pre, k_pre, grid_part, prefix_sees_grid: bool, grid_sees_prefix: bool):
    both_prefix = q_pre & k_pre
    out = jnp.where(both_prefix, True, jnp.where(q_pre | k_pre, False, grid_part))
    if prefix_sees_grid:
        out = out | (q_pre & ~k_pre)
    if grid_sees_prefix:
        out = out | (~q_pre & k_pre)
    return out


class Window2D(Mask):
    """Local 2-D attention on a token grid (self-attention, q_len == k_len == grid.num_tokens).

    mode='neighborhood' (NAT/DiNAT): query at (r, c) sees keys at (r', c') with
    ``|r - r'| <= radius[0] * dilation[0]``, ``(r - r') % dilation[0] == 0`` and likewise for columns.
    mode='partition' (Swin): the grid is cut into windows of size ``window`` after shifting by
    ``shift`` (Swin's shifted windows, without wrap-around); tokens see their own window.
    Prefix tokens (first ``grid.num_prefix``) always see each other; ``prefix_sees_grid`` /
    ``grid_sees_prefix`` decide the rest (a cls token that reads everything and is read by all: both
    True). Example, 7x7 neighbourhoods on a 32x32 grid in 8x8 tile order with a cls token::

        g = TokenGrid(32, 32, num_prefix=1, tile=(8, 8))
        m = window_2d(g, radius=(3, 3))
    """

    _static_fields = ("grid", "mode", "radius", "dilation", "window", "shift", "prefix_sees_grid",
                      "grid_sees_prefix")

    def __init__(self, grid: TokenGrid, *, mode: str = "neighborhood", radius=(1, 1), dilation=(1, 1),
                 window=(7, 7), shift=(0, 0), prefix_sees_grid: bool = True, grid_sees_prefix: bool = True):
        if mode not in ("neighborhood", "partition"):
            raise ValueError(f"window_2d: mode must be 'neighborhood' or 'partition', got {mode!r}")
        radius, dilation, window, shift = (tuple(int(v) for v in x) for x in (radius, dilation, window, shift))
        if min(radius) < 0 or min(dilation) < 1 or min(window) < 1 or min(shift) < 0:
            raise ValueError(f"window_2d: bad radius={radius} dilation={dilation} window={window} shift={shift}")
        self.grid, self.mode, self.radius, self.dilation = grid, mode, radius, dilation
        self.window, self.shift = window, shift
        self.prefix_sees_grid, self.grid_sees_prefix = bool(prefix_sees_grid), bool(grid_sees_prefix)
        r, c = grid.coords()
        pre = r < 0
        if mode == "neighborhood":
            # Coordinates split into (quotient, remainder) by the dilation: the kernel needs no division.
            feats = [np.where(pre, -1, r // dilation[0]), np.where(pre, -1, r % dilation[0]),
                     np.where(pre, -1, c // dilation[1]), np.where(pre, -1, c % dilation[1])]
        else:
            feats = [np.where(pre, -1, (r + shift[0]) // window[0]), np.where(pre, -1, (c + shift[1]) // window[1])]
        feats = [f.astype(np.int32) for f in feats]
        arrays, layouts = [], []
        for f in feats:
            a, l = _from_axes(f, "q", np.int32, -1)
            arrays.append(a)
            layouts.append(l)
        for f in feats:
            a, l = _from_axes(f, "k", np.int32, -1)
            arrays.append(a)
            layouts.append(l)
        self.arrays, self.layouts = tuple(arrays), tuple(layouts)

    def _check_node(self, batch, heads, q_len, k_len):
        if q_len != self.grid.num_tokens or k_len != self.grid.num_tokens:
            raise ValueError(f"window_2d: q_len={q_len}, k_len={k_len} must equal grid tokens "
                             f"{self.grid.num_tokens}")

    def _eval(self, b, h, q_idx, kv_idx):
        n = len(self.arrays) // 2
        qf, kf = self.arrays[:n], self.arrays[n:]
        if self.mode == "neighborhood":
            grid_part = ((qf[1] == kf[1]) & (qf[3] == kf[3])
                         & (jnp.abs(qf[0] - kf[0]) <= self.radius[0])
                         & (jnp.abs(qf[2] - kf[2]) <= self.radius[1]))
        else:
            grid_part = (qf[0] == kf[0]) & (qf[1] == kf[1])
        p = self.grid.num_prefix
        return _prefix_rule(q_idx < p, kv_idx < p, grid_part, self.prefix_sees_grid, self.grid_sees_prefix)


def window_2d(grid: TokenGrid, **kwargs) -> Window2D:
    """2-D local window (see :class:`Window2D`)."""
    return Window2D(grid, **kwargs)


class Directional2D(Mask):
    """LookHere-style directional masks: head h sees only keys inside a field of view of ``fov``
    degrees centred on direction ``directions[h]`` (degrees; 0 = right (+col), 90 = up (-row)),
    plus the query's own position. Optional ``max_distance`` (grid units) limits the reach.
    Prefix tokens follow ``prefix_sees_grid`` / ``grid_sees_prefix`` as in :class:`Window2D`.
    Example, 8 heads looking in 8 compass directions with 90 degree views::

        m = directional_2d(TokenGrid(14, 14, num_prefix=1), directions=range(0, 360, 45), fov=90)
    """

    _static_fields = ("grid", "directions", "fov", "max_distance", "prefix_sees_grid", "grid_sees_prefix")
    _uses_head = True

    def __init__(self, grid: TokenGrid, *, directions: Sequence[float], fov: float = 90.0,
                 max_distance: Optional[float] = None, prefix_sees_grid: bool = True,
                 grid_sees_prefix: bool = True):
        directions = tuple(float(d) for d in directions)
        if not directions:
            raise ValueError("directional_2d: directions must be non-empty")
        if not 0 < fov <= 360:
            raise ValueError(f"directional_2d: fov must be in (0, 360], got {fov}")
        self.grid, self.directions, self.fov = grid, directions, float(fov)
        self.max_distance = None if max_distance is None else float(max_distance)
        self.prefix_sees_grid, self.grid_sees_prefix = bool(prefix_sees_grid), bool(grid_sees_prefix)
        r, c = grid.coords()
        arrays, layouts = [], []
        for axes in ("q", "k"):
            for f in (r, c):
                a, l = _from_axes(f, axes, np.int32, -1)
                arrays.append(a)
                layouts.append(l)
        self.arrays, self.layouts = tuple(arrays), tuple(layouts)

    def _check_node(self, batch, heads, q_len, k_len):
        if len(self.directions) != heads:
            raise ValueError(f"directional_2d: {len(self.directions)} directions for heads={heads}")
        if q_len != self.grid.num_tokens or k_len != self.grid.num_tokens:
            raise ValueError(f"directional_2d: q_len={q_len}, k_len={k_len} must equal grid tokens "
                             f"{self.grid.num_tokens}")

    def _eval(self, b, h, q_idx, kv_idx):
        qr, qc, kr, kc = self.arrays
        dx = (kc - qc).astype(jnp.float32)
        dy = (qr - kr).astype(jnp.float32)  # rows grow downwards; "up" is +dy
        # Per-head unit vector chosen by a select chain (lowers inside kernels, no table gather).
        ux = jnp.float32(math.cos(math.radians(self.directions[0])))
        uy = jnp.float32(math.sin(math.radians(self.directions[0])))
        for i, deg in enumerate(self.directions[1:], start=1):
            ux = jnp.where(h == i, jnp.float32(math.cos(math.radians(deg))), ux)
            uy = jnp.where(h == i, jnp.float32(math.sin(math.radians(deg))), uy)
        dot = dx * ux + dy * uy
        norm2 = dx * dx + dy * dy
        cos_half = math.cos(math.radians(self.fov / 2))
        tol = 1e-5
        # A key exactly on the edge of the front half-plane (e.g. perpendicular to 135 degrees) has dot == 0 up to
        # float32 rounding whose sign depends on whether XLA fuses the multiply-add (eager vs jit vs kernels);
        # a slack proportional to the offsets puts it inside everywhere, as the cone's edges are.
        front = dot >= -1e-6 * (jnp.abs(dx) + jnp.abs(dy))
        if self.fov >= 360:
            inside = jnp.ones_like(dot, dtype=jnp.bool_)
        elif cos_half >= 0:
            inside = front & (dot * dot >= norm2 * (cos_half * cos_half - tol))
        else:
            inside = front | (dot * dot <= norm2 * (cos_half * cos_half + tol))
        if self.max_distance is not None:
            inside = inside & (norm2 <= self.max_distance ** 2 + 1e-6)
        inside = inside | (norm2 == 0)
        p = self.grid.num_prefix
        return _prefix_rule(q_idx < p, kv_idx < p, inside, self.prefix_sees_grid, self.grid_sees_prefix)


def directional_2d(grid: TokenGrid, **kwargs) -> Directional2D:
    """Directional 2-D (LookHere) mask (see :class:`Directional2D`)."""
    return Directional2D(grid, **kwargs)


# ---------------------------------------------------------------------------------------------

def as_mask(mask: Union[None, Mask, ArrayLike]) -> Optional[Mask]:
    """None -> None; a Mask -> itself; a bool (or integer: nonzero = attend) array broadcastable to
    [b, h, q, k] -> :class:`Dense`. Floating-point arrays are refused (pass additive masks as ``bias=``)."""
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, (np.ndarray, jax.Array)) or is_traced(mask):
        return Dense(mask)
    raise ValueError(f"mask must be None, a Mask or a bool array, got {type(mask).__name__}")


__all__ = [
    "LeafLayout", "LayoutNode", "Mask", "And", "Or", "Not", "PerHead", "Full", "Causal", "PrefixLM", "Local1D",
    "Dense", "QueryMasks", "SegmentIds", "GroupRouting", "Lengths", "FunctionMask", "TokenGrid",
    "Window2D", "Directional2D", "per_head", "full", "causal", "prefix_lm", "local_1d", "dense",
    "query_masks", "segment_ids", "group_routing", "lengths", "function_mask", "window_2d",
    "directional_2d", "as_mask", "is_traced", "leaf_block_shape", "leaf_block_index", "refuse_float_mask",
]
