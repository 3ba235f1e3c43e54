"""Attention with masks: one entry point, `attention(q, k, v, mask=..., bias=..., score_mod=..., backend=...)`.

The mask language lives in ``masks`` (re-exported here), score modifiers in ``score_mods``, block maps
in ``block_map``; backends: ``reference`` (dense XLA), ``blocked`` (XLA, non-empty tiles only), ``splash`` (JAX's
TPU splash attention kernel), ``cudnn`` (cuDNN flash attention), maskjax's own Pallas flash kernels
(``pallas_tpu`` / ``pallas_gpu``; opt-in, not yet run on hardware) and ``approx``. ``choose_backend`` says what
``backend='auto'`` runs on a platform; ``sharded`` says how splash and cuDNN run per shard under a device mesh.
"""

from maskjax.attention.api import attention, choose_backend
from maskjax.attention.block_map import BlockMap
from maskjax.attention.blocked import blocked_attention
from maskjax.attention.masks import (Mask, TokenGrid, as_mask, causal, dense, directional_2d, full,
                                     function_mask, group_routing, lengths, local_1d, per_head, prefix_lm,
                                     query_masks, segment_ids, window_2d)
from maskjax.attention.reference import reference_attention
from maskjax.attention.score_mods import (ScoreMod, alibi, alibi_slopes, bias, gaussian_2d,
                                          relative_position_1d, score_function, soft_cap)

__all__ = [
    "attention", "choose_backend", "reference_attention", "blocked_attention", "BlockMap", "Mask", "TokenGrid",
    "as_mask",
    "causal", "dense", "directional_2d", "full", "function_mask", "group_routing", "lengths", "local_1d",
    "per_head", "prefix_lm", "query_masks", "segment_ids", "window_2d", "ScoreMod", "alibi",
    "alibi_slopes", "bias", "gaussian_2d", "relative_position_1d", "score_function", "soft_cap",
]
