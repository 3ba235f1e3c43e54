"""Transformer building blocks shared by every vision model in maskjax (Flax linen, pure functional).

Every parameter is boxed with `nn.with_logical_partitioning` using the logical axis names of the contract
('embed', 'mlp', 'heads', 'head_dim', 'classes', 'patch', 'posemb_tokens', 'norm'; None = never sharded), so the
trainer can shard any of these modules by config rules. Activations are `[batch, tokens, features]`.
"""

import contextlib
import functools
from typing import Any, Callable, Optional, Sequence, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskjax.attention import attention
from maskjax.attention.approx_bounded import BoundedLogitScale, logit_norm_bound, max_abs_logit
from maskjax.attention.reference import attention_weights
from maskjax.models.attention_options import AttentionOptions

Dtype = Any

# big_vision's choices: xavier-uniform matrices, tiny-normal MLP biases, zero attention biases.
DEFAULT_KERNEL_INIT = nn.initializers.xavier_uniform()
MLP_BIAS_INIT = nn.initializers.normal(stddev=1e-6)
ZEROS = nn.initializers.zeros
ONES = nn.initializers.ones

TOKEN_AXES = ("batch", "tokens", "embed")


def constrain_tokens(x: jax.Array) -> jax.Array:
    """Logical sharding constraint for token activations [batch, tokens, embed] (a no-op without rules/mesh)."""
    return nn.with_logical_constraint(x, TOKEN_AXES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_f32(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis of float32 `x` with float32 `scale`, `bias` [features]."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    # The statistics of flax.linen.LayerNorm (use_fast_variance: var = E[x^2] - E[x]^2, clipped at 0, one fusion).
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean)
    rstd = jax.lax.rsqrt(var + eps)
    normed = (x - mean) * rstd
    # scale and bias stay [features]: broadcast inside the fusion, never materialised as [batch, tokens, features].
    return normed * scale + bias, (normed, rstd, scale)


def _layer_norm_bwd(eps, residuals, dy):
    normed, rstd, scale = residuals
    g = dy * scale
    # d normed / dx through the mean and the variance, in closed form: two row reductions instead of autodiff's
    # chain through E[x^2] - E[x]^2 (same value up to float rounding).
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - normed * jnp.mean(g * normed, axis=-1, keepdims=True))
    batch_axes = tuple(range(dy.ndim - 1))
    return dx, jnp.sum(dy * normed, axis=batch_axes), jnp.sum(dy, axis=batch_axes)


_layer_norm_f32.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, as `flax.linen.LayerNorm(epsilon=eps, dtype=dtype)` with scale and bias.

    Same parameters ('scale', 'bias' [features], float32), same statistics (computed in float32, fast variance,
    clipped at 0) and output (x - mean) * rsqrt(var + eps) * scale + bias cast to `dtype` (flax multiplies by
    rsqrt(var + eps) * scale, one float rounding apart). The backward pass is written out (custom VJP): the
    scale is never broadcast to the activations' shape and only the normalised input and rsqrt are kept.
    """

    epsilon: float = 1e-6
    dtype: Optional[Dtype] = None
    scale_init: Callable = ONES
    bias_init: Callable = ZEROS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", self.bias_init, (features,), jnp.float32)
        dtype = self.dtype or jnp.result_type(x, jnp.float32)
        compute = jnp.promote_types(x.dtype, jnp.float32)
        y = _layer_norm_f32(x.astype(compute), scale.astype(compute), bias.astype(compute),
                            float(self.epsilon))
        return y.astype(dtype)


def layer_norm(eps: float, dtype: Dtype, name: Optional[str] = None) -> LayerNorm:
    """LayerNorm whose scale and bias carry the logical name 'norm'."""
    return LayerNorm(
        epsilon=eps,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(ONES, ("norm",)),
        bias_init=nn.with_logical_partitioning(ZEROS, ("norm",)),
        name=name,
    )


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
    """GELU. Exact (`approximate=False`): x / 2 * (1 + erf(x / sqrt(2))), PyTorch's formula (timm, Hugging Face),
    the same function as `jax.nn.gelu(approximate=False)` (which writes it with erfc: XLA lowers erfc with an
    exp and selects, about twice the cost of erf's polynomial). `approximate=True`: the tanh form."""
    if approximate:
        return nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def pair(value: Union[int, Sequence[int]], name: str) -> tuple[int, int]:
    """An int or a pair of ints as a (height, width) pair of positive ints; ValueError naming `name` otherwise."""
    if isinstance(value, (int, np.integer)):
        result = (int(value), int(value))
    else:
        result = tuple(int(v) for v in value)
    if len(result) != 2 or min(result) < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int or a pair of positive ints")
    return result


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense. [batch, tokens, embed] -> [batch, tokens, out_dim or embed].

    `approximate_gelu=False` (default) is the exact erf GELU of timm / Hugging Face ViTs.
    """

    mlp_dim: int
    out_dim: Optional[int] = None
    dropout: float = 0.0
    approximate_gelu: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        out_dim = x.shape[-1] if self.out_dim is None else self.out_dim
        x = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(MLP_BIAS_INIT, ("mlp",)),
            name="fc1",
        )(x)
        x = gelu(x, approximate=self.approximate_gelu)
        x = nn.with_logical_constraint(x, ("batch", "tokens", "mlp"))
        x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
        return nn.Dense(
            out_dim,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(MLP_BIAS_INIT, ("embed",)),
            name="fc2",
        )(x)


# Full-rank kernels built directly (not nn.DenseGeneral: it initialises a flattened 2-D kernel, which clashes with
# 3-D logical names as soon as a mesh and axis rules are active).
class HeadsProjection(nn.Module):
    """[..., in_features] -> [..., heads, head_dim]; kernel [in, heads, head_dim] ('embed', 'heads', 'head_dim')."""

    num_heads: int
    head_dim: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def weights(self, in_features: int) -> tuple[jax.Array, Optional[jax.Array]]:
        """(kernel [in, heads, head_dim], bias [heads, head_dim] or None), float32: the parameters without applying
        them (MultiHeadAttention stacks query, key and value into one projection)."""
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)),
                                                   ("embed", "heads", "head_dim")),
            (in_features, self.num_heads, self.head_dim), jnp.float32)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(ZEROS, ("heads", "head_dim")),
                              (self.num_heads, self.head_dim), jnp.float32)
        return kernel, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.weights(x.shape[-1])
        y = jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel.astype(self.dtype))
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y


class HeadsOutProjection(nn.Module):
    """[..., heads, head_dim] -> [..., features]; kernel [heads, head_dim, features] ('heads', 'head_dim', 'embed')."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2),
                                                   ("heads", "head_dim", "embed")),
            (x.shape[-2], x.shape[-1], self.features), jnp.float32)
        y = jnp.einsum("...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(ZEROS, ("embed",)), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


# Flax collection that receives every attention call's head-averaged weights, float32 [batch, q_len, kv_len],
# when the caller makes it mutable (AttMask scores, attention maps); nothing is computed otherwise.
ATTENTION_MAPS = "attention_maps"


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention through `maskjax.attention.attention`.

    Separate query/key/value projections with kernels [in_features, heads, head_dim] (logical
    ('embed', 'heads', 'head_dim')); output projection [heads, head_dim, out_features] (('heads', 'head_dim',
    'embed')). Optional qk-norm: a LayerNorm over head_dim applied to queries and keys (shared across heads).
    `options` (`AttentionOptions`) picks the backend, bounded logits and the max-|logit| record.

    Call with `inputs_q` [batch, q_len, d_q] and optionally `inputs_kv` [batch, kv_len, d_kv] (default: self-
    attention); `mask` (True = may attend) and `bias` broadcast to [batch, heads, q_len, kv_len] and are passed
    unchanged to `attention()`. Returns [batch, q_len, out_features or d_q].
    """

    num_heads: int
    qkv_features: Optional[int] = None  # Total width of q/k/v (heads * head_dim); default d_q.
    out_features: Optional[int] = None
    qk_norm: bool = False
    use_bias: bool = True
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    options: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array] = None, *,
                 mask: Any = None, bias: Optional[jax.Array] = None,
                 cache_positions: Optional[jax.Array] = None, inputs_v: Optional[jax.Array] = None) -> jax.Array:
        """`cache_positions` int32 [q_len] (self-attention only): key/value caching for incremental decoding. The
        keys and values of the inputs are written at these sequence positions of the 'cache' collection (created
        at the first such call, with that call's length as the sequence length), and the queries attend to the
        whole cached sequence under `mask` [.., q_len, seq_len] (the caller says which positions are filled).
        `inputs_v` [batch, kv_len, d_kv]: values from another input than the keys (DETR-style decoders add
        positions to keys but not to values); default `inputs_kv`."""
        if cache_positions is not None and inputs_kv is not None:
            raise ValueError("MultiHeadAttention: cache_positions needs self-attention (inputs_kv=None)")
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        chex.assert_rank([inputs_q, inputs_kv], 3)
        qkv_features = inputs_q.shape[-1] if self.qkv_features is None else self.qkv_features
        if qkv_features % self.num_heads:
            raise ValueError(f"MultiHeadAttention: qkv_features={qkv_features} is not divisible by "
                             f"num_heads={self.num_heads}")
        head_dim = qkv_features // self.num_heads
        out_features = inputs_q.shape[-1] if self.out_features is None else self.out_features

        def projection(name: str) -> HeadsProjection:
            return HeadsProjection(self.num_heads, head_dim, use_bias=self.use_bias, dtype=self.dtype, name=name)

        # Self-attention: one matmul against the stacked kernels [in, 3, heads, head_dim] instead of three (fewer,
        # larger matmuls, one input gradient); the parameters stay query/key/value. Not when intermediates are
        # captured (`capture_intermediates` records each projection's output under its own name).
        if inputs_kv is inputs_q and inputs_v is None and not self.is_mutable_collection("intermediates"):
            weights = [projection(name).weights(inputs_q.shape[-1]) for name in ("query", "key", "value")]
            kernel = jnp.stack([w for w, _ in weights], axis=1).astype(self.dtype)
            qkv = jnp.einsum("...d,dshk->...shk", inputs_q.astype(self.dtype), kernel)
            if self.use_bias:
                qkv = qkv + jnp.stack([b for _, b in weights]).astype(self.dtype)
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [batch, q_len, heads, head_dim]
        else:
            q = projection("query")(inputs_q)  # [batch, q_len, heads, head_dim]
            k = projection("key")(inputs_kv)
            v = projection("value")(inputs_kv if inputs_v is None else inputs_v)
        if self.qk_norm:
            q = layer_norm(self.layer_norm_eps, self.dtype, name="query_norm")(q)
            k = layer_norm(self.layer_norm_eps, self.dtype, name="key_norm")(k)
        scale = None
        if self.options.logit_bound > 0:
            q, k = BoundedLogitScale(bound=self.options.logit_bound, init_temperature=self.options.logit_bound / 2,
                                     name="logit_scale")(q, k)
            scale = 1.0
        if self.options.record_max_logit:
            exact = q.shape[1] * k.shape[1] <= 4096 * 4096
            self.sow("intermediates", "max_abs_logit",
                     max_abs_logit(q, k, scale) if exact else logit_norm_bound(q, k, scale))
        if cache_positions is not None:
            cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
            cached_k.value = cached_k.value.at[:, cache_positions].set(k)
            cached_v.value = cached_v.value.at[:, cache_positions].set(v)
            k, v = cached_k.value, cached_v.value
        if self.is_mutable_collection(ATTENTION_MAPS) and not self.is_initializing():  # asked for (AttMask)
            self.sow(ATTENTION_MAPS, "probs", jnp.mean(attention_weights(q, k, mask, bias, scale=scale), axis=1))
        out = attention(q, k, v, mask=mask, bias=bias, scale=scale, **self.options.call_kwargs())
        out = nn.with_logical_constraint(out, ("batch", "tokens", "heads", None))
        return HeadsOutProjection(out_features, use_bias=self.use_bias, dtype=self.dtype, name="out")(out)


class DropPath(nn.Module):
    """Stochastic depth: zeroes the whole residual branch of an example with probability `rate`.

    Kept examples are scaled by 1 / (1 - rate) so the expectation is unchanged. Uses the 'drop_path' rng stream;
    the identity when not training or `rate == 0`. x: [batch, ...] -> same shape.
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, rate: Optional[jax.Array] = None) -> jax.Array:
        """`rate`: a traced scalar rate used instead of the field (blocks under `nn.scan` carry theirs as data)."""
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"DropPath: rate={self.rate} must be in [0, 1)")
        if not train or (rate is None and self.rate == 0.0):
            return x
        keep_prob = 1.0 - (self.rate if rate is None else rate)
        keep = jax.random.bernoulli(self.make_rng("drop_path"), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class LayerScale(nn.Module):
    """Per-channel learned scale (CaiT), initialised to `init_value`. [..., embed] -> same shape."""

    init_value: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.constant(self.init_value),
                                                                 ("embed",)), (x.shape[-1],), jnp.float32)
        return x * scale.astype(self.dtype)


NORM_POSITIONS = ("pre", "post")


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + DropPath(LS(Attn(LN(x)))), then x + DropPath(LS(MLP(LN(x)))).

    `norm_position='post'`: the original Transformer / BERT block, LN(x + Attn(x)), then LN(x + MLP(x)) (the
    official MaskGIT transformer's layout; same parameter names).

    `__call__(x [batch, tokens, embed], mask, train)` takes positional arguments so `nn.remat` can mark `train`
    static. Returns the same shape.
    """

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    layer_scale_init: Optional[float] = None
    qk_norm: bool = False
    approximate_gelu: bool = False
    layer_norm_eps: float = 1e-6
    norm_position: str = "pre"
    dtype: Dtype = jnp.float32
    attention: AttentionOptions = AttentionOptions()

    @nn.compact
    def __call__(self, x: jax.Array, mask: Any = None, train: bool = False,
                 cache_positions: Optional[jax.Array] = None, drop_path_rate: Optional[jax.Array] = None) -> jax.Array:
        """`drop_path_rate`: a traced per-call stochastic-depth rate instead of the field (scanned layers)."""
        chex.assert_rank(x, 3)
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"Encoder1DBlock: norm_position={self.norm_position!r} must be one of {NORM_POSITIONS}")
        pre = self.norm_position == "pre"
        norm1 = layer_norm(self.layer_norm_eps, self.dtype, name="norm1")
        norm2 = layer_norm(self.layer_norm_eps, self.dtype, name="norm2")
        x = constrain_tokens(x)
        y = norm1(x) if pre else x
        y = MultiHeadAttention(num_heads=self.num_heads, qk_norm=self.qk_norm, layer_norm_eps=self.layer_norm_eps,
                               dtype=self.dtype, options=self.attention, name="attn")(
            y, mask=mask, cache_positions=cache_positions)
        y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init, dtype=self.dtype, name="ls1")(y)
        x = x + DropPath(self.drop_path_rate, name="drop_path1")(y, train=train, rate=drop_path_rate)
        x = constrain_tokens(x if pre else norm1(x))

        y = norm2(x) if pre else x
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, approximate_gelu=self.approximate_gelu,
                     dtype=self.dtype, name="mlp")(y, train=train)
        y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init, dtype=self.dtype, name="ls2")(y)
        x = x + DropPath(self.drop_path_rate, name="drop_path2")(y, train=train, rate=drop_path_rate)
        return constrain_tokens(x if pre else norm2(x))


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Per-block stochastic-depth rates rising linearly from 0 (first block) to `drop_path_rate` (last block)."""
    return [float(r) for r in np.linspace(0.0, drop_path_rate, depth)] if depth > 1 else [0.0] * depth


# What a rematerialised block keeps from its forward pass for the backward pass (everything else is recomputed);
# the block's input is always kept. 'minimal' is maxtext's name for saving the weight matmuls' outputs only.
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
SCANNED_BLOCKS = "blocks"  # The scanned encoder's module name; its parameters carry a leading [depth] axis.
LAYER_AXIS = "layers"  # Logical name of that axis (never sharded by the default rules).


_REMAT_ENABLED = [True]


@contextlib.contextmanager
def remat_disabled():
    """Within this context, models are traced without rematerialisation (FLOP counts: recomputed work is not
    model work). Tracing only: a jitted function keeps what it was traced with."""
    _REMAT_ENABLED[0] = False
    try:
        yield
    finally:
        _REMAT_ENABLED[0] = True


def remat_policy(name: str) -> Callable:
    """The `jax.checkpoint` policy called `name` (a key of REMAT_POLICIES); ValueError naming it otherwise."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={name!r} must be one of {tuple(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


class _ScanStep(Encoder1DBlock):
    """One step of the scanned encoder: (x, mask, rate) -> (block(x), block(x)); mask is the same for every
    block, rate is this block's stochastic-depth rate."""

    train: bool = False
    use_drop_path: bool = False

    def __call__(self, x: jax.Array, mask: Any, rate: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = super().__call__(x, mask, self.train, None, rate if self.use_drop_path else None)
        return x, x


class Encoder(nn.Module):
    """A stack of `depth` pre-LN blocks followed by a final LayerNorm (`norm_position='post'`: post-LN blocks and
    no final norm, BERT's layout).

    `__call__(x [batch, tokens, embed], *, mask=None, train=False) -> (encoded [batch, tokens, embed], aux)`,
    aux['block_{i}'] = output of block i (before the final norm). `mask` is given to every block, or, as a
    list/tuple of `depth` masks, one per block. `attention` sets every block's attention (`AttentionOptions`,
    resolved per block by `for_layer`). `cache_positions`: incremental decoding with a key/value cache (see
    `MultiHeadAttention`).

    `remat`: rematerialise each block in the backward pass, keeping what `remat_policy` (REMAT_POLICIES) says.
    `scan_layers`: the blocks run under `nn.scan` (one traced block, so compile time does not grow with depth);
    their parameters are one module 'blocks' whose leaves have a leading [depth] axis (logical name 'layers'),
    where the unrolled layout has 'block_0' ... 'block_{depth-1}' (`scan_layout` / `unrolled_layout` convert).
    Every block then gets the same mask and attention options. On XLA's CPU backend remat lowers peak memory only
    under scan: unrolled, its scheduler moves the recomputation forward (experiments/results/scan_remat.md).
    """

    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    layer_scale_init: Optional[float] = None
    qk_norm: bool = False
    approximate_gelu: bool = False
    layer_norm_eps: float = 1e-6
    norm_position: str = "pre"
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    attention: AttentionOptions = AttentionOptions()

    def _block_fields(self) -> dict:
        return dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                    layer_scale_init=self.layer_scale_init, qk_norm=self.qk_norm,
                    approximate_gelu=self.approximate_gelu, layer_norm_eps=self.layer_norm_eps,
                    norm_position=self.norm_position, dtype=self.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: Any = None, train: bool = False,
                 cache_positions: Optional[jax.Array] = None, blocks: Optional[tuple[int, int]] = None,
                 final_norm: bool = True) -> tuple[jax.Array, dict]:
        """`blocks=(start, stop)` runs only blocks start..stop-1 (and the final norm only if `final_norm`): models
        that act between blocks (EoMT) call the same encoder several times; the parameters are the same."""
        policy = remat_policy(self.remat_policy)
        start, stop = (0, self.depth) if blocks is None else blocks
        if not 0 <= start <= stop <= self.depth:
            raise ValueError(f"Encoder: blocks={blocks} must satisfy 0 <= start <= stop <= depth={self.depth}")
        if isinstance(mask, (list, tuple)) and len(mask) != self.depth:
            raise ValueError(f"Encoder: got {len(mask)} per-block masks for depth={self.depth}")
        if self.scan_layers:
            x, aux = self._scanned(x, mask, train, cache_positions, (start, stop), policy)
        else:
            x, aux = self._unrolled(x, mask, train, cache_positions, (start, stop), policy)
        if self.norm_position == "post" or not final_norm:
            return x, aux
        encoded = layer_norm(self.layer_norm_eps, self.dtype, name="encoder_norm")(x)
        return constrain_tokens(encoded), aux

    def _unrolled(self, x, mask, train, cache_positions, blocks, policy):
        block_cls = Encoder1DBlock
        if self.remat and _REMAT_ENABLED[0]:
            block_cls = nn.remat(Encoder1DBlock, static_argnums=(3,), policy=policy)
        layer_masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * self.depth
        aux = {}
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            if not blocks[0] <= i < blocks[1]:
                continue
            x = block_cls(**self._block_fields(), drop_path_rate=rate,
                          attention=self.attention.for_layer(i, self.depth), name=f"block_{i}")(
                x, layer_masks[i], train, cache_positions)
            aux[f"block_{i}"] = x
        return x, aux

    def _scanned(self, x, mask, train, cache_positions, blocks, policy):
        if blocks != (0, self.depth):
            raise ValueError(f"Encoder: scan_layers=True runs all {self.depth} blocks at once; blocks={blocks} needs "
                             "the unrolled layout (scan_layers=False)")
        if cache_positions is not None:
            raise ValueError("Encoder: scan_layers=True does not support key/value-cache decoding "
                             "(cache_positions); use the unrolled layout")
        if self.attention.approx_layers is not None:
            raise ValueError(f"Encoder: scan_layers=True needs one attention setting for every block, got "
                             f"approx_layers={self.attention.approx_layers}")
        if isinstance(mask, (list, tuple)):
            if any(m is not mask[0] for m in mask):
                raise ValueError("Encoder: scan_layers=True needs the same mask in every block, got per-block masks "
                                 "(e.g. shifted Swin windows); use the unrolled layout")
            mask = mask[0]
        step = _ScanStep
        if self.remat and _REMAT_ENABLED[0]:
            # Inside scan the loop already keeps the recomputation in the backward pass: no CSE barrier needed.
            step = nn.remat(step, policy=policy, prevent_cse=False)
        scan = nn.scan(step, variable_axes={True: 0}, split_rngs={"params": True, "dropout": True, "drop_path": True},
                       in_axes=(nn.broadcast, 0), length=self.depth, metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
        rates = jnp.asarray(drop_path_rates(self.drop_path_rate, self.depth), jnp.float32)
        x, outputs = scan(**self._block_fields(), attention=self.attention, train=train,
                          use_drop_path=self.drop_path_rate > 0, name=SCANNED_BLOCKS)(x, mask, rates)
        return x, {f"block_{i}": outputs[i] for i in range(self.depth)}


def _is_unrolled_stack(tree: Any) -> Optional[int]:
    """The depth if `tree` (a dict) holds block_0 .. block_{n-1} (n >= 1), else None."""
    if not isinstance(tree, dict):
        return None
    indices = sorted(int(k[len("block_"):]) for k in tree if isinstance(k, str) and k.startswith("block_")
                     and k[len("block_"):].isdigit())
    return len(indices) if indices and indices == list(range(len(indices))) else None


def scan_layout(tree: Any) -> Any:
    """A tree of arrays (parameters, or a whole train state: optimizer moments repeat the parameters' structure)
    in the unrolled layout -> the scanned one: every 'block_0' .. 'block_{n-1}' set becomes one 'blocks' whose
    leaves are stacked on a new leading [n] axis. Lists and tuples are walked; other leaves are kept."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(scan_layout(v) for v in tree)
    if not isinstance(tree, dict):
        return tree
    depth = _is_unrolled_stack(tree)
    out = {k: scan_layout(v) for k, v in tree.items() if not (depth and k.startswith("block_"))}
    if depth:
        stacked = [tree[f"block_{i}"] for i in range(depth)]
        out[SCANNED_BLOCKS] = jax.tree.map(lambda *leaves: np.stack([np.asarray(v) for v in leaves]), *stacked)
    return out


def unrolled_layout(tree: Any) -> Any:
    """The inverse of `scan_layout`: every 'blocks' subtree with a leading [n] axis -> 'block_0' .. 'block_{n-1}'."""
    if isinstance(tree, (list, tuple)):
        return type(tree)(unrolled_layout(v) for v in tree)
    if not isinstance(tree, dict):
        return tree
    out = {k: unrolled_layout(v) for k, v in tree.items() if k != SCANNED_BLOCKS}
    if SCANNED_BLOCKS in tree:
        depth = jax.tree.leaves(tree[SCANNED_BLOCKS])[0].shape[0]
        for i in range(depth):
            out[f"block_{i}"] = jax.tree.map(lambda v, i=i: np.asarray(v)[i], tree[SCANNED_BLOCKS])
    return out


def params_layout(tree: Any) -> Optional[str]:
    """'scanned' if any subtree is a scanned 'blocks', 'unrolled' if any holds 'block_<i>' children, else None."""
    if isinstance(tree, (list, tuple)):
        tree = dict(enumerate(tree))
    if not isinstance(tree, dict):
        return None
    if SCANNED_BLOCKS in tree:
        return "scanned"
    if _is_unrolled_stack(tree):
        return "unrolled"
    for value in tree.values():
        found = params_layout(value)
        if found:
            return found
    return None


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear embedding (a conv with kernel = stride = patch).

    images [batch, H, W, C] -> tokens [batch, (H/ph) * (W/pw), width], row-major over the patch grid. With
    `tubelet_size` t (video, VideoMAE's tubelets): videos [batch, T, H, W, C] -> [batch, (T/t) * (H/ph) * (W/pw),
    width], time-major (token index = t * gh * gw + row * gw + col). Sizes must be multiples of the patch.
    """

    width: int
    patch_size: Union[int, Sequence[int]]
    tubelet_size: Optional[int] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        ph, pw = pair(self.patch_size, "patch_size")
        video = self.tubelet_size is not None
        if images.ndim != (5 if video else 4):
            raise ValueError(f"images: expected {'[batch, T, H, W, C]' if video else '[batch, H, W, C]'}, got shape "
                             f"{images.shape}")
        patch = ((self.tubelet_size,) if video else ()) + (ph, pw)
        sizes = images.shape[1:-1]
        if any(size % p for size, p in zip(sizes, patch)):
            raise ValueError(f"input size {sizes} is not divisible by the {'tubelet x ' if video else ''}patch size "
                             f"{patch}")
        x = nn.Conv(
            self.width,
            kernel_size=patch,
            strides=patch,
            padding="VALID",
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     (None,) * (len(patch) + 1) + ("embed",)),
            bias_init=nn.with_logical_partitioning(ZEROS, ("embed",)),
            name="conv",
        )(images.astype(self.dtype))
        return x.reshape(x.shape[0], -1, x.shape[-1])


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0,
                     dtype: Dtype = jnp.float32) -> jax.Array:
    """Fixed 2-D sin-cos position embedding of MAE (He et al. 2022), for an h x w grid in row-major order.

    Channels are [sin(col * omega), cos(col * omega), sin(row * omega), cos(row * omega)], each width/4 wide,
    with omega_i = temperature ** (-i / (width / 4)) — the layout of MAE's `get_2d_sincos_pos_embed` (without its
    cls slot), so converted MAE checkpoints line up. Returns [1, h * w, width].
    """
    if width % 4:
        raise ValueError(f"posemb_sincos_2d: width={width} must be divisible by 4")
    return jnp.asarray(_sincos_2d_table(h, w, width, temperature)[None], dtype=dtype)


def _sincos_2d_table(h: int, w: int, width: int, temperature: float) -> np.ndarray:
    """The numpy table [h * w, width] of `posemb_sincos_2d` (a constant, never traced)."""
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    col_angles = cols.reshape(-1, 1) * omega[None]
    row_angles = rows.reshape(-1, 1) * omega[None]
    return np.concatenate([np.sin(col_angles), np.cos(col_angles), np.sin(row_angles), np.cos(row_angles)], axis=1)


def posemb_sincos_3d(t: int, h: int, w: int, width: int, temperature: float = 10_000.0,
                     dtype: Dtype = jnp.float32) -> jax.Array:
    """Separable space-time sin-cos position embedding for a t x h x w token grid (time-major): the 2-D embedding
    of MAE for (row, col) plus a 1-D sin-cos of the frame index over all `width` channels (MAE-ST's separable
    space + time layout, with fixed instead of learned tables). Returns [1, t * h * w, width]; t = 1 gives
    `posemb_sincos_2d`."""
    if width % 4:
        raise ValueError(f"posemb_sincos_3d: width={width} must be divisible by 4")
    half = width // 2
    omega = 1.0 / temperature ** (np.arange(half, dtype=np.float64) / half)
    angles = np.arange(t, dtype=np.float64)[:, None] * omega[None]
    time = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    time = time - time[:1]  # frame 0 adds nothing: a one-frame clip embeds like an image
    space = _sincos_2d_table(h, w, width, temperature)
    emb = (time[:, None, :] + space[None, :, :]).reshape(t * h * w, width)
    return jnp.asarray(emb[None], dtype=dtype)


def resize_posemb(posemb: jax.Array, old_grid: Sequence[int], new_grid: Sequence[int],
                  num_prefix_tokens: int = 0, method: str = "bilinear") -> jax.Array:
    """Resizes a learned position embedding [1, num_prefix + oh * ow, D] to [1, num_prefix + nh * nw, D].

    The first `num_prefix_tokens` embeddings (cls/registers, when a checkpoint has them) are kept as they are; the
    patch embeddings are viewed as an [oh, ow, D] grid and resized with `jax.image.resize` (`method`: 'bilinear'
    or 'bicubic'). Identity when the grids are equal.
    """
    old_grid, new_grid = pair(old_grid, "old_grid"), pair(new_grid, "new_grid")
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"resize_posemb: posemb must be [1, tokens, D], got shape {posemb.shape}")
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if posemb.shape[1] != expected:
        raise ValueError(f"resize_posemb: posemb has {posemb.shape[1]} tokens but old_grid={old_grid} with "
                         f"num_prefix_tokens={num_prefix_tokens} needs {expected}")
    if method not in ("bilinear", "bicubic"):
        raise ValueError(f"resize_posemb: method={method!r} must be 'bilinear' or 'bicubic'")
    if old_grid == new_grid:
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    grid = grid.reshape(old_grid[0], old_grid[1], -1)
    grid = jax.image.resize(grid, (new_grid[0], new_grid[1], grid.shape[-1]), method=method)
    return jnp.concatenate([prefix, grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(posemb.dtype)], axis=1)


class LearnedPosEmb(nn.Module):
    """A learned position embedding for the patch tokens, stored at grid `grid` and resized to the input grid.

    `__call__(grid_hw) -> [1, gh * gw, width]`. The stored parameter 'embedding' is [1, sh * sw, width] for the
    stored grid (sh, sw) = `grid` or, when `grid` is None, the grid seen at initialisation.
    """

    width: int
    grid: Optional[Sequence[int]] = None
    resize_method: str = "bilinear"
    init_stddev: Optional[float] = None  # Default 1/sqrt(width), as in big_vision.

    @nn.compact
    def __call__(self, grid_hw: Sequence[int]) -> jax.Array:
        grid_hw = pair(grid_hw, "grid_hw")
        stored = grid_hw if self.grid is None else pair(self.grid, "posemb_grid")
        if self.has_variable("params", "embedding"):
            tokens = nn.meta.unbox(self.get_variable("params", "embedding")).shape[1]
            if tokens != stored[0] * stored[1]:
                raise ValueError(f"learned posemb has {tokens} tokens but the input patch grid is {grid_hw}; set "
                                 "posemb_grid to the grid it was trained at so it can be resized")
        stddev = self.width ** -0.5 if self.init_stddev is None else self.init_stddev
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=stddev), (None, "posemb_tokens", "embed")),
            (1, stored[0] * stored[1], self.width), jnp.float32)
        return resize_posemb(embedding, stored, grid_hw, 0, self.resize_method)
