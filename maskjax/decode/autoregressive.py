"""Autoregressive decoding in raster order with a key/value cache: a prefill of the given prefix, then one token
per step under `lax.scan`, each step attending to the cached keys and values of every earlier position.

The model is reached through `step_fn(cache, ids [B, n], positions int32 [n], mask bool [1, 1, n, L]) ->
(logits [B, n, V], cache)`, where position j's logits predict the id at position j + 1; `cache` is whatever the
model keeps (a Flax 'cache' collection). `uncached_decode` runs the same sampling with a full causal forward pass
per step: the reference the cached decode must equal, and the baseline of the speed measurement.

Example::

    ids = decode_cached(prefix, rng, step_fn, cache, length=65)      # prefix [B, 1] (class token) -> [B, 64]
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

StepFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def causal_mask(length: int) -> jax.Array:
    """bool [1, 1, L, L]: position i attends to positions <= i."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def _sample(key: jax.Array, logits: jax.Array, temperature: float, top_k: int) -> jax.Array:
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _check(prefix: jax.Array, length: int, temperature: float, top_k: int) -> None:
    if prefix.ndim != 2 or prefix.shape[1] < 1:
        raise ValueError(f"prefix: expected ids [batch, n >= 1], got shape {tuple(prefix.shape)}")
    if length <= prefix.shape[1]:
        raise ValueError(f"length={length}: must exceed the prefix length {prefix.shape[1]}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}: must be >= 0 (0 = off)")


def decode_cached(prefix: jax.Array, rng: jax.Array, step_fn: StepFn, cache: Any, length: int, *,
                  temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """Sample ids int32 [B, length - P] for positions P..length-1 after `prefix` int32 [B, P] (positions 0..P-1),
    with an empty `cache` of `length` positions. Step i draws with `fold_in(rng, i)`."""
    _check(prefix, length, temperature, top_k)
    p = prefix.shape[1]
    logits, cache = step_fn(cache, prefix, jnp.arange(p), causal_mask(length)[:, :, :p])
    first = _sample(jax.random.fold_in(rng, 0), logits[:, -1], temperature, top_k)

    def step(carry, i):
        previous, cache = carry
        position = p + i - 1  # where the previous sample goes
        mask = (jnp.arange(length) <= position)[None, None, None]
        logits, cache = step_fn(cache, previous[:, None], position[None], mask)
        sample = _sample(jax.random.fold_in(rng, i), logits[:, 0], temperature, top_k)
        return (sample, cache), sample

    (_, _), rest = jax.lax.scan(step, (first, cache), jnp.arange(1, length - p, dtype=jnp.int32))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def uncached_decode(prefix: jax.Array, rng: jax.Array, forward_fn: Callable[[jax.Array], jax.Array], length: int, *,
                    temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """The same samples as `decode_cached` (same draws), with `forward_fn(ids [B, length]) -> logits [B, length, V]`
    run on the whole causally masked sequence at every step (positions not yet decoded hold 0 and, being later
    in the sequence, are never seen)."""
    _check(prefix, length, temperature, top_k)
    p = prefix.shape[1]
    ids = jnp.zeros((prefix.shape[0], length), jnp.int32).at[:, :p].set(prefix)

    def step(ids, i):
        position = p + i  # the position sampled at this step, from the logits of position - 1
        logits = forward_fn(ids)
        sample = _sample(jax.random.fold_in(rng, i), jnp.take(logits, position - 1, axis=1), temperature, top_k)
        return ids.at[:, position].set(sample), None

    ids, _ = jax.lax.scan(step, ids, jnp.arange(length - p, dtype=jnp.int32))
    return ids[:, p:]
