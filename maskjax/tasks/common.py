"""Config -> model settings shared by every task (tasks translate configs; models never read them)."""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from maskjax.models.attention_options import AttentionOptions, TokenMaskSpec


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
        if "max_abs_logit" in keys:
            block = next((k for k in keys if isinstance(k, str) and k.startswith("block_")), "attn")
            found[f"max_abs_logit/{block}"] = jnp.maximum(found.get(f"max_abs_logit/{block}", value), value)
    if found:
        found["max_abs_logit"] = jnp.max(jnp.stack(list(found.values())))
    return found
