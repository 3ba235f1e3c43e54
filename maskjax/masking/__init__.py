"""Token-masking strategies for masked image modeling: pure, ``jit``-able, exact count per sample.

Each strategy ``strategy(key, batch, grid, ratio, **options) -> MaskingResult`` (mask bool [B, N],
ids_keep [B, Nv], ids_masked [B, Nm], ids_restore [B, N]); ``make_masking(name, **options)`` builds one
from a config; ``gather_tokens`` / ``restore_tokens`` move tokens in and out of the visible set.
Keys: ``masking_key(seed, step, index=None)`` (fold_in of seed, purpose, step, example index).

Example::

    from maskjax import masking
    res = masking.make_masking("block", min_num_patches=16)(masking.masking_key(0, step), 8, (14, 14), 0.4)
    visible = masking.gather_tokens(tokens, res.ids_keep)
"""

from maskjax.masking.core import (PURPOSE_MASKING, MaskingResult, example_keys, gather_tokens, keep_all,
                                  mask_from_bool, mask_from_scores, masking_key, num_masked_tokens, restore_tokens,
                                  upsample_mask)
from maskjax.masking.registry import make_masking, strategy_options
from maskjax.masking.strategies import (NOISE_COLORS, STRATEGIES, attention_masking, block_masking,
                                        checkerboard_masking, filter_noise,
                                        grid_masking, hard_patch_alpha, hard_patch_masking, noise_masking,
                                        random_masking, tube_masking)

__all__ = [
    "MaskingResult", "PURPOSE_MASKING", "masking_key", "example_keys", "keep_all", "num_masked_tokens",
    "mask_from_scores", "mask_from_bool", "upsample_mask", "gather_tokens", "restore_tokens", "STRATEGIES",
    "NOISE_COLORS", "make_masking", "strategy_options", "random_masking", "block_masking", "grid_masking",
    "tube_masking",
    "attention_masking", "hard_patch_masking", "hard_patch_alpha", "noise_masking", "filter_noise",
    "checkerboard_masking",
]
