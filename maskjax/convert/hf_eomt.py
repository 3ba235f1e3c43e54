"""Hugging Face `transformers.EomtForUniversalSegmentation` state dicts -> maskjax `EoMT` params.

    params, model_kwargs = hf_eomt_to_maskjax(hf_model.state_dict(), hf_model.config)  # or a .safetensors path
    eomt = EoMT(**model_kwargs)                                        # or: eomt, params = eomt_from_hf(hf_model)
    outputs, aux = eomt.apply({"params": params}, hf_eomt_inputs(images))  # images: maskjax's [-1, 1] NHWC
    # outputs['class_logits'] == HF class_queries_logits, outputs['mask_logits'] == HF masks_queries_logits

What maps one to one (HF -> maskjax):
  embeddings.patch_embeddings.projection  -> embedding/conv (kernel = stride = patch)
  embeddings.position_embeddings [N, D]   -> posemb/embedding [1, N, D] (learned, `posemb_grid` = HF's grid;
                                             HF adds it to the patch tokens only and never resizes it: HF runs at
                                             config.image_size only; maskjax resizes it bilinearly at other sizes)
  embeddings.cls_token, register_tokens   -> cls, registers (token order [cls, registers, patches] in both)
  layers.i (pre-LN, LayerScale, GELU MLP) -> encoder/block_i (ls1/ls2 = layer_scale1/2.lambda1)
  layernorm                               -> encoder/encoder_norm (HF's `self.layernorm`, applied before every
                                             prediction, intermediate and final, as in maskjax's `_predict`)
  query [Q, D]                            -> queries (prepended before block depth - num_blocks, in both)
  upscale_block.block.i                   -> upscale_i: deconv (ConvTranspose2d 2x2/2, kernel flipped for Flax),
                                             GELU, dwconv (depthwise 3x3, no bias), norm (HF LayerNorm2d, eps 1e-6)
  mask_head.fc1..fc3 (GELU between)       -> mask_head/mask_mlp_0..2
  class_predictor                         -> mask_head/class_head
Buffers read but not converted: `attn_mask_probs` (see `hf_eomt_mask_probs`), `criterion.empty_weight` (the
loss's no-object weight; maskjax's segmentation task owns its loss).

Masked attention: HF applies masks in eval whenever `attn_mask_probs[i] > 0` (a freshly constructed HF model has
them all 1; trained checkpoints end annealing at 0). Its mask is maskjax's: the queries' mask logits bilinearly
resized (half-pixel, no antialias) to the patch grid, `> 0`, queries always see the queries and prefix tokens,
a query's mask is dropped iff uniform > P. `hf_eomt_mask_probs(state)` gives the `mask_probs` argument that
reproduces HF's eval forward (None when all are 0); with 0 < P < 1 both sides draw from their own generators.

Not supported (ValueError naming the config field): `use_swiglu_ffn=True` (maskjax's ViT MLP is fc1 -> GELU ->
fc2, no gate), `hidden_act` other than the exact 'gelu' (HF uses it in the MLP, the upscaler and the mask head),
`layer_norm_eps` other than 1e-6 (HF's upscaler LayerNorm2d has a fixed 1e-6, maskjax's uses `layer_norm_eps`).
Training regularisers (`hidden_dropout_prob`, `attention_dropout`, `drop_path_rate`: HF uses one uniform drop-path
rate, maskjax a linear ramp) are not carried over: model_kwargs has none; pass your own for fine-tuning.

Inputs: HF's image processor rescales to [0, 1] and normalises with the ImageNet mean/std; maskjax's EoMT does no
normalisation, so feed it the same normalised values in NHWC (`hf_eomt_inputs` converts maskjax's [-1, 1] images).
"""

from typing import Any, Mapping, Optional, Union

import numpy as np

from maskjax.convert.common import (read_hf_config, StateDict, block_param_shapes, block_to_maskjax, check_params,
                                    check_state_dict, conv_to_flax, flatten_params, linear_to_dense,
                                    load_state_dict)
from maskjax.models.layers import pair

_WHAT = "hf_eomt_to_maskjax"
# HF's EomtImageProcessor defaults (IMAGENET_DEFAULT_MEAN / _STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UPSCALE_NORM_EPS = 1e-6  # HF EomtLayerNorm2d's eps, fixed whatever config.layer_norm_eps says.
# Buffers of HF's state dict that are not weights: accepted (shape-checked when present), not converted.
_OPTIONAL_BUFFERS = ("attn_mask_probs", "criterion.empty_weight", "embeddings.position_ids")
# HF layer key -> framework-neutral block part (common.BLOCK_PARTS / OPTIONAL_BLOCK_PARTS).
_HF_BLOCK = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
             "attention.q_proj.weight": "q.weight", "attention.q_proj.bias": "q.bias",
             "attention.k_proj.weight": "k.weight", "attention.k_proj.bias": "k.bias",
             "attention.v_proj.weight": "v.weight", "attention.v_proj.bias": "v.bias",
             "attention.out_proj.weight": "o.weight", "attention.out_proj.bias": "o.bias",
             "layer_scale1.lambda1": "ls1", "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
             "mlp.fc1.weight": "fc1.weight", "mlp.fc1.bias": "fc1.bias",
             "mlp.fc2.weight": "fc2.weight", "mlp.fc2.bias": "fc2.bias", "layer_scale2.lambda1": "ls2"}
_CONFIG_FIELDS = {"hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None, "mlp_ratio": 4,
                  "image_size": 640, "patch_size": 16, "num_channels": 3, "hidden_act": "gelu",
                  "layer_norm_eps": 1e-6, "layerscale_value": 1.0, "use_swiglu_ffn": False,
                  "num_upscale_blocks": 2, "num_blocks": 4, "num_queries": 200, "num_register_tokens": 4}


def _positive_int(cfg: dict, name: str, minimum: int = 1) -> None:
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"config: {name}={value!r} must be an int >= {minimum}")


def read_config(config: Any) -> dict:
    """The fields of an `EomtConfig` (object or `to_dict()`) the conversion needs, validated; a ValueError names the
    bad field. Adds 'num_labels' (from `num_labels` or `id2label`), 'mlp_dim', and (h, w) pairs 'image_size',
    'patch_size', 'grid'."""
    cfg, get = read_hf_config(config, _CONFIG_FIELDS, count_labels=True)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels", "num_blocks",
                 "num_queries", "num_labels"):
        _positive_int(cfg, name)
    for name in ("num_register_tokens", "num_upscale_blocks"):
        _positive_int(cfg, name, 0)
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError(f"config: hidden_size={cfg['hidden_size']} is not divisible by num_attention_heads="
                         f"{cfg['num_attention_heads']}")
    if cfg["num_blocks"] > cfg["num_hidden_layers"]:
        raise ValueError(f"config: num_blocks={cfg['num_blocks']} exceeds num_hidden_layers="
                         f"{cfg['num_hidden_layers']}")
    if cfg["use_swiglu_ffn"]:
        raise ValueError("config: use_swiglu_ffn=True is not supported: HF's SwiGLU FFN (mlp.gate_proj / up_proj / "
                         "down_proj) has no maskjax counterpart (maskjax's ViT MLP is fc1 -> GELU -> fc2)")
    if cfg["hidden_act"] != "gelu":
        raise ValueError(f"config: hidden_act={cfg['hidden_act']!r}: only the exact 'gelu' is supported (maskjax's "
                         "ViT MLP, EoMT upscaler and mask head use exact GELU)")
    if float(cfg["layer_norm_eps"]) != UPSCALE_NORM_EPS:
        raise ValueError(f"config: layer_norm_eps={cfg['layer_norm_eps']!r}: only {UPSCALE_NORM_EPS} is supported "
                         "(HF's upscaler LayerNorm2d uses a fixed 1e-6, maskjax's EoMT uses layer_norm_eps for it)")
    mlp_dim = int(cfg["hidden_size"] * cfg["mlp_ratio"])  # HF: int(hidden_size * mlp_ratio), no intermediate_size.
    if mlp_dim < 1:
        raise ValueError(f"config: mlp_ratio={cfg['mlp_ratio']!r} gives an MLP width of {mlp_dim}")
    cfg["mlp_dim"] = mlp_dim
    cfg["image_size"] = pair(cfg["image_size"], "config.image_size")
    cfg["patch_size"] = pair(cfg["patch_size"], "config.patch_size")
    (h, w), (ph, pw) = cfg["image_size"], cfg["patch_size"]
    if h % ph or w % pw:
        raise ValueError(f"config: image_size={(h, w)} is not divisible by patch_size={(ph, pw)}")
    cfg["grid"] = (h // ph, w // pw)
    return cfg


def hf_state_shapes(cfg: dict) -> dict[str, tuple]:
    """Every weight key of an `EomtForUniversalSegmentation` state dict for config `cfg` (from `read_config`) and
    its shape (buffers in `_OPTIONAL_BUFFERS` not included)."""
    width, mlp, (ph, pw), (gh, gw) = cfg["hidden_size"], cfg["mlp_dim"], cfg["patch_size"], cfg["grid"]
    shapes = {"embeddings.cls_token": (1, 1, width),
              "embeddings.register_tokens": (1, cfg["num_register_tokens"], width),
              "embeddings.patch_embeddings.projection.weight": (width, cfg["num_channels"], ph, pw),
              "embeddings.patch_embeddings.projection.bias": (width,),
              "embeddings.position_embeddings.weight": (gh * gw, width),
              "layernorm.weight": (width,), "layernorm.bias": (width,),
              "query.weight": (cfg["num_queries"], width),
              "class_predictor.weight": (cfg["num_labels"] + 1, width),
              "class_predictor.bias": (cfg["num_labels"] + 1,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        for name in ("norm1", "norm2"):
            shapes[f"{p}{name}.weight"] = shapes[f"{p}{name}.bias"] = (width,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}attention.{proj}.weight"] = (width, width)
            shapes[f"{p}attention.{proj}.bias"] = (width,)
        shapes[f"{p}layer_scale1.lambda1"] = shapes[f"{p}layer_scale2.lambda1"] = (width,)
        shapes.update({f"{p}mlp.fc1.weight": (mlp, width), f"{p}mlp.fc1.bias": (mlp,),
                       f"{p}mlp.fc2.weight": (width, mlp), f"{p}mlp.fc2.bias": (width,)})
    for i in range(cfg["num_upscale_blocks"]):
        p = f"upscale_block.block.{i}."
        shapes.update({f"{p}conv1.weight": (width, width, 2, 2), f"{p}conv1.bias": (width,),
                       f"{p}conv2.weight": (width, 1, 3, 3), f"{p}layernorm2d.weight": (width,),
                       f"{p}layernorm2d.bias": (width,)})
    for i in (1, 2, 3):
        shapes[f"mask_head.fc{i}.weight"] = (width, width)
        shapes[f"mask_head.fc{i}.bias"] = (width,)
    return shapes


def _optional_buffer_shapes(cfg: dict) -> dict[str, tuple]:
    return {"attn_mask_probs": (cfg["num_blocks"],), "criterion.empty_weight": (cfg["num_labels"] + 1,),
            "embeddings.position_ids": (1, cfg["grid"][0] * cfg["grid"][1])}


def maskjax_param_shapes(cfg: dict) -> dict[str, tuple]:
    """Flattened shapes of the maskjax `EoMT` params matching HF config `cfg` (from `read_config`)."""
    width, (ph, pw), (gh, gw) = cfg["hidden_size"], cfg["patch_size"], cfg["grid"]
    shapes = {"embedding/conv/kernel": (ph, pw, cfg["num_channels"], width), "embedding/conv/bias": (width,),
              "posemb/embedding": (1, gh * gw, width), "cls": (1, 1, width),
              "encoder/encoder_norm/scale": (width,), "encoder/encoder_norm/bias": (width,),
              "queries": (cfg["num_queries"], width),
              "mask_head/class_head/kernel": (width, cfg["num_labels"] + 1),
              "mask_head/class_head/bias": (cfg["num_labels"] + 1,)}
    if cfg["num_register_tokens"]:
        shapes["registers"] = (1, cfg["num_register_tokens"], width)
    for i in range(cfg["num_hidden_layers"]):
        for key, shape in block_param_shapes(width, cfg["mlp_dim"], cfg["num_attention_heads"],
                                             layer_scale=True).items():
            shapes[f"encoder/block_{i}/{key}"] = shape
    for i in range(cfg["num_upscale_blocks"]):
        shapes.update({f"upscale_{i}/deconv/kernel": (2, 2, width, width), f"upscale_{i}/deconv/bias": (width,),
                       f"upscale_{i}/dwconv/kernel": (3, 3, 1, width), f"upscale_{i}/norm/scale": (width,),
                       f"upscale_{i}/norm/bias": (width,)})
    for i in range(3):
        shapes[f"mask_head/mask_mlp_{i}/kernel"] = (width, width)
        shapes[f"mask_head/mask_mlp_{i}/bias"] = (width,)
    return shapes


def _read_state(state_dict: Union[str, Mapping[str, Any]], cfg: dict) -> StateDict:
    """The state dict as numpy, with every weight key and shape checked (optional buffers shape-checked too)."""
    state = load_state_dict(state_dict)
    expected = hf_state_shapes(cfg)
    buffers = _optional_buffer_shapes(cfg)
    expected.update({k: shape for k, shape in buffers.items() if k in state})
    check_state_dict(state, expected, _WHAT)
    return state


def deconv_to_flax(weight: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d weight [in, out, kh, kw] -> Flax `nn.ConvTranspose` kernel [kh, kw, in, out] (Flax's
    default transpose_kernel=False correlates with the kernel as stored, torch's transposed conv with it flipped)."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 0, 1))[::-1, ::-1])


def model_kwargs_from_config(cfg: dict) -> dict:
    """maskjax `EoMT(**kwargs)` for a validated HF config `cfg` (from `read_config`)."""
    return dict(num_classes=None, patch_size=cfg["patch_size"], width=cfg["hidden_size"],
                depth=cfg["num_hidden_layers"], mlp_dim=cfg["mlp_dim"], num_heads=cfg["num_attention_heads"],
                class_token=True, num_registers=int(cfg["num_register_tokens"]), posemb="learn",
                posemb_grid=cfg["grid"], pool="cls", layer_scale_init=float(cfg["layerscale_value"]),
                layer_norm_eps=float(cfg["layer_norm_eps"]), num_queries=int(cfg["num_queries"]),
                num_mask_blocks=int(cfg["num_blocks"]), num_seg_classes=int(cfg["num_labels"]),
                num_upscale=int(cfg["num_upscale_blocks"]))


def hf_eomt_to_maskjax(state_dict: Union[str, Mapping[str, Any]], config: Any) -> tuple[dict, dict]:
    """An `EomtForUniversalSegmentation` state dict (tensors/arrays or a .safetensors/.bin path) -> maskjax EoMT.

    Args:
      state_dict: e.g. `hf_model.state_dict()` or the Hub's `model.safetensors`.
      config: the model's `EomtConfig` (or `config.to_dict()`).
    Returns:
      (params, model_kwargs): `EoMT(**model_kwargs).apply({'params': params}, pixels_nhwc)` gives HF's
      class_queries_logits / masks_queries_logits as outputs['class_logits'] / ['mask_logits'] (pass
      `mask_probs=hf_eomt_mask_probs(state_dict)` and an 'anneal' rng when HF's buffer is not all zero).
    Raises ValueError naming every missing / unexpected key and shape mismatch, or the unsupported config field.
    """
    cfg = read_config(config)
    state = _read_state(state_dict, cfg)
    width = cfg["hidden_size"]
    encoder: dict = {"encoder_norm": {"scale": state["layernorm.weight"].copy(),
                                      "bias": state["layernorm.bias"].copy()}}
    for i in range(cfg["num_hidden_layers"]):
        parts = {part: state[f"layers.{i}.{key}"] for key, part in _HF_BLOCK.items()}
        encoder[f"block_{i}"] = block_to_maskjax(parts, cfg["num_attention_heads"])
    params: dict = {
        "embedding": {"conv": {"kernel": conv_to_flax(state["embeddings.patch_embeddings.projection.weight"]),
                               "bias": state["embeddings.patch_embeddings.projection.bias"].copy()}},
        "posemb": {"embedding": state["embeddings.position_embeddings.weight"].reshape(1, -1, width).copy()},
        "cls": state["embeddings.cls_token"].copy(),
        "encoder": encoder,
        "queries": state["query.weight"].copy(),
        "mask_head": {"class_head": {"kernel": linear_to_dense(state["class_predictor.weight"]),
                                     "bias": state["class_predictor.bias"].copy()}},
    }
    if cfg["num_register_tokens"]:
        params["registers"] = state["embeddings.register_tokens"].copy()
    for i in range(cfg["num_upscale_blocks"]):
        p = f"upscale_block.block.{i}."
        params[f"upscale_{i}"] = {
            "deconv": {"kernel": deconv_to_flax(state[f"{p}conv1.weight"]), "bias": state[f"{p}conv1.bias"].copy()},
            "dwconv": {"kernel": conv_to_flax(state[f"{p}conv2.weight"])},
            "norm": {"scale": state[f"{p}layernorm2d.weight"].copy(), "bias": state[f"{p}layernorm2d.bias"].copy()}}
    for i in range(3):
        params["mask_head"][f"mask_mlp_{i}"] = {"kernel": linear_to_dense(state[f"mask_head.fc{i + 1}.weight"]),
                                                "bias": state[f"mask_head.fc{i + 1}.bias"].copy()}
    check_params(flatten_params(params), maskjax_param_shapes(cfg), _WHAT + " (maskjax side)")
    return params, model_kwargs_from_config(cfg)


def hf_eomt_mask_probs(state_dict: Union[str, Mapping[str, Any], Any]) -> Optional[np.ndarray]:
    """The `mask_probs` argument of maskjax's EoMT that reproduces HF's *eval* forward, from HF's `attn_mask_probs`
    buffer (a state dict, a path, or the HF model): None (no masked attention, HF's inference) when every entry
    is 0 or the buffer is absent, else the float32 [num_blocks] probabilities.

    HF skips a block's mask when its P is 0 but then keeps the previous block's mask (the variable is not reset),
    which maskjax does not reproduce: a zero after a non-zero entry raises ValueError. (EoMT's annealing zeroes the
    earlier blocks first, so trained and mid-training buffers never have that pattern.)
    """
    if hasattr(state_dict, "state_dict") and hasattr(state_dict, "config"):
        state_dict = state_dict.state_dict()
    state = load_state_dict(state_dict)
    if "attn_mask_probs" not in state:
        return None
    probs = np.asarray(state["attn_mask_probs"], np.float32).reshape(-1)
    if np.any((probs < 0) | (probs > 1)):
        raise ValueError(f"hf_eomt_mask_probs: attn_mask_probs={probs.tolist()} must lie in [0, 1]")
    if not np.any(probs > 0):
        return None
    first = int(np.argmax(probs > 0))
    if np.any(probs[first:] == 0):
        raise ValueError(f"hf_eomt_mask_probs: attn_mask_probs={probs.tolist()} has a 0 after a non-zero entry; HF "
                         "then reuses the previous block's attention mask, which maskjax's EoMT does not reproduce")
    return probs


def eomt_from_hf(source: Any, config: Any = None) -> tuple[Any, dict]:
    """(maskjax `EoMT` module, params) from an HF `EomtForUniversalSegmentation` (its `.config` is used) or from a
    state dict / path plus its `config`. See `hf_eomt_to_maskjax`."""
    from maskjax.models.segmentation import EoMT
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        config = source.config if config is None else config
        source = source.state_dict()
    if config is None:
        raise ValueError("eomt_from_hf: config is required when the source is a state dict or a path")
    params, model_kwargs = hf_eomt_to_maskjax(source, config)
    return EoMT(**model_kwargs), params


def hf_eomt_inputs(images: Any, mean: Any = IMAGENET_MEAN, std: Any = IMAGENET_STD) -> np.ndarray:
    """maskjax images in [-1, 1] [B, H, W, C] -> the values HF's EomtImageProcessor feeds the model (rescaled to
    [0, 1], normalised by `mean` / `std` per channel), still NHWC float32 for maskjax's EoMT."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"hf_eomt_inputs: images must be [batch, H, W, C], got shape {images.shape}")
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return ((images + 1.0) / 2.0 - mean) / std
