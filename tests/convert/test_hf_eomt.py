"""Hugging Face EomtForUniversalSegmentation -> maskjax EoMT: class and mask logits of tiny random-weight HF models
(eval mode) against the converted maskjax model on the same normalised pixels, without masked attention (HF's
inference) and with masks always on (attn_mask_probs = 1, including every intermediate prediction), plus the
parameter tree, file loading, the mask-probability helper and rejected inputs."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.convert.common import flatten_params
from maskjax.convert.hf_eomt import (IMAGENET_MEAN, IMAGENET_STD, eomt_from_hf, hf_eomt_inputs, hf_eomt_mask_probs,
                                     hf_eomt_to_maskjax)
from maskjax.models.segmentation import EoMT, num_upscale_blocks
from tests.convert.helpers import assert_trees_identical, perturb_

# Tolerances (elementwise |got - want| <= atol + rtol * |want|), float32 on the CPU, models of depth 4 (2 blocks with
# queries) / depth 3 (2 with queries); class logits O(1-3), mask logits O(6-19). Achieved, final and intermediate
# predictions: <= 1.0e-6 abs on class logits, <= 1.3e-5 abs (7e-7 of the largest value) on mask logits.
CLASS_TOL = dict(atol=1e-5, rtol=1e-5)
MASK_TOL = dict(atol=1e-4, rtol=1e-5)
BATCH = 2

# Pairwise: registers on/off x patch 8 (2 upscalers where maskjax's own rule gives 1) / patch 16 (1 upscaler where
# the rule gives 2) x layer-scale init 1 / 0.5 x MLP ratio 4 / 2.
CASES = {
    "registers_patch8": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8,
                             num_queries=10, num_blocks=2, num_labels=5),
    "no_registers_patch16": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=64,
                                 patch_size=16, num_queries=7, num_blocks=2, num_labels=3, num_register_tokens=0,
                                 num_upscale_blocks=1, layerscale_value=0.5, mlp_ratio=2),
}


def make_hf(torch, transformers, case, seed=0, probs=0.0):
    config = transformers.EomtConfig(**CASES[case])
    torch.manual_seed(seed)
    model = transformers.EomtForUniversalSegmentation(config).eval()
    perturb_(torch, model, skip=("attn_mask_probs",))
    with torch.no_grad():
        model.attn_mask_probs.fill_(probs)
    return model


def pixels(config, seed=1):
    """maskjax-style images in [-1, 1], normalised the way HF's image processor does (NHWC)."""
    rng = np.random.default_rng(seed)
    return hf_eomt_inputs(rng.uniform(-1, 1, (BATCH, config.image_size, config.image_size, 3)).astype(np.float32))


def hf_forward(torch, model, images):
    """HF outputs plus every (masks, classes) its `predict` made, intermediate ones included (HF returns only the
    final prediction)."""
    calls = []
    original = model.predict

    def recording(hidden):
        masks, classes = original(hidden)
        calls.append((masks.detach().numpy(), classes.detach().numpy()))
        return masks, classes

    model.predict = recording
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    finally:
        del model.predict
    return out, calls


def run_maskjax(model, params, images, mask_probs=None):
    fn = jax.jit(lambda p, x, probs: model.apply({"params": p}, x, mask_probs=probs,
                                                 rngs={"anneal": jax.random.key(0)}))
    outputs, _ = fn(params, images, None if mask_probs is None else jnp.asarray(mask_probs, jnp.float32))
    return outputs


def assert_prediction(got_classes, got_masks, want_classes, want_masks):
    np.testing.assert_allclose(np.asarray(got_classes), want_classes, **CLASS_TOL)
    np.testing.assert_allclose(np.asarray(got_masks), want_masks, **MASK_TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_without_masked_attention(torch, transformers, case):
    """HF inference (attn_mask_probs all 0: no masks, one prediction) == maskjax with mask_probs=None."""
    model = make_hf(torch, transformers, case)
    images = pixels(model.config)
    out, calls = hf_forward(torch, model, images)
    assert len(calls) == 1
    assert hf_eomt_mask_probs(model.state_dict()) is None
    eomt, params = eomt_from_hf(model)
    patch = model.config.patch_size
    assert eomt.num_upscale == model.config.num_upscale_blocks != num_upscale_blocks(patch)
    outputs = run_maskjax(eomt, params, images)
    assert outputs["layers"] == []
    side = model.config.image_size // patch * 2 ** model.config.num_upscale_blocks
    assert outputs["mask_logits"].shape == (BATCH, model.config.num_queries, side, side)
    assert outputs["class_logits"].shape == (BATCH, model.config.num_queries, model.config.num_labels + 1)
    assert_prediction(outputs["class_logits"], outputs["mask_logits"], out.class_queries_logits.numpy(),
                      out.masks_queries_logits.numpy())


@pytest.mark.parametrize("case,probs", [("registers_patch8", (1.0, 1.0)), ("no_registers_patch16", (0.0, 1.0))])
def test_outputs_match_with_masks_on(torch, transformers, case, probs):
    """attn_mask_probs = 1 (a fresh HF model's buffer): every query keeps its mask, the random draw drops nothing,
    so final and intermediate predictions match. (0, 1): HF skips the first block's mask and prediction, maskjax
    predicts there too but drops every mask (P=0), so its later predictions equal HF's."""
    model = make_hf(torch, transformers, case, probs=1.0)
    with torch.no_grad():
        model.attn_mask_probs.copy_(torch.tensor(probs))
    images = pixels(model.config, seed=2)
    out, calls = hf_forward(torch, model, images)
    mask_probs = hf_eomt_mask_probs(model)
    np.testing.assert_array_equal(mask_probs, np.asarray(probs, np.float32))
    eomt, params = eomt_from_hf(model)
    outputs = run_maskjax(eomt, params, images, mask_probs)
    assert_prediction(outputs["class_logits"], outputs["mask_logits"], out.class_queries_logits.numpy(),
                      out.masks_queries_logits.numpy())
    assert len(outputs["layers"]) == model.config.num_blocks
    hf_layers = calls[:-1]  # HF predicts before each masked block with P > 0, then once at the end.
    ours = [layer for layer, p in zip(outputs["layers"], probs) if p > 0]
    assert len(hf_layers) == len(ours) == sum(p > 0 for p in probs)
    for layer, (masks, classes) in zip(ours, hf_layers):
        assert_prediction(layer["class_logits"], layer["mask_logits"], classes, masks)

    # The comparison is not vacuous: the masks change the outputs far beyond the tolerance, they are neither all
    # on nor all off, and no resized logit sits on the threshold (HF's 'bilinear' resize to the patch grid).
    plain = run_maskjax(eomt, params, images)
    assert np.abs(np.asarray(plain["class_logits"]) - out.class_queries_logits.numpy()).max() > 100 * CLASS_TOL["atol"]
    grid = (model.config.image_size // model.config.patch_size,) * 2
    resized = torch.nn.functional.interpolate(torch.from_numpy(hf_layers[-1][0]), size=grid, mode="bilinear").numpy()
    allowed = resized > 0
    assert 0.05 < allowed.mean() < 0.95
    assert np.abs(resized).min() > 1e-4


def test_param_tree_is_maskjax_init_tree(torch, transformers):
    for case in CASES:
        model = make_hf(torch, transformers, case)
        params, model_kwargs = hf_eomt_to_maskjax(model.state_dict(), model.config)
        images = jnp.zeros((1, model.config.image_size, model.config.image_size, 3))
        abstract = jax.eval_shape(lambda: EoMT(**model_kwargs).init(jax.random.key(0), images))
        expected = {k: tuple(v.shape) for k, v in flatten_params(nn.meta.unbox(abstract["params"])).items()}
        assert {k: tuple(v.shape) for k, v in flatten_params(params).items()} == expected


def test_safetensors_file_and_config_dict(torch, transformers, tmp_path):
    model = make_hf(torch, transformers, "no_registers_patch16")
    params, model_kwargs = hf_eomt_to_maskjax(model.state_dict(), model.config)
    from safetensors.torch import save_file
    path = os.path.join(tmp_path, "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    from_file, kwargs_from_file = hf_eomt_to_maskjax(path, model.config.to_dict())
    assert kwargs_from_file == model_kwargs
    assert_trees_identical(from_file, params)
    with pytest.raises(ValueError, match="config is required"):
        eomt_from_hf(path)


def test_mask_probs_helper():
    assert hf_eomt_mask_probs({"query.weight": np.zeros((2, 2), np.float32)}) is None
    assert hf_eomt_mask_probs({"attn_mask_probs": np.zeros(4, np.float32)}) is None
    np.testing.assert_array_equal(hf_eomt_mask_probs({"attn_mask_probs": np.array([0, 0, 0.3, 1.0])}),
                                  np.array([0, 0, 0.3, 1.0], np.float32))
    with pytest.raises(ValueError, match=r"attn_mask_probs=\[1.0, 0.0\] has a 0 after a non-zero"):
        hf_eomt_mask_probs({"attn_mask_probs": np.array([1.0, 0.0])})
    with pytest.raises(ValueError, match="must lie in"):
        hf_eomt_mask_probs({"attn_mask_probs": np.array([1.5, 0.0])})


def test_inputs_are_the_image_processor_normalisation():
    images = np.random.default_rng(0).uniform(-1, 1, (1, 4, 4, 3)).astype(np.float32)
    expected = ((images + 1) / 2 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(hf_eomt_inputs(images), expected, rtol=0, atol=1e-6)


def test_bad_inputs_name_the_key(torch, transformers):
    model = make_hf(torch, transformers, "no_registers_patch16")
    config = model.config
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in state.items() if k != "layers.1.layer_scale2.lambda1"}
    with pytest.raises(ValueError, match=r"missing keys \['layers\.1\.layer_scale2\.lambda1'\]"):
        hf_eomt_to_maskjax(missing, config)
    with pytest.raises(ValueError, match=r"unexpected keys \['layers\.3\.norm1\.weight'\]"):
        hf_eomt_to_maskjax(dict(state, **{"layers.3.norm1.weight": np.zeros(32, np.float32)}), config)
    wrong = dict(state, **{"upscale_block.block.0.conv1.weight": np.zeros((32, 32, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"upscale_block\.block\.0\.conv1\.weight: got shape \(32, 32, 3, 3\), "
                                         r"expected \(32, 32, 2, 2\)"):
        hf_eomt_to_maskjax(wrong, config)
    with pytest.raises(ValueError, match=r"attn_mask_probs: got shape \(3,\), expected \(2,\)"):
        hf_eomt_to_maskjax(dict(state, attn_mask_probs=np.ones(3, np.float32)), config)
    cfg = config.to_dict()
    with pytest.raises(ValueError, match="use_swiglu_ffn=True is not supported"):
        hf_eomt_to_maskjax(state, dict(cfg, use_swiglu_ffn=True))
    with pytest.raises(ValueError, match="hidden_act='gelu_pytorch_tanh'"):
        hf_eomt_to_maskjax(state, dict(cfg, hidden_act="gelu_pytorch_tanh"))
    with pytest.raises(ValueError, match="layer_norm_eps=1e-05"):
        hf_eomt_to_maskjax(state, dict(cfg, layer_norm_eps=1e-5))
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        hf_eomt_to_maskjax(state, {"num_hidden_layers": 3})
    with pytest.raises(ValueError, match="num_blocks=5 exceeds num_hidden_layers=3"):
        hf_eomt_to_maskjax(state, dict(cfg, num_blocks=5))
