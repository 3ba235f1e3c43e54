"""MaskGIT's bidirectional transformer (Chang et al. 2022) over [class token, image tokens], from maskjax's ViT
blocks and `attention()`.

Token ids (vocabulary `codebook_size + 1 + num_classes + 1`):
  [0, K)            image codes (K = codebook_size)
  K                 the mask token (`mask_id`; the official code's -1 landed on its last embedding row)
  K + 1 + c         the class token of class c in [0, num_classes)
  K + 1 + C         the null class (C = num_classes): label dropout in training, the unconditional branch of
                    classifier-free guidance.
Sequence: position 0 holds the class token, positions 1..N the image tokens (row-major grid). The output head is
an MLM layer (dense, GELU, LayerNorm) tied to the token embedding, plus a bias, as in the official code; logits of
the image positions come back [B, N, K] (the mask, class and null rows are never predicted).

Example::

    model = MaskGITTransformer(codebook_size=1000, num_classes=10, num_tokens=64, width=256, depth=4, ...)
    logits = model.apply(params, tokens, labels)             # tokens int32 [B, 64], labels int32 [B] -> [B, 64, 1000]
"""

from __future__ import annotations

from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from maskjax.models.attention_options import AttentionOptions
from maskjax.models.layers import Encoder, layer_norm

Dtype = Any


class MaskGITTransformer(nn.Module):
    """tokens int32 [B, N] in [0, K] (K = mask), labels int32 [B] in [0, C] (C = null) -> logits [B, N, K]."""

    codebook_size: int
    num_classes: int
    num_tokens: int
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 1024
    dropout: float = 0.1
    layer_norm_eps: float = 1e-6
    norm_position: str = "pre"  # 'post': BERT's post-LN blocks without a final norm (the official code's layout).
    approximate_gelu: bool = False  # True: tanh GELU (jax.nn.gelu's default, the official code's).
    dtype: Dtype = jnp.float32
    attention: AttentionOptions = AttentionOptions()

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 1 + self.num_classes + 1

    def class_token_ids(self, labels: jax.Array) -> jax.Array:
        return labels + self.codebook_size + 1

    def setup(self):
        self.token_embedding = self.param("token_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (self.vocab_size, self.width), jnp.float32)
        self.posemb = self.param("posemb", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("posemb_tokens", "embed")), (self.num_tokens + 1, self.width), jnp.float32)
        self.embed_norm = layer_norm(self.layer_norm_eps, self.dtype)
        self.embed_dropout = nn.Dropout(rate=self.dropout)
        self.encoder = Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                               approximate_gelu=self.approximate_gelu, layer_norm_eps=self.layer_norm_eps,
                               norm_position=self.norm_position, dtype=self.dtype, attention=self.attention)
        # MLM head tied to the embedding (BERT / official MaskGIT `MlmLayer`).
        self.mlm_dense = nn.Dense(
            self.width, dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))
        self.mlm_norm = layer_norm(self.layer_norm_eps, self.dtype)
        self.mlm_bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                                   (self.codebook_size,), jnp.float32)

    def _hidden(self, sequence: jax.Array, positions: jax.Array, train: bool, mask: Any,
                cache_positions: Optional[jax.Array]) -> jax.Array:
        x = jnp.take(self.token_embedding, sequence, axis=0) + jnp.take(self.posemb, positions, axis=0)[None]
        x = self.embed_dropout(self.embed_norm(x.astype(self.dtype)), deterministic=not train)
        return self.encoder(x, mask=mask, train=train, cache_positions=cache_positions)[0]

    def logits_of_hidden(self, hidden: jax.Array) -> jax.Array:
        """[B, n, width] -> [B, n, K]: the MLM head tied to the code rows of the token embedding."""
        h = self.mlm_norm(nn.gelu(self.mlm_dense(hidden), approximate=self.approximate_gelu))
        return jnp.einsum("bnd,kd->bnk", h.astype(jnp.float32), self.token_embedding[:self.codebook_size]) \
            + self.mlm_bias

    def sequence(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        """int32 [B, N + 1]: the class token (id K + 1 + label) followed by the image tokens."""
        return jnp.concatenate([self.class_token_ids(labels)[:, None], tokens], axis=1)

    def __call__(self, tokens: jax.Array, labels: jax.Array, *, train: bool = False, mask: Any = None,
                 return_hidden: bool = False, all_positions: bool = False) -> jax.Array:
        """Logits [B, N, K] of the image positions. `mask`: an optional attention mask over the N + 1 positions
        (True = may attend; M2T, causal). `all_positions`: logits of all N + 1 positions (autoregressive use:
        position j predicts image token j + 1)."""
        chex.assert_rank(tokens, 2)
        chex.assert_rank(labels, 1)
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"MaskGITTransformer: got {tokens.shape[1]} tokens per example, built for "
                             f"num_tokens={self.num_tokens}")
        x = self._hidden(self.sequence(tokens, labels), jnp.arange(self.num_tokens + 1), train, mask, None)
        x = x if all_positions else x[:, 1:]
        return x if return_hidden else self.logits_of_hidden(x)

    def at_positions(self, sequence_ids: jax.Array, positions: jax.Array, mask: Any) -> jax.Array:
        """Incremental decoding with the key/value cache (apply with mutable=['cache']): sequence ids int32
        [B, n] (class-token ids at position 0, image ids or the mask id at 1..N) at sequence positions int32 [n],
        attending to the cached positions under `mask` [B or 1, 1, n, N + 1]. Returns logits [B, n, K]."""
        return self.logits_of_hidden(self._hidden(sequence_ids, positions, False, mask, positions))


def check_tokens(tokens: jax.Array, codebook_size: int, *, allow_mask: bool = True, name: str = "tokens") -> None:
    """ValueError naming the first out-of-range id of concrete `tokens` (ids in [0, K], K = mask if allowed)."""
    import numpy as np

    values = np.asarray(tokens)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {values.dtype}")
    high = codebook_size if allow_mask else codebook_size - 1
    bad = (values < 0) | (values > high)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}[{', '.join(map(str, where))}]={int(values[where])}: token ids must be in "
                         f"[0, {high}] (codebook size {codebook_size}"
                         f"{', mask id ' + str(codebook_size) if allow_mask else ''})")
