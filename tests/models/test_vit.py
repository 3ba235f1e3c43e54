"""ViT: shapes, dtypes, token bookkeeping, logical partitioning, masks, errors and a tiny overfit run."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage

from maskjax.models import ViT, decode_variant
from maskjax.models.layers import posemb_sincos_2d

ALLOWED_LOGICAL_NAMES = {"embed", "mlp", "heads", "head_dim", "classes", "patch", "posemb_tokens", "norm"}


def mu_vit(**overrides) -> ViT:
    kwargs = dict(decode_variant("mu/4"), num_classes=5)
    kwargs.update(overrides)
    return ViT(**kwargs)


def images(batch=2, size=16, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def init(model, x, seed=0):
    """Boxed variables (eager: small ops compile once per shape and are reused by every test)."""
    return model.init(jax.random.key(seed), x)


def init_params(model, x, seed=1):
    return nn.meta.unbox(init(model, x, seed))["params"]


def apply(model, variables, *args, **kwargs):
    return model.apply(variables, *args, **kwargs)


def test_decode_variant_sizes_and_patch():
    assert decode_variant("Ti/16") == dict(width=192, depth=12, mlp_dim=768, num_heads=3, patch_size=16)
    assert decode_variant("B/32") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=32)
    assert decode_variant("L/14")["depth"] == 24 and decode_variant("H/14")["width"] == 1280
    assert decode_variant("S/7")["patch_size"] == 7
    for name in ("mu", "Ti", "S", "M", "B", "L", "H"):
        size = decode_variant(f"{name}/8")
        assert size["width"] % size["num_heads"] == 0


@pytest.mark.parametrize("bad", ["X/16", "Ti", "Ti/0", "Ti/-4", "ti16", "B/16/2"])
def test_decode_variant_errors_name_the_value(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        decode_variant(bad)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_shapes_and_dtypes(dtype):
    model = mu_vit(dtype=dtype)
    x = images()
    variables = init(model, x)
    for leaf in jax.tree.leaves(nn.meta.unbox(variables)):
        assert leaf.dtype == jnp.float32  # Parameters stay float32 whatever the compute dtype.
    logits, aux = apply(model, variables, x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert aux["stem"].shape == (2, 16, 32) and aux["stem"].dtype == dtype
    assert aux["encoded"].shape == (2, 17, 32) and aux["encoded"].dtype == dtype
    assert aux["pre_logits"].shape == (2, 32)
    assert aux["block_0"].shape == aux["block_1"].shape == (2, 17, 32)
    assert aux["num_prefix_tokens"] == 1
    assert np.all(np.isfinite(np.asarray(logits)))


def test_bfloat16_compute_is_close_to_float32():
    x = images()
    params = init_params(mu_vit(head_zero_init=False), x)
    f32, _ = apply(mu_vit(head_zero_init=False), {"params": params}, x)
    bf16, _ = apply(mu_vit(head_zero_init=False, dtype=jnp.bfloat16), {"params": params}, x)
    assert float(jnp.max(jnp.abs(f32 - bf16))) < 0.1 * float(jnp.max(jnp.abs(f32))) + 0.05


@pytest.mark.parametrize("class_token, num_registers, pool", [(True, 0, "cls"), (True, 4, "cls"),
                                                              (False, 3, "gap"), (False, 0, "gap")])
def test_prefix_token_counts(class_token, num_registers, pool):
    model = mu_vit(class_token=class_token, num_registers=num_registers, pool=pool)
    x = images()
    logits, aux = apply(model, init(model, x), x)
    prefix = int(class_token) + num_registers
    assert aux["num_prefix_tokens"] == prefix
    assert aux["encoded"].shape == (2, prefix + 16, 32)
    assert logits.shape == (2, 5)
    if pool == "gap":  # Mean over patch tokens only, prefix tokens excluded.
        expected = np.asarray(aux["encoded"])[:, prefix:].mean(axis=1)
        np.testing.assert_allclose(np.asarray(aux["pre_logits"]), expected, atol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(aux["pre_logits"]), np.asarray(aux["encoded"])[:, 0])


def test_token_order_is_cls_then_registers_then_patches():
    model = mu_vit(num_registers=2, depth=1)
    x = images()
    params = init_params(model, x)
    params["cls"] = jnp.full_like(params["cls"], 3.0)
    params["registers"] = jnp.stack([jnp.full((32,), 5.0), jnp.full((32,), 7.0)])[None]
    tokens = apply(model, {"params": params}, apply(model, {"params": params}, x, method=ViT.embed_patches),
                         method=ViT.add_prefix_tokens)
    np.testing.assert_array_equal(np.asarray(tokens[:, :3, 0]), [[3.0, 5.0, 7.0]] * 2)
    _, aux = apply(model, {"params": params}, x)
    np.testing.assert_array_equal(np.asarray(tokens[:, 3:]), np.asarray(aux["stem"]))


def test_pool_none_and_headless():
    x = images()
    model = mu_vit(pool="none")
    logits, aux = apply(model, init(model, x), x)
    assert logits.shape == (2, 17, 5) and aux["pre_logits"].shape == (2, 17, 32)
    headless = mu_vit(num_classes=0)
    variables = init(headless, x)
    assert "head" not in variables["params"]
    logits, aux = apply(headless, variables, x)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(aux["pre_logits"]))


def test_head_zero_init():
    x = images()
    assert not np.any(np.asarray(init_params(mu_vit(), x)["head"]["kernel"]))
    assert np.any(np.asarray(init_params(mu_vit(head_zero_init=False), x)["head"]["kernel"]))


def _assert_logically_partitioned(variables):
    boxed = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(v, nn.LogicallyPartitioned) for v in boxed)
    specs = nn.get_partition_spec(variables)
    values = nn.meta.unbox(variables)
    for (path, spec), value in zip(jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0], jax.tree.leaves(values)):
        assert len(spec) == value.ndim, (jax.tree_util.keystr(path), spec, value.shape)
        names = {name for name in spec if name is not None}
        assert names <= ALLOWED_LOGICAL_NAMES, (jax.tree_util.keystr(path), spec)


def test_every_parameter_is_logically_partitioned_with_allowed_names():
    model = mu_vit(num_registers=2, layer_scale_init=0.1, qk_norm=True)
    x = images()
    variables = init(model, x)
    _assert_logically_partitioned(variables)
    specs = nn.get_partition_spec(variables)["params"]
    block = specs["encoder"]["block_0"]
    assert tuple(block["attn"]["query"]["kernel"]) == ("embed", "heads", "head_dim")
    assert tuple(block["attn"]["out"]["kernel"]) == ("heads", "head_dim", "embed")
    assert tuple(block["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["head"]["kernel"]) == ("embed", "classes")


def _trim(spec) -> tuple:
    """A PartitionSpec as a tuple without trailing Nones (P('a', None) and P('a') shard alike)."""
    out = list(spec)
    while out and out[-1] is None:
        out.pop()
    return tuple(out)


def test_parameters_and_activations_follow_sharding_rules_on_a_mesh():
    """On a (data, fsdp, model) = (2, 2, 2) mesh, parameters created already sharded (jit of init with
    out_shardings from the logical names) carry the shardings the rules ask for: embed -> fsdp, mlp -> model,
    heads -> model, the other names replicated; each device holds the matching slice; the sharded model gives the
    single-device numbers."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "model"))
    rules = (("batch", "data"), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"), ("tokens", None))
    model = mu_vit()
    x = images(batch=4)
    variables = init(model, x)
    expected, _ = apply(model, variables, x)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        logical = nn.get_partition_spec(jax.eval_shape(lambda: init(model, x)))
        shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
        sharded = jax.jit(lambda: init(model, x), out_shardings=shardings)()
        got, _ = jax.jit(lambda v, x: model.apply(v, x))(sharded, x)

    params = nn.meta.unbox(sharded)["params"]
    block = params["encoder"]["block_0"]
    # Spelled out for the main kernels (query: embed, heads, head_dim; out: heads, head_dim, embed; ...).
    assert _trim(block["attn"]["query"]["kernel"].sharding.spec) == ("fsdp", "model")
    assert _trim(block["attn"]["out"]["kernel"].sharding.spec) == ("model", None, "fsdp")
    assert _trim(block["mlp"]["fc1"]["kernel"].sharding.spec) == ("fsdp", "model")
    assert _trim(block["mlp"]["fc2"]["kernel"].sharding.spec) == ("model", "fsdp")
    assert _trim(params["head"]["kernel"].sharding.spec) == ("fsdp",)
    # And for every parameter, from its logical names and the rules.
    rule = dict(rules)
    used = set()
    flat_specs = jax.tree_util.tree_flatten_with_path(
        nn.get_partition_spec(variables)["params"], is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0]
    flat_values = jax.tree_util.tree_flatten_with_path(params)[0]
    mesh_sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    for (path, names), (_, leaf) in zip(flat_specs, flat_values):
        want = tuple(rule.get(n) for n in names)
        where = jax.tree_util.keystr(path)
        assert _trim(leaf.sharding.spec) == _trim(want), (where, leaf.sharding.spec, names)
        local = tuple(d // (mesh_sizes[a] if a else 1) for d, a in zip(leaf.shape, want))
        assert all(shard.data.shape == local for shard in leaf.addressable_shards), (where, local)
        used |= {n for n, a in zip(names, want) if a is not None}
    assert used == {"embed", "mlp", "heads"}
    for a, b in zip(jax.tree.leaves(nn.meta.unbox(variables)), jax.tree.leaves(nn.meta.unbox(sharded))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_self_only_mask_makes_tokens_independent():
    model = mu_vit(head_zero_init=False)
    x = images()
    params = init_params(model, x)
    tokens = 1 + 16
    self_only = jnp.eye(tokens, dtype=bool)[None, None]
    perturbed = x.copy()
    perturbed[:, :4, :4, :] += 1.0  # Changes patch 0 only (token 1, after cls).

    def encoded(mask, imgs):
        return np.asarray(apply(model, {"params": params}, imgs, mask=mask)[1]["encoded"])

    base, moved = encoded(self_only, x), encoded(self_only, perturbed)
    changed = np.any(np.abs(base - moved) > 1e-6, axis=(0, 2))
    np.testing.assert_array_equal(changed, np.arange(tokens) == 1)
    # Without the mask the perturbation spreads to every token (so the check above can fail).
    assert np.all(np.any(np.abs(encoded(None, x) - encoded(None, perturbed)) > 1e-6, axis=(0, 2)))


def test_encoding_a_token_subset_equals_masking_the_others():
    """MAE's visible-only path (embed, gather, prefix, encode) equals full encoding with hidden keys."""
    model = mu_vit(num_registers=1)
    x = images()
    params = init_params(model, x)
    keep = np.array([0, 3, 4, 9, 15])
    patches = apply(model, {"params": params}, x, method=ViT.embed_patches)
    visible = apply(model, {"params": params}, patches[:, keep], method=ViT.add_prefix_tokens)
    subset, _ = apply(model, {"params": params}, visible, method=ViT.encode)
    key_visible = np.zeros(2 + 16, bool)
    key_visible[:2] = True
    key_visible[2 + keep] = True
    _, aux = apply(model, {"params": params}, x, mask=jnp.asarray(key_visible)[None, None, None, :])
    rows = np.concatenate([[0, 1], 2 + keep])
    np.testing.assert_allclose(np.asarray(subset), np.asarray(aux["encoded"])[:, rows], atol=2e-5)


def test_layer_scale_zero_makes_blocks_identity():
    model = mu_vit(layer_scale_init=0.0, num_registers=1)
    x = images()
    params = init_params(model, x)
    _, aux = apply(model, {"params": params}, x)
    tokens = apply(model, {"params": params}, aux["stem"], method=ViT.add_prefix_tokens)
    np.testing.assert_allclose(np.asarray(aux["block_1"]), np.asarray(tokens), atol=1e-6)


def test_sincos_posemb_is_added_to_patch_tokens():
    model = mu_vit(posemb="sincos2d")
    x = images()
    variables = init(model, x)
    assert "posemb" not in variables["params"]
    conv = nn.meta.unbox(variables)["params"]["embedding"]["conv"]
    patches = np.asarray(x).reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
    projected = patches @ np.asarray(conv["kernel"]).reshape(48, 32) + np.asarray(conv["bias"])
    _, aux = apply(model, variables, x)
    np.testing.assert_allclose(np.asarray(aux["stem"]), projected + np.asarray(posemb_sincos_2d(4, 4, 32)),
                               atol=1e-5)


def test_learned_posemb_is_resized_for_a_new_resolution():
    model = mu_vit(posemb_grid=(4, 4))
    params = init_params(model, images(size=16))
    x = images(size=32)  # 8x8 patch grid.
    _, aux = apply(model, {"params": params}, x)
    conv = params["embedding"]["conv"]
    patches = np.asarray(x).reshape(2, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 64, 48)
    projected = patches @ np.asarray(conv["kernel"]).reshape(48, 32) + np.asarray(conv["bias"])
    stored = np.asarray(params["posemb"]["embedding"], np.float64).reshape(4, 4, 32)
    resized = scipy.ndimage.zoom(stored, (2, 2, 1), order=1, mode="nearest", grid_mode=True).reshape(1, 64, 32)
    np.testing.assert_allclose(np.asarray(aux["stem"]), projected + resized, atol=1e-5)
    # At the stored grid the embedding is used as is.
    _, aux16 = apply(model, {"params": params}, images(size=16))
    patches16 = np.asarray(images(size=16)).reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
    projected16 = patches16 @ np.asarray(conv["kernel"]).reshape(48, 32) + np.asarray(conv["bias"])
    np.testing.assert_allclose(np.asarray(aux16["stem"]),
                               projected16 + np.asarray(params["posemb"]["embedding"]), atol=1e-5)


def test_learned_posemb_without_grid_fails_clearly_on_a_new_resolution():
    model = mu_vit()
    params = init_params(model, images(size=16))
    with pytest.raises(ValueError, match=r"16 tokens.*\(8, 8\).*posemb_grid"):
        apply(model, {"params": params}, images(size=32))


def test_bad_image_size_error_names_image_and_patch():
    model = mu_vit()
    with pytest.raises(ValueError, match=r"\(18, 18\).*patch_size \(4, 4\)"):
        init(model, images(size=18))


@pytest.mark.parametrize("overrides, message", [
    (dict(width=30, num_heads=4), "width=30.*num_heads=4"),
    (dict(pool="max"), "pool='max'"),
    (dict(pool="cls", class_token=False), "class_token"),
    (dict(posemb="rope"), "posemb='rope'"),
    (dict(drop_path_rate=1.0), "drop_path_rate=1.0"),
    (dict(patch_size=0), "patch_size=0"),
])
def test_bad_configuration_errors_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        init(mu_vit(**overrides), images())


def test_drop_path_eval_deterministic_and_train_stochastic():
    model = mu_vit(drop_path_rate=0.5, head_zero_init=False)
    x = images(batch=8)
    params = init_params(model, x)
    eval_a, _ = apply(model, {"params": params}, x)
    eval_b, _ = apply(model, {"params": params}, x, rngs={"drop_path": jax.random.key(9)})
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))

    def train(key):
        return np.asarray(apply(model, {"params": params}, x, train=True, rngs={"drop_path": key})[0])

    np.testing.assert_array_equal(train(jax.random.key(1)), train(jax.random.key(1)))
    assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))
    assert not np.allclose(train(jax.random.key(1)), np.asarray(eval_a))


def test_remat_gives_the_same_loss_and_gradients():
    x = images()
    params = init_params(mu_vit(head_zero_init=False), x)

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x)[0] ** 2)))(params)

    (plain, g_plain), (remat, g_remat) = loss(mu_vit(head_zero_init=False)), loss(mu_vit(head_zero_init=False,
                                                                                         remat=True))
    np.testing.assert_allclose(float(plain), float(remat), rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_plain))  # Float noise is relative to this.
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=1e-5)


def _count(width, depth, mlp_dim, patch, channels, tokens, classes, prefix):
    """Parameter count of a ViT from its architecture (independent of the Flax code)."""
    block = 4 * (width * width + width) + 2 * width * mlp_dim + mlp_dim + width + 2 * 2 * width
    return (patch * patch * channels * width + width + tokens * width + prefix * width
            + depth * block + 2 * width + width * classes + classes)


@pytest.mark.parametrize("variant", ["Ti/4", "Ti/16"])
def test_parameter_count_matches_architecture(variant):
    size = decode_variant(variant)
    model = ViT(num_classes=10, **size)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.meta.unbox(shapes)))
    patch = size["patch_size"]
    assert count == _count(size["width"], size["depth"], size["mlp_dim"], patch, 3, (32 // patch) ** 2, 10, 1)


def test_tiny_overfit():
    """A few dozen Adam steps on 8 random images with random labels drive the loss far down."""
    model = mu_vit(num_classes=4, head_zero_init=False)
    x = images(batch=8, seed=3)
    labels = jax.random.randint(jax.random.key(4), (8,), 0, 4)
    params = init_params(model, x)
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    def loss_fn(p):
        logits, _ = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    first = float(loss_fn(params))
    for _ in range(40):
        params, opt_state, _ = step(params, opt_state)
    last = float(loss_fn(params))
    assert last < 0.2 * first, (first, last)
