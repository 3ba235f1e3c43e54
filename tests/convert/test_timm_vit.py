"""timm VisionTransformer <-> maskjax ViT: outputs of the PyTorch model (random weights, no download) against the
converted maskjax model, exact round trips, file loading and rejected inputs."""

import jax
import numpy as np
import pytest

from maskjax.convert import load_state_dict, maskjax_to_timm, save_state_dict, timm_to_maskjax
from maskjax.models.vit import ViT
from tests.convert.helpers import assert_trees_identical, perturb_, random_like_tree

ATOL = 1e-5  # Absolute, on logits and features of depth-2, width-32/48 models with O(1) activations.

# Pairwise coverage of the timm options the converter maps (cls/registers, pos slots, qkv bias, qk-norm,
# LayerScale, pooling, head, non-square grids).
TIMM_CASES = {
    "default": dict(kw=dict(), pool="token", image=(32, 32)),
    "registers_no_embed_class_qknorm_ls": dict(
        kw=dict(reg_tokens=2, no_embed_class=True, qk_norm=True, init_values=0.5), pool="token", image=(32, 32)),
    "avg_no_cls_no_qkv_bias": dict(
        kw=dict(class_token=False, global_pool="avg", fc_norm=False, qkv_bias=False, reg_tokens=1), pool="avg",
        image=(32, 32)),
    "no_head_nonsquare_registers": dict(kw=dict(num_classes=0, reg_tokens=1, init_values=1e-2), pool="token",
                                        image=(32, 48)),
}


def make_timm(timm, torch, kw, image, seed=0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    kw = dict(dict(num_classes=5), **kw)
    model = VisionTransformer(img_size=image, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                              **kw).eval()
    perturb_(torch, model)
    return model


def images(batch, image, seed=1):
    return np.random.default_rng(seed).standard_normal((batch,) + tuple(image) + (3,)).astype(np.float32)


def timm_outputs(torch, model, x):
    with torch.no_grad():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        return model(xt).numpy(), model.forward_features(xt).numpy()


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_outputs_match(torch, timm, case):
    spec = TIMM_CASES[case]
    model = make_timm(timm, torch, spec["kw"], spec["image"])
    x = images(2, spec["image"])
    logits_ref, features_ref = timm_outputs(torch, model, x)

    params, vit_kwargs = timm_to_maskjax(model.state_dict(), num_heads=2, global_pool=spec["pool"],
                                         image_size=spec["image"] if spec["image"][0] != spec["image"][1] else None)
    logits, aux = jax.jit(ViT(**vit_kwargs).apply)({"params": params}, x)
    assert logits.shape == logits_ref.shape
    np.testing.assert_allclose(np.asarray(logits), logits_ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(aux["encoded"]), features_ref, rtol=0, atol=ATOL)

    # Back to timm: a strict load into the same architecture, and the same state dict values.
    exported = maskjax_to_timm(params, no_embed_class=spec["kw"].get("no_embed_class", False),
                               qkv_bias=spec["kw"].get("qkv_bias", True))
    twin = make_timm(timm, torch, spec["kw"], spec["image"], seed=7)
    twin.load_state_dict(exported, strict=True)
    logits_twin, features_twin = timm_outputs(torch, twin, x)
    np.testing.assert_allclose(logits_twin, logits_ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(features_twin, features_ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", ["default", "registers_no_embed_class_qknorm_ls"])
def test_maskjax_to_timm_to_maskjax_identical(torch, timm, case):
    spec = TIMM_CASES[case]
    no_embed_class = spec["kw"].get("no_embed_class", False)
    template, vit_kwargs = timm_to_maskjax(make_timm(timm, torch, spec["kw"], spec["image"]).state_dict(),
                                           num_heads=2)
    params = random_like_tree(template, seed=3)
    model = make_timm(timm, torch, spec["kw"], spec["image"], seed=5)
    model.load_state_dict(maskjax_to_timm(params, no_embed_class=no_embed_class), strict=True)
    back, back_kwargs = timm_to_maskjax(model.state_dict(), num_heads=2)
    assert back_kwargs == vit_kwargs
    assert_trees_identical(back, params)
    # The exported torch model computes what the maskjax model computes.
    x = images(2, spec["image"], seed=4)
    logits, _ = jax.jit(ViT(**vit_kwargs).apply)({"params": params}, x)
    np.testing.assert_allclose(timm_outputs(torch, model, x)[0], np.asarray(logits), rtol=0, atol=ATOL)


def test_init_params_of_a_maskjax_vit_export(torch, timm):
    """Params straight from `ViT.init` (boxed, under 'params', sin-cos posemb) export with image_size."""
    import jax.numpy as jnp
    vit = ViT(num_classes=5, patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2, posemb="sincos2d",
              head_zero_init=False)
    variables = jax.jit(vit.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="image_size"):
        maskjax_to_timm(variables)
    model = make_timm(timm, torch, {}, (32, 32))
    model.load_state_dict(maskjax_to_timm(variables, image_size=32), strict=True)
    x = images(2, (32, 32))
    logits, _ = jax.jit(vit.apply)(variables, x)
    np.testing.assert_allclose(timm_outputs(torch, model, x)[0], np.asarray(logits), rtol=0, atol=ATOL)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_from_file(torch, timm, tmp_path, suffix):
    model = make_timm(timm, torch, {}, (32, 32))
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(model.state_dict(), str(path))
    else:
        torch.save({"model": model.state_dict()}, str(path))  # MAE/DeiT-style wrapper.
    from_file, kwargs_file = timm_to_maskjax(str(path), num_heads=2)
    from_dict, kwargs_dict = timm_to_maskjax(model.state_dict(), num_heads=2)
    assert kwargs_file == kwargs_dict
    assert_trees_identical(from_file, from_dict)
    # And maskjax's own writer produces a file timm loads.
    out = tmp_path / f"out{suffix}"
    save_state_dict(maskjax_to_timm(from_dict, tensors="np"), out)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_state_dict(out).items()}, strict=True)


def _state(torch, timm):
    return {k: v.numpy() for k, v in make_timm(timm, torch, {}, (32, 32)).state_dict().items()}


def test_bad_state_dicts_name_the_key(torch, timm):
    state = _state(torch, timm)
    missing = dict(state)
    del missing["blocks.1.norm2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.norm2\.bias'\]"):
        timm_to_maskjax(missing, num_heads=2)

    unexpected = dict(state, **{"blocks.0.attn.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks\.0\.attn\.extra\.weight'\]"):
        timm_to_maskjax(unexpected, num_heads=2)

    wrong = dict(state, **{"blocks.1.mlp.fc2.weight": np.zeros((32, 63), np.float32)})
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.weight: got shape \(32, 63\), expected \(32, 64\)"):
        timm_to_maskjax(wrong, num_heads=2)

    with pytest.raises(ValueError, match="fc_norm"):
        timm_to_maskjax(dict(state, **{"fc_norm.weight": np.ones(32, np.float32)}), num_heads=2)
    with pytest.raises(ValueError, match="num_heads=3"):
        timm_to_maskjax(state, num_heads=3)
    with pytest.raises(ValueError, match="global_pool='map'"):
        timm_to_maskjax(state, num_heads=2, global_pool="map")
    with pytest.raises(ValueError, match="pos_embed has 17 tokens"):
        timm_to_maskjax(state, num_heads=2, image_size=(32, 48))
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        timm_to_maskjax({k: v for k, v in state.items() if not k.startswith("patch_embed")}, num_heads=2)
    with pytest.raises(ValueError, match="not a file"):
        timm_to_maskjax("/nonexistent/vit.safetensors", num_heads=2)


def test_bad_params_name_the_key(torch, timm):
    params, _ = timm_to_maskjax(_state(torch, timm), num_heads=2)
    broken = jax.tree_util.tree_map(lambda x: x, params)
    broken["encoder"]["block_1"]["mlp"]["fc1"]["bias"] = np.zeros((65,), np.float32)
    with pytest.raises(ValueError, match=r"encoder/block_1/mlp/fc1/bias: got shape \(65,\), expected \(64,\)"):
        maskjax_to_timm(broken)
    del broken["encoder"]["block_0"]["norm2"]
    with pytest.raises(ValueError,
                       match=r"missing keys \['encoder/block_0/norm2/scale', 'encoder/block_0/norm2/bias'\]"):
        maskjax_to_timm(broken)
    with pytest.raises(ValueError, match="qkv_bias=False"):
        maskjax_to_timm(params, qkv_bias=False)
    with pytest.raises(ValueError, match="tensors='jax'"):
        maskjax_to_timm(params, tensors="jax")


def test_bfloat16_state_dict(torch, timm):
    """bfloat16 tensors are read as float32 with the same values."""
    model = make_timm(timm, torch, {}, (32, 32)).to(torch.bfloat16)
    params, _ = timm_to_maskjax(model.state_dict(), num_heads=2)
    kernel = model.state_dict()["blocks.0.mlp.fc1.weight"].float().numpy().T
    assert params["encoder"]["block_0"]["mlp"]["fc1"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(params["encoder"]["block_0"]["mlp"]["fc1"]["kernel"], kernel)
