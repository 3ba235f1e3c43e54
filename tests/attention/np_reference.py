"""Independent references for attention tests: dense masks written out in plain numpy (loops or
broadcast formulas, no maskjax code) and a dense jnp softmax attention differentiated by jax.grad."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def grid_coords(height, width, num_prefix=0, tile=None):
    """Per-position (row, col), -1 for prefix tokens, enumerated by explicit loops."""
    rows, cols = [-1] * num_prefix, [-1] * num_prefix
    if tile is None:
        for r in range(height):
            for c in range(width):
                rows.append(r)
                cols.append(c)
    else:
        th, tw = tile
        for tr in range(height // th):
            for tc in range(width // tw):
                for r in range(tr * th, (tr + 1) * th):
                    for c in range(tc * tw, (tc + 1) * tw):
                        rows.append(r)
                        cols.append(c)
    return np.array(rows), np.array(cols)


def np_causal(q_len, k_len, offset=0):
    i, j = np.arange(q_len)[:, None], np.arange(k_len)[None]
    return j <= i + offset


def np_prefix_lm(n, prefix):
    i, j = np.arange(n)[:, None], np.arange(n)[None]
    return (j < prefix) | (j <= i)


def np_local(q_len, k_len, left, right):
    i, j = np.arange(q_len)[:, None], np.arange(k_len)[None]
    out = np.ones((q_len, k_len), bool)
    if left is not None:
        out &= j >= i - left
    if right is not None:
        out &= j <= i + right
    return out


def np_prefix_combine(r, grid_part, prefix_sees_grid, grid_sees_prefix):
    pre = r < 0
    n = len(r)
    out = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            if pre[i] and pre[j]:
                out[i, j] = True
            elif pre[i]:
                out[i, j] = prefix_sees_grid
            elif pre[j]:
                out[i, j] = grid_sees_prefix
            else:
                out[i, j] = grid_part[i, j]
    return out


def np_window_2d(height, width, num_prefix=0, tile=None, mode="neighborhood", radius=(1, 1),
                 dilation=(1, 1), window=(7, 7), shift=(0, 0), prefix_sees_grid=True, grid_sees_prefix=True):
    r, c = grid_coords(height, width, num_prefix, tile)
    dr, dc = r[:, None] - r[None], c[:, None] - c[None]
    if mode == "neighborhood":
        part = ((np.abs(dr) <= radius[0] * dilation[0]) & (dr % dilation[0] == 0)
                & (np.abs(dc) <= radius[1] * dilation[1]) & (dc % dilation[1] == 0))
    else:
        wr, wc = (r + shift[0]) // window[0], (c + shift[1]) // window[1]
        part = (wr[:, None] == wr[None]) & (wc[:, None] == wc[None])
    return np_prefix_combine(r, part, prefix_sees_grid, grid_sees_prefix)


def np_directional(height, width, directions, fov, num_prefix=0, max_distance=None):
    """[heads, n, n]: key inside the view cone (angle via atan2) or the query itself."""
    r, c = grid_coords(height, width, num_prefix)
    out = []
    for d in directions:
        n = len(r)
        m = np.zeros((n, n), bool)
        for i in range(n):
            for j in range(n):
                dx, dy = c[j] - c[i], r[i] - r[j]
                if dx == 0 and dy == 0:
                    ok = True
                else:
                    ang = math.degrees(math.atan2(dy, dx))
                    diff = abs((ang - d + 180) % 360 - 180)
                    ok = diff <= fov / 2 + 1e-3
                    if max_distance is not None:
                        ok = ok and (dx * dx + dy * dy) <= max_distance ** 2
                m[i, j] = ok
        out.append(np_prefix_combine(r, m, True, True))
    return np.stack(out)


def np_segments(q_seg, k_seg):
    """[batch, q, k]"""
    return (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] >= 0) & (k_seg[:, None, :] >= 0)


def np_routing(q_groups, k_groups, allowed):
    b, nq = q_groups.shape
    nk = k_groups.shape[1]
    out = np.zeros((b, nq, nk), bool)
    for x in range(b):
        for i in range(nq):
            for j in range(nk):
                out[x, i, j] = allowed[q_groups[x, i], k_groups[x, j]]
    return out


def np_lengths(q_len, k_len, q_lengths=None, kv_lengths=None):
    batch = len(q_lengths if q_lengths is not None else kv_lengths)
    out = np.ones((batch, q_len, k_len), bool)
    for b in range(batch):
        if q_lengths is not None:
            out[b, q_lengths[b]:, :] = False
        if kv_lengths is not None:
            out[b, :, kv_lengths[b]:] = False
    return out


def np_block_kinds(dense, bq, bk):
    """[..., nq, nk] int: 0 empty, 1 partial, 2 full, by explicit loops over blocks."""
    *lead, q_len, k_len = dense.shape
    nq, nk = -(-q_len // bq), -(-k_len // bk)
    flat = dense.reshape(-1, q_len, k_len)
    out = np.zeros((flat.shape[0], nq, nk), int)
    for x in range(flat.shape[0]):
        for i in range(nq):
            for j in range(nk):
                tile = flat[x, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                padded_cols = (j + 1) * bk > k_len
                if not tile.any():
                    out[x, i, j] = 0
                elif tile.all() and not padded_cols:
                    out[x, i, j] = 2
                else:
                    out[x, i, j] = 1
    return out.reshape(*lead, nq, nk)


def dense_attention(q, k, v, mask=None, bias=None, scale=None, score_fn=None):
    """Plain jnp masked softmax attention (float32) for reference values and jax.grad.

    q [B, Q, H, D], k/v [B, K, Hkv, D]; mask bool broadcastable to [B, H, Q, K]; score_fn(s [B,H,Q,K])
    applied after the bias. Rows with nothing allowed -> 0.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    k = jnp.repeat(k, heads // kv_heads, axis=2)
    v = jnp.repeat(v, heads // kv_heads, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if bias is not None:
        s = s + bias
    if score_fn is not None:
        s = score_fn(s)
    if mask is None:
        p = jax.nn.softmax(s, axis=-1)
    else:
        mask = jnp.broadcast_to(jnp.asarray(mask), s.shape)
        s_m = jnp.where(mask, s, -1e30)
        s_m = s_m - jax.lax.stop_gradient(jnp.max(s_m, axis=-1, keepdims=True))
        e = jnp.where(mask, jnp.exp(s_m), 0.0)
        den = e.sum(-1, keepdims=True)
        p = e / jnp.where(den > 0, den, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
