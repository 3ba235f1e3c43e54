"""Hugging Face Mask2Former's transformer decoder -> maskjax MaskedAttentionDecoder: final and intermediate class /
mask logits of tiny random-weight HF models against the converted decoder on the same features (HF's own pixel
decoder outputs through the full model; random features through `Mask2FormerTransformerModule.forward`, with input
projections and with queries whose masks are empty), the sine position embedding, and rejected inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.convert.common import flatten_params
from maskjax.convert.hf_mask2former import hf_input_projections, hf_mask2former_decoder_to_maskjax
from maskjax.models.segmentation import MaskedAttentionDecoder, detr_sine_posemb
from tests.convert.helpers import perturb_

# Tolerances (elementwise |got - want| <= atol + rtol * |want|), float32 on the CPU, decoders of 3 layers (4
# predictions), class logits O(1-2), mask logits O(2-13). Achieved: <= 1.1e-6 abs on class logits; mask logits
# <= 1.8e-6 abs on the full model's features, <= 9.6e-6 abs (8e-7 of the largest value) on the random features
# with the +30 offset.
CLASS_TOL = dict(atol=1e-5, rtol=1e-5)
MASK_TOL = dict(atol=5e-5, rtol=1e-5)
DIM = 32
BATCH = 2


def hf_config(transformers, **overrides):
    swin = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 1, 1], window_size=4,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])
    kw = dict(backbone_config=swin, feature_size=DIM, mask_feature_size=DIM, hidden_dim=DIM,
              encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=4, num_attention_heads=4,
              dim_feedforward=64, num_queries=6, num_labels=3)
    kw.update(overrides)
    return transformers.Mask2FormerConfig(**kw)


def make_hf(torch, transformers, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.Mask2FormerForUniversalSegmentation(hf_config(transformers, **overrides)).eval()
    perturb_(torch, model)
    return model


def nhwc(tensor):
    return np.ascontiguousarray(tensor.detach().permute(0, 2, 3, 1).numpy())


def run_maskjax(decoder_kwargs, params, levels, mask_features):
    fn = jax.jit(lambda p, lv, mf: MaskedAttentionDecoder(**decoder_kwargs).apply({"params": p}, lv, mf))
    return fn(params, [jnp.asarray(x) for x in levels], jnp.asarray(mask_features))


def assert_predictions(got, want_classes, want_masks):
    """got = maskjax (class_logits, mask_logits, layers); want_* = HF's predictions, first to last."""
    class_logits, mask_logits, layers = got
    assert len(layers) + 1 == len(want_classes) == len(want_masks)
    ours = [(layer["class_logits"], layer["mask_logits"]) for layer in layers] + [(class_logits, mask_logits)]
    for i, ((classes, masks), hf_classes, hf_masks) in enumerate(zip(ours, want_classes, want_masks)):
        np.testing.assert_allclose(np.asarray(classes), hf_classes, err_msg=f"class logits {i}", **CLASS_TOL)
        np.testing.assert_allclose(np.asarray(masks), hf_masks, err_msg=f"mask logits {i}", **MASK_TOL)


def test_full_model_decoder_matches(torch, transformers):
    """HF's whole model on images; its pixel decoder's outputs fed to the converted maskjax decoder give HF's final
    and auxiliary predictions (num_layers = decoder_layers - 1 = 3: 4 predictions)."""
    model = make_hf(torch, transformers)
    images = torch.from_numpy(np.random.default_rng(0).standard_normal((BATCH, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        out = model(images, output_hidden_states=True, output_auxiliary_logits=True)
    params, decoder_kwargs = hf_mask2former_decoder_to_maskjax(model.state_dict(), model.config)
    assert decoder_kwargs["num_layers"] == model.config.decoder_layers - 1
    assert hf_input_projections(model.state_dict(), model.config) == []
    levels = [nhwc(x) for x in out.pixel_decoder_hidden_states]  # coarse -> fine: 2x2, 4x4, 8x8
    got = run_maskjax(decoder_kwargs, params, levels, nhwc(out.pixel_decoder_last_hidden_state))
    want = out.auxiliary_logits + [{"class_queries_logits": out.class_queries_logits,
                                    "masks_queries_logits": out.masks_queries_logits}]
    assert_predictions(got, [w["class_queries_logits"].numpy() for w in want],
                       [w["masks_queries_logits"].numpy() for w in want])

    abstract = jax.eval_shape(lambda: MaskedAttentionDecoder(**decoder_kwargs).init(
        jax.random.key(0), [jnp.asarray(x) for x in levels], jnp.asarray(nhwc(out.pixel_decoder_last_hidden_state))))
    expected = {k: tuple(v.shape) for k, v in flatten_params(nn.meta.unbox(abstract["params"])).items()}
    assert {k: tuple(v.shape) for k, v in flatten_params(params).items()} == expected


def test_transformer_module_with_projections_and_empty_masks(torch, transformers):
    """`Mask2FormerTransformerModule.forward(multi_scale_features, mask_features)` on random features of another
    width (HF's 1x1 input projections, applied to maskjax's levels by the caller), non-square levels with
    non-integer resize factors, and a mask-feature offset in one image that leaves some queries with no pixel in
    their masks (HF's and maskjax's 'attend_all' fallback) while others are partly masked."""
    model = make_hf(torch, transformers, seed=1, feature_size=64)
    module = model.model.transformer_module
    rng = np.random.default_rng(3)
    sizes = [(3, 5), (5, 9), (10, 18)]
    features = [rng.standard_normal((BATCH, 64) + s).astype(np.float32) for s in sizes]
    mask_features = rng.standard_normal((BATCH, DIM, 20, 36)).astype(np.float32)
    mask_features[0, 0] += 30.0  # Image 0: queries whose mask embedding is negative on channel 0 see nothing.
    with torch.no_grad():
        out = module([torch.from_numpy(f) for f in features], torch.from_numpy(mask_features))
        classes = [model.class_predictor(h.transpose(0, 1)).numpy() for h in out.intermediate_hidden_states]
    masks = [m.numpy() for m in out.masks_queries_logits]

    with pytest.raises(ValueError, match=r"model\.transformer_module\.input_projections\.0\.weight"):
        hf_mask2former_decoder_to_maskjax(model.state_dict(), model.config)
    params, decoder_kwargs = hf_mask2former_decoder_to_maskjax(model.state_dict(), model.config,
                                                               drop_input_projections=True)
    projections = hf_input_projections(model.state_dict(), model.config)
    assert len(projections) == 3 and projections[0]["kernel"].shape == (1, 1, 64, DIM)
    levels = [np.einsum("bhwc,cd->bhwd", nhwc(torch.from_numpy(f)), p["kernel"][0, 0]) + p["bias"]
              for f, p in zip(features, projections)]
    got = run_maskjax(decoder_kwargs, params, levels, np.ascontiguousarray(mask_features.transpose(0, 2, 3, 1)))
    assert_predictions(got, classes, masks)

    # Not vacuous: the masks used by layers 0..2 (predictions 0..2 resized to level l % 3) include empty rows and
    # partly masked rows, and no resized logit sits on the threshold.
    empty = partial = 0
    for layer in range(decoder_kwargs["num_layers"]):
        resized = torch.nn.functional.interpolate(torch.from_numpy(masks[layer]), size=sizes[layer % 3],
                                                  mode="bilinear", align_corners=False).flatten(2).numpy()
        allowed = resized >= 0
        empty += int((~allowed.any(-1)).sum())
        partial += int((allowed.any(-1) & ~allowed.all(-1)).sum())
        assert np.abs(resized).min() > 1e-4
    assert empty > 0 and partial > 0
    # ... and the empty rows matter: maskjax's never-NaN rule ('attend_none') gives other outputs than HF's.
    other = run_maskjax(dict(decoder_kwargs, empty_mask_rule="attend_none"), params, levels,
                        np.ascontiguousarray(mask_features.transpose(0, 2, 3, 1)))
    assert np.abs(np.asarray(other[0]) - classes[-1]).max() > 100 * CLASS_TOL["atol"]


@pytest.mark.parametrize("size,dim", [((3, 5), 32), ((16, 12), 256)])
def test_sine_position_embedding_is_hf(torch, size, dim):
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding
    embedder = Mask2FormerSinePositionEmbedding(num_position_features=dim // 2, normalize=True)
    hf = embedder((1, dim) + size, "cpu", torch.float32).numpy()  # [1, dim, h, w]
    ours = np.asarray(detr_sine_posemb(size[0], size[1], dim)).reshape(size + (dim,))
    np.testing.assert_allclose(ours, hf[0].transpose(1, 2, 0), rtol=0, atol=1e-6)


def test_bad_inputs_name_the_key(torch, transformers):
    model = make_hf(torch, transformers)
    config = model.config
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    key = "model.transformer_module.decoder.layers.2.cross_attn.in_proj_bias"
    with pytest.raises(ValueError, match=rf"missing keys \['{key.replace('.', '[.]')}'\]"):
        hf_mask2former_decoder_to_maskjax({k: v for k, v in state.items() if k != key}, config)
    extra = "model.transformer_module.decoder.layers.3.fc1.weight"
    with pytest.raises(ValueError, match=rf"unexpected keys \['{extra.replace('.', '[.]')}'\]"):
        hf_mask2former_decoder_to_maskjax(dict(state, **{extra: np.zeros((64, DIM), np.float32)}), config)
    wrong = dict(state, **{"class_predictor.weight": np.zeros((5, DIM), np.float32)})
    with pytest.raises(ValueError, match=r"class_predictor\.weight: got shape \(5, 32\), expected \(4, 32\)"):
        hf_mask2former_decoder_to_maskjax(wrong, config)
    cfg = config.to_dict()
    with pytest.raises(ValueError, match="pre_norm=True"):
        hf_mask2former_decoder_to_maskjax(state, dict(cfg, pre_norm=True))
    with pytest.raises(ValueError, match="activation_function='gelu'"):
        hf_mask2former_decoder_to_maskjax(state, dict(cfg, activation_function="gelu"))
    with pytest.raises(ValueError, match="mask_feature_size=16 must equal hidden_dim=32"):
        hf_mask2former_decoder_to_maskjax(state, dict(cfg, mask_feature_size=16))
    with pytest.raises(ValueError, match="missing field 'hidden_dim'"):
        hf_mask2former_decoder_to_maskjax(state, {k: v for k, v in cfg.items() if k != "hidden_dim"})
