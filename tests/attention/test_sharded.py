"""splash and cuDNN under a device mesh: the kernel runs inside jax.shard_map (XLA cannot partition it), batch split
over ('data', 'fsdp'), heads over 'model' when it divides heads and kv_heads; 'blocked' when the batch does not divide.

The 8 CPU devices come from tests/conftest.py. splash runs in interpret mode and the cuDNN wrapper through
jax.nn.dot_product_attention's XLA path: the sharding, the math and the gradients are checked here, the kernels
themselves on hardware are not; `jax.export(..., platforms=['tpu'])` shows the splash call lowers per shard.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from maskjax.attention import api, attention, cudnn, sharded, splash
from maskjax.attention import masks as M

SDS = jax.ShapeDtypeStruct
F32, BF16 = jnp.float32, jnp.bfloat16
AXES = ("data", "fsdp", "model")
BATCH = ("data", "fsdp")


def _mesh(axis_types=AxisType.Auto):
    return jax.make_mesh((2, 2, 2), AXES, axis_types=(axis_types,) * 3)


def _inputs(batch, n, heads, kv_heads, dim, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, n, heads, dim), (batch, n, kv_heads, dim), (batch, n, kv_heads, dim)]
    return [jnp.asarray(rng.standard_normal(s), F32) for s in shapes]


def _value_and_grads(run, q, k, v, *extra):
    """(out, dq, dk, dv) of sum(out * cos(out)) under jit."""
    def loss(q, k, v, *extra):
        out = run(q, k, v, *extra)
        return jnp.sum(out * jnp.cos(out)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, *extra)
    return (out,) + grads


def _assert_close(got, want, atol=2e-5):
    for a, b, what in zip(got, want, ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=2e-5, err_msg=what)


def test_axis_names_agree_with_train_config():
    """attention's copy of the mesh axis names (it must not import maskjax.train) equals the trainer's."""
    from maskjax.train import config, sharding
    assert sharded.MESH_AXES == config.MESH_AXES
    rules = dict(config.DEFAULT_SHARDING_RULES)
    assert sharded.BATCH_AXES == tuple(rules["batch"]) == sharding.BATCH_AXES
    assert sharded.HEADS_AXIS == rules["heads"]


def test_mesh_split_rules():
    def mesh(sizes, names, manual=()):
        types = tuple(AxisType.Manual if n in manual else AxisType.Auto for n in names)
        return AbstractMesh(sizes, names, axis_types=types)

    split, why = sharded.mesh_split(mesh((2, 2, 2), AXES), 4, 4, 2)
    assert (split.batch_axes, split.heads_axis, split.head_shards, why) == (BATCH, "model", 2, "")
    assert split.qkv_spec() == P(BATCH, None, "model", None)
    split, _ = sharded.mesh_split(mesh((2, 2, 2), AXES), 4, 4, 1)     # kv_heads=1: heads not split
    assert split.heads_axis is None and split.qkv_spec() == P(BATCH, None, None, None)
    split, _ = sharded.mesh_split(mesh((4, 2), ("data", "model")), 4, 6, 6)
    assert (split.batch_axes, split.heads_axis) == (("data",), "model")
    split, _ = sharded.mesh_split(mesh((8,), ("x",)), 3, 4, 4)         # no maskjax axes: everything replicated
    assert split.qkv_spec() == P(None, None, None, None)
    split, _ = sharded.mesh_split(mesh((2, 2, 2), AXES, manual=("data",)), 2, 4, 4)   # inside the caller's shard_map
    assert (split.batch_axes, split.free_axes) == (("fsdp",), frozenset({"fsdp", "model"}))
    assert sharded.mesh_split(mesh((1, 1, 1), AXES), 3, 4, 4) == (None, "")
    assert sharded.mesh_split(None, 3, 4, 4) == (None, "")               # no mesh in context
    split, why = sharded.mesh_split(mesh((2, 2, 2), AXES), 6, 4, 4)
    assert split is None and why.startswith("batch=6 is not divisible") and "data=2 x fsdp=2" in why


# ---------------------------------------------------------------- splash under the mesh (interpret mode)

def _splash_case(name, batch, n):
    seg = np.repeat([0, 1, 2], [100, 100, n - 200])[None].repeat(batch, 0)
    seg[1, :30] = -1                       # padded queries and keys: rows without keys (the sink zeroes them)
    seg[2, 200:] = -1
    kv_len = np.array([n, n, 150, 0] * (batch // 4))   # example 3: no key at all
    if name == "causal":                   # GQA 4 / 2: heads split over 'model'
        return 2, lambda seg, kv: M.causal(), {}
    if name == "per_head":                 # a different static mask per head, heads split over 'model'
        return 4, lambda seg, kv: M.per_head([M.causal(), M.full(), M.local_1d(left=40, right=40), M.causal()]), {}
    # segment ids (traced, split with the batch) & lengths & causal; kv_heads=1: heads not split
    return 1, lambda seg, kv: M.segment_ids(seg) & M.lengths(kv_lengths=kv) & M.causal(), \
        dict(seg=jnp.asarray(seg, jnp.int32), kv=jnp.asarray(kv_len, jnp.int32))


@pytest.mark.parametrize("name", ["causal", "segment_ids", "per_head"])
def test_splash_under_mesh_matches_reference(name, monkeypatch):
    """attention(backend='auto') pretending to be on a TPU, under jax.set_mesh of (data=2, fsdp=2, model=2) and jit
    with sharded inputs, runs splash per shard and equals the reference backend in outputs and gradients."""
    monkeypatch.setattr(api, "_platform", lambda: "tpu")
    batch, n, heads, dim = 4, 256, 4, 64
    kv_heads, make_mask, extra = _splash_case(name, batch, n)
    q, k, v = _inputs(batch, n, heads, kv_heads, dim, seed=1)
    seg, kv = extra.get("seg"), extra.get("kv")
    calls = []
    real_local = splash._splash_local
    monkeypatch.setattr(splash, "_splash_local", lambda *a, **kw: calls.append(a[2].shape) or real_local(*a, **kw))

    def run(q, k, v, seg, kv):
        mask = make_mask(seg, kv)
        assert api.choose_backend("tpu", q, k, v, mask) == "splash"
        return attention(q, k, v, mask=mask, interpret=True)

    mesh = _mesh()
    heads_axis = "model" if kv_heads % 2 == 0 else None
    spec = P(BATCH, None, heads_axis, None)
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        args += [None if x is None else jax.device_put(x, NamedSharding(mesh, P(BATCH))) for x in (seg, kv)]
        got = _value_and_grads(run, *args)
    assert got[0].sharding.spec == spec
    local_heads = heads // 2 if heads_axis else heads
    assert calls and set(calls) == {(batch // 4, n, local_heads, dim)}      # the kernel saw one shard's block
    want = _value_and_grads(lambda q, k, v, seg, kv: attention(q, k, v, mask=make_mask(seg, kv),
                                                                backend="reference"), q, k, v, seg, kv)
    _assert_close(got, want)
    if name == "segment_ids":           # rows with no key: exactly zero, with zero gradients
        empty = np.zeros((batch, n), bool)
        empty[1, :30] = empty[2, 200:] = empty[3] = True
        assert np.all(np.asarray(got[0])[empty] == 0) and np.all(np.asarray(got[1])[empty] == 0)
        assert np.all(np.asarray(got[2])[3] == 0) and np.all(np.asarray(got[3])[3] == 0)


def test_splash_under_explicit_mesh_and_inside_callers_shard_map():
    """Explicit mesh axes (operands resharded to the specs first) and a caller's shard_map over 'data' (only the
    remaining axes are split; the caller's shard_map needs check_vma=False, as splash's pallas_call does)."""
    q, k, v = _inputs(8, 256, 2, 2, 64, seed=2)
    f = lambda q, k, v: splash.splash_attention(q, k, v, M.causal(), interpret=True)
    want = _value_and_grads(lambda q, k, v: attention(q, k, v, mask=M.causal(), backend="reference"), q, k, v)
    mesh = _mesh(AxisType.Explicit)
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, NamedSharding(mesh, P(None, "data", "model"))) for x in (q, k, v)]
        _assert_close(_value_and_grads(f, *args), want)
    mesh = _mesh()
    nested = jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data"), axis_names={"data"},
                           check_vma=False)
    with jax.set_mesh(mesh):
        _assert_close(_value_and_grads(nested, q, k, v), want)


# ---------------------------------------------------------------- lowering for TPU, per shard

def test_sharded_splash_exports_for_tpu(monkeypatch):
    """jax.export of the sharded function for platforms=['tpu'] from this CPU machine: the splash calls (forward;
    forward, dq, dkv in the gradient) sit in the shard_map's manual computation and take one shard's block
    (local batch 8/4 = 2, local heads 4/2 = 2), never the global [8, 4, ...] arrays XLA could not partition."""
    monkeypatch.setattr(api, "_platform", lambda: "tpu")
    mesh = _mesh()
    batch, n, heads, dim = 8, 256, 4, 128
    qkv_sh, seg_sh = NamedSharding(mesh, P(BATCH, None, "model", None)), NamedSharding(mesh, P(BATCH, None))
    shapes = [SDS((batch, n, heads, dim), BF16, sharding=qkv_sh)] * 3 + [SDS((batch, n), jnp.int32, sharding=seg_sh)]

    def f(q, k, v, seg):
        mask = M.segment_ids(seg) & M.causal()
        assert api.choose_backend("tpu", q, k, v, mask) == "splash"
        return attention(q, k, v, mask=mask)

    def loss(q, k, v, seg):
        return jnp.sum(f(q, k, v, seg).astype(F32) ** 2)

    with jax.set_mesh(mesh):
        fwd = jax.export.export(jax.jit(f, in_shardings=(qkv_sh,) * 3 + (seg_sh,), out_shardings=qkv_sh),
                                platforms=["tpu"])(*shapes)
        bwd = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(qkv_sh,) * 3 + (seg_sh,),
                                        out_shardings=(qkv_sh,) * 3), platforms=["tpu"])(*shapes)
    assert fwd.nr_devices == bwd.nr_devices == 8 and fwd.platforms == ("tpu",)
    assert fwd.in_shardings_jax(mesh)[0].spec == P(BATCH, None, "model", None)
    for exported, kernels in ((fwd, 1), (bwd, 3)):
        text = exported.mlir_module()
        assert text.count("sdy.manual_computation(") == (1 if kernels == 1 else 2)   # forward (+ its transpose)
        calls = [line for line in text.splitlines() if "stablehlo.custom_call @tpu_custom_call" in line]
        assert len(calls) == kernels
        for line in calls:
            operand_types = line.rsplit(" : (", 1)[1]
            assert "tensor<2x2x256x128xbf16>" in operand_types, operand_types[:300]   # [local b, local h, n, d]
            assert not re.search(r"tensor<(8x)?4x256x128xbf16>", operand_types)


# ---------------------------------------------------------------- cuDNN under the mesh (its XLA stand-in)

def test_cudnn_under_mesh_matches_reference(monkeypatch):
    monkeypatch.setattr(api, "_platform", lambda: "gpu")
    real = cudnn._cudnn_local
    calls = []
    monkeypatch.setattr(cudnn, "_cudnn_local", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    batch, n, heads, dim = 4, 40, 4, 16
    q, k, v = _inputs(batch, n, heads, 2, dim, seed=3)
    q_lens, kv_lens = jnp.array([30, 40, 0, 5], jnp.int32), jnp.array([4, 0, 40, 40], jnp.int32)
    mask = lambda ql, kl: M.lengths(ql, kl) & M.causal() & M.local_1d(left=2)

    def run(q, k, v, ql, kl):
        # choose on bf16 shapes (cuDNN's dtypes); run in float32 through the XLA stand-in
        assert api.choose_backend("gpu", *(SDS(x.shape, BF16) for x in (q, k, v)), mask(ql, kl)) == "cudnn"
        return cudnn.cudnn_attention(q, k, v, mask(ql, kl), implementation="xla")

    mesh = _mesh()
    spec = P(BATCH, None, "model", None)
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        args += [jax.device_put(x, NamedSharding(mesh, P(BATCH))) for x in (q_lens, kv_lens)]
        got = _value_and_grads(run, *args)
    assert got[0].sharding.spec == spec and set(calls) == {(1, n, 2, dim)}
    want = _value_and_grads(lambda q, k, v, ql, kl: attention(q, k, v, mask=mask(ql, kl), backend="reference"),
                            q, k, v, q_lens, kv_lens)
    _assert_close(got, want, atol=1e-5)
    assert np.all(np.asarray(got[0])[1] == 0) and np.all(np.asarray(got[1])[1] == 0)   # kv length 0: all rows empty


# ---------------------------------------------------------------- batch not divisible: blocked

def test_batch_not_divisible_falls_back_to_blocked(monkeypatch):
    mesh = _mesh()
    q, k, v = _inputs(6, 256, 2, 2, 64, seed=4)
    for platform, dtype in (("tpu", F32), ("gpu", BF16)):
        shapes = [SDS(x.shape, dtype) for x in (q, k, v)]
        backend, why = api.auto_backend_reason(platform, *shapes, M.causal(), mesh=mesh)
        assert backend == "blocked" and why.startswith("batch=6 is not divisible by the mesh axes"), why
        assert api.choose_backend(platform, *shapes, M.causal()) != "blocked"          # no mesh in context
        assert api.choose_backend(platform, *[SDS((8,) + s.shape[1:], dtype) for s in shapes], M.causal(),
                                  mesh=mesh) != "blocked"
    monkeypatch.setattr(api, "_platform", lambda: "tpu")
    with jax.set_mesh(mesh):
        assert api.auto_backend_reason("tpu", q, k, v, M.causal())[0] == "blocked"     # the mesh in context
        sh = NamedSharding(mesh, P(None, None, "model", None))
        args = [jax.device_put(x, sh) for x in (q, k, v)]
        with pytest.raises(ValueError, match="backend='splash' cannot run this case: batch=6 is not divisible"):
            attention(*args, mask=M.causal(), backend="splash", interpret=True)
        with pytest.raises(ValueError, match="backend='cudnn' cannot run this case: batch=6 is not divisible"):
            cudnn.cudnn_attention(*(x.astype(BF16) for x in args), M.causal())
        monkeypatch.setattr(splash, "splash_attention", lambda *a, **kw: pytest.fail("splash ran"))
        got = jax.jit(lambda q, k, v: attention(q, k, v, mask=M.causal(), interpret=True))(*args)
    want = attention(q, k, v, mask=M.causal(), backend="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
