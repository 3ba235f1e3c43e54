"""Config -> model settings shared by every task (tasks translate configs; models never read them): the ViT
encoder's config keys, their validation and the module they build, used by the 'vit' and 'mae' models."""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from maskjax.models.attention_options import AttentionOptions, TokenMaskSpec
from maskjax.models.layers import REMAT_POLICIES, SCANNED_BLOCKS
from maskjax.models.vit import ViT, decode_variant


def attention_config() -> ml_collections.ConfigDict:
    """`model.attention`: backend, approximate-gradient layers, bounded logits and a token mask on the patch grid."""
    a = ml_collections.ConfigDict()
    # 'auto', 'reference', 'blocked', 'pallas', 'splash', 'cudnn' or 'approx' (maskjax.attention.attention).
    a.backend = "auto"
    a.block_q = 0  # Query tile of 'blocked' / 'pallas' (0 = the backend's default).
    a.block_k = 0  # Key tile of 'blocked' / 'pallas' (0 = the backend's default).
    a.approx_mode = "lowrank"  # 'approx' backend: 'lowrank', 'exact_fwd' (exact forward) or 'paper'.
    a.approx_degree = 2  # 'approx' backend: even Taylor degree of the low-rank kernel.
    a.approx_window = 0  # 'approx' backend: width of the exactly computed local window (0 = none).
    a.approx_layers = ()  # Block indices that use 'approx' while the others use `backend` (() = per `backend`).
    a.logit_bound = 0.0  # > 0: normalised q, k with a learned temperature so |logit| <= bound (0 = off).
    a.record_max_logit = False  # Log the observed max |logit| per block (metric max_abs_logit/block_<i>).
    a.mask = "none"  # Token mask on the patch grid: 'none', 'window_2d', 'swin' or 'directional_2d'.
    a.radius = (1, 1)  # window_2d: neighbourhood radius (rows, cols) in (dilated) grid steps.
    a.dilation = (1, 1)  # window_2d: dilation (rows, cols).
    a.window = (4, 4)  # swin: partition size (rows, cols) in patches.
    a.shifted = True  # swin: odd blocks shift the partition by half a window.
    a.directions = ()  # directional_2d: one view direction per head, degrees (0 = right, 90 = up).
    a.fov = 90.0  # directional_2d: field of view in degrees.
    a.max_distance = 0.0  # directional_2d: reach in grid units (0 = unlimited).
    a.prefix_sees_grid = True  # cls/register tokens attend to every patch.
    a.grid_sees_prefix = True  # Every patch attends to the cls/register tokens.
    return a


def vit_schema(classifier: bool = True) -> ml_collections.ConfigDict:
    """`config.model` keys of a ViT (`classifier=False`: an encoder, without `num_classes` and `pool`)."""
    m = ml_collections.ConfigDict()
    m.variant = "Ti/4"  # '<size>/<patch>': size in mu, Ti, S, M, B, L, H.
    m.tubelet_size = 0  # Video: frames per tubelet token (VideoMAE: 2); 0 = image model.
    m.depth = -1  # Override the variant's depth (-1 = keep).
    m.width = -1  # Override the variant's width (-1 = keep).
    m.num_heads = -1  # Override the variant's number of heads (-1 = keep).
    m.mlp_dim = -1  # Override the variant's MLP width (-1 = keep).
    if classifier:
        m.num_classes = 10  # Classifier outputs; must match the data set.
    m.class_token = True  # Prepend a learned [cls] token.
    m.num_registers = 0  # Extra register tokens (Darcet et al. 2023).
    m.posemb = "learn"  # 'learn' or 'sincos2d'.
    if classifier:
        m.pool = "cls"  # 'cls' or 'gap' (global average of patch tokens) before the classifier.
    m.dropout = 0.0  # Dropout rate in MLPs and on embeddings.
    m.drop_path_rate = 0.1  # Stochastic depth at the last block (linear ramp from 0).
    m.layer_scale_init = 0.0  # LayerScale initial value (0 = off).
    m.dtype = "float32"  # Compute dtype ('float32' or 'bfloat16'); parameters stay float32.
    m.remat = False  # Rematerialise blocks in the backward pass to save memory.
    m.remat_policy = "nothing_saveable"  # What remat keeps: 'nothing_saveable', 'dots_saveable' or 'minimal'.
    m.scan_layers = False  # Blocks under nn.scan: compile time flat in depth; parameters stacked [depth, ...].
    m.attention = attention_config()
    return m


def _fail(key: str, value: Any, why: str):
    raise ValueError(f"config.{key}={value!r}: {why}")


def vit_size(model_config: ml_collections.ConfigDict) -> dict:
    """depth, width, num_heads, mlp_dim, patch_size of `config.model` (variant with overrides)."""
    size = decode_variant(model_config.variant)
    for key in ("depth", "width", "num_heads", "mlp_dim"):
        if model_config[key] > 0:
            size[key] = model_config[key]
    return size


def validate_vit(config: ml_collections.ConfigDict) -> None:
    """ValueErrors naming `config.model.<key>` (and data keys the encoder constrains), before any compute."""
    model = config.model
    try:
        decode_variant(model.variant)
    except ValueError as e:
        _fail("model.variant", model.variant, str(e))
    for key in ("depth", "width", "num_heads", "mlp_dim"):
        if model[key] == 0 or model[key] < -1:
            _fail(f"model.{key}", model[key], "must be a positive size or -1 (keep the variant's)")
    size = vit_size(model)
    if size["width"] % size["num_heads"]:
        _fail("model.width", size["width"], f"must be divisible by num_heads={size['num_heads']} "
              f"(model.variant={model.variant!r}, model.width / model.num_heads overrides)")
    patch = size["patch_size"]
    if config.data.image_size % patch:
        _fail("data.image_size", config.data.image_size, f"must be a positive multiple of the patch size {patch} "
              f"(model.variant={model.variant!r})")
    if model.posemb not in ("learn", "sincos2d"):
        _fail("model.posemb", model.posemb, "must be 'learn' or 'sincos2d'")
    if "pool" in model:
        if model.pool not in ("cls", "gap"):
            _fail("model.pool", model.pool, "must be 'cls' or 'gap'")
        if model.pool == "cls" and not model.class_token:
            _fail("model.pool", model.pool, "needs model.class_token=True")
    if "num_classes" in model and model.num_classes < 1:
        _fail("model.num_classes", model.num_classes, "must be >= 1")
    if model.dtype not in ("float32", "bfloat16"):
        _fail("model.dtype", model.dtype, "must be 'float32' or 'bfloat16'")
    if not 0.0 <= model.drop_path_rate < 1.0:
        _fail("model.drop_path_rate", model.drop_path_rate, "must be in [0, 1)")
    options, token_mask = attention_from_config(model.attention)
    if options.approx_layers is not None and not all(0 <= i < size["depth"] for i in options.approx_layers):
        _fail("model.attention.approx_layers", model.attention.approx_layers,
              f"block indices must be in [0, depth={size['depth']})")
    if token_mask.kind == "directional_2d" and len(token_mask.directions) != size["num_heads"]:
        _fail("model.attention.directions", model.attention.directions,
              f"needs one angle per head ({size['num_heads']} heads in model.variant={model.variant!r})")
    if token_mask.kind != "none" and (options.backend == "approx" or options.approx_layers is not None):
        _fail("model.attention.mask", token_mask.kind, "cannot be combined with approx attention layers")
    if model.remat_policy not in REMAT_POLICIES:
        _fail("model.remat_policy", model.remat_policy, f"must be one of {tuple(REMAT_POLICIES)}")
    if model.scan_layers and options.approx_layers is not None:
        _fail("model.scan_layers", True, f"scanned blocks share one attention setting; model.attention.approx_layers="
              f"{model.attention.approx_layers} differs per block (set scan_layers=False)")
    if model.scan_layers and token_mask.varies_by_layer():
        _fail("model.scan_layers", True, f"scanned blocks share one mask; model.attention.mask={token_mask.kind!r} "
              "with shifted windows differs per block (set scan_layers=False)")
    video = config.data.num_frames > 0
    if video != (model.tubelet_size > 0) or model.tubelet_size < 0:
        _fail("model.tubelet_size", model.tubelet_size, "must be >= 1 for video (data.num_frames > 0) and 0 "
              "for images")
    if video and config.data.num_frames % model.tubelet_size:
        _fail("data.num_frames", config.data.num_frames, f"must be a multiple of model.tubelet_size="
              f"{model.tubelet_size}")
    if video and model.posemb != "sincos2d":
        _fail("model.posemb", model.posemb, "video models use 'sincos2d' (fixed space-time sin-cos)")


def vit_from_config(model_config: ml_collections.ConfigDict) -> ViT:
    """A ViT whose size comes from `model_config.variant` and whose options from the other fields (an encoder
    without classifier when the config has no `num_classes`)."""
    attention, token_mask = attention_from_config(model_config.attention)
    return ViT(
        num_classes=model_config.num_classes if "num_classes" in model_config else None,
        tubelet_size=model_config.tubelet_size or None,
        class_token=model_config.class_token,
        num_registers=model_config.num_registers,
        posemb=model_config.posemb,
        pool=model_config.pool if "pool" in model_config else ("cls" if model_config.class_token else "gap"),
        dropout=model_config.dropout,
        drop_path_rate=model_config.drop_path_rate,
        layer_scale_init=model_config.layer_scale_init or None,
        dtype=jnp.dtype(model_config.dtype),
        remat=model_config.remat,
        remat_policy=model_config.remat_policy,
        scan_layers=model_config.scan_layers,
        attention=attention,
        token_mask=token_mask,
        **vit_size(model_config),
    )


def attention_from_config(attention: ml_collections.ConfigDict) -> tuple[AttentionOptions, TokenMaskSpec]:
    """`config.model.attention` -> (AttentionOptions, TokenMaskSpec); a ValueError names the bad key and value."""
    try:
        options = AttentionOptions(
            backend=attention.backend,
            block_q=attention.block_q or None,
            block_k=attention.block_k or None,
            approx_mode=attention.approx_mode,
            approx_degree=int(attention.approx_degree),
            approx_window=attention.approx_window or None,
            approx_layers=tuple(attention.approx_layers) or None,
            logit_bound=float(attention.logit_bound),
            record_max_logit=bool(attention.record_max_logit),
        )
        token_mask = TokenMaskSpec(
            kind=attention.mask,
            radius=tuple(attention.radius) if not isinstance(attention.radius, int) else attention.radius,
            dilation=tuple(attention.dilation) if not isinstance(attention.dilation, int) else attention.dilation,
            window=tuple(attention.window) if not isinstance(attention.window, int) else attention.window,
            shifted=bool(attention.shifted),
            directions=tuple(attention.directions),
            fov=float(attention.fov),
            max_distance=attention.max_distance or None,
            prefix_sees_grid=bool(attention.prefix_sees_grid),
            grid_sees_prefix=bool(attention.grid_sees_prefix),
        )
    except (ValueError, TypeError) as err:
        raise ValueError(f"config.model.attention: {err}") from err
    return options, token_mask


def logit_metrics(state: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Training metrics from the sown 'max_abs_logit' values: one per block ('max_abs_logit/block_<i>') and
    their maximum ('max_abs_logit'). Empty when nothing was recorded."""
    found = {}
    for path, value in jax.tree_util.tree_flatten_with_path(dict(state.get("intermediates", {})))[0]:
        keys = [getattr(p, "key", None) for p in path]
        if "max_abs_logit" not in keys:
            continue
        if SCANNED_BLOCKS in keys:  # scanned layers: one value per block on the leading axis
            per_block = {f"block_{i}": value[i] for i in range(value.shape[0])}
        else:
            per_block = {next((k for k in keys if isinstance(k, str) and k.startswith("block_")), "attn"): value}
        for block, v in per_block.items():
            found[f"max_abs_logit/{block}"] = jnp.maximum(found.get(f"max_abs_logit/{block}", v), v)
    if found:
        found["max_abs_logit"] = jnp.max(jnp.stack(list(found.values())))
    return found
