"""Hugging Face `transformers.ViTMAEForPreTraining` state dicts <-> maskjax `MAE` params.

    params, model_kwargs = hf_mae_to_maskjax("model.safetensors", config)   # config: ViTMAEConfig or its dict
    mae = MAE(**model_kwargs)                                               # encoder = a maskjax ViT
    masking = mask_from_scores(noise, N - int(N * (1 - config.mask_ratio)), order="shuffle")  # HF's `noise=`
    pred, aux = mae.apply({"params": params}, images_nhwc, masking)         # == HF logits
    state_dict = maskjax_to_hf_mae(params, config)                          # torch tensors for load_state_dict

Key names: both the transformers>=5 layout (`vit.layers.N.attention.q_proj`, what `ViTMAEForPreTraining(config)
.state_dict()` has) and the transformers<5 layout of the checkpoints on the Hub (`vit.encoder.layer.N.attention.
attention.query`, ...) are read; `maskjax_to_hf_mae(..., legacy_keys=True)` writes the latter.

Position embeddings: HF stores fixed 2-D sin-cos buffers with a zero cls slot (encoder and decoder), in MAE's
[sin(col), cos(col), sin(row), cos(row)] layout, which is exactly maskjax's `posemb_sincos_2d` (checked by the
converter on every import). The encoder becomes `posemb='sincos2d'` when its buffer matches (else, or with
`encoder_posemb='learn'`, its buffer is copied into a learned embedding); a non-zero cls slot is folded into
`cls`. maskjax's decoder adds the fixed sin-cos embedding to the patch tokens only, so the decoder buffer must be
that embedding with a zero cls slot: anything else raises ValueError naming `decoder.decoder_pos_embed` and the
difference (a freshly constructed transformers-5 model has all-zero buffers until `from_pretrained` loads real
ones).

Loss: HF's norm-pix target divides by the *unbiased* patch variance (torch `.var()`); see `hf_mae_patch_targets`.
LayerNorm eps comes from `config.layer_norm_eps` (HF default 1e-12); GELU must be the exact one ('gelu').
"""

import re
from typing import Any, Mapping, Union

import jax.numpy as jnp
import numpy as np

from maskjax.convert.common import (read_hf_config, StateDict, block_from_maskjax, block_param_shapes, block_to_maskjax,
                                    check_params, check_state_dict, conv_to_flax, conv_to_torch, flatten_params,
                                    linear_to_dense, load_state_dict, to_format, unwrap_params)
from maskjax.models.layers import pair, posemb_sincos_2d
from maskjax.models.mae import patchify
from maskjax.models.vit import ViT

_WHAT = "hf_mae_to_maskjax"
ENCODER_POSEMBS = ("auto", "sincos2d", "learn")
# The largest |difference| between a stored sin-cos buffer and maskjax's embedding accepted as "the same" (the
# buffers are float32 roundings of float64 values: about 6e-8).
POSEMB_ATOL = 1e-6

# transformers<5 (Hub checkpoints) -> transformers>=5 key names, applied in order.
_LEGACY_RENAMES = ((r"^vit\.encoder\.layer\.", "vit.layers."),
                   (r"\.attention\.attention\.query\.", ".attention.q_proj."),
                   (r"\.attention\.attention\.key\.", ".attention.k_proj."),
                   (r"\.attention\.attention\.value\.", ".attention.v_proj."),
                   (r"\.attention\.output\.dense\.", ".attention.o_proj."),
                   (r"\.intermediate\.dense\.", ".mlp.fc1."),
                   (r"\.output\.dense\.", ".mlp.fc2."))
_MODERN_TO_LEGACY = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
                     "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
                     "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
# HF layer key (transformers>=5) -> framework-neutral block part (common.BLOCK_PARTS).
_HF_BLOCK = {"layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
             "attention.q_proj.weight": "q.weight", "attention.q_proj.bias": "q.bias",
             "attention.k_proj.weight": "k.weight", "attention.k_proj.bias": "k.bias",
             "attention.v_proj.weight": "v.weight", "attention.v_proj.bias": "v.bias",
             "attention.o_proj.weight": "o.weight", "attention.o_proj.bias": "o.bias",
             "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
             "mlp.fc1.weight": "fc1.weight", "mlp.fc1.bias": "fc1.bias",
             "mlp.fc2.weight": "fc2.weight", "mlp.fc2.bias": "fc2.bias"}
_CONFIG_FIELDS = {"hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None,
                  "intermediate_size": None, "image_size": 224, "patch_size": 16, "num_channels": 3,
                  "qkv_bias": True, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "decoder_hidden_size": 512,
                  "decoder_num_hidden_layers": 8, "decoder_num_attention_heads": 16,
                  "decoder_intermediate_size": 2048, "mask_ratio": 0.75, "norm_pix_loss": False}


def read_config(config: Any) -> dict:
    """The fields of a `ViTMAEConfig` (object or dict) the conversion needs, validated; ValueError names a bad one."""
    cfg, _ = read_hf_config(config, _CONFIG_FIELDS)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels",
                 "decoder_hidden_size", "decoder_num_attention_heads", "decoder_intermediate_size"):
        if isinstance(cfg[name], bool) or not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ValueError(f"config: {name}={cfg[name]!r} must be a positive int")
    if not isinstance(cfg["decoder_num_hidden_layers"], int) or cfg["decoder_num_hidden_layers"] < 1:
        raise ValueError(f"config: decoder_num_hidden_layers={cfg['decoder_num_hidden_layers']!r} must be >= 1 "
                         "(HF's decoder embeds, adds positions and normalises even at depth 0; maskjax's MAE at "
                         "decoder_depth=0 is a linear head)")
    for size, heads in (("hidden_size", "num_attention_heads"), ("decoder_hidden_size", "decoder_num_attention_heads")):
        if cfg[size] % cfg[heads]:
            raise ValueError(f"config: {size}={cfg[size]} is not divisible by {heads}={cfg[heads]}")
        if cfg[size] % 4:
            raise ValueError(f"config: {size}={cfg[size]} must be divisible by 4 (2-D sin-cos position embedding)")
    if cfg["hidden_act"] != "gelu":
        raise ValueError(f"config: hidden_act={cfg['hidden_act']!r}: only the exact 'gelu' is supported (maskjax's "
                         "ViT uses exact GELU)")
    cfg["image_size"] = pair(cfg["image_size"], "config.image_size")
    cfg["patch_size"] = pair(cfg["patch_size"], "config.patch_size")
    (h, w), (ph, pw) = cfg["image_size"], cfg["patch_size"]
    if h % ph or w % pw:
        raise ValueError(f"config: image_size={(h, w)} is not divisible by patch_size={(ph, pw)}")
    cfg["grid"] = (h // ph, w // pw)
    if not 0.0 <= float(cfg["mask_ratio"]) < 1.0:
        raise ValueError(f"config: mask_ratio={cfg['mask_ratio']!r} must be in [0, 1)")
    return cfg


def hf_num_masked(num_patches: int, mask_ratio: float) -> int:
    """Masked patches per image in HF/MAE `random_masking`: N - int(N * (1 - mask_ratio))."""
    return num_patches - int(num_patches * (1 - mask_ratio))


def hf_mae_patch_targets(images: Any, patch_size: Any, norm_pix_loss: bool) -> jnp.ndarray:
    """The reconstruction target of HF `ViTMAEForPreTraining` (and the official MAE code): patches [B, N, D] of
    images [B, H, W, C]; with norm_pix_loss, (patch - mean) / sqrt(var + 1e-6) with the unbiased (D - 1) variance
    that torch's `.var()` computes."""
    patches = patchify(jnp.asarray(images, jnp.float32), patch_size)
    if not norm_pix_loss:
        return patches
    mean = jnp.mean(patches, axis=-1, keepdims=True)
    var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + 1e-6)


def _modern_keys(state: StateDict) -> StateDict:
    """transformers<5 key names -> transformers>=5 names (keys already modern are unchanged)."""
    renamed = {}
    for key, value in state.items():
        new = key
        if key.startswith(("vit.encoder.layer.", "decoder.decoder_layers.")):
            for pattern, replacement in _LEGACY_RENAMES:
                new = re.sub(pattern, replacement, new)
        if new in renamed:
            raise ValueError(f"{_WHAT}: key {key!r} and another key both name {new!r} (mixed key layouts)")
        renamed[new] = value
    return renamed


def hf_state_shapes(cfg: dict) -> dict[str, tuple]:
    """Every key (transformers>=5 names) of a ViTMAEForPreTraining state dict of config `cfg` -> its shape."""
    width, dec = cfg["hidden_size"], cfg["decoder_hidden_size"]
    (ph, pw), (gh, gw), channels = cfg["patch_size"], cfg["grid"], cfg["num_channels"]
    tokens = gh * gw + 1
    shapes = {"vit.embeddings.cls_token": (1, 1, width), "vit.embeddings.position_embeddings": (1, tokens, width),
              "vit.embeddings.patch_embeddings.projection.weight": (width, channels, ph, pw),
              "vit.embeddings.patch_embeddings.projection.bias": (width,),
              "vit.layernorm.weight": (width,), "vit.layernorm.bias": (width,),
              "decoder.mask_token": (1, 1, dec), "decoder.decoder_pos_embed": (1, tokens, dec),
              "decoder.decoder_embed.weight": (dec, width), "decoder.decoder_embed.bias": (dec,),
              "decoder.decoder_norm.weight": (dec,), "decoder.decoder_norm.bias": (dec,),
              "decoder.decoder_pred.weight": (ph * pw * channels, dec),
              "decoder.decoder_pred.bias": (ph * pw * channels,)}

    def layers(prefix, depth, size, mlp):
        for i in range(depth):
            p = f"{prefix}.{i}."
            for norm in ("layernorm_before", "layernorm_after"):
                shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (size,)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[f"{p}attention.{proj}.weight"] = (size, size)
                if cfg["qkv_bias"] or proj == "o_proj":
                    shapes[f"{p}attention.{proj}.bias"] = (size,)
            shapes.update({f"{p}mlp.fc1.weight": (mlp, size), f"{p}mlp.fc1.bias": (mlp,),
                           f"{p}mlp.fc2.weight": (size, mlp), f"{p}mlp.fc2.bias": (size,)})

    layers("vit.layers", cfg["num_hidden_layers"], width, cfg["intermediate_size"])
    layers("decoder.decoder_layers", cfg["decoder_num_hidden_layers"], dec, cfg["decoder_intermediate_size"])
    return shapes


def _layer_parts(state: StateDict, prefix: str, size: int, qkv_bias: bool) -> dict[str, np.ndarray]:
    parts = {part: state[f"{prefix}.{key}"] for key, part in _HF_BLOCK.items() if f"{prefix}.{key}" in state}
    if not qkv_bias:
        for part in "qkv":
            parts[f"{part}.bias"] = np.zeros((size,), np.float32)
    return parts


def hf_mae_to_maskjax(state_dict: Union[str, Mapping[str, Any]], config: Any, *,
                      encoder_posemb: str = "auto") -> tuple[dict, dict]:
    """A `ViTMAEForPreTraining` state dict (tensors/arrays or a .safetensors/.bin path) -> maskjax MAE.

    Args:
      state_dict: e.g. `hf_model.state_dict()` or the Hub's `model.safetensors`.
      config: the model's `ViTMAEConfig` (or `config.to_dict()`).
      encoder_posemb: 'auto' (fixed 'sincos2d' when HF's buffer is that embedding, else a learned copy),
        'sincos2d' (ValueError unless it matches) or 'learn' (always a learned copy of HF's buffer).
    Returns:
      (params, model_kwargs): `MAE(**model_kwargs).apply({'params': params}, images, masking)` gives HF's
      `logits` for the same masking; model_kwargs['encoder'] is the `ViT` (its params are params['encoder']).
    """
    if encoder_posemb not in ENCODER_POSEMBS:
        raise ValueError(f"{_WHAT}: encoder_posemb={encoder_posemb!r} must be one of {ENCODER_POSEMBS}")
    cfg = read_config(config)
    state = _modern_keys(load_state_dict(state_dict))
    check_state_dict(state, hf_state_shapes(cfg), _WHAT)
    width, dec = cfg["hidden_size"], cfg["decoder_hidden_size"]
    grid = cfg["grid"]

    pos = state["vit.embeddings.position_embeddings"]
    fixed = np.asarray(posemb_sincos_2d(grid[0], grid[1], width))
    encoder_error = float(np.abs(pos[:, 1:] - fixed).max())
    if encoder_posemb == "sincos2d" and encoder_error > POSEMB_ATOL:
        raise ValueError(f"{_WHAT}: encoder_posemb='sincos2d' but vit.embeddings.position_embeddings differs from "
                         f"the 2-D sin-cos embedding by up to {encoder_error:.3g}; use encoder_posemb='learn'")
    learned = encoder_posemb == "learn" or (encoder_posemb == "auto" and encoder_error > POSEMB_ATOL)
    dec_pos = state["decoder.decoder_pos_embed"]
    dec_fixed = np.asarray(posemb_sincos_2d(grid[0], grid[1], dec))
    dec_error = float(np.abs(dec_pos[:, 1:] - dec_fixed).max())
    dec_cls = float(np.abs(dec_pos[:, 0]).max())
    if dec_error > POSEMB_ATOL or dec_cls > POSEMB_ATOL:
        raise ValueError(f"{_WHAT}: decoder.decoder_pos_embed {tuple(dec_pos.shape)} is not the fixed 2-D sin-cos "
                         f"embedding with a zero cls slot that maskjax's MAE decoder adds (patch slots differ by up "
                         f"to {dec_error:.3g}, cls slot max |value| {dec_cls:.3g})")

    encoder: dict = {
        "embedding": {"conv": {"kernel": conv_to_flax(state["vit.embeddings.patch_embeddings.projection.weight"]),
                               "bias": state["vit.embeddings.patch_embeddings.projection.bias"].copy()}},
        # HF adds the cls slot of the position buffer to the cls token (zero in real checkpoints): fold it in.
        "cls": state["vit.embeddings.cls_token"] + pos[:, :1],
        "encoder": {"encoder_norm": {"scale": state["vit.layernorm.weight"].copy(),
                                     "bias": state["vit.layernorm.bias"].copy()}},
    }
    if learned:
        encoder["posemb"] = {"embedding": np.ascontiguousarray(pos[:, 1:])}
    for i in range(cfg["num_hidden_layers"]):
        parts = _layer_parts(state, f"vit.layers.{i}", width, cfg["qkv_bias"])
        encoder["encoder"][f"block_{i}"] = block_to_maskjax(parts, cfg["num_attention_heads"])
    decoder = {"encoder_norm": {"scale": state["decoder.decoder_norm.weight"].copy(),
                                "bias": state["decoder.decoder_norm.bias"].copy()}}
    for i in range(cfg["decoder_num_hidden_layers"]):
        parts = _layer_parts(state, f"decoder.decoder_layers.{i}", dec, cfg["qkv_bias"])
        decoder[f"block_{i}"] = block_to_maskjax(parts, cfg["decoder_num_attention_heads"])
    params = {
        "encoder": encoder,
        "decoder_embed": {"kernel": linear_to_dense(state["decoder.decoder_embed.weight"]),
                          "bias": state["decoder.decoder_embed.bias"].copy()},
        "mask_token": state["decoder.mask_token"].reshape(dec).copy(),
        "decoder": decoder,
        "decoder_pred": {"kernel": linear_to_dense(state["decoder.decoder_pred.weight"]),
                         "bias": state["decoder.decoder_pred.bias"].copy()},
    }
    (ph, pw), channels = cfg["patch_size"], cfg["num_channels"]
    vit = ViT(num_classes=None, patch_size=(ph, pw), width=width, depth=cfg["num_hidden_layers"],
              mlp_dim=cfg["intermediate_size"], num_heads=cfg["num_attention_heads"], class_token=True,
              posemb="learn" if learned else "sincos2d", posemb_grid=grid if learned else None, pool="cls",
              layer_norm_eps=float(cfg["layer_norm_eps"]))
    model_kwargs = dict(encoder=vit, mode="mae", decoder_width=dec, decoder_depth=cfg["decoder_num_hidden_layers"],
                        decoder_heads=cfg["decoder_num_attention_heads"],
                        decoder_mlp_dim=cfg["decoder_intermediate_size"], output_dim=ph * pw * channels)
    return params, model_kwargs


def maskjax_params_shapes(cfg: dict, learned_posemb: bool) -> dict[str, tuple]:
    """Flattened shapes of maskjax MAE params matching HF config `cfg`."""
    width, dec = cfg["hidden_size"], cfg["decoder_hidden_size"]
    (ph, pw), (gh, gw), channels = cfg["patch_size"], cfg["grid"], cfg["num_channels"]
    shapes = {"encoder/embedding/conv/kernel": (ph, pw, channels, width), "encoder/embedding/conv/bias": (width,),
              "encoder/cls": (1, 1, width), "encoder/encoder/encoder_norm/scale": (width,),
              "encoder/encoder/encoder_norm/bias": (width,), "decoder_embed/kernel": (width, dec),
              "decoder_embed/bias": (dec,), "mask_token": (dec,), "decoder/encoder_norm/scale": (dec,),
              "decoder/encoder_norm/bias": (dec,), "decoder_pred/kernel": (dec, ph * pw * channels),
              "decoder_pred/bias": (ph * pw * channels,)}
    if learned_posemb:
        shapes["encoder/posemb/embedding"] = (1, gh * gw, width)
    for i in range(cfg["num_hidden_layers"]):
        for key, shape in block_param_shapes(width, cfg["intermediate_size"], cfg["num_attention_heads"]).items():
            shapes[f"encoder/encoder/block_{i}/{key}"] = shape
    for i in range(cfg["decoder_num_hidden_layers"]):
        for key, shape in block_param_shapes(dec, cfg["decoder_intermediate_size"],
                                             cfg["decoder_num_attention_heads"]).items():
            shapes[f"decoder/block_{i}/{key}"] = shape
    return shapes


def maskjax_to_hf_mae(params: Mapping[str, Any], config: Any, *, legacy_keys: bool = False,
                      tensors: str = "pt") -> dict:
    """maskjax MAE params -> a `ViTMAEForPreTraining` state dict for `config` (inverse of `hf_mae_to_maskjax`).

    Args:
      params: `{'params': tree}` or the tree (boxed or not) of an `MAE` (mode 'mae') whose encoder has a cls token,
        no registers, no head, and posemb 'sincos2d' or 'learn' at the config's grid.
      config: the target `ViTMAEConfig` (or dict); its sizes must match the params.
      legacy_keys: write transformers<5 / Hub names (`vit.encoder.layer.N.attention.attention.query`, ...).
      tensors: 'pt' (torch tensors, for `load_state_dict`) or 'np'.
    The position buffers are written as the fixed sin-cos embeddings with a zero cls slot (a learned encoder
    embedding is written as is).
    """
    what = "maskjax_to_hf_mae"
    cfg = read_config(config)
    tree = unwrap_params(params)
    flat = flatten_params(tree)
    learned = "encoder/posemb/embedding" in flat
    check_params(flat, maskjax_params_shapes(cfg, learned), what)
    width, dec = cfg["hidden_size"], cfg["decoder_hidden_size"]
    grid = cfg["grid"]
    enc = tree["encoder"]
    patch_pos = enc["posemb"]["embedding"] if learned else np.asarray(posemb_sincos_2d(grid[0], grid[1], width))
    state: StateDict = {
        "vit.embeddings.cls_token": enc["cls"],
        "vit.embeddings.position_embeddings": np.concatenate([np.zeros((1, 1, width), np.float32), patch_pos], 1),
        "vit.embeddings.patch_embeddings.projection.weight": conv_to_torch(enc["embedding"]["conv"]["kernel"]),
        "vit.embeddings.patch_embeddings.projection.bias": enc["embedding"]["conv"]["bias"],
        "vit.layernorm.weight": enc["encoder"]["encoder_norm"]["scale"],
        "vit.layernorm.bias": enc["encoder"]["encoder_norm"]["bias"],
        "decoder.mask_token": tree["mask_token"].reshape(1, 1, dec),
        "decoder.decoder_pos_embed": np.concatenate(
            [np.zeros((1, 1, dec), np.float32), np.asarray(posemb_sincos_2d(grid[0], grid[1], dec))], 1),
        "decoder.decoder_embed.weight": linear_to_dense(tree["decoder_embed"]["kernel"]),
        "decoder.decoder_embed.bias": tree["decoder_embed"]["bias"],
        "decoder.decoder_norm.weight": tree["decoder"]["encoder_norm"]["scale"],
        "decoder.decoder_norm.bias": tree["decoder"]["encoder_norm"]["bias"],
        "decoder.decoder_pred.weight": linear_to_dense(tree["decoder_pred"]["kernel"]),
        "decoder.decoder_pred.bias": tree["decoder_pred"]["bias"],
    }
    inverse = {part: key for key, part in _HF_BLOCK.items()}
    for prefix, blocks, depth in (("vit.layers", enc["encoder"], cfg["num_hidden_layers"]),
                                  ("decoder.decoder_layers", tree["decoder"], cfg["decoder_num_hidden_layers"])):
        for i in range(depth):
            for part, value in block_from_maskjax(blocks[f"block_{i}"]).items():
                if part in ("q.bias", "k.bias", "v.bias") and not cfg["qkv_bias"]:
                    if np.any(value != 0):
                        raise ValueError(f"{what}: config.qkv_bias=False but block_{i} of {prefix} has non-zero "
                                         f"{part[0]} bias (max |bias| {np.abs(value).max():.3g})")
                    continue
                state[f"{prefix}.{i}.{inverse[part]}"] = value
    if legacy_keys:
        state = {_legacy_key(k): v for k, v in state.items()}
    return to_format(state, tensors)


def _legacy_key(key: str) -> str:
    """transformers>=5 key -> transformers<5 (Hub checkpoint) key."""
    key = re.sub(r"^vit\.layers\.", "vit.encoder.layer.", key)
    for modern, legacy in _MODERN_TO_LEGACY.items():
        key = key.replace(f".{modern}.", f".{legacy}.")
    return key
