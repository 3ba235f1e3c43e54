"""backend='auto' on accelerators: the choice (splash on TPU, cuDNN on GPU, blocked otherwise), the splash path's
lowering for TPU, its parity with maskjax's own TPU kernel in interpret mode, and zeros with zero gradients on rows
with no allowed key (splash and the cuDNN call leave those rows undefined; maskjax fixes them).

Interpret mode and `jax.export(..., platforms=['tpu'])` prove the math and the lowering, not a run on a TPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.attention import api, attention, cudnn, splash
from maskjax.attention import masks as M
from maskjax.attention import pallas_tpu
from maskjax.attention import score_mods as S
from tests.attention.pallas_testing import causal_dense, dense_attention, local_dense, segments_dense

SDS = jax.ShapeDtypeStruct
F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def _qkv(batch=2, q_len=256, k_len=None, heads=4, kv_heads=None, dim=128, dtype=F32):
    k_len = q_len if k_len is None else k_len
    kv_heads = heads if kv_heads is None else kv_heads
    return (SDS((batch, q_len, heads, dim), dtype), SDS((batch, k_len, kv_heads, dim), dtype),
            SDS((batch, k_len, kv_heads, dim), dtype))


SEG = np.repeat([0, 1], [100, 156])[None].repeat(2, 0)
DENSE = np.random.default_rng(0).random((1, 4, 256, 256)) < 0.5

# (platform, case id, qkv kwargs, mask, extra kwargs of choose_backend, expected backend)
CHOICES = [
    ("tpu", "no mask", {}, None, {}, "splash"),
    ("tpu", "causal bf16", dict(dtype=BF16), M.causal(), {}, "splash"),
    ("tpu", "local window", {}, M.local_1d(left=64, right=0), {}, "splash"),
    ("tpu", "causal & local", {}, M.causal() & M.local_1d(left=64), {}, "splash"),
    ("tpu", "static dense", {}, M.dense(DENSE), {}, "splash"),
    ("tpu", "segment ids & causal", {}, M.segment_ids(SEG) & M.causal(), {}, "splash"),
    ("tpu", "lengths", {}, M.lengths(np.array([10, 256]), np.array([256, 3])), {}, "splash"),
    ("tpu", "window_2d (static, per head: no)", {}, M.window_2d(M.TokenGrid(16, 16), radius=(2, 2)), {}, "splash"),
    ("tpu", "per_head", {}, M.per_head([M.causal(), M.full()] * 2), {}, "splash"),
    ("tpu", "GQA 4/2, head_dim 64", dict(kv_heads=2, dim=64), M.causal(), {}, "splash"),
    ("tpu", "block 256", dict(q_len=512), M.causal(), dict(block_q=256, block_k=256), "splash"),
    ("tpu", "bias", {}, None, dict(bias=np.zeros((1, 1, 256, 256), np.float32)), "blocked"),
    ("tpu", "score_mod", {}, M.causal(), dict(score_mod=S.soft_cap(30.0)), "blocked"),
    ("tpu", "query masks", {}, M.query_masks(np.ones((2, 256, 256), bool)), {}, "blocked"),
    ("tpu", "dense varying by batch", {}, M.dense(np.ones((2, 1, 256, 256), bool)), {}, "blocked"),
    ("tpu", "length not a multiple of 128", dict(q_len=200), M.causal(), {}, "blocked"),
    ("tpu", "float16", dict(dtype=F16), None, {}, "blocked"),
    ("tpu", "block 64", {}, M.causal(), dict(block_q=64, block_k=64), "blocked"),
    ("tpu", "k_len 0", dict(k_len=0), None, {}, "blocked"),
    ("tpu", "segment ids without padding & lengths", {},
     M.segment_ids(SEG, negative_is_padding=False) & M.lengths(kv_lengths=np.array([3, 4])), {}, "blocked"),
    ("gpu", "no mask bf16", dict(dtype=BF16), None, {}, "cudnn"),
    ("gpu", "causal f16", dict(dtype=F16), M.causal(), {}, "cudnn"),
    ("gpu", "causal left window", dict(dtype=BF16), M.causal() & M.local_1d(left=32), {}, "cudnn"),
    ("gpu", "left window right 0", dict(dtype=BF16), M.local_1d(left=32, right=0), {}, "cudnn"),
    ("gpu", "lengths & causal, GQA", dict(dtype=BF16, kv_heads=1),
     M.lengths(np.array([5, 256]), np.array([256, 7])) & M.causal(), {}, "cudnn"),
    ("gpu", "float32", {}, None, {}, "blocked"),
    ("gpu", "head_dim 256", dict(dtype=BF16, dim=256), None, {}, "blocked"),
    ("gpu", "head_dim 20", dict(dtype=BF16, dim=20), None, {}, "blocked"),
    ("gpu", "causal q_len != k_len", dict(dtype=BF16, k_len=384), M.causal(), {}, "blocked"),
    ("gpu", "causal offset", dict(dtype=BF16), M.causal(offset=3), {}, "blocked"),
    ("gpu", "two-sided window", dict(dtype=BF16), M.local_1d(left=8, right=8), {}, "blocked"),
    ("gpu", "segment ids", dict(dtype=BF16), M.segment_ids(SEG), {}, "blocked"),
    ("gpu", "dense", dict(dtype=BF16), M.dense(DENSE), {}, "blocked"),
    ("gpu", "bias", dict(dtype=BF16), None, dict(bias=np.zeros((1, 1, 256, 256), np.float32)), "blocked"),
    ("cpu", "no mask, large", dict(q_len=1024), None, {}, "reference"),
    ("cpu", "causal, small", dict(q_len=128), M.causal(), {}, "reference"),
    ("cpu", "causal, large", dict(q_len=512), M.causal(), {}, "blocked"),
]


@pytest.mark.parametrize("platform,case,shapes,mask,extra,expected", CHOICES, ids=[f"{c[0]}-{c[1]}" for c in CHOICES])
def test_choice(platform, case, shapes, mask, extra, expected):
    q, k, v = _qkv(**shapes)
    backend, why = api.auto_backend_reason(platform, q, k, v, mask, **extra)
    assert backend == expected, (case, why)
    assert api.choose_backend(platform, q, k, v, mask, **extra) == expected
    assert why


def test_choice_with_traced_masks():
    """Traced segment ids / lengths still go to splash (they are splash SegmentIds); a traced dense mask does not."""
    q, k, v = _qkv()
    got = {}

    def f(seg, lens, keep):
        got["segments"] = api.choose_backend("tpu", q, k, v, M.segment_ids(seg) & M.causal())
        got["lengths"] = api.choose_backend("tpu", q, k, v, M.lengths(kv_lengths=lens))
        got["dense"] = api.choose_backend("tpu", q, k, v, M.dense(keep))
        got["cudnn lengths"] = api.choose_backend("gpu", *_qkv(dtype=BF16), M.lengths(kv_lengths=lens))
        return seg

    jax.make_jaxpr(f)(SEG, np.array([3, 4], np.int32), np.ones((2, 1, 256, 256), bool))
    assert got == {"segments": "splash", "lengths": "splash", "dense": "blocked", "cudnn lengths": "cudnn"}


def _inputs(batch, q_len, heads, kv_heads, dim, dtype=F32, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, q_len, heads, dim), (batch, q_len, kv_heads, dim), (batch, q_len, kv_heads, dim)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def test_attention_auto_dispatches_by_platform(monkeypatch):
    """attention(backend='auto') asks the platform and runs what choose_backend names (spied, run on CPU)."""
    calls = []
    real_splash, real_cudnn = splash.splash_attention, cudnn.cudnn_attention
    monkeypatch.setattr(splash, "splash_attention", lambda *a, **kw: calls.append("splash") or real_splash(*a, **kw))
    monkeypatch.setattr(cudnn, "cudnn_attention",
                        lambda *a, **kw: calls.append("cudnn") or real_cudnn(*a, **kw, implementation="xla"))
    q, k, v = _inputs(1, 128, 2, 1, 128, seed=1)
    want = dense_attention(q, k, v, causal_dense(128, 128)[None, None])
    monkeypatch.setattr(api, "_platform", lambda: "tpu")
    np.testing.assert_allclose(attention(q, k, v, mask=M.causal(), interpret=True), want, atol=2e-5)
    monkeypatch.setattr(api, "_platform", lambda: "gpu")
    qb, kb, vb = (x.astype(BF16) for x in (q, k, v))
    np.testing.assert_allclose(attention(qb, kb, vb, mask=M.causal()).astype(F32), want, atol=3e-2)
    monkeypatch.setattr(api, "_platform", lambda: "cpu")
    attention(q, k, v, mask=M.causal())
    assert calls == ["splash", "cudnn"]


# ---------------------------------------------------------------- lowering for TPU (no hardware)

@pytest.mark.parametrize("name", ["causal", "local", "segment_ids"])
def test_splash_path_lowers_for_tpu(name, monkeypatch):
    monkeypatch.setattr(api, "_platform", lambda: "tpu")
    batch, n, heads, dim = 2, 256, 2, 128
    shapes = [SDS((batch, n, heads, dim), BF16)] * 3 + [SDS((batch, n), jnp.int32)]

    def f(q, k, v, seg):
        mask = {"causal": M.causal(), "local": M.local_1d(left=100, right=0),
                "segment_ids": M.segment_ids(seg) & M.causal()}[name]
        assert api.choose_backend("tpu", q, k, v, mask) == "splash"
        return attention(q, k, v, mask=mask)

    def loss(q, k, v, seg):
        return jnp.sum(f(q, k, v, seg).astype(F32) ** 2)

    fwd = jax.export.export(jax.jit(f), platforms=["tpu"])(*shapes).mlir_module()
    bwd = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(*shapes).mlir_module()
    assert fwd.count("tpu_custom_call") == 1          # the splash forward kernel
    assert bwd.count("tpu_custom_call") == 3          # forward, dq and dkv kernels
    assert "splash" in fwd and "splash" in bwd


# ---------------------------------------------------------------- interpret-mode parity with maskjax's kernel

def _parity_case(name, n):
    if name == "causal":
        return M.causal(), causal_dense(n, n)[None, None]
    if name == "local":
        return M.local_1d(left=100, right=0), local_dense(n, n, 100, 0)[None, None]
    if name == "dense":
        rng = np.random.default_rng(3)
        coarse = rng.random((1, 2, n // 32, n // 32)) < np.array([0.2, 0.6])[None, :, None, None]
        dense = np.repeat(np.repeat(coarse, 32, 2), 32, 3) & (rng.random((1, 2, n, n)) < 0.7)
        dense[:, :, np.arange(n), np.arange(n)] = True      # every row non-empty
        dense[:, 0, :128, 128:] = False                     # an empty block (head 0)
        dense[:, 1, 128:, :128] = True                      # a full block (head 1)
        return M.dense(dense), dense
    seg = np.repeat([0, 1, 2], [128, 60, n - 188])[None]   # blocks (0, 1) and (1, 0) empty
    return M.segment_ids(seg), segments_dense(seg, seg)


@pytest.mark.parametrize("name", ["causal", "local", "dense", "segment_ids"])
def test_splash_matches_maskjax_tpu_kernel(name):
    n, heads, dim = 256, 2, 128
    mask, allowed = _parity_case(name, n)
    q, k, v = _inputs(1, n, heads, 1, dim, seed=4)
    w = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), F32)

    def run(backend):
        f = lambda q, k, v: attention(q, k, v, mask=mask, backend=backend, block_q=128, block_k=128, interpret=True)
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        return (out,) + vjp(w)

    ours, theirs = run("pallas"), run("splash")
    for a, b, what in zip(ours, theirs, ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=what)
    want = dense_attention(q, k, v, allowed)
    np.testing.assert_allclose(np.asarray(theirs[0]), np.asarray(want), atol=1e-5, rtol=1e-5)

    counted = pallas_tpu.block_counts_tpu(q, k, v, mask, block_q=128, block_k=128, interpret=True)
    splash_blocks = splash.nonempty_block_counts(q.shape, k.shape, mask, block_q=128, block_k=128)
    for kernel in ("fwd", "dkv"):
        assert counted[kernel] <= splash_blocks[kernel], (kernel, counted, splash_blocks)
    if name != "segment_ids":
        assert counted["fwd"] == splash_blocks["fwd"] < heads * (n // 128) ** 2   # same skipping, and some
    else:   # splash skips blocks by its static (here full) mask only, maskjax by the segment ids as well
        assert counted["fwd"] < splash_blocks["fwd"] == heads * (n // 128) ** 2


# ---------------------------------------------------------------- rows with no allowed key

def _rows_case(batch, n):
    """Mask with empty rows of every kind: padded segment ids, a q length, kv length 0 (every row of example 1),
    a dense row of False and a whole query block of False (splash visits no block there)."""
    q_seg = np.repeat([0, 1, 2], [90, 38, n - 128])[None].repeat(batch, 0)
    kv_seg = q_seg.copy()
    q_seg[:, 10:20] = -1
    keep = np.ones((1, 1, n, n), bool)
    keep[..., 40, :] = False
    keep[..., 128:, :] = False
    mask = M.segment_ids(q_seg, kv_seg) & M.lengths(np.array([100, n]), np.array([n, 0])) & M.dense(keep)
    allowed = segments_dense(np.where(q_seg < 0, -9, q_seg), kv_seg) & keep
    allowed = allowed & (np.arange(n)[None, None, :, None] < np.array([100, n])[:, None, None, None])
    allowed = allowed & (np.arange(n)[None, None, None, :] < np.array([n, 0])[:, None, None, None])
    return mask, allowed


def test_splash_rows_without_keys_give_zeros_and_zero_gradients():
    batch, n, heads, dim = 2, 256, 2, 64
    mask, allowed = _rows_case(batch, n)
    empty = ~np.broadcast_to(allowed, (batch, heads, n, n)).any(-1)      # [batch, heads, q]
    assert empty[0, 0, 100:].all() and empty[1].all() and empty[0, 0, 40] and empty[0, 0, 15]
    assert not empty[0, 0, :10].any()
    q, k, v = _inputs(batch, n, heads, 1, dim, seed=6)
    w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), F32)
    f = jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, backend="splash", interpret=True))
    out, vjp = jax.vjp(f, q, k, v)
    dq, dk, dv = vjp(w)
    rows = np.transpose(empty, (0, 2, 1))                                # [batch, q, heads]
    assert np.all(np.asarray(out)[rows] == 0) and np.all(np.asarray(dq)[rows] == 0)
    assert np.all(np.asarray(dk)[1] == 0) and np.all(np.asarray(dv)[1] == 0)   # example 1: no row sees a key
    want, want_vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, allowed), q, k, v)
    for a, b, what in zip((out, dq, dk, dv), (want,) + want_vjp(w), ("out", "dq", "dk", "dv")):
        assert np.all(np.isfinite(np.asarray(a))), what
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5, err_msg=what)


def test_lazily_evaluated_static_mask_on_splash():
    """A static mask with no splash class (per-head 2-D windows) is evaluated block by block from maskjax's
    block map; the result equals the dense reference."""
    grid = M.TokenGrid(16, 16, tile=(4, 4))
    mask = M.per_head([M.window_2d(grid, radius=(1, 1)), M.window_2d(grid, mode="partition", window=(8, 8))])
    allowed = mask.materialize(256, 256, heads=2)
    q, k, v = _inputs(1, 256, 2, 2, 128, seed=8)
    out = jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, backend="splash", interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense_attention(q, k, v, allowed)), atol=1e-5)


def test_cudnn_call_zeroes_rows_without_keys():
    """The cuDNN wrapper (run through jax.nn.dot_product_attention's XLA path, which returns mean(V) on such rows)
    gives zeros and zero gradients on rows with no key: padded queries, kv length 0, a window past the last key."""
    batch, n, heads, dim = 2, 40, 4, 16
    mask = M.lengths(np.array([30, 40]), np.array([4, 0])) & M.causal() & M.local_1d(left=2)
    d = np.arange(n)[None, :] - np.arange(n)[:, None]
    allowed = ((d <= 0) & (d >= -2))[None, None] & (np.arange(n)[None, None, :, None] < np.array([30, 40])[:, None,
                                                                                                   None, None])
    allowed = allowed & (np.arange(n)[None, None, None, :] < np.array([4, 0])[:, None, None, None])
    q, k, v = _inputs(batch, n, heads, 2, dim, seed=9)
    w = jnp.asarray(np.random.default_rng(10).standard_normal(q.shape), F32)
    out, vjp = jax.vjp(lambda q, k, v: cudnn.cudnn_attention(q, k, v, mask, implementation="xla"), q, k, v)
    want, want_vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, allowed), q, k, v)
    empty = ~allowed.any(-1)[:, 0]                                        # [batch, q]
    assert empty[0, 6:].all() and empty[1].all()
    assert np.all(np.asarray(out)[empty] == 0)
    for a, b, what in zip((out,) + vjp(w), (want,) + want_vjp(w), ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=what)
