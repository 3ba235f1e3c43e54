"""M2T decoding (Mentzer et al. 2023, "M2T: Masking Transformers Twice"): a fixed, data-independent schedule of
token groups, masked attention in which a token sees only the prefix (group 0) and tokens of earlier groups, and
decoding that caches the keys and values of decoded groups, so each step runs only two groups' tokens: the
previous group's decoded tokens (written to the cache) and the next group's masked tokens (predicted).

Groups: int32 [L] over the sequence positions, 0 for the prefix (class token), 1..T for the image tokens
(`maskjax.masking.schedules.token_groups`). The model is reached through `step_fn(cache, ids [B, n],
positions int32 [n], mask) -> (logits [B, n, V], cache)` and, for the uncached reference, `forward_fn(ids [B, L],
mask) -> logits [B, L, V]`.

Example::

    groups = np.concatenate([[0], token_groups(halton_order((8, 8)), step_group_sizes("cosine", 64, 8))])
    ids = decode_cached(prefix_ids, rng, step_fn, cache, groups, mask_id=K)        # [B, 64]
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from maskjax.attention import masks as mask_lib
from maskjax.decode.autoregressive import _sample


def group_allowed(num_groups: int) -> np.ndarray:
    """bool [G, G]: group g may see group g' iff g' < g, or both are the prefix group 0."""
    allowed = np.tril(np.ones((num_groups, num_groups), bool), k=-1)
    allowed[0, 0] = True
    return allowed


def attention_mask(groups: np.ndarray, query_positions: np.ndarray | None = None) -> mask_lib.Mask:
    """The M2T mask in maskjax's mask language (group routing): queries at `query_positions` (default: all L
    positions) against keys at all L positions. Positions not decoded yet belong to later groups, so a cached
    step needs no record of which positions are filled."""
    groups = np.asarray(groups, np.int32)
    queries = groups if query_positions is None else groups[np.asarray(query_positions)]
    return mask_lib.group_routing(queries[None], groups[None], allowed=group_allowed(int(groups.max()) + 1))


def dense_attention_mask(groups: np.ndarray) -> np.ndarray:
    """bool [L, L]: the same mask written out element by element (for tests and readers)."""
    groups = np.asarray(groups)
    q, k = groups[:, None], groups[None, :]
    return (k < q) | ((q == 0) & (k == 0))


def _positions_by_group(groups: np.ndarray) -> list[np.ndarray]:
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.min() != 0 or sorted(set(groups.tolist())) != list(range(int(groups.max()) + 1)):
        raise ValueError(f"groups: expected int [L] with the prefix at 0 and every group 1..T present, got "
                         f"{groups.tolist()}")
    return [np.flatnonzero(groups == g).astype(np.int32) for g in range(int(groups.max()) + 1)]


def decode_cached(prefix: jax.Array, rng: jax.Array, step_fn: Callable, cache: Any, groups: np.ndarray, *,
                  mask_id: int, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """ids int32 [B, L - P] of the image positions, decoded group by group; `prefix` int32 [B, P] fills the
    positions of group 0; `cache` is the model's empty cache of L positions. Step t draws with fold_in(rng, t)."""
    by_group = _positions_by_group(groups)
    sequence = jnp.full((prefix.shape[0], len(groups)), mask_id, jnp.int32).at[:, by_group[0]].set(prefix)
    for step in range(1, len(by_group)):
        written, predicted = by_group[step - 1], by_group[step]
        positions = np.concatenate([written, predicted])
        ids = jnp.concatenate([sequence[:, written], jnp.full((prefix.shape[0], len(predicted)), mask_id,
                                                               jnp.int32)], axis=1)
        logits, cache = step_fn(cache, ids, jnp.asarray(positions), attention_mask(groups, positions))
        samples = _sample(jax.random.fold_in(rng, step), logits[:, len(written):], temperature, top_k)
        sequence = sequence.at[:, predicted].set(samples)
    return sequence[:, len(by_group[0]):]


def decode_uncached(prefix: jax.Array, rng: jax.Array, forward_fn: Callable, groups: np.ndarray, *, mask_id: int,
                    temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """The same samples as `decode_cached` with a forward pass over all L positions at every step."""
    by_group = _positions_by_group(groups)
    sequence = jnp.full((prefix.shape[0], len(groups)), mask_id, jnp.int32).at[:, by_group[0]].set(prefix)
    mask = attention_mask(groups)
    for step in range(1, len(by_group)):
        predicted = by_group[step]
        logits = forward_fn(sequence, mask)
        samples = _sample(jax.random.fold_in(rng, step), logits[:, predicted], temperature, top_k)
        sequence = sequence.at[:, predicted].set(samples)
    return sequence[:, len(by_group[0]):]
