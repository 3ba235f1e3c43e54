"""Classification metrics as sums over (possibly padded) batches, so they add up exactly across batches and hosts."""

import jax
import jax.numpy as jnp


def correct_topk(logits: jax.Array, labels: jax.Array, k: int = 1) -> jax.Array:
    """[batch] float 1.0 where the label is among the k highest logits ([batch, classes], [batch])."""
    topk = jax.lax.top_k(logits, k)[1]
    return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """[batch] cross-entropy of integer labels, computed in float32."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)
