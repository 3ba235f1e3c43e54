"""Hugging Face ViTMAEForPreTraining <-> maskjax MAE: predictions, masks and losses of the PyTorch model (random
weights, no download) against the converted maskjax model with the same noise, exact round trips, Hub key names,
file loading and rejected inputs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskjax.convert import hf_mae_patch_targets, hf_mae_to_maskjax, hf_num_masked, maskjax_to_hf_mae
from maskjax.masking.core import mask_from_scores
from maskjax.models.mae import MAE, masked_mse, patch_targets
from tests.convert.helpers import assert_trees_identical, perturb_, random_like_tree

ATOL = 1e-5  # Absolute, on predictions/features/losses of depth-2 encoder + depth-2 decoder models, O(1) values.
IMAGE, PATCH = 32, 8
NUM_PATCHES = (IMAGE // PATCH) ** 2

# Pairwise: norm-pix loss on/off x qkv bias on/off x two mask ratios x decoder width equal to / unlike the encoder's.
HF_CASES = {
    "pixels_qkv_bias": dict(norm_pix_loss=False, qkv_bias=True, mask_ratio=0.75, decoder_hidden_size=32,
                            decoder_num_attention_heads=2),
    "norm_pix_no_qkv_bias": dict(norm_pix_loss=True, qkv_bias=False, mask_ratio=0.6, decoder_hidden_size=48,
                                 decoder_num_attention_heads=4),
}


def hf_config(transformers, **overrides):
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMAGE,
              patch_size=PATCH, num_channels=3, decoder_hidden_size=32, decoder_num_hidden_layers=2,
              decoder_num_attention_heads=2, decoder_intermediate_size=96)
    kw.update(overrides)
    return transformers.ViTMAEConfig(**kw)


def hf_sincos(torch, grid, dim):
    """HF's own fixed position buffer, built the way `ViTMAEEmbeddings.initialize_weights` builds it (a real
    checkpoint has it; a freshly constructed transformers-5 model leaves the buffers at zero)."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding
    pos = build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True)
    half = dim // 2
    return torch.cat([pos[..., half:], pos[..., :half]], dim=-1)[None]


def make_hf(torch, transformers, config, seed=0):
    torch.manual_seed(seed)
    model = transformers.ViTMAEForPreTraining(config).eval()
    perturb_(torch, model, skip=("position_embeddings", "decoder_pos_embed"))
    grid = IMAGE // PATCH
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.copy_(hf_sincos(torch, grid, config.hidden_size))
        model.decoder.decoder_pos_embed.copy_(hf_sincos(torch, grid, config.decoder_hidden_size))
    return model


def inputs(batch=2, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (batch, IMAGE, IMAGE, 3)).astype(np.float32)
    noise = rng.random((batch, NUM_PATCHES)).astype(np.float32)
    return images, noise


def hf_forward(torch, model, images, noise):
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        out = model(pixels, noise=torch.from_numpy(noise))
        latent = model.vit(pixels, noise=torch.from_numpy(noise)).last_hidden_state
    return out, latent.numpy()


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_mae_outputs_and_loss_match(torch, transformers, case):
    config = hf_config(transformers, **HF_CASES[case])
    model = make_hf(torch, transformers, config)
    images, noise = inputs()
    out, latent = hf_forward(torch, model, images, noise)

    params, model_kwargs = hf_mae_to_maskjax(model.state_dict(), config)
    assert model_kwargs["encoder"].posemb == "sincos2d"  # HF's buffer is maskjax's fixed embedding.
    masking = mask_from_scores(jnp.asarray(noise), hf_num_masked(NUM_PATCHES, config.mask_ratio), order="shuffle")
    np.testing.assert_array_equal(np.asarray(masking.mask), out.mask.numpy().astype(bool))
    np.testing.assert_array_equal(np.asarray(masking.ids_restore), out.ids_restore.numpy())

    pred, aux = jax.jit(MAE(**model_kwargs).apply)({"params": params}, images, masking)
    np.testing.assert_allclose(np.asarray(pred), out.logits.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(aux["encoded"]), latent, rtol=0, atol=ATOL)

    target = hf_mae_patch_targets(images, PATCH, config.norm_pix_loss)
    loss = masked_mse(pred, target, masking.mask)
    np.testing.assert_allclose(float(loss), float(out.loss), rtol=0, atol=ATOL)
    if not config.norm_pix_loss:  # maskjax's own pixel target is HF's.
        np.testing.assert_allclose(float(masked_mse(pred, patch_targets(images, PATCH, "pixels"), masking.mask)),
                                   float(out.loss), rtol=0, atol=ATOL)


def test_maskjax_norm_pix_target_is_hf_target():
    images, _ = inputs()
    np.testing.assert_allclose(np.asarray(patch_targets(images, PATCH, "norm_pixels")),
                               np.asarray(hf_mae_patch_targets(images, PATCH, True)), rtol=0, atol=ATOL)


def test_hf_norm_pix_target_formula():
    """The helper against the formula written out in numpy (unbiased variance, eps 1e-6)."""
    images, _ = inputs(batch=1)
    p = images.reshape(1, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(1, 16, 192).astype(np.float64)
    expected = (p - p.mean(-1, keepdims=True)) / np.sqrt(p.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(hf_mae_patch_targets(images, PATCH, True)), expected, rtol=0, atol=1e-5)


def test_learned_encoder_posemb(torch, transformers):
    """A buffer that is not the sin-cos embedding becomes a learned one ('auto'), 'sincos2d' refuses it, and the
    outputs still match HF; a non-zero cls slot is folded into the cls token."""
    config = hf_config(transformers)
    model = make_hf(torch, transformers, config)
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.add_(0.1 * torch.randn_like(model.vit.embeddings.position_embeddings))
    with pytest.raises(ValueError, match="vit.embeddings.position_embeddings differs"):
        hf_mae_to_maskjax(model.state_dict(), config, encoder_posemb="sincos2d")
    params, model_kwargs = hf_mae_to_maskjax(model.state_dict(), config)
    assert model_kwargs["encoder"].posemb == "learn"
    images, noise = inputs()
    out, _ = hf_forward(torch, model, images, noise)
    masking = mask_from_scores(jnp.asarray(noise), hf_num_masked(NUM_PATCHES, config.mask_ratio), order="shuffle")
    pred, _ = jax.jit(MAE(**model_kwargs).apply)({"params": params}, images, masking)
    np.testing.assert_allclose(np.asarray(pred), out.logits.numpy(), rtol=0, atol=ATOL)


def test_maskjax_to_hf_to_maskjax_identical(torch, transformers, tmp_path):
    config = hf_config(transformers, **HF_CASES["norm_pix_no_qkv_bias"])
    template, model_kwargs = hf_mae_to_maskjax(make_hf(torch, transformers, config).state_dict(), config)
    params = random_like_tree(template, seed=3)
    for block in list(params["encoder"]["encoder"].values()) + list(params["decoder"].values()):
        for name in ("query", "key", "value"):  # config.qkv_bias=False: HF has no q/k/v biases.
            if "attn" in block:
                block["attn"][name]["bias"] = np.zeros_like(block["attn"][name]["bias"])

    model = make_hf(torch, transformers, config, seed=5)
    model.load_state_dict(maskjax_to_hf_mae(params, config), strict=True)
    back, back_kwargs = hf_mae_to_maskjax(model.state_dict(), config)
    assert back_kwargs == model_kwargs
    assert_trees_identical(back, params)
    images, noise = inputs(seed=6)
    out, _ = hf_forward(torch, model, images, noise)
    masking = mask_from_scores(jnp.asarray(noise), hf_num_masked(NUM_PATCHES, config.mask_ratio), order="shuffle")
    pred, _ = jax.jit(MAE(**model_kwargs).apply)({"params": params}, images, masking)
    np.testing.assert_allclose(np.asarray(pred), out.logits.numpy(), rtol=0, atol=ATOL)

    # Hub layout (transformers<5 names) in a safetensors file: transformers' own from_pretrained reads it (its
    # renaming of legacy keys, offline), and the converter reads it back to the same params.
    legacy = maskjax_to_hf_mae(params, config, legacy_keys=True, tensors="np")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    assert "decoder.decoder_layers.1.output.dense.weight" in legacy
    from safetensors.numpy import save_file
    config.save_pretrained(str(tmp_path))
    save_file(legacy, os.path.join(tmp_path, "model.safetensors"))
    loaded = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path))
    modern = maskjax_to_hf_mae(params, config, tensors="np")
    got = {k: v.numpy() for k, v in loaded.state_dict().items()}
    assert set(got) == set(modern)
    for key in modern:
        np.testing.assert_array_equal(got[key], modern[key], err_msg=key)
    from_file, _ = hf_mae_to_maskjax(str(tmp_path / "model.safetensors"), config.to_dict())
    assert_trees_identical(from_file, params)


def test_bad_inputs_name_the_key(torch, transformers):
    config = hf_config(transformers)
    model = make_hf(torch, transformers, config)
    state = {k: v.numpy() for k, v in model.state_dict().items()}

    missing = {k: v for k, v in state.items() if k != "decoder.decoder_layers.1.mlp.fc1.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['decoder\.decoder_layers\.1\.mlp\.fc1\.bias'\]"):
        hf_mae_to_maskjax(missing, config)
    with pytest.raises(ValueError, match=r"unexpected keys \['vit\.pooler\.dense\.weight'\]"):
        hf_mae_to_maskjax(dict(state, **{"vit.pooler.dense.weight": np.zeros((32, 32), np.float32)}), config)
    wrong = dict(state, **{"vit.layers.0.attention.k_proj.weight": np.zeros((32, 31), np.float32)})
    with pytest.raises(ValueError, match=r"vit\.layers\.0\.attention\.k_proj\.weight: got shape \(32, 31\), "
                                         r"expected \(32, 32\)"):
        hf_mae_to_maskjax(wrong, config)
    # A freshly constructed transformers-5 model has all-zero decoder position buffers: not representable.
    fresh = transformers.ViTMAEForPreTraining(config).state_dict()
    with pytest.raises(ValueError, match="decoder.decoder_pos_embed"):
        hf_mae_to_maskjax(fresh, config)
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        hf_mae_to_maskjax(state, hf_config(transformers, hidden_act="gelu_new"))
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        hf_mae_to_maskjax(state, {"num_hidden_layers": 2})

    params, _ = hf_mae_to_maskjax(state, config)
    params["decoder_embed"]["kernel"] = np.zeros((32, 33), np.float32)
    with pytest.raises(ValueError, match=r"decoder_embed/kernel: got shape \(32, 33\), expected \(32, 32\)"):
        maskjax_to_hf_mae(params, config)


def test_converted_encoder_is_a_vit(torch, transformers):
    """params['encoder'] in model_kwargs['encoder'] (a plain ViT, for probing / fine-tuning) encodes every patch as
    HF's encoder does with mask_ratio=0 and increasing noise (which keeps the patch order)."""
    config = hf_config(transformers, mask_ratio=0.0)
    model = make_hf(torch, transformers, config)
    params, model_kwargs = hf_mae_to_maskjax(model.state_dict(), config)
    images, _ = inputs()
    noise = np.broadcast_to(np.arange(NUM_PATCHES, dtype=np.float32), (2, NUM_PATCHES)).copy()
    _, latent = hf_forward(torch, model, images, noise)
    _, aux = jax.jit(model_kwargs["encoder"].apply)({"params": params["encoder"]}, images)
    assert aux["encoded"].shape == latent.shape == (2, NUM_PATCHES + 1, 32)
    np.testing.assert_allclose(np.asarray(aux["encoded"]), latent, rtol=0, atol=ATOL)
