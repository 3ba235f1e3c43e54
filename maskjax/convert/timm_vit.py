"""timm `VisionTransformer` state dicts <-> maskjax `ViT` params.

    params, vit_kwargs = timm_to_maskjax("vit_small.safetensors", num_heads=6)   # or a dict of tensors/arrays
    logits, aux = ViT(**vit_kwargs).apply({"params": params}, images_nhwc)      # == timm model(images_nchw)
    state_dict = maskjax_to_timm(params, num_heads=6)                          # torch tensors for load_state_dict

Supported timm features: class token (or none), register tokens (`reg_tokens`), learned position embedding with
or without the prefix slots (`no_embed_class`), qkv bias or none, qk-norm, LayerScale (`init_values`), a linear
head or none, `global_pool` 'token' / 'avg' (with `fc_norm=False`) / ''. Not representable in maskjax, so rejected
by name: `fc_norm` (timm's default with global_pool='avg'), `pre_norm`, attention pooling ('map'), other MLPs.

Layouts: timm fuses q/k/v in `attn.qkv.weight` [3 * width, width] (rows: q, k, v; inside each, head-major);
maskjax keeps separate kernels [width, heads, head_dim] and an output kernel [heads, head_dim, width]. timm's
position embedding (when `no_embed_class=False`) also covers the cls/register slots: those slots are constant
per token, so they are folded into maskjax's `cls` / `registers` parameters (exactly what timm adds at run time).
LayerNorm eps is not stored in a state dict: timm's ViTs use 1e-6 (the default here); GELU is exact in both.
"""

import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from maskjax.convert.common import (BLOCK_PARTS, StateDict, block_from_maskjax, block_param_shapes,
                                    block_to_maskjax, check_params, check_state_dict, conv_to_flax, conv_to_torch,
                                    flatten_params, linear_to_dense, load_state_dict, param_shape, require_key,
                                    to_format, unwrap_params)
from maskjax.models.layers import pair, posemb_sincos_2d

GLOBAL_POOLS = {"token": "cls", "avg": "gap", "": "none"}
_WHAT = "timm_to_maskjax"
# timm block key -> framework-neutral block part (see common.BLOCK_PARTS); q/k/v come from the fused qkv.
_TIMM_BLOCK = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "attn.proj.weight": "o.weight",
               "attn.proj.bias": "o.bias", "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
               "mlp.fc1.weight": "fc1.weight", "mlp.fc1.bias": "fc1.bias", "mlp.fc2.weight": "fc2.weight",
               "mlp.fc2.bias": "fc2.bias", "attn.q_norm.weight": "q_norm.weight", "attn.q_norm.bias": "q_norm.bias",
               "attn.k_norm.weight": "k_norm.weight", "attn.k_norm.bias": "k_norm.bias", "ls1.gamma": "ls1",
               "ls2.gamma": "ls2"}


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def _infer_grid_and_embed_class(pos_tokens: int, num_prefix: int, no_embed_class: Optional[bool],
                                grid: Optional[tuple]) -> tuple[tuple[int, int], bool]:
    """Patch grid and no_embed_class from the pos_embed length (square grids unless `grid` is given)."""
    if grid is not None:
        patches = grid[0] * grid[1]
        options = {False: patches + num_prefix, True: patches}
        matches = [flag for flag, tokens in options.items() if tokens == pos_tokens]
        if no_embed_class is not None:
            matches = [flag for flag in matches if flag == no_embed_class]
        if not matches:
            raise ValueError(f"{_WHAT}: pos_embed has {pos_tokens} tokens, which fits neither the grid {grid} "
                             f"({patches} patches) nor it plus {num_prefix} prefix slots"
                             + ("" if no_embed_class is None else f" with no_embed_class={no_embed_class}"))
        return grid, matches[0]
    candidates = []
    for flag in ((False, True) if no_embed_class is None else (no_embed_class,)):
        patches = pos_tokens - (0 if flag else num_prefix)
        if patches > 0 and _is_square(patches):
            candidates.append((flag, math.isqrt(patches)))
    if num_prefix == 0 and candidates:
        candidates = candidates[:1]  # Both readings are the same when there are no prefix tokens.
    if len(candidates) != 1:
        raise ValueError(f"{_WHAT}: cannot tell the patch grid from pos_embed with {pos_tokens} tokens and "
                         f"{num_prefix} prefix tokens ({'ambiguous' if candidates else 'not a square grid'}); "
                         "pass image_size=(H, W) and/or no_embed_class")
    flag, side = candidates[0]
    return (side, side), flag


def timm_to_maskjax(state_dict: Union[str, Mapping[str, Any]], *, num_heads: int, global_pool: str = "token",
                    image_size: Optional[Union[int, Sequence[int]]] = None, no_embed_class: Optional[bool] = None,
                    layer_norm_eps: float = 1e-6) -> tuple[dict, dict]:
    """A timm VisionTransformer state dict (mapping of tensors/arrays, or a .safetensors/.pth path) -> maskjax.

    Args:
      state_dict: the weights, e.g. `timm_model.state_dict()` or a checkpoint file.
      num_heads: attention heads (not recorded in the weights).
      global_pool: the timm model's `global_pool`: 'token' (cls), 'avg' (mean of patch tokens; needs
        `fc_norm=False`) or '' (head on every token).
      image_size: (H, W) the pos_embed was trained at; default: a square grid read off pos_embed.
      no_embed_class: whether pos_embed lacks the prefix slots; default: read off its length.
      layer_norm_eps: the model's LayerNorm epsilon (timm ViTs: 1e-6).
    Returns:
      (params, vit_kwargs): `ViT(**vit_kwargs).apply({'params': params}, images)` computes the timm model's
      logits (`aux['encoded']` = `forward_features`). Params are numpy float32 arrays.
    Raises ValueError naming the key and shapes for missing / unexpected keys and shape mismatches.
    """
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"{_WHAT}: global_pool={global_pool!r} must be one of {list(GLOBAL_POOLS)} (timm's 'map' "
                         "attention pooling and 'max' pools have no maskjax equivalent)")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{_WHAT}: num_heads={num_heads!r} must be a positive int")
    state = load_state_dict(state_dict)
    for key in ("fc_norm.weight", "norm_pre.weight", "attn_pool.latent"):
        if key in state:
            raise ValueError(f"{_WHAT}: key {key!r} ({key.split('.')[0]}) has no maskjax ViT equivalent; timm "
                             "models with fc_norm (global_pool='avg' default), pre_norm or 'map' pooling cannot be "
                             "converted")

    proj = require_key(state, "patch_embed.proj.weight", _WHAT, ndim=4)
    width, channels, ph, pw = proj.shape
    if width % num_heads:
        raise ValueError(f"{_WHAT}: width {width} (patch_embed.proj.weight {proj.shape}) is not divisible by "
                         f"num_heads={num_heads}")
    block_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    depth = len(block_ids)
    if depth == 0:
        raise ValueError(f"{_WHAT}: no 'blocks.<i>.' keys in the state dict")
    mlp_dim = require_key(state, "blocks.0.mlp.fc1.weight", _WHAT, ndim=2).shape[0]
    class_token = "cls_token" in state
    num_registers = int(require_key(state, "reg_token", _WHAT, ndim=3).shape[1]) if "reg_token" in state else 0
    num_prefix = int(class_token) + num_registers
    qkv_bias = "blocks.0.attn.qkv.bias" in state
    qk_norm = "blocks.0.attn.q_norm.weight" in state
    layer_scale = "blocks.0.ls1.gamma" in state
    num_classes = int(require_key(state, "head.weight", _WHAT, ndim=2).shape[0]) if "head.weight" in state else 0
    pos_tokens = int(require_key(state, "pos_embed", _WHAT, ndim=3).shape[1])
    grid = None
    if image_size is not None:
        h, w = pair(image_size, "image_size")
        if h % ph or w % pw:
            raise ValueError(f"{_WHAT}: image_size={(h, w)} is not divisible by the patch size {(ph, pw)}")
        grid = (h // ph, w // pw)
    grid, no_embed_class = _infer_grid_and_embed_class(pos_tokens, num_prefix, no_embed_class, grid)
    if global_pool == "token" and not class_token:
        raise ValueError(f"{_WHAT}: global_pool='token' needs a 'cls_token' key (the model has no class token)")

    expected = timm_state_shapes(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
                                 patch_size=(ph, pw), channels=channels, grid=grid, class_token=class_token,
                                 num_registers=num_registers, no_embed_class=no_embed_class, qkv_bias=qkv_bias,
                                 qk_norm=qk_norm, layer_scale=layer_scale, num_classes=num_classes)
    check_state_dict(state, expected, _WHAT)

    pos = state["pos_embed"]
    patch_pos = pos[:, num_prefix:] if not no_embed_class else pos
    prefix_pos = np.zeros((1, num_prefix, width), np.float32) if no_embed_class else pos[:, :num_prefix]
    params: dict = {
        "embedding": {"conv": {"kernel": conv_to_flax(proj), "bias": state["patch_embed.proj.bias"].copy()}},
        "posemb": {"embedding": np.ascontiguousarray(patch_pos)},
        "encoder": {"encoder_norm": {"scale": state["norm.weight"].copy(), "bias": state["norm.bias"].copy()}},
    }
    if class_token:
        params["cls"] = state["cls_token"] + prefix_pos[:, :1]
    if num_registers:
        params["registers"] = state["reg_token"] + prefix_pos[:, int(class_token):]
    for i in range(depth):
        prefix = f"blocks.{i}."
        parts = {part: state[prefix + key] for key, part in _TIMM_BLOCK.items() if prefix + key in state}
        qkv_weight = state[prefix + "attn.qkv.weight"]
        qkv_b = state[prefix + "attn.qkv.bias"] if qkv_bias else np.zeros((3 * width,), np.float32)
        for j, part in enumerate("qkv"):
            parts[f"{part}.weight"] = qkv_weight[j * width:(j + 1) * width]
            parts[f"{part}.bias"] = qkv_b[j * width:(j + 1) * width]
        params["encoder"][f"block_{i}"] = block_to_maskjax(parts, num_heads)
    if num_classes:
        params["head"] = {"kernel": linear_to_dense(state["head.weight"]), "bias": state["head.bias"].copy()}

    vit_kwargs = dict(num_classes=num_classes or None, patch_size=(ph, pw), width=width, depth=depth,
                      mlp_dim=mlp_dim, num_heads=num_heads, class_token=class_token, num_registers=num_registers,
                      posemb="learn", posemb_grid=grid, pool=GLOBAL_POOLS[global_pool], qk_norm=qk_norm,
                      layer_scale_init=1.0 if layer_scale else None, layer_norm_eps=layer_norm_eps)
    return params, vit_kwargs


def timm_state_shapes(*, width: int, depth: int, mlp_dim: int, num_heads: int, patch_size: tuple, channels: int,
                      grid: tuple, class_token: bool, num_registers: int, no_embed_class: bool, qkv_bias: bool,
                      qk_norm: bool, layer_scale: bool, num_classes: int) -> dict[str, tuple]:
    """Every key of a timm VisionTransformer state dict of this configuration -> its shape."""
    head_dim = width // num_heads
    num_prefix = int(class_token) + num_registers
    shapes = {"patch_embed.proj.weight": (width, channels) + tuple(patch_size), "patch_embed.proj.bias": (width,),
              "pos_embed": (1, grid[0] * grid[1] + (0 if no_embed_class else num_prefix), width),
              "norm.weight": (width,), "norm.bias": (width,)}
    if class_token:
        shapes["cls_token"] = (1, 1, width)
    if num_registers:
        shapes["reg_token"] = (1, num_registers, width)
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (width,), p + "norm1.bias": (width,), p + "norm2.weight": (width,),
                       p + "norm2.bias": (width,), p + "attn.qkv.weight": (3 * width, width),
                       p + "attn.proj.weight": (width, width), p + "attn.proj.bias": (width,),
                       p + "mlp.fc1.weight": (mlp_dim, width), p + "mlp.fc1.bias": (mlp_dim,),
                       p + "mlp.fc2.weight": (width, mlp_dim), p + "mlp.fc2.bias": (width,)})
        if qkv_bias:
            shapes[p + "attn.qkv.bias"] = (3 * width,)
        if qk_norm:
            for name in ("q_norm", "k_norm"):
                shapes[f"{p}attn.{name}.weight"] = (head_dim,)
                shapes[f"{p}attn.{name}.bias"] = (head_dim,)
        if layer_scale:
            shapes[p + "ls1.gamma"] = (width,)
            shapes[p + "ls2.gamma"] = (width,)
    if num_classes:
        shapes["head.weight"] = (num_classes, width)
        shapes["head.bias"] = (num_classes,)
    return shapes


def maskjax_to_timm(params: Mapping[str, Any], *, no_embed_class: bool = False, qkv_bias: bool = True,
                    image_size: Optional[Union[int, Sequence[int]]] = None, tensors: str = "pt") -> dict:
    """maskjax ViT params -> a timm VisionTransformer state dict (inverse of `timm_to_maskjax`).

    Args:
      params: `{'params': tree}` or the tree (boxed or not) of a `ViT` with pool 'cls'/'gap'/'none'.
      no_embed_class: the target timm model's `no_embed_class` (timm's default False: pos_embed gets zero
        cls/register slots; maskjax's cls/registers already include their position term).
      qkv_bias: the target's `qkv_bias`; False requires zero q/k/v biases.
      image_size: (H, W) for a ViT with posemb='sincos2d' (no stored embedding): the fixed embedding of that
        grid is written as timm's pos_embed.
      tensors: 'pt' (torch tensors, for `load_state_dict`) or 'np'.
    Raises ValueError naming the parameter and shapes when params do not form a supported ViT.
    """
    what = "maskjax_to_timm"
    tree = unwrap_params(params)
    flat = flatten_params(tree)
    ph, pw, channels, width = param_shape(flat, "embedding/conv/kernel", what, 4)
    depth = len({m.group(1) for k in flat if (m := re.match(r"encoder/block_(\d+)/", k))})
    if depth == 0:
        raise ValueError(f"{what}: no 'encoder/block_<i>' parameters")
    _, num_heads, head_dim = param_shape(flat, "encoder/block_0/attn/query/kernel", what, 3)
    mlp_dim = param_shape(flat, "encoder/block_0/mlp/fc1/kernel", what, 2)[1]
    class_token = "cls" in tree
    num_registers = param_shape(flat, "registers", what, 3)[1] if "registers" in tree else 0
    num_prefix = int(class_token) + num_registers
    qk_norm = "encoder/block_0/attn/query_norm/scale" in flat
    layer_scale = "encoder/block_0/ls1/scale" in flat
    num_classes = param_shape(flat, "head/kernel", what, 2)[1] if "head" in tree else 0
    if "posemb" in tree:
        patch_pos = flat["posemb/embedding"]
        posemb_tokens = param_shape(flat, "posemb/embedding", what, 3)[1]
    else:
        if image_size is None:
            raise ValueError(f"{what}: params have no 'posemb' (posemb='sincos2d'); pass image_size=(H, W) to write "
                             "the fixed embedding as pos_embed")
        h, w = pair(image_size, "image_size")
        if h % ph or w % pw:
            raise ValueError(f"{what}: image_size={(h, w)} is not divisible by the patch size {(ph, pw)}")
        patch_pos = np.asarray(posemb_sincos_2d(h // ph, w // pw, width))
    expected = {"embedding/conv/kernel": (ph, pw, channels, width), "embedding/conv/bias": (width,),
                "encoder/encoder_norm/scale": (width,), "encoder/encoder_norm/bias": (width,)}
    if "posemb" in tree:
        expected["posemb/embedding"] = (1, posemb_tokens, width)
    if class_token:
        expected["cls"] = (1, 1, width)
    if num_registers:
        expected["registers"] = (1, num_registers, width)
    for i in range(depth):
        for key, shape in block_param_shapes(width, mlp_dim, num_heads, qk_norm=qk_norm,
                                             layer_scale=layer_scale).items():
            expected[f"encoder/block_{i}/{key}"] = shape
    if num_classes:
        expected["head/kernel"] = (width, num_classes)
        expected["head/bias"] = (num_classes,)
    check_params(flat, expected, what)
    if head_dim * num_heads != width:
        raise ValueError(f"{what}: query kernel {flat['encoder/block_0/attn/query/kernel'].shape} gives heads x "
                         f"head_dim != width {width}")

    state: StateDict = {"patch_embed.proj.weight": conv_to_torch(tree["embedding"]["conv"]["kernel"]),
                        "patch_embed.proj.bias": tree["embedding"]["conv"]["bias"]}
    if class_token:
        state["cls_token"] = tree["cls"]
    if num_registers:
        state["reg_token"] = tree["registers"]
    state["pos_embed"] = patch_pos if no_embed_class else np.concatenate(
        [np.zeros((1, num_prefix, width), np.float32), patch_pos], axis=1)
    inverse = {part: key for key, part in _TIMM_BLOCK.items()}
    for i in range(depth):
        parts = block_from_maskjax(tree["encoder"][f"block_{i}"])
        prefix = f"blocks.{i}."
        state[prefix + "attn.qkv.weight"] = np.concatenate([parts[f"{p}.weight"] for p in "qkv"], axis=0)
        qkv_b = np.concatenate([parts[f"{p}.bias"] for p in "qkv"], axis=0)
        if qkv_bias:
            state[prefix + "attn.qkv.bias"] = qkv_b
        elif np.any(qkv_b != 0):
            raise ValueError(f"{what}: qkv_bias=False but encoder/block_{i}/attn query/key/value biases are "
                             f"non-zero (max |bias| {np.abs(qkv_b).max():.3g})")
        for part, value in parts.items():
            if part not in BLOCK_PARTS[2:8]:  # q/k/v went into the fused qkv above.
                state[prefix + inverse[part]] = value
    state["norm.weight"] = tree["encoder"]["encoder_norm"]["scale"]
    state["norm.bias"] = tree["encoder"]["encoder_norm"]["bias"]
    if num_classes:
        state["head.weight"] = linear_to_dense(tree["head"]["kernel"])
        state["head.bias"] = tree["head"]["bias"]
    return to_format(state, tensors)
