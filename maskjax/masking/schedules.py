"""Mask schedules of masked generative transformers (MaskGIT, Chang et al. 2022): gamma(r) = fraction masked.

`r` in [0, 1] is the progress through decoding (r = (t + 1) / T after step t of T) or, in training, a uniform
draw. Every schedule falls from gamma(0) = 1 (all masked; 'exp': 1 - 1/N) to gamma(1) = 0 (none) and is clipped
to [1e-6, 1] as in the official code (`libml/mask_schedule.py`), so `ceil(gamma(r) * N) >= 1`. Concave schedules
(cosine, square, cubic and, with the official formula, exp) mask more than linear at every r and decode few
tokens first, many last; convex ones (sqrt, log) the opposite. The paper finds concave schedules best. `log` and
`exp` depend on the number of tokens N.

Example::

    fraction = mask_schedule("cosine", r)                   # float [..] in [1e-6, 1]
    counts = masked_count_for_training("cosine", key, batch=8, num_tokens=64)   # int32 [8] in [1, 64]
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_FLOOR = 1e-6


def _cosine(r, n):
    return jnp.cos(0.5 * math.pi * r)


def _linear(r, n):
    return 1.0 - r


def _square(r, n):
    return 1.0 - r ** 2


def _cubic(r, n):
    return 1.0 - r ** 3


def _sqrt(r, n):
    return 1.0 - jnp.sqrt(r)


def _log(r, n):
    # -log2(r) / log2(N): 1 at r = 1/N, 0 at r = 1 (clipped to 1 below r = 1/N).
    return -jnp.log2(jnp.maximum(r, 1e-30)) / jnp.log2(n)


def _exp(r, n):
    return 1.0 - jnp.exp2(-jnp.log2(n) * (1.0 - r))


SCHEDULES: dict[str, Callable] = {"cosine": _cosine, "linear": _linear, "square": _square, "cubic": _cubic,
                                  "sqrt": _sqrt, "log": _log, "exp": _exp}
NEEDS_NUM_TOKENS = ("log", "exp")


def check_schedule(name: str, key: str = "schedule") -> None:
    """ValueError naming `key=name` when `name` is not a schedule."""
    if name not in SCHEDULES:
        raise ValueError(f"{key}={name!r}: unknown mask schedule; known: {', '.join(SCHEDULES)}")


def mask_schedule(name: str, r: jax.Array, num_tokens=None) -> jax.Array:
    """gamma(r): the fraction of tokens masked at progress `r` (any shape, values in [0, 1]), clipped to
    [1e-6, 1]. `num_tokens` N (an int, or an array broadcasting with `r`) is needed by 'log' and 'exp'."""
    check_schedule(name)
    if name in NEEDS_NUM_TOKENS:
        if num_tokens is None:
            raise ValueError(f"schedule {name!r} needs num_tokens")
        if isinstance(num_tokens, int) and num_tokens < 2:
            raise ValueError(f"schedule {name!r} needs num_tokens >= 2, got num_tokens={num_tokens}")
        # N < 2 (a one-token edit) has no meaningful log / exp schedule: treat it as N = 2.
        num_tokens = jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 2.0)
    r = jnp.asarray(r, jnp.float32)
    return jnp.clip(SCHEDULES[name](r, num_tokens), SCHEDULE_FLOOR, 1.0)


def masked_count_for_training(name: str, key: jax.Array, batch: int, num_tokens: int) -> jax.Array:
    """int32 [batch]: tokens to mask per example in MaskGIT training, ceil(gamma(r) * N) with r ~ U[0, 1),
    always in [1, N]."""
    r = jax.random.uniform(key, (batch,))
    counts = jnp.ceil(mask_schedule(name, r, num_tokens) * num_tokens).astype(jnp.int32)
    return jnp.clip(counts, 1, num_tokens)


def masked_after_step(name: str, step: jax.Array, num_steps: int, masked_at_start: jax.Array,
                      masked_now: jax.Array) -> jax.Array:
    """int32 [B]: tokens that stay masked after decoding step `step` (0-based, may be traced) of `num_steps`.

    floor(N0 * gamma((step + 1) / T)) with N0 = `masked_at_start` [B], the schedule's N for 'log' / 'exp' being N0
    as in the official code; kept in [1, masked_now - 1] so that every step decodes at least one token while one
    stays for the next, and 0 after the last step (it decodes everything left).
    """
    ratio = (jnp.asarray(step, jnp.float32) + 1.0) / num_steps
    start = jnp.asarray(masked_at_start, jnp.int32)
    gamma = mask_schedule(name, ratio, start if name in NEEDS_NUM_TOKENS else None)
    # + 1e-3: float32 rounding must not turn an exact integer such as 24 * (1 - 5/12) = 14 into 13.
    target = jnp.floor(start.astype(jnp.float32) * gamma + 1e-3).astype(jnp.int32)
    target = jnp.maximum(jnp.minimum(jnp.maximum(target, 1), masked_now - 1), 0)
    return jnp.where(jnp.asarray(step) >= num_steps - 1, 0, target).astype(jnp.int32)


# ------------------------------------------------------------------ deterministic orders (M2T, Halton-MaskGIT)
def _radical_inverse(index: int, base: int) -> float:
    result, fraction = 0.0, 1.0 / base
    while index > 0:
        index, digit = divmod(index, base)
        result += digit * fraction
        fraction /= base
    return result


def halton_order(grid_hw: tuple[int, int]) -> np.ndarray:
    """int32 [H * W]: the row-major token indices in the order the 2-D Halton sequence (bases 2 and 3) first visits
    their cells, a quasi-random order that spreads every prefix evenly over the grid (Halton-MaskGIT)."""
    height, width = grid_hw
    seen, order, index = np.zeros(height * width, bool), [], 1
    while len(order) < height * width:
        row = int(_radical_inverse(index, 2) * height)
        col = int(_radical_inverse(index, 3) * width)
        cell = row * width + col
        if not seen[cell]:
            seen[cell] = True
            order.append(cell)
        index += 1
    return np.asarray(order, np.int32)


def step_group_sizes(name: str, num_tokens: int, num_steps: int) -> np.ndarray:
    """int [T]: tokens decoded at each of `num_steps` steps when all `num_tokens` start masked (the counts of
    `masked_after_step`); every size is >= 1 and they sum to N."""
    check_schedule(name)
    if not 1 <= num_steps <= num_tokens:
        raise ValueError(f"num_steps={num_steps}: must be in [1, {num_tokens}] (the number of tokens)")
    remaining, sizes = num_tokens, []
    with jax.ensure_compile_time_eval():  # static sizes, also when called while a function is being traced
        for step in range(num_steps):
            after = int(masked_after_step(name, step, num_steps, np.array([num_tokens]), np.array([remaining]))[0])
            sizes.append(remaining - after)
            remaining = after
    return np.asarray(sizes, np.int64)


def token_groups(order: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """int32 [N]: the step (1-based group id; 0 is left for prefix tokens such as the class) at which each token
    is decoded, when tokens are decoded in `order` [N] in groups of `sizes` [T]."""
    order = np.asarray(order)
    if sorted(order.tolist()) != list(range(len(order))) or int(np.sum(sizes)) != len(order):
        raise ValueError(f"token_groups: order must be a permutation of the {len(order)} tokens and the sizes "
                         f"{list(sizes)} must sum to it")
    groups = np.zeros(len(order), np.int32)
    groups[order] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
    return groups
