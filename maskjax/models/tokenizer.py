"""Image tokenizers for masked generative transformers: a VQGAN-style convolutional autoencoder (residual blocks,
GroupNorm, swish; MaskGIT's `nets/vqgan_tokenizer.py` layout) with a vector quantizer (VQ-VAE) or finite scalar
quantization (FSQ, Mentzer et al. 2023).

Shapes: images float [B, H, W, C] in [-1, 1]; the encoder downsamples by f = 2 ** (len(channel_multipliers) - 1)
to a grid [B, H/f, W/f, D]; token ids int32 [B, H/f, W/f] in [0, codebook_size).

Example::

    tok = Tokenizer(channel_multipliers=(1, 2, 2), quantizer=FSQ(levels=(8, 5, 5, 5)))   # f = 4, 1000 codes
    variables = tok.init(key, images)
    reconstruction, aux = tok.apply(variables, images)                  # aux: ids, quantizer_loss, ...
    ids = tok.apply(variables, images, method=tok.encode)               # [B, H/4, W/4]
    images_back = tok.apply(variables, ids, method=tok.decode_ids)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("maskjax", "maskgit")


def _conv(features: int, kernel: int = 3, stride: int = 1, name: Optional[str] = None,
          use_bias: bool = True) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME", name=name, use_bias=use_bias,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, None)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


def _group_norm(groups: int, name: Optional[str] = None) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (None,)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


class ResBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1-projected skip when the width changes.

    `layout='maskgit'` reproduces the official MaskGIT VQGAN block exactly, so its checkpoints load: convolutions
    without bias, and the 1x1 "skip" applied to the block's own output rather than to its input (as written in
    `nets/vqgan_tokenizer.py`: `residual = conv_fn(...)(x)` after `x` was overwritten)."""

    features: int
    norm_groups: int
    layout: str = "maskjax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.layout == "maskjax"
        residual = x
        x = _conv(self.features, name="conv1", use_bias=bias)(nn.swish(_group_norm(self.norm_groups, "norm1")(x)))
        x = _conv(self.features, name="conv2", use_bias=bias)(nn.swish(_group_norm(self.norm_groups, "norm2")(x)))
        if residual.shape[-1] != self.features:
            residual = _conv(self.features, kernel=1, name="skip", use_bias=bias)(residual if bias else x)
        return x + residual


def _average_pool_2x2(x: jax.Array) -> jax.Array:
    """Non-overlapping 2x2 mean (TF-style 'SAME' pooling on even sizes): [B, H, W, C] -> [B, H/2, W/2, C]."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ConvEncoder(nn.Module):
    """[B, H, W, C] -> [B, H/f, W/f, embedding_dim]; one stride-2 downsampling between resolution levels (a 4x4
    convolution; `layout='maskgit'`: 2x2 average pooling and a bias-free input convolution, as the official
    VQGAN)."""

    filters: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    embedding_dim: int
    norm_groups: int
    layout: str = "maskjax"

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        official = self.layout == "maskgit"
        x = _conv(self.filters, name="conv_in", use_bias=not official)(images)
        for level, multiplier in enumerate(self.channel_multipliers):
            for i in range(self.num_res_blocks):
                x = ResBlock(self.filters * multiplier, self.norm_groups, self.layout,
                             name=f"level{level}_block{i}")(x)
            if level < len(self.channel_multipliers) - 1:
                x = _average_pool_2x2(x) if official else \
                    _conv(x.shape[-1], kernel=4, stride=2, name=f"level{level}_down")(x)
        for i in range(self.num_res_blocks):
            x = ResBlock(x.shape[-1], self.norm_groups, self.layout, name=f"mid_block{i}")(x)
        x = nn.swish(_group_norm(self.norm_groups, "norm_out")(x))
        return _conv(self.embedding_dim, kernel=1, name="conv_out")(x)


class ConvDecoder(nn.Module):
    """[B, h, w, embedding_dim] -> [B, h*f, w*f, channels]; nearest-neighbour upsampling + conv between levels."""

    filters: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    channels: int
    norm_groups: int
    layout: str = "maskjax"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = _conv(self.filters * self.channel_multipliers[-1], name="conv_in")(z)
        for i in range(self.num_res_blocks):
            x = ResBlock(x.shape[-1], self.norm_groups, self.layout, name=f"mid_block{i}")(x)
        for level in reversed(range(len(self.channel_multipliers))):
            for i in range(self.num_res_blocks):
                x = ResBlock(self.filters * self.channel_multipliers[level], self.norm_groups, self.layout,
                             name=f"level{level}_block{i}")(x)
            if level > 0:
                b, h, w, c = x.shape
                x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
                x = _conv(c, name=f"level{level}_up")(x)
        x = nn.swish(_group_norm(self.norm_groups, "norm_out")(x))
        return _conv(self.channels, name="conv_out")(x)


class VectorQuantizer(nn.Module):
    """VQ-VAE quantizer: nearest code (squared Euclidean, or cosine with `l2_normalize`), straight-through
    gradients, codebook loss ||sg(z) - e||^2 + `commitment_cost` * ||z - sg(e)||^2 (van den Oord et al. 2017).

    `dead_code_weight` > 0 pulls the codes no vector of the (global) batch chose towards randomly drawn encoder
    outputs of the batch: a restart of dead codes that needs no state beyond the parameters (rng stream
    'quantizer'; off when not training).
    z [..., D] -> (quantized [..., D], ids int32 [...], {'quantizer_loss', 'codebook_loss', 'commitment_loss'}).
    """

    codebook_size: int
    commitment_cost: float = 0.25
    l2_normalize: bool = False
    dead_code_weight: float = 0.0

    @nn.compact
    def __call__(self, z: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array, dict]:
        dim = z.shape[-1]
        codebook = self.param("codebook", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), (None, None)), (self.codebook_size, dim))
        z = z.astype(jnp.float32)
        flat = z.reshape(-1, dim)
        if self.l2_normalize:
            flat = _l2(flat)
            codebook = _l2(codebook)
            z = flat.reshape(z.shape)
        distances = (jnp.sum(flat ** 2, -1, keepdims=True) - 2 * flat @ codebook.T
                     + jnp.sum(codebook ** 2, -1)[None])
        ids = jnp.argmin(distances, axis=-1)
        quantized = codebook[ids].reshape(z.shape)
        codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - quantized) ** 2)
        commitment_loss = jnp.mean((z - jax.lax.stop_gradient(quantized)) ** 2)
        loss = codebook_loss + self.commitment_cost * commitment_loss
        if self.dead_code_weight > 0 and train:
            used = jnp.zeros((self.codebook_size,), bool).at[ids].set(True)
            picks = jax.random.randint(self.make_rng("quantizer"), (self.codebook_size,), 0, flat.shape[0])
            targets = jax.lax.stop_gradient(flat[picks])
            pull = jnp.sum(jnp.where(used[:, None], 0.0, (codebook - targets) ** 2)) / (self.codebook_size * dim)
            loss = loss + self.dead_code_weight * pull
        quantized = z + jax.lax.stop_gradient(quantized - z)  # straight-through
        aux = {"quantizer_loss": loss, "codebook_loss": codebook_loss, "commitment_loss": commitment_loss}
        return quantized, ids.reshape(z.shape[:-1]).astype(jnp.int32), aux

    def embed_ids(self, ids: jax.Array) -> jax.Array:
        """int32 [...] -> code vectors [..., D]."""
        codebook = nn.meta.unbox(self.get_variable("params", "codebook"))
        return (_l2(codebook) if self.l2_normalize else codebook)[ids]


def _l2(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x ** 2, -1, keepdims=True), 1e-12))


def fsq_bound(z: jax.Array, levels: Sequence[int], eps: float = 1e-3) -> jax.Array:
    """FSQ's bounding: tanh into (-(L-1)/2, (L-1)/2) per dimension, shifted by half a level for even L so that
    rounding yields exactly L values. z [..., d] with d = len(levels)."""
    levels_arr = np.asarray(levels, np.float32)
    half = (levels_arr - 1) * (1 - eps) / 2
    offset = np.where(levels_arr % 2 == 0, 0.5, 0.0).astype(np.float32)
    shift = np.arctanh(offset / half).astype(np.float32)  # the paper's listing has tan; atanh maps 0 to 0 exactly
    return jnp.tanh(z + shift) * half - offset


def fsq_codes_to_ids(codes: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Integer levels [..., d] (dimension i in [-(L_i // 2), L_i - 1 - L_i // 2]) -> ids int32 [...] in
    [0, prod(levels)), mixed radix with the first dimension least significant."""
    levels_arr = np.asarray(levels)
    digits = codes + (levels_arr // 2)
    basis = np.cumprod(np.concatenate([[1], levels_arr[:-1]])).astype(np.int32)
    return jnp.sum(digits.astype(jnp.int32) * basis, axis=-1).astype(jnp.int32)


def fsq_ids_to_codes(ids: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Inverse of `fsq_codes_to_ids`: ids [...] -> integer levels [..., d] (float32)."""
    levels_arr = np.asarray(levels)
    basis = np.cumprod(np.concatenate([[1], levels_arr[:-1]])).astype(np.int32)
    digits = (ids[..., None] // basis) % levels_arr
    return (digits - levels_arr // 2).astype(jnp.float32)


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


class FSQ(nn.Module):
    """Finite scalar quantization: project to d = len(levels) dims, bound, round (straight-through), scale to
    [-1, 1] and project back to `embedding_dim`. Codebook = prod(levels) implicit codes; no auxiliary loss.
    z [..., D] -> (quantized [..., embedding_dim], ids int32 [...], {'quantizer_loss': 0})."""

    levels: Sequence[int] = (8, 5, 5, 5)
    embedding_dim: int = 64

    @property
    def codebook_size(self) -> int:
        return int(math.prod(self.levels))

    def setup(self):
        self.project_in = _dense(len(self.levels), "project_in")
        self.project_out = _dense(self.embedding_dim, "project_out")

    def _half_width(self) -> np.ndarray:
        return (np.asarray(self.levels) // 2).astype(np.float32)

    def __call__(self, z: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array, dict]:
        bounded = fsq_bound(self.project_in(z.astype(jnp.float32)), self.levels)
        codes = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)  # round, straight-through
        ids = fsq_codes_to_ids(jnp.round(jax.lax.stop_gradient(codes)).astype(jnp.int32), self.levels)
        quantized = self.project_out(codes / self._half_width())
        return quantized, ids, {"quantizer_loss": jnp.zeros((), jnp.float32)}

    def embed_ids(self, ids: jax.Array) -> jax.Array:
        """int32 [...] -> quantized vectors [..., embedding_dim]."""
        return self.project_out(fsq_ids_to_codes(ids, self.levels) / self._half_width())


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as in VQGAN: stride-2 4x4 convolutions with leaky ReLU (GroupNorm after the
    first), then a 1-channel 4x4 convolution. images [B, H, W, C] -> real/fake logits [B, H/4, W/4] per patch."""

    filters: int = 32
    norm_groups: int = 8

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = nn.leaky_relu(_conv(self.filters, kernel=4, stride=2, name="conv1")(images), 0.2)
        x = _conv(2 * self.filters, kernel=4, stride=2, name="conv2")(x)
        x = nn.leaky_relu(_group_norm(self.norm_groups, "norm2")(x), 0.2)
        x = nn.leaky_relu(_conv(4 * self.filters, kernel=4, name="conv3")(x), 0.2)
        return _conv(1, kernel=4, name="logits")(x)[..., 0].astype(jnp.float32)


class Tokenizer(nn.Module):
    """Encoder -> quantizer -> decoder. `quantizer` is 'vq' or 'fsq'; f = 2 ** (len(channel_multipliers) - 1).

    `layout='maskgit'`: the official MaskGIT VQGAN's blocks (see `ResBlock`, `ConvEncoder`), whose networks see
    pixels in [0, 1]; images in and out stay in maskjax's [-1, 1] (mapped at the boundary).

    __call__(images [B, H, W, C], train) -> (reconstruction [B, H, W, C], aux): aux holds 'ids' int32
    [B, H/f, W/f] and the quantizer's losses ('quantizer_loss', a scalar, 0 for FSQ).
    """

    quantizer: str = "fsq"
    codebook_size: int = 1024  # VQ: number of codes (FSQ: prod(fsq_levels)).
    fsq_levels: Sequence[int] = (8, 5, 5, 5)
    embedding_dim: int = 64
    filters: int = 64
    channel_multipliers: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 1
    norm_groups: int = 32
    channels: int = 3
    commitment_cost: float = 0.25
    l2_normalize: bool = False
    dead_code_weight: float = 0.0
    discriminator_filters: int = 0  # > 0: a PatchGAN discriminator (under 'discriminator') for adversarial training.
    layout: str = "maskjax"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return int(math.prod(self.fsq_levels)) if self.quantizer == "fsq" else self.codebook_size

    def setup(self):
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"Tokenizer: quantizer={self.quantizer!r} must be 'vq' or 'fsq'")
        if self.layout not in LAYOUTS:
            raise ValueError(f"Tokenizer: layout={self.layout!r} must be one of {LAYOUTS}")
        self.encoder = ConvEncoder(self.filters, tuple(self.channel_multipliers), self.num_res_blocks,
                                   self.embedding_dim, self.norm_groups, self.layout)
        self.decoder = ConvDecoder(self.filters, tuple(self.channel_multipliers), self.num_res_blocks,
                                   self.channels, self.norm_groups, self.layout)
        if self.quantizer == "vq":
            self.quantize = VectorQuantizer(self.codebook_size, self.commitment_cost, self.l2_normalize,
                                            self.dead_code_weight)
        else:
            self.quantize = FSQ(tuple(self.fsq_levels), self.embedding_dim)
        if self.discriminator_filters > 0:
            self.discriminator = PatchDiscriminator(self.discriminator_filters, self.norm_groups)

    def _check(self, images: jax.Array) -> None:
        chex.assert_rank(images, 4)
        h, w = images.shape[1:3]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"Tokenizer: image size {h}x{w} is not a multiple of the downsampling factor "
                             f"{self.downsample} (channel_multipliers={tuple(self.channel_multipliers)})")

    def _encode(self, images: jax.Array) -> jax.Array:
        return self.encoder((images + 1.0) / 2.0 if self.layout == "maskgit" else images)

    def _decode(self, quantized: jax.Array) -> jax.Array:
        out = self.decoder(quantized)
        return out * 2.0 - 1.0 if self.layout == "maskgit" else out

    def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
        self._check(images)
        quantized, ids, aux = self.quantize(self._encode(images), train=train)
        reconstruction = self._decode(quantized)
        if self.discriminator_filters > 0 and self.is_initializing():
            self.discriminator(images)  # creates its parameters
        return reconstruction, {"ids": ids, **aux}

    def discriminate(self, images: jax.Array) -> jax.Array:
        """PatchGAN logits [B, H/4, W/4] of images (needs discriminator_filters > 0)."""
        if self.discriminator_filters <= 0:
            raise ValueError("Tokenizer.discriminate: built without a discriminator (discriminator_filters=0)")
        return self.discriminator(images)

    def encode(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] -> token ids int32 [B, H/f, W/f]."""
        self._check(images)
        return self.quantize(self._encode(images))[1]

    def decode_ids(self, ids: jax.Array) -> jax.Array:
        """Token ids int32 [B, h, w] -> images [B, h*f, w*f, C]."""
        chex.assert_rank(ids, 3)
        return self._decode(self.quantize.embed_ids(ids))
