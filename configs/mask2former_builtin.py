"""Mask2Former-style segmentation on the built-in panoptic shapes (64x64): the ViT-Ti/8 backbone of
configs/eomt_builtin.py, a simple ViTDet pyramid (4x4, 8x8, 16x16) with a light pixel decoder, and a 6-layer
masked-attention transformer decoder (dim 128, 16 queries); `--config.model.masked_attention=False` gives plain
cross-attention (the ablation of experiments/segmentation/).

Command:
  python -m maskjax.main --config=configs/mask2former_builtin.py --workdir=workdirs/mask2former_builtin
Smaller and faster (tests, notebook): --config=configs/mask2former_builtin.py:runlocal
Arguments (comma-separated key=value after ':'): runlocal, steps=<int>, size=<image side>.
Runtime and result here: not measured yet (experiments/segmentation/ will write them).
"""

import ml_collections

from maskjax.train.config import load_config_file


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # Data, backbone, steps, batch and optimizer of configs/eomt_builtin.py: the heads compare at equal budget.
    shared = load_config_file("eomt_builtin.py", next_to=__file__)
    return shared.segmentation_config("mask2former", arg, "configs/mask2former_builtin.py")
