"""Mask-classification segmentation heads on the ViT: EoMT, a Mask2Former-style decoder, and a per-pixel baseline.

The two mask-classification models predict, for Q queries, class logits over K classes plus "no object" and a
mask logit map each; they differ in where the queries live:

  EoMT (Kerssies et al. 2025)   queries are tokens of the ViT's last L blocks. Before each of those blocks the
                                 current queries predict masks, which become the queries' attention mask over the
                                 patch tokens (masked attention inside the encoder); annealed to no mask at all.
  Mask2Former-style             a separate transformer decoder (masked cross-attention -> self-attention -> FFN,
  (Cheng et al. 2022)           cycling over a simple ViTDet feature pyramid), no deformable attention.

Both return `(outputs, aux)` with outputs = {'class_logits' [B, Q, K+1], 'mask_logits' [B, Q, h, w] (h, w: the
mask resolution, stride 4 of the image for EoMT; the pyramid's finest level for Mask2Former), 'layers': a list of
earlier predictions {'class_logits', 'mask_logits'} for deep supervision (empty when none were made)}. With
`semantic_head=True` (ReMaX's ReMask, a training aid) every prediction also carries 'semantic_logits' [B, h, w, K]:
a linear classifier on the pixel features its masks are made from.
The per-pixel baseline returns {'semantic_logits' [B, gh, gw, K]} on the patch grid.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from maskjax.attention.masks import query_masks
from maskjax.models.attention_options import AttentionOptions
from maskjax.models.layers import DEFAULT_KERNEL_INIT, ZEROS, MultiHeadAttention, layer_norm
from maskjax.models.vit import ViT

Dtype = Any
EMPTY_MASK_RULES = ("attend_all", "attend_none")


def _dense(features: int, name: str, dtype: Dtype, axes: tuple = ("embed", "mlp")) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, axes),
                    bias_init=nn.with_logical_partitioning(ZEROS, (axes[1],)), name=name)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """[..., h, w] -> [..., H, W] bilinear with half-pixel centres and no antialiasing (PyTorch's
    `F.interpolate(mode='bilinear', align_corners=False)`, which Mask2Former and EoMT use both ways)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return jax.image.resize(x, x.shape[:-2] + size, method="bilinear", antialias=False)


class MaskHead(nn.Module):
    """Queries [B, Q, D] and pixel features [B, h, w, D] -> (class_logits [B, Q, K+1], mask_logits [B, Q, h, w]):
    a linear classifier and a 3-layer MLP whose output is dotted with every pixel's features."""

    num_classes: int
    activation: str = "gelu"  # of the mask MLP: 'gelu' (EoMT) or 'relu' (Mask2Former)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries: jax.Array, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank([queries, pixels], [3, 4])
        width = queries.shape[-1]
        class_logits = _dense(self.num_classes + 1, "class_head", self.dtype, ("embed", "classes"))(queries)
        embed = queries
        for i in range(3):
            axes = (("embed", "mlp"), ("mlp", "embed"), ("embed", None))[i]
            embed = _dense(width if i < 2 else pixels.shape[-1], f"mask_mlp_{i}", self.dtype, axes)(embed)
            if i < 2:
                embed = nn.gelu(embed, approximate=False) if self.activation == "gelu" else nn.relu(embed)
        mask_logits = jnp.einsum("bqc,bhwc->bqhw", embed, pixels.astype(embed.dtype))
        return class_logits.astype(jnp.float32), mask_logits.astype(jnp.float32)


class Deconv2x(nn.Module):
    """Flax's `nn.ConvTranspose(features, (2, 2), strides=(2, 2))` ([B, h, w, D] -> [B, 2h, 2w, features]; same
    parameters 'kernel' [2, 2, D, features] and 'bias'), computed as one einsum and a depth-to-space reshape: the
    2x2/2 windows do not overlap, and XLA's CPU gradient of the transposed convolution is ~100x its forward."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        batch, height, width, _ = x.shape
        # Flax's transposed conv with this stride correlates with the kernel unflipped: output (2i + a, 2j + b)
        # takes kernel tap (1 - a, 1 - b) (checked against nn.ConvTranspose in tests/models/test_segmentation.py).
        y = jnp.einsum("nhwd,pqdc->nhpwqc", x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype))
        return y.reshape(batch, 2 * height, 2 * width, self.features) + bias.astype(self.dtype)


class DepthwiseConv3x3(nn.Module):
    """Flax's `nn.Conv(D, (3, 3), padding=1, feature_group_count=D, use_bias=False)` (same 'kernel' [3, 3, 1, D])
    as nine shifted products: XLA's CPU gradient of grouped convolutions is several times slower."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 1, x.shape[-1]), jnp.float32)
        height, width = x.shape[1:3]
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
        kernel = kernel.astype(self.dtype)
        return sum(padded[:, dy:dy + height, dx:dx + width] * kernel[dy, dx, 0]
                   for dy in range(3) for dx in range(3))


class ScaleBlock(nn.Module):
    """EoMT's 2x upscaler of a feature map [B, h, w, D] -> [B, 2h, 2w, D]: transposed conv 2x2/2, GELU,
    depthwise 3x3 conv (no bias), LayerNorm over channels."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Deconv2x(x.shape[-1], self.dtype, name="deconv")(x)
        x = nn.gelu(x, approximate=False)
        x = DepthwiseConv3x3(self.dtype, name="dwconv")(x)
        return layer_norm(self.eps, self.dtype, name="norm")(x)


def num_upscale_blocks(patch_size: int) -> int:
    """EoMT's rule: enough 2x upscalers to bring the patch grid to stride 4, and at least one."""
    return max(1, int(math.log2(patch_size)) - 2)


class EoMT(ViT):
    """Encoder-only Mask Transformer: a ViT whose last `num_mask_blocks` blocks also process `num_queries` learned
    query tokens (prepended to the token sequence, EoMT's order [queries, prefix, patches]).

    `__call__(images [B, H, W, C], *, train=False, mask_probs=None)`: `mask_probs` float [num_mask_blocks] is each
    block's probability that a query's mask is applied (mask annealing, EoMT's P_i); None = no masked attention at
    all (inference: then only the final prediction is made). With probabilities, the rng stream 'anneal' draws
    which queries are unmasked (a query keeps its mask iff uniform <= P_i, as in EoMT's code). Before each of the
    last blocks the queries predict masks from the final-normed tokens; the queries then attend to a patch iff
    that patch's bilinearly downsampled mask logit is > 0; they always see each other and the prefix tokens, so no
    query row is ever empty. Patches and prefix tokens attend to everything.

    The parameter tree is the ViT's plus 'queries', 'mask_head', 'upscale_{i}', so ViT/MAE checkpoints load
    directly into the backbone part.
    """

    num_queries: int = 100
    num_mask_blocks: int = 4
    num_seg_classes: int = 10
    num_upscale: Optional[int] = None  # 2x upscalers of the mask features; None = `num_upscale_blocks(patch)`.
    semantic_head: bool = False  # ReMaX's ReMask: semantic logits from each prediction's pixel features.

    def setup(self):
        super().setup()
        if not 1 <= self.num_mask_blocks <= self.depth:
            raise ValueError(f"EoMT: num_mask_blocks={self.num_mask_blocks} must be in [1, depth={self.depth}]")
        if self.num_queries < 1 or self.num_seg_classes < 1:
            raise ValueError(f"EoMT: num_queries={self.num_queries} and num_seg_classes={self.num_seg_classes} "
                             "must be >= 1")
        if self.tubelet_size is not None or self.token_mask.kind != "none":
            raise ValueError("EoMT: images only, without a token_mask spec")
        self.queries = self.param("queries", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                          (None, "embed")),
                                  (self.num_queries, self.width), jnp.float32)
        patch = max(self.patch_size) if isinstance(self.patch_size, Sequence) else int(self.patch_size)
        if self.num_upscale is not None and self.num_upscale < 0:
            raise ValueError(f"EoMT: num_upscale={self.num_upscale} must be None or >= 0")
        self.upscale = [ScaleBlock(self.layer_norm_eps, self.dtype, name=f"upscale_{i}")
                        for i in range(num_upscale_blocks(patch) if self.num_upscale is None else self.num_upscale)]
        self.mask_head = MaskHead(self.num_seg_classes, "gelu", self.dtype, name="mask_head")
        if self.semantic_head:
            self.semantic = _dense(self.num_seg_classes, "semantic_head", self.dtype, ("embed", "classes"))

    def _predict(self, tokens: jax.Array, grid: tuple[int, int]) -> dict:
        normed, _ = self.encoder(tokens, blocks=(self.depth, self.depth), final_norm=True)
        queries = normed[:, :self.num_queries]
        patches = normed[:, self.num_queries + self.num_prefix_tokens:]
        pixels = patches.reshape(patches.shape[0], *grid, patches.shape[-1])
        for block in self.upscale:
            pixels = block(pixels)
        class_logits, mask_logits = self.mask_head(queries, pixels)
        out = {"class_logits": class_logits, "mask_logits": mask_logits}
        if self.semantic_head:
            out["semantic_logits"] = self.semantic(pixels).astype(jnp.float32)
        return out

    def _attention_mask(self, mask_logits: jax.Array, grid: tuple[int, int], keep_prob: jax.Array,
                        tokens: int) -> jax.Array:
        batch = mask_logits.shape[0]
        allowed = resize_bilinear(mask_logits, grid).reshape(batch, self.num_queries, -1) > 0
        drop = jax.random.uniform(self.make_rng("anneal"), (batch, self.num_queries, 1)) > keep_prob
        allowed = allowed | drop
        prefix = self.num_queries + self.num_prefix_tokens
        query_rows = jnp.concatenate([jnp.ones((batch, self.num_queries, prefix), bool), allowed], axis=-1)
        other_rows = jnp.ones((batch, tokens - self.num_queries, tokens), bool)
        return jnp.concatenate([query_rows, other_rows], axis=1)[:, None]  # [B, 1, T, T]

    def __call__(self, images: jax.Array, *, train: bool = False,
                 mask_probs: Optional[jax.Array] = None) -> tuple[dict, dict]:
        chex.assert_rank(images, 4)
        grid = self.patch_grid(images.shape[1:3])
        x = self.embed_dropout(self.add_prefix_tokens(self.embed_patches(images)), deterministic=not train)
        first_masked = self.depth - self.num_mask_blocks
        x, aux = self.encoder(x, train=train, blocks=(0, first_masked), final_norm=False)
        queries = jnp.broadcast_to(self.queries.astype(x.dtype), (x.shape[0],) + self.queries.shape)
        x = jnp.concatenate([queries, x], axis=1)
        layers = []
        if mask_probs is not None:
            mask_probs = jnp.asarray(mask_probs, jnp.float32)
            chex.assert_shape(mask_probs, (self.num_mask_blocks,))
        for i in range(first_masked, self.depth):
            mask = None
            if mask_probs is not None:
                layers.append(self._predict(x, grid))
                mask = self._attention_mask(jax.lax.stop_gradient(layers[-1]["mask_logits"]), grid,
                                            mask_probs[i - first_masked], x.shape[1])
            x, block_aux = self.encoder(x, mask=mask, train=train, blocks=(i, i + 1), final_norm=False)
            aux.update(block_aux)
        return {**self._predict(x, grid), "layers": layers}, aux


class FeaturePyramid(nn.Module):
    """ViTDet's simple pyramid from the last feature map [B, h, w, D] plus a light FPN-style pixel decoder.

    `scales` (powers of two, relative to the patch grid; e.g. (0.5, 1, 2)) give the decoder's levels, coarse to
    fine; the mask features are at `mask_scale`. Up: 2x2/2 transposed convs (with LayerNorm + GELU between);
    down: 2x2 max pooling. Each level: 1x1 projection to `dim` + LayerNorm; then top-down: each level adds the
    nearest-upsampled coarser one and a 3x3 conv mixes it.
    Returns (levels: list of [B, h_l, w_l, dim] coarse -> fine, mask_features [B, h_m, w_m, dim]).
    """

    dim: int
    scales: Sequence[float] = (0.5, 1.0, 2.0)
    mask_scale: float = 2.0
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    def _rescale(self, x: jax.Array, scale: float, name: str) -> jax.Array:
        steps = int(round(math.log2(scale)))
        if 2.0 ** steps != scale:
            raise ValueError(f"FeaturePyramid: scale {scale} is not a power of two")
        for i in range(max(steps, 0)):
            if i:
                x = nn.gelu(layer_norm(self.eps, self.dtype, name=f"{name}_norm{i}")(x), approximate=False)
            x = Deconv2x(x.shape[-1], self.dtype, name=f"{name}_up{i}")(x)
        for _ in range(max(-steps, 0)):
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return x

    @nn.compact
    def __call__(self, features: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        chex.assert_rank(features, 4)
        scales = sorted(set(tuple(self.scales) + (self.mask_scale,)))
        maps = {}
        for scale in scales:
            x = self._rescale(features, scale, f"scale_{scale:g}")
            x = nn.Conv(self.dim, (1, 1), dtype=self.dtype, name=f"lateral_{scale:g}")(x)
            maps[scale] = layer_norm(self.eps, self.dtype, name=f"lateral_norm_{scale:g}")(x)
        out, coarser = {}, None
        for scale in scales:  # coarse -> fine
            x = maps[scale]
            if coarser is not None:
                factor = x.shape[1] // coarser.shape[1]
                x = x + jnp.repeat(jnp.repeat(coarser, factor, axis=1), factor, axis=2)
            x = nn.Conv(self.dim, (3, 3), padding=1, dtype=self.dtype, name=f"output_{scale:g}")(x)
            x = nn.gelu(layer_norm(self.eps, self.dtype, name=f"output_norm_{scale:g}")(x), approximate=False)
            out[scale] = coarser = x
        return [out[s] for s in sorted(self.scales)], out[self.mask_scale]


class MaskedAttentionDecoderLayer(nn.Module):
    """Mask2Former's decoder layer (post-norm): masked cross-attention to one pyramid level, self-attention among
    the queries, FFN. Positional embeddings are added to queries/keys, not values."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    attention: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, x: jax.Array, query_pos: jax.Array, memory: jax.Array, memory_pos: jax.Array,
                 mask: Any) -> jax.Array:
        cross = MultiHeadAttention(self.num_heads, dtype=self.dtype, options=self.attention, name="cross_attn")
        x = layer_norm(1e-5, self.dtype, name="cross_norm")(
            x + cross(x + query_pos, memory + memory_pos, mask=mask, inputs_v=memory))
        self_attn = MultiHeadAttention(self.num_heads, dtype=self.dtype, options=self.attention, name="self_attn")
        x = layer_norm(1e-5, self.dtype, name="self_norm")(x + self_attn(x + query_pos, x + query_pos, inputs_v=x))
        y = _dense(self.mlp_dim, "ffn_in", self.dtype)(x)
        y = _dense(x.shape[-1], "ffn_out", self.dtype, ("mlp", "embed"))(nn.relu(y))
        return layer_norm(1e-5, self.dtype, name="ffn_norm")(x + y)


def detr_sine_posemb(height: int, width: int, dim: int, temperature: float = 10_000.0) -> jax.Array:
    """DETR / Mask2Former's normalised sine position embedding of an (height, width) grid: float32 [h * w, dim],
    the first dim/2 channels encode y, the rest x (interleaved sin/cos within each), coordinates scaled to
    (0, 2 pi]."""
    if dim % 4:
        raise ValueError(f"detr_sine_posemb: dim={dim} must be divisible by 4")
    feats = dim // 2
    y = (jnp.arange(1, height + 1, dtype=jnp.float32) / (height + 1e-6) * 2 * math.pi)[:, None]
    x = (jnp.arange(1, width + 1, dtype=jnp.float32) / (width + 1e-6) * 2 * math.pi)[None, :]
    dim_t = temperature ** (2 * (jnp.arange(feats) // 2) / feats)

    def encode(pos):
        pos = pos[..., None] / dim_t
        return jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])], axis=-1).reshape(*pos.shape[:-1], feats)

    pos_y = encode(jnp.broadcast_to(y, (height, width)))
    pos_x = encode(jnp.broadcast_to(x, (height, width)))
    return jnp.concatenate([pos_y, pos_x], axis=-1).reshape(height * width, dim)


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's transformer decoder over given pyramid levels and mask features.

    `__call__(levels: list of [B, h_l, w_l, dim] coarse -> fine, mask_features [B, h, w, dim])` -> (class_logits
    [B, Q, K+1], mask_logits [B, Q, h, w], layers: the `num_layers` earlier predictions, the first from the
    learned queries alone). Layer l cross-attends to level l % len(levels); with `masked_attention` query q sees
    only the pixels where the previous prediction's mask, bilinearly resized to that level, has sigmoid >= 0.5
    (`empty_mask_rule` decides rows with no such pixel: 'attend_all' = Mask2Former's code, 'attend_none' = zero
    output, maskjax's never-NaN rule). Each level's features get a learned level embedding (keys and values, as
    in Mask2Former), keys also DETR sine positions; queries a learned position. Mask2Former's `dec_layers` counts
    the initial prediction: its 9-layer decoder (`decoder_layers=10` in Hugging Face) is `num_layers=9` here.
    """

    num_seg_classes: int
    num_queries: int = 100
    num_heads: int = 8
    mlp_dim: int = 2048
    num_layers: int = 9
    masked_attention: bool = True
    empty_mask_rule: str = "attend_all"
    dtype: Dtype = jnp.float32
    attention: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array], mask_features: jax.Array) -> tuple[jax.Array, jax.Array, list]:
        if self.empty_mask_rule not in EMPTY_MASK_RULES:
            raise ValueError(f"MaskedAttentionDecoder: empty_mask_rule={self.empty_mask_rule!r} must be one of "
                             f"{EMPTY_MASK_RULES}")
        dim = mask_features.shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"MaskedAttentionDecoder: dim={dim} is not divisible by num_heads={self.num_heads}")
        batch = mask_features.shape[0]
        level_embed = self.param("level_embed", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                             (None, "embed")),
                                 (len(levels), dim), jnp.float32)
        # As Mask2Former: the level embedding joins the features (keys and values), the sine positions the keys only.
        memories = [lvl.reshape(batch, -1, dim) + level_embed[i].astype(self.dtype) for i, lvl in enumerate(levels)]
        memory_pos = [detr_sine_posemb(lvl.shape[1], lvl.shape[2], dim).astype(self.dtype) for lvl in levels]
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed"))
        query_feat = self.param("query_feat", init, (self.num_queries, dim), jnp.float32)
        query_pos = self.param("query_pos", init, (self.num_queries, dim), jnp.float32)
        x = jnp.broadcast_to(query_feat.astype(self.dtype), (batch, self.num_queries, dim))
        pos = jnp.broadcast_to(query_pos.astype(self.dtype), (batch, self.num_queries, dim))
        decoder_norm = layer_norm(1e-5, self.dtype, name="decoder_norm")
        head = MaskHead(self.num_seg_classes, "relu", self.dtype, name="mask_head")
        predictions = [head(decoder_norm(x), mask_features)]
        for layer in range(self.num_layers):
            level = layer % len(levels)
            mask = None
            if self.masked_attention:
                size = levels[level].shape[1:3]
                logits = jax.lax.stop_gradient(resize_bilinear(predictions[-1][1], size))
                mask = query_masks(logits.reshape(batch, self.num_queries, -1) >= 0,
                                   fallback_to_all=self.empty_mask_rule == "attend_all")
            x = MaskedAttentionDecoderLayer(self.num_heads, self.mlp_dim, self.dtype, self.attention,
                                            name=f"layer_{layer}")(x, pos, memories[level], memory_pos[level], mask)
            predictions.append(head(decoder_norm(x), mask_features))
        layers = [{"class_logits": c, "mask_logits": m} for c, m in predictions[:-1]]
        return predictions[-1][0], predictions[-1][1], layers


class Mask2FormerStyle(nn.Module):
    """A ViT backbone, a simple feature pyramid + light pixel decoder (`FeaturePyramid`), and Mask2Former's
    masked-attention transformer decoder (`MaskedAttentionDecoder`); no deformable attention anywhere.
    `masked_attention=False`: plain cross-attention (the paper's ablation)."""

    backbone: ViT
    num_seg_classes: int
    num_queries: int = 100
    dim: int = 256
    num_heads: int = 8
    mlp_dim: int = 2048
    num_layers: int = 9
    scales: Sequence[float] = (0.5, 1.0, 2.0)
    mask_scale: float = 2.0
    masked_attention: bool = True
    empty_mask_rule: str = "attend_all"
    semantic_head: bool = False  # ReMaX's ReMask: semantic logits from the mask features.
    dtype: Dtype = jnp.float32
    attention: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[dict, dict]:
        chex.assert_rank(images, 4)
        _, backbone_aux = self.backbone(images, train=train)
        grid = self.backbone.patch_grid(images.shape[1:3])
        tokens = backbone_aux["encoded"][:, self.backbone.num_prefix_tokens:]
        features = tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])
        levels, mask_features = FeaturePyramid(self.dim, self.scales, self.mask_scale, dtype=self.dtype,
                                               name="pixel_decoder")(features)
        class_logits, mask_logits, layers = MaskedAttentionDecoder(
            self.num_seg_classes, self.num_queries, self.num_heads, self.mlp_dim, self.num_layers,
            self.masked_attention, self.empty_mask_rule, self.dtype, self.attention, name="decoder")(
                levels, mask_features)
        outputs = {"class_logits": class_logits, "mask_logits": mask_logits, "layers": layers}
        if self.semantic_head:  # one map: every prediction's masks come from the same mask features
            semantic = _dense(self.num_seg_classes, "semantic_head", self.dtype, ("embed", "classes"))(mask_features)
            semantic = semantic.astype(jnp.float32)
            outputs["semantic_logits"] = semantic
            outputs["layers"] = [{**layer, "semantic_logits": semantic} for layer in layers]
        return outputs, backbone_aux


class PerPixel(nn.Module):
    """Per-pixel classification baseline (semantic only): a ViT, LayerNorm and a linear classifier on every
    patch token. Returns ({'semantic_logits' float32 [B, gh, gw, K]}, aux); the task upsamples the logits."""

    backbone: ViT
    num_seg_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[dict, dict]:
        chex.assert_rank(images, 4)
        _, aux = self.backbone(images, train=train)
        grid = self.backbone.patch_grid(images.shape[1:3])
        tokens = aux["encoded"][:, self.backbone.num_prefix_tokens:]
        logits = _dense(self.num_seg_classes, "classifier", self.dtype, ("embed", "classes"))(tokens)
        logits = logits.reshape(tokens.shape[0], *grid, self.num_seg_classes).astype(jnp.float32)
        return {"semantic_logits": logits}, aux
