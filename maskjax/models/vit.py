"""Vision Transformer (Dosovitskiy et al. 2021) in Flax linen, big_vision style.

`ViT.apply(variables, images, train=..., mask=..., rngs={'dropout': k, 'drop_path': k})` returns
`(logits, aux)`, with intermediates in `aux` so probes and visualisations need no surgery.

The forward pass is split into methods callable with `apply(..., method=...)`, so models that encode only some
tokens (MAE) reuse the same parameters:
  images --embed_patches--> patch tokens (+posemb) --[gather visible]--> --add_prefix_tokens--> tokens
         --encode--> encoded --head--> (logits, pre_logits)
"""

import re
from typing import Any, Optional, Sequence, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from maskjax.attention.masks import as_mask
from maskjax.models.attention_options import AttentionOptions, TokenMaskSpec
from maskjax.models.layers import (ATTENTION_MAPS, DEFAULT_KERNEL_INIT, ZEROS, Encoder, LearnedPosEmb, PatchEmbed,
                                   constrain_tokens, pair, posemb_sincos_2d, posemb_sincos_3d)

# name -> (width, depth, mlp_dim, num_heads)
VARIANT_SIZES = {
    "mu": (32, 2, 64, 2),  # Tiny size for tests.
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}

POSEMB_KINDS = ("learn", "sincos2d")
POOL_KINDS = ("cls", "gap", "none")


def decode_variant(variant: str) -> dict:
    """'Ti/16' -> dict(width=192, depth=12, mlp_dim=768, num_heads=3, patch_size=16).

    Sizes: mu (tests), Ti, S, M, B, L, H; any positive integer patch size after '/'.
    """
    match = re.fullmatch(r"([A-Za-z]+)/(\d+)", str(variant).strip())
    if match is None or match.group(1) not in VARIANT_SIZES or int(match.group(2)) < 1:
        raise ValueError(f"unknown ViT variant {variant!r}: expected '<size>/<patch>' with size in "
                         f"{list(VARIANT_SIZES)} and a positive integer patch, e.g. 'Ti/16'")
    width, depth, mlp_dim, num_heads = VARIANT_SIZES[match.group(1)]
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, patch_size=int(match.group(2)))


class ViT(nn.Module):
    """Vision Transformer with optional cls/register tokens; token order [cls?, registers..., patches...].

    Attributes:
      num_classes: outputs of the linear head; 0 or None = no head (logits are the pre-logits).
      patch_size: int or (ph, pw).
      tubelet_size: None for images [B, H, W, C]; t for videos [B, T, H, W, C] embedded as t x ph x pw tubelets
        (VideoMAE), tokens time-major, fixed separable space-time sin-cos position embedding (posemb='sincos2d').
      width, depth, mlp_dim, num_heads: transformer size (see `decode_variant`).
      class_token: prepend a learned [cls] token.
      num_registers: learned register tokens after the cls token (Darcet et al. 2024).
      posemb: 'learn' (learned, resized when the grid differs from `posemb_grid`) or 'sincos2d' (fixed, MAE).
        Position embeddings are added to patch tokens only; prefix tokens are learned anyway.
      posemb_grid: patch grid the learned posemb is stored at (None = the grid seen at init).
      dropout: dropout rate on embeddings, attention/MLP outputs and inside the MLP.
      drop_path_rate: stochastic depth of the last block, rising linearly from 0 at the first.
      layer_scale_init: LayerScale initial value (None = no LayerScale).
      pool: 'cls' (cls token), 'gap' (mean of patch tokens) or 'none' (head on every token).
      head_zero_init: zero-initialise the head (big_vision); else xavier-uniform.
      qk_norm: LayerNorm on queries and keys per head.
      dtype: compute dtype; parameters are float32.
      layer_norm_eps: LayerNorm epsilon (timm 1e-6, Hugging Face 1e-12).
      remat: rematerialise each block in the backward pass, keeping what `remat_policy` names
        (`layers.REMAT_POLICIES`: 'nothing_saveable', 'dots_saveable', 'minimal').
      scan_layers: run the blocks under `nn.scan` (parameters under encoder/blocks with a leading [depth] axis;
        see `layers.Encoder`).
      attention: `AttentionOptions` of every block (backend, approx layers, bounded logits, logit record).
      token_mask: `TokenMaskSpec`, a mask on the patch grid (2-D window, Swin partitions, LookHere
        directions) applied in every block of `__call__`, combined (and) with a `mask` argument.
    """

    num_classes: Optional[int] = None
    patch_size: Union[int, Sequence[int]] = 16
    tubelet_size: Optional[int] = None
    width: int = 192
    depth: int = 12
    mlp_dim: int = 768
    num_heads: int = 3
    class_token: bool = True
    num_registers: int = 0
    posemb: str = "learn"
    posemb_grid: Optional[Sequence[int]] = None
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    layer_scale_init: Optional[float] = None
    pool: str = "cls"
    head_zero_init: bool = True
    qk_norm: bool = False
    dtype: Any = jnp.float32
    layer_norm_eps: float = 1e-6
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    attention: AttentionOptions = AttentionOptions()
    token_mask: TokenMaskSpec = TokenMaskSpec()

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: cls (if any) + registers."""
        return int(self.class_token) + self.num_registers

    def _validate(self) -> None:
        pair(self.patch_size, "patch_size")
        for name in ("width", "depth", "mlp_dim", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ViT: {name}={getattr(self, name)!r} must be >= 1")
        if self.width % self.num_heads:
            raise ValueError(f"ViT: width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.posemb not in POSEMB_KINDS:
            raise ValueError(f"ViT: posemb={self.posemb!r} must be one of {POSEMB_KINDS}")
        if self.posemb == "sincos2d" and self.width % 4:
            raise ValueError(f"ViT: posemb='sincos2d' needs width divisible by 4, got width={self.width}")
        if self.pool not in POOL_KINDS:
            raise ValueError(f"ViT: pool={self.pool!r} must be one of {POOL_KINDS}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("ViT: pool='cls' needs class_token=True")
        if self.num_registers < 0:
            raise ValueError(f"ViT: num_registers={self.num_registers} must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ViT: dropout={self.dropout} must be in [0, 1)")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"ViT: drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if self.token_mask.kind == "directional_2d" and len(self.token_mask.directions) != self.num_heads:
            raise ValueError(f"ViT: token_mask directions={self.token_mask.directions} must give one angle per "
                             f"head (num_heads={self.num_heads})")
        uses_approx = self.attention.backend == "approx" or self.attention.approx_layers
        if uses_approx and self.token_mask.kind != "none":
            raise ValueError(f"ViT: token_mask kind={self.token_mask.kind!r} cannot be used with approx attention "
                             "layers (the low-rank kernel supports no spatial mask)")
        if self.tubelet_size is not None:
            if int(self.tubelet_size) < 1:
                raise ValueError(f"ViT: tubelet_size={self.tubelet_size} must be None (images) or >= 1 (video)")
            if self.posemb != "sincos2d":
                raise ValueError(f"ViT: video (tubelet_size={self.tubelet_size}) needs posemb='sincos2d' (fixed "
                                 f"space-time sin-cos), got posemb={self.posemb!r}")
            if self.token_mask.kind != "none":
                raise ValueError(f"ViT: token_mask kind={self.token_mask.kind!r} is defined on image patch grids, "
                                 f"not on video (tubelet_size={self.tubelet_size})")
        if self.num_classes is not None and self.num_classes < 0:
            raise ValueError(f"ViT: num_classes={self.num_classes} must be >= 0 (0/None = no head)")

    def setup(self):
        self._validate()
        self.patch_embed = PatchEmbed(self.width, self.patch_size, tubelet_size=self.tubelet_size, dtype=self.dtype,
                                      name="embedding")
        if self.posemb == "learn":
            self.learned_posemb = LearnedPosEmb(self.width, grid=self.posemb_grid, name="posemb")
        if self.class_token:
            self.cls = self.param("cls", nn.with_logical_partitioning(ZEROS, (None, None, "embed")),
                                  (1, 1, self.width), jnp.float32)
        if self.num_registers:
            self.registers = self.param(
                "registers", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                          (None, "posemb_tokens", "embed")),
                (1, self.num_registers, self.width), jnp.float32)
        self.embed_dropout = nn.Dropout(rate=self.dropout)
        self.encoder = Encoder(
            depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
            drop_path_rate=self.drop_path_rate, layer_scale_init=self.layer_scale_init, qk_norm=self.qk_norm,
            layer_norm_eps=self.layer_norm_eps, remat=self.remat, remat_policy=self.remat_policy,
            scan_layers=self.scan_layers, dtype=self.dtype, attention=self.attention,
            name="encoder")
        if self.num_classes:
            kernel_init = ZEROS if self.head_zero_init else DEFAULT_KERNEL_INIT
            self.head_dense = nn.Dense(
                self.num_classes, dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "classes")),
                bias_init=nn.with_logical_partitioning(ZEROS, ("classes",)), name="head")

    def patch_grid(self, image_hw: Sequence[int]) -> tuple[int, int]:
        """(gh, gw) patch grid of an image of size (H, W); ValueError if not divisible by the patch size."""
        (ph, pw), (height, width) = pair(self.patch_size, "patch_size"), tuple(image_hw)
        if height % ph or width % pw:
            raise ValueError(f"ViT: image size {(height, width)} is not divisible by patch_size {(ph, pw)}")
        return height // ph, width // pw

    def token_grid(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """The token grid of an input of spatial size (H, W) -> (gh, gw), or for video (T, H, W) -> (T/t, gh, gw)."""
        input_size = tuple(input_size)
        if self.tubelet_size is None:
            return self.patch_grid(input_size)
        if len(input_size) != 3 or input_size[0] % self.tubelet_size:
            raise ValueError(f"ViT: video size {input_size} must be (T, H, W) with T divisible by tubelet_size="
                             f"{self.tubelet_size}")
        return (input_size[0] // self.tubelet_size,) + self.patch_grid(input_size[1:])

    def position_embedding(self, grid_hw: Sequence[int]) -> jax.Array:
        """[1, prod(grid), width] float32 position embedding of the patch tokens for grid (gh, gw) or, for video,
        (gt, gh, gw)."""
        if len(grid_hw) == 3:
            return posemb_sincos_3d(*grid_hw, self.width)
        if self.posemb == "learn":
            return self.learned_posemb(grid_hw)
        return posemb_sincos_2d(grid_hw[0], grid_hw[1], self.width)

    def embed_patches(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] (video: [B, T, H, W, C]) -> patch tokens [B, prod(grid), width] (compute dtype) with
        position embeddings."""
        expected = 4 if self.tubelet_size is None else 5
        if images.ndim != expected:
            layout = "images must be [batch, H, W, C]" if expected == 4 else "videos must be [batch, T, H, W, C]"
            raise ValueError(f"ViT: {layout}, got shape {images.shape}")
        grid = self.token_grid(images.shape[1:-1])
        x = self.patch_embed(images)
        return constrain_tokens(x + self.position_embedding(grid).astype(self.dtype))

    def add_prefix_tokens(self, patch_tokens: jax.Array) -> jax.Array:
        """[B, n, width] -> [B, num_prefix_tokens + n, width]: prepends [cls?, registers...]."""
        chex.assert_rank(patch_tokens, 3)
        batch = patch_tokens.shape[0]
        prefix = []
        if self.class_token:
            prefix.append(self.cls)
        if self.num_registers:
            prefix.append(self.registers)
        if not prefix:
            return patch_tokens
        prefix = jnp.concatenate(prefix, axis=1).astype(patch_tokens.dtype)
        prefix = jnp.broadcast_to(prefix, (batch,) + prefix.shape[1:])
        return jnp.concatenate([prefix, patch_tokens], axis=1)

    def encode(self, tokens: jax.Array, *, train: bool = False, mask: Any = None) -> tuple[jax.Array, dict]:
        """Transformer on any token set: tokens [B, T, width] -> (encoded [B, T, width] after the final norm, aux).

        `mask` (True = may attend; broadcastable to [B, heads, T, T]) goes to every block. aux holds 'block_{i}'.
        """
        chex.assert_rank(tokens, 3)
        if tokens.shape[-1] != self.width:
            raise ValueError(f"ViT.encode: tokens have width {tokens.shape[-1]}, model width is {self.width}")
        x = self.embed_dropout(tokens.astype(self.dtype), deterministic=not train)
        return self.encoder(x, mask=mask, train=train)

    def block_masks(self, grid_hw: Sequence[int], mask: Any = None) -> Any:
        """The mask argument of `encode` for a (gh, gw) patch grid: `mask` and the `token_mask` spec combined;
        a list with one mask per block when the spec varies by block (shifted Swin windows)."""
        if self.token_mask.kind == "none":
            return mask
        user = as_mask(mask)

        def combined(layer):
            spec = self.token_mask.build(tuple(grid_hw), self.num_prefix_tokens, layer)
            return spec if user is None else user & spec

        if self.token_mask.varies_by_layer():
            return [combined(i) for i in range(self.depth)]
        return combined(0)

    def head(self, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
        """encoded [B, T, width] -> (logits, pre_logits) by `pool`.

        'cls'/'gap': pre_logits [B, width], logits [B, num_classes]; 'none': per token, [B, T, ...].
        Logits are float32; without a head (num_classes 0/None) logits are the float32 pre-logits.
        """
        if self.pool == "cls":
            pre_logits = encoded[:, 0]
        elif self.pool == "gap":
            pre_logits = jnp.mean(encoded[:, self.num_prefix_tokens:].astype(jnp.float32), axis=1)
            pre_logits = pre_logits.astype(encoded.dtype)
        else:
            pre_logits = encoded
        logits = self.head_dense(pre_logits) if self.num_classes else pre_logits
        return logits.astype(jnp.float32), pre_logits

    def __call__(self, images: jax.Array, *, train: bool = False, mask: Any = None,
                 ids_keep: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
        """images [B, H, W, C] -> (logits, aux).

        aux: 'stem' [B, n, width] patch tokens with posemb; 'block_{i}' [B, T, width]; 'encoded' [B, T, width]
        after the final norm; 'pre_logits' [B, width] (pool 'none': [B, T, width]); 'num_prefix_tokens' (int).
        T = num_prefix_tokens + n. `mask`: optional attention mask for every block (see `encode`), combined with
        the `token_mask` spec. `ids_keep` int [B, n_keep]: run on these patches only (MaskSub's masked branch,
        MAE-style visible-only encoding); then n = n_keep and aux['stem'] holds the kept patches.
        """
        stem = self.embed_patches(images)
        if ids_keep is not None:
            if self.token_mask.kind != "none":
                raise ValueError(f"ViT: ids_keep cannot be combined with token_mask kind={self.token_mask.kind!r} "
                                 "(the grid mask needs every patch)")
            chex.assert_rank(ids_keep, 2)
            stem = jnp.take_along_axis(stem, ids_keep[..., None].astype(jnp.int32), axis=1)
            block_mask = mask
        else:
            block_mask = self.block_masks(self.token_grid(images.shape[1:-1]), mask)
        encoded, aux = self.encode(self.add_prefix_tokens(stem), train=train, mask=block_mask)
        logits, pre_logits = self.head(encoded)
        aux.update(stem=stem, encoded=encoded, pre_logits=pre_logits, num_prefix_tokens=self.num_prefix_tokens)
        return logits, aux


def token_attention_scores(model: ViT, params: Any, images: jax.Array, *, layer: int = -1) -> jax.Array:
    """How much block `layer` attends to each patch, float32 [B, N] (heads averaged): the cls token's attention
    weights over the patches (AttMask's teacher scores) or, without a cls token, the mean attention each patch
    receives from the patch queries. No gradient flows to `params`."""
    chex.assert_rank(images, {4, 5})
    index = layer % model.depth
    _, state = model.apply({"params": jax.lax.stop_gradient(params)}, images, train=False,
                           mutable=[ATTENTION_MAPS])
    probs = state[ATTENTION_MAPS]["encoder"][f"block_{index}"]["attn"]["probs"][0]  # [B, T, T]
    prefix = model.num_prefix_tokens
    if model.class_token:
        return probs[:, 0, prefix:]
    return jnp.mean(probs[:, prefix:, prefix:], axis=1)
