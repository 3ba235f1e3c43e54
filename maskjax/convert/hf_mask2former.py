"""Hugging Face `transformers.Mask2FormerForUniversalSegmentation` -> maskjax `MaskedAttentionDecoder` params (the
transformer decoder only: the `decoder` subtree of maskjax's `Mask2FormerStyle`).

    params, decoder_kwargs = hf_mask2former_decoder_to_maskjax(hf_model.state_dict(), hf_model.config)
    decoder = MaskedAttentionDecoder(**decoder_kwargs)
    class_logits, mask_logits, layers = decoder.apply({"params": params}, levels, mask_features)
    # levels: HF's `multi_scale_features` (the pixel decoder's 3 outputs, coarse -> fine) in NHWC, after HF's
    # input projections when the model has them; mask_features: HF's `mask_features` in NHWC.
    # class_logits / mask_logits == HF class_queries_logits / masks_queries_logits; layers[i] == HF
    # auxiliary_logits[i] (the prediction from the learned queries alone, then after each layer but the last).

What maps one to one (HF `model.transformer_module.*` -> maskjax decoder):
  queries_features [Q, D] / queries_embedder [Q, D]  -> query_feat / query_pos
  level_embed [3, D]                                 -> level_embed (added to each level's features, keys and
                                                        values, as in Mask2Former; maskjax needs 3 levels then)
  position_embedder (no weights)                     -> `detr_sine_posemb` (normalised, scale 2 pi, T 10000)
  decoder.layers.i: cross_attn (nn.MultiheadAttention in_proj q/k/v, out_proj) + cross_attn_layer_norm,
    self_attn (q/k/v/out_proj) + self_attn_layer_norm, fc1 -> relu -> fc2 + final_layer_norm (post-norm)
                                                     -> layer_i: cross_attn, cross_norm, self_attn, self_norm,
                                                        ffn_in, ffn_out, ffn_norm
  decoder.layernorm                                  -> decoder_norm
  decoder.mask_predictor.mask_embedder.{0,1,2}.0 (relu MLP)  -> mask_head/mask_mlp_0..2
  class_predictor (top level of the model)          -> mask_head/class_head
  HF's `decoder_layers` counts the initial prediction (as Mask2Former's DEC_LAYERS): num_layers = decoder_layers - 1.
Masked attention is the same: a query attends where the previous prediction's mask logits, bilinearly resized
(half-pixel, no antialias) to the level, have sigmoid >= 0.5, and a query with no such pixel attends everywhere
(empty_mask_rule='attend_all').

What does NOT map (keys left unread, listed precisely):
  * `model.pixel_level_module.encoder.*`: HF's backbone (Swin by default, any `backbone_config`); maskjax's
    `Mask2FormerStyle` uses a plain ViT (`backbone`), whose parameters have no counterpart there.
  * `model.pixel_level_module.decoder.*`: HF's pixel decoder (multi-scale deformable-attention transformer encoder
    over the backbone's 4 stages, FPN-style lateral/output convs, `mask_projection` 1x1 conv); maskjax's pixel
    decoder is `FeaturePyramid` (ViTDet simple pyramid from one feature map, no deformable attention).
  * `model.transformer_module.input_projections.{0,1,2}` (1x1 convs feature_size -> hidden_dim, present only when
    feature_size != hidden_dim or enforce_input_projection): maskjax's decoder has none (its pyramid already
    outputs `dim` channels). They raise ValueError unless `drop_input_projections=True`, in which case the caller
    must apply them to the levels (`hf_input_projections` returns them as Flax 1x1 conv kernels).
  * `criterion.empty_weight`: the loss's no-object weight (maskjax's segmentation task owns its loss).
Not supported (ValueError naming the config field): pre_norm=True, activation_function other than 'relu',
mask_feature_size != hidden_dim (maskjax's decoder width is the mask features' width).
"""

from typing import Any, Mapping, Union

import numpy as np

from maskjax.convert.common import (read_hf_config, StateDict, check_params, check_state_dict, conv_to_flax, flatten_params,
                                    heads_in, heads_out, linear_to_dense, load_state_dict)

_WHAT = "hf_mask2former_decoder_to_maskjax"
PREFIX = "model.transformer_module."
NUM_LEVELS = 3  # HF's Mask2FormerTransformerModule.num_feature_levels (fixed).
_CONFIG_FIELDS = {"hidden_dim": None, "mask_feature_size": None, "feature_size": None, "num_attention_heads": None,
                  "dim_feedforward": None, "decoder_layers": None, "num_queries": None,
                  "activation_function": "relu", "pre_norm": False, "enforce_input_projection": False}
# Keys outside the transformer module that are expected and deliberately not read (see the module docstring).
_UNMAPPED_PREFIXES = ("model.pixel_level_module.", "criterion.")


def read_config(config: Any) -> dict:
    """The fields of a `Mask2FormerConfig` (object or `to_dict()`) the conversion needs, validated; a ValueError
    names the bad field. Adds 'num_labels' (from `num_labels` or `id2label`) and 'input_projections' (bool)."""
    cfg, get = read_hf_config(config, _CONFIG_FIELDS, count_labels=True)
    for name in ("hidden_dim", "mask_feature_size", "feature_size", "num_attention_heads", "dim_feedforward",
                 "decoder_layers", "num_queries", "num_labels"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"config: {name}={value!r} must be a positive int")
    if cfg["hidden_dim"] % cfg["num_attention_heads"]:
        raise ValueError(f"config: hidden_dim={cfg['hidden_dim']} is not divisible by num_attention_heads="
                         f"{cfg['num_attention_heads']}")
    if cfg["hidden_dim"] % 4:
        raise ValueError(f"config: hidden_dim={cfg['hidden_dim']} must be divisible by 4 (maskjax's sine position "
                         "embedding interleaves sin/cos for y and x)")
    if cfg["pre_norm"]:
        raise ValueError("config: pre_norm=True is not supported (maskjax's decoder layers are post-norm, "
                         "Mask2Former's default)")
    if cfg["activation_function"] != "relu":
        raise ValueError(f"config: activation_function={cfg['activation_function']!r}: only 'relu' is supported "
                         "(maskjax's decoder FFN)")
    if cfg["mask_feature_size"] != cfg["hidden_dim"]:
        raise ValueError(f"config: mask_feature_size={cfg['mask_feature_size']} must equal hidden_dim="
                         f"{cfg['hidden_dim']} (maskjax's decoder width is the mask features' width)")
    cfg["input_projections"] = cfg["feature_size"] != cfg["hidden_dim"] or bool(cfg["enforce_input_projection"])
    return cfg


def hf_decoder_state_shapes(cfg: dict) -> dict[str, tuple]:
    """Every key of the transformer decoder (transformer module + class predictor) of a
    `Mask2FormerForUniversalSegmentation` state dict for config `cfg` (from `read_config`) and its shape."""
    dim, ffn, queries = cfg["hidden_dim"], cfg["dim_feedforward"], cfg["num_queries"]
    t = PREFIX
    shapes = {f"{t}queries_embedder.weight": (queries, dim), f"{t}queries_features.weight": (queries, dim),
              f"{t}level_embed.weight": (NUM_LEVELS, dim),
              f"{t}decoder.layernorm.weight": (dim,), f"{t}decoder.layernorm.bias": (dim,),
              "class_predictor.weight": (cfg["num_labels"] + 1, dim), "class_predictor.bias": (cfg["num_labels"] + 1,)}
    for i in range(3):
        p = f"{t}decoder.mask_predictor.mask_embedder.{i}.0."
        out = cfg["mask_feature_size"] if i == 2 else dim
        shapes[f"{p}weight"], shapes[f"{p}bias"] = (out, dim), (out,)
    if cfg["input_projections"]:
        for i in range(NUM_LEVELS):
            shapes[f"{t}input_projections.{i}.weight"] = (dim, cfg["feature_size"], 1, 1)
            shapes[f"{t}input_projections.{i}.bias"] = (dim,)
    for i in range(cfg["decoder_layers"] - 1):
        p = f"{t}decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"], shapes[f"{p}self_attn.{proj}.bias"] = (dim, dim), (dim,)
        shapes.update({f"{p}cross_attn.in_proj_weight": (3 * dim, dim), f"{p}cross_attn.in_proj_bias": (3 * dim,),
                       f"{p}cross_attn.out_proj.weight": (dim, dim), f"{p}cross_attn.out_proj.bias": (dim,),
                       f"{p}fc1.weight": (ffn, dim), f"{p}fc1.bias": (ffn,), f"{p}fc2.weight": (dim, ffn),
                       f"{p}fc2.bias": (dim,)})
        for norm in ("self_attn_layer_norm", "cross_attn_layer_norm", "final_layer_norm"):
            shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (dim,)
    return shapes


def maskjax_decoder_shapes(cfg: dict) -> dict[str, tuple]:
    """Flattened shapes of the maskjax `MaskedAttentionDecoder` params matching HF config `cfg`."""
    dim, ffn, heads = cfg["hidden_dim"], cfg["dim_feedforward"], cfg["num_attention_heads"]
    head_dim = dim // heads
    shapes = {"level_embed": (NUM_LEVELS, dim), "query_feat": (cfg["num_queries"], dim),
              "query_pos": (cfg["num_queries"], dim), "decoder_norm/scale": (dim,), "decoder_norm/bias": (dim,),
              "mask_head/class_head/kernel": (dim, cfg["num_labels"] + 1),
              "mask_head/class_head/bias": (cfg["num_labels"] + 1,)}
    for i in range(3):
        shapes[f"mask_head/mask_mlp_{i}/kernel"], shapes[f"mask_head/mask_mlp_{i}/bias"] = (dim, dim), (dim,)
    for i in range(cfg["decoder_layers"] - 1):
        p = f"layer_{i}/"
        for attn in ("cross_attn", "self_attn"):
            for name in ("query", "key", "value"):
                shapes[f"{p}{attn}/{name}/kernel"] = (dim, heads, head_dim)
                shapes[f"{p}{attn}/{name}/bias"] = (heads, head_dim)
            shapes[f"{p}{attn}/out/kernel"], shapes[f"{p}{attn}/out/bias"] = (heads, head_dim, dim), (dim,)
        for norm in ("cross_norm", "self_norm", "ffn_norm"):
            shapes[f"{p}{norm}/scale"] = shapes[f"{p}{norm}/bias"] = (dim,)
        shapes.update({f"{p}ffn_in/kernel": (dim, ffn), f"{p}ffn_in/bias": (ffn,), f"{p}ffn_out/kernel": (ffn, dim),
                       f"{p}ffn_out/bias": (dim,)})
    return shapes


def _read_state(state_dict: Union[str, Mapping[str, Any]], cfg: dict) -> StateDict:
    """The decoder's keys of the state dict (numpy), every key and shape checked; the unmapped parts
    (`_UNMAPPED_PREFIXES`) are dropped, any other key is unexpected."""
    state = load_state_dict(state_dict)
    kept = {k: v for k, v in state.items() if not k.startswith(_UNMAPPED_PREFIXES)}
    check_state_dict(kept, hf_decoder_state_shapes(cfg), _WHAT)
    return kept


def _attention(weights: tuple, biases: tuple, out_weight: np.ndarray, out_bias: np.ndarray, heads: int) -> dict:
    """torch q/k/v/out Linear weights [out, in] and biases -> maskjax MultiHeadAttention params."""
    attn = {}
    for name, weight, bias in zip(("query", "key", "value"), weights, biases):
        attn[name] = {"kernel": heads_in(weight, heads), "bias": bias.reshape(heads, -1).copy()}
    attn["out"] = {"kernel": heads_out(out_weight, heads), "bias": out_bias.copy()}
    return attn


def _norm(state: StateDict, key: str) -> dict:
    return {"scale": state[f"{key}.weight"].copy(), "bias": state[f"{key}.bias"].copy()}


def _dense(state: StateDict, key: str) -> dict:
    return {"kernel": linear_to_dense(state[f"{key}.weight"]), "bias": state[f"{key}.bias"].copy()}


def decoder_kwargs_from_config(cfg: dict) -> dict:
    """maskjax `MaskedAttentionDecoder(**kwargs)` for a validated HF config (from `read_config`); the same values
    are the decoder fields of `Mask2FormerStyle` (dim = hidden_dim)."""
    return dict(num_seg_classes=int(cfg["num_labels"]), num_queries=int(cfg["num_queries"]),
                num_heads=int(cfg["num_attention_heads"]), mlp_dim=int(cfg["dim_feedforward"]),
                num_layers=int(cfg["decoder_layers"]) - 1, masked_attention=True, empty_mask_rule="attend_all")


def hf_mask2former_decoder_to_maskjax(state_dict: Union[str, Mapping[str, Any]], config: Any, *,
                                      drop_input_projections: bool = False) -> tuple[dict, dict]:
    """The transformer decoder of a `Mask2FormerForUniversalSegmentation` state dict (tensors/arrays or a
    .safetensors/.bin path) -> maskjax `MaskedAttentionDecoder` params (= `Mask2FormerStyle` params['decoder']).

    Args:
      state_dict: e.g. `hf_model.state_dict()` (the backbone and pixel decoder keys are ignored: they do not map).
      config: the model's `Mask2FormerConfig` (or `config.to_dict()`).
      drop_input_projections: accept a model whose transformer module has input projections (feature_size !=
        hidden_dim or enforce_input_projection) and leave them out; apply them yourself (`hf_input_projections`).
    Returns:
      (params, decoder_kwargs) for `MaskedAttentionDecoder(**decoder_kwargs).apply({'params': params}, levels,
      mask_features)`.
    """
    cfg = read_config(config)
    state = _read_state(state_dict, cfg)
    if cfg["input_projections"] and not drop_input_projections:
        raise ValueError(f"{_WHAT}: {PREFIX}input_projections.0.weight (1x1 convs feature_size={cfg['feature_size']}"
                         f" -> hidden_dim={cfg['hidden_dim']}) has no place in maskjax's decoder; pass "
                         "drop_input_projections=True and apply them to the levels (hf_input_projections)")
    t, heads = PREFIX, cfg["num_attention_heads"]
    params: dict = {"level_embed": state[f"{t}level_embed.weight"].copy(),
                    "query_feat": state[f"{t}queries_features.weight"].copy(),
                    "query_pos": state[f"{t}queries_embedder.weight"].copy(),
                    "decoder_norm": _norm(state, f"{t}decoder.layernorm"),
                    "mask_head": {"class_head": _dense(state, "class_predictor")}}
    for i in range(3):
        params["mask_head"][f"mask_mlp_{i}"] = _dense(state, f"{t}decoder.mask_predictor.mask_embedder.{i}.0")
    for i in range(cfg["decoder_layers"] - 1):
        p = f"{t}decoder.layers.{i}."
        in_w = np.split(state[f"{p}cross_attn.in_proj_weight"], 3, axis=0)  # q, k, v (nn.MultiheadAttention order)
        in_b = np.split(state[f"{p}cross_attn.in_proj_bias"], 3, axis=0)
        self_w = tuple(state[f"{p}self_attn.{n}_proj.weight"] for n in "qkv")
        self_b = tuple(state[f"{p}self_attn.{n}_proj.bias"] for n in "qkv")
        params[f"layer_{i}"] = {
            "cross_attn": _attention(in_w, in_b, state[f"{p}cross_attn.out_proj.weight"],
                                     state[f"{p}cross_attn.out_proj.bias"], heads),
            "cross_norm": _norm(state, f"{p}cross_attn_layer_norm"),
            "self_attn": _attention(self_w, self_b, state[f"{p}self_attn.out_proj.weight"],
                                    state[f"{p}self_attn.out_proj.bias"], heads),
            "self_norm": _norm(state, f"{p}self_attn_layer_norm"),
            "ffn_in": _dense(state, f"{p}fc1"), "ffn_out": _dense(state, f"{p}fc2"),
            "ffn_norm": _norm(state, f"{p}final_layer_norm")}
    check_params(flatten_params(params), maskjax_decoder_shapes(cfg), _WHAT + " (maskjax side)")
    return params, decoder_kwargs_from_config(cfg)


def hf_input_projections(state_dict: Union[str, Mapping[str, Any]], config: Any) -> list:
    """HF's per-level input projections as Flax 1x1 `nn.Conv` params [{'kernel' [1, 1, feature_size, hidden_dim],
    'bias' [hidden_dim]}] * 3 (level order = HF's multi_scale_features), or [] when the model has none (they are
    the identity). Apply level i's to HF's multi_scale_features[i] before maskjax's decoder."""
    cfg = read_config(config)
    state = _read_state(state_dict, cfg)
    if not cfg["input_projections"]:
        return []
    return [{"kernel": conv_to_flax(state[f"{PREFIX}input_projections.{i}.weight"]),
             "bias": state[f"{PREFIX}input_projections.{i}.bias"].copy()} for i in range(NUM_LEVELS)]
