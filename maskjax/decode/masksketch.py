"""MaskSketch-style structure-guided sampling (Bashkirova et al. 2023): a trained MaskGIT's self-attention maps
encode an image's layout, so sampling can follow a guide image's structure without any training.

`structure_guided_decode` is maskjax's reading of the method: decoding starts from the guide's own tokens and, at
each of T steps, re-masks the m_t = max(1, floor(N * gamma((t + 1) / (T + 1)))) tokens of the current sample with
the lowest score and samples them anew. A token's score is its confidence when it was sampled (log p; the guide's
tokens start at 0) minus `structure_weight` (the paper's lambda_s) times its structure distance, plus annealed
Gumbel noise as in MaskGIT. Unlike MaskGIT decoding, tokens already decoded can be re-masked: a token whose
attention disagrees with the guide's is revised until the structure matches or the steps run out.
`structure_penalty` is the lighter hook of `maskjax.decode.decode` (the distance lowers only the confidence of
newly sampled tokens; decoded ones stay).

Attention maps are row-stochastic float [B, N, N] over the image tokens (a layer's head-averaged attention,
restricted to the image positions and renormalised); the distance of token i is the total variation between row i
of the sample's map and of the guide's, 0.5 * sum_j |A_ij - G_ij|, in [0, 1].

Example::

    guide = attention_fn(guide_tokens)                                   # [1, N, N]
    penalty = structure_penalty(attention_fn, guide, structure_weight=2.0)
    final, steps = decode(masked, key, logits_fn, 8, "cosine", mask_id=K, penalty_fn=penalty)
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from maskjax.masking.schedules import check_schedule, mask_schedule


def structure_distance(sample_maps: jax.Array, guide_maps: jax.Array) -> jax.Array:
    """float32 [B, N]: total variation between the rows of attention maps [B, N, N] and guide maps [B or 1, N, N]."""
    if sample_maps.shape[-2:] != guide_maps.shape[-2:]:
        raise ValueError(f"structure_distance: sample maps {sample_maps.shape} and guide maps {guide_maps.shape} "
                         "cover different token grids")
    return 0.5 * jnp.sum(jnp.abs(sample_maps.astype(jnp.float32) - guide_maps.astype(jnp.float32)), axis=-1)


def structure_penalty(attention_fn: Callable[[jax.Array], jax.Array], guide_maps: jax.Array,
                      structure_weight: float) -> Callable[[jax.Array], jax.Array]:
    """The `penalty_fn` of `maskjax.decode.decode`: structure_weight x the distance of each token of a sample
    (`attention_fn(tokens [B, N]) -> maps [B, N, N]`) from the guide's maps."""
    if structure_weight < 0:
        raise ValueError(f"structure_weight={structure_weight}: must be >= 0")

    def penalty(sampled: jax.Array) -> jax.Array:
        return structure_weight * structure_distance(attention_fn(sampled), guide_maps)
    return penalty


def remask_counts(schedule: str, num_tokens: int, num_steps: int) -> list[int]:
    """Tokens re-masked at each step of `structure_guided_decode`: max(1, floor(N * gamma((t + 1) / (T + 1))))."""
    check_schedule(schedule)
    import numpy as np
    with jax.ensure_compile_time_eval():
        ratios = jnp.arange(1, num_steps + 1, dtype=jnp.float32) / (num_steps + 1)
        fractions = np.asarray(mask_schedule(schedule, ratios, num_tokens))
    return [max(1, min(num_tokens, int(np.floor(num_tokens * f + 1e-4)))) for f in fractions]


def structure_guided_decode(guide_tokens: jax.Array, rng: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                            attention_fn: Callable[[jax.Array], jax.Array], guide_maps: jax.Array, num_steps: int,
                            schedule: str = "cosine", *, mask_id: int, structure_weight: float = 1.0,
                            choice_temperature: float = 4.5, temperature: float = 1.0,
                            batch_size: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """(final token ids int32 [B, N], every step's ids [T, B, N]) sampled from the guide's tokens int32
    [1 or B, N] (codes in [0, mask_id)) by revocable re-masking (module docstring). `logits_fn(tokens [B, N] with
    mask_id holes) -> [B, N, >= mask_id]`; `attention_fn(tokens [B, N]) -> maps [B, N, N]`; `guide_maps` [1 or B,
    N, N] the guide's maps; `batch_size` B when the guide is shared (default: the guide's batch)."""
    if structure_weight < 0:
        raise ValueError(f"structure_weight={structure_weight}: must be >= 0")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if guide_tokens.ndim != 2:
        raise ValueError(f"guide_tokens: expected [batch, num_tokens], got shape {tuple(guide_tokens.shape)}")
    num_tokens = guide_tokens.shape[1]
    if not 1 <= num_steps <= num_tokens:
        raise ValueError(f"num_steps={num_steps}: must be in [1, {num_tokens}] (the number of tokens)")
    batch = batch_size or guide_tokens.shape[0]
    counts = jnp.asarray(remask_counts(schedule, num_tokens, num_steps), jnp.int32)
    tokens = jnp.broadcast_to(guide_tokens.astype(jnp.int32), (batch, num_tokens))
    confidence = jnp.zeros((batch, num_tokens), jnp.float32)

    def step(carry, inputs):
        current, conf, key = carry
        t, count = inputs
        key, choice_key, sample_key = jax.random.split(key, 3)
        noise = choice_temperature * (1.0 - t.astype(jnp.float32) / num_steps)
        score = conf - structure_weight * structure_distance(attention_fn(current), guide_maps) \
            + noise * jax.random.gumbel(choice_key, conf.shape)
        ranks = jnp.argsort(jnp.argsort(score, axis=-1, stable=True), axis=-1, stable=True)
        remask = ranks < count
        holes = jnp.where(remask, mask_id, current)
        logits = logits_fn(holes)[..., :mask_id].astype(jnp.float32)
        sampled = jax.random.categorical(sample_key, logits / temperature)
        log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), sampled[..., None], axis=-1)[..., 0]
        following = jnp.where(remask, sampled, current).astype(jnp.int32)
        return (following, jnp.where(remask, log_probs, conf), key), following

    (final, _, _), history = jax.lax.scan(step, (tokens, confidence, rng),
                                          (jnp.arange(num_steps, dtype=jnp.int32), counts))
    return final, history
