"""Approximate-gradient attention: exp(q·k) replaced by a polynomial low-rank kernel phi(q)·phi(k).

Liang, Sha, Shi, Song, Zhou (2024), "Multi-Layer Transformers Gradient Can be Approximated in Almost Linear
Time", using the polynomial method of Alman & Song: when every logit t = scale·q·k satisfies |t| <= B, the
attention matrix exp(Q Kᵀ) is close to U1 U2ᵀ with U = phi(·) of rank r = C(d+g, g) (`approx_features`), and
every product with it costs O(n r d) instead of O(n² d).

Modes (`approx_mode`):
  lowrank    forward and backward through the low-rank kernel; the gradient is the exact gradient of the
             approximate model, O(n r d): at degree 2 autodiff (causal/window) or a streamed analytic
             backward (global path, `_lowrank_global`), else the Kronecker backward below at degree
             g−1 (e_g' = e_{g-1}), which avoids the feature map's gather-heavy VJP. Related public work:
             linear/Taylor attention (Based, PolySketchFormer, Performer) — Based uses this same 2nd-order
             Taylor kernel.
  exact_fwd  exact softmax forward (maskjax's dense reference, or its blocked path beyond 256² scores); the
             backward is the `lowrank` gradient (jax.custom_vjp): an approximate gradient of the exact model —
             the paper's setting. The forward is O(n² d) (it is exact); the backward O(n r d).
  paper      forward as `lowrank`; backward with the paper's formula: dS = P̃ ∘ (dO Vᵀ − δ 1ᵀ), contracted with
             the row-wise Kronecker factors [phi(k) ⊗ (v, 1)] of rank r(d+1), O(n r d²). Because it uses the
             kernel value (∂exp(t)/∂t = exp(t)) instead of the derivative of the polynomial (e_g' = e_{g-1}),
             its dQ/dK carry the degree-g error rather than degree g−1: one degree more accurate.

Masking (all modes):
  causal=True, window=None   exact inside the diagonal blocks of size `block_size`, low-rank to every earlier
                             block through prefix sums of the r×d block states, O(n r d + n c d). The result
                             depends on `block_size` (that sets the exact region).
  window=w                   hybrid: exact for keys with 0 <= i−j < w (causal) or |i−j| < w (bidirectional),
                             low-rank beyond; independent of `block_size`.
  mask                       only a key-padding mask (shape broadcastable to [batch, 1, 1, k_len]).

Degrees: even only (the Taylor kernel is then positive for every logit, see `approx_features`).
Logits are not clipped: outside |t| <= B the result stays finite but the approximation degrades (polynomial
instead of exponential growth). Pair with `approx_bounded.BoundedLogitScale` to make the bound hold.
"""

import functools
import math
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from maskjax.attention import masks
from maskjax.attention.approx_features import feature_rank, taylor_exp, taylor_features
from maskjax.attention.blocked import blocked_attention
from maskjax.attention.checks import check_floating_qkv, has_zero_length, zero_length_output
from maskjax.attention.reference import reference_attention

APPROX_MODES = ("lowrank", "exact_fwd", "paper")
# exact_fwd: score matrices up to this size use the dense reference forward, larger ones the blocked path.
_DENSE_EXACT_MAX = 256 * 256


class _Config(NamedTuple):
    degree: int
    causal: bool
    window: Optional[int]
    block: int  # block length c (for the unblocked global path: the key length)
    blocked: bool  # False: bidirectional without window, one global state
    key_padding: bool  # a key-padding mask was given
    stream_chunk: Optional[int] = None  # global path: rows per streamed chunk (None: automatic)


# ----------------------------------------------------------------------------------------------- layout helpers


def _to_blocks(x: jax.Array, nb: int, c: int) -> jax.Array:
    """[G, n, ...] -> [G, nb, c, ...], zero-padding n up to nb*c."""
    pad = nb * c - x.shape[1]
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((x.shape[0], nb, c) + x.shape[2:])


def _shift(x: jax.Array, s: int, axis: int = 1) -> jax.Array:
    """result[b] = x[b - s] along `axis` (zero where b - s is out of range)."""
    n = x.shape[axis]
    if s == 0:
        return x
    if abs(s) >= n:
        return jnp.zeros_like(x)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (s, 0) if s > 0 else (0, -s)
    x = jnp.pad(x, pad)
    start = 0 if s > 0 else -s
    return jax.lax.slice_in_dim(x, start, start + n, axis=axis)


def _far_of_query_block(x: jax.Array, cfg: _Config, m: int) -> jax.Array:
    """Sum of per-key-block states x[G, nb, ...] over the key blocks a query block reaches low-rank only."""
    if not cfg.blocked:
        return x  # one block holding all keys
    cum = jnp.cumsum(x, axis=1)
    out = _shift(cum, m + 1)  # key blocks <= b - m - 1
    if not cfg.causal:
        rev = jnp.flip(jnp.cumsum(jnp.flip(x, axis=1), axis=1), axis=1)
        out = out + _shift(rev, -(m + 1))  # key blocks >= b + m + 1
    return out


def _far_of_key_block(x: jax.Array, cfg: _Config, m: int) -> jax.Array:
    """Sum of per-query-block states over the query blocks that reach a key block low-rank only."""
    if not cfg.blocked:
        return x
    rev = jnp.flip(jnp.cumsum(jnp.flip(x, axis=1), axis=1), axis=1)
    out = _shift(rev, -(m + 1))  # query blocks >= b + m + 1
    if not cfg.causal:
        out = out + _shift(jnp.cumsum(x, axis=1), m + 1)
    return out


def _band_offsets(cfg: _Config, nb: int) -> tuple:
    if not cfg.blocked:
        return ()
    m = 0 if cfg.window is None else min(math.ceil((cfg.window - 1) / cfg.block), nb - 1)
    return tuple(range(0, m + 1)) if cfg.causal else tuple(range(-m, m + 1))


# ----------------------------------------------------------------------------------------------- forward engine


class _Forward(NamedTuple):
    out: jax.Array  # [G, nb, c, d]
    den: jax.Array  # [G, nb, c]
    fq_scaled: jax.Array  # [G, nb, c, r] = exp(-m_i) phi(q_i)
    fk: jax.Array  # [G, nbk, ck, r] phi(k_j), zero for invalid keys
    q_blocks: jax.Array  # [G, nb, c, d]
    k_blocks: jax.Array  # [G, nbk, ck, d]
    v_blocks: jax.Array  # [G, nbk, ck, dv]
    band_kernel: Optional[jax.Array]  # [G, nb, c, len(offsets)*c] kernel values (incl. exp(-m_i)), 0 if not allowed
    band_k: Optional[jax.Array]  # [G, nb, len(offsets)*c, d]
    band_v: Optional[jax.Array]
    band_logits: Optional[jax.Array]  # [G, nb, c, len(offsets)*c]
    band_approx: Optional[jax.Array]  # [nb, c, len(offsets)*c] or broadcastable: pairs with the polynomial kernel
    row_shift: jax.Array  # [G, nb, c] the exp(-m_i) stabiliser


def _forward(qs: jax.Array, ks: jax.Array, v: jax.Array, valid: jax.Array, cfg: _Config) -> _Forward:
    """Low-rank (or hybrid) attention on [G, n, d] logits-scaled inputs; differentiable by autodiff."""
    nq = qs.shape[1]
    if cfg.blocked:
        c = cfg.block
        nb = -(-nq // c)
        nbk, ck = nb, c
    else:
        c, nb = nq, 1
        nbk, ck = 1, ks.shape[1]
    q_blocks = _to_blocks(qs, nb, c)
    k_blocks = _to_blocks(ks, nbk, ck)
    v_blocks = _to_blocks(v, nbk, ck)
    valid_blocks = _to_blocks(valid, nbk, ck)  # padded keys are invalid

    fq = taylor_features(q_blocks, cfg.degree)
    fk = taylor_features(k_blocks, cfg.degree) * valid_blocks[..., None]

    offsets = _band_offsets(cfg, nb)
    m = max(offsets, default=0)
    band_kernel = band_k = band_v = logits = approx = None
    num = jnp.zeros(q_blocks.shape[:-1] + v.shape[-1:], jnp.float32)
    den = jnp.zeros(q_blocks.shape[:-1], jnp.float32)
    row_shift = jnp.zeros(q_blocks.shape[:-1], jnp.float32)
    if offsets:
        band_k = jnp.concatenate([_shift(k_blocks, o) for o in offsets], axis=2)
        band_v = jnp.concatenate([_shift(v_blocks, o) for o in offsets], axis=2)
        band_valid = jnp.concatenate([_shift(valid_blocks, o) for o in offsets], axis=2) > 0
        block_ids = jnp.arange(nb)[:, None, None]
        qpos = block_ids * c + jnp.arange(c)[None, :, None]
        kpos = jnp.concatenate([(block_ids - o) * c + jnp.arange(c)[None, None, :] for o in offsets], axis=2)
        allowed = band_valid[:, :, None, :]
        if cfg.causal:
            allowed = allowed & (kpos <= qpos)
        if cfg.window is None:  # exact inside the diagonal block only
            exact = allowed & (kpos // c == qpos // c)
        else:
            exact = allowed & (jnp.abs(qpos - kpos) < cfg.window)
        approx = allowed & ~exact
        logits = jnp.einsum("gbqd,gbkd->gbqk", q_blocks, band_k)
        # The exp part is stabilised by the row's largest exact logit (clamped at 0 so the low-rank part is
        # never scaled up); the shift cancels in num/den, hence no gradient through it.
        row_shift = jax.lax.stop_gradient(
            jnp.maximum(jnp.max(jnp.where(exact, logits, -jnp.inf), axis=-1), 0.0))
        exact_part = jnp.exp(jnp.where(exact, logits - row_shift[..., None], -jnp.inf))
        approx_part = jnp.where(approx, taylor_exp(jnp.where(approx, logits, 0.0), cfg.degree), 0.0)
        band_kernel = exact_part + approx_part * jnp.exp(-row_shift)[..., None]
        num = num + jnp.einsum("gbqk,gbkd->gbqd", band_kernel, band_v)
        den = den + jnp.sum(band_kernel, axis=-1)

    fq_scaled = fq * jnp.exp(-row_shift)[..., None]
    state_v = _far_of_query_block(jnp.einsum("gbkr,gbkd->gbrd", fk, v_blocks), cfg, m)
    state_1 = _far_of_query_block(jnp.sum(fk, axis=2), cfg, m)
    # Unblocked (global) path: a single query block and a single key block, so the state is shared by all.
    num = num + jnp.einsum("gbqr,gbrd->gbqd", fq_scaled, state_v)
    den = den + jnp.einsum("gbqr,gbr->gbq", fq_scaled, state_1)
    # Even degrees make every kernel value positive, so den > 0 unless the row has no allowed key.
    out = num / jnp.where(den > 0, den, 1.0)[..., None]
    return _Forward(out, den, fq_scaled, fk, q_blocks, k_blocks, v_blocks, band_kernel, band_k, band_v, logits,
                    approx, row_shift)


def _unblock(x: jax.Array, n: int) -> jax.Array:
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :n]


def _stream_chunk(rank: int) -> int:
    """Rows per chunk of the streamed global path: about 2 MB of features, a power of two in [256, 4096]."""
    return int(min(4096, max(256, 2 ** round(math.log2((1 << 19) / rank)))))


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[G, n, ...] -> [n_chunks, G, min(chunk, n), ...] (zero-padded)."""
    chunk = min(chunk, x.shape[1])
    nc = -(-x.shape[1] // chunk)
    return jnp.moveaxis(_to_blocks(x, nc, chunk), 1, 0)


def _unchunk(x: jax.Array, n: int) -> jax.Array:
    """[n_chunks, G, chunk, ...] -> [G, n, ...] (drops the padding of `_chunks`)."""
    return jnp.moveaxis(x, 0, 1).reshape((x.shape[1], -1) + x.shape[3:])[:, :n]


def _key_weights(v: jax.Array, valid: jax.Array) -> jax.Array:
    """w_j = valid_j (v_j, 1): [G, n, dv+1]. The key-padding mask lives here, so φ(k) needs no masking."""
    return jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1) * valid[..., None]


def _global_key_state(ks: jax.Array, w: jax.Array, degree: int, chunk: int) -> jax.Array:
    """S = Σ_j φ(k_j) ⊗ w_j: [G, r, dv+1] (numerator and denominator states in one matmul per chunk)."""
    def key_pass(state, xs):
        k_c, w_c = xs
        return state + jnp.einsum("gkr,gkc->grc", taylor_features(k_c, degree), w_c), None

    init = jnp.zeros((ks.shape[0], feature_rank(ks.shape[-1], degree), w.shape[-1]), jnp.float32)
    return jax.lax.scan(key_pass, init, (_chunks(ks, chunk), _chunks(w, chunk)))[0]


def _global_outputs(qs: jax.Array, state: jax.Array, degree: int, chunk: int):
    """out_i = (φ(q_i)·S_v) / den_i, den_i = φ(q_i)·S_1: ([G, n, dv], [G, n])."""
    def query_pass(_, q_c):
        y = jnp.einsum("gqr,grc->gqc", taylor_features(q_c, degree), state)
        den = y[..., -1]
        # Even degrees make every kernel value positive, so den > 0 unless the row has no valid key.
        return None, (y[..., :-1] / jnp.where(den > 0, den, 1.0)[..., None], den)

    _, (out, den) = jax.lax.scan(query_pass, None, _chunks(qs, chunk))
    return _unchunk(out, qs.shape[1]), _unchunk(den, qs.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lowrank_global(qs, ks, v, valid, degree: int, chunk: int) -> jax.Array:
    """The unblocked low-rank attention, streamed over row chunks in both directions, O(n r d).

    Forward: one pass over key chunks accumulating S = Σ_j φ(k_j) ⊗ valid_j (v_j, 1), then one over query
    chunks. Backward (the exact gradient of this low-rank model, as autodiff would give it), with
    a_i = (dO_i, −dO_i·out_i) / den_i:
      dφ(q_i) = S a_i,  dS = Σ_i φ(q_i) ⊗ a_i  (one pass over query chunks),
      dφ(k_j) = dS w_j,  dv_j = valid_j (dS_v)ᵀ φ(k_j)  (one pass over key chunks),
    and dq, dk through the feature map's analytic VJP inside the chunk. Each chunk's features live only inside
    its loop body, so no n×r array is ever materialised and the time stays linear in n instead of jumping
    once n×r arrays outgrow the CPU caches. Residuals are O(n d + r d): inputs, out, den and S.
    """
    w = _key_weights(v, valid)
    return _global_outputs(qs, _global_key_state(ks, w, degree, chunk), degree, chunk)[0]


def _lowrank_global_fwd(qs, ks, v, valid, degree, chunk):
    state = _global_key_state(ks, _key_weights(v, valid), degree, chunk)
    out, den = _global_outputs(qs, state, degree, chunk)
    return out, (qs, ks, v, valid, state, out, den)


def _lowrank_global_bwd(degree, chunk, residuals, cot):
    qs, ks, v, valid, state, out, den = residuals
    cot = cot.astype(jnp.float32)
    inv_den = jnp.where(den > 0, 1.0 / jnp.where(den > 0, den, 1.0), 0.0)  # rows without keys: zero gradients
    a = jnp.concatenate([cot, -jnp.sum(cot * out, axis=-1, keepdims=True)], axis=-1) * inv_den[..., None]

    def features_and_pullback(x):
        return jax.vjp(lambda y: taylor_features(y, degree), x)

    def query_pass(d_state, xs):
        q_c, a_c = xs
        fq, pullback = features_and_pullback(q_c)
        (dq_c,) = pullback(jnp.einsum("gqc,grc->gqr", a_c, state))
        return d_state + jnp.einsum("gqr,gqc->grc", fq, a_c), dq_c

    d_state, dq = jax.lax.scan(query_pass, jnp.zeros_like(state), (_chunks(qs, chunk), _chunks(a, chunk)))
    d_state_v = d_state[..., :-1]

    def key_pass(_, xs):
        k_c, w_c, valid_c = xs
        fk, pullback = features_and_pullback(k_c)
        (dk_c,) = pullback(jnp.einsum("gkc,grc->gkr", w_c, d_state))
        return None, (dk_c, jnp.einsum("gkr,grd->gkd", fk, d_state_v) * valid_c[..., None])

    _, (dk, dv) = jax.lax.scan(
        key_pass, None, (_chunks(ks, chunk), _chunks(_key_weights(v, valid), chunk), _chunks(valid, chunk)))
    nq, nk = qs.shape[1], ks.shape[1]
    return _unchunk(dq, nq), _unchunk(dk, nk), _unchunk(dv, nk), jnp.zeros_like(valid)


_lowrank_global.defvjp(_lowrank_global_fwd, _lowrank_global_bwd)


def _lowrank(qs, ks, v, valid, cfg: _Config) -> jax.Array:
    if not cfg.blocked:  # one chunk (no loop) when the sequence is no longer than the chunk
        chunk = cfg.stream_chunk or _stream_chunk(feature_rank(qs.shape[-1], cfg.degree))
        return _lowrank_global(qs, ks, v, valid, cfg.degree, chunk)
    return _unblock(_forward(qs, ks, v, valid, cfg).out, qs.shape[1])


# ----------------------------------------------------------------------------------------------- backward


def _exact(qs, ks, v, valid, cfg: _Config) -> jax.Array:
    """Exact softmax forward: dense reference for small problems, the blocked XLA path (O(tile) memory) beyond."""
    q4, k4, v4 = qs[:, :, None], ks[:, :, None], v[:, :, None]  # [G, n, 1 head, d]
    if qs.shape[1] * ks.shape[1] <= _DENSE_EXACT_MAX:
        mask = (valid > 0)[:, None, None, :]
        if cfg.causal:
            mask = mask & jnp.tril(jnp.ones((qs.shape[1], ks.shape[1]), bool))[None, None]
        return reference_attention(q4, k4, v4, mask=mask, scale=1.0)[:, :, 0]
    mask = masks.causal() if cfg.causal else None
    if cfg.key_padding:
        padding = masks.dense((valid > 0)[:, None, None, :])
        mask = padding if mask is None else mask & padding
    return blocked_attention(q4, k4, v4, mask, scale=1.0)[:, :, 0]


def _kron_state(feats: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
    """Σ_rows feats[..., row, a] left[..., row, c] right[..., row, e] -> [..., a, c, e].

    The outer product left ⊗ right (rows × c·e, small) is formed first and then contracted with the features as
    one matmul; a 3-operand einsum may instead build the rows × a × c intermediate (gigabytes at d = 64)."""
    outer = (left[..., :, None] * right[..., None, :]).reshape(left.shape[:-1] + (-1,))
    state = jnp.einsum("...na,...nx->...ax", feats, outer)
    return state.reshape(state.shape[:-1] + (left.shape[-1], right.shape[-1]))


def _kronecker_bwd(cfg: _Config, qs, ks, v, valid, cot, grad_degree: int):
    """Gradients of the low-rank attention without autodiff through the features, O(n r' d²).

    With weights W_ij (kernel values / den_i) and P̃_ij = φ̃(q_i)·φ(k_j)/den_i (degree g),
      dv_j = Σ_i P̃_ij dO_i,    d logit_ij = W_ij (dO_i·v_j − δ_i),   δ_i = dO_i·Õ_i,
    and dq_i = Σ_j d logit_ij k_j, dk_j = Σ_i d logit_ij q_i. The kernel of W decides what is computed:
      grad_degree = g      W = P̃: the paper's formula (∂e^t/∂t = e^t), an approximation of the exact gradient
                           that is one degree more accurate for dq, dk;
      grad_degree = g − 1  W uses e_{g-1} = e_g' on low-rank pairs: exactly the gradient of the low-rank model
                           (what autodiff would give), without the feature map's VJP.
    For low-rank (far) pairs, with a'_i = (dO_i, −δ_i)/den_i, w_j = (v_j, 1) and ψ the degree-`grad_degree`
    features, dq_i = Σ_{a,c} ψ̃(q_i)_a a'_ic T[a, c, :] with T = Σ_j ψ(k_j)_a w_jc k_j — a contraction with the
    rank r'(d+1) row-wise Kronecker factors ψ ⊗ w (the paper's rank r(d+1)); likewise for dk. Band pairs
    (inside the diagonal block / window) are done densely per block.
    """
    fw = _forward(qs, ks, v, valid, cfg)
    nq, nk = qs.shape[1], ks.shape[1]
    nb, c = fw.q_blocks.shape[1], fw.q_blocks.shape[2]
    offsets = _band_offsets(cfg, nb)
    m = max(offsets, default=0)
    d_out = _to_blocks(cot.astype(jnp.float32), nb, c)
    safe_den = jnp.where(fw.den > 0, fw.den, 1.0)
    delta = jnp.sum(d_out * fw.out, axis=-1)
    a_v = d_out / safe_den[..., None]  # [G, nb, c, dv]
    a_full = jnp.concatenate([a_v, (-delta / safe_den)[..., None]], axis=-1)  # a'
    w_full = jnp.concatenate([fw.v_blocks, jnp.ones_like(fw.v_blocks[..., :1])], axis=-1)  # w

    if grad_degree == cfg.degree:
        psi_q, psi_k = fw.fq_scaled, fw.fk
    else:
        valid_blocks = _to_blocks(valid, fw.k_blocks.shape[1], fw.k_blocks.shape[2])
        psi_q = taylor_features(fw.q_blocks, grad_degree) * jnp.exp(-fw.row_shift)[..., None]
        psi_k = taylor_features(fw.k_blocks, grad_degree) * valid_blocks[..., None]

    # Far part, queries: T over keys, gathered per query block.
    t_keys = _far_of_query_block(_kron_state(psi_k, w_full, fw.k_blocks), cfg, m)
    r, cdim, d = t_keys.shape[-3:]
    proj = jnp.einsum("gbqr,gbrx->gbqx", psi_q, t_keys.reshape(t_keys.shape[:-3] + (r, cdim * d)))
    dq = jnp.einsum("gbqc,gbqcd->gbqd", a_full, proj.reshape(proj.shape[:-1] + (cdim, d)))

    # Far part, keys and values: states over queries, gathered per key block.
    t_queries = _far_of_key_block(_kron_state(psi_q, a_full, fw.q_blocks), cfg, m)
    proj_k = jnp.einsum("gbkr,gbrx->gbkx", psi_k, t_queries.reshape(t_queries.shape[:-3] + (r, cdim * d)))
    dk = jnp.einsum("gbkc,gbkcd->gbkd", w_full, proj_k.reshape(proj_k.shape[:-1] + (cdim, d)))
    u_queries = _far_of_key_block(jnp.einsum("gbqr,gbqd->gbrd", fw.fq_scaled, a_v), cfg, m)
    dv = jnp.einsum("gbkr,gbrd->gbkd", fw.fk, u_queries)

    if offsets:
        p_band = fw.band_kernel / safe_den[..., None]  # P̃ on the band
        if grad_degree == cfg.degree:
            w_band = p_band
        else:  # exact pairs keep exp (their part of band_kernel); polynomial pairs use e_{g-1}
            deriv = jnp.where(fw.band_approx, taylor_exp(jnp.where(fw.band_approx, fw.band_logits, 0.0), grad_degree)
                              * jnp.exp(-fw.row_shift)[..., None], 0.0)
            w_band = jnp.where(fw.band_approx, deriv, fw.band_kernel) / safe_den[..., None]
        d_logits = w_band * (jnp.einsum("gbqd,gbkd->gbqk", d_out, fw.band_v) - delta[..., None])
        dq = dq + jnp.einsum("gbqk,gbkd->gbqd", d_logits, fw.band_k)
        dk_band = jnp.einsum("gbqk,gbqd->gbkd", d_logits, fw.q_blocks)
        dv_band = jnp.einsum("gbqk,gbqd->gbkd", p_band, d_out)
        for idx, o in enumerate(offsets):  # band slot o of query block b is key block b − o
            dk = dk + _shift(dk_band[:, :, idx * c:(idx + 1) * c], -o)
            dv = dv + _shift(dv_band[:, :, idx * c:(idx + 1) * c], -o)

    return _unblock(dq, nq), _unblock(dk, nk), _unblock(dv, nk), jnp.zeros_like(valid)


def _kronecker_bwd_global_streamed(qs, ks, v, valid, cot, degree: int, grad_degree: int, chunk: int):
    """`_kronecker_bwd` for the unblocked global path, as three passes over row chunks (keys, queries, keys):
    every state is a sum over rows, so no n-sized feature array is ever materialised (see
    `_lowrank_global`)."""
    g_dim, nq, nk, dv = qs.shape[0], qs.shape[1], ks.shape[1], v.shape[-1]
    d = qs.shape[-1]
    rank, rank_grad = feature_rank(d, degree), feature_rank(d, grad_degree)
    k_chunks, v_chunks, valid_chunks = _chunks(ks, chunk), _chunks(v, chunk), _chunks(valid, chunk)
    q_chunks, cot_chunks = _chunks(qs, chunk), _chunks(cot.astype(jnp.float32), chunk)

    def with_one(x):
        return jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)

    def keys_forward(carry, xs):
        state_v, state_1, t_keys = carry
        k_c, v_c, valid_c = xs
        fk = taylor_features(k_c, degree) * valid_c[..., None]
        psi_k = fk if grad_degree == degree else taylor_features(k_c, grad_degree) * valid_c[..., None]
        return (state_v + jnp.einsum("gkr,gkd->grd", fk, v_c), state_1 + jnp.sum(fk, axis=1),
                t_keys + _kron_state(psi_k, with_one(v_c), k_c)), None

    zeros = (jnp.zeros((g_dim, rank, dv)), jnp.zeros((g_dim, rank)), jnp.zeros((g_dim, rank_grad, dv + 1, d)))
    (state_v, state_1, t_keys), _ = jax.lax.scan(keys_forward, zeros, (k_chunks, v_chunks, valid_chunks))
    t_keys_flat = t_keys.reshape(g_dim, rank_grad, (dv + 1) * d)

    def queries(carry, xs):
        t_queries, u_queries = carry
        q_c, d_out = xs
        fq = taylor_features(q_c, degree)
        psi_q = fq if grad_degree == degree else taylor_features(q_c, grad_degree)
        den = jnp.einsum("gqr,gr->gq", fq, state_1)
        safe_den = jnp.where(den > 0, den, 1.0)
        out = jnp.einsum("gqr,grd->gqd", fq, state_v) / safe_den[..., None]
        a_v = d_out / safe_den[..., None]
        a_full = jnp.concatenate([a_v, (-jnp.sum(d_out * out, axis=-1) / safe_den)[..., None]], axis=-1)
        proj = jnp.einsum("gqr,grx->gqx", psi_q, t_keys_flat).reshape(q_c.shape[:2] + (dv + 1, d))
        dq_c = jnp.einsum("gqc,gqcd->gqd", a_full, proj)
        return (t_queries + _kron_state(psi_q, a_full, q_c),
                u_queries + jnp.einsum("gqr,gqd->grd", fq, a_v)), dq_c

    zeros = (jnp.zeros((g_dim, rank_grad, dv + 1, d)), jnp.zeros((g_dim, rank, dv)))
    (t_queries, u_queries), dq = jax.lax.scan(queries, zeros, (q_chunks, cot_chunks))
    t_queries_flat = t_queries.reshape(g_dim, rank_grad, (dv + 1) * d)

    def keys_backward(_, xs):
        k_c, v_c, valid_c = xs
        fk = taylor_features(k_c, degree) * valid_c[..., None]
        psi_k = fk if grad_degree == degree else taylor_features(k_c, grad_degree) * valid_c[..., None]
        proj_k = jnp.einsum("gkr,grx->gkx", psi_k, t_queries_flat).reshape(k_c.shape[:2] + (dv + 1, d))
        return None, (jnp.einsum("gkc,gkcd->gkd", with_one(v_c), proj_k), jnp.einsum("gkr,grd->gkd", fk, u_queries))

    _, (dk, dvv) = jax.lax.scan(keys_backward, None, (k_chunks, v_chunks, valid_chunks))
    return _unchunk(dq, nq), _unchunk(dk, nk), _unchunk(dvv, nk), jnp.zeros_like(valid)


def _make_core(forward, grad_degree_offset: int):
    """custom_vjp (qs, ks, v, valid) -> out with `forward` and the Kronecker backward at degree g + offset."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def core(qs, ks, v, valid, cfg: _Config):
        return forward(qs, ks, v, valid, cfg)

    def core_fwd(qs, ks, v, valid, cfg):
        return forward(qs, ks, v, valid, cfg), (qs, ks, v, valid)

    def core_bwd(cfg, residuals, cot):
        qs, ks, v, valid = residuals
        grad_degree = cfg.degree + grad_degree_offset
        if not cfg.blocked:
            d = qs.shape[-1]
            widest = max(feature_rank(d, cfg.degree), (v.shape[-1] + 1) * d)
            # The Kronecker contractions are matmul-bound: larger chunks than the forward's keep them efficient.
            chunk = cfg.stream_chunk or max(1024, _stream_chunk(widest))
            if max(qs.shape[1], ks.shape[1]) > chunk:
                return _kronecker_bwd_global_streamed(qs, ks, v, valid, cot, cfg.degree, grad_degree, chunk)
        return _kronecker_bwd(cfg, qs, ks, v, valid, cot, grad_degree)

    core.defvjp(core_fwd, core_bwd)
    return core


# lowrank and exact_fwd's backward: the exact gradient of the low-rank model, by one of two equal routes (both
# tested against autodiff of the dense polynomial model). Autodiff through the features is cheapest when the
# feature map's VJP is a short unrolled chain (degree 2); beyond that the VJP gathers r_{g-1}·d elements per row
# and the Kronecker backward at degree g−1 (more flops, but matmuls) is several times faster on CPU.
_lowrank_kron_core = _make_core(_lowrank, -1)
_exact_fwd_kron_core = _make_core(_exact, -1)
# paper: low-rank forward, the paper's gradient formula.
_paper_core = _make_core(_lowrank, 0)


def _autodiff_is_cheaper(cfg: _Config, head_dim: int) -> bool:
    return cfg.degree == 2 and head_dim <= 64


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _exact_fwd_autodiff_core(qs, ks, v, valid, cfg: _Config):
    return _exact(qs, ks, v, valid, cfg)


def _exact_fwd_autodiff_fwd(qs, ks, v, valid, cfg):
    return _exact(qs, ks, v, valid, cfg), (qs, ks, v, valid)


def _exact_fwd_autodiff_bwd(cfg, residuals, cot):
    qs, ks, v, valid = residuals
    _, pullback = jax.vjp(lambda a, b, c: _lowrank(a, b, c, valid, cfg), qs, ks, v)
    return pullback(cot) + (jnp.zeros_like(valid),)


_exact_fwd_autodiff_core.defvjp(_exact_fwd_autodiff_fwd, _exact_fwd_autodiff_bwd)


# ----------------------------------------------------------------------------------------------- public entry


def _key_valid(mask: Optional[jax.Array], batch: int, k_len: int) -> jax.Array:
    if mask is None:
        return jnp.ones((batch, k_len), jnp.float32)
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"approx_attention: mask must be boolean, got dtype {mask.dtype}")
    shape = (1,) * (4 - mask.ndim) + mask.shape if mask.ndim <= 4 else None
    if shape is None or shape[1] != 1 or shape[2] != 1 or shape[0] not in (1, batch) or shape[3] not in (1, k_len):
        raise ValueError(
            f"approx_attention: mask of shape {mask.shape} is not a key-padding mask broadcastable to "
            f"[batch={batch}, 1, 1, k_len={k_len}]; use causal=True / window=w for structured masks")
    return jnp.broadcast_to(mask.reshape(shape[0], shape[3]), (batch, k_len)).astype(jnp.float32)


def approx_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    scale: Optional[float] = None,
    approx_mode: str = "lowrank",
    degree: int = 2,
    causal: bool = False,
    window: Optional[int] = None,
    block_size: Optional[int] = None,
) -> jax.Array:
    """Softmax attention with the polynomial low-rank kernel (see module docstring for the modes).

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim], heads % kv_heads == 0.
      mask: None or a boolean key-padding mask broadcastable to [batch, 1, 1, k_len] (True = may attend).
      bias: must be None (an additive bias breaks the low-rank structure).
      scale: logit scale, default 1/sqrt(head_dim). The premise of the method is |scale·q·k| <= B (small).
      approx_mode: 'lowrank' | 'exact_fwd' | 'paper'.
      degree: even Taylor degree g >= 2; feature rank C(head_dim + g, g).
      causal: causal masking (q_len must equal k_len).
      window: hybrid: exact attention for keys within `window` positions (j in (i−window, i] if causal, else
        |i−j| < window), low-rank beyond. None: all low-rank (causal: exact inside diagonal blocks).
      block_size: causal/hybrid: block length of the prefix sums (default 128). Global (non-causal, no
        window): rows per streamed chunk (default: about 2 MB of features per chunk, 256..4096 rows).

    Returns:
      [batch, q_len, heads, head_dim] in q's dtype; computed in float32. Rows without allowed keys give zeros.
    """
    chex.assert_rank([q, k, v], 4)
    check_floating_qkv("approx_attention", q, k, v)
    if approx_mode not in APPROX_MODES:
        raise ValueError(f"approx_attention: approx_mode must be one of {APPROX_MODES}, got {approx_mode!r}")
    if not isinstance(degree, (int, np.integer)) or isinstance(degree, bool) or degree < 2 or degree % 2:
        raise ValueError(
            f"approx_attention: degree must be an even int >= 2, got {degree!r} (odd Taylor degrees have a "
            "real root, so attention weights go negative and row sums can reach zero)")
    if bias is not None:
        raise ValueError("approx_attention: bias is not supported by the low-rank kernel, got a bias array")
    if window is not None and (not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 1):
        raise ValueError(f"approx_attention: window must be None or an int >= 1, got {window!r}")
    if block_size is not None and (not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool)
                                   or block_size < 1):
        raise ValueError(f"approx_attention: block_size must be None or an int >= 1, got {block_size!r}")
    batch, q_len, heads, head_dim = q.shape
    _, k_len, kv_heads, _ = k.shape
    if k.shape != v.shape[:3] + (head_dim,) or k.shape[0] != batch or heads % kv_heads:
        raise ValueError(
            f"approx_attention: incompatible shapes q={q.shape}, k={k.shape}, v={v.shape}; expected "
            "[batch, seq, heads, head_dim] with equal batch and head_dim and heads % kv_heads == 0")
    if (causal or window is not None) and q_len != k_len:
        raise ValueError(
            f"approx_attention: causal/window need q_len == k_len, got q_len={q_len}, k_len={k_len}")
    valid = _key_valid(mask, batch, k_len)
    if has_zero_length(q, k):
        return zero_length_output(q)  # block sizes would clip to 0; k_len == 0: every row is fully masked

    scale = head_dim ** -0.5 if scale is None else float(scale)
    root = math.sqrt(scale) if scale >= 0 else None
    if root is None:
        raise ValueError(f"approx_attention: scale must be >= 0, got {scale}")
    if kv_heads != heads:
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)

    def heads_major(x):  # [batch, seq, heads, dim] -> [heads, batch, seq, dim]; batch becomes the engine's G
        return jnp.transpose(x.astype(jnp.float32), (2, 0, 1, 3))

    qs, ks, vf = heads_major(q) * root, heads_major(k) * root, heads_major(v)
    blocked = causal or window is not None
    cfg = _Config(int(degree), bool(causal), None if window is None else int(window),
                  int(min(block_size or 128, q_len)) if blocked else k_len, blocked, mask is not None,
                  None if blocked or block_size is None else int(block_size))
    autodiff = _autodiff_is_cheaper(cfg, head_dim)
    if approx_mode == "lowrank":
        core = _lowrank if autodiff else _lowrank_kron_core
    elif approx_mode == "exact_fwd":
        core = _exact_fwd_autodiff_core if autodiff else _exact_fwd_kron_core
    else:
        core = _paper_core
    # vmap over heads instead of folding heads into the batch: a reshape merging a batch axis sharded over
    # 'data' with a heads axis sharded over 'model' would make XLA gather the heads back.
    out = jax.vmap(lambda a, b, c: core(a, b, c, valid, cfg))(qs, ks, vf)  # [heads, batch, q_len, dv]
    out = jnp.transpose(out, (1, 2, 0, 3))
    return out.astype(q.dtype)


def approx_rank(head_dim: int, degree: int, approx_mode: str = "lowrank") -> int:
    """Rank of the factorisation a mode works with: r = C(d+g, g), or r(d+1) for the paper's gradient."""
    r = feature_rank(head_dim, degree)
    return r * (head_dim + 1) if approx_mode == "paper" else r
