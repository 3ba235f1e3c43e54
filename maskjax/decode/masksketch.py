"""MaskSketch-style structure-guided sampling (Bashkirova et al. 2023): a trained MaskGIT's self-attention maps
encode an image's layout, so sampling can follow a guide image's structure without any training. At every
decoding step the sample's attention maps are compared with the guide's, token by token, and the structure
distance, weighted by `structure_weight` (the paper's lambda_s), is subtracted from each new token's confidence:
tokens whose attention disagrees with the guide's are re-masked first.

Attention maps are row-stochastic float [B, N, N] over the image tokens (a layer's head-averaged attention,
restricted to the image positions and renormalised); the distance of token i is the total variation between row i
of the sample's map and of the guide's, 0.5 * sum_j |A_ij - G_ij|, in [0, 1].

Example::

    guide = attention_fn(guide_tokens)                                   # [1, N, N]
    penalty = structure_penalty(attention_fn, guide, structure_weight=2.0)
    final, steps = decode(masked, key, logits_fn, 8, "cosine", mask_id=K, penalty_fn=penalty)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


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
